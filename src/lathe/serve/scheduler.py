"""Dynamic batching: replies that arrive together are decoded in one `generate`.

One worker thread owns the model. The first reply to arrive waits up to `batch_wait_ms`
for others; then everything waiting (up to `max_batch_size` rows) is decoded together by
the engine, each row with its own settings, streaming and cancellation. Requests that
arrive meanwhile form the next batch. The count of replies waiting or in flight is
bounded (`max_queue`): past it a request is refused at once (429) instead of piling up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from lathe.infer.engine import Sequence, generate
from lathe.infer.load import Generator

log = logging.getLogger("lathe.serve")


class QueueFull(Exception):
    """More replies are waiting than max_queue allows."""


class Scheduler:
    def __init__(self, gen: Generator, max_batch_size: int, batch_wait_ms: float, max_queue: int,
                 fault: str | None = None) -> None:
        self.gen = gen
        self.max_batch = max_batch_size
        self.wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.fault = fault  # LATHE_API_FAULT=generate: decoding raises (tests of the 500 path)
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.batches = 0  # generate calls so far, and rows they held (GET /health reports them)
        self.rows = 0
        self.finished: dict[str, int] = {}  # replies by finish_reason (stop, length, cancelled, timeout)
        self.thread = threading.Thread(target=self._loop, name="lathe-decode", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence], on_done: Callable[[Sequence, BaseException | None], None]) -> None:
        with self.lock:
            if self.in_flight + len(seqs) > self.max_queue:
                raise QueueFull
            self.in_flight += len(seqs)
        self.queue.put((seqs, on_done))

    def _take(self) -> list[tuple[list[Sequence], Callable]]:
        jobs = [self.queue.get()]
        rows = len(jobs[0][0])
        end = time.monotonic() + self.wait
        while rows < self.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, end - time.monotonic())) if self.wait else self.queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job[0])
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            seqs = [s for job, _ in jobs for s in job]
            error: BaseException | None = None
            try:
                if self.fault == "generate":
                    raise RuntimeError("LATHE_API_FAULT=generate: a fault injected for tests")
                generate(self.gen.model, self.gen.tokenizer, seqs, self.gen.stop_ids, self.max_batch)
            except Exception as e:  # noqa: BLE001 - the requests get a 500; the server keeps serving
                log.exception("decoding failed")
                error = e
            with self.lock:
                self.in_flight -= len(seqs)
                self.batches += 1
                self.rows += len(seqs)
                for s in seqs:
                    reason = "error" if error is not None else s.finish_reason or "unknown"
                    self.finished[reason] = self.finished.get(reason, 0) + 1
            for job, on_done in jobs:
                for s in job:
                    on_done(s, error)
