"""ZipR1 top-p token selection for one decoder layer (docs/method.md section 1).

Pure JAX with static shapes (jittable, vmappable over nothing: the batch is explicit):

1. probe queries: the most recent `probe_recent` fraction of each row's VALID positions plus
   `probe_random` sampled uniformly without replacement from the rest (ZipCache); counts are
   per row (rows have different valid lengths), laid out in a static number of probe slots with
   a per-slot validity mask;
2. float32 probe softmax over keys with causal + padding mask, summed over the query heads of
   each GQA group, over kv heads and over probes (one score per key);
3. key j is divided by the number of probes that can see it (probe position >= j), so early
   tokens are not favoured for being early;
4. stable descending sort (ties -> lower index first) and the fewest keys whose cumulative score
   reaches p * total; p = 1.0 keeps every valid key (no floating-point gamble);
5. always keep the first valid token and the recent-probe window (*ours*), never padding.

Selection is a stop-gradient choice: inputs are wrapped in `lax.stop_gradient`. Its kept count is
piecewise constant in the parameters, so the learner's efficiency gradient (docs/method.md 3b) uses
`soft_token_ratio`: the same probes and ranking with a sigmoid in place of the hard cut.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zipr1_jax.kernels.sparse_attention.config import SelectionConfig
from zipr1_jax.typing import Array, Bool, Float, Int


class Selection(NamedTuple):
    """Kept set of one layer.

    keep_BS: bool [B, S] keep mask (padding never kept).
    kept_idx_BT: int32 [B, S] ascending original indices of kept keys compacted to the front;
      slots >= kept_count hold a safe in-range index (the last kept index, 0 for an empty row).
    kept_count_B: int32 [B] number of kept keys `b`.
    token_ratio_B: float32 [B] `b / L_valid` (0 for an all-padding row).
    """

    keep_BS: Bool[Array, "B S"]
    kept_idx_BT: Int[Array, "B T"]
    kept_count_B: Int[Array, "B"]
    token_ratio_B: Float[Array, "B"]


def probe_counts(n_B: Int[Array, "B"], config: SelectionConfig) -> tuple[Array, Array]:
    """Per-row (recent, random) probe counts for valid lengths `n_B` (int32, float32 ceil).

    recent = max(1, ceil(probe_recent * n)), random = ceil(probe_random * n); recent probes are
    added up to min_probes; the total is capped at n.
    """
    n = n_B.astype(jnp.int32)
    if config.probes == "all":
        return n, jnp.zeros_like(n)
    nf = n.astype(jnp.float32)
    recent = jnp.maximum(1, jnp.ceil(jnp.float32(config.probe_recent) * nf).astype(jnp.int32))
    rand = jnp.ceil(jnp.float32(config.probe_random) * nf).astype(jnp.int32)
    recent = jnp.where(recent + rand < config.min_probes, config.min_probes - rand, recent)
    recent = jnp.minimum(recent, n)
    rand = jnp.minimum(rand, n - recent)
    return recent, rand


def probe_window(n_B: Int[Array, "B"], config: SelectionConfig) -> Array:
    """Size of the recent window kept by `keep_probe_window`: the sampled rule's recent count
    (also with probes="all", where every query probes but the window stays the recent fraction)."""
    if config.probes == "all":
        config = dataclasses.replace(config, probes="sampled")
    return probe_counts(n_B, config)[0]


def num_probe_slots(S: int, config: SelectionConfig) -> int:
    """Static probe-slot count: the largest total probe count over valid lengths 0..S."""
    if config.probes == "all":
        return S
    # Same float32 arithmetic as `probe_counts`, evaluated on host for every length.
    n = np.arange(S + 1, dtype=np.float32)
    recent = np.maximum(1, np.ceil(np.float32(config.probe_recent) * n)).astype(np.int64)
    rand = np.ceil(np.float32(config.probe_random) * n).astype(np.int64)
    recent = np.where(recent + rand < config.min_probes, config.min_probes - rand, recent)
    total = np.minimum(recent + rand, np.arange(S + 1))
    return max(1, int(total.max()))


def row_keys(rng, B: int):
    """Per-row selection keys [B]: a single key is split into B; a [B] key array passes through.

    Keys per row make a row's random probes independent of the batch it sits in, so a learner that
    slices a rollout batch into micro-batches (handing each slice its rows' keys) draws the probes
    the rollout drew.
    """
    if rng is None:
        return None
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        raise ValueError("selection keys must be typed jax.random.key(...) keys (not raw uint32 PRNGKey data)")
    if rng.ndim == 0:
        return jax.random.split(rng, B)
    if rng.shape != (B,):
        raise ValueError(f"per-row selection keys must have shape ({B},), got {rng.shape}")
    return rng


def choose_probes(valid_BS: Bool[Array, "B S"], config: SelectionConfig, rng) -> tuple[Array, Array, Array]:
    """Probe positions per row in static slots. `rng`: one key for the batch, or [B] per-row keys.

    Returns:
      probe_pos_BR int32 (slot -> original position, 0 for unused slots), probe_ok_BR bool,
      recent_B int32 (number of recent probes; they are the last `recent` valid positions).
    """
    B, S = valid_BS.shape
    R = num_probe_slots(S, config)
    n_B = valid_BS.sum(axis=1).astype(jnp.int32)
    recent_B, rand_B = probe_counts(n_B, config)
    # Valid positions in ascending order at ranks 0..n-1 (stable: padding goes after).
    pos_of_rank_BS = jnp.argsort(~valid_BS, axis=1, stable=True).astype(jnp.int32)
    rank_S = jnp.arange(S, dtype=jnp.int32)
    slot_R = jnp.arange(R, dtype=jnp.int32)
    if rng is None:
        if config.probes == "sampled" and config.probe_random > 0:
            raise ValueError("select_topp needs an `rng` key when probes='sampled' and probe_random > 0")
        rng = jax.random.key(0)
    # Random probes: a uniformly random order of the eligible ranks [0, n - recent).
    if rng.ndim == 0:
        u_BS = jax.random.uniform(rng, (B, S))
    else:
        u_BS = jax.vmap(lambda key: jax.random.uniform(key, (S,)))(rng)
    eligible_BS = rank_S[None, :] < (n_B - recent_B)[:, None]
    order_BS = jnp.argsort(jnp.where(eligible_BS, u_BS, 2.0), axis=1, stable=True).astype(jnp.int32)
    recent_rank_BR = n_B[:, None] - recent_B[:, None] + slot_R[None, :]
    rand_slot_BR = jnp.clip(slot_R[None, :] - recent_B[:, None], 0, S - 1)
    rand_rank_BR = jnp.take_along_axis(order_BS, rand_slot_BR, axis=1)
    is_recent_BR = slot_R[None, :] < recent_B[:, None]
    rank_BR = jnp.where(is_recent_BR, recent_rank_BR, rand_rank_BR)
    probe_ok_BR = slot_R[None, :] < (recent_B + rand_B)[:, None]
    rank_BR = jnp.where(probe_ok_BR, jnp.clip(rank_BR, 0, S - 1), 0)
    probe_pos_BR = jnp.take_along_axis(pos_of_rank_BS, rank_BR, axis=1)
    return probe_pos_BR, probe_ok_BR, recent_B


def probe_scores(q_BLNH, k_BSKH, valid_BS, probe_pos_BR, probe_ok_BR, *, normalise: bool = True,
                 sm_scale: float | None = None) -> Float[Array, "B S"]:
    """Summed (and normalised) float32 probe attention per key; 0 for padding keys."""
    B, L, N, H = q_BLNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    q_BRNH = jnp.take_along_axis(q_BLNH, probe_pos_BR[:, :, None, None], axis=1).astype(jnp.float32)
    q_BRKGH = q_BRNH.reshape(B, -1, K, G, H)
    k = k_BSKH.astype(jnp.float32)
    s_BKGRS = jnp.einsum("brkgh,bskh->bkgrs", q_BRKGH, k, precision="highest") * scale
    j_S = jnp.arange(S, dtype=jnp.int32)
    vis_BRS = (valid_BS[:, None, :] & (j_S[None, None, :] <= probe_pos_BR[:, :, None])
               & probe_ok_BR[:, :, None])
    vis = vis_BRS[:, None, None]
    s_BKGRS = jnp.where(vis, s_BKGRS, -jnp.inf)
    m = jnp.max(s_BKGRS, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # unused probe slots see nothing: no inf - inf
    e = jnp.where(vis, jnp.exp(s_BKGRS - m), 0.0)
    den = e.sum(axis=-1, keepdims=True)
    a = e / jnp.where(den > 0, den, 1.0)
    score_BS = a.sum(axis=(1, 2, 3))
    if normalise:
        count_BS = vis_BRS.sum(axis=1).astype(jnp.float32)
        score_BS = score_BS / jnp.maximum(count_BS, 1.0)
    return jnp.where(valid_BS, score_BS, 0.0)


def topp_keep(score_BS: Float[Array, "B S"], valid_BS: Bool[Array, "B S"],
              p_B: Float[Array, "B"]) -> Bool[Array, "B S"]:
    """Fewest valid keys (highest scores first, ties by lower index) whose sum reaches p * total.

    p >= 1 keeps every valid key; a row whose total is 0 keeps just its best key.
    """
    B, S = score_BS.shape
    score = jnp.where(valid_BS, score_BS.astype(jnp.float32), 0.0)
    n_B = valid_BS.sum(axis=1)
    # Stable sort on (-score) with padding pushed last: equal scores keep index order.
    order_BS = jnp.argsort(jnp.where(valid_BS, -score, jnp.inf), axis=1, stable=True)
    sorted_BS = jnp.take_along_axis(score, order_BS, axis=1)
    csum_BS = jnp.cumsum(sorted_BS, axis=1)
    total_B = csum_BS[:, -1]  # the same float sum the cut compares with (padding adds 0)
    p = p_B.astype(jnp.float32)
    below = (csum_BS < (p * total_B)[:, None]) & (jnp.arange(S)[None, :] < n_B[:, None])
    b_B = jnp.minimum(below.sum(axis=1) + 1, n_B)
    b_B = jnp.where(p >= 1.0, n_B, b_B)
    keep_sorted = jnp.arange(S)[None, :] < b_B[:, None]
    keep_BS = jnp.zeros((B, S), bool).at[jnp.arange(B)[:, None], order_BS].set(keep_sorted)
    return keep_BS & valid_BS


def compact(keep_BS: Bool[Array, "B S"], valid_BS: Bool[Array, "B S"]) -> Selection:
    """Keep mask -> Selection (ascending kept indices at the front, safe pad index, ratios)."""
    S = keep_BS.shape[1]
    count_B = keep_BS.sum(axis=1).astype(jnp.int32)
    idx_BS = jnp.argsort(~keep_BS, axis=1, stable=True).astype(jnp.int32)
    last_B = jnp.take_along_axis(idx_BS, jnp.maximum(count_B - 1, 0)[:, None], axis=1)
    last_B = jnp.where(count_B[:, None] > 0, last_B, 0)
    idx_BS = jnp.where(jnp.arange(S)[None, :] < count_B[:, None], idx_BS, last_B)
    n_B = valid_BS.sum(axis=1).astype(jnp.float32)
    ratio_B = jnp.where(n_B > 0, count_B.astype(jnp.float32) / jnp.maximum(n_B, 1.0), 0.0)
    return Selection(keep_BS, idx_BS, count_B, ratio_B)


def select_topp(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"],
                valid_BS: Bool[Array, "B S"], p_B, *, config: SelectionConfig = SelectionConfig(),
                rng=None, sm_scale: float | None = None) -> Selection:
    """Top-p kept set of one layer (prefill: query l is the token at array index l, L == S).

    Args:
      q_BLNH, k_BSKH: RoPE'd queries / keys of the layer (any float dtype; scored in float32).
      valid_BS: True on real tokens (left or right padding, or any mask).
      p_B: threshold per batch row (float, shape [B] or scalar broadcast).
      config: probe / keep options.
      rng: jax PRNG key for the random probes (required when probes='sampled' and probe_random>0).
    Returns:
      Selection(keep_BS, kept_idx_BT with T = S, kept_count_B, token_ratio_B).
    """
    if q_BLNH.ndim != 4 or k_BSKH.ndim != 4:
        raise ValueError(f"q [B, L, N, H] and k [B, S, K, H] must be rank 4, got {q_BLNH.shape}, {k_BSKH.shape}")
    B, L, N, H = q_BLNH.shape
    Bk, S, K, Hk = k_BSKH.shape
    if (Bk, Hk) != (B, H):
        raise ValueError(f"k {k_BSKH.shape} must match q {q_BLNH.shape} in batch and head_dim")
    if L != S:
        raise ValueError(f"select_topp scores a prefill: query length L={L} must equal key length S={S}")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K} (GQA)")
    if tuple(valid_BS.shape) != (B, S) or valid_BS.dtype != jnp.bool_:
        raise ValueError(f"valid_BS must be bool of shape {(B, S)}, got {valid_BS.dtype}{tuple(valid_BS.shape)}")
    if not isinstance(config, SelectionConfig):
        raise ValueError(f"config must be a SelectionConfig, got {type(config)}")
    p_B = jnp.broadcast_to(jnp.asarray(p_B, jnp.float32), (B,))
    q_BLNH = jax.lax.stop_gradient(q_BLNH)
    k_BSKH = jax.lax.stop_gradient(k_BSKH)
    probe_pos_BR, probe_ok_BR, _ = choose_probes(valid_BS, config, rng)
    score_BS = probe_scores(q_BLNH, k_BSKH, valid_BS, probe_pos_BR, probe_ok_BR,
                            normalise=config.normalise, sm_scale=sm_scale)
    keep_BS = topp_keep(score_BS, valid_BS, p_B) | always_kept(valid_BS, config)
    return compact(keep_BS, valid_BS)


def always_kept(valid_BS: Bool[Array, "B S"], config: SelectionConfig) -> Bool[Array, "B S"]:
    """Keys kept whatever their score: the first valid token and the recent-probe window (*ours*)."""
    rank_BS = jnp.cumsum(valid_BS, axis=1) - 1
    n_B = valid_BS.sum(axis=1)
    keep_BS = jnp.zeros(valid_BS.shape, bool)
    if config.keep_first:
        keep_BS = keep_BS | (valid_BS & (rank_BS == 0))
    if config.keep_probe_window:
        window_B = probe_window(n_B, config)
        keep_BS = keep_BS | (valid_BS & (rank_BS >= (n_B - window_B)[:, None]))
    return keep_BS


# ---------------------------------------------------------------------- the relaxed count (docs/method.md 3b)
def soft_topp_count(score_BS: Float[Array, "B S"], valid_BS: Bool[Array, "B S"], p_B: Float[Array, "B"], *,
                    temperature: float, forced_BS: Bool[Array, "B S"] | None = None) -> Float[Array, "B"]:
    """Differentiable version of `topp_keep(...).sum(1)` (plus `forced_BS` keys, counted as kept).

    Keys are ranked by the STOP-GRADIENT scores exactly as `topp_keep` ranks them; the key at rank k
    counts sigmoid((p * total - C_k) / (T * total)), C_k = the score ranked before it (exclusive
    cumulative sum, the same float cumsum the hard cut compares). The hard rule keeps rank k iff
    C_k < p * total (rank 0 always), so as T -> 0 the sum tends to the hard count (a key exactly on
    the cut counts 1/2 at every T). Gradients reach the scores through C_k and the total: moving
    mass onto the top-ranked keys pushes the later ones past the cut. p >= 1 keeps every valid key
    (a constant, no gradient), as `topp_keep` does; a row whose total is 0 counts its best key.
    """
    if not temperature > 0:
        raise ValueError(f"soft_topp_count: temperature must be > 0, got {temperature!r}")
    B, S = score_BS.shape
    score = jnp.where(valid_BS, score_BS.astype(jnp.float32), 0.0)
    n_B = valid_BS.sum(axis=1)
    order_BS = jnp.argsort(jnp.where(valid_BS, -jax.lax.stop_gradient(score), jnp.inf), axis=1, stable=True)
    sorted_BS = jnp.take_along_axis(score, order_BS, axis=1)
    csum_BS = jnp.cumsum(sorted_BS, axis=1)
    total_B = csum_BS[:, -1]
    before_BS = jnp.concatenate([jnp.zeros((B, 1), jnp.float32), csum_BS[:, :-1]], axis=1)
    p = jnp.asarray(p_B, jnp.float32)
    pos = total_B > 0
    scale_B = jnp.where(pos, temperature * total_B, 1.0)
    soft_BS = jax.nn.sigmoid(((p * total_B)[:, None] - before_BS) / scale_B[:, None])
    rank_S = jnp.arange(S)[None, :]
    soft_BS = jnp.where(pos[:, None], soft_BS, (rank_S == 0).astype(jnp.float32))
    soft_BS = jnp.where((p >= 1.0)[:, None], 1.0, soft_BS)
    if forced_BS is not None:
        forced_sorted_BS = jnp.take_along_axis(forced_BS & valid_BS, order_BS, axis=1)
        soft_BS = jnp.where(forced_sorted_BS, 1.0, soft_BS)
    soft_BS = jnp.where(rank_S < n_B[:, None], soft_BS, 0.0)
    return soft_BS.sum(axis=1)


def soft_token_ratio(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"], valid_BS: Bool[Array, "B S"],
                     p_B, *, temperature: float, config: SelectionConfig = SelectionConfig(), rng=None,
                     sm_scale: float | None = None) -> Float[Array, "B"]:
    """Relaxed token ratio of one layer WITH gradient: `select_topp`'s ratio made differentiable.

    Same probes (same `rng`, same config), same float32 probe scores and ranking as `select_topp`,
    but q and k keep their gradient and the kept count is `soft_topp_count` (always-kept keys count
    1). Returns b_soft / n_valid per row (0 for an all-padding row); as temperature -> 0 it tends
    to `select_topp(...).token_ratio_B`.
    """
    B, S = valid_BS.shape
    if q_BLNH.shape[:2] != (B, S) or k_BSKH.shape[:2] != (B, S):
        raise ValueError(f"soft_token_ratio scores a prefill: q {q_BLNH.shape} and k {k_BSKH.shape} must "
                         f"start with (B, S) = {(B, S)}")
    p_B = jnp.broadcast_to(jnp.asarray(p_B, jnp.float32), (B,))
    probe_pos_BR, probe_ok_BR, _ = choose_probes(valid_BS, config, rng)
    score_BS = probe_scores(q_BLNH, k_BSKH, valid_BS, probe_pos_BR, probe_ok_BR, normalise=config.normalise,
                            sm_scale=sm_scale)
    count_B = soft_topp_count(score_BS, valid_BS, p_B, temperature=temperature,
                              forced_BS=always_kept(valid_BS, config))
    n_B = valid_BS.sum(axis=1).astype(jnp.float32)
    return jnp.where(n_B > 0, count_B / jnp.maximum(n_B, 1.0), 0.0)
