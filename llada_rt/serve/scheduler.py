"""Scheduler: the one thread that drives the engine for the server. It admits queued rows first come first served (up
to max_rows in flight), steps while any row is active, turns each step's events into stable-text updates for the
waiting handlers, frees a row as soon as its text is final, and applies cancellations before the next step.

The engine runs either on a thread of its own (start()) or on the caller's thread (run_here()): the server process
uses the thread that loaded the model, because libgomp gives every thread that starts parallel regions its own
worker team, and two teams on a machine with as many cores as one team's threads throttle each other's spinning
(every region then waits for its workers to wake up; measured ~1.5-2x slower steps on 2 cores)."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import threading
import time

from ..generation_config import GenerationConfigError
from ..request import Request, StepEvent
from .metrics import Metrics
from .protocol import APIError, ChoiceSpec, JobSpec
from .text import ChoiceText


@dataclasses.dataclass
class Update:
    """New stable text of one choice after a step (delivered on the event loop)."""
    index: int
    delta: str
    finish_reason: str | None     # set on the choice's last update
    canvas: str | None = None     # the provisional canvas (the llada_canvas extension)
    nfe: int = 0


@dataclasses.dataclass
class Finished:
    """The job's last item: every choice is final."""
    completion_tokens: int


@dataclasses.dataclass
class Failed:
    error: APIError


@dataclasses.dataclass(eq=False)
class Row:
    """One choice of a job: one engine request once admitted."""
    job: "Job"
    choice: ChoiceSpec
    text: ChoiceText
    req: Request | None = None
    nfe: int = 0
    started: float = 0.0              # when it joined the engine


class Job:
    """An accepted request. Its handler reads `updates` on the event loop; the engine thread posts to it."""

    def __init__(self, spec: JobSpec, loop: asyncio.AbstractEventLoop, tok, mask_id: int, endpoint: str):
        self.spec, self.loop, self.endpoint = spec, loop, endpoint
        self.updates: asyncio.Queue = asyncio.Queue()
        self.rows = [Row(self, c, ChoiceText(tok, mask_id, spec.max_tokens, spec.stop)) for c in spec.choices]
        self.state = "running"        # -> 'done', 'cancelled' (client gone) or 'failed'
        self.cancel_nfe: list[int] | None = None   # each row's NFE when cancel() was called (a row frees within 1)
        self.arrival = time.perf_counter()
        self.first_text: float | None = None

    @property
    def texts(self) -> list[str]:
        return [r.text.sent for r in self.rows]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [r.text.finish_reason for r in self.rows]

    @property
    def completion_tokens(self) -> int:
        return sum(r.text.tokens for r in self.rows)

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, item)
        except RuntimeError:   # the event loop is closed: nobody is waiting any more
            pass


