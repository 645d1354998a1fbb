"""ONNX / TFLite export helpers, shared by `onnx_tools/` and `tflite_tools/`.

Works on any eval-able ``torch.nn.Module`` taking one ``[1, 3, H, W]`` image tensor:

* :func:`export_onnx`: fp32 ONNX, TorchScript exporter (``dynamo=False``, exact opset 13..17),
  fixed batch 1, input ``input`` / output ``output``, constant folding, atomic write.
* :func:`quantize_onnx_int8`: ONNX Runtime static quantization with the settings that give a real
  speed-up on x86 (environment.md): **uint8 activations, int8 per-channel weights**, QDQ or
  QOperator format, MinMax calibration on real images (:func:`calib_from_loader`) or on random
  data (with a :class:`RandomCalibrationWarning`). On x86 CPUs without VNNI the weights default to
  7-bit range (``reduce_range``) because ORT's AVX2 u8 x s8 kernels saturate otherwise.
* :func:`export_tflite`: fp32 or int8 ``.tflite`` through litert-torch (no TensorFlow); int8 is
  PT2E static quantization (int8 activations per tensor, int8 symmetric per-channel weights) and
  the file has **int8 input and output tensors** (see ``input_details()['quantization']``).
* input.csv handling for the scripts (:func:`read_input_csv`, :func:`collect_entries`), file
  names (:func:`model_file_stem`) and model building from an encoding
  (:func:`build_model_from_encoding`, a lazy call of ``modules.supernet.build_subnet``).

Example::

    from modules.export import export_onnx, quantize_onnx_int8, export_tflite
    export_onnx(model, 224, "out/m.onnx")
    quantize_onnx_int8("out/m.onnx", "out/m_int8.onnx", calib=None)        # random calib, warns
    export_tflite(model, 224, "out/m_int8.tflite", int8=True, calib=images)
"""
from __future__ import annotations

import copy
import csv
import hashlib
import logging
import os
import platform
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "RandomCalibrationWarning", "export_onnx", "quantize_onnx_int8", "export_tflite",
    "random_calib", "calib_from_loader", "calib_loader_from_dir", "InputEntry", "read_input_csv",
    "parse_input_line", "collect_entries", "named_model_entry", "model_file_stem", "lsq_checkpoint_stem",
    "build_model_from_encoding", "LITERT_INSTALL_HINT", "cpu_has_vnni",
]

ONNX_OPSETS = range(13, 18)  # per-channel QDQ needs >= 13; the dynamo exporter writes 18
LITERT_INSTALL_HINT = "pip install litert-torch==0.10.0 ai-edge-litert==2.3.0 (needs torch < 2.15)"


class RandomCalibrationWarning(UserWarning):
    """Quantization scales come from random data: fine for latency, meaningless for accuracy."""


# ----------------------------------------------------------------------------- small helpers
def _hw(resolution, model: nn.Module | None = None) -> tuple[int, int]:
    if resolution is None and model is not None:
        resolution = getattr(model, "resolution", None)
    if resolution is None:
        raise ValueError("resolution is None and the model has no `.resolution` attribute")
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module):
    """Put `model` in eval mode, restore each submodule's training flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


def atomic_target(path: str | os.PathLike, suffix: str) -> tuple[Path, Path]:
    """(path, a fresh temp file beside it) for writers that need a file name of their own (exporters); the caller
    moves the temp file onto `path` with os.replace when the writer succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the final file gets the usual permissions
    return path, Path(tmp)


