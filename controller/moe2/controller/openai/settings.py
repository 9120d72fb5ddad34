"""The HTTP front's one settings model (``moe2-http``): a TOML file (``--config``), then
``MOE2_HTTP_*`` variables (``MOE2_HTTP_BROKER__HOST``...), then flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe2.shared.errors import ConfigError
from moe2.shared.mqtt import BrokerConfig


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on")
    api_keys: list[str] = Field(
        default_factory=list,
        description="accepted API keys (Authorization: Bearer KEY); MOE2_HTTP_API_KEYS takes "
        "them comma-separated",
    )
    api_keys_file: Path | None = Field(
        default=None, description="file of accepted API keys, one per line ('#' comments)"
    )
    no_auth: bool = Field(
        default=False, description="accept requests without an API key (trusted networks only)"
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="longest wait for a gateway's answer, seconds"
    )
    max_request_bytes: int = Field(
        default=4 << 20, ge=1024, description="largest request body accepted, bytes"
    )
    max_in_flight: int = Field(
        default=1024,
        ge=1,
        description="requests held at once (also bounded by the capacity the gateways "
        "announce); beyond: 429 with Retry-After",
    )
    retry_after_s: int = Field(
        default=1, ge=1, description="Retry-After of a 429 or 503 answer, seconds"
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection that has not sent a request's headers within this many "
        "seconds (of opening, or of its previous response) is closed",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="longest wait for a request's body (then 408), seconds"
    )
    keep_alive_s: int = Field(
        default=5, ge=1, description="an idle keep-alive connection is closed after this, seconds"
    )
    access_log: bool = Field(default=True, description="log one line per request")
    db_url: str | None = Field(
        default=None,
        description="the controller's registry (sqlite:///... or postgresql://...), read for "
        "the fleet page and /metrics: the last serve decisions and each application's limits",
    )
    broker: BrokerConfig = Field(default_factory=BrokerConfig)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _keys_or_no_auth(self) -> HttpSettings:
        if not self.no_auth and not self.accepted_keys():
            raise ValueError(
                "no API keys: set api_keys, api_keys_file (--api-keys-file) or "
                "MOE2_HTTP_API_KEYS, or pass --no-auth to serve without keys"
            )
        return self

    def accepted_keys(self) -> frozenset[str]:
        """Every accepted key, from the setting and the file."""
        keys = set(self.api_keys)
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"cannot read the API keys file: {exc}") from None
            keys |= {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
        return frozenset(keys)
