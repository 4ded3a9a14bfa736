"""Compose the whole denoising step graph: UNet + classifier-free guidance + the sampler's update.

    row_b    = step_table[step_index[b]]                      per sample b: its own row
    t, g     = row.timestep, row.guidance                     t is a float (Karras σ between steps)
    m        = UNet(concat(u, u), concat(t, t), emb)  -> ε_uncond + g (ε_cond - ε_uncond)   (CFG)
               with u = model_in_scale x                      (Euler: x / sqrt(σ² + 1); DDIM: x)
    x̂0       = clip(c_x0_x x + c_x0_m m)                      DDIM eq. 12, "predicted x0"
    ε̂        = c_eps_x x + c_eps_m m                          "direction pointing to x_t"
    x_ddim   = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev) ε̂         (DDIM's arithmetic, first and unchanged)
    x_{t-1}  = x_ddim + c_x x + c_x0_prev x̂0_prev + c_noise z   the other samplers' terms (0 for DDIM)
    x0_next  = x̂0                                             read back as x̂0_prev by the next step
    step_index_next = step_index + 1
z is row step_index[b] of sample b's noise (step_noise[b, i]), filled once per call.

The UNet input u and the output differ per variant (sdrt.contract.Variant), a pair of functions
each (GRAPHS; the step model's Step says which):
    plain    u = x_t                                    latents_next = x_{t-1}
    concat   u = concat(x_t, mask, masked-image latents) (9-channel inpainting UNet)
    upscale  u = concat(x_t, low-res image), the UNet's class labels = the step's class_labels
             (the x4 upscaler: the image noised to the noise level, which is the class label)
    blend    u = x_t, then the known region (mask 0) is put back, re-noised to the next timestep:
             latents_next = (1 - mask) (sqrt(ᾱ_next) x0_img + sqrt(1 - ᾱ_next) ε) + mask x_{t-1}
The mask, image latents and noise are graph inputs bound once per call, not copied per step.
With ControlNets (Step.controlnets > 0) the ControlNet graphs run first and their scaled residuals
are added at the UNet's skip connections and mid block (add_controlnets, below).

The coefficients (sdrt.engine.samplers.step_table) make every sampler and epsilon, v and sample prediction one
linear form. The UNet's initializers are not copied: the step graph points at the UNet's external
data file, so the weights exist once on disk. Guidance math and latents stay FP32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.contract import STEP_TABLE_ROWS, Model, Variant, control_image
from sdrt.errors import UserError
from sdrt.export.to_onnx import onnx_graph

P = "sdrt_step/"  # prefix for everything this module adds to the UNet graph


def compose(unet_path: Path, unet: Model, step: Model, out_path: Path, controlnets=()) -> None:
    """The step graph of `step` (its contract; step.step says the variant and guidance) on top of
    the UNet graph at unet_path, written to out_path. controlnets: [(onnx path, Model)] of the
    export's ControlNets, for a step with ControlNets (step.step.controlnets of them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    base = onnx_graph(unet_path)
    g = base.graph
    f_type = TensorProto.FLOAT16 if unet.tensor("sample").dtype == "float16" else TensorProto.FLOAT
    guidance, (unet_input, finish) = step.step.guidance, GRAPHS[step.step.variant]
    opset = next(o.version for o in base.opset_import if o.domain in ("", "ai.onnx"))
    io = {t.name for t in step.tensors}   # graph I/O keeps its name; all else goes under P

    def node(op, inputs, outputs, **attrs):
        return helper.make_node(op, [_n(i, io) for i in inputs], [_n(o, io) for o in outputs],
                                name=P + outputs[0], **attrs)

    columns = step.step.columns
    col = {c: P + "col_" + c for c in columns}
    # per sample b: row b = step_table[step_index[b]], as [B, columns, 1, 1] so each column splits
    # out as [B, 1, 1, 1] and broadcasts over that sample's latents
    # (an index past the table reads its last row, which the runtime keeps zero: parked slots)
    pre = [node("Min", ["step_index", "last_row"], ["table_index"]),
           node("Gather", ["step_table", "table_index"], ["row_b"], axis=0),          # [B, columns]
           node("Unsqueeze", ["row_b", "axes_23"], ["row"]),
           helper.make_node("Split", [P + "row", P + "ones"], list(col.values()), axis=1,
                            name=P + "split_row"),
           node("Reshape", [col["timestep"], "minus_one"], ["t_b"]),                  # [B]
           node("Identity", ["text_embeddings"], ["encoder_hidden_states"]),
           node("Mul", ["latents", col["model_in_scale"]], ["x_in"])]                # Euler: x/sqrt(σ²+1)
    pre += unet_input(node)
    if guidance:  # one UNet call at batch 2B: [uncond; cond] rows match the embeddings' order
        pre.append(node("Concat", ["u", "u"], ["u2"], axis=0))
        pre.append(node("Cast", ["u2"], ["sample"], to=f_type))
        pre.append(node("Concat", ["t_b", "t_b"], ["timestep"], axis=0))            # [2B]
    else:
        pre.append(node("Cast", ["u"], ["sample"], to=f_type))
        pre.append(node("Identity", ["t_b"], ["timestep"]))

    if step.step.controlnets:
        pre += add_controlnets(g, unet, controlnets[:step.step.controlnets], node, col, f_type, guidance)
    post = [node("Cast", ["noise_pred"], ["m_raw"], to=TensorProto.FLOAT)]
    if guidance:  # ε = ε_uncond + g (ε_cond - ε_uncond)
        halves = {"num_outputs": 2} if opset >= 18 else {}  # equal halves, either opset's way
        post += [helper.make_node("Split", [P + "m_raw"], [P + "m_uncond", P + "m_cond"], axis=0,
                                  name=P + "split_cfg", **halves),
                 node("Sub", ["m_cond", "m_uncond"], ["m_delta"]),
                 node("Mul", ["m_delta", col["guidance"]], ["m_scaled"]),
                 node("Add", ["m_uncond", "m_scaled"], ["m"])]
    else:
        post.append(node("Identity", ["m_raw"], ["m"]))
    post += _linear("x0_lin", col["c_x0_x"], col["c_x0_m"], node)
    post += [node("Min", ["x0_lin", col["clip"]], ["x0_hi"]),
             node("Neg", [col["clip"]], ["neg_clip"]),
             node("Max", ["x0_hi", "neg_clip"], ["x0"])]
    post += _linear("eps", col["c_eps_x"], col["c_eps_m"], node)
    post += [node("Mul", ["x0", col["sqrt_alpha_prev"]], ["a_x0"]),
             node("Mul", ["eps", col["sqrt_one_minus_alpha_prev"]], ["b_eps"]),
             node("Add", ["a_x0", "b_eps"], ["x_ddim"])]
    post += sampler_terms(node, col)
    post += finish(node, col)
    post += [node("Identity", ["x0"], ["x0_next"]),
             helper.make_node("Add", ["step_index", P + "one_i32"], ["step_index_next"],
                              name=P + "step_next")]

    consts = [numpy_helper.from_array(np.array([1], np.int64), P + "one"),
              numpy_helper.from_array(np.array([-1], np.int64), P + "minus_one"),
              numpy_helper.from_array(np.array([2, 3], np.int64), P + "axes_23"),
              numpy_helper.from_array(np.array([1], np.int32), P + "one_i32"),
              numpy_helper.from_array(np.array([STEP_TABLE_ROWS - 1], np.int32), P + "last_row"),
              numpy_helper.from_array(np.array([1], np.int64), P + "one_axis"),
              numpy_helper.from_array(np.array([1], np.float32), P + "one_f"),
              numpy_helper.from_array(np.ones(len(columns), np.int64), P + "ones")]
    unet_io = {t.name for t in unet.inputs} | {t.name for t in unet.outputs}
    # The UNet's graph inputs become internal tensors fed by `pre`; its output feeds `post`.
    old_inputs = [i for i in g.input if i.name not in unet_io]
    del g.input[:]
    g.input.extend(old_inputs + [_value_info(t) for t in step.inputs])
    del g.output[:]
    g.output.extend(_value_info(t) for t in step.outputs)
    nodes = pre + list(g.node) + post         # the UNet's nodes: g.node (ControlNets: in `pre`)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(consts)
    g.name = step.name
    _rename_unet_io(g, unet)
    onnx.save_model(base, str(out_path))


