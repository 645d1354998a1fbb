"""Command-line plumbing shared by every stage script.

Usage in a script::

    def get_args_parser():
        parser = argparse.ArgumentParser("block KD", description=__doc__)
        add_common_args(parser)              # --output_dir --seed --debug --device
        parser.add_argument("--lr", type=float, default=0.1)
        return parser

    if __name__ == "__main__":
        run_main(main, get_args_parser())    # -c config.yaml, clean one-line errors, exit codes

``-c/--config FILE.yaml`` sets the parser's defaults (keys = argument dests, e.g. ``output_dir``), flags on
the command line override them. ``save_run_info`` writes ``<out_dir>/args.yaml``, which can be given back
with ``-c`` to repeat a run.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from modules import dist
from modules.checkpoint import atomic_write_text, to_plain

REPO_ROOT = Path(__file__).resolve().parents[1]
# Keys args.yaml carries besides the arguments; ignored when such a file is used as a config.
RUN_INFO_KEYS = ("git_sha", "command")
_SKIP_KEYS = ("config", "help")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("spaceevo")


# --------------------------------------------------------------------------- arguments
def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--output_dir`` (./checkpoints), ``--seed`` (0), ``--debug``, ``--device`` (cpu|cuda); existing ones kept."""
    if not _has_option(parser, "--output_dir"):
        parser.add_argument("--output_dir", default="./checkpoints", help="where outputs go (default: %(default)s)")
    if not _has_option(parser, "--seed"):
        parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    if not _has_option(parser, "--debug"):
        parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    if not _has_option(parser, "--device"):
        parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    return parser


def add_aliases(parser: argparse.ArgumentParser, name: str, *aliases: str) -> argparse.Action:
    """Declare other names of one option in one line: ``add_aliases(p, "--data_dir", "--data_path")``.

    The option is the existing one that has any of the names; afterwards ``name`` is its first option string
    (the one ``--help`` shows first), the others follow. The action is shared, so an alias means exactly what
    the option means (type, nargs, required, default)."""
    names = [name, *aliases]
    found = {id(parser._option_string_actions[n]): parser._option_string_actions[n] for n in names
             if n in parser._option_string_actions}
    if len(found) != 1:
        raise ValueError(f"add_aliases {names}: expected exactly one existing option among them, found {len(found)}")
    action = next(iter(found.values()))
    action.option_strings[:] = names + [o for o in action.option_strings if o not in names]
    for n in names:
        parser._option_string_actions[n] = action
    return action


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    if not _has_option(parser, "--config"):
        flags = ["--config"] if _has_option(parser, "-c") else ["-c", "--config"]
        # --config-file: the original SpaceEvo's name of the same option
        parser.add_argument(*flags, "--config-file", dest="config", default=None, metavar="FILE.yaml",
                            help="YAML file whose keys set this script's defaults; flags override it")


def _add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """torch.distributed.launch appends ``--local-rank=N`` (older torch: ``--local_rank=N``) to every
    process's arguments; torchrun does not. Both set LOCAL_RANK, which is what `modules.dist` reads."""
    if not _has_option(parser, "--local_rank") and not _has_option(parser, "--local-rank"):
        parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                            help="set by torch.distributed.launch (the rank used is LOCAL_RANK of the environment)")


