"""Load on `sdrt serve` over loopback, for each batching policy.

    sdrt bench-serve [WORK_DIR] [--url URL] [--batching none,request,step] [--rates 0.5,1,2]
                     [--concurrency 1,4,16] [--requests N] [--point-timeout S] [--steps S] [--size PX]
                     [--max-batch B] [--max-queue Q] [--api-key KEY] [--out DIR]

For each policy the benchmark starts `sdrt serve WORK_DIR --batching POLICY` on 127.0.0.1 at a free
port in its own process group (a policy the server refuses is skipped, with its reason), sends
one warm-up request, then
  open loop    Poisson arrivals at each rate (requests/s): a request is sent at its arrival time
               whether or not the earlier ones are done, as independent users would;
  closed loop  C clients, each sending its next request when its last one is done (after a 429,
               when its Retry-After has passed, at most 5 s);
and stops the server (SIGTERM to its group). --url targets a running server instead (one policy,
whatever it serves). Every load point is bounded: at most N requests, sent within S seconds, and
each request waits at most S seconds for its job.

Each request is a job: POST /v1/jobs (202, or 429 when the queue is full: a rejection), its
progress events until `done`, then its result. Nothing is lost: each accepted job ends as
ok (its n PNG images came back), failed or cancelled (the server's error, counted), or unfinished
(still not done at the time bound: cancelled by the benchmark and counted). Per point: throughput,
latency p50/p95/p99 (submit to images received), queue wait (the server's submit-to-start from each
result's info, else submit to the first `running` event), mean batch occupancy (images per engine
batch, from the server's /metrics), the outcome counts and each request's record. Results:
OUT/serve-load-<model>-<device>.json, .md and .png.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.demo import PROMPTS as DEMO_PROMPTS
from sdrt.errors import UserError
from sdrt.fileio import write_atomic, write_json_atomic

POLICIES = ("none", "request", "step")
PROMPTS = DEMO_PROMPTS[:6]   # captions of the demo model's world (any model takes them)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TERMINAL = ("succeeded", "failed", "cancelled")
READY_TIMEOUT_S = 300


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- HTTP, one request = one job


@dataclass
class Client:
    base: str
    key: str | None = None

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        """(status, parsed body or text, headers) of one request."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, parse(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, parse(e.read()), dict(e.headers)

    def events(self, job_id: str, deadline: float):
        """Yields (event, status dict) from GET /v1/jobs/ID/events until the stream ends or the
        deadline (perf_counter seconds) passes; keep-alive comments count against it too."""
        timeout = max(1.0, deadline - time.perf_counter())
        headers = {"Accept": "text/event-stream"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(f"{self.base}/v1/jobs/{job_id}/events", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            event, data = "message", []
            for raw in r:
                if time.perf_counter() > deadline:
                    return
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    event, data = "message", []


def parse(raw: bytes):
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")[:300]


def error_line(body) -> str:
    if isinstance(body, dict):
        for k in ("detail", "error", "message"):
            if body.get(k):
                v = body[k]
                return v if isinstance(v, str) else json.dumps(v)[:300]
    return str(body)[:300]


def wait_job(client: Client, job_id: str, deadline: float, rec: dict) -> dict | None:
    """Follow the job's events (polling its status if the stream breaks) until it is done or the
    deadline passes; notes when it first ran. Returns the final status, or None at the deadline."""
    def seen(status):
        if status.get("state") == "running" and "t_running" not in rec:
            rec["t_running"] = time.perf_counter()
        return status.get("state") in TERMINAL
    try:
        for event, status in client.events(job_id, deadline):
            if seen(status) or event == "done":
                return status
    except (OSError, ValueError):
        pass                     # stream broke or timed out: poll what is left of the time
    while time.perf_counter() < deadline:
        code, status, _ = client.call("GET", f"/v1/jobs/{job_id}")
        if code == 200 and seen(status):
            return status
        time.sleep(0.1)
    return None


def one_request(client: Client, payload: dict, timeout: float) -> dict:
    """Submit one job and see it through; the record says how it ended and when."""
    rec = {"t_submit": time.perf_counter(), "n": payload.get("n", 1)}
    deadline = rec["t_submit"] + timeout
    try:
        code, body, headers = client.call("POST", "/v1/jobs", payload)
    except OSError as e:
        return {**rec, "outcome": "error", "error": f"submit: {e}"}
    if code == 429:
        return {**rec, "outcome": "rejected", "retry_after": headers.get("Retry-After")}
    if code != 202:
        return {**rec, "outcome": "error", "status": code, "error": error_line(body)}
    if not isinstance(body, dict) or not body.get("id"):
        return {**rec, "outcome": "error", "status": code, "error": f"202 without a job id: {str(body)[:200]}"}
    rec["accepted"], rec["id"] = True, body["id"]
    try:
        return see_through(client, rec, deadline, timeout)
    except (OSError, ValueError) as e:          # the connection or the server went away: counted
        try:
            client.call("DELETE", f"/v1/jobs/{rec['id']}", timeout=5)
        except (OSError, ValueError):
            pass
        return {**rec, "outcome": "unfinished", "error": f"lost contact: {e}"}


def is_png(b64) -> bool:
    try:
        return base64.b64decode(b64, validate=True)[:8] == PNG_MAGIC
    except (TypeError, ValueError):
        return False


def see_through(client: Client, rec: dict, deadline: float, timeout: float) -> dict:
    """An accepted job: wait for it, fetch and check its images."""
    job_id = rec["id"]
    final = wait_job(client, job_id, deadline, rec)
    if final is None:
        client.call("DELETE", f"/v1/jobs/{job_id}")    # free its slot: the next point starts clean
        return {**rec, "outcome": "unfinished", "error": f"not done in {timeout:g} s"}
    if final["state"] != "succeeded":
        return {**rec, "outcome": final["state"], "error": final.get("error")}
    code, result, _ = client.call("GET", f"/v1/jobs/{job_id}/result")
    rec["t_done"] = time.perf_counter()
    if code != 200 or not isinstance(result, dict):
        return {**rec, "outcome": "failed", "error": f"result: HTTP {code} {error_line(result)}"}
    images = result.get("images") or []
    good = [b for b in images if is_png(b)]
    if len(good) != rec["n"]:
        return {**rec, "outcome": "failed", "error": f"{len(good)} PNG images of {rec['n']} asked"}
    info = result.get("info") or {}
    return {**rec, "outcome": "ok", "batch_images": info.get("batch_images"),
            "server_queue_wait_s": info.get("queue_wait_s")}


# ---------------------------------------------------------------- load generators (bounded)


def payloads(steps: int, size: int | None, start: int = 0):
    """The i-th request: the demo prompts in turn, seed i."""
    def make(i: int) -> dict:
        p = {"prompt": PROMPTS[(start + i) % len(PROMPTS)], "steps": steps, "n": 1, "seed": start + i}
        if size:
            p["width"] = p["height"] = size
        return p
    return make


def open_loop(client: Client, rate: float, count: int, window_s: float, timeout: float, make, seed: int = 0):
    """Poisson arrivals at `rate`/s: at most `count` requests, none sent after `window_s`; each
    waits at most `timeout` for its job. Returns the records in arrival order."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    arrivals = [t for t in np.cumsum(gaps) if t <= window_s] or [0.0]
    records = [None] * len(arrivals)
    t0 = time.perf_counter()

    def send(i: int):
        records[i] = one_request(client, make(i), timeout)

    threads = []
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        th = threading.Thread(target=send, args=(i,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout=max(0.0, t0 + window_s + timeout + 30 - time.perf_counter()))
    return [r or {"outcome": "unfinished", "error": "client thread did not return"} for r in records]


def closed_loop(client: Client, concurrency: int, count: int, window_s: float, timeout: float, make):
    """`concurrency` clients back to back: at most `count` requests in all, none sent after `window_s`."""
    records, lock, t0 = [], threading.Lock(), time.perf_counter()
    issued = [0]

    def worker():
        while True:
            with lock:
                if issued[0] >= count or time.perf_counter() - t0 > window_s:
                    return
                i = issued[0]
                issued[0] += 1
            rec = one_request(client, make(i), timeout)
            with lock:
                records.append(rec)
            if rec["outcome"] == "rejected":        # a polite client waits as told (at most 5 s)
                time.sleep(min(retry_seconds(rec.get("retry_after")), 5.0,
                               max(0.0, t0 + window_s - time.perf_counter())))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(0.0, t0 + window_s + timeout + 30 - time.perf_counter()))
    with lock:
        missing = issued[0] - len(records)
        return records + [{"outcome": "unfinished", "error": "client thread did not return"}] * missing


def retry_seconds(value) -> float:
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 1.0


# ---------------------------------------------------------------- metrics and summaries


def read_metrics(client: Client) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; {} when the server has no /metrics."""
    try:
        headers = {"Authorization": f"Bearer {client.key}"} if client.key else {}
        with urllib.request.urlopen(urllib.request.Request(client.base + "/metrics", headers=headers),
                                    timeout=10) as r:
            text = r.read().decode()
    except (OSError, ValueError):
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                pass
    return out


def mean_occupancy(before: dict, after: dict) -> float | None:
    """Images per engine batch over the point, from the server's /metrics: a per-step batch-size
    histogram (*batch_size*_sum / _count) when the server has one, else images generated over
    engine calls (sdrt_images_total / sdrt_engine_calls_total); None without metrics."""
    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)
    for key in after:
        if key.endswith("_sum") and "batch_size" in key and key[:-4] + "_count" in after:
            count = delta(key[:-4] + "_count")
            if count > 0:
                return delta(key) / count
    calls = delta("sdrt_engine_calls_total")
    return delta("sdrt_images_total") / calls if calls > 0 else None


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[dict]) -> dict:
    """Outcome counts and the timing figures of the ok requests; `lost` must be 0."""
    counts = {k: sum(r["outcome"] == k for r in records)
              for k in ("ok", "failed", "cancelled", "unfinished", "rejected", "error")}
    accepted = sum(bool(r.get("accepted")) for r in records)
    ok = [r for r in records if r["outcome"] == "ok"]
    latency = [r["t_done"] - r["t_submit"] for r in ok]
    # queue wait: the server's own figure (submit to start) when every job has it, else the client's
    # (submit to the first `running` event)
    by_server = bool(ok) and all(r.get("server_queue_wait_s") is not None for r in ok)
    wait = ([r["server_queue_wait_s"] for r in ok] if by_server
            else [r["t_running"] - r["t_submit"] for r in ok if "t_running" in r])
    times = [r["t_submit"] for r in records if "t_submit" in r] + [r["t_done"] for r in ok]
    span = (max(times) - min(times)) if len(times) > 1 else 0.0
    images = sum(r["n"] for r in ok)
    return {
        "sent": len(records), "accepted": accepted, **counts,
        "lost": accepted - counts["ok"] - counts["failed"] - counts["cancelled"] - counts["unfinished"],
        "images": images, "wall_s": span,
        "images_per_s": images / span if span > 0 else None,
        "latency_s": {f"p{q}": pct(latency, q) for q in (50, 95, 99)},
        "queue_wait_s": {"mean": float(np.mean(wait)) if wait else None, "p50": pct(wait, 50), "p95": pct(wait, 95),
                         "source": "server" if by_server else "client"},
        "errors": sorted({str(r.get("error")) for r in records if r["outcome"] not in ("ok", "rejected")})[:5],
    }


