"""Decode attention over a (pruned) per-layer KV cache (docs/method.md section 2, decoding).

The cache holds each row's valid entries at the FRONT: `length_B` slots (kept prefill tokens
compacted + generated tokens). The T new tokens already sit at slots [length - T, length) and
are causal among themselves; no slot >= length is ever read into the result (xla path: such
keys are zeroed and masked, so even NaN garbage there cannot leak). Optional static capacity
(or capacity buckets chosen with lax.switch on max(length)) slices the cache so the work scales
with the pruned length rather than the allocated S.

A model keeps one STACKED cache [Y, B, S, K, H]; `layer=y` reads its layer y in place. The Pallas
kernels pick the layer in their block index maps: XLA materialises a sliced custom-call operand,
which would copy the layer's whole S slots on every decode step (seen in deviceless TPU v5e and
H100 compiles). The xla path slices, and XLA fuses that slice into the attention.
"""

from __future__ import annotations

import jax.numpy as jnp

from zipr1_jax.kernels.sparse_attention.api import (_pallas_entry, bucket_sizes, resolve_backend,
                                                    run_bucketed)
from zipr1_jax.kernels.sparse_attention.config import validate_buckets
from zipr1_jax.kernels.sparse_attention.pallas_common import layer_view
from zipr1_jax.kernels.sparse_attention.reference import attend_compact_reference
from zipr1_jax.typing import Array, Float, Int


def decode_attention(q_BTNH: Float[Array, "B T N H"], k_cache_BSKH: Float[Array, "B S K H"],
                     v_cache_BSKH: Float[Array, "B S K H"], length_B: Int[Array, "B"], *,
                     layer: int | None = None, backend: str | None = None, sm_scale: float | None = None,
                     capacity: int | None = None, capacity_buckets: tuple[float, ...] | None = None,
                     block_sizes=None, interpret: bool | None = None,
                     model_numerics: bool = False) -> Float[Array, "B T N H"]:
    """Attention of T new tokens over the first `length` cache slots.

    Args:
      q_BTNH: queries of the new tokens (RoPE applied).
      k_cache_BSKH, v_cache_BSKH: caches with valid entries at the front (new tokens included);
        with `layer`, stacked caches [Y, B, S, K, H].
      length_B: valid slots per row, >= T (rows with length < T see only slots < length).
      layer: static index of the layer to read from stacked caches (read in place, module docstring).
      backend: None (by platform), "xla", "pallas_tpu", "pallas_triton".
      capacity: xla only: static number of slots to read (caller guarantees length <= capacity).
      capacity_buckets: xla only: fractions of S; read the smallest bucket >= max(length).
      block_sizes, interpret: forwarded to the Pallas decode kernels.
      model_numerics: xla only: the dense model layers' numerics (probabilities in the values'
        dtype, `softmax_attention(empty_rows="uniform", float32=False)`) instead of the float32
        reference: the model's cached decode on CPU then computes exactly what its dense decode
        did. The Pallas kernels keep their own float32 accumulation.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    k_view, v_view = layer_view(k_cache_BSKH, layer), layer_view(v_cache_BSKH, layer)
    if q_BTNH.ndim != 4 or k_view.ndim != 4 or v_view.ndim != 4:
        raise ValueError(f"q [B, T, N, H] and caches [B, S, K, H] must be rank 4, got "
                         f"{q_BTNH.shape}, {k_view.shape}, {v_view.shape}")
    B, T, N, H = q_BTNH.shape
    S = k_view.shape[1]
    if k_view.shape != v_view.shape or k_view.shape[0] != B or k_view.shape[3] != H:
        raise ValueError(f"k/v caches {k_view.shape}, {v_view.shape} must be equal and "
                         f"match q {q_BTNH.shape} in batch and head_dim")
    if T > S:
        raise ValueError(f"{T} new tokens do not fit a cache of {S} slots")
    if tuple(length_B.shape) != (B,) or not jnp.issubdtype(length_B.dtype, jnp.integer):
        raise ValueError(f"length_B must be an integer array of shape ({B},), got "
                         f"{length_B.dtype}{tuple(length_B.shape)}")
    backend = resolve_backend(backend)
    length_B = jnp.clip(length_B.astype(jnp.int32), 0, S)
    if backend != "xla":
        if capacity is not None or capacity_buckets is not None:
            raise ValueError("capacity / capacity_buckets apply to the xla decode path only "
                             "(the Pallas decode kernels stop at length themselves)")
        fn = _pallas_entry(backend, 1)
        return fn(q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B, sm_scale=sm_scale,
                  block_sizes=block_sizes, interpret=bool(interpret), layer=layer)
    if block_sizes is not None:
        raise ValueError("block_sizes only applies to the Pallas backends, not 'xla'")
    if capacity is not None and capacity_buckets is not None:
        raise ValueError("pass capacity or capacity_buckets, not both")
    if capacity is not None and not (isinstance(capacity, int) and T <= capacity <= S):
        raise ValueError(f"capacity must be an int in [T={T}, S={S}], got {capacity!r}")
    if layer is not None:
        k_cache_BSKH, v_cache_BSKH = k_cache_BSKH[layer], v_cache_BSKH[layer]
    q_pos_BT = length_B[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]

    def run(C, q, k, v, length):
        k_pos = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (B, C))
        return attend_compact_reference(q, k[:, :C], v[:, :C], q_pos_BT, k_pos, jnp.minimum(length, C),
                                        sm_scale=sm_scale, empty_rows="uniform" if model_numerics else "zero",
                                        float32=not model_numerics)

    operands = (q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B)
    if capacity is not None:
        return run(capacity, *operands)
    if capacity_buckets is None:
        return run(S, *operands)
    validate_buckets(tuple(capacity_buckets), "capacity_buckets")
    sizes = tuple(t for t in bucket_sizes(S, capacity_buckets) if t >= T)
    return run_bucketed(run, jnp.max(length_B), sizes or (S,), *operands)
