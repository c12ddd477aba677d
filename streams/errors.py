"""One exception base class for the whole project.

Every error we raise on purpose says what happened and how to fix it.
"""


class InterestStreamError(Exception):
    """Base class of every error interest-stream raises on purpose."""


class ConfigError(InterestStreamError):
    """A setting is missing or has a value we cannot use."""


class BundleError(InterestStreamError):
    """The model bundle is missing, incomplete or corrupt."""


class InfraError(InterestStreamError):
    """The local Kafka broker or Redis could not be installed, started or reached."""
