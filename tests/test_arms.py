"""A/B arms: the AB_ARMS format, and a stable split of users by weight."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from streams.arms import arm_of, parse_arms
from streams.config import Settings
from streams.errors import ConfigError


def test_arms_parse_with_weights_and_fusion_modes():
    arms = parse_arms("control=90:artifacts/a, treatment=10:artifacts/b@gate")
    assert [(a.name, a.bundle_dir, a.fusion_mode, a.weight) for a in arms] == [
        ("control", Path("artifacts/a"), "", 90.0), ("treatment", Path("artifacts/b"), "gate", 10.0)]
    assert parse_arms("") == ()
    assert parse_arms("a:x,b:y")[1].weight == 1.0


@pytest.mark.parametrize("spec, says", [
    ("control", "is not name[=weight]:bundle_dir[@mode]"),
    ("a:x,b:y@blend", "fusion mode 'blend'"),
    ("a=0:x,b:y", "must be > 0"),
    ("a:x,a:y", "names an arm twice"),
    ("a:x", "needs two arms"),
])
def test_a_bad_arms_setting_is_one_clear_error(spec, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings(ab_arms=spec)


def test_users_split_by_weight_within_5_percent_and_always_the_same_way():
    arms = parse_arms("control=3:a,treatment=1:b")
    users = [f"user{i}" for i in range(10_000)]
    counts = Counter(arm_of(u, arms, "salt").name for u in users)
    assert abs(counts["control"] / 10_000 - 0.75) < 0.05 * 0.75
    assert abs(counts["treatment"] / 10_000 - 0.25) < 0.05 * 0.25
    # the same user, the same arm: however often asked, in whatever order the arms are listed
    again = parse_arms("treatment=1:b,control=3:a")
    assert all(arm_of(u, arms, "salt").name == arm_of(u, again, "salt").name for u in users)
    # another salt deals them out afresh
    moved = sum(arm_of(u, arms, "salt").name != arm_of(u, arms, "pepper").name for u in users)
    assert moved > 1_000
