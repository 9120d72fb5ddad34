"""The controller's one typed configuration: where its data lives and which broker to use.

Filled from (lowest first) defaults, a TOML file (``moe2ctl --config FILE``, else
``$MOE2_CONFIG``, else ``~/.config/moe2/controller.toml`` when it exists), ``MOE2_*``
environment variables and command-line flags; validated once when ``moe2ctl`` starts and
passed down through the click context::

    data_dir = "/var/lib/moe2/controller"        # registry, gates, problem files, experts
    db_url = "postgresql://moe2@db/moe2"         # default: SQLite in data_dir
    models_dir = "/var/lib/moe2/models"

    [broker]
    host = "10.0.0.2"

Environment: ``MOE2_DATA_DIR``, ``MOE2_DB_URL``, ``MOE2_MODELS_DIR``, ``MOE2_SIGNING_KEY``,
``MOE2_BROKER__HOST``...
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from moe2.shared.mqtt import BrokerConfig
from moe2.shared.settings import load_settings

ENV_PREFIX = "MOE2_"


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share") / "moe2",
        description="the controller's data: the SQLite registry, gates, problem files",
    )
    db_url: str | None = Field(
        default=None,
        description="registry database URL (sqlite:///FILE or postgresql://...); "
        "default: SQLite in the data folder",
    )
    models_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "moe2" / "models",
        description="fetched and built GGUF models",
    )
    signing_key: Path | None = Field(
        default=None,
        description="the fleet's Ed25519 private key (PEM) that signs desired state "
        "(moe2ctl keys generate); default: fleet-signing.pem in the data folder, when it exists",
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig)

    @property
    def signing_key_path(self) -> Path | None:
        """The key that signs desired state, or None (published unsigned)."""
        if self.signing_key is not None:
            return self.signing_key
        default = self.data_dir / "fleet-signing.pem"
        return default if default.is_file() else None

    @property
    def registry_url(self) -> str:
        if self.db_url:
            return self.db_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def gates_dir(self) -> Path:
        return self.data_dir / "gates"

    @property
    def experts_dir(self) -> Path:
        """Clustering plots, LoRA adapters and their checkpoints (``moe2ctl experts``)."""
        return self.data_dir / "experts"

    @property
    def problems_dir(self) -> Path:
        path = self.data_dir / "problems"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @classmethod
    def load(cls, file: Path | None = None) -> ControllerSettings:
        """Defaults, then the file, then ``MOE2_*`` variables (flags are applied by the
        commands that take them)."""
        if file is None:
            env_file = os.environ.get("MOE2_CONFIG")
            default = _xdg("XDG_CONFIG_HOME", ".config") / "moe2" / "controller.toml"
            file = Path(env_file) if env_file else (default if default.is_file() else None)
        return load_settings(cls, file=file, env_prefix=ENV_PREFIX)
