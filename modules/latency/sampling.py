"""Subnets without networks: the block configurations of a subnet from its encodings, every configuration of the
fixed (non-searchable) blocks, and random supernets / subnets drawn as the supernet samples them.
"""
from __future__ import annotations

import math


def _as_choice(supernet):
    from modules.encoding import SupernetChoice, parse_supernet

    return supernet if isinstance(supernet, SupernetChoice) else parse_supernet(str(supernet))


def subnet_block_configs(supernet, subnet, num_classes: int | None = None) -> list[dict]:
    """Block configs of a subnet from its encodings alone, equal to ``SuperNet.block_configs()`` of that
    subnet (the test suite checks it) without building the network (an onnxw supernet takes seconds).
    `num_classes`: the logits width (default: the superspace's)."""
    from modules.encoding import SubnetConfig, parse_subnet
    from modules.superspace import SUBNET_STAGES

    choice = _as_choice(supernet)
    cfg = subnet if isinstance(subnet, SubnetConfig) else parse_subnet(str(subnet), choice)
    space = choice.space
    hw, cin, out = cfg.resolution, space.cin, []
    for name, blocks in zip(SUBNET_STAGES, cfg.per_stage()):
        spec, stage, _ = choice.stage_spec(name)
        for i, (k, w, e) in enumerate(blocks):
            s = stage.stride if i == 0 else 1
            out.append(dict(name=spec.name, cin=cin, cout=w, kernel=k, expand=e, stride=s, act=spec.act,
                            se=spec.se, hw=hw))
            hw, cin = math.ceil(hw / s), w
    for name in ("final_expand", "feature_mix", "logits"):
        spec = space.fixed[name]
        w = (num_classes or space.num_classes) if name == "logits" else max(space.stage(name).width_list)
        e = None if spec.expand_list == (None,) else max(spec.expand_list)
        out.append(dict(name=spec.name, cin=cin, cout=w, kernel=max(spec.kernel_list), expand=e, stride=1,
                        act=spec.act, se=spec.se, hw=hw))
        hw = 1 if spec.name == "FeatureMix" else hw
        cin = w
    return out


def fixed_block_configs(superspace: str, resolutions=None) -> list[dict]:
    """Every configuration of the blocks outside the searchable stages (first conv, stage0, final expand,
    feature mix, logits) at each resolution: few, in every subnet, and unlike the searchable blocks, so
    the table should hold them all rather than leave them to the regression."""
    import itertools

    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    out = []
    fc, s0 = space.stage("first_conv"), space.stage("stage0")
    fspec, sspec = space.fixed["first_conv"], space.fixed["stage0"]
    for r in resolutions or space.supernet_hw_list:
        for w in fc.width_list:
            out.append(dict(name=fspec.name, cin=space.cin, cout=w, kernel=max(fspec.kernel_list), expand=None,
                            stride=fc.stride, act=fspec.act, se=fspec.se, hw=r))
        hw = math.ceil(r / fc.stride)
        for k, e in itertools.product(sspec.kernel_list, sspec.expand_list):
            for cin, cout in itertools.product(fc.width_list, s0.width_list):
                out.append(dict(name=sspec.name, cin=cin, cout=cout, kernel=k, expand=e, stride=s0.stride,
                                act=sspec.act, se=sspec.se, hw=hw))
            if max(s0.depth_list) > 1:
                for cin, cout in itertools.product(s0.width_list, s0.width_list):
                    out.append(dict(name=sspec.name, cin=cin, cout=cout, kernel=k, expand=e, stride=1,
                                    act=sspec.act, se=sspec.se, hw=math.ceil(hw / s0.stride)))
        hw = space.stage_input_hw(r, "final_expand")
        head = [space.fixed[n] for n in ("final_expand", "feature_mix", "logits")]
        fe_w, fm_w = max(space.stage("final_expand").width_list), max(space.stage("feature_mix").width_list)
        for cin in space.stage("stage6").width_list:
            out.append(dict(name=head[0].name, cin=cin, cout=fe_w, kernel=max(head[0].kernel_list), expand=None,
                            stride=1, act=head[0].act, se=head[0].se, hw=hw))
        out.append(dict(name=head[1].name, cin=fe_w, cout=fm_w, kernel=max(head[1].kernel_list), expand=None,
                        stride=1, act=head[1].act, se=head[1].se, hw=hw))
        out.append(dict(name=head[2].name, cin=fm_w, cout=space.num_classes, kernel=max(head[2].kernel_list),
                        expand=None, stride=1, act=head[2].act, se=head[2].se, hw=1))
    return out


def random_supernet(superspace: str, rng):
    """A uniformly random supernet choice (block type and width window per searchable stage)."""
    from modules.encoding import SupernetChoice
    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    blocks = tuple(rng.randrange(len(space.candidates)) for _ in space.searchable_stages)
    windows = tuple(rng.randrange(s.num_windows) for s in space.searchable_stages)
    return SupernetChoice(space.name, blocks, windows)


def random_subnet(supernet, rng, resolution: int | None = None, mode: str = "random"):
    """A subnet of `supernet` drawn like ``SuperNet.sample_active_subnet`` (uniform depth, then uniform
    kernel / width / expand per block), or its ``"max"`` / ``"min"`` subnet; `resolution` fixes r."""
    from modules.encoding import SubnetConfig
    from modules.superspace import SUBNET_STAGES

    choice = _as_choice(supernet)
    if mode not in ("max", "min", "random"):
        raise ValueError(f"subnet mode {mode!r}: use max, min or random")
    pick = {"max": max, "min": min}.get(mode) or rng.choice
    stages = []
    for name in SUBNET_STAGES:
        spec, stage, window = choice.stage_spec(name)
        blocks = []
        for _ in range(pick(stage.depth_list)):
            e = None if spec.expand_list == (None,) else pick(spec.expand_list)
            blocks.append((pick(spec.kernel_list), pick(window), None if e is None else float(e)))
        stages.append(blocks)
    r = resolution if resolution is not None else pick(choice.space.supernet_hw_list)
    return SubnetConfig.from_stages(stages, r)


def sample_subnets(superspace: str, num: int, rng, resolutions=None, supernets=None,
                   extremes: bool = True) -> list[tuple[str, str]]:
    """(supernet, subnet) encodings: at each resolution (default: the superspace's supernet resolutions),
    `num` random subnets of random supernets (or of `supernets`, cycled), plus the max and min subnets."""
    from modules.superspace import get_superspace

    space = get_superspace(superspace)
    resolutions = list(resolutions or space.supernet_hw_list)
    choices = [_as_choice(s) for s in supernets] if supernets else None
    for c in choices or ():
        if c.superspace != space.name:
            raise ValueError(f"supernet {c} is not in superspace {space.name}")
    out, i = [], 0
    for r in resolutions:
        if r not in space.supernet_hw_list:
            raise ValueError(f"resolution {r} not in {space.name}'s {list(space.supernet_hw_list)}")
        modes = ["random"] * num + (["max", "min"] if extremes else [])
        for mode in modes:
            choice = choices[i % len(choices)] if choices else random_supernet(space.name, rng)
            i += 1
            out.append((str(choice), str(random_subnet(choice, rng, r, mode))))
    return out