def compact(records: list[dict]) -> list[dict]:
    """Each request as the JSON keeps it: sent at (s from the point's first), outcome, latency,
    queue wait, the batch it ran in, its error."""
    t0 = min((r["t_submit"] for r in records if "t_submit" in r), default=0.0)
    out = []
    for r in records:
        row = {"sent_s": r.get("t_submit", t0) - t0, "outcome": r["outcome"]}
        if "t_done" in r:
            row["latency_s"] = r["t_done"] - r["t_submit"]
        if r.get("server_queue_wait_s") is not None:
            row["queue_wait_s"] = float(r["server_queue_wait_s"])
        elif "t_running" in r:
            row["queue_wait_s"] = r["t_running"] - r["t_submit"]
        if r.get("batch_images") is not None:
            row["batch_images"] = r["batch_images"]
        if r.get("error"):
            row["error"] = str(r["error"])
        out.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return sorted(out, key=lambda row: row["sent_s"])


def run_point(client: Client, kind: str, level: float, count: int, window_s: float, timeout: float, make) -> dict:
    before = read_metrics(client)
    if kind == "open":
        records = open_loop(client, level, count, window_s, timeout, make)
    else:
        records = closed_loop(client, int(level), count, window_s, timeout, make)
    point = {"load": kind, "level": level, **summarize(records),
             "mean_batch_occupancy": mean_occupancy(before, read_metrics(client))}
    seen = [r["batch_images"] for r in records if r.get("batch_images") is not None]
    point["mean_batch_per_job"] = float(np.mean(seen)) if seen else None   # the batch each ok job ran in
    point["requests"] = compact(records)
    lat = point["latency_s"]
    say(f"[bench-serve]   {kind} {'rate' if kind == 'open' else 'concurrency'} {level:g}: "
        f"{point['ok']}/{point['sent']} ok, {point['rejected']} rejected, {point['failed'] + point['error']} failed, "
        f"{point['unfinished']} unfinished; {fmt(point['images_per_s'])} img/s, p50 {fmt(lat['p50'])} s, "
        f"p95 {fmt(lat['p95'])} s, occupancy {fmt(point['mean_batch_occupancy'])}")
    return point


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


