"""Placement of a run on its mesh: batch sharding, a replicated sharding, and cached sharded jits.

Every jitted step of the trainer goes through `Placement.jit`: explicit `in_shardings` (taken from
the committed arguments of the first call: params/optimizer state from the rules table, batches
from `put_batch` / `put_rows`) and `out_shardings`, compiled once per (static arguments,
shardings) and traced under `use_mesh` so the models' logical `constrain` calls bind to this mesh.
Batches split over the mesh axes the rules table gives the logical "batch" axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zipr1_jax.sharding.launch import is_multiprocess
from zipr1_jax.sharding.logical import use_mesh
from zipr1_jax.sharding.rules import batch_axes_of, shard_batch


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
        self.batch_axes = batch_axes_of(self.rules)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def put_batch(self, arrays: dict) -> dict:
        """Shard host arrays holding THIS process's rows over the batch axes (leading dimension)."""
        return shard_batch(arrays, self.mesh, batch_axes=self.batch_axes)

    def put_rows(self, arrays: dict) -> dict:
        """Place host arrays holding ALL rows of the batch (identical on every process), split over
        the batch axes like `put_batch`. With one process the two are the same."""
        if not is_multiprocess():
            return self.put_batch(arrays)
        size = math.prod(self.mesh.shape[a] for a in self.batch_axes)
        entry = self.batch_axes[0] if len(self.batch_axes) == 1 else self.batch_axes
        out = {}
        for name, x in arrays.items():
            x = np.asarray(x)
            split = self.batch_axes and x.ndim >= 1 and x.shape[0] % size == 0
            spec = PartitionSpec(entry) if split else PartitionSpec()
            # global_shape == local shape: every process holds the whole array, each device takes its slice.
            out[name] = jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), x, x.shape)
        return out

    def replicate(self, tree):
        """Replicate host values, and with several processes also process-local jax.Arrays (e.g.
        PRNG keys), which device_put refuses there: a jitted identity with a replicated output (the
        value must then be the same on every process)."""
        if not is_multiprocess():
            return jax.device_put(tree, self.replicated)
        identity = jax.jit(lambda t: t, out_shardings=self.replicated)
        return jax.tree.map(lambda x: identity(x) if isinstance(x, jax.Array) else jax.device_put(x, self.replicated),
                            tree)

    def context(self):
        return use_mesh(self.mesh, self.rules)

    def jit(self, fn: Callable, *args, static: dict | None = None, out_shardings=None, donate: tuple[int, ...] = ()):
        """Call `fn(*args, **static)` compiled with the shardings of `args` (cached per key)."""
        static = dict(static or {})
        in_sh = jax.tree.map(lambda a: a.sharding if isinstance(a, jax.Array) else None, args)
        # The output shardings by structure + leaves (hashable), not str(): printing the learner's
        # whole TrainState of shardings cost ~8 ms per call.
        out_key = (jax.tree.structure(out_shardings), tuple(jax.tree.leaves(out_shardings)))
        key = (self.mesh, self.rules, fn, _freeze(static), jax.tree.structure(args), tuple(jax.tree.leaves(in_sh)),
               out_key, donate)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = jax.jit(partial(fn, **static), in_shardings=in_sh,
                               out_shardings=out_shardings, donate_argnums=donate)
            self._cache[key] = compiled
        with self.context():
            return compiled(*args)
