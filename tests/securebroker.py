"""The secured broker the fleet installs, for tests: the ``moe2_broker`` role applied to
localhost into a temporary root (users with passwords, the per-role ACL, TLS with a fleet CA
the role generates, the message size limit), and the installed mosquitto run on that
configuration, bound to loopback.

    with SecuredBroker.install(tmp) as sb:
        agent = sb.take("agent")                 # a user name of that role, not handed out before
        cfg = sb.config(agent)                   # BrokerConfig: TLS + that user's login

Users come in pools per role (the agent id must equal its user name), made before mosquitto
starts; each test takes fresh ones, so retained state of one test never names another's.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moe2.shared.broker import free_port, wait_for_port
from moe2.shared.errors import BrokerError
from moe2.shared.mqtt import BrokerConfig

REPO = Path(__file__).resolve().parents[1]
ANSIBLE_DIR = REPO / "ansible"
POOLS = {"agent": 32, "gateway": 16, "client": 24, "controller": 10, "http": 4}
PREFIX = {"agent": "sa", "gateway": "sg", "client": "sc", "controller": "moe2ctl", "http": "sh"}


class Unavailable(Exception):
    """No ansible-playbook or mosquitto here, or not root (the role sets root-owned files)."""


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


class SecuredBroker:
    def __init__(self, root: Path, port: int, users: dict[str, tuple[str, str]]) -> None:
        self.root = root
        self.port = port
        self.host = "127.0.0.1"
        self.users = users  # name -> (role, password)
        self.ca = root / "fleet-ca.crt"
        self.conf = root / "etc/mosquitto/mosquitto.conf"
        self._taken: set[str] = set()
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ install

    @classmethod
    def install(cls, tmp: Path) -> SecuredBroker:
        playbook = _tool("ansible-playbook")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if playbook is None:
            raise Unavailable("ansible-playbook is not installed (requirements-dev.txt)")
        if not Path(mosquitto).exists() or shutil.which("openssl") is None:
            raise Unavailable("mosquitto and openssl are needed (scripts/install-system-packages)")
        if os.geteuid() != 0:
            raise Unavailable("applying the broker role sets root-owned files: run as root")
        root = tmp / "root"
        port = free_port()
        users = {
            f"{PREFIX[role]}-{i:02d}": (role, secrets.token_urlsafe(12))
            for role, n in POOLS.items()
            for i in range(1, n + 1)
        }
        broker_vars: dict[str, Any] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "ansible_become": False,
            "moe2_broker_root": str(root),
            "moe2_broker_manage_package": False,
            "moe2_broker_manage_service": False,
            "moe2_broker_group": "root",
            "moe2_broker_persistence": False,
            "moe2_broker_listeners": [{"port": port, "address": "127.0.0.1", "tls": True}],
            "moe2_broker_tls_names": ["localhost", "127.0.0.1"],
            "moe2_broker_tls_ca_fetch_dest": str(root / "fleet-ca.crt"),
            "moe2_broker_users": [
                {"name": name, "password": pw, "role": role} for name, (role, pw) in users.items()
            ],
            # The temporary root is private to root: keep mosquitto from dropping to its own
            # user, which could not read the password file there.
            "moe2_broker_extra_settings": {"user": "root"},
        }
        inventory = {
            "all": {
                "vars": broker_vars,
                "children": {
                    "moe2_broker": {"hosts": {"localhost": None}},
                    "moe2_agents": {"hosts": {}},
                    "moe2_controller": {"hosts": {}},
                },
            }
        }
        tmp.mkdir(parents=True, exist_ok=True)
        inv = tmp / "inventory.json"
        inv.write_text(json.dumps(inventory))
        env = dict(os.environ)
        env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            PYTHONWARNINGS="ignore",
        )
        apply = [playbook, "-i", str(inv), str(ANSIBLE_DIR / "site.yml")]
        run = subprocess.run(
            apply,
            cwd=ANSIBLE_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        if run.returncode != 0:
            raise RuntimeError(f"the broker role failed:\n{run.stdout[-6000:]}")
        sb = cls(root, port, users)
        sb.apply = lambda: (
            subprocess.run(  # type: ignore[method-assign]
                apply, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600
            ).stdout
        )
        return sb

    def apply(self) -> str:
        """Apply the role again; its output (the PLAY RECAP says what changed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ users

    def take(self, role: str) -> str:
        """A user of ``role`` no test has taken yet."""
        for name, (r, _) in self.users.items():
            if r == role and name not in self._taken:
                self._taken.add(name)
                return name
        raise RuntimeError(f"no {role} user left: raise POOLS[{role!r}]")

    def config(self, user: str | None = None, password: str | None = None) -> BrokerConfig:
        """TLS to the broker as ``user`` (None: anonymous), with its password unless given."""
        pw = password if password is not None else (self.users[user][1] if user else None)
        return BrokerConfig(
            host=self.host,
            port=self.port,
            username=user,
            password=pw,
            tls_ca=str(self.ca),
            keepalive=2,
            connect_timeout=5,
        )

    def cli_args(self, user: str) -> list[str]:
        """mosquitto_pub/mosquitto_sub arguments: TLS and ``user``'s login."""
        return [
            "-h", self.host, "-p", str(self.port), "--cafile", str(self.ca),
            "-u", user, "-P", self.users[user][1], "-V", "mqttv5",
        ]  # fmt: skip

    # ------------------------------------------------------------------ process

    def start(self) -> SecuredBroker:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = (self.root / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen(
            [mosquitto, "-c", str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.host, self.port, 15, self._proc)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def log_tail(self, n: int = 3000) -> str:
        path = self.root / "mosquitto.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


@contextmanager
def running(tmp: Path) -> Iterator[SecuredBroker]:
    # The port is picked before the role is applied (about a minute); on a shared machine
    # another process may take it meanwhile: apply again on another one.
    for attempt in range(3):
        sb = SecuredBroker.install(tmp / f"try{attempt}")
        try:
            sb.start()
            break
        except BrokerError:
            if "Address already in use" not in sb.log_tail() or attempt == 2:
                raise
    try:
        yield sb
    finally:
        sb.stop()
