"""The quantization config file: every quantized tensor of an exported INT8 model with its parameters, as JSON.

`modules.deploy` writes it beside each INT8 model (``<model>_int8.onnx`` -> ``<model>_int8.qconfig.json``, the
same for ``.tflite``) and reads it back (``onnx_tools/export_int8_lsq.py --qconfig FILE``: the scales and zero
points of the file replace the learned ones). Format (version 1)::

    {"format": "spaceevo-qconfig", "version": 1, "preset": "tensorrt", "backend": "onnx",
     "tensors": [
       {"name": "stages.0.blocks.0.conv.conv.act_quant", "kind": "activation", "tensor": null,
        "onnx_node": "/stages.0/blocks.0/conv/conv/act_quant/QuantizeLinear",
        "bits": 8, "dtype": "int8", "qmin": -128, "qmax": 127, "symmetric": true,
        "axis": null, "scale": [0.0123], "zero_point": [0]},
       {"name": "stages.0.blocks.0.conv.conv", "kind": "weight", "tensor": "stages.0.blocks.0.conv.conv.weight",
        "onnx_node": "/stages.0/blocks.0/conv/conv/QuantizeLinear",
        "bits": 8, "dtype": "int8", "qmin": -127, "qmax": 127, "symmetric": true,
        "axis": 0, "scale": [0.002, 0.001, ...], "zero_point": [0, 0, ...]}]}

``name``: the quantizer (activation) or the conv / linear (weight) in the PyTorch model; ``onnx_node`` (ONNX
files): its QuantizeLinear node in the file (`onnx_quantize_node`; null for a quantizer the graph does not
use); ``tensor``: a weight's initializer. Real value = (q - zero_point) * scale, q an integer in [qmin, qmax]
of ``dtype``; ``axis`` null: one scale for the tensor, 0: one per output channel. ``symmetric``: every zero
point is 0. Weights are those of the exported graph: BN folded into the conv. A file read back must name
modules of the model exported (`apply_qconfig`); its scales replace the frozen ones, the weights are
quantized again on the new grid.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

FORMAT, VERSION = "spaceevo-qconfig", 1
KINDS = ("activation", "weight")


def qconfig_path(model_path) -> Path:
    """``<model>_int8.onnx`` -> ``<model>_int8.qconfig.json`` (the same beside a ``.tflite``)."""
    return Path(model_path).with_suffix(".qconfig.json")


def _entry(name: str, kind: str, tensor, dtype: str, qrange, axis, scale, zero_point) -> dict:
    zp = [int(z) for z in zero_point]
    return {"name": name, "kind": kind, "tensor": tensor, "bits": 8, "dtype": dtype, "qmin": int(qrange[0]),
            "qmax": int(qrange[1]), "symmetric": not any(zp), "axis": axis,
            "scale": [float(s) for s in scale], "zero_point": zp}


def _act_entry(name: str, q: nn.Module) -> dict:
    """A `modules.deploy.FrozenActQuant` (zero point on the 0..255 grid) as its file holds it."""
    if q.backend == "tflite" or q.signed:
        return _entry(name, "activation", None, "int8", (-128, 127), None, [q.scale], [q.zero_point - 128])
    return _entry(name, "activation", None, "uint8", (0, 255), None, [q.scale], [q.zero_point])


def _weight_entry(name: str, m: nn.Module) -> dict:
    """A frozen conv / linear's weight quantization (per channel on axis 0, or per tensor with `w_range`)."""
    rng = m.w_range or m.w_qrange
    dtype = "uint8" if rng[0] >= 0 else "int8"
    axis = None if m.w_range else 0
    return _entry(name, "weight", f"{name}.weight", dtype, rng, axis, m.w_scale.tolist(), m.w_zero_point.tolist())


def _onnx_scope(name: str) -> str:
    """A module name as the ONNX exporter writes scopes: "/" between modules, a list index kept with its list."""
    return "/" + re.sub(r"\.(?=\D)", "/", name) if name else ""


