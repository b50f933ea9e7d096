"""The functional train state: what an optimizer step changes (step counter, params, optimizer state).

`params` is an `nnx.State` of Params (leaves keep their logical-axis metadata, so the sharding
rules can place them); jitted steps `nnx.merge(graphdef, params)` back into a module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """step: optimizer steps taken in the current phase (int32 scalar)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState

    @classmethod
    def create(cls, params: nnx.State, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
