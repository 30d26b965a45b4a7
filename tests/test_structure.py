"""The house keeps its shape: imports only go down the stack, functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unpacked"
# each layer, and what it may import (besides itself and the standard library)
LAYERS = {
    "input": set(),
    "registry": {"input"},
    "repo": {"input", "registry"},
    "image": {"input", "registry", "repo"},
    "build": {"input", "registry", "repo", "image"},
    "service": {"input", "registry", "repo", "image", "build"},
    "cli": {"input", "registry", "repo", "image", "build", "service"},
}
INPUT = {"errors", "log", "recipe", "reference", "settings", "__init__"}


def layer_of(module: str) -> str:
    top = module.split(".")[0]
    return "input" if top in INPUT else "cli" if top == "__main__" else top


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        yield ".".join(rel.parts), path


def imported(module: str, path: Path):
    package = module.rsplit(".", 1)[0] if "." in module else ""
    if path.name == "__init__.py":
        package = module.rsplit(".__init__", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:
                for alias in node.names:
                    yield ".".join(base + [alias.name])
            else:
                yield target
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("unpacked."):
            yield node.module[len("unpacked."):]


def test_imports_go_down_the_stack():
    wrong = []
    for module, path in modules():
        own = layer_of(module)
        for target in imported(module, path):
            other = layer_of(target)
            if other != own and other not in LAYERS[own]:
                wrong.append(f"{module} ({own}) imports {target} ({other})")
    assert wrong == []


def test_no_function_over_60_lines():
    long = []
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert long == []


def test_every_test_folder_is_collected(pytestconfig):
    """pytest skips folders that match ``norecursedirs`` (by default ``build``) silently."""
    import fnmatch
    patterns = pytestconfig.getini("norecursedirs")
    tests = Path(__file__).resolve().parent
    folders = [d.name for d in tests.iterdir() if d.is_dir() and any(d.glob("test_*.py"))]
    assert "build" in folders
    assert [f for f in folders if any(fnmatch.fnmatch(f, p) for p in patterns)] == []
