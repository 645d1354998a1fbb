"""Deployment fidelity of a trained LSQ+ subnet: is the int8 model that runs on the device the
model we trained and validated?

For one LSQ+ network (a standalone subnet checkpoint, or a demo subnet trained here if none is given)
on the same validation images:

* torch fake-quant (the reference: what training validated) and torch with the quantizers off;
* ONNX Runtime int8 with the learned scales (`modules.deploy.export_onnx_int8`, QDQ -> QLinear*),
  ONNX Runtime fp32 (BN folded), and the original's way: the fp32 ONNX re-quantized by
  ``quantize_static`` (QOperator, per channel) on 30 random inputs (as the original's ONNX tools do), plus the same with
  real calibration images (PTQ) for reference;
* LiteRT int8 with the learned scales (`modules.deploy.export_tflite_int8`) and LiteRT fp32.

Per row: top-1, its difference to the fake-quant top-1, the relative output error
||y - y_fq|| / ||y_fq||, the argmax agreement with fake-quant, and the median latency of the exported
file (1 thread, batch 1) with the speed-up over the fp32 file of the same runtime. Goals:
|delta top-1| <= 0.5 points for ONNX Runtime, <= 1 point for LiteRT. Then the per-block inspector
report of the int8 ONNX file (`modules.deploy.inspect_deployed`: int8 kernels, float fallbacks,
profiled int8 vs fp32 time per block).

    python -m bench.deploy_fidelity                                    # trains the demo subnet once (minutes)
    python -m bench.deploy_fidelity --checkpoint checkpoints/subnets/tiny-...pth --data_dir <ImageFolder>
    # the files onnx_tools/ and tflite_tools/export_int8_lsq.py wrote for that checkpoint, as deployed
    python -m bench.deploy_fidelity --checkpoint checkpoints/subnets/tiny-...pth --onnx_dir <dir> --tflite_dir <dir>

Then the INT8 vs FP32 latency of a published subnet at its real size (``--latency_model``, default
SEQnet@vnni-A0 at 160 px; random weights, scales from random inputs: latency only) exported the same way.

Writes ``<output_dir>/deploy_fidelity.{csv,md}``, ``deploy_latency.csv`` and the inspector reports
``deploy_inspect*.csv``; the exported files go to ``<output_dir>/deploy_models/``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules.cli import run_main  # noqa: E402

DEMO_SUPERNET = "tiny-012345-000000"  # one stage per block family: MBv1 (relu), MBv2 (relu6), MBv3 (hswish+SE),
# ResNet (relu), ResNetSE, FusedMBConv (swish); FirstConv relu, FinalExpand / FeatureMix hswish
DEMO_RESOLUTION = 32
GOALS = {"onnxruntime": 0.5, "litert": 1.0}  # largest |top-1 of the int8 file - fake-quant top-1|, points
FIELDS = ["variant", "runtime", "top1", "delta_top1", "rel_err", "argmax_agree", "latency_ms", "speedup", "file"]
LATENCY_FIELDS = ["model", "variant", "runtime", "latency_ms", "speedup", "file"]


def get_args_parser():
    p = argparse.ArgumentParser("deploy_fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="standalone LSQ+ subnet checkpoint (export_subnet.py); "
                   "default: the demo subnet, trained on the digits data into --output_dir on first use")
    p.add_argument("--data_dir", default=None, help="ImageFolder root with train/ and val/ (default: the digits set)")
    p.add_argument("--output_dir", default="./checkpoints/reports", help="(default: %(default)s)")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the subnet's)")
    p.add_argument("--max_val", type=int, default=None, help="evaluate on the first N val images only")
    p.add_argument("--threads", type=int, default=1, help="inference threads (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=30, help="latency warm-up runs (default: %(default)s)")
    p.add_argument("--runs", type=int, default=200, help="timed latency runs (default: %(default)s)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset 13..17 (default: %(default)s)")
    p.add_argument("--onnx_dir", default=None, help="check the files onnx_tools/export_int8_lsq.py wrote there for "
                   "--checkpoint (<stem>-lsq_int8.onnx, <stem>-lsq.onnx) instead of exporting again")
    p.add_argument("--tflite_dir", default=None, help="the same for tflite_tools/export_int8_lsq.py's .tflite files")
    p.add_argument("--no_tflite", action="store_true", help="skip LiteRT")
    p.add_argument("--no_ptq", action="store_true", help="skip the quantize_static rows")
    p.add_argument("--no_inspect", action="store_true", help="skip the per-block inspector report")
    p.add_argument("--latency_model", default="SEQnet@vnni-A0", help="a published subnet, random weights and "
                   "LSQ+ scales from random inputs, for INT8 vs FP32 latency at a realistic size ('' to skip; "
                   "default: %(default)s)")
    g = p.add_argument_group("demo subnet (when no --checkpoint)")
    g.add_argument("--supernet", default=DEMO_SUPERNET, help="(default: %(default)s, every block family)")
    g.add_argument("--demo_resolution", type=int, default=DEMO_RESOLUTION, help="(default: %(default)s)")
    g.add_argument("--preset", choices=["ort", "tflite", "ort_avx2"], default="ort",
                   help="LSQ+ preset (default: %(default)s)")
    g.add_argument("--fp32_steps", type=int, default=500, help="(default: %(default)s)")
    g.add_argument("--lsq_steps", type=int, default=300, help="(default: %(default)s)")
    g.add_argument("--batch_size", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--retrain", action="store_true", help="train the demo subnet again even if it is cached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    return p


# ----------------------------------------------------------------------------------------------- demo subnet
def _cycle(loader):
    while True:
        yield from loader


def train_lsq_subnet(model, loader, fp32_steps: int, lsq_steps: int, preset: str = "ort", lr: float = 3e-3,
                     lsq_lr: float = 5e-4, log=print):
    """Train a standalone subnet `fp32_steps` in fp32, then `lsq_steps` with LSQ+ (`preset`), AdamW with a
    cosine schedule per phase. Returns the model (LSQ+ mode, eval)."""
    from modules.engine import init_lsq_scales, param_groups
    from modules.lsq import set_quant_mode

    crit = torch.nn.CrossEntropyLoss()
    it = _cycle(loader)
    for phase, steps, base_lr in (("fp32", fp32_steps, lr), ("lsq", lsq_steps, lsq_lr)):
        if phase == "lsq":
            set_quant_mode(model, "lsq", preset)
            init_lsq_scales(model, next(it)[0])
        if steps <= 0:
            continue
        model.train()
        opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=base_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        t0, running = time.time(), 0.0
        for step in range(steps):
            images, labels = next(it)
            loss = crit(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            if log and (step + 1) % 100 == 0:
                log(f"  {phase} step {step + 1}/{steps}: loss {running:.3f} ({time.time() - t0:.0f} s)")
    return model.eval()


def demo_config(net, resolution: int):
    """Smallest kernel, width and expand ratio, largest depth (so every family has a projection and an
    identity shortcut) at `resolution`: ~1.3 MMACs for the tiny demo supernet."""
    from modules.encoding import SubnetConfig

    net.set_min_subnet()
    stages = [[s.active_config()[0]] * max(s.depth_list) for s in net.stages]
    return SubnetConfig.from_stages(stages, resolution)


def demo_subnet(args, data_dir: Path):
    """The cached demo subnet (export_subnet format), trained now if missing or --retrain."""
    from modules.data import build_dataset, build_loader
    from modules.subnet_search import load_subnet_checkpoint, save_subnet_checkpoint
    from modules.supernet import supernet_from_encoding

    path = Path(args.output_dir) / f"deploy_demo_{args.supernet}_r{args.demo_resolution}_{args.preset}.pth"
    if path.is_file() and not args.retrain:
        print(f"demo subnet: {path} (cached; --retrain to train again)")
        return load_subnet_checkpoint(path), path
    torch.manual_seed(args.seed)
    net = supernet_from_encoding(args.supernet)
    cfg = demo_config(net, args.demo_resolution)
    net.set_active_subnet(cfg)
    sub = net.get_active_subnet()
    del net
    ds = build_dataset(data_dir, "train", train=True, image_size=args.demo_resolution)
    loader = build_loader(ds, args.batch_size, train=True, seed=args.seed)
    print(f"training the demo subnet {args.supernet} {cfg}: {args.fp32_steps} fp32 + {args.lsq_steps} LSQ+ "
          f"({args.preset}) steps on {len(ds)} images")
    t0 = time.time()
    train_lsq_subnet(sub, loader, args.fp32_steps, args.lsq_steps, args.preset)
    print(f"  trained in {time.time() - t0:.0f} s")
    save_subnet_checkpoint(sub, path, data_dir=str(data_dir), fp32_steps=args.fp32_steps, lsq_steps=args.lsq_steps)
    return load_subnet_checkpoint(path), path


def exported_files(directory: str, checkpoint: Path, suffix: str, flag: str) -> tuple[Path, Path]:
    """(int8, fp32) files that an export_int8_lsq tool wrote to `directory` for `checkpoint`: they must exist
    and be newer than the checkpoint (else they were exported from other weights)."""
    from modules.export import lsq_checkpoint_stem

    stem = lsq_checkpoint_stem(checkpoint)
    files = (Path(directory) / f"{stem}_int8{suffix}", Path(directory) / f"{stem}{suffix}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{flag} {directory}: {f.name} not found (export {checkpoint} there first, or drop "
                                    f"{flag} to export here)")
        if f.stat().st_mtime < checkpoint.stat().st_mtime:
            raise ValueError(f"{flag} {directory}: {f.name} is older than {checkpoint}: export it again")
    return files


def verdicts(rows: list[dict]) -> list[tuple[str, float, float, bool]]:
    """(runtime, |delta top-1|, goal, met) per runtime of GOALS found in `rows` (deploy_fidelity.csv rows)."""
    out = []
    for runtime, goal in GOALS.items():
        r = next((r for r in rows if r["runtime"] == runtime and r["variant"].startswith("learned scales (ours)")), None)
        if r is not None:
            delta = abs(float(r["delta_top1"]))
            out.append((runtime, delta, goal, delta <= goal))
    return out


def verdict_line(runtime: str, delta: float, goal: float, met: bool, num_images: int | None = None) -> str:
    per_image = f"; one of {num_images} images is {100 / num_images:.2f}" if num_images else ""
    return f"{runtime}: |delta top-1| = {delta:.2f} points (goal <= {goal}{per_image}): {'PASS' if met else 'FAIL'}"


# ----------------------------------------------------------------------------------------------- measuring
def _ort_runner(path, threads: int, precise=None):
    from modules.latency.sessions import ort_session

    sess = ort_session(path, threads, precise)
    i = sess.get_inputs()[0]
    feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
            .astype(np.float32)}
    return lambda: sess.run(None, feed)


def _tflite_runner(path, threads: int):
    from modules.latency.sessions import tflite_interpreter

    it = tflite_interpreter(path, threads)
    rng = np.random.default_rng(0)
    for d in it.get_input_details():
        it.set_tensor(d["index"], rng.standard_normal(tuple(d["shape"])).astype(d["dtype"])
                      if np.issubdtype(d["dtype"], np.floating) else np.zeros(tuple(d["shape"]), d["dtype"]))
    return it.invoke


def measure(runners: dict, warmup: int, runs: int, block: int = 10) -> dict:
    """Median latency (ms) of each runner, measured interleaved in blocks of `block` runs so that every
    model sees the same load of a shared machine."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in runners}
    while min(len(v) for v in times.values()) < runs:
        for k, fn in runners.items():
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def _fill_latency(rows: list[dict], lat: dict) -> None:
    for r in rows:
        key, base = r.pop("_key", None), r.pop("_base", None)
        if key in lat:
            r["latency_ms"] = f"{lat[key]:.3f}"
            if base in lat:
                r["speedup"] = f"{lat[base] / lat[key]:.2f}"


