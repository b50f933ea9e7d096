"""Dispatcher (`sparse_attention`, `select_and_attend`) and `decode_attention` on the xla path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.kernels.sparse_attention import (SelectionConfig, bucket_sizes, decode_attention,
                                                default_backend, masked_dense_attention,
                                                select_and_attend, sparse_attention)
from zipr1_jax.kernels.sparse_attention import api

FP32_TOL = 1e-5


def dense_causal(q, k, v):
    """Plain causal GQA softmax attention (independent of the package)."""
    B, L, N, H = q.shape
    K = k.shape[2]
    kr, vr = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
    s = np.einsum("blnh,bsnh->bnls", q.astype(np.float64), kr) / np.sqrt(H)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return np.einsum("bnls,bsnh->blnh", a, vr)


def case(seed=0, B=2, S=24, N=4, K=2, H=8, keep_frac=0.3):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, S, N, H)).astype(np.float32)
    k = r.normal(size=(B, S, K, H)).astype(np.float32)
    v = r.normal(size=(B, S, K, H)).astype(np.float32)
    keep = r.random((B, S)) < keep_frac
    keep[:, 0] = True
    return q, k, v, keep


def compact(keep):
    B, S = keep.shape
    idx = np.zeros((B, S), np.int32)
    for b in range(B):
        kept = np.flatnonzero(keep[b])
        idx[b, :len(kept)] = kept
        idx[b, len(kept):] = kept[-1] if len(kept) else 0
    return jnp.asarray(idx), jnp.asarray(keep.sum(1).astype(np.int32))


def test_default_backend_on_cpu_is_xla():
    assert default_backend() == "xla"


def test_full_keep_equals_dense_causal():
    q, k, v, _ = case(1)
    keep = np.ones(q.shape[:2], bool)
    idx, count = compact(keep)
    out = jax.jit(lambda q, k, v: sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count))(q, k, v)
    np.testing.assert_allclose(out, dense_causal(q, k, v), atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("keep_frac", [0.05, 0.3, 0.7])
def test_kv_mode_buckets_equal_full_capacity_and_oracle(keep_frac):
    q, k, v, keep = case(2, keep_frac=keep_frac)
    idx, count = compact(keep)
    f = jax.jit(lambda q, k, v, cap=None: sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count,
                                                           capacity=cap), static_argnums=3)
    bucketed, full = f(q, k, v), f(q, k, v, q.shape[1])
    # Same math over a shorter padded length: equal up to float summation order.
    np.testing.assert_allclose(bucketed, full, atol=1e-6, rtol=0)
    np.testing.assert_allclose(bucketed, masked_dense_attention(q, k, v, jnp.asarray(keep)),
                               atol=FP32_TOL, rtol=0)


def test_bucket_sizes():
    assert bucket_sizes(2048) == (256, 512, 1024, 2048)
    assert bucket_sizes(20) == (8, 16, 20)
    assert bucket_sizes(5) == (5,)


def test_qkv_mode_semantics_and_grads():
    q, k, v, keep = case(3)
    idx, count = compact(keep)
    out = jax.jit(lambda q, k, v: sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count,
                                                   mode="qkv"))(q, k, v)
    want = np.where(keep[:, :, None, None], masked_dense_attention(q, k, v, jnp.asarray(keep)), 0.0)
    np.testing.assert_allclose(out, want, atol=FP32_TOL, rtol=0)
    w = np.random.default_rng(0).normal(size=q.shape).astype(np.float32)
    loss = lambda q, k, v: (sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count,
                                             mode="qkv") * w).sum()
    ref_loss = lambda q, k, v: (jnp.where(keep[:, :, None, None],
                                          masked_dense_attention(q, k, v, jnp.asarray(keep)), 0.0) * w).sum()
    for a, b in zip(jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v), jax.jit(jax.grad(ref_loss, (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=FP32_TOL, rtol=0)


def test_kv_mode_grads_scatter_back_to_full_kv():
    q, k, v, keep = case(4)
    idx, count = compact(keep)
    w = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
    loss = lambda q, k, v: (sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count) * w).sum()
    ref = lambda q, k, v: (masked_dense_attention(q, k, v, jnp.asarray(keep)) * w).sum()
    got, want = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=FP32_TOL, rtol=0)
    assert np.all(np.asarray(got[1])[~keep] == 0.0)  # unkept keys get no gradient


def test_select_and_attend_left_padding_p_one_is_dense():
    q, k, v, _ = case(5, S=20)
    valid = np.arange(20)[None] >= np.array([[0], [6]])
    out, sel = jax.jit(lambda q, k, v: select_and_attend(
        q, k, v, jnp.asarray(valid), jnp.asarray([1.0, 1.0]), rng=jax.random.key(0)))(q, k, v)
    np.testing.assert_array_equal(sel.keep_BS, valid)
    want = masked_dense_attention(q, k, v, jnp.asarray(valid), jnp.asarray(valid))
    np.testing.assert_allclose(jnp.where(valid[:, :, None, None], out, 0.0), want, atol=FP32_TOL, rtol=0)
    np.testing.assert_allclose(out[0], dense_causal(q, k, v)[0], atol=FP32_TOL, rtol=0)


def test_select_and_attend_matches_oracle_for_p_below_one():
    q, k, v, _ = case(6, S=32)
    valid = jnp.ones((2, 32), bool)
    out, sel = jax.jit(lambda q, k, v: select_and_attend(
        q, k, v, valid, jnp.asarray([0.5, 0.9]), config=SelectionConfig(probes="all")))(q, k, v)
    assert int(sel.kept_count_B[0]) < 32
    np.testing.assert_allclose(out, masked_dense_attention(q, k, v, sel.keep_BS), atol=FP32_TOL, rtol=0)


def decode_oracle(q, k, v, length):
    """Dense per-row recomputation over the first `length` slots only."""
    B, T, N, H = q.shape
    out = np.zeros(q.shape, np.float64)
    K = k.shape[2]
    for b in range(B):
        n = int(length[b])
        kr, vr = np.repeat(k[b, :n], N // K, axis=1), np.repeat(v[b, :n], N // K, axis=1)
        for t in range(T):
            pos = n - T + t
            s = np.einsum("nh,snh->ns", q[b, t].astype(np.float64), kr[:pos + 1]) / np.sqrt(H)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            out[b, t] = np.einsum("ns,snh->nh", a, vr[:pos + 1])
    return out


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("kwargs", [{}, dict(capacity=24), dict(capacity_buckets=(0.25, 0.5, 1.0)),
                                    dict(model_numerics=True), dict(model_numerics=True, capacity=24)])
def test_decode_matches_oracle_and_never_reads_past_length(T, kwargs):
    r = np.random.default_rng(T)
    B, S, N, K, H = 3, 32, 4, 2, 8
    q = r.normal(size=(B, T, N, H)).astype(np.float32)
    k = r.normal(size=(B, S, K, H)).astype(np.float32)
    v = r.normal(size=(B, S, K, H)).astype(np.float32)
    length = np.array([5, 24, 17], np.int32)
    beyond = (np.arange(S)[None] >= length[:, None])[:, :, None, None]
    k, v = np.where(beyond, np.nan, k), np.where(beyond, np.inf, v)  # poison: must never be read
    f = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, **kwargs))
    out = f(q, k, v, jnp.asarray(length))
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, decode_oracle(q, k, v, length), atol=FP32_TOL, rtol=0)


def test_decode_layer_of_stacked_cache_equals_that_layer():
    r = np.random.default_rng(7)
    q = jnp.asarray(r.normal(size=(2, 2, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(3, 2, 16, 2, 8)), jnp.float32) for _ in range(2))
    length = jnp.asarray([5, 16])
    for y in range(3):
        np.testing.assert_array_equal(np.asarray(decode_attention(q, k, v, length, layer=y)),
                                      np.asarray(decode_attention(q, k[y], v[y], length)))
    with pytest.raises(ValueError, match="stacked cache"):
        decode_attention(q, k, v, length, layer=3)
    with pytest.raises(ValueError, match="stacked cache"):
        decode_attention(q, k[0], v[0], length, layer=0)
    with pytest.raises(ValueError, match="static int"):
        decode_attention(q, k, v, length, layer=jnp.asarray(1))


def test_errors_are_clear(monkeypatch):
    q, k, v, keep = case(0)
    idx, count = compact(keep)
    kw = dict(kept_idx_BT=idx, kept_count_B=count)
    with pytest.raises(ValueError, match="mode"):
        sparse_attention(q, k, v, mode="q", **kw)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, v, backend="cuda", **kw)
    with pytest.raises(ValueError, match="selection"):
        sparse_attention(q, k, v)
    with pytest.raises(ValueError, match="L == S"):
        sparse_attention(q[:, :5], k, v, mode="qkv", **kw)
    with pytest.raises(ValueError, match="capacity"):
        sparse_attention(q, k, v, capacity=0, **kw)
    with pytest.raises(ValueError, match="rank 4"):
        sparse_attention(q[0], k, v, **kw)
    with pytest.raises(ValueError, match="block_sizes"):
        sparse_attention(q, k, v, block_sizes=object(), **kw)
    with pytest.raises(ValueError, match="fit"):
        decode_attention(jnp.zeros((2, 40, 4, 8)), k, v, jnp.asarray([3, 4]))
    with pytest.raises(ValueError, match="length_B"):
        decode_attention(q[:, :1], k, v, jnp.asarray([3.0, 4.0]))
    monkeypatch.setitem(api._PALLAS, "pallas_tpu", ("zipr1_jax.no_such_module", "a", "b"))
    with pytest.raises(RuntimeError, match="unavailable"):
        sparse_attention(q, k, v, backend="pallas_tpu", **kw)
