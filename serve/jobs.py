"""A job: one request's life (queued -> running -> succeeded | failed | cancelled), its progress
and result. The scheduler changes jobs under its lock; HTTP handlers wait on changes without
holding a thread (wait_change)."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field

from sdrt.serve.spec import Spec

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


@dataclass(eq=False)
class Job:
    spec: Spec
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: str = "queued"
    step: int = 0
    created: float = field(default_factory=time.monotonic)
    created_unix: float = field(default_factory=time.time)
    deadline: float | None = None        # monotonic seconds; None: no timeout
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    error_status: int | None = None      # the HTTP status of a failed job's error
    images: list | None = None           # uint8 [H, W, 3] each, when succeeded
    info: dict = field(default_factory=dict)
    passed: int = 0                      # calls run before it for the loaded LoRA set (scheduler)
    version: int = 0
    watchers: set = field(default_factory=set)      # callbacks of waiting HTTP handlers
    watch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def done(self) -> bool:
        return self.state in FINAL

    @property
    def steps(self) -> int:
        return self.spec.steps

    def changed(self) -> None:
        """Called by the scheduler (under its lock) after every change."""
        self.version += 1
        with self.watch_lock:
            notify_all = list(self.watchers)
        for notify in notify_all:
            notify()

    def watch(self, notify) -> None:
        with self.watch_lock:
            self.watchers.add(notify)

    def unwatch(self, notify) -> None:
        with self.watch_lock:
            self.watchers.discard(notify)


async def wait_change(job: Job, seen: int, timeout: float) -> None:
    """Return when job.version != seen, or after timeout seconds."""
    if job.version != seen:
        return
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def notify():
        loop.call_soon_threadsafe(event.set)
    job.watch(notify)
    try:
        if job.version == seen:
            await asyncio.wait_for(event.wait(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        pass
    finally:
        job.unwatch(notify)
