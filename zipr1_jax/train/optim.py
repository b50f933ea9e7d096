"""Optimizers of the two phases: AdamW with warmup + cosine (or constant) schedule, global-norm
clipping, and an optional frozen vision tower (no update and no optimizer state for `visual.*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """One phase's optimizer settings (built from the SFT or RL config section)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" (warmup then cosine to min_lr_ratio * lr) | "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global norm; 0 disables
    freeze_vision: bool = False
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr!r}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"OptimConfig needs total_steps >= 1 and warmup_steps >= 0, got "
                             f"{self.total_steps}, {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("OptimConfig.weight_decay and grad_clip must be >= 0")


def phase_optim_config(cfg, phase: str) -> OptimConfig:
    """The optimizer of phase "sft" or "rl" of a TrainConfig: the one home of that mapping (the
    trainer, HF -> Orbax conversion with an optimizer state, and the memory table use it)."""
    if phase not in ("sft", "rl"):
        raise ValueError(f"phase must be 'sft' or 'rl', got {phase!r}")
    s = cfg.sft if phase == "sft" else cfg.rl
    schedule = dict(schedule=s.schedule, min_lr_ratio=s.min_lr_ratio) if phase == "rl" else {}
    return OptimConfig(lr=s.lr, total_steps=max(s.steps, 1), warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                       grad_clip=s.grad_clip, freeze_vision=cfg.model.freeze_vision, **schedule)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay (or constant)."""
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup_steps=warmup, decay_steps=max(cfg.total_steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def _is_vision(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "visual" for k in path)


def trainable_labels(params):
    """'train' / 'frozen' per leaf of a params tree (frozen: the vision tower)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if _is_vision(p) else "train", params)


_CACHE: dict = {}


def make_optimizer(cfg: OptimConfig, params=None) -> optax.GradientTransformation:
    """AdamW (+ clipping); with freeze_vision, `visual.*` leaves get zero updates and no moments.

    `params` (a tree of the same structure as the params to be optimized) is required with
    freeze_vision, to label the leaves. Equal configs return the SAME transformation object, so
    jitted steps that take it as a static argument are not recompiled by a second run (resume).
    """
    key = (cfg, None if params is None else jax.tree.structure(params))
    if key not in _CACHE:
        _CACHE[key] = _make_optimizer(cfg, params)
    return _CACHE[key]


def _make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
    chain = []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    opt = optax.chain(*chain)
    if not cfg.freeze_vision:
        return opt
    if params is None:
        raise ValueError("make_optimizer(freeze_vision=True) needs `params` to find the vision tower leaves")
    labels = trainable_labels(params)
    if "frozen" not in jax.tree.leaves(labels):
        raise ValueError("freeze_vision=True but the params have no `visual` subtree")
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