# ---------------------------------------------------------------- the server's lifetime


def parse_list(text: str, what: str, kind=float) -> list:
    """'0.5,1,2' -> [0.5, 1.0, 2.0]; one line naming the option when it is not a list of positive numbers."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UserError(f"--{what} {text!r}: give comma-separated positive numbers, e.g. "
                        f"{'0.5,1,2' if kind is float else '1,4,16'}")
    return values


def parse_policies(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in POLICIES]
    if not names or bad:
        raise UserError(f"--batching {text!r}: choose from {', '.join(POLICIES)} (comma-separated)")
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work_dir: Path, policy: str, max_batch: int, max_queue: int, key: str | None, log: Path):
    """`sdrt serve` in its own process group; returns (process, client) once /ready answers, or
    (None, reason) when the server refused to start."""
    port = free_port()
    cmd = [sys.executable, "-m", "sdrt.cli", "serve", str(work_dir), "--host", "127.0.0.1", "--port", str(port),
           "--batching", policy, "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    if key:
        cmd += ["--api-key", key]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = Client(f"http://127.0.0.1:{port}", key)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines()
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            return None, reason.removeprefix("sdrt serve: error: ")
        try:
            if client.call("GET", "/ready", timeout=5)[0] == 200:
                return proc, client
        except OSError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise UserError(f"sdrt serve --batching {policy} was not ready in {READY_TIMEOUT_S} s: "
                    f"{log.read_text(errors='replace').strip()[-300:]}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it drains its jobs), SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ---------------------------------------------------------------- one policy, all points


@dataclass
class Load:
    rates: list[float]
    concurrency: list[int]
    requests: int = 24
    window_s: float = 60.0
    timeout_s: float = 120.0
    steps: int = 10
    size: int | None = None


def bench_policy(client: Client, load: Load) -> list[dict]:
    warm = one_request(client, payloads(load.steps, load.size, start=1000)(0), load.timeout_s)
    if warm["outcome"] != "ok":
        raise UserError(f"the warm-up request did not succeed ({warm['outcome']}: {warm.get('error')})")
    points = []
    for i, rate in enumerate(load.rates):
        make = payloads(load.steps, load.size, start=100 * i)
        points.append(run_point(client, "open", rate, load.requests, load.window_s, load.timeout_s, make))
    for c in load.concurrency:
        make = payloads(load.steps, load.size, start=10 * c)
        points.append(run_point(client, "closed", c, load.requests, load.window_s, load.timeout_s, make))
    return points


def server_info(client: Client) -> dict:
    code, info, _ = client.call("GET", "/v1/info")
    return info if code == 200 and isinstance(info, dict) else {}


def device_label(info: dict) -> str:
    backend = str(info.get("backend", ""))
    if info.get("device"):
        return str(info["device"])
    if backend in ("", "onnxruntime-cpu"):
        return f"{os.cpu_count()} CPU cores, ONNX Runtime CPU"
    return backend


def bench_serve(work_dir: Path | None = None, url: str | None = None, policies=POLICIES, load: Load | None = None,
                max_batch: int = 4, max_queue: int = 16, api_key: str | None = None,
                out: Path = Path("sdrt-results")) -> Path:
    """Run every policy's points; writes OUT/serve-load-<model>-<device>.json/.md/.png; returns the JSON path."""
    load = load or Load(rates=[0.5, 1.0, 2.0], concurrency=[1, 4, 16])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, info = [], {}
    if url:
        client = Client(url.rstrip("/"), api_key)
        info = server_info(client)
        policy = str(info.get("batching", "as served"))
        say(f"[bench-serve] {url} (batching {policy})")
        runs.append({"batching": policy, "points": bench_policy(client, load)})
    else:
        if work_dir is None:
            from sdrt.demo import demo_export
            work_dir = demo_export()
        for policy in policies:
            with tempfile.TemporaryDirectory(prefix="sdrt-bench-serve-") as tmp:
                log = Path(tmp) / "serve.log"
                proc, client = start_server(Path(work_dir), policy, max_batch, max_queue, api_key, log)
                if proc is None:
                    say(f"[bench-serve] --batching {policy}: skipped, the server refused it: {client}")
                    runs.append({"batching": policy, "skipped": client})
                    continue
                try:
                    info = info or server_info(client)
                    say(f"[bench-serve] --batching {policy} on {client.base}")
                    runs.append({"batching": policy, "points": bench_policy(client, load)})
                except BaseException:
                    say(f"[bench-serve] the server's log ends with:\n{log.read_text(errors='replace')[-2000:]}")
                    raise
                finally:
                    stop_server(proc)
    result = {
        "device": device_label(info), "model": info.get("model"), "backend": info.get("backend"),
        "max_batch": max_batch if not url else info.get("max_batch"), "max_queue": max_queue if not url else None,
        "steps": load.steps, "size": load.size or default_size(info), "requests_per_point": load.requests,
        "window_s": load.window_s, "timeout_s": load.timeout_s, "runs": runs,
    }
    stem = out / f"serve-load-{slug(str(result['model'] or 'model'))}-{slug(result['device'])}"
    write_json_atomic(stem.with_suffix(".json"), result)
    write_atomic(stem.with_suffix(".md"), table(result) + "\n")
    plot(result, stem.with_suffix(".png"))
    lost = sum(p["lost"] for r in runs for p in r.get("points", []))
    say(f"[bench-serve] wrote {stem}.json/.md/.png; lost requests: {lost}")
    return stem.with_suffix(".json")


