"""`sdrt serve --batching step` on the demo model's export (ONNX Runtime CPU): jobs join the running
batch between denoising steps and leave after their last one. A job that joins a running batch
draws exactly what it draws alone; concurrent clients (different step counts in one batch) each
get their own images; a cancelled job frees its slot for a queued one while the others go on; each
job reports its own step. One server, 127.0.0.1, its own process group; every wait bounded."""
from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from test_serve import BLUE, RED, WAIT_S, ServeProcess, draws, png, wait_done

SLOTS = 3


@pytest.fixture(scope="module")
def server(demo_fp32, tmp_path_factory):
    s = ServeProcess(demo_fp32, tmp_path_factory.mktemp("log") / "serve-step.log", "--batching", "step",
                     "--max-batch", SLOTS, "--max-queue", 16)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def result(server, job_id: str) -> dict:
    assert server.wait_job(job_id)["state"] == "succeeded"
    return server.http.get(f"/v1/jobs/{job_id}/result").json()


def wait_step(server, job_id: str, step: int) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        st = server.http.get(f"/v1/jobs/{job_id}").json()
        if st["state"] != "queued" and st["step"] >= step:
            return st
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach step {step}: {st}")


def occupancy(server) -> tuple[float, float]:
    """(steps run with more than one occupied slot, all steps) from the histogram."""
    total = server.metric("sdrt_step_batch_size_count")
    return total - server.metric("sdrt_step_batch_size_bucket", le="1.0"), total


def test_info_says_step_batching(server):
    info = server.http.get("/v1/info").json()
    assert info["batching"] == "step" and "image inputs" in info["batching_notes"]


def test_joining_mid_way_draws_what_the_job_draws_alone_and_progress_is_per_job(server):
    alone = png(result(server, server.job(prompt=RED, seed=7, steps=25)["id"])["images"][0])
    busy_before, _ = occupancy(server)
    blocker = server.job(prompt=BLUE, seed=1, steps=100)
    wait_step(server, blocker["id"], 5)
    job = server.job(prompt=RED, seed=7, steps=25)
    seen = []                                  # (job step, blocker step) while both run
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        a = server.http.get(f"/v1/jobs/{job['id']}").json()
        b = server.http.get(f"/v1/jobs/{blocker['id']}").json()
        if a["state"] != "queued" and a["state"] != "running":
            break
        if a["state"] == "running" and b["state"] == "running":
            seen.append((a["step"], b["step"]))
            assert (a["steps"], b["steps"]) == (25, 100)
        time.sleep(0.02)
    assert server.http.get(f"/v1/jobs/{blocker['id']}").json()["state"] == "running"   # joined, left before it
    res = result(server, job["id"])
    assert res["info"]["batching"] == "step" and res["info"]["slots"] == SLOTS
    np.testing.assert_array_equal(png(res["images"][0]), alone)          # bit-identical
    assert draws(png(res["images"][0]), RED)
    job_steps = [s for s, _ in seen]
    assert job_steps == sorted(job_steps) and len(set(job_steps)) > 1    # its own steps, one by one
    assert any(0 < s < b for s, b in seen)                              # the blocker ahead, started first
    assert occupancy(server)[0] > busy_before                           # steps with two slots taken
    assert draws(png(result(server, blocker["id"])["images"][0]), BLUE)


def test_different_samplers_share_the_slots_each_as_alone(server, demo_fp32):
    """Each slot has its own sampler rows: Euler and DPM++ 2M Karras jobs join a running DDIM job's
    slots and draw what they draw alone; Euler a (per-step noise) runs per request beside the slots
    and draws what `Pipeline.generate` draws in process."""
    jobs = {"Euler": 21, "DPM++ 2M Karras": 22}
    alone = {name: png(result(server, server.job(prompt=RED, seed=seed, steps=12, sampler=name)["id"])["images"][0])
             for name, seed in jobs.items()}
    ddim = png(result(server, server.job(prompt=RED, seed=21, steps=12)["id"])["images"][0])
    assert not np.array_equal(alone["Euler"], ddim)                      # the sampler is applied
    blocker = server.job(prompt=BLUE, seed=1, steps=100)
    wait_step(server, blocker["id"], 3)
    ids = {name: server.job(prompt=RED, seed=seed, steps=12, sampler=name)["id"] for name, seed in jobs.items()}
    stochastic = server.job(prompt=RED, seed=23, steps=12, sampler="Euler a")
    for name, job_id in ids.items():
        res = result(server, job_id)
        assert res["info"]["batching"] == "step" and res["info"]["sampler"] == name
        np.testing.assert_array_equal(png(res["images"][0]), alone[name], err_msg=name)
    assert server.http.get(f"/v1/jobs/{blocker['id']}").json()["state"] == "running"   # they shared its slots
    from sdrt.engine.pipeline import Pipeline
    want = Pipeline(demo_fp32, backend="onnxruntime-cpu").generate(
        RED, steps=12, guidance=5.0, height=32, width=32, seed=[23], sampler="Euler a").images[0]
    np.testing.assert_array_equal(png(result(server, stochastic["id"])["images"][0]), want)
    assert "stochastic samplers" in server.http.get("/v1/info").json()["batching_notes"]
    server.http.delete(f"/v1/jobs/{blocker['id']}")