def onnx_quantize_node(name: str, kind: str, onnx_nodes) -> str | None:
    """The QuantizeLinear node of module `name` among `onnx_nodes`. A weight's is in its conv's scope; an
    activation quantizer's is named after the scope of the module that *calls* it
    ("stages.1.blocks.0.conv1.conv.act_quant", called by its block to quantize the block input once, is
    "/stages.1/blocks.0/act_quant/QuantizeLinear"): the deepest such scope present. None when absent."""
    if kind == "weight":
        node = f"{_onnx_scope(name)}/QuantizeLinear"
        return node if node in onnx_nodes else None
    *parents, leaf = name.split(".")
    for i in range(len(parents), -1, -1):
        node = f"{_onnx_scope('.'.join(parents[:i]))}/{leaf}/QuantizeLinear"
        if node in onnx_nodes:
            return node
    return None


def _frozen_quant_modules(model: nn.Module):
    """(names, kind, module) of every frozen quantizer and frozen weight op of a deployed model; a quantizer
    shared by two ops (a block input quantized once for its branch and shortcut) has several names."""
    names: dict[int, list] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if (hasattr(m, "signed") and hasattr(m, "zero_point")) or isinstance(getattr(m, "w_scale", None), torch.Tensor):
            names.setdefault(id(m), [m]).append(name)
    for m, *aliases in names.values():
        yield aliases, ("activation" if hasattr(m, "zero_point") else "weight"), m


def qconfig_of(model: nn.Module, onnx_nodes=None) -> dict:
    """The quantization config of a deployed model (`modules.deploy.deploy_model`). `onnx_nodes`: the node names
    of its ONNX file; each entry then takes the name whose QuantizeLinear is in the file and records the node."""
    tensors, claimed = [], set()
    for aliases, kind, m in _frozen_quant_modules(model):
        t = (_act_entry if kind == "activation" else _weight_entry)(aliases[0], m)
        if onnx_nodes is not None:
            free = set(onnx_nodes) - claimed
            t["onnx_node"] = next((n for n in (onnx_quantize_node(a, kind, free) for a in aliases) if n), None)
            claimed.add(t["onnx_node"])
        tensors.append(t)
    return {"format": FORMAT, "version": VERSION, "preset": model.deploy_preset, "backend": model.deploy_backend,
            "tensors": tensors}


def write_qconfig(path, cfg: dict) -> str:
    from modules.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(cfg, indent=1) + "\n")
    return str(path)


def read_qconfig(path) -> dict:
    """A quantization config file, checked: format, version, every entry's fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quantization config {path} not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"quantization config {path}: not JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
        raise ValueError(f"quantization config {path}: not a {FORMAT} version {VERSION} file")
    for t in cfg.get("tensors", []):
        keys = {"name", "kind", "dtype", "scale", "zero_point", "axis"}
        if not isinstance(t, dict) or not keys <= set(t) or t["kind"] not in KINDS \
                or len(t["scale"]) != len(t["zero_point"]) or min(t["scale"], default=1.0) <= 0:
            raise ValueError(f"quantization config {path}: bad tensor entry {t!r:.200}")
    return cfg


def apply_qconfig(model: nn.Module, cfg: dict) -> nn.Module:
    """Set a deployed model's frozen scales and zero points to those of `cfg` (every entry must name a frozen
    quantizer / weight op of the model, with as many scales as it has)."""
    mods = {name: (kind, m) for aliases, kind, m in _frozen_quant_modules(model) for name in aliases}
    for t in cfg["tensors"]:
        kind, m = mods.get(t["name"], (None, None))
        if kind != t["kind"]:
            raise ValueError(f"quantization config: no {t['kind']} {t['name']!r} in this model")
        if kind == "activation":
            (s,), (zp,) = t["scale"], t["zero_point"]
            m.scale, m.zero_point = float(s), int(zp) + (128 if t["dtype"] == "int8" else 0)
            continue
        if len(t["scale"]) != m.w_scale.numel():
            raise ValueError(f"quantization config: {t['name']} has {m.w_scale.numel()} weight scales, "
                             f"the file {len(t['scale'])}")
        m.w_scale.copy_(torch.tensor(t["scale"], dtype=m.w_scale.dtype))
        m.w_zero_point.copy_(torch.tensor(t["zero_point"], dtype=m.w_zero_point.dtype))
    return model
