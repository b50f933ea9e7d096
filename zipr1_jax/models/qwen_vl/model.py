"""Qwen2-VL / Qwen2.5-VL for conditional generation (Flax NNX): embedding, vision-token scatter,
decoder stack, final norm, lm head, plus prefill / cached decode (sparse variants: sparse.py).

Attribute tree mirrors Hugging Face (`visual`, `embed_tokens`, `layers[i]`, `norm`, `lm_head`), so
the HF key table in hf_params.py is a plain rename + transpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from zipr1_jax.kernels.sparse_attention import decode_attention
from zipr1_jax.models.qwen_vl.cache import KVCache, compact_front, decode_mask, write_at
from zipr1_jax.models.qwen_vl.config import QwenVLConfig
from zipr1_jax.models.qwen_vl.rope import get_rope_index, mrope_cos_sin, text_position_ids
from zipr1_jax.models.qwen_vl.sparse import SparseMixin
from zipr1_jax.models.qwen_vl.text import (DEFAULT_INIT, AttendFn, DecoderLayer, QueryPositions, RMSNorm, TokenLinear,
                                          causal_dense_attention, slice_positions)
from zipr1_jax.models.qwen_vl.vision import VisionTower
from zipr1_jax.sharding.logical import constrain, param_axes


@struct.dataclass
class ModelOutput:
    """logits [B, L, V] float32; hidden_states: (embeddings, after layer 0, ..., final normed)."""

    logits: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class QwenVLForConditionalGeneration(SparseMixin, nnx.Module):
    """The whole model. Parameters carry logical axis names; activations are `constrain`ed.

    ZipR1 sparse attention: `sparse_forward` / `sparse_prefill` come from `SparseMixin` (sparse.py).
    """

    def __init__(self, config: QwenVLConfig, *, rngs: nnx.Rngs):
        self.config = config
        t = config.text
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        # Logical names are metadata only: shardings are applied later from the rules table.
        with nnx.use_eager_sharding(False):
            self.visual = VisionTower(config, rngs=rngs)
            self.embed_tokens = nnx.Embed(t.vocab_size, t.hidden_size, dtype=dtype, param_dtype=pdtype,
                                          embedding_init=param_axes(DEFAULT_INIT, ("vocab", "embed")), rngs=rngs)
            self.layers = nnx.List([DecoderLayer(t, dtype=dtype, param_dtype=pdtype, rngs=rngs)
                                    for _ in range(t.num_hidden_layers)])
            self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, param_dtype=pdtype)
            if not t.tie_word_embeddings:
                self.lm_head = TokenLinear(t.hidden_size, t.vocab_size, use_bias=False, dtype=dtype,
                                           param_dtype=pdtype, kernel_init=param_axes(DEFAULT_INIT, ("embed", "vocab")),
                                           rngs=rngs)

    # ------------------------------------------------------------------ pieces
    def _logits(self, h_BLD: jax.Array) -> jax.Array:
        if self.config.text.tie_word_embeddings:
            emb_VD = self.embed_tokens.embedding[...].astype(h_BLD.dtype)
            logits = jnp.einsum("bld,vd->blv", h_BLD, emb_VD)
        else:
            logits = self.lm_head(h_BLD)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def _scatter(self, x_BLD, input_ids_BL, token_id: int, feats_PD, kind: str, vision_end: int | None = None):
        mask_BL = input_ids_BL == token_id
        if vision_end is not None:
            # Only the prompt's pads carry vision features: a pad token a policy GENERATED is text (the
            # sampler embedded it with embed_tokens) and must not shift the features of later rows.
            mask_BL = mask_BL & (jnp.arange(mask_BL.shape[1]) < vision_end)[None, :]
        if _is_concrete(input_ids_BL):
            n_tokens = int(np.sum(np.asarray(mask_BL)))
            if n_tokens != feats_PD.shape[0]:
                where = "" if vision_end is None else f" (columns < {vision_end})"
                raise ValueError(f"{kind} features and {kind} pad tokens do not match: {n_tokens} pad tokens "
                                 f"(id {token_id}) in input_ids{where} but the vision tower produced "
                                 f"{feats_PD.shape[0]} merged patches")
        # i-th pad token (row-major) takes the i-th merged patch: cumsum index + select (jit friendly).
        flat = mask_BL.reshape(-1)
        idx = jnp.clip(jnp.cumsum(flat) - 1, 0, max(feats_PD.shape[0] - 1, 0))
        picked = feats_PD.astype(x_BLD.dtype)[idx].reshape(x_BLD.shape)
        return jnp.where(mask_BL[..., None], picked, x_BLD)

    def embed(self, input_ids_BL, *, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, vision_end: int | None = None) -> jax.Array:
        """Token embeddings with image / video pad tokens replaced by merged vision features.

        `vision_end` (static): only pads in columns [0, vision_end) (the prompt) are vision slots;
        later ones (generated tokens) keep their token embedding. None: every column.
        """
        c = self.config
        if vision_end is not None and (isinstance(vision_end, bool) or not isinstance(vision_end, int)
                                       or vision_end < 0):
            raise ValueError(f"vision_end must be None or a static int >= 0, got {vision_end!r}")
        x_BLD = self.embed_tokens(jnp.asarray(input_ids_BL))
        for pix, grid, tid, kind in ((pixel_values, image_grid_thw, c.image_token_id, "image"),
                                     (pixel_values_videos, video_grid_thw, c.video_token_id, "video")):
            if pix is None:
                continue
            if grid is None:
                raise ValueError(f"{kind}: pixel values were given without a grid_thw")
            feats_PD = self.visual(jnp.asarray(pix), np.asarray(grid))
            x_BLD = self._scatter(x_BLD, input_ids_BL, tid, feats_PD, kind, vision_end)
        return constrain(x_BLD, ("batch", "length", "embed"))

    def position_ids(self, input_ids_BL, attention_mask_BL=None, image_grid_thw=None, video_grid_thw=None,
                     second_per_grid_ts=None) -> tuple[jax.Array, jax.Array]:
        """(position_ids [3, B, L], rope_deltas [B]): device-side for pure text, host NumPy with vision."""
        if image_grid_thw is None and video_grid_thw is None:
            mask = jnp.ones(jnp.shape(input_ids_BL), jnp.int32) if attention_mask_BL is None else attention_mask_BL
            pos = text_position_ids(jnp.asarray(mask))
            return pos, (jnp.max(pos[0], axis=-1) + 1 - jnp.sum(jnp.asarray(mask) > 0, axis=-1)).astype(jnp.int32)
        if not (_is_concrete(input_ids_BL) and (attention_mask_BL is None or _is_concrete(attention_mask_BL))):
            raise ValueError("position ids of a vision prompt are computed on the host: pass concrete input_ids / "
                             "attention_mask or precomputed position_ids_3BL under jit")
        pos, deltas = get_rope_index(self.config, np.asarray(input_ids_BL),
                                     None if attention_mask_BL is None else np.asarray(attention_mask_BL),
                                     image_grid_thw, video_grid_thw, second_per_grid_ts)
        return jnp.asarray(pos, jnp.int32), jnp.asarray(deltas, jnp.int32)

    def _rope(self, position_ids_3BL):
        t = self.config.text
        return mrope_cos_sin(jnp.asarray(position_ids_3BL), head_dim=t.head_dim, theta=t.rope_theta,
                             mrope_section=t.mrope_section)

    def _stack(self, x_BLD, cos, sin, mask_BLS, *, attend, kv_updates=None, collect=False,
               last_queries: QueryPositions | None = None, causal: bool = False):
        """The decoder layers, then the final norm. `last_queries`: the LAST layer outputs only
        those positions ([B, Q, D]; see `DecoderLayer`), when it runs the default attention (a
        replacement core may rely on seeing every query, e.g. the sparse layers' kept positions).
        `causal`: `mask_BLS` is the causal [B, L, L] mask, so layers on the default attention that
        compute every query use `causal_dense_attention` (skips the masked upper triangle)."""
        hidden = [x_BLD] if collect else None
        attends = attend if isinstance(attend, Sequence) else [attend] * len(self.layers)
        if attends[-1] is not None or collect:
            last_queries = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_attend = attends[i]
            if layer_attend is None and causal and (i != last or last_queries is None):
                layer_attend = causal_dense_attention
            x_BLD = layer(x_BLD, cos, sin, mask_BLS, attend=layer_attend,
                          kv_update=None if kv_updates is None else kv_updates[i],
                          queries=last_queries if i == last else None)
            if collect and i < len(self.layers) - 1:
                hidden.append(x_BLD)
        h_BLD = self.norm(x_BLD)
        if collect:
            hidden.append(h_BLD)
        return h_BLD, (tuple(hidden) if collect else None)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids_BL, *, attention_mask_BL=None, position_ids_3BL=None, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 return_hidden_states: bool = False,
                 attend: AttendFn | Sequence[AttendFn | None] | None = None,
                 logits_slice: tuple[int, int] | None = None, vision_end: int | None = None,
                 attention_mask=None, position_ids=None) -> ModelOutput:
        """Full causal forward. `attend` optionally replaces the attention core (one or per layer).

        `attention_mask` / `position_ids` are the Hugging Face names of `attention_mask_BL` /
        `position_ids_3BL` ([B, L] mask; [3, B, L] M-RoPE ids), accepted so transformers-style
        calls work; giving both spellings of one input is an error.

        `logits_slice=(start, stop)` (static) projects only positions [start, stop) to the vocabulary:
        logits [B, stop - start, V]. The learner needs the response positions only, and at real
        vocabularies (152k) the prompt's logits would dominate activation memory.
        `vision_end` (static): vision pads count only in columns [0, vision_end) (see `embed`).
        """
        attention_mask_BL = _one_of("attention_mask", attention_mask_BL, attention_mask)
        position_ids_3BL = _one_of("position_ids", position_ids_3BL, position_ids)
        if position_ids_3BL is None:
            position_ids_3BL, _ = self.position_ids(input_ids_BL, attention_mask_BL, image_grid_thw,
                                                    video_grid_thw, second_per_grid_ts)
        x_BLD = self.embed(input_ids_BL, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                           pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                           vision_end=vision_end)
        B, L = x_BLD.shape[:2]
        mask_BLS = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool))[None], (B, L, L))
        if attention_mask_BL is not None:
            mask_BLS = mask_BLS & (jnp.asarray(attention_mask_BL) > 0)[:, None, :]
        cos, sin = self._rope(position_ids_3BL)
        slice_positions(x_BLD, logits_slice)  # validates the slice
        h_BLD, hidden = self._stack(x_BLD, cos, sin, mask_BLS, attend=attend, collect=return_hidden_states,
                                    last_queries=logits_slice, causal=True)
        if logits_slice is not None and h_BLD.shape[1] == L:  # the last layer ran every position
            h_BLD = slice_positions(h_BLD, logits_slice)
        return ModelOutput(logits=self._logits(h_BLD), hidden_states=hidden)

    # ------------------------------------------------------------------ KV cache
    def prefill(self, input_ids_BL, *, capacity: int, attention_mask_BL=None, position_ids_3BL=None,
                rope_deltas_B=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, second_per_grid_ts=None, last_only: bool = True,
                attend: AttendFn | Sequence[AttendFn | None] | None = None):
        """Run the prompt, returning (logits, cache, rope_deltas_B).

        logits: [B, V] at each row's last valid position if `last_only`, else
        [B, L, V]. The cache holds each row's valid entries compacted to the front.
        """
        if position_ids_3BL is None:
            position_ids_3BL, rope_deltas_B = self.position_ids(input_ids_BL, attention_mask_BL, image_grid_thw,
                                                                video_grid_thw, second_per_grid_ts)
        elif rope_deltas_B is None:
            raise ValueError("prefill: pass rope_deltas_B together with position_ids_3BL")
        x_BLD = self.embed(input_ids_BL, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                           pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        B, L = x_BLD.shape[:2]
        valid_BL = jnp.ones((B, L), bool) if attention_mask_BL is None else jnp.asarray(attention_mask_BL) > 0
        mask_BLS = jnp.tril(jnp.ones((L, L), bool))[None] & valid_BL[:, None, :]
        cos, sin = self._rope(position_ids_3BL)
        ks, vs = [], []

        def keep(k_BLKH, v_BLKH):
            ks.append(compact_front(k_BLKH, valid_BL, capacity))
            vs.append(compact_front(v_BLKH, valid_BL, capacity))
            return k_BLKH, v_BLKH

        # Each row's last valid token (the last column under left padding; any mask works). With
        # last_only the last layer computes that position's output only (its k / v still all L).
        last_B1 = jnp.max(jnp.where(valid_BL, jnp.arange(L)[None], 0), axis=1)[:, None] if last_only else None
        h_BLD, _ = self._stack(x_BLD, cos, sin, mask_BLS, attend=attend, kv_updates=[keep] * len(self.layers),
                               last_queries=last_B1, causal=True)
        n_valid_B = jnp.sum(valid_BL, axis=1).astype(jnp.int32)
        cache = KVCache(k=jnp.stack(ks), v=jnp.stack(vs),
                        length=jnp.broadcast_to(n_valid_B[None], (len(self.layers), B)))
        if last_only:
            if h_BLD.shape[1] != 1:  # the last layer ran all queries (a replacement attend)
                h_BLD = jnp.take_along_axis(h_BLD, last_B1[:, :, None], axis=1)
            return self._logits(h_BLD)[:, 0], cache, rope_deltas_B
        return self._logits(h_BLD), cache, rope_deltas_B

    def decode_step(self, input_ids_BT, cache: KVCache, *, rope_deltas_B=None, position_ids_3BT=None,
                    backend: str | None = None, attend: AttendFn | Sequence[AttendFn | None] | None = None):
        """Append T new tokens per row at `cache.length` and return (logits [B, T, V], new cache).

        Each layer attends through the `decode_attention` dispatcher over its own cache length (a
        sparse cache keeps fewer entries in some layers): the Pallas decode kernels on TPU / GPU
        read only the first `length` slots of a row, the xla path masks the rest.

        Args:
          input_ids_BT: [B, T] new tokens (T > 1: causal among themselves).
          cache: the stacked cache; layer y's T entries are written at cache.length[y].
          rope_deltas_B / position_ids_3BT: positions default to length + t + rope_delta (text
            continuation after the prompt); a sparse cache needs explicit position_ids_3BT.
          backend: static decode-attention backend: None -> `self.sparsity.backend` if the model
            holds a SparsityConfig, else by platform (tpu -> pallas_tpu, gpu -> pallas_triton,
            cpu -> xla); or "xla" / "pallas_tpu" / "pallas_triton".
          attend: optional replacement attention core (one or per layer), called as
            attend(q_BTNH, k_cache_BSKH, v_cache_BSKH, mask_BTS) with the decode mask (slots
            <= length + t); it bypasses the dispatcher (e.g. `dense_attention` as an oracle).
        """
        B, T = input_ids_BT.shape
        length_B = cache.length[0]
        if position_ids_3BT is None:
            if rope_deltas_B is None:
                raise ValueError("decode_step: pass rope_deltas_B (from prefill) or position_ids_3BT")
            pos_BT = length_B[:, None] + jnp.arange(T)[None] + jnp.asarray(rope_deltas_B)[:, None]
            position_ids_3BT = jnp.broadcast_to(pos_BT[None], (3, B, T))
        x_BTD = constrain(self.embed_tokens(input_ids_BT), ("batch", "length", "embed"))
        cos, sin = self._rope(position_ids_3BT)
        if backend is None:  # the model's SparsityConfig.backend, if it holds one; else by platform
            backend = getattr(getattr(self, "sparsity", None), "backend", None)
        attends = attend if isinstance(attend, Sequence) else [attend] * len(self.layers)
        kv = {"k": cache.k, "v": cache.v}  # [Y, B, S, K, H], written in place layer by layer

        def updater(y, stacked: bool):
            def update(k_BTKH, v_BTKH):
                kv["k"] = write_at(kv["k"], y, k_BTKH, cache.length[y])
                kv["v"] = write_at(kv["v"], y, v_BTKH, cache.length[y])
                if stacked:  # the dispatcher reads layer y of the stack in place (no per-layer copy)
                    return constrain(kv["k"], _STACK_AXES), constrain(kv["v"], _STACK_AXES)
                return constrain(kv["k"][y], _STACK_AXES[1:]), constrain(kv["v"][y], _STACK_AXES[1:])
            return update

        x = x_BTD
        for y, layer in enumerate(self.layers):
            if attends[y] is None:
                # The T new entries sit at [length, length + T): the dispatcher reads length + T slots.
                layer_attend, mask = _cached_attend(y, cache.length[y] + T, backend), None
            else:
                layer_attend, mask = attends[y], decode_mask(cache.length[y], T, cache.capacity)
            x = layer(x, cos, sin, mask, attend=layer_attend, kv_update=updater(y, stacked=attends[y] is None))
        logits = self._logits(self.norm(x))
        return logits, KVCache(k=kv["k"], v=kv["v"], length=cache.length + T)


_STACK_AXES = ("layers", "batch", "kv_length", "kv_heads", "head_dim")


def _cached_attend(layer: int, length_B: jax.Array, backend: str | None) -> AttendFn:
    """The `attend` hook of cached decode: `decode_attention` over the first `length_B` slots of
    layer `layer` of the stacked caches its `kv_update` returns."""
    def attend(q_BTNH, k_cache_YBSKH, v_cache_YBSKH, mask):
        del mask  # the length is the mask: no slot >= length is read
        # model_numerics: on the xla path the same math as the dense layers (Hugging Face's eager rule).
        return decode_attention(q_BTNH, k_cache_YBSKH, v_cache_YBSKH, length_B, layer=layer, backend=backend,
                                model_numerics=True)
    return attend


def _one_of(name: str, ours, hf):
    """The value of an input given under our shape-suffixed name or its Hugging Face name."""
    if ours is not None and hf is not None:
        raise TypeError(f"{name} given twice (as {name} and with its shape suffix); pass one")
    return ours if ours is not None else hf
