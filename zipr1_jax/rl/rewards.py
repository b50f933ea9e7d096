"""ZipR1 rewards (docs/method.md section 3): accuracy, efficiency, the group gate, and a registry.

    inputs = RewardInputs(responses=texts, answers=answers, answer_types=types, choices=choices,
                          token_ratio_R=out.token_ratio_B, group_size=G)
    parts = compute_rewards(inputs, group_size=G, lambda_eff=1.0, gate=True,
                            extra_rewards=(("format", 0.5),))
    parts["total"], parts["accuracy"], parts["efficiency"], parts["gate"], parts["format"]

The total per rollout is ``r = r_acc + lambda * C * (1 - tau) + sum_k w_k * r_k``: ``r_acc`` in {0, 1}
from the verifiers, ``tau`` the rollout's prefill token ratio, and ``C`` the group gate (1 when any
rollout of the prompt's group is correct). Without the gate an all-wrong group still rewards
pruning, and the policy learns to prune everything and answer nothing.

Rewards run on the host (numpy): they read decoded strings. Rows are rollouts, ``R = prompts * G``,
and the G rollouts of one prompt are contiguous rows. Users add rewards from their own code:

    @register_reward("short")
    def short(inputs: RewardInputs) -> np.ndarray:
        return np.array([len(r) < 200 for r in inputs.responses], np.float32)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from zipr1_jax.data.verifiers import verify

RewardFn = Callable[["RewardInputs"], np.ndarray]

# Keys of `compute_rewards`' result that are not reward names: extras may not use them.
RESERVED_KEYS = ("total", "accuracy", "efficiency", "gate")


@dataclass(frozen=True, kw_only=True)
class RewardInputs:
    """Everything a reward function may read, one entry per rollout row (R rows).

    Attributes:
      responses: decoded model responses, R strings.
      answers: reference answers, R entries (converted with ``str``).
      answer_types: verifier kind per row, "exact" | "choice" | "number".
      choices: option texts per row for multiple choice (None: no options anywhere).
      token_ratio_R: prefill token ratio of each rollout in [0, 1] (1 = dense).
      group_size: G, rollouts per prompt (None: let `compute_rewards` fill it in).
    """

    responses: Sequence[str]
    answers: Sequence[Any]
    answer_types: Sequence[str]
    choices: Sequence[Sequence[str]] | None = None
    token_ratio_R: np.ndarray
    group_size: int | None = None

    def __post_init__(self):
        n = len(self.responses)
        for name in ("answers", "answer_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RewardInputs.{name} has {len(getattr(self, name))} entries, "
                                 f"responses has {n}")
        if self.choices is not None and len(self.choices) != n:
            raise ValueError(f"RewardInputs.choices has {len(self.choices)} entries, responses has {n}")
        tau_R = _check_token_ratio(self.token_ratio_R, "RewardInputs.token_ratio_R")
        if tau_R.shape[0] != n:
            raise ValueError(f"RewardInputs.token_ratio_R has {tau_R.shape[0]} entries, responses has {n}")
        object.__setattr__(self, "token_ratio_R", tau_R)
        if self.group_size is not None:
            _check_groups(n, self.group_size, "RewardInputs")

    @property
    def num_rollouts(self) -> int:
        return len(self.responses)

    def row_choices(self, i: int) -> tuple[str, ...]:
        if self.choices is None or self.choices[i] is None:
            return ()
        return tuple(self.choices[i])

    @classmethod
    def from_prompts(cls, *, responses: Sequence[str], answers: Sequence[Any], answer_types: Sequence[str],
                     choices: Sequence[Sequence[str]] | None = None, token_ratio_R, group_size: int
                     ) -> "RewardInputs":
        """Build from per-PROMPT fields (one entry per prompt) repeated for its G contiguous rollouts."""
        _check_groups(len(responses), group_size, "RewardInputs.from_prompts")
        n_prompts = len(responses) // group_size
        for name, seq in (("answers", answers), ("answer_types", answer_types), ("choices", choices)):
            if seq is not None and len(seq) != n_prompts:
                raise ValueError(f"RewardInputs.from_prompts: {name} has {len(seq)} entries, expected one "
                                 f"per prompt ({len(responses)} responses / group size {group_size} = "
                                 f"{n_prompts})")

        def rep(seq):
            return None if seq is None else [x for x in seq for _ in range(group_size)]

        return cls(responses=list(responses), answers=rep(answers), answer_types=rep(answer_types),
                   choices=rep(choices), token_ratio_R=token_ratio_R, group_size=group_size)


# ---------------------------------------------------------------------- validation helpers
def _check_groups(n: int, group_size, where: str) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{where}: group_size must be an int >= 1, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"{where}: the number of rollouts ({n}) is not divisible by group_size "
                         f"({group_size}); the G rollouts of each prompt must be contiguous rows")


def _check_token_ratio(token_ratio_R, name: str) -> np.ndarray:
    tau_R = np.asarray(token_ratio_R, dtype=np.float32)
    if tau_R.ndim != 1:
        raise ValueError(f"{name} must be 1-D [R], got shape {tau_R.shape}")
    bad = ~np.isfinite(tau_R) | (tau_R < 0) | (tau_R > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must lie in [0, 1]; row {i} is {tau_R[i]!r}")
    return tau_R


def _check_vector(x_R, name: str, n: int | None = None) -> np.ndarray:
    x_R = np.asarray(x_R, dtype=np.float32)
    if x_R.ndim != 1:
        raise ValueError(f"{name} must be 1-D [R], got shape {x_R.shape}")
    if n is not None and x_R.shape[0] != n:
        raise ValueError(f"{name} has {x_R.shape[0]} entries, expected {n}")
    if not np.isfinite(x_R).all():
        raise ValueError(f"{name} has non-finite values at rows {np.flatnonzero(~np.isfinite(x_R)).tolist()}")
    return x_R


def _check_weight(w, name: str) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"{name} must be a finite number, got {w!r}")
    return float(w)


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, *, override: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(inputs: RewardInputs) -> np.ndarray [R]`` under ``name``.

    Registering a taken name raises unless ``override=True`` (so two modules cannot silently
    replace each other's reward). Returns the function unchanged.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if name in RESERVED_KEYS and name != "accuracy":
        raise ValueError(f"reward name {name!r} is reserved for compute_rewards' outputs {RESERVED_KEYS}")

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}) needs a callable, got {type(fn).__name__}")
        if name in _REGISTRY and not override:
            raise ValueError(f"reward {name!r} is already registered; pass override=True to replace it")
        _REGISTRY[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {list_rewards()}") from None


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def unregister_reward(name: str) -> None:
    """Remove a registered reward (tests and notebooks that register temporary ones)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {list_rewards()}")
    del _REGISTRY[name]


