"""Model construction and the functional train state.

The trainer works functionally: `nnx.split(model, nnx.Param)` gives a static `graphdef` and a
`params` tree (an `nnx.State` whose leaves keep their logical-axis metadata, so the sharding rules
can place them); jitted steps `nnx.merge(graphdef, params)` back into a module. `TrainState` holds
what an optimizer step changes: the step counter, params and optimizer state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from zipr1_jax.kernels.sparse_attention.config import SelectionConfig, SparsityConfig
from zipr1_jax.models.qwen_vl.config import QwenVLConfig
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.train.config import ModelSection, SparsitySection


@struct.dataclass
class TrainState:
    """step: optimizer steps taken in the current phase (int32 scalar)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState

    @classmethod
    def create(cls, params: nnx.State, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def build_model(section: ModelSection) -> QwenVLForConditionalGeneration:
    """The model of the config: HF weights from `hf_dir`, else a random tiny preset (init_seed).

    With `init_params` the model is ABSTRACT (shapes only, nothing allocated): the caller restores
    the parameters into their shardings (train/setup.py, `checkpoint.restore_params`).
    """
    if section.init_params is not None:
        config = section.model_config()
        return nnx.eval_shape(lambda: QwenVLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    if section.hf_dir is not None:
        from zipr1_jax.models.qwen_vl.loader import load_hf_checkpoint

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


def merge(graphdef: nnx.GraphDef, params: nnx.State) -> QwenVLForConditionalGeneration:
    return nnx.merge(graphdef, params)


def sparsity_config(section: SparsitySection, *, p: float | None = None) -> SparsityConfig:
    """The kernel-level SparsityConfig of the training config (probes "zipcache" = recent + random)."""
    selection = SelectionConfig(probe_recent=section.probe_recent_frac, probe_random=section.probe_random_frac,
                                probes="all" if section.probes == "all" else "sampled",
                                min_probes=section.min_probes, per_kv_head=section.per_kv_head)
    return SparsityConfig(enabled=section.enabled, p=section.p_eval if p is None else p, selection=selection,
                          mode=section.mode, layers=section.layers,
                          backend=None if section.backend == "auto" else section.backend)


def with_p(config: SparsityConfig, p: float) -> SparsityConfig:
    return dataclasses.replace(config, p=float(p))


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
