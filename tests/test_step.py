"""The denoising step as a type (sdrt.contract.Step): names, inputs, build flags, which models a
generation runs, the manifest record, and the per-variant graph and reference tables."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt import manifest as mf
from sdrt.contract import (RUNTIME_MODELS, Model, ModelConfig, Step, Task, Variant, all_models, denoise_step,
                           engine_tasks, models_of_tasks, task_models)
from sdrt.errors import UserError

UNET4, UNET9 = ModelConfig(), ModelConfig(unet_channels=9)
UNET_SR = ModelConfig(unet_channels=7, vae_factor=4, class_embeds=1000, image_channels=3)   # the x4 upscaler's


def config_of(variant: Variant) -> ModelConfig:
    return {Variant.concat: UNET9, Variant.upscale: UNET_SR}.get(variant, UNET4)


def test_step_names_and_inputs_are_those_exports_have_on_disk():
    names = {(s.variant.value, s.guidance): s.name for s in Step.every()}
    assert names == {("plain", True): "denoise_step_cfg", ("plain", False): "denoise_step",
                     ("blend", True): "denoise_step_blend_cfg", ("blend", False): "denoise_step_blend",
                     ("concat", True): "denoise_step_inpaint_cfg", ("concat", False): "denoise_step_inpaint",
                     ("upscale", True): "denoise_step_upscale_cfg", ("upscale", False): "denoise_step_upscale"}
    common = ["latents", "text_embeddings", "step_table", "step_index", "x0_prev", "step_noise"]
    extra = {"plain": [], "blend": ["mask", "image_latents", "noise"], "concat": ["mask", "masked_image_latents"],
             "upscale": ["low_res_image", "class_labels"]}
    for s in Step.every():
        m = denoise_step(config_of(s.variant), "fp16", s.guidance, s.variant)
        assert (m.name, m.onnx, m.step) == (s.name, s.name + ".onnx", s)
        assert [t.name for t in m.inputs] == common + extra[s.variant.value] == common + list(s.extra_inputs)
        assert [t.name for t in m.outputs] == ["latents_next", "step_index_next", "x0_next"]
        assert Step.named(s.name) == s and Step.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert Step.named("unet") is None and Step("blend", True).variant is Variant.blend
    assert [m for m in RUNTIME_MODELS if Step.named(m)] == [s.name for s in Step.every()]


def test_the_steps_an_export_has():
    assert [s.name for s in Step.of_unet(UNET4)] == ["denoise_step_cfg", "denoise_step", "denoise_step_blend_cfg",
                                                    "denoise_step_blend"]
    assert [s.name for s in Step.of_unet(UNET9)] == ["denoise_step_inpaint_cfg", "denoise_step_inpaint"]
    assert [s.name for s in Step.of_unet(UNET_SR)] == ["denoise_step_upscale_cfg", "denoise_step_upscale"]
    assert [n for n, m in all_models(UNET4, "fp32").items() if m.step] == [s.name for s in Step.of_unet(UNET4)]
    assert all(m.step is None for n, m in all_models(UNET4, "fp32").items() if n in
               ("text_encoder", "unet", "vae_decoder", "vae_encoder"))


def test_which_models_a_generation_runs():
    assert Task.of(image=False, mask=False) is Task.text_to_image
    assert Task.of(image=True, mask=False) is Task.image_to_image and Task.of(True, True) is Task.inpainting
    assert task_models(UNET4, Task.text_to_image, True) == ("text_encoder", "denoise_step_cfg", "vae_decoder")
    assert task_models(UNET4, Task.image_to_image, False) == ("text_encoder", "denoise_step", "vae_encoder",
                                                              "vae_decoder")
    assert task_models(UNET4, Task.inpainting, True) == ("text_encoder", "denoise_step_blend_cfg", "vae_encoder",
                                                         "vae_decoder")
    assert task_models(UNET9, Task.inpainting, False) == ("text_encoder", "denoise_step_inpaint", "vae_encoder",
                                                          "vae_decoder")
    for task in (Task.text_to_image, Task.image_to_image):
        with pytest.raises(UserError, match="inpainting UNet .9 input channels.: it needs --image and --mask"):
            task_models(UNET9, task, True)
    assert task_models(UNET_SR, Task.upscaling, True) == ("text_encoder", "denoise_step_upscale_cfg", "vae_decoder")
    for task in (Task.text_to_image, Task.image_to_image, Task.inpainting):
        with pytest.raises(UserError, match="super-resolution UNet .7 input channels.: it needs --image"):
            task_models(UNET_SR, task, True)
    with pytest.raises(UserError, match="no denoising step for upscaling"):
        task_models(UNET4, Task.upscaling, True)


def test_what_build_and_memory_cover():
    """`sdrt build` (and `sdrt memory`): the UNet's tasks, inpainting with a 4-channel UNet only when
    asked, image inputs only in exports with a VAE encoder; models in run order, each once."""
    assert engine_tasks(UNET4) == (Task.text_to_image, Task.image_to_image)
    assert engine_tasks(UNET4, inpaint=True) == (Task.text_to_image, Task.image_to_image, Task.inpainting)
    assert engine_tasks(UNET_SR) == engine_tasks(UNET_SR, image_inputs=False) == (Task.upscaling,)
    assert models_of_tasks(UNET_SR, engine_tasks(UNET_SR), True) == (
        "text_encoder", "denoise_step_upscale_cfg", "vae_decoder")
    assert engine_tasks(UNET4, inpaint=True, image_inputs=False) == (Task.text_to_image,)
    assert engine_tasks(UNET9) == engine_tasks(UNET9, inpaint=True) == (Task.inpainting,)
    assert models_of_tasks(UNET4, engine_tasks(UNET4, inpaint=True), False) == (
        "text_encoder", "denoise_step", "denoise_step_blend", "vae_encoder", "vae_decoder")
    assert models_of_tasks(UNET4, engine_tasks(UNET4, image_inputs=False), True) == (
        "text_encoder", "denoise_step_cfg", "vae_decoder")
    assert models_of_tasks(UNET9, engine_tasks(UNET9), True) == (
        "text_encoder", "denoise_step_inpaint_cfg", "vae_encoder", "vae_decoder")


def test_build_flags_say_how_to_build_each_step():
    flags = {s.name: s.build_flags for s in Step.every()}
    assert flags == {"denoise_step_cfg": (), "denoise_step": ("--no-guidance",),
                     "denoise_step_blend_cfg": ("--inpaint",), "denoise_step_blend": ("--no-guidance", "--inpaint"),
                     "denoise_step_inpaint_cfg": (), "denoise_step_inpaint": ("--no-guidance",),
                     "denoise_step_upscale_cfg": (), "denoise_step_upscale": ("--no-guidance",)}


def test_the_step_is_recorded_but_not_part_of_the_engine_key():
    """Model.to_json records the Step; the engine key's io digest covers the I/O alone, so engines
    built before the step was recorded stay valid (digests as the engine keys record them; the
    samplers' state inputs changed the I/O, so engines built before them are rebuilt)."""
    from sdrt.engine.engine_keys import io_digest
    m = denoise_step(UNET4, "fp16", False, "blend")
    assert m.to_json() == {**m.io_json(), "step": {"variant": "blend", "guidance": False}}
    assert Model.from_json(m.name, m.to_json()) == m
    assert "step" not in all_models(UNET4, "fp16")["unet"].to_json()
    digests = {s.name: io_digest(denoise_step(UNET4, "fp16", s.guidance, s.variant)) for s in Step.of_unet(UNET4)}
    assert digests == {"denoise_step_cfg": "d45eb7242812efdd", "denoise_step": "b2cb3ef12dd7838b",
                       "denoise_step_blend_cfg": "ef2dbca1176711cb", "denoise_step_blend": "30600d88bc0d23bf"}
    assert io_digest(denoise_step(UNET9, "fp16", True, "concat")) == "9868d65e91dc3dc1"


def test_manifest_reader_derives_the_step_of_older_exports():
    models = {n: {"contract": {k: v for k, v in m.to_json().items() if k != "step"}}
              for n, m in all_models(UNET4, "fp16").items()}
    got = mf.models({"models": models})
    assert got == all_models(UNET4, "fp16")
    assert got["denoise_step_blend"].step == Step(Variant.blend, False) and got["unet"].step is None


def test_model_precision_is_read_from_the_model_record():
    man = {"precision": "fp16", "models": {"vae_decoder": {"precision": "fp32"}, "unet": {"precision": "fp16"}}}
    assert mf.model_precision(man, "vae_decoder") == "fp32" and mf.model_precision(man, "unet") == "fp16"
    assert mf.precision_label(man) == "fp16 (vae_decoder fp32)"
    older = {"precision": "fp16", "precisions": {"vae_decoder": "fp32"}, "models": {"vae_decoder": {}, "unet": {}}}
    assert mf.model_precision(older, "vae_decoder") == "fp32" and mf.model_precision(older, "unet") == "fp16"
    assert mf.precision_label(older) == "fp16 (vae_decoder fp32)"


def test_every_variant_has_its_graph_and_its_reference():
    """A new Variant without its graph function (compose_step.GRAPHS) or numpy reference
    (export.REFERENCES) fails here, not in an export."""
    from sdrt.export import compose_step, export
    assert set(compose_step.GRAPHS) == set(export.REFERENCES) == set(Variant)
    assert all(len(compose_step.GRAPHS[v]) == len(export.REFERENCES[v]) == 2 for v in Variant)


def test_an_older_export_without_steps_or_model_precisions_gives_the_same_images(tiny_fp32, tmp_path):
    """A manifest as sdrt wrote it before the step and the per-model precision were recorded
    (precisions in one table) runs, with the same image bits."""
    from sdrt.engine.pipeline import Pipeline
    old = tmp_path / "old"
    shutil.copytree(tiny_fp32, old)
    man = json.loads((old / mf.NAME).read_text())
    man["precisions"] = {}
    for name, rec in man["models"].items():
        man["precisions"][name] = rec.pop("precision")
        rec["contract"].pop("step", None)
    (old / mf.NAME).write_text(json.dumps(man))
    assert mf.models(mf.load(old)) == mf.models(mf.load(tiny_fp32))
    image = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    kw = dict(steps=3, seed=4, image=image, mask=mask)
    a, b = (Pipeline(w, "onnxruntime-cpu").generate("a red box", **kw).images for w in (tiny_fp32, old))
    assert np.array_equal(a, b)
