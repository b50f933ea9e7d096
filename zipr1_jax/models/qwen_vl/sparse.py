"""ZipR1 top-p sparse attention inside the Qwen-VL decoder (docs/method.md sections 1-2).

Two entry points, attached to `QwenVLForConditionalGeneration` through `SparseMixin`:

  - `sparse_forward`: full forward (the learner). In every sparse decoder layer y the layer's
    post-RoPE q/k score the keys of columns [0, E) (E = `select_end`, the left-padded prompt) with
    `select_topp`; the kept set is those kept prompt keys plus every VALID column >= E (the
    response, never pruned), and every query attends only to kept keys (causal on original
    indices) through `sparse_attention`.
  - `sparse_prefill`: the rollout's prompt pass (the `sparse_prefill` hook of zipr1_jax/rl/rollout.py).
    Same selection with E = L; each layer's kept K/V entries are compacted to the front of the
    KV cache (original order) with per-layer length = kept count, so decode reads only them.

Both use the per-layer selection keys `fold_in(key_b, y)` (key_b: row b's key, `row_keys`). Because
attention is causal, the prompt columns of `sparse_forward(prompt + response, select_end=L_prompt)` see exactly what the
prefill saw, so they pick the same kept sets. The learner does not rely on that recomputation:
`sparse_prefill(..., return_keep=True)` hands the rollout's kept sets out and
`sparse_forward(..., kept_BYE=)` reuses them, so a near-tie at the top-p cut (two differently
shaped float computations) cannot flip a key between sampler and learner, and the learner skips
the selection work.

Token ratios (docs/method.md 1.6):
  layer_ratio_BY[b, y] = kept prompt keys / valid prompt keys of row b in layer y (the [0, E) slice;
    0 for an all-padding row) for a sparse layer, and exactly 1.0 for a dense layer (a layer not in
    `sparsity.layers`, or `sparsity.enabled=False`): a dense layer keeps everything.
  token_ratio_B = mean of layer_ratio_BY over ALL decoder layers (dense layers count as 1.0), so
    it is the fraction of the prompt KV cache a rollout keeps.

Selection is a stop-gradient choice (inside `select_topp`, and the keep mask is boolean); gradients
flow through attention over the kept keys. Rows with p = 1.0 keep every valid key: exactly dense.

Alternative keep rules (evaluation baselines: top-k, score threshold, FastV; zipr1_jax/eval/methods.py)
plug in through `keep_fn` (argument, else the model attribute `keep_fn`, like `sparsity`):
  keep_fn(input_ids_BL=, valid_BL=, p_B=, select_end=, sparsity=, model_config=) -> layer_fn
  layer_fn(y, q_BLNH, k_BLKH, rng) -> (keep_BL, ratio_B), or None for a dense layer
called once per forward, then once per decoder layer in order (so a rule may rank at one layer and
prune later ones). It replaces `layer_keep` and `sparsity.layers`; attention / cache are unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig, select_topp, sparse_attention
from zipr1_jax.kernels.sparse_attention.selection import compact, row_keys, soft_token_ratio
from zipr1_jax.models.qwen_vl.cache import KVCache, compact_front
from zipr1_jax.models.qwen_vl.text import dense_attention, slice_positions
from zipr1_jax.typing import Array, Bool, Float


@struct.dataclass
class SparseOutput:
    """logits [B, L, V] float32; token_ratio_B [B]; layer_ratio_BY [B, Y] (see module docstring).

    With `soft_temperature` set: soft_layer_ratio_BY [B, Y] (the relaxed ratio of every sparse layer,
    WITH gradient; 1.0 in dense layers) and soft_ratio_B [B], its mean over the SPARSE layers only.
    """

    logits: jax.Array
    token_ratio_B: jax.Array
    layer_ratio_BY: jax.Array
    soft_ratio_B: jax.Array | None = None
    soft_layer_ratio_BY: jax.Array | None = None


# ---------------------------------------------------------------------- pure per-layer pieces
def layer_keep(q_BLNH: Float[Array, "B L N H"], k_BLKH: Float[Array, "B L K H"], valid_BL: Bool[Array, "B L"],
               p_B: Float[Array, "B"], *, selection: SelectionConfig, rng, select_end: int | None = None
               ) -> tuple[Bool[Array, "B L"], Float[Array, "B"]]:
    """Kept keys of one layer: top-p over columns [0, E) plus every valid column >= E.

    Returns (keep_BL, ratio_B) with ratio_B = kept / valid over [0, E) (Selection.token_ratio_B).
    """
    L = q_BLNH.shape[1]
    E = L if select_end is None else select_end
    sel = select_topp(q_BLNH[:, :E], k_BLKH[:, :E], valid_BL[:, :E], p_B, config=selection, rng=rng)
    keep_BL = jnp.concatenate([sel.keep_BS, valid_BL[:, E:]], axis=1)
    return keep_BL, sel.token_ratio_B


def given_keep(kept_BE: Bool[Array, "B E"], valid_BL: Bool[Array, "B L"]
               ) -> tuple[Bool[Array, "B L"], Float[Array, "B"]]:
    """`layer_keep`'s result from a kept set chosen earlier over the first E columns (the rollout's)."""
    E = kept_BE.shape[1]
    keep_BE = jnp.asarray(kept_BE, bool) & valid_BL[:, :E]
    n_valid_B = valid_BL[:, :E].sum(axis=1).astype(jnp.float32)
    ratio_B = jnp.where(n_valid_B > 0, keep_BE.sum(axis=1) / jnp.maximum(n_valid_B, 1.0), 0.0)
    return jnp.concatenate([keep_BE, valid_BL[:, E:]], axis=1), ratio_B.astype(jnp.float32)


def attend_kept(q_BLNH, k_BLKH, v_BLKH, keep_BL: Bool[Array, "B L"], *, sparsity: SparsityConfig):
    """`sparse_attention` of every query over the kept keys (mode / backend / buckets of `sparsity`)."""
    sel = compact(keep_BL, keep_BL)
    return sparse_attention(q_BLNH, k_BLKH, v_BLKH, kept_idx_BT=sel.kept_idx_BT, kept_count_B=sel.kept_count_B,
                            mode=sparsity.mode, backend=sparsity.backend,
                            capacity_buckets=sparsity.capacity_buckets)


def layer_rng(rng_B, layer: int):
    """Per-row selection keys [B] of decoder layer `layer` (shared by sparse_forward and sparse_prefill)."""
    return None if rng_B is None else jax.vmap(lambda key: jax.random.fold_in(key, layer))(rng_B)


# ---------------------------------------------------------------------- argument checks
def _check_sparsity(model, sparsity) -> SparsityConfig:
    if sparsity is None:
        # The rollout hook carries no config: a model may hold one (`model.sparsity = cfg`).
        sparsity = getattr(model, "sparsity", None) or SparsityConfig()
    if not isinstance(sparsity, SparsityConfig):
        raise ValueError(f"sparsity must be a SparsityConfig, got {type(sparsity).__name__}")
    n_layers = model.config.text.num_hidden_layers
    if sparsity.layers is not None and any(y >= n_layers for y in sparsity.layers):
        raise ValueError(f"sparsity.layers {sparsity.layers} has indices outside the model's {n_layers} "
                         "decoder layers")
    return sparsity


def _check_p(p_B, B: int, sparsity: SparsityConfig) -> jax.Array:
    if p_B is None:
        return jnp.full((B,), sparsity.p, jnp.float32)
    if jnp.shape(p_B) != (B,):
        raise ValueError(f"p_B must have shape ({B},) (one top-p threshold per row), got {jnp.shape(p_B)}")
    if not isinstance(p_B, jax.core.Tracer):
        p_np = np.asarray(p_B, np.float32)
        if not np.all((p_np > 0) & (p_np <= 1)):
            raise ValueError(f"p_B values must be in (0, 1], got {p_np.tolist()}")
    return jnp.asarray(p_B, jnp.float32)


def _check_kept(kept_BYE, B: int, Y: int, E: int):
    if jnp.shape(kept_BYE) != (B, Y, E):
        raise ValueError(f"kept_BYE must have shape (B, layers, E) = {(B, Y, E)} (E = select_end), "
                         f"got {tuple(jnp.shape(kept_BYE))}")
    return kept_BYE


def _check_select_end(select_end, L: int) -> int | None:
    if select_end is None:
        return None
    if isinstance(select_end, bool) or not isinstance(select_end, int):
        raise ValueError(f"select_end must be None or a static int, got {select_end!r}")
    if not 1 <= select_end <= L:
        raise ValueError(f"select_end must be in [1, L={L}] (the prompt columns), got {select_end}")
    return select_end


# ---------------------------------------------------------------------- model methods
class SparseMixin:
    """`sparse_forward` / `sparse_prefill` for QwenVLForConditionalGeneration (uses its embed,
    position_ids, _rope, _stack and _logits).

    Config: an explicit `sparsity=` wins; else the model attribute `sparsity` (set it once, e.g.
    `model.sparsity = cfg`, so the rollout hook, which passes no config, uses the same settings as
    the learner; a frozen config is static graph data for nnx.split / jit); else SparsityConfig().
    """

    def _sparse_trunk(self, input_ids_BL, *, sparsity, p_B, rng, attention_mask_BL, position_ids_3BL, select_end,
                      vision, keep_fn=None, kept_BYE=None, soft_temperature=None):
        """Embed + decoder stack with per-layer selection. Returns (h_BLD, valid_BL, records, soft)
        where records[y] = (keep_BL, ratio_B | None (dense), k_BLKH, v_BLKH) and soft[y] is the
        layer's relaxed ratio [B] (with gradient) when `soft_temperature` is set and y is a top-p
        sparse layer, else None."""
        E = _check_select_end(select_end, jnp.shape(input_ids_BL)[1])
        # Vision pads count only in the prompt columns: a generated pad token stays text.
        x_BLD = self.embed(input_ids_BL, **vision, vision_end=E)
        B, L = x_BLD.shape[:2]
        p_B = _check_p(p_B, B, sparsity)
        rng = row_keys(rng, B)  # per-row keys: a row's probes do not depend on its batch
        valid_BL = jnp.ones((B, L), bool) if attention_mask_BL is None else jnp.asarray(attention_mask_BL) > 0
        if valid_BL.shape != (B, L):
            raise ValueError(f"attention_mask_BL shape {valid_BL.shape} != input_ids shape {(B, L)}")
        mask_BLS = jnp.tril(jnp.ones((L, L), bool))[None] & valid_BL[:, None, :]
        records, soft = {}, {}
        keep_fn = getattr(self, "keep_fn", None) if keep_fn is None else keep_fn
        if soft_temperature is not None and keep_fn is not None:
            raise ValueError("soft_temperature relaxes the top-p selection; it cannot be combined with a keep_fn")
        if kept_BYE is not None:
            # Sets chosen earlier win over any rule. Under a keep_fn (which decides its own dense
            # layers) they are used in every layer: a dense layer's set is simply every valid key.
            kept_BYE = _check_kept(kept_BYE, B, len(self.layers), L if E is None else E)
            use_given = [keep_fn is not None or sparsity.is_sparse_layer(y) for y in range(len(self.layers))]
            keep_fn = None
        layer_fn = None if keep_fn is None else keep_fn(
            input_ids_BL=input_ids_BL, valid_BL=valid_BL, p_B=p_B, select_end=E, sparsity=sparsity,
            model_config=self.config)

        def make_attend(y: int):
            def attend(q_BLNH, k_BLKH, v_BLKH, mask):
                if layer_fn is not None:
                    kept = layer_fn(y, q_BLNH, k_BLKH, layer_rng(rng, y))
                elif kept_BYE is not None and use_given[y]:
                    kept = given_keep(kept_BYE[:, y], valid_BL)
                elif sparsity.is_sparse_layer(y):
                    kept = layer_keep(q_BLNH, k_BLKH, valid_BL, p_B, selection=sparsity.selection,
                                      rng=layer_rng(rng, y), select_end=E)
                else:
                    kept = None
                if soft_temperature is not None and kept is not None:
                    # The pathwise efficiency term: same probes (same keys) as the selection, with gradient.
                    # Rematerialised: the backward recomputes the [heads, probes, keys] probabilities
                    # instead of keeping them for every layer (at 8k tokens ~0.75 GB per row and layer).
                    end = L if E is None else E
                    soft[y] = jax.checkpoint(functools.partial(
                        soft_token_ratio, temperature=soft_temperature, config=sparsity.selection))(
                        q_BLNH[:, :end], k_BLKH[:, :end], valid_BL[:, :end], p_B, rng=layer_rng(rng, y))
                if kept is None:
                    records[y] = (valid_BL, None, k_BLKH, v_BLKH)
                    return dense_attention(q_BLNH, k_BLKH, v_BLKH, mask, causal=True)
                keep_BL, ratio_B = kept
                records[y] = (keep_BL, ratio_B, k_BLKH, v_BLKH)
                # Padding keys are never kept, so the kept set already carries the padding mask.
                return attend_kept(q_BLNH, k_BLKH, v_BLKH, keep_BL, sparsity=sparsity)
            return attend

        cos, sin = self._rope(position_ids_3BL)
        h_BLD, _ = self._stack(x_BLD, cos, sin, mask_BLS, attend=[make_attend(y) for y in range(len(self.layers))])
        Y = len(self.layers)
        return h_BLD, valid_BL, [records[y] for y in range(Y)], [soft.get(y) for y in range(Y)]

    @staticmethod
    def _layer_ratios(records, B: int) -> jax.Array:
        ones_B = jnp.ones((B,), jnp.float32)
        return jnp.stack([ones_B if r is None else r.astype(jnp.float32) for _, r, _, _ in records], axis=1)

    def sparse_forward(self, input_ids_BL, *, sparsity: SparsityConfig | None = None, p_B=None, rng=None,
                       attention_mask_BL=None, position_ids_3BL=None, select_end: int | None = None,
                       pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                       second_per_grid_ts=None, keep_fn=None, kept_BYE=None,
                       logits_slice: tuple[int, int] | None = None,
                       soft_temperature: float | None = None) -> SparseOutput:
        """Full causal forward with ZipR1 sparse attention in the selected decoder layers.

        Args:
          input_ids_BL, attention_mask_BL: [B, L] (mask 1 on real tokens; any padding layout).
          sparsity: the config (None: `self.sparsity` if set, else SparsityConfig()); static.
          p_B: [B] top-p thresholds (None: sparsity.p for every row); 1.0 rows are exactly dense.
          rng: selection key, or [B] per-row keys (a single key is split into B row keys); row b of
            layer y uses fold_in(key_b, y). Required by sampled random probes.
          position_ids_3BL: M-RoPE ids (computed like `__call__` when omitted).
          select_end: static int E: select over columns [0, E) only (the prompt); valid columns
            >= E (the response) are always kept, and vision pad tokens there are text (a policy may
            generate one). None: E = L.
          pixel_values, image_grid_thw, ...: vision inputs as for `__call__`.
          keep_fn: optional alternative keep rule (module docstring); None: `self.keep_fn` if set.
          kept_BYE: optional bool [B, Y, E]: use these kept sets of the first E columns (e.g. a
            rollout's, `sparse_prefill(return_keep=True)`) instead of selecting (sparse layers; with
            a keep_fn, every layer); they take precedence over keep_fn.
          logits_slice: static (start, stop): logits of positions [start, stop) only (as `__call__`).
          soft_temperature: static T > 0: also return the relaxed token ratio of every sparse layer
            (`soft_token_ratio` over the [0, E) columns, same probes as the selection, WITH gradient;
            the learner's pathwise efficiency term). Attention still uses the hard kept sets.
        Returns:
          SparseOutput(logits [B, L, V] float32 (or [B, stop - start, V]), token_ratio_B [B],
          layer_ratio_BY [B, Y], and with soft_temperature soft_ratio_B [B], soft_layer_ratio_BY).
        """
        sparsity = _check_sparsity(self, sparsity)
        if position_ids_3BL is None:
            position_ids_3BL, _ = self.position_ids(input_ids_BL, attention_mask_BL, image_grid_thw,
                                                    video_grid_thw, second_per_grid_ts)
        vision = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                      pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        if soft_temperature is not None and not (isinstance(soft_temperature, (int, float)) and soft_temperature > 0):
            raise ValueError(f"soft_temperature must be None or a number > 0, got {soft_temperature!r}")
        h_BLD, _, records, soft = self._sparse_trunk(input_ids_BL, sparsity=sparsity, p_B=p_B, rng=rng,
                                                     attention_mask_BL=attention_mask_BL,
                                                     position_ids_3BL=position_ids_3BL, select_end=select_end,
                                                     vision=vision, keep_fn=keep_fn, kept_BYE=kept_BYE,
                                                     soft_temperature=soft_temperature)
        B = h_BLD.shape[0]
        layer_ratio_BY = self._layer_ratios(records, B)
        soft_ratio_B = soft_layer_BY = None
        if soft_temperature is not None:
            sparse_ys = [y for y, r in enumerate(soft) if r is not None]
            ones_B = jnp.ones((B,), jnp.float32)
            soft_layer_BY = jnp.stack([ones_B if r is None else r for r in soft], axis=1)
            # Mean over the sparse layers only: dense layers carry no gradient and would only dilute it.
            soft_ratio_B = (jnp.mean(soft_layer_BY[:, sparse_ys], axis=1) if sparse_ys else ones_B)
        return SparseOutput(logits=self._logits(slice_positions(h_BLD, logits_slice)),
                            token_ratio_B=jnp.mean(layer_ratio_BY, axis=1),
                            layer_ratio_BY=layer_ratio_BY, soft_ratio_B=soft_ratio_B,
                            soft_layer_ratio_BY=soft_layer_BY)

    def sparse_prefill(self, input_ids_BL, *, capacity: int, attention_mask_BL=None, position_ids_3BL=None,
                       rope_deltas_B=None, p_B=None, rng=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                       sparsity: SparsityConfig | None = None, keep_fn=None, return_keep: bool = False):
        """Sparse prompt pass filling a pruned KV cache (the rollout hook, zipr1_jax/rl/rollout.py).

        Selection covers the whole prompt (E = L) with the same per-layer keys as `sparse_forward`.
        `rope_deltas_B` is only checked for presence with `position_ids_3BL` (the caller tracks
        decode positions itself).

        Returns:
          (last_logits_BV float32 at each row's last valid position,
           KVCache: layer y row b holds its kept entries at the front in original order,
             length[y, b] = kept count (all valid tokens for dense layers),
           layer_ratio_BY [B, Y]), plus keep_BYL (bool, every layer's kept prompt keys; all valid
           keys for dense layers) when `return_keep`.
        """
        sparsity = _check_sparsity(self, sparsity)
        L = jnp.shape(input_ids_BL)[1]
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < L:
            raise ValueError(f"sparse_prefill: capacity must be a static int >= the prompt length {L} "
                             f"(prompt + generated tokens), got {capacity!r}")
        if position_ids_3BL is None:
            position_ids_3BL, _ = self.position_ids(input_ids_BL, attention_mask_BL, image_grid_thw,
                                                    video_grid_thw, second_per_grid_ts)
        elif rope_deltas_B is None:
            raise ValueError("sparse_prefill: pass rope_deltas_B together with position_ids_3BL")
        vision = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                      pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        h_BLD, valid_BL, records, _ = self._sparse_trunk(input_ids_BL, sparsity=sparsity, p_B=p_B, rng=rng,
                                                         attention_mask_BL=attention_mask_BL,
                                                         position_ids_3BL=position_ids_3BL, select_end=None,
                                                         vision=vision, keep_fn=keep_fn)
        B, L = valid_BL.shape
        cache = KVCache(k=jnp.stack([compact_front(k, keep, capacity) for keep, _, k, _ in records]),
                        v=jnp.stack([compact_front(v, keep, capacity) for keep, _, _, v in records]),
                        length=jnp.stack([jnp.sum(keep, axis=1).astype(jnp.int32) for keep, _, _, _ in records]))
        # Each row's last valid token (the last column under left padding; any mask works).
        last_B = jnp.max(jnp.where(valid_BL, jnp.arange(L)[None], 0), axis=1)
        h_B1D = jnp.take_along_axis(h_BLD, last_B[:, None, None], axis=1)
        out = (self._logits(h_B1D)[:, 0], cache, self._layer_ratios(records, B))
        if return_keep:
            out += (jnp.stack([keep for keep, _, _, _ in records], axis=1),)
        return out
