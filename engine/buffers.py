"""Buffers allocated once per shape plan and bound once: host (numpy) for CPU backends, device
(cudaMalloc) for GPU ones. Same interface, so the loop does not care which.

DeviceBuffer.write copies into a pinned staging buffer and queues the upload without a sync;
read() is the one sync (it waits for everything queued before it)."""
from __future__ import annotations

import numpy as np

from sdrt.engine import cuda


class HostBuffer:
    def __init__(self, shape: tuple, dtype: str, stream=None):
        self.array = np.zeros(shape, dtype)
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    @property
    def ptr(self) -> int:
        return self.array.ctypes.data

    def write(self, values: np.ndarray) -> None:
        np.copyto(self.array, _checked(self, values))

    def read(self) -> np.ndarray:
        return self.array.copy()

    def copy_from(self, other: "HostBuffer") -> None:
        np.copyto(self.array, other.array)

    def view(self, shape: tuple) -> "HostBuffer":
        """The same memory under another shape of the same size (no copy)."""
        v = object.__new__(HostBuffer)
        v.array, v.shape, v.dtype = self.array.reshape(shape), tuple(shape), self.dtype
        return v


class DeviceBuffer:
    def __init__(self, shape: tuple, dtype: str, stream: cuda.Stream):
        self.shape, self.dtype, self.stream = tuple(shape), np.dtype(dtype), stream
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = cuda.malloc(self.nbytes)
        cuda.memset_zero(self.ptr, self.nbytes, stream)  # warm-up runs read these before any write
        self.staging = None    # PinnedHost, allocated on the first write
        self.uploaded = None   # Event recorded after the last upload from `staging`

    def write(self, values: np.ndarray) -> None:
        """Queue an upload of `values` (no sync): they are copied to pinned staging memory first."""
        values = _checked(self, values)
        if self.staging is None:
            self.staging, self.uploaded = cuda.PinnedHost(self.shape, self.dtype), cuda.Event()
        else:
            self.uploaded.sync()  # the previous upload has read the staging memory (long done)
        np.copyto(self.staging.array, values)
        cuda.copy_htod(self.ptr, self.staging, self.nbytes, self.stream)
        self.uploaded.record(self.stream)

    def read(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        cuda.copy_dtoh(out, self.ptr, self.stream)
        return out

    def copy_from(self, other: "DeviceBuffer") -> None:
        cuda.copy_dtod(self.ptr, other.ptr, self.nbytes, self.stream)

    def view(self, shape: tuple) -> "DeviceView":
        return DeviceView(self, shape)

    def __del__(self):
        try:
            cuda.free(self.ptr)
        except Exception:  # interpreter shutdown: the driver frees everything anyway
            pass


class Rows:
    """Rows [start, start + n) of a buffer's first (batch) axis, bound like a buffer: no copy, the
    address is the parent's plus the offset (the VAE decodes the batch in such slices)."""

    def __init__(self, parent, start: int, n: int):
        if not 0 <= start < start + n <= parent.shape[0]:
            raise ValueError(f"rows {start}..{start + n} outside a buffer of {parent.shape[0]}")
        row_bytes = int(np.prod(parent.shape[1:])) * parent.dtype.itemsize
        self.parent, self.ptr = parent, parent.ptr + start * row_bytes   # parent kept alive
        self.shape, self.dtype = (n,) + tuple(parent.shape[1:]), parent.dtype


def copy_rows(dst, src) -> None:
    """dst <- src, both the same size: buffers or Rows of one (on the device: queued on the stream,
    no sync; the CFG cut-off hands the conditional embeddings and the sampler state over so)."""
    if src.shape != dst.shape:
        raise ValueError(f"copy of {src.shape} into {dst.shape}")
    if isinstance(dst, HostBuffer):
        np.copyto(dst.array, _host_array(src))
    else:
        nbytes = int(np.prod(dst.shape)) * dst.dtype.itemsize
        cuda.copy_dtod(dst.ptr, src.ptr, nbytes, dst.stream)


def write_rows(buf, start: int, values: np.ndarray) -> None:
    """Rows [start, start + len(values)) of a buffer's first axis <- values; the other rows are
    untouched (a batch slot of a step-level batch). On the device the upload is waited for (one
    sync per write: slots are filled per request, not per step)."""
    rows = Rows(buf, start, len(values))
    values = _checked(rows, values)
    if isinstance(buf, HostBuffer):
        np.copyto(_host_array(rows), values)
        return
    staging = cuda.PinnedHost(values.shape, values.dtype)
    np.copyto(staging.array, values)
    cuda.copy_htod(rows.ptr, staging, values.nbytes, buf.stream)
    buf.stream.sync()


def read_rows(buf, start: int, n: int) -> np.ndarray:
    """Rows [start, start + n) of a buffer's first axis (on the device: waits for the stream)."""
    rows = Rows(buf, start, n)
    if isinstance(buf, HostBuffer):
        return _host_array(rows).copy()
    out = np.empty(rows.shape, rows.dtype)
    cuda.copy_dtoh(out, rows.ptr, buf.stream)
    return out


def _host_array(buf) -> np.ndarray:
    if isinstance(buf, Rows):
        start = (buf.ptr - buf.parent.ptr) // (int(np.prod(buf.shape[1:])) * buf.dtype.itemsize)
        return _host_array(buf.parent)[start:start + buf.shape[0]]
    return buf.array


def _checked(buf, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != buf.shape:
        raise ValueError(f"buffer holds {buf.shape}, got {values.shape}")
    return np.ascontiguousarray(values, dtype=buf.dtype)


class DeviceView(DeviceBuffer):
    """A DeviceBuffer's memory under another shape of the same size; the owner frees it."""

    def __init__(self, owner: DeviceBuffer, shape: tuple):
        if int(np.prod(shape)) != int(np.prod(owner.shape)):
            raise ValueError(f"view {tuple(shape)} does not fit buffer {owner.shape}")
        self.owner, self.shape, self.dtype, self.stream = owner, tuple(shape), owner.dtype, owner.stream
        self.nbytes, self.ptr = owner.nbytes, owner.ptr
        self.staging = self.uploaded = None   # its own staging for writes under this shape

    def __del__(self):
        pass
