"""torch modules -> ONNX files, one per contract model, then graph cleanup.

FP16 is traced from the fp16 module itself, so the graph is strongly typed FP16 end to end
(TensorRT 11 takes nothing else); the only FP32 islands are those the contract asks for (latents
and image at the model boundary, the timestep) and those torch keeps itself (the timestep
sinusoid).
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from sdrt.contract import Dims, Model
from sdrt.export import attention

TWO_GB = 2 ** 31 - 1
# Graphs whose weights LoRA changes at run time: every initializer goes to the external .data file,
# where the runtime reads the base weights (sdrt.engine.lora) without parsing the graph.
WEIGHTS_BESIDE = ("text_encoder", "unet")
FLOAT_TYPES = (1, 10, 16)  # onnx.TensorProto FLOAT, FLOAT16, BFLOAT16


def _modules():
    import torch

    class TextEncoder(torch.nn.Module):
        """Token embeddings -> final_layer_norm(hidden state of layer L - clip_skip + 1).

            h_0 = inputs_embeds + position_embedding        (the token lookup is the runtime's)
            h_l = layer_l(h_l-1, causal mask),  l = 1..L
            out = final_layer_norm(h_{L + 1 - clip_skip})  clip_skip 1: h_L, CLIPTextModel's output

        Every layer runs; the chosen one is gathered from their stack, so one graph (and one
        engine) serves every clip skip. The CLIPTextModel stays `self.m`, so the graph's weights
        are what they were with token ids: initializers named m.encoder.layers.N... (layer norms,
        biases) and the Linear weights as the exporter's transposed MatMul initializers; only the
        token table left the graph (WORK_DIR/token_embedding.npy). The output is in the UNet's
        dtype (an FP32 text encoder of an FP16 export casts its output, and its input)."""
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.out_dtype = None

        def forward(self, inputs_embeds, clip_skip):
            from transformers.masking_utils import create_causal_mask
            dtype = self.m.final_layer_norm.weight.dtype
            h = self.m.embeddings(inputs_embeds=inputs_embeds.to(dtype))
            mask = create_causal_mask(config=self.m.config, inputs_embeds=h, attention_mask=None, cache=None)
            states = []
            for layer in self.m.encoder.layers:
                h = layer(h, mask, is_causal=True)
                states.append(h)
            index = (len(states) - clip_skip).long()                       # [1]
            chosen = torch.stack(states).index_select(0, index).reshape(h.shape)  # [rows, 77, D]
            out = self.m.final_layer_norm(chosen)
            return out if self.out_dtype is None else out.to(self.out_dtype)

    class UNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
            labels = None if class_labels is None else class_labels.long()   # int32 at the boundary
            return self.m(sample, timestep, encoder_hidden_states, class_labels=labels, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        """fp32 latents -> fp32 image in [-1, 1], with 1/scaling_factor folded in."""
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.inv_scale = 1.0 / m.config.scaling_factor

        def forward(self, latents):
            dtype = next(self.m.parameters()).dtype
            return self.m.decode((latents * self.inv_scale).to(dtype), return_dict=False)[0].float()

    class VaeEncoder(torch.nn.Module):
        """fp32 image in [-1, 1] -> fp32 latents: the posterior's mean times scaling_factor (diffusers'
        sample_mode="argmax"; deterministic)."""
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.scale = m.config.scaling_factor

        def forward(self, image):
            dtype = next(self.m.parameters()).dtype
            mean = self.m.encode(image.to(dtype), return_dict=False)[0].mean
            return (mean * self.scale).float()

    return TextEncoder, UNet, VaeDecoder, VaeEncoder


def wrap(name: str, folder) -> object:
    """The torch module that computes contract model `name` (float32, eval)."""
    TextEncoder, UNet, VaeDecoder, VaeEncoder = _modules()
    return {"text_encoder": lambda: TextEncoder(folder.text_encoder),
            "unet": lambda: UNet(folder.unet),
            "vae_decoder": lambda: VaeDecoder(folder.vae),
            "vae_encoder": lambda: VaeEncoder(folder.vae)}[name]()


def trace_dims(sample_hw: tuple[int, int], upsamplers: int, text_len: int = 77) -> Dims:
    """Shapes to trace at. Neither latent side is a multiple of the UNet's overall upsampling
    (2 ** upsamplers): diffusers then passes every upsampler the size of its skip connection
    (`forward_upsample_size`), the traced Resize nodes take their size from that tensor, and the
    graph takes any latent size (images in multiples of the VAE factor, not of 64). A size that
    happened to be a multiple would bake x2 upsampling into the graph."""
    f = 2 ** upsamplers
    h = f * max(sample_hw[0] // (4 * f), 1) + 1            # == 1 (mod f): 17 for SD 1.5
    return Dims(batch=1, height=h, width=h + 2, cfg=True, vae_factor=1, text_len=text_len)


def image_trace_dims(trace: Dims, vae_factor: int) -> Dims:
    """The trace shape for a model that takes images (the VAE encoder): the same latent size in
    pixels."""
    return Dims(batch=1, height=trace.height * vae_factor, width=trace.width * vae_factor, cfg=True,
                vae_factor=vae_factor, text_len=trace.text_len)


def example_inputs(model: Model, dims: Dims, vocab_size: int, seed: int = 0, classes: int = 1) -> dict:
    """Random inputs of the contract's names, shapes and dtypes (numpy); class labels in 0..classes-1."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = {}
    for t in model.inputs:
        shape = t.resolve(dims)
        if t.name == "clip_skip":
            out[t.name] = np.ones(1, np.int32)
        elif t.name == "class_labels":
            out[t.name] = rng.integers(0, max(classes, 1), size=shape).astype(np.int32)
        elif t.name == "timestep":
            out[t.name] = np.array([rng.integers(1, 1000)], dtype=np.float32)
        else:
            out[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return out


def token_embeddings(table, dims: Dims, seed: int = 0):
    """Rows of `table` for random prompts: [text_rows, text_len, D], bos first, eos last (the
    realistic inputs of the text encoder, for tracing and validation)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    vocab = table.shape[0]
    ids = rng.integers(0, vocab - 2, size=(dims["text_rows"], dims.text_len))
    ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1
    return np.ascontiguousarray(table[ids])


def token_table(text_encoder, precision: str):
    """The text encoder's token-embedding table as numpy, in the export's precision."""
    import numpy as np
    table = text_encoder.get_input_embeddings().weight.detach().float().numpy()
    return table.astype(np.float16 if precision == "fp16" else np.float32)


def export(module, model: Model, out_path: Path, inputs: dict, precision: str, opset: int,
           attention_form: str = "op", external: bool | None = None) -> None:
    """Trace `module` to out_path (weights over 2 GB, and the UNet's always, to one .data file),
    attention written as `attention_form` (sdrt.export.attention)."""
    import torch

    dtype = torch.float16 if precision == "fp16" else torch.float32
    module = module.to(dtype)
    if hasattr(module, "out_dtype"):              # the contract's output dtype, whatever the precision
        module.out_dtype = _torch_dtype(model.outputs[0].dtype)
    args = tuple(torch.from_numpy(inputs[t.name]).to(_torch_dtype(t.dtype)) for t in model.inputs)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad(), attention.attention_form(attention_form):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), dynamo=False,
                              opset_version=attention.trace_opset(opset),
                              input_names=[t.name for t in model.inputs],
                              output_names=[t.name for t in model.outputs],
                              dynamic_axes=model.dynamic_axes(), do_constant_folding=True)
        cleanup_and_save(raw, out_path, external=model.name in WEIGHTS_BESIDE if external is None else external,
                         opset=opset)
    module.float()


def cleanup_and_save(src: Path, dst: Path, external: bool, opset: int) -> None:
    """Final opset, constant folding, dead-node removal, topological sort (graphsurgeon), shape
    inference."""
    import onnx
    import onnx_graphsurgeon as gs

    model = onnx.load(str(src))
    attention.declare_opset(model, opset)
    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup().toposort()
    model = gs.export_onnx(graph)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size < TWO_GB:
        model = onnx.shape_inference.infer_shapes(model)
    if external or size >= TWO_GB:
        from onnx.external_data_helper import convert_model_to_external_data, set_external_data
        location = dst.name + ".data"
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location,
                                       size_threshold=1024)
        if external:  # weights of any size too (LoRA reads them there); shape constants stay inline
            for t in model.graph.initializer:
                if (len(t.dims) >= 2 and t.data_type in FLOAT_TYPES and t.HasField("raw_data")
                        and t.data_location != onnx.TensorProto.EXTERNAL):
                    set_external_data(t, location)
        onnx.save_model(model, str(dst))
    else:
        onnx.save_model(model, str(dst))


def onnx_graph(path: Path):
    """The graph without its weights."""
    import onnx
    return onnx.load(str(path), load_external_data=False)


def _torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32}[name]
