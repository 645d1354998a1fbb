"""Interop with the original SpaceEvo code's checkpoints (its released ``checkpoint.pth`` / ``lsq.pth``).

The original names its supernet's modules after its own classes and keeps three LSQ+ scalars per conv and
linear (``sw`` weight scale, ``sa`` activation scale, ``beta`` activation offset), in fp32 checkpoints too
(then at their initial values 1, 1, 0). Our supernet computes the same network with other names:

    original                                            ours
    stages.first_conv.blocks.0.conv.conv.weight         stages.0.blocks.0.conv.conv.weight
    stages.stage3.blocks.1.depth_conv.dwconv.sw         stages.4.blocks.1.dw.conv.weight_quant.scale
    stages.stage5.blocks.0.se.fc.reduce.sa              stages.6.blocks.0.se.reduce.act_quant.scale
    stages.stage0.blocks.0.conv1.norm.running_var       stages.1.blocks.0.conv1.bn.running_var
    stages.logits.blocks.0.linear.beta                  logits.linear.act_quant.offset

    state, mode = from_original_state(original_state, net)   # our keys; "fp32" or "lsq" (preset "original")
    original_state = to_original_state(net)                   # the original's keys, as its code saves them

Every key of both sides is accounted for. The original also builds modules its forward never runs for a given
supernet (the expand conv of a block whose expand ratio is always 1, the projection shortcut of a block whose
input and output always match); their keys are checked by name and shape, dropped on the way in and written with
neutral values (zero weights, identity BN, unit scales) on the way out. Quantizer ``initialized`` flags follow the
original's rule: an op counts as initialised when any of its scalars differs from (sw, sa, beta) = (1, 1, 0).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn

from modules.checkpoint import strip_module_prefix
from modules.superspace import STAGE_NAMES

# the original's name of each of our block submodules, per block class
_BLOCK_CHILDREN = {
    "MobileNetV1Dual": {"dw1": "depth_conv1", "pw1": "point_conv1", "dw2": "depth_conv2", "pw2": "point_conv2",
                        "shortcut": "downsample"},
    "InvertedResidual": {"expand_conv": "point_conv1", "dw": "depth_conv", "se": "se", "project": "point_conv2",
                         "shortcut": "downsample"},
    "ResNet": {"conv1": "conv1", "conv2": "conv2", "se": "se", "conv3": "conv3", "shortcut": "downsample"},
    "FusedMBConvRes": {"fused": "fused_conv", "se": "se", "project": "point_conv", "shortcut": "downsample"},
    "FirstConv": {"conv": "conv"},
    "Logits": {"linear": "linear"},
}
_HEAD = ("final_expand", "feature_mix", "logits")
_QUANT_PARAMS = {"weight_quant.scale": "sw", "act_quant.scale": "sa", "act_quant.offset": "beta"}
_INITIAL_SCALARS = {"sw": 1.0, "sa": 1.0, "beta": 0.0}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _block_family(block: nn.Module) -> dict[str, str]:
    for cls in type(block).__mro__:
        if cls.__name__ in _BLOCK_CHILDREN:
            return _BLOCK_CHILDREN[cls.__name__]
    raise ValueError(f"block type {type(block).__name__} has no counterpart in the original SpaceEvo code")


def _block_prefixes(net: nn.Module):
    """(our prefix, original prefix, block) of every block of a SuperNet (an extracted subnet too)."""
    for i, stage in enumerate(net.stages):
        for j, block in enumerate(stage.blocks):
            yield f"stages.{i}.blocks.{j}.", f"stages.{STAGE_NAMES[i]}.blocks.{j}.", block
    for name in _HEAD:
        yield f"{name}.", f"stages.{name}.blocks.0.", getattr(net, name)


def _op_names(ours: str, module: nn.Module, orig: str) -> dict[str, str]:
    """Our key -> the original's, for the tensors of `module` (a block child) at our prefix `ours`."""
    from modules.ops import DynamicConvBNAct, DynamicK3DWStack, DynamicSE

    out = {}
    if isinstance(module, DynamicConvBNAct):
        if isinstance(module.conv, DynamicK3DWStack):
            for n, conv in enumerate(module.conv.convs):
                out.update(_leaf_names(f"{ours}conv.convs.{n}.", conv, f"{orig}dwconv.dwconv{n}."))
        else:
            out.update(_leaf_names(f"{ours}conv.", module.conv,
                                   f"{orig}{'dwconv' if module.conv.depthwise else 'conv'}."))
        out.update({f"{ours}bn.{k}": f"{orig}norm.{k}" for k in _BN_KEYS})
    elif isinstance(module, DynamicSE):
        out.update(_leaf_names(f"{ours}reduce.", module.reduce, f"{orig}fc.reduce."))
        out.update(_leaf_names(f"{ours}expand.", module.expand, f"{orig}fc.expand."))
    else:  # DynamicLinear
        out.update(_leaf_names(ours, module, orig))
    return out


