"""`sdrt serve` on Ray Serve: the same FastAPI app (server.build) as replicas, each with its own
engine worker and scheduler (batching stays inside a replica; Ray routes requests between them).

    serve run sdrt.serve.ray_app:app                          (the demo model, or $SDRT_WORK_DIR)
    serve run sdrt.serve.ray_app:build_app work_dir=PATH      (builder: options as key=value)
    serve deploy serve/ray_config.yaml                        (the repository's config file)
    sdrt serve PATH --ray [--replicas N | --autoscale MIN:MAX] [--ray-address ADDR]

Jobs across replicas: a replica keeps its jobs as `sdrt serve` does and publishes each change
(status, and the images of a succeeded job) to one small named Ray actor, the JobRegistry. A job
id this replica does not hold is read from the registry (status, result, events by polling), and
a cancel for it is left there for the owner, which picks it up within SYNC_S. A replica that stops
sending (killed) has its unfinished jobs failed with 503 after STALE_S.

Metrics: /metrics answers every live replica's metrics, each sample labelled replica="ID"."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ray
from ray import serve

from sdrt.errors import UserError
from sdrt.serve.jobs import FINAL
from sdrt.serve.metrics import Metrics
from sdrt.serve.scheduler import KEEP_FINISHED, KEEP_RESULTS, Scheduler
from sdrt.serve.spec import ApiError

SYNC_S = 0.1             # a replica publishes job changes and takes cancels this often
STALE_S = 10.0           # a replica silent this long is gone: its unfinished jobs fail
POLL_S = 0.25            # a job of another replica: its status is read again this often
METRICS_ROUNDS = 10      # a replica publishes its metrics every METRICS_ROUNDS * SYNC_S
NAMESPACE = "sdrt"
DEPLOYMENT = "SdrtReplica"
APP_NAME = "sdrt"
REPLICA_HEADER = "x-sdrt-replica"
# what build() takes from a builder's args / the CLI (the rest configure the deployment)
SERVER_OPTIONS = ("backend", "max_batch", "max_queue", "timeout", "api_key", "batching", "lora_dir",
                  "embedding_dir", "max_body_mb")


# ---- the registry every replica sees ----------------------------------------------------------

@ray.remote(num_cpus=0)
class JobRegistry:
    """Jobs by id: {owner, status fields, seeds, info, images}; cancels waiting for their owner;
    each replica's last heartbeat and metrics text. Bounded as a scheduler's job table is."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.cancels: dict[str, list[str]] = {}
        self.seen: dict[str, float] = {}
        self.metrics: dict[str, bytes] = {}

    def put(self, replica: str, records: list[dict]) -> None:
        self.seen[replica] = time.monotonic()
        for rec in records:
            old = self.jobs.pop(rec["id"], None)
            if old is not None and old["state"] in FINAL and rec["state"] not in FINAL and not old.get("stale"):
                rec = old                            # a remote cancel answered first: keep it final
            elif old is not None and rec.get("images") is None:
                rec["images"] = old.get("images")
            self.jobs[rec["id"]] = {**rec, "owner": replica}
        self.forget_old()

    def claim(self, job_id: str) -> bool:
        """False when the id is taken (force_task_id given twice, on any replica)."""
        return job_id not in self.jobs

    def get(self, job_id: str) -> dict | None:
        rec = self.jobs.get(job_id)
        if rec is not None and rec["state"] not in FINAL and self.gone(rec["owner"]):
            rec.update(state="failed", error_status=503, queue_position=None, eta_s=None, stale=True,
                       error="the replica running this job stopped (it is replaced): submit the job again")
        return rec

    def cancel(self, job_id: str) -> dict | None:
        rec = self.get(job_id)
        if rec is not None and rec["state"] not in FINAL:
            self.cancels.setdefault(rec["owner"], []).append(job_id)
            rec.update(state="cancelled", error="cancelled by the client", queue_position=None, eta_s=0.0)
        return rec

    def take_cancels(self, replica: str) -> list[str]:
        self.seen[replica] = time.monotonic()
        return self.cancels.pop(replica, [])

    def exchange_metrics(self, replica: str, text: bytes) -> dict[str, bytes]:
        self.seen[replica] = time.monotonic()
        self.metrics[replica] = text
        return {r: t for r, t in self.metrics.items() if not self.gone(r)}

    def gone(self, replica: str) -> bool:
        return time.monotonic() - self.seen.get(replica, 0.0) > STALE_S

    def forget_old(self) -> None:
        finished = [k for k, r in self.jobs.items() if r["state"] in FINAL]
        for k in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[k]
        for k in finished[:max(0, len(finished) - KEEP_RESULTS)]:
            self.jobs[k]["images"] = None


def registry_name(app_name: str) -> str:
    return f"sdrt-jobs-{app_name}"


