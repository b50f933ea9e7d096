"""Host-side (plain jnp) helpers shared by the TPU and Triton compact-attention kernels.

Input validation, padding to block multiples, and the per-block skip tables that let a kernel
skip key blocks lying beyond `k_count` or entirely in the causal future of a query block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Key positions of padded / invalid keys: larger than any query position, so `k_pos <= q_pos`
# masks them without a separate count check.
KPOS_INVALID = jnp.iinfo(jnp.int32).max
# Query positions of padded query rows: smaller than any key position (they see nothing).
QPOS_PAD = -1
# Finite "minus infinity" for masked scores (exp underflows to 0, no inf - inf = NaN).
NEG_INF = -1e30
# Logsumexp of a row with no visible key: exp(s - LSE_EMPTY) == 0 in the backward pass.
LSE_EMPTY = 1e30


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_scale(head_dim: int, sm_scale):
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def validate_compact(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B):
    """Shape / dtype checks of `attend_compact` inputs; returns (B, L, N, T, K, H)."""
    if q_BLNH.ndim != 4 or k_BTKH.ndim != 4 or v_BTKH.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4 [B, L|T, N|K, H]; got {q_BLNH.shape}, "
                         f"{k_BTKH.shape}, {v_BTKH.shape}")
    B, L, N, H = q_BLNH.shape
    _, T, K, _ = k_BTKH.shape
    if k_BTKH.shape != v_BTKH.shape:
        raise ValueError(f"k and v shapes differ: {k_BTKH.shape} vs {v_BTKH.shape}")
    if k_BTKH.shape[0] != B or k_BTKH.shape[3] != H:
        raise ValueError(f"k {k_BTKH.shape} must match q {q_BLNH.shape} in batch and head_dim")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K} (GQA)")
    if L == 0 or T == 0 or H == 0:
        raise ValueError(f"empty query length L={L}, key length T={T} or head_dim H={H}")
    if not (q_BLNH.dtype == k_BTKH.dtype == v_BTKH.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q_BLNH.dtype}, {k_BTKH.dtype}, {v_BTKH.dtype}")
    if not jnp.issubdtype(q_BLNH.dtype, jnp.floating):
        raise ValueError(f"q, k, v must be floating point, got {q_BLNH.dtype}")
    for name, x, shape in (("q_pos_BL", q_pos_BL, (B, L)), ("k_pos_BT", k_pos_BT, (B, T)),
                           ("k_count_B", k_count_B, (B,))):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    return B, L, N, T, K, H


def layer_view(cache, layer: int | None):
    """The [B, S, K, H] cache decode reads: `cache` itself, or (shape and dtype only) layer `layer`
    of a stacked [Y, B, S, K, H] cache, which the kernels then index in place."""
    if layer is None:
        return cache
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be None or a static int, got {layer!r}")
    if cache.ndim != 5 or not 0 <= layer < cache.shape[0]:
        raise ValueError(f"layer={layer} needs a stacked cache [Y, B, S, K, H] with Y > {layer}, got shape "
                         f"{tuple(cache.shape)}")
    return jax.ShapeDtypeStruct(cache.shape[1:], cache.dtype)


def validate_decode(q_BTNH, k_cache_BSKH, v_cache_BSKH, length_B, layer: int | None = None):
    """Shape / dtype checks of decode inputs (of layer `layer` of stacked caches, if given);
    returns (B, Tn, N, S, K, H)."""
    k_cache_BSKH, v_cache_BSKH = layer_view(k_cache_BSKH, layer), layer_view(v_cache_BSKH, layer)
    if q_BTNH.ndim != 4 or k_cache_BSKH.ndim != 4:
        raise ValueError(f"q and caches must be rank 4, got {q_BTNH.shape}, {k_cache_BSKH.shape}")
    B, Tn, N, H = q_BTNH.shape
    _, S, K, _ = k_cache_BSKH.shape
    if k_cache_BSKH.shape != v_cache_BSKH.shape:
        raise ValueError(f"k/v cache shapes differ: {k_cache_BSKH.shape} vs {v_cache_BSKH.shape}")
    if k_cache_BSKH.shape[0] != B or k_cache_BSKH.shape[3] != H:
        raise ValueError(f"cache {k_cache_BSKH.shape} must match q {q_BTNH.shape} in batch/head_dim")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K} (GQA)")
    if Tn == 0 or S == 0 or H == 0:
        raise ValueError(f"empty new-token count {Tn}, cache length {S} or head_dim {H}")
    if Tn > S:
        raise ValueError(f"{Tn} new tokens do not fit a cache of {S} slots")
    if not (q_BTNH.dtype == k_cache_BSKH.dtype == v_cache_BSKH.dtype):
        raise ValueError(f"q / cache dtypes differ: {q_BTNH.dtype}, {k_cache_BSKH.dtype}")
    if tuple(length_B.shape) != (B,) or not jnp.issubdtype(length_B.dtype, jnp.integer):
        raise ValueError(f"length_B must be an integer array of shape ({B},), got "
                         f"{length_B.dtype}{tuple(length_B.shape)}")
    return B, Tn, N, S, K, H


def pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def positions_and_tables(q_pos_BL, k_pos_BT, k_count_B, Lp: int, Tp: int, bq: int, bk: int):
    """Padded positions and skip tables.

    Returns q_pos [B, Lp] (pad rows QPOS_PAD), k_pos [B, Tp] (keys at t >= k_count -> KPOS_INVALID),
    n_kb [B, nq] (key blocks kb < n_kb[b, qi] may hold a visible key for query block qi; blocks at or
    past it are skipped) and first_q [B, nk] (the first query block that needs key block kb, clamped
    to nq - 1; a DMA target for skipped steps of the dk/dv pass). Block minima / maxima are true
    reductions, so the tables stay correct even if positions are not sorted (sorting only makes
    the skipping effective).
    """
    B, L = q_pos_BL.shape
    T = k_pos_BT.shape[1]
    q_pos = pad_axis(q_pos_BL.astype(jnp.int32), 1, Lp, QPOS_PAD)
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    k_pos = jnp.where(t < k_count_B.astype(jnp.int32)[:, None], k_pos_BT.astype(jnp.int32),
                      KPOS_INVALID)
    k_pos = pad_axis(k_pos, 1, Tp, KPOS_INVALID)
    nq, nk = Lp // bq, Tp // bk
    q_max = q_pos.reshape(B, nq, bq).max(-1)
    k_min = k_pos.reshape(B, nk, bk).min(-1)
    needed = k_min[:, None, :] <= q_max[:, :, None]  # [B, nq, nk]
    kb_idx = jnp.arange(1, nk + 1, dtype=jnp.int32)
    n_kb = jnp.max(jnp.where(needed, kb_idx, 0), axis=-1).astype(jnp.int32)
    qi_idx = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    first_q = jnp.min(jnp.where(needed, qi_idx, nq - 1), axis=1).astype(jnp.int32)
    return q_pos, k_pos, n_kb, first_q


def decode_positions(length_B, Tn: int):
    """Original positions of the Tn new tokens: slots [length - Tn, length)."""
    return length_B.astype(jnp.int32)[:, None] - Tn + jnp.arange(Tn, dtype=jnp.int32)[None, :]

