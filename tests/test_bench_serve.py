"""sdrt bench-serve's bookkeeping against a fake jobs server (in-process, 127.0.0.1): every
request is counted once as ok, rejected (429), failed, or unfinished (timed out, then cancelled),
nothing is lost, the batch occupancy comes from the server's histogram, and the files are written.
No timing is checked."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from conftest import assert_user_error, run_cli
from sdrt.benchmarks import serve_load as sl

HANG_SEED = 2        # the job with this seed never finishes: the client's timeout must end it
FAIL_SEEDS = (0, 5, 10)   # these jobs fail with an engine error


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


class FakeJobs:
    """The jobs API's shape: every 4th submission is refused (429); FAIL_SEEDS fail;
    HANG_SEED runs until cancelled; the rest succeed. Each finished job observes batch size 3
    once in the histogram."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs, self.seen = {}, Counter()
        self.posts = 0
        self.hist_sum = self.hist_count = 0.0
        self.image = png_b64()

    def submit(self, body: dict):
        with self.lock:
            self.posts += 1
            if self.posts % 4 == 0:
                self.seen["rejected"] += 1
                return 429, None
            job = {"id": f"j{self.posts}", "state": "queued", "step": 0, "steps": body["steps"],
                   "queue_position": 0, "eta_s": 0.1, "error": None, "seed": body["seed"]}
            self.jobs[job["id"]] = job
        threading.Thread(target=self.run, args=(job,), daemon=True).start()
        return 202, job

    def run(self, job):
        time.sleep(0.01)
        job["state"] = "running"
        if job["seed"] == HANG_SEED:
            return
        time.sleep(0.02)
        with self.lock:
            job["step"] = job["steps"]
            if job["seed"] in FAIL_SEEDS:
                job["state"], job["error"] = "failed", "engine fault (fake)"
                self.seen["failed"] += 1
            else:
                job["state"] = "succeeded"
                self.seen["ok"] += 1
            self.hist_sum += 3
            self.hist_count += 1

    def status(self, job):
        return {k: job[k] for k in ("id", "state", "step", "steps", "queue_position", "eta_s", "error")}