def _leaf_names(ours: str, op: nn.Module, orig: str) -> dict[str, str]:
    out = {f"{ours}weight": f"{orig}weight"}
    if op.bias is not None:
        out[f"{ours}bias"] = f"{orig}bias"
    out.update({f"{ours}{q}": f"{orig}{name}" for q, name in _QUANT_PARAMS.items()})
    return out


def _block_entries(ours: str, orig: str, block: nn.Module) -> list[tuple[str | None, str, tuple | None]]:
    """(our key, original key, shape) per tensor of one block, in the original's order; our key is None (and the
    shape given) for a module the original builds but never runs here."""
    out = []
    for child, orig_child in _block_family(block).items():
        module = getattr(block, child, None)
        if module is not None:
            out += [(k, o, None) for k, o in _op_names(f"{ours}{child}.", module, f"{orig}{orig_child}.").items()]
        elif child == "expand_conv" or (child == "shortcut" and hasattr(block, "shortcut")):
            cout = block.max_hidden if child == "expand_conv" else block.max_out
            out += [(None, k, shape) for k, shape in _conv_bn_shapes(f"{orig}{orig_child}.", block.max_in, cout)]
    return out


def _entries(net: nn.Module):
    for ours, orig, block in _block_prefixes(net):
        yield from _block_entries(ours, orig, block)


def key_map(net: nn.Module) -> dict[str, str]:
    """Our state-dict key -> the original's, for every weight, BN tensor and LSQ+ scalar of `net` (the LSQ+
    scalars under our lsq-mode names, whatever mode `net` is in)."""
    return {ours: orig for ours, orig, _ in _entries(net) if ours is not None}


def _conv_bn_shapes(prefix: str, cin: int, cout: int) -> list[tuple[str, tuple]]:
    shapes = [(f"{prefix}conv.weight", (cout, cin, 1, 1))]
    shapes += [(f"{prefix}conv.{s}", (1,)) for s in _INITIAL_SCALARS]
    shapes += [(f"{prefix}norm.{k}", (cout,)) for k in _BN_KEYS[:4]]
    return shapes + [(f"{prefix}norm.num_batches_tracked", ())]


class _OriginalConfig:
    """Stands in for the config object the original pickles into its checkpoints (``args``, a dict subclass of its
    own): rebuilt as an OrderedDict, so `torch.load(weights_only=True)` reads the file without the original's code."""

    def __new__(cls, *args):
        return OrderedDict()


# (stand-in, the original's class path) pairs for torch.serialization.safe_globals
PICKLED_CLASSES = [(_OriginalConfig, f"modules.alphanet_training.utils.config.{name}") for name in ("Config", "AttrDict")]


def supernet_from_dir_name(name: str) -> str | None:
    """The supernet encoding the original's run directory names: ``onnxw-151122-023231-align0`` (its training
    runs) or ``spaceevo@vnni`` (its released checkpoints); None for any other name."""
    from modules.named_models import get_named_model, model_names

    if name in model_names():
        return get_named_model(name).supernet
    m = re.fullmatch(r"(\w+-\d{6}(?:-\d{6})?)-align[01]", name)
    return m.group(1) if m else None


def original_dir_names(encoding: str) -> list[str]:
    """Directory names under which the original keeps this supernet's checkpoints (for lookups)."""
    from modules.named_models import get_named_model, model_names

    names = [n for n in model_names() if get_named_model(n).kind == "supernet" and get_named_model(n).supernet == encoding]
    return names + [f"{encoding}-align0", f"{encoding}-align1"]


def is_original_state(state: Mapping[str, object]) -> bool:
    """True for a state dict with the original's names (``module.`` prefixes allowed)."""
    return any(k.split("stages.", 1)[-1].startswith("first_conv.blocks.") for k in state)


def _lsq_net(choice, num_classes: int, original_sizes: bool = False) -> nn.Module:
    """A supernet of `choice` with the original preset's LSQ+ parameters, so that every original key has a
    counterpart (its weights are not used)."""
    from modules.lsq import set_quant_mode
    from modules.supernet import SuperNet

    return set_quant_mode(SuperNet(choice, num_classes, original_sizes=original_sizes), "lsq", "original")


class _Layout:
    """The two sides of one supernet: our keys and shapes, the original's keys and shapes, and the map."""

    def __init__(self, choice, num_classes: int):
        ours, theirs = _lsq_net(choice, num_classes), _lsq_net(choice, num_classes, original_sizes=True)
        self.our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        self.names = key_map(ours)  # ours -> original
        their_state = theirs.state_dict()
        self.shapes = {orig: tuple(their_state[k].shape) if k else shape for k, orig, shape in _entries(theirs)}
        self.flags = [k for k in self.our_shapes if k.endswith("quant.initialized")]


def _layout(net: nn.Module) -> _Layout:
    if getattr(net, "static_config", None) is not None:
        raise ValueError("original-format checkpoints hold supernets; this is an extracted subnet")
    return _Layout(net.choice, net.num_classes)


