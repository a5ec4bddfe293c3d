"""One thread owns the model; HTTP handlers submit jobs (a served model, its requests, decoding settings) and await
a future. Tokens reach a request's `on_token` as they are generated (a stream reads them there).

- hf engine (`Batcher`): every job queued while the engine works (waiting `window_s` after the first for
  batch-mates, up to `max_batch` requests) is grouped by model and decoding settings, and each group runs as one
  `generate` call: one padded batch per distinct steering.
- vllm engine (`LiveBatcher`): continuous batching. Requests join vLLM's running batch between engine steps, each
  under its own steering program, base and adapter requests together.

A request's completion depends on its own seed, never on its batch-mates (both engines draw per request).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.generation.requests import Completion
from emlens.generation.vllm_engine import LiveRequests
from emlens.model import Model


@dataclass
class Job:
    handle: Model
    requests: list[Request]
    config: GenerationConfig
    activate: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around the engine call
    future: Future = field(default_factory=Future)
    results: dict[int, Completion] = field(default_factory=dict)

    @property
    def group(self) -> tuple:
        return id(self.handle), self.config.model_dump_json()

    def finished_one(self, index: int):
        """The callback of request `index`: the job's future resolves when all its requests have."""
        def done(result: Completion | Exception) -> None:
            if self.future.done():
                return
            if isinstance(result, Exception):
                self.future.set_exception(result)
                return
            self.results[index] = result
            if len(self.results) == len(self.requests):
                self.future.set_result([self.results[i] for i in range(len(self.requests))])
        return done


class _Loop:
    """The model thread and its queue."""

    def __init__(self):
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="emlens-serve-model", daemon=True)
        self._thread.start()
        self.calls = 0  # engine calls (hf) or steps that took new requests (vllm): a test reads it
        self.peak = 0  # the most requests in one engine call (hf) or in vLLM's running batch at once

    def submit(self, handle: Model, requests: list[Request], config: GenerationConfig,
               activate: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Future:
        job = Job(handle, requests, config, activate)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _take(self, block: bool, window_s: float = 0.0, max_requests: int | None = None) -> list[Job]:
        """Queued jobs: waiting for the first when `block`, then for `window_s` more, up to `max_requests`."""
        jobs: list[Job] = []
        deadline = None
        while not self._closing and (max_requests is None or sum(len(j.requests) for j in jobs) < max_requests):
            try:
                if block and not jobs:
                    job = self._queue.get()
                    deadline = time.monotonic() + window_s
                else:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic())) if deadline else \
                        self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._closing = True
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        raise NotImplementedError


class Batcher(_Loop):
    def __init__(self, window_s: float = 0.01, max_batch: int = 64):
        self.window_s, self.max_batch = window_s, max_batch
        super().__init__()

    def _run(self) -> None:
        while not self._closing:
            groups: dict[tuple, list[Job]] = {}
            for job in self._take(True, self.window_s, self.max_batch):
                groups.setdefault(job.group, []).append(job)
            for jobs in groups.values():
                self._generate(jobs)

    def _generate(self, jobs: list[Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        self.calls += 1
        self.peak = max(self.peak, len(requests))
        try:
            with jobs[0].activate():
                completions = generate(jobs[0].handle, requests, jobs[0].config, progress=False)
        except Exception as error:  # every waiting request hears of it; the thread keeps serving
            for job in jobs:
                job.future.set_exception(error)
            return
        start = 0
        for job in jobs:
            job.future.set_result(completions[start:start + len(job.requests)])
            start += len(job.requests)


class LiveBatcher(_Loop):
    def __init__(self, handle: Model):
        self.live = LiveRequests(handle)  # builds (or finds) the engine now, not on the first request
        super().__init__()

    def _run(self) -> None:
        while not self._closing or self.live.busy:
            jobs = self._take(block=not self.live.busy)
            if jobs:
                self.calls += 1
            for job in jobs:
                for index, request in enumerate(job.requests):
                    try:
                        self.live.add(job.handle, request, job.config, job.finished_one(index))
                    except Exception as error:
                        job.finished_one(index)(error)
            self.peak = max(self.peak, self.live.count)
            if self.live.busy:
                try:
                    self.live.step()
                except Exception:  # the live requests were told; the thread keeps serving
                    continue
