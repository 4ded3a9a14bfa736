"""A synthetic byte-level CLIP BPE tokenizer of any vocab size, for `sdrt init` (no real vocab can be
downloaded). Same layout as OpenAI's CLIP vocab: 256 byte chars, the same with "</w>", one token per
merge, then <|startoftext|> and <|endoftext|>; merges are lowercase letter pairs, triples, quads."""
from __future__ import annotations

import json
from itertools import islice, product
from pathlib import Path
from string import ascii_lowercase

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"
MIN_VOCAB = 512 + 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table; its order is the byte-level vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def letter_merges():
    """Every (left, right) merge over lowercase letters, each right part word-internal then word-final:
    a b, a b</w>, ..., ab c, ab c</w>, ..., abc d, abc d</w>, ... Each left part is an earlier merge."""
    for n in (1, 2, 3):
        for left in product(ascii_lowercase, repeat=n):
            for right in ascii_lowercase:
                yield "".join(left), right
                yield "".join(left), right + END


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocab layout: bytes, bytes + </w>, merge results, then bos and eos."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + END for c in chars), *(a + b for a, b in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json like SD 1.5's: CLIPTokenizer, pad <|endoftext|>."""
    return {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
            "do_lower_case": True, "add_prefix_space": False, "errors": "replace",
            **special_tokens_map()}


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_clip_tokenizer(dir: Path, vocab_size: int, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into dir."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too small: a CLIP vocab needs at least {MIN_VOCAB} tokens")
    merges = list(islice(letter_merges(), vocab_size - MIN_VOCAB))
    if len(merges) < vocab_size - MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} is too large: at most {MIN_VOCAB + len(merges)} tokens")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_json(dir / "vocab.json", clip_vocab(merges))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(dir / "tokenizer_config.json", tokenizer_config(model_max_length))
    write_json(dir / "special_tokens_map.json", special_tokens_map())
    return dir


def write_tokenizer_json(dir: Path) -> Path:
    """Convert the vocab.json + merges.txt in dir to the tokenizer.json transformers' CLIPTokenizer builds."""
    from transformers import CLIPTokenizer
    dir = Path(dir)
    backend = CLIPTokenizer.from_pretrained(dir).backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(dir / "tokenizer.json"))
    return dir / "tokenizer.json"


def chain(word: str) -> list[tuple[str, str]]:
    """The merges that build one word left to right: c i, ci r, cir c, circ l, circl e</w>."""
    parts = [*word[:-1], word[-1] + END]
    return [("".join(parts[:i]), parts[i]) for i in range(1, len(parts))]


def bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """BPE of one word as CLIP applies it: repeatedly merge the adjacent pair of lowest rank."""
    rank = {m: i for i, m in enumerate(merges)}
    parts = [*word[:-1], word[-1] + END]
    while len(parts) > 1:
        pairs = [(rank.get(p, len(rank)), i) for i, p in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == len(rank):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_merges(words) -> list[tuple[str, str]]:
    """Merges under which each word is one token. A merge of one word can fire inside another
    ("r e" of "red" inside "green") and break its chain; such a word's chain moves to the front,
    until every word comes out whole."""
    order = list(dict.fromkeys(words))
    for _ in range(len(order) + 1):
        merges = list(dict.fromkeys(m for w in order for m in chain(w)))
        broken = [w for w in order if len(bpe(w, merges)) > 1]
        if not broken:
            return merges
        order = [*broken, *(w for w in order if w not in broken)]
    raise ValueError(f"cannot make every word one token: {broken}")


def write_vocab_merges(dir: Path, merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt: CLIP's own tokenizer format."""
    write_json(dir / "vocab.json", clip_vocab(merges))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_word_tokenizer(dir: Path, words, model_max_length: int) -> Path:
    """A CLIP-format tokenizer whose merges spell out the given words: each is one token; any other
    text falls back to byte-level tokens, as in CLIP. Same four files as write_clip_tokenizer."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    write_vocab_merges(dir, word_merges(words))
    write_json(dir / "tokenizer_config.json", tokenizer_config(model_max_length))
    write_json(dir / "special_tokens_map.json", special_tokens_map())
    return dir
