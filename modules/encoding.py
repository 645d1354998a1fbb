"""String encodings of supernets, subnets and LUT sub-stages (the original's formats), with validation.

* supernet: ``onnxw-151122-023231`` = superspace, block index per stage1..6, width window per stage1..6
  (the window group may be omitted: all zeros).
* subnet: ``d1#1#2#2#2#2#2#1_k3#..._w16#..._e0#0.5#4.0#..._r160``; d has one entry per stage
  first_conv..stage6, k/w/e one entry per active block, e is ``0`` for blocks without expand ratio.
* LUT sub-stage: ``5#32#8_3#40#3`` = ``k#w#e`` per block, e printed as sampled (``None`` for V1Dual).

Every parser raises one ``ValueError`` naming the bad token and the allowed values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from modules.superspace import SUBNET_STAGES, BlockSpec, StageConfig, SuperSpace, get_superspace


@dataclass(frozen=True)
class SupernetChoice:
    superspace: str
    blocks: tuple[int, ...]
    windows: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.superspace}-{''.join(map(str, self.blocks))}-{''.join(map(str, self.windows))}"

    @property
    def space(self) -> SuperSpace:
        return get_superspace(self.superspace)

    def stage_spec(self, stage_name: str) -> tuple[BlockSpec, StageConfig, tuple[int, ...]]:
        """(block spec, stage config, active width window) of one subnet-level stage."""
        space = self.space
        stage = space.stage(stage_name)
        if stage_name in space.fixed:
            return space.fixed[stage_name], stage, stage.width_list
        i = int(stage_name[len("stage"):]) - 1
        return space.candidates[self.blocks[i]], stage, stage.window(self.windows[i])


def parse_supernet(text: str) -> SupernetChoice:
    parts = text.strip().split("-")
    if len(parts) not in (2, 3):
        raise ValueError(f"supernet encoding {text!r}: expected <superspace>-<6 block digits>[-<6 window digits>], "
                         "e.g. onnxw-151122-023231")
    try:
        space = get_superspace(parts[0])
    except ValueError as e:
        raise ValueError(f"supernet encoding {text!r}: {e}") from None
    groups = parts[1:] if len(parts) == 3 else [parts[1], "0" * 6]
    for what, g in zip(("block", "window"), groups):
        if len(g) != 6 or not g.isdigit():
            raise ValueError(f"supernet encoding {text!r}: {what} group {g!r} must be 6 digits (stage1..6)")
    blocks, windows = (tuple(int(c) for c in g) for g in groups)
    try:
        space.check_choice(blocks, windows)
    except ValueError as e:
        raise ValueError(f"supernet encoding {text!r}: {e}") from None
    return SupernetChoice(space.name, blocks, windows)


def format_expand(e) -> str:
    return "0" if e is None else str(float(e))


@dataclass(frozen=True)
class SubnetConfig:
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    widths: tuple[int, ...]
    expands: tuple  # float or None per block
    resolution: int

    def __str__(self) -> str:
        j = lambda xs: "#".join(str(x) for x in xs)  # noqa: E731
        return (f"d{j(self.depths)}_k{j(self.kernels)}_w{j(self.widths)}"
                f"_e{'#'.join(format_expand(e) for e in self.expands)}_r{self.resolution}")

    def per_stage(self) -> list[list[tuple]]:
        """[(k, w, e) per block] per stage first_conv..stage6."""
        out, i = [], 0
        for d in self.depths:
            out.append([(self.kernels[j], self.widths[j], self.expands[j]) for j in range(i, i + d)])
            i += d
        return out

    @staticmethod
    def from_stages(stages: list[list[tuple]], resolution: int) -> "SubnetConfig":
        blocks = [b for s in stages for b in s]
        return SubnetConfig(tuple(len(s) for s in stages), tuple(b[0] for b in blocks),
                            tuple(b[1] for b in blocks), tuple(b[2] for b in blocks), resolution)

    def to_json(self, supernet: SupernetChoice | None = None) -> str:
        d = {"subnet": str(self)}
        if supernet is not None:
            d["supernet"] = str(supernet)
        return json.dumps(d)


def _ints(text: str, token: str, what: str) -> list[int]:
    out = []
    for v in token.split("#"):
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"subnet {text!r}: {what} token {v!r} in {token!r} is not an integer "
                             f"(the list must hold '#'-separated integers)") from None
    return out


def parse_subnet(text: str, supernet: SupernetChoice | None = None) -> SubnetConfig:
    """Parse a subnet string; with `supernet`, check every value against its choices."""
    parts = text.strip().split("_")
    prefixes = [p[:1] for p in parts]
    if prefixes != list("dkwer"):
        raise ValueError(f"subnet {text!r}: expected 5 '_'-separated groups d.._k.._w.._e.._r.., got {prefixes}")
    depths = _ints(text, parts[0][1:], "depth")
    kernels = _ints(text, parts[1][1:], "kernel")
    widths = _ints(text, parts[2][1:], "width")
    expands = []
    for tok in parts[3][1:].split("#"):
        try:
            v = float(tok)
        except ValueError:
            raise ValueError(f"subnet {text!r}: expand token {tok!r} is not a number") from None
        expands.append(None if v == 0 else v)
    try:
        resolution = int(parts[4][1:])
    except ValueError:
        raise ValueError(f"subnet {text!r}: resolution {parts[4]!r} must be r<int>") from None
    if len(depths) != len(SUBNET_STAGES):
        raise ValueError(f"subnet {text!r}: depth list has {len(depths)} entries, expected {len(SUBNET_STAGES)} "
                         f"({', '.join(SUBNET_STAGES)})")
    n = sum(depths)
    for name, xs in (("kernel", kernels), ("width", widths), ("expand", expands)):
        if len(xs) != n:
            raise ValueError(f"subnet {text!r}: {name} list has {len(xs)} entries, expected {n} (sum of depths)")
    cfg = SubnetConfig(tuple(depths), tuple(kernels), tuple(widths), tuple(expands), resolution)
    if supernet is not None:
        validate_subnet(cfg, supernet, text)
    return cfg


def validate_subnet(cfg: SubnetConfig, supernet: SupernetChoice, text: str | None = None) -> None:
    where = f"subnet {text or str(cfg)!r} in {supernet}"
    space = supernet.space
    if cfg.resolution not in space.supernet_hw_list:
        raise ValueError(f"{where}: resolution {cfg.resolution} not in {list(space.supernet_hw_list)}")
    for stage_name, d, blocks in zip(SUBNET_STAGES, cfg.depths, cfg.per_stage()):
        spec, stage, window = supernet.stage_spec(stage_name)
        if d not in stage.depth_list:
            raise ValueError(f"{where}: {stage_name} depth {d} not in {list(stage.depth_list)}")
        for j, (k, w, e) in enumerate(blocks):
            at = f"{where}: {stage_name} block {j} ({spec.name})"
            if k not in spec.kernel_list:
                raise ValueError(f"{at}: kernel {k} not in {list(spec.kernel_list)}")
            if w not in window:
                raise ValueError(f"{at}: width {w} not in window {list(window)}")
            allowed = [None if x is None else float(x) for x in spec.expand_list]
            if (None if e is None else float(e)) not in allowed:
                raise ValueError(f"{at}: expand {format_expand(e)} not in {[format_expand(x) for x in allowed]}")


# ---------------------------------------------------------------- LUT sub-stage encoding
def format_substage(blocks: list[tuple]) -> str:
    return "_".join(f"{k}#{w}#{e}" for k, w, e in blocks)


def parse_substage(text: str, spec: BlockSpec | None = None, stage: StageConfig | None = None,
                   window: tuple[int, ...] | None = None) -> list[tuple]:
    """Parse ``k#w#e_...``; with spec/stage, validate kernels, expands, depth and widths (in `window`)."""
    blocks = []
    for tok in text.strip().split("_"):
        f = tok.split("#")
        if len(f) != 3:
            raise ValueError(f"sub-stage {text!r}: block token {tok!r} must be k#w#e")
        try:
            k, w = int(f[0]), int(f[1])
            e = None if f[2] == "None" else (int(f[2]) if f[2].isdigit() else float(f[2]))
        except ValueError:
            raise ValueError(f"sub-stage {text!r}: block token {tok!r} has a non-numeric field") from None
        blocks.append((k, w, e))
    if spec is not None:
        where = f"sub-stage {text!r} ({spec.name})"
        if stage is not None and len(blocks) not in stage.depth_list:
            raise ValueError(f"{where}: depth {len(blocks)} not in {list(stage.depth_list)}")
        widths = window if window is not None else (stage.width_list if stage is not None else None)
        for k, w, e in blocks:
            if k not in spec.kernel_list:
                raise ValueError(f"{where}: kernel {k} not in {list(spec.kernel_list)}")
            if e not in spec.expand_list:
                raise ValueError(f"{where}: expand {e} not in {list(spec.expand_list)}")
            if widths is not None and w not in widths:
                raise ValueError(f"{where}: width {w} not in {list(widths)}")
    return blocks