def check_original_state(state: Mapping[str, torch.Tensor], net: nn.Module, where: str = "checkpoint") -> None:
    """One ValueError naming the first keys that differ when `state` is not the original's state dict of `net`'s
    supernet (names and shapes)."""
    _check(strip_module_prefix(state), _layout(net), where)


def _check(state: dict, layout: _Layout, where: str) -> None:
    expected = layout.shapes
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what}: {', '.join(v[:5])}{', ...' if len(v) > 5 else ''}"
                 for what, v in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                                 ("shape mismatch(es)", shapes)) if v]
        raise ValueError(f"{where}: not the original SpaceEvo state dict of this supernet: " + "; ".join(parts))


def original_quant_mode(state: Mapping[str, torch.Tensor]) -> str:
    """"lsq" when any LSQ+ scalar moved from its initial value (the original's own test for a loaded QAT
    checkpoint), else "fp32"."""
    return "lsq" if any(_moved(k, v) for k, v in state.items()) else "fp32"


def _moved(key: str, value: torch.Tensor) -> bool:
    name = key.rsplit(".", 1)[-1]
    return name in _INITIAL_SCALARS and bool((value != _INITIAL_SCALARS[name]).any())


def from_original_state(state: Mapping[str, torch.Tensor], net: nn.Module,
                        where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """(our state dict for `net`'s supernet in the mode the checkpoint was trained in, that mode).

    The mode is "fp32" or "lsq"; for "lsq" switch `net` with ``set_quant_mode(net, "lsq", "original")`` before
    loading. Tensors are cut to our sizes (the original sizes a stage's first block for channels it never sees)."""
    state, layout = strip_module_prefix(state), _layout(net)
    _check(state, layout, where)
    mode = original_quant_mode(state)
    ours = {}
    for our_key, orig_key in layout.names.items():
        if mode == "lsq" or orig_key.rsplit(".", 1)[-1] not in _INITIAL_SCALARS:
            ours[our_key] = _cut(state[orig_key], layout.our_shapes[our_key])
    if mode == "lsq":
        for flag in layout.flags:  # act_quant / weight_quant of one op share the original's per-op rule
            op = flag.rsplit(".", 2)[0] + "."
            ours[flag] = torch.tensor(any(_moved(layout.names[op + q], state[layout.names[op + q]])
                                          for q in _QUANT_PARAMS))
    return ours, mode


def _cut(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)].clone() if tuple(t.shape) != shape else t


def to_original_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """`net`'s weights under the original's keys and shapes, as its code saves them (fp32 nets get the initial
    LSQ+ scalars 1, 1, 0; an LSQ+ net must use the original preset, the only one the original computes).
    Channels and modules the original has but never runs get neutral values."""
    from modules.lsq import get_quant_mode, quantizers

    if get_quant_mode(net) == "lsq" and any(q.enabled and q.preset != "original" for q in quantizers(net)):
        raise ValueError("only an fp32 or `original`-preset LSQ+ supernet has an original-format checkpoint "
                         "(the backend presets quantize per channel, with integer zero points)")
    layout, own = _layout(net), net.state_dict()
    from_ours = {orig: our_key for our_key, orig in layout.names.items()}
    out = {}
    for orig_key, shape in layout.shapes.items():
        t = _neutral(orig_key, shape)
        our_key = from_ours.get(orig_key)
        if our_key in own:
            src = own[our_key].detach().cpu()
            t[tuple(slice(0, n) for n in src.shape)] = src
        out[orig_key] = t
    return out


def _neutral(key: str, shape: tuple) -> torch.Tensor:
    """What the original's unused channels and modules get: unit scales, identity BN, zero weights."""
    name = key.rsplit(".", 1)[-1]
    if name == "num_batches_tracked":
        return torch.zeros((), dtype=torch.long)
    if name in _INITIAL_SCALARS:
        return torch.full(shape, _INITIAL_SCALARS[name])
    one = name == "running_var" or key.endswith("norm.weight")
    return torch.ones(shape) if one else torch.zeros(shape)


def find_released_checkpoint(output_dir, supernet_name: str, encoding: str, quant_mode: str):
    """The supernet checkpoint of a released model where the original keeps it,
    ``<output_dir>/supernet_training/<supernet name>/{checkpoint,lsq}.pth`` (our own names for that directory
    work too); FileNotFoundError saying where to put the released file."""
    from pathlib import Path

    from modules.subnet_search import find_supernet_checkpoint

    try:
        return find_supernet_checkpoint(output_dir, encoding, quant_mode)
    except FileNotFoundError:
        name = "lsq.pth" if quant_mode == "lsq" else "checkpoint.pth"
        where = Path(output_dir) / "supernet_training" / supernet_name / name
        raise FileNotFoundError(f"no checkpoint of {supernet_name}: put the released {supernet_name} {name} at "
                                f"{where}") from None
