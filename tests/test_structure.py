"""The package's structure: no import circles, and single-process runs never import gradkit.distributed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gradkit

PACKAGE = Path(gradkit.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every gradkit module ``path`` imports, at module level or inside functions (a late import is
    still an import), resolving ``from package import submodule`` to the submodule."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):  # annotations only, never run
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_the_import_graph_sees_real_imports() -> None:
    graph = _graph()
    assert "gradkit.loop" in graph["gradkit.training"]
    assert "gradkit.distributed.backend" in graph["gradkit.training"]  # a late import counts
    assert "gradkit.methods._base" in graph["gradkit.methods.backprop"]


def test_no_import_circles() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_single_process_runs_never_import_distributed(tmp_path: Path) -> None:
    script = f"""
import sys
import gradkit
from gradkit.cli import main
code = main(["train", "--method", "fr", "--stages", "2", "--balance", "time", "--model", "mlp",
             "--data", "digits", "--limit-train", "256", "--limit-test", "64", "--epochs", "1",
             "--activations", "int8", "--threads", "1", "--no-progress", "--out", {str(tmp_path / "run")!r}])
assert code == 0, code
gradkit.train(gradkit.TrainConfig(method="ulr", model="mlp", data="digits", limit_train=128, limit_test=64,
                                  epochs=1, threads=1, progress=False, method_options={{"copies": 4}}))
loaded = sorted(m for m in sys.modules if m.startswith("gradkit.distributed"))
assert not loaded, loaded
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
