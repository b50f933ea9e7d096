"""Decode attention over a (pruned) per-layer KV cache (docs/method.md section 2, decoding).

The cache holds each row's valid entries at the FRONT: `length_B` slots (kept prefill tokens
compacted + generated tokens). The T new tokens already sit at slots [length - T, length) and
are causal among themselves; no slot >= length is ever read into the result (xla path: such
slots' scores are masked and their values zeroed, so even NaN garbage there cannot leak; the
matmuls read the cache in its stored layout, see `_decode_xla`). Optional static capacity
(or capacity buckets chosen with lax.switch on max(length)) slices the cache so the work scales
with the pruned length rather than the allocated S.

A model keeps one STACKED cache [Y, B, S, K, H]; `layer=y` reads its layer y in place. The Pallas
kernels pick the layer in their block index maps: XLA materialises a sliced custom-call operand,
which would copy the layer's whole S slots on every decode step (seen in deviceless TPU v5e and
H100 compiles). The xla path slices, and XLA fuses that slice into the attention.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from zipr1_jax.kernels.sparse_attention.api import (_pallas_entry, bucket_sizes, resolve_backend,
                                                    run_bucketed)
from zipr1_jax.kernels.sparse_attention.config import validate_buckets
from zipr1_jax.kernels.sparse_attention.pallas_common import layer_view
from zipr1_jax.kernels.sparse_attention.reference import masked_softmax
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
        return _decode_xla(q, k[:, :C], v[:, :C], q_pos_BT, jnp.minimum(length, C), sm_scale=sm_scale,
                           model_numerics=model_numerics)

    operands = (q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B)
    if capacity is not None:
        return run(capacity, *operands)
    if capacity_buckets is None:
        return run(S, *operands)
    validate_buckets(tuple(capacity_buckets), "capacity_buckets")
    sizes = tuple(t for t in bucket_sizes(S, capacity_buckets) if t >= T)
    return run_bucketed(run, jnp.max(length_B), sizes or (S,), *operands)


def _decode_xla(q_BTNH: Float[Array, "B T N H"], k_BSKH: Float[Array, "B S K H"], v_BSKH: Float[Array, "B S K H"],
                q_pos_BT: Int[Array, "B T"], length_B: Int[Array, "B"], *, sm_scale: float | None,
                model_numerics: bool) -> Float[Array, "B T N H"]:
    """`attend_compact_reference` over slots [0, length) (k_pos = slot index), arranged so both
    matmuls read the cache in its stored [B, S, K*H] layout.

    Why: the reference's GQA einsums batch over (b, k), so XLA's CPU backend first transposes the
    whole [B, S, K, H] cache of every layer into [B, K, ...] on every decode step - that copy
    cost more than the attention itself. Here the queries are spread into a block-diagonal
    [B, T*N, K*H] matrix (query head n's H entries in kv head n // G's columns, zeros elsewhere),
    so scores = Q @ k^T and values = a @ v are batched over b only and contract over the cache's
    own minor axis (scores) or its slot axis (values); the K-fold extra multiply-adds by zero are
    cheap next to the cache read, which decode is bound by. Same masking and softmax
    (`masked_softmax`) and the same float32 / model-numerics rules as the reference.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    scale = 1.0 / math.sqrt(H) if sm_scale is None else float(sm_scale)
    live_BS = jnp.arange(S, dtype=jnp.int32)[None, :] < length_B[:, None]
    # Garbage (even NaN) past length cannot leak: its scores are replaced by the mask below, and
    # its values are zeroed (a probability of 0 times NaN would still be NaN).
    k_BSC = k_BSKH.reshape(B, S, K * H)
    v_BSC = jnp.where(live_BS[:, :, None, None], v_BSKH, 0).reshape(B, S, K * H)
    mask_BTS = live_BS[:, None, :] & (jnp.arange(S, dtype=jnp.int32)[None, None, :] <= q_pos_BT[:, :, None])
    # where, not a multiply by the identity: exact under any matmul precision (TF32 included).
    diag_11K1K1 = jnp.eye(K, dtype=bool)[None, None, :, None, :, None]
    q_BRC = jnp.where(diag_11K1K1, q_BTNH.reshape(B, T, K, G, 1, H), 0).reshape(B, T * N, K * H)
    if model_numerics:  # the dense layers' numerics: float32 scores, probabilities in v's dtype
        s_BRS = jnp.einsum("brc,bsc->brs", q_BRC, k_BSC, preferred_element_type=jnp.float32)
    else:
        q_BRC, k_BSC, v_BSC = (x.astype(jnp.float32) for x in (q_BRC, k_BSC, v_BSC))
        s_BRS = jnp.einsum("brc,bsc->brs", q_BRC, k_BSC, precision="highest")
    s_BTNS = s_BRS.astype(jnp.float32).reshape(B, T, N, S) * scale
    a_BRS = masked_softmax(s_BTNS, mask_BTS[:, :, None, :], "uniform" if model_numerics else "zero").reshape(B, T * N, S)
    if model_numerics:
        o_BRC = jnp.einsum("brs,bsc->brc", a_BRS.astype(v_BSC.dtype), v_BSC)
    else:
        o_BRC = jnp.einsum("brs,bsc->brc", a_BRS, v_BSC, precision="highest")
    # Each query head keeps the H columns of its own kv head (the block diagonal again).
    o_BTKGH = jnp.where(diag_11K1K1, o_BRC.reshape(B, T, K, G, K, H), 0).sum(axis=4)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype if not model_numerics else v_BSKH.dtype)