def _row(variant, runtime, logits, labels, ref, top1_ref, key=None, base=None, file=""):
    top1 = float((logits.argmax(1) == labels).mean() * 100)
    return {"variant": variant, "runtime": runtime, "top1": f"{top1:.2f}",
            "delta_top1": f"{top1 - top1_ref:+.2f}" if top1_ref is not None else "",
            "rel_err": "" if ref is None else f"{np.linalg.norm(logits - ref) / np.linalg.norm(ref):.4f}",
            "argmax_agree": "" if ref is None else f"{(logits.argmax(1) == ref.argmax(1)).mean() * 100:.2f}",
            "latency_ms": "", "speedup": "", "file": file, "_key": key, "_base": base}


def _write_csv(path: Path, rows, fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def latency_section(args, mdir: Path) -> tuple[list[dict], str, str]:
    """INT8 vs FP32 latency of a published subnet (random weights; LSQ+ scales from random inputs: the
    accuracy is meaningless, the graph is the deployed one). Returns (rows, int8 ONNX, fp32 ONNX)."""
    from modules import deploy
    from modules.engine import init_lsq_scales
    from modules.export import RandomCalibrationWarning, build_model_from_encoding, named_model_entry, quantize_onnx_int8
    from modules.latency.sessions import ort_precise_default
    from modules.lsq import set_quant_mode

    e = named_model_entry(args.latency_model)
    torch.manual_seed(args.seed)
    fp32 = build_model_from_encoding(e.supernet, e.subnet)
    r = int(fp32.resolution)
    images = torch.randn(4, 3, r, r)
    models = {}
    for preset in ("ort", "ort_avx2"):
        m = copy.deepcopy(fp32)
        set_quant_mode(m, "lsq", preset)
        init_lsq_scales(m, images)
        models[preset] = m.eval()
    model = models["ort"]
    stem = f"{e.stem}-lsq"
    f_int8 = deploy.export_onnx_int8(model, mdir / f"{stem}_int8.onnx", r, opset=args.opset)
    f_w7 = deploy.export_onnx_int8(models["ort_avx2"], mdir / f"{stem}_avx2_int8.onnx", r, opset=args.opset)
    f_fp32 = deploy.export_onnx_fp32(model, mdir / f"{stem}.onnx", r, opset=args.opset)
    precise = ort_precise_default()
    rows = [("fp32 (BN folded)", "onnxruntime", "ort32", "ort32", f_fp32),
            ("learned scales, preset ort" + (", x64quantprecision" if precise else ""), "onnxruntime", "ort8", "ort32",
             f_int8),
            ("learned scales, preset ort_avx2 (7-bit weights)", "onnxruntime", "ort7", "ort32", f_w7)]
    runners = {"ort32": _ort_runner(f_fp32, args.threads), "ort8": _ort_runner(f_int8, args.threads),
               "ort7": _ort_runner(f_w7, args.threads)}
    if precise:
        rows.append(("learned scales, preset ort, default kernels (no VNNI: saturate)", "onnxruntime", "ort8fast",
                     "ort32", f_int8))
        runners["ort8fast"] = _ort_runner(f_int8, args.threads, precise=False)
    if not args.no_ptq:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomCalibrationWarning)
            f_orig = quantize_onnx_int8(f_fp32, mdir / f"{stem}_original_int8.onnx", calib=None, fmt="qoperator",
                                        num_random_calib=30, seed=args.seed)
        rows.append(("original: quantize_static QOperator" + (" (7-bit weights)" if precise else ""), "onnxruntime",
                     "orig", "ort32", f_orig))
        runners["orig"] = _ort_runner(f_orig, args.threads)
    if not args.no_tflite:
        t_int8 = deploy.export_tflite_int8(model, mdir / f"{stem}_int8.tflite", r)
        t_fp32 = deploy.export_tflite_fp32(model, mdir / f"{stem}.tflite", r)
        rows += [("fp32", "litert", "tfl32", "tfl32", t_fp32), ("learned scales, preset ort", "litert", "tfl8", "tfl32",
                                                                 t_int8)]
        runners.update(tfl32=_tflite_runner(t_fp32, args.threads), tfl8=_tflite_runner(t_int8, args.threads))
    lat = measure(runners, args.warmup, args.runs)
    out = [{"model": f"{args.latency_model} r{r}", "variant": v, "runtime": rt, "latency_ms": f"{lat[k]:.3f}",
            "speedup": f"{lat[b] / lat[k]:.2f}", "file": f} for v, rt, k, b, f in rows]
    return out, f_int8, f_fp32


