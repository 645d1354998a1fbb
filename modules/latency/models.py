"""The model files a runner times: a block's standalone model (ONNX written directly, or LiteRT through the
torch block), a whole network (written directly, or exported the way it is deployed), and the trivial model
whose run time is the session-call overhead.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from modules.latency.graph import block_input_shape, block_onnx, build_block_module, subnet_onnx
from modules.latency.keys import MEASURED_PLATFORMS, ORT_PLATFORMS
from modules.latency.quantize import nhwc_boundaries, quantize_block_onnx, stitch_blocks, strip_boundary_qdq


def block_model_bytes(cfg: dict, platform: str, fmt: str = "qdq", workdir: str | None = None,
                      boundary: str = "network") -> bytes:
    """The serialized ONNX model measured for one block on an ORT platform. INT8 with ``boundary="network"``
    (default): block-boundary Q/DQ cut and uint8 NHWC input/output, as inside a network
    (:func:`strip_boundary_qdq`, :func:`nhwc_boundaries`); ``"standalone"``: the quantized block as is
    (float NCHW input and output, for comparisons)."""
    if boundary not in ("network", "standalone"):
        raise ValueError(f"boundary {boundary!r}: use 'network' or 'standalone'")
    model = block_onnx(cfg)
    if platform == "ort_int8":
        model = quantize_block_onnx(model, fmt, workdir=workdir)
        if boundary == "network":
            strip_boundary_qdq(model, keep_input=cfg["name"] == "FirstConv", keep_output=cfg["name"] == "Logits")
            nhwc_boundaries(model)
    return model.SerializeToString()


def overhead_model_bytes() -> bytes:
    """A trivial ONNX model (one Relu on 4 floats): its run time is the session-call overhead."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "overhead",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def subnet_model_bytes(block_configs: list[dict], platform: str, quant_format: str = "qdq",
                       workdir: str | None = None, method: str = "stitch") -> bytes:
    """A whole network written directly (float input and output, as deployed). FP32: :func:`subnet_onnx`.
    INT8: ``method="stitch"`` (default) chains the quantized network-form blocks (:func:`stitch_blocks`;
    ~5x faster than quantizing the whole graph, whose ORT quantizer is quadratic in the node count);
    ``"quantize"``: :func:`quantize_block_onnx` of the whole :func:`subnet_onnx`. The test suite checks
    both give the optimised graph of the torch export + `modules.export.quantize_onnx_int8`."""
    if platform not in ORT_PLATFORMS:
        raise ValueError(f"directly written models are ONNX: ort_int8 / ort_fp32, not {platform!r} (use measure_subnet)")
    if method not in ("stitch", "quantize"):
        raise ValueError(f"method {method!r}: use 'stitch' or 'quantize'")
    if platform == "ort_fp32" or method == "quantize":
        model = subnet_onnx(block_configs)
        if platform == "ort_int8":
            model = quantize_block_onnx(model, quant_format, workdir=workdir)
        return model.SerializeToString()
    blocks = []
    for i, cfg in enumerate(block_configs):
        q = quantize_block_onnx(block_onnx(cfg, seed=i), quant_format, workdir=workdir)
        blocks.append(strip_boundary_qdq(q, keep_input=i == 0, keep_output=i == len(block_configs) - 1))
    return stitch_blocks(blocks).SerializeToString()


def torch_block_bytes(cfg: dict, platform: str, fmt: str, workdir=None) -> bytes:
    import onnx

    from modules import export

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = export.export_onnx(build_block_module(cfg), cfg["hw"] if cfg["name"] != "Logits" else 1,
                                  os.path.join(tmp, "b.onnx"), in_channels=cfg["cin"])
        if platform == "ort_int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = export.quantize_onnx_int8(path, os.path.join(tmp, "b_int8.onnx"), None, fmt=fmt,
                                                 num_random_calib=2)
            m = strip_boundary_qdq(onnx.load(path), keep_input=cfg["name"] == "FirstConv",
                                   keep_output=cfg["name"] == "Logits")
            nhwc_boundaries(m)
            return m.SerializeToString()
        return Path(path).read_bytes()


