"""Admission, fairness and micro-batching between the connections and the one model.

- **Cost.** A request costs batch x latent frames x steps (x 2 when frames are decoded through the VAE): what its
  denoise loop computes, in units of one frame-step of one sample. Requests above the server's limit are refused.
- **Bounded queue.** At most ``max_queued`` requests wait; one more is answered "busy, retry after <s>" (the
  estimate: the queue's batches times the recent time per batch) instead of growing the queue.
- **Round-robin.** Each connection has at most one request in flight (the server reads its next message only after
  answering), and the worker takes the waiting requests in connection order, starting after the connection it
  served last: every waiting connection is served once before any is served twice.
- **Micro-batching.** Having taken a request, the worker also takes the waiting requests with the same batch key
  (mode, latent frames, steps and what shapes the loop: see ``batch_key``), and waits for more while some open
  connection has nothing queued (it might be about to send one): until no compatible request has arrived for
  ``window_s`` (at most ``WINDOW_CAP`` windows in all) or the batch holds ``max_batch`` samples. A lone client
  never waits.
  The batch runs as one call (``MotusPolicy.infer_batch``), which keeps every request's result what it is alone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from motus_fast.serve.schema import Request

log = logging.getLogger("motus_fast")
WINDOW_CAP = 5          # a batch waits at most this many windows for requests to join it


def request_cost(req: Request, default_steps: int) -> int:
    """batch x latent frames x steps, x 2 when the predicted frames are decoded."""
    return req.batch * req.num_frames * (req.steps or default_steps) * (2 if req.return_frames else 1)


def batch_key(req: Request, default_steps: int) -> tuple:
    """Requests with equal keys can share one denoise loop (the policy checks the tensor shapes again)."""
    return (req.mode, req.num_frames, req.steps or default_steps, req.return_frames, req.state is None,
            req.prev_actions is not None, None if req.future_frames is None else req.future_frames.shape[1:])


@dataclass(eq=False)
class Job:
    conn: int                               # the connection's id (round-robin order)
    request: Request
    key: tuple
    on_done: Callable[[Any], None]          # called on the worker thread with the result (or an Exception)
    queued_at: float = field(default_factory=time.perf_counter)


class Scheduler:
    """A worker thread that runs batches of jobs through `run_batch(requests) -> results` (one per request)."""

    def __init__(self, run_batch: Callable[[Sequence[Request]], list], *, max_queued: int, max_batch: int,
                 window_s: float, default_steps: int):
        self.run_batch, self.max_queued, self.max_batch = run_batch, max_queued, max_batch
        self.window_s, self.default_steps = window_s, default_steps
        self.open_connections = 0           # kept by the server: connections that may send a request
        self.batches = self.batched_requests = 0
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._last_conn = -1
        self._batch_s = 0.0                 # exponential average of the time per batch (retry-after estimates)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="motus-infer", daemon=True)
        self._thread.start()

    # ---- called from the event loop --------------------------------------------------------------------------
    def submit(self, conn: int, request: Request, on_done: Callable[[Any], None]) -> Optional[float]:
        """Queue a request; None if admitted, else the seconds after which to retry (the queue is full)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._queue) >= self.max_queued:
                batches = len(self._queue) / self.max_batch + 1
                return round(max(self._batch_s, 0.01) * batches, 3)
            self._queue.append(Job(conn, request, batch_key(request, self.default_steps), on_done))
            self._cond.notify()
        return None

    def cancel(self, conn: int) -> None:
        """Drop the queued request of a connection that went away (a running one finishes)."""
        with self._cond:
            self._queue = [j for j in self._queue if j.conn != conn]

    def set_open_connections(self, n: int) -> None:
        with self._cond:
            self.open_connections = n
            self._cond.notify()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._queue or self._running)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Finish what is queued, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the worker thread ----------------------------------------------------------------------------------
    def _take_next(self) -> Job:
        """The waiting job of the first connection after the last one served (round-robin), removed."""
        job = min(self._queue, key=lambda j: (j.conn <= self._last_conn, j.conn, j.queued_at))
        self._queue.remove(job)
        return job

    def _gather(self, first: Job) -> list[Job]:
        """`first` plus compatible waiting jobs (round-robin order), waiting for more while they keep coming: until
        no compatible request arrived for `window_s`, at most WINDOW_CAP windows in all."""
        batch, samples = [first], first.request.batch
        start = time.perf_counter()
        deadline = min(first.queued_at, start) + self.window_s
        while samples < self.max_batch:
            joining = sorted((j for j in self._queue if j.key == first.key),
                             key=lambda j: (j.conn <= first.conn, j.conn))
            for job in joining:
                if samples + job.request.batch <= self.max_batch:
                    self._queue.remove(job)
                    batch.append(job)
                    samples += job.request.batch
                    deadline = max(deadline, job.queued_at + self.window_s)     # a train of arrivals: keep waiting
            left = min(deadline, start + WINDOW_CAP * self.window_s) - time.perf_counter()
            idle = self.open_connections - len(batch) - len(self._queue)   # might send one any moment
            if samples >= self.max_batch or left <= 0 or idle <= 0 or self._stopping:
                break
            self._cond.wait(left)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                first = self._take_next()
                batch = self._gather(first) if self.window_s > 0 else [first]
                self._last_conn = first.conn
                self._running = batch
            t0 = time.perf_counter()
            try:
                results = self.run_batch([j.request for j in batch])
            except Exception as e:  # noqa: BLE001  (reported to every request of the batch)
                results = [e] * len(batch)
            elapsed = time.perf_counter() - t0
            with self._cond:
                self._batch_s = elapsed if self.batches == 0 else 0.8 * self._batch_s + 0.2 * elapsed
                self.batches += 1
                self.batched_requests += len(batch)
                self._running = []
            for job, result in zip(batch, results):
                try:
                    job.on_done(result)
                except Exception:  # noqa: BLE001  (a callback must not kill the worker)
                    log.exception("a reply callback failed")
