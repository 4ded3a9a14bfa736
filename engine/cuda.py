"""The CUDA machinery every GPU backend shares: device memory, one stream, events, graphs.

Thin wrappers over cuda-python's runtime bindings (`cuda.bindings.runtime`), imported lazily so
that CPU-only installs never need them. Every call is checked; a failure raises with CUDA's own
error string.
"""
from __future__ import annotations

import numpy as np

_rt = None


def rt():
    """cuda-python's runtime module (cuda.bindings.runtime, or cuda.cudart before 12.6)."""
    global _rt
    if _rt is None:
        try:
            from cuda.bindings import runtime as mod
        except ImportError:
            from cuda import cudart as mod
        _rt = mod
    return _rt


def check(result):
    """cuda-python returns (err, *values): raise on err, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, msg = rt().cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {int(err)}: {msg.decode() if isinstance(msg, bytes) else msg}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def available() -> bool:
    try:
        return check(rt().cudaGetDeviceCount()) > 0
    except Exception:  # no driver, no cuda-python, no device: all mean "no GPU here"
        return False


def device_name() -> str:
    prop = check(rt().cudaGetDeviceProperties(0))
    name = prop.name
    return (name.decode() if isinstance(name, bytes) else name).rstrip("\x00")


def compute_capability() -> str:
    prop = check(rt().cudaGetDeviceProperties(0))
    return f"{prop.major}.{prop.minor}"


def mem_used_bytes() -> int:
    free, total = check(rt().cudaMemGetInfo())
    return int(total) - int(free)


class Stream:
    def __init__(self):
        self.handle = check(rt().cudaStreamCreateWithFlags(rt().cudaStreamNonBlocking))

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def sync(self) -> None:
        check(rt().cudaStreamSynchronize(self.handle))


def malloc(nbytes: int) -> int:
    return int(check(rt().cudaMalloc(max(nbytes, 1))))


def free(ptr: int) -> None:
    check(rt().cudaFree(ptr))


def copy_htod(dst: int, src: np.ndarray, stream: Stream) -> None:
    src = np.ascontiguousarray(src)
    check(rt().cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes,
                               rt().cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))
    stream.sync()  # the source is pageable numpy memory: keep it alive until copied


def copy_dtoh(dst: np.ndarray, src: int, stream: Stream) -> None:
    check(rt().cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes,
                               rt().cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))
    stream.sync()


def copy_dtod(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    check(rt().cudaMemcpyAsync(dst, src, nbytes, rt().cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                               stream.handle))


class Event:
    def __init__(self):
        self.handle = check(rt().cudaEventCreate())

    def record(self, stream: Stream) -> None:
        check(rt().cudaEventRecord(self.handle, stream.handle))

    def ms_since(self, start: "Event") -> float:
        return float(check(rt().cudaEventElapsedTime(start.handle, self.handle)))

    def __del__(self):
        try:
            rt().cudaEventDestroy(self.handle)
        except Exception:  # interpreter shutdown
            pass


class Graph:
    """A CUDA graph captured from whatever `enqueue` puts on the stream, replayed by `launch`."""

    def __init__(self, stream: Stream, enqueue):
        self.stream = stream
        mode = rt().cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt().cudaStreamBeginCapture(stream.handle, mode))
        try:
            enqueue()
        finally:
            graph = check(rt().cudaStreamEndCapture(stream.handle))
        self.graph = graph
        self.exec = check(rt().cudaGraphInstantiate(graph, 0))

    def launch(self) -> None:
        check(rt().cudaGraphLaunch(self.exec, self.stream.handle))