def _as_nchw_batches(calib: Iterable, hw: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Yield float32 [1, C, H, W] arrays from arrays/tensors shaped [C,H,W], [1,C,H,W] or [N,C,H,W]."""
    for i, a in enumerate(calib):
        if isinstance(a, (tuple, list)):  # (images, labels) from a DataLoader
            a = a[0]
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.asarray(a, dtype=np.float32)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"calibration sample {i}: expected [C,H,W] or [N,C,H,W], got shape {a.shape}")
        if hw is not None and tuple(a.shape[2:]) != tuple(hw):
            raise ValueError(f"calibration sample {i}: spatial size {a.shape[2:]} != model input {hw}")
        for j in range(a.shape[0]):
            yield np.ascontiguousarray(a[j:j + 1])


# ----------------------------------------------------------------------------- calibration data
def random_calib(resolution, num: int = 32, seed: int = 0, warn: bool = True, channels: int = 3) -> list[np.ndarray]:
    """`num` random-normal [1,C,H,W] float32 inputs (roughly ImageNet-normalised statistics)."""
    if warn:
        warnings.warn("INT8 calibration uses random data: the quantized model is for latency only, its "
                      "accuracy is meaningless (pass real images, e.g. --calib_dir)",
                      RandomCalibrationWarning, stacklevel=2)
    h, w = _hw(resolution)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, channels, h, w), dtype=np.float32) for _ in range(num)]


def calib_from_loader(loader: Iterable, num_samples: int = 128) -> list[np.ndarray]:
    """Take `num_samples` images from a DataLoader (yielding images or (images, labels)) as
    [1,3,H,W] float32 arrays; the loader's transform must match what the model sees at test time."""
    out: list[np.ndarray] = []
    for a in _as_nchw_batches(loader):
        out.append(a)
        if len(out) >= num_samples:
            break
    if not out:
        raise ValueError("calibration loader yielded no images")
    return out


def calib_loader_from_dir(root: str | os.PathLike, resolution, batch_size: int = 16,
                          num_workers: int = 0, transform=None, seed: int = 0):
    """A shuffled DataLoader over an ImageFolder dir (``root/<class>/<img>``, e.g. a dataset's ``train``
    split) with the project's eval transform (``modules.data.build_transform``: resize r/0.875, center
    crop r, ImageNet mean/std) unless `transform` is given."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration dir {root} does not exist "
                                "(expected an ImageFolder: root/<class>/<image>)")
    from torchvision import datasets

    h, w = _hw(resolution)
    if transform is None:
        if h != w:
            raise ValueError(f"calibration transform: square resolution expected, got {h}x{w} (pass transform=)")
        from modules.data import build_transform

        transform = build_transform(train=False, image_size=h)  # the eval transform used everywhere else
    try:
        ds = datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
        raise FileNotFoundError(f"calibration dir {root}: {e}") from None
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       generator=g)


# ----------------------------------------------------------------------------- ONNX
def _inline_identity_initializers(model):
    """The TorchScript exporter de-duplicates equal initializers (e.g. the all-zero folded BN biases
    of a randomly initialised net) and feeds them through ``Identity`` nodes; ORT's quantizer then
    cannot quantize those biases ("Expected bias ... to be an initializer"). Give each consumer its
    own initializer again."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep = []
    for n in g.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            t = copy.deepcopy(inits[n.input[0]])
            t.name = n.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    return model


def _fold_batchnorm(model):
    """Fold ``Conv → BatchNormalization`` pairs (all parameters initializers, the Conv output used only
    by the BN) into the Conv. The TorchScript exporter folds BN only for plain nn.Conv2d/nn.BatchNorm2d;
    modules that call F.conv2d / F.batch_norm on sliced weights (elastic ops) keep a float BN, which
    ORT's quantizer cannot put inside an int8 kernel."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            consumers[x] = consumers.get(x, 0) + 1
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    drop = set()
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        conv = producer.get(bn.input[0])
        if (conv is None or conv.op_type != "Conv" or consumers.get(bn.input[0]) != 1 or bn.input[0] in outputs
                or not all(x in inits for x in bn.input[1:]) or conv.input[1] not in inits
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits)):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[x]).astype(np.float64) for x in bn.input[1:])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
             if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0]))
        scale = gamma / np.sqrt(var + eps)
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
        b = (b - mean) * scale + beta
        wname, bname = f"{conv.name or conv.output[0]}.folded_weight", f"{conv.name or conv.output[0]}.folded_bias"
        g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), wname),
                              numpy_helper.from_array(b.astype(np.float32), bname)])
        del conv.input[1:]
        conv.input.extend([wname, bname])
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
    if drop:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        used = {x for n in g.node for x in n.input} | outputs
        unused = [t for t in g.initializer if t.name not in used]
        for t in unused:
            g.initializer.remove(t)
    return model


def export_onnx(model: nn.Module, resolution, path: str | os.PathLike, opset: int = 17,
                dynamo: bool = False, in_channels: int = 3) -> str:
    """Export `model` (fp32, eval mode, batch 1, input ``[1,in_channels,H,W]``) to ONNX at `path`.

    `resolution` is an int, an (H, W) pair or None (then ``model.resolution``). Input/output names
    are ``input``/``output``. The model's train/eval flags are restored afterwards. Returns the path.
    ``dynamo=True`` uses the torch.export-based exporter, which writes opset 18 whatever is asked
    (a warning says so); the default TorchScript exporter writes exactly `opset`.
    """
    import onnx

    if opset not in ONNX_OPSETS:
        raise ValueError(f"opset {opset} not supported: use 13..17 (per-channel QDQ needs >= 13)")
    h, w = _hw(resolution, model)
    path, tmp = atomic_target(path, ".onnx")
    x = torch.randn(1, in_channels, h, w, device=_device(model))
    try:
        with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            if dynamo:
                prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset,
                                         input_names=["input"], output_names=["output"])
                proto = prog.model_proto
            else:
                torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["output"], do_constant_folding=True,
                                  export_params=True)
                proto = onnx.load(str(tmp))
        proto = _fold_batchnorm(_inline_identity_initializers(proto))
        onnx.checker.check_model(proto)
        got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != opset:
            warnings.warn(f"{path.name}: asked for opset {opset}, the exporter wrote opset {got}"
                          + (" (the dynamo exporter always writes >= 18; use dynamo=False)" if dynamo else ""))
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def cpu_has_vnni() -> bool:
    """True if this x86 CPU has 8-bit dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8).
    Without them ONNX Runtime's u8 x s8 kernels (AVX2 ``vpmaddubsw``) saturate int16 partial sums:
    the fused int8 model can then be far off its QDQ emulation (measured: 25 % vs 1.5 % output
    error on a small ReLU6 net, AMD EPYC AVX2-only). Non-x86 CPUs return False."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def auto_reduce_range(reduce_range: bool | None) -> bool:
    """`reduce_range` for ORT's quantizer: as given, else 7-bit weights on x86 CPUs without VNNI (whose
    u8 x s8 kernels saturate, see `cpu_has_vnni`)."""
    if reduce_range is not None:
        return bool(reduce_range)
    is_x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    return is_x86 and not cpu_has_vnni()


