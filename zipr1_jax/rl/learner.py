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

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zipr1_jax.data.model_inputs import model_kwargs, response_positions, vision_arrays
from zipr1_jax.kernels.sparse_attention.config import SparsityConfig
from zipr1_jax.kernels.sparse_attention.selection import row_keys
from zipr1_jax.rl.advantages import compute_advantages
from zipr1_jax.rl.losses import grpo_loss, pathwise_efficiency_loss, token_logprobs_from_logits
from zipr1_jax.rl.rewards import PATH_WEIGHTS, RewardInputs, compute_rewards, path_weights
from zipr1_jax.rl.rollout import SamplingConfig, budget_thresholds, generate, rollout_keys
from zipr1_jax.rl.state import TrainState
from zipr1_jax.sharding.host import to_host_tree
from zipr1_jax.sharding.placement import Placement


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


def _micro_rows(rows: dict, start, size: int) -> dict:
    """Rows [start, start + size) of every per-row entry (traced `start`: one scan step). Rows are
    axis 0 of every entry except the M-RoPE positions [3, R, L] (axis 1)."""
    return {k: None if v is None else jax.lax.dynamic_slice_in_dim(v, start, size, axis=1 if k == "pos" else 0)
            for k, v in rows.items()}


def _micro_step(params, r: dict, vision, *, n_tok, n_rows, grad_accum, aggregation, loss_kw, path_kw, num_rows,
                **static):
    """(weighted gradient, weighted pathwise gradient or None, weighted metrics) of one micro-batch
    `r`; the weights make the sum over micro-batches the loss of the whole batch."""
    seq = {k: r[k] for k in ("ids", "mask", "pos", "keep") if r.get(k) is not None}
    L = static["L"]
    mask_RT = r["mask"][:, L:] > 0
    soft_T = None if path_kw is None else path_kw["temperature"]

    def loss_fn(prm):
        logp_RT, _, soft_R = _sequence_logprobs(prm, seq, vision, r["p"], r["key"], soft_temperature=soft_T,
                                                **static)
        old = jax.lax.stop_gradient(logp_RT) if r.get("old") is None else r["old"]
        loss, metrics = grpo_loss(logp_RT, old, r.get("ref"), r["adv"], mask_RT, aggregation=aggregation, **loss_kw)
        mismatch = jnp.sum(jnp.abs(logp_RT - r["rollout"]) * mask_RT) / jnp.maximum(jnp.sum(mask_RT), 1)
        metrics = {**metrics, "logp_mismatch": jax.lax.stop_gradient(mismatch)}
        if path_kw is None:
            return loss, metrics
        path = pathwise_efficiency_loss(soft_R, r["path_w"], path_kw["lambda_path"], num_rows=num_rows)
        # Row sums over the whole batch (divided by R): micro-batches add up without token weights.
        path_metrics = {"soft_ratio": jnp.sum(soft_R) / num_rows, "path_term": path}
        return (loss, path), (metrics, jax.tree.map(jax.lax.stop_gradient, path_metrics))

    if aggregation == "token":
        w = jnp.sum(mask_RT) / n_tok
    elif aggregation == "seq":
        w = jnp.sum(jnp.any(mask_RT, axis=1)) / n_rows
    else:
        w = 1.0 / grad_accum
    if path_kw is None:
        (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        gp, extra = None, {}
    else:
        # The pathwise term's gradient as a second cotangent of the same forward: its share is logged.
        (loss, path), vjp_fn, (m, extra) = jax.vjp(loss_fn, params, has_aux=True)
        g, = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(path)))
        gp, = vjp_fn((jnp.zeros_like(loss), jnp.ones_like(path)))
    g = jax.tree.map(lambda x: x * w, g)
    m = {k: v * w for k, v in {**m, "loss": loss}.items()}
    return g, gp, {**m, **extra}


