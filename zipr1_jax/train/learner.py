"""The ZipR1 GRPO learner: rollout -> reward -> advantage -> update, one call per RL step.

    learner = GRPOLearner(cfg, graphdef, tx, tokenizer, placement)
    state, metrics = learner.step(state, ref_params, batch, rng)

Per step (docs/method.md section 3):
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
5. the pathwise efficiency term (docs/method.md 3b, `lambda_path` > 0): the same sparse forward also
   returns the relaxed token ratio of every sparse layer (same probes as the rollout's selection,
   with gradient) and the loss adds lambda_path * mean_rows(w * tau_soft), w = `path_weight` of the
   row's rewards. With lambda_path = 0 nothing of it is computed: the paper-literal learner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zipr1_jax.kernels.sparse_attention.config import SparsityConfig
from zipr1_jax.kernels.sparse_attention.selection import row_keys
from zipr1_jax.rl.advantages import compute_advantages
from zipr1_jax.rl.losses import grpo_loss, pathwise_efficiency_loss, token_logprobs_from_logits
from zipr1_jax.rl.rewards import PATH_WEIGHTS, RewardInputs, compute_rewards, path_weights
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
    # Pathwise efficiency term (docs/method.md 3b); 0 = the paper-literal objective.
    lambda_path: float = 0.0
    path_weight: str = "correct"
    path_temperature: float = 0.02

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"LearnerConfig.group_size must be >= 2, got {self.group_size}")
        if self.mu < 1 or self.grad_accum < 1:
            raise ValueError(f"LearnerConfig.mu and grad_accum must be >= 1, got {self.mu}, {self.grad_accum}")
        if self.beta < 0:
            raise ValueError(f"LearnerConfig.beta must be >= 0, got {self.beta}")
        if self.lambda_path < 0 or self.path_temperature <= 0:
            raise ValueError(f"LearnerConfig.lambda_path must be >= 0 and path_temperature > 0, got "
                             f"{self.lambda_path}, {self.path_temperature}")
        if self.path_weight not in PATH_WEIGHTS:
            raise ValueError(f"LearnerConfig.path_weight must be one of {PATH_WEIGHTS}, got {self.path_weight!r}")
        if self.lambda_path > 0 and not self.sparsity.enabled:
            raise ValueError("LearnerConfig.lambda_path > 0 needs a sparse policy (sparsity.enabled)")

    @property
    def sparse(self) -> bool:
        return self.sparsity.enabled

    @property
    def pathwise(self) -> bool:
        return self.lambda_path > 0


# ---------------------------------------------------------------------- jitted pure functions
def _sequence_logprobs(params, seq, vision, p_R, sel_rng, *, graphdef, grids, sparsity, L, temperature,
                       soft_temperature=None):
    """log pi(response token) [R, T] (temperature-scaled like the sampler), token ratio [R] and,
    with `soft_temperature`, the relaxed ratio over the sparse layers [R] (with gradient; else None)."""
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
                                   kept_BYE=seq.get("keep"), soft_temperature=soft_temperature, **kw)
        ratio_R, soft_R = out.token_ratio_B, out.soft_ratio_B
    else:
        if soft_temperature is not None:
            raise ValueError("the relaxed token ratio needs the sparse forward (sparsity=None given)")
        soft_R = None
        out = model(seq["ids"], attention_mask_BL=seq["mask"], position_ids_3BL=seq["pos"], logits_slice=window,
                    vision_end=L, **kw)
        ratio_R = jnp.ones(seq["ids"].shape[:1], jnp.float32)
    logits_RTV = out.logits
    if temperature > 0:
        logits_RTV = logits_RTV / temperature
    return token_logprobs_from_logits(logits_RTV, seq["ids"][:, L:]), ratio_R, soft_R


def _logprobs_only(params, seq, vision, p_R, sel_rng, **static):
    return _sequence_logprobs(params, seq, vision, p_R, sel_rng, **static)[0]


def _update(state: TrainState, seq, vision, p_R, sel_rng, adv_R, old_logp_RT, ref_logp_RT, rollout_logp_RT,
            path_w_R=None, *, tx, graphdef, grids, sparsity, L, temperature, loss_kw, grad_accum, aggregation,
            path_kw=None):
    """One optimizer step on the GRPO loss, gradients accumulated over `grad_accum` row slices.

    `path_kw` (dict(lambda_path=, temperature=)) with `path_w_R` [R] adds the pathwise efficiency
    term; its gradient is taken separately (a second cotangent of the same forward) so its share of
    the gradient norm can be logged. None: the paper-literal loss, computed exactly as without it.
    """
    mask_RT = seq["mask"][:, L:] > 0
    R = mask_RT.shape[0]
    rows = R // grad_accum
    soft_T = None if path_kw is None else path_kw["temperature"]
    # Per-row selection keys, sliced with their rows: every micro-batch draws the rollout's probes.
    keys_R = row_keys(sel_rng, R)

    def loss_fn(params, sl):
        # Rows are axis 0 of every entry except the M-RoPE positions [3, R, L] (axis 1).
        s = {k: (v[:, sl] if k == "pos" else v[sl]) for k, v in seq.items()}
        logp_RT, _, soft_R = _sequence_logprobs(params, s, vision, p_R[sl], keys_R[sl], graphdef=graphdef, grids=grids,
                                                sparsity=sparsity, L=L, temperature=temperature,
                                                soft_temperature=soft_T)
        old = jax.lax.stop_gradient(logp_RT) if old_logp_RT is None else old_logp_RT[sl]
        ref = None if ref_logp_RT is None else ref_logp_RT[sl]
        loss, metrics = grpo_loss(logp_RT, old, ref, adv_R[sl], mask_RT[sl], aggregation=aggregation, **loss_kw)
        m = mask_RT[sl]
        mismatch = jnp.sum(jnp.abs(logp_RT - rollout_logp_RT[sl]) * m) / jnp.maximum(jnp.sum(m), 1)
        metrics = {**metrics, "logp_mismatch": jax.lax.stop_gradient(mismatch)}
        if path_kw is None:
            return loss, metrics
        path = pathwise_efficiency_loss(soft_R, path_w_R[sl], path_kw["lambda_path"], num_rows=R)
        # Row sums over the whole batch (divided by R): slices add up without token weights.
        path_metrics = {"soft_ratio": jnp.sum(soft_R) / R, "path_term": path}
        return (loss, path), (metrics, jax.tree.map(jax.lax.stop_gradient, path_metrics))

    # Weights make the accumulated loss equal to the loss of the whole batch.
    n_tok = jnp.maximum(jnp.sum(mask_RT), 1)
    n_rows = jnp.maximum(jnp.sum(jnp.any(mask_RT, axis=1)), 1)
    grads, metrics, path_grads = None, None, None
    for i in range(grad_accum):
        sl = slice(i * rows, (i + 1) * rows)
        if aggregation == "token":
            w = jnp.sum(mask_RT[sl]) / n_tok
        elif aggregation == "seq":
            w = jnp.sum(jnp.any(mask_RT[sl], axis=1)) / n_rows
        else:
            w = 1.0 / grad_accum
        if path_kw is None:
            (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, sl)
            extra = {}
        else:
            (loss, path), vjp_fn, (m, extra) = jax.vjp(lambda prm: loss_fn(prm, sl), state.params, has_aux=True)
            one, zero = jnp.ones_like(loss), jnp.zeros_like(path)
            g, = vjp_fn((one, zero))
            gp, = vjp_fn((jnp.zeros_like(loss), jnp.ones_like(path)))
            path_grads = gp if path_grads is None else jax.tree.map(jnp.add, path_grads, gp)
        g = jax.tree.map(lambda x: x * w, g)
        m = {k: v * w for k, v in {**m, "loss": loss}.items()}
        m.update(extra)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
    if path_grads is not None:
        metrics["grpo_grad_norm"] = optax.global_norm(grads)
        metrics["path_grad_norm"] = optax.global_norm(path_grads)
        grads = jax.tree.map(jnp.add, grads, path_grads)
        metrics["loss"] = metrics["loss"] + metrics["path_term"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    # For the divergence guard (train/guard.py): a step is checked before it may be saved.
    metrics["param_norm"], metrics["update_norm"] = optax.global_norm(params), optax.global_norm(updates)
    if path_grads is not None:
        metrics["path_grad_share"] = metrics["path_grad_norm"] / jnp.maximum(metrics["grad_norm"], 1e-30)
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
        if c.pathwise:
            host_rows["path_w"] = path_weights(rewards["accuracy"], c.group_size, c.path_weight)
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
        if c.pathwise:
            upd_static["path_kw"] = (("lambda_path", c.lambda_path), ("temperature", c.path_temperature))
        metrics = {}
        for _ in range(c.mu):
            state, metrics = pl.jit(_update_static_kw, state, seq_d, vision, rows["p"], sel_rng, rows["adv"], old_logp,
                                    ref_logp, rows["rollout_logp"], rows.get("path_w"), static=upd_static,
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


def _update_static_kw(state, seq, vision, p_R, sel_rng, adv_R, old_logp, ref_logp, rollout_logp, path_w=None, *,
                      loss_kw, path_kw=None, **kw):
    return _update(state, seq, vision, p_R, sel_rng, adv_R, old_logp, ref_logp, rollout_logp, path_w,
                   loss_kw=dict(loss_kw), path_kw=None if path_kw is None else dict(path_kw), **kw)
