"""Dimension-letter legend and array aliases used across zipr1_jax.

Letters (used in jaxtyping annotations, einsum strings and `x_BLD` name suffixes):
  B batch            L query length         S key length         T kept / capacity length
  D embed (model)    F mlp hidden           N query heads        K kv heads
  H head dim         V vocab                P vision patches     C patch features (C*tp*p*p)
  G rollout group    R probe queries        Y layers
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int  # noqa: F401  (re-exported for annotations)

PyTree: TypeAlias = Any
Shape: TypeAlias = tuple[int, ...]
DType: TypeAlias = Any
ArrayLike: TypeAlias = jax.Array | np.ndarray

__all__ = ["Array", "ArrayLike", "Bool", "DType", "Float", "Int", "PyTree", "Shape"]
