"""`sdrt memory`: activation liveness (golden values on a hand-made graph) and the Jetson budget."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_user_error, run_cli
from sdrt.benchmarks import memory


def _chain():
    """x -> a=Relu(x) -> b=Relu(a) -> c=Add(a, b) -> y=Relu(c); 1024 float32 each (4 KiB)."""
    from onnx import TensorProto, helper
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1024])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "chain", [vi("x")], [vi("y")]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_activation_peak_golden():
    proto = _chain()
    sizes = memory.tensor_bytes(proto)
    assert sizes["a"] == sizes["b"] == sizes["c"] == 4096
    # a and b are both alive when c is written: 3 x 4 KiB; x and y are I/O, counted elsewhere
    assert memory.activation_peak(proto, sizes) == (3 * 4096, 0)
    assert memory.activation_peak(proto, {"a": 4096}) == (4096, 2)   # b, c unknown: reported


def test_activation_peak_attention_unread_and_repeated_inputs():
    """An Attention node frees its K and V at their last use even though shape inference sees
    Identity(query); an output nobody reads dies with its node; Mul(x, x) frees x once."""
    from onnx import TensorProto, helper
    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
    shape = [1, 2, 16, 8]                              # [B, heads, tokens, head_dim]: 1 KiB each
    nodes = [helper.make_node("Relu", ["x"], ["q"]), helper.make_node("Relu", ["x"], ["k"]),
             helper.make_node("Relu", ["x"], ["v"]), helper.make_node("Relu", ["x"], ["unread"]),
             helper.make_node("Attention", ["q", "k", "v"], ["o"]),
             helper.make_node("Mul", ["o", "o"], ["sq"]), helper.make_node("Relu", ["sq"], ["y"])]
    graph = helper.make_model(helper.make_graph(nodes, "attn", [vi("x", shape)], [vi("y", shape)]),
                              opset_imports=[helper.make_opsetid("", 23)])
    from sdrt.contract import Dims, Model, Tensor
    model = Model("m", "m.onnx", (Tensor("x", "float32", tuple(shape)),), (Tensor("y", "float32", tuple(shape)),))
    sizes = memory.tensor_bytes(memory.graph_for_shapes(graph, model, Dims(1, 8, 8)))
    assert {n: sizes[n] for n in ("q", "k", "v", "unread", "o", "sq")} == dict.fromkeys(
        ("q", "k", "v", "unread", "o", "sq"), 1024)
    # q, k, v alive + unread (dies at once): peak 4 KiB at "unread"; then q, k, v + o = 4 KiB
    assert memory.activation_peak(graph, sizes) == (4 * 1024, 0)
    assert [n.op_type for n in graph.graph.node][4] == "Attention"   # the export's graph untouched


def test_attention_op_keeps_scores_out_of_memory(tiny_fp32, tiny_fp32_decomposed):
    """The decomposed graph materializes softmax(QK^T) ([B*heads, T, T]); the Attention op does not."""
    op = memory.estimate(tiny_fp32, 64, 64, 2)
    dec = memory.estimate(tiny_fp32_decomposed, 64, 64, 2)
    for e in (op, dec):
        assert all(m["unknown_tensors"] == 0 for m in e["models"].values())
        assert e["total_bytes"] == e["weights_bytes"] + e["activation_bytes"] + e["io_bytes"]
        assert e["activation_bytes"] == max(m["activation_bytes"] for m in e["models"].values())
    assert list(op["models"]) == ["text_encoder", "denoise_step_cfg", "vae_encoder", "vae_decoder"]
    assert op["step"] == "denoise_step_cfg"
    for name in op["models"]:   # the fused op never needs more than the chain it replaces
        assert op["models"][name]["activation_bytes"] <= dec["models"][name]["activation_bytes"], name
    step_op = op["models"]["denoise_step_cfg"]["activation_bytes"]
    step_dec = dec["models"]["denoise_step_cfg"]["activation_bytes"]
    tokens = (64 // 8) * (64 // 8)
    assert step_dec - step_op >= 2 * 2 * tokens * tokens * 4   # at least one [2B, T, T] fp32 score matrix
    assert op["models"]["denoise_step_cfg"]["weights_from"] == "onnx"
    assert op["weights_bytes"] == pytest.approx(dec["weights_bytes"], rel=0.05)
    # io: what make_plan binds: token embeddings, clip skip, text embeddings, latents x2,
    # step index x2 (one per sample), step table (15 columns), the sampler state (x̂0 x2, a noise
    # buffer of one row), image, and the VAE encoder's image and latents at batch 1
    tokens_in, emb = 2 * 2 * 77 * 32 * 4, 2 * 2 * 77 * 32 * 4
    latents, table, image = 2 * 4 * 8 * 8 * 4, 1000 * 15 * 4, 2 * 3 * 64 * 64 * 4
    encoder = 3 * 64 * 64 * 4 + 4 * 8 * 8 * 4
    assert op["io_bytes"] == (tokens_in + 4 + emb + 2 * latents + 2 * 2 * 4 + table + 3 * latents + image
                              + encoder)


def test_memory_cli(tiny_fp32, tiny_fp32_decomposed, tmp_path):
    out = tmp_path / "budget.md"
    p = run_cli("memory", tiny_fp32, tiny_fp32_decomposed, "--sizes", "64x64", "--batches", "1,2", "--out", out)
    assert p.returncode == 0, p.stderr
    table = out.read_text()
    assert "Jetson Orin Nano 8GB" in table and "fp32, attention op" in table and "attention decomposed" in table
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(e["attention"], e["batch"]) for e in data["estimates"]] == [
        ("op", 1), ("op", 2), ("decomposed", 1), ("decomposed", 2)]
    assert_user_error(run_cli("memory", tiny_fp32, "--sizes", "60x64"), "multiple of 8")
    assert_user_error(run_cli("memory", tiny_fp32, "--sizes", "64x64x3"), "--sizes")
    assert_user_error(run_cli("memory", tmp_path / "nope"), "nope")
    assert_user_error(run_cli("memory", tiny_fp32, "--out", tmp_path / "no" / "x.md"), "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp32, broken)
    (broken / "onnx" / "vae_decoder.onnx").unlink()
    assert_user_error(run_cli("memory", broken), "vae_decoder")


def test_inpainting_export_counts_its_step_and_the_encoder(tiny_inpaint_fp32):
    e2 = memory.estimate(tiny_inpaint_fp32, 64, 96, 2)
    e4 = memory.estimate(tiny_inpaint_fp32, 64, 96, 4)
    assert set(e2["models"]) == {"text_encoder", "denoise_step_inpaint_cfg", "vae_encoder", "vae_decoder"}
    enc = [e["models"]["vae_encoder"]["activation_bytes"] for e in (e2, e4)]
    assert enc[0] > 0 and enc[0] == enc[1]        # one image per call: batch 1 whatever the batch
    assert e4["models"]["denoise_step_inpaint_cfg"]["activation_bytes"] > \
        e2["models"]["denoise_step_inpaint_cfg"]["activation_bytes"]
    assert "vae enc act MB" in memory.table([e2])


def test_vae_batch_shrinks_the_vae_activation(tiny_fp32, tmp_path):
    """Decoding 1 image at a time needs the VAE activations of batch 1, whatever the batch."""
    whole, sliced, one = (memory.estimate(tiny_fp32, 64, 64, b, vae_batch=v) for b, v in ((4, None), (4, 1), (1, None)))
    vae = lambda e: e["models"]["vae_decoder"]["activation_bytes"]
    assert vae(sliced) == vae(one) < vae(whole) and (sliced["vae_batch"], whole["vae_batch"]) == (1, 4)
    assert sliced["models"]["denoise_step_cfg"] == whole["models"]["denoise_step_cfg"]
    assert sliced["total_bytes"] <= whole["total_bytes"]
    out = tmp_path / "m.md"
    p = run_cli("memory", tiny_fp32, "--sizes", "64x64", "--batches", "4", "--vae-batch", "1", "--out", out)
    assert p.returncode == 0, p.stderr
    assert "| vae batch |" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["estimates"][0]["vae_batch"] == 1
    assert_user_error(run_cli("memory", tiny_fp32, "--vae-batch", "0"), "--vae-batch")
