"""Top-p selection vs a brute-force NumPy (float64) implementation of docs/method.md section 1."""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig, select_topp
from zipr1_jax.kernels.sparse_attention import selection as sel_mod


def np_cut(score, valid, p):
    """Fewest valid keys (desc score, ties by index) whose sum reaches p * total.

    The cut p * total is taken in float32 like the kernel's: p is a float32 threshold there (0.6 is
    0.60000002), so with integer scores a float64 cut can land exactly on a cumulative sum that the
    float32 one just exceeds (scores [0, 0, 0, 1, 3 x 8], p = 0.6: 5 keys in float64, 6 in float32).
    """
    js = [j for j in range(len(score)) if valid[j]]
    if not js:
        return np.zeros(len(score), bool)
    order = sorted(js, key=lambda j: (-score[j], j))
    total = sum(score[j] for j in js)
    if p >= 1.0:
        b = len(js)
    else:
        csum, b = 0.0, len(js)
        for i, j in enumerate(order):
            csum += score[order[i]]
            if csum >= float(np.float32(p) * np.float32(total)):
                b = i + 1
                break
    keep = np.zeros(len(score), bool)
    keep[order[:b]] = True
    return keep


def np_select(q, k, valid, p, probes, recent, cfg):
    """Brute force per row: probes is a list of probe-position lists, recent the recent counts."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, S, N, H = q.shape
    K = k.shape[2]
    G = N // K
    keep = np.zeros((B, S), bool)
    for b in range(B):
        score, count = np.zeros(S), np.zeros(S)
        for i in probes[b]:
            vis = np.array([valid[b, j] and j <= i for j in range(S)])
            count += vis
            for n in range(N):
                s = k[b, :, n // G, :] @ q[b, i, n] / math.sqrt(H)
                s = np.where(vis, s, -np.inf)
                a = np.exp(s - s.max())
                score += a / a.sum()
        if cfg.normalise:
            score = score / np.maximum(count, 1)
        keep[b] = np_cut(score, valid[b], p[b])
        vpos = np.flatnonzero(valid[b])
        if len(vpos):
            if cfg.keep_first:
                keep[b, vpos[0]] = True
            if cfg.keep_probe_window and recent[b]:
                keep[b, vpos[len(vpos) - recent[b]:]] = True
    counts = keep.sum(1)
    n = valid.sum(1)
    ratio = np.where(n > 0, counts / np.maximum(n, 1), 0.0)
    return keep, counts, ratio


def np_recent(n, cfg):
    """Recent-probe count (sampled rule, float32 ceil) for n valid tokens."""
    nr = max(1, math.ceil(np.float32(cfg.probe_recent) * np.float32(n)))
    nd = math.ceil(np.float32(cfg.probe_random) * np.float32(n))
    if nr + nd < cfg.min_probes:
        nr = cfg.min_probes - nd
    return min(nr, n)


def check_selection(sel, keep, counts, ratio, valid):
    np.testing.assert_array_equal(np.asarray(sel.keep_BS), keep)
    np.testing.assert_array_equal(np.asarray(sel.kept_count_B), counts)
    np.testing.assert_allclose(np.asarray(sel.token_ratio_B), ratio, rtol=1e-6)
    idx = np.asarray(sel.kept_idx_BT)
    for b in range(keep.shape[0]):
        c = counts[b]
        np.testing.assert_array_equal(idx[b, :c], np.flatnonzero(keep[b]))
        assert np.all((idx[b] >= 0) & (idx[b] < keep.shape[1]))
        assert not np.any(keep[b] & ~valid[b])


def make(seed, B, S, N, K, H, pads, left=True):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, S, N, H)).astype(np.float32) * 1.5
    k = r.normal(size=(B, S, K, H)).astype(np.float32) * 1.5
    j = np.arange(S)[None]
    pads = np.asarray(pads)[:, None]
    valid = j >= pads if left else j < S - pads
    return q, k, valid


# Few distinct shapes / configs: each is one jit compile (cached across hypothesis examples).
heads = st.sampled_from([(4, 2, 8), (6, 3, 5)])
_select = jax.jit(select_topp, static_argnames="config")
_topp = jax.jit(sel_mod.topp_keep)
p_values = st.sampled_from([0.3, 0.6, 0.9, 0.975, 1.0])


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 10_000), B=st.just(3), S=st.sampled_from([1, 9, 17]),
                  nkh=heads, data=st.data(), left=st.booleans(),
                  flags=st.sampled_from([(True, True, True), (False, False, False)]))
def test_select_all_probes_matches_numpy(seed, B, S, nkh, data, left, flags):
    N, K, H = nkh
    pads = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    p = data.draw(st.lists(p_values, min_size=B, max_size=B))
    cfg = SelectionConfig(probes="all", keep_first=flags[0], keep_probe_window=flags[1],
                          normalise=flags[2])
    q, k, valid = make(seed, B, S, N, K, H, pads, left)
    sel = _select(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid), jnp.asarray(p), config=cfg)
    probes = [list(np.flatnonzero(valid[b])) for b in range(B)]
    recent = [np_recent(len(x), cfg) for x in probes]
    check_selection(sel, *np_select(q, k, valid, p, probes, recent, cfg), valid)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 10_000), B=st.just(3), S=st.sampled_from([11, 40]),
                  nkh=heads, data=st.data(), min_probes=st.sampled_from([4, 16]),
                  frac=st.sampled_from([(0.05, 0.05), (0.2, 0.1)]))
def test_select_sampled_probes_matches_numpy(seed, B, S, nkh, data, min_probes, frac):
    N, K, H = nkh
    pads = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    p = data.draw(st.lists(p_values, min_size=B, max_size=B))
    cfg = SelectionConfig(probe_recent=frac[0], probe_random=frac[1], min_probes=min_probes)
    q, k, valid = make(seed, B, S, N, K, H, pads)
    rng = jax.random.key(seed)
    pos, ok, recent = jax.jit(sel_mod.choose_probes, static_argnums=1)(jnp.asarray(valid), cfg, rng)
    pos, ok, recent = np.asarray(pos), np.asarray(ok), np.asarray(recent)
    probes = []
    for b in range(B):
        vpos = np.flatnonzero(valid[b])
        n = len(vpos)
        nr = max(1, math.ceil(np.float32(frac[0]) * np.float32(n)))
        nd = math.ceil(np.float32(frac[1]) * np.float32(n))
        if nr + nd < min_probes:
            nr = min_probes - nd
        nr = min(nr, n)
        nd = min(nd, n - nr)
        chosen = list(pos[b][ok[b]])
        assert recent[b] == nr and len(chosen) == nr + nd
        assert chosen[:nr] == list(vpos[n - nr:])  # the most recent valid positions
        rand = chosen[nr:]
        assert len(set(rand)) == nd and set(rand) <= set(vpos[:n - nr])  # distinct, from the rest
        probes.append(chosen)
    sel = _select(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid), jnp.asarray(p),
                  config=cfg, rng=rng)
    check_selection(sel, *np_select(q, k, valid, p, probes, list(recent), cfg), valid)


def test_random_probes_vary_with_rng_and_are_reproducible():
    cfg = SelectionConfig(probe_recent=0.05, probe_random=0.2, min_probes=1)
    valid = jnp.ones((1, 200), bool)
    a = sel_mod.choose_probes(valid, cfg, jax.random.key(0))[0]
    b = sel_mod.choose_probes(valid, cfg, jax.random.key(0))[0]
    c = sel_mod.choose_probes(valid, cfg, jax.random.key(1))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(scores=st.lists(st.integers(0, 3), min_size=12, max_size=12), p=p_values,
                  pad=st.integers(0, 4))
@hypothesis.example(scores=[0, 0, 0, 1, 3, 3, 3, 3, 3, 3, 3, 3], p=0.6, pad=0)  # float32 cut (np_cut)
def test_topp_ties_are_broken_by_index(scores, p, pad):
    S = len(scores)
    valid = np.arange(S) >= min(pad, S)
    got = _topp(jnp.asarray([scores], jnp.float32), jnp.asarray(valid[None]),
                            jnp.asarray([p], jnp.float32))
    np.testing.assert_array_equal(np.asarray(got)[0], np_cut(np.asarray(scores, float), valid, p))


def test_p_one_keeps_every_valid_key_even_with_zero_scores():
    score = jnp.asarray([[0.0, 5.0, 0.0, 1e-30, 0.0, 3.0]])
    valid = jnp.asarray([[False, True, True, True, True, True]])
    got = sel_mod.topp_keep(score, valid, jnp.asarray([1.0]))
    np.testing.assert_array_equal(got, valid)
    got = sel_mod.topp_keep(score, valid, jnp.asarray([0.99]))
    np.testing.assert_array_equal(got[0], [False, True, False, False, False, True])


def test_per_row_p_and_jit():
    q, k, valid = make(3, 2, 64, 4, 2, 8, [0, 0])
    q[1], k[1] = q[0], k[0]
    fn = jax.jit(lambda q, k, v, p, r: select_topp(q, k, v, p, config=SelectionConfig(), rng=r))
    sel = fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid), jnp.asarray([0.5, 1.0]),
             jax.random.key(0))
    assert int(sel.kept_count_B[1]) == 64 and float(sel.token_ratio_B[1]) == 1.0
    assert int(sel.kept_count_B[0]) < 64
    assert np.all(np.asarray(sel.keep_BS[1]) >= np.asarray(sel.keep_BS[0]))


def test_all_padding_row_keeps_nothing():
    q, k, _ = make(0, 2, 8, 2, 1, 4, [0, 0])
    valid = jnp.asarray([[True] * 8, [False] * 8])
    sel = select_topp(jnp.asarray(q), jnp.asarray(k), valid, 0.9, rng=jax.random.key(0))
    assert int(sel.kept_count_B[1]) == 0 and float(sel.token_ratio_B[1]) == 0.0
    assert np.all(np.asarray(sel.kept_idx_BT[1]) == 0)


def test_bad_inputs_raise_clear_errors():
    q, k, valid = (jnp.asarray(x) for x in make(0, 1, 8, 4, 2, 4, [0]))
    with pytest.raises(ValueError, match="rank 4"):
        select_topp(q[0], k, valid, 0.9, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="GQA"):
        select_topp(q[:, :, :3], k, valid, 0.9, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="L=4 must equal"):
        select_topp(q[:, :4], k, valid, 0.9, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="valid_BS"):
        select_topp(q, k, valid.astype(jnp.int32), 0.9, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="rng"):
        select_topp(q, k, valid, 0.9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(probe_recent=1.5), "probe_recent"), (dict(probes="some"), "probes"),
    (dict(min_probes=0), "min_probes"), (dict(per_kv_head=True), "per_kv_head"),
    (dict(probe_recent=0.7, probe_random=0.6), "probe_random"),
])
def test_selection_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(p=0.0), "p"), (dict(p=1.2), "p"), (dict(mode="q"), "mode"),
    (dict(layers=[0, 1]), "layers"), (dict(layers=(1, 1)), "duplicates"),
    (dict(backend="cuda"), "backend"), (dict(capacity_buckets=(0.5, 0.25, 1.0)), "increasing"),
    (dict(capacity_buckets=(0.5,)), "end with 1.0"), (dict(selection={}), "selection"),
])
def test_sparsity_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_sparsity_config_layers_and_hashable():
    cfg = SparsityConfig(layers=(0, 2))
    assert cfg.is_sparse_layer(2) and not cfg.is_sparse_layer(1)
    assert not SparsityConfig(enabled=False).is_sparse_layer(0)
    assert hash(cfg) == hash(SparsityConfig(layers=(0, 2)))
