"""sdrt's GPU code against the real installed modules, on a CPU-only machine: every attribute, enum
member, method, positional count and keyword it uses of tensorrt_rtx (the TensorRT API family),
cuda.bindings.runtime and onnxruntime exists and takes what we pass. The uses are collected from
sdrt's source (tests/api_surface.py), so a new call is covered without a list to keep.

Calls that differ between versions are guarded in the code (hasattr / getattr / version checks) and
may be absent; the tests report which are absent here.
"""
from __future__ import annotations

import importlib.util
import types

import pytest

import api_surface as A

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed")
needs_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt not installed")

# CUDAExecutionProvider options, from ONNX Runtime's documentation
# (https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#configuration-options):
# a CPU build cannot tell which keys the CUDA EP accepts, so the documented list stands in.
CUDA_EP_OPTIONS = {
    "device_id", "user_compute_stream", "has_user_compute_stream", "do_copy_in_default_stream",
    "use_ep_level_unified_stream", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
    "cudnn_conv_use_max_workspace", "cudnn_conv1d_pad_to_nc1d", "enable_cuda_graph",
    "enable_skip_layer_norm_strict_mode", "use_tf32", "gpu_external_alloc", "gpu_external_free",
    "gpu_external_empty_cache", "prefer_nhwc", "tunable_op_enable", "tunable_op_tuning_enable",
    "tunable_op_max_tuning_duration_ms", "sdpa_kernel", "fuse_conv_bias",
}
# Run option config keys, from ONNX Runtime's include/onnxruntime/core/session/
# onnxruntime_run_options_config_keys.h (kOrtRunOptionsConfigDisableSynchronizeExecutionProviders,
# kOrtRunOptionsConfigCudaGraphAnnotation, ...).
RUN_CONFIG_KEYS = {
    "disable_synchronize_execution_providers", "gpu_graph_id", "memory.enable_memory_arena_shrinkage",
    "enable_profiling", "qnn.htp_perf_mode", "qnn.htp_perf_mode_post_run", "qnn.rpc_control_latency",
}


def assert_clean(report: A.Report, minimum: int) -> None:
    problems = [f"{u.file}:{u.line} {u.expr}: {u.problem}" for u in report.problems]
    assert not problems, "\n".join(problems)
    assert len(report.checked) >= minimum, f"only {len(report.checked)} uses found: is the collector broken?"


def files_of(report: A.Report) -> set[str]:
    return {u.file for u in report.checked}


@needs_rtx
def test_tensorrt_rtx_has_everything_sdrt_uses():
    import tensorrt_rtx
    report = A.check("tensorrt", tensorrt_rtx)
    assert_clean(report, 50)
    assert {"engine/tensorrt.py", "export/build.py", "engine/engine_keys.py"} <= files_of(report)
    assert report.guarded                 # the version-dependent calls (shown with -s), and which are absent here
    for u in report.guarded:
        state = "absent" if u.problem else "present"
        print(f"guarded ({state} in tensorrt_rtx {tensorrt_rtx.__version__}): {u.file}:{u.line} {u.expr}")


@needs_trt
def test_tensorrt_has_everything_sdrt_uses():
    import tensorrt
    assert_clean(A.check("tensorrt", tensorrt), 50)


def test_cuda_runtime_has_everything_sdrt_uses():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")
    report = A.check("cuda", runtime)
    assert_clean(report, 30)
    assert {"engine/cuda.py", "sdrt/doctor.py"} <= files_of(report)
    # the positional counts were really compared (Cython signatures are readable)
    assert A.signatures(runtime.cudaMemcpyAsync, "cudaMemcpyAsync", bound=False)[0][0] == \
        ["dst", "src", "count", "kind", "stream"]


def test_onnxruntime_has_everything_sdrt_uses():
    import onnxruntime
    report = A.check("onnxruntime", onnxruntime)
    assert_clean(report, 12)
    exprs = {u.expr for u in report.checked}
    assert {"io.bind_input", "io.bind_output", "opts.add_free_dimension_override_by_name",
            "opts.add_run_config_entry"} <= exprs


def test_ort_provider_options_and_run_config_keys_are_documented():
    keys, entries = A.provider_option_keys(), A.run_config_keys()
    assert {"user_compute_stream", "enable_cuda_graph"} <= keys and "gpu_graph_id" in entries
    assert keys <= CUDA_EP_OPTIONS, keys - CUDA_EP_OPTIONS
    assert entries <= RUN_CONFIG_KEYS, entries - RUN_CONFIG_KEYS


# ---- a renamed attribute makes the checks fail -----------------------------------------------------

def without(module, name: str, **replace):
    """A stand-in for `module` that lacks `name` (and has `replace` instead of some attributes)."""
    fake = types.ModuleType(module.__name__)
    for k in dir(module):
        if k != name:
            setattr(fake, k, replace.get(k, getattr(module, k)))
    return fake


@needs_rtx
def test_checker_reports_a_missing_tensorrt_attribute():
    import tensorrt_rtx
    report = A.check("tensorrt", without(tensorrt_rtx, "ExecutionContextAllocationStrategy"))
    assert any("ExecutionContextAllocationStrategy" in u.problem and u.file == "engine/tensorrt.py"
               for u in report.problems), [u.problem for u in report.problems]


@needs_rtx
def test_checker_reports_a_renamed_tensorrt_method():
    import tensorrt_rtx

    class IExecutionContext:  # execute_async_v3 renamed
        set_input_shape = tensorrt_rtx.IExecutionContext.set_input_shape
        get_tensor_shape = tensorrt_rtx.IExecutionContext.get_tensor_shape
        set_tensor_address = tensorrt_rtx.IExecutionContext.set_tensor_address
        set_device_memory = tensorrt_rtx.IExecutionContext.set_device_memory

        def execute_async_v4(self, stream_handle):
            pass
    report = A.check("tensorrt", without(tensorrt_rtx, "", IExecutionContext=IExecutionContext))
    assert any("execute_async_v3" in u.problem for u in report.problems), [u.problem for u in report.problems]


def test_checker_reports_a_missing_cuda_function_and_a_wrong_argument_count():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")

    def cudaMemcpyAsync(dst, src, count, kind):  # one parameter short of what sdrt passes
        pass
    report = A.check("cuda", without(runtime, "cudaGraphInstantiate", cudaMemcpyAsync=cudaMemcpyAsync))
    problems = [u.problem for u in report.problems]
    assert any("cudaGraphInstantiate" in p for p in problems), problems
    assert any("cudaMemcpyAsync" in p and "given 5" in p for p in problems), problems


def test_checker_reports_a_renamed_onnxruntime_keyword():
    import onnxruntime

    class IOBinding(onnxruntime.IOBinding):  # buffer_ptr renamed
        def bind_input(self, name, device_type, device_id, element_type, shape, buffer):
            pass
    report = A.check("onnxruntime", without(onnxruntime, "", IOBinding=IOBinding))
    assert any("bind_input" in u.problem and "buffer_ptr" in u.problem for u in report.problems), \
        [u.problem for u in report.problems]


def test_guarded_uses_may_be_absent():
    """A use inside `if hasattr(...)` (or its early-return fallback) is reported, not failed."""
    import onnxruntime
    report = A.check("onnxruntime", without(onnxruntime, "__version__"))
    absent = [u for u in report.problems if "__version__" in u.problem]
    assert absent and all(not u.guarded for u in absent)   # sdrt reads __version__ unguarded
