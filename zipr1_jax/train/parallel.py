"""Placement of a run on its mesh: batch sharding, a replicated sharding, and cached sharded jits.

Every jitted step of the trainer goes through `Placement.jit`: explicit `in_shardings` (taken from
the committed arguments of the first call: params/optimizer state from the rules table, batches
from `shard_batch`) and `out_shardings`, compiled once per (static arguments, shardings) and
traced under `use_mesh` so the models' logical `constrain` calls bind to this mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zipr1_jax.sharding.logical import use_mesh


def _freeze(x):
    """A hashable form of static arguments (dicts and lists inside)."""
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


class Placement:
    # Shared by all placements of the process: a second run (resume, tests) reuses compiled steps.
    _cache: dict[Any, Callable] = {}

    def __init__(self, mesh: Mesh, rules):
        self.mesh = mesh
        self.rules = tuple(rules)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def put_batch(self, arrays: dict) -> dict:
        """Shard host arrays over the batch axes (leading dimension) of the mesh."""
        from zipr1_jax.sharding.rules import shard_batch

        return shard_batch(arrays, self.mesh)

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)

    def context(self):
        return use_mesh(self.mesh, self.rules)

    def jit(self, fn: Callable, *args, static: dict | None = None, out_shardings=None, donate: tuple[int, ...] = ()):
        """Call `fn(*args, **static)` compiled with the shardings of `args` (cached per key)."""
        static = dict(static or {})
        in_sh = jax.tree.map(lambda a: a.sharding if isinstance(a, jax.Array) else None, args)
        key = (self.mesh, self.rules, fn, _freeze(static), jax.tree.structure(args), tuple(jax.tree.leaves(in_sh)),
               str(out_shardings), donate)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = jax.jit(partial(fn, **static), in_shardings=in_sh,
                               out_shardings=out_shardings, donate_argnums=donate)
            self._cache[key] = compiled
        with self.context():
            return compiled(*args)
