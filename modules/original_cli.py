"""The original SpaceEvo's command-line names, so the command lines of its README run here unchanged.

Our own flags stay primary; an original name is either an alias of ours (same action, `modules.cli.add_aliases`)
or, where the original wrote the value differently, an extra option declared with `add_original_option` whose
argparse type converts the value to ours (``--stage_list stage1_0`` -> the pair (1, 0), ``--platform
tflite27_cpu_int8`` -> ``tflite_int8``, ...). Everything is converted while parsing: scripts read only our names.

`translate_train_yaml` maps the keys of the original's ``supernet_training_configs/train.yaml`` to
train_supernet.py's arguments; a key it does not know, or a value we do not implement, is one error naming it.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Callable

# the original's latency platforms (nn-Meter's TFLite predictor, its ONNX Runtime LUT) -> our predictor names
PLATFORMS = {"tflite27_cpu_int8": "tflite_int8", "onnx_lut": "ort_int8"}
_BLOCK_ID = re.compile(r"^stage([1-6])_(\d+)$")


# ------------------------------------------------------------------------------------------ declaring options
def add_original_option(parser: argparse.ArgumentParser, flag: str, dest: str, help: str, **kwargs) -> None:
    """An original flag whose value is converted to our option ``dest`` (by ``type=`` or ``const=``).

    No default of its own (our option's default stands), and --help says which option it stands for."""
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=f"the original's name: {help}", **kwargs)


def platform_name(text: str) -> str:
    """``--platform``: the original's platform names, or ours unchanged."""
    return PLATFORMS.get(text, text)


def block_id(text: str) -> tuple[int, int]:
    """``stage3_1`` (the original's block id: stage 3, candidate block 1) -> (3, 1)."""
    m = _BLOCK_ID.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a block id stage<1..6>_<block index>, e.g. stage3_1")
    return int(m.group(1)), int(m.group(2))


def supernet_text(text: str) -> str:
    """A supernet choice as the original wrote it (``111111_000000``, ``123214-012321``, with or without the
    superspace) in our spelling ``[<superspace>-]<blocks>-<windows>``."""
    return text.strip().replace("_", "-")


def parent_of(name: str) -> Callable[[str], str]:
    """A type for an original path ``<root>/<name>`` whose <root> is our ``--output_dir`` (our scripts add
    <name> themselves): returns <root>; a path not ending in <name> is an error saying so."""
    def convert(text: str) -> str:
        p = Path(text)
        if p.name != name:
            raise argparse.ArgumentTypeError(f"{text}: expected a path ending in /{name} (our outputs go to "
                                             f"<output_dir>/{name}/...)")
        return str(p.parent)
    convert.__name__ = f"path ending in /{name}"
    return convert


def grandparent_of(name: str) -> Callable[[str], str]:
    """As `parent_of` for ``<root>/<name>/<anything>`` (the original's block-KD dir ``block_kd/<superspace>``)."""
    def convert(text: str) -> str:
        p = Path(text)
        if p.parent.name != name:
            raise argparse.ArgumentTypeError(f"{text}: expected a path ending in /{name}/<superspace> (our "
                                             f"students go to <output_dir>/{name}/<superspace>/stageX_B)")
        return str(p.parent.parent)
    convert.__name__ = f"path ending in /{name}/<superspace>"
    return convert


class SupernetAction(argparse.Action):
    """Stores a supernet choice in our spelling, prefixed with ``--superspace`` when that was given first."""

    def __call__(self, parser, namespace, values, option_string=None):
        text = supernet_text(values)
        setattr(namespace, self.dest, _with_superspace(getattr(namespace, "superspace", None), text))


class SuperspaceAction(argparse.Action):
    """``--superspace S``; also prefixes an already parsed supernet choice given without its superspace
    (the original's ``--superspace onnxw --supernet_choice 121122-133333``, in either order)."""

    def __init__(self, *args, supernet_dest: str = "supernet", **kwargs):
        super().__init__(*args, **kwargs)
        self.supernet_dest = supernet_dest

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        current = getattr(namespace, self.supernet_dest, None)
        if current:
            setattr(namespace, self.supernet_dest, _with_superspace(values, current))


def _with_superspace(superspace: str | None, text: str) -> str:
    if superspace and text.split("-")[0].isdigit():
        return f"{superspace}-{text}"
    return text


# ------------------------------------------------------------------------------------------ train.yaml keys
def _same(ours: str) -> Callable[[Any], dict]:
    return lambda v: {ours: v}


def _only(allowed: tuple, ours_does: str) -> Callable[[Any], dict]:
    """A setting we do not vary: accepted when the value is what we always do, else an error saying what we do."""
    def check(v):
        if not any(v == a and type(v) is not bool or v is a for a in allowed):
            raise ValueError(f"{v!r} is not supported here ({ours_does})")
        return {}
    return check


def _unread(v) -> dict:
    return {}  # present in the original's train.yaml, but its code never reads it


