"""The relaxed token ratio (docs/method.md 3b): limit, gradient, and that it moves the hard selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.kernels.sparse_attention import SelectionConfig, select_topp
from zipr1_jax.kernels.sparse_attention.selection import (always_kept, soft_token_ratio, soft_topp_count,
                                                          topp_keep)


def _hard_count(score, valid, p, forced=None):
    keep = topp_keep(jnp.asarray(score), jnp.asarray(valid), jnp.asarray(p, jnp.float32))
    if forced is not None:
        keep = keep | (jnp.asarray(forced) & jnp.asarray(valid))
    return np.asarray(keep.sum(axis=1))


def _soft(score, valid, p, T, forced=None):
    return np.asarray(soft_topp_count(jnp.asarray(score, jnp.float32), jnp.asarray(valid),
                                      jnp.asarray(p, jnp.float32), temperature=T,
                                      forced_BS=None if forced is None else jnp.asarray(forced)))


def test_soft_count_golden_numbers():
    # scores 4, 3, 2, 1 (total 10), p = 0.75: cut at 7.5; ranks before-mass 0, 4, 7, 9 -> keeps 3.
    score = np.array([[1.0, 4.0, 2.0, 3.0]])
    valid = np.ones((1, 4), bool)
    T = 0.1
    want = sum(1 / (1 + np.exp(-(7.5 - c) / (T * 10)))
               for c in (0.0, 4.0, 7.0, 9.0))
    np.testing.assert_allclose(_soft(score, valid, [0.75], T), [want], rtol=1e-6)
    assert _hard_count(score, valid, [0.75]).tolist() == [3]


@pytest.mark.parametrize("seed", range(6))
def test_soft_count_tends_to_hard_count(seed):
    rng = np.random.default_rng(seed)
    B, S = 8, 23
    score = rng.gamma(0.5, size=(B, S)).astype(np.float32)
    # ties: some rows with repeated score values (the order must follow topp_keep's: lower index first)
    score[:3] = np.round(score[:3] * 2) / 2 + 0.25
    valid = rng.random((B, S)) < 0.8
    valid[0] = True
    valid[5] = False          # all padding: 0 kept
    valid[6, :] = False
    valid[6, 4] = True        # a single valid key
    p = rng.uniform(0.3, 0.99, size=B).astype(np.float32)
    p[1] = 1.0                # p = 1 keeps every valid key
    p[7] = 1.0
    forced = rng.random((B, S)) < 0.15
    for f in (None, forced):
        hard = _hard_count(score, valid, p, f)
        # no key sits exactly on the cut in these draws: the limit is exact
        np.testing.assert_allclose(_soft(score, valid, p, 1e-6, f), hard, atol=1e-3)
        # and the error shrinks with T
        e_big = np.abs(_soft(score, valid, p, 0.2, f) - hard).sum()
        e_small = np.abs(_soft(score, valid, p, 0.01, f) - hard).sum()
        assert e_small <= e_big + 1e-6


def test_soft_count_zero_total_and_exact_cut():
    valid = np.ones((2, 4), bool)
    score = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    # zero total: the hard rule keeps its best key only
    assert _hard_count(score[:1], valid[:1], [0.5]).tolist() == [1]
    np.testing.assert_allclose(_soft(score[:1], valid[:1], [0.5], 1e-4), [1.0])
    # p * total lands exactly on a cumulative sum (2 of 4 equal keys at p = 0.5): the hard rule keeps
    # 2, the key sitting on the cut counts 1/2 in the relaxation at every temperature.
    assert _hard_count(score[1:], valid[1:], [0.5]).tolist() == [2]
    np.testing.assert_allclose(_soft(score[1:], valid[1:], [0.5], 1e-4), [2.5], atol=1e-4)


def _qk(seed, B=2, S=19, N=4, K=2, H=8, scale=2.0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(k1, (B, S, N, H)) * scale
    k = jax.random.normal(k2, (B, S, K, H)) * scale
    valid = jnp.ones((B, S), bool).at[1, :3].set(False)  # row 1 left padded
    return q, k, valid


def test_soft_ratio_limit_equals_select_topp():
    q, k, valid = _qk(0)
    cfg = SelectionConfig(min_probes=4)
    rng = jax.random.key(3)
    hard_fn = jax.jit(lambda p: select_topp(q, k, valid, p, config=cfg, rng=rng).token_ratio_B)
    soft_fn = jax.jit(lambda p: soft_token_ratio(q, k, valid, p, temperature=1e-7, config=cfg, rng=rng))
    for p in (0.5, 0.8, 0.95, 1.0):
        p_B = jnp.full((2,), p)
        np.testing.assert_allclose(np.asarray(soft_fn(p_B)), np.asarray(hard_fn(p_B)), atol=1e-4)


def test_soft_ratio_gradient_matches_finite_differences():
    q, k, valid = _qk(1, scale=1.0)
    cfg = SelectionConfig(min_probes=4)
    rng = jax.random.key(0)
    p = jnp.array([0.8, 0.9])

    def total(qq, kk):
        return jnp.sum(soft_token_ratio(qq, kk, valid, p, temperature=0.1, config=cfg, rng=rng))

    dq = jax.random.normal(jax.random.key(9), q.shape)
    f = jax.jit(lambda x: total(q + x * dq, k))
    with jax.default_matmul_precision("highest"):
        gq, gk = jax.jit(jax.grad(total, argnums=(0, 1)))(q, k)
        analytic = float(jnp.vdot(gq, dq))
        eps = 1e-3
        fd = (float(f(eps)) - float(f(-eps))) / (2 * eps)
    # the ranking is stop-gradient and fixed over this small step: the relaxation is smooth there
    assert abs(analytic) > 1e-4
    np.testing.assert_allclose(analytic, fd, rtol=2e-2, atol=1e-5)
    assert float(jnp.abs(gk).sum()) > 0  # the gradient also reaches k


def test_always_kept_matches_select_topp_floor():
    q, k, valid = _qk(2)
    cfg = SelectionConfig(min_probes=4)
    # p tiny: only the best key plus the always-kept ones survive
    sel = select_topp(q, k, valid, jnp.full((2,), 1e-6), config=cfg, rng=jax.random.key(0))
    forced = always_kept(valid, cfg)
    assert bool(jnp.all(sel.keep_BS >= forced))
    assert np.all(np.asarray(sel.kept_count_B) <= np.asarray(forced.sum(1)) + 1)
