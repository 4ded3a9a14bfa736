"""Prometheus metrics of one server (its own registry: two servers in one process do not mix)."""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdrt_requests", "HTTP requests by route and status", ["route", "method", "status"],
                                registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "jobs waiting", registry=r)
        self.batch_size = Gauge("sdrt_running_batch_size", "images in the running engine call", registry=r)
        self.step_batch = Histogram("sdrt_step_batch_size", "occupied batch slots per denoising step "
                                    "(--batching step; other policies: images per engine call)",
                                    buckets=tuple(range(1, 65)), registry=r)
        self.step_time = Histogram("sdrt_step_seconds", "one denoising step of the running batch",
                                   buckets=STEP_BUCKETS, registry=r)
        self.image_latency = Histogram("sdrt_image_latency_seconds", "submit to result, per job",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("sdrt_queue_wait_seconds", "submit to start, per job", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.images = Counter("sdrt_images", "images generated", registry=r)
        self.images_per_s = Gauge("sdrt_images_per_second", "images generated over the last 60 s, per second",
                                  registry=r)
        self.cancellations = Counter("sdrt_cancellations", "jobs cancelled, by reason", ["reason"], registry=r)
        self.rejections = Counter("sdrt_rejections", "submissions refused, by reason", ["reason"], registry=r)
        self.failures = Counter("sdrt_job_failures", "jobs failed, by HTTP status", ["status"], registry=r)
        self.lora_switches = Counter("sdrt_lora_switches", "LoRA set changes between engine calls", registry=r)
        self.batches = Counter("sdrt_engine_calls", "engine calls (batches run)", registry=r)
        self.recent = deque()                 # (time, images) of the last minute
        self.lock = threading.Lock()

    def add_images(self, n: int) -> None:
        with self.lock:
            self.recent.append((time.monotonic(), n))

    def render(self) -> bytes:
        with self.lock:
            now = time.monotonic()
            while self.recent and now - self.recent[0][0] > 60:
                self.recent.popleft()
            self.images_per_s.set(sum(n for _, n in self.recent) / 60.0)
        return generate_latest(self.registry)
