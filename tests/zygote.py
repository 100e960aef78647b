"""A fork server for the tests' `lathe` commands (`conftest.run_cli`).

Each `python -m lathe ...` the tests start pays about 7 s of CPU importing torch, transformers,
peft, datasets and accelerate before it does anything; the suite starts a few hundred. This
server imports them once, the way `python -m lathe` does (Lathe's quiet filters first), and
then forks one process per command: a process of its own, with the command's working folder,
environment, stdin, stdout and stderr files and exit code, running `lathe/__main__.py` as
`python -m lathe` runs it. What the imports printed is written to the command's own
stdout/stderr first, so a command shows what a fresh one would.

A command is forked only when its environment is the one the server was started with
(libraries read some variables while importing); any other goes to a fresh interpreter, as do
commands under another launcher (torchrun, accelerate) and LATHE_TEST_FRESH_PROCESSES=1.

    python -m tests.zygote SOCKET      # started by conftest; says "ready" on stdout

Protocol (one Unix-socket connection per command): the client sends one JSON line
{argv, cwd, env, stdin, stdout, stderr} (the three streams are file paths); the server answers
{"pid": P} once the command runs, then {"code": C} when it exits (-N: killed by signal N).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import tempfile


def _prelude() -> tuple[bytes, bytes]:
    """The imports, with what they print captured: (stdout bytes, stderr bytes)."""
    captured = []
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, f in zip((1, 2), files):
        os.dup2(f.fileno(), fd)
    try:
        if os.environ.get("LATHE_DEBUG", "0") in ("0", ""):
            from lathe.quiet import quiet_warnings

            quiet_warnings()  # as lathe.cli.main does before it imports the libraries
        import accelerate  # noqa: F401
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401

        import lathe.api  # noqa: F401
        import lathe.cli  # noqa: F401
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
    for f in files:
        f.seek(0)
        captured.append(f.read())
        f.close()
    return captured[0], captured[1]


def _command(req: dict, printed: tuple[bytes, bytes]) -> None:
    """In the forked process: become `python -m lathe ARGV` and exit with its code."""
    import atexit
    import runpy
    import threading

    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, flags in ((0, req["stdin"] or os.devnull, os.O_RDONLY),
                            (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.write(1, printed[0])
    os.write(2, printed[1])
    sys.argv = [os.path.join(os.path.dirname(sys.modules["lathe"].__file__), "__main__.py"), *req["argv"]]
    sys.path[0] = os.getcwd()  # what `python -m` puts first
    code: int = 0
    try:
        runpy.run_module("lathe", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter prints for an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    # what the interpreter does on its way out: wait for threads, run atexit, flush
    if hasattr(threading, "_shutdown"):
        threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _monitor(conn: socket.socket, req: dict, printed: tuple[bytes, bytes]) -> None:
    """Fork the command, report its pid, wait for it, report its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _command(req, printed)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        conn.sendall(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    finally:
        os._exit(0)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def serve(path: str) -> None:
    printed = _prelude()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the system
    print("ready", flush=True)
    while True:
        # stdin is a pipe from the test process: its end (the tests finished or died) ends the server
        ready, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in ready:
            break
        conn, _ = server.accept()
        req = json.loads(_read_line(conn))
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _monitor(conn, req, printed)
        conn.close()
    server.close()
    os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
