"""`sdrt serve` on Ray Serve (the ray extra) with the demo model's export on ONNX Runtime CPU: a
local Ray instance of 2 CPUs with 2 replicas of one CPU each; concurrent OpenAI and web-UI
clients get their own images from both replicas; a job submitted through one replica is
followed and cancelled through the other (the web UI's force_task_id likewise); a replica killed
by its pid is replaced, the requests that were in it get an error and the service keeps
answering (test_serve_ray_cluster.py: two nodes).

Ray listens on 127.0.0.1 (Serve's HTTP proxy on a free port); each fixture stops the Ray it
started (serve.shutdown, ray.shutdown, cluster.shutdown). Every wait is bounded."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from ray import serve  # noqa: E402
from test_serve import BLUE, RED, draws, free_port, png  # noqa: E402

from sdrt.serve import ray_app  # noqa: E402

WAIT_S = 60             # bound on any request or job
REPLACE_S = 120         # bound on Ray replacing a killed replica
HEADER = ray_app.REPLICA_HEADER


class RayServe:
    """The application deployed on the Ray already initialized, its HTTP proxy on 127.0.0.1."""

    def __init__(self, work_dir, replicas: int = 2, proxy_location: str = "EveryNode"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, proxy_location=proxy_location)
        app = ray_app.build_app({"work_dir": str(work_dir), "replicas": replicas, "num_cpus": 1, "num_gpus": 0,
                                 "max_batch": 2})
        serve.run(app, name=ray_app.APP_NAME, route_prefix="/")
        self.handle = serve.get_app_handle(ray_app.APP_NAME)
        self.http = httpx.Client(base_url=self.url, timeout=WAIT_S)

    def replicas(self, n: int = 2, bound: float = WAIT_S) -> dict[str, dict]:
        """{replica id: replica_info} of n distinct live replicas (asked through the handle)."""
        seen, deadline = {}, time.monotonic() + bound
        while len(seen) < n and time.monotonic() < deadline:
            try:
                info = self.handle.replica_info.remote().result(timeout_s=10)
                seen[info["replica"]] = info
            except Exception:        # noqa: BLE001 (a replica being replaced)
                time.sleep(0.5)
        assert len(seen) >= n, seen
        return seen

    def job(self, **body) -> tuple[str, str]:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        return r.json()["id"], r.headers[HEADER]

    def poll_via_other(self, path: str, owner: str, until, params=None, bound: float = WAIT_S):
        """GET path until a replica other than `owner` answers with until(json) true."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            r = self.http.get(path, params=params)
            if r.headers.get(HEADER) not in (None, owner) and r.status_code == 200 and until(r.json()):
                return r
            time.sleep(0.02)
        raise AssertionError(f"no answer from a replica other than {owner} to {path} within {bound} s")

    def stop(self) -> None:
        self.http.close()
        serve.shutdown()


@pytest.fixture(scope="module")
def local_ray(demo_fp32):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="sdrt-test")
    try:
        rs = RayServe(demo_fp32)
        try:
            yield rs
        finally:
            rs.stop()
    finally:
        ray.shutdown()


