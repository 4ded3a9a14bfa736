"""sdrt.engine.buffers.DeviceBuffer without a GPU: a fake cuda-python runtime that queues stream
work and runs it only when the host waits, as a GPU would, so a missing wait shows up as wrong data."""
from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from sdrt.engine import buffers, cuda

KIND = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)


class FakeRuntime:
    """Memory is host memory; every stream op is queued and runs on a sync, in order."""
    cudaMemcpyKind = KIND
    cudaStreamNonBlocking = 1

    def __init__(self):
        self.blocks, self.pinned, self.queue, self.syncs, self.events = {}, set(), [], [], {}

    def _alloc(self, n):
        block = ctypes.create_string_buffer(n)
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def cudaMalloc(self, n):
        return self._alloc(n)

    def cudaMallocHost(self, n):
        err, ptr = self._alloc(n)
        self.pinned.add(ptr)
        return err, ptr

    def cudaFree(self, ptr):
        return (0,)

    cudaFreeHost = cudaFree

    def cudaStreamCreateWithFlags(self, flags):
        return 0, 7

    def cudaMemsetAsync(self, ptr, value, n, stream):
        self.queue.append(lambda: ctypes.memset(ptr, value, n))
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == KIND.cudaMemcpyHostToDevice:
            assert src in self.pinned, "an async upload without a sync needs a pinned source"
        self.queue.append(lambda: ctypes.memmove(dst, src, n))
        return (0,)

    def _run(self, upto):
        for op in self.queue[:upto]:
            op()
        self.queue = self.queue[upto:]
        self.events = {e: max(0, pos - upto) for e, pos in self.events.items()}

    def cudaStreamSynchronize(self, stream):
        self.syncs.append("stream")
        self._run(len(self.queue))
        return (0,)

    def cudaEventCreate(self):
        return 0, len(self.events) + 100

    def cudaEventRecord(self, event, stream):
        self.events[event] = len(self.queue)
        return (0,)

    def cudaEventSynchronize(self, event):
        self.syncs.append("event")
        self._run(self.events.get(event, 0))
        return (0,)

    def cudaEventDestroy(self, event):
        return (0,)


@pytest.fixture
def rt(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr(cuda, "_rt", fake)
    return fake


def test_uploads_queue_without_a_sync_and_read_is_the_one_sync(rt):
    stream = cuda.Stream()
    a = buffers.DeviceBuffer((2, 3), "float32", stream)
    b = buffers.DeviceBuffer((4,), "int32", stream)
    a.write(np.arange(6, dtype=np.float64).reshape(2, 3))  # converted to the buffer's dtype
    b.write([1, 2, 3, 4])
    assert rt.syncs == [] and rt.queue  # queued, not run: the host went on
    np.testing.assert_array_equal(a.read(), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert rt.syncs == ["stream"]
    np.testing.assert_array_equal(b.read(), [1, 2, 3, 4])


def test_rewrite_waits_for_the_previous_upload(rt):
    """Values written twice: the first upload must have read the staging memory before the second
    write overwrites it (seen here through a device copy queued between the two)."""
    stream = cuda.Stream()
    src, dst = (buffers.DeviceBuffer((3,), "float32", stream) for _ in range(2))
    src.write(np.full(3, 1.0))
    dst.copy_from(src)
    src.write(np.full(3, 2.0))
    assert rt.syncs == ["event"]
    np.testing.assert_array_equal(dst.read(), [1, 1, 1])
    np.testing.assert_array_equal(src.read(), [2, 2, 2])


def test_new_buffers_read_zero_and_writes_check_shape(rt):
    buf = buffers.DeviceBuffer((2, 2), "float16", cuda.Stream())
    np.testing.assert_array_equal(buf.read(), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"buffer holds \(2, 2\), got \(4,\)"):
        buf.write(np.zeros(4))


def test_a_failed_call_raises_cudas_message(rt):
    rt.cudaMalloc = lambda n: (2, 0)
    rt.cudaGetErrorString = lambda err: (0, b"out of memory")
    with pytest.raises(RuntimeError, match="CUDA error 2: out of memory"):
        buffers.DeviceBuffer((1,), "float32", cuda.Stream())


def test_view_shares_memory_under_another_shape(rt):
    """The text encoder writes [rows * chunks, 77, D] into what the step reads as [rows, 77 * chunks, D]."""
    stream = cuda.Stream()
    buf = buffers.DeviceBuffer((2, 6), "float32", stream)
    view = buf.view((4, 3))
    assert view.ptr == buf.ptr and view.shape == (4, 3) and view.nbytes == buf.nbytes
    view.write(np.arange(12).reshape(4, 3))
    np.testing.assert_array_equal(buf.read(), np.arange(12, dtype=np.float32).reshape(2, 6))
    buf.write(np.ones((2, 6)))
    np.testing.assert_array_equal(view.read(), np.ones((4, 3)))
    del view                                     # the owner frees the memory, the view never does
    np.testing.assert_array_equal(buf.read(), np.ones((2, 6)))
    with pytest.raises(ValueError, match="does not fit"):
        buf.view((5, 3))
    host = buffers.HostBuffer((2, 6), "float16")
    host.view((3, 4)).write(np.full((3, 4), 2.0))
    np.testing.assert_array_equal(host.read(), np.full((2, 6), 2.0))
