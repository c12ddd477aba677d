"""A/B (and more) arms: variants of the served model, and which one a user sees.

AB_ARMS lists the arms, `name[=weight]:bundle_dir[@fusion_mode]`, comma-separated, e.g.
`control=90:artifacts/a,treatment=10:artifacts/b@gate`. A user's arm is fixed by a hash of
AB_SALT and the user id: the same on every worker and across restarts, and independent of
the arms' order in the setting. Weights are relative (default 1 each).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from streams.bundle import FUSION_MODES
from streams.errors import ConfigError

_ARM = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(=(?P<weight>[0-9.]+))?:(?P<path>[^@]+)(@(?P<mode>\w+))?$")


@dataclass(frozen=True)
class Arm:
    name: str
    bundle_dir: Path
    fusion_mode: str  # "" = the bundle's default
    weight: float


def parse_arms(spec: str) -> tuple[Arm, ...]:
    """AB_ARMS -> its arms; "" -> none (one model for everyone)."""
    arms = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _ARM.match(part)
        if m is None:
            raise ConfigError(f"AB_ARMS entry {part!r} is not name[=weight]:bundle_dir[@mode], "
                              "e.g. control=90:artifacts/a,treatment=10:artifacts/b@gate")
        mode = m["mode"] or ""
        if mode and mode not in FUSION_MODES:
            raise ConfigError(f"AB_ARMS arm {m['name']!r}: fusion mode {mode!r} is not one of "
                              f"{', '.join(FUSION_MODES)}")
        try:
            weight = float(m["weight"]) if m["weight"] else 1.0
        except ValueError:
            weight = -1.0
        if weight <= 0:
            raise ConfigError(f"AB_ARMS arm {m['name']!r}: weight {m['weight']!r} must be > 0")
        arms.append(Arm(m["name"], Path(m["path"]).expanduser(), mode, weight))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"AB_ARMS names an arm twice: {', '.join(names)}")
    if len(arms) == 1:
        raise ConfigError("AB_ARMS needs two arms or more (one model for all: set BUNDLE_DIR)")
    return tuple(arms)


def unit_hash(salt: str, user_id: str) -> float:
    """A user's stable place in [0, 1)."""
    digest = hashlib.blake2b(f"{salt}\0{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def arm_of(user_id: str, arms: tuple[Arm, ...], salt: str) -> Arm:
    """The arm `user_id` sees: arms take shares of [0, 1) by weight, in name order."""
    ordered = sorted(arms, key=lambda a: a.name)
    point = unit_hash(salt, user_id) * sum(a.weight for a in ordered)
    for arm in ordered:
        point -= arm.weight
        if point < 0:
            return arm
    return ordered[-1]
