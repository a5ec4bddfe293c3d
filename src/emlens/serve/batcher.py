"""One thread owns the model: requests that arrive while it generates are batched into its next engine call.

HTTP handlers submit jobs (a served model, its requests, decoding settings) and await a future. The thread
takes every job queued (waiting `window_s` after the first for batch-mates, up to `max_batch` requests), groups
them by model and decoding settings, and runs each group as one `generate` call: on the vllm engine one pass
where each request carries its own steering program; on the hf engine one padded batch per distinct steering.
A request's completion depends on its own seed, never on its batch-mates (both engines draw per request).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from emlens.generation.engine import GenerationConfig, Request, generate
from emlens.model import Model


@dataclass
class Job:
    handle: Model
    requests: list[Request]
    config: GenerationConfig
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return id(self.handle), self.config.model_dump_json()


class Batcher:
    def __init__(self, window_s: float = 0.01, max_batch: int = 64):
        self.window_s, self.max_batch = window_s, max_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="emlens-serve-batcher", daemon=True)
        self._thread.start()
        self.calls = 0  # engine calls made (a test reads it to see that batching happened)

    def submit(self, handle: Model, requests: list[Request], config: GenerationConfig) -> Future:
        job = Job(handle, requests, config)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _take(self, first: Job) -> list[Job]:
        jobs, size = [first], len(first.requests)
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # close after this batch
                break
            jobs.append(job)
            size += len(job.requests)
        return jobs

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            groups: dict[tuple, list[Job]] = {}
            for job in self._take(first):
                groups.setdefault(job.group, []).append(job)
            for jobs in groups.values():
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        try:
            self.calls += 1
            completions = generate(jobs[0].handle, requests, jobs[0].config, progress=False)
        except Exception as error:  # every waiting request hears of it; the thread keeps serving
            for job in jobs:
                job.future.set_exception(error)
            return
        start = 0
        for job in jobs:
            job.future.set_result(completions[start:start + len(job.requests)])
            start += len(job.requests)
