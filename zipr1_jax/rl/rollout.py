"""Jitted rollout sampler: one prefill, then a `lax.while_loop` of cached decode steps.

    out = generate(model, prompt_ids_BL, prompt_mask_BL, rng,
                   config=SamplingConfig(max_new_tokens=32, eos_ids=(256,), pad_id=257, temperature=1.0),
                   p_B=p_B)                     # per-row sparsity threshold (multi-budget groups)
    out.tokens_BT, out.logprobs_BT, out.mask_BT, out.lengths_B, out.token_ratio_B, out.layer_ratio_BY

Prompts are LEFT padded (every row's last prompt token sits in the last column). Position ids and
M-RoPE deltas are computed on the host before jit (vision prompts need concrete ids and grids); the
image grids are static jit arguments because they fix the vision tower's shapes. There is no Python
loop over tokens: one compiled prefill per (prompt shape, grid, sparsity) and one compiled decode
loop per (prompt shape, SamplingConfig, cache capacity). After a sparse prefill one scalar is read
back and the cache is cut, in a program of its own, to the longest kept prompt (over rows and
layers, rounded up to the next 1/cache_steps of the prompt length) plus the new tokens; the
prompt-sized cache is released before decoding, so KV-cache pruning saves decode memory and time
for real. A dense layer or a p = 1 row keeps its whole prompt, and then so does the cache.

Log-probs returned are those of the sampled token under the temperature-scaled FULL distribution,
`log_softmax(logits / T)` (T = 1 for greedy), i.e. the policy the learner recomputes; top-k/top-p
only restrict which tokens can be drawn. Comparing them with the learner's old-policy log-probs is
the sampler-vs-trainer mismatch check.

Sparse prefill (ZipVL top-p selection, per-row p) is reached through one named hook: when `p_B` is
given the model must provide `SPARSE_PREFILL_METHOD` (see `_prefill`). With `p_B=None` the prefill
is dense and every token ratio is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zipr1_jax.models.qwen_vl.cache import KVCache
from zipr1_jax.rl.losses import token_logprobs_from_logits
from zipr1_jax.typing import Array, Bool, Float, Int

# The hook a sparse-capable model implements. Signature expected by `_prefill`:
#   model.sparse_prefill(input_ids_BL, *, capacity, attention_mask_BL, position_ids_3BL, rope_deltas_B,
#                        p_B, rng, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
#                        return_keep=True)
#     -> (last_logits_BV, cache: KVCache (compacted kept entries, per-layer lengths), layer_ratio_BY, keep_BYL)
# where layer_ratio_BY[b, y] = kept keys / valid prompt length of row b in layer y and keep_BYL the
# kept prompt keys of every layer.
SPARSE_PREFILL_METHOD = "sparse_prefill"


class RolloutError(ValueError):
    """Bad rollout inputs (shapes, padding side, sampling settings)."""


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Static sampling settings (hashable: part of the jit cache key)."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # Decode KV-cache capacity after a sparse prefill: the longest kept prompt (over rows and
    # layers) rounded up to the next 1/cache_steps of the prompt length, plus max_new_tokens, so
    # decoding holds and reads only what was kept; at most `cache_steps` decode programs compile per
    # prompt shape. 1: always the whole prompt length (one decode program).
    cache_steps: int = 8

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RolloutError(f"SamplingConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        if not self.eos_ids:
            raise RolloutError("SamplingConfig.eos_ids must hold at least one stop token id")
        if not self.temperature >= 0:
            raise RolloutError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise RolloutError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RolloutError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.cache_steps, bool) or not isinstance(self.cache_steps, int) or self.cache_steps < 1:
            raise RolloutError(f"SamplingConfig.cache_steps must be an int >= 1, got {self.cache_steps!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@struct.dataclass
class RolloutOutput:
    """tokens_BT: generated ids, `pad_id` after a row stopped; logprobs_BT: log pi(token), 0 where
    masked; mask_BT: True on generated tokens (the stop token included); lengths_B: their count;
    finished_B: the row emitted a stop token; token_ratio_B / layer_ratio_BY: prefill kept fraction
    (mean over layers / per layer); p_B: the thresholds used (1.0 = dense); keep_BYL: the prompt
    keys each layer kept (sparse rollouts; None for dense ones), which the learner reuses so its
    log-probs see exactly the sampler's attention; kv_capacity: slots per
    row and layer of the decode KV cache (static; see SamplingConfig.cache_steps)."""

    tokens_BT: Int[Array, "B T"]
    logprobs_BT: Float[Array, "B T"]
    mask_BT: Bool[Array, "B T"]
    lengths_B: Int[Array, "B"]
    finished_B: Bool[Array, "B"]
    token_ratio_B: Float[Array, "B"]
    layer_ratio_BY: Float[Array, "B Y"]
    p_B: Float[Array, "B"]
    keep_BYL: Bool[Array, "B Y L"] | None = None
    kv_capacity: int = struct.field(pytree_node=False, default=0)


# ---------------------------------------------------------------------- pure sampling functions
def filter_logits(logits_BV: Float[Array, "B V"], *, top_k: int = 0, top_p: float = 1.0) -> Float[Array, "B V"]:
    """Set logits outside the top-k set and outside the top-p nucleus to -inf.

    top-p keeps the smallest prefix of tokens (by descending probability) whose mass reaches `top_p`;
    the most likely token is always kept, so no row becomes empty.
    """
    neg = jnp.asarray(-jnp.inf, logits_BV.dtype)
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, neg, logits_BV)
    if top_p < 1.0:
        order_BV = jnp.argsort(-logits_BV, axis=-1)
        sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV.astype(jnp.float32), axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_sorted_BV = mass_before_BV < top_p
        keep_sorted_BV = keep_sorted_BV.at[:, 0].set(True)
        # Scatter the sorted keep-mask back to vocabulary order.
        keep_BV = jnp.zeros_like(keep_sorted_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(keep_sorted_BV)
        logits_BV = jnp.where(keep_BV, logits_BV, neg)
    return logits_BV


def first_argmax(x_BV: Float[Array, "B V"]) -> Int[Array, "B"]:
    """`jnp.argmax(x, axis=-1)` (first maximum; NaN counts as the maximum) as two plain reductions.

    Why: XLA's CPU backend runs argmax as one variadic (value, index) reduce, about twice as slow as
    a max followed by a min over the indices that attain it - and the decode loop pays it per token.
    """
    x_BV = jnp.where(jnp.isnan(x_BV), jnp.inf, x_BV)
    m_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
    V = x_BV.shape[-1]
    return jnp.min(jnp.where(x_BV == m_B1, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def sample_logits(logits_BV: Float[Array, "B V"], rng: jax.Array, *, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0) -> tuple[Int[Array, "B"], Float[Array, "B"]]:
    """Draw one token per row. Returns (tokens_B int32, logprobs_B float32).

    temperature 0 is greedy (argmax; ties go to the lowest id). Log-probs are of the temperature-
    scaled full distribution (T = 1 when greedy), see the module docstring.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0.0:
        tokens_B = first_argmax(logits_BV)
        scaled_BV = logits_BV
    else:
        scaled_BV = logits_BV / temperature
        filtered_BV = filter_logits(scaled_BV, top_k=top_k, top_p=top_p)
        # jax.random.categorical's own rule (argmax of logits + Gumbel noise), same draws.
        tokens_B = first_argmax(filtered_BV + jax.random.gumbel(rng, filtered_BV.shape, filtered_BV.dtype))
    logprobs_B = token_logprobs_from_logits(scaled_BV, tokens_B)
    return tokens_B, logprobs_B


