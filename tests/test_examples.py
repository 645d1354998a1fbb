"""The command lines in examples/*.sh and the README use flags that the scripts really have."""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCRIPT = re.compile(r"(?:python(?:3)?\s+(?:-m\s+)?|\$RUN\s+)([\w/.]+)")


def _commands(text: str):
    """(script path, [flags]) of every `python script.py ...` / `$RUN script.py ...` / `python -m pkg.mod`."""
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #")[0]
        m = SCRIPT.search(line)
        if not m or line.lstrip().startswith("#"):
            continue
        target = m.group(1)
        path = target if target.endswith(".py") else target.replace(".", "/") + ".py"
        if not (REPO / path).is_file():
            continue
        rest = line[m.end():]
        try:
            tokens = shlex.split(rest, posix=True)
        except ValueError:  # unbalanced quotes inside $(...): fall back to a plain split
            tokens = rest.split()
        flags = [t.split("=")[0] for t in tokens if t.startswith("--")]
        yield path, flags


def _parser(path: str):
    spec = importlib.util.spec_from_file_location("example_target_" + path.replace("/", "_")[:-3], REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_args_parser()


def _cases():
    for f in sorted((REPO / "examples").glob("*.sh")) + [REPO / "README.md"]:
        for path, flags in _commands(f.read_text()):
            yield pytest.param(path, flags, id=f"{f.name}:{path}")


@pytest.mark.parametrize("path,flags", list(_cases()))
def test_example_flags_exist(path, flags):
    known = set(_parser(path)._option_string_actions)
    unknown = [fl for fl in flags if fl not in known]
    assert not unknown, f"{path}: unknown flag(s) {unknown}"


def test_the_examples_are_found():
    scripts = {p for f in (REPO / "examples").glob("*.sh") for p, _ in _commands(f.read_text())}
    assert {"train_block_kd.py", "train_supernet.py", "search_subnet.py", "onnx_tools/export_int8_lsq.py"} <= scripts
