"""Headless Chromium for tests, driven by chromedriver's W3C WebDriver protocol over HTTP
(Debian's ``chromium`` and ``chromium-driver``; no Python package needed).

    with Browser(tmp_path) as browser:
        browser.open("http://user:key@127.0.0.1:8000/fleet")
        browser.run("return document.title")
        browser.screenshot(path)
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from moe2.shared.broker import free_port, wait_for_port

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
]


def missing() -> str | None:
    """Why no browser can run here, or None."""
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run scripts/install-system-packages"
    return None


class Browser:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.session = ""

    def __enter__(self) -> Browser:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "chromedriver.log").open("wb") as log:
            self._proc = subprocess.Popen(
                ["chromedriver", f"--port={self.port}"], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port("127.0.0.1", self.port, 30, self._proc)
            options = {
                "binary": shutil.which("chromium"),
                "args": [*CHROMIUM_FLAGS, f"--user-data-dir={self.workdir / 'profile'}"],
            }
            caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.session:
                self._call("DELETE", f"/session/{self.session}")
        finally:
            self._stop()

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["value"]

    def open(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str) -> Any:
        """The value of a script run in the page (``return ...``)."""
        return self._call(
            "POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []}
        )

    def screenshot(self, path: Path) -> Path:
        png = self._call("GET", f"/session/{self.session}/screenshot")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(png))
        return path
