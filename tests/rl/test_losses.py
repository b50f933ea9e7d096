"""Losses on hand-checkable numbers: k3 KL, the asymmetric clipped surrogate and its clip flags, the
three aggregations, grpo_loss (values, metrics, gradients, padding safety, jit), token log-probs and
the shifted SFT cross entropy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.rl.losses import (aggregate, clipped_surrogate, grpo_loss, k3_kl, sft_loss,
                                 token_logprobs_from_logits)

LN2 = math.log(2.0)
K3_HALF = 0.5 + LN2 - 1.0  # k3 at ref - logp = ln 0.5: exp(d) - d - 1 = 0.5 + ln 2 - 1 = 0.1931472

# Two rollouts x 4 tokens with ratios rho = [1.5, 0.5, 1.0, 1.1], advantages +1 and -1,
# clip range [0.8, 1.28] (eps_low 0.2, eps_high 0.28):
#   A = +1: min(rho, clip(rho)) = [1.28, 0.5, 1.0, 1.1]     clip active on rho = 1.5
#   A = -1: min(-rho, -clip(rho)) = [-1.5, -0.8, -1.0, -1.1]  clip active on rho = 0.5
RHO = np.array([1.5, 0.5, 1.0, 1.1])
EPS = dict(eps_low=0.2, eps_high=0.28)
OBJ = np.array([[1.28, 0.5, 1.0, 1.1], [-1.5, -0.8, -1.0, -1.1]])
CLIPPED = np.array([[True, False, False, False], [False, True, False, False]])
MASK = np.array([[True, True, True, True], [True, True, False, False]])


def _logp_old(seed=0):
    old = jnp.asarray(np.random.default_rng(seed).normal(size=(2, 4)) - 2.0, jnp.float32)
    return old + jnp.log(jnp.asarray(RHO, jnp.float32))[None], old


def _close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol)


def test_k3_kl_golden():
    _close(k3_kl(jnp.zeros((1, 3)), jnp.zeros((1, 3))), [[0, 0, 0]])
    # d = ref - logp: ln 0.5 -> 0.1931472; 1 -> e - 2; -1 -> 1/e
    _close(k3_kl(jnp.array([[0.0, 0.0, 0.0]]), jnp.array([[math.log(0.5), 1.0, -1.0]])),
           [[K3_HALF, math.e - 2.0, math.exp(-1.0)]])
    x = jax.random.normal(jax.random.key(0), (2, 3, 50)) * 3
    assert float(k3_kl(x[0], x[1]).min()) >= 0.0
    assert k3_kl(x[0].astype(jnp.bfloat16), x[1]).dtype == jnp.float32


def test_k3_kl_gradient():
    ref = jnp.array([[-1.0, -2.5, -0.1]])
    g = jax.grad(lambda l: k3_kl(l, ref).sum())(ref)
    _close(g, np.zeros((1, 3)))
    # d/dlogp (exp(ref - logp) - (ref - logp) - 1) = 1 - exp(ref - logp): at logp = 0, ref = ln 0.5 -> 0.5
    _close(jax.grad(lambda l: k3_kl(l, jnp.full((1, 1), math.log(0.5))).sum())(jnp.zeros((1, 1))), [[0.5]])


def test_clipped_surrogate_golden():
    obj, clipped = clipped_surrogate(*_logp_old(), jnp.array([1.0, -1.0]), **EPS)
    _close(obj, OBJ, 1e-5)
    np.testing.assert_array_equal(clipped, CLIPPED)
    # A = 0: nothing to clip, objective 0.
    obj0, clipped0 = clipped_surrogate(*_logp_old(), jnp.zeros(2), **EPS)
    _close(obj0, np.zeros((2, 4)))
    assert not np.asarray(clipped0).any()
    # Symmetric range for comparison: rho = 1.5 with eps_high 0.2 is clipped at 1.2.
    obj_sym, _ = clipped_surrogate(*_logp_old(), jnp.array([1.0, -1.0]), eps_low=0.2, eps_high=0.2)
    _close(obj_sym[0, 0], 1.2, 1e-5)


def test_aggregate_golden():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    m = jnp.array([[True, True, True], [True, False, False], [False, False, False]])
    _close(aggregate(x, m, "token"), (1 + 2 + 3 + 4) / 4)
    _close(aggregate(x, m, "seq"), (2.0 + 4.0) / 2)  # the empty third row is excluded
    _close(aggregate(x, m, "drgrpo"), 10.0 / 9)
    empty = jnp.zeros((2, 3), bool)
    for kind in ("token", "seq", "drgrpo"):
        assert float(aggregate(x[:2], empty, kind)) == 0.0
    with pytest.raises(ValueError, match=r"aggregation must be one of \['token', 'seq', 'drgrpo'\]"):
        aggregate(x, m, "sum")


@pytest.mark.parametrize("aggregation,expected", [
    ("token", -(3.88 - 2.3) / 6),          # masked sum of OBJ = 3.88 + (-1.5 - 0.8), 6 tokens
    ("seq", -(3.88 / 4 + -2.3 / 2) / 2),   # row means 0.97 and -1.15
    ("drgrpo", -(3.88 - 2.3) / 8),         # B * T = 8
])
def test_grpo_loss_golden(aggregation, expected):
    logp, old = _logp_old()
    loss, metrics = grpo_loss(logp, old, None, jnp.array([1.0, -1.0]), jnp.asarray(MASK), beta=0.04,
                              aggregation=aggregation, **EPS)
    _close(loss, expected, 1e-5)
    _close(metrics["pg_loss"], expected, 1e-5)
    assert float(metrics["kl"]) == 0.0
    _close(metrics["clip_frac"], 2 / 6)  # one clipped token per row, 6 masked tokens
    _close(metrics["ratio_mean"], (1.5 + 0.5 + 1.0 + 1.1 + 1.5 + 0.5) / 6, 1e-5)
    assert loss.dtype == jnp.float32 and all(v.shape == () for v in metrics.values())


def test_grpo_loss_kl_term():
    # rho = 1 and A = 0, so the loss is the KL term alone: beta * k3(ln 0.5) per token.
    z = jnp.zeros((2, 3))
    ref = jnp.full((2, 3), math.log(0.5))
    mask = jnp.ones((2, 3), bool)
    loss, metrics = grpo_loss(z, z, ref, jnp.zeros(2), mask, beta=0.1, aggregation="token", **EPS)
    _close(metrics["kl"], K3_HALF)
    _close(loss, 0.1 * K3_HALF)
    for no_kl in (dict(ref_logp_BT=None, beta=0.1), dict(ref_logp_BT=ref, beta=0.0)):
        r = no_kl.pop("ref_logp_BT")
        loss0, m0 = grpo_loss(z, z, r, jnp.zeros(2), mask, aggregation="token", **no_kl, **EPS)
        assert float(loss0) == 0.0 and float(m0["kl"]) == 0.0


def test_grpo_loss_gradient_on_policy():
    # At rho = 1 (logp == old) the surrogate's gradient is A: d loss / d logp = -A_b / n_tokens for
    # token aggregation; padding gets 0; a KL term at logp == ref adds nothing.
    logp = jax.random.normal(jax.random.key(1), (2, 4)) - 2.0
    adv = jnp.array([0.7, -1.3])
    mask = jnp.asarray(MASK)
    for ref in (None, logp):
        g = jax.grad(lambda l: grpo_loss(l, logp, ref, adv, mask, beta=0.5, aggregation="token", **EPS)[0])(logp)
        _close(g, -np.asarray(adv)[:, None] * MASK / 6.0)
    g_seq = jax.grad(lambda l: grpo_loss(l, logp, None, adv, mask, beta=0.0, aggregation="seq", **EPS)[0])(logp)
    _close(g_seq, -np.asarray(adv)[:, None] * MASK / np.array([[4.0], [2.0]]) / 2.0)
    g_dr = jax.grad(lambda l: grpo_loss(l, logp, None, adv, mask, beta=0.0, aggregation="drgrpo", **EPS)[0])(logp)
    _close(g_dr, -np.asarray(adv)[:, None] * MASK / 8.0)


def test_grpo_loss_gradient_clipped_tokens():
    # Clipped tokens get no gradient; unclipped ones get -rho * A / n.
    logp, old = _logp_old()
    g = jax.grad(lambda l: grpo_loss(l, old, None, jnp.array([1.0, -1.0]), jnp.asarray(MASK), beta=0.0,
                                     aggregation="token", **EPS)[0])(logp)
    expected = -np.where(CLIPPED, 0.0, RHO[None] * np.array([[1.0], [-1.0]])) * MASK / 6.0
    _close(g, expected, 1e-5)


def test_grpo_loss_padding_garbage_is_harmless():
    logp, old = _logp_old()
    mask = jnp.asarray(MASK)
    bad_logp = jnp.where(mask, logp, -jnp.inf)
    bad_old = jnp.where(mask, old, 1e4)
    bad_ref = jnp.where(mask, old, jnp.nan)
    adv = jnp.array([1.0, -1.0])

    def f(l, o, r):
        return grpo_loss(l, o, r, adv, mask, beta=0.1, aggregation="token", **EPS)

    loss, metrics = f(logp, old, old)
    loss_bad, metrics_bad = f(bad_logp, bad_old, bad_ref)
    _close(loss_bad, float(loss))
    for k in metrics:
        _close(metrics_bad[k], float(metrics[k]))
    g = jax.grad(lambda l: f(l, bad_old, bad_ref)[0])(bad_logp)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[~MASK], 0.0)


def test_grpo_loss_jit_matches_eager():
    logp, old = _logp_old()
    ref = old - 0.3
    adv = jnp.array([1.0, -1.0])
    mask = jnp.asarray(MASK)
    for aggregation in ("token", "seq", "drgrpo"):
        fn = functools.partial(grpo_loss, beta=0.04, aggregation=aggregation, **EPS)
        eager = fn(logp, old, ref, adv, mask)
        jitted = jax.jit(fn)(logp, old, ref, adv, mask)
        jax.tree.map(lambda a, b: _close(a, float(b), 1e-6), jitted, eager)
    # Clip epsilons may also be traced values (e.g. a schedule).
    traced = jax.jit(lambda lo, hi: grpo_loss(logp, old, None, adv, mask, beta=0.0, eps_low=lo, eps_high=hi,
                                              aggregation="token")[0])(0.2, 0.28)
    _close(traced, -(3.88 - 2.3) / 6, 1e-5)


def test_grpo_loss_errors():
    logp, old = _logp_old()
    adv, mask = jnp.array([1.0, -1.0]), jnp.asarray(MASK)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        grpo_loss(logp, old, None, adv, mask, beta=0.0, aggregation="mean", **EPS)
    with pytest.raises(ValueError, match=r"old_logp_BT has shape \(2, 3\), expected \(2, 4\)"):
        grpo_loss(logp, old[:, :3], None, adv, mask, beta=0.0, **EPS)
    with pytest.raises(ValueError, match="mask_BT has shape"):
        grpo_loss(logp, old, None, adv, mask[:1], beta=0.0, **EPS)
    with pytest.raises(ValueError, match=r"adv_B must be \[B\] = \[2\]"):
        grpo_loss(logp, old, None, jnp.ones(3), mask, beta=0.0, **EPS)
    with pytest.raises(ValueError, match="eps_low must be in"):
        grpo_loss(logp, old, None, adv, mask, beta=0.0, eps_low=1.0, eps_high=0.2)
    with pytest.raises(ValueError, match="eps_high must be >= 0"):
        clipped_surrogate(logp, old, adv, 0.2, -0.1)


def test_token_logprobs_from_logits():
    logits = jax.random.normal(jax.random.key(2), (2, 3, 7)) * 4
    tokens = jax.random.randint(jax.random.key(3), (2, 3), 0, 7)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
    got = token_logprobs_from_logits(logits, tokens)
    _close(got, np.asarray(want), 1e-5)
    assert got.dtype == jnp.float32
    # The sampler's per-step [B, V] shape: the same numbers row by row.
    _close(token_logprobs_from_logits(logits.reshape(6, 7), tokens.reshape(6)), np.asarray(want).reshape(6), 1e-5)
    # Temperature scales the logits like the sampler does.
    want_t = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7, -1), tokens[..., None], -1)[..., 0]
    _close(token_logprobs_from_logits(logits, tokens, temperature=0.7), np.asarray(want_t), 1e-5)
    # Golden: logits [0, ln 3] -> log p = [ln 1/4, ln 3/4].
    _close(token_logprobs_from_logits(jnp.array([[[0.0, math.log(3.0)]] * 2]), jnp.array([[0, 1]])),
           [[math.log(0.25), math.log(0.75)]])
    _close(jax.jit(token_logprobs_from_logits)(logits, tokens), np.asarray(want), 1e-5)
    with pytest.raises(ValueError, match="leading dimensions"):
        token_logprobs_from_logits(logits, tokens[:, :2])


def test_sft_loss_golden_and_shift():
    # ids [0, 1, 0]; position 0 has logits [0, ln 3] (p(1) = 3/4) and predicts ids[1] = 1;
    # position 1 is uniform and predicts ids[2] = 0; the last position predicts nothing.
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0], [50.0, -50.0]]])
    ids = jnp.array([[0, 1, 0]])
    loss, n = sft_loss(logits, ids, jnp.array([[False, True, True]]))
    _close(loss, (math.log(4 / 3) + LN2) / 2)
    assert int(n) == 2 and loss.dtype == jnp.float32 and n.dtype == jnp.int32
    # Only the answer token (last): CE = ln 2.
    loss, n = sft_loss(logits, ids, jnp.array([[False, False, True]]))
    _close(loss, LN2)
    assert int(n) == 1
    # Column 0 can never be a target; no targets -> loss 0, count 0.
    loss, n = sft_loss(logits, ids, jnp.array([[True, False, False]]))
    assert float(loss) == 0.0 and int(n) == 0
    # The last position's logits do not matter.
    other = logits.at[:, -1].set(jnp.array([-9.0, 9.0]))
    _close(sft_loss(other, ids, jnp.array([[False, True, True]]))[0], (math.log(4 / 3) + LN2) / 2)


def test_sft_loss_gradient_and_jit():
    logits = jax.random.normal(jax.random.key(4), (2, 5, 11))
    ids = jax.random.randint(jax.random.key(5), (2, 5), 0, 11)
    mask = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], bool)
    loss, n = jax.jit(sft_loss)(logits, ids, mask)
    _close(loss, float(sft_loss(logits, ids, mask)[0]), 1e-6)
    assert int(n) == 5
    # d CE / d logits = softmax - onehot at target-predicting positions, / n; zero elsewhere.
    g = jax.grad(lambda x: sft_loss(x, ids, mask)[0])(logits)
    p = jax.nn.softmax(logits, -1)
    onehot = jax.nn.one_hot(jnp.roll(ids, -1, axis=1), 11)
    w = jnp.roll(mask, -1, axis=1).at[:, -1].set(False)[..., None] / 5.0
    _close(g, np.asarray((p - onehot) * w), 1e-5)
    with pytest.raises(ValueError, match="must share"):
        sft_loss(logits, ids[:, :4], mask)


def test_aggregations_match_train_config():
    from zipr1_jax.rl.losses import AGGREGATIONS
    from zipr1_jax.train.config import AGGREGATIONS as CONFIG_AGGREGATIONS
    assert AGGREGATIONS == CONFIG_AGGREGATIONS
