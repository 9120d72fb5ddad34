"""``moe2ctl demo`` runs the whole pipeline on the tiny fleet (broker, agents, profiles, scores,
gate, subset, prompts, the comparison through the gateway) and stops everything it started:
at the end, and on Ctrl-C (SIGINT) in the middle."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MOE2_DATA_DIR": str(tmp_path / "data"),
        "MOE2_MODELS_DIR": str(tmp_path / "models"),
        "MOE2_CONFIG": str(tmp_path / "none.toml"),  # nothing from the user's own settings
    }


def _demo(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from moe2.controller.cli import main; main()",
        "demo",
        "--workdir",
        str(tmp_path / "work"),
        *args,
    ]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.timeout(900)
def test_the_demo_runs_the_pipeline_and_moe2_beats_its_baselines(tmp_path: Path) -> None:
    (tmp_path / "none.toml").write_text("")
    run = subprocess.run(
        _demo(tmp_path, "--questions", "160", "--json"),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for step in ("[1/8] broker", "[3/8] fleet", "[5/8] gate", "[6/8] optimise", "[8/8] eval"):
        assert step in out
    assert "| MoE² promised |" in out and "summary" in out
    facts = json.loads(out.strip().splitlines()[-1])
    ev = facts["evaluation"]
    assert ev["moe2_all"] > ev["best_single"] and ev["moe2_all"] > ev["vote_all"]
    assert all(c["feasible"] for c in ev["cells"])
    # the summary says whether every cell kept its limits, as the cells do, and how close the
    # measured costs came to the promise (kept or not is a timing: the bench reports it)
    broken = [c for c in ev["cells"] if c["over"]]
    said = "no 'over' cell" if not broken else f"limits broken in {len(broken)} of"
    assert said in out
    assert "MoE² measured / promised: delay" in out
    assert all(c["delay_ratio"] > 0 and c["energy_ratio"] > 0 for c in ev["cells"])
    assert facts["optimise"]["accepted_by"] and facts["gate"]["loaded_by"]
    assert "energy modelled" in facts["costs"]
    # everything it started is stopped
    for pid in [facts["broker"]["pid"], *facts["agents"].values()]:
        assert _gone(pid), pid
    assert not (tmp_path / "work" / "registry.db-journal").exists()


@pytest.mark.timeout(900)
def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    (tmp_path / "none.toml").write_text("")
    proc = subprocess.Popen(
        _demo(tmp_path),
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "scores: every expert" in line or "[5/8]" in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(600), "".join(lines)[-3000:]
        text = "".join(lines)
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 5, text  # the broker and four agents
        assert all(not _gone(pid, 0.1) for pid in pids)  # running
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    text = "".join(lines)
    assert "interrupted: every process the demo started has been stopped" in text
    for pid in pids:
        assert _gone(pid), (pid, text[-2000:])


@pytest.mark.timeout(900)
def test_a_demo_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL runs none of the demo's cleanup: its broker and agents must go by themselves
    (each child asked the kernel for a signal when its parent dies)."""
    (tmp_path / "none.toml").write_text("")
    proc = subprocess.Popen(
        _demo(tmp_path),
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "scores: every expert" in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(600), "".join(lines)[-3000:]
        pids = [int(p) for p in re.findall(r"pid (\d+)", "".join(lines))]
        assert len(pids) == 5, "".join(lines)  # the broker and four agents
        assert all(not _gone(pid, 0.1) for pid in pids)  # running
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
    for pid in pids:
        assert _gone(pid, 20.0), (pid, "".join(lines)[-2000:])


@pytest.mark.parametrize("flag", ["--fleet", "--device-class"])
def test_demo_help_names_its_options(flag: str) -> None:
    from click.testing import CliRunner

    from moe2.controller.cli import main

    run = CliRunner().invoke(main, ["demo", "--help"])
    assert run.exit_code == 0 and flag in run.output
