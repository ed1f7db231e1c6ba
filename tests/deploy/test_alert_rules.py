"""The alerting rules under deploy/prometheus/rules/ fire when they should: promtool's own rule unit tests.

deploy/prometheus/tests/aim.test.yml feeds synthetic series (a down target, a job with no targets at all as under
compose's DNS discovery when the service crash-loops, a healthy replica) and states which alerts fire when. Skips
when promtool is not installed (.ci/run installs Debian's prometheus package, which ships it).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.deploy.conftest import DEPLOY, load_yaml

RULES = DEPLOY / "prometheus" / "rules"
RULE_TESTS = DEPLOY / "prometheus" / "tests"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def test_rule_files_pass_promtool_check() -> None:
    promtool = _promtool()
    files = sorted(RULES.glob("*.yml"))
    proc = subprocess.run([promtool, "check", "rules", *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rule_unit_tests() -> None:
    promtool = _promtool()
    tests = sorted(RULE_TESTS.glob("*.test.yml"))
    assert tests, "no promtool rule tests under deploy/prometheus/tests/"
    # cwd: rule_files in a test file are relative to it.
    proc = subprocess.run(
        [promtool, "test", "rules", *(t.name for t in tests)],
        cwd=RULE_TESTS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_rule_test() -> None:
    """Checked even where promtool is missing: the down-detection alerts exist and have rule tests."""
    alerts = {r["alert"] for g in load_yaml(RULES / "aim.yml")["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        case["alertname"]
        for path in RULE_TESTS.glob("*.test.yml")
        for t in load_yaml(path)["tests"]
        for case in t.get("alert_rule_test", [])
    }
    # AimAbsent is the one that fires under compose's DNS discovery, where AimDown cannot: both must be tested.
    assert {"AimDown", "AimAbsent"} <= alerts
    assert {"AimDown", "AimAbsent"} <= tested
