"""attend_compact_reference (the backend contract) vs the brute-force masked dense oracle."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.kernels.sparse_attention import attend_compact_reference, masked_dense_attention

FP32_TOL = 1e-5


def compact_from_keep(keep):
    """keep [B, S] -> (kept_idx [B, S] ascending + last-index padding, count [B])."""
    B, S = keep.shape
    idx = np.zeros((B, S), np.int32)
    count = keep.sum(1).astype(np.int32)
    for b in range(B):
        kept = np.flatnonzero(keep[b])
        idx[b, :len(kept)] = kept
        idx[b, len(kept):] = kept[-1] if len(kept) else 0
    return idx, count


def rand_case(seed, B, S, N, K, H, left_pad):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, S, N, H)).astype(np.float32)
    k = r.normal(size=(B, S, K, H)).astype(np.float32)
    v = r.normal(size=(B, S, K, H)).astype(np.float32)
    valid = np.arange(S)[None] >= np.asarray(left_pad)[:, None]
    keep = (r.random((B, S)) < r.uniform(0.1, 1.0)) & valid
    return q, k, v, valid, keep


def compact_call(q, k, v, keep, T=None):
    idx, count = compact_from_keep(keep)
    T = T or keep.shape[1]
    idx = idx[:, :T]
    gather = lambda x: np.take_along_axis(x, idx[:, :, None, None], axis=1)
    S = q.shape[1]
    q_pos = np.broadcast_to(np.arange(S, dtype=np.int32), q.shape[:2])
    return gather(k), gather(v), q_pos, idx, count


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 9999), S=st.sampled_from([1, 6, 23]),
                  nkh=st.sampled_from([(4, 2, 8), (3, 1, 5), (2, 2, 4)]), data=st.data())
def test_forward_matches_masked_dense(seed, S, nkh, data):
    N, K, H = nkh
    pads = data.draw(st.lists(st.integers(0, S), min_size=2, max_size=2))
    q, k, v, valid, keep = rand_case(seed, 2, S, N, K, H, pads)
    kc, vc, q_pos, idx, count = compact_call(q, k, v, keep)
    got = jax.jit(attend_compact_reference)(q, kc, vc, q_pos, idx, count)
    want = masked_dense_attention(q, k, v, jnp.asarray(keep))
    np.testing.assert_allclose(got, want, atol=FP32_TOL, rtol=0)
    assert np.all(np.isfinite(np.asarray(got)))


def test_query_without_visible_key_outputs_zero_and_finite_grads():
    q, k, v, valid, _ = rand_case(0, 1, 8, 2, 1, 4, [0])
    keep = np.zeros((1, 8), bool)
    keep[0, [5, 6]] = True  # queries 0..4 see nothing
    kc, vc, q_pos, idx, count = compact_call(q, k, v, keep)
    out = attend_compact_reference(q, kc, vc, q_pos, idx, count)
    assert np.all(np.asarray(out)[0, :5] == 0.0)
    grads = jax.grad(lambda *a: attend_compact_reference(*a, q_pos, idx, count).sum(),
                     argnums=(0, 1, 2))(q, kc, vc)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0])[0, :5] == 0.0)


def test_garbage_beyond_count_never_leaks():
    q, k, v, _, keep = rand_case(1, 2, 12, 4, 2, 8, [0, 3])
    kc, vc, q_pos, idx, count = compact_call(q, k, v, keep)
    clean = attend_compact_reference(q, kc, vc, q_pos, idx, count)
    live = (np.arange(12)[None] < count[:, None])[:, :, None, None]
    kc_bad, vc_bad = np.where(live, kc, np.nan), np.where(live, vc, np.inf)
    dirty = attend_compact_reference(q, kc_bad, vc_bad, q_pos, idx, count)
    np.testing.assert_array_equal(clean, dirty)


def test_grads_match_dense_masked_oracle():
    q, k, v, valid, keep = rand_case(2, 2, 13, 4, 2, 8, [0, 4])
    idx, count = compact_from_keep(keep)
    q_pos = np.broadcast_to(np.arange(13, dtype=np.int32), (2, 13))
    w = np.random.default_rng(3).normal(size=q.shape).astype(np.float32)

    def sparse_loss(q, k, v):
        g = lambda x: jnp.take_along_axis(x, idx[:, :, None, None], axis=1)
        return (attend_compact_reference(q, g(k), g(v), q_pos, idx, count) * w).sum()

    def dense_loss(q, k, v):
        return (masked_dense_attention(q, k, v, jnp.asarray(keep)) * w).sum()

    got = jax.grad(sparse_loss, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=FP32_TOL, rtol=0, err_msg=f"d{name}")


def test_bf16_inputs_keep_dtype():
    q, k, v, _, keep = rand_case(4, 1, 9, 2, 1, 8, [0])
    kc, vc, q_pos, idx, count = compact_call(q, k, v, keep)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    out = attend_compact_reference(bf(q), bf(kc), bf(vc), q_pos, idx, count)
    assert out.dtype == jnp.bfloat16
    ref = attend_compact_reference(*(bf(x).astype(jnp.float32) for x in (q, kc, vc)), q_pos, idx, count)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=1e-2)


def test_bad_shapes_raise():
    q, k, v, _, keep = rand_case(0, 1, 6, 4, 2, 8, [0])
    kc, vc, q_pos, idx, count = compact_call(q, k, v, keep)
    with pytest.raises(ValueError, match="GQA"):
        attend_compact_reference(q[:, :, :3], kc, vc, q_pos, idx, count)
    with pytest.raises(ValueError, match="same shape"):
        attend_compact_reference(q, kc, vc[:, :3], q_pos, idx, count)
    with pytest.raises(ValueError, match="k_count_B"):
        attend_compact_reference(q, kc, vc, q_pos, idx, count[None])
    with pytest.raises(ValueError, match="q_pos_BL"):
        attend_compact_reference(q, kc, vc, q_pos.astype(np.float32), idx, count)


# ---------------------------------------------------------------------- the shared attention core
def _core_case(dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(ks[0], (1, 3, 4, 8)).astype(dtype)
    k = jax.random.normal(ks[1], (1, 5, 2, 8)).astype(dtype)
    v = jax.random.normal(ks[2], (1, 5, 2, 8)).astype(dtype)
    mask = jnp.ones((1, 3, 5), bool).at[0, 1].set(False)  # query 1 sees no key
    return q, k, v, mask


def test_softmax_attention_empty_rows():
    from zipr1_jax.kernels.sparse_attention.reference import softmax_attention

    q, k, v, mask = _core_case()
    zero = softmax_attention(q, k, v, mask, empty_rows="zero")
    uniform = softmax_attention(q, k, v, mask, empty_rows="uniform")
    assert np.all(np.asarray(zero[0, 1]) == 0.0)
    # uniform: query head n averages all values of its kv head n // 2
    want = np.repeat(np.asarray(v[0]).mean(axis=0), 2, axis=0)
    np.testing.assert_allclose(np.asarray(uniform[0, 1]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(zero[0, [0, 2]]), np.asarray(uniform[0, [0, 2]]), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda q: jnp.sum(softmax_attention(q, k, v, mask) ** 2))(q)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g[0, 1]) == 0.0)
    with pytest.raises(ValueError, match="empty_rows"):
        softmax_attention(q, k, v, mask, empty_rows="nan")
    with pytest.raises(ValueError, match="multiple of 3 kv heads"):
        softmax_attention(q, jnp.zeros((1, 5, 3, 8)), jnp.zeros((1, 5, 3, 8)), mask)


def test_model_attention_is_the_core_with_model_numerics():
    """The dense model layers use the core with bf16 probabilities (Hugging Face's eager rule);
    the float32 reference mode differs from it there, and not in float32."""
    from zipr1_jax.kernels.sparse_attention.reference import softmax_attention
    from zipr1_jax.models.qwen_vl.text import dense_attention

    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v, mask = _core_case(dtype)
        model = dense_attention(q, k, v, mask)
        core = softmax_attention(q, k, v, mask, empty_rows="uniform", float32=False)
        assert model.dtype == dtype and np.asarray(model).tobytes() == np.asarray(core).tobytes()
        precise = softmax_attention(q, k, v, mask, empty_rows="uniform", float32=True)
        gap = float(jnp.max(jnp.abs(precise.astype(jnp.float32) - model.astype(jnp.float32))))
        assert (gap < 1e-6) if dtype == jnp.float32 else (gap > 1e-4)


def test_causal_block_count_golden():
    from zipr1_jax.kernels.sparse_attention.reference import causal_block_count

    assert [causal_block_count(L) for L in (1, 128, 255, 256, 512, 640, 1024, 4096, 32768)] == \
        [1, 1, 1, 2, 4, 5, 8, 8, 8]


@pytest.mark.parametrize("L", [512, 389, 256])
@pytest.mark.parametrize("empty_rows,float32", [("uniform", False), ("zero", True)])
def test_causal_blocks_equal_the_whole_score_matrix(L, empty_rows, float32):
    """causal=True skips the scores above the diagonal: values and gradients equal the unblocked
    core, for uneven last blocks and rows that are unpadded, left padded (so with rows that see no
    key: the mean of ALL values under "uniform", 0 under "zero") and randomly padded."""
    from zipr1_jax.kernels.sparse_attention.reference import causal_block_count, softmax_attention

    assert causal_block_count(L) > 1
    N, K, H = 4, 2, 8
    r = np.random.default_rng(L)
    q, k, v = (jnp.asarray(r.normal(size=(3, L, n, H)), jnp.float32) for n in (N, K, K))
    valid = np.stack([np.ones(L, bool), np.arange(L) >= L - 5, r.random(L) < 0.7])
    mask = jnp.asarray(np.tril(np.ones((L, L), bool))[None] & valid[:, None, :])
    w = jnp.asarray(r.normal(size=(3, L, N, H)), jnp.float32)

    @jax.jit
    def run(q, k, v):
        out = {}
        for causal in (False, True):
            f = lambda q, k, v: softmax_attention(q, k, v, mask, causal=causal, empty_rows=empty_rows,  # noqa: E731
                                                  float32=float32)
            out[causal] = (f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v))
        return out

    out = run(q, k, v)
    (whole, g_whole), (blocks, g_blocks) = out[False], out[True]
    np.testing.assert_allclose(blocks, whole, atol=FP32_TOL, rtol=0)
    want = jnp.mean(v[1], axis=0).repeat(N // K, axis=0) if empty_rows == "uniform" else jnp.zeros((N, H))
    np.testing.assert_allclose(blocks[1, :L - 5], jnp.broadcast_to(want, (L - 5, N, H)), atol=FP32_TOL, rtol=0)
    for a, b in zip(g_blocks, g_whole):
        np.testing.assert_allclose(a, b, atol=FP32_TOL, rtol=0)


def test_causal_flag_is_ignored_off_the_square():
    """Queries != keys (a decode step, the last layer's sliced queries): no blocking, same bytes."""
    from zipr1_jax.kernels.sparse_attention.reference import softmax_attention

    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(2, 300, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(2, 512, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(r.random((2, 300, 512)) < 0.5)
    a, b = (softmax_attention(q, k, v, mask, causal=c) for c in (False, True))
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
