"""torch.distributed helpers. Every function works without a process group (single process = rank 0 of 1).

Launch multi-process runs with ``torchrun --nproc_per_node=N script.py ...`` (or the older
``python -m torch.distributed.launch --use_env``): both set RANK / WORLD_SIZE / LOCAL_RANK, which
``init_distributed_mode`` reads. CPU runs use gloo, CUDA runs nccl.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


_rank_local_depth = 0  # > 0 inside `rank_local()`


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def init_distributed_mode(device: str | None = None, backend: str | None = None,
                          timeout: timedelta | None = None) -> DistInfo:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK (torchrun) if WORLD_SIZE > 1.

    ``device``: "cpu", "cuda" or None (= cuda when available). Returns a :class:`DistInfo`; without those
    environment variables (a plain ``python script.py``) it is rank 0 of 1 and no process group is created;
    inside `rank_local()` it is rank 0 of 1 too, on this rank's own device (cuda:LOCAL_RANK).
    ``timeout``: of the group's collectives (torch's default when None).
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine; use --device cpu")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world_size} from the environment are inconsistent")

    dev = local_device("cuda" if use_cuda else "cpu")

    if world_size == 1 or _rank_local_depth:
        return DistInfo(rank=0, world_size=1, local_rank=0, distributed=False, device=dev)

    if not is_dist_avail_and_initialized():
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        backend = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank,
                                **({"timeout": timeout} if timeout is not None else {}))
        barrier()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, distributed=True, device=dev)


def local_device(device: str | torch.device | None) -> torch.device:
    """This process's device for ``device`` ("cpu", "cuda", "cuda:N", None = cuda when available): "cuda" is the
    GPU of LOCAL_RANK (torchrun), made the current one. For work that needs no process group (LUT files)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine; use --device cpu")
    index = dev.index if dev.index is not None else _env_int("LOCAL_RANK", 0) % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def destroy_distributed() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    """A process group exists and this code is not inside `rank_local()`. Every helper here (and the loops
    that reduce over ranks) asks this, so inside `rank_local()` they act as in a single process."""
    return _rank_local_depth == 0 and dist.is_available() and dist.is_initialized()


@contextmanager
def rank_local():
    """Work this rank does on its own share (its subnets, its students): no collectives inside, every helper
    acts as rank 0 of 1, so the rank writes the files of its share itself. Ranks meet again outside."""
    global _rank_local_depth
    _rank_local_depth += 1
    try:
        yield
    finally:
        _rank_local_depth -= 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def save_on_master(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` on rank 0 only (e.g. ``save_on_master(atomic_save, ckpt, path)``)."""
    if is_main_process():
        return fn(*args, **kwargs)
    return None


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor | float | int) -> torch.Tensor | float:
    """Mean over all ranks. A floating-point tensor is averaged IN PLACE and returned (so
    ``all_reduce_mean(bn.running_mean)`` syncs BN statistics); a python number gives a float.
    Identity without a process group."""
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        raise ValueError(f"all_reduce_mean needs a floating-point tensor, got {value.dtype}; "
                         "use all_reduce_sum for counts")
    if not is_dist_avail_and_initialized():
        return value if isinstance(value, torch.Tensor) else float(value)
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            t = value.detach().to(_comm_device(), copy=True)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            value.copy_(t / get_world_size())
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item() / get_world_size())


def all_reduce_sum(value: torch.Tensor | float | int) -> torch.Tensor | float:
    """Sum over all ranks (e.g. correct / total counts): a new tensor (not in place), or a float for a number.
    Identity without a process group."""
    if not is_dist_avail_and_initialized():
        return value if isinstance(value, torch.Tensor) else float(value)
    if isinstance(value, torch.Tensor):
        t = value.detach().to(_comm_device(), copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.to(value.device)
    t = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects). Identity without a group."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects). [obj] without a group."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def map_over_ranks(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` with the items split over the ranks (rank r computes items r, r + N, ...) and
    the results gathered, in order, on every rank. Every rank must call it with the same items; ``fn`` must not
    use collectives (the ranks run different items). Without a process group it is a plain loop."""
    world, rank = get_world_size(), get_rank()
    with rank_local():
        mine = [fn(x) for x in items[rank::world]]
    if world == 1:
        return mine
    gathered = all_gather_object(mine)
    out: list[Any] = [None] * len(items)
    for r, results in enumerate(gathered):
        out[r::world] = results
    return out
