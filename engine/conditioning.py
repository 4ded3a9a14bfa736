"""Prompt -> token ids and weights in 77-token chunks -> token embeddings; and the emphasis applied
to the text encoder's output. numpy only.

    items       = parse(prompt)                          [(text, weight) | BREAK]   (prompt_parser)
    ids, w      = chunks of 75 tokens: [bos, t_1..t_75, eos, pad...] each, weights 1 at bos/eos/pad
                  (CLIP: <|startoftext|> ... <|endoftext|>; LDM-BERT: [CLS] ... [SEP] [PAD]...)
    e           = table[ids]                             [rows * k, 77, D]   token embeddings
    z           = text_encoder(e, clip_skip)             [rows * k, 77, D]
    z'          = z * w;  z' *= mean(z) / mean(z')        per chunk (all 77 positions), the web UI's rule
    cond        = z' viewed as [rows, 77 * k, D]         what the UNet attends to

Textual inversion: an embedding's vectors are looked up under new token ids (token, token_1, ...),
which the tokenizer learns as added tokens; a multi-vector token in a prompt is
expanded to "token token_1 ..." as diffusers does. The text encoder never changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.engine import embedding_files, prompt_parser
from sdrt.engine.bert_tokenizer import BertTokenizer
from sdrt.engine.tokenizer import ClipTokenizer, TextTokenizer
from sdrt.errors import UserError


TOKENIZERS = {"clip": ClipTokenizer, "bert": BertTokenizer}   # by ModelConfig.text_encoder


def load_tokenizer(path, text_encoder: str = "clip") -> TextTokenizer:
    """The tokenizer folder of an export whose text encoder is `text_encoder` (ModelConfig's)."""
    if text_encoder not in TOKENIZERS:
        raise UserError(f"this export's text encoder is {text_encoder!r}: this sdrt knows "
                        f"{', '.join(TOKENIZERS)}; update sdrt or export again")
    return TOKENIZERS[text_encoder].from_dir(path)


@dataclass
class Chunks:
    ids: np.ndarray          # int32 [k, text_len]
    weights: np.ndarray      # float32 [k, text_len]

    def __len__(self) -> int:
        return len(self.ids)


class Conditioning:
    """A tokenizer and the token table it indexes, with any textual-inversion tokens added."""

    def __init__(self, tokenizer: TextTokenizer, table: np.ndarray, text_len: int, embeddings=()):
        self.text_len = text_len
        self.embeddings = [embedding_files.load(e) for e in embeddings]
        self.table = table                   # the model's rows, shared (never copied)
        self.tokenizer, self.added = add_embeddings(tokenizer, table, self.embeddings)
        self.multi = {self.tokenizer.backend.token_to_id(e.token): expanded(e)
                      for e in self.embeddings if len(e.vectors) > 1}

    @property
    def body_len(self) -> int:
        return self.text_len - 2

    def chunks(self, prompt: str, syntax: str = "webui") -> Chunks:
        """The prompt's chunks of body_len tokens (BREAK closes one early); at least one.
        syntax "webui": emphasis and BREAK (prompt_parser); "plain": the text as it is, weight 1."""
        ids, weights = [], []
        cur_ids, cur_w = [], []

        def close():
            ids.append(self.pad([self.tokenizer.bos_id, *cur_ids, self.tokenizer.eos_id]))
            weights.append(self.pad([1.0, *cur_w, 1.0], 1.0))
            cur_ids.clear(), cur_w.clear()

        items = prompt_parser.parse(prompt) if syntax == "webui" else [(prompt, 1.0)]
        for item in items:
            if item is prompt_parser.BREAK:
                close()
                continue
            text, weight = item
            for token in self.tokenizer.token_ids(self.expand(text)):
                if len(cur_ids) == self.body_len:
                    close()
                cur_ids.append(token)
                cur_w.append(weight)
        if cur_ids or not ids:
            close()
        return Chunks(np.array(ids, np.int32), np.array(weights, np.float32))

    def pad(self, row: list, value=None) -> list:
        return row + [self.tokenizer.pad_id if value is None else value] * (self.text_len - len(row))

    def expand(self, text: str) -> str:
        """diffusers' multi-vector rule: each multi-vector token in the text -> "t t_1 ... t_{N-1}"."""
        if not self.multi:
            return text
        for token_id in set(self.tokenizer.token_ids(text)) & self.multi.keys():
            token, replacement = self.multi[token_id]
            text = text.replace(token, replacement)
        return text

    def rows(self, prompts: list[str], syntax: str = "webui") -> Chunks:
        """Chunks of several prompts, each padded with empty-prompt chunks to the longest:
        [len(prompts) * k, text_len], prompt-major (row r, chunk c at r * k + c)."""
        per_prompt = {p: self.chunks(p, syntax) for p in dict.fromkeys(prompts)}
        k = max(len(c) for c in per_prompt.values())
        empty = self.chunks("")
        padded = {p: pad_chunks(c, k, empty) for p, c in per_prompt.items()}
        return Chunks(np.concatenate([padded[p].ids for p in prompts]),
                      np.concatenate([padded[p].weights for p in prompts]))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [*ids.shape, D] in the table's dtype (the text encoder's input): the
        model's rows, and the embeddings' vectors at their added ids."""
        out = self.table[np.minimum(ids, len(self.table) - 1)]
        for token_id, vector in self.added.items():
            out[ids == token_id] = vector
        return out


def pad_chunks(c: Chunks, k: int, empty: Chunks) -> Chunks:
    n = k - len(c)
    return Chunks(np.concatenate([c.ids, np.repeat(empty.ids, n, 0)]),
                  np.concatenate([c.weights, np.repeat(empty.weights, n, 0)]))


def expanded(e) -> tuple[str, str]:
    return e.token, " ".join(vector_tokens(e))


def vector_tokens(e) -> list[str]:
    """token, token_1, ..., token_{N-1}: one per vector, as diffusers names them."""
    return [e.token] + [f"{e.token}_{i}" for i in range(1, len(e.vectors))]


def add_embeddings(tokenizer: TextTokenizer, table: np.ndarray, embeddings: list):
    """(tokenizer with the new tokens, {new id: vector in the table's dtype})."""
    if not embeddings:
        return tokenizer, {}
    width = table.shape[1]
    for e in embeddings:
        if e.vectors.shape[1] != width:
            raise UserError(f"embedding {e.path} has width {e.vectors.shape[1]}, this model's text encoder "
                            f"takes {width}: it was trained for another model")
    tokens = [t for e in embeddings for t in vector_tokens(e)]
    if len(set(tokens)) != len(tokens):
        raise UserError(f"two embeddings use the same token: give each its own with FILE:TOKEN")
    tok = tokenizer.with_added_tokens(tokens)
    vectors = np.concatenate([e.vectors for e in embeddings]).astype(table.dtype)
    return tok, {tok.backend.token_to_id(t): v for t, v in zip(tokens, vectors)}


def emphasize(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-token weights on the encoder output, then each chunk's mean restored (the web UI's
    emphasis): z [rows, text_len, D], weights [rows, text_len]. Chunks whose weights are all 1
    are returned untouched (so "(word:1.0)" is exactly the unweighted prompt)."""
    out = z.copy()
    for r in np.flatnonzero((weights != 1.0).any(axis=1)):
        zr = z[r].astype(np.float32)
        mean = zr.mean()
        zw = zr * weights[r][:, None]
        out[r] = (zw * (mean / zw.mean())).astype(z.dtype)
    return out