def export_subnet(net, platform: str, directory: str, quant_format: str = "qdq", calib=None) -> str:
    """Export a whole network the way it is deployed (`modules.export`: torch ONNX export + ONNX Runtime
    static quantization with `calib` (None: random), or LiteRT); returns the model file."""
    from modules import export

    res = getattr(net, "resolution", None) or getattr(net, "active_resolution")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=export.RandomCalibrationWarning)
        if platform in ORT_PLATFORMS:
            path = export.export_onnx(net, res, os.path.join(directory, "m.onnx"))
            if platform == "ort_int8":
                path = export.quantize_onnx_int8(path, os.path.join(directory, "m_int8.onnx"), calib,
                                                 fmt=quant_format, num_random_calib=4)
            return path
        if platform in ("tflite_int8", "tflite_fp32"):
            return export.export_tflite(net, res, os.path.join(directory, "m.tflite"), int8=platform == "tflite_int8",
                                        calib=calib, num_random_calib=4)
    raise ValueError(f"platform {platform!r} is not measured; measured platforms: {', '.join(MEASURED_PLATFORMS)}")


def block_tflite(cfg: dict, platform: str, path) -> str:
    """Export one block's torch module to a LiteRT file (`tflite_int8`: int8, calibrated on random inputs)."""
    from modules import export

    shape = block_input_shape(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export.export_tflite(build_block_module(cfg), shape[2], str(path), int8=platform == "tflite_int8",
                                    in_channels=shape[1], num_random_calib=4)


def overhead_tflite(platform: str, path) -> str:
    """A trivial LiteRT model (one ReLU on 2x2 pixels): its run time is the interpreter-call overhead."""
    import torch

    from modules import export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export.export_tflite(torch.nn.ReLU(), 2, str(path), int8=platform == "tflite_int8", in_channels=1,
                                    num_random_calib=2)


def write_block_model(cfg: dict, platform: str, directory, name: str, quant_format: str = "qdq") -> Path:
    """The file a device times for one block: ``<directory>/<name>.onnx`` (ORT platforms, as
    :func:`block_model_bytes`) or ``.tflite`` (:func:`block_tflite`)."""
    if platform in ORT_PLATFORMS:
        path = Path(directory) / f"{name}.onnx"
        path.write_bytes(block_model_bytes(cfg, platform, quant_format, str(directory)))
        return path
    if platform in MEASURED_PLATFORMS:
        return Path(block_tflite(cfg, platform, Path(directory) / f"{name}.tflite"))
    raise ValueError(f"platform {platform!r} is not measured; measured platforms: {', '.join(MEASURED_PLATFORMS)}")


def write_overhead_model(platform: str, directory, name: str = "overhead") -> Path:
    """The trivial model of :func:`overhead_model_bytes` / :func:`overhead_tflite` as a file in `directory`."""
    if platform in ORT_PLATFORMS:
        path = Path(directory) / f"{name}.onnx"
        path.write_bytes(overhead_model_bytes())
        return path
    return Path(overhead_tflite(platform, Path(directory) / f"{name}.tflite"))


def write_subnet_model(model: tuple[str, str], platform: str, directory, name: str, quant_format: str = "qdq",
                       exporter: str = "direct") -> Path:
    """The file a device times for a whole subnet (supernet, subnet encodings): ORT models written directly
    (`exporter="direct"`, :func:`subnet_model_bytes`) or, like every LiteRT model, exported through torch
    (:func:`export_subnet`)."""
    import shutil

    from modules.latency.sampling import subnet_block_configs

    if platform in ORT_PLATFORMS and exporter == "direct":
        path = Path(directory) / f"{name}.onnx"
        path.write_bytes(subnet_model_bytes(subnet_block_configs(*model), platform, quant_format, str(directory)))
        return path
    import torch

    from modules.supernet import build_subnet

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src = Path(export_subnet(build_subnet(*model), platform, tmp, quant_format))
        dst = Path(directory) / f"{name}{src.suffix}"
        shutil.move(str(src), dst)
    return dst
