"""The agent role's firmware settings (firmware-configs/<device class>.yaml) on boxes with and
without the hardware, using stand-in tools and a stand-in sysfs: the oneshot unit holds exactly
the commands for the hardware present, passes ``systemd-analyze verify``, and running its
commands calls the tools with the settings of the chosen mode. Only the firmware-tagged tasks
run (``--tags moe2_agent_firmware``), so no wheels or models are involved.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

GPU_LISTING = "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
DRIVER_GONE = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def fake_tool(path: Path, calls: Path, stdout: str = "", status: int = 0) -> Path:
    path.write_text(
        f'#!/bin/sh\necho "$(basename "$0") $*" >> {shlex.quote(str(calls))}\n'
        f"printf '%s\\n' {shlex.quote(stdout)}\nexit {status}\n"
    )
    path.chmod(0o755)
    return path


def fake_sysfs(base: Path) -> tuple[Path, Path]:
    cpufreq, powercap = base / "cpu", base / "powercap"
    for cpu in ("cpu0", "cpu1"):
        (cpufreq / cpu / "cpufreq").mkdir(parents=True)
        (cpufreq / cpu / "cpufreq" / "scaling_governor").write_text("schedutil\n")
    for zone in ("intel-rapl:0", "intel-rapl:0:0"):
        (powercap / zone).mkdir(parents=True)
        (powercap / zone / "energy_uj").write_text("0\n")
        (powercap / zone / "energy_uj").chmod(0o400)
    return cpufreq, powercap


def apply_firmware(ansible, tmp: Path, group: str, device_class: str, extra: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "root"
    inventory = ansible.ci_inventory(
        tmp / "inventory.yml",
        root,
        {
            "moe2_agent_firmware_apply": True,
            "moe2_agent_model_src": str(tmp / "unused.gguf"),
            **extra,
        },
        device_group=group,
        device_class=device_class,
        agent_only=True,
    )
    run = ansible.playbook(inventory, "--tags", "moe2_agent_firmware", timeout=300)
    assert run.returncode == 0, run.output[-6000:]
    assert run.recap()["failed"] == 0
    again = ansible.playbook(inventory, "--tags", "moe2_agent_firmware", timeout=300)
    assert again.recap()["changed"] == 0, again.changed_tasks()
    return root / "etc/systemd/system/moe2-firmware.service"


def exec_starts(unit: Path) -> list[str]:
    lines = unit.read_text().splitlines()
    return [ln.split("=", 1)[1] for ln in lines if ln.startswith("ExecStart=")]


def run_like_systemd(command: str) -> None:
    # systemd turns "$$" into "$" and splits with shell-like quoting; no shell around it.
    subprocess.run(shlex.split(command.replace("$$", "$")), check=True, timeout=30)


def verify(unit: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return
    proc = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and unit.name not in proc.stdout + proc.stderr, proc.stderr


def test_jetson_gets_power_mode_clocks_and_governor(ansible, tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cpufreq, powercap = fake_sysfs(tmp_path / "sys")
    unit = apply_firmware(
        ansible,
        tmp_path,
        "orin",
        "orin-agx-64gb",
        {
            "moe2_agent_power_mode": "30W",
            "moe2_agent_nvpmodel_command": str(fake_tool(bin_dir / "nvpmodel", calls)),
            "moe2_agent_jetson_clocks_command": str(fake_tool(bin_dir / "jetson_clocks", calls)),
            "moe2_agent_cpufreq_dir": str(cpufreq),
            "moe2_agent_powercap_dir": str(powercap),
        },
    )
    commands = exec_starts(unit)
    # the mode first, then the clocks pinned at that mode's maxima; Orin's meters skip RAPL
    assert commands[:2] == [f"{bin_dir}/nvpmodel -m 2", f"{bin_dir}/jetson_clocks"], commands
    assert len(commands) == 3 and "scaling_governor" in commands[2], commands
    wants = tmp_path / "root/etc/systemd/system/multi-user.target.wants"
    assert (wants / "moe2-firmware.service").is_symlink()
    verify(unit)
    for command in commands:
        run_like_systemd(command)
    assert calls.read_text().splitlines() == ["nvpmodel -m 2", "jetson_clocks "]
    assert (cpufreq / "cpu1/cpufreq/scaling_governor").read_text().strip() == "performance"


def test_nvidia_box_gets_persistence_power_limit_and_rapl(ansible, tmp_path: Path) -> None:
    calls = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cpufreq, powercap = fake_sysfs(tmp_path / "sys")
    unit = apply_firmware(
        ansible,
        tmp_path,
        "rtx4090",
        "rtx4090",
        {
            "moe2_agent_power_mode": "350W",
            "moe2_agent_nvidia_smi_command": str(
                fake_tool(bin_dir / "nvidia-smi", calls, GPU_LISTING)
            ),
            "moe2_agent_cpufreq_dir": str(cpufreq),
            "moe2_agent_powercap_dir": str(powercap),
        },
    )
    commands = exec_starts(unit)
    assert commands[:2] == [
        f"{bin_dir}/nvidia-smi --persistence-mode=1",
        f"{bin_dir}/nvidia-smi --power-limit=350",
    ], commands
    assert any("energy_uj" in c for c in commands), commands  # rtx4090 lists the rapl meter
    verify(unit)
    calls.unlink()
    for command in commands:
        run_like_systemd(command)
    assert calls.read_text().splitlines() == [
        "nvidia-smi --persistence-mode=1",
        "nvidia-smi --power-limit=350",
    ]
    assert (powercap / "intel-rapl:0:0/energy_uj").stat().st_mode & 0o040  # group may read


def test_box_without_the_hardware_is_skipped_cleanly(ansible, tmp_path: Path) -> None:
    """An NVIDIA box whose driver is gone, no cpufreq, no RAPL: nothing to apply, no unit."""
    calls = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = fake_tool(bin_dir / "nvidia-smi", calls, DRIVER_GONE, status=9)
    unit = apply_firmware(
        ansible,
        tmp_path,
        "rtx4090",
        "rtx4090",
        {
            "moe2_agent_nvidia_smi_command": str(broken),
            "moe2_agent_cpufreq_dir": str(tmp_path / "absent"),
            "moe2_agent_powercap_dir": str(tmp_path / "absent"),
        },
    )
    assert not unit.exists()
    # and on a Jetson class box where the Jetson tools are missing altogether
    unit = apply_firmware(
        ansible,
        tmp_path / "orin",
        "orin",
        "orin-agx-64gb",
        {
            "moe2_agent_nvpmodel_command": str(tmp_path / "absent/nvpmodel"),
            "moe2_agent_jetson_clocks_command": str(tmp_path / "absent/jetson_clocks"),
            "moe2_agent_cpufreq_dir": str(tmp_path / "absent"),
        },
    )
    assert not unit.exists()
