"""Our side of benchmarks/grpo_step_vs_trl.py (project venv): the learner config of the shared
objective, the prompt batch, a timed `GRPOLearner.step` runner and ours' loss + gradient on fixed
completions for the same-objective check. jax and zipr1_jax are imported inside the functions.
"""

from __future__ import annotations

import time

import numpy as np
from grpo_shared import ADVANTAGE, EPS, OURS_ADVANTAGE, REWARD_NAME, SPARSE_P, even_word_reward, word_tokenizer


def learner_config(cfg, args, *, sparse: bool):
    """Ours' LearnerConfig for the benchmark step (registers the shared reward): the objective of
    `grpo_trl_side._trl_trainer`'s GRPOConfig."""
    from zipr1_jax.kernels.sparse_attention.config import SparsityConfig
    from zipr1_jax.rl.learner import LearnerConfig
    from zipr1_jax.rl.rewards import register_reward
    from zipr1_jax.rl.rollout import SamplingConfig

    register_reward(REWARD_NAME, override=True)(
        lambda inputs: np.array([even_word_reward(r) for r in inputs.responses], np.float32))
    sampling = SamplingConfig(max_new_tokens=args.new, eos_ids=(cfg.text.vocab_size,), pad_id=cfg.pad_token_id,
                              temperature=1.0)
    return LearnerConfig(
        group_size=args.group, sampling=sampling, sparsity=SparsityConfig(enabled=sparse, p=SPARSE_P),
        p_grid=(SPARSE_P,), budget="single", beta=args.beta, eps_low=EPS[0], eps_high=EPS[1], mu=1,
        advantage=OURS_ADVANTAGE[ADVANTAGE], aggregation="token", lambda_eff=0.0, gate=False,
        extra_rewards=((REWARD_NAME, 1.0),))


def ours_objective(cfg, hf_state: dict, ref_state: dict, batch: dict, completions_RT: np.ndarray, args) -> dict:
    """Ours' loss and gradient on FIXED completions, through the learner's own pieces (decode,
    score -> advantages, sequences, the dense reference log-probs, and `_micro_step`: the loss and
    gradient the timed update applies). Returns loss, advantages [R] and the gradient as a hub-layout
    HF state dict (numpy, HF shapes)."""
    import functools
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zipr1_jax.data.model_inputs import vision_arrays
    from zipr1_jax.kernels.sparse_attention.selection import row_keys
    from zipr1_jax.models.qwen_vl.loader import from_hf_state_dict, hf_state_dict
    from zipr1_jax.rl.learner import GRPOLearner, _logprobs_only, _micro_step
    from zipr1_jax.train.builders import split_params

    lcfg = learner_config(cfg, args, sparse=False)
    graphdef, params = split_params(from_hf_state_dict(cfg, hf_state))
    ref_params = split_params(from_hf_state_dict(cfg, ref_state))[1]
    learner = GRPOLearner(lcfg, graphdef, None, word_tokenizer(cfg.text.vocab_size, cfg.pad_token_id), None)
    R = completions_RT.shape[0]
    out = SimpleNamespace(tokens_BT=np.asarray(completions_RT, np.int32), mask_BT=np.ones(completions_RT.shape, bool))
    rewards, adv_R = learner.score(batch, learner.decode(out.tokens_BT, out.mask_BT), np.ones(R, np.float32))
    seq, L = learner.sequences(batch, out)
    vision, grids = vision_arrays(batch)
    static = dict(graphdef=graphdef, grids=grids, sparsity=None, L=L, temperature=lcfg.sampling.temperature)
    key, p_R = jax.random.key(args.seed), jnp.ones(R, jnp.float32)
    ref_logp = jax.jit(functools.partial(_logprobs_only, **static))(ref_params, seq, vision, p_R, key)
    T = completions_RT.shape[1]
    rows = dict(seq, p=p_R, key=row_keys(key, R), adv=jnp.asarray(adv_R), old=None, ref=ref_logp,
                rollout=jnp.zeros((R, T), jnp.float32))
    loss_kw = dict(beta=lcfg.beta, eps_low=lcfg.eps_low, eps_high=lcfg.eps_high)
    grads, _, metrics = jax.jit(lambda prm, r: _micro_step(
        prm, r, vision, n_tok=jnp.float32(R * T), n_rows=R, grad_accum=1, aggregation=lcfg.aggregation,
        loss_kw=loss_kw, path_kw=None, num_rows=R, **static))(params, rows)
    return dict(loss=float(metrics["loss"]), advantages=np.asarray(adv_R, np.float32),
                grads=hf_state_dict(nnx.merge(graphdef, grads)), reward=float(rewards["total"].mean()))