def handler(fake: FakeJobs):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, code, obj=None, text=None, headers=()):
            body = text.encode() if text is not None else json.dumps(obj).encode()
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def job(self):
            return fake.jobs.get(self.path.split("/")[3])

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, job = fake.submit(body)
            if code == 429:
                return self.reply(429, {"detail": "queue full"}, headers=[("Retry-After", "1")])
            self.reply(202, fake.status(job))

        def do_DELETE(self):
            job = self.job()
            with fake.lock:
                if job["state"] in ("queued", "running"):
                    job["state"] = "cancelled"
                    fake.seen["cancelled_by_client"] += 1
            self.reply(200, fake.status(job))

        def do_GET(self):
            if self.path == "/metrics":
                return self.reply(200, text=f"# TYPE sdrt_batch_size histogram\nsdrt_batch_size_sum {fake.hist_sum}\n"
                                            f"sdrt_batch_size_count {fake.hist_count}\n")
            if self.path == "/v1/info":
                return self.reply(200, {"model": "fake", "backend": "onnxruntime-cpu", "batching": "step",
                                        "max_batch": 4, "defaults": {"width": 8}})
            job = self.job()
            if self.path.endswith("/result"):
                if job["state"] != "succeeded":
                    return self.reply(409, {"detail": "not finished"})
                return self.reply(200, {"id": job["id"], "images": [fake.image], "seeds": [job["seed"]],
                                        "info": {"batch_images": 2, "queue_wait_s": 0.25}})
            if self.path.endswith("/events"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for _ in range(100):          # the fake's stream gives up after 1 s: the client polls on
                    if job["state"] not in ("queued", "running"):
                        break
                    if job["seed"] == HANG_SEED:   # only keep-alive comments: the client's deadline ends it
                        self.wfile.write(b": keep-alive\n\n")
                    else:
                        self.wfile.write(f"event: progress\ndata: {json.dumps(fake.status(job))}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.05 if job["seed"] == HANG_SEED else 0.01)   # the hung one: 5 s of keep-alives
                else:
                    return
                self.wfile.write(f"event: done\ndata: {json.dumps(fake.status(job))}\n\n".encode())
                return
            self.reply(200, fake.status(job))
    return H


@pytest.fixture()
def fake_server():
    fake = FakeJobs()
    httpd = fake.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(fake))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("kind", ["open", "closed"])
def test_every_request_is_counted_once(fake_server, kind):
    fake, url = fake_server
    client = sl.Client(url)
    make = sl.payloads(steps=2, size=None)              # seeds 0..11: 0, 5, 10 fail, 2 hangs
    point = sl.run_point(client, kind, 40.0 if kind == "open" else 3, count=12, window_s=30, timeout=1.5, make=make)
    assert point["sent"] == 12 == fake.posts
    assert point["rejected"] == fake.seen["rejected"] == 3
    assert point["accepted"] == 12 - 3
    assert point["ok"] == fake.seen["ok"] and point["failed"] == fake.seen["failed"]
    hung = int(any(j["seed"] == HANG_SEED for j in fake.jobs.values()))
    assert point["unfinished"] == fake.seen["cancelled_by_client"] == hung
    assert point["ok"] + point["failed"] + point["unfinished"] == point["accepted"]
    assert point["lost"] == 0 and point["error"] == 0 and point["cancelled"] == 0
    assert point["images"] == point["ok"]
    rows = point["requests"]
    assert len(rows) == 12 and [r["outcome"] for r in rows].count("ok") == point["ok"]
    assert all("latency_s" in r for r in rows if r["outcome"] == "ok")
    assert all(r["batch_images"] == 2 and r["queue_wait_s"] == 0.25 for r in rows if r["outcome"] == "ok")
    assert point["queue_wait_s"]["source"] == "server" and point["queue_wait_s"]["mean"] == 0.25
    assert point["mean_batch_occupancy"] == 3.0 and point["mean_batch_per_job"] == 2.0
    assert point["latency_s"]["p50"] is not None and point["latency_s"]["p50"] <= point["latency_s"]["p99"]
    if fake.seen["failed"]:
        assert "engine fault (fake)" in point["errors"]


def test_bench_serve_writes_json_table_and_plot(fake_server, tmp_path):
    fake, url = fake_server
    load = sl.Load(rates=[20.0], concurrency=[1, 2], requests=4, window_s=10, timeout_s=2, steps=2)
    path = sl.bench_serve(url=url, load=load, out=tmp_path)
    result = json.loads(path.read_text())
    assert result["device"].endswith("CPU cores, ONNX Runtime CPU") and result["model"] == "fake"
    (run,) = result["runs"]
    assert run["batching"] == "step" and [p["load"] for p in run["points"]] == ["open", "closed", "closed"]
    assert all(p["lost"] == 0 for p in run["points"])
    assert sum(p["sent"] for p in run["points"]) + 1 == fake.posts          # + the warm-up request
    assert path.with_suffix(".md").read_text().count("| step |") == 3
    assert path.with_suffix(".png").stat().st_size > 0


def test_occupancy_from_a_histogram_or_images_over_engine_calls():
    hist = ({"sdrt_batch_size_sum": 4.0, "sdrt_batch_size_count": 2.0},
            {"sdrt_batch_size_sum": 16.0, "sdrt_batch_size_count": 6.0})
    assert sl.mean_occupancy(*hist) == 3.0
    calls = ({"sdrt_images_total": 10.0, "sdrt_engine_calls_total": 5.0},
             {"sdrt_images_total": 22.0, "sdrt_engine_calls_total": 9.0})
    assert sl.mean_occupancy(*calls) == 3.0
    assert sl.mean_occupancy({}, {}) is None and sl.mean_occupancy(calls[0], calls[0]) is None


def test_a_server_that_goes_away_leaves_no_request_uncounted(fake_server):
    fake, url = fake_server
    out = {}
    th = threading.Thread(target=lambda: out.update(sl.one_request(
        sl.Client(url), {"prompt": "x", "steps": 2, "seed": HANG_SEED}, timeout=60)))
    th.start()
    for _ in range(500):                              # until the job runs (bounded: 5 s)
        if any(j["state"] == "running" for j in fake.jobs.values()):
            break
        time.sleep(0.01)
    fake.httpd.shutdown()                             # the server stops answering
    fake.httpd.server_close()
    th.join(timeout=60)
    assert out["accepted"] and out["outcome"] == "unfinished" and "lost contact" in out["error"]
    assert not sl.is_png("not base64!") and not sl.is_png(base64.b64encode(b"GIF89a").decode())


def test_bad_arguments_are_one_line(tmp_path):
    assert_user_error(run_cli("bench-serve", "--rates", "fast", "--url", "http://127.0.0.1:9"), "--rates")
    assert_user_error(run_cli("bench-serve", "--batching", "greedy", "--url", "http://127.0.0.1:9"), "--batching")
    assert_user_error(run_cli("bench-serve", tmp_path, "--url", "http://127.0.0.1:9"), "not both")
