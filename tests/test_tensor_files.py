"""The runtime's tensor-file reader (sdrt.engine.tensor_files): files written by torch.save and
safetensors read back exactly, and crafted files (sizes, strides and offsets that point outside
their storage, bad headers, a pickle that would run code) are refused with one line, before any
view of the bytes is made."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from sdrt.engine import tensor_files as tf
from sdrt.errors import UserError


# ---- crafting files --------------------------------------------------------------------------------

def safetensors_bytes(header, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file with this header (any JSON value, or raw bytes) and body."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


class StorageRef:
    """Pickled as torch.save pickles a storage: a persistent id ("storage", type, key, "cpu", numel)."""

    def __init__(self, kind: str, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class Tensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        import torch._utils
        return torch._utils._rebuild_tensor_v2, self.args


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            import torch
            kind = obj.kind[1:] if obj.kind.startswith("=") else getattr(torch, obj.kind)  # "=": as text
            return ("storage", kind, obj.key, "cpu", obj.numel)
        return None


def write_torch_zip(path, obj, storages: dict) -> None:
    """A torch zip file as torch.save lays it out: archive/data.pkl and archive/data/KEY."""
    import io
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)


FOUR = np.arange(4, dtype=np.float32).tobytes()     # a 4-element float storage


def crafted_pt(kind: str):
    """(pickled object, storages) of a crafted .pt file."""
    s = StorageRef("FloatStorage", "0", 4)
    vec = lambda t: {"string_to_param": {"*": t}, "name": "x"}
    return {
        "oversized-size": (vec(Tensor(s, 0, (256, 256), (256, 1))), {"0": FOUR}),
        "oversized-stride": (vec(Tensor(s, 0, (2, 2), (1000, 1))), {"0": FOUR}),
        "offset-past-storage": (vec(Tensor(s, 4, (1, 1), (1, 1))), {"0": FOUR}),
        "negative-stride": (vec(Tensor(s, 3, (1, 4), (4, -1))), {"0": FOUR}),
        "negative-offset": (vec(Tensor(s, -2, (1, 2), (2, 1))), {"0": FOUR}),
        "size-stride-mismatch": (vec(Tensor(s, 0, (1, 4), (1,))), {"0": FOUR}),
        "storage-numel-lies": (vec(Tensor(StorageRef("FloatStorage", "0", 1 << 20), 0, (1, 4), (4, 1))),
                               {"0": FOUR}),
        "unknown-storage-type": (vec(Tensor(StorageRef("ComplexFloatStorage", "0", 2), 0, (1, 2), (2, 1))),
                                 {"0": FOUR}),
        "storage-type-as-text": (vec(Tensor(StorageRef("=FloatStorageX", "0", 4), 0, (1, 4), (4, 1))),
                                 {"0": FOUR}),
        "missing-storage": (vec(Tensor(StorageRef("FloatStorage", "9", 4), 0, (1, 4), (4, 1))), {"0": FOUR}),
        "tensor-over-non-storage": (vec(Tensor([1.0, 2.0], 0, (1, 2), (2, 1))), {}),
    }[kind]


def craft_safetensors(kind: str) -> bytes:
    v = np.arange(8, dtype=np.float32).tobytes()
    entry = lambda begin, end, shape=(1, 4), dtype="F32": {"dtype": dtype, "shape": list(shape),
                                                           "data_offsets": [begin, end]}
    return {
        "offsets-past-end": safetensors_bytes({"<x>": entry(0, 1 << 20, (1, 1 << 18))}, v),
        "offsets-reversed": safetensors_bytes({"<x>": entry(16, 0)}, v),
        "overlapping": safetensors_bytes({"a": entry(0, 16), "b": entry(8, 24), "c": entry(24, 32, (1, 2))}, v),
        "hole": safetensors_bytes({"a": entry(0, 16), "b": entry(20, 32, (1, 3))}, v),
        "size-mismatch": safetensors_bytes({"<x>": entry(0, 32)}, v),
        "huge-header": safetensors_bytes(b"{}", v, length=1 << 62),
        "header-past-end": safetensors_bytes(b"{}", b"", length=4096),
        "list-header": safetensors_bytes([1, 2, 3], v),
        "bad-entry": safetensors_bytes({"<x>": [0, 32]}, v),
        "unknown-dtype": safetensors_bytes({"<x>": entry(0, 32, (1, 4), "C64")}, v),
        "wrong-dtype-type": safetensors_bytes({"<x>": entry(0, 32, (1, 8), ["F32"])}, v),
        "negative-shape": safetensors_bytes({"<x>": entry(0, 32, (-1, -8))}, v),
        "bool-shape": safetensors_bytes({"<x>": {"dtype": "F32", "shape": [True, 8], "data_offsets": [0, 32]}}, v),
        "bad-metadata": safetensors_bytes({"__metadata__": [1], "<x>": entry(0, 32, (1, 8))}, v),
        "duplicate-name": safetensors_bytes(b'{"<x>": {"dtype": "F32", "shape": [1, 8], "data_offsets": [0, 32]},'
                                            b' "<x>": {"dtype": "F32", "shape": [1, 8], "data_offsets": [0, 32]}}', v),
        "short": b"\x08\x00",
        "not-json": safetensors_bytes(b"\xff\xfe{", v),
    }[kind]


PT_KINDS = ["oversized-size", "oversized-stride", "offset-past-storage", "negative-stride", "negative-offset",
            "size-stride-mismatch", "storage-numel-lies", "unknown-storage-type", "storage-type-as-text",
            "missing-storage", "tensor-over-non-storage"]
ST_KINDS = ["offsets-past-end", "offsets-reversed", "overlapping", "hole", "size-mismatch", "huge-header",
            "header-past-end", "list-header", "bad-entry", "unknown-dtype", "wrong-dtype-type", "negative-shape",
            "bool-shape", "bad-metadata", "duplicate-name", "short", "not-json"]
PROBLEM = {"oversized-size": "reaches element 65535 of a 4-element storage",
           "oversized-stride": "reaches element 1001 of a 4-element storage",
           "offset-past-storage": "reaches element 4 of a 4-element storage",
           "negative-stride": "negative", "negative-offset": "negative",
           "size-stride-mismatch": "not integers of one length",
           "storage-numel-lies": "holds 16 bytes",
           "unknown-storage-type": "needs torch.ComplexFloatStorage", "storage-type-as-text": "unsupported storage",
           "missing-storage": "no entry",
           "tensor-over-non-storage": "not a storage",
           "offsets-past-end": "past the end of the file", "offsets-reversed": "0 <= begin <= end",
           "overlapping": "overlap", "hole": "hole", "size-mismatch": "32 bytes of data for shape [1, 4]",
           "huge-header": "format limit", "header-past-end": "exceeds the file", "list-header": "JSON list",
           "bad-entry": "not {dtype, shape, data_offsets}", "unknown-dtype": "C64",
           "wrong-dtype-type": "dtype ['F32']", "negative-shape": "non-negative", "bool-shape": "non-negative",
           "bad-metadata": "__metadata__", "duplicate-name": "twice", "short": "shorter than the header",
           "not-json": "not JSON"}


@pytest.fixture
def no_views(monkeypatch):
    """as_strided replaced by a recorder: a refused file must never get as far as a view."""
    calls = []
    real = np.lib.stride_tricks.as_strided

    def spy(*a, **k):
        calls.append((a, k))
        return real(*a, **k)
    monkeypatch.setattr(np.lib.stride_tricks, "as_strided", spy)
    return calls


def assert_one_line(e: pytest.ExceptionInfo, path, *words) -> None:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("kind", PT_KINDS)
def test_crafted_torch_file_is_refused_before_any_view(kind, tmp_path, no_views):
    path = tmp_path / f"{kind}.pt"
    write_torch_zip(path, *crafted_pt(kind))
    with pytest.raises(tf.TensorFileError) as e:
        tf.read_torch_pickle(path)
    assert_one_line(e, path, PROBLEM[kind])
    assert not no_views


@pytest.mark.parametrize("kind", ST_KINDS)
def test_crafted_safetensors_is_refused(kind, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(craft_safetensors(kind))
    with pytest.raises(tf.TensorFileError) as e:
        tf.read_safetensors(path)
    assert_one_line(e, path, PROBLEM[kind])


def test_code_running_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    path = tmp_path / "evil.pt"
    write_torch_zip(path, {"string_to_param": {"*": Evil()}}, {})
    with pytest.raises(UserError) as e:
        tf.read_torch_pickle(path)
    assert_one_line(e, path, "the pickle needs", "system", "not loaded")
    assert not marker.exists()


def test_a_storage_cannot_be_given_state(tmp_path):
    """BUILD on a storage (pickle's way to set attributes) is refused: the storage stays what the file holds."""
    import io
    s = StorageRef("FloatStorage", "0", 4)
    buf = io.BytesIO()
    p = Pickler(buf, protocol=2)
    p.dump(s)
    data = buf.getvalue()[:-1] + pickle.EMPTY_DICT + pickle.BUILD + pickle.STOP   # storage.__setstate__({})
    path = tmp_path / "state.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/data/0", FOUR)
    with pytest.raises(UserError, match="storage cannot be given state"):
        tf.read_torch_pickle(path)


