"""Cached decode goes through the `decode_attention` dispatcher.

(a) CPU: `decode_step` on the xla path equals the dense path (`attend=dense_attention` with the
    decode mask) to float32 rounding (same numerics, another summation order: the xla path reads
    the cache in its stored layout), over sparse caches whose layers hold different lengths; slots
    past length change nothing, bit for bit; the stacked in-place cache write equals the old
    per-layer dynamic_update_slice.
(b) The whole model's decode step lowers for TPU (Mosaic) and CUDA (Triton) with one Pallas decode
    call per layer (tests/aot/test_aot_decode_step.py compiles it for real targets).
(c) The Pallas path is really taken: chosen by platform, by the model's SparsityConfig and by the
    rollout's; every Pallas call reads its layer's length + T; the logits (kernels in interpret
    mode) match the xla path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_utils import left_pad, text_tokens, tiny_pair

from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig, api, gpu, tpu
from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.cache import KVCache, write_at
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.models.qwen_vl.text import dense_attention
from zipr1_jax.rl.rollout import SamplingConfig, generate

# fp32 per-module tolerance: the xla decode (block-diagonal queries over the stored cache layout) vs
# the dense core over the same slots; they sum in different orders, measured 1.7e-6 on logits.
LAYOUT_TOL = 1e-5
INTERPRET_TOL = 1e-5  # fp32 logits: Pallas kernels (interpret mode, online softmax) vs xla; measured 2e-6
LAYERS = 3
PALLAS = {"pallas_tpu": (tpu, "decode_attention_tpu"), "pallas_triton": (gpu, "decode_attention_triton")}


@pytest.fixture(scope="module")
def model():
    return tiny_pair(C.tiny_qwen2_5_vl(layers=LAYERS), seed=3)[1]


@pytest.fixture(scope="module")
def sparse_cache(model):
    """A sparse prefill's cache (ragged lengths over layers and rows) with room for new tokens."""
    rng = np.random.default_rng(0)
    ids, mask = left_pad([text_tokens(rng, 20), text_tokens(rng, 13)], model.config.pad_token_id)
    sparsity = SparsityConfig(p=0.7, selection=SelectionConfig(probes="all", min_probes=1))
    _, cache, _ = model.sparse_prefill(jnp.asarray(ids), capacity=ids.shape[1] + 8,
                                       attention_mask_BL=jnp.asarray(mask), p_B=jnp.asarray([0.5, 0.9]),
                                       rng=jax.random.key(0), sparsity=sparsity)
    length = np.asarray(cache.length)
    assert len({tuple(row) for row in length}) == LAYERS, length  # every layer its own lengths
    return cache, jnp.asarray(mask.sum(1), jnp.int32)


def garbage_cache(seed: int, lengths_YB, capacity: int, model) -> KVCache:
    """Random finite entries in EVERY slot: slots >= length must not matter."""
    t = model.config.text
    shape = (LAYERS, len(lengths_YB[0]), capacity, t.num_key_value_heads, t.head_dim)
    k1, k2 = jax.random.split(jax.random.key(seed))
    return KVCache(k=jax.random.normal(k1, shape), v=jax.random.normal(k2, shape),
                   length=jnp.asarray(lengths_YB, jnp.int32))


def positions(pos_B, T: int):
    pos_BT = pos_B[:, None] + jnp.arange(T)[None]
    return jnp.broadcast_to(pos_BT[None], (3,) + pos_BT.shape)


@functools.partial(nnx.jit, static_argnames=("backend", "dense"))
def step(m, ids_BT, cache, pos_3BT, *, backend=None, dense=False):
    return m.decode_step(ids_BT, cache, position_ids_3BT=pos_3BT, backend=backend,
                         attend=dense_attention if dense else None)


# ------------------------------------------------------------------ (a) xla == the dense core
@pytest.mark.parametrize("T", [1, 3])
def test_dispatcher_equals_dense_path_on_sparse_cache(model, sparse_cache, T):
    cache_new = cache_old = sparse_cache[0]
    pos_B = sparse_cache[1]
    ids = np.random.default_rng(T).integers(0, 250, (2, 4, T))
    for i in range(4):  # several steps: each reads the entries the previous ones wrote
        pos = positions(pos_B + i * T, T)
        got, cache_new = step(model, jnp.asarray(ids[:, i]), cache_new, pos, backend="xla")
        want, cache_old = step(model, jnp.asarray(ids[:, i]), cache_old, pos, dense=True)
        # The xla path reads the cache in its stored layout (block-diagonal queries), so it sums in
        # another order than the dense core: equal to float32 rounding, not bit for bit.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=LAYOUT_TOL, rtol=0, err_msg=f"step {i}")
        np.testing.assert_array_equal(np.asarray(cache_new.length), np.asarray(cache_old.length))
        np.testing.assert_allclose(np.asarray(cache_new.k), np.asarray(cache_old.k), atol=LAYOUT_TOL, rtol=0)
    assert np.max(np.abs(np.asarray(got))) > 1.0  # O(1) logits: the tolerance is meaningful


def test_dispatcher_ignores_slots_past_length(model):
    lengths = [[3, 11], [7, 1], [12, 5]]
    a, b = garbage_cache(1, lengths, 16, model), garbage_cache(2, lengths, 16, model)
    same = jnp.arange(16)[None, None, :, None, None] < a.length[:, :, None, None, None]
    b = KVCache(k=jnp.where(same, a.k, b.k), v=jnp.where(same, a.v, b.v), length=a.length)
    ids, pos = jnp.asarray([[5, 9], [17, 2]]), positions(jnp.asarray([20, 30]), 2)
    got_a, _ = step(model, ids, a, pos, backend="xla")
    got_b, _ = step(model, ids, b, pos, backend="xla")
    want, _ = step(model, ids, a, pos, dense=True)
    np.testing.assert_array_equal(np.asarray(got_a), np.asarray(got_b))
    np.testing.assert_allclose(np.asarray(got_a), np.asarray(want), atol=LAYOUT_TOL, rtol=0)


