"""Compacted per-row KV cache for decoding.

`KVCache(k, v, length)`: k, v [Y, B, S_max, K, H] hold post-RoPE keys / values; `length` [Y, B]
int32 counts the valid entries of each layer and row. Valid entries are always the FRONT
`length[y, b]` slots (prefill moves left padding out), so decode needs no key mask: it appends at
`length` and attends to [0, length) (`decode_attention` reads each row's length). The sparse
cache stores only kept entries in the same layout, with a smaller per-layer length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from zipr1_jax.typing import Array, Bool, Float, Int


@struct.dataclass
class KVCache:
    k: Float[Array, "Y B S K H"]
    v: Float[Array, "Y B S K H"]
    length: Int[Array, "Y B"]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(cls, *, layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        shape = (layers, batch, capacity, kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   length=jnp.zeros((layers, batch), jnp.int32))


def compact_front(x_BLKH: jax.Array, valid_BL: Bool[Array, "B L"], capacity: int) -> jax.Array:
    """Move each row's valid entries (in order) to the front of a [B, capacity, ...] buffer."""
    B, L = valid_BL.shape
    if capacity < L:
        raise ValueError(f"KV cache capacity {capacity} is smaller than the prompt length {L}")
    # Stable sort of "is padding" puts valid slots first, keeping their order.
    order_BL = jnp.argsort(~valid_BL, axis=1, stable=True)
    gathered = jnp.take_along_axis(x_BLKH, order_BL[:, :, None, None], axis=1)
    gathered = jnp.where(jnp.take_along_axis(valid_BL, order_BL, axis=1)[:, :, None, None], gathered, 0)
    pad = [(0, 0), (0, capacity - L)] + [(0, 0)] * (x_BLKH.ndim - 2)
    return jnp.pad(gathered, pad)


def write_at(cache_YBSKH: Float[Array, "Y B S K H"], layer: int, new_BTKH: Float[Array, "B T K H"],
             start_B: Int[Array, "B"]) -> Float[Array, "Y B S K H"]:
    """Write layer `layer`'s T new entries at per-row offsets `start_B` of the STACKED cache.

    One scatter into the [Y, B, S, K, H] array (not a per-layer slice + re-stack): when the old
    cache is dead afterwards, e.g. the carry of the rollout's while_loop, XLA updates it in place,
    so a decode step writes B*T entries per layer instead of copying the whole cache. Offsets are
    clamped to [0, S - T] like `lax.dynamic_update_slice` (an overfull row overwrites its tail).
    """
    B, T = new_BTKH.shape[:2]
    S = cache_YBSKH.shape[2]
    start_B = jnp.clip(start_B.astype(jnp.int32), 0, S - T)
    slots_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    rows_B1 = jnp.arange(B, dtype=jnp.int32)[:, None]
    return cache_YBSKH.at[layer, rows_B1, slots_BT].set(new_BTKH.astype(cache_YBSKH.dtype),
                                                         mode="promise_in_bounds")


def decode_mask(length_B: Int[Array, "B"], T: int, capacity: int) -> Bool[Array, "B T S"]:
    """New token t (at slot length + t) sees slots [0, length + t]: prefix plus causal among new."""
    slot_S = jnp.arange(capacity)
    return slot_S[None, None, :] <= (length_B[:, None, None] + jnp.arange(T)[None, :, None])