def test_truncated_files(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"a": torch.ones(64, 8)}, tmp_path / "full.safetensors")
    torch.save({"a": torch.ones(64, 8)}, tmp_path / "full.pt")
    for name in ("full.safetensors", "full.pt"):
        raw = (tmp_path / name).read_bytes()
        for cut in (len(raw) - 100, len(raw) // 2, 5):
            path = tmp_path / f"cut{cut}-{name}"
            path.write_bytes(raw[:cut])
            reader = tf.read_safetensors if name.endswith(".safetensors") else tf.read_torch_pickle
            with pytest.raises(tf.TensorFileError) as e:
                reader(path)
            assert_one_line(e, path)


def test_damaged_storage_bytes_fail_the_zip_check(tmp_path):
    import torch
    torch.save({"a": torch.arange(256, dtype=torch.float32)}, tmp_path / "a.pt")
    raw = bytearray((tmp_path / "a.pt").read_bytes())
    at = bytes(raw).index(np.arange(256, dtype=np.float32)[100:104].tobytes())
    raw[at] ^= 0xFF
    (tmp_path / "b.pt").write_bytes(bytes(raw))
    with pytest.raises(tf.TensorFileError, match="damaged torch file"):
        tf.read_torch_pickle(tmp_path / "b.pt")


# ---- files written by torch.save and safetensors read back exactly ------------------------------------

def views_of_shared_storages():
    import torch
    base = torch.arange(120, dtype=torch.float32).reshape(10, 12)
    half = torch.randn(6, 7).half()
    return {
        "base": base, "t": base.t(), "slice": base[2:5, 3:11], "step": base[1::3, ::4], "col": base[:, 5],
        "offset_flat": base.view(-1)[37:61], "expanded": base[3:4, :5].expand(6, 5),
        "row_vs_base": base[7], "half_t": half.t(), "half_corner": half[4:, 5:],
        "bf16": torch.randn(3, 5).to(torch.bfloat16)[:, 1:4], "f64": torch.randn(4, 2, dtype=torch.float64).t(),
        "i64": torch.arange(30).reshape(5, 6)[::2, 1::2], "u8": torch.arange(40, dtype=torch.uint8)[5:25:3],
        "bool": torch.tensor([True, False, True, True])[1:], "empty": base[3:3], "scalar": torch.tensor(2.5),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        "nested": OrderedDict(inner=[base[0, :3], {"x": base[9, ::5]}]), "number": 7, "text": "word",
    }


def as_numpy(x):
    import torch
    if isinstance(x, torch.Tensor):
        x = x.detach()
        return x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    if isinstance(x, dict):
        return {k: as_numpy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [as_numpy(v) for v in x]
    return x


def assert_same(got, want) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


def test_torch_save_round_trip_of_views_of_shared_storages(tmp_path):
    import torch
    data = views_of_shared_storages()
    torch.save(data, tmp_path / "views.pt")
    with zipfile.ZipFile(tmp_path / "views.pt") as z:   # the views share storages in the file
        storages = [n for n in z.namelist() if "/data/" in n]
    assert len(storages) < sum(isinstance(v, torch.Tensor) for v in data.values())
    got = tf.read_torch_pickle(tmp_path / "views.pt")
    assert_same(got, as_numpy(data))
    assert torch.load(tmp_path / "views.pt", weights_only=True).keys() == got.keys()


def test_safetensors_round_trip(tmp_path):
    import torch
    from safetensors.torch import save_file
    data = {k: v.clone(memory_format=torch.contiguous_format) for k, v in views_of_shared_storages().items()
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter)}
    save_file(data, tmp_path / "t.safetensors", metadata={"format": "pt", "note": "x"})
    tensors, meta = tf.read_safetensors(tmp_path / "t.safetensors")
    assert meta == {"format": "pt", "note": "x"}
    assert_same(dict(sorted(tensors.items())), dict(sorted(as_numpy(data).items())))
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    assert tf.read_safetensors(empty) == ({}, {})


# ---- through the CLI: one line, exit 2, nothing written -------------------------------------------

CLI_CASES = [("embedding", "pt", k) for k in ("oversized-size", "negative-stride", "unknown-storage-type")] + \
            [("embedding", "safetensors", k) for k in ("offsets-past-end", "list-header", "unknown-dtype")] + \
            [("lora", "safetensors", k) for k in ("overlapping", "huge-header", "offsets-past-end", "list-header",
                                                  "unknown-dtype", "short")] + \
            [("embedding", "pt", "evil"), ("lora", "safetensors", "truncated")]


@pytest.mark.parametrize("flag,suffix,kind", CLI_CASES, ids=[f"{f}-{k}" for f, _, k in CLI_CASES])
def test_cli_crafted_file_exits_2(tiny_fp32, tmp_path, flag, suffix, kind):
    path = tmp_path / f"bad.{suffix}"
    if kind == "evil":
        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {tmp_path / 'ran'}",)
        write_torch_zip(path, {"string_to_param": {"*": Evil()}}, {})
        words = ["the pickle needs"]
    elif kind == "truncated":
        from safetensors.numpy import save_file
        save_file({"lora_unet_x.lora_down.weight": np.ones((2, 8), np.float32)}, str(path))
        path.write_bytes(path.read_bytes()[:-9])
        words = ["past the end of the file"]
    elif suffix == "pt":
        write_torch_zip(path, *crafted_pt(kind))
        words = [PROBLEM[kind]]
    else:
        path.write_bytes(craft_safetensors(kind))
        words = [PROBLEM[kind]]
    out = tmp_path / "o.png"
    p = run_cli("generate", tiny_fp32, "a fox", f"--{flag}", path, "--steps", "1", "--height", "64",
                "--width", "64", "--backend", "onnxruntime-cpu", "--out", out)
    assert_user_error(p, str(path), *words)
    assert not out.exists() and not (tmp_path / "ran").exists()


def test_runtime_reader_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys, sdrt.engine.tensor_files, sdrt.engine.lora, sdrt.engine.embedding_files; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
