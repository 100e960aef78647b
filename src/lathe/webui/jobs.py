"""Jobs the web UI starts: each one a `lathe <verb>` process of its own, not a thread of the
web server, so closing the page or restarting the UI loses nothing.

A job is a folder under `<workdir>/jobs/<id>`: job.json (what was started, where it writes),
config.yaml (the config it runs, the one the page showed), log.txt (its terminal output) and
rc (its exit code, written by the runner when it ends). The runner
(`python -m lathe.webui.runner FOLDER`) is started in a session of its own; it starts lathe,
waits, and writes rc, so a UI started later reads the same state: running (the runner's
process is alive), finished, failed or stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lathe.errors import OutputError

RUNNER = "lathe.webui.runner"
LOG_LINES = 40


@dataclass
class Job:
    folder: Path
    record: dict[str, Any]

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def output(self) -> str | None:
        return self.record.get("output")

    def rc(self) -> int | None:
        try:
            return int((self.folder / "rc").read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """The runner's process is there: the same process (its start time, recorded at the start,
        tells it from a later one that got the same pid) and not a finished one left to reap."""
        pid = self.record.get("pid")
        if not pid:
            return False
        stat = _proc_stat(pid)
        if stat is None:  # no /proc (not Linux): ask the process itself
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True
        state, started = stat
        return state not in ("Z", "X", "gone") and started == self.record.get("proc_start", started)

    def status(self) -> str:
        rc = self.rc()
        if rc is None and self.alive():
            return "running"
        if rc == 0:
            return "done"
        # stopped from the page (a stop that came before the runner was up leaves no rc), or not
        return "stopped" if (self.folder / "stopped").exists() else "failed"

    def log_tail(self, lines: int = LOG_LINES) -> str:
        path = self.folder / "log.txt"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64_000))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        shown = [line.split("\r")[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                 for line in text.split("\n")]  # a progress bar redraws with \r: keep its last state
        return "\n".join(shown[-lines:]).rstrip()

    def history(self) -> list[dict[str, Any]]:
        """trainer_log.jsonl of the run (every logged step), as far as it is written."""
        if not self.output:
            return []
        path = Path(self.output) / "trainer_log.jsonl"
        if not path.is_absolute():
            path = Path(self.record.get("cwd", ".")) / path
        out = []
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line being written
        except OSError:
            pass
        return out

    def summary(self) -> dict[str, Any]:
        hist = self.history()
        last = next((h for h in reversed(hist) if "max_steps" in h), None)
        loss = next((h["loss"] for h in reversed(hist) if "loss" in h), None)
        return {"id": self.id, "verb": self.record.get("verb"), "output": self.output,
                "status": self.status(), "started": self.record.get("started"),
                "step": last["step"] if last else None, "max_steps": last["max_steps"] if last else None,
                "loss": loss, "command": self.record.get("command")}

    def detail(self) -> dict[str, Any]:
        hist = self.history()
        curves = {key: [[h["step"], h[key]] for h in hist if isinstance(h.get(key), (int, float))]
                  for key in ("loss", "eval_loss")}
        return {**self.summary(), "curves": curves, "log": self.log_tail(), "results": self.results(),
                "config": (self.folder / "config.yaml").read_text(encoding="utf-8")
                if (self.folder / "config.yaml").is_file() else ""}

    def results(self) -> dict[str, Any]:
        """The JSON files a finished verb writes into its output folder."""
        if not self.output:
            return {}
        out = Path(self.output)
        if not out.is_absolute():
            out = Path(self.record.get("cwd", ".")) / out
        found = {}
        for name in ("all_results.json", "results.json", "export_verification.json", "quantize_report.json",
                     "predict_results.json", "test_results.json"):
            path = out / name
            if path.is_file():
                try:
                    found[name] = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
        return found


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from /proc; ("gone", "") when it is not there; None
    where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ("gone", "")
    fields = text[text.rindex(")") + 2:].split()  # after "pid (name) "
    return fields[0], fields[19]


class Jobs:
    def __init__(self, workdir: Path):
        self.root = Path(workdir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.started: list[subprocess.Popen] = []  # runners this UI started: reaped when they end

    def all(self) -> list[Job]:
        self.started = [p for p in self.started if p.poll() is None]
        jobs = []
        for folder in sorted(self.root.iterdir(), reverse=True):
            try:
                record = json.loads((folder / "job.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            jobs.append(Job(folder, record))
        return jobs

    def get(self, job_id: str) -> Job | None:
        folder = self.root / job_id
        if "/" in job_id or job_id.startswith(".") or not (folder / "job.json").is_file():
            return None
        return Job(folder, json.loads((folder / "job.json").read_text(encoding="utf-8")))

    def running_into(self, output: str) -> Job | None:
        target = os.path.realpath(output)
        return next((j for j in self.all() if j.output and j.status() == "running"
                     and os.path.realpath(Path(j.record.get("cwd", ".")) / j.output) == target), None)

    def start(self, verb: str, argv_tail: list[str], config_text: str | None, output: str | None,
              cwd: str) -> Job:
        """Start `lathe <verb> ...` in its own session; `argv_tail` may name config.yaml, which is
        written into the job folder first."""
        if output:
            other = self.running_into(output)
            if other is not None:
                raise OutputError(f"{output} is already the output of run {other.id}, which is still "
                                  "running; choose another folder")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{stamp}-{verb}"
        folder = self.root / base
        k = 1
        while folder.exists():
            k += 1
            folder = self.root / f"{base}-{k}"
        folder.mkdir()
        argv_tail = [str(folder / "config.yaml") if a == "config.yaml" else a for a in argv_tail]
        if config_text is not None:
            (folder / "config.yaml").write_text(config_text, encoding="utf-8")
        command = ["lathe", verb, *argv_tail]
        record = {"verb": verb, "argv": [sys.executable, "-m", "lathe", verb, *argv_tail], "output": output,
                  "cwd": cwd, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(command)}
        (folder / "job.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", RUNNER, str(folder)], cwd=cwd, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(proc)
        record["pid"] = proc.pid
        stat = _proc_stat(proc.pid)
        if stat is not None and stat[0] != "gone":
            record["proc_start"] = stat[1]
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
        os.replace(tmp, folder / "job.json")
        return Job(folder, record)

    def stop(self, job: Job) -> bool:
        """Interrupt the job's process group (lathe stops as on Ctrl-C)."""
        if job.status() != "running":
            return False
        (job.folder / "stopped").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            os.killpg(job.record["pid"], signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            return False
        return True
