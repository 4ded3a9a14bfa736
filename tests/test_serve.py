"""`sdrt serve` on the demo model's export (ONNX Runtime CPU): each API with the real `openai`
client and plain HTTP (httpx), the web UI's request fields, job progress / cancel / disconnect,
429, timeouts, auth, bad inputs, SIGTERM drain, and concurrent clients each getting their own
images, checked by reading what the demo model drew (benchmarks/checker.py).

Servers run as subprocesses in their own process group on 127.0.0.1 with a free port; each test
stops exactly the group it started. Every wait is bounded."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import assert_user_error, run_cli  # noqa: E402
from sdrt import scenes  # noqa: E402
from sdrt.benchmarks import checker  # noqa: E402
from sdrt.engine.samplers import SAMPLER_NAMES, SCHEDULES  # noqa: E402

RED = "a large red circle on a white background"
BLUE = "a large blue square on a black background"
START_S = 120            # bound on a server becoming ready
WAIT_S = 60              # bound on any job


# ---- servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Jobs that must still be running seconds later (cancel, disconnect, timeout): the server's most
# steps at 16x the demo's pixels, so an idle machine does not finish them first (their images are
# never read).
LONG_SIZE = {"width": 128, "height": 128}



def wait_done(jobs) -> None:
    """Wait (bounded by WAIT_S) until every in-process scheduler job has ended."""
    deadline = time.monotonic() + WAIT_S
    while not all(j.done for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.05)


class ServeProcess:
    """`sdrt serve WORK_DIR --port P ARGS...` in its own process group."""

    def __init__(self, work_dir: Path | None, log: Path, *args, key: str | None = None, cwd: Path | None = None):
        self.port, self.key, self.log = free_port(), key, log
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = open(log, "w")
        where = [] if work_dir is None else [str(work_dir)]
        self.proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", *where, "--port", str(self.port),
                                      *map(str, args)], stdout=self.out, stderr=subprocess.STDOUT, cwd=cwd,
                                     start_new_session=True, env={**os.environ, "SDRT_API_KEY": ""})
        self.http = httpx.Client(base_url=self.url, timeout=WAIT_S, headers=self.headers())

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def wait_ready(self) -> "ServeProcess":
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()}"
            try:
                if self.http.get("/ready").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {START_S} s: {self.log.read_text()}")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.out.close()

    def openai(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "unused", max_retries=0, timeout=WAIT_S)

    def job(self, **body) -> dict:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        return r.json()

    def wait_job(self, job_id: str, until=("succeeded", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            st = self.http.get(f"/v1/jobs/{job_id}").json()
            if st["state"] in until:
                return st
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not {until} within {WAIT_S} s: {st}")

    def wait_running(self, job_id: str) -> dict:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            st = self.http.get(f"/v1/jobs/{job_id}").json()
            if st["state"] != "queued" and (st["step"] >= 1 or st["state"] != "running"):
                return st
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} did not start")

    def metric(self, name: str, **labels) -> float:
        text = self.http.get("/metrics").text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def lora_dir(demo_fp32, tmp_path_factory) -> Path:
    from sdrt import manifest as mf
    from sdrt.benchmarks.lora_switch import random_lora
    from sdrt.engine import lora as L
    d = tmp_path_factory.mktemp("loras")
    man = mf.load(demo_fp32)
    random_lora(d / "grain.safetensors", {c: man["models"][c]["lora_targets"] for c in L.COMPONENTS}, 4, False, 0)
    return d


@pytest.fixture(scope="module")
def embedding_dir(demo_fp32, tmp_path_factory) -> Path:
    """crimson.safetensors (web UI layout): the token embedding of "red", under a new word."""
    from safetensors.numpy import save_file
    from sdrt.engine.tokenizer import ClipTokenizer
    d = tmp_path_factory.mktemp("embeddings")
    table = np.load(demo_fp32 / "token_embedding.npy")
    (red,) = ClipTokenizer.from_dir(demo_fp32 / "tokenizer").token_ids("red")
    save_file({"emb_params": table[red][None].astype(np.float32)}, str(d / "crimson.safetensors"))
    return d


@pytest.fixture(scope="module")
def server(demo_fp32, lora_dir, embedding_dir, tmp_path_factory):
    """Request-level batching, up to 4 images a call, a queue of 16, a LoRA and an embedding."""
    s = ServeProcess(demo_fp32, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", 4, "--max-queue", 16,
                     "--lora-dir", lora_dir, "--embedding-dir", embedding_dir)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def png(b64: str) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def b64png(a: np.ndarray) -> str:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def draws(image: np.ndarray, caption: str) -> bool:
    """The demo model drew the caption's colour, background and shape."""
    scene = next(s for s in scenes.all_scenes() if s.caption == caption)
    hit = checker.correct(checker.read(image), scene)
    return hit["colour"] and hit["background"] and hit["shape"]


