"""Lathe's servers (`lathe api`, `lathe webui`) as real processes on a free port, for the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

try:  # the HTTP client the openai package brings (httpx2 in openai 3, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx  # noqa: F401 - the tests that need it skip without it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(verb: str, args: list[str], probe: str, log: Path, cwd: Path | None = None,
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lathe <verb> *args port=N` (in a session of its own), once GET `probe` answers 200;
    the server's stderr goes to `log`."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lathe", verb, *args, f"port={port}"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**os.environ, **(env or {})},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lathe {verb} exited: {log.read_text()}")
        try:
            if httpx.get(url + probe, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"lathe {verb} did not answer: {log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