def _config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key -> action: every argument dest, and every long option name (so an alias is a valid key)."""
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if a.dest in _SKIP_KEYS or a.dest is argparse.SUPPRESS or isinstance(a, argparse._VersionAction):
            continue
        actions.setdefault(a.dest, a)
    for a in parser._actions:
        if a.dest in _SKIP_KEYS or a.dest is argparse.SUPPRESS or a.default is argparse.SUPPRESS:
            continue
        for o in a.option_strings:
            if o.startswith("--"):
                actions.setdefault(o[2:].replace("-", "_"), a)
    return actions


def _config_path(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str | None:
    flags = parser._option_string_actions["--config"].option_strings
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(*flags, dest="config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def _load_yaml_mapping(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config {p}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config {p}: expected a mapping of argument names to values, got {type(data).__name__}")
    return data


class _ConfigValueError(ValueError):
    """A config value that does not fit its argument (message complete; not to be wrapped again)."""


def _type_name(action: argparse.Action) -> str:
    t = action.type
    if t is None:
        return "str"
    return getattr(t, "__name__", repr(t))


def _convert_scalar(value: Any, action: argparse.Action, fail: Callable[[str], None]) -> Any:
    t = action.type
    if isinstance(value, (list, tuple, dict)):
        fail(f"a single {_type_name(action)}")
    if value is None:
        return None
    try:
        if t is None or t is str:
            if isinstance(value, bool):
                fail("a string")
            out = str(value)
        elif t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                fail("an int")
            out = int(value)
        elif t is float:
            if isinstance(value, bool):
                fail("a float")
            out = float(value)
        else:
            if isinstance(value, bool):
                fail(f"a {_type_name(action)}")
            out = t(value if isinstance(value, str) else str(value))
    except _ConfigValueError:
        raise
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        fail(f"a valid {_type_name(action)} ({e})" if str(e) else f"a valid {_type_name(action)}")
    if action.choices is not None and out not in action.choices:
        fail(f"one of {list(action.choices)}")
    return out


def _convert(key: str, value: Any, action: argparse.Action, source: str) -> Any:
    def fail(expected: str) -> None:
        raise _ConfigValueError(f"config {source}: key {key!r} has value {value!r}, expected {expected}")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            fail("a boolean (true/false)")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail("a non-negative int")
        return value
    if isinstance(action, (argparse._StoreConstAction, argparse._AppendConstAction)):
        allowed = [action.const, action.default]
        if value not in allowed:
            fail(f"one of {allowed}")
        return value
    nargs = action.nargs
    if isinstance(action, argparse._AppendAction) or nargs in ("*", "+", argparse.REMAINDER) or \
            isinstance(nargs, int):
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(nargs, int) and not isinstance(action, argparse._AppendAction) and len(items) != nargs:
            fail(f"a list of {nargs} {_type_name(action)}")
        if nargs == "+" and not items:
            fail(f"a non-empty list of {_type_name(action)}")
        return [_convert_scalar(v, action, fail) for v in items]
    return _convert_scalar(value, action, fail)


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); ``-c/--config FILE.yaml`` keys become defaults, flags win.

    Unknown keys and values of the wrong type raise one ValueError naming the file, key, value and what was
    expected. Keys of :data:`RUN_INFO_KEYS` and ``config`` are ignored, so an ``args.yaml`` can be reused.
    """
    _add_config_arg(parser)
    _add_launcher_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    config = _config_path(parser, argv)
    if config is not None:
        data = _load_yaml_mapping(config)
        actions = _config_actions(parser)
        translate = getattr(parser, "translate_config", None)
        if translate is not None:  # e.g. the original SpaceEvo's train.yaml keys -> ours
            data = translate(data, config, set(actions))
        defaults: dict[str, Any] = {}
        unknown: list[str] = []
        for raw_key, value in data.items():
            key = str(raw_key).lstrip("-").replace("-", "_")
            if key in actions:
                defaults[actions[key].dest] = _convert(str(raw_key), value, actions[key], config)
            elif key in _SKIP_KEYS or key in RUN_INFO_KEYS:
                continue
            else:
                unknown.append(str(raw_key))
        if unknown:
            allowed = sorted({a.dest for a in actions.values()})
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(k.lstrip("-").replace("-", "_"), allowed, n=1, cutoff=0.6)
                parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"config {config}: unknown key(s) {', '.join(parts)}; allowed keys: {', '.join(allowed)}")
        for a in parser._actions:
            if a.dest in defaults and a.required:
                a.required = False  # given by the config file
        for a in parser._actions:  # only the option itself: an original-name alias keeps no default of its own
            if a.dest in defaults and a.default is not argparse.SUPPRESS:
                a.default = defaults[a.dest]
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- run info / logging
def git_sha() -> str:
    """``git rev-parse HEAD`` of this checkout, or "unknown"."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


def save_run_info(args: argparse.Namespace, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/args.yaml`` (atomic; main process only): git SHA, command line and the final args."""
    path = Path(out_dir) / "args.yaml"
    if not dist.is_main_process():
        return path
    sha = git_sha()
    info = {"git_sha": sha, "command": shlex.join([sys.executable, *sys.argv])}
    info.update(to_plain(vars(args)))
    atomic_write_text(path, yaml.safe_dump(info, sort_keys=False, default_flow_style=None))
    log.info("git SHA %s; arguments written to %s", sha, path)
    return path


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = dist.get_rank()
        return True


