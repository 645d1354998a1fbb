"""Time per supernet training step (sandwich rule: max + random + random + min, backward, SGD step) of the
tiny supernet in LSQ+ fake-quant mode vs fp32, in the same process. Goal: ratio <= 1.5.

    python -m bench.lsq_overhead                        # tiny-151122-000000, batch 32, 64 px
    python -m bench.lsq_overhead --supernet tiny-000000-000000 --steps 10 --rounds 5 --threads 2
    python -m bench.lsq_overhead --profile              # + top ops of an LSQ+ step by self CPU time
    python -m bench.lsq_overhead --reference            # + a step with the reference chains of autograd ops
    python -m bench.lsq_overhead --fused                # + a step with fused LSQ+ autograd functions
    python -m bench.lsq_overhead --fused compiled       # ... whose elementwise kernels are torch.compile'd

The two models hold the same weights; rounds alternate fp32 / LSQ+ so that load from other processes
affects both alike, and each mode trains the same subnets in the same round (the step number seeds them).
Reported: the median per-step time of each mode (wall clock, and CPU time of this process) and the ratio
of the medians; "paired" is the median over rounds of the round's LSQ+ / fp32 ratio, the estimate least
moved by load from other processes and by the subnets' different sizes. LSQ+ is what training runs: the fused
autograd nodes of modules.lsq.quantize_activation / quantize_weight. `--reference` also times their
definition, the chains of autograd ops quantize_activation_reference / quantize_weight_reference (what
training ran before). `--fused` times another fused variant (this file's autograd.Functions); with
`--fused compiled` its kernels go through torch.compile (inductor; needs a C++ compiler, compiles once).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules import lsq  # noqa: E402
from modules.engine import init_lsq_scales  # noqa: E402
from modules.lsq import set_quant_mode  # noqa: E402
from modules.supernet import supernet_from_encoding  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("lsq_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", default="tiny-151122-000000")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and mode")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", default="ort", choices=list(lsq.PRESETS))
    p.add_argument("--profile", action="store_true", help="print the top ops of an LSQ+ step")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference chains of autograd ops (modules.lsq.*_reference)")
    p.add_argument("--fused", nargs="?", const="eager", choices=["eager", "compiled"], default=None,
                   help="also time fused LSQ+ autograd functions (their elementwise kernels eager or torch.compile'd)")
    return p


def make_trainer(model, args):
    """A train_supernet.Trainer over a synthetic loader (the real step code: sandwich, clip, SGD, scheduler)."""
    import train_supernet
    targs = train_supernet.get_args_parser().parse_args(
        ["--supernet_choice", args.supernet, "--batch_size_per_gpu", str(args.batch_size), "--epochs", "1000",
         "--warmup_epochs", "0", "--base_lr", "0.01", "--lsq_base_lr", "0.001", "--lsq_epochs", "1000"])
    targs.quant_mode = "lsq" if lsq.get_quant_mode(model) == "lsq" else "fp32"
    loaders = {"train": [None] * 100}
    return train_supernet.Trainer(targs, model, loaders, torch.device("cpu"), None, args.supernet)


def time_steps(trainer, batch, steps: int) -> float:
    return time_steps_cpu(trainer, batch, steps)[0]


def time_steps_cpu(trainer, batch, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step."""
    images, labels = batch
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step(images, labels, False)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


# ------------------------------------------------------------------ fused variant (measurement only)
def _grad_scale_value(v, g):
    return v if g == 1.0 else (v - v * g) + v * g  # the value lsq.grad_scale() produces


# the elementwise work, in plain functions so that `--fused compiled` can hand them to torch.compile
def _act_fwd(x, s, beta, levels: float):
    t = (x - beta) / s
    return t.clamp(0, levels).round() * s + beta, t


def _act_bwd(grad, t, levels: float):
    inside = (t > 0) & (t < levels)  # strict, like torch.clamp's backward
    gx = grad * inside
    term = t.clamp(0, levels).round() - t * inside  # round(t) - t inside, 0 / levels where clipped
    return gx, (grad * term).sum(), grad.sum() - gx.sum()


def _weight_fwd(w, s, qmin: float, qmax: float):
    t = w / s
    return t.clamp(qmin, qmax).round() * s, t