# ---- ControlNets ---------------------------------------------------------------------------------
#
#   c_k        = ControlNet_k(x_in, t, text, image_k)       (CFG: x_in and image_k doubled, as u)
#   r_i        = Σ_k s_k c_k,i      s_k = row_b.control_scale_k (0 outside ControlNet k's step window)
#   UNet skip i (the up blocks' Concat inputs) <- skip_i + r_i;  mid-block output <- mid + r_mid
#
# The ControlNet graphs are copied in under their own prefix; their initializers keep pointing at
# controlnet_K.onnx.data, so the weights exist once on disk.

def add_controlnets(g, unet: Model, controlnets, node, col, f_type, guidance: bool) -> list:
    """Nodes that run the ControlNets and sum their scaled residuals; rewires the UNet graph `g`
    so its skip connections and mid-block output take them. Returns the nodes to run first."""
    skips, mid = unet_skips(g)
    out, x = [], "x_cn_2" if guidance else "x_in"         # the latents the UNet sees (x_in: scaled)
    if guidance:
        out.append(node("Concat", ["x_in", "x_in"], ["x_cn_2"], axis=0))
    out.append(node("Cast", [x], ["cn_sample"], to=f_type))
    sums = None
    for k, (path, model) in enumerate(controlnets):
        n_down = len(model.outputs) - 1
        if n_down != len(skips):
            raise UserError(f"{model.name} has {n_down} down residuals, the UNet {len(skips)} skip connections: "
                            f"it is for another block layout")
        image = control_image(k)
        if guidance:
            out.append(node("Concat", [image, image], [f"cn{k}_image_2"], axis=0))
            image = f"cn{k}_image_2"
        out.append(node("Cast", [image], [f"cn{k}_cond"], to=f_type))
        outputs = import_graph(g, path, f"{P}cn{k}/", {"sample": P + "cn_sample", "timestep": P + "timestep",
                                                        "encoder_hidden_states": P + "encoder_hidden_states",
                                                        "controlnet_cond": P + f"cn{k}_cond"}, out)
        scale = col[f"control_scale_{k}"]                      # [B, 1, 1, 1]: each sample's row
        if guidance:
            out.append(node("Concat", [scale, scale], [f"cn{k}_scale_2"], axis=0))
            scale = f"cn{k}_scale_2"
        out.append(node("Cast", [scale], [f"cn{k}_scale"], to=f_type))
        scaled = [f"cn{k}_{o.name}_s" for o in model.outputs]
        out += [node("Mul", [outputs[o.name], f"cn{k}_scale"], [name]) for o, name in zip(model.outputs, scaled)]
        if sums is not None:
            out += [node("Add", [a, b], [f"cn_sum{k}_{i}"]) for i, (a, b) in enumerate(zip(sums, scaled))]
            scaled = [f"cn_sum{k}_{i}" for i in range(len(scaled))]
        sums = scaled
    adds = {}
    for i, skip in enumerate(skips):
        _rewire(g, skip, sums[i], f"skip{i}", node, adds)
    _rewire(g, mid, sums[-1], "mid", node, adds)
    nodes = [n for old in g.node for n in adds.get(old.name, []) + [old]]
    del g.node[:]
    g.node.extend(nodes)
    return out


