"""`sdrt serve` on an export with a ControlNet: the jobs API's `control` units and the web UI's
ControlNet-extension units (alwayson_scripts.controlnet.args), over plain HTTP, each image equal bit
for bit to what Pipeline.generate draws in process with the same control image, scale, window and
seed; bad units are a 400 naming the field."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from test_controlnet import H, PROMPT, W, cn1_export, cn_folders, control_picture  # noqa: E402,F401
from test_serve import ServeProcess, b64png, error_of, png  # noqa: E402
from sdrt.engine.pipeline import Pipeline  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def cn_server(cn1_export, tmp_path_factory):
    s = ServeProcess(cn1_export, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", 2)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def photo():
    from PIL import Image
    return Image.fromarray(np.random.default_rng(9).integers(0, 255, (H, W, 3)).astype(np.uint8))


def in_process(work, seed, control, **kw):
    return Pipeline(work, backend="onnxruntime-cpu").generate(
        PROMPT, steps=STEPS, guidance=7.5, height=H, width=W, seed=[seed], control=control, **kw).images[0]


def test_jobs_api_control_units_draw_what_the_pipeline_draws(cn_server, cn1_export):
    edges = np.asarray(control_picture(41))
    info = cn_server.http.get("/v1/info").json()
    assert info["controlnets"] == 1
    job = cn_server.job(prompt=PROMPT, seed=3, steps=STEPS, guidance_scale=7.5, width=W, height=H,
                        control=[{"image": b64png(edges), "scale": 0.9, "start": 0.0, "end": 0.8}])
    assert cn_server.wait_job(job["id"])["state"] == "succeeded"
    res = cn_server.http.get(f"/v1/jobs/{job['id']}/result").json()
    want = in_process(cn1_export, 3, [(edges, 0.9, 0.0, 0.8)])
    np.testing.assert_array_equal(png(res["images"][0]), want)
    assert res["info"]["control"] == [{"scale": 0.9, "start": 0.0, "end": 0.8, "preprocess": "none"}]
    assert res["info"]["guess_mode"] is False
    job = cn_server.job(prompt=PROMPT, seed=3, steps=STEPS, guidance_scale=7.5, width=W, height=H, guess_mode=True,
                        control=[{"image": b64png(edges), "scale": 0.9, "start": 0.0, "end": 0.8}])
    assert cn_server.wait_job(job["id"])["state"] == "succeeded"
    res = cn_server.http.get(f"/v1/jobs/{job['id']}/result").json()
    np.testing.assert_array_equal(png(res["images"][0]), in_process(cn1_export, 3, [(edges, 0.9, 0.0, 0.8)],
                                                                    guess_mode=True))
    # canny made by the server from a photo: the image of --control-preprocess canny:50:150
    pytest.importorskip("cv2")
    job = cn_server.job(prompt=PROMPT, seed=4, steps=STEPS, guidance_scale=7.5, width=W, height=H,
                        control=[{"image": b64png(np.asarray(photo())), "preprocess": "canny:50:150"}])
    assert cn_server.wait_job(job["id"])["state"] == "succeeded"
    res = cn_server.http.get(f"/v1/jobs/{job['id']}/result").json()
    want = in_process(cn1_export, 4, [np.asarray(photo())], control_preprocess="canny:50:150")
    np.testing.assert_array_equal(png(res["images"][0]), want)


def test_webui_controlnet_extension_units(cn_server, cn1_export):
    pytest.importorskip("cv2")
    unit = {"enabled": True, "input_image": b64png(np.asarray(photo())), "module": "canny", "threshold_a": 50,
            "threshold_b": 150, "weight": 0.8, "guidance_start": 0.1, "guidance_end": 1.0,
            "model": "control_v11p_sd15_canny", "control_mode": "Balanced"}
    off = {"enabled": False, "image": "unused"}
    body = {"prompt": PROMPT, "seed": 5, "steps": STEPS, "cfg_scale": 7.5, "width": W, "height": H,
            "sampler_name": "DDIM", "alwayson_scripts": {"controlnet": {"args": [unit, off]}}}
    r = cn_server.http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    want = in_process(cn1_export, 5, [(np.asarray(photo()), 0.8, 0.1, 1.0)], control_preprocess="canny:50:150")
    np.testing.assert_array_equal(png(r.json()["images"][0]), want)
    info = json.loads(r.json()["info"])
    assert info["sdrt_not_applied"] == [] and info["sdrt"]["control"][0]["preprocess"] == "canny:50:150"
    # img2img with a ready edge map ("module": "none"); control_mode other than Balanced is named
    edges = np.asarray(control_picture(42))
    unit = {"image": b64png(edges), "module": "none", "weight": 1.2, "control_mode": 2}
    r = cn_server.http.post("/sdapi/v1/img2img", json={
        "prompt": PROMPT, "seed": 6, "steps": STEPS, "cfg_scale": 7.5, "denoising_strength": 0.75,
        "init_images": [b64png(np.asarray(photo()))], "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    want = Pipeline(cn1_export, backend="onnxruntime-cpu").generate(
        PROMPT, steps=STEPS, guidance=7.5, seed=[6], image=np.asarray(photo()), strength=0.75,
        control=[(edges, 1.2)]).images[0]
    np.testing.assert_array_equal(png(r.json()["images"][0]), want)
    assert json.loads(r.json()["info"])["sdrt_not_applied"] == [f"alwayson_scripts.controlnet.args[0].control_mode"]


@pytest.mark.parametrize("route,body,field", [
    ("/v1/jobs", {"control": [{"image": "x"}] * 2}, "control"),
    ("/v1/jobs", {"control": [{"image": "@@"}]}, "control[0].image"),
    ("/v1/jobs", {"control": [{"image": "EDGES", "scale": 11}]}, "control[0].scale"),
    ("/v1/jobs", {"control": [{"image": "EDGES", "start": 0.9, "end": 0.2}]}, "control[0].start"),
    ("/v1/jobs", {"control": [{"image": "EDGES", "preprocess": "depth"}]}, "control[0].preprocess"),
    ("/v1/jobs", {"guess_mode": True}, "guess_mode"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"controlnet": {"args": [{"image": "EDGES", "module": "depth"}]}}},
     "alwayson_scripts.controlnet.args[0].module"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"controlnet": {"args": [{"input_image": "EDGES",
                                                                          "guidance_end": 1.5}]}}},
     "alwayson_scripts.controlnet.args[0].guidance_end"),
    ("/sdapi/v1/txt2img", {"alwayson_scripts": {"controlnet": {"args": "EDGES"}}}, "alwayson_scripts.controlnet.args"),
])
def test_bad_control_units_are_a_400_naming_the_field(cn_server, route, body, field):
    edges = b64png(np.asarray(control_picture(43)))
    body = json.loads(json.dumps(body).replace('"EDGES"', json.dumps(edges)))
    r = cn_server.http.post(route, json={"prompt": PROMPT, "steps": 1, **body})
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == field, r.text


def test_control_units_on_an_export_without_controlnet():
    from sdrt.serve import spec as sp
    lim = sp.Limits(model="plain", default_width=64, default_height=64, multiple=8, min_size=64, max_size=64,
                    max_pixels=64 * 64, max_batch=1, max_steps=10, clip_skip_max=1, loras={}, embeddings=())
    with pytest.raises(sp.ApiError, match="without ControlNet.*--controlnet") as e:
        sp.control_units(lim, [{"image": "x", "fields": {}}])
    assert e.value.status == 400 and e.value.field == "control"
