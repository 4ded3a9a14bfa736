"""`sdrt memory`: activation liveness (golden values on a hand-made graph) and the Jetson budget."""
from __future__ import annotations

import json

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


def test_attention_op_keeps_scores_out_of_memory(tiny_fp32, tiny_fp32_decomposed):
    """The decomposed graph materializes softmax(QK^T) ([B*heads, T, T]); the Attention op does not."""
    op = memory.estimate(tiny_fp32, 64, 64, 2)
    dec = memory.estimate(tiny_fp32_decomposed, 64, 64, 2)
    for e in (op, dec):
        assert all(m["unknown_tensors"] == 0 for m in e["models"].values())
        assert e["total_bytes"] == e["weights_bytes"] + e["activation_bytes"] + e["io_bytes"]
        assert e["activation_bytes"] == max(m["activation_bytes"] for m in e["models"].values())
    step_op = op["models"]["denoise_step_cfg"]["activation_bytes"]
    step_dec = dec["models"]["denoise_step_cfg"]["activation_bytes"]
    tokens = (64 // 8) * (64 // 8)
    assert step_dec - step_op >= 2 * 2 * tokens * tokens * 4   # at least one [2B, T, T] fp32 score matrix
    assert op["models"]["denoise_step_cfg"]["weights_from"] == "onnx"
    assert op["weights_bytes"] == pytest.approx(dec["weights_bytes"], rel=0.05)
    # io: latents ping-pong, embeddings, step table... exactly the contract's buffers
    io = op["models"]["vae_decoder"]["io_bytes"]
    assert io == 2 * 4 * 8 * 8 * 4 + 2 * 3 * 64 * 64 * 4


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