def unet_skips(g) -> tuple[list[str], str]:
    """The UNet graph's skip-connection tensors in diffusers' down_block_res_samples order, and the
    mid block's output. The up blocks take the skips last-first, each as the second input of a
    channel Concat (torch.cat([h, res], 1)); the mid block's output is the first up Concat's first
    input."""
    concats = [n for n in g.node if n.op_type == "Concat" and n.name.startswith("/m/up_blocks.")
               and any(a.name == "axis" and a.i == 1 for a in n.attribute) and len(n.input) == 2]
    if not concats:
        raise UserError("the UNet graph has no up-block skip connections where sdrt looks for them "
                        "(/m/up_blocks.*/Concat): export the UNet again with this sdrt")
    return [n.input[1] for n in reversed(concats)], concats[0].input[0]


def _rewire(g, tensor: str, residual: str, tag: str, node, adds: dict) -> None:
    """tensor + residual, read by the up blocks instead of tensor (the down path still reads
    tensor itself); the Add goes right before its first reader (adds: {reader node name: nodes})."""
    readers = [n for n in g.node if tensor in n.input and n.name.startswith("/m/up_blocks.")]
    new = P + tag + "_controlled"
    for n in readers:
        n.input[:] = [new if i == tensor else i for i in n.input]
    from onnx import helper
    add = helper.make_node("Add", [tensor, P + residual], [new], name=new)   # tensor: the UNet's own name
    adds.setdefault(readers[0].name, []).append(add)


def import_graph(g, path: Path, prefix: str, inputs: dict, out: list) -> dict:
    """Copy the graph at `path` (weights external, left where they are) into g under `prefix`, its
    inputs fed by the tensors named in `inputs`; its nodes appended to `out`. Returns its outputs:
    {output name: tensor name in g}."""
    sub = onnx_graph(path).graph
    rename = dict(inputs)
    for t in sub.initializer:
        rename[t.name] = prefix + t.name
    for n in sub.node:
        for o in n.output:
            if o:
                rename.setdefault(o, prefix + o)

    for t in sub.initializer:
        t.name = rename[t.name]
        g.initializer.append(t)
    for n in sub.node:
        n.input[:] = [rename.get(i, i) if i else i for i in n.input]
        n.output[:] = [rename.get(o, o) if o else o for o in n.output]
        n.name = prefix + n.name
        out.append(n)
    return {o.name: rename[o.name] for o in sub.output}


def unet_input_plain(node):
    """u = x_t (scaled: model_in_scale x_t)"""
    return [node("Identity", ["x_in"], ["u"])]


