"""Rollout sampler: cached greedy decode == step-by-step full forwards (left-padded batch), top-k=1
== greedy, determinism per key, stop tokens, and the pure sampling functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.rl.losses import token_logprobs_from_logits as token_logprobs
from zipr1_jax.rl.rollout import (RolloutError, SamplingConfig, filter_logits, first_argmax, generate,
                                  sample_logits)

TOL = 1e-4  # end-to-end fp32 tolerance (log-probs: cached decode vs full forward)
T_NEW = 7
PAD = 257


def _tiny_model(visual=None):
    cfg = C.tiny_qwen2_vl()
    model = QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    if visual is not None:
        model.visual = nnx.data(visual)
    # O(1)-scale weights: the 0.02 init gives near-uniform logits where greedy ties are fragile.
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))

    def rescale(path, x):
        k = next(keys)
        if x.ndim < 2:
            return x
        std = 1.0 if "embed_tokens" in str(path) else x.shape[0] ** -0.5
        return jax.random.normal(k, x.shape, x.dtype) * std

    nnx.update(model, jax.tree_util.tree_map_with_path(rescale, params))
    return cfg, model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


def _prompts(seed=0, lengths=(9, 4, 6)):
    rng = np.random.default_rng(seed)
    L = max(lengths)
    ids = np.full((len(lengths), L), PAD, np.int32)
    mask = np.zeros((len(lengths), L), np.int32)
    for b, n in enumerate(lengths):
        ids[b, L - n:] = rng.integers(0, 250, n)
        mask[b, L - n:] = 1
    return ids, mask


def _reference_greedy(model, ids, mask, steps):
    """Greedy decoding with a full (uncached) forward per token."""
    B, L = ids.shape
    # Right-pad to one fixed length: causal attention means later slots never change earlier logits.
    buf = np.concatenate([ids, np.full((B, steps), PAD, np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((B, steps), np.int32)], axis=1)
    fwd = nnx.jit(lambda m, x, am: m(x, attention_mask_BL=am).logits)
    toks, lps = [], []
    for i in range(steps):
        logits = np.asarray(fwd(model, jnp.asarray(buf), jnp.asarray(buf_mask)))[:, L - 1 + i]
        tok = logits.argmax(-1)
        lps.append(np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tok))))
        toks.append(tok)
        buf[:, L + i] = tok
        buf_mask[:, L + i] = 1
    return np.stack(toks, 1), np.stack(lps, 1)


def _cfg(**kw):
    base = dict(max_new_tokens=T_NEW, eos_ids=(999,), pad_id=PAD, temperature=0.0)
    return SamplingConfig(**{**base, **kw})


def test_greedy_equals_full_forward_left_padded(tiny):
    cfg, model = tiny
    ids, mask = _prompts()
    out = generate(model, ids, mask, jax.random.key(0), config=_cfg())
    want_tok, want_lp = _reference_greedy(model, ids, mask, T_NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens_BT), want_tok)
    np.testing.assert_allclose(np.asarray(out.logprobs_BT), want_lp, atol=TOL)
    assert len(set(want_tok.reshape(-1).tolist())) > 3  # a real sequence, not one repeated token
    assert np.asarray(out.mask_BT).all() and np.asarray(out.lengths_B).tolist() == [T_NEW] * 3
    assert not np.asarray(out.finished_B).any()
    np.testing.assert_array_equal(np.asarray(out.token_ratio_B), 1.0)
    assert out.layer_ratio_BY.shape == (3, cfg.text.num_hidden_layers)
    np.testing.assert_array_equal(np.asarray(out.p_B), 1.0)


def test_stop_tokens_end_rows(tiny):
    _, model = tiny
    ids, mask = _prompts()
    greedy = np.asarray(generate(model, ids, mask, jax.random.key(0), config=_cfg()).tokens_BT)
    stop = int(greedy[0, 2])  # row 0 emits it at step 2 (or earlier)
    first = {b: next((i for i in range(T_NEW) if greedy[b, i] == stop), None) for b in range(3)}
    out = generate(model, ids, mask, jax.random.key(0), config=_cfg(eos_ids=(998, stop)))
    tok, msk = np.asarray(out.tokens_BT), np.asarray(out.mask_BT)
    for b, f in first.items():
        n = T_NEW if f is None else f + 1  # the stop token itself is part of the rollout
        assert int(out.lengths_B[b]) == n and bool(out.finished_B[b]) == (f is not None)
        np.testing.assert_array_equal(tok[b, :n], greedy[b, :n])
        assert (tok[b, n:] == PAD).all() and msk[b, :n].all() and not msk[b, n:].any()
        assert (np.asarray(out.logprobs_BT)[b, n:] == 0).all()


def test_top_k_one_equals_greedy_and_sampling_is_deterministic(tiny):
    _, model = tiny
    ids, mask = _prompts(seed=1)
    greedy = generate(model, ids, mask, jax.random.key(0), config=_cfg())
    topk1 = generate(model, ids, mask, jax.random.key(5), config=_cfg(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(np.asarray(topk1.tokens_BT), np.asarray(greedy.tokens_BT))
    # At temperature 1 the reported log-prob is the full distribution's: same as greedy's.
    np.testing.assert_allclose(np.asarray(topk1.logprobs_BT), np.asarray(greedy.logprobs_BT), atol=1e-6)
    sc = _cfg(temperature=1.0, top_p=0.95)
    a = generate(model, ids, mask, jax.random.key(3), config=sc)
    b = generate(model, ids, mask, jax.random.key(3), config=sc)
    c = generate(model, ids, mask, jax.random.key(4), config=sc)
    np.testing.assert_array_equal(np.asarray(a.tokens_BT), np.asarray(b.tokens_BT))
    np.testing.assert_array_equal(np.asarray(a.logprobs_BT), np.asarray(b.logprobs_BT))
    assert not np.array_equal(np.asarray(a.tokens_BT), np.asarray(c.tokens_BT))
    assert (np.asarray(a.logprobs_BT) < 0).all()


def test_filter_logits_golden():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    # top-p 0.7: mass before each sorted token is 0, 0.5, 0.8 -> keep the first two.
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.7)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=3)))
    np.testing.assert_array_equal(kept, [[1, 1, 1, 0], [0, 1, 1, 1]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.01)))  # the top token always survives
    np.testing.assert_array_equal(kept, [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_sample_logits_distribution_and_greedy():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    toks, lps = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_p=0.7))(keys)
    toks = np.asarray(toks)[:, 0]
    assert set(toks.tolist()) == {0, 1}
    assert abs((toks == 0).mean() - 0.5 / 0.8) < 0.03  # renormalised nucleus
    np.testing.assert_allclose(np.asarray(lps)[toks == 1, 0], np.log(0.3), rtol=1e-5)
    tok, lp = sample_logits(logits, jax.random.key(0), temperature=0.0)
    assert int(tok[0]) == 0 and float(lp[0]) == pytest.approx(np.log(0.5), rel=1e-5)
    # Temperature scales the distribution the log-prob refers to.
    _, lp2 = sample_logits(logits, jax.random.key(0), temperature=2.0, top_k=1)
    want = np.log(np.sqrt(0.5) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum())
    assert float(lp2[0]) == pytest.approx(want, rel=1e-5)


def test_first_argmax_equals_argmax():
    x = np.array(jax.random.normal(jax.random.key(3), (64, 50)), np.float32)
    x[0, [4, 9]] = 9.0  # a tie: the first index wins
    x[1, :] = -np.inf  # all -inf: index 0, like jnp.argmax
    x[2, [7, 30]] = np.nan  # NaN counts as the maximum (the first one)
    x[3, 11], x[3, 40] = np.inf, np.inf
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    assert [int(i) for i in first_argmax(jnp.asarray(x[:4]))] == [4, 0, 7, 11]


def test_sampling_draws_what_categorical_draws():
    # sample_logits spells out jax.random.categorical's Gumbel rule: the same key gives the same tokens.
    logits = jax.random.normal(jax.random.key(5), (32, 300)) * 3.0
    for i in range(5):
        key = jax.random.key(i)
        tok, _ = sample_logits(logits, key, temperature=1.0)
        np.testing.assert_array_equal(np.asarray(tok), np.asarray(jax.random.categorical(key, logits, axis=-1)))


def test_bad_inputs(tiny):
    _, model = tiny
    ids, mask = _prompts()
    with pytest.raises(RolloutError, match="LEFT padded"):
        generate(model, ids, mask[:, ::-1], jax.random.key(0), config=_cfg())
    with pytest.raises(RolloutError, match="p_B must have shape"):
        generate(model, ids, mask, jax.random.key(0), config=_cfg(), p_B=np.ones(2))
    if not hasattr(model, "sparse_prefill"):
        with pytest.raises(NotImplementedError, match="sparse_prefill"):
            generate(model, ids, mask, jax.random.key(0), config=_cfg(), p_B=np.full(3, 0.95))
    with pytest.raises(RolloutError, match="top_p"):
        _cfg(top_p=0.0)
    with pytest.raises(RolloutError, match="eos_ids"):
        _cfg(eos_ids=())
    with pytest.raises(RolloutError, match="max_new_tokens"):
        _cfg(max_new_tokens=0)


def test_budget_thresholds():
    from zipr1_jax.rl.rollout import budget_thresholds

    grid = [0.94, 0.95, 0.96]
    np.testing.assert_allclose(budget_thresholds(grid, 2, 3), [0.94, 0.95, 0.96] * 2, rtol=1e-6)
    single = budget_thresholds(grid, 4, 3, budget="single", rng=np.random.default_rng(0))
    assert single.shape == (12,) and all(len(set(single[i:i + 3])) == 1 for i in range(0, 12, 3))
    assert np.isclose(single[:, None], np.asarray(grid)[None]).any(axis=1).all()
    with pytest.raises(RolloutError, match="one threshold per rollout"):
        budget_thresholds(grid, 2, 8)
    with pytest.raises(RolloutError, match="pass rng"):
        budget_thresholds(grid, 2, 3, budget="single")
    with pytest.raises(RolloutError, match=r"\(0, 1\]"):
        budget_thresholds([0.9, 1.5], 1, 2)


class _StandInVision(nnx.Module):
    """A stand-in vision tower (same call signature as the real one): merges 2x2 patches and projects.
    It exercises the sampler's vision plumbing (static grids, host M-RoPE ids, rope deltas != 0)."""

    def __init__(self, cfg):
        self.proj = nnx.Linear(4 * cfg.vision.patch_dim, cfg.text.hidden_size, rngs=nnx.Rngs(7))

    def __call__(self, pixels_PC, grid_thw):
        return self.proj(pixels_PC.reshape(pixels_PC.shape[0] // 4, -1))


def test_greedy_equals_full_forward_with_images():
    cfg, model = _tiny_model(_StandInVision(C.tiny_qwen2_vl()))
    c = cfg
    img = [c.vision_start_token_id] + [c.image_token_id] * 4 + [c.vision_end_token_id]
    rows = [img + [11, 12, 13, 14, 15], [21, 22, 23] + img + [24, 25]]
    L = max(map(len, rows))
    ids = np.full((2, L), PAD, np.int32)
    mask = np.zeros((2, L), np.int32)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    grid = np.array([[1, 4, 4], [1, 4, 4]])
    pix = np.random.default_rng(0).normal(size=(32, cfg.vision.patch_dim)).astype(np.float32)
    out = generate(model, ids, mask, jax.random.key(0), config=_cfg(), pixel_values=pix, image_grid_thw=grid)
    _, deltas = model.position_ids(ids, mask, grid)
    assert np.asarray(deltas).tolist() == [-2, -2]  # 4 image tokens occupy 2x2 positions

    buf = np.concatenate([ids, np.full((2, T_NEW), PAD, np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((2, T_NEW), np.int32)], axis=1)
    fwd = nnx.jit(lambda m, x, am, pos, px: m(x, attention_mask_BL=am, position_ids_3BL=pos, pixel_values=px,
                                               image_grid_thw=grid).logits)
    want = []
    for i in range(T_NEW):
        pos, _ = model.position_ids(buf, buf_mask, grid)  # host M-RoPE ids of the growing sequence
        logits = np.asarray(fwd(model, jnp.asarray(buf), jnp.asarray(buf_mask), pos, jnp.asarray(pix)))
        tok = logits[:, L - 1 + i].argmax(-1)
        want.append(tok)
        buf[:, L + i], buf_mask[:, L + i] = tok, 1
    np.testing.assert_array_equal(np.asarray(out.tokens_BT), np.stack(want, 1))


def test_decode_capacity_golden():
    from zipr1_jax.rl.rollout import decode_capacity

    # L = 100, 8 steps: unit 13 -> kept 24 -> 26 slots (+ T); a full prompt stays 100; steps=1: always L.
    assert decode_capacity(24, 100, 16, 8) == 26 + 16
    assert decode_capacity(26, 100, 16, 8) == 26 + 16
    assert decode_capacity(27, 100, 16, 8) == 39 + 16
    assert decode_capacity(100, 100, 16, 8) == 100 + 16
    assert decode_capacity(99, 100, 16, 8) == 100 + 16  # 8 x 13 = 104 is capped at L
    assert decode_capacity(0, 100, 16, 8) == 13 + 16
    assert decode_capacity(3, 100, 16, 1) == 100 + 16
    with pytest.raises(RolloutError, match="outside"):
        decode_capacity(101, 100, 16, 8)
    with pytest.raises(RolloutError, match="cache_steps"):
        SamplingConfig(max_new_tokens=4, eos_ids=(1,), pad_id=0, cache_steps=0)


def test_pruned_decode_cache_equals_full_capacity(tiny):
    """A sparse prefill keeps fewer prompt entries: the decode cache shrinks to them (rounded up to
    1/8 of L) and sampling is unchanged versus a decode over the whole-prompt capacity."""
    from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig

    _, m = tiny
    ids, mask = _prompts(seed=3, lengths=(40, 33, 37))
    sparsity = SparsityConfig(backend="xla", capacity_buckets=(1.0,),
                              selection=SelectionConfig(probe_recent=0.1, probe_random=0.1, min_probes=2))
    p_B = jnp.asarray([0.5, 0.6, 0.7], jnp.float32)
    key = jax.random.key(5)
    runs = {steps: generate(m, ids, mask, key, config=_cfg(temperature=1.0, cache_steps=steps), p_B=p_B,
                            sparsity=sparsity) for steps in (1, 8)}
    full, pruned = runs[1], runs[8]
    assert full.kv_capacity == 40 + T_NEW
    assert pruned.kv_capacity < full.kv_capacity
    np.testing.assert_array_equal(np.asarray(pruned.tokens_BT), np.asarray(full.tokens_BT))
    np.testing.assert_allclose(np.asarray(pruned.logprobs_BT), np.asarray(full.logprobs_BT), rtol=1e-5, atol=1e-5)
    # Dense rollouts: the longest row fills the prompt, so the capacity is L + T.
    dense = generate(m, ids, mask, key, config=_cfg(temperature=1.0), p_B=None)
    assert dense.kv_capacity == 40 + T_NEW


def _sparse_setup():
    from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig

    return SparsityConfig(backend="xla", capacity_buckets=(1.0,),
                          selection=SelectionConfig(probe_recent=0.1, probe_random=0.1, min_probes=2))


def test_generate_traced_in_a_callers_jit(tiny):
    """Inside jit there is no scalar to read back: a sparse rollout's decode cache keeps the whole
    prompt length (eagerly it is cut) and the rollout is otherwise the same."""
    _, m = tiny
    ids, mask = _prompts(seed=3, lengths=(40, 33, 37))
    sparsity, p_B = _sparse_setup(), jnp.asarray([0.5, 0.6, 0.7], jnp.float32)
    cfg = _cfg(temperature=1.0)
    eager = generate(m, ids, mask, jax.random.key(2), config=cfg, p_B=p_B, sparsity=sparsity)

    @nnx.jit
    def traced(m, ids, mask):
        out = generate(m, ids, mask, jax.random.key(2), config=cfg, p_B=p_B, sparsity=sparsity)
        return out.tokens_BT, out.logprobs_BT, out.kv_capacity

    tok, lp, cap = traced(m, jnp.asarray(ids), jnp.asarray(mask))
    assert eager.kv_capacity < ids.shape[1] + T_NEW and int(cap) == ids.shape[1] + T_NEW
    np.testing.assert_array_equal(np.asarray(tok), np.asarray(eager.tokens_BT))
    np.testing.assert_allclose(np.asarray(lp), np.asarray(eager.logprobs_BT), atol=1e-5)


def test_learner_uses_the_rollouts_kept_sets(tiny):
    """The learner's log-probs come from the kept sets it is handed: the rollout's give the
    sampler's log-probs; other sets (every key) give other log-probs, so the sets are really used."""
    from zipr1_jax.data.model_inputs import response_positions
    from zipr1_jax.rl.learner import _sequence_logprobs

    _, m = tiny
    ids, mask = _prompts(seed=4, lengths=(40, 33, 37))
    sparsity, p_B = _sparse_setup(), jnp.asarray([0.5, 0.6, 0.7], jnp.float32)
    key = jax.random.key(6)
    out = generate(m, ids, mask, key, config=_cfg(temperature=1.0), p_B=p_B, sparsity=sparsity)
    B, L = ids.shape
    pos_3BL, deltas_B = m.position_ids(ids, mask)
    seq = dict(ids=jnp.asarray(np.concatenate([ids, np.asarray(out.tokens_BT)], 1)),
               mask=jnp.asarray(np.concatenate([mask, np.asarray(out.mask_BT, np.int32)], 1)),
               pos=jnp.asarray(np.concatenate([np.asarray(pos_3BL), response_positions(
                   np.asarray(deltas_B), mask.sum(1), T_NEW)], axis=2)))
    graphdef, params = nnx.split(m, nnx.Param)
    kw = dict(graphdef=graphdef, grids=dict(image_grid=None, video_grid=None), sparsity=sparsity, L=L,
              temperature=1.0)
    sel_rng = jax.random.split(key)[0]

    def logp(keep):
        s = dict(seq) if keep is None else dict(seq, keep=keep)
        return np.asarray(_sequence_logprobs(params, s, {}, p_B, sel_rng, **kw)[0]) * np.asarray(out.mask_BT)

    rollout_lp = np.asarray(out.logprobs_BT)
    np.testing.assert_allclose(logp(out.keep_BYL), rollout_lp, atol=1e-4)
    everything = jnp.broadcast_to(jnp.asarray(mask > 0)[:, None, :], out.keep_BYL.shape)
    assert np.abs(logp(everything) - rollout_lp).max() > 1e-2
