"""Logical-axis sharding: models name logical axes, rule tables map them to mesh axes."""

from zipr1_jax.sharding.logical import LogicalAxes, Rules, constrain, logical_to_spec, param_axes, use_mesh
from zipr1_jax.sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from zipr1_jax.sharding.rules import (DEFAULT_RULES, abstract_with_shardings, batch_axes_of, opt_state_shardings,
                                      per_device_bytes, shard_batch, state_shardings)

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "LogicalAxes", "Rules", "abstract_with_shardings", "batch_axes_of", "constrain",
    "logical_to_spec", "make_mesh", "mesh_shape", "opt_state_shardings", "param_axes", "per_device_bytes",
    "shard_batch", "state_shardings", "use_mesh",
]
