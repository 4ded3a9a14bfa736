"""CLIP tokenizer for the runtime: the `tokenizers` library, no transformers.

Reads a diffusers `tokenizer/` folder in either form, `tokenizer.json` or `vocab.json` +
`merges.txt`, and returns what CLIPTokenizer(padding="max_length", truncation=True) returns:
    [bos] + BPE(prompt)[: max_length - 2] + [eos] + [pad] * rest
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from sdrt.errors import UserError

# CLIP's pre-tokenization split (as transformers' CLIPConverter builds it)
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


class ClipTokenizer:
    def __init__(self, tokenizer, bos: int, eos: int, pad: int):
        self.tok, self.bos, self.eos, self.pad = tokenizer, bos, eos, pad
        self.truncated: list[int] = []          # prompts cut by the last encode()

    @classmethod
    def from_dir(cls, path: Path) -> "ClipTokenizer":
        path = Path(path)
        try:
            if (path / "tokenizer.json").is_file():
                from tokenizers import Tokenizer
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                tok = _from_vocab_merges(path / "vocab.json", path / "merges.txt")
            else:
                raise UserError(f"{path} has no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
            special = {**DEFAULTS, **_special_tokens(path)}
        except (OSError, ValueError, Exception) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot read the tokenizer in {path} ({str(e).splitlines()[0][:200]}): "
                            "the files are corrupt, export again") from None
        tok.no_truncation()
        tok.no_padding()
        ids = {k: tok.token_to_id(v) for k, v in special.items()}
        missing = [special[k] for k, v in ids.items() if v is None]
        if missing:
            raise UserError(f"the tokenizer in {path} lacks the special tokens {missing}")
        return cls(tok, ids["bos_token"], ids["eos_token"], ids["pad_token"])

    def encode(self, prompts: list[str], max_length: int) -> np.ndarray:
        """int32 [len(prompts), max_length] token ids, truncated and padded like CLIPTokenizer."""
        out = np.full((len(prompts), max_length), self.pad, np.int32)
        self.truncated = []
        for i, enc in enumerate(self.tok.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > max_length - 2:
                self.truncated.append(i)
                warnings.warn(f"prompt {i} is {len(ids) + 2} tokens long: the last "
                              f"{len(ids) - (max_length - 2)} tokens were dropped (CLIP reads {max_length})",
                              stacklevel=2)
                ids = ids[: max_length - 2]
            row = [self.bos, *ids, self.eos]
            out[i, : len(row)] = row
        return out


def _from_vocab_merges(vocab: Path, merges: Path):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    lines = merges.read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(BPE(vocab=json.loads(vocab.read_text(encoding="utf-8")), merges=pairs, dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                        unk_token=DEFAULTS["eos_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _special_tokens(path: Path) -> dict:
    """bos/eos/pad names from tokenizer_config.json, then special_tokens_map.json."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text(encoding="utf-8"))
            for key in DEFAULTS:
                v = data.get(key)
                if isinstance(v, dict):          # {"content": "<|endoftext|>", ...}
                    v = v.get("content")
                if isinstance(v, str):
                    out[key] = v
    return out