def _models_save_dir(v) -> dict:
    p = Path(str(v))
    if p.name != "supernet_training":
        raise ValueError(f"{v!r}: expected a path ending in /supernet_training (runs go to "
                         "<output_dir>/supernet_training/<supernet>)")
    return {"output_dir": str(p.parent)}


def _valid_size(v) -> dict:
    # the original's 0 means "validate on the val split"; N > 0 holds N train images out
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{v!r}: expected a non-negative int")
    return {"val_split": "val"} if v == 0 else {"val_split": "holdout", "valid_size": v}


def _sub_mapping(method_key: str, method: str, keys: dict[str, Callable[[Any], dict]]) -> Callable[[Any], dict]:
    def convert(v):
        if not isinstance(v, dict):
            raise ValueError(f"{v!r}: expected a mapping")
        if v.get(method_key, method) != method:
            raise ValueError(f"{method_key} {v[method_key]!r} is not supported here (only {method})")
        out: dict = {}
        for k, x in v.items():
            if k == method_key:
                continue
            if k not in keys:
                raise ValueError(f"unknown sub-key {k!r} (known: {', '.join([method_key, *keys])})")
            out.update(keys[k](x))
        return out
    return convert


def _resume(v) -> dict:
    if v in ("", None, False):
        return {}
    if v is True:
        return {"resume": True}
    raise ValueError(f"{v!r}: a checkpoint path is not supported here; --resume continues "
                     "<output_dir>/supernet_training/<supernet>/")


def _debug(v) -> dict:
    if v in ("", None, False):
        return {}
    raise ValueError(f"{v!r}: the original's debug mode (train debug_batches batches) is not supported here; "
                     "use --max_train_samples")


_NO_SYNC = "BN statistics are per process (no SyncBatchNorm)"
_LAUNCHER = "the processes come from torchrun or torch.distributed.launch"
TRAIN_YAML_KEYS: dict[str, Callable[[Any], dict]] = {
    **{k: _same(k) for k in ("batch_size_per_gpu", "sandwich_rule", "alpha_min", "alpha_max", "iw_clip",
                             "grad_clip_value", "warmup_epochs", "epochs", "label_smoothing", "inplace_distill",
                             "num_arch_training", "dropout", "valid_freq", "seed", "augment")},
    "start_epoch": _only((0,), "a run starts at epoch 0; --resume continues a stopped one"),
    "sync_bn": _only((False,), _NO_SYNC),
    "bn_momentum": _unread, "bn_eps": _unread, "n_classes": _unread, "drop_last": _unread,
    "post_bn_calibration_batch_num": _same("bn_calib_batches"),
    "models_save_dir": _models_save_dir,
    "data_loader_workers_per_gpu": _same("workers"),
    "weight_decay_weight": _same("weight_decay"),
    "weight_decay_bn_bias": _only((0,), "no weight decay on BN parameters and biases"),
    "optimizer": _sub_mapping("method", "sgd", {"momentum": _same("momentum"), "nesterov": _same("nesterov")}),
    "lr_scheduler": _sub_mapping("method", "warmup_cosine_lr", {
        "base_lr": _same("base_lr"),
        "clamp_lr_percent": _only((0,), "the cosine schedule decays to 0")}),
    "multiprocessing_distributed": _only((True,), _LAUNCHER),
    "distributed": _only((True,), _LAUNCHER),
    "dist_backend": _only(("nccl", "gloo"), "nccl with --device cuda, gloo with --device cpu"),
    "dataset": _only(("imagenet",), "an ImageFolder root given by --data_dir"),
    "dataset_dir": _same("data_dir"),
    "valid_size": _valid_size,
    "print_freq": _unread,  # output cadence only: we log per epoch and show a progress bar
    "resume": _resume,
    "debug": _debug,
    "debug_batches": _unread,  # read only in the debug mode, which `_debug` refuses
}


def translate_train_yaml(data: dict, source: str, known: set[str]) -> dict:
    """The keys of a train.yaml: a file of ours passes through; in the original's (recognised by a key only the
    original has, e.g. ``optimizer``) every original key is mapped (`TRAIN_YAML_KEYS`), as some names mean
    something else there (``valid_size: 0`` = validate on the val split, ``resume: ""`` = no resume).

    An original key with a value we do not implement, or mapping to an option this script lacks, is a
    ValueError naming the file and the key; keys known to neither are left for the caller to report."""
    keys = {str(k).lstrip("-").replace("-", "_") for k in data}
    if not any(k in TRAIN_YAML_KEYS and k not in known for k in keys):
        return data
    out: dict = {}
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in TRAIN_YAML_KEYS:
            out[raw_key] = value
            continue
        try:
            mapped = TRAIN_YAML_KEYS[key](value)
        except ValueError as e:
            raise ValueError(f"config {source}: original key {raw_key!r}: {e}") from None
        for ours, v in mapped.items():
            if ours not in known:
                raise ValueError(f"config {source}: original key {raw_key!r} maps to {ours!r}, which this script "
                                 "does not have")
            out[ours] = v
    return out