def _run_reward(name: str, inputs: RewardInputs) -> np.ndarray:
    out = get_reward(name)(inputs)
    return _check_vector(out, f"reward {name!r} output", inputs.num_rollouts)


# ---------------------------------------------------------------------- built-in rewards
@register_reward("accuracy")
def accuracy_reward(inputs: RewardInputs) -> np.ndarray:
    """1.0 where the verifier accepts the response against the reference answer, else 0.0."""
    return np.array([float(verify(resp, str(ans), atype, choices=inputs.row_choices(i)))
                     for i, (resp, ans, atype) in enumerate(
                         zip(inputs.responses, inputs.answers, inputs.answer_types))], dtype=np.float32)


_FORMAT = re.compile(r"<answer>\s*\S.*?</answer>", re.IGNORECASE | re.DOTALL)


@register_reward("format")
def format_reward(inputs: RewardInputs) -> np.ndarray:
    """1.0 where the response holds a closed, non-empty ``<answer>...</answer>`` tag."""
    return np.array([float(isinstance(r, str) and _FORMAT.search(r) is not None) for r in inputs.responses],
                    dtype=np.float32)


def efficiency_reward(token_ratio_R) -> np.ndarray:
    """r_eff = 1 - tau: the fraction of prefill tokens the rollout pruned (0 when dense)."""
    return (1.0 - _check_token_ratio(token_ratio_R, "token_ratio_R")).astype(np.float32)


# ---------------------------------------------------------------------- combination
def group_gate(r_acc_R, group_size: int) -> np.ndarray:
    """C_R: 1.0 on every row of a group where at least one rollout is correct (r_acc > 0), else 0.0."""
    r_acc_R = _check_vector(r_acc_R, "r_acc_R")
    _check_groups(r_acc_R.shape[0], group_size, "group_gate")
    any_G = (r_acc_R.reshape(-1, group_size) > 0).any(axis=1)
    return np.repeat(any_G, group_size).astype(np.float32)


PATH_WEIGHTS = ("correct", "gate", "one")


