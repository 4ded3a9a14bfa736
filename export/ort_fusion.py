"""ONNX Runtime's own UNet fusions, for the ONNX Runtime backends (TensorRT keeps the plain graph:
it fuses attention itself and cannot parse com.microsoft ops).

The anchors saw onnxruntime.transformers' UNet attention fusion crash on a torch 2.x export, so
attention ran unfused on the ORT CUDA path. The crash is not the export: ORT's
FusionAttentionUnet.get_num_heads calls int() on a 1-element array, an error since NumPy 2.
With that one method mended (`_patch_num_heads`), all attentions of sdrt's UNet fuse into
com.microsoft MultiHeadAttention when Q/K/V may be packed (8 of 8 in the tiny UNet), half of them
(4 of 8) when not.

By default only fusions whose kernels also exist on ONNX Runtime CPU are enabled (unpacked MHA,
LayerNorm/SkipLayerNorm, Gelu), so the fused graph is validated like every other export. Packed
Q/K/V and the CUDA-only fusions (NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu) have no CPU
kernels: `cuda_only=True` enables them, for a GPU session to validate on the CUDA EP and
measure. ORT fuses the FP32 graph; FP16 is converted after (the timestep stays FP32, as the
contract says).
"""
from __future__ import annotations

from pathlib import Path

CUDA_ONLY = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
             "enable_packed_qkv", "enable_packed_kv")


def _patch_num_heads() -> None:
    import fusion_attention_unet as fau  # ORT imports its fusion modules by bare name
    import numpy as np

    cls = fau.FusionAttentionUnet
    if getattr(cls, "_sdrt_patched", False):
        return
    original = cls.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2=False):
        if not is_torch2:
            return original(self, reshape_q, is_torch2)
        parent = self.model.get_parent(reshape_q, 1)   # Concat([0, 0, heads, head_dim])
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1:
                return max(int(value.reshape(-1)[0]), 0)
        return 0

    cls.get_num_heads = get_num_heads
    cls._sdrt_patched = True


def fuse_unet(src_fp32: Path, dst: Path, precision: str, cuda_only: bool = False) -> dict:
    """Fuse src (an FP32 unet.onnx) into dst (+ dst.data); returns the fused op counts."""
    import collections

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model
    _patch_num_heads()
    opts = FusionOptions("unet")
    for flag in CUDA_ONLY:
        setattr(opts, flag, cuda_only)
    model = optimize_model(str(src_fp32), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=opts, use_gpu=False)
    if precision == "fp16":
        model.convert_float_to_float16(keep_io_types=["timestep"])
    model.save_model_to_file(str(dst), use_external_data_format=True, all_tensors_to_one_file=True)
    ops = collections.Counter(n.op_type for n in model.model.graph.node)
    return {op: ops[op] for op in ("MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization")}


def fuse_unet_in_subprocess(src_fp32: Path, dst: Path, precision: str) -> dict:
    """fuse_unet in a child process: the optimizer holds several copies of a 3.4 GB graph, and
    only a process exit hands that memory back before validation needs it."""
    import json
    import subprocess
    import sys

    from sdrt.errors import UserError
    proc = subprocess.run([sys.executable, "-m", "sdrt.export.ort_fusion", str(src_fp32), str(dst), precision],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (f"killed by signal {-proc.returncode}: out of memory?" if proc.returncode < 0 else
                (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
        raise UserError(f"ONNX Runtime's UNet fusion failed ({last[:300]}); export without --ort-fusion")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(fuse_unet(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])))
