"""The house rules that code review would otherwise have to catch: no import cycles (lazy imports
included), no runtime or target names compared outside `targets/`, `compile` short enough to read."""

from __future__ import annotations

import ast
import pathlib

import qcompile

PACKAGE = pathlib.Path(qcompile.__file__).parent


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """qcompile module → the qcompile modules it imports anywhere (top level or inside functions)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    for candidate in (f"{base}.{alias.name}", base):
                        if candidate in modules:
                            graph[name].add(candidate)
                            break
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
    for name in graph:  # importing a.b.c runs a and a.b first: not an edge we count
        graph[name].discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_qcompile_modules():
    graph = _imports()
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    acyclic = {m: {d for d in deps if not (m.startswith(d + ".") and (PACKAGE.parent / d.replace(".", "/") / "__init__.py").is_file())}
               for m, deps in graph.items()}
    assert _cycle(acyclic) is None, " → ".join(_cycle(acyclic))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_runtime_or_target_name_compared_outside_targets():
    names = {"onnxruntime", "tensorrt", "ort-int4", "trt-int4", "edge-int4", "ort-w8a8", "ort-w4a8", "trt-int8", "trt-fp8"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "targets" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    values = [side] if not isinstance(side, (ast.Tuple, ast.List, ast.Set)) else side.elts
                    found += [f"{path.name}:{node.lineno}" for v in values
                              if isinstance(v, ast.Constant) and v.value in names]
    assert not found, found


def test_compile_body_fits_on_a_screen():
    tree = ast.parse((PACKAGE / "pipeline.py").read_text())
    compile_ = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compile")
    body_lines = compile_.end_lineno - compile_.body[0].lineno + 1
    assert body_lines <= 60, body_lines
