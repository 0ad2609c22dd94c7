"""Dependencies point one way: the core imports no pass, backend or kernel generator.

Passes (`flashc.passes`), backends (`flashc.backends`) and kernels (`flashc.codegen`) build
on the core; an import the other way, even one deferred inside a function, ties the core
to its plug-ins. Each core module is parsed, not imported, so every import is seen.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ["ir", "ops", "pass_manager", "rewrite", "profiles", "errors", "aliasing", "capture", "checking", "lowering",
        "options", "serialize", "artifact", "cost_model", "quantized_ops", "sparse_ops",
        "semi_structured_ops"]
PLUG_INS = ("flashc.passes", "flashc.backends", "flashc.codegen")


def plug_in_imports(source: str, package: str = "flashc") -> list[tuple[int, str]]:
    """(line, imported module) for every import of a plug-in package in source, at any depth:
    import statements, `from` imports (relative ones resolved against `package`), and
    importlib.import_module / __import__ with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from flashc import passes`
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        hits = [n for n in names if any(n == p or n.startswith(p + ".") for p in PLUG_INS)]
        if hits:
            found.append((node.lineno, hits[0]))
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_plug_in(module):
    path = ROOT / "flashc" / f"{module}.py"
    found = plug_in_imports(path.read_text())
    assert not found, "\n".join(
        f"flashc/{module}.py:{line} imports {name}: the core must not depend on passes, backends or codegen; "
        "hand what it needs in from the plug-in (as fusion rules hand their pattern cleanup to RewriteRule)"
        for line, name in found)


def test_the_check_sees_every_kind_of_import():
    source = '''
import torch.fx.passes.fake_tensor_prop
from flashc.ir import Program
def late():
    from flashc.passes.cleanup import Canonicalize
def relative():
    from .backends import eager
def package():
    from flashc import codegen
def dynamic():
    import importlib
    importlib.import_module("flashc.passes.fusion")
'''
    found = plug_in_imports(source)
    assert [name for _, name in found] == ["flashc.passes.cleanup", "flashc.backends", "flashc.codegen",
                                           "flashc.passes.fusion"]
    assert [line for line, _ in found] == [5, 7, 9, 12]