def error_of(r) -> dict:
    body = r.json()
    assert set(body["error"]) >= {"message", "param"}, body
    assert "\n" not in body["error"]["message"]
    return body["error"]


# ---- the native jobs API -------------------------------------------------------------------------

def test_job_progress_events_result_and_cancel(server):
    assert server.http.get("/openapi.json").json()["paths"].keys() >= {"/v1/jobs", "/sdapi/v1/txt2img"}
    assert server.http.get("/docs").status_code == 200
    info = server.http.get("/v1/info").json()
    assert info["samplers"] == list(SAMPLER_NAMES) and info["schedules"] == list(SCHEDULES) and info["loras"] == ["grain"] and info["max_batch"] == 4
    assert (info["default_width"], info["size"]["multiple"]) == (32, 4)

    blocker = server.job(prompt=BLUE, steps=30)
    job = server.job(prompt=RED, seed=7, steps=25, guidance_scale=5.0)
    assert job["state"] in ("queued", "running") and set(job) == {"id", "state", "queue_position"}
    events = []
    with server.http.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "done":
                    break
    assert events[-1][0] == "done" and events[-1][1]["state"] == "succeeded"
    assert events[0][1]["state"] == "queued" and events[0][1]["queue_position"] in (0, 1)   # behind the blocker
    assert server.http.get(f"/v1/jobs/{blocker['id']}").json()["state"] == "succeeded"
    steps_seen = [e["step"] for k, e in events if k == "progress" and e["state"] == "running"]
    assert steps_seen == sorted(steps_seen) and len(set(steps_seen)) > 1     # progress step by step
    res = server.http.get(f"/v1/jobs/{job['id']}/result").json()
    assert res["seeds"] == [7] and res["info"]["prompt"] == RED
    assert draws(png(res["images"][0]), RED)

    long = server.job(prompt=BLUE, steps=150, **LONG_SIZE)
    assert server.http.get(f"/v1/jobs/{long['id']}/result").status_code == 409
    server.wait_running(long["id"])
    st = server.http.delete(f"/v1/jobs/{long['id']}").json()
    assert st["state"] == "cancelled" and st["step"] < 150
    assert server.http.get(f"/v1/jobs/{long['id']}/result").status_code == 409
    assert server.http.get("/v1/jobs/nope").status_code == 404
    nxt = server.job(prompt=RED, steps=5)                 # the slot is free again
    assert server.wait_job(nxt["id"])["state"] == "succeeded"
    assert server.metric("sdrt_cancellations_total") >= 1