def setup_logging(out_dir: str | os.PathLike | None, name: str, level: int = logging.INFO) -> logging.Logger:
    """Root logging to stdout (+ ``out_dir/<name>.log`` on the main process). Other ranks log warnings only.
    Calling it again replaces the handlers it installed before. Returns ``logging.getLogger(name)``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_spaceevo", False):
            root.removeHandler(h)
            h.close()
    main = dist.is_main_process()
    fmt = logging.Formatter(_LOG_FORMAT if main else "[rank %(rank)s] " + _LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / f"{name}.log", encoding="utf-8"))
    for h in handlers:
        h._spaceevo = True  # type: ignore[attr-defined]
        h.setFormatter(fmt)
        h.addFilter(_RankFilter())
        root.addHandler(h)
    root.setLevel(level if main else max(level, logging.WARNING))
    return logging.getLogger(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (explicit generators are still preferred for sampling)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- entry point
def _one_line(e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, FileNotFoundError) and e.filename and not msg.strip():
        msg = f"no such file: {e.filename}"
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: keep the original message
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1].strip()
        prefix = f"{type(e).__name__}: "
        msg = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(msg.split()) or type(e).__name__


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while :func:`run_main` runs a script (unless the script handles
    SIGTERM itself, as the training loops do): like Ctrl-C, ``finally`` / ``with`` blocks run on the way out
    (temp files removed, worker pools terminated, the evolution searches' state saved); exit code 143."""


def _raise_terminated(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated()


def _one_line_usage_errors(parser: argparse.ArgumentParser) -> None:
    """Make ``parser.error`` (bad flag, invalid choice, missing required argument) print ONE line
    ``error: <prog>: <message> (see <prog> --help)`` and exit 2, instead of argparse's usage block."""
    def error(message: str):
        parser.exit(2, f"error: {parser.prog}: {' '.join(message.split())} (see {parser.prog} --help)\n")

    parser.error = error  # type: ignore[method-assign]


def run_main(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> Any:
    """Parse arguments (with ``-c`` config) and run ``main(args)``.

    ValueError / FileNotFoundError → ``error: <message>`` on stderr, exit code 2; any other OSError (disk full,
    an output path that cannot be created or written: `modules.checkpoint.WriteError` names it) → one
    ``error:`` line, exit code 1; KeyboardInterrupt → exit 130.
    Command-line errors (unknown flag, invalid choice, ...) are one ``error:`` line with exit code 2 as well.
    SIGTERM raises :class:`Terminated` in the main thread (cleanup runs) → ``error: terminated (SIGTERM)``,
    exit code 143. Tracebacks only with ``--debug``. An int returned by ``main`` becomes the exit code.
    """
    if not _has_option(parser, "--debug"):
        parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    _one_line_usage_errors(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or "--traceback" in argv
    installed, old_term = threading.current_thread() is threading.main_thread(), None
    if installed:
        old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        args = parse_args_with_config(parser, argv)
        debug = bool(getattr(args, "debug", debug))
        result = main(args)
    except Terminated:
        if debug:
            traceback.print_exc()
        print("error: terminated (SIGTERM)", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # the machine, not the input: a full disk, an output path that cannot be written
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old_term is None else old_term)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)
    return result


# ---------------------------------------------------------------- argparse types shared by the stage scripts
def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def positive_float(text: str) -> float:
    v = float(text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return v
