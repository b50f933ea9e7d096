"""Library objects built from the training config: the model (concrete or abstract), the params
split, and the sparsity, sampling and learner configs. Train, convert, eval and the memory table
call these; the optimizer's is `train.optim.phase_optim_config`.

The trainer works functionally: `nnx.split(model, nnx.Param)` gives a static `graphdef` and a
`params` tree (an `nnx.State` whose leaves keep their logical-axis metadata, so the sharding rules
can place them); jitted steps `nnx.merge(graphdef, params)` back into a module. What an optimizer
step changes is `zipr1_jax.rl.state.TrainState`.
"""

from __future__ import annotations

import jax
from flax import nnx

from zipr1_jax.data.chat import SpecialIds
from zipr1_jax.kernels.sparse_attention.config import SelectionConfig, SparsityConfig
from zipr1_jax.models.qwen_vl.config import QwenVLConfig
from zipr1_jax.models.qwen_vl.loader import abstract_model, load_hf_checkpoint
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.rl.learner import LearnerConfig
from zipr1_jax.rl.rollout import SamplingConfig
from zipr1_jax.train.config import ModelSection, SparsitySection, TrainConfig


def build_model(section: ModelSection) -> QwenVLForConditionalGeneration:
    """The model of the config: HF weights from `hf_dir`, else a random tiny preset (init_seed).

    With `init_params` the model is ABSTRACT (shapes only, nothing allocated): the caller restores
    the parameters into their shardings (train/setup.py, `checkpoint.restore_params`).
    """
    if section.init_params is not None:
        return abstract_model(section.model_config())
    if section.hf_dir is not None:
        _, model = load_hf_checkpoint(section.hf_dir, dtype=section.dtype, param_dtype=section.param_dtype)
        return model
    config: QwenVLConfig = section.model_config()
    return QwenVLForConditionalGeneration(config, rngs=nnx.Rngs(section.init_seed))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params). The model holds nothing but Params (checked: else merge would drop it)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"{type(model).__name__} holds non-Param state {list(rest.keys())}: the functional "
                         "trainer would drop it")
    return graphdef, params


def sparsity_config(section: SparsitySection, *, p: float | None = None) -> SparsityConfig:
    """The kernel-level SparsityConfig of the training config (probes "zipcache" = recent + random)."""
    selection = SelectionConfig(probe_recent=section.probe_recent_frac, probe_random=section.probe_random_frac,
                                probes="all" if section.probes == "all" else "sampled",
                                min_probes=section.min_probes, per_kv_head=section.per_kv_head)
    return SparsityConfig(enabled=section.enabled, p=section.p_eval if p is None else p, selection=selection,
                          mode=section.mode, layers=section.layers,
                          backend=None if section.backend == "auto" else section.backend)


def abstract_params(model_config: QwenVLConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) with ShapeDtypeStruct leaves carrying their logical-axis metadata
    (nothing allocated): the restore target of checkpoints, conversion and the memory table."""
    return split_params(abstract_model(model_config))


def sampling_config(cfg: TrainConfig, special: SpecialIds, eos_ids: tuple[int, ...]) -> SamplingConfig:
    r = cfg.rl
    return SamplingConfig(max_new_tokens=r.max_new_tokens, eos_ids=eos_ids, pad_id=special.pad,
                          temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, cache_steps=r.cache_steps)


def learner_config(cfg: TrainConfig, sampling: SamplingConfig, sparsity: SparsityConfig) -> LearnerConfig:
    r, d = cfg.rl, cfg.data
    return LearnerConfig(
        group_size=d.group_size, sampling=sampling, sparsity=sparsity, p_grid=cfg.sparsity.p_grid,
        budget=cfg.sparsity.budget, beta=r.beta_kl, eps_low=r.eps_clip_low, eps_high=r.eps_clip_high, mu=r.mu,
        advantage=r.advantage, adv_eps=r.adv_eps, aggregation=r.aggregation, lambda_eff=r.lambda_eff,
        gate=r.gate, grad_accum=r.grad_accum, lambda_path=r.lambda_path, path_weight=r.path_weight,
        path_temperature=r.path_temperature)