def test_stacked_write_equals_per_layer_update_slice():
    k = jax.random.normal(jax.random.key(0), (3, 2, 6, 2, 4))
    new = jax.random.normal(jax.random.key(1), (2, 3, 2, 4))
    for start in ([0, 2], [3, 5], [6, 0]):  # 5 and 6 clamp to S - T = 3 like the old write
        start_B = jnp.asarray(start)
        old = jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (s, 0, 0)))(k[1], new, start_B)
        got = write_at(k, 1, new, start_B)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(old))
        np.testing.assert_array_equal(np.asarray(got[::2]), np.asarray(k[::2]))  # other layers untouched


# ------------------------------------------------------------------ (b) lowering for TPU / GPU
@pytest.mark.parametrize("platform,backend,marker", [("tpu", "pallas_tpu", "tpu_custom_call"),
                                                     ("cuda", "pallas_triton", "__gpu$xla.gpu.triton")])
def test_model_decode_step_lowers(platform, backend, marker):
    cfg = C.tiny_qwen2_5_vl(layers=LAYERS, dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    t, SDS = cfg.text, jax.ShapeDtypeStruct
    B, S = 2, 37  # odd capacity: the kernels' padding paths lower too
    kv = SDS((LAYERS, B, S, t.num_key_value_heads, t.head_dim), jnp.bfloat16)
    cache = KVCache(k=kv, v=kv, length=SDS((LAYERS, B), jnp.int32))

    def f(state, ids_BT, cache, pos_3BT):
        return nnx.merge(graphdef, state).decode_step(ids_BT, cache, position_ids_3BT=pos_3BT, backend=backend)

    args = (state, SDS((B, 1), jnp.int32), cache, SDS((3, B, 1), jnp.int32))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == LAYERS  # one Pallas decode call per decoder layer
    if platform == "cuda":
        assert "mosaic_gpu" not in text


# ------------------------------------------------------------------ (c) the Pallas path is taken
@pytest.fixture
def pallas_calls(monkeypatch):
    """Spy on both Pallas decode entries (run in interpret mode on CPU); records (entry, length_B)."""
    calls = []
    for module, name in PALLAS.values():
        real = getattr(module, name)

        def spy(q, k, v, length_B, *, _real=real, _name=name, **kw):
            calls.append((_name, length_B))
            return _real(q, k, v, length_B, **{**kw, "interpret": True})
        monkeypatch.setattr(module, name, spy)
    return calls


def _check_lengths(calls, cache: KVCache, T: int, entry: str):
    assert [name for name, _ in calls] == [entry] * LAYERS
    for y, (_, length_B) in enumerate(calls):
        np.testing.assert_array_equal(np.asarray(length_B), np.asarray(cache.length[y] + T))


@pytest.mark.parametrize("platform,backend", [("tpu", "pallas_tpu"), ("gpu", "pallas_triton")])
def test_platform_default_takes_pallas(model, sparse_cache, pallas_calls, monkeypatch, platform, backend):
    cache, pos_B = sparse_cache
    ids, pos = jnp.asarray([[4, 8], [15, 16]]), positions(pos_B, 2)
    want, _ = model.decode_step(ids, cache, position_ids_3BT=pos, backend="xla")
    assert not pallas_calls
    monkeypatch.setattr(api.jax, "default_backend", lambda: platform)  # trace "for" that platform
    got, new_cache = model.decode_step(ids, cache, position_ids_3BT=pos)  # eager: lengths are concrete
    _check_lengths(pallas_calls, cache, 2, PALLAS[backend][1])
    np.testing.assert_array_equal(np.asarray(new_cache.length), np.asarray(cache.length) + 2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=INTERPRET_TOL, rtol=0)


def test_model_sparsity_backend_wins_and_xla_opts_out(model, sparse_cache, pallas_calls, monkeypatch):
    cache, pos_B = sparse_cache
    ids, pos = jnp.asarray([[4], [15]]), positions(pos_B, 1)
    monkeypatch.setattr(model, "sparsity", SparsityConfig(backend="pallas_triton"), raising=False)
    model.decode_step(ids, cache, position_ids_3BT=pos)
    _check_lengths(pallas_calls, cache, 1, "decode_attention_triton")
    pallas_calls.clear()
    monkeypatch.setattr(api.jax, "default_backend", lambda: "tpu")
    model.decode_step(ids, cache, position_ids_3BT=pos, backend="xla")  # explicit beats both
    assert not pallas_calls


def test_rollout_decode_uses_the_sparsity_backend(model, pallas_calls):
    rng = np.random.default_rng(4)
    ids, mask = left_pad([text_tokens(rng, 6), text_tokens(rng, 3)], model.config.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=4, eos_ids=(model.config.eos_token_id,),
                         pad_id=model.config.pad_token_id, temperature=0.0)
    run = lambda sparsity: generate(model, ids, mask, jax.random.key(0), config=cfg,  # noqa: E731
                                    sparsity=sparsity)
    want = run(SparsityConfig(backend="xla"))
    assert not pallas_calls
    got = run(SparsityConfig(backend="pallas_tpu"))  # dense prefill; the decode loop traces once
    assert [name for name, _ in pallas_calls] == ["decode_attention_tpu"] * LAYERS
    np.testing.assert_array_equal(np.asarray(got.tokens_BT), np.asarray(want.tokens_BT))
    np.testing.assert_allclose(np.asarray(got.logprobs_BT), np.asarray(want.logprobs_BT), atol=INTERPRET_TOL)
