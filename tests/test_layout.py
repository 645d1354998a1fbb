"""Dependencies point down: modules/ never imports a script, bench/, onnx_tools/ or tflite_tools/, and no code
outside a module imports that module's private (_underscore) names."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UPWARD = ("bench", "onnx_tools", "tflite_tools")
SCRIPTS = {p.stem for p in REPO.glob("*.py")}


def _imports(path: Path):
    """(imported module, names) of every import statement in `path`, at any depth (lazy imports included)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _code_files():
    for folder in ("modules", "bench", "onnx_tools", "tflite_tools"):
        yield from sorted((REPO / folder).rglob("*.py"))
    yield from sorted(REPO.glob("*.py"))


def test_modules_never_import_upward():
    bad = [f"{p.relative_to(REPO)} imports {mod}" for p in sorted((REPO / "modules").rglob("*.py"))
           for mod, _ in _imports(p) if mod.split(".")[0] in UPWARD or mod.split(".")[0] in SCRIPTS]
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = []
    for p in _code_files():
        own = ".".join(p.relative_to(REPO).with_suffix("").parts)
        for mod, names in _imports(p):
            if mod.split(".")[0] in ("modules", *UPWARD) and mod != own:
                bad += [f"{p.relative_to(REPO)}: from {mod} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_checks_see_an_upward_import(tmp_path):
    """The checks parse lazy imports inside functions too (the form upward imports used to take)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from onnx_tools.inspect_int8 import _node_groups\n")
    assert list(_imports(f)) == [("onnx_tools.inspect_int8", ["_node_groups"])]
