"""`lathe webui`: a web page to train, watch, evaluate, chat and export without writing YAML.

Every form is generated from the config schema and checked by the same code the CLI runs;
what it starts is a `lathe <verb> config.yaml` process of its own (see jobs.py), so the page
can be closed and the UI restarted without losing a run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError, did_you_mean

OPTIONS = {"host": "127.0.0.1", "port": 7860, "lang": "en", "workdir": "webui"}
HELP = {"host": "address to listen on (0.0.0.0: every interface)", "port": "port of the page",
        "lang": "language of the page: en or zh (the page can switch)",
        "workdir": "folder for the UI's jobs (logs, configs they ran) and saved configs"}


def parse_options(overrides: list[str]) -> dict[str, Any]:
    """`port=8080 lang=zh ...` -> options; one line for a key or value that is wrong."""
    options = dict(OPTIONS)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep:
            raise ConfigError(f"lathe webui: {item!r} must look like key=value (keys: {', '.join(OPTIONS)})")
        if key not in OPTIONS:
            raise ConfigError(f"lathe webui: {key} is not an option{did_you_mean(key, OPTIONS)}; "
                              f"options: {', '.join(OPTIONS)}")
        options[key] = value.strip()
    try:
        options["port"] = int(options["port"])
        if not 0 <= options["port"] < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(f"lathe webui: port={options['port']} is not a port number (0-65535)") from None
    if options["lang"] not in ("en", "zh"):
        raise ConfigError(f"lathe webui: lang={options['lang']} is not en or zh")
    return options


def run_webui(overrides: list[str]) -> None:
    """Bind the port (one line when it is taken), then serve the page until Ctrl-C."""
    import logging

    import uvicorn

    from lathe.serve import bind
    from lathe.webui.app import create_app

    options = parse_options(overrides)
    sock = bind(options["host"], options["port"])
    port = sock.getsockname()[1]
    workdir = Path(options["workdir"]).resolve()
    app = create_app(workdir, options["lang"])
    logging.getLogger("lathe.webui").addHandler(logging.StreamHandler(sys.stderr))
    host = f"[{options['host']}]" if ":" in options["host"] else options["host"]
    print(f"Lathe web UI: http://{host}:{port}/?lang={options['lang']} (jobs and saved configs in {workdir}). "
          "Runs it starts keep going when the page or this server is closed. Ctrl-C stops the server.",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
