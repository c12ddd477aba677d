"""The live dashboard: a page fed by server-sent events from `recommendations` and `events.dlq`."""
from streams.tools.dashboard.server import DashboardState, create_app, run

__all__ = ["DashboardState", "create_app", "run"]
