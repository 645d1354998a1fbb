"""The published SpaceEvo supernets and SEQnet subnets, by name (``data/search_results.yaml``).

    names = model_names()                          # 5 ``spaceevo@...`` supernets, 10 ``SEQnet@...`` subnets
    m = get_named_model("SEQnet@vnni-A0")          # NamedModel(kind="subnet", supernet="onnxw-151122-023231", ...)
    net = build_named_model("SEQnet@vnni-A0")      # standalone subnet (random weights), eval mode
    sup = build_named_model("spaceevo@vnni")       # the elastic supernet, max subnet active
    for label, cfg in reported_subnets(m): ...     # subnets: itself; supernets: (max, min)

A supernet's name maps to its encoding (``onnxw-151122-023231``); a subnet's entry names its supernet
and its ``d.._k.._w.._e.._r..`` arch. Every entry is validated against its superspace when loaded.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from modules.encoding import SubnetConfig, SupernetChoice, parse_subnet, parse_supernet
from modules.superspace import SUBNET_STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_YAML = REPO_ROOT / "data" / "search_results.yaml"


@dataclass(frozen=True)
class NamedModel:
    name: str
    kind: str  # "supernet" | "subnet"
    supernet_name: str  # the spaceevo@... name (a supernet's own name)
    supernet: str  # supernet encoding, e.g. onnxw-151122-023231
    subnet: str | None = None  # subnet encoding (subnets only)

    @property
    def choice(self) -> SupernetChoice:
        return parse_supernet(self.supernet)

    @property
    def config(self) -> SubnetConfig | None:
        return None if self.subnet is None else parse_subnet(self.subnet, self.choice)


def _load(path: Path) -> dict[str, NamedModel]:
    if not path.is_file():
        raise FileNotFoundError(f"named-model file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("supernets"), dict) \
            or not isinstance(data.get("subnets", {}), dict):
        raise ValueError(f"{path}: expected mappings 'supernets: {{name: encoding}}' and "
                         "'subnets: {name: {supernet: NAME, arch: ENCODING}}'")
    models: dict[str, NamedModel] = {}
    for name, enc in data["supernets"].items():
        try:
            parse_supernet(str(enc))
        except ValueError as e:
            raise ValueError(f"{path}: supernet {name}: {e}") from None
        models[str(name)] = NamedModel(str(name), "supernet", str(name), str(enc))
    for name, entry in (data.get("subnets") or {}).items():
        if not isinstance(entry, dict) or not {"supernet", "arch"} <= set(entry):
            raise ValueError(f"{path}: subnet {name}: expected keys 'supernet' and 'arch', got {entry!r}")
        sup = str(entry["supernet"])
        if sup not in data["supernets"]:
            raise ValueError(f"{path}: subnet {name}: supernet {sup!r} is not one of "
                             f"{', '.join(data['supernets'])}")
        if str(name) in models:
            raise ValueError(f"{path}: name {name!r} is both a supernet and a subnet")
        try:
            parse_subnet(str(entry["arch"]), parse_supernet(str(data["supernets"][sup])))
        except ValueError as e:
            raise ValueError(f"{path}: subnet {name}: {e}") from None
        models[str(name)] = NamedModel(str(name), "subnet", sup, str(data["supernets"][sup]), str(entry["arch"]))
    return models


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> dict[str, NamedModel]:
    return _load(Path(path))


def load_named_models(path: str | os.PathLike | None = None) -> dict[str, NamedModel]:
    """{name: NamedModel}, supernets first, in file order."""
    p = Path(path) if path is not None else RESULTS_YAML
    if not p.is_file():
        raise FileNotFoundError(f"named-model file {p} does not exist")
    return dict(_load_cached(str(p.resolve()), p.stat().st_mtime))


def model_names(path: str | os.PathLike | None = None, kind: str | None = None) -> list[str]:
    """All names (or only those of `kind` "supernet" / "subnet"), in file order."""
    return [n for n, m in load_named_models(path).items() if kind is None or m.kind == kind]


def get_named_model(name: str, path: str | os.PathLike | None = None) -> NamedModel:
    models = load_named_models(path)
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; allowed: {', '.join(models)}")
    return models[name]


def extreme_subnet(choice: SupernetChoice, mode: str) -> SubnetConfig:
    """The "max" or "min" subnet of a supernet (as `SuperNet.set_max_subnet` / `set_min_subnet`), without
    building it: per stage the max/min depth, and per block the max/min kernel, width and expand."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}; allowed: max, min")
    pick = max if mode == "max" else min
    stages = []
    for stage_name in SUBNET_STAGES:
        spec, stage, window = choice.stage_spec(stage_name)
        e = pick(spec.expand_list) if spec.has_expand else None
        stages.append([(pick(spec.kernel_list), pick(window), e)] * pick(stage.depth_list))
    return SubnetConfig.from_stages(stages, pick(choice.space.supernet_hw_list))


def reported_subnets(model: NamedModel) -> list[tuple[str, SubnetConfig]]:
    """(label, subnet config) rows to report: a subnet itself; a supernet's max and min subnets."""
    if model.kind == "subnet":
        return [(model.name, model.config)]
    return [(f"{model.name} ({mode})", extreme_subnet(model.choice, mode)) for mode in ("max", "min")]


def build_named_model(name: str, num_classes: int | None = None, path: str | os.PathLike | None = None):
    """Eval-mode network with random weights: the standalone subnet of a SEQnet, the supernet of a spaceevo."""
    from modules.supernet import SuperNet

    m = get_named_model(name, path)
    return SuperNet(m.choice, num_classes, 0.0, m.config).eval()
