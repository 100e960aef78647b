"""`python -m lathe.webui.runner JOB_FOLDER`: run the job's lathe command, its output into
log.txt, and write its exit code into rc when it ends (see jobs.py). It outlives the web UI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def main(folder: str) -> int:
    job = Path(folder)
    record = json.loads((job / "job.json").read_text(encoding="utf-8"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(job / "log.txt", "ab") as log:
        log.write(f"$ {record['command']}\n".encode())
        log.flush()
        proc = subprocess.Popen(record["argv"], cwd=record.get("cwd"), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env)

        def forward(signum, frame):  # a TERM meant for the runner alone: pass it on
            if proc.poll() is None:
                proc.send_signal(signum)

        # The UI's stop interrupts the whole process group, lathe included: the runner only waits
        # (set after the start, so lathe keeps the default Ctrl-C behaviour).
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        signal.signal(signal.SIGTERM, forward)
        rc = proc.wait()
    tmp = job / "rc.tmp"
    tmp.write_text(str(rc))
    os.replace(tmp, job / "rc")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
