"""Installing moe2 as a user would: wheels built from this checkout, ``pip install`` into
clean virtual environments, the agent with no extras and the controller without ``[train]``
(their dependencies come from the package index, llama-cpp-python from pip's wheel cache),
then the commands a plain install promises, against a real broker and a real agent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from moe2.shared.mqtt import BrokerConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# Every command's data folder (registry, gates): a throwaway one, never the user's.
DATA_DIR = Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / f"moe2-packaging-{os.getpid()}"
HEAVY = ("torch", "onnx", "onnxruntime", "pyarrow", "psycopg", "matplotlib", "tokenizers")


def run(*cmd: str | Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["MOE2_DATA_DIR"] = str(DATA_DIR)  # never the user's own registry
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheels")
    out = tmp / "wheels"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist")
    for part in ("shared", "agent", "controller"):
        shutil.copytree(REPO / part, tmp / part, ignore=ignore)  # symlinks followed
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        out,
        tmp / "shared",
        tmp / "agent",
        tmp / "controller",
    )
    return out


def venv_with(tmp: Path, wheels: Path, *requirements: str) -> Path:
    run(sys.executable, "-m", "venv", tmp)
    run(
        tmp / "bin/python",
        "-m",
        "pip",
        "install",
        "-q",
        "--find-links",
        wheels,
        *requirements,
        timeout=900,
    )
    return tmp / "bin"


def assert_light(bin_dir: Path) -> None:
    code = (
        "import importlib.util as u, json; "
        f"print(json.dumps({{m: u.find_spec(m) is not None for m in {HEAVY!r}}}))"
    )
    found = json.loads(run(bin_dir / "python", "-c", code).stdout)
    assert not any(found.values()), found


def test_plain_installs_run_the_promised_commands(
    wheels: Path,
    tmp_path: Path,
    tiny_models: dict[str, Path],
    broker_config: BrokerConfig,
) -> None:
    agent_bin = venv_with(tmp_path / "agent", wheels, "moe2-edge-agent")
    ctl_bin = venv_with(tmp_path / "ctl", wheels, "moe2-edge-controller")
    assert_light(agent_bin)
    assert_light(ctl_bin)
    assert run(agent_bin / "python", "-c", "import llama_cpp", check=False).returncode == 0
    # the controller alone does not bring the agent's llama.cpp
    assert run(ctl_bin / "python", "-c", "import llama_cpp", check=False).returncode != 0
    # the demo runs agents and trains a gate: it says so before it starts anything
    demo = run(ctl_bin / "moe2ctl", "demo", check=False, timeout=120)
    assert demo.returncode == 1 and "moe2-edge-controller[demo]" in demo.stderr, demo.stderr
    assert "Traceback" not in demo.stderr

    # optimize --problem: offline, no broker, no database
    problem = tmp_path / "problem.json"
    problem.write_text(
        json.dumps(
            {
                "experts": ["e0", "e1"],
                "gate": [[0.6, 0.4], [0.3, 0.7]],
                "p": [[[0.5], [0.2]], [[0.1], [0.6]]],
                "app": ["qa", "qa"],
                "delay": [[0.01, 0.02], [0.01, 0.02]],
                "energy": [[1, 2], [1, 2]],
                "limits": {"delay": {"qa": 0.05}, "energy": 10},
            }
        )
    )
    solved = json.loads(run(ctl_bin / "moe2ctl", "optimize", "--problem", problem, "--json").stdout)
    assert solved["feasible"] and solved["subset"] == ["e0", "e1"]

    # a real agent from the agent-only install, acting as a gateway
    agent_id, app = f"pkg-{uuid.uuid4().hex[:6]}", f"pkg-{uuid.uuid4().hex[:6]}"
    broker = ("--broker-host", broker_config.host, "--broker-port", str(broker_config.port))
    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen(
        [
            agent_bin / "moe2-agent",
            "--model",
            tiny_models["animals"],
            "--id",
            agent_id,
            "--n-threads",
            "1",
            "--serve-app",
            f"{app}={agent_id}:1",
            *broker,
            "--profile-points",
            "2",
            "--profile-decode-tokens",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ctl = [ctl_bin / "moe2ctl"]
        for _ in range(60):
            rows = json.loads(run(*ctl, "agents", "--json", *broker).stdout)
            mine = [r for r in rows if r["agent_id"] == agent_id]
            if mine and mine[0]["state"] == "online" and mine[0]["gateway_apps"]:
                break
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
        assert mine and mine[0]["backend"]["name"] == "CPU", rows
        answer = json.loads(
            run(*ctl, "ask", "--app", app, "--json", *broker, "the fox eats").stdout
        )
        assert answer["text"] and answer["experts"][0]["id"] == agent_id
        for _ in range(60):  # the start-up profile
            prof = run(*ctl, "profile", agent_id, "--json", *broker, check=False)
            if prof.returncode == 0:
                break
        assert json.loads(prof.stdout)[0]["profile"]["agent_id"] == agent_id
        pushed = run(
            *ctl,
            "push",
            "--app",
            app,
            "--subset",
            agent_id,
            "--k",
            "1",
            "--json",
            *broker,
            "--db",
            f"sqlite:///{tmp_path / 'registry.db'}",
        )
        # exit 0: the gateway accepted it (4 would say none did)
        assert json.loads(pushed.stdout)["pushed"][0]["app"] == app
        # what needs an extra says which one
        train = run(*ctl, "train", "qa", check=False)
        assert train.returncode == 1
        assert "pip install 'moe2-edge-controller[train]'" in train.stderr
    finally:
        agent.terminate()
        agent.wait(15)
        log.close()
        shutil.rmtree(DATA_DIR, ignore_errors=True)


def test_a_copy_of_shared_alone_ships_the_firmware_configs(tmp_path: Path) -> None:
    """The device classes' files are real files of moe2-edge-shared: a copy of shared/ that
    keeps links as links (cp -a, a tarball) still builds a wheel that has them."""
    import zipfile

    shutil.copytree(REPO / "shared", tmp_path / "shared", symlinks=True)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "out",
        tmp_path / "shared",
    )
    (wheel,) = (tmp_path / "out").glob("moe2_edge_shared-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("moe2/shared/firmware_configs/")}
    expected = {p.name for p in (REPO / "firmware-configs").glob("*.yaml")}
    assert expected and expected <= shipped, (expected, shipped)


def readme_pip_lines() -> list[list[str]]:
    """The ``pip install ./...`` lines of the README's install section, as arguments."""
    import shlex

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Installing with pip") :]
    section = section[: section.index("```", section.index("```sh") + 5)]
    lines = [ln.split("#", 1)[0].strip() for ln in section.splitlines()]
    return [shlex.split(ln)[2:] for ln in lines if ln.startswith("pip install ./")]


def test_the_readme_pip_lines_resolve(tmp_path: Path) -> None:
    """Each ``pip install ./...`` line of the README resolves from a checkout (pip --dry-run,
    nothing installed), and the agent alone does not: why the README names ./shared too.
    The lines with torch (train, demo) are left out: resolving them downloads a torch."""
    lines = readme_pip_lines()
    assert len(lines) >= 4, lines
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist")
    for part in ("shared", "agent", "controller"):
        shutil.copytree(REPO / part, checkout / part, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]

    def resolve(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*pip, *args], cwd=checkout, capture_output=True, text=True, timeout=600
        )

    light = [a for a in lines if not any("[train" in x or "[demo" in x for x in a)]
    assert light, lines
    for args in light:
        proc = resolve(args)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    alone = resolve(["./agent"])
    assert alone.returncode != 0 and "moe2-edge-shared" in alone.stderr