def main(args):
    from modules import deploy
    from modules.data import DEFAULT_DATA_DIR, build_dataset, prepare_default_data
    from modules.export import RandomCalibrationWarning, quantize_onnx_int8
    from modules.latency.sessions import ort_precise_default
    from modules.subnet_search import load_subnet_checkpoint

    torch.set_num_threads(max(1, args.threads))
    if (args.onnx_dir or args.tflite_dir) and not args.checkpoint:
        raise ValueError("--onnx_dir / --tflite_dir hold the exports of a --checkpoint: give it")
    out = Path(args.output_dir)
    data_dir = prepare_default_data(args.data_dir or DEFAULT_DATA_DIR)
    if args.checkpoint:
        model, ckpt_path = load_subnet_checkpoint(args.checkpoint), Path(args.checkpoint)
    else:
        model, ckpt_path = demo_subnet(args, data_dir)
    preset = deploy.model_preset(model)
    res = args.resolution or model.resolution
    if (args.onnx_dir or args.tflite_dir) and res != model.resolution:
        raise ValueError(f"--resolution {res}: the exported files take the subnet's {model.resolution} px")
    model.eval()
    val = build_dataset(data_dir, "val", train=False, image_size=res)
    n = len(val) if args.max_val is None else min(args.max_val, len(val))
    xs, ys = zip(*(val[i] for i in range(n)))
    x, labels = torch.stack(xs), np.array(ys)
    print(f"model {ckpt_path} ({preset}), resolution {res}, {n} val images of {data_dir}")

    with torch.no_grad():
        ref = model(x).numpy()
        fp32_torch = deploy.fp32_model(model)(x).numpy()
    top1_ref = float((ref.argmax(1) == labels).mean() * 100)
    rows = [_row("fake-quant (reference)", "torch", ref, labels, ref, top1_ref),
            _row("quantizers off", "torch", fp32_torch, labels, ref, top1_ref)]

    mdir = out / "deploy_models"
    stem = ckpt_path.stem
    if args.onnx_dir:
        f_int8, f_fp32 = exported_files(args.onnx_dir, ckpt_path, ".onnx", "--onnx_dir")
    else:
        f_int8 = deploy.export_onnx_int8(model, mdir / f"{stem}_int8.onnx", res, opset=args.opset)
        f_fp32 = deploy.export_onnx_fp32(model, mdir / f"{stem}.onnx", res, opset=args.opset)
    runners = {"ort32": _ort_runner(f_fp32, args.threads), "ort8": _ort_runner(f_int8, args.threads)}
    precise = ort_precise_default()
    rows.append(_row("learned scales (ours)" + (", x64quantprecision" if precise else ""), "onnxruntime",
                     deploy.run_onnx_batch(f_int8, x), labels, ref, top1_ref, "ort8", "ort32", f_int8))
    if precise:  # what the default (saturating u8 x s8) kernels of this CPU give
        rows.append(_row("learned scales, default kernels (no VNNI: saturate)", "onnxruntime",
                         deploy.run_onnx_batch(f_int8, x, precise=False), labels, ref, top1_ref, "ort8fast", "ort32",
                         f_int8))
        runners["ort8fast"] = _ort_runner(f_int8, args.threads, precise=False)
    rows.append(_row("fp32 (BN folded)", "onnxruntime", deploy.run_onnx_batch(f_fp32, x), labels, ref, top1_ref,
                     "ort32", "ort32", f_fp32))
    if not args.no_ptq:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomCalibrationWarning)
            f_orig = quantize_onnx_int8(f_fp32, mdir / f"{stem}_original_int8.onnx", calib=None, fmt="qoperator",
                                        num_random_calib=30, seed=args.seed)
        rows.append(_row("original: fp32 + quantize_static, 30 random inputs", "onnxruntime",
                         deploy.run_onnx_batch(f_orig, x), labels, ref, top1_ref, "orig", "ort32", f_orig))
        train = build_dataset(data_dir, "train", train=False, image_size=res)
        g = torch.Generator().manual_seed(args.seed)
        calib = torch.stack([train[int(i)][0] for i in torch.randperm(len(train), generator=g)[:128]])
        f_ptq = quantize_onnx_int8(f_fp32, mdir / f"{stem}_ptq_int8.onnx", calib=calib, fmt="qdq")
        rows.append(_row("PTQ: fp32 + quantize_static, 128 train images", "onnxruntime",
                         deploy.run_onnx_batch(f_ptq, x), labels, ref, top1_ref, "ptq", "ort32", f_ptq))
        runners.update(orig=_ort_runner(f_orig, args.threads), ptq=_ort_runner(f_ptq, args.threads))
    if not args.no_tflite:
        if args.tflite_dir:
            t_int8, t_fp32 = exported_files(args.tflite_dir, ckpt_path, ".tflite", "--tflite_dir")
        else:
            t_int8 = deploy.export_tflite_int8(model, mdir / f"{stem}_int8.tflite", res)
            t_fp32 = deploy.export_tflite_fp32(model, mdir / f"{stem}.tflite", res)
        rows.append(_row("learned scales (ours)", "litert", deploy.run_tflite_batch(t_int8, x), labels, ref, top1_ref,
                         "tfl8", "tfl32", t_int8))
        rows.append(_row("fp32", "litert", deploy.run_tflite_batch(t_fp32, x), labels, ref, top1_ref, "tfl32",
                         "tfl32", t_fp32))
        runners.update(tfl32=_tflite_runner(t_fp32, args.threads), tfl8=_tflite_runner(t_int8, args.threads))
    _fill_latency(rows, measure(runners, args.warmup, args.runs))
    del runners

    table = deploy.format_rows(rows, FIELDS[:-1], markdown=True)
    print()
    print(table)
    _write_csv(out / "deploy_fidelity.csv", rows, FIELDS)
    (out / "deploy_fidelity.md").write_text(f"model {ckpt_path}, {n} val images, resolution {res}, "
                                            f"{args.threads} thread(s)\n\n{table}\n")
    checks = verdicts(rows)
    for v in checks:
        print(verdict_line(*v, num_images=n))
    verdict = int(not all(met for *_, met in checks))
    print(f"wrote {out / 'deploy_fidelity.csv'} and {out / 'deploy_fidelity.md'}")
    inspect = [(f_int8, f_fp32, out / "deploy_inspect.csv")]
    if args.latency_model:
        lrows, l_int8, l_fp32 = latency_section(args, mdir)
        ltable = deploy.format_rows(lrows, LATENCY_FIELDS[:-1], markdown=True)
        print(f"\nINT8 vs FP32 latency at a realistic size ({args.threads} thread(s), median of {args.runs} "
              f"interleaved runs, random weights):\n\n{ltable}")
        _write_csv(out / "deploy_latency.csv", lrows, LATENCY_FIELDS)
        with open(out / "deploy_fidelity.md", "a") as f:
            f.write(f"\nINT8 vs FP32 latency, {args.latency_model} (random weights)\n\n{ltable}\n")
        print(f"wrote {out / 'deploy_latency.csv'}")
        inspect.append((l_int8, l_fp32, out / "deploy_inspect_latency_model.csv"))
    if not args.no_inspect:
        for i8, f32, csv_path in inspect:
            print()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                irows = deploy.inspect_deployed(i8, f32, runs=max(20, args.runs // 2), threads=args.threads)
            _write_csv(csv_path, irows, list(irows[0]))
            print(f"wrote {csv_path}")
    return verdict


if __name__ == "__main__":
    run_main(main, get_args_parser())
