"""The runtime's CLIP tokenizer against transformers' CLIPTokenizer (through Conditioning.rows, what
the runtime feeds the text encoder), and the synthetic CLIP vocab."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from sdrt.engine.tokenizer import ClipTokenizer
from sdrt.errors import UserError
from sdrt.export.clip_vocab import bytes_to_unicode, write_clip_tokenizer, write_tokenizer_json

LONG = "a majestic castle on a hill at sunset, highly detailed, " * 12
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "Hello, World!!! ... (masterpiece:1.2), [best] {quality} #art @user $5 100% & more?",
    "In 1984 there were 12,345 cats and 3.14159 dogs",
    "café cafe\u0301 naïve résumé Über façade 日本語のテキスト Москва 🙂🚀 Ａｂｃ",
    "A PHOTO OF A CAT, UPPERCASE and MiXeD CaSe",
    "   extra   spaces\tand\ttabs\n\nand newlines   ",
    "it's, we're, they'll, I'd, you've, I'm, she's",
    "hello! world <|endoftext|> x<|startoftext|>y <|ENDOFTEXT|> <|STARTOFTEXT|>z",
    LONG,
]
ASCII_PROMPTS = [p for p in PROMPTS if p.isascii() and "<|" not in p]


def added_token(content: str) -> dict:
    """A special token as SD 1.5's tokenizer_config.json spells it."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def set_config(folder, **tokens) -> None:
    """Override special tokens in both tokenizer_config.json and special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        data.update(tokens)
        (folder / name).write_text(json.dumps(data))


CONFIGS = {
    "default": {},
    "sd15": dict(bos_token=added_token("<|startoftext|>"), eos_token=added_token("<|endoftext|>"),
                 unk_token=added_token("<|endoftext|>")),
    "bang_pad": dict(pad_token="!"),        # SD 2.x pads with "!"
    "no_config": None,                      # no tokenizer_config.json / special_tokens_map.json: CLIP's defaults
}


@pytest.fixture(scope="module", params=[49408, 1000], ids=["vocab49408", "vocab1000"])
def vocab_dir(request, tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp(f"tok{request.param}"), request.param)


@pytest.fixture(params=["vocab", "json"])
def form(request):
    return request.param


def tokenizer_folder(src, dst, form: str, config: dict | None):
    """A copy of src with the config's special tokens (None: no config files), in vocab.json + merges.txt
    or tokenizer.json form."""
    shutil.copytree(src, dst)
    set_config(dst, **config or {})
    if form == "json":
        write_tokenizer_json(dst)
        (dst / "vocab.json").unlink()
        (dst / "merges.txt").unlink()
    if config is None:
        (dst / "tokenizer_config.json").unlink()
        (dst / "special_tokens_map.json").unlink()
    return dst


def transformers_classes():
    """CLIPTokenizer, and CLIPTokenizerFast where it is a different class (in transformers 5 it is an alias)."""
    import transformers
    classes = [transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", None)]
    return list(dict.fromkeys(c for c in classes if c is not None))


def transformers_ids(folder, prompts, max_length=77) -> np.ndarray:
    """The ids every transformers CLIP tokenizer class gives, checked to agree with each other."""
    results = [np.array(cls.from_pretrained(folder)(prompts, padding="max_length", max_length=max_length,
                                                    truncation=True).input_ids)
               for cls in transformers_classes()]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    return results[0]


def literal(prompt: str) -> str:
    """The prompt with its brackets escaped: the runtime's prompt syntax then reads it as plain text."""
    return re.sub(r"([\\()\[\]])", r"\\\1", prompt)


