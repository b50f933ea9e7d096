"""Sparse model (ZipR1 top-p attention in the decoder): p = 1 is exactly dense; p < 1 equals a
brute-force dense forward whose per-layer mask allows only the kept keys (logits, ratios and
gradients); a sparse rollout (sparse_prefill + pruned-cache decode) reproduces the learner's
sparse_forward log-probs; per-row p; mode "qkv"; bad inputs. Tiny fp32 model with O(1) weights,
left-padded batches of different lengths, backend "xla"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig, masked_dense_attention, select_topp
from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.models.qwen_vl.sparse import SparseOutput
from zipr1_jax.models.qwen_vl.text import dense_attention
from zipr1_jax.rl.rollout import SamplingConfig, generate

TOL = 1e-5       # forward, fp32 (sparse vs dense / brute force)
TOL_E2E = 1e-4   # rollout log-probs and gradients
PAD = 257
T_NEW = 6
# Small probe / window counts so that prompts of ~10-20 tokens really get pruned.
SELECTION = SelectionConfig(probe_recent=0.1, probe_random=0.2, min_probes=2)
# One capacity bucket (no lax.switch) keeps compile times low; BUCKETED runs the default buckets.
SPARSITY = SparsityConfig(backend="xla", selection=SELECTION, capacity_buckets=(1.0,))
BUCKETED = SparsityConfig(backend="xla", selection=SELECTION)


class _StandInVision(nnx.Module):
    """Vision tower stand-in (same call signature): merges 2x2 patches and projects. Exercises the
    vision plumbing (host M-RoPE ids, rope deltas != 0) at the cost of a linear layer."""

    def __init__(self, cfg):
        self.proj = nnx.Linear(4 * cfg.vision.patch_dim, cfg.text.hidden_size, rngs=nnx.Rngs(7))

    def __call__(self, pixels_PC, grid_thw):
        return self.proj(pixels_PC.reshape(pixels_PC.shape[0] // 4, -1))


def _tiny_model(layers=2):
    """Tiny fp32 model with O(1)-scale weights (the 0.02 init gives near-uniform attention, where
    top-p keeps nearly everything). Built abstractly and filled from NumPy: no eager op compiles."""
    cfg = C.tiny_qwen2_vl(layers=layers)

    def build():
        model = QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
        model.visual = nnx.data(_StandInVision(cfg))
        return model

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(1)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if len(x.shape) >= 2:
            std = 1.0 if "embed_tokens" in name else x.shape[0] ** -0.5
            return jnp.asarray(rng.normal(size=x.shape) * std, x.dtype)
        return jnp.ones(x.shape, x.dtype) if "scale" in name else jnp.zeros(x.shape, x.dtype)  # norms / biases

    return cfg, nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


@pytest.fixture(scope="module")
def tiny():
    cfg, model = _tiny_model(layers=2)
    model.sparsity = SPARSITY  # the rollout hook carries no config: the model holds it
    return cfg, model


def _left_pad(rows):
    L = max(map(len, rows))
    ids = np.full((len(rows), L), PAD, np.int32)
    mask = np.zeros((len(rows), L), np.int32)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    return ids, mask


def _prompts(seed=0, lengths=(19, 9, 14)):
    rng = np.random.default_rng(seed)
    return _left_pad([rng.integers(0, 250, n).tolist() for n in lengths])


def _with_response(ids, mask, n_resp=(5, 3, 4), seed=1):
    """Prompt + right-padded response columns (response mask 0 after each row's length)."""
    B, L = ids.shape
    T = max(n_resp)
    resp = np.random.default_rng(seed).integers(0, 250, (B, T)).astype(np.int32)
    resp_mask = (np.arange(T)[None] < np.asarray(n_resp)[:, None]).astype(np.int32)
    return np.concatenate([ids, np.where(resp_mask > 0, resp, PAD)], 1), np.concatenate([mask, resp_mask], 1)


@functools.partial(nnx.jit, static_argnames=("sparsity", "select_end"))
def _sparse(m, ids, mask, p, rng, *, sparsity, select_end=None) -> SparseOutput:
    return m.sparse_forward(ids, sparsity=sparsity, p_B=p, rng=rng, attention_mask_BL=mask, select_end=select_end)


@nnx.jit
def _dense(m, ids, mask):
    return m(ids, attention_mask_BL=mask).logits


def _brute_attends(sparsity, valid_BL, p_B, rng, select_end, n_layers, ratios):
    """Per-layer attention: dense over the kept keys only (masked_dense_attention, no compaction)."""
    E = valid_BL.shape[1] if select_end is None else select_end

    def make(y):
        def attend(q, k, v, mask_BLS):
            if not sparsity.is_sparse_layer(y):
                ratios[y] = jnp.ones(valid_BL.shape[:1])
                return dense_attention(q, k, v, mask_BLS)
            # The model's key rule: one key per row (split), folded with the layer index.
            keys = jax.vmap(lambda kk: jax.random.fold_in(kk, y))(jax.random.split(rng, valid_BL.shape[0]))
            sel = select_topp(q[:, :E], k[:, :E], valid_BL[:, :E], p_B, config=sparsity.selection, rng=keys)
            keep_BL = jnp.concatenate([sel.keep_BS, valid_BL[:, E:]], axis=1)
            ratios[y] = sel.token_ratio_B
            # "qkv": only kept queries get an output, the others only their residual.
            return masked_dense_attention(q, k, v, keep_BL, keep_BL if sparsity.mode == "qkv" else None)
        return attend
    return [make(y) for y in range(n_layers)]


@functools.partial(nnx.jit, static_argnames=("sparsity", "select_end"))
def _brute(m, ids, mask, p, rng, *, sparsity, select_end=None):
    ratios = {}
    attends = _brute_attends(sparsity, mask > 0, p, rng, select_end, len(m.layers), ratios)
    logits = m(ids, attention_mask_BL=mask, attend=attends).logits
    return logits, jnp.stack([ratios[y] for y in range(len(m.layers))], axis=1)


def _valid_close(got, want, mask, tol):
    v = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(got)[v], np.asarray(want)[v], atol=tol, rtol=0)


