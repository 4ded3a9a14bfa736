"""Textual-inversion embedding files -> (token, vectors [N, D]) with numpy only (no torch).

Formats (what diffusers' load_textual_inversion reads, and what other SD UIs write):
  diffusers   learned_embeds.safetensors / .bin        {token: [D] or [N, D]}
  web UI      name.pt                                  {"string_to_param": {"*": [N, D]}, "name": ...}
  web UI      name.safetensors                         {"emb_params": [N, D]}

.bin/.pt are torch zip pickles: read by a restricted unpickler that accepts only what torch's
weights_only loader accepts for plain tensors (storages, _rebuild_tensor_v2, _rebuild_parameter,
OrderedDict); anything else is refused, never executed. The token is the spec's ":TOKEN", else
the file's own (the diffusers key, the web UI's "name"), else the file's stem.
"""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.engine import request
from sdrt.errors import UserError, first_line

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16"}
TORCH_STORAGES = {"DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
                  "BFloat16Storage": "bf16"}


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
    vectors = np.asarray(vectors, np.float32)
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


# ---- safetensors: 8-byte header length, JSON header, raw little-endian tensors -----------------

def read_safetensors(path: Path) -> dict:
    try:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        body = memoryview(raw)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"embedding {path}: tensor {name} has dtype {info['dtype']}, "
                                "expected F32, F16, BF16 or F64")
            start, end = info["data_offsets"]
            out[name] = to_float32(body[start:end], dtype, info["shape"])
        return out
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"embedding {path}: unreadable safetensors file ({first_line(e)})") from None


def to_float32(buffer, dtype, shape) -> np.ndarray:
    if dtype == "bf16":   # bfloat16: the top half of a float32
        bits = np.frombuffer(buffer, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, np.dtype(dtype).newbyteorder("<")).astype(np.float32).reshape(shape)


# ---- torch zip pickles, restricted to plain tensors ------------------------------------------

def read_torch_pickle(path: Path):
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        why = "not a torch zip file (legacy torch.save format or not an embedding)" \
            if isinstance(e, zipfile.BadZipFile) else first_line(e)
        raise UserError(f"embedding {path}: unreadable ({why})") from None
    with archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise UserError(f"embedding {path}: unreadable (no data.pkl in the torch archive)")
        root = pkl[:-len("data.pkl")]
        try:
            return TensorUnpickler(archive, root, path).load()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"embedding {path}: unreadable ({first_line(e)})") from None


def rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage."""
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


def rebuild_parameter(data, *_):
    return data


class TensorUnpickler(pickle.Unpickler):
    """What torch.load(weights_only=True) accepts for a dict of tensors; nothing else."""
    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
               ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
               ("collections", "OrderedDict"): OrderedDict,
               **{("torch", name): name for name in TORCH_STORAGES}}

    def __init__(self, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(archive.open(root + "data.pkl"))
        self.archive, self.root, self.path = archive, root, path

    def find_class(self, module, name):
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise UserError(f"embedding {self.path}: the pickle needs {module}.{name}, more than "
                            "plain tensors (torch's weights_only would refuse it too): not loaded")
        return found

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and pid[1] in TORCH_STORAGES):
            raise UserError(f"embedding {self.path}: unsupported storage {pid!r:.60}")
        dtype = TORCH_STORAGES[pid[1]]
        raw = self.archive.read(f"{self.root}data/{pid[2]}")
        if dtype == "bf16":
            return to_float32(raw, dtype, (-1,))
        return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
