"""The runtime's CLIP tokenizer: a diffusers `tokenizer/` folder -> BPE token ids exactly as
transformers' CLIPTokenizer makes them (sdrt.engine.conditioning adds bos/eos/pad and cuts the
prompt into chunks). No torch, no transformers: the `tokenizers` library does the BPE."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdrt.errors import UserError, first_line

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
DEFAULT_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


class TextTokenizer:
    """Token ids of a text, and the bos, eos and pad ids the conditioning frames each chunk with
    (CLIP's <|startoftext|> / <|endoftext|>, BERT's [CLS] / [SEP] / [PAD]); the subclass reads its folder."""

    def __init__(self, backend: Tokenizer, bos_id: int, eos_id: int, pad_id: int, model_max_length: int = 77):
        self.backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.model_max_length = model_max_length

    def token_ids(self, text: str) -> list[int]:
        """Ids of `text`, no bos/eos (added tokens match whole, as in transformers)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def with_added_tokens(self, tokens: list[str]):
        """A copy that also knows `tokens` (textual inversion), each a new id after the vocab, as
        transformers' add_tokens makes them (normalized, not special); this tokenizer and its files
        are left as they are. UserError for a token the vocab already has."""
        backend = Tokenizer.from_str(self.backend.to_str())
        for token in tokens:
            if backend.token_to_id(token) is not None:
                raise UserError(f"embedding token {token!r} is already in the tokenizer's vocabulary: "
                                f"give another token with FILE:TOKEN")
            backend.add_tokens([AddedToken(token, normalized=True, special=False)])
        return type(self)(backend, self.bos_id, self.eos_id, self.pad_id, self.model_max_length)


class ClipTokenizer(TextTokenizer):
    """BPE ids of a text (a CLIPTokenizer folder)."""

    @classmethod
    def from_dir(cls, path) -> "ClipTokenizer":
        """Load a diffusers tokenizer folder: tokenizer.json, or vocab.json + merges.txt."""
        path = Path(path)
        try:
            config = read_config(path)
            backend = load_backend(path, config["unk_token"])
            add_special_tokens(backend, config, path)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read the tokenizer in {path} ({first_line(e)}): "
                            "re-save the tokenizer folder with diffusers or transformers") from None
        bos, eos, pad = (backend.token_to_id(token_content(config[key]))
                         for key in ("bos_token", "eos_token", "pad_token"))
        return cls(backend, bos, eos, pad, config["model_max_length"])


def read_config(path: Path) -> dict:
    """Special tokens and model_max_length from tokenizer_config.json, overridden by
    special_tokens_map.json as transformers does; CLIP's defaults where absent."""
    tokenizer_config = read_json(path / "tokenizer_config.json")
    config = {**DEFAULT_TOKENS, "model_max_length": 77, "added_tokens_decoder": {}}
    config.update({k: v for k, v in tokenizer_config.items() if k in config and v is not None})
    if not config["added_tokens_decoder"]:
        special = read_json(path / "special_tokens_map.json")
        config.update({k: v for k, v in special.items() if k in DEFAULT_TOKENS and v is not None})
    config["model_max_length"] = int(config["model_max_length"])
    return config


def read_json(file: Path) -> dict:
    """A JSON object, {} if the file is absent; UserError if it is not valid JSON."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({first_line(e)}): re-save the tokenizer folder") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} should hold a JSON object: re-save the tokenizer folder")
    return data


def load_backend(path: Path, unk) -> Tokenizer:
    """tokenizer.json as saved, else CLIP's BPE pipeline built from vocab.json + merges.txt."""
    if (path / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        backend.no_padding()
        backend.no_truncation()
        return backend
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = read_json(path / "vocab.json")
        return clip_bpe(vocab, read_merges(path / "merges.txt", vocab), token_content(unk))
    raise UserError(f"no tokenizer in {path}: expected tokenizer.json or vocab.json + merges.txt "
                    "(a diffusers pipeline folder's tokenizer/)")


def read_merges(file: Path, vocab: dict) -> list[tuple[str, str]]:
    """merges.txt's pairs, checked against the vocab (`tokenizers` panics on a merge it cannot build)."""
    lines = file.read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    for i, merge in enumerate(merges):
        if len(merge) != 2 or any(t not in vocab for t in (*merge, "".join(merge))):
            raise UserError(f"{file} merge {i + 1} ({' '.join(merge)!r}) does not fit vocab.json: "
                            "the tokenizer files are corrupt or mismatched, re-save the tokenizer folder")
    return merges


def clip_bpe(vocab: dict, merges: list[tuple[str, str]], unk: str) -> Tokenizer:
    """CLIP's tokenizer: NFC, collapsed whitespace, lowercase; CLIP's split regex then byte-level; BPE
    with "</w>" ending each word."""
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, end_of_word_suffix="</w>",
                            continuing_subword_prefix="", fuse_unk=False, dropout=None))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


def add_special_tokens(backend: Tokenizer, config: dict, path: Path) -> None:
    """Register bos/eos/unk/pad (and tokenizer_config's added_tokens_decoder) as special added tokens, so
    that they match whole in prompts as in transformers (a "!" pad splits "!" off words)."""
    known = {**{str(t.content): t for t in backend.get_added_tokens_decoder().values()},
             **{t.content: t for t in map(added_token, sorted_by_id(config["added_tokens_decoder"]))}}
    backend.add_special_tokens(list(known.values()))
    named = [known.get(token_content(config[key])) or added_token(config[key]) for key in DEFAULT_TOKENS]
    missing = [t.content for t in named if backend.token_to_id(t.content) is None]
    if missing:
        raise UserError(f"the tokenizer in {path} has no token {missing[0]!r} (named in its config): "
                        "the tokenizer files are mismatched, re-save the tokenizer folder")
    backend.add_special_tokens(named)


def sorted_by_id(decoder: dict) -> list:
    return [decoder[k] for k in sorted(decoder, key=int)]


def added_token(value) -> AddedToken:
    """A special AddedToken from a config value: a string, or a dict with content and flags."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    flags = {k: value[k] for k in ADDED_TOKEN_FLAGS if k in value}
    return AddedToken(value["content"], **{"normalized": False, **flags}, special=True)


def token_content(value) -> str:
    return value if isinstance(value, str) else value["content"]
