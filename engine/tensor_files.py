"""Tensor files from untrusted sources -> numpy arrays, with numpy only (no torch, no safetensors).

    safetensors   u64 little-endian N, N bytes of JSON {name: {dtype, shape, data_offsets}, __metadata__},
                  then the tensors' bytes, each [begin, end) of that buffer
    torch zip     what torch.save writes (.pt, .bin, .ckpt): ARCHIVE/data.pkl, a pickle whose tensors
                  are _rebuild_tensor_v2(storage, offset, size, stride) over ARCHIVE/data/KEY

Nothing in a file is trusted. Every number that places bytes is checked before any view is made:
  safetensors  header length bounded (100 MB, as the format's spec) and within the file; the header a
               JSON object of well-formed entries; dtype from DTYPES; data_offsets within the buffer,
               of exactly prod(shape) · itemsize bytes, not overlapping and leaving no hole
               (the spec's "entirely indexed" rule)
  torch        storages of a known type whose archive entry holds exactly numel · itemsize bytes;
               each tensor's offset, size and stride non-negative integers with
               offset + Σ (size_i - 1) · stride_i < the storage's numel, so the view lies inside it
The unpickler resolves only the globals that rebuild plain tensors (what torch.load(weights_only=True)
accepts for them): anything else (a pickle that would run code) is refused, never called.
Problems raise TensorFileError (a UserError) naming the file and what is wrong.
"""
from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from sdrt.errors import UserError, first_line

BF16 = "bf16"   # numpy has no bfloat16: read as uint16, returned as float32 (its top half)
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": BF16, "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}                     # safetensors names
STORAGES = {"DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": BF16,
            "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
            "ByteStorage": "u1", "BoolStorage": "?"}                               # torch's storage types
MAX_HEADER = 100 * 2 ** 20          # safetensors' own limit on the JSON header
MAX_PICKLE = 64 * 2 ** 20           # data.pkl: tensors live in storages, the pickle is small
MAX_DIMS = 32                       # numpy's limit is 64; real tensors have <= 5
MAX_EXPANDED = 2 ** 24              # elements a view may hold beyond its storage's (stride-0 expands)


class TensorFileError(UserError):
    """An unreadable or unsafe tensor file: `path`, and `problem` (what is wrong)."""

    def __init__(self, path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"cannot read {path}: {problem}")


def _itemsize(dtype) -> int:
    return 2 if dtype == BF16 else np.dtype(dtype).itemsize


def _as_array(raw, dtype, count: int, offset: int) -> np.ndarray:
    """`count` elements of `dtype` at byte `offset` of `raw` (checked by the caller to lie within)."""
    if dtype == BF16:   # bfloat16 = the high half of a float32
        return (np.frombuffer(raw, "<u2", count, offset).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, np.dtype(dtype), count, offset)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- safetensors ---------------------------------------------------------------------------------

def read_safetensors(path) -> tuple[dict, dict]:
    """({name: array}, metadata {str: str}) of a .safetensors file. The arrays are read-only views
    of the file's bytes (BF16: float32 copies); TensorFileError when the file is unreadable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TensorFileError(path, e.strerror or first_line(e)) from None
    header, body = _safetensors_header(path, raw)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise TensorFileError(path, "__metadata__ is not a JSON object of strings")
    spans = {name: _safetensors_entry(path, name, info, body[1]) for name, info in header.items()}
    _check_spans(path, spans, body[1])
    return {name: _as_array(raw, dtype, count, body[0] + begin).reshape(shape)
            for name, (begin, end, dtype, shape, count) in spans.items()}, meta


def _safetensors_header(path: Path, raw: bytes) -> tuple[dict, tuple[int, int]]:
    """(the JSON header, (where the buffer starts, its length))."""
    if len(raw) < 8:
        raise TensorFileError(path, f"not a safetensors file ({len(raw)} bytes, shorter than the header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER or 8 + n > len(raw):
        raise TensorFileError(path, f"not a safetensors file (header length {n} exceeds "
                                    f"{'the file' if n <= MAX_HEADER else 'the format limit of 100 MB'})")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorFileError(path, f"not a safetensors file (header is not JSON: {first_line(e)})") from None
    if not isinstance(header, dict):
        raise TensorFileError(path, f"not a safetensors file (header is a JSON {type(header).__name__}, "
                                    "not an object)")
    return header, (8 + n, len(raw) - 8 - n)


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _safetensors_entry(path: Path, name: str, info, size: int) -> tuple:
    """(begin, end, dtype, shape, count) of one header entry, every field checked."""
    where = f"tensor {name!r:.80}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise TensorFileError(path, f"{where}: entry is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise TensorFileError(path, f"{where}: dtype {dtype!r:.20} is not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise TensorFileError(path, f"{where}: shape {shape!r:.60} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(path, f"{where}: data_offsets {offsets!r:.60} are not [begin, end] with "
                                    "0 <= begin <= end")
    begin, end = offsets
    if end > size:
        raise TensorFileError(path, f"{where}: data_offsets [{begin}, {end}] lie past the end of the "
                                    f"file ({size} bytes of tensor data): the file is truncated or damaged")
    count = math.prod(shape)
    if end - begin != count * _itemsize(DTYPES[dtype]):
        raise TensorFileError(path, f"{where}: {end - begin} bytes of data for shape {shape} "
                                    f"{dtype} ({count * _itemsize(DTYPES[dtype])} bytes)")
    return begin, end, DTYPES[dtype], tuple(shape), count


def _check_spans(path: Path, spans: dict, size: int) -> None:
    """The tensors tile the buffer: none overlaps another, no hole, nothing after the last."""
    at = 0
    for name, (begin, end, *_) in sorted(spans.items(), key=lambda s: (s[1][0], s[1][1])):
        if begin < at:
            raise TensorFileError(path, f"tensor {name!r:.80}: data_offsets [{begin}, {end}] overlap "
                                        "another tensor's bytes")
        if begin > at:
            raise TensorFileError(path, f"tensor {name!r:.80}: a hole of {begin - at} bytes before its data")
        at = end
    if at != size:
        raise TensorFileError(path, f"{size - at} bytes after the last tensor's data")


# ---- torch zip pickles, restricted to plain tensors ---------------------------------------------

def read_torch_pickle(path):
    """What torch.save wrote (dicts, lists, numbers, strings and tensors as numpy arrays), from a
    torch zip file; TensorFileError when unreadable, unsafe or more than plain tensors."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        why = ("not a torch zip file (the legacy torch.save format, truncated, or not a torch file)"
               if isinstance(e, zipfile.BadZipFile) else e.strerror or first_line(e))
        raise TensorFileError(path, why) from None
    with archive:
        pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise TensorFileError(path, "no data.pkl in the torch archive")
        root = pkl[:-len("data.pkl")]
        try:
            if _read_member(archive, root + "byteorder", 16, path, missing=b"little") != b"little":
                raise TensorFileError(path, "tensors saved on a big-endian machine are not supported")
            data = _read_member(archive, pkl, MAX_PICKLE, path)
            return TensorUnpickler(io.BytesIO(data), archive, root, path).load()
        except UserError:
            raise
        except Exception as e:   # malformed pickle, damaged zip entry (bad CRC, truncated), ...
            raise TensorFileError(path, f"damaged torch file ({type(e).__name__}: {first_line(e)})") from None