def _weight_bwd(grad, t, qmin: float, qmax: float):
    inside = (t > qmin) & (t < qmax)
    d = grad * (t.clamp(qmin, qmax).round() - t * inside)
    return grad * inside, d.reshape(d.shape[0], -1).sum(1)  # per output channel


KERNELS = {"act_fwd": _act_fwd, "act_bwd": _act_bwd, "weight_fwd": _weight_fwd, "weight_bwd": _weight_bwd}


def compile_kernels() -> None:
    """torch.compile (inductor, dynamic shapes) the four elementwise kernels."""
    for name in list(KERNELS):
        KERNELS[name] = torch.compile(globals()["_" + name], dynamic=True)


class _ActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, offset, levels, integer_zero_point, g):
        s = _grad_scale_value(scale.abs().clamp_min(lsq.SCALE_FLOOR), g)
        beta0 = _grad_scale_value(offset, g)
        z = zp = None
        beta = beta0
        if integer_zero_point:
            z = -beta0 / s
            zp = torch.clamp(z, 0, levels).round()
            beta = -zp * s
        out, t = KERNELS["act_fwd"](x, s, beta, float(levels))
        ctx.save_for_backward(t, scale, s, beta0, z, zp)
        ctx.levels, ctx.izp, ctx.g = levels, integer_zero_point, g
        return out

    @staticmethod
    def backward(ctx, grad):
        t, scale, s, beta0, z, zp = ctx.saved_tensors
        gx, d_s, d_beta = KERNELS["act_bwd"](grad.contiguous(), t, float(ctx.levels))
        if ctx.izp:  # beta = -zp * s with zp = round_ste(clamp(-beta0 / s, 0, levels))
            zp_in = ((z > 0) & (z < ctx.levels)).to(t.dtype)
            d_s = d_s - d_beta * zp - d_beta * zp_in * beta0 / s
            d_beta = d_beta * zp_in
        d_scale = d_s.reshape(1) * ctx.g * torch.sign(scale) * (scale.abs() > lsq.SCALE_FLOOR).to(t.dtype)
        return gx, d_scale, d_beta.reshape(1) * ctx.g, None, None, None


class _WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, qmin, qmax, g):
        s = _grad_scale_value(scale.abs().clamp_min(lsq.SCALE_FLOOR), g)
        if s.numel() > 1:
            s = s.view(-1, *([1] * (w.dim() - 1)))
        out, t = KERNELS["weight_fwd"](w, s, float(qmin), float(qmax))
        ctx.save_for_backward(t, scale)
        ctx.qmin, ctx.qmax, ctx.g = qmin, qmax, g
        return out

    @staticmethod
    def backward(ctx, grad):
        t, scale = ctx.saved_tensors
        gw, d_rows = KERNELS["weight_bwd"](grad.contiguous(), t, float(ctx.qmin), float(ctx.qmax))
        d_s = d_rows.sum().reshape(1) if scale.numel() == 1 else d_rows
        d_scale = d_s * ctx.g * torch.sign(scale) * (scale.abs() > lsq.SCALE_FLOOR).to(t.dtype)
        return gw, d_scale, None, None, None


def fused_activation(x, scale, offset, qmin, qmax, integer_zero_point, g=1.0):
    return _ActFakeQuant.apply(x, scale, offset, qmax - qmin, integer_zero_point, g)


def fused_weight(w, scale, qmin, qmax, g=1.0):
    return _WeightFakeQuant.apply(w, scale, qmin, qmax, g)


def check_fused_matches_reference() -> tuple[float, float]:
    """(largest forward difference, largest relative gradient difference) fused vs modules.lsq, float64."""
    gen = torch.Generator().manual_seed(0)
    fwd, worst = 0.0, 0.0
    for izp in (False, True):
        for g in (1.0, 0.21):
            x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 2
            up = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            res = []
            for f in (lsq.quantize_activation, fused_activation):
                sc = torch.tensor([0.011], dtype=torch.float64, requires_grad=True)
                of = torch.tensor([-1.23], dtype=torch.float64, requires_grad=True)
                xv = x.clone().requires_grad_(True)
                out = f(xv, sc, of, 0, 255, izp, g)
                (out * up).sum().backward()
                res.append((out.detach(), xv.grad, sc.grad, of.grad))
            fwd = max(fwd, float((res[0][0] - res[1][0]).abs().max()))
            for a, b in zip(res[0][1:], res[1][1:]):
                worst = max(worst, float(((a - b).abs() / (a.abs() + 1e-12)).max()))
    return fwd, worst


