"""The library's public face: the README's Python example, run as written; the import graph."""

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

import bundlekd_edge
from bundlekd_edge import BkdError

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_python_example_runs_as_written():
    code = readme_example()
    assert 5 <= len(code.strip().splitlines()) <= 16
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3, out.getvalue()
    assert "'items'" in lines[0] and "'intent'" in lines[0]  # a record's bundles, as `generate` writes them


def test_a_student_must_be_loaded_and_sessions_are_checked():
    from bundlekd_edge.student import as_session, resolve_student

    with pytest.raises(BkdError, match="not loaded"):
        resolve_student("base").generate({"items": [{"id": "a"}, {"id": "b"}]})
    with pytest.raises(BkdError, match=r"items\[1\]: item 'a' appears twice"):
        as_session({"items": [{"id": "a"}, {"id": "a"}]})
    assert as_session({"items": [{"id": 1, "title": "x"}]}, "session 3").session_id == "session3"


def import_graph() -> dict[str, set[str]]:
    """Every import in the package (module level and inside functions), importing a.b.c counting as
    importing a.b too (its __init__ runs first)."""
    pkg = Path(bundlekd_edge.__file__).parent
    mods = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.with_suffix("").relative_to(pkg.parent).parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        here = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(x for x in (base, node.module) if x)
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                for k in range(2, t.count(".") + 2):
                    u = ".".join(t.split(".")[:k])
                    if u in mods and u != m and not m.startswith(u + "."):
                        graph[m].add(u)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_and_the_runtime_is_a_leaf():
    graph = import_graph()
    assert cycles(graph) == []
    below = {"bundlekd_edge", "bundlekd_edge.data", "bundlekd_edge.prompts", "bundlekd_edge.files",
             "bundlekd_edge.metrics", "bundlekd_edge.openai_client", "bundlekd_edge.registry_file"}  # fmt: skip
    up = {(m, t) for m, ts in graph.items() if m.startswith("bundlekd_edge.runtime") for t in ts
          if not t.startswith("bundlekd_edge.runtime") and t not in below}  # fmt: skip
    assert up == set()
