"""The molecule scenario (default driver, this machine, a temporary root): prepare, converge,
idempotence, verify. It repeats what test_install.py checks, through molecule's own steps, so
it runs only where molecule is installed (pip install molecule==26.10.0)."""

from __future__ import annotations

import re
import subprocess

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_molecule_default_scenario_passes(ansible) -> None:
    exe = ansible.require_tool("molecule", "pip install molecule==26.10.0")
    proc = subprocess.run(
        [exe, "test"],
        cwd=ansible.dir,
        env=ansible.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1400,
        stdin=subprocess.DEVNULL,
    )
    report = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    assert proc.returncode == 0, report[-8000:]
    assert "idempotence: Executed: Successful" in report, report[-4000:]
