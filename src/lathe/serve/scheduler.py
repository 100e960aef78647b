"""Batching: replies decoded together, each with its own settings, stream and cancellation.

One worker thread owns the model. When the model allows it (`continuous_blocker`), batching
is continuous: a request that arrives joins the running batch at the next decoding step
(up to `max_batch_size` rows) and a reply that ends leaves it at once. Otherwise batches go
in waves: the first reply waits up to `batch_wait_ms` for others, everything waiting is
decoded in one `generate`, and requests that arrive meanwhile form the next wave. The count
of replies waiting or in flight is bounded (`max_queue`): past it a request is refused at
once (429) instead of piling up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from lathe.infer.continuous import RunningBatch, continuous_blocker
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
        self.steps = 0  # continuous batching: decoding steps, and rows they advanced
        self.step_rows = 0
        generative = gen.task in ("causal_lm", "seq2seq")
        self.blocker = continuous_blocker(gen.model, gen.tokenizer) if generative else "not a generative model"
        self.mode = "continuous" if self.blocker is None else "waves"
        self.waiting: list[tuple[list[Sequence], Callable]] = []  # taken from the queue, not yet admitted
        loop = self._continuous if self.blocker is None else self._loop
        self.thread = threading.Thread(target=loop, name="lathe-decode", daemon=True)
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

    def _count(self, seqs: list[Sequence], error: BaseException | None) -> None:
        with self.lock:
            self.in_flight -= len(seqs)
            self.rows += len(seqs)
            for s in seqs:
                reason = "error" if error is not None else s.finish_reason or "unknown"
                self.finished[reason] = self.finished.get(reason, 0) + 1

    def _continuous(self) -> None:
        batch = RunningBatch(self.gen.model, self.gen.tokenizer, self.gen.stop_ids)
        callbacks: dict[int, Callable] = {}
        while True:
            if not len(batch) and not self.waiting:
                self.waiting = self._take()  # idle: wait for a request (and the window)
            while True:  # everything already queued
                try:
                    self.waiting.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            joining: list[Sequence] = []
            while self.waiting and (not len(batch) and not joining
                                    or len(batch) + len(joining) + len(self.waiting[0][0]) <= self.max_batch):
                job, on_done = self.waiting.pop(0)
                joining += job
                callbacks.update({id(s): on_done for s in job})
            try:
                if self.fault == "generate":
                    raise RuntimeError("LATHE_API_FAULT=generate: a fault injected for tests")
                if joining:
                    batch.add(joining)
                    with self.lock:
                        self.batches += 1
                    inside = {id(s) for s in batch.seqs}
                    for s in joining:  # ended before joining (cancelled, max_tokens 0)
                        if id(s) not in inside:
                            self._count([s], None)
                            callbacks.pop(id(s))(s, None)
                if len(batch):
                    batch.step()
                    with self.lock:
                        self.steps += 1
                        self.step_rows += len(batch)
                ended = batch.prune()
                error: BaseException | None = None
            except Exception as e:  # noqa: BLE001 - these requests get a 500; the server keeps serving
                log.exception("decoding failed")
                inside = {id(s) for s in batch.seqs}
                ended, error = [*batch.seqs, *(s for s in joining if id(s) not in inside and id(s) in callbacks)], e
                batch = RunningBatch(self.gen.model, self.gen.tokenizer, self.gen.stop_ids)
            for s in ended:
                self._count([s], error)
                callbacks.pop(id(s))(s, error)

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
                self.batches += 1
            self._count(seqs, error)
            for job, on_done in jobs:
                for s in job:
                    on_done(s, error)
