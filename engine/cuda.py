"""The CUDA machinery every GPU backend shares: device memory, pinned host staging memory, one
stream, events, graphs.

Thin wrappers over cuda-python's runtime bindings (`cuda.bindings.runtime`), imported lazily so
that CPU-only installs never need them. Every call is checked; a failure raises with CUDA's own
error string.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

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


_why_unavailable = ""


def available() -> bool:
    """A CUDA device usable from cuda-python; else why_unavailable() says what stood in the way."""
    global _why_unavailable
    try:
        return check(rt().cudaGetDeviceCount()) > 0
    except Exception as e:  # no cuda-python, no driver, driver too old for this cuda-python...
        _why_unavailable = str(e).splitlines()[0] if str(e) else type(e).__name__
        return False


def why_unavailable() -> str:
    return _why_unavailable


def device_name() -> str:
    prop = check(rt().cudaGetDeviceProperties(0))
    name = prop.name
    return (name.decode() if isinstance(name, bytes) else name).rstrip("\x00")


def compute_capability() -> str:
    prop = check(rt().cudaGetDeviceProperties(0))
    return f"{prop.major}.{prop.minor}"


def mem_free_bytes() -> int:
    return int(check(rt().cudaMemGetInfo())[0])


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


class PinnedHost:
    """Page-locked host memory (cudaMallocHost), seen from numpy as `array`: a copy from it runs
    asynchronously, so the host goes on without waiting (a pageable source would need a sync)."""

    def __init__(self, shape: tuple, dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(check(rt().cudaMallocHost(max(nbytes, 1))))
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype, count=int(np.prod(shape))).reshape(shape)

    def __del__(self):
        try:
            rt().cudaFreeHost(self.ptr)
        except Exception:  # interpreter shutdown
            pass


def copy_htod(dst: int, src: PinnedHost, nbytes: int, stream: Stream) -> None:
    """Queue a copy from pinned host memory; no sync: `src` must stay unchanged until it ran."""
    check(rt().cudaMemcpyAsync(dst, src.ptr, nbytes, rt().cudaMemcpyKind.cudaMemcpyHostToDevice,
                               stream.handle))


def copy_dtoh(dst: np.ndarray, src: int, stream: Stream) -> None:
    """Copy into `dst` and wait: the stream's work up to here is done on return."""
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

    def sync(self) -> None:
        """Wait until the work queued before the last record() has run."""
        check(rt().cudaEventSynchronize(self.handle))

    def ms_since(self, start: "Event") -> float:
        return float(check(rt().cudaEventElapsedTime(start.handle, self.handle)))

    def __del__(self):
        try:
            rt().cudaEventDestroy(self.handle)
        except Exception:  # interpreter shutdown
            pass


def memset_zero(ptr: int, nbytes: int, stream: Stream) -> None:
    check(rt().cudaMemsetAsync(ptr, 0, nbytes, stream.handle))


class Graph:
    """A CUDA graph captured from whatever `enqueue` puts on the stream, replayed by `launch`."""

    def __init__(self, stream: Stream, enqueue):
        self.stream = stream
        mode = rt().cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt().cudaStreamBeginCapture(stream.handle, mode))
        try:
            enqueue()
        except BaseException:
            rt().cudaStreamEndCapture(stream.handle)  # unchecked: the capture is broken anyway
            raise
        graph = check(rt().cudaStreamEndCapture(stream.handle))
        try:
            self.exec = check(rt().cudaGraphInstantiate(graph, 0))
        finally:
            rt().cudaGraphDestroy(graph)               # the executable graph is all we keep

    def launch(self) -> None:
        check(rt().cudaGraphLaunch(self.exec, self.stream.handle))

    def __del__(self):
        try:
            rt().cudaGraphExecDestroy(self.exec)
        except Exception:  # never instantiated, or interpreter shutdown
            pass


@dataclass(frozen=True)
class Launch:
    """What a backend's launcher returns: `run()` runs one step, and which path it takes.

    graph: "sdrt"        the step is replayed from a CUDA graph sdrt captured (cuda.Graph)
           "onnxruntime" ONNX Runtime replays its own CUDA graph (enable_cuda_graph)
           "none"        plain runs, no graph; `error` says why (the capture error, or the reason)
    """
    run: Callable[[], None]
    graph: str
    error: str = ""


def capture_or_run(stream: Stream, run, warmups: int) -> Launch:
    """`run` as a replayable CUDA graph: `warmups` plain runs first (lazy initialisation, memory
    pools, algorithm searches happen there, not in the capture), then one capture. If the work
    cannot be captured (it syncs or allocates), plain `run` with the capture error."""
    for _ in range(warmups):
        run()
    stream.sync()
    try:
        return Launch(Graph(stream, run).launch, "sdrt")
    except Exception as e:  # CUDA's error (RuntimeError), or the runtime's own: ORT raises Fail, not RuntimeError
        stream.sync()
        return Launch(run, "none", f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