def ours_runner(cfg, hf_state: dict, batch: dict, args, *, sparse: bool):
    """A no-argument callable running one `GRPOLearner.step` (state carried across calls) ->
    (seconds, metrics + the step's phases: rollout, reference, update (jitted calls, each waited for)
    and other (host decoding, rewards, transfers))."""
    import jax
    import jax.numpy as jnp

    from zipr1_jax.models.qwen_vl.loader import from_hf_state_dict
    from zipr1_jax.sharding.mesh import make_mesh
    from zipr1_jax.sharding.rules import DEFAULT_RULES, opt_state_shardings, state_shardings
    from zipr1_jax.rl.learner import GRPOLearner
    from zipr1_jax.train.optim import OptimConfig, make_optimizer
    from zipr1_jax.sharding.placement import Placement
    from zipr1_jax.rl.state import TrainState
    from zipr1_jax.train.builders import split_params

    class TimedPlacement(Placement):  # waits for each jitted call and books its time by function
        def jit(self, fn, *a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(super().jit(fn, *a, **k))
            key = {"_logprobs_only": "reference", "_update_static_kw": "update"}.get(fn.__name__)
            if key:  # anything else stays in "other"
                phases[key] += time.perf_counter() - t0
            return out

    class TimedLearner(GRPOLearner):
        def rollout(self, *a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(super().rollout(*a, **k))
            phases["rollout"] += time.perf_counter() - t0
            return out

    phases = {}
    V = cfg.text.vocab_size
    lcfg = learner_config(cfg, args, sparse=sparse)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    pl = TimedPlacement(mesh, DEFAULT_RULES)
    graphdef, params = split_params(from_hf_state_dict(cfg, hf_state))
    p_sh = state_shardings(params, mesh)
    params = jax.device_put(params, p_sh)
    tx = make_optimizer(OptimConfig(lr=args.lr, total_steps=1000, schedule="constant", grad_clip=1.0))
    opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), p_sh)
    sh = TrainState(step=pl.replicated, params=p_sh, opt_state=opt_sh)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), pl.replicated), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=sh.opt_state)(params))
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    learner = TimedLearner(lcfg, graphdef, tx, word_tokenizer(V, cfg.pad_token_id), pl, state_shardings=sh)
    box = {"state": state, "i": 0}

    def run():
        phases.update(rollout=0.0, reference=0.0, update=0.0)
        t0 = time.perf_counter()
        box["state"], metrics, _ = learner.step(box["state"], ref_params, batch, jax.random.key(args.seed + box["i"]),
                                                step=box["i"])
        total = time.perf_counter() - t0
        box["i"] += 1
        return total, dict(metrics, phases=dict(phases, other=total - sum(phases.values())))
    return run


def ours_batch(cfg, ids_BL: np.ndarray, mask_BL: np.ndarray, group: int, *, pixel_values=None,
               image_grid_thw=None) -> dict:
    """The prompt batch as the RL loader gives it: each prompt repeated G times in contiguous rows,
    M-RoPE ids from the loader's `get_rope_index`, and (unmatchable) answers for the accuracy reward.
    With images (one per prompt: pixel rows [sum of patches, patch_dim] in prompt order and grids
    [B, 3]), every row carries its prompt's pixel rows, in row order."""
    from zipr1_jax.models.qwen_vl.rope import get_rope_index

    ids_RL, mask_RL = np.repeat(ids_BL, group, axis=0), np.repeat(mask_BL, group, axis=0)
    vision = {}
    if image_grid_thw is not None:
        grid_B3 = np.asarray(image_grid_thw, np.int64)
        if grid_B3.shape != (ids_BL.shape[0], 3):
            raise ValueError(f"one image per prompt: grids {grid_B3.shape} for {ids_BL.shape[0]} prompts")
        bounds = np.concatenate([[0], np.cumsum(grid_B3.prod(axis=1))])
        if bounds[-1] != len(pixel_values):
            raise ValueError(f"{len(pixel_values)} pixel rows, the grids need {bounds[-1]}")
        grid_R3 = np.repeat(grid_B3, group, axis=0)
        pix = [pixel_values[bounds[b]:bounds[b + 1]] for b in range(ids_BL.shape[0]) for _ in range(group)]
        vision = dict(pixel_values=np.concatenate(pix).astype(np.float32), image_grid_thw=grid_R3)
    pos_3RL, deltas_R = get_rope_index(cfg, ids_RL, mask_RL, vision.get("image_grid_thw"))
    R = ids_RL.shape[0]
    return dict(input_ids=ids_RL.astype(np.int32), attention_mask=mask_RL.astype(np.int32),
                position_ids=np.asarray(pos_3RL, np.int32), rope_deltas=np.asarray(deltas_R, np.int32),
                answer=["<none>"] * R, answer_type=["exact"] * R, choices=[None] * R, **vision)
