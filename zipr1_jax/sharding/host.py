"""Host <-> global arrays across processes: NumPy copies of arrays that span other processes'
devices and an all-gather of picklable host objects. Collective calls: with several processes every
process must make them, in the same order. With one process they are plain copies."""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from zipr1_jax.sharding.launch import is_multiprocess


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a (possibly multi-process) array."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_host_tree(tree: Any) -> Any:
    return jax.tree.map(to_host, tree)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order, on every process."""
    if not is_multiprocess():
        return [obj]
    payload = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int32))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[:payload.size] = payload
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [P, max size]
    return [pickle.loads(stacked[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]
