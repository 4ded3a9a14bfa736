"""Scale-out on Ray Serve: throughput and p50/p95 latency of one bounded load (N OpenAI image
requests, C at a time, each its own seed) against plain `sdrt serve`, Ray Serve with 1 replica and
Ray Serve with 2 replicas; the cold start of a replica (deploy to ready, engine loaded and warm).

Every engine gets one CPU core: once up, the plain server's threads are pinned to core 0 and each
Ray replica's threads to a core of its own (0, 1), so 1 vs 2 replicas compares one core against
two. Ray's HTTP proxy is a process of its own and is not pinned (the plain server answers HTTP on
its engine's core). Servers listen on 127.0.0.1; the plain server is stopped by its process group,
Ray by serve.shutdown / ray.shutdown.

    sdrt bench-ray [WORK_DIR] [--requests 32] [--concurrency 4] [--steps 25] [--max-batch 4] [--out DIR]"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path("sdrt-results")   # under the current folder, as the other benchmarks
START_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, requests: int, concurrency: int, steps: int, bound_s: float = 600) -> dict:
    """`requests` POST /v1/images/generations, `concurrency` at a time; every one must succeed."""
    import httpx
    latencies, errors, lock = [], [], threading.Lock()
    todo = iter(range(requests))
    deadline = time.monotonic() + bound_s

    def client():
        with httpx.Client(base_url=url, timeout=bound_s) as http:
            for i in todo:
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                r = http.post("/v1/images/generations", json={"prompt": "a large red circle on a white background",
                                                              "seed": 1000 + i, "steps": steps,
                                                              "response_format": "b64_json"})
                with lock:
                    (latencies if r.status_code == 200 else errors).append(
                        time.perf_counter() - t0 if r.status_code == 200 else r.status_code)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(bound_s)
    wall = time.perf_counter() - t0
    if errors or len(latencies) != requests:
        raise SystemExit(f"the load did not complete: {len(latencies)}/{requests} ok, errors {errors[:5]}")
    lat = np.array(latencies)
    return {"requests": requests, "concurrency": concurrency, "steps": steps, "wall_s": round(wall, 3),
            "images_per_s": round(requests / wall, 3), "p50_s": round(float(np.percentile(lat, 50)), 3),
            "p95_s": round(float(np.percentile(lat, 95)), 3)}


def wait_ready(url: str, bound: float = START_S) -> None:
    import httpx
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {bound} s")


def plain(work_dir: Path, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", str(work_dir),
                             "--port", str(port), "--max-batch", str(args.max_batch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "SDRT_API_KEY": ""})
    try:
        t0 = time.perf_counter()
        wait_ready(url)
        ready_s = time.perf_counter() - t0
        pin(proc.pid, 0)
        load(url, 2 * args.concurrency, args.concurrency, args.steps)          # warm
        row = {"config": "sdrt serve", "engines": 1, "start_s": round(ready_s, 2),
               **load(url, args.requests, args.concurrency, args.steps)}
        return {**row, "engine_cores": [cores_of(proc.pid)]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def pin(pid: int, core: int) -> None:
    """Every thread of process pid onto one core."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass


def cores_of(pid: int) -> list[int]:
    """The cores the threads of process pid may run on (after the load: threads made since count)."""
    cores = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cores |= os.sched_getaffinity(int(tid))
        except OSError:
            pass
    return sorted(cores)


def on_ray(work_dir: Path, args) -> list[dict]:
    import ray
    from ray import serve

    from sdrt.serve import ray_app
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            app = ray_app.build_app({"work_dir": str(work_dir), "replicas": replicas, "num_cpus": 1, "num_gpus": 0,
                                     "max_batch": args.max_batch})
            t0 = time.perf_counter()
            serve.run(app, name=ray_app.APP_NAME, route_prefix="/")
            deploy_s = time.perf_counter() - t0          # 1: a cold replica; 2: one more replica beside it
            handle = serve.get_app_handle(ray_app.APP_NAME)
            seen = {}
            deadline = time.monotonic() + START_S
            while len(seen) < replicas and time.monotonic() < deadline:
                info = handle.replica_info.remote().result(timeout_s=30)
                seen[info["replica"]] = info["pid"]
            for core, pid in enumerate(sorted(seen.values())):
                pin(pid, core)
            load(url, 2 * args.concurrency, args.concurrency, args.steps)          # warm
            row = {"config": f"Ray Serve, {replicas} replica{'s' if replicas > 1 else ''}", "engines": replicas,
                   "start_s": round(deploy_s, 2), **load(url, args.requests, args.concurrency, args.steps)}
            out.append({**row, "engine_cores": [cores_of(pid) for pid in sorted(seen.values())]})
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["config"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(names, [r["images_per_s"] for r in rows], color=["#888", "#4a7", "#27a"])
    a.set_ylabel("images / s")
    a.set_title("throughput")
    b.bar(names, [r["p95_s"] for r in rows], color=["#888", "#4a7", "#27a"], label="p95")
    b.plot(names, [r["p50_s"] for r in rows], "ko", label="p50")
    b.set_ylabel("seconds")
    b.set_title("request latency")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
    r = rows[0]
    fig.suptitle(f"{r['requests']} requests, {r['concurrency']} at a time, {r['steps']} steps; one core per engine; "
                 f"{device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class Load:
    def __init__(self, requests: int, concurrency: int, steps: int, max_batch: int, out: Path):
        self.requests, self.concurrency, self.steps, self.max_batch, self.out = (requests, concurrency, steps,
                                                                                  max_batch, Path(out))


def main(work_dir: Path | None = None, requests: int = 32, concurrency: int = 4, steps: int = 25,
         max_batch: int = 4, out: Path | None = None) -> None:
    args = Load(requests, concurrency, steps, max_batch, out or RESULTS)
    if work_dir is None:
        from sdrt.demo import demo_export
        work_dir = demo_export(Path("sdrt-demo"))
    device = f"{os.cpu_count()} CPU cores ({platform.machine()}), ONNX Runtime CPU"
    load_avg = os.getloadavg()[0]
    rows = [plain(Path(work_dir), args), *on_ray(Path(work_dir), args)]
    base, ray1 = rows[0], rows[1]
    summary = {"device": device, "model": Path(work_dir).name, "load_average_1min_before": round(load_avg, 2),
               "rows": rows,
               "scaling_2_vs_1_replica": round(rows[2]["images_per_s"] / ray1["images_per_s"], 3),
               "ray_overhead_1_replica": {"throughput_ratio": round(ray1["images_per_s"] / base["images_per_s"], 3),
                                          "p50_added_s": round(ray1["p50_s"] - base["p50_s"], 3)},
               "cold_start_s": {"sdrt serve (process start to /ready)": base["start_s"],
                                "Ray Serve replica (deploy to ready)": ray1["start_s"],
                                "Ray Serve, one more replica (1 -> 2)": rows[2]["start_s"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "serve-ray-cpu-2-cores"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, stem.with_suffix(".png"), device)
    print(json.dumps(summary, indent=2))

