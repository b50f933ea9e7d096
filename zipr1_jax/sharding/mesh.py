"""The device mesh: three named axes, ("data", "fsdp", "tensor").

  data    pure data parallelism: batch rows split, parameters replicated.
  fsdp    batch rows split AND parameters / optimizer state split along their "embed" dimension
          (gathered just in time by XLA), so memory per device falls with the axis size.
  tensor  Megatron-style: heads / mlp / vocab dimensions split; activations stay batch-sharded.

All axes are `AxisType.Auto`: with jax 0.10's default (Explicit) axes, a matmul whose contracting
dimension is sharded raises ShardingTypeError instead of letting XLA insert the collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(num_devices: int, *, data: int = 1, fsdp: int = -1, tensor: int = 1) -> dict[str, int]:
    """Concrete axis sizes for `num_devices`; at most one axis may be -1 ("all remaining devices")."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or not (v >= 1 or v == -1):
            raise ValueError(f"make_mesh: {name} must be a positive int or -1 (the rest), got {v!r}")
    free = [name for name, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {sizes}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"make_mesh: {free[0]}=-1 cannot fill {num_devices} devices: the other axes "
                             f"multiply to {fixed}, which does not divide {num_devices}")
        sizes[free[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(f"make_mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = "
                         f"{total}, but {num_devices} devices are given")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all global devices).

    The product of the axis sizes must equal the number of devices (-1 on one axis takes the rest).
    `jax.make_mesh` chooses a device order that keeps the innermost axis (tensor) on the fastest
    interconnect.
    """
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh: no devices given")
    sizes = mesh_shape(len(devs), data=data, fsdp=fsdp, tensor=tensor)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devs)
