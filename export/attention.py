"""How attention is written into the ONNX graph: one ONNX `Attention` op, or decomposed.

    with attention_form("op"):   torch.onnx.export(...)      # every SDPA call -> one Attention node

`op` (the default): each `scaled_dot_product_attention` of the traced module (the UNet's self and
cross attention, the VAE's mid-block attention) becomes one ONNX `Attention` node (opset 23,
4-D [batch, heads, tokens, head_dim] inputs, softmax(Q·Kᵀ·scale)·V). It is the one attention
form the backends sdrt targets fuse as written:
  - ONNX Runtime CUDA EP runs Attention-23 with flash / memory-efficient kernels (since 1.25,
    microsoft/onnxruntime#27542); ONNX Runtime CPU runs it too, so the export is validated.
  - TensorRT's parser maps it onto its IAttention layer (a fused kernel) from 10.14 on;
    TensorRT-RTX 1.7 does the same (checked: the parsed network has ATTENTION_INPUT/OUTPUT layers).
  - ONNX Runtime's own UNet fusion (onnxruntime.transformers) is not needed for attention.

`decomposed`: what torch writes by default (MatMul, Softmax, MatMul), at any opset >= 17. It is
for TensorRT older than 10.14 (JetPack 6 ships 10.3), which fuses that pattern itself but cannot
parse the Attention op.

The TorchScript exporter stops at opset 20, so the graph is traced at 20 with Attention written by
the symbolic below and then declared opset 23 (`declare_opset`). That is sound for what SD's
graphs contain: every op they use that changed between 20 and 23 (`CHANGED_20_TO_23`) changed only
by new types (Cast also by a `saturate` attribute that concerns float8 alone), never the meaning of
the old ones; a test checks that the exported graphs use no other changed op, and the export is
validated against torch after this step like any other. SDPA calls that are not 4-D fall back to
torch's own decomposition.
"""
from __future__ import annotations

import contextlib

from sdrt.errors import UserError

FORMS = ("op", "decomposed")
OP_OPSET = 23            # Attention's first opset, and the only one the op form is declared at
TRACE_OPSET_MAX = 20     # the TorchScript exporter's last opset
CHANGED_20_TO_23 = {"Cast", "ConstantOfShape", "Conv", "Cos", "Identity", "InstanceNormalization", "Reshape",
                    "Shape", "Sin", "Transpose", "Unsqueeze",
                    "Pad"}   # new types only (see above). Pad: the VAE encoder's downsampling pad;
                             # Pad-21 and -23 keep Pad-19's inputs, attribute and modes

TRT_FIRST = (10, 14)     # first TensorRT whose ONNX parser takes Attention
_SDPA = "aten::scaled_dot_product_attention"


def resolve_opset(form: str, opset: int | None) -> int:
    """The opset to export `form` at: the form's default when None, else `opset` once checked."""
    if form not in FORMS:
        raise UserError(f"unknown --attention {form!r}: use op (one ONNX Attention op, opset 23) "
                        f"or decomposed (MatMul/Softmax/MatMul, for TensorRT before 10.14)")
    if opset is None:
        return OP_OPSET if form == "op" else 18
    if opset < 17:
        raise UserError(f"--opset {opset} is too old: sdrt exports opset 17 or newer")
    if form == "op" and opset != OP_OPSET:
        raise UserError(f"--attention op needs --opset {OP_OPSET} (ONNX's Attention op as sdrt writes it); "
                        f"use --attention decomposed for opset {opset}")
    if form == "decomposed" and opset > TRACE_OPSET_MAX:
        raise UserError(f"--opset {opset}: --attention decomposed exports opset 17 to {TRACE_OPSET_MAX} "
                        f"(torch's TorchScript exporter); opset {OP_OPSET} is --attention op")
    return opset


def trace_opset(opset: int) -> int:
    """The opset torch.onnx traces at (its last is 20); `declare_opset` then sets `opset`."""
    return min(opset, TRACE_OPSET_MAX)


def _symbolic():
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset14

    @sh.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
    def sdpa(g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):   # enable_gqa: torch >= 2.5
        if sh._get_tensor_rank(query) != 4 or dropout_p or enable_gqa:   # not SD's form: torch's own
            return symbolic_opset14.scaled_dot_product_attention(
                g, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        inputs = [query, key, value] + ([] if sh._is_none(attn_mask) else [attn_mask])
        attrs = {"is_causal_i": 1} if is_causal else {}
        if not sh._is_none(scale):  # default, as in torch: 1/sqrt(head_dim)
            attrs["scale_f"] = sh._get_const(scale, "f", "scale")
        out = g.op("Attention", *inputs, **attrs)
        out.setType(query.type())   # [B, heads, q tokens, head_dim]: SD's V head_dim == Q's
        return out
    return sdpa


@contextlib.contextmanager
def attention_form(form: str):
    """While tracing: SDPA -> ONNX Attention for "op"; torch's own decomposition otherwise."""
    if form != "op":
        yield
        return
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic
    register_custom_op_symbolic(_SDPA, _symbolic(), 17)
    try:
        yield
    finally:
        unregister_custom_op_symbolic(_SDPA, 17)


def declare_opset(model, opset: int) -> None:
    """Set the default-domain opset of an onnx ModelProto (see the module note on why it holds)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset


def count_ops(model) -> dict:
    """How the graph writes attention: Attention nodes, and Softmax nodes (decomposed form)."""
    ops = [n.op_type for n in model.graph.node]
    return {"Attention": ops.count("Attention"), "Softmax": ops.count("Softmax")}
