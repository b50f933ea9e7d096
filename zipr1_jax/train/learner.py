"""The ZipR1 GRPO learner: rollout -> reward -> advantage -> update, one call per RL step.

    learner = GRPOLearner(cfg, graphdef, tx, tokenizer, placement)
    state, metrics = learner.step(state, ref_params, batch, rng)

Per step (METHOD.md section 3):
1. rollout: G rollouts per prompt with the SPARSE policy, rollout n of a group at threshold p_n
   (multi-budget) -> tokens, log-probs, token ratios;
2. rewards on the host (verifiers need strings): r = r_acc + lambda * C * (1 - tau);
3. group-relative advantages (GRPO / RLOO / Dr.GRPO);
4. `mu` optimizer steps on the clipped surrogate - beta * k3 KL. The policy (and old-policy)
   log-probs are recomputed on prompt + response over the rollout's own kept sets (handed over
   as `RolloutOutput.keep_BYL`, `select_end` = prompt length; no re-selection, so sampler and
   learner attend to exactly the same keys, and with mu > 1 every inner step keeps the rollout
   policy's sets), the reference with DENSE attention from the frozen reference params.
   Old-policy log-probs are computed once per rollout batch (with mu = 1 they equal the current
   ones, so the surrogate uses a stop-gradient copy and saves that forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zipr1_jax.kernels.sparse_attention.config import SparsityConfig
from zipr1_jax.rl.advantages import compute_advantages
from zipr1_jax.rl.losses import grpo_loss, token_logprobs_from_logits
from zipr1_jax.rl.rewards import RewardInputs, compute_rewards
from zipr1_jax.rl.rollout import SamplingConfig, budget_thresholds, generate
from zipr1_jax.train.batch import model_kwargs, response_positions, vision_arrays
from zipr1_jax.train.distributed import put_rows, replicate, to_host_tree
from zipr1_jax.train.parallel import Placement
from zipr1_jax.train.state import TrainState


@dataclass(frozen=True, kw_only=True)
class LearnerConfig:
    group_size: int
    sampling: SamplingConfig
    sparsity: SparsityConfig  # enabled=False: dense policy
    p_grid: tuple[float, ...]
    budget: str = "multi"
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.28
    mu: int = 1
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    aggregation: str = "token"
    lambda_eff: float = 1.0
    gate: bool = True
    grad_accum: int = 1
    extra_rewards: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"LearnerConfig.group_size must be >= 2, got {self.group_size}")
        if self.mu < 1 or self.grad_accum < 1:
            raise ValueError(f"LearnerConfig.mu and grad_accum must be >= 1, got {self.mu}, {self.grad_accum}")
        if self.beta < 0:
            raise ValueError(f"LearnerConfig.beta must be >= 0, got {self.beta}")

    @property
    def sparse(self) -> bool:
        return self.sparsity.enabled


# ---------------------------------------------------------------------- jitted pure functions
def _sequence_logprobs(params, seq, vision, p_R, sel_rng, *, graphdef, grids, sparsity, L, temperature):
    """log pi(response token) [R, T] (temperature-scaled like the sampler) and token ratio [R]."""
    model = nnx.merge(graphdef, params)
    kw = model_kwargs(vision, grids)
    T = seq["ids"].shape[1] - L
    # Position t predicts token t + 1: the response tokens [L, L + T) come from positions [L - 1, L + T - 1).
    # Only those are projected to the vocabulary (at 152k entries the prompt's logits would dominate memory).
    window = (L - 1, L + T - 1)
    if sparsity is not None:
        # The rollout's kept sets (when given) rather than a re-selection: see models/qwen_vl/sparse.py.
        out = model.sparse_forward(seq["ids"], sparsity=sparsity, p_B=p_R, rng=sel_rng, attention_mask_BL=seq["mask"],
                                   position_ids_3BL=seq["pos"], select_end=L, logits_slice=window,
                                   kept_BYE=seq.get("keep"), **kw)
        ratio_R = out.token_ratio_B
    else:
        out = model(seq["ids"], attention_mask_BL=seq["mask"], position_ids_3BL=seq["pos"], logits_slice=window,
                    vision_end=L, **kw)
        ratio_R = jnp.ones(seq["ids"].shape[:1], jnp.float32)
    logits_RTV = out.logits
    if temperature > 0:
        logits_RTV = logits_RTV / temperature
    return token_logprobs_from_logits(logits_RTV, seq["ids"][:, L:]), ratio_R


def _logprobs_only(params, seq, vision, p_R, sel_rng, **static):
    return _sequence_logprobs(params, seq, vision, p_R, sel_rng, **static)[0]


def _update(state: TrainState, seq, vision, p_R, sel_rng, adv_R, old_logp_RT, ref_logp_RT, rollout_logp_RT, *,
            tx, graphdef, grids, sparsity, L, temperature, loss_kw, grad_accum, aggregation):
    """One optimizer step on the GRPO loss, gradients accumulated over `grad_accum` row slices."""
    mask_RT = seq["mask"][:, L:] > 0
    R = mask_RT.shape[0]
    rows = R // grad_accum

    def loss_fn(params, sl):
        # Rows are axis 0 of every entry except the M-RoPE positions [3, R, L] (axis 1).
        s = {k: (v[:, sl] if k == "pos" else v[sl]) for k, v in seq.items()}
        logp_RT = _logprobs_only(params, s, vision, p_R[sl], sel_rng, graphdef=graphdef, grids=grids,
                                 sparsity=sparsity, L=L, temperature=temperature)
        old = jax.lax.stop_gradient(logp_RT) if old_logp_RT is None else old_logp_RT[sl]
        ref = None if ref_logp_RT is None else ref_logp_RT[sl]
        loss, metrics = grpo_loss(logp_RT, old, ref, adv_R[sl], mask_RT[sl], aggregation=aggregation, **loss_kw)
        m = mask_RT[sl]
        mismatch = jnp.sum(jnp.abs(logp_RT - rollout_logp_RT[sl]) * m) / jnp.maximum(jnp.sum(m), 1)
        return loss, {**metrics, "logp_mismatch": jax.lax.stop_gradient(mismatch)}

    # Weights make the accumulated loss equal to the loss of the whole batch.
    n_tok = jnp.maximum(jnp.sum(mask_RT), 1)
    n_rows = jnp.maximum(jnp.sum(jnp.any(mask_RT, axis=1)), 1)
    grads, metrics = None, None
    for i in range(grad_accum):
        sl = slice(i * rows, (i + 1) * rows)
        if aggregation == "token":
            w = jnp.sum(mask_RT[sl]) / n_tok
        elif aggregation == "seq":
            w = jnp.sum(jnp.any(mask_RT[sl], axis=1)) / n_rows
        else:
            w = 1.0 / grad_accum
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, sl)
        g = jax.tree.map(lambda x: x * w, g)
        m = {k: v * w for k, v in {**m, "loss": loss}.items()}
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, metrics


# ---------------------------------------------------------------------- the learner
class GRPOLearner:
    """Owns the static pieces of a GRPO run; `step` runs one rollout batch end to end."""

    def __init__(self, cfg: LearnerConfig, graphdef, tx: optax.GradientTransformation, tokenizer,
                 placement: Placement, *, state_shardings=None):
        self.cfg, self.graphdef, self.tx, self.tokenizer, self.placement = cfg, graphdef, tx, tokenizer, placement
        self.state_shardings = state_shardings

    # 1. rollout
    def thresholds(self, num_prompts: int, step: int) -> np.ndarray | None:
        c = self.cfg
        if not c.sparse:
            return None
        return budget_thresholds(c.p_grid, num_prompts, c.group_size, budget=c.budget,
                                 rng=np.random.default_rng(step))

    def rollout(self, params, batch: dict, rng, p_R):
        vision, grids = vision_arrays(batch)
        model = nnx.merge(self.graphdef, params)
        with self.placement.context():
            return generate(model, batch["input_ids"], batch["attention_mask"], rng, config=self.cfg.sampling,
                            p_B=p_R, position_ids_3BL=batch.get("position_ids"), rope_deltas_B=batch.get("rope_deltas"),
                            pixel_values=vision.get("pixel_values"), image_grid_thw=grids["image_grid"],
                            pixel_values_videos=vision.get("pixel_values_videos"), video_grid_thw=grids["video_grid"],
                            sparsity=self.cfg.sparsity if self.cfg.sparse else None)

    # 2 + 3. rewards and advantages (host)
    def decode(self, tokens_RT: np.ndarray, mask_RT: np.ndarray) -> list[str]:
        return [self.tokenizer.decode(t[m].tolist(), skip_special_tokens=True) for t, m in zip(tokens_RT, mask_RT)]

    def score(self, batch: dict, responses: list[str], token_ratio_R: np.ndarray):
        c = self.cfg
        inputs = RewardInputs(responses=responses, answers=list(batch["answer"]),
                              answer_types=list(batch["answer_type"]), choices=list(batch["choices"]),
                              token_ratio_R=np.asarray(token_ratio_R, np.float32), group_size=c.group_size)
        rewards = compute_rewards(inputs, group_size=c.group_size, lambda_eff=c.lambda_eff, gate=c.gate,
                                  extra_rewards=c.extra_rewards)
        adv_R = np.asarray(compute_advantages(c.advantage, jnp.asarray(rewards["total"]), c.group_size, c.adv_eps))
        return rewards, adv_R

    # 4. update
    def sequences(self, batch: dict, out) -> tuple[dict, int]:
        """Prompt + response ids, mask and M-RoPE ids (host arrays) and the prompt length L."""
        ids_RL = np.asarray(batch["input_ids"])
        mask_RL = np.asarray(batch["attention_mask"])
        L = ids_RL.shape[1]
        tokens_RT = np.asarray(out.tokens_BT)
        T = tokens_RT.shape[1]
        pos_3RL = np.asarray(batch["position_ids"])
        n_valid_R = mask_RL.sum(axis=1)
        pos_3RT = response_positions(np.asarray(batch["rope_deltas"]), n_valid_R, T)
        seq = dict(ids=np.concatenate([ids_RL, tokens_RT], axis=1).astype(np.int32),
                   mask=np.concatenate([mask_RL, np.asarray(out.mask_BT, np.int32)], axis=1).astype(np.int32),
                   pos=np.concatenate([pos_3RL, pos_3RT], axis=2).astype(np.int32))
        return seq, L

    def step(self, state: TrainState, ref_params, batch: dict, rng, *, step: int = 0):
        c, pl = self.cfg, self.placement
        R = batch["input_ids"].shape[0]
        p_np = self.thresholds(R // c.group_size, step)
        # Host copies (gathered from every process's devices when the run spans several).
        out = to_host_tree(self.rollout(state.params, batch, rng, p_np))
        sel_rng = jax.random.split(rng)[0]  # the selection key generate() used in its prefill
        tokens, mask = np.asarray(out.tokens_BT), np.asarray(out.mask_BT)
        responses = self.decode(tokens, mask)
        ratio_R = np.asarray(out.token_ratio_B)
        rewards, adv_R = self.score(batch, responses, ratio_R)

        seq, L = self.sequences(batch, out)
        vision, grids = vision_arrays(batch)
        host_rows = {"ids": seq["ids"], "mask": seq["mask"], "adv": adv_R.astype(np.float32),
                     "p": np.ones(R, np.float32) if p_np is None else p_np.astype(np.float32),
                     "rollout_logp": np.asarray(out.logprobs_BT, np.float32)}
        if c.sparse and out.keep_BYL is not None:
            host_rows["keep"] = np.asarray(out.keep_BYL, bool)  # [R, Y, L]: the sampler's kept prompt keys
        rows = put_rows(pl, host_rows)
        pos = jax.device_put(seq["pos"], pl.replicated)
        vision = pl.replicate(vision)
        seq_d = {"ids": rows["ids"], "mask": rows["mask"], "pos": pos}
        if "keep" in rows:
            seq_d["keep"] = rows["keep"]
        sel_rng = replicate(pl, sel_rng)
        static = dict(graphdef=self.graphdef, grids=grids, sparsity=c.sparsity if c.sparse else None, L=L,
                      temperature=c.sampling.temperature)
        ref_logp = None
        if c.beta > 0 and ref_params is not None:
            ref_static = {**static, "sparsity": None}
            ref_logp = pl.jit(_logprobs_only, ref_params, seq_d, vision, rows["p"], sel_rng, static=ref_static)
        old_logp = None
        if c.mu > 1:
            old_logp = pl.jit(_logprobs_only, state.params, seq_d, vision, rows["p"], sel_rng, static=static)
        upd_static = dict(static, tx=self.tx, loss_kw=dict(beta=c.beta, eps_low=c.eps_low, eps_high=c.eps_high),
                          grad_accum=c.grad_accum, aggregation=c.aggregation)
        upd_static["loss_kw"] = tuple(sorted(upd_static["loss_kw"].items()))
        metrics = {}
        for _ in range(c.mu):
            state, metrics = pl.jit(_update_static_kw, state, seq_d, vision, rows["p"], sel_rng, rows["adv"], old_logp,
                                    ref_logp, rows["rollout_logp"], static=upd_static,
                                    out_shardings=(self.state_shardings, pl.replicated), donate=(0,))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        lengths = mask.sum(axis=1)
        metrics.update(reward=float(rewards["total"].mean()), accuracy=float(rewards["accuracy"].mean()),
                       efficiency=float(rewards["efficiency"].mean()), gate=float(rewards["gate"].mean()),
                       token_ratio=float(ratio_R.mean()), response_length=float(lengths.mean()),
                       finished=float(np.asarray(out.finished_B).mean()),
                       adv_abs=float(np.abs(adv_R).mean()),
                       # decode KV-cache slots held vs a whole-prompt cache (prompt + new tokens)
                       kv_fraction=float(out.kv_capacity / seq["ids"].shape[1]))
        for name, _ in c.extra_rewards:
            metrics[f"reward_{name}"] = float(rewards[name].mean())
        layer_ratio = np.asarray(out.layer_ratio_BY).mean(axis=0)
        for y, r in enumerate(layer_ratio):
            metrics[f"layer_ratio/{y}"] = float(r)
        return state, metrics, {"responses": responses, "rewards": rewards}


def _update_static_kw(state, seq, vision, p_R, sel_rng, adv_R, old_logp, ref_logp, rollout_logp, *, loss_kw, **kw):
    return _update(state, seq, vision, p_R, sel_rng, adv_R, old_logp, ref_logp, rollout_logp, loss_kw=dict(loss_kw),
                   **kw)
