"""The benchmarks' latency proxy adds its delay each way without throttling."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "latency_proxy", Path(__file__).resolve().parents[2] / "bench" / "latency_proxy.py"
)
assert spec is not None and spec.loader is not None
latency_proxy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(latency_proxy)


def test_the_proxy_delays_each_way_and_keeps_many_messages_in_flight() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    with (
        latency_proxy.LatencyProxy(server.getsockname(), one_way_s=0.025) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as c,
    ):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        rtt = time.perf_counter() - t0
        assert 0.05 <= rtt < 0.2
        # ten messages 5 ms apart come back 5 ms apart, not one round trip apart
        t0 = time.perf_counter()
        for i in range(10):
            c.sendall(bytes([i]))
            time.sleep(0.005)
        got = b""
        while len(got) < 10:
            got += c.recv(10)
        assert got == bytes(range(10))
        assert time.perf_counter() - t0 < 0.05 + 0.05 + 0.1  # not 10 round trips
    server.close()
