"""LDM text-to-image with LDM-BERT (diffusers' LDMTextToImagePipeline): its folder, its text encoder
as an ONNX-ready torch module, and `sdrt init --arch tiny-ldm-bert`.

The folder holds bert/ (LDMBertModel), tokenizer/ (BertTokenizer), unet/ (UNet2DConditionModel),
vqvae/ (an AutoencoderKL in the text-to-image folders: the pipeline decodes it as
`vqvae.decode(latents / scaling_factor)`, the KL decoder sdrt has), scheduler/.

The text encoder takes the conditioning path of CLIP's (sdrt.export.to_onnx.TextEncoder): token
embeddings in (the runtime looks them up in WORK_DIR/token_embedding.npy, so textual inversion and
emphasis work), positions added inside:

    h_0 = inputs_embeds + embed_positions(0..76)
    h_l = h_{l-1} + attn(ln_l(h_{l-1}));  h_l += fc2(gelu(fc1(ln'_l(h_l))))     (pre-norm, no mask)
    out = layer_norm(h_{L + 1 - clip_skip})       clip_skip 1: h_L, LDMBertModel's last_hidden_state

As in the pipeline, no attention mask: every position, padding included, is attended to.
"""
from __future__ import annotations

from pathlib import Path

from sdrt.contract import ModelConfig
from sdrt.errors import UserError

PIPELINE = "LDMTextToImagePipeline"
COMPONENTS = ("tokenizer", "bert", "unet", "vqvae", "scheduler")
TEXT_LEN = 77                  # the pipeline pads and truncates to 77 tokens


def check_index(path: Path, data: dict) -> None:
    """The folder's autoencoder must be the KL one (VQModel folders: the unconditional LDMs)."""
    vae_class = (data.get("vqvae") or [None, None])[1]
    if vae_class != "AutoencoderKL":
        raise UserError(f"{path}'s vqvae is a {vae_class}: sdrt runs LDMTextToImagePipeline folders with an "
                        f"AutoencoderKL (the KL decoder) only")
    bert_class = (data.get("bert") or [None, None])[1]
    if bert_class != "LDMBertModel":
        raise UserError(f"{path}'s bert is a {bert_class}: an LDMTextToImagePipeline folder holds an LDMBertModel")


def load(path: Path):
    """(bert, unet, vae) in float32, eval."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    try:
        bert = LDMBertModel.from_pretrained(path / "bert", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(path / "vqvae", dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot load the models in {path}: {str(e).splitlines()[0]}") from None
    return bert.eval(), unet.eval(), vae.eval()


def text_config(bert) -> dict:
    """The text encoder's numbers for ModelConfig (sdrt.export.pipeline_folder.model_config)."""
    c = bert.config
    if c.max_position_embeddings < TEXT_LEN:
        raise UserError(f"the LDM-BERT encoder has {c.max_position_embeddings} positions: the pipeline "
                        f"feeds it {TEXT_LEN} tokens")
    return dict(text_len=TEXT_LEN, text_dim=c.d_model, text_layers=c.encoder_layers, vocab_size=c.vocab_size,
                text_encoder="bert")


def text_encoder_module(bert):
    """LDMBertModel -> the contract's text encoder (inputs_embeds, clip_skip) -> text_embeddings."""
    import torch

    class BertTextEncoder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.m = encoder               # LDMBertEncoder (not to_logits): initializers m.layers.N...
            self.out_dtype = None

        def forward(self, inputs_embeds, clip_skip):
            enc = self.m
            dtype = enc.layer_norm.weight.dtype
            positions = enc.embed_positions.weight[: inputs_embeds.shape[1]]
            h = inputs_embeds.to(dtype) + positions
            states = []
            for layer in enc.layers:
                h = layer(h, None, None)[0]
                states.append(h)
            index = (len(states) - clip_skip).long()
            chosen = torch.stack(states).index_select(0, index).reshape(h.shape)
            out = enc.layer_norm(chosen)
            return out if self.out_dtype is None else out.to(self.out_dtype)

    return BertTextEncoder(bert.model).eval()    # eval: LDM-BERT has dropout (the exporter restores train modes)


# ---- sdrt init --arch tiny-ldm-bert ------------------------------------------------------------------

# Not sdrt's own `tiny`: BERT 3 layers of width 48 (heads of 12), a UNet with attention on its
# second level only and 3 levels, a KL autoencoder of other widths (factor 8: the pipeline makes
# latents of height // 8 whatever the autoencoder).
TINY = dict(
    bert=dict(d_model=48, encoder_layers=3, encoder_attention_heads=4, head_dim=12, encoder_ffn_dim=96,
              max_position_embeddings=TEXT_LEN),
    unet=dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=(32, 64, 64),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=48, attention_head_dim=8, norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
             block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
)
# A DDIM scheduler (SD's betas; the folder's own scheduler config is what an export reads).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def vocab_words() -> list[str]:
    """A small WordPiece vocab: BERT's special tokens, single characters (letters, digits,
    punctuation) whole and as "##" pieces, and the words of the demo's scenes and a few more, some
    also split into pieces, so that prompts tokenize into words, pieces and [UNK]."""
    from string import ascii_lowercase, digits, punctuation

    from sdrt.scenes import WORDS
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(ascii_lowercase + digits + punctuation)
    words = sorted(set(WORDS) | {"painting", "photo", "of", "a", "the", "squirrel", "eating", "burger", "on",
                                 "in", "with", "and", "cafe", "naive"})
    pieces = ["##" + c for c in ascii_lowercase + digits] + ["##ing", "##s", "##ed", "##er", "##ly"]
    return list(dict.fromkeys(special + chars + words + pieces))


def write_tokenizer(out: Path) -> int:
    """tokenizer/: vocab.txt, tokenizer_config.json and special_tokens_map.json as the hub's
    LDMTextToImagePipeline folders hold them. Returns the vocab size."""
    import json
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocab_words()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    special = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
               "mask_token": "[MASK]"}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenize_chinese_chars": True, "strip_accents": None, "model_max_length": 77,
         "tokenizer_class": "BertTokenizer", **special}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)


def build_pipeline(tmp: Path, seed: int = 0, spec: dict = TINY, text_gain=(16.0, 4.0)):
    """A diffusers LDMTextToImagePipeline with random weights (its tokenizer written to tmp/tokenizer).
    The UNet's cross-attention key and value projections are scaled by `text_gain`: at random init
    the attention over the 77 positions is near uniform, one word moves the image by little, and a
    parity test must see a changed word."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from sdrt.export.pipeline_folder import quiet
    quiet()
    vocab_size = write_tokenizer(tmp / "tokenizer")
    torch.manual_seed(seed)
    bert = LDMBertModel(LDMBertConfig(vocab_size=vocab_size, **spec["bert"]))
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                module.weight.mul_(text_gain[name.endswith("to_v")])
    return LDMTextToImagePipeline(vqvae=AutoencoderKL(**spec["vae"]).eval(), bert=bert.eval(),
                                  tokenizer=BertTokenizer.from_pretrained(tmp / "tokenizer"),
                                  unet=unet, scheduler=DDIMScheduler(**SCHEDULER))


def init(out: Path, seed: int = 0, spec: dict = TINY) -> None:
    """Save a random-weight LDMTextToImagePipeline folder into `out` (an empty folder), with the
    tokenizer files as the hub's folders have them (vocab.txt; transformers 5 would write tokenizer.json)."""
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp), seed, spec)
        pipe.save_pretrained(out, safe_serialization=True)
        shutil.rmtree(out / "tokenizer")
        shutil.copytree(Path(tmp) / "tokenizer", out / "tokenizer")
