"""Supervised warm-up: next-token cross entropy on the answer tokens, or all text (dense attention).

A model built from scratch cannot answer anything, so GRPO would see all-wrong groups (gate C = 0,
no learning signal). A short SFT phase on the same tasks gives the policy non-trivial accuracy
first; with real pretrained weights set `sft.steps: 0`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zipr1_jax.data.model_inputs import model_kwargs, vision_arrays
from zipr1_jax.rl.losses import sft_loss
from zipr1_jax.rl.state import TrainState
from zipr1_jax.sharding.placement import Placement


def _sft_update(state: TrainState, rows, pos_3BL, vision, *, tx, graphdef, grids):
    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        out = model(rows["input_ids"], attention_mask_BL=rows["attention_mask"], position_ids_3BL=pos_3BL,
                    **model_kwargs(vision, grids))
        loss, n_tokens = sft_loss(out.logits, rows["input_ids"], rows["loss_mask"])
        pred_BL = jnp.argmax(out.logits[:, :-1], axis=-1)
        target_mask = rows["loss_mask"][:, 1:] > 0
        hit = jnp.sum((pred_BL == rows["input_ids"][:, 1:]) * target_mask) / jnp.maximum(jnp.sum(target_mask), 1)
        return loss, {"token_accuracy": hit, "target_tokens": n_tokens.astype(jnp.float32)}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "update_norm": optax.global_norm(updates)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def all_text_targets(ids_BL: np.ndarray, attention_mask_BL: np.ndarray, skip_ids) -> np.ndarray:
    """Loss mask for `sft.targets: all`: every real token except vision placeholders (`skip_ids`)."""
    return (np.asarray(attention_mask_BL) > 0) & ~np.isin(ids_BL, np.asarray(tuple(skip_ids), np.int64))


def sft_step(state: TrainState, batch: dict, *, tx, graphdef, placement: Placement, state_shardings=None,
             all_targets_except=None):
    """One SFT optimizer step on a right-padded loader batch; returns (state, metrics as floats).

    `all_targets_except`: None trains on the batch's `loss_mask` (the answer); a collection of token
    ids trains on every real token except those ids (`sft.targets: all`, e.g. the vision pads).
    """
    vision, grids = vision_arrays(batch)
    host = {k: np.asarray(batch[k]).astype(np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    if all_targets_except is not None:
        host["loss_mask"] = all_text_targets(host["input_ids"], host["attention_mask"],
                                             all_targets_except).astype(np.int32)
    rows = placement.put_rows(host)
    pos = jax.device_put(np.asarray(batch["position_ids"], np.int32), placement.replicated)
    state, metrics = placement.jit(_sft_update, state, rows, pos, placement.replicate(vision),
                                   static=dict(tx=tx, graphdef=graphdef, grids=grids),
                                   out_shardings=(state_shardings, placement.replicated), donate=(0,))
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}