# ---------------------------------------------------------------------- (1) p = 1 is dense
def test_p_one_and_disabled_are_dense(tiny):
    cfg, m = tiny
    ids, mask = _with_response(*_prompts())
    dense = _dense(m, jnp.asarray(ids), jnp.asarray(mask))
    key = jax.random.key(0)
    for sparsity, p in ((SPARSITY, 1.0), (SparsityConfig(enabled=False, backend="xla"), 0.5)):
        out = _sparse(m, ids, mask, jnp.full(3, p, jnp.float32), key, sparsity=sparsity, select_end=19)
        _valid_close(out.logits, dense, mask, TOL)
        assert out.logits.dtype == jnp.float32 and out.logits.shape == (*ids.shape, cfg.text.vocab_size)
        np.testing.assert_array_equal(np.asarray(out.layer_ratio_BY), 1.0)
        np.testing.assert_array_equal(np.asarray(out.token_ratio_B), 1.0)


def test_logits_slice(tiny):
    """`logits_slice=(start, stop)` projects only those positions (the learner's response window)."""
    _, m = tiny
    ids, mask = _with_response(*_prompts())
    full = _dense(m, jnp.asarray(ids), jnp.asarray(mask))
    part = m(jnp.asarray(ids), attention_mask_BL=jnp.asarray(mask), logits_slice=(18, 24)).logits
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, 18:24]), rtol=TOL, atol=TOL)
    kw = dict(sparsity=SPARSITY, p_B=jnp.full(3, 0.7, jnp.float32), rng=jax.random.key(0),
              attention_mask_BL=jnp.asarray(mask), select_end=19)
    sp_full = m.sparse_forward(jnp.asarray(ids), **kw)
    sp_part = m.sparse_forward(jnp.asarray(ids), logits_slice=(18, 24), **kw)
    np.testing.assert_allclose(np.asarray(sp_part.logits), np.asarray(sp_full.logits[:, 18:24]), rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(np.asarray(sp_part.token_ratio_B), np.asarray(sp_full.token_ratio_B))
    for bad in ((5, 5), (0, ids.shape[1] + 1), (-1, 3), [0, 3], (0.0, 3)):
        with pytest.raises(ValueError, match="logits_slice must be a static"):
            m(jnp.asarray(ids), attention_mask_BL=jnp.asarray(mask), logits_slice=bad)


# ---------------------------------------------------------------------- (2) p < 1 == brute force
@pytest.mark.parametrize("sparsity,select_end", [
    (BUCKETED, None),  # selection over the whole sequence, bucketed capacities (lax.switch)
    (SparsityConfig(backend="xla", selection=SELECTION, layers=(1,), capacity_buckets=(1.0,)), 19)])
def test_equals_brute_force_masked_model(tiny, sparsity, select_end):
    cfg, m = tiny
    ids, mask = _with_response(*_prompts(seed=2))
    if select_end is None:  # selection over the whole (prompt + response) sequence
        ids, mask = _prompts(seed=2)
    p, key = jnp.asarray([0.6, 0.8, 0.7]), jax.random.key(3)
    out = _sparse(m, ids, mask, p, key, sparsity=sparsity, select_end=select_end)
    want, want_ratio_BY = _brute(m, jnp.asarray(ids), jnp.asarray(mask), p, key, sparsity=sparsity,
                                 select_end=select_end)
    _valid_close(out.logits, want, mask, TOL)
    np.testing.assert_allclose(np.asarray(out.layer_ratio_BY), np.asarray(want_ratio_BY), rtol=1e-6)
    # token ratio = mean over ALL layers; a dense layer counts 1.0.
    np.testing.assert_allclose(np.asarray(out.token_ratio_B), np.asarray(want_ratio_BY).mean(1), rtol=1e-6)
    ratio_BY = np.asarray(out.layer_ratio_BY)
    for y in range(cfg.text.num_hidden_layers):
        if sparsity.is_sparse_layer(y):
            assert (ratio_BY[:, y] < 1).all()  # really pruned
        else:
            assert (ratio_BY[:, y] == 1).all()
    # Ratios are counts over the valid prompt length (the [0, select_end) slice).
    n_valid = np.asarray(mask)[:, :select_end].sum(1)
    np.testing.assert_allclose(ratio_BY * n_valid[:, None], np.round(ratio_BY * n_valid[:, None]), atol=1e-4)


# ---------------------------------------------------------------------- (3) rollout == learner
def test_sparse_rollout_matches_learner_forward(tiny):
    """generate(p_B=) (sparse_prefill + decode over the pruned cache) == sparse_forward over prompt +
    generated tokens with select_end = L_prompt: greedy tokens, log-probs, ratios. Mixed batch: two
    image prompts (rope delta -2) and a text prompt (delta 0), all of different lengths."""
    cfg, m = tiny
    img = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    rng = np.random.default_rng(5)
    ids, mask = _left_pad([img + rng.integers(0, 250, 12).tolist(), rng.integers(0, 250, 9).tolist(),
                           rng.integers(0, 250, 3).tolist() + img + rng.integers(0, 250, 6).tolist()])
    grid = np.array([[1, 4, 4], [1, 4, 4]])
    pix = jnp.asarray(rng.normal(size=(32, cfg.vision.patch_dim)), jnp.float32)
    p, key = jnp.asarray([0.6, 0.75, 1.0]), jax.random.key(7)
    assert m.sparsity == SPARSITY  # the config generate()'s sparse_prefill hook uses
    out = generate(m, ids, mask, key, config=SamplingConfig(max_new_tokens=T_NEW, eos_ids=(999,), pad_id=PAD,
                                                             temperature=0.0),
                   p_B=p, pixel_values=pix, image_grid_thw=grid)
    tok = np.asarray(out.tokens_BT)
    B, L = ids.shape
    pos_3BL, deltas_B = m.position_ids(ids, mask, grid)
    assert np.asarray(deltas_B).tolist() == [-2, 0, -2]
    # Generated token i sits at position n_valid + i + rope_delta (what the rollout feeds).
    resp_pos_BT = mask.sum(1)[:, None] + np.arange(T_NEW - 1)[None] + np.asarray(deltas_B)[:, None]
    pos = np.concatenate([np.asarray(pos_3BL), np.broadcast_to(resp_pos_BT[None], (3, B, T_NEW - 1))], axis=2)
    full_ids = np.concatenate([ids, tok[:, :-1]], 1)
    full_mask = np.concatenate([mask, np.ones((B, T_NEW - 1), np.int32)], 1)
    rng_select = jax.random.split(key)[0]  # generate() splits its key into (selection, sampling)

    @nnx.jit
    def learner_and_prefill(m, full_ids, full_mask, pos, ids, mask, pos_3BL, px):
        fwd = m.sparse_forward(full_ids, sparsity=SPARSITY, p_B=p, rng=rng_select, attention_mask_BL=full_mask,
                               position_ids_3BL=pos, select_end=L, pixel_values=px, image_grid_thw=grid)
        pre = m.sparse_prefill(ids, capacity=L + 2, attention_mask_BL=mask, position_ids_3BL=pos_3BL,
                               rope_deltas_B=deltas_B, p_B=p, rng=rng_select, pixel_values=px, image_grid_thw=grid)
        return fwd, pre

    fwd, (_, cache, ratio_BY) = learner_and_prefill(m, *map(jnp.asarray, (full_ids, full_mask, pos, ids, mask,
                                                                           pos_3BL, pix)))
    logp = np.asarray(jax.nn.log_softmax(fwd.logits[:, L - 1:], axis=-1))
    np.testing.assert_array_equal(logp.argmax(-1), tok)  # greedy under the learner too
    want_lp = np.take_along_axis(logp, tok[:, :, None], axis=-1)[:, :, 0]
    np.testing.assert_allclose(np.asarray(out.logprobs_BT), want_lp, atol=TOL_E2E, rtol=0)
    np.testing.assert_allclose(np.asarray(out.layer_ratio_BY), np.asarray(fwd.layer_ratio_BY), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out.token_ratio_B), np.asarray(fwd.token_ratio_B), rtol=1e-6)
    ratio = np.asarray(out.token_ratio_B)
    assert (ratio[:2] < 0.9).all() and ratio[2] == 1.0

    # The rollout hands out its kept sets; the learner's forward with them (no re-selection) is the
    # same forward, and a p = 1 row keeps every valid prompt key.
    keep_BYL = np.asarray(out.keep_BYL)
    assert keep_BYL.shape == (B, cfg.text.num_hidden_layers, L) and keep_BYL.dtype == bool
    np.testing.assert_array_equal(keep_BYL[2], np.broadcast_to(mask[2] > 0, keep_BYL[2].shape))
    np.testing.assert_allclose(keep_BYL.sum(-1) / mask.sum(1)[:, None], np.asarray(out.layer_ratio_BY), rtol=1e-6)

    @nnx.jit
    def learner_with_kept(m, full_ids, full_mask, pos, px, kept):
        return m.sparse_forward(full_ids, sparsity=SPARSITY, p_B=p, rng=None, attention_mask_BL=full_mask,
                                position_ids_3BL=pos, select_end=L, pixel_values=px, image_grid_thw=grid,
                                kept_BYE=kept, logits_slice=(L - 1, L + T_NEW - 1))

    given = learner_with_kept(m, *map(jnp.asarray, (full_ids, full_mask, pos, pix)), jnp.asarray(keep_BYL))
    np.testing.assert_allclose(np.asarray(given.logits), np.asarray(fwd.logits[:, L - 1:]), atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(np.asarray(given.layer_ratio_BY), np.asarray(out.layer_ratio_BY))
    # Handed-over sets win over a keep rule (here the eval harness's top-k rule): same forward.
    from zipr1_jax.eval.methods import TopKRule

    ruled = m.sparse_forward(*map(jnp.asarray, (full_ids,)), sparsity=SPARSITY, p_B=p, rng=None,
                             attention_mask_BL=jnp.asarray(full_mask), position_ids_3BL=jnp.asarray(pos),
                             select_end=L, pixel_values=pix, image_grid_thw=grid, kept_BYE=jnp.asarray(keep_BYL),
                             keep_fn=TopKRule(), logits_slice=(L - 1, L + T_NEW - 1))
    np.testing.assert_allclose(np.asarray(ruled.logits), np.asarray(given.logits), atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match=r"kept_BYE must have shape"):
        m.sparse_forward(jnp.asarray(full_ids), sparsity=SPARSITY, p_B=p, attention_mask_BL=jnp.asarray(full_mask),
                         select_end=L, kept_BYE=jnp.asarray(keep_BYL[:, :, 1:]))

    # The pruned cache: per-layer length = kept count, kept entries at the front, zeros after.
    np.testing.assert_allclose(np.asarray(ratio_BY), np.asarray(out.layer_ratio_BY), rtol=1e-6)
    length_YB = np.asarray(cache.length)
    np.testing.assert_allclose(length_YB.T, np.asarray(ratio_BY) * mask.sum(1)[:, None], rtol=1e-5)
    live_YBS = np.arange(cache.capacity)[None, None, :] < length_YB[:, :, None]
    k_norm_YBS = np.abs(np.asarray(cache.k)).sum(axis=(3, 4))
    assert (k_norm_YBS[live_YBS] > 0).all() and (k_norm_YBS[~live_YBS] == 0).all()


def test_generated_vision_pad_stays_text(tiny):
    """A policy may GENERATE an image pad token. With vision_end / select_end = prompt length it keeps
    its token embedding (as in the sampler's decode) and does not shift the image features of the
    rows after it; without the limit the pad count no longer matches the images (clear error)."""
    cfg, m = tiny
    img = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
    rng = np.random.default_rng(9)
    ids, mask = _left_pad([img + rng.integers(0, 250, 5).tolist(), img + rng.integers(0, 250, 3).tolist()])
    B, L = ids.shape
    resp = rng.integers(0, 250, (B, 4)).astype(np.int32)
    resp[0, 1] = cfg.image_token_id  # row 0 generated a pad token, before row 1's image in row-major order
    full_ids, full_mask = np.concatenate([ids, resp], 1), np.concatenate([mask, np.ones((B, 4), np.int32)], 1)
    clean_ids = full_ids.copy()
    clean_ids[0, L + 1] = 7
    grid = np.array([[1, 4, 4], [1, 4, 4]])
    pix = jnp.asarray(rng.normal(size=(32, cfg.vision.patch_dim)), jnp.float32)
    x = np.asarray(m.embed(jnp.asarray(full_ids), pixel_values=pix, image_grid_thw=grid, vision_end=L))
    x_clean = np.asarray(m.embed(jnp.asarray(clean_ids), pixel_values=pix, image_grid_thw=grid, vision_end=L))
    np.testing.assert_array_equal(x[1], x_clean[1])  # row 1's image features did not move
    np.testing.assert_array_equal(x[0, L + 1], np.asarray(m.embed_tokens.embedding[...])[cfg.image_token_id])
    with pytest.raises(ValueError, match="image pad tokens do not match: 9 pad tokens"):
        m.embed(jnp.asarray(full_ids), pixel_values=pix, image_grid_thw=grid)
    pos_3BL, deltas_B = m.position_ids(ids, mask, grid)  # the prompt's; the response continues as text
    resp_pos_BT = mask.sum(1)[:, None] + np.arange(4)[None] + np.asarray(deltas_B)[:, None]
    pos = np.concatenate([np.asarray(pos_3BL), np.broadcast_to(resp_pos_BT[None], (3, B, 4))], axis=2)
    kw = dict(attention_mask_BL=jnp.asarray(full_mask), position_ids_3BL=jnp.asarray(pos), pixel_values=pix,
              image_grid_thw=grid)
    dense = m(jnp.asarray(full_ids), vision_end=L, **kw).logits
    dense_clean = m(jnp.asarray(clean_ids), vision_end=L, **kw).logits
    np.testing.assert_allclose(np.asarray(dense[1]), np.asarray(dense_clean[1]), rtol=TOL, atol=TOL)
    sp = m.sparse_forward(jnp.asarray(full_ids), sparsity=SPARSITY, p_B=jnp.asarray([0.7, 0.7]),
                          rng=jax.random.key(0), select_end=L, **kw)
    sp_clean = m.sparse_forward(jnp.asarray(clean_ids), sparsity=SPARSITY, p_B=jnp.asarray([0.7, 0.7]),
                                rng=jax.random.key(0), select_end=L, **kw)
    np.testing.assert_allclose(np.asarray(sp.logits[1]), np.asarray(sp_clean.logits[1]), rtol=TOL, atol=TOL)


# ---------------------------------------------------------------------- (4) per-row p
def test_per_row_p_in_one_batch(tiny):
    _, m = tiny
    ids, mask = _with_response(*_prompts(seed=6))
    key = jax.random.key(1)
    out = _sparse(m, ids, mask, jnp.asarray([1.0, 0.6, 1.0]), key, sparsity=SPARSITY, select_end=19)
    dense = _dense(m, jnp.asarray(ids), jnp.asarray(mask))
    rows = np.array([True, False, True])
    _valid_close(np.asarray(out.logits)[rows], np.asarray(dense)[rows], mask[rows], TOL)
    ratio = np.asarray(out.token_ratio_B)
    assert ratio[0] == 1.0 and ratio[2] == 1.0 and ratio[1] < 0.9
    v1 = mask[1] > 0
    assert not np.allclose(np.asarray(out.logits)[1][v1], np.asarray(dense)[1][v1], atol=1e-3)


# ---------------------------------------------------------------------- (5) gradients
def test_gradients_equal_brute_force(tiny):
    _, m = tiny
    ids, mask = _with_response(*_prompts(seed=8))
    p, key = jnp.asarray([0.6, 0.8, 1.0]), jax.random.key(4)
    targets = jnp.asarray(np.roll(ids, -1, axis=1))
    w = jnp.asarray(mask * np.roll(mask, -1, axis=1), jnp.float32)

    def nll(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * w) / jnp.sum(w)

    def with_aux(logits):
        return nll(logits), logits

    @nnx.jit
    def grads(m):
        g_sparse, logits = nnx.grad(lambda m: with_aux(m.sparse_forward(
            jnp.asarray(ids), sparsity=SPARSITY, p_B=p, rng=key, attention_mask_BL=jnp.asarray(mask),
            select_end=19).logits), has_aux=True)(m)
        g_brute, want = nnx.grad(lambda m: with_aux(_brute_logits(m, ids, mask, p, key)), has_aux=True)(m)
        return g_sparse, g_brute, logits, want

    g_sparse, g_brute, logits, want = grads(m)
    _valid_close(logits, want, mask, TOL)  # the forward too: all layers sparse, select_end < L
    flat_s, flat_b = jax.tree.leaves(g_sparse), jax.tree.leaves(g_brute)
    assert len(flat_s) == len(flat_b) > 0
    for a, b in zip(flat_s, flat_b):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL_E2E, rtol=1e-4)
    total = sum(float(jnp.sum(jnp.abs(a))) for a in flat_s)
    assert total > 0