def _accumulate(params, rows: dict, vision, *, grad_accum: int, **kw):
    """Sum of `_micro_step` over `grad_accum` equal row slices, as a scan (one traced micro-step
    whatever grad_accum is; the sum runs in slice order, as an unrolled loop would add)."""
    R = rows["ids"].shape[0]
    size = R // grad_accum
    step = functools.partial(_micro_step, vision=vision, grad_accum=grad_accum, **kw)
    if grad_accum == 1:
        return step(params, rows)

    def body(total, i):
        out = step(params, _micro_rows(rows, i * size, size))
        return jax.tree.map(jnp.add, total, out), None

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(step, params, _micro_rows(rows, 0, size)))
    total, _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))
    return total


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
    # Per-row selection keys, sliced with their rows: every micro-batch draws the rollout's probes.
    rows = dict(seq, p=p_R, key=row_keys(sel_rng, R), adv=adv_R, old=old_logp_RT, ref=ref_logp_RT,
                rollout=rollout_logp_RT, path_w=path_w_R)
    grads, path_grads, metrics = _accumulate(
        state.params, rows, vision, grad_accum=grad_accum, aggregation=aggregation, loss_kw=loss_kw, path_kw=path_kw,
        num_rows=R, n_tok=jnp.maximum(jnp.sum(mask_RT), 1), n_rows=jnp.maximum(jnp.sum(jnp.any(mask_RT, axis=1)), 1),
        graphdef=graphdef, grids=grids, sparsity=sparsity, L=L, temperature=temperature)
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
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


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

    def place(self, out, seq: dict, adv_R: np.ndarray, p_np, rewards) -> tuple[dict, dict]:
        """(sequences, per-row learner inputs) on the mesh: rows split over the batch axes, the
        M-RoPE ids [3, R, L+T] replicated."""
        c, pl = self.cfg, self.placement
        R = seq["ids"].shape[0]
        host_rows = {"ids": seq["ids"], "mask": seq["mask"], "adv": adv_R.astype(np.float32),
                     "p": np.ones(R, np.float32) if p_np is None else p_np.astype(np.float32),
                     "rollout_logp": np.asarray(out.logprobs_BT, np.float32)}
        if c.sparse and out.keep_BYL is not None:
            host_rows["keep"] = np.asarray(out.keep_BYL, bool)  # [R, Y, L]: the sampler's kept prompt keys
        if c.pathwise:
            host_rows["path_w"] = path_weights(rewards["accuracy"], c.group_size, c.path_weight)
        rows = pl.put_rows(host_rows)
        seq_d = {"ids": rows["ids"], "mask": rows["mask"], "pos": jax.device_put(seq["pos"], pl.replicated)}
        if "keep" in rows:
            seq_d["keep"] = rows["keep"]
        return seq_d, rows

    def update(self, state: TrainState, ref_params, seq_d: dict, rows: dict, vision, sel_rng, *, grids, L: int):
        """The reference (and with mu > 1 old-policy) log-probs, then `mu` optimizer steps."""
        c, pl = self.cfg, self.placement
        static = dict(graphdef=self.graphdef, grids=grids, sparsity=c.sparsity if c.sparse else None, L=L,
                      temperature=c.sampling.temperature)
        ref_logp = None
        if c.beta > 0 and ref_params is not None:
            ref_static = {**static, "sparsity": None}
            ref_logp = pl.jit(_logprobs_only, ref_params, seq_d, vision, rows["p"], sel_rng, static=ref_static)
        old_logp = None
        if c.mu > 1:
            old_logp = pl.jit(_logprobs_only, state.params, seq_d, vision, rows["p"], sel_rng, static=static)
        upd_static = dict(static, tx=self.tx, grad_accum=c.grad_accum, aggregation=c.aggregation,
                          loss_kw=(("beta", c.beta), ("eps_high", c.eps_high), ("eps_low", c.eps_low)))
        if c.pathwise:
            upd_static["path_kw"] = (("lambda_path", c.lambda_path), ("temperature", c.path_temperature))
        metrics = {}
        for _ in range(c.mu):
            state, metrics = pl.jit(_update_static_kw, state, seq_d, vision, rows["p"], sel_rng, rows["adv"], old_logp,
                                    ref_logp, rows["rollout_logp"], rows.get("path_w"), static=upd_static,
                                    out_shardings=(self.state_shardings, pl.replicated), donate=(0,))
        return state, {k: float(v) for k, v in jax.device_get(metrics).items()}

    def step(self, state: TrainState, ref_params, batch: dict, rng, *, step: int = 0):
        c = self.cfg
        p_np = self.thresholds(batch["input_ids"].shape[0] // c.group_size, step)
        # Host copies (gathered from every process's devices when the run spans several).
        out = to_host_tree(self.rollout(state.params, batch, rng, p_np))
        sel_rng, _ = rollout_keys(rng)  # the selection key generate() used in its prefill
        responses = self.decode(np.asarray(out.tokens_BT), np.asarray(out.mask_BT))
        rewards, adv_R = self.score(batch, responses, np.asarray(out.token_ratio_B))
        seq, L = self.sequences(batch, out)
        vision, grids = vision_arrays(batch)
        seq_d, rows = self.place(out, seq, adv_R, p_np, rewards)
        state, metrics = self.update(state, ref_params, seq_d, rows, self.placement.replicate(vision),
                                     self.placement.replicate(sel_rng), grids=grids, L=L)
        metrics.update(rollout_metrics(out, rewards, adv_R, c.extra_rewards, total_len=seq["ids"].shape[1]))
        return state, metrics, {"responses": responses, "rewards": rewards}


def rollout_metrics(out, rewards: dict, adv_R: np.ndarray, extra_rewards, *, total_len: int) -> dict[str, float]:
    """Host metrics of one rollout batch: rewards, token ratios (mean and per layer), lengths."""
    metrics = dict(reward=float(rewards["total"].mean()), accuracy=float(rewards["accuracy"].mean()),
                   efficiency=float(rewards["efficiency"].mean()), gate=float(rewards["gate"].mean()),
                   token_ratio=float(np.asarray(out.token_ratio_B).mean()),
                   response_length=float(np.asarray(out.mask_BT).sum(axis=1).mean()),
                   finished=float(np.asarray(out.finished_B).mean()), adv_abs=float(np.abs(adv_R).mean()),
                   # decode KV-cache slots held vs a whole-prompt cache (prompt + new tokens)
                   kv_fraction=float(out.kv_capacity / total_len))
    for name, _ in extra_rewards:
        metrics[f"reward_{name}"] = float(rewards[name].mean())
    for y, r in enumerate(np.asarray(out.layer_ratio_BY).mean(axis=0)):
        metrics[f"layer_ratio/{y}"] = float(r)
    return metrics


def _update_static_kw(state, seq, vision, p_R, sel_rng, adv_R, old_logp, ref_logp, rollout_logp, path_w=None, *,
                      loss_kw, path_kw=None, **kw):
    return _update(state, seq, vision, p_R, sel_rng, adv_R, old_logp, ref_logp, rollout_logp, path_w,
                   loss_kw=dict(loss_kw), path_kw=None if path_kw is None else dict(path_kw), **kw)