def test_concurrent_clients_get_their_own_images_batched_as_alone(server):
    """Four clients at once (jobs API, OpenAI client, web UI API), two prompts: each gets what it
    asked for; the four queued behind a running job share one engine call, and an image drawn in
    that batch is the image drawn alone with the same seed."""
    alone = server.http.get(f"/v1/jobs/{server.wait_job(server.job(prompt=BLUE, seed=11)['id'])['id']}/result")
    alone = png(alone.json()["images"][0])
    blocker = server.job(prompt=RED, steps=60)
    server.wait_running(blocker["id"])
    out = {}

    def native(tag, prompt, seed):
        job = server.job(prompt=prompt, seed=seed)
        server.wait_job(job["id"])
        out[tag] = (prompt, server.http.get(f"/v1/jobs/{job['id']}/result").json())

    def via_openai(tag, prompt, seed):
        r = server.openai().images.generate(prompt=prompt, size="32x32", response_format="b64_json",
                                            extra_body={"seed": seed})
        out[tag] = (prompt, {"images": [r.data[0].b64_json], "info": r.model_extra["info"]})

    def via_webui(tag, prompt, seed):
        r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, "steps": 25,
                                                               "cfg_scale": 5.0}, timeout=WAIT_S).json()
        out[tag] = (prompt, {"images": r["images"], "info": json.loads(r["info"])["sdrt"]})

    threads = [threading.Thread(target=f, args=a) for f, a in
               [(native, ("a", BLUE, 11)), (via_openai, ("b", RED, 12)), (via_webui, ("c", BLUE, 13)),
                (native, ("d", RED, 14))]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert set(out) == {"a", "b", "c", "d"}
    for tag, (prompt, res) in out.items():
        assert draws(png(res["images"][0]), prompt), tag
    assert max(res["info"]["batch_jobs"] for _, res in out.values()) >= 2
    assert out["a"][1]["info"]["batch_jobs"] >= 2
    np.testing.assert_array_equal(png(out["a"][1]["images"][0]), alone)


def test_lora_by_name(server):
    before = server.metric("sdrt_lora_switches_total")
    job = server.job(prompt=RED, steps=5, seed=1, loras=[{"name": "grain", "scale": 0.8}])
    assert server.wait_job(job["id"])["state"] == "succeeded"
    assert server.http.get(f"/v1/jobs/{job['id']}/result").json()["info"]["loras"] == [{"name": "grain",
                                                                                        "scale": 0.8}]
    assert server.metric("sdrt_lora_switches_total") >= before + 1
    r = server.http.post("/v1/jobs", json={"prompt": RED, "loras": [{"name": "../grain"}]})
    assert r.status_code == 400 and error_of(r)["param"] == "loras[0].name"


def test_embedding_by_its_token(server):
    """--embedding-dir: crimson.safetensors is the token "crimson", drawn as the red it holds."""
    assert server.http.get("/v1/info").json()["embeddings"] == ["crimson"]
    job = server.job(prompt=RED.replace("red", "crimson"), seed=4)
    assert server.wait_job(job["id"])["state"] == "succeeded"
    assert draws(png(server.http.get(f"/v1/jobs/{job['id']}/result").json()["images"][0]), RED)


# ---- OpenAI --------------------------------------------------------------------------------------

def test_openai_client_generations_and_edits(server):
    client = server.openai()
    r = client.images.generate(prompt=RED, n=2, size="32x32", response_format="b64_json",
                               extra_body={"seed": 5, "steps": 25, "guidance_scale": 5.0})
    assert len(r.data) == 2 and all(draws(png(d.b64_json), RED) for d in r.data)
    assert r.model_extra["info"]["seeds"] == [5, 6]
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.images.generate(prompt=RED, response_format="url")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt=RED, size="30x30")

    source = png(r.data[0].b64_json)
    buf = io.BytesIO(base64.b64decode(r.data[0].b64_json))
    e = client.images.edit(image=("in.png", buf, "image/png"), prompt=BLUE, response_format="b64_json",
                           extra_body={"strength": 1.0, "seed": 3})
    assert e.model_extra["info"]["task"] == "img2img" and draws(png(e.data[0].b64_json), BLUE)
    mask = np.zeros((32, 32, 4), np.uint8)
    mask[..., 3] = 255
    mask[:, 16:, 3] = 0                                 # transparent right half: repaint it
    from PIL import Image
    mbuf = io.BytesIO()
    Image.fromarray(mask, "RGBA").save(mbuf, format="PNG")
    e = client.images.edit(image=("in.png", io.BytesIO(base64.b64decode(r.data[0].b64_json)), "image/png"),
                           mask=("mask.png", io.BytesIO(mbuf.getvalue()), "image/png"), prompt=BLUE,
                           response_format="b64_json", extra_body={"steps": 10})
    assert e.model_extra["info"]["task"] == "inpaint" and png(e.data[0].b64_json).shape == source.shape


# ---- the web UI's API ----------------------------------------------------------------------------

# what the web UI's clients send: its request model's fields at their defaults
WEBUI_TXT2IMG = {
    "prompt": RED, "negative_prompt": "", "styles": [], "seed": 21, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "DDIM", "scheduler": "automatic",
    "batch_size": 2, "n_iter": 1, "steps": 25, "cfg_scale": 5.0, "width": 32, "height": 32, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": 0, "denoising_strength": 0.75,
    "s_min_uncond": 0, "s_churn": 0, "s_tmax": None, "s_tmin": 0, "s_noise": 1, "override_settings": {},
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": {}, "enable_hr": False,
    "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_additional_modules": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "force_task_id": None, "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None,
}


