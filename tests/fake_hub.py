"""A model hub on localhost speaking the Hugging Face hub's HTTP API as huggingface_hub's
snapshot_download uses it (repo info; HEAD and GET of resolve URLs, with Range), serving the
files of one local model folder. HF_ENDPOINT pointed at it makes `lathe download` real without
the internet. `cut_after` bytes: the first `cuts` GETs of the largest file drop the connection
after that many bytes, as a network cut would (the client retries a few times, then gives up);
later GETs (the resume, with a Range header) are answered in full.

    python -m tests.fake_hub FOLDER REPO_ID PORT [CUT_AFTER [CUTS]]
"""

from __future__ import annotations

import hashlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


def serve(folder: Path, repo_id: str, port: int, cut_after: int | None = None, cuts: int = 1) -> None:
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    largest = max(files, key=lambda f: files[f].stat().st_size)
    log = folder.parent / "fake_hub.log"
    state = {"cuts": cuts if cut_after is not None else 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # one line per request in fake_hub.log, nothing on the terminal
            with open(log, "a") as f:
                f.write(f"{self.command} {self.path} range={self.headers.get('Range')}\n")

        def _file(self) -> str | None:
            prefix = f"/{repo_id}/resolve/"
            if not self.path.startswith(prefix):
                return None
            name = self.path[len(prefix):].split("?")[0].split("/", 1)[1]
            return name if name in files else None

        def _headers(self, name: str, length: int, status: int = 200, extra: dict | None = None) -> None:
            data = files[name].read_bytes()
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("X-Repo-Commit", SHA)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()

        def do_HEAD(self):
            name = self._file()
            if name is None:
                return self._missing()
            self._headers(name, files[name].stat().st_size)

        def do_GET(self):
            if self.path.startswith(f"/api/models/{repo_id}/tree/"):  # the file listing
                return self._json([{"type": "file", "path": f, "size": p.stat().st_size,
                                    "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in files.items()])
            if self.path.split("?")[0].startswith(f"/api/models/{repo_id}"):
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": SHA, "private": False,
                                   "siblings": [{"rfilename": f} for f in files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            name = self._file()
            if name is None:
                return self._missing()
            data = files[name].read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
            part = data[start:]
            if start:
                self._headers(name, len(part), 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
            else:
                self._headers(name, len(part))
            if name == largest and state["cuts"] > 0:
                self.wfile.write(part[:cut_after])
                self.wfile.flush()
                state["cuts"] -= 1
                self.close_connection = True
                return
            self.wfile.write(part)

        def _json(self, value) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self):
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    serve(Path(args[0]), args[1], int(args[2]), int(args[3]) if len(args) > 3 else None,
          int(args[4]) if len(args) > 4 else 1)
