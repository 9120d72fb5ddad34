"""``moe2ctl serve`` as an operator runs it: JSON log lines for the journal, and Prometheus
metrics of its decisions, from a real process on a real broker and registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from moe2.controller import datasets as ds
from moe2.controller.registry import Registry
from moe2.shared.broker import free_port, wait_for_port
from moe2.shared.mqtt import BrokerConfig


def test_serve_writes_json_logs_and_counts_its_decisions(
    broker_config: BrokerConfig, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    reg = Registry.open(db)
    reg.add_dataset("t", "free-answer", "tiny", ds.tiny_domains(["animals"], 4, 1))
    reg.close()
    port = free_port()
    env = {**os.environ, "MOE2_DATA_DIR": str(tmp_path / "data")}
    cmd = [
        sys.executable,
        "-c",
        "from moe2.controller.cli import main; main()",
        "-v",
        "serve",
        "--dataset",
        "t",
        "--gate",
        "uniform",
        "--app",
        "animals=0.05",  # serve refuses an application the dataset has no samples of
        "--dry-run",
        "--settle-s",
        "0.5",
        "--log-format",
        "json",
        "--metrics-port",
        str(port),
        "--db",
        db,
        "--broker-host",
        broker_config.host,
        "--broker-port",
        str(broker_config.port),
    ]
    err = (tmp_path / "serve.err").open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        deadline = time.monotonic() + 60
        text = ""
        while 'moe2_serve_decisions_total{action="failed"} 1.0' not in text:
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        # no expert is online, scored and profiled: its first look decides "failed", once
        assert "moe2_serve_last_decision_timestamp_seconds" in text
        assert "process_cpu_seconds_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        err.close()
    assert proc.returncode == 0, out
    assert "no eligible expert" in out.decode()
    lines = [ln for ln in (tmp_path / "serve.err").read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert any(r["logger"] == "moe2.controller.serve.cli" for r in records), records
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
