"""
A test whose system tool is missing skips on a developer's machine and fails
under CI, which installs every tool: a skip there would be a green run that
tested nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TIMEOUT, missing_tool

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_a_missing_tool_skips_the_test_outside_ci(monkeypatch, ci):
    """Without CI (unset or a false value) the test is skipped, naming the tool."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="systemd-analyze not installed"):
        missing_tool("systemd-analyze not installed")


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_a_missing_tool_fails_the_test_under_ci(monkeypatch, ci):
    """With CI set, as CI runners set it, the same test fails."""
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="systemd-analyze not installed"):
        missing_tool("systemd-analyze not installed")


def test_the_unit_file_test_fails_under_ci_without_systemd_analyze(tmp_path):
    """
    End to end: pytest run with CI=true and a PATH without systemd-analyze
    reports the unit-file test failed, not skipped.
    """
    env = {**os.environ, "CI": "true", "PATH": str(tmp_path)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "tests/test_systemd.py::test_unit_file_verifies_and_rates_at_most_2_0_exposure",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=6 * TIMEOUT,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout, result.stdout
    assert "systemd-analyze not installed" in result.stdout, result.stdout
