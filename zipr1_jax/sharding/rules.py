"""Rules tables (logical axis -> mesh axes) and the shardings they give to parameters, optimizer
state and batches.

Models only name logical axes (zipr1_jax.sharding.logical); this module is where mesh axis names
meet them. A sharding is computed per leaf from the `out_sharding` metadata that
`nnx.with_partitioning` stores on each nnx.Param, so the same code shards a concrete nnx.State, an
abstract one from `jax.eval_shape`, or an optax state whose moments are nnx.State of Params.

A mesh axis (or the tail of an axis tuple) that does not divide a dimension is dropped for that
leaf: the tiny test model's vocab of 263 stays whole on tensor=2 instead of failing to place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from zipr1_jax.sharding.logical import Rules, logical_to_spec

# Training: FSDP over "embed" (parameters and moments split on the fsdp axis), Megatron tensor
# parallelism over heads / mlp / vocab, batch over data x fsdp. Sequence and head_dim stay whole.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    # The packed patch sequence of all images in a batch: varlen attention runs over it, keep whole.
    ("vision_patches", None),
    ("patch_features", None),
)

def batch_axes_of(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the rules table gives the logical "batch" axis (rows of every batch)."""
    entry = dict(rules).get("batch")
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
    """Logical axis names stored on an nnx.Variable (flax >= 0.12: `out_sharding`), or None."""
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):  # older flax spellings
        axes = meta.get(key)
        if axes:
            return tuple(axes)
    return None


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide their dimension (keeping the longest dividing prefix)."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = _mesh_axes(entry)
        kept: list[str] = []
        size = 1
        for n in names:
            if shape[i] % (size * mesh.shape[n]):
                break
            size *= mesh.shape[n]
            kept.append(n)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding pytree (same structure as `tree`) from the logical axes on its nnx.Variables.

    Args:
      tree: an nnx.State (concrete or from `jax.eval_shape`), or any pytree containing
        nnx.Variables; leaves without logical metadata (plain arrays, optax counts) are replicated.
      mesh: the device mesh (axes from MESH_AXES).
      rules: logical -> mesh axis table.
    Returns:
      The same pytree with every array replaced by its NamedSharding (Variables keep their
      metadata and hold the sharding as value), usable as jit in/out_shardings, for
      `jax.device_put`, and to build restore targets with `abstract_with_shardings`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        if _is_variable(x):
            value = x.get_value()
            axes = logical_axes_of(x)
            if axes is None or not hasattr(value, "shape"):
                return x.replace(replicated)
            if len(axes) != len(value.shape):
                raise ValueError(f"state_shardings: {_path_str(path)} has logical axes {axes} but shape "
                                 f"{tuple(value.shape)}")
            spec = fit_spec(logical_to_spec(axes, rules), tuple(value.shape), mesh)
            return x.replace(NamedSharding(mesh, spec))
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_variable)


def _norm_key(k) -> str | None:
    """Key-path entry as a string; a Variable's `.value` hop is dropped so nnx.State and pure dicts
    of the same parameters give the same paths."""
    if isinstance(k, GetAttrKey):
        return None if k.name == "value" else k.name
    if isinstance(k, DictKey):
        return str(k.key)
    if isinstance(k, SequenceKey):
        return str(k.idx)
    if isinstance(k, FlattenedIndexKey):
        return str(k.key)
    return str(k)


def norm_path(path) -> tuple[str, ...]:
    """A jax key path as a tuple of strings (see `_norm_key`)."""
    return tuple(s for s in (_norm_key(k) for k in path) if s is not None)


def opt_state_shardings(opt_state: Any, param_shardings: Any) -> Any:
    """Shardings for an optax state: every leaf whose key path ends with a parameter's path and
    whose shape that parameter's sharding can split (adam mu / nu, momentum, ...) gets that
    sharding; everything else (step counts, masked / factored leaves) is replicated.

    Matching by path suffix, not tree structure, also handles `multi_transform` / masked states
    where frozen parameters have no moments.
    """
    by_path: dict[tuple[str, ...], NamedSharding] = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
        if not isinstance(s, jax.sharding.Sharding):
            raise TypeError(f"opt_state_shardings: param_shardings leaf {_path_str(path)} is {type(s).__name__}, "
                            "not a Sharding (pass the output of state_shardings)")
        by_path[norm_path(path)] = s
    if not by_path:
        raise ValueError("opt_state_shardings: param_shardings has no leaves")
    mesh = next(iter(by_path.values())).mesh
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        shape = getattr(x, "shape", None)
        if shape is None:
            return replicated
        p = norm_path(path)
        for start in range(len(p)):
            s = by_path.get(p[start:])
            if s is None:
                continue
            if len(s.spec) <= len(shape) and _divides(s, tuple(shape)):
                return s
            return replicated
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _divides(sharding: NamedSharding, shape: tuple[int, ...]) -> bool:
    for dim, entry in zip(shape, sharding.spec):
        size = math.prod(sharding.mesh.shape[n] for n in _mesh_axes(entry))
        if dim % size:
            return False
    return True


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct(shape, dtype, sharding=...)` per leaf: the restore target of a
    checkpoint, or the abstract input of an AOT compile. `tree` may be concrete or abstract and
    must have the structure of `shardings` (e.g. both from the same nnx.State)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds for `abstract_tree` placed with `shardings` (shard shape x itemsize,
    summed over leaves; replicated leaves count whole)."""
    leaves = jax.tree.leaves(abstract_tree)
    shard_leaves = jax.tree.leaves(shardings)
    if len(leaves) != len(shard_leaves):
        raise ValueError(f"per_device_bytes: {len(leaves)} array leaves but {len(shard_leaves)} shardings")
    total = 0
    for x, s in zip(leaves, shard_leaves):
        shape = tuple(np.shape(x))
        total += math.prod(s.shard_shape(shape)) * np.dtype(x.dtype).itemsize
    return int(total)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, batch_axes: tuple[str, ...] | None = None
                ) -> dict[str, Any]:
    """Place a host batch on the mesh: arrays split along their leading dim over `batch_axes`.

    Each process passes its own rows (multi-host: the global batch is the concatenation over
    processes, as `jax.make_array_from_process_local_data` assumes). Scalars and arrays whose
    leading dim the batch axes do not divide are replicated (each process must then pass the full
    value); non-array entries (lists of str, python scalars, None) are returned untouched.
    `batch_axes` default: those of DEFAULT_RULES' "batch" entry.
    """
    batch_axes = batch_axes_of(DEFAULT_RULES) if batch_axes is None else tuple(batch_axes)
    unknown = [a for a in batch_axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"shard_batch: batch_axes {unknown} are not mesh axes {tuple(mesh.shape)}")
    size = math.prod(mesh.shape[a] for a in batch_axes)
    # Rows a process holds cover size / process_count shards of the global leading dim.
    local_size = max(1, size // jax.process_count())
    entry = batch_axes[0] if len(batch_axes) == 1 else tuple(batch_axes)
    out: dict[str, Any] = {}
    for name, x in batch.items():
        if isinstance(x, jax.Array | np.ndarray | np.generic) and np.dtype(x.dtype).kind not in "OUS":
            x = np.asarray(x)
            if x.ndim >= 1 and batch_axes and x.shape[0] % local_size == 0:
                spec = PartitionSpec(entry)
            else:
                spec = PartitionSpec()
            out[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
        else:
            out[name] = x
    return out
