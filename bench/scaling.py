"""Throughput of the multi-rank stages, 1 vs 2 ranks side by side in one run (CPU / gloo by default): images/s
of supernet training (sandwich steps, one gradient all-reduce per step) and of subnet-search evaluation
(candidates spread over the ranks, `modules.dist.map_over_ranks`), each rank on one thread.

    python bench/scaling.py                          # 1 and 2 ranks, CPU / gloo
    python bench/scaling.py --nprocs 1 2 4 --steps 10

Each rank count runs as its own `torchrun` job of this file in ``--worker`` mode, one after the other; rank 0
prints one JSON line per job (images/s, ms per step, peak memory). `scripts/gpu_smoke.sh` runs the same worker
on CUDA. The figures are ratios of runs on the same machine; a shared machine moves them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

ENC = "tiny-123450-000000"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="rank counts to compare")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=6, help="timed training steps (after one warm-up step)")
    p.add_argument("--batch_size", type=int, default=32, help="training images per rank and step")
    p.add_argument("--candidates", type=int, default=8, help="subnets evaluated (spread over the ranks)")
    p.add_argument("--holdout", type=int, default=256, help="held-out images per subnet evaluation")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--worker", action="store_true", help="(internal) one rank of a job")
    return p


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(net, device, args, world: int) -> dict:
    """Sandwich steps (max, 2 random, min) with the gradients all-reduced once per step."""
    from modules.engine import all_reduce_gradients, step_rng

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, net.num_classes, (args.batch_size,), device=device)
    net.train()
    t0 = 0.0
    for step in range(args.steps + 1):
        if step == 1:  # the first step warms up
            _sync(device)
            t0 = time.perf_counter()
        rng = step_rng(0, step)
        opt.zero_grad(set_to_none=True)
        for kind in ("max", "random", "random", "min"):
            net.set_max_subnet() if kind == "max" else net.set_min_subnet() if kind == "min" \
                else net.sample_active_subnet(rng)
            torch.nn.functional.cross_entropy(net(x), y).backward()
        all_reduce_gradients(params)
        opt.step()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": world * args.batch_size * args.steps / dt, "ms_per_step": 1000 * dt / args.steps}


def time_search_eval(net, device, args, world: int) -> dict:
    """`--candidates` random subnets, each BN-calibrated and scored on `--holdout` images, spread over ranks."""
    from modules.dist import barrier, map_over_ranks
    from modules.subnet_search import SubnetEvaluator, SubnetSpace

    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(64, 3, args.resolution, args.resolution, generator=g)]
    holdout = [(torch.randn(64, 3, args.resolution, args.resolution, generator=g), torch.zeros(64).long())
               for _ in range(max(1, args.holdout // 64))]
    evaluator = SubnetEvaluator(net, calib, holdout, device)
    space = SubnetSpace(net.choice, net.hw_list)
    rng = random.Random(0)
    cands = [space.random(rng) for _ in range(args.candidates)]
    evaluator(cands[0])  # warm-up (not timed)
    barrier()
    t0 = time.perf_counter()
    map_over_ranks(evaluator, cands)
    dt = time.perf_counter() - t0
    images = args.candidates * (sum(len(y) for _, y in holdout) + 64)
    return {"images_per_s": images / dt, "s_per_candidate": dt * world / args.candidates}


def worker(args) -> None:
    from modules import dist
    from modules.supernet import supernet_from_encoding

    info = dist.init_distributed_mode(args.device)
    torch.manual_seed(0)
    net = supernet_from_encoding(ENC).to(info.device)
    try:
        out = {"ranks": info.world_size, "device": str(info.device.type),
               "train": time_training(net, info.device, args, info.world_size),
               "search_eval": time_search_eval(net, info.device, args, info.world_size)}
        out["peak_mib_rank0"] = round(_peak_mib(info.device), 1)
        if info.rank == 0:
            print("RESULT " + json.dumps(out), flush=True)
    finally:
        dist.destroy_distributed()


def run_job(args, nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", "--device", args.device, "--steps", str(args.steps),
           "--batch_size", str(args.batch_size), "--candidates", str(args.candidates), "--holdout",
           str(args.holdout), "--resolution", str(args.resolution)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"error: the {nproc}-rank job failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main(args) -> None:
    if args.worker:
        return worker(args)
    results = {n: run_job(args, n) for n in args.nprocs}
    base = results[args.nprocs[0]]
    print(f"{'ranks':>5}  {'train img/s':>11}  {'x':>5}  {'ms/step':>8}  {'search-eval img/s':>17}  {'x':>5}  "
          f"{'peak MiB':>8}")
    for n, r in results.items():
        tr, se = r["train"], r["search_eval"]
        print(f"{n:>5}  {tr['images_per_s']:>11.1f}  {tr['images_per_s'] / base['train']['images_per_s']:>5.2f}  "
              f"{tr['ms_per_step']:>8.1f}  {se['images_per_s']:>17.1f}  "
              f"{se['images_per_s'] / base['search_eval']['images_per_s']:>5.2f}  {r['peak_mib_rank0']:>8.1f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