BUDGETS = ("multi", "single")  # a threshold per rollout of a group / one per group


def budget_thresholds(p_grid, num_prompts: int, group_size: int, *, budget: str = "multi",
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-row thresholds p_B [num_prompts * G] for contiguous groups (row r is prompt r // G).

    "multi" (the paper's multi-budget rollouts): rollout n of every group uses p_grid[n], so
    len(p_grid) must equal G. "single" (paper v1): one p per group, drawn uniformly from p_grid
    with `rng` (required).
    """
    grid = np.asarray(p_grid, np.float32).reshape(-1)
    if grid.size == 0 or np.any(grid <= 0) or np.any(grid > 1):
        raise RolloutError(f"p_grid must be non-empty with values in (0, 1], got {grid.tolist()}")
    if num_prompts < 1 or group_size < 1:
        raise RolloutError(f"num_prompts and group_size must be >= 1, got {num_prompts}, {group_size}")
    if budget == "multi":
        if grid.size != group_size:
            raise RolloutError(f"multi-budget rollouts need one threshold per rollout: {grid.size} values "
                               f"for group size {group_size}")
        return np.tile(grid, num_prompts)
    if budget == "single":
        if rng is None:
            raise RolloutError("single-budget thresholds are drawn at random: pass rng")
        return np.repeat(grid[rng.integers(0, grid.size, num_prompts)], group_size)
    raise RolloutError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")


# ---------------------------------------------------------------------- prefill + decode loop
def _prefill(model, input_ids_BL, mask_BL, pos_3BL, deltas_B, p_B, rng, capacity, vision, sparsity=None):
    n_layers = model.config.text.num_hidden_layers
    B = input_ids_BL.shape[0]
    if p_B is None:
        logits_BV, cache, _ = model.prefill(input_ids_BL, capacity=capacity, attention_mask_BL=mask_BL,
                                            position_ids_3BL=pos_3BL, rope_deltas_B=deltas_B, **vision)
        return logits_BV, cache, jnp.ones((B, n_layers), jnp.float32), None
    hook = getattr(model, SPARSE_PREFILL_METHOD, None)
    if hook is None:
        raise NotImplementedError(
            f"per-row sparsity p_B was given but {type(model).__name__} has no `{SPARSE_PREFILL_METHOD}` method "
            "(the sparse prefill hook described in zipr1_jax/rl/rollout.py); pass p_B=None for dense rollouts")
    extra = {} if sparsity is None else {"sparsity": sparsity}
    logits_BV, cache, layer_ratio_BY, keep_BYL = hook(
        input_ids_BL, capacity=capacity, attention_mask_BL=mask_BL, position_ids_3BL=pos_3BL, rope_deltas_B=deltas_B,
        p_B=p_B, rng=rng, return_keep=True, **vision, **extra)
    return logits_BV, cache, layer_ratio_BY.astype(jnp.float32), keep_BYL


def decode_capacity(max_kept: int, L: int, T: int, steps: int) -> int:
    """Decode cache slots: `max_kept` prompt entries rounded up to the next multiple of
    ceil(L / steps) (at most L), plus room for the T generated tokens."""
    if not 0 <= max_kept <= L:
        raise RolloutError(f"kept prompt entries {max_kept} outside [0, L={L}]")
    unit = -(-L // steps)
    return min(L, -(-max(max_kept, 1) // unit) * unit) + T


def _prefill_impl(graphdef, state, input_ids_BL, mask_BL, pos_3BL, deltas_B, p_B, rng, pixel_values,
                  pixel_values_videos, *, image_grid, video_grid, capacity: int, sparsity=None):
    """Prompt pass: (last logits, KV cache with `capacity` slots, layer ratios, kept sets (None when
    dense), longest kept length)."""
    model = nnx.merge(graphdef, state)
    vision = dict(pixel_values=pixel_values, image_grid_thw=None if image_grid is None else np.asarray(image_grid),
                  pixel_values_videos=pixel_values_videos,
                  video_grid_thw=None if video_grid is None else np.asarray(video_grid))
    rng_select, _ = rollout_keys(rng)
    logits_BV, cache, layer_ratio_BY, keep_BYL = _prefill(model, input_ids_BL, mask_BL, pos_3BL, deltas_B, p_B,
                                                          rng_select, capacity, vision, sparsity)
    return logits_BV, cache, layer_ratio_BY, keep_BYL, jnp.max(cache.length)


def rollout_keys(rng) -> tuple[jax.Array, jax.Array]:
    """(selection key, sampling key) of a rollout's key: the prefill's top-p selection draws its
    probes from the first (per row: `selection.row_keys`), token sampling from the second. Anyone
    who recomputes the rollout's kept sets (the learner, the harness's timing and kept-mask
    pictures) takes the selection key from here."""
    rng_select, rng_sample = jax.random.split(rng)
    return rng_select, rng_sample


def _resize(cache: KVCache, capacity: int) -> KVCache:
    """The first min(capacity, S) slots of every layer and row, zero-padded to `capacity`."""
    S = cache.k.shape[2]
    keep = min(capacity, S)
    pad = ((0, 0), (0, 0), (0, capacity - keep), (0, 0), (0, 0))
    return KVCache(k=jnp.pad(cache.k[:, :, :keep], pad), v=jnp.pad(cache.v[:, :, :keep], pad), length=cache.length)


def _decode_impl(graphdef, state, logits_BV, cache, mask_BL, deltas_B, rng, *, config: SamplingConfig,
                 backend: str | None = None):
    """Sample token 0 from the prefill logits, then the `lax.while_loop` of cached decode steps."""
    model = nnx.merge(graphdef, state)
    B = mask_BL.shape[0]
    T = config.max_new_tokens
    _, rng_sample = rollout_keys(rng)
    eos_E = jnp.asarray(config.eos_ids, jnp.int32)
    # Position of generated token i: (valid prompt length + i) + rope delta. Tracked here, not read
    # from the cache, because a sparse cache holds fewer entries than the tokens it has seen.
    n_valid_B = jnp.sum(mask_BL > 0, axis=1).astype(jnp.int32)
    sample = lambda logits, key: sample_logits(logits, key, temperature=config.temperature,  # noqa: E731
                                               top_p=config.top_p, top_k=config.top_k)

    tok0_B, lp0_B = sample(logits_BV, jax.random.fold_in(rng_sample, 0))
    tokens_BT = jnp.full((B, T), config.pad_id, jnp.int32).at[:, 0].set(tok0_B)
    logprobs_BT = jnp.zeros((B, T), jnp.float32).at[:, 0].set(lp0_B)
    mask_BT = jnp.zeros((B, T), bool).at[:, 0].set(True)
    done_B = jnp.isin(tok0_B, eos_E)

    def cond(carry):
        i, _, _, _, _, done_B, _ = carry
        return (i < T) & ~jnp.all(done_B)

    def body(carry):
        # Feed token i-1, sample token i.
        i, cache, last_B, tokens_BT, logprobs_BT, done_B, mask_BT = carry
        pos_B1 = (n_valid_B + i - 1 + deltas_B)[:, None]
        pos_3B1 = jnp.broadcast_to(pos_B1[None], (3, B, 1))
        logits_B1V, cache = model.decode_step(last_B[:, None], cache, position_ids_3BT=pos_3B1, backend=backend)
        tok_B, lp_B = sample(logits_B1V[:, 0], jax.random.fold_in(rng_sample, i))
        live_B = ~done_B
        tok_B = jnp.where(live_B, tok_B, config.pad_id)
        tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, tok_B[:, None], (0, i))
        logprobs_BT = jax.lax.dynamic_update_slice(logprobs_BT, jnp.where(live_B, lp_B, 0.0)[:, None], (0, i))
        mask_BT = jax.lax.dynamic_update_slice(mask_BT, live_B[:, None], (0, i))
        done_B = done_B | (live_B & jnp.isin(tok_B, eos_E))
        return i + 1, cache, tok_B, tokens_BT, logprobs_BT, done_B, mask_BT

    carry = (jnp.asarray(1, jnp.int32), cache, tok0_B, tokens_BT, logprobs_BT, done_B, mask_BT)
    _, _, _, tokens_BT, logprobs_BT, done_B, mask_BT = jax.lax.while_loop(cond, body, carry)
    return tokens_BT, logprobs_BT, mask_BT, done_B


_prefill_jit = jax.jit(_prefill_impl, static_argnames=("graphdef", "image_grid", "video_grid", "sparsity",
                                                     "capacity"))


def prefill_program(model: nnx.Module, ids_BL, mask_BL, pos_3BL, deltas_B, p_B, rng, *, pixel_values=None,
                    pixel_values_videos=None, image_grid=None, video_grid=None, max_new_tokens: int, sparsity=None):
    """The jitted prompt pass exactly as `generate` runs it (same program, same cache-size rule:
    L + T slots dense, L sparse before the cut), for callers that time it (the eval harness)."""
    graphdef, state = nnx.split(model)
    L = ids_BL.shape[1]
    opt = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    mask_BL = jnp.asarray(mask_BL).astype(jnp.int32)  # as generate() passes it: the same compiled program
    return _prefill_jit(graphdef, state, jnp.asarray(ids_BL, jnp.int32), mask_BL, jnp.asarray(pos_3BL, jnp.int32),
                        jnp.asarray(deltas_B, jnp.int32), None if p_B is None else jnp.asarray(p_B, jnp.float32), rng, opt(pixel_values), opt(pixel_values_videos),
                        image_grid=_static_grid(image_grid), video_grid=_static_grid(video_grid),
                        capacity=L if p_B is not None else L + max_new_tokens, sparsity=sparsity)


# A program of its own: the prompt-sized cache is released before the decode starts, so only the
# pruned one is alive while decoding.
_resize_jit = jax.jit(_resize, static_argnames=("capacity",))
_decode_jit = jax.jit(_decode_impl, static_argnames=("graphdef", "config", "backend"))


def _static_grid(grid) -> tuple[tuple[int, ...], ...] | None:
    if grid is None:
        return None
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[1] != 3:
        raise RolloutError(f"grid_thw must be [num_images, 3], got shape {g.shape}")
    return tuple(tuple(int(x) for x in row) for row in g.tolist())


def generate(model, input_ids_BL, attention_mask_BL, rng: jax.Array, *, config: SamplingConfig,
             p_B=None, position_ids_3BL=None, rope_deltas_B=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, sparsity=None) -> RolloutOutput:
    """Sample up to `config.max_new_tokens` tokens per row of a left-padded prompt batch.

    Args:
      model: a `QwenVLForConditionalGeneration` (anything with `prefill`, `decode_step`, `position_ids`).
      input_ids_BL, attention_mask_BL: left-padded prompts ([B, L] ints, mask 1 on real tokens).
      rng: PRNG key; the same key gives the same rollouts.
      p_B: optional [B] float top-p sparsity thresholds (rollout n of a group uses p_grid[n]);
        None runs dense attention (token ratio 1).
      position_ids_3BL, rope_deltas_B: precomputed M-RoPE ids (e.g. from the data pipeline);
        computed on the host from the prompt and grids when omitted.
      pixel_values / image_grid_thw / ...: vision inputs; grids are host arrays (static shapes).
      sparsity: the SparsityConfig of the sparse prefill (static; None: the model's own default).
        Pass the learner's config so rollout and learner select keys the same way. Its `backend`
        also picks the cached decode's attention kernels (None: by platform).
    Returns:
      RolloutOutput with [B, max_new_tokens] tokens / log-probs / mask and per-row ratios.
    """
    ids = np.asarray(input_ids_BL) if not isinstance(input_ids_BL, jax.Array) else input_ids_BL
    if ids.ndim != 2:
        raise RolloutError(f"input_ids must be [B, L], got shape {ids.shape}")
    mask = jnp.asarray(attention_mask_BL).astype(jnp.int32)
    if mask.shape != ids.shape:
        raise RolloutError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if not isinstance(mask, jax.core.Tracer):
        m = np.asarray(mask)
        if not np.all(m[:, -1] > 0):
            raise RolloutError("prompts must be LEFT padded: the last column of attention_mask must be 1 in every row")
        if np.any(np.diff(m, axis=1) < 0):
            raise RolloutError("attention_mask has padding after a real token (prompts must be left padded)")
    if position_ids_3BL is None:
        position_ids_3BL, rope_deltas_B = model.position_ids(ids, mask, image_grid_thw, video_grid_thw,
                                                             second_per_grid_ts)
    elif rope_deltas_B is None:
        raise RolloutError("pass rope_deltas_B together with position_ids_3BL")
    if p_B is not None:
        p_B = jnp.asarray(p_B, jnp.float32)
        if p_B.shape != (ids.shape[0],):
            raise RolloutError(f"p_B must have shape ({ids.shape[0]},), got {p_B.shape}")
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(ids, jnp.int32)
    deltas = jnp.asarray(rope_deltas_B, jnp.int32)
    L, T = ids.shape[1], config.max_new_tokens
    # Dense prefill: the cache is built at L + T directly. Sparse: built at L, then cut to the kept size.
    sparse = p_B is not None
    logits_BV, cache, layer_ratio_BY, keep_BYL, max_kept = _prefill_jit(
        graphdef, state, ids, mask, jnp.asarray(position_ids_3BL, jnp.int32), deltas, p_B, rng,
        None if pixel_values is None else jnp.asarray(pixel_values),
        None if pixel_values_videos is None else jnp.asarray(pixel_values_videos),
        image_grid=_static_grid(image_grid_thw), video_grid=_static_grid(video_grid_thw),
        capacity=L if sparse else L + T, sparsity=sparsity)
    capacity = L + T
    if sparse and not isinstance(max_kept, jax.core.Tracer):
        # One host read of a replicated scalar picks the cache size (the only sync of a rollout). It is
        # the longest kept prompt over rows AND layers: a dense layer or a p = 1 row keeps its whole
        # prompt. Traced inside a caller's jit there is nothing to read: the whole prompt length then.
        capacity = decode_capacity(int(jax.device_get(max_kept)), L, T, config.cache_steps)
    if cache.k.shape[2] != capacity:
        cache = _resize_jit(cache, capacity=capacity)
    tokens_BT, logprobs_BT, mask_BT, done_B = _decode_jit(graphdef, state, logits_BV, cache, mask, deltas, rng,
                                                          config=config,
                                                          backend=None if sparsity is None else sparsity.backend)
    B = ids.shape[0]
    return RolloutOutput(tokens_BT=tokens_BT, logprobs_BT=logprobs_BT, mask_BT=mask_BT,
                         lengths_B=jnp.sum(mask_BT, axis=1).astype(jnp.int32), finished_B=done_B,
                         token_ratio_B=jnp.mean(layer_ratio_BY, axis=1), layer_ratio_BY=layer_ratio_BY,
                         p_B=jnp.ones((B,), jnp.float32) if p_B is None else p_B.astype(jnp.float32),
                         keep_BYL=keep_BYL, kv_capacity=capacity)
