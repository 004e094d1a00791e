"""Meshes, logical axis rules and shardings: the one place that owns them.

Every parameter and major activation of the model is annotated with logical
axis names (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`,
`layers`). A table of rules maps each logical name onto zero or more axes of
the device mesh (`data`, `fsdp`, `tensor`). The rules are plain tuples so that
gin can bind them (`pause_flax.parallel.make_mesh` and
`pause_flax.parallel.DEFAULT_RULES` are the gin edges).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis | tuple of mesh axes | None)
LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("cache_length", None),
)


def resolve_mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1,
                       num_devices: int | None = None) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one of them may be -1, meaning the rest."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(
          f"mesh axis {name}={size!r} is invalid: use a positive integer, or -1 "
          "for 'the remaining devices'.")
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(
        f"Only one mesh axis may be -1, got {', '.join(free)} = -1; set all but one "
        "explicitly.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if n % fixed:
      raise ValueError(
          f"Mesh {sizes} does not fit {n} devices: the fixed axes multiply to {fixed}, "
          f"which does not divide {n}. Choose sizes whose product divides {n}.")
    sizes[free[0]] = n // fixed
  elif fixed != n:
    raise ValueError(
        f"Mesh data={data} x fsdp={fsdp} x tensor={tensor} = {fixed} devices, but "
        f"{n} devices are available. Make the product {n}, or set one axis to -1.")
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over axes (data, fsdp, tensor) of all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(data, fsdp, tensor, num_devices=len(devices))
  if len(devices) == jax.device_count() and devices == list(jax.devices()):
    # Topology-aware device order on TPU/GPU; plain order on CPU.
    return jax.make_mesh(shape, MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _rules_dict(rules: LogicalRules) -> dict[str, Any]:
  out = {}
  for logical, mesh_axes in rules:
    out.setdefault(logical, mesh_axes)  # first rule wins, as in flax
  return out


def logical_to_spec(names: Sequence[str | None] | None,
                    rules: LogicalRules = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical axis names under the rules.

  A mesh axis is used at most once per spec; a mesh axis of size 1 (or absent
  from `mesh`) is dropped so the spec stays valid on any mesh.
  """
  if names is None:
    return P()
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    kept = []
    for axis in axes:
      if axis in used:
        continue
      if mesh is not None and (axis not in mesh.shape or mesh.shape[axis] == 1):
        continue
      kept.append(axis)
      used.add(axis)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def logical_sharding(mesh: Mesh, names: Sequence[str | None] | None,
                     rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh))


def _variable_names(variable) -> tuple[str | None, ...] | None:
  for key in ("out_sharding", "sharding_names", "sharding"):  # flax >= 0.12: out_sharding
    names = getattr(variable, "get_metadata", lambda: {})().get(key) \
        if hasattr(variable, "get_metadata") else None
    if names is not None:
      return tuple(names)
  return None


def variable_logical_names(variable) -> tuple[str | None, ...] | None:
  """The logical axis names of an nnx.Variable, or None if it has none."""
  names = _variable_names(variable)
  value = variable.get_value() if hasattr(variable, "get_value") else variable.value
  if names is None or len(names) != getattr(value, "ndim", 0):
    return None
  return names


def state_shardings(state, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
  """NamedShardings for an nnx.State (abstract or concrete) from its metadata.

  Variables without logical names are replicated.
  """
  from flax import nnx  # local: keeps this module importable without flax

  def one(x):
    if isinstance(x, nnx.Variable):
      return x.replace(logical_sharding(mesh, variable_logical_names(x), rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------
# Activation constraints. The model calls `constrain(x, names)`; it is a no-op
# unless a mesh and rules are active (set by `activation_sharding`).


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: LogicalRules = DEFAULT_RULES


_ctx = _Context()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: LogicalRules = DEFAULT_RULES):
  """Within this context, `constrain` pins activations to the mesh."""
  old = (_ctx.mesh, _ctx.rules)
  _ctx.mesh, _ctx.rules = mesh, rules
  try:
    yield
  finally:
    _ctx.mesh, _ctx.rules = old


def active_mesh() -> tuple[Mesh | None, LogicalRules]:
  """The mesh and rules `activation_sharding` set (None: no mesh)."""
  return _ctx.mesh, _ctx.rules


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; identity without a mesh."""
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for a rank-{x.ndim} array")
  return constrain_with(_ctx.mesh, _ctx.rules, x, names)


def constrain_with(mesh: Mesh | None, rules: LogicalRules, x: jax.Array,
                   names: Sequence[str | None]) -> jax.Array:
  """`constrain` with an explicit mesh and rules instead of the context."""
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, names, rules))


def data_parallel_size(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
  """How many ways the batch dimension is split on this mesh."""
  spec = logical_to_spec(("batch",), rules, mesh)[0]
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, length] feature array."""
  return logical_sharding(mesh, ("batch", "length"), rules)
