"""Block timings measured elsewhere (another tool, another lab's phone), imported into a latency table.

The CSV has a header with the columns ``block`` and ``latency_ms`` (others are ignored), one row per block:
``block`` is a block key (``name_hw_cin_cout_k_e_stride_act_se``, as `keys.block_key` writes it, e.g.
``MobileNetV2Res_20_40_40_5_4_1_relu_0``) and ``latency_ms`` its latency inside a network, taken as given
(subtract any per-call overhead before). Rows with an empty ``block`` and ``supernet``, ``subnet`` columns
are whole subnets measured end to end on the same device: they fit the table's correction.

Every row is checked; a bad one is one ValueError naming the file, the line and the problem.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from modules.latency.keys import parse_block_key


def _latency(text: str, where: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: latency_ms {text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{where}: latency_ms {text!r} must be a finite number >= 0")
    return v


def read_block_csv(path) -> tuple[dict[str, float], list[dict]]:
    """({block key: ms}, [whole subnets {supernet, subnet, measured_ms}]) of a block-timing CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"block timing CSV {path} not found")
    blocks, models = {}, []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if not {"block", "latency_ms"} <= cols:
            raise ValueError(f"{path}:1: header needs the columns block and latency_ms (got {sorted(cols)})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            key = (row.get("block") or "").strip()
            ms = _latency((row.get("latency_ms") or "").strip(), where)
            if key:
                try:
                    parse_block_key(key)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                if key in blocks and blocks[key] != ms:
                    raise ValueError(f"{where}: block {key} appears twice with different latencies")
                blocks[key] = ms
            elif (row.get("supernet") or "").strip() and (row.get("subnet") or "").strip():
                models.append({"supernet": row["supernet"].strip(), "subnet": row["subnet"].strip(), "measured_ms": ms})
            else:
                raise ValueError(f"{where}: a row needs a block key, or a supernet and a subnet")
    if not blocks:
        raise ValueError(f"{path}: no block rows")
    return blocks, models


def import_block_csv(pred, path, superspace: str | None = None) -> dict:
    """Add the CSV's blocks to the table of `pred` (a `LatencyPredictor`), fit the correction on its whole
    subnets if it has at least two, save. A table measured by a runner is not mixed with imported times."""
    from modules.latency.sampling import subnet_block_configs

    blocks, models = read_block_csv(path)
    src = {"runner": "csv", "target": Path(path).name}
    if pred.device and (pred.device.get("runner", "local"), pred.device.get("target")) != ("csv", src["target"]):
        raise ValueError(f"latency table {pred.table_path} was measured with runner "
                         f"{pred.device.get('runner', 'local')!r}; import {path} into another --output_dir")
    pred.device = src
    pred.overhead_ms = pred.overhead_ms or 0.0
    pred.add_entries(blocks)
    pred.save()
    fitted = None
    if len(models) >= 2:
        space = superspace or pred.superspace
        for m in models:
            m["superspace"] = space
        cfgs = [subnet_block_configs(m["supernet"], m["subnet"]) for m in models]
        fitted = pred.calibrate(cfgs, [m["measured_ms"] for m in models], models=models, superspace=space)
    return {"blocks": len(blocks), "models": len(models), "correction": fitted}