@contextlib.contextmanager
def fused_quantizers(fused=None):
    """Route every call of modules.lsq.quantize_activation / quantize_weight (also where another module
    imported them by name, e.g. modules.ops) through this file's fused functions (or `fused`, a dict of
    replacements) while the context is open."""
    originals = {"quantize_activation": lsq.quantize_activation, "quantize_weight": lsq.quantize_weight}
    fused = fused or {"quantize_activation": fused_activation, "quantize_weight": fused_weight}
    patched = []
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").split(".")[0] != "modules":
            continue
        for name, fn in originals.items():
            if getattr(mod, name, None) is fn:
                setattr(mod, name, fused[name])
                patched.append((mod, name, fn))
    try:
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


# ------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = supernet_from_encoding(args.supernet).train()
    quant = set_quant_mode(copy.deepcopy(fp32), "lsq", args.preset)
    batch = (torch.randn(args.batch_size, 3, args.image_size, args.image_size),
             torch.randint(0, fp32.num_classes, (args.batch_size,)))
    quant.set_max_subnet()
    init_lsq_scales(quant, batch[0])
    variants = {"fp32": fp32, "lsq": quant}
    if args.fused == "compiled":
        compile_kernels()
    if args.fused:
        fwd, grad = check_fused_matches_reference()
        print(f"fused ({args.fused}) vs modules.lsq, float64: largest forward difference {fwd:.1e}, "
              f"largest relative gradient difference {grad:.1e}")
        variants["lsq_fused"] = copy.deepcopy(quant)
    if args.reference:
        variants["lsq_ref"] = copy.deepcopy(quant)
    trainers = {k: make_trainer(m, args) for k, m in variants.items()}
    reference = {"quantize_activation": lsq.quantize_activation_reference,
                 "quantize_weight": lsq.quantize_weight_reference}

    def timed(k, steps):
        ctx = fused_quantizers() if k == "lsq_fused" else fused_quantizers(reference) if k == "lsq_ref" else \
            contextlib.nullcontext()
        with ctx:
            return time_steps_cpu(trainers[k], batch, steps)

    for k in trainers:  # warm-up (allocator, first-call overheads)
        timed(k, 1)
    times = {k: [] for k in trainers}
    cpu = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for k in trainers:
            wall, c = timed(k, args.steps)
            times[k].append(wall)
            cpu[k].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{args.supernet}, batch {args.batch_size}, {args.image_size} px loader crops, {args.threads} thread(s), "
          f"preset {args.preset}, {args.rounds} rounds x {args.steps} steps")
    for k, v in med.items():
        print(f"  {k:10s} {v * 1000:8.1f} ms/step   (rounds: {', '.join(f'{x * 1000:.0f}' for x in times[k])})"
              f"   CPU {med_cpu[k] * 1000:8.1f} ms/step")
    out = {"fp32_ms": med["fp32"] * 1000, "lsq_ms": med["lsq"] * 1000}
    for k, name in (("lsq", "LSQ+"), ("lsq_ref", "reference chains"), ("lsq_fused", f"bench-fused ({args.fused})")):
        if k not in med:
            continue
        prefix = "" if k == "lsq" else k + "_"
        out[prefix + "ratio"] = med[k] / med["fp32"]
        out[prefix + "cpu_ratio"] = med_cpu[k] / med_cpu["fp32"]
        out[prefix + "paired_ratio"] = statistics.median(a / b for a, b in zip(times[k], times["fp32"]))
        out[prefix + "paired_cpu_ratio"] = statistics.median(a / b for a, b in zip(cpu[k], cpu["fp32"]))
        print(f"{name} / fp32 step time: {out[prefix + 'ratio']:.2f}x, paired {out[prefix + 'paired_ratio']:.2f}x; "
              f"CPU time: {out[prefix + 'cpu_ratio']:.2f}x, paired {out[prefix + 'paired_cpu_ratio']:.2f}x"
              + (" (goal <= 1.5x)" if k == "lsq" else ""))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time_steps(trainers["lsq"], batch, 2)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return out


if __name__ == "__main__":
    main()
