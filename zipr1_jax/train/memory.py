"""Per-device memory of a training config at scale, on paper and without devices.

Shapes come from `jax.eval_shape` of the real model preset, shardings from the same rules table
the trainer uses (`state_shardings`, `opt_state_shardings`) applied on an `AbstractMesh` with the
config's (data, fsdp, tensor) sizes for a target's device count. Counted per device:

  params      the policy's parameters (model.param_dtype)
  optimizer   AdamW moments (none for a frozen vision tower) + counts
  reference   the frozen copy of the policy kept for the KL term (rl.beta_kl > 0), same sharding
  kv_cache    the rollout KV cache: data.batch_size * data.group_size rows of capacity
              max(length_buckets) + rl.max_new_tokens, in model.dtype, sharded like the trainer's
              ("batch", "kv_length", "kv_heads", "head_dim") constraint

  logits      (shown apart, not in the total) the update step's float32 logits of one micro-batch:
              rows / rl.grad_accum x rl.max_new_tokens x vocab, sharded like ("batch", "length",
              "vocab"). The learner projects the response positions only; `logits_all` is what
              projecting every prompt + response position would take.

Not counted: the other gradients and activations of the update step (transient, set by
rl.grad_accum and rematerialisation) and the replicated pixel rows of the batch.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from zipr1_jax.sharding.logical import Rules, logical_to_spec
from zipr1_jax.sharding.mesh import MESH_AXES
from zipr1_jax.sharding.rules import DEFAULT_RULES, fit_spec, opt_state_shardings, per_device_bytes, state_shardings
from zipr1_jax.train.builders import abstract_params
from zipr1_jax.train.cli import CONFIG_DIR, load_config
from zipr1_jax.train.optim import make_optimizer, phase_optim_config

GIB = 2**30
KV_AXES = ("batch", "kv_length", "kv_heads", "head_dim")
LOGITS_AXES = ("batch", "length", "vocab")


@dataclass(frozen=True, kw_only=True)
class Target:
    """An accelerator slice: `num_devices` JAX devices with `hbm_gib` memory each."""

    name: str
    accelerator: str
    num_devices: int
    hbm_gib: float


TARGETS = {
    "v4-32": Target(name="v4-32", accelerator="TPU v4", num_devices=16, hbm_gib=32.0),  # 16 chips
    "v5e-64": Target(name="v5e-64", accelerator="TPU v5e", num_devices=64, hbm_gib=16.0),
    "8xH100": Target(name="8xH100", accelerator="H100 80GB", num_devices=8, hbm_gib=80.0),
}

# (target, shipped config under configs/, overrides): Qwen2.5-VL-7B everywhere; the v4 config
# ships for Qwen2-VL-7B, so its preset is swapped (same mesh, batch and lengths).
DEFAULT_ROWS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("v4-32", "qwen2_vl_7b_tpu_v4.yaml", ("model.preset=qwen2_5_vl_7b",)),
    ("v5e-64", "qwen2_5_vl_7b_tpu_v5e.yaml", ()),
    ("8xH100", "qwen2_5_vl_7b_8xgpu.yaml", ()),
)


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per device of one config on one target (see module docstring)."""

    config: str
    target: Target
    mesh: dict[str, int]
    model: str
    num_params: int
    params: int
    opt_state: int
    reference: int
    kv_cache: int
    logits: int = 0
    logits_all: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return self.params + self.opt_state + self.reference + self.kv_cache

    @property
    def mesh_str(self) -> str:
        return "x".join(str(self.mesh[a]) for a in MESH_AXES)


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A device-free (data, fsdp, tensor) mesh: enough for shardings and shard shapes."""
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@functools.lru_cache(maxsize=4)
def _abstract_params(model_config):
    return abstract_params(model_config)[1]


def _optimizer(cfg):
    return phase_optim_config(cfg, "rl" if cfg.rl.steps > 0 else "sft")  # one phase's state is alive at a time


def kv_cache_bytes(*, layers: int, rows: int, capacity: int, kv_heads: int, head_dim: int, dtype,
                   mesh: AbstractMesh, rules: Rules = DEFAULT_RULES) -> int:
    """Per-device bytes of a KVCache (k and v [layers, rows, capacity, kv_heads, head_dim] plus
    int32 lengths [layers, rows], replicated) under the logical KV constraint."""
    shape = (rows, capacity, kv_heads, head_dim)
    spec = fit_spec(logical_to_spec(KV_AXES, rules), shape, mesh)
    shard = NamedSharding(mesh, spec).shard_shape(shape)
    return 2 * layers * math.prod(shard) * np.dtype(dtype).itemsize + layers * rows * 4


def logits_bytes(*, rows: int, length: int, vocab: int, mesh: AbstractMesh, rules: Rules = DEFAULT_RULES) -> int:
    """Per-device bytes of float32 logits [rows, length, vocab] under the model's logits constraint."""
    shape = (rows, length, vocab)
    spec = fit_spec(logical_to_spec(LOGITS_AXES, rules), shape, mesh)
    return math.prod(NamedSharding(mesh, spec).shard_shape(shape)) * 4


