"""Advantages on hand-computed golden numbers: GRPO (population std), RLOO, Dr.GRPO; all-equal
groups give zeros; zero-sum groups; jit; input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.rl.advantages import (ADVANTAGE_KINDS, compute_advantages, drgrpo_advantages, grpo_advantages,
                                     rloo_advantages)

SQRT2 = 1.4142135623730951


def _close(a, b, atol=1e-6):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=atol)


def test_grpo_golden():
    # Groups [1, 0] and [0, 1]: mean 0.5, population std 0.5; with eps = 0.5: +-0.5 / (0.5 + 0.5).
    _close(grpo_advantages(jnp.array([1.0, 0, 0, 1]), 2, eps=0.5), [0.5, -0.5, -0.5, 0.5])
    # Default eps = 1e-6: +-0.5 / 0.500001.
    _close(grpo_advantages(jnp.array([1.0, 0, 0, 1]), 2), [1, -1, -1, 1], atol=5e-6)
    # One group of 4, [1, 0, 0, 1]: mean 0.5, std 0.5.
    _close(grpo_advantages(jnp.array([1.0, 0, 0, 1]), 4, eps=0.5), [0.5, -0.5, -0.5, 0.5])
    # [3, 1, 2, 6]: mean 3, deviations [0, -2, -1, 3], var = (0 + 4 + 1 + 9) / 4 = 3.5, std = 1.8708287.
    _close(grpo_advantages(jnp.array([3.0, 1, 2, 6]), 4, eps=1e-12), [0.0, -1.0690450, -0.5345225, 1.6035675])
    # [1, 0, 0]: mean 1/3, std sqrt(2/9) -> [sqrt 2, -1/sqrt 2, -1/sqrt 2]; [0, 1, 1] is its mirror.
    _close(grpo_advantages(jnp.array([1.0, 0, 0, 0, 1, 1]), 3, eps=1e-12),
           [SQRT2, -SQRT2 / 2, -SQRT2 / 2, -SQRT2, SQRT2 / 2, SQRT2 / 2])


def test_rloo_golden():
    # [3, 1, 2, 6]: baselines (1+2+6)/3 = 3, (3+2+6)/3 = 11/3, (3+1+6)/3 = 10/3, (3+1+2)/3 = 2.
    _close(rloo_advantages(jnp.array([3.0, 1, 2, 6]), 4), [0.0, 1 - 11 / 3, 2 - 10 / 3, 4.0])
    # G = 2: the other rollout is the whole baseline.
    _close(rloo_advantages(jnp.array([1.0, 0, 0, 1, 2, 0.5]), 2), [1, -1, -1, 1, 1.5, -1.5])
    # G = 1: nothing to compare with.
    _close(rloo_advantages(jnp.array([1.0, 0, 5]), 1), [0, 0, 0])


def test_drgrpo_golden():
    _close(drgrpo_advantages(jnp.array([3.0, 1, 2, 6]), 4), [0, -2, -1, 3])
    _close(drgrpo_advantages(jnp.array([1.0, 0, 0, 0, 1, 1]), 3), [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])


@pytest.mark.parametrize("kind", ADVANTAGE_KINDS)
def test_all_equal_groups_give_zeros(kind):
    r = jnp.array([1.0, 1, 1, 0, 0, 0, 1.75, 1.75, 1.75])
    _close(compute_advantages(kind, r, 3), np.zeros(9))
    _close(compute_advantages(kind, jnp.array([2.0, 7.0]), 1), [0.0, 0.0])


@pytest.mark.parametrize("kind", ADVANTAGE_KINDS)
def test_groups_are_independent_and_zero_sum(kind):
    rng = np.random.default_rng(0)
    r = rng.normal(size=12).astype(np.float32)
    a = np.asarray(compute_advantages(kind, jnp.asarray(r), 4))
    np.testing.assert_allclose(a.reshape(3, 4).sum(axis=1), 0.0, atol=1e-5)
    # Changing group 1 leaves groups 0 and 2 untouched.
    r2 = r.copy()
    r2[4:8] += 10.0 * np.arange(4)
    a2 = np.asarray(compute_advantages(kind, jnp.asarray(r2), 4))
    np.testing.assert_array_equal(a2[:4], a[:4])
    np.testing.assert_array_equal(a2[8:], a[8:])


def test_compute_advantages_dispatch_and_jit():
    r = jnp.array([3.0, 1, 2, 6, 0, 1, 0, 1])
    _close(compute_advantages("grpo", r, 4, 1e-3), grpo_advantages(r, 4, eps=1e-3))
    _close(compute_advantages("rloo", r, 4), rloo_advantages(r, 4))
    _close(compute_advantages("drgrpo", r, 4), drgrpo_advantages(r, 4))
    for kind in ADVANTAGE_KINDS:
        jitted = jax.jit(functools.partial(compute_advantages, kind, group_size=4, eps=1e-6))
        _close(jitted(r), compute_advantages(kind, r, 4, 1e-6))


def test_errors():
    with pytest.raises(ValueError, match=r"not divisible by group_size \(4\)"):
        grpo_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        rloo_advantages(jnp.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        drgrpo_advantages(jnp.zeros(4), 0)
    with pytest.raises(ValueError, match=r"must be one of \['grpo', 'rloo', 'drgrpo'\], got 'ppo'"):
        compute_advantages("ppo", jnp.zeros(4), 2)
    with pytest.raises(ValueError, match="eps must be > 0"):
        grpo_advantages(jnp.zeros(4), 2, eps=0.0)


def test_kinds_match_train_config():
    from zipr1_jax.train.config import ADVANTAGE_ESTIMATORS
    assert ADVANTAGE_KINDS == ADVANTAGE_ESTIMATORS