def path_weights(r_acc_R, group_size: int, kind: str = "correct") -> np.ndarray:
    """Per-rollout weight w of the pathwise efficiency term (docs/method.md 3b), float32 [R].

    "correct": C * r_acc (only answers that were right under their budget push for fewer tokens;
    since a correct row always has C = 1 this is r_acc itself); "gate": C, every row of a group
    with at least one correct rollout; "one": every row.
    """
    r_acc_R = _check_vector(r_acc_R, "r_acc_R")
    if kind not in PATH_WEIGHTS:
        raise ValueError(f"path weight must be one of {PATH_WEIGHTS}, got {kind!r}")
    c_R = group_gate(r_acc_R, group_size)
    if kind == "correct":
        return (c_R * r_acc_R).astype(np.float32)
    if kind == "gate":
        return c_R
    return np.ones_like(r_acc_R)


def combine_rewards(r_acc_R, r_eff_R, *, group_size: int, lambda_eff: float, gate: bool = True,
                    extra: Iterable[tuple[float, np.ndarray]] | None = None) -> np.ndarray:
    """r_R = r_acc + lambda_eff * C * r_eff + sum_k w_k * r_k  (C = 1 everywhere when ``gate=False``).

    Args:
      r_acc_R, r_eff_R: accuracy and efficiency rewards [R].
      group_size: G (contiguous groups).
      lambda_eff: weight of the efficiency reward (>= 0; the paper uses 1).
      gate: apply the group gate C (docs/method.md: without it all-wrong groups still reward pruning).
      extra: (weight, r_R) pairs added to the total.
    Returns:
      r_R float32.
    """
    r_acc_R = _check_vector(r_acc_R, "r_acc_R")
    r_eff_R = _check_vector(r_eff_R, "r_eff_R", r_acc_R.shape[0])
    lam = _check_weight(lambda_eff, "lambda_eff")
    if lam < 0:
        raise ValueError(f"lambda_eff must be >= 0, got {lambda_eff!r}")
    c_R = group_gate(r_acc_R, group_size) if gate else np.ones_like(r_acc_R)
    total_R = r_acc_R + np.float32(lam) * c_R * r_eff_R
    for k, (w, r_R) in enumerate(extra or ()):
        total_R = total_R + np.float32(_check_weight(w, f"extra[{k}] weight")) * _check_vector(
            r_R, f"extra[{k}] reward", r_acc_R.shape[0])
    return total_R.astype(np.float32)


def compute_rewards(inputs: RewardInputs, *, group_size: int, lambda_eff: float, gate: bool = True,
                    extra_rewards: Sequence[tuple[str, float]] = ()) -> dict[str, np.ndarray]:
    """All reward parts of a rollout batch, each np.float32 [R].

    Args:
      inputs: the rollouts (``inputs.group_size``, if set, must equal ``group_size``).
      group_size: G.
      lambda_eff: efficiency weight.
      gate: use the group gate.
      extra_rewards: (registered reward name, weight) pairs added to the total.
    Returns:
      dict with "total", "accuracy", "efficiency" (1 - tau, before gate and weight), "gate" (the
      multiplier C actually applied: all ones when ``gate=False``) and one entry per extra reward
      (unweighted).
    """
    _check_groups(inputs.num_rollouts, group_size, "compute_rewards")
    if inputs.group_size is None:
        inputs = replace(inputs, group_size=group_size)
    elif inputs.group_size != group_size:
        raise ValueError(f"compute_rewards: group_size={group_size} but inputs.group_size={inputs.group_size}")
    names = [n for n, _ in extra_rewards]
    for n in names:
        if n in RESERVED_KEYS:
            raise ValueError(f"extra reward {n!r} clashes with the reported keys {RESERVED_KEYS}")
    if len(set(names)) != len(names):
        raise ValueError(f"extra_rewards names must be unique, got {names}")
    for n in names:
        get_reward(n)  # unknown names fail before any reward runs

    r_acc_R = _run_reward("accuracy", inputs)
    r_eff_R = efficiency_reward(inputs.token_ratio_R)
    extras = {n: _run_reward(n, inputs) for n in names}
    total_R = combine_rewards(r_acc_R, r_eff_R, group_size=group_size, lambda_eff=lambda_eff, gate=gate,
                              extra=[(w, extras[n]) for n, w in extra_rewards])
    c_R = group_gate(r_acc_R, group_size) if gate else np.ones_like(r_acc_R)
    return {"total": total_R, "accuracy": r_acc_R, "efficiency": r_eff_R, "gate": c_R, **extras}
