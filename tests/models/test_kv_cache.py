"""KV cache: prefill + 8 greedy decode steps equals the full forward (1e-5), for a left-padded
text batch of two, an image prompt, and multi-token decode chunks; plus cache mechanics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_utils import left_pad, pixels, text_tokens, tiny_pair, vision_block

from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.cache import KVCache, compact_front, decode_mask

TOL = 1e-5
STEPS = 9  # generated tokens: 1 from prefill + 8 decode steps


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model(request):
    cfg = C.tiny_qwen2_vl() if request.param == "qwen2_vl" else C.tiny_qwen2_5_vl()
    return cfg, tiny_pair(cfg, seed=5)[1]


@nnx.jit
def _decode(m, ids_BT, cache, deltas_B):
    return m.decode_step(ids_BT, cache, rope_deltas_B=deltas_B)


def _greedy_vs_full(cfg, m, ids, mask, vision=None, chunk=1):
    vision = vision or {}
    logits0, cache, deltas = m.prefill(jnp.asarray(ids), capacity=ids.shape[1] + STEPS,
                                       attention_mask_BL=jnp.asarray(mask), **vision)
    step_logits = [np.asarray(logits0)]
    tokens = [np.asarray(jnp.argmax(logits0, -1))]
    # Feed generated tokens in chunks of `chunk` (T > 1 exercises causality among new tokens).
    while len(tokens) < STEPS:
        n = min(chunk, STEPS - len(tokens))
        # A chunk is the greedy token followed by n - 1 teacher-forced tokens.
        new = np.concatenate([tokens[-1][:, None], np.full((ids.shape[0], n - 1), 7)], axis=1)
        logits, cache = _decode(m, jnp.asarray(new), cache, deltas)
        logits = np.asarray(logits)
        for t in range(n):
            step_logits.append(logits[:, t])
            tokens.append(new[:, t + 1] if t + 1 < n else np.argmax(logits[:, t], -1))
    gen = np.stack(tokens, axis=1)[:, :STEPS - 1]  # every token fed to decode_step
    full_ids = np.concatenate([ids, gen], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(gen)], axis=1)
    full = np.asarray(m(jnp.asarray(full_ids), attention_mask_BL=jnp.asarray(full_mask), **vision).logits)
    want = full[:, ids.shape[1] - 1:]
    got = np.stack(step_logits[:want.shape[1]], axis=1)
    assert int(cache.length[0, 0]) == int(mask[0].sum()) + want.shape[1] - 1
    return float(np.max(np.abs(got - want)))


def test_left_padded_text_batch(model):
    cfg, m = model
    rng = np.random.default_rng(0)
    ids, mask = left_pad([text_tokens(rng, 9), text_tokens(rng, 4)], cfg.pad_token_id)
    assert _greedy_vs_full(cfg, m, ids, mask) <= TOL


def test_multi_token_decode_chunks():
    # The decode path is family-independent: one family keeps the suite fast.
    cfg = C.tiny_qwen2_5_vl()
    m = tiny_pair(cfg, seed=6)[1]
    rng = np.random.default_rng(1)
    ids, mask = left_pad([text_tokens(rng, 5), text_tokens(rng, 8)], cfg.pad_token_id)
    assert _greedy_vs_full(cfg, m, ids, mask, chunk=3) <= TOL


def test_image_prompt_left_padded(model):
    cfg, m = model
    rng = np.random.default_rng(2)
    a, b = [1, 4, 6], [1, 4, 4]
    rows = [text_tokens(rng, 2) + vision_block(cfg, a) + text_tokens(rng, 3),
            vision_block(cfg, b) + text_tokens(rng, 1)]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    pv = np.concatenate([pixels(rng, cfg, a), pixels(rng, cfg, b)])
    vision = dict(pixel_values=pv, image_grid_thw=np.array([a, b]))
    assert _greedy_vs_full(cfg, m, ids, mask, vision) <= TOL


def test_compact_front_and_mask():
    x = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1, 1)
    valid = jnp.asarray([[False, True, False, True], [True, True, True, True]])
    out = compact_front(x, valid, 6)[..., 0, 0]
    np.testing.assert_array_equal(np.asarray(out), [[1, 3, 0, 0, 0, 0], [4, 5, 6, 7, 0, 0]])
    m = decode_mask(jnp.asarray([2, 0]), 2, 4)
    np.testing.assert_array_equal(np.asarray(m[0]), [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(m[1]), [[1, 0, 0, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="capacity"):
        compact_front(x, valid, 3)
    cache = KVCache.zeros(layers=2, batch=3, capacity=5, kv_heads=2, head_dim=4)
    assert jax.tree.leaves(cache)[0].shape == (2, 3, 5, 2, 4) and cache.length.dtype == jnp.int32


def test_layer_with_query_index_equals_full_layer_at_those_positions():
    # The prefill's last layer computes only the last position's output; any positions must equal
    # the full layer's output there (keys / values still over all positions, with the mask rows).
    from zipr1_jax.models.qwen_vl.text import DecoderLayer

    cfg = C.tiny_qwen2_vl()
    t = cfg.text
    layer = DecoderLayer(t, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    B, L = 2, 11
    x = jax.random.normal(jax.random.key(0), (B, L, t.hidden_size))
    ang = jax.random.uniform(jax.random.key(1), (B, L, t.head_dim)) * 3.0
    mask = jnp.tril(jnp.ones((L, L), bool))[None] & (jnp.arange(L)[None, None, :] >= jnp.asarray([0, 4])[:, None, None])
    full = layer(x, jnp.cos(ang), jnp.sin(ang), mask)
    idx = jnp.asarray([[10, 3], [10, 7]])
    got = layer(x, jnp.cos(ang), jnp.sin(ang), mask, queries=idx)
    assert got.shape == (B, 2, t.hidden_size)
    want = jnp.take_along_axis(full, idx[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL, rtol=0)
    got = layer(x, jnp.cos(ang), jnp.sin(ang), mask, queries=(4, 9))  # a static slice
    np.testing.assert_allclose(np.asarray(got), np.asarray(full[:, 4:9]), atol=TOL, rtol=0)


def test_logits_slice_equals_the_slice_of_all_logits(model):
    # With logits_slice the last layer runs only the sliced positions' queries.
    cfg, m = model
    rng = np.random.default_rng(2)
    ids, mask = left_pad([text_tokens(rng, 12), text_tokens(rng, 7)], cfg.pad_token_id)
    full = np.asarray(m(jnp.asarray(ids), attention_mask_BL=jnp.asarray(mask)).logits)
    got = np.asarray(m(jnp.asarray(ids), attention_mask_BL=jnp.asarray(mask), logits_slice=(5, 11)).logits)
    assert got.shape == (2, 6, full.shape[-1])
    np.testing.assert_allclose(got, full[:, 5:11], atol=TOL, rtol=0)
