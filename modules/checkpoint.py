"""Checkpoints: atomic writes, safe loading (``weights_only=True``), auto-resume, strict state-dict loading.

Checkpoint dict convention (every training stage)::

    {"model": state_dict, "optimizer": ..., "lr_scheduler": ..., "epoch": <next epoch to run>,
     "step": <global step>, "args": <dict of plain python types>, "rng": get_rng_state()}

Everything in it must load under ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples, str, int,
float, bool, None. ``build_checkpoint`` assembles such a dict; ``to_plain`` turns args / paths into plain types.
"""
from __future__ import annotations

import argparse
import errno
import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)

# How many key names an error message lists before "...".
_SHOW_KEYS = 5


# --------------------------------------------------------------------------- atomic writes
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file or directory that cannot be written (disk full, no permission, read-only filesystem, a file
    where a directory should be): one message naming the path. `modules.cli.run_main` prints it as one line."""

    def __str__(self) -> str:  # the message alone, not "[Errno 28] ...: '<path>'"
        return self.strerror


_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
          errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
          errno.EPERM: "permission denied", errno.ENOTDIR: "a file is in the way of the directory"}


def write_error(path: str | os.PathLike, e: OSError, what: str = "cannot write") -> WriteError:
    """One clear error for a failed write of `path`: what failed, the path, the cause in words."""
    cause = _HINTS.get(e.errno) or e.strerror or str(e) or type(e).__name__
    err = WriteError(e.errno, f"{what} {path}: {cause}")
    err.filename = os.fspath(path)
    return err


class _WriteRecorder:
    """The temp file, remembering the OSError a write raised: torch.save turns it into a RuntimeError about
    stream positions, which names neither the path nor the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file named like a directory of the path
        raise write_error(path.parent, OSError(errno.ENOTDIR, str(e)), "cannot create directory") from None
    except OSError as e:
        raise write_error(path.parent, e, "cannot create directory") from None


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Write via ``write(fileobj)`` into a temp file next to ``path``, fsync, then ``os.replace``. When anything
    fails (disk full part-way, no permission) the temp file is removed, the previous ``path`` is left as it was
    and the error is a :class:`WriteError` naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory")
    _make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    rec = None
    try:
        with os.fdopen(fd, "wb") as f:
            rec = _WriteRecorder(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = (rec.error if rec is not None else None) or (e if isinstance(e, OSError) else None)
        if cause is not None and not isinstance(e, KeyboardInterrupt):
            raise write_error(path, cause) from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a reader never sees a half-written file."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode(encoding)))


# --------------------------------------------------------------------------- loading
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for a missing or corrupted file (the original
    SpaceEvo's checkpoints included)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    from modules.original import PICKLED_CLASSES

    try:
        # argparse.Namespace is allowed so that checkpoints whose "args" is a Namespace still load; the original
        # SpaceEvo's checkpoints pickle a config object of their own, read back as a plain mapping.
        with torch.serialization.safe_globals([argparse.Namespace, *PICKLED_CLASSES]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses "
                             f"({found.group(1)}); re-save it with tensors and plain python types only") from e
        raise ValueError(f"checkpoint {path} is corrupted or truncated ({_short(e)}); "
                         "delete it or restore a backup") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"checkpoint {path} is corrupted or truncated ({_why(path, e)}); "
                         "delete it or restore a backup") from e


def _why(path: Path, e: BaseException) -> str:
    """The cause of a failed load; a file that is not even a zip archive says so (torch's own error for it,
    e.g. "pop from empty list", says nothing)."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # a (maybe damaged) zip archive starts so, as torch.save writes
                return f"not a torch zip archive: {_short(e)}"
    except OSError:
        pass
    return _short(e)


def _short(e: BaseException) -> str:
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
    first = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    # torch's zip reader appends a paragraph of advice ("This is an internal miniz error. If you are seeing ...")
    first = re.split(r"(?<=\.)\s+(?:This is an internal|If you are seeing)", first)[0]
    return f"{type(e).__name__}: {first}".rstrip(": ")


def find_resume(out_dir: str | os.PathLike, name: str = "checkpoint.pth") -> Path | None:
    """``out_dir/name`` if it exists (the file to resume from), else None. Temp files of a killed save are ignored."""
    p = Path(out_dir) / name
    return p if p.is_file() else None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove a leading ``module.`` (DDP) from every key that has one."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f", ... ({len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else "")


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, Any], where: str) -> None:
    """Load ``state_dict`` into ``model`` (DDP-unwrapped; ``module.`` prefixes stripped) or raise one ValueError
    naming ``where`` and listing missing keys, unexpected keys and shape mismatches."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{where}: expected a state dict (mapping of names to tensors), got {type(state_dict).__name__}")
    model = unwrap_model(model)
    sd = strip_module_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items()
                  if k in sd and isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if problems:
        raise ValueError(f"{where}: state dict does not match the model ({type(model).__name__}): "
                         + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- plain types / RNG
def to_plain(obj: Any) -> Any:
    """Recursively convert Namespaces, paths, tuples, numpy scalars into dicts/lists/str/int/float/bool/None."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    return str(obj)


def get_rng_state() -> dict[str, Any]:
    """Python / numpy / torch (and CUDA) global RNG states, loadable under ``weights_only=True``."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), [int(x) for x in internal], gauss_next],
        "numpy": {"kind": str(kind), "keys": [int(x) for x in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned (missing parts are left alone)."""
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])


def build_checkpoint(model: torch.nn.Module, optimizer: Any = None, lr_scheduler: Any = None, *, epoch: int = 0,
                     step: int = 0, args: Any = None, **extra: Any) -> dict[str, Any]:
    """The conventional checkpoint dict (``epoch`` = next epoch to run); ``extra`` entries are added as they are."""
    ckpt = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "args": to_plain(args) if args is not None else {},
        "rng": get_rng_state(),
    }
    ckpt.update(extra)
    return ckpt
