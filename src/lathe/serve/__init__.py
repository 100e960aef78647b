"""`lathe api`: serve a trained model over the OpenAI API (routes in app.py, batching in
scheduler.py). Everything is checked before the model loads: the port is bound first, so a
port in use is one line at once, and a model that does not load is one line too."""

from __future__ import annotations

import os
import socket
import sys

from lathe.config.schema import LatheConfig
from lathe.errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use (another server?)" if e.errno in (98, 48, 10048) else f"cannot be used ({e.strerror})"
        raise ConfigError(f"port {port} on {host} {why}; choose another with port=N") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def check_backend(cfg: LatheConfig) -> None:
    if cfg.serve.infer_backend != "vllm":
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("infer_backend: vllm needs the vllm package, which is not installed here (it runs on "
                          "CUDA GPUs: pip install vllm); remove infer_backend to serve with Lathe's own engine")
    raise ConfigError("infer_backend: vllm is installed, but Lathe's vLLM adapter is not built yet; remove "
                      "infer_backend to serve with Lathe's own engine (the same routes)")


def run_api(cfg: LatheConfig) -> None:
    """Bind, load, serve until Ctrl-C."""
    import logging

    import uvicorn

    from lathe.infer.load import load_generator
    from lathe.serve.app import create_app
    from lathe.serve.scheduler import Scheduler

    s = cfg.serve
    check_backend(cfg)
    sock = bind(s.host, s.port)

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    gen = load_generator(cfg, note)
    scheduler = Scheduler(gen, s.max_batch_size, s.batch_wait_ms, s.max_queue,
                          fault=os.environ.get("LATHE_API_FAULT"))
    app = create_app(gen, cfg, scheduler)
    logging.getLogger("lathe.serve").addHandler(logging.StreamHandler(sys.stderr))
    shown = f"[{s.host}]" if ":" in s.host else s.host
    if s.max_batch_size == 1:
        batching = "no batching"
    elif scheduler.mode == "continuous":
        batching = f"continuous batching up to {s.max_batch_size} replies"
    else:
        batching = f"batches of up to {s.max_batch_size} replies in waves ({scheduler.blocker})"
    adapters = "".join(f" + {a}" for a in cfg.model.adapter_name_or_path or [] if a != gen.path)
    note(f"Lathe API: http://{shown}:{s.port}/v1, model {s.served_model_name!r} "
         f"({cfg.model.model_name_or_path}{adapters}, {gen.task}); "
         f"{batching}; {'API key required' if s.api_key else 'no API key (set api_key to require one)'}. "
         "Ctrl-C stops it.")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
