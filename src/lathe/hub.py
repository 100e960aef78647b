"""Is the model hub reachable? Asked once, in about a second, before anything downloads.

Without it, a hub id on a machine with no network makes huggingface_hub retry for about
50 s (a dozen "Retrying in Ns" lines) before it gives up. With it: when the hub cannot be
reached, models and datasets are read from the local hub cache only (what an earlier
online run downloaded), and anything not there is one clear line at once. HF_ENDPOINT
(a mirror) is honoured; HF_HUB_OFFLINE=1 skips the probe.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def flag_set(var: str) -> bool:
    """An environment switch such as HF_HUB_OFFLINE=1 is on (0, false, no or unset: off)."""
    return os.environ.get(var, "0").strip().lower() not in ("0", "", "false", "no")


def offline_by_choice() -> bool:
    return flag_set("HF_HUB_OFFLINE")


@functools.cache
def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """A TCP connection to the hub endpoint within `timeout` seconds (name lookup included)."""
    url = urlparse(endpoint())
    return host_reachable(url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443),
                          timeout)


@functools.cache
def host_reachable(host: str, port: int, timeout: float = PROBE_SECONDS) -> bool:
    """A TCP connection to host:port within `timeout` seconds (name lookup included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)  # a hung name lookup cannot hold us
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def offline() -> bool:
    """True when the hub must not be asked: HF_HUB_OFFLINE, or it cannot be reached."""
    return offline_by_choice() or not reachable()


def why_offline() -> str:
    if offline_by_choice():
        return "HF_HUB_OFFLINE is set"
    return f"no network: {endpoint()} cannot be reached (checked in {PROBE_SECONDS:.0f} s)"
