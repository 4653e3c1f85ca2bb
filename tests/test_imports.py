"""jbat's import graph has no cycle: every arrow points one way (docs/architecture.md).

The graph is read from the source with `ast` (nothing is imported): an edge a -> b for every
`import b` / `from b import x` in module a, at module level or deferred inside a function, and
for `from pkg import name` an edge to `pkg.name` when that is a module. Importing `p.q.r` runs
`p/__init__.py` and `p/q/__init__.py` first, so an edge to a module is also an edge to each
package above it, except the packages that contain the importing module itself (Python has
initialised those before it runs).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jbat"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
  """The absolute module name of a (possibly relative) `from ... import`."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _with_parents(name: str, modules: dict[str, pathlib.Path]) -> set[str]:
  """`name` and the packages above it that are jbat modules."""
  parts = name.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def import_graph() -> dict[str, set[str]]:
  """{module: modules it imports} over jbat's own modules (third-party imports dropped)."""
  modules = _modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    edges: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        for alias in node.names:
          edges |= _with_parents(alias.name, modules)
      elif isinstance(node, ast.ImportFrom):
        target = _resolve(name, node, is_package)
        edges |= _with_parents(target, modules)
        for alias in node.names:
          edges |= _with_parents(f"{target}.{alias.name}", modules)
    # A module's own packages are always initialised before it (Python imports p before p.q),
    # so an edge up to them closes no real cycle.
    graph[name] = edges - _with_parents(name, modules)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of `graph`, or None (iterative DFS, three colours)."""
  colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done.
  for start in sorted(graph):
    if colour[start]:
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    colour[start] = 1
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        colour[node] = 2
        stack.pop()
        path.pop()
      elif colour.get(child) == 1:
        return path[path.index(child):] + [child]
      elif colour.get(child) == 0:
        colour[child] = 1
        stack.append((child, iter(sorted(graph[child]))))
        path.append(child)
  return None


def test_find_cycle_finds_cycles_and_only_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # A diamond.
  cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})
  assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}


def test_graph_sees_deferred_and_package_imports():
  graph = import_graph()
  # Deferred (function-level) imports count: train.py imports experiment inside main().
  assert "jbat.experiment" in graph["jbat.train"]
  # An import of a submodule is also an import of its package's __init__ ...
  assert {"jbat.data", "jbat.data.pipeline"} <= graph["jbat.backbone"]
  # ... except for the module's own package, and `from jbat import x` reaches module x.
  assert "jbat.scoring.kernels" in graph["jbat.scoring.stream"]
  assert "jbat.scoring" not in graph["jbat.scoring.stream"]
  assert "jbat" not in graph["jbat.scoring.stream"]
  assert "jbat.io" in graph["jbat.scoring.stream"]


def test_jbat_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