def runtime_ids(tok: ClipTokenizer, prompts, text_len=77) -> np.ndarray:
    """The first chunk of each prompt as the runtime makes it (Conditioning.rows): bos, the first
    text_len - 2 tokens, eos, pad; what transformers gives with padding="max_length", truncation=True."""
    from sdrt.engine.conditioning import Conditioning
    table = np.zeros((tok.backend.get_vocab_size(with_added_tokens=True), 1), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # nothing to warn about in literal text
        chunks = Conditioning(tok, table, text_len).rows([literal(p) for p in prompts])
    return chunks.ids[::len(chunks.ids) // len(prompts)]


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_transformers(vocab_dir, form, config, tmp_path):
    folder = tokenizer_folder(vocab_dir, tmp_path / "tok", form, CONFIGS[config])
    tok = ClipTokenizer.from_dir(folder)
    ours = runtime_ids(tok, PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ours, transformers_ids(folder, PROMPTS))
    assert ours[1, 2:].tolist() == [tok.pad_id] * 75 and tok.pad_id == (0 if config == "bang_pad" else tok.eos_id)


@pytest.mark.parametrize("max_length", [5, 16, 100])
def test_other_max_lengths_match_transformers(vocab_dir, form, max_length, tmp_path):
    folder = tokenizer_folder(vocab_dir, tmp_path / "tok", form, {})
    ours = runtime_ids(ClipTokenizer.from_dir(folder), PROMPTS, max_length)
    np.testing.assert_array_equal(ours, transformers_ids(folder, PROMPTS, max_length))


def test_layout_of_a_row(vocab_dir):
    """bos, tokens, eos, then pad; for SD 1.5's vocab bos/eos/pad are 49406/49407/49407."""
    tok = ClipTokenizer.from_dir(vocab_dir)
    size = len(json.loads((vocab_dir / "vocab.json").read_text()))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.model_max_length) == (size - 2, size - 1, size - 1, 77)
    row = runtime_ids(tok, ["a"])[0]
    a = json.loads((vocab_dir / "vocab.json").read_text())["a</w>"]
    assert row[:3].tolist() == [size - 2, a, size - 1] and (row[3:] == size - 1).all()


def test_bang_pad(vocab_dir, form, tmp_path):
    """A configured pad token is used for padding, and "!" then splits off as in transformers."""
    folder = tokenizer_folder(vocab_dir, tmp_path / "tok", form, {"pad_token": "!"})
    tok = ClipTokenizer.from_dir(folder)
    assert tok.pad_id == list(bytes_to_unicode().values()).index("!") == 0
    hi = tok.backend.token_to_id("hi</w>")
    assert runtime_ids(tok, ["hi!"], 8)[0].tolist() == [tok.bos_id, hi, 0, tok.eos_id, 0, 0, 0, 0]


def test_long_prompt_is_chunked_not_truncated(vocab_dir):
    """Beyond 75 tokens the runtime starts another chunk (each framed bos ... eos): no token is lost."""
    from sdrt.engine.conditioning import Conditioning
    tok = ClipTokenizer.from_dir(vocab_dir)
    tokens = tok.backend.encode(LONG, add_special_tokens=False).ids
    assert len(tokens) > 75
    table = np.zeros((tok.backend.get_vocab_size(), 1), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunks = Conditioning(tok, table, 77).rows(["short", LONG])
    k = len(chunks.ids) // 2
    assert k == -(-len(tokens) // 75)
    long_rows = chunks.ids[k:]
    assert (long_rows[:, 0] == tok.bos_id).all()
    body = [t for row in long_rows for t in row[1:76].tolist()]
    assert body[:len(tokens)] == tokens and all(t in (tok.eos_id, tok.pad_id) for t in body[len(tokens):])
    assert chunks.ids[1].tolist() == [tok.bos_id, tok.eos_id] + [tok.pad_id] * 75     # "short" padded to k


def reference_bpe(text: str, vocab: dict, merges: list[tuple[str, str]]) -> list[int]:
    """OpenAI CLIP's simple_tokenizer for ASCII text: an independent check of the vocab and the BPE."""
    ranks = {m: i for i, m in enumerate(merges)}
    chars = bytes_to_unicode()
    ids = []
    for word in re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", " ".join(text.split()).lower()):
        parts = [chars[b] for b in word.encode()]
        parts[-1] += "</w>"
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if best not in ranks:
                break
            i = next(i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) == best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def test_matches_reference_bpe(vocab_dir):
    vocab = json.loads((vocab_dir / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (vocab_dir / "merges.txt").read_text().splitlines()[1:]]
    tok = ClipTokenizer.from_dir(vocab_dir)
    for prompt in ASCII_PROMPTS:
        assert tok.backend.encode(prompt, add_special_tokens=False).ids == reference_bpe(prompt, vocab, merges)


def test_english_gets_multi_letter_tokens(tmp_path):
    tok = ClipTokenizer.from_dir(write_clip_tokenizer(tmp_path, 49408))
    tokens = tok.backend.encode("a photo of an astronaut riding a horse", add_special_tokens=False).tokens
    assert sum(len(t.removesuffix("</w>")) > 1 for t in tokens) >= 6, tokens
    assert len(tokens) <= 20, tokens


@pytest.mark.parametrize("size", [514, 515, 1000, 49408])
def test_clip_vocab_layout(size, tmp_path):
    start = time.perf_counter()
    write_clip_tokenizer(tmp_path, size)
    assert time.perf_counter() - start < 2
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    tokens = sorted(vocab, key=vocab.get)
    assert len(tokens) == size and sorted(vocab.values()) == list(range(size))
    table = bytes_to_unicode()
    chars = list(table.values())
    assert sorted(table) == list(range(256)) and len(set(chars)) == 256
    assert (table[ord("a")], table[ord(" ")], table[0], table[255]) == ("a", "Ġ", "Ā", "ÿ")
    assert tokens[:512] == chars + [c + "</w>" for c in chars]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    lines = (tmp_path / "merges.txt").read_text().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) - 1 == size - 514
    for rank, line in enumerate(lines[1:]):
        left, right = line.split(" ")
        assert vocab[left] < 512 + rank and vocab[right] < 512 + rank   # both parts exist before the merge
        assert vocab[left + right] == 512 + rank                        # its result is the next token
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    row = [size - 2, *ab_ids(vocab), size - 1]
    assert runtime_ids(ClipTokenizer.from_dir(tmp_path), ["ab"], 5).tolist() == [row + [size - 1] * (5 - len(row))]


def ab_ids(vocab: dict) -> list[int]:
    """"ab" as CLIP BPE splits it: one token once the "ab</w>" merge exists."""
    return [vocab["ab</w>"]] if "ab</w>" in vocab else [vocab["a"], vocab["b</w>"]]


def test_sd15_size_has_48894_merges(tmp_path):
    write_clip_tokenizer(tmp_path, 49408, model_max_length=77)
    assert len((tmp_path / "merges.txt").read_text().splitlines()) - 1 == 48894
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77


def test_model_max_length_is_read(tmp_path):
    write_clip_tokenizer(tmp_path, 600, model_max_length=64)
    assert ClipTokenizer.from_dir(tmp_path).model_max_length == 64


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="513"):
        write_clip_tokenizer(tmp_path, 513)


def test_diffusers_loads_the_tokenizer(tmp_path):
    from diffusers import StableDiffusionPipeline
    write_clip_tokenizer(tmp_path / "tokenizer", 1000)
    others = ("vae", "text_encoder", "unet", "scheduler", "safety_checker", "feature_extractor", "image_encoder")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "tokenizer": ["transformers", "CLIPTokenizer"],
         **{k: [None, None] for k in others}}))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, **dict.fromkeys(others))
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(runtime_ids(ClipTokenizer.from_dir(tmp_path / "tokenizer"), PROMPTS), ids)