def test_samplers_draw_what_the_pipeline_draws_in_process(server, demo_fp32):
    """Jobs API and web UI with the runtime's samplers: the image `Pipeline.generate(sampler=...)`
    draws in process from the same export and seed, bit for bit; "Euler a" reads per-step noise."""
    from sdrt.engine.pipeline import Pipeline
    pipe = Pipeline(demo_fp32, backend="onnxruntime-cpu")
    for sampler, schedule, seed in (("Euler a", None, 5), ("DPM++ 2M Karras", None, 6), ("Euler", "karras", 8)):
        want = pipe.generate(RED, steps=12, guidance=5.0, height=32, width=32, seed=[seed], sampler=sampler,
                             schedule=schedule).images[0]
        job = server.job(prompt=RED, seed=seed, steps=12, guidance_scale=5.0, sampler=sampler, schedule=schedule)
        assert server.wait_job(job["id"])["state"] == "succeeded"
        res = server.http.get(f"/v1/jobs/{job['id']}/result").json()
        assert (res["info"]["sampler"], res["info"]["schedule"]) == (sampler, schedule)
        np.testing.assert_array_equal(png(res["images"][0]), want, err_msg=sampler)
    r = server.http.post("/sdapi/v1/txt2img", json={"prompt": RED, "seed": 5, "steps": 12, "cfg_scale": 5.0,
                                                    "sampler_name": "Euler a", "scheduler": "Automatic"})
    assert r.status_code == 200, r.text
    want = pipe.generate(RED, steps=12, guidance=5.0, height=32, width=32, seed=[5], sampler="Euler a").images[0]
    np.testing.assert_array_equal(png(r.json()["images"][0]), want)
    assert json.loads(r.json()["info"])["sampler_name"] == "Euler a"


def test_webui_txt2img_img2img_with_every_field(server):
    r = server.http.post("/sdapi/v1/txt2img", json=WEBUI_TXT2IMG)
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and all(draws(png(b), RED) for b in body["images"])
    assert info["all_seeds"] == [21, 22] and info["sdrt_not_applied"] == [] and body["parameters"]["seed"] == 21

    # fields that would change the image and are not applied are named; an unavailable sampler is refused
    r = server.http.post("/sdapi/v1/txt2img", json={**WEBUI_TXT2IMG, "batch_size": 1, "steps": 3,
                                                    "restore_faces": True, "enable_hr": True,
                                                    "override_settings": {"CLIP_stop_at_last_layers": 2,
                                                                          "sd_vae": "x"}})
    info = json.loads(r.json()["info"])
    assert {"restore_faces", "enable_hr", "override_settings.sd_vae"} <= set(info["sdrt_not_applied"])
    assert info["clip_skip"] == 2
    r = server.http.post("/sdapi/v1/txt2img", json={**WEBUI_TXT2IMG, "sampler_name": "Heun"})
    assert r.status_code == 400 and error_of(r)["param"] == "sampler_name"
    assert "Euler a" in error_of(r)["message"] and "DPM++ 2M Karras" in error_of(r)["message"]
    r = server.http.post("/sdapi/v1/txt2img", json={**WEBUI_TXT2IMG, "scheduler": "exponential"})
    assert r.status_code == 400 and error_of(r)["param"] == "scheduler" and "karras" in error_of(r)["message"]
    r = server.http.post("/sdapi/v1/txt2img", json={**WEBUI_TXT2IMG, "script_name": "x/y/z plot"})
    assert r.status_code == 400 and error_of(r)["param"] == "script_name"

    init = png(body["images"][0])
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    r = server.http.post("/sdapi/v1/img2img", json={
        "init_images": [b64png(init)], "mask": b64png(mask), "denoising_strength": 1.0, "prompt": BLUE,
        "seed": 2, "steps": 10, "cfg_scale": 5.0, "inpainting_fill": 1, "inpaint_full_res": False,
        "mask_blur": 0, "resize_mode": 0, "include_init_images": False})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["is_using_inpainting_conditioning"] and info["sdrt_not_applied"] == []
    out = png(r.json()["images"][0])
    assert np.abs(out[:, :12].astype(int) - init[:, :12]).mean() < np.abs(out[:, 20:].astype(int) -
                                                                             init[:, 20:]).mean()

    assert [x["name"] for x in server.http.get("/sdapi/v1/samplers").json()] == list(SAMPLER_NAMES)
    assert [x["name"] for x in server.http.get("/sdapi/v1/schedulers").json()] == ["automatic", *SCHEDULES]
    assert server.http.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "demo-fp32"
    assert server.http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo-fp32"
    r = server.http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert r.status_code == 400 and error_of(r)["param"] == "sd_model_checkpoint"