def test_concurrent_openai_and_webui_clients_get_their_own_images_from_both_replicas(local_ray):
    rs, out = local_ray, {}

    def via_openai(tag, prompt, seed):
        client = openai.OpenAI(base_url=rs.url + "/v1", api_key="none", timeout=WAIT_S, max_retries=0)
        r = client.images.with_raw_response.generate(prompt=prompt, size="32x32", response_format="b64_json",
                                                     extra_body={"seed": seed})
        out[tag] = (prompt, r.parse().data[0].b64_json, r.headers[HEADER])

    def via_webui(tag, prompt, seed):
        r = httpx.post(rs.url + "/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, "steps": 25},
                       timeout=WAIT_S)
        assert r.status_code == 200, r.text
        out[tag] = (prompt, r.json()["images"][0], r.headers[HEADER])

    calls = [(via_openai, ("o1", RED, 1)), (via_openai, ("o2", BLUE, 2)), (via_openai, ("o3", BLUE, 3)),
             (via_webui, ("w1", BLUE, 4)), (via_webui, ("w2", RED, 5)), (via_webui, ("w3", RED, 6))]
    threads = [threading.Thread(target=f, args=a) for f, a in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert set(out) == {a[0] for _, a in calls}
    for tag, (prompt, image, _) in out.items():
        assert draws(png(image), prompt), tag
    assert len({replica for _, _, replica in out.values()}) == 2      # both replicas drew


def test_job_followed_and_cancelled_through_the_other_replica(local_ray):
    """Status, events and cancel of a job reach its replica whichever replica answers; the
    cancel stops the owner's engine call (its metrics, labelled by replica, count it)."""
    rs = local_ray
    for _ in range(20):          # until the cancel lands on the other replica (Ray routes it)
        job_id, owner = rs.job(prompt=RED, steps=150, seed=7)
        rs.poll_via_other(f"/v1/jobs/{job_id}", owner, lambda st: st["state"] == "running" and st["step"] > 0)
        with rs.http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            first = next(line for line in events.iter_lines() if line.startswith("data:"))
        assert json.loads(first[5:])["id"] == job_id
        r = rs.http.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        if r.headers[HEADER] != owner:
            break
    else:
        pytest.fail("20 cancels all reached the job's own replica")
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:           # the owner itself stopped the job (within SYNC_S)
        r = rs.http.get(f"/v1/jobs/{job_id}")
        if r.headers[HEADER] == owner and r.json()["state"] != "running":
            break
        time.sleep(0.02)
    st = r.json()
    assert r.headers[HEADER] == owner and st["state"] == "cancelled" and st["step"] < 150, st
    result = rs.http.get(f"/v1/jobs/{job_id}/result")
    assert result.status_code == 409
    counted = f'sdrt_cancellations_total{{reason="client",replica="{owner}"}}'
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:      # each replica publishes its metrics every second
        text = rs.http.get("/metrics").text
        if counted in text:
            break
        time.sleep(0.2)
    assert counted in text, text[:2000]
    assert len({line.split('replica="')[1].split('"')[0] for line in text.splitlines() if 'replica="' in line}) == 2


def test_webui_task_id_progress_and_interrupt_across_replicas(local_ray):
    """A txt2img request holds its replica busy, so Ray sends the progress polls and the
    interrupt to the other one: both find the task by its force_task_id."""
    rs, out = local_ray, {}

    def call():
        out["r"] = httpx.post(rs.url + "/sdapi/v1/txt2img", json={"prompt": BLUE, "steps": 150, "seed": 3,
                                                                  "force_task_id": "task(ray-a)"}, timeout=WAIT_S)
    t = threading.Thread(target=call)
    t.start()
    answers = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and len(answers) < 3:
        p = rs.http.get("/sdapi/v1/progress", params={"id_task": "task(ray-a)"})
        if p.status_code == 200 and 0 < p.json()["progress"] < 1:
            answers.append(p.headers[HEADER])
        time.sleep(0.02)
    stop = rs.http.post("/sdapi/v1/interrupt", params={"id_task": "task(ray-a)"})
    assert stop.json() == {"interrupted": ["task(ray-a)"]}
    t.join(WAIT_S)
    r = out["r"]
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]
    owner = r.headers[HEADER]
    assert any(a != owner for a in answers + [stop.headers[HEADER]]), (owner, answers)
    for _ in range(4):                        # the task id is taken on every replica
        again = rs.http.post("/sdapi/v1/txt2img", json={"prompt": RED, "force_task_id": "task(ray-a)"})
        assert again.status_code == 409, again.text


def test_killed_replica_is_replaced_and_the_service_keeps_answering(local_ray):
    """Kill one replica's process: its blocking requests get an error (none hangs), its queued
    or running native job fails with 503 when read through the other replica, Ray starts a new
    replica, and requests succeed again."""
    rs = local_ray
    before = rs.replicas(2)
    job_id, owner = rs.job(prompt=RED, steps=150, seed=9)
    out = []

    def blocking(seed):
        try:
            r = httpx.post(rs.url + "/sdapi/v1/txt2img", json={"prompt": RED, "seed": seed, "steps": 60},
                           timeout=WAIT_S)
            out.append(r.status_code)
        except httpx.HTTPError as e:          # the connection dropped: an error too, not a hang
            out.append(type(e).__name__)
    threads = [threading.Thread(target=blocking, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    rs.poll_via_other(f"/v1/jobs/{job_id}", owner, lambda st: st["state"] == "running" and st["step"] > 0)
    os.kill(before[owner]["pid"], signal.SIGKILL)
    for t in threads:
        t.join(WAIT_S + 5)
    assert not any(t.is_alive() for t in threads)
    assert len(out) == 4 and any(s != 200 for s in out), out        # the killed replica's got errors
    r = rs.poll_via_other(f"/v1/jobs/{job_id}", owner, lambda st: st["state"] != "running",
                          bound=ray_app.STALE_S + WAIT_S)
    assert r.json()["state"] == "failed" and "replica" in r.json()["error"], r.json()
    after = rs.replicas(2, bound=REPLACE_S)
    assert owner not in after and len(after) == 2
    r = rs.http.post("/v1/images/generations", json={"prompt": BLUE, "response_format": "b64_json", "seed": 4})
    assert r.status_code == 200 and draws(png(r.json()["data"][0]["b64_json"]), BLUE)


def test_config_file_and_builder_options(demo_fp32):
    """serve/ray_config.yaml is a valid Ray Serve config whose builder args build the app; bad
    replica counts are one line, exit 2, before Ray starts."""
    import yaml
    from conftest import assert_user_error, run_cli
    from ray.serve.schema import ServeDeploySchema
    cfg = yaml.safe_load((ray_app.Path(ray_app.__file__).parent / "ray_config.yaml").read_text())
    spec = ServeDeploySchema.model_validate(cfg).applications[0]
    assert spec.import_path == "sdrt.serve.ray_app:build_app"
    app = ray_app.build_app({**spec.args, "work_dir": str(demo_fp32), "autoscale": "1:3", "num_gpus": "0"})
    d = app._bound_deployment
    assert d.name == cfg["applications"][0]["deployments"][0]["name"] == ray_app.DEPLOYMENT
    auto = d._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4)
    assert d.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
    for args, message in ((["--ray", "--autoscale", "3:1"], "--autoscale 3:1"),
                          (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
                          (["--replicas", "0"], "--replicas 0")):
        assert_user_error(run_cli("serve", str(demo_fp32), *args), message)