def test_transformers_save_pretrained_round_trips(tmp_path):
    """transformers 5 saves tokenizer.json + tokenizer_config.json only; the runtime reads that too."""
    from transformers import CLIPTokenizer
    write_clip_tokenizer(tmp_path / "src", 1000)
    CLIPTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    ours = runtime_ids(ClipTokenizer.from_dir(tmp_path / "saved"), PROMPTS)
    np.testing.assert_array_equal(ours, transformers_ids(tmp_path / "src", PROMPTS))


def test_runtime_imports_no_torch():
    code = ("import sys, sdrt.engine.tokenizer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def corrupt(folder, name: str, text: str):
    (folder / name).write_text(text)
    return folder


def add_json_merge(folder, merge: list[str]):
    """A tokenizer.json whose merges name a token its vocab lacks."""
    write_tokenizer_json(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["merges"].append(merge)
    return corrupt(folder, "tokenizer.json", json.dumps(data))


@pytest.mark.parametrize("damage", [
    lambda d: d,                                                         # nothing there
    lambda d: corrupt(d, "tokenizer.json", "{not json"),
    lambda d: corrupt(write_clip_tokenizer(d, 600), "vocab.json", "[1, 2"),
    lambda d: corrupt(write_clip_tokenizer(d, 600), "merges.txt", "#version: 0.2\nqq zz\n"),
    lambda d: corrupt(write_clip_tokenizer(d, 600), "tokenizer_config.json", "{"),
    lambda d: corrupt(write_clip_tokenizer(d, 600), "special_tokens_map.json", '{"pad_token": "<|pad|>"}'),
    lambda d: corrupt(write_clip_tokenizer(d, 600), "vocab.json", '{"a": 0}'),
    lambda d: corrupt(write_clip_tokenizer(d, 600), "tokenizer_config.json", '{"model_max_length": "long"}'),
    lambda d: add_json_merge(write_clip_tokenizer(d, 600), ["q", "z"]),
], ids=["empty", "bad-json", "bad-vocab", "bad-merges", "bad-config", "unknown-pad", "tiny-vocab",
        "bad-max-length", "json-bad-merge"])
def test_broken_folders_are_user_errors(damage, tmp_path):
    folder = damage(tmp_path)
    with pytest.raises(UserError) as e:
        ClipTokenizer.from_dir(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)