def test_webui_progress_and_interrupt_scoped_to_the_task(server):
    """Two clients' tasks: interrupting one (by its force_task_id) leaves the other running."""
    out = {}

    def call(task, prompt, steps):
        r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": prompt, "steps": steps, "seed": 1,
                                                               "force_task_id": task}, timeout=WAIT_S)
        out[task] = r.json()

    ta = threading.Thread(target=call, args=("task(a)", RED, 120))
    tb = threading.Thread(target=call, args=("task(b)", BLUE, 40))
    ta.start()
    tb.start()
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        p = server.http.get("/sdapi/v1/progress", params={"id_task": "task(a)"})
        if p.status_code == 200 and p.json()["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.02)
    assert 0 < p.json()["progress"] < 1
    r = server.http.post("/sdapi/v1/interrupt", params={"id_task": "task(a)"})
    assert r.json() == {"interrupted": ["task(a)"]}
    ta.join(WAIT_S)
    tb.join(WAIT_S)
    assert out["task(a)"]["images"] == [] and json.loads(out["task(a)"]["info"])["interrupted"]
    assert draws(png(out["task(b)"]["images"][0]), BLUE)
    assert server.http.get("/sdapi/v1/progress", params={"id_task": "task(b)"}).json()["progress"] == 1.0
    r = server.http.post("/sdapi/v1/txt2img", json={"prompt": RED, "force_task_id": "task(b)"})
    assert r.status_code == 409


def test_client_disconnect_cancels_its_job(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": RED, "steps": 150, "force_task_id": "gone", **LONG_SIZE},
                   timeout=httpx.Timeout(WAIT_S, read=1.0))
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        st = server.http.get("/sdapi/v1/progress", params={"id_task": "gone"}).json()["state"]
        if st["state"] == "cancelled":
            break
        time.sleep(0.05)
    assert st["state"] == "cancelled" and st["sampling_step"] < 150
    assert server.metric("sdrt_cancellations_total", reason="disconnect") >= 1


# ---- bad input -----------------------------------------------------------------------------------

def bomb_png() -> str:
    from PIL import Image
    out = io.BytesIO()
    Image.new("1", (8000, 8000)).save(out, format="PNG")        # 64 Mpx in a few kB
    return base64.b64encode(out.getvalue()).decode()


@pytest.mark.parametrize("route, body, field", [
    ("/v1/jobs", {"prompt": "x", "width": 30}, "width"),
    ("/v1/jobs", {"prompt": "x", "width": 4096}, "width"),
    ("/v1/jobs", {"prompt": "x", "n": 5}, "n"),
    ("/v1/jobs", {"prompt": "x", "steps": 0}, "steps"),
    ("/v1/jobs", {"prompt": "x", "steps": 1000}, "steps"),
    ("/v1/jobs", {"prompt": "x", "sampler": "Heun"}, "sampler"),
    ("/v1/jobs", {"prompt": "x", "sampler": 3}, "sampler"),
    ("/v1/jobs", {"prompt": "x", "sampler": "DDIM", "schedule": "karras"}, "schedule"),
    ("/v1/images/generations", {"prompt": "x", "sampler": "Heun"}, "sampler"),
    ("/v1/jobs", {"prompt": "x", "loras": [{"name": "nope"}]}, "loras[0].name"),
    ("/v1/jobs", {"prompt": "x", "image": "not base64!"}, "image"),
    ("/v1/jobs", {"prompt": "x", "image": base64.b64encode(b"hello, not a picture").decode()}, "image"),
    ("/v1/jobs", {"prompt": "x", "image": "BOMB"}, "image"),
    ("/v1/jobs", {"prompt": "x", "mask": "AAAA"}, "mask"),
    ("/v1/jobs", {"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ("/v1/jobs", {"prompt": "x", "colour": "red"}, "colour"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, "model"),
    ("/v1/images/generations", {"prompt": "x", "n": 9}, "n"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}, "init_images[0]"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["INIT"], "steps": 10, "denoising_strength": 0.05},
     "denoising_strength"),
])
def test_bad_input_is_a_4xx_naming_the_field(server, route, body, field):
    init = [b64png(np.zeros((32, 32, 3), np.uint8))]
    body = {k: bomb_png() if v == "BOMB" else init if v == ["INIT"] else v for k, v in body.items()}
    r = server.http.post(route, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert error_of(r)["param"] == field, r.text


def test_bad_multipart_and_json_bodies(server):
    r = server.http.post("/v1/images/edits", content=b"--x\r\nnonsense", headers={"content-type":
                                                                                  "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500, r.text
    r = server.http.post("/v1/images/edits", files={"image": ("a.png", b"not a png", "image/png")},
                         data={"prompt": "x"})
    assert r.status_code == 400 and error_of(r)["param"] == "image"
    r = server.http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


# ---- limits, timeouts, auth, faults, shutdown -------------------------------------------------------

def test_queue_limit_timeout_auth_and_body_size(demo_fp32, tmp_path):
    s = ServeProcess(demo_fp32, tmp_path / "serve.log", "--max-queue", 1, "--timeout", 1.5, "--batching", "none",
                     "--api-key", "sesame", "--max-body-mb", 0.5, key="sesame")
    try:
        s.wait_ready()
        assert httpx.get(s.url + "/health").status_code == 200                  # open
        r = httpx.get(s.url + "/v1/info")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")

        running = s.job(prompt=RED, steps=150, **LONG_SIZE)
        s.wait_running(running["id"])
        queued = s.job(prompt=RED, steps=150, **LONG_SIZE)
        r = s.http.post("/v1/jobs", json={"prompt": RED})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        for job in (running, queued):                                            # --timeout 1.5
            st = s.wait_job(job["id"])
            assert st["state"] == "failed" and "timed out" in st["error"], st
        r = s.openai().images.generate(prompt=BLUE, size="32x32", extra_body={"steps": 5})
        assert len(r.data) == 1                                                  # the key works

        r = s.http.post("/v1/jobs", json={"prompt": "x" * (1 << 20)})
        assert r.status_code == 413 and "body" in error_of(r)["message"]
        assert s.metric("sdrt_rejections_total", reason="queue_full") == 1
    finally:
        s.stop()


def test_sigterm_finishes_running_jobs_refuses_new_and_exits_0(demo_fp32, tmp_path):
    """Also: with no WORK_DIR, the demo model's export in ./sdrt-demo is served."""
    import shutil
    shutil.copytree(demo_fp32, tmp_path / "sdrt-demo" / demo_fp32.name)
    s = ServeProcess(None, tmp_path / "serve.log", cwd=tmp_path)
    try:
        s.wait_ready()
        assert s.http.get("/v1/info").json()["model"] == demo_fp32.name
        job = s.job(prompt=BLUE, steps=60, seed=3)
        events = []

        def follow():
            with httpx.stream("GET", f"{s.url}/v1/jobs/{job['id']}/events", timeout=WAIT_S) as r:
                events.extend(line for line in r.iter_lines() if line.startswith("data: "))
        t = threading.Thread(target=follow)
        t.start()
        s.wait_running(job["id"])
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:             # the signal is handled asynchronously
            r = s.http.post("/v1/jobs", json={"prompt": RED})
            if r.status_code == 503:
                break
            time.sleep(0.02)
        assert r.status_code == 503, r.text
        assert s.http.get("/ready").status_code == 503
        t.join(WAIT_S)
        assert json.loads(events[-1][6:])["state"] == "succeeded"
        assert s.proc.wait(WAIT_S) == 0
    finally:
        s.stop()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_engine_fault_fails_that_job_only(demo_fp32, monkeypatch):
    """A fault inside the engine call: that job gets a 500 with one line, its batch-mates and the
    next request their images (in process: the fault is injected around the engine call)."""
    from sdrt.serve import runner, server as srv, worker as wk
    real = runner.run

    def faulty(pipe, samples, *a, **kw):
        if any(s.prompt == "fault" for s in samples):
            raise RuntimeError("device lost\nsecond line")
        return real(pipe, samples, *a, **kw)
    monkeypatch.setattr(wk.runner, "run", faulty)
    app, server = srv.build(demo_fp32, "onnxruntime-cpu", max_batch=4, warmup=False)
    sched = server.scheduler
    from sdrt.serve import spec as sp
    mk = lambda prompt: sp.make(server.limits, prompt=prompt, steps=3, seed=1)
    jobs = [sched.submit(mk(p)) for p in ("fault", RED, BLUE)]   # one batch: same size, steps, guidance
    server.worker.start()
    try:
        wait_done(jobs)
        assert [j.state for j in jobs] == ["failed", "succeeded", "succeeded"]
        assert jobs[0].error_status == 500 and jobs[0].error == "engine error: device lost"
        after = sched.submit(mk(RED))
        wait_done([after])
        assert after.state == "succeeded"
    finally:
        sched.drain()
        sched.stop()
        server.worker.join(10)


def test_cli_refuses_bad_serve_options(demo_fp32, tmp_path):
    assert_user_error(run_cli("serve", demo_fp32, "--lora-dir", tmp_path / "none"), "--lora-dir")
    assert_user_error(run_cli("serve", tmp_path / "missing"), "missing")
    assert_user_error(run_cli("serve", demo_fp32, "--backend", "fastest"), "unknown backend")


def test_scheduler_batches_compatible_jobs_only():
    """request: the oldest job plus the queued ones with its size, steps, guidance, clip skip,
    task and LoRA set, within --max-batch images; none: one job a call; a full queue is a 429."""
    from sdrt.serve import spec as sp
    from sdrt.serve.scheduler import Scheduler
    mk = lambda n=1, steps=10, loras=(), w=32: sp.Spec("p", "", steps, 5.0, w, 32, n, list(range(n)), loras=loras)
    sched = Scheduler("request", max_batch=4, max_queue=8)
    a, b, c, d, e, f = (sched.submit(s) for s in (mk(), mk(steps=20), mk(n=2), mk(loras=(("x", 1.0),)), mk(n=2),
                                                  mk(w=64)))
    assert sched.next_batch() == [a, c]                      # e would make 5 images
    assert sched.next_batch() == [b]
    assert sched.next_batch() == [e]                         # d needs another LoRA set: the loaded
    assert sched.next_batch() == [f]                         # set's jobs first, LORA_PASSES of them
    assert sched.next_batch() == [d]
    assert sched.next_batch(wait=0.01) == []
    # the oldest job needs another LoRA set: up to LORA_PASSES calls of the loaded set go first
    lora = (("x", 1.0),)
    x, p1, p2, p3 = (sched.submit(s) for s in (mk(loras=lora), mk(), mk(steps=20), mk(w=64)))
    assert [sched.next_batch(), sched.next_batch(), sched.next_batch()] == [[p1], [p2], [x]]
    sched.loaded_loras = lora
    assert sched.next_batch() == [p3]
    none = Scheduler("none", max_batch=4, max_queue=2)
    g, h = none.submit(mk()), none.submit(mk())
    with pytest.raises(sp.ApiError) as err:
        none.submit(mk())
    assert err.value.status == 429
    none.cancel(g)
    assert g.state == "cancelled" and none.next_batch() == [h]


def test_tensorrt_engine_profile_bounds_batch_and_sizes():
    """Built step engines take a batch and size range: the server's limits stay inside it."""
    from sdrt.serve.server import engine_profile
    prof = lambda lo, hi: {"key": {"profile": {"latents": {"min": lo, "opt": lo, "max": hi}}}}
    manifest = {"engines": {"tensorrt": {"denoise_step_cfg": prof([1, 4, 32, 32], [4, 4, 96, 64]),
                                         "denoise_step": prof([1, 4, 40, 32], [2, 4, 96, 96]),
                                         "text_encoder": {"key": {"profile": {}}}}}}
    assert engine_profile(manifest, "tensorrt", 8) == {"batch": 2, "min_size": 320, "max_size": 512}
    assert engine_profile(manifest, "onnxruntime-cpu", 8) is None
