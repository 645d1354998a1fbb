"""The one place runtime sessions are made: ONNX Runtime (CPU) and LiteRT, configured alike for the latency
table, the benchmarks (`modules.benchmark`) and deployment checks (`modules.deploy`), plus a no-argument
runner of a session on a fixed random input.

Every ORT session: ORT_ENABLE_ALL, sequential execution, ``intra_op_num_threads=threads``,
``inter_op_num_threads=1``, errors-only logging, CPUExecutionProvider.
"""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import numpy as np

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def ort_precise_default() -> bool:
    """True on x86 CPUs without VNNI/AMX, where ORT's u8 x s8 kernels saturate (see `modules.deploy`)."""
    from modules.export import cpu_has_vnni

    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return is_x86 and not cpu_has_vnni()


def ort_session(model, threads: int = 1, precise: bool | None = False, profile: bool = False,
                optimized_model_filepath: str | os.PathLike | None = None):
    """An ORT CPU session of `model` (a file path or the serialized model's bytes). ``precise``: set
    ``session.x64quantprecision=1`` (None: when `ort_precise_default()`), which deployment checks need on
    CPUs without VNNI; timing leaves it off, as deployed. ``profile``: ORT's per-node profiler on."""
    import onnxruntime as ort

    if not isinstance(model, (bytes, bytearray)):
        model = Path(model)
        if not model.is_file():
            raise FileNotFoundError(f"ONNX model {model} not found")
        model = str(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3  # errors only (no "removing unused initializer" chatter)
    if ort_precise_default() if precise is None else precise:
        so.add_session_config_entry("session.x64quantprecision", "1")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"ort_profile_{os.getpid()}")
    if optimized_model_filepath:
        so.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def tflite_interpreter(path, threads: int = 1, use_xnnpack: bool = True):
    """An allocated LiteRT interpreter; ``use_xnnpack=False`` selects the builtin kernels without
    default delegates (the setting of the original phone measurements)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        raise ImportError(f"TFLite benchmarks need the LiteRT interpreter ({e}); install it with: "
                          "pip install ai-edge-litert==2.3.0") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TFLite model {path} not found")
    resolver = OpResolverType.AUTO if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    return it


def random_input(shape, dtype, rng: np.random.Generator) -> np.ndarray:
    """Standard-normal floats, or integers over the dtype's whole range."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)


def _static_shape(shape) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]  # symbolic batch -> 1


def session_runner(sess, iobinding: bool = False):
    """A no-argument callable running `sess` once on a fixed random input. ``iobinding``: input and output
    bound once to preallocated buffers (no per-run output allocation and copy to numpy, as between two
    blocks inside a network)."""
    import onnxruntime as ort

    i = sess.get_inputs()[0]
    dtype = ORT_DTYPES.get(i.type, np.float32)
    shape = _static_shape(i.shape)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape).astype(dtype) if dtype == np.float32
         else rng.integers(0, 128, size=shape).astype(dtype))
    if not iobinding:
        feed = {i.name: x}
        return lambda: sess.run(None, feed)
    b = sess.io_binding()
    b.bind_cpu_input(i.name, x)
    for o in sess.get_outputs():
        out = ort.OrtValue.ortvalue_from_shape_and_type(_static_shape(o.shape), ORT_DTYPES.get(o.type, np.float32))
        b.bind_ortvalue_output(o.name, out)
    b._keep = x  # the bound input must outlive the binding
    return lambda: sess.run_with_iobinding(b)


def tflite_runner(path, threads: int = 1, use_xnnpack: bool = True):
    """A no-argument callable invoking a LiteRT interpreter of `path` once on a fixed random input."""
    it = tflite_interpreter(path, threads, use_xnnpack)
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        it.set_tensor(d["index"], random_input(tuple(d["shape"]), d["dtype"], rng))
    return it.invoke


def device_info() -> dict:
    """This machine: CPU model name, architecture, ONNX Runtime version."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    info = {"cpu": cpu or platform.processor(), "machine": platform.machine()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info
