"""``moe2ctl keys``: the fleet key that signs desired state.

    moe2ctl keys generate              # fleet-signing.pem (private, 0600) + .pub in the data folder
    moe2ctl keys show --json           # where the key is and its public half

Give the ``.pub`` file to every gateway (``[gateway] trusted_keys``; ansible:
``moe2_agent_trusted_keys_src``): from then on they apply only what this key signed.
"""

from __future__ import annotations

from pathlib import Path

import click

from moe2.controller.options import emit, json_option, settings
from moe2.shared.errors import ConfigError
from moe2.shared.signing import Signer


@click.group("keys")
def keys_cmd() -> None:
    """The fleet key that signs assignments and gates."""


@keys_cmd.command("generate")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Private key file [default: the signing_key setting, else fleet-signing.pem in the "
    "data folder]; the public key goes next to it as .pub.",
)
@json_option
def generate_cmd(out: Path | None, as_json: bool) -> None:
    """Make a new Ed25519 fleet key (never overwrites one)."""
    cfg = settings()
    path = out or cfg.signing_key or cfg.data_dir / "fleet-signing.pem"
    if path.exists():
        raise ConfigError(f"{path} exists; remove it first to make a new fleet key")
    public = Signer.generate().save(path)
    emit(
        {"private_key": str(path), "public_key": str(public)},
        as_json,
        lambda o: (
            f"private key {o['private_key']} (keep it on the controller)\n"
            f"public key  {o['public_key']} (give it to every gateway: trusted_keys)"
        ),
    )


@keys_cmd.command("show")
@json_option
def show_cmd(as_json: bool) -> None:
    """The key that signs desired state, and its public half."""
    path = settings().signing_key_path
    if path is None:
        emit(
            {"private_key": None, "public_key_pem": None},
            as_json,
            lambda _o: (
                "no fleet key: desired state is published unsigned "
                "(moe2ctl keys generate makes one)"
            ),
        )
        return
    pem = Signer.load(path).public_pem().decode()
    emit(
        {"private_key": str(path), "public_key_pem": pem},
        as_json,
        lambda o: f"private key {o['private_key']}\n{o['public_key_pem']}",
    )