def unet_input_concat(node):
    """u = concat(x_t, mask, masked-image latents) on channels: the 9-channel inpainting UNet."""
    return [node("Concat", ["x_in", "mask", "masked_image_latents"], ["u"], axis=1)]


def unet_input_upscale(node):
    """u = concat(x_in, low_res_image) on channels: the x4 upscaler's UNet. The model-input scale
    applies to x_t only (diffusers scales, then concatenates); the UNet's class labels are the
    step's class_labels input (the noise level, text_batch rows: CFG-duplicated by the runtime)."""
    return [node("Concat", ["x_in", "low_res_image"], ["u"], axis=1),
            node("Identity", ["class_labels"], [P + "class_labels"])]


def sampler_terms(node, col):
    """After DDIM's arithmetic, unchanged (zero coefficients add exact zeros for DDIM):
        x' = x_ddim + c_x x + c_x0_prev x̂0_prev + c_noise z,   z = step_noise[b, min(step_index[b], N - 1)]"""
    return [node("Shape", ["step_noise"], ["noise_shape"]),
            node("Gather", ["noise_shape", "one"], ["noise_rows"], axis=0),           # [1] N
            node("Sub", ["noise_rows", "one"], ["noise_last"]),
            node("Cast", ["step_index"], ["step_index_i64"], to=7),                     # INT64
            node("Min", ["step_index_i64", "noise_last"], ["noise_row"]),               # [B]
            node("Unsqueeze", ["noise_row", "one_axis"], ["noise_idx"]),                # [B, 1]
            node("GatherND", ["step_noise", "noise_idx"], ["z"], batch_dims=1),         # [B, C, h, w]
            node("Mul", ["latents", col["c_x"]], ["cx_x"]),
            node("Mul", ["x0_prev", col["c_x0_prev"]], ["cp_x0"]),
            node("Mul", ["z", col["c_noise"]], ["cn_z"]),
            node("Add", ["x_ddim", "cx_x"], ["x_s1"]),
            node("Add", ["x_s1", "cp_x0"], ["x_s2"]),
            node("Add", ["x_s2", "cn_z"], ["x_prev"])]


def finish_plain(node, col):
    """latents_next = x_{t-1}"""
    return [node("Identity", ["x_prev"], ["latents_next"])]


def blend_known_region(node, col):
    """4-channel inpainting, after the DDIM update (diffusers: init_latents_proper):
        x_known       = sqrt(ᾱ_next) x0_img + sqrt(1 - ᾱ_next) ε      q(x_next | x0_img), ε fixed
        latents_next  = (1 - mask) x_known + mask x_{t-1}             mask 1 = repaint
    ᾱ_next is that of the next timestep of the schedule, 1 after the last step (x_known = x0_img)."""
    return [node("Mul", ["image_latents", col["sqrt_alpha_next"]], ["known_a"]),
            node("Mul", ["noise", col["sqrt_one_minus_alpha_next"]], ["known_b"]),
            node("Add", ["known_a", "known_b"], ["x_known"]),
            node("Sub", ["one_f", "mask"], ["keep"]),
            node("Mul", ["keep", "x_known"], ["kept"]),
            node("Mul", ["mask", "x_prev"], ["repainted"]),
            node("Add", ["kept", "repainted"], ["latents_next"])]


# Each variant's graph: (UNet input u, latents_next from x_prev); its numpy reference is
# sdrt.export.export.REFERENCES.
GRAPHS = {Variant.plain: (unet_input_plain, finish_plain),
          Variant.blend: (unet_input_plain, blend_known_region),
          Variant.concat: (unet_input_concat, finish_plain),
          Variant.upscale: (unet_input_upscale, finish_plain)}


def _linear(out, ca, cb, node):
    """out = ca * x + cb * m"""
    return [node("Mul", ["latents", ca], [out + "_x"]), node("Mul", ["m", cb], [out + "_m"]),
            node("Add", [out + "_x", out + "_m"], [out])]


def _n(name: str, io: set[str]) -> str:
    """Tensors named by this module live under P, but for the step's graph I/O (`io`) and
    already-prefixed column names."""
    return name if name.startswith(P) or name in io else P + name


def _rename_unet_io(g, unet: Model) -> None:
    """The UNet's own I/O names (sample, timestep, ...) are now internal: map them to P+name."""
    names = {t.name: P + t.name for t in unet.inputs + unet.outputs}
    for n in g.node:
        if n.name.startswith(P):
            continue
        n.input[:] = [names.get(i, i) for i in n.input]
        n.output[:] = [names.get(o, o) for o in n.output]


def _value_info(t):
    from onnx import TensorProto, helper
    dtype = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
             "int32": TensorProto.INT32}[t.dtype]
    return helper.make_tensor_value_info(t.name, dtype, list(t.shape))
