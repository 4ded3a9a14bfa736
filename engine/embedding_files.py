"""Textual-inversion embedding files -> (token, vectors [N, D]) with numpy only (no torch).

Formats (what diffusers' load_textual_inversion reads, and what other SD UIs write):
  diffusers   learned_embeds.safetensors / .bin        {token: [D] or [N, D]}
  web UI      name.pt                                  {"string_to_param": {"*": [N, D]}, "name": ...}
  web UI      name.safetensors                         {"emb_params": [N, D]}

.bin/.pt are torch zip pickles: sdrt.engine.tensor_files reads both formats, checking every
offset, size and stride against the file, with a restricted unpickler (plain tensors only; anything
else is refused, never executed). The token is the spec's ":TOKEN", else
the file's own (the diffusers key, the web UI's "name"), else the file's stem.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.engine import request, tensor_files
from sdrt.errors import UserError


@dataclass(frozen=True)
class Embedding:
    token: str
    vectors: np.ndarray      # float32 [N, D]: N tokens (token, token_1, ... token_{N-1})
    path: Path


def parse_spec(spec) -> tuple[Path, str | None]:
    """"FILE[:TOKEN]" (or a (FILE, TOKEN) pair) -> (path, token or None), by request.parse_spec's
    rule: a colon that belongs to an existing path (C:\\, a file named a:b) is part of the path."""
    path, token = request.parse_spec(spec, str, None)
    return Path(path), token


def load(spec) -> Embedding:
    path, token = parse_spec(spec)
    if not path.is_file():
        raise UserError(f"embedding {path}: no such file")
    data = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_pickle(path)
    own, vectors = token_and_vectors(data, path)
    if not isinstance(vectors, np.ndarray):
        raise UserError(f"embedding {path}: holds a {type(vectors).__name__} where its vectors should be")
    vectors = vectors.astype(np.float32)
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.all(np.isfinite(vectors)):
        raise UserError(f"embedding {path}: expected finite vectors of shape [N, width], "
                        f"got shape {list(vectors.shape)}")
    return Embedding(token or own or path.stem, vectors, path)


def token_and_vectors(data, path: Path) -> tuple[str | None, np.ndarray]:
    """(the file's own token or None, the vectors) from any of the formats above."""
    if isinstance(data, np.ndarray):
        return None, data
    if not isinstance(data, dict):
        raise UserError(f"embedding {path}: holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:
        param = data["string_to_param"]
        if not isinstance(param, dict) or "*" not in param:
            raise UserError(f"embedding {path}: string_to_param has no '*' entry")
        name = data.get("name")
        return (name if isinstance(name, str) and name else None), param["*"]
    if "emb_params" in data:
        return None, data["emb_params"]
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if len(data) == 1 and arrays:
        return next(iter(arrays.items()))
    raise UserError(f"embedding {path}: not a textual-inversion file (keys {sorted(map(str, data))[:5]}; "
                    "expected {token: vectors}, string_to_param or emb_params)")


# ---- the files: read by sdrt.engine.tensor_files (every offset, size and stride checked) --------

def read_safetensors(path: Path) -> dict:
    try:
        return tensor_files.read_safetensors(path)[0]
    except tensor_files.TensorFileError as e:
        raise UserError(f"embedding {path}: unreadable ({e.problem})") from None


def read_torch_pickle(path: Path):
    try:
        return tensor_files.read_torch_pickle(path)
    except tensor_files.TensorFileError as e:
        raise UserError(f"embedding {path}: unreadable ({e.problem})") from None