def open_registry(app_name: str):
    """The application's registry, created by the first replica. Detached: it outlives the
    replica that made it (a replaced replica finds the same one)."""
    return JobRegistry.options(name=registry_name(app_name), namespace=NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote()


# ---- a replica's view: its own jobs, the others' through the registry -----------------------

class RemoteJob:
    """A job another replica runs, as the routes read a Job (state, step, images...); refreshed
    from the registry at most every POLL_S."""

    def __init__(self, registry, rec: dict):
        self.registry, self.read_at, self._version = registry, 0.0, 0
        self.timers: dict = {}
        self.update(rec)

    def update(self, rec: dict) -> None:
        self.rec = rec
        self.id, self.state, self.step, self.error = rec["id"], rec["state"], rec["step"], rec["error"]
        self.error_status, self.images, self.info = rec.get("error_status"), rec.get("images"), rec.get("info", {})
        self.created_unix = rec.get("created_unix", 0.0)
        self.spec = SimpleNamespace(seeds=rec.get("seeds", []), steps=rec["steps"])
        self._version += 1
        self.read_at = time.monotonic()

    def refresh(self) -> None:
        if self.done or time.monotonic() - self.read_at < POLL_S:
            return
        rec = ray.get(self.registry.get.remote(self.id), timeout=STALE_S)
        if rec is not None:
            self.update(rec)

    @property
    def version(self) -> int:
        self.refresh()
        return self._version

    @property
    def done(self) -> bool:
        return self.state in FINAL

    @property
    def steps(self) -> int:
        return self.rec["steps"]

    def status(self) -> dict:
        self.refresh()
        return {k: self.rec.get(k) for k in ("id", "state", "step", "steps", "queue_position", "eta_s", "error")}

    def watch(self, notify) -> None:
        """wait_change's hook: no one pushes a remote job's changes, so wake it to poll."""
        t = threading.Timer(POLL_S, notify)
        self.timers[notify] = t
        t.start()

    def unwatch(self, notify) -> None:
        t = self.timers.pop(notify, None)
        if t is not None:
            t.cancel()


class SharedScheduler(Scheduler):
    """A replica's scheduler: its own jobs as always; ids it does not hold are looked up in the
    registry (status, result, cancel), and force_task_id is unique over all replicas."""

    def __init__(self, *args, registry=None, replica: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.registry, self.replica = registry, replica
        self.dirty: set = set()
        self.dirty_lock = threading.Lock()

    def submit(self, spec, job_id: str | None = None):
        if job_id is not None and not ray.get(self.registry.claim.remote(job_id), timeout=STALE_S):
            raise ApiError(409, f"a job with id {job_id!r} exists already: give a new task id", "force_task_id")
        job = super().submit(spec, job_id)
        job.watch(lambda: self.mark(job))
        self.mark(job)
        return job

    def mark(self, job) -> None:
        with self.dirty_lock:
            self.dirty.add(job)

    def get(self, job_id: str):
        try:
            return super().get(job_id)
        except ApiError as e:
            rec = ray.get(self.registry.get.remote(job_id), timeout=STALE_S)
            if rec is None or rec["owner"] == self.replica:
                raise e from None
            return RemoteJob(self.registry, rec)

    def status(self, job) -> dict:
        return job.status() if isinstance(job, RemoteJob) else super().status(job)

    def cancel(self, job, reason: str = "cancelled by the client", label: str = "client"):
        if not isinstance(job, RemoteJob):
            return super().cancel(job, reason, label)
        rec = ray.get(self.registry.cancel.remote(job.id), timeout=STALE_S)
        if rec is not None:
            job.update(rec)
        return job

    def records(self) -> list[dict]:
        """The changed jobs since the last call, as registry records (images once succeeded)."""
        with self.dirty_lock:
            jobs, self.dirty = list(self.dirty), set()
        out = []
        for job in jobs:
            with self.cond:
                rec = {**super().status(job), "error_status": job.error_status, "seeds": list(job.spec.seeds),
                       "info": dict(job.info), "created_unix": job.created_unix,
                       "images": list(job.images) if job.state == "succeeded" and job.images else None}
            out.append(rec)
        return out

    def sync(self) -> None:
        """One round with the registry: publish changes, take the cancels left for this replica."""
        records = self.records()
        if records:
            self.registry.put.remote(self.replica, records)       # ordered before the next call
        for job_id in ray.get(self.registry.take_cancels.remote(self.replica), timeout=STALE_S):
            try:
                self.cancel(Scheduler.get(self, job_id))
            except ApiError:
                pass


class SharedMetrics(Metrics):
    """/metrics: this replica's metrics and every other live replica's, labelled replica="ID"."""

    def __init__(self, registry, replica: str):
        super().__init__()
        self.jobs_registry, self.replica = registry, replica     # (self.registry: the Prometheus one)

    def render(self) -> bytes:
        texts = ray.get(self.jobs_registry.exchange_metrics.remote(self.replica, super().render()), timeout=STALE_S)
        return merge_metrics(texts)

    def publish(self, queue_depth: int) -> None:
        """This replica's metrics to the registry (each replica's /metrics shows them all)."""
        self.queue_depth.set(queue_depth)
        self.jobs_registry.exchange_metrics.remote(self.replica, super().render())


def merge_metrics(texts: dict[str, bytes]) -> bytes:
    """Prometheus text of several replicas as one exposition: each family once, every sample with
    its replica's label."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)

    class Merged:
        def collect(self):
            return list(families.values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


class ReplicaHeader:
    """ASGI layer: every answer says which replica gave it (x-sdrt-replica)."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)
        await self.app(scope, receive, send_tagged)


# ---- the deployment -------------------------------------------------------------------------

@serve.ingress()
class SdrtReplica:
    """One replica: the server of `sdrt serve` (server.build) with its engine worker, the
    engine loaded once here, before the replica takes requests."""

    def __init__(self, work_dir: str, options: dict):
        from sdrt.serve.server import build
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id
        registry = open_registry(ctx.app_name)
        scheduler_type = lambda *a, **kw: SharedScheduler(*a, registry=registry, replica=self.replica, **kw)  # noqa: E731
        app, self.server = build(Path(work_dir), **options, scheduler_type=scheduler_type,
                                 metrics=SharedMetrics(registry, self.replica))
        self.asgi = ReplicaHeader(app, self.replica)
        self.server.worker.start()
        while not self.server.worker.ready.wait(0.1):
            if self.server.worker.load_error:
                raise RuntimeError(f"the engine did not start: {self.server.worker.load_error}")
        self.stopping = threading.Event()
        threading.Thread(target=self.sync_loop, name="sdrt-registry", daemon=True).start()

    def __serve_build_asgi_app__(self):
        return self.asgi

    def sync_loop(self) -> None:
        rounds = 0
        while not self.stopping.wait(SYNC_S):
            rounds += 1
            try:
                self.server.scheduler.sync()
                if rounds % METRICS_ROUNDS == 0:
                    self.server.metrics.publish(self.server.scheduler.depth())
            except Exception:    # noqa: BLE001 (the registry restarting: the next round retries)
                time.sleep(SYNC_S)

    def replica_info(self) -> dict:
        """Where this replica runs (through a DeploymentHandle: operators, tests)."""
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "backend": self.server.worker.backend_name}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine worker died is replaced."""
        if self.server.worker.load_error or not self.server.worker.is_alive():
            raise RuntimeError("the engine worker stopped")

    async def __del__(self):
        """Ray Serve stopping the replica: queued jobs are cancelled (503), the worker stops."""
        stopping = getattr(self, "stopping", None)
        if stopping is not None:
            self.server.scheduler.drain()
            self.server.scheduler.stop()
            stopping.set()
        await super().__del__()        # the ASGI wrapper's lifespan shutdown


# ---- building the application ---------------------------------------------------------------

def parse_autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = str(text).partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or int(hi) < max(1, int(lo)):
        raise UserError(f"--autoscale {text}: give MIN:MAX replicas, e.g. 1:4 (MAX at least 1 and MIN)")
    return int(lo), int(hi)


def deployment_options(replicas: int | None = None, autoscale: str | None = None, num_cpus: float = 1,
                       num_gpus: float | None = None, max_batch: int = 4,
                       target_ongoing: float | None = None) -> dict:
    """Ray Serve options: a fixed number of replicas or Ray Serve's autoscaler on ongoing requests
    per replica (bounded by MIN:MAX; MIN 0 only when asked: an engine's cold start is seconds to
    minutes); num_cpus and num_gpus per replica."""
    opts = {"ray_actor_options": {"num_cpus": float(num_cpus), "num_gpus": float(num_gpus or 0)},
            # a replica takes more requests than one batch (its own queue batches them); event
            # streams and polls count too
            "max_ongoing_requests": max(16, 4 * max_batch),
            "health_check_period_s": 2, "health_check_timeout_s": 30, "graceful_shutdown_timeout_s": 30}
    if replicas is not None and autoscale is not None:
        raise UserError("give --replicas N or --autoscale MIN:MAX, not both")
    if autoscale is not None:
        lo, hi = parse_autoscale(autoscale)
        opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                      "target_ongoing_requests": target_ongoing or max_batch,
                                      "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        if replicas is not None and int(replicas) < 1:
            raise UserError(f"--replicas {replicas}: give at least 1")
        opts["num_replicas"] = int(replicas or 1)
    return opts


def default_gpus() -> float:
    """One GPU per replica when the Ray cluster has GPUs (a CPU-only cluster: none)."""
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(args: dict | None = None):
    """Ray Serve application builder. args (strings from `serve run ... key=value` or a config
    file's `args`): work_dir (default $SDRT_WORK_DIR, else the demo model's export in
    ./sdrt-demo), replicas | autoscale ("MIN:MAX"), num_cpus, num_gpus, target_ongoing_requests,
    and the server's options (backend, max_batch, max_queue, timeout, api_key, batching, lora_dir,
    embedding_dir, max_body_mb)."""
    args = dict(args or {})
    work_dir = args.pop("work_dir", None) or os.environ.get("SDRT_WORK_DIR")
    if work_dir is None:
        from sdrt.demo import demo_export
        work_dir = demo_export(Path("sdrt-demo"))
    work_dir = Path(work_dir).resolve()
    if not work_dir.is_dir():
        raise UserError(f"work_dir {work_dir} is not a folder: give an export made by `sdrt export`")
    options = server_options({k: args.pop(k) for k in SERVER_OPTIONS if k in args})
    num = {k: args.pop(k) for k in ("num_cpus", "num_gpus", "target_ongoing_requests") if k in args}
    replicas, autoscale = args.pop("replicas", None), args.pop("autoscale", None)
    if args:
        raise UserError(f"unknown option(s) {', '.join(sorted(args))}: the builder takes work_dir, replicas, "
                        f"autoscale, num_cpus, num_gpus, target_ongoing_requests, {', '.join(SERVER_OPTIONS)}")
    num_gpus = float(num["num_gpus"]) if "num_gpus" in num else default_gpus()
    opts = deployment_options(replicas, autoscale, float(num.get("num_cpus", 1)), num_gpus,
                              options.get("max_batch", 4), num.get("target_ongoing_requests"))
    return serve.deployment(SdrtReplica, name=DEPLOYMENT, **opts).bind(str(work_dir), options)


def server_options(raw: dict) -> dict:
    """The server's options typed (a builder's args arrive as strings)."""
    types = {"max_batch": int, "max_queue": int, "timeout": float, "max_body_mb": float}
    out = {}
    for k, v in raw.items():
        if v is None:
            continue
        try:
            out[k] = types[k](v) if k in types else (str(v) if k not in ("lora_dir", "embedding_dir") else Path(v))
        except ValueError:
            raise UserError(f"{k}={v}: give a number") from None
    return out


def run(work_dir: Path | None, host: str, port: int, replicas: int | None = None, autoscale: str | None = None,
        ray_address: str | None = None, num_cpus: float = 1, num_gpus: float | None = None, **options) -> int:
    """`sdrt serve --ray`: connect to Ray (ray_address) or start a local instance, deploy the
    application on Ray Serve's HTTP proxy at host:port, serve until SIGINT/SIGTERM, then delete
    the application (and stop the local instance)."""
    import signal
    import sys
    args = {"work_dir": work_dir, "replicas": replicas, "autoscale": autoscale, "num_cpus": num_cpus,
            **({"num_gpus": num_gpus} if num_gpus is not None else {}), **options}
    deployment_options(replicas, autoscale)         # bad counts: one line before Ray starts
    if work_dir is not None and not Path(work_dir).is_dir():
        raise UserError(f"{work_dir} is not a folder: give an export made by `sdrt export`")
    local = ray_address is None
    try:
        ray.init(address=ray_address, log_to_driver=False, include_dashboard=False if local else None)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"--ray-address {ray_address}: cannot connect to Ray ({str(e).splitlines()[0]}): "
                        f"give a running cluster's address (`ray start --head` prints it)") from None
    stop = threading.Event()
    try:
        app = build_app({k: v for k, v in args.items() if v is not None})
        serve.start(http_options={"host": host, "port": port})
        t0 = time.perf_counter()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError as e:
            raise UserError(f"the replicas did not start: {str(e).splitlines()[0]} (see the replica logs "
                            f"under Ray's session folder, logs/serve/)") from None
        scale = f"autoscale {autoscale}" if autoscale else f"{replicas or 1} replica(s)"
        print(f"sdrt serve: {work_dir or 'the demo model'} on Ray Serve at http://{host}:{port} ({scale}, ready in "
              f"{time.perf_counter() - t0:.1f} s); docs at /docs", file=sys.stderr, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
        print("sdrt serve: stopping the replicas", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        try:                              # the job registry (detached: it outlives the replicas)
            ray.kill(ray.get_actor(registry_name(APP_NAME), namespace=NAMESPACE))
        except ValueError:
            pass
    finally:
        if local:
            serve.shutdown()
        ray.shutdown()
    return 0


def __getattr__(name: str):
    """`sdrt.serve.ray_app:app`: the application of $SDRT_WORK_DIR (else the demo model), built
    when Ray Serve imports it."""
    if name == "app":
        return build_app({})
    raise AttributeError(name)