def test_concurrent_clients_get_their_own_images(server):
    """Jobs API, OpenAI client, web UI API at once, two prompts, different step counts: one batch."""
    busy_before, _ = occupancy(server)
    out = {}

    def native(tag, prompt, seed, steps, n=1):
        job = server.job(prompt=prompt, seed=seed, steps=steps, n=n)
        out[tag] = (prompt, result(server, job["id"]))

    def via_openai(tag, prompt, seed, steps):
        r = server.openai().images.generate(prompt=prompt, size="32x32", response_format="b64_json",
                                            extra_body={"seed": seed, "steps": steps})
        out[tag] = (prompt, {"images": [r.data[0].b64_json], "info": r.model_extra["info"]})

    def via_webui(tag, prompt, seed, steps):
        r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, "steps": steps,
                                                               "cfg_scale": 5.0}, timeout=WAIT_S)
        out[tag] = (prompt, {"images": r.json()["images"]})

    threads = [threading.Thread(target=f, args=a) for f, a in
               [(native, ("a", BLUE, 11, 25, 2)), (via_openai, ("b", RED, 12, 15)), (via_webui, ("c", BLUE, 13, 20)),
                (native, ("d", RED, 14, 30))]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert set(out) == {"a", "b", "c", "d"}
    for tag, (prompt, res) in out.items():
        assert all(draws(png(im), prompt) for im in res["images"]), tag
    assert len(out["a"][1]["images"]) == 2                              # n=2: two slots
    assert occupancy(server)[0] > busy_before


def test_cancel_frees_the_slot_and_the_others_finish(server):
    long = server.job(prompt=BLUE, seed=2, steps=150)
    wait_step(server, long["id"], 1)
    others = [server.job(prompt=RED, seed=s, steps=60) for s in range(SLOTS - 1)]   # every slot taken
    for o in others:
        wait_step(server, o["id"], 1)
    queued = server.job(prompt=BLUE, seed=9, steps=10)
    time.sleep(0.3)
    assert server.http.get(f"/v1/jobs/{queued['id']}").json()["state"] == "queued"   # no free slot
    st = server.http.delete(f"/v1/jobs/{long['id']}").json()
    assert st["state"] == "cancelled" and st["step"] < 150
    wait_step(server, queued["id"], 1)                          # took the freed slot ...
    assert all(server.http.get(f"/v1/jobs/{o['id']}").json()["state"] == "running" for o in others)  # ... mid-way
    assert draws(png(result(server, queued["id"])["images"][0]), BLUE)
    for o in others:
        assert draws(png(result(server, o["id"])["images"][0]), RED)
    assert server.http.get(f"/v1/jobs/{long['id']}").json()["state"] == "cancelled"
    assert server.metric("sdrt_cancellations_total", reason="client") >= 1


def test_client_disconnect_parks_its_slot(server):
    import test_serve
    test_serve.test_client_disconnect_cancels_its_job(server)      # the same check, on the step server
    job = server.job(prompt=RED, seed=5, steps=10)                  # the slots go on
    assert draws(png(result(server, job["id"])["images"][0]), RED)


def test_image_input_runs_per_request_beside_the_slots(server):
    from test_serve import b64png
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (220, 20, 20)
    running = server.job(prompt=BLUE, seed=4, steps=40)
    wait_step(server, running["id"], 1)
    r = server.http.post("/sdapi/v1/img2img", json={"prompt": RED, "init_images": [b64png(img)], "steps": 10,
                                                    "denoising_strength": 0.5, "seed": 3})
    assert r.status_code == 200, r.text
    assert png(r.json()["images"][0]).shape == (32, 32, 3)
    assert draws(png(result(server, running["id"])["images"][0]), BLUE)


def test_step_scheduler_keys_and_admission():
    """step: jobs of one size, guidance on/off and LoRA set share the slots whatever their steps,
    guidance scale or clip skip; admission stops once the oldest queued job needs another key."""
    from sdrt.serve import spec as sp
    from sdrt.serve.scheduler import Scheduler
    mk = lambda steps=10, g=5.0, w=32, clip=1: sp.Spec("p", "", steps, g, w, 32, 1, [0], clip_skip=clip)
    sched = Scheduler("step", max_batch=3, max_queue=8)
    a, b, c, d = (sched.submit(s) for s in (mk(), mk(steps=20, g=7.0), mk(clip=2), mk(g=1.0)))
    assert sched.next_batch() == [a, b, c]
    key = sched.key(a)
    e = sched.submit(mk(steps=40))
    assert sched.admit(key, 1) == []              # the oldest queued job (d, no guidance) needs another key
    assert sched.next_batch() == [d, ]             # d's batch, then e's
    assert sched.admit(sched.key(d), 2) == [] and sched.next_batch() == [e]


def test_engine_fault_in_the_slots_fails_that_job_only(demo_fp32, monkeypatch):
    """A fault while a job takes its slots: that job gets a 500 with one line, the jobs beside it
    their images (in process, the fault injected around StepBatch.place)."""
    from sdrt.serve import server as srv
    from sdrt.serve import spec as sp
    from sdrt.serve import step_batch
    real = step_batch.StepBatch.place

    def faulty(self, job):
        if job.spec.prompt == "fault":
            raise RuntimeError("device lost\nsecond line")
        return real(self, job)
    monkeypatch.setattr(step_batch.StepBatch, "place", faulty)
    app, server = srv.build(demo_fp32, "onnxruntime-cpu", max_batch=SLOTS, batching="step", warmup=False)
    sched = server.scheduler
    mk = lambda prompt, steps: sp.make(server.limits, prompt=prompt, steps=steps, seed=1)
    jobs = [sched.submit(mk(p, s)) for p, s in (("fault", 3), (RED, 10), (BLUE, 12))]
    server.worker.start()
    try:
        wait_done(jobs)
        assert [j.state for j in jobs] == ["failed", "succeeded", "succeeded"]
        assert jobs[0].error_status == 500 and jobs[0].error == "engine error: device lost"
        assert draws(jobs[1].images[0], RED) and draws(jobs[2].images[0], BLUE)
    finally:
        sched.drain()
        sched.stop()
        server.worker.join(10)