class Scheduler:
    """Requests beyond max_rows rows in flight wait in a FIFO queue of max_queue rows; a request that does not fit
    gets 429 with Retry-After. stop() stops taking requests (503) and returns once those accepted are answered."""

    def __init__(self, rt, max_rows: int, max_queue: int, metrics: Metrics):
        if max_rows < 1 or max_queue < 0:
            raise ValueError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows} and {max_queue}")
        if rt.engine.max_rows is not None and rt.engine.max_rows < max_rows:
            raise ValueError(f"the runtime's engine holds {rt.engine.max_rows} rows, fewer than max_rows={max_rows}; "
                             f"make the Runtime with max_rows={max_rows} or more")
        self.rt, self.max_rows, self.max_queue, self.metrics = rt, max_rows, max_queue, metrics
        self._cond = threading.Condition()
        self._queue: collections.deque[Row] = collections.deque()
        self._active: dict[int, Row] = {}      # engine request id -> row
        self._accepted = 0                     # rows queued or in flight
        self._stopping = False
        self._service_s = 1.0                  # moving average of a row's time in flight (for Retry-After)
        self._thread = threading.Thread(target=self._run, name="llada-rt-engine", daemon=True)
        self._started = False
        self._done = threading.Event()          # set when the engine loop has returned (or failed)

    # -- the event loop's side ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """The engine loop on a thread of its own."""
        self._started = True
        self._thread.start()

    def run_here(self) -> None:
        """The engine loop on the calling thread; returns once stop() was called and every accepted request is
        answered (or raises what stopped the loop)."""
        self._started = True
        self._run()

    def submit(self, spec: JobSpec, endpoint: str) -> Job:
        """Queues a request (called on the event loop); raises APIError 429 when the queue is full, 503 when
        stopping."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down")
            rows = len(spec.choices)
            if self._accepted + rows > self.max_rows + self.max_queue:
                retry = self.retry_after()
                raise APIError(429, f"the server is full ({self.rows_in_flight} rows in flight, {len(self._queue)} "
                                    f"queued, max_queue={self.max_queue}); retry in {retry} s",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})
            job = Job(spec, loop, self.rt.tokenizer, self.rt.config.mask_token_id, endpoint)
            self._queue.extend(job.rows)
            self._accepted += rows
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
            return job

    def cancel(self, job: Job) -> None:
        """The client is gone: its rows leave before the engine's next step."""
        with self._cond:
            if job.state != "running":
                return
            job.state = "cancelled"
            job.cancel_nfe = [r.nfe for r in job.rows]
            self.metrics.requests.labels(job.endpoint, "cancelled").inc()
            self._cond.notify()

    def stop(self) -> None:
        """Takes no more requests; returns when every accepted one is answered (or cancelled)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._started:
            self._done.wait()

    @property
    def rows_in_flight(self) -> int:
        return len(self._active)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def retry_after(self) -> int:
        """Seconds until a row is likely free: the queue ahead served max_rows at a time."""
        waves = (len(self._queue) + 1) / self.max_rows
        return max(1, math.ceil(self._service_s * waves))

    # -- the engine thread -------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:   # the loop cannot go on: nobody must wait for it
            with self._cond:
                self._stopping = True
                error = APIError(500, f"the engine thread stopped: {type(e).__name__}: {e}", code="engine_error")
                for row in list(self._active.values()) + list(self._queue):
                    self._fail(row.job, error)
                self._active.clear()
                self._queue.clear()
                self._accepted = 0
            raise
        finally:
            self._done.set()

    def _loop(self) -> None:
        engine = self.rt.engine
        while True:
            with self._cond:
                self._drop_cancelled()
                self._admit()
                if not self._active:
                    if self._stopping and not self._queue:
                        return
                    self._cond.wait()
                    continue
            forwards = engine.forwards
            t0 = time.perf_counter()
            try:
                events = self.rt.step()
            except Exception as e:   # the step failed: every row in flight fails, the server goes on
                self._fail_active(APIError(500, f"the engine step failed: {type(e).__name__}: {e}",
                                           code="engine_error"))
                continue
            self.metrics.step(sum(len(ev.positions or ()) for ev in events), engine.forwards - forwards,
                              time.perf_counter() - t0, len(events))
            for ev in events:
                row = self._active.get(ev.request.id)
                if row is None:   # not this server's request (the engine is its own, so this is a caller's bug)
                    continue
                try:
                    self._on_event(row, ev)
                except Exception as e:   # a bug in the text bookkeeping: this request fails, the others go on
                    with self._cond:
                        self._fail(row.job, APIError(500, f"{type(e).__name__}: {e}", code="server_error"))

    def _drop_cancelled(self) -> None:
        """(lock held) Rows of cancelled or failed jobs leave the engine and the queue."""
        for row in [r for r in self._active.values() if r.job.state in ("cancelled", "failed")]:
            self.rt.cancel(row.req)
            self._release(row)
        if any(r.job.state != "running" for r in self._queue):
            kept = [r for r in self._queue if r.job.state == "running"]
            self._accepted -= len(self._queue) - len(kept)
            self._queue = collections.deque(kept)
        self.metrics.queue_depth.set(len(self._queue))

    def _admit(self) -> None:
        """(lock held) First come first served: queued rows join the engine while there is room."""
        while self._queue and len(self._active) < self.max_rows:
            row = self._queue.popleft()
            try:
                row.req = self.rt.add(row.choice.prompt_ids, row.choice.config, events=True)
            except Exception as e:   # parse_request validated it; what is left is the runtime's own refusal
                self._accepted -= 1
                error = APIError(400, str(e), code="invalid_value") if isinstance(e, GenerationConfigError) else \
                    APIError(500, f"the engine refused the request: {type(e).__name__}: {e}", code="engine_error")
                self._fail(row.job, error)
                continue
            row.started = time.perf_counter()
            self._active[row.req.id] = row
            self.metrics.queue_wait.observe(row.started - row.job.arrival)
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.rows_in_flight.set(len(self._active))

    def _on_event(self, row: Row, ev: StepEvent) -> None:
        job = row.job
        row.nfe = ev.nfe
        delta = row.text.update(ev.canvas)
        if ev.done and not row.text.finished:
            raise RuntimeError(f"engine: request {ev.request.id} is done but its text is not final")
        if job.state != "running":
            return
        now = time.perf_counter()
        if (delta or row.text.finished) and job.first_text is None:
            job.first_text = now
            self.metrics.ttft.observe(now - job.arrival)
        canvas = row.text.canvas_text(ev.canvas) if job.spec.canvas else None
        if delta or row.text.finished or canvas is not None:
            job.post(Update(row.choice.index, delta, row.text.finish_reason, canvas, ev.nfe))
        if row.text.finished:
            with self._cond:
                if not ev.done:   # the text is final (stop id, stop string or max_tokens): the row is free now
                    self.rt.cancel(row.req)
                self._release(row)
                if all(r.text.finished for r in job.rows):
                    self._complete(job, now)

    def _release(self, row: Row) -> None:
        """(lock held) The row leaves the engine's books."""
        if self._active.pop(row.req.id, None) is None:
            return
        self._accepted -= 1
        self._service_s += 0.2 * (time.perf_counter() - row.started - self._service_s)
        self.metrics.rows_in_flight.set(len(self._active))

    def _complete(self, job: Job, now: float) -> None:
        job.state = "done"
        tokens = job.completion_tokens
        m = self.metrics
        m.requests.labels(job.endpoint, "completed").inc()
        m.latency.observe(now - job.arrival)
        m.prompt_tokens.inc(job.spec.prompt_tokens)
        m.completion_tokens.inc(tokens)
        job.post(Finished(tokens))

    def _fail(self, job: Job, error: APIError) -> None:
        """(lock held) The job ends with an error; its other rows leave at the next _drop_cancelled."""
        if job.state != "running":
            return
        job.state = "failed"
        self.metrics.requests.labels(job.endpoint, "invalid" if error.status < 500 else "error").inc()
        job.post(Failed(error))

    def _fail_active(self, error: APIError) -> None:
        with self._cond:
            for row in list(self._active.values()):
                self._fail(row.job, error)
                try:
                    self.rt.cancel(row.req)
                finally:
                    self._release(row)
