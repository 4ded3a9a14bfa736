"""The runtime's BERT tokenizer (LDM-BERT exports): a diffusers `tokenizer/` folder -> WordPiece token
ids exactly as transformers' BertTokenizer makes them. The conditioning frames each chunk as
[CLS] t_1 .. t_75 [SEP] [PAD]..., as LDMTextToImagePipeline's tokenizer call (padding to 77) does.
No torch, no transformers: the `tokenizers` library does the normalization and the WordPiece.

    text -> clean (control chars out, whitespace to " "), CJK chars spaced, lowercase, accents
            stripped (BertTokenizer's do_lower_case / strip_accents / tokenize_chinese_chars)
         -> words split at whitespace and punctuation
         -> WordPiece: longest vocab prefix, then "##" pieces; a word that cannot be covered is [UNK]
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from sdrt.engine.tokenizer import TextTokenizer, read_json, token_content
from sdrt.errors import UserError, first_line

BERT_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
               "mask_token": "[MASK]"}
BERT_FLAGS = {"do_lower_case": True, "strip_accents": None, "tokenize_chinese_chars": True}


class BertTokenizer(TextTokenizer):
    """WordPiece ids of a text; bos_id = [CLS], eos_id = [SEP], pad_id = [PAD]."""

    @classmethod
    def from_dir(cls, path) -> "BertTokenizer":
        """Load a BertTokenizer folder: vocab.txt + tokenizer_config.json (as the hub's LDM folders
        hold it), or tokenizer.json (as transformers 5 saves it)."""
        path = Path(path)
        try:
            config = read_config(path)
            backend = load_backend(path, config)
            backend.add_special_tokens([AddedToken(token_content(config[k]), special=True, normalized=False)
                                        for k in BERT_TOKENS if backend.token_to_id(token_content(config[k]))
                                        is not None])
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read the BERT tokenizer in {path} ({first_line(e)}): "
                            "re-save the tokenizer folder with diffusers or transformers") from None
        ids = {}
        for key in ("cls_token", "sep_token", "pad_token"):
            ids[key] = backend.token_to_id(token_content(config[key]))
            if ids[key] is None:
                raise UserError(f"the tokenizer in {path} has no token {token_content(config[key])!r} (its "
                                f"{key}): the tokenizer files are mismatched, re-save the tokenizer folder")
        # LDMTextToImagePipeline pads to 77 whatever the config says (often 512 or unbounded)
        return cls(backend, ids["cls_token"], ids["sep_token"], ids["pad_token"], 77)


def read_config(path: Path) -> dict:
    """Special tokens and the normalization flags: BertTokenizer's defaults, then tokenizer_config.json,
    then special_tokens_map.json (as transformers reads them)."""
    config = {**BERT_TOKENS, **BERT_FLAGS}
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        for key, value in read_json(path / file).items():
            if key in config and (value is not None or key == "strip_accents"):   # strip_accents null: follow lowercasing
                config[key] = value
    return config


def load_backend(path: Path, config: dict) -> Tokenizer:
    """tokenizer.json as saved, else BERT's WordPiece pipeline built from vocab.txt and the flags."""
    if (path / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(path / "tokenizer.json"))
        backend.no_padding()
        backend.no_truncation()
        return backend
    if (path / "vocab.txt").is_file():
        return bert_wordpiece(read_vocab(path / "vocab.txt"), config)
    raise UserError(f"no BERT tokenizer in {path}: expected vocab.txt or tokenizer.json "
                    "(the tokenizer/ folder of an LDMTextToImagePipeline)")


def read_vocab(file: Path) -> dict[str, int]:
    """vocab.txt: one token a line, its id the line number (a repeated token keeps its last line, as
    transformers' load_vocab)."""
    tokens = file.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    vocab = {t.rstrip("\r"): i for i, t in enumerate(tokens)}
    if not vocab:
        raise UserError(f"{file} is empty: re-save the tokenizer folder")
    return vocab


def bert_wordpiece(vocab: dict[str, int], config: dict) -> Tokenizer:
    unk = token_content(config["unk_token"])
    if unk not in vocab:
        raise UserError(f"the BERT vocab has no unknown token {unk!r}: re-save the tokenizer folder")
    backend = Tokenizer(WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    lower = bool(config["do_lower_case"])
    accents = config["strip_accents"]
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(config["tokenize_chinese_chars"]),
        strip_accents=None if accents is None else bool(accents), lowercase=lower)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return backend
