"""Monitoring a fleet: the alert rules pass ``promtool check rules`` and fire on what they
watch (``promtool test rules``), the rules and the Grafana dashboard read only metrics that
moe2 exports, and the monitoring role renders a Prometheus configuration promtool accepts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "moe2_monitoring"
RULES = ROLE / "files" / "moe2.rules.yml"
DASHBOARD = ROLE / "files" / "moe2-fleet-dashboard.json"


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: run scripts/install-system-packages (prometheus)")
    return exe


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_alert_rules_pass_promtool() -> None:
    proc = run(promtool(), "check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 10 rules found" in proc.stdout


def test_the_alerts_fire_on_what_they_watch() -> None:
    """Series as moe2-http and the agents export them; each alert fires after its ``for``
    and not before, with the labels an operator needs."""
    tests = Path(__file__).with_name("moe2.rules.test.yml")
    proc = run(promtool(), "test", "rules", tests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def exported_names() -> set[str]:
    """Every metric name moe2 exports: moe2-http's (with its fleet gauges, for a fleet with
    a gateway and an application with every figure), an agent's and a gateway's."""
    from moe2.agent.metrics import AgentMetrics, GatewayMetrics
    from moe2.controller.openai.metrics import FrontMetrics
    from moe2.controller.openai.summary import AgentRow, AppRow, FleetSummary

    summary = FleetSummary(
        at=time.time(),
        broker_connected=True,
        synced=True,
        in_flight=0,
        capacity=16,
        agents=[
            AgentRow("a", True, "m", None, "CPU", "cpu-generic", "rapl", True, 4, {"qa": 1}, 16)
        ],
        apps=[AppRow("qa", {"a": 1}, 1, ["a"], 1, None, 3, 0, 0.1, 0.2, 1.0, True, 0.5, 2.0)],
        decisions=[],
        registry="ok",
    )
    names: set[str] = set()
    registries = [FrontMetrics(lambda: summary).registry]
    agent = AgentMetrics("a")
    GatewayMetrics(agent.registry)
    registries.append(agent.registry)
    for registry in registries:
        for family in registry.collect():
            names |= {s.name for s in family.samples} | {family.name}
    # counters and histograms that have seen no labelled sample yet still name their series
    return names | {n + suffix for n in names for suffix in ("_bucket", "_total", "_count", "_sum")}


def test_rules_and_dashboard_read_only_exported_metrics() -> None:
    names = exported_names()
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bmoe2_[a-z0-9_]+", e)}
    assert used, exprs
    assert used <= names, sorted(used - names)
    assert dashboard["uid"] == "moe2-fleet" and len(dashboard["panels"]) > 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_monitoring_role_renders_what_promtool_accepts(ansible, tmp_path: Path) -> None:
    root = tmp_path / "root"
    playbook = tmp_path / "monitoring.yml"
    playbook.write_text(
        "- name: Apply the monitoring role.\n"
        "  hosts: localhost\n"
        "  roles:\n"
        "    - role: moe2_monitoring\n"
    )
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        json.dumps(
            {
                "all": {
                    "hosts": {"localhost": None},
                    "vars": {
                        "ansible_connection": "local",
                        "ansible_python_interpreter": sys.executable,
                        "moe2_monitoring_root": str(root),
                        "moe2_monitoring_manage_package": False,
                        "moe2_monitoring_manage_service": False,
                        "moe2_monitoring_http_targets": ["controller:8000"],
                        "moe2_monitoring_http_api_key": "sk-scrape",
                        "moe2_monitoring_agent_targets": ["orin-1:9464", "rtx-1:9464"],
                    },
                }
            }
        )
    )
    first = ansible.playbook(inventory, playbook=playbook)
    assert first.returncode == 0, first.output[-4000:]
    config = root / "etc/prometheus/prometheus.yml"
    proc = run(promtool(), "check", "config", "--syntax-only", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rendered = yaml.safe_load(config.read_text())
    jobs = {j["job_name"]: j for j in rendered["scrape_configs"]}
    assert jobs["moe2-http"]["static_configs"][0]["targets"] == ["controller:8000"]
    assert jobs["moe2-http"]["authorization"]["credentials_file"] == "/etc/prometheus/moe2-http.key"
    assert jobs["moe2-agents"]["static_configs"][0]["targets"] == ["orin-1:9464", "rtx-1:9464"]
    assert rendered["rule_files"] == ["/etc/prometheus/moe2.rules.yml"]
    assert (root / "etc/prometheus/moe2.rules.yml").read_text() == RULES.read_text()
    key = root / "etc/prometheus/moe2-http.key"
    assert key.read_text() == "sk-scrape\n" and key.stat().st_mode & 0o777 == 0o640
    assert json.loads(
        (root / "var/lib/grafana/dashboards/moe2/moe2-fleet-dashboard.json").read_text()
    )
    second = ansible.playbook(inventory, playbook=playbook)
    assert second.returncode == 0 and second.recap()["changed"] == 0, second.changed_tasks()