def default_size(info: dict):
    d = info.get("defaults") or {}
    return d.get("width") or info.get("width")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def table(result: dict) -> str:
    lines = [f"# sdrt serve under load: {result['model']}, {result['device']}", "",
             f"{result['steps']} steps, {result['size']} px, n=1, max batch {result['max_batch']}, "
             f"max queue {result['max_queue']}; at most {result['requests_per_point']} requests per point "
             f"within {result['window_s']:g} s.", "",
             "| batching | load | level | ok/sent | rejected | failed | unfinished | lost | img/s | p50 s | p95 s "
             "| p99 s | queue wait s (mean) | batch occupancy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        if "skipped" in run:
            lines.append(f"| {run['batching']} | skipped: {run['skipped']} |" + " |" * 12)
            continue
        for p in run["points"]:
            lat = p["latency_s"]
            level = f"{p['level']:g}/s" if p["load"] == "open" else f"{p['level']:g} client" + "s" * (p["level"] != 1)
            lines.append(f"| {run['batching']} | {p['load']} | {level} | {p['ok']}/{p['sent']} | {p['rejected']} | "
                         f"{p['failed'] + p['error'] + p['cancelled']} | {p['unfinished']} | {p['lost']} | "
                         f"{fmt(p['images_per_s'])} | {fmt(lat['p50'])} | {fmt(lat['p95'])} | {fmt(lat['p99'])} | "
                         f"{fmt(p['queue_wait_s']['mean'])} | {fmt(p['mean_batch_occupancy'])} |")
    return "\n".join(lines)


def versions() -> dict:
    import platform
    import sdrt
    out = {"sdrt": sdrt.__version__, "python": platform.python_version()}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def plot(result: dict, path: Path) -> None:
    """Four panels, one line per policy: images/s and p95 latency (whisker p50 to p99) against the
    open loop's offered rate and the closed loop's clients."""
    from sdrt.benchmarks import plots
    fig, axes = plots.figure(panels=4, width=4.2, height=4.0)
    runs = [r for r in result["runs"] if "points" in r]
    for col, kind, xlabel in ((0, "open", "offered requests / s (Poisson)"), (2, "closed", "concurrent clients")):
        thr, lat = [], []
        for run in runs:
            ps = sorted((p for p in run["points"] if p["load"] == kind and p["ok"]), key=lambda p: p["level"])
            if not ps:
                continue
            xs = [p["level"] for p in ps]
            thr.append(plots.Series(run["batching"], xs, [p["images_per_s"] or 0.0 for p in ps]))
            q = [p["latency_s"] for p in ps]
            lat.append(plots.Series(run["batching"], xs, [v["p95"] for v in q], low=[v["p50"] for v in q],
                                    high=[v["p99"] for v in q]))
        plots.lines(axes[col], thr, xlabel, "images / s", f"{kind} loop: throughput")
        plots.lines(axes[col + 1], lat, xlabel, "latency s: p95 (whisker p50 to p99)", f"{kind} loop: latency")
    skipped = [f"--batching {r['batching']} skipped ({r['skipped']})" for r in result["runs"] if "skipped" in r]
    rejected = sum(p["rejected"] for r in runs for p in r["points"])
    lost = sum(p["lost"] for r in runs for p in r["points"])
    text = plots.caption(result["device"], versions(),
                         f"sdrt serve, {result['model']}, {result['steps']} steps, {result['size']} px, "
                         f"max batch {result['max_batch']}, max queue {result['max_queue']}, "
                         f"at most {result['requests_per_point']} requests per point on 127.0.0.1",
                         f"{rejected} rejected (429) in all, {lost} lost", *skipped)
    plots.save(fig, path, text)