def _read_member(archive: zipfile.ZipFile, name: str, limit: int, path: Path, missing=None) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError:
        if missing is not None:
            return missing
        raise TensorFileError(path, f"the torch archive has no entry {name!r:.80}") from None
    if info.file_size > limit:
        raise TensorFileError(path, f"archive entry {name!r:.80} holds {info.file_size} bytes, "
                                    f"more than the {limit} expected")
    return archive.read(info)


class Storage:
    """One storage of a torch file: a 1-D read-only array. Never changed by the pickle."""
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a storage cannot be given state")


def rebuild_tensor(path: Path, storage, offset, size, stride, *_) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied; checked first."""
    if not isinstance(storage, Storage):
        raise TensorFileError(path, f"a tensor over a {type(storage).__name__}, not a storage")
    size, stride = _int_tuple(size), _int_tuple(stride)
    if not _is_int(offset) or size is None or stride is None or len(size) != len(stride) \
            or len(size) > MAX_DIMS:
        raise TensorFileError(path, "a tensor's offset, size or stride is not integers of one length")
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise TensorFileError(path, f"a tensor with a negative offset, size or stride "
                                    f"(offset {offset}, size {list(size)}, stride {list(stride)})")
    a = storage.array
    count = math.prod(size)
    if count == 0:
        if offset > len(a):
            raise TensorFileError(path, f"an empty tensor at offset {offset} of a {len(a)}-element storage")
        return np.zeros(size, a.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(a):
        raise TensorFileError(path, f"a tensor of size {list(size)}, stride {list(stride)} at offset "
                                    f"{offset} reaches element {last} of a {len(a)}-element storage")
    if count > max(len(a), MAX_EXPANDED):
        raise TensorFileError(path, f"a tensor of {count} elements over a {len(a)}-element storage")
    view = np.lib.stride_tricks.as_strided(a[offset:], shape=size, strides=tuple(s * a.itemsize for s in stride),
                                           writeable=False)
    return view.copy()


def _int_tuple(x) -> tuple | None:
    if isinstance(x, (tuple, list)) and all(_is_int(v) for v in x):
        return tuple(x)
    return None


def rebuild_parameter(path: Path, data, *_) -> np.ndarray:
    """torch._utils._rebuild_parameter(_with_state): the tensor itself."""
    if not isinstance(data, np.ndarray):
        raise TensorFileError(path, f"a parameter holding a {type(data).__name__}, not a tensor")
    return data


class TensorUnpickler(pickle.Unpickler):
    """What torch.load(weights_only=True) accepts for plain tensors in dicts; nothing else."""
    REBUILD = {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
               ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter}

    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(file)
        self.archive, self.root, self.path = archive, root, path
        self.storages: dict[str, Storage] = {}   # one per key: views of one storage share it

    def find_class(self, module, name):
        if (module, name) in self.REBUILD:
            rebuild = self.REBUILD[(module, name)]
            return lambda *args: rebuild(self.path, *args)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGES:
            return name
        raise TensorFileError(self.path, f"the pickle needs {module:.60}.{name:.60}, more than plain tensors "
                                         "(torch's weights_only would refuse it too): not loaded")

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], str) and pid[1] in STORAGES and isinstance(pid[2], str)
                and _is_int(pid[4]) and pid[4] >= 0):
            raise TensorFileError(self.path, f"unsupported storage record {pid!r:.80}")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            dtype = STORAGES[kind]
            nbytes = numel * _itemsize(dtype)
            raw = _read_member(self.archive, f"{self.root}data/{key}", nbytes, self.path)
            if len(raw) != nbytes:
                raise TensorFileError(self.path, f"storage {key!r:.40} holds {len(raw)} bytes, its record "
                                                 f"says {numel} {kind} elements ({nbytes} bytes)")
            array = _as_array(raw, dtype, numel, 0)
            array.flags.writeable = False
            self.storages[key] = Storage(array)
        return self.storages[key]
