"""A TCP proxy on loopback that delays every byte by a fixed one-way time without throttling:
a stand-in for a LAN or WiFi link where the kernel has no netem.

Each direction of each connection has a reader that stamps what it receives and a writer
that sends it once its time has come, so bytes keep their order, many messages can be in
flight at once (the link is long, not narrow), and a delay of d makes a round trip through
the proxy 2·d longer. It runs in a process of its own so its threads never compete with the
measured process for the GIL.

    with LatencyProxy(("127.0.0.1", 1883), one_way_s=0.010) as proxy:   # +20 ms round trip
        agent_broker = BrokerConfig(host="127.0.0.1", port=proxy.port)

    python bench/latency_proxy.py --target 127.0.0.1:1883 --delay-ms 10 [--port 0]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy src to dst, each chunk ``delay`` seconds after it arrived."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    cond = threading.Condition()
    closed = threading.Event()

    def read() -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with cond:
                    queue.append((time.monotonic() + delay, data))
                    cond.notify()
        except OSError:
            pass
        closed.set()
        with cond:
            cond.notify()

    def write() -> None:
        try:
            while True:
                with cond:
                    while not queue and not closed.is_set():
                        cond.wait()
                    if not queue:
                        break
                    due, data = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        for s in (dst, src):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=write, daemon=True).start()


def serve(target: tuple[str, int], delay: float, port: int = 0) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(target)
        except OSError:
            client.close()
            continue
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pump(client, upstream, delay)
        _pump(upstream, client, delay)


class LatencyProxy:
    """The proxy in a child process; ``port`` is where to connect instead of ``target``."""

    def __init__(self, target: tuple[str, int], one_way_s: float, port: int = 0) -> None:
        """``port``: where to listen (0: any free port; give the old one to restore a cut)."""
        self.target, self.one_way_s = target, one_way_s
        self.port = port
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> LatencyProxy:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--target",
                f"{self.target[0]}:{self.target[1]}",
                "--delay-ms",
                str(self.one_way_s * 1e3),
                "--port",
                str(self.port),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            self.close()
            raise RuntimeError(f"latency proxy did not start: {line}")
        self.port = int(line[1])
        return self

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="host:port to forward to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay added")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    args = ap.parse_args()
    host, _, port = args.target.rpartition(":")
    serve((host, int(port)), args.delay_ms / 1e3, args.port)


if __name__ == "__main__":
    main()
