"""Logical axis names and the context that maps them to a mesh.

Models annotate parameters (`param_axes`) and activations (`constrain`) with LOGICAL axis names
only. Which mesh axis (data / fsdp / tensor) a logical axis lands on is decided by a rules table
(see `zipr1_jax.sharding.rules`) activated with `use_mesh(mesh, rules)`. Outside that context
`constrain` is a no-op, so single-device code and tests need no mesh.

Logical axes:
  batch, length (sequence), kv_length (cache / key sequence), embed, mlp, heads, kv_heads,
  head_dim, vocab, layers, vision_patches, vision_embed, vision_mlp, vision_heads, patch_features.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("zipr1_mesh_rules", default=None)


def param_axes(init: Any, axes: LogicalAxes) -> Any:
    """Wrap an initializer so the created nnx.Param carries logical axis names."""
    return nnx.with_partitioning(init, axes)


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Map logical names to a PartitionSpec; each mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*out)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
    """Activate a mesh + logical rules for `constrain` (and parameter sharding lookups)."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, tuple] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """with_sharding_constraint by logical names; identity when no mesh is active."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical axes {axes} for an array of rank {x.ndim}")
    spec = logical_to_spec(axes, rules)
    # Drop mesh axes that do not divide the dimension (e.g. a batch of 1 on data=2).
    fixed = []
    for dim, entry in zip(x.shape, spec):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        size = 1
        for n in names:
            size *= mesh.shape[n]
        fixed.append(entry if size and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fixed)))