def _brute_logits(m, ids, mask, p, key):
    mask = jnp.asarray(mask)
    attends = _brute_attends(SPARSITY, mask > 0, p, key, 19, len(m.layers), {})
    return m(jnp.asarray(ids), attention_mask_BL=mask, attend=attends).logits


# ---------------------------------------------------------------------- (6) mode "qkv"
def test_qkv_mode_equals_brute_force(tiny):
    _, m = tiny
    ids, mask = _with_response(*_prompts(seed=9))
    sparsity = SparsityConfig(backend="xla", selection=SELECTION, mode="qkv", capacity_buckets=(1.0,))
    p, key = jnp.asarray([0.6, 0.8, 0.7]), jax.random.key(5)
    out = _sparse(m, ids, mask, p, key, sparsity=sparsity, select_end=19)
    want, _ = _brute(m, jnp.asarray(ids), jnp.asarray(mask), p, key, sparsity=sparsity, select_end=19)
    assert np.isfinite(np.asarray(out.logits)).all()
    _valid_close(out.logits, want, mask, TOL)


# ---------------------------------------------------------------------- (7) bad inputs
def test_bad_inputs(tiny):
    _, m = tiny
    ids, mask = _prompts()
    kw = dict(sparsity=SPARSITY, rng=jax.random.key(0), attention_mask_BL=jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"p_B must have shape \(3,\)"):
        m.sparse_forward(jnp.asarray(ids), p_B=jnp.ones(2), **kw)
    with pytest.raises(ValueError, match=r"p_B values must be in \(0, 1\]"):
        m.sparse_forward(jnp.asarray(ids), p_B=jnp.asarray([0.5, 0.0, 1.0]), **kw)
    with pytest.raises(ValueError, match="select_end must be in"):
        m.sparse_forward(jnp.asarray(ids), p_B=jnp.ones(3), select_end=ids.shape[1] + 1, **kw)
    with pytest.raises(ValueError, match="select_end must be None or a static int"):
        m.sparse_forward(jnp.asarray(ids), p_B=jnp.ones(3), select_end=jnp.asarray(3), **kw)
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        m.sparse_forward(jnp.asarray(ids), p_B=jnp.ones(3), **{**kw, "sparsity": SparsityConfig(layers=(0, 2))})
    with pytest.raises(ValueError, match="must be a SparsityConfig"):
        m.sparse_forward(jnp.asarray(ids), p_B=jnp.ones(3), **{**kw, "sparsity": {"p": 0.9}})
    pos, _ = m.position_ids(ids, mask)
    with pytest.raises(ValueError, match="rope_deltas_B together with position_ids_3BL"):
        m.sparse_prefill(jnp.asarray(ids), capacity=30, attention_mask_BL=jnp.asarray(mask), position_ids_3BL=pos,
                         p_B=jnp.ones(3), rng=jax.random.key(0), sparsity=SPARSITY)
    with pytest.raises(ValueError, match="capacity"):
        m.sparse_prefill(jnp.asarray(ids), capacity=4, attention_mask_BL=jnp.asarray(mask), p_B=jnp.ones(3),
                         rng=jax.random.key(0), sparsity=SPARSITY)
