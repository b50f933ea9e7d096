"""Pure-jnp compact sparse attention (the `xla` backend and the test oracle).

`attend_compact_reference` is the contract every backend implements: query l of row b attends
kept key t iff t < k_count[b] and k_pos[b, t] <= q_pos[b, l] (causality on ORIGINAL array
indices); GQA maps query head n to kv head n // (N // K); float32 softmax; a query with no
visible key outputs exactly 0, with finite gradients. `masked_dense_attention` is the brute-force
oracle over the full sequence with a keep mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zipr1_jax.typing import Array, Bool, Float, Int

# Finite "-inf": exp underflows to exactly 0 and no inf - inf = NaN can appear in any gradient.
_MASKED = -1e30


def check_compact_args(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B):
    """Shape / dtype validation shared by the backends; returns (B, L, N, T, K, H)."""
    for name, x in (("q_BLNH", q_BLNH), ("k_BTKH", k_BTKH), ("v_BTKH", v_BTKH)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be rank 4, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    B, L, N, H = q_BLNH.shape
    if k_BTKH.shape != v_BTKH.shape:
        raise ValueError(f"k_BTKH {k_BTKH.shape} and v_BTKH {v_BTKH.shape} must have the same shape")
    Bk, T, K, Hk = k_BTKH.shape
    if (Bk, Hk) != (B, H):
        raise ValueError(f"k_BTKH {k_BTKH.shape} must match q_BLNH {q_BLNH.shape} in batch and head_dim")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K} (GQA)")
    for name, x, shape in (("q_pos_BL", q_pos_BL, (B, L)), ("k_pos_BT", k_pos_BT, (B, T)),
                           ("k_count_B", k_count_B, (B,))):
        if tuple(x.shape) != shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array of shape {shape}, got "
                             f"{x.dtype}{tuple(x.shape)}")
    return B, L, N, T, K, H


EMPTY_ROWS = ("zero", "uniform")


def masked_softmax(s: Float[Array, "... T"], mask: Bool[Array, "... T"] | None, empty_rows: str) -> Float[Array, "... T"]:
    """Float32 softmax over the last axis of scores `s`, keys where `mask` is False excluded.

    empty_rows (a row whose mask is all False): "zero" gives exactly 0 with finite gradients;
    "uniform" gives 1 / T everywhere (what a softmax over all-masked scores gives). `mask` must
    broadcast against `s`; None masks nothing.
    """
    if empty_rows == "uniform":
        if mask is not None:
            s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(s, axis=-1)
    mask = jnp.ones(s.shape, bool) if mask is None else jnp.broadcast_to(mask, s.shape)
    s = jnp.where(mask, s, _MASKED)
    m = jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    return e / jnp.where(den > 0, den, 1.0)


def causal_block_count(L: int, *, min_block: int = 128, max_blocks: int = 8) -> int:
    """How many query blocks `softmax_attention(causal=True)` splits L queries into: blocks of at
    least `min_block` queries, at most `max_blocks` of them (each block is a few more ops; past ~8
    the skipped scores no longer pay for them). 1 (no split) below 2 * min_block."""
    return max(1, min(max_blocks, L // min_block))


def softmax_attention(q_BLNH: Float[Array, "B L N H"], k_BTKH: Float[Array, "B T K H"],
                      v_BTKH: Float[Array, "B T K H"], mask_BLT: Bool[Array, "B L T"] | None, *,
                      sm_scale: float | None = None, empty_rows: str = "zero",
                      float32: bool = True, causal: bool = False) -> Float[Array, "B L N H"]:
    """The one softmax-attention core (GQA: query head n uses kv head n // (N / K)); scores are
    float32 in both modes. The dense model layers and every sparse backend's reference use it.

    empty_rows: what a query with no visible key gets. "zero": exactly 0, with finite gradients
      (the sparse contract: such a row attends nothing). "uniform": the mean of all values, as a
      softmax over all-masked scores gives (Hugging Face's eager attention; such rows are padding).
    float32: True computes everything in float32 at the highest matmul precision (the reference
      the kernels are tested against); False keeps the model's numerics: probabilities cast to the
      values' dtype before the second matmul (bf16 models stay bf16 there, like Hugging Face).
    causal: the caller promises self-attention (L == T) under a mask that hides every key j > i
      from query i (a causal mask, possibly with padding). Queries then run in
      `causal_block_count(L)` blocks, each against the keys up to its own last position only: the
      upper triangle of the scores, masked anyway, is never computed (at 4 blocks 5/8 of the
      scores; smaller score blocks also stay in cache on CPU). Same values up to float rounding;
      empty rows as above. Ignored when L != T or L is short.
    Returns [B, L, N, H] in q's dtype (float32) / v's dtype (not float32).
    """
    B, L, N, H = q_BLNH.shape
    K = k_BTKH.shape[2]
    if K == 0 or N % K:
        raise ValueError(f"softmax_attention: {N} query heads are not a multiple of {K} kv heads (GQA)")
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"softmax_attention: empty_rows must be one of {EMPTY_ROWS}, got {empty_rows!r}")
    n_blocks = causal_block_count(L) if causal and k_BTKH.shape[1] == L else 1
    if n_blocks > 1:
        return _causal_blocks(q_BLNH, k_BTKH, v_BTKH, mask_BLT, n_blocks, sm_scale=sm_scale, empty_rows=empty_rows,
                              float32=float32)
    scale = 1.0 / math.sqrt(H) if sm_scale is None else float(sm_scale)
    q_BLKGH = q_BLNH.reshape(B, L, K, N // K, H)
    if float32:
        q_BLKGH, k_BTKH, v_BTKH = (x.astype(jnp.float32) for x in (q_BLKGH, k_BTKH, v_BTKH))
        s = jnp.einsum("blkgh,btkh->bkglt", q_BLKGH, k_BTKH, precision="highest") * scale
    else:
        s = jnp.einsum("blkgh,btkh->bkglt", q_BLKGH, k_BTKH,
                       preferred_element_type=jnp.float32).astype(jnp.float32) * scale
    a = masked_softmax(s, None if mask_BLT is None else mask_BLT[:, None, None], empty_rows)
    if float32:
        o = jnp.einsum("bkglt,btkh->blkgh", a, v_BTKH, precision="highest")
        return o.reshape(B, L, N, H).astype(q_BLNH.dtype)
    return jnp.einsum("bkglt,btkh->blkgh", a.astype(v_BTKH.dtype), v_BTKH).reshape(B, L, N, H)


def _causal_blocks(q_BLNH, k_BTKH, v_BTKH, mask_BLT, n_blocks: int, **kw):
    """`softmax_attention` of query block [a, b) over keys [0, b) for each of `n_blocks` blocks.

    A row with no visible key inside its block has none at all (the keys beyond b are hidden by
    the causal promise); under empty_rows="uniform" its output must still be the mean of ALL L
    values, which the block alone cannot give, so such rows are replaced by that mean."""
    B, L, N, H = q_BLNH.shape
    K = k_BTKH.shape[2]
    step = -(-L // n_blocks)
    step = -(-step // 8) * 8  # sublane-friendly block edges
    fill = mask_BLT is not None and kw["empty_rows"] == "uniform"
    if fill:
        mean_B1NH = jnp.repeat(jnp.mean(v_BTKH.astype(jnp.float32), axis=1), N // K, axis=1)[:, None]
    outs = []
    for a in range(0, L, step):
        b = min(a + step, L)
        m = None if mask_BLT is None else mask_BLT[:, a:b, :b]
        o = softmax_attention(q_BLNH[:, a:b], k_BTKH[:, :b], v_BTKH[:, :b], m, **kw)
        if fill:
            o = jnp.where(jnp.any(m, axis=-1)[:, :, None, None], o, mean_B1NH.astype(o.dtype))
        outs.append(o)
    return jnp.concatenate(outs, axis=1)


def attend_compact_reference(q_BLNH: Float[Array, "B L N H"], k_BTKH: Float[Array, "B T K H"],
                             v_BTKH: Float[Array, "B T K H"], q_pos_BL: Int[Array, "B L"],
                             k_pos_BT: Int[Array, "B T"], k_count_B: Int[Array, "B"], *,
                             sm_scale: float | None = None, empty_rows: str = "zero",
                             float32: bool = True) -> Float[Array, "B L N H"]:
    """Attention of every query over the compact kept keys (see module docstring).

    Keys at slots >= k_count are zeroed before use so garbage (even NaN) there cannot leak.
    Output dtype = q dtype; arithmetic in float32. `empty_rows` / `float32`: as in
    `softmax_attention` (the defaults are the contract; the xla decode path, `decode._decode_xla`,
    computes this over the cache's first `length` slots in the cache's own layout).
    """
    check_compact_args(q_BLNH, k_BTKH, v_BTKH, q_pos_BL, k_pos_BT, k_count_B)
    T = k_BTKH.shape[1]
    live_BT = jnp.arange(T)[None, :] < k_count_B[:, None]
    k = jnp.where(live_BT[:, :, None, None], k_BTKH, jnp.zeros_like(k_BTKH))
    v = jnp.where(live_BT[:, :, None, None], v_BTKH, jnp.zeros_like(v_BTKH))
    mask_BLT = live_BT[:, None, :] & (k_pos_BT[:, None, :] <= q_pos_BL[:, :, None])
    return softmax_attention(q_BLNH, k, v, mask_BLT, sm_scale=sm_scale, empty_rows=empty_rows, float32=float32)


def masked_dense_attention(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"],
                           v_BSKH: Float[Array, "B S K H"], keep_BS: Bool[Array, "B S"],
                           valid_BL: Bool[Array, "B L"] | None = None, *,
                           sm_scale: float | None = None) -> Float[Array, "B L N H"]:
    """Brute-force oracle: query l (array index l, L == S) attends key j iff keep[j] and j <= l.

    `valid_BL` (optional) zeroes the outputs of padding queries.
    """
    B, L = q_BLNH.shape[:2]
    S = k_BSKH.shape[1]
    if L != S:
        raise ValueError(f"masked_dense_attention needs L == S (prefill), got L={L}, S={S}")
    causal_LS = jnp.arange(S)[None, :] <= jnp.arange(L)[:, None]
    mask_BLS = keep_BS[:, None, :] & causal_LS[None]
    o = softmax_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, sm_scale=sm_scale)
    if valid_BL is not None:
        o = jnp.where(valid_BL[:, :, None, None], o, jnp.zeros_like(o))
    return o
