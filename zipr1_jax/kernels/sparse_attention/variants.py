"""Baseline keep rules next to ZipR1's top-p (docs/method.md section 5): fixed top-k ratio, fixed score
threshold, and FastV's visual-token pruning. Pure JAX, static shapes, one keep set per layer.

Top-k and threshold rank keys with exactly the score `select_topp` uses (same probes, float32
softmax, ZipCache normalisation) and honour the same always-keep set (first valid token, recent
probe window), so the three rules differ only in where they cut:

  top-p      fewest keys whose score mass reaches p * total (selection.py)
  top-k      the ceil(ratio * n) best keys (n = valid keys of the row)
  threshold  every key whose mean attention received (score / query heads, an attention
             probability in [0, 1]) is >= the threshold *(ours: the sources do not define the scale)*

FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2") ranks only VISUAL tokens,
by the attention they receive in the last dense layer, averaged over heads, either from the last
query (the official implementation) or from every query that can see them (the paper's wording:
"average attention received from all other tokens"); text tokens are never dropped.

Every rule returns a `Selection` through `compact`, so ratios are counted like top-p's:
kept / valid keys of the row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zipr1_jax.kernels.sparse_attention.config import SelectionConfig
from zipr1_jax.kernels.sparse_attention.selection import (Selection, choose_probes, compact, probe_scores,
                                                          probe_window)
from zipr1_jax.typing import Array, Bool, Float

FASTV_QUERIES = ("last", "all")


def _check_qk(q_BLNH, k_BSKH, valid_BS, what: str) -> None:
    if q_BLNH.ndim != 4 or k_BSKH.ndim != 4:
        raise ValueError(f"{what}: q [B, L, N, H] and k [B, S, K, H] must be rank 4, got {q_BLNH.shape}, "
                         f"{k_BSKH.shape}")
    B, L, N, H = q_BLNH.shape
    if k_BSKH.shape[0] != B or k_BSKH.shape[1] != L or k_BSKH.shape[3] != H:
        raise ValueError(f"{what} scores a prefill: k {k_BSKH.shape} must match q {q_BLNH.shape} in batch, "
                         "length and head_dim")
    if N % k_BSKH.shape[2]:
        raise ValueError(f"{what}: query heads N={N} must be a multiple of kv heads K={k_BSKH.shape[2]}")
    if tuple(valid_BS.shape) != (B, L) or valid_BS.dtype != jnp.bool_:
        raise ValueError(f"{what}: valid_BS must be bool of shape {(B, L)}, got "
                         f"{valid_BS.dtype}{tuple(valid_BS.shape)}")


def _per_row(x, B: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(x, jnp.float32), (B,))


# ---------------------------------------------------------------------- shared scoring
def selection_scores(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"], valid_BS: Bool[Array, "B S"],
                     *, config: SelectionConfig, rng=None) -> Float[Array, "B S"]:
    """The per-key score `select_topp` ranks (probe attention summed over heads, normalised)."""
    _check_qk(q_BLNH, k_BSKH, valid_BS, "selection_scores")
    q_BLNH, k_BSKH = jax.lax.stop_gradient(q_BLNH), jax.lax.stop_gradient(k_BSKH)
    probe_pos_BR, probe_ok_BR, _ = choose_probes(valid_BS, config, rng)
    return probe_scores(q_BLNH, k_BSKH, valid_BS, probe_pos_BR, probe_ok_BR, normalise=config.normalise)


def forced_keep(valid_BS: Bool[Array, "B S"], config: SelectionConfig) -> Bool[Array, "B S"]:
    """The keys `select_topp` always keeps: first valid token and the recent-probe window."""
    rank_BS = jnp.cumsum(valid_BS, axis=1) - 1
    n_B = valid_BS.sum(axis=1)
    keep_BS = jnp.zeros_like(valid_BS)
    if config.keep_first:
        keep_BS = keep_BS | (valid_BS & (rank_BS == 0))
    if config.keep_probe_window:
        keep_BS = keep_BS | (valid_BS & (rank_BS >= (n_B - probe_window(n_B, config))[:, None]))
    return keep_BS


def _best_b(score_BS, valid_BS, b_B) -> Bool[Array, "B S"]:
    """The b highest-scoring valid keys of each row (stable: ties go to the lower index)."""
    B, S = score_BS.shape
    order_BS = jnp.argsort(jnp.where(valid_BS, -score_BS, jnp.inf), axis=1, stable=True)
    keep_sorted = jnp.arange(S)[None, :] < b_B[:, None]
    keep_BS = jnp.zeros((B, S), bool).at[jnp.arange(B)[:, None], order_BS].set(keep_sorted)
    return keep_BS & valid_BS


# ---------------------------------------------------------------------- top-k ratio
def topk_keep(score_BS: Float[Array, "B S"], valid_BS: Bool[Array, "B S"], ratio_B,
              forced_BS: Bool[Array, "B S"] | None = None) -> Bool[Array, "B S"]:
    """Keep b = ceil(ratio * n) keys per row: the forced ones first, then the best by score.

    ratio >= 1 keeps every valid key; b >= 1 for a non-empty row. When the forced set alone is
    larger than b it is kept whole (no query may lose its always-kept keys).
    """
    B = score_BS.shape[0]
    ratio = _per_row(ratio_B, B)
    n_B = valid_BS.sum(axis=1)
    b_B = jnp.ceil(ratio * n_B.astype(jnp.float32)).astype(jnp.int32)
    b_B = jnp.where(ratio >= 1.0, n_B, jnp.clip(b_B, jnp.minimum(n_B, 1), n_B))
    score = score_BS.astype(jnp.float32)
    if forced_BS is not None:
        score = jnp.where(forced_BS, jnp.inf, score)
    keep_BS = _best_b(score, valid_BS, b_B)
    return keep_BS if forced_BS is None else keep_BS | (forced_BS & valid_BS)


def select_topk(q_BLNH, k_BSKH, valid_BS, ratio_B, *, config: SelectionConfig = SelectionConfig(),
                rng=None) -> Selection:
    """Fixed top-k ratio kept set of one layer (same scores and forced keys as `select_topp`)."""
    score_BS = selection_scores(q_BLNH, k_BSKH, valid_BS, config=config, rng=rng)
    return compact(topk_keep(score_BS, valid_BS, ratio_B, forced_keep(valid_BS, config)), valid_BS)


# ---------------------------------------------------------------------- score threshold
def threshold_keep(attn_BS: Float[Array, "B S"], valid_BS: Bool[Array, "B S"], threshold_B,
                   forced_BS: Bool[Array, "B S"] | None = None) -> Bool[Array, "B S"]:
    """Keep every valid key with attention score >= threshold, plus the forced keys; a row where
    nothing passes keeps its best key."""
    B = attn_BS.shape[0]
    thr = _per_row(threshold_B, B)
    attn = jnp.where(valid_BS, attn_BS.astype(jnp.float32), -jnp.inf)
    keep_BS = valid_BS & (attn >= thr[:, None])
    best_BS = _best_b(attn, valid_BS, jnp.minimum(valid_BS.sum(axis=1), 1))
    keep_BS = keep_BS | best_BS
    return keep_BS if forced_BS is None else keep_BS | (forced_BS & valid_BS)


def select_threshold(q_BLNH, k_BSKH, valid_BS, threshold_B, *, config: SelectionConfig = SelectionConfig(),
                     rng=None) -> Selection:
    """Fixed score-threshold kept set of one layer. The score is `select_topp`'s divided by the
    number of query heads: the mean attention probability a key receives from the probes."""
    score_BS = selection_scores(q_BLNH, k_BSKH, valid_BS, config=config, rng=rng)
    attn_BS = score_BS / q_BLNH.shape[2]
    return compact(threshold_keep(attn_BS, valid_BS, threshold_B, forced_keep(valid_BS, config)), valid_BS)


# ---------------------------------------------------------------------- FastV
def received_attention(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"],
                       valid_BS: Bool[Array, "B S"], *, query: str = "last",
                       sm_scale: float | None = None) -> Float[Array, "B S"]:
    """Attention each key receives in a causal prefill, averaged over query heads (float32).

    query="last": from each row's last valid query (FastV's implementation);
    query="all": mean over the valid queries that can see the key (causal), so early tokens are
    not favoured for being seen by more queries. 0 on padding keys.
    """
    if query not in FASTV_QUERIES:
        raise ValueError(f"received_attention: query must be one of {FASTV_QUERIES}, got {query!r}")
    _check_qk(q_BLNH, k_BSKH, valid_BS, "received_attention")
    B, L, N, H = q_BLNH.shape
    K = k_BSKH.shape[2]
    scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    q = jax.lax.stop_gradient(q_BLNH).astype(jnp.float32).reshape(B, L, K, N // K, H)
    k = jax.lax.stop_gradient(k_BSKH).astype(jnp.float32)
    pos = jnp.arange(L)
    if query == "last":
        last_B = jnp.max(jnp.where(valid_BS, pos[None], 0), axis=1)
        q = jnp.take_along_axis(q, last_B[:, None, None, None, None], axis=1)  # [B, 1, K, G, H]
        q_pos_BQ = last_B[:, None]
        q_ok_BQ = jnp.any(valid_BS, axis=1)[:, None]
    else:
        q_pos_BQ = jnp.broadcast_to(pos[None], (B, L))
        q_ok_BQ = valid_BS
    vis_BQS = valid_BS[:, None, :] & (pos[None, None, :] <= q_pos_BQ[:, :, None]) & q_ok_BQ[:, :, None]
    s_BKGQS = jnp.einsum("bqkgh,bskh->bkgqs", q, k, precision="highest") * scale
    s_BKGQS = jnp.where(vis_BQS[:, None, None], s_BKGQS, -jnp.inf)
    m = jnp.max(s_BKGQS, axis=-1, keepdims=True)
    e = jnp.where(vis_BQS[:, None, None], jnp.exp(s_BKGQS - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    a_BKGQS = e / jnp.where(den > 0, den, 1.0)
    per_key_BS = a_BKGQS.mean(axis=(1, 2)).sum(axis=1)  # mean over heads, sum over queries
    seen_BS = vis_BQS.sum(axis=1).astype(jnp.float32)
    return jnp.where(valid_BS, per_key_BS / jnp.maximum(seen_BS, 1.0), 0.0)


def fastv_keep(score_BS: Float[Array, "B S"], valid_BS: Bool[Array, "B S"], visual_BS: Bool[Array, "B S"],
               keep_frac_B) -> Bool[Array, "B S"]:
    """Drop the round((1 - keep_frac) * n_visual) lowest-scored visual tokens of each row; every
    other valid token is kept. keep_frac = 1 - R in FastV's terms (R = drop ratio)."""
    B, S = score_BS.shape
    frac = _per_row(keep_frac_B, B)
    vis_BS = visual_BS & valid_BS
    n_vis_B = vis_BS.sum(axis=1)
    drop_B = jnp.round((1.0 - frac) * n_vis_B.astype(jnp.float32)).astype(jnp.int32)
    drop_B = jnp.clip(drop_B, 0, n_vis_B)
    # Ascending score among visual tokens (ties: lower index dropped first).
    order_BS = jnp.argsort(jnp.where(vis_BS, score_BS.astype(jnp.float32), jnp.inf), axis=1, stable=True)
    drop_sorted = jnp.arange(S)[None, :] < drop_B[:, None]
    drop_BS = jnp.zeros((B, S), bool).at[jnp.arange(B)[:, None], order_BS].set(drop_sorted)
    return valid_BS & ~(drop_BS & vis_BS)


def select_fastv(q_BLNH, k_BSKH, valid_BS, visual_BS, keep_frac_B, *, query: str = "last") -> Selection:
    """FastV kept set from one layer's q/k (the layer whose attention ranks the visual tokens)."""
    score_BS = received_attention(q_BLNH, k_BSKH, valid_BS, query=query)
    return compact(fastv_keep(score_BS, valid_BS, visual_BS, keep_frac_B), valid_BS)
