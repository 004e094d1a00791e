"""Imports point one way (DESIGN.md): read statically, so nothing is imported.

data never imports model, training or evaluation; model never imports data or
training; training never imports the vocabulary; evaluation may import data
and model; the entry points sit on top. Every import counts, those inside
functions too, and no pause_flax modules import each other in a circle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pause_flax"

ENTRY_POINTS = frozenset({"train", "eval", "grid", "control", "cells", "arms", "lm_eval",
                          "convert",
                          "memory_check",
                          "hf_checkpoint"})
VOCABULARY = frozenset({"vocab", "hf_vocab"})

# layer -> the layers it must not import.
FORBIDDEN = {
    "data": {"model", "training", "evaluation", "entry points"},
    "model": {"data", "training", "evaluation", "vocabulary", "entry points"},
    "training": {"vocabulary", "evaluation", "entry points"},
    "evaluation": {"entry points"},
    "vocabulary": {"data", "model", "training", "evaluation", "entry points"},
    "base": {"data", "model", "training", "evaluation", "vocabulary", "entry points"},
}


def _modules() -> dict[str, pathlib.Path]:
  """{dotted module name: file} of every pause_flax module (packages as their __init__)."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def layer(module: str) -> str:
  parts = module.split(".")
  if len(parts) == 1:
    return "base"  # the package's own __init__
  if parts[1] in ("data", "model", "training", "evaluation"):
    return parts[1]
  if parts[1] in ENTRY_POINTS:
    return "entry points"
  if parts[1] in VOCABULARY:
    return "vocabulary"
  return "base"  # parallel, gin_utils


def imports(module: str) -> dict[str, int]:
  """{imported pause_flax module: line} for every import statement in `module`."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = {}
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from pkg import name` imports the module pkg.name when there is one.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in MODULES:  # `import pkg.mod.attr` -> pkg.mod
        target = target.rpartition(".")[0]
      if target and target != module:
        out.setdefault(target, node.lineno)
  return out


def test_the_reader_sees_the_package():
  assert {"pause_flax.data.tasks", "pause_flax.model.transformer",
          "pause_flax.training.loop", "pause_flax.evaluation.evaluator",
          "pause_flax.train", "pause_flax.vocab"} <= set(MODULES)
  assert "pause_flax.data.registry" in imports("pause_flax.data.tasks")
  # Imports inside functions count: the loop imports the data pipeline lazily.
  assert "pause_flax.data.pipeline" in imports("pause_flax.training.loop")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
  forbidden = FORBIDDEN.get(layer(module), set())
  wrong = [f"{module} imports {target} (line {line}): {layer(module)} never imports "
           f"{layer(target)}"
           for target, line in sorted(imports(module).items())
           if layer(target) in forbidden]
  assert not wrong, "\n".join(wrong)


def test_no_import_circles():
  graph = {m: set(imports(m)) for m in MODULES}
  # A package's __init__ runs before its modules; it may hand their names on.
  for m in graph:
    graph[m] -= {t for t in graph[m] if m.startswith(t + ".")}
  state: dict[str, str] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        circle = stack[stack.index(t):] + [t]
        pytest.fail("Import circle: " + " -> ".join(circle))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
