"""Two sites: a site broker bridged to a core broker, both rendered by the ``moe2_broker``
role (``moe2_broker_bridges`` on the site, a ``bridge`` user on the core) and run on loopback.
A prompt published at the site for an application only the core's gateway serves is answered
there and the answer comes back; the site's retained state is visible at the core; a bridge
cut while a prompt is accepted at the site loses nothing once it is restored."""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moe2.controller.localfleet import LocalFleet
from moe2.shared import protocol as p
from moe2.shared.broker import free_port, wait_for_port
from moe2.shared.client import PromptClient
from moe2.shared.errors import NoExperts, RequestTimeout
from moe2.shared.fleet import FleetState, FleetView
from moe2.shared.mqtt import BrokerConfig, Connection

pytestmark = [pytest.mark.timeout(900)]

_spec = importlib.util.spec_from_file_location(
    "latency_proxy", Path(__file__).resolve().parents[2] / "bench" / "latency_proxy.py"
)
assert _spec is not None and _spec.loader is not None
latency_proxy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency_proxy)

ANON = [{"access": "readwrite", "topic": "moe2/v1/#"}]  # the test's agents and clients


@dataclass
class Site:
    name: str
    root: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def cfg(self) -> BrokerConfig:
        return BrokerConfig(port=self.port, keepalive=2)

    @property
    def conf(self) -> Path:
        return self.root / "etc/mosquitto/mosquitto.conf"

    def start(self) -> None:
        log = (self.root / "mosquitto.log").open("ab")
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [mosquitto, "-c", str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        wait_for_port("127.0.0.1", self.port, 15, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        path = self.root / "mosquitto.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _install(ansible: Any, tmp: Path, name: str, extra: dict[str, Any]) -> Site:
    """The broker role applied to localhost into ``tmp/name`` (a broker of its own)."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (scripts/install-system-packages)")
    import os

    if os.geteuid() != 0:
        pytest.skip("applying the broker role sets root-owned files: run as root (CI does)")
    root = tmp / name
    port = free_port()
    broker_vars: dict[str, Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "moe2_broker_root": str(root),
        "moe2_broker_manage_package": False,
        "moe2_broker_manage_service": False,
        "moe2_broker_group": "root",
        "moe2_broker_persistence": False,
        "moe2_broker_listeners": [{"port": port, "address": "127.0.0.1", "tls": False}],
        "moe2_broker_allow_anonymous": True,
        "moe2_broker_acl_anonymous": ANON,
        # The temporary root is private to root: keep mosquitto from dropping privileges.
        "moe2_broker_extra_settings": {"user": "root"},
    } | extra
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
    inv = tmp / f"inventory-{name}.json"
    inv.write_text(json.dumps(inventory))
    run = ansible.playbook(inv)
    assert run.returncode == 0, run.output[-4000:]
    if extra.get("moe2_broker_bridges"):  # the bridges' file settles: a second apply is a no-op
        again = ansible.playbook(inv)
        assert again.recap()["changed"] == 0, again.changed_tasks()
    return Site(name, root, port)


@dataclass
class Topology:
    core: Site
    site: Site
    proxy: Any  # the link between them: a proxy that can be cut and restored
    fleet_core: LocalFleet
    fleet_site: LocalFleet

    def cut(self) -> None:
        self.proxy.close()

    def restore(self) -> None:
        self.proxy = latency_proxy.LatencyProxy(
            ("127.0.0.1", self.core.port), 0.0, port=self.proxy.port
        ).start()


@pytest.fixture
def topology(ansible: Any, tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[Topology]:
    password = secrets.token_urlsafe(12)
    core = _install(
        ansible,
        tmp_path,
        "core",
        {"moe2_broker_users": [{"name": "site-a", "password": password, "role": "bridge"}]},
    )
    proxy = latency_proxy.LatencyProxy(("127.0.0.1", core.port), 0.0).start()
    bridge = {
        "name": "core",
        "address": "127.0.0.1",
        "port": proxy.port,
        "username": "site-a",
        "password": password,
        "prompt_apps": ["far"],
    }
    site = _install(
        ansible,
        tmp_path,
        "site",
        {
            "moe2_broker_bridges": [bridge],
            "moe2_broker_bridge_keepalive": 2,
            "moe2_broker_bridge_restart_timeout": "1 2",
        },
    )
    conf = (site.root / "etc/mosquitto/conf.d/moe2-bridges.conf").read_text()
    assert "topic moe2/v1/prompts/far out 1" in conf and "remote_username site-a" in conf
    core.start()
    site.start()
    topo: Topology | None = None
    try:
        with (
            LocalFleet(core.cfg, tmp_path / "agents-core") as fc,
            LocalFleet(site.cfg, tmp_path / "agents-site") as fs,
        ):
            common = ("--n-threads", "1", "--no-profile-on-start", "--broker-keepalive", "2")
            fc.start("core-gw", tiny_models["animals"], *common, "--serve-app", "far=core-gw:1")
            fs.start("site-gw", tiny_models["code"], *common, "--serve-app", "near=site-gw:1")
            fc.wait_online(["core-gw"], 120)
            fs.wait_online(["site-gw"], 120)
            _ready(core.cfg, "far", fc)  # each gateway has fetched its expert's vocabulary
            _ready(site.cfg, "near", fs)
            topo = Topology(core, site, proxy, fc, fs)
            yield topo
    finally:
        (topo.proxy if topo else proxy).close()
        site.stop()
        core.stop()


def _ready(cfg: BrokerConfig, app: str, fleet: LocalFleet, timeout: float = 240.0) -> None:
    """Ask ``app`` on its own broker until a gateway answers it (it learns its experts'
    vocabularies after it starts: until then it answers ``no_experts``; on a loaded machine
    the first answer can take longer than a prompt's timeout)."""
    deadline = time.monotonic() + timeout
    with PromptClient(cfg) as client:
        while True:
            try:
                client.ask(app, "the fox", max_tokens=1, timeout=60)
                return
            except (NoExperts, RequestTimeout) as exc:
                if time.monotonic() > deadline:
                    logs = {a: fleet.log_tail(a, 3000) for a in fleet.procs}
                    raise AssertionError(f"{app} never answered ({exc.message}): {logs}") from None
                time.sleep(1.0)


class Inbox:
    """Every message on a reply topic at one broker, for counting answers."""

    def __init__(self, cfg: BrokerConfig) -> None:
        owner = f"tester-{uuid.uuid4().hex[:6]}"
        self.topic = p.topics.client_answers(owner, owner)
        self.got: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.conn = Connection(cfg, owner)
        self.conn.subscribe(self.topic, self._on)

    def _on(self, msg: Any) -> None:
        with self.cond:
            self.got.append(json.loads(msg.payload))
            self.cond.notify_all()

    def finals(self, pid: str) -> list[dict[str, Any]]:
        with self.cond:
            return [m for m in self.got if m.get("id") == pid and "index" not in m]

    def wait_final(self, pid: str, timeout: float) -> dict[str, Any]:
        with self.cond:
            self.cond.wait_for(lambda: bool(self.finals_locked(pid)), timeout)
            got = self.finals_locked(pid)
        assert got, f"no answer to {pid} within {timeout} s; got {self.got}"
        return got[0]

    def finals_locked(self, pid: str) -> list[dict[str, Any]]:
        return [m for m in self.got if m.get("id") == pid and "index" not in m]


def _ask(conn: Connection, inbox: Inbox, app: str) -> str:
    pid = uuid.uuid4().hex[:10]
    req = p.PromptRequest(id=pid, prompt="the fox eats", reply_to=inbox.topic, max_tokens=3)
    assert conn.publish_acked(p.topics.prompts(app), p.encode(req)), "no subscriber matched"
    return pid


def test_a_prompt_at_one_site_is_answered_by_a_gateway_at_the_core(topology: Topology) -> None:
    t = topology
    # The site's retained state is visible at the core (and the core's gateway at the site).
    view_core = FleetView.snapshot(t.core.cfg, ("info", "status", "gateway"))
    deadline = time.monotonic() + 30
    while view_core.online("site-gw") is None and time.monotonic() < deadline:
        time.sleep(0.5)
        view_core = FleetView.snapshot(t.core.cfg, ("info", "status", "gateway"))
    assert view_core.online("site-gw") is not None, (
        f"core: {view_core.status}\nsite log: {t.site.log()}\ncore log: {t.core.log()}"
    )
    assert view_core.gateway["site-gw"].apps == {"near": 0}

    def core_gateway_seen(s: FleetState) -> bool:
        g = s.gateway.get("core-gw")
        return g is not None and g.state == "online" and "far" in g.apps

    assert t.fleet_site.view.wait(core_gateway_seen, 30), "the core gateway never reached the site"

    inbox = Inbox(t.site.cfg)
    with inbox.conn as conn:
        far = _ask(conn, inbox, "far")
        near = _ask(conn, inbox, "near")
        a_far = inbox.wait_final(far, 60)
        a_near = inbox.wait_final(near, 60)
        time.sleep(2.0)  # a second answer (from the site's catch-all, say) would be here now
        assert "error" not in a_far, a_far
        assert a_far["gateway"] == "core-gw" and a_far["app"] == "far"
        assert a_near["gateway"] == "site-gw" and a_near["app"] == "near"
        assert len(inbox.finals(far)) == 1 and len(inbox.finals(near)) == 1, inbox.got

        # The bridge is cut: a prompt accepted at the site meanwhile waits in the bridge's
        # kept session, crosses once the link is back, and is answered exactly once.
        t.cut()
        time.sleep(3.0)  # the site broker notices (keepalive 2 s)
        during = _ask(conn, inbox, "far")
        time.sleep(2.0)
        assert not inbox.finals(during), "answered while the bridge was down?"
        t.restore()
        answer = inbox.wait_final(during, 90)
        time.sleep(2.0)
        assert "error" not in answer and answer["gateway"] == "core-gw", answer
        assert len(inbox.finals(during)) == 1, inbox.got

    # The same through PromptClient, as a phone at the site would ask.
    with PromptClient(t.site.cfg) as client:
        assert client.ask("far", "the fox eats", max_tokens=2, timeout=60).gateway == "core-gw"