def estimate(cfg, num_devices: int, *, target: Target | None = None, config_name: str = "",
             rules: Rules = DEFAULT_RULES) -> MemoryEstimate:
    """Per-device bytes of `cfg` (a TrainConfig; only shapes are used, no weights) on
    `num_devices` devices laid out by `cfg.mesh`."""
    sizes = cfg.mesh.resolve(num_devices)
    mesh = abstract_mesh(sizes)
    mc = cfg.model.model_config()
    params = _abstract_params(mc)
    p_sh = state_shardings(params, mesh, rules)
    params_b = per_device_bytes(params, p_sh)
    tx = make_optimizer(_optimizer(cfg), params)
    opt = jax.eval_shape(tx.init, params)
    opt_b = per_device_bytes(opt, opt_state_shardings(opt, p_sh))
    uses_reference = cfg.rl.steps > 0 and cfg.rl.beta_kl > 0
    t = mc.text
    kv_b = kv_cache_bytes(layers=t.num_hidden_layers, rows=cfg.data.batch_size * cfg.data.group_size,
                          capacity=max(cfg.data.length_buckets) + cfg.rl.max_new_tokens,
                          kv_heads=t.num_key_value_heads, head_dim=t.head_dim, dtype=mc.dtype, mesh=mesh, rules=rules)
    micro_rows = max(cfg.data.batch_size * cfg.data.group_size // cfg.rl.grad_accum, 1)
    logits_kw = dict(rows=micro_rows, vocab=t.vocab_size, mesh=mesh, rules=rules)
    logits_b = logits_bytes(length=cfg.rl.max_new_tokens, **logits_kw)
    logits_all_b = logits_bytes(length=max(cfg.data.length_buckets) + cfg.rl.max_new_tokens, **logits_kw)
    target = target or Target(name=f"{num_devices} devices", accelerator="?", num_devices=num_devices, hbm_gib=0.0)
    return MemoryEstimate(config=config_name or cfg.name, target=target, mesh=sizes, model=mc.name,
                          num_params=int(sum(x.size for x in jax.tree.leaves(params))), params=params_b,
                          opt_state=opt_b, reference=params_b if uses_reference else 0, kv_cache=kv_b,
                          logits=logits_b, logits_all=logits_all_b)


def default_estimates(config_dir: str | None = None, rows=DEFAULT_ROWS) -> list[MemoryEstimate]:
    """The README table: Qwen2.5-VL-7B with the shipped configs on v4-32, v5e-64 and 8xH100."""
    config_dir = config_dir or CONFIG_DIR
    out = []
    for target_name, filename, overrides in rows:
        if target_name not in TARGETS:
            raise ValueError(f"unknown target {target_name!r}; known: {sorted(TARGETS)}")
        target = TARGETS[target_name]
        cfg = load_config(os.path.join(config_dir, filename), list(overrides))
        name = filename + "".join(f" {o}" for o in overrides)
        out.append(estimate(cfg, target.num_devices, target=target, config_name=name))
    return out


def markdown_table(estimates: list[MemoryEstimate]) -> str:
    """GiB per device, one row per estimate."""
    def gib(b: int) -> str:
        return f"{b / GIB:.2f}"

    lines = ["| target | devices | config | mesh data x fsdp x tensor | params | optimizer | reference | "
             "KV cache | total | HBM / device | update logits (all positions) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in estimates:
        lines.append(f"| {e.target.name} | {e.target.num_devices} | `{e.config}` | {e.mesh_str} | {gib(e.params)} | "
                     f"{gib(e.opt_state)} | {gib(e.reference)} | {gib(e.kv_cache)} | {gib(e.total)} | "
                     f"{e.target.hbm_gib:g} | {gib(e.logits)} ({gib(e.logits_all)}) |")
    return "\n".join(lines)