class _QuietPreprocessHint(logging.Filter):
    def filter(self, record):  # ORT's quantizer nags about running its pre-processing; we export clean graphs
        return "pre-process" not in record.getMessage() and "pre-processing" not in record.getMessage()


def _onnx_input(path: str | os.PathLike) -> tuple[str, tuple[int, ...]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one graph input, got {[i.name for i in inputs]}")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim)
    return inputs[0].name, dims


def quantize_onnx_int8(fp32_path: str | os.PathLike, int8_path: str | os.PathLike, calib: Iterable | None = None,
                       fmt: str = "qdq", per_channel: bool = True, num_random_calib: int = 32,
                       method: str = "minmax", reduce_range: bool | None = None, seed: int = 0,
                       int8_activations: bool = True) -> str:
    """ONNX Runtime static quantization of `fp32_path` into `int8_path` (atomic).

    uint8 activations (``QuantType.QUInt8``), int8 weights (per-channel by default), `fmt` ``"qdq"``
    or ``"qoperator"``. `calib` is an iterable of images as numpy arrays / tensors ([C,H,W],
    [1,C,H,W] or [N,C,H,W], preprocessed like the model's input) or None, in which case
    `num_random_calib` random-normal inputs are used and a :class:`RandomCalibrationWarning` is issued.

    `reduce_range` quantizes weights to 7 bits (-64..63). ``None`` (default) = auto: on for an x86 CPU
    without VNNI/AMX (:func:`cpu_has_vnni`), where full-range u8 x s8 kernels saturate and give wrong
    outputs, off otherwise. Same speed either way; pass False when exporting for a VNNI device.

    `int8_activations`: hardswish and SE gates rewritten so that they run in int8
    (`modules.onnx_int8`); False quantizes the graph as exported (they stay float between DQ/Q).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"fp32 ONNX model {fp32_path} not found")
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if fmt.lower() not in formats:
        raise ValueError(f"quantization format {fmt!r}: use one of {sorted(formats)}")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method.lower() not in methods:
        raise ValueError(f"calibration method {method!r}: use one of {sorted(methods)}")
    name, dims = _onnx_input(fp32_path)
    if len(dims) != 4 or min(dims) <= 0:
        raise ValueError(f"{fp32_path}: input {name!r} must have a fixed [1,C,H,W] shape, got {dims}")
    if calib is None:
        samples = random_calib(dims[2:], num_random_calib, seed=seed, warn=False, channels=dims[1])
        warnings.warn(f"{fp32_path.name}: INT8 calibration uses {num_random_calib} random inputs: the INT8 model "
                      "is for latency only, its accuracy is meaningless (calibrate on real images)",
                      RandomCalibrationWarning, stacklevel=2)
    else:
        samples = list(_as_nchw_batches(calib, dims[2:]))
        if not samples:
            raise ValueError("calibration data is empty")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(samples)

        def get_next(self):
            a = next(self._it, None)
            return None if a is None else {name: a}

        def rewind(self):
            self._it = iter(samples)

    out, tmp = atomic_target(int8_path, ".onnx")
    root = logging.getLogger()
    flt = _QuietPreprocessHint()
    root.addFilter(flt)
    src = Path(f"{tmp}.fp32.onnx")
    try:
        _int8_ready_copy(fp32_path, src, int8_activations)
        quantize_static(str(src), str(tmp), _Reader(), quant_format=formats[fmt.lower()],
                        per_channel=per_channel, reduce_range=auto_reduce_range(reduce_range),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method.lower()],
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        if int8_activations:
            _fold_scales(tmp)
        os.replace(tmp, out)
    finally:
        root.removeFilter(flt)
        tmp.unlink(missing_ok=True)
        src.unlink(missing_ok=True)
    return str(out)


def _int8_ready_copy(fp32_path: Path, dst: Path, int8_activations: bool) -> None:
    """The model quantize_static reads: `fp32_path` as is, or with its hardswish / SE gates rewritten."""
    import onnx

    from modules.onnx_int8 import int8_friendly_activations

    m = onnx.load(str(fp32_path))
    onnx.save(int8_friendly_activations(m) if int8_activations else m, str(dst))


def _fold_scales(path: Path) -> None:
    import onnx

    from modules.onnx_int8 import fold_scale_muls

    m = onnx.load(str(path))
    if fold_scale_muls(m):
        onnx.save(m, str(path))


# ----------------------------------------------------------------------------- TFLite (LiteRT)
def import_litert_torch():
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # enum-registration nag on import
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    try:
        import litert_torch
    except ImportError as e:
        raise ImportError(f"TFLite export needs litert-torch, which is not importable ({e}); install it with: "
                          f"{LITERT_INSTALL_HINT}") from None
    return litert_torch


def _materialize_constant_weights(gm):
    """In a ``torch.export`` graph, replace every value computed from parameters/buffers alone (e.g. an
    elastic op's ``weight[:out, :in]`` slice) by a new frozen Parameter. PT2E's conv/BN folding and the
    quantizer's weight observers need convolution weights to be ``get_attr`` nodes, and fail with
    "Expected get_attr node, got call_function" otherwise. (torchao's ``constant_fold`` registers plain
    attributes, which then collide with PT2E's BN folding.)"""
    from torch.fx.node import map_arg

    def attr(target):
        obj = gm
        for a in target.split("."):
            obj = getattr(obj, a)
        return obj

    g = gm.graph
    const, env = set(), {}
    for n in g.nodes:
        if n.op == "get_attr":
            const.add(n)
            env[n] = attr(n.target)
        elif n.op == "call_function" and n.all_input_nodes and all(i in const for i in n.all_input_nodes):
            const.add(n)
            env[n] = n.target(*map_arg(n.args, env.__getitem__), **map_arg(n.kwargs, env.__getitem__))
    k = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n not in const or not isinstance(env[n], torch.Tensor):
            continue
        if all(u in const for u in n.users):
            continue  # only materialise the boundary between constant and data-dependent nodes
        name = f"_materialized_const_{k}"
        k += 1
        gm.register_parameter(name, nn.Parameter(env[n].detach().clone(), requires_grad=False))
        with g.inserting_before(n):
            new = g.get_attr(name)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
    if k:
        g.eliminate_dead_code()
        gm.recompile()
    return gm


def export_tflite(model: nn.Module, resolution, path: str | os.PathLike, int8: bool = False,
                  calib: Iterable | None = None, per_channel: bool = True, num_random_calib: int = 32,
                  seed: int = 0, in_channels: int = 3) -> str:
    """Convert `model` (eval mode, batch 1, NCHW input ``[1,in_channels,H,W]``) to a ``.tflite`` at `path`.

    fp32: ``litert_torch.convert``. int8 (`int8=True`): ``torch.export`` → PT2E ``prepare_pt2e`` with
    litert-torch's ``PT2EQuantizer`` (int8 per-tensor activations, int8 symmetric weights, per-channel
    by default) → calibration on `calib` (same forms as :func:`quantize_onnx_int8`; None: random,
    with a :class:`RandomCalibrationWarning`) → ``convert_pt2e`` → ``litert_torch.convert`` with the
    static ``quant_config`` (without it the file keeps float convs between Q/DQ pairs and runs ~7x
    slower). Weights computed from parameters (sliced elastic weights) are frozen into parameters
    first. litert-torch's quantizer annotates conv(+relu/relu6), linear, add, max/avg pooling only:
    hardswish, sigmoid, mul (SE gates) and mean stay float between DEQUANTIZE/QUANTIZE ops. The int8
    file has int8 input/output tensors; :func:`modules.benchmark.run_tflite` (de)quantizes with the
    tensors' (scale, zero point). Returns the path.
    """
    litert_torch = import_litert_torch()
    h, w = _hw(resolution, model)
    x = torch.randn(1, in_channels, h, w, generator=torch.Generator().manual_seed(seed)).to(_device(model))
    path, tmp = atomic_target(path, ".tflite")
    try:
        with _eval_mode(model), torch.no_grad():  # export sees eval-mode BN / dropout; flags restored
            if not int8:
                edge = litert_torch.convert(model, (x,))
            else:
                from litert_torch.quantize import pt2e_quantizer, quant_config
                from torchao.quantization.pt2e import move_exported_model_to_eval
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                if calib is None:
                    samples = random_calib((h, w), num_random_calib, seed=seed, warn=False, channels=in_channels)
                    warnings.warn(f"{path.name}: INT8 calibration uses {num_random_calib} random inputs: the INT8 "
                                  "model is for latency only, its accuracy is meaningless (calibrate on real images)",
                                  RandomCalibrationWarning, stacklevel=2)
                else:
                    samples = list(_as_nchw_batches(calib, (h, w)))
                    if not samples:
                        raise ValueError("calibration data is empty")
                quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                    pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel))
                gm = _materialize_constant_weights(torch.export.export(model, (x,)).module())
                gm = prepare_pt2e(gm, quantizer)
                for a in samples:
                    gm(torch.from_numpy(a).to(x.device))
                gm = convert_pt2e(gm, fold_quantize=False)
                move_exported_model_to_eval(gm)  # eval variants of dropout / BN ops
                for sub in gm.modules():  # and the flag litert-torch checks ("converted in training mode")
                    sub.training = False
                edge = litert_torch.convert(gm, (x,), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
        edge.export(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


# ----------------------------------------------------------------------------- input.csv / encodings
@dataclass(frozen=True)
class InputEntry:
    """One model of an input.csv: ``<superspace>,<blocks>-<windows>,<subnet>`` (the original's format)."""
    superspace: str
    choice: str
    subnet: str
    source: str = ""
    lineno: int = 0

    @property
    def supernet(self) -> str:
        return f"{self.superspace}-{self.choice}"

    @property
    def name(self) -> str:  # the original latency.csv key
        return f"{self.superspace}-{self.choice}-{self.subnet}"

    @property
    def stem(self) -> str:
        return model_file_stem(self.superspace, self.choice, self.subnet)

    @property
    def resolution(self) -> int:
        return int(self.subnet.rsplit("_r", 1)[1])


def lsq_checkpoint_stem(checkpoint: str | os.PathLike) -> str:
    """File stem of the exports of a standalone LSQ+ subnet checkpoint: ``<checkpoint stem>-lsq``; add
    ``_int8.onnx`` / ``.onnx`` / ``_int8.tflite`` / ``.tflite``."""
    return f"{Path(checkpoint).stem}-lsq"


def model_file_stem(superspace: str, choice: str, subnet: str) -> str:
    """``<superspace>-<choice>-<sha256(subnet)[:8]>``; add ``.onnx`` / ``_int8.onnx`` / ``.tflite``."""
    return f"{superspace}-{choice}-{hashlib.sha256(subnet.encode()).hexdigest()[:8]}"


def parse_input_line(line: str, source: str = "<input>", lineno: int = 0, validate: bool = True) -> InputEntry:
    """Parse one input.csv line; any problem is one ValueError starting with ``<source>:<lineno>:``."""
    where = f"{source}:{lineno}"
    fields = [f.strip() for f in next(csv.reader([line]))]
    if len(fields) != 3 or not all(fields):
        raise ValueError(f"{where}: expected 3 comma-separated fields <superspace>,<blocks>-<windows>,<subnet> "
                         f"(e.g. onnxw,151122-023231,d1#1#..._r160), got {line.strip()!r}")
    superspace, choice, subnet = fields
    if validate:
        from modules.encoding import parse_subnet, parse_supernet

        try:
            sup = parse_supernet(f"{superspace}-{choice}")
            parse_subnet(subnet, sup)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{where}: {e}") from None
    return InputEntry(superspace, choice, subnet, source, lineno)


def read_input_csv(path: str | os.PathLike, validate: bool = True) -> list[InputEntry]:
    """All models of an input.csv (no header; blank lines and ``#`` comment lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input.csv {path} not found")
    entries = []
    with open(path, newline="") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            entries.append(parse_input_line(line, str(path), lineno, validate))
    if not entries:
        raise ValueError(f"{path}: no model lines")
    return entries


def named_model_entry(name: str) -> InputEntry:
    """A published subnet by name (e.g. ``SEQnet@vnni-A0``), via ``modules.named_models``."""
    from modules.named_models import get_named_model

    m = get_named_model(name)
    if m.subnet is None:
        raise ValueError(f"model {name!r} is a supernet ({m.supernet}); name a subnet (SEQnet@...) or pass "
                         "--encoding <superspace>,<choice>,<subnet>")
    superspace, choice = m.supernet.split("-", 1)
    return parse_input_line(f"{superspace},{choice},{m.subnet}", f"model {name}", 0)


def tool_input(input_path: str | None, models: Sequence[str], encodings: Sequence[str],
               tool_dir: str | os.PathLike) -> str | None:
    """The input a model tool reads: ``--input`` when given; with no --input, --model or --encoding at all, the
    ``input.csv`` beside the tool, as the original tools read it (``python onnx_tools/benchmark.py``)."""
    if input_path is not None or models or encodings:
        return input_path
    return str(Path(tool_dir) / "input.csv")


def collect_entries(input_csv: str | None = None, models: Sequence[str] = (),
                    encodings: Sequence[str] = ()) -> list[InputEntry]:
    """Entries from an input.csv, published model names and ``superspace,choice,subnet`` strings."""
    entries: list[InputEntry] = []
    if input_csv:
        entries += read_input_csv(input_csv)
    entries += [named_model_entry(m) for m in models]
    entries += [parse_input_line(e, "--encoding", i) for i, e in enumerate(encodings, 1)]
    return entries


def build_model_from_encoding(supernet_encoding: str, subnet_encoding: str,
                              num_classes: int | None = None) -> nn.Module:
    """A plain eval-mode subnet with random weights (``.resolution`` set), via
    ``modules.supernet.build_subnet`` (imported here so the export tools work without it)."""
    try:
        from modules.supernet import build_subnet
    except ImportError as e:
        raise ImportError(f"building a subnet from an encoding needs modules.supernet.build_subnet ({e})") from None
    model = build_subnet(supernet_encoding, subnet_encoding, num_classes=num_classes)
    if not hasattr(model, "resolution"):
        model.resolution = int(subnet_encoding.rsplit("_r", 1)[1])
    return model.eval()
