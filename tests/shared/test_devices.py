"""Device class files: the shipped ones load, bad ones are refused, the machine is detected."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe2.shared import devices
from moe2.shared.devices import (
    detect_device_class,
    firmware_configs_dir,
    jetson_power_mode,
    load_device_class,
    load_device_classes,
    load_device_file,
    parse_nvpmodel_query,
)
from moe2.shared.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "firmware-configs"

MINIMAL = """\
schema_version: 1
device_class: {name}
description: test box
kind: cpu
meters: [rapl, modelled]
default_mode: default
modes:
  default:
    figures: {{compute_flops_per_s: 1.0e12, memory_bytes_per_s: 1.0e11,
               idle_power_w: 10, peak_power_w: 50}}
"""


def test_the_shipped_files_load() -> None:
    classes = load_device_classes(REPO_CONFIGS)
    assert set(classes) == {"orin-agx-64gb", "rtx4090", "cpu-generic"}
    orin = classes["orin-agx-64gb"]
    assert {k: m.nvpmodel_id for k, m in orin.modes.items()} == {
        "MAXN": 0,
        "50W": 3,
        "30W": 2,
        "15W": 1,
    }
    assert orin.apply.jetson_clocks is True
    assert orin.default_mode == "MAXN"
    # Lower power modes never claim more compute, bandwidth or power than MAXN.
    maxn = orin.figures("MAXN")
    for mode in orin.modes.values():
        assert mode.figures.compute_flops_per_s <= maxn.compute_flops_per_s
        assert mode.figures.memory_bytes_per_s <= maxn.memory_bytes_per_s
        assert mode.figures.peak_power_w <= maxn.peak_power_w
    rtx = classes["rtx4090"]
    assert rtx.mode().power_limit_w == 450
    assert rtx.mode_for_power_limit(349.6) == "350W"
    assert rtx.mode_for_power_limit(123) is None
    assert classes["cpu-generic"].detect.fallback


def test_the_package_ships_the_same_files() -> None:
    packaged = Path(devices.__file__).parent / "firmware_configs"
    assert sorted(p.name for p in packaged.glob("*.yaml")) == sorted(
        p.name for p in REPO_CONFIGS.glob("*.yaml")
    )


def test_env_var_chooses_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab-box.yaml").write_text(MINIMAL.format(name="lab-box"))
    monkeypatch.setenv("MOE2_FIRMWARE_CONFIGS", str(tmp_path))
    assert firmware_configs_dir() == tmp_path
    assert load_device_class("lab-box").figures().peak_power_w == 50
    with pytest.raises(ConfigError, match="expected one of: lab-box"):
        load_device_class("orin-agx-64gb")
    monkeypatch.setenv("MOE2_FIRMWARE_CONFIGS", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a directory"):
        firmware_configs_dir()


def test_without_env_var_the_packaged_folder_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE2_FIRMWARE_CONFIGS", raising=False)
    assert (firmware_configs_dir() / "rtx4090.yaml").is_file()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace("default_mode: default", "default_mode: turbo"), "turbo"),
        (lambda s: s.replace("peak_power_w: 50", "peak_power_w: 5"), "peak_power_w"),
        (lambda s: s.replace("[rapl, modelled]", "[rapl]"), "modelled"),
        (lambda s: s.replace("[rapl, modelled]", "[geiger, modelled]"), "meters"),
        (lambda s: s + "colour: blue\n", "colour"),
        (lambda s: s.replace("kind: cpu", "kind: jetson"), "nvpmodel_id"),
        (lambda s: "just text", "mapping"),
        (lambda s: "modes: [", "not valid YAML"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "box.yaml"
    path.write_text(edit(MINIMAL.format(name="box")))
    with pytest.raises(ConfigError, match=message):
        load_device_file(path)


def test_the_class_name_must_match_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "box.yaml"
    path.write_text(MINIMAL.format(name="other"))
    with pytest.raises(ConfigError, match="file name"):
        load_device_file(path)


def test_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="MAXN, 50W, 30W, 15W"):
        load_device_class("orin-agx-64gb", REPO_CONFIGS).mode("100W")


# --------------------------------------------------------------------------- detection


def _device_tree(root: Path, model: str, compatible: list[str]) -> Path:
    dt = root / "proc" / "device-tree"
    dt.mkdir(parents=True)
    # Device-tree strings end in NUL; compatible is a NUL-separated list.
    (dt / "model").write_bytes(model.encode() + b"\x00")
    (dt / "compatible").write_bytes(b"".join(c.encode() + b"\x00" for c in compatible))
    return root


def _no_gpu() -> list[str]:
    return []


def test_agx_orin_64gb_is_detected_by_its_device_tree(tmp_path: Path) -> None:
    root = _device_tree(
        tmp_path,
        "NVIDIA Jetson AGX Orin Developer Kit",
        ["nvidia,p3737-0000+p3701-0005", "nvidia,p3701-0005", "nvidia,tegra234"],
    )
    found = detect_device_class(load_device_classes(REPO_CONFIGS), root=root, gpu_names=_no_gpu)
    assert found.device_class == "orin-agx-64gb"
    assert "p3701-0005" in found.evidence


def test_a_jetson_without_a_file_is_an_error_not_a_cpu_box(tmp_path: Path) -> None:
    root = _device_tree(
        tmp_path,
        "NVIDIA Jetson Orin Nano Developer Kit",
        ["nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"],
    )
    with pytest.raises(ConfigError, match=r"Orin Nano.*cpu-generic, orin-agx-64gb, rtx4090"):
        detect_device_class(load_device_classes(REPO_CONFIGS), root=root, gpu_names=_no_gpu)


def test_nv_tegra_release_alone_marks_a_jetson(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R35 (release), REVISION: 4.1\n")
    with pytest.raises(ConfigError, match="Jetson"):
        detect_device_class(load_device_classes(REPO_CONFIGS), root=tmp_path, gpu_names=_no_gpu)


def test_an_rtx_4090_is_detected_by_its_nvml_name(tmp_path: Path) -> None:
    found = detect_device_class(
        load_device_classes(REPO_CONFIGS),
        root=tmp_path,
        gpu_names=lambda: ["NVIDIA GeForce RTX 4090"],
    )
    assert found.device_class == "rtx4090"


def test_an_unknown_gpu_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="H200"):
        detect_device_class(
            load_device_classes(REPO_CONFIGS), root=tmp_path, gpu_names=lambda: ["NVIDIA H200"]
        )


def test_a_plain_box_is_cpu_generic(tmp_path: Path) -> None:
    found = detect_device_class(load_device_classes(REPO_CONFIGS), root=tmp_path, gpu_names=_no_gpu)
    assert found.device_class == "cpu-generic"


def test_nvpmodel_query_names_the_mode() -> None:
    orin = load_device_class("orin-agx-64gb", REPO_CONFIGS)
    # `nvpmodel -q` on an AGX Orin 64GB in the 30 W mode
    text = "NV Power Mode: MODE_30W\n2\n"
    assert parse_nvpmodel_query(text) == ("MODE_30W", 2)
    assert jetson_power_mode(orin, query=lambda: text) == "30W"
    assert jetson_power_mode(orin, query=lambda: "NV Power Mode: MAXN\n0\n") == "MAXN"
    assert jetson_power_mode(orin, query=lambda: None) is None
    assert jetson_power_mode(orin, query=lambda: "NV Power Mode: CUSTOM\n9\n") is None
