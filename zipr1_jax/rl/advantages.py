"""Group-relative advantages (docs/method.md section 3): one scalar per rollout, broadcast to its tokens.

Rows are rollouts, ``R = prompts * G``, and the G rollouts of one prompt are contiguous rows, so a
group is a row of ``r_R.reshape(-1, G)``. All functions are pure jnp (jittable; ``group_size``,
``eps`` and ``kind`` are static Python values) and return float32 [R].

  grpo    (r - mean_g) / (std_g + eps)   std with ddof=0 (the paper's GRPO)
  rloo    r_i - mean of the other G - 1 rewards of the group (leave-one-out baseline)
  drgrpo  r - mean_g                     (Dr. GRPO: no std division, which over-weights easy and
                                          hard groups whose rewards barely vary)

A group whose rewards are all equal carries no learning signal: every estimator gives zeros.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from zipr1_jax.typing import Array, Float

ADVANTAGE_KINDS = ("grpo", "rloo", "drgrpo")


def _groups(r_R, group_size: int) -> Float[Array, "P G"]:
    r_R = jnp.asarray(r_R, jnp.float32)
    if r_R.ndim != 1:
        raise ValueError(f"rewards must be 1-D [R], got shape {r_R.shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if r_R.shape[0] % group_size:
        raise ValueError(f"the number of rollouts ({r_R.shape[0]}) is not divisible by group_size ({group_size})")
    return r_R.reshape(-1, group_size)


def grpo_advantages(r_R: Float[Array, "R"], group_size: int, eps: float = 1e-6) -> Float[Array, "R"]:
    """A = (r - group mean) / (group std + eps), population std (ddof=0).

    Args:
      r_R: rewards [R], groups contiguous.
      group_size: G.
      eps: added to the std so all-equal groups give 0 instead of 0/0.
    Returns:
      A_R float32.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    r_PG = _groups(r_R, group_size)
    mean_P1 = r_PG.mean(axis=1, keepdims=True)
    std_P1 = r_PG.std(axis=1, keepdims=True)
    return ((r_PG - mean_P1) / (std_P1 + eps)).reshape(-1)


def rloo_advantages(r_R: Float[Array, "R"], group_size: int) -> Float[Array, "R"]:
    """A_i = r_i - mean_{j != i} r_j within the group; 0 when G = 1 (no other rollout to compare)."""
    r_PG = _groups(r_R, group_size)
    if group_size == 1:
        return jnp.zeros_like(r_PG).reshape(-1)
    others_PG = (r_PG.sum(axis=1, keepdims=True) - r_PG) / (group_size - 1)
    return (r_PG - others_PG).reshape(-1)


def drgrpo_advantages(r_R: Float[Array, "R"], group_size: int) -> Float[Array, "R"]:
    """A = r - group mean (Dr. GRPO: no std normalisation)."""
    r_PG = _groups(r_R, group_size)
    return (r_PG - r_PG.mean(axis=1, keepdims=True)).reshape(-1)


_ESTIMATORS: dict[str, Callable[..., Float[Array, "R"]]] = {
    "grpo": grpo_advantages,
    "rloo": lambda r_R, group_size, eps: rloo_advantages(r_R, group_size),
    "drgrpo": lambda r_R, group_size, eps: drgrpo_advantages(r_R, group_size),
}


def compute_advantages(kind: str, r_R: Float[Array, "R"], group_size: int, eps: float = 1e-6) -> Float[Array, "R"]:
    """Dispatch on ``kind`` in ADVANTAGE_KINDS (``eps`` is used by "grpo" only)."""
    if kind not in _ESTIMATORS:
        raise ValueError(f"advantage kind must be one of {list(ADVANTAGE_KINDS)}, got {kind!r}")
    return _ESTIMATORS[kind](r_R, group_size, eps)
