"""House rules that keep vidgen easy to change (issue 16), checked on the source, without running it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vidgen"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The vidgen modules `name` imports anywhere in its file (function-level imports too).
    `from pkg import sub` counts as importing pkg.sub when that is a module, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([node.module] if node.module else []))
            subs = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found |= subs or {base}
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_vidgen():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check finds one


def test_no_test_hooks_in_the_product():
    hooks = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if "VIDGEN_TEST_" in line]
    assert hooks == []


FAMILY_MODULES = sorted(p.stem for p in (PACKAGE / "models").glob("*.py") if p.stem not in ("__init__", "contract"))


def _family_mentions(source: str, families: set[str], package: str = "vidgen") -> list[str]:
    """Code (not docstrings or comments) in `source` (a module of `package`) that names a model
    family: a string equal to a family's name, or an import of a family's module."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in families:
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            else:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]) if node.level else node.module
                base = base.rstrip(".")
                named = [f"{base}.{a.name}" for a in node.names] if base == "vidgen.models" else [base]
            found += [f"line {node.lineno}: import {m}" for m in named
                      if m.startswith("vidgen.models.") and m.split(".")[2] in FAMILY_MODULES]
    return found


def test_no_family_named_in_the_trainer_or_the_render_engine():
    """The trainer and the render engine ask a family through its contract; a family's name or
    module in their code means a sixth family would have to edit them. ("restore" is also a render
    mode, so only the names that are not modes count as strings.)"""
    from vidgen.render.spec import MODES

    families = {"gan", "vae", "convlstm", "style", "restore"} - set(MODES)
    mentions = {f"{p.relative_to(PACKAGE.parent)} {m}" for folder in ("train", "render")
                for p in (PACKAGE / folder).rglob("*.py")
                for m in _family_mentions(p.read_text(), families, f"vidgen.{folder}")}
    assert mentions == set()
    probe = ('"""gan in a docstring is fine"""\nfrom vidgen.models.convlstm import life_grid\nif f == "vae": pass\n'
             'import vidgen.models.gan\nfrom ..models import style\nfrom ..models.contract import Family\n')
    assert sorted(_family_mentions(probe, families, "vidgen.train")) == [
        "line 2: import vidgen.models.convlstm", "line 3: 'vae'", "line 4: import vidgen.models.gan",
        "line 5: import vidgen.models.style"]
