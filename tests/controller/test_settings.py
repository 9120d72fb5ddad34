"""The controller's one settings model: file, then MOE2_* variables, then flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moe2.controller.cli import main
from moe2.controller.settings import ControllerSettings


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "controller.toml"
    conf.write_text(
        f'data_dir = "{tmp_path / "data"}"\nmodels_dir = "{tmp_path / "m"}"\n'
        '[broker]\nhost = "10.0.0.2"\nport = 8883\n'
    )
    s = ControllerSettings.load(conf)
    assert s.data_dir == tmp_path / "data" and s.broker.host == "10.0.0.2"
    assert s.registry_url == f"sqlite:///{tmp_path / 'data' / 'registry.db'}"
    assert s.gates_dir == tmp_path / "data" / "gates"
    monkeypatch.setenv("MOE2_BROKER__PORT", "1884")
    monkeypatch.setenv("MOE2_DB_URL", "postgresql://x@db/moe2")
    s = ControllerSettings.load(conf)
    assert s.broker.port == 1884 and s.broker.host == "10.0.0.2"
    assert s.registry_url == "postgresql://x@db/moe2"


def test_moe2ctl_uses_the_file_and_flags_override_it(tmp_path: Path) -> None:
    db = tmp_path / "from-file.db"
    conf = tmp_path / "c.toml"
    conf.write_text(f'db_url = "sqlite:///{db}"\n')
    runner = CliRunner()
    out = runner.invoke(main, ["--config", str(conf), "datasets", "list", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == [] and db.exists()
    other = tmp_path / "flag.db"
    out = runner.invoke(
        main, ["--config", str(conf), "datasets", "list", "--db", f"sqlite:///{other}"]
    )
    assert out.exit_code == 0 and other.exists()
    bad = tmp_path / "bad.toml"
    bad.write_text("data_dir = 3\nnope = 1\n")
    out = runner.invoke(main, ["--config", str(bad), "datasets", "list"])
    assert out.exit_code == 2 and "nope" in out.output
