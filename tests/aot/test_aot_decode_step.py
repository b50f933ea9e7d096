"""Deviceless AOT compile of the MODEL's cached decode for TPU v5e and the H100 target.

The rollout's decode loop (`lax.fori_loop` of `decode_step`, cache carried and donated) of a
2-layer model with Qwen2.5-VL-7B's text geometry (28 q / 4 kv heads, head_dim 128, bf16, full
vocabulary), B = 8 rows over a cache of S = 8192 slots. Checks that
  - every decoder layer runs our Pallas decode kernel (no silent XLA fallback), and
  - the cache is neither copied whole per step (the old re-stack) nor per layer (a sliced custom-call
    operand is materialised: the kernels read their layer of the stacked cache in place): the
    compiled program's temporaries stay below ONE layer's K cache, and the donated cache aliases
    the output.
Before the change this loop needed 138 MB (v5e) / 257 MB (H100) of temporaries, a whole cache.
Run via .ci/aot.sh (marker `aot`; needs the toolchains of .ci/aot_deps.sh).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from zipr1_jax.models.qwen_vl.cache import KVCache
from zipr1_jax.models.qwen_vl.config import preset
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration

pytestmark = pytest.mark.aot

LAYERS, B, S, STEPS = 2, 8, 8192, 2
DT = jnp.bfloat16
TARGETS = {"v5e": ("v5e_topology", "pallas_tpu", "tpu_custom_call", "zipr1_decode_attention"),
           "h100": ("h100_topology", "pallas_triton", "__gpu$xla.gpu.triton", "zipr1_compact_attention_fwd")}


@pytest.fixture(scope="module", autouse=True)
def _production_precision():
    # tests/conftest.py forces "highest" matmul precision for CPU numerics; compile production's.
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", None)
    yield
    jax.config.update("jax_default_matmul_precision", old)


def _decode_loop(graphdef, backend: str):
    def run(state, tok_B1, cache, pos_3B1):
        model = nnx.merge(graphdef, state)

        def body(i, carry):
            cache, tok_B1 = carry
            logits_B1V, cache = model.decode_step(tok_B1, cache, position_ids_3BT=pos_3B1 + i, backend=backend)
            return cache, jnp.argmax(logits_B1V, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, STEPS, body, (cache, tok_B1))
    return run


@pytest.mark.parametrize("target", list(TARGETS))
def test_decode_loop_compiles_in_place(request, target):
    fixture, backend, call, kernel = TARGETS[target]
    device = request.getfixturevalue(fixture).devices[0]
    cfg = preset("qwen2_5_vl_7b", dtype="bfloat16", param_dtype="bfloat16")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=LAYERS))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))))
    S_ = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))  # noqa: E731
    state = jax.tree.map(lambda x: S_(x.shape, x.dtype), state)
    t = cfg.text
    kv = S_((LAYERS, B, S, t.num_key_value_heads, t.head_dim), DT)
    cache = KVCache(k=kv, v=kv, length=S_((LAYERS, B), jnp.int32))
    args = (state, S_((B, 1), jnp.int32), cache, S_((3, B, 1), jnp.int32))
    try:
        compiled = jax.jit(_decode_loop(graphdef, backend), donate_argnums=(2,)).trace(*args).lower().compile()
    except Exception as e:  # noqa: BLE001 - re-raised with the target and shapes in the message
        raise AssertionError(f"deviceless {target} compile of the {LAYERS}-layer 7B-geometry decode loop "
                             f"({backend}, B={B}, S={S}) failed: {type(e).__name__}: {e}") from e
    text = compiled.as_text()
    assert text.count(call) == LAYERS and kernel in text, f"not one {kernel} per layer in the {target} program"
    layer_k_bytes = B * S * t.num_key_value_heads * t.head_dim * jnp.dtype(DT).itemsize
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < layer_k_bytes, (
        f"{target}: {mem.temp_size_in_bytes / 2**20:.1f} MiB of temporaries >= one layer's K cache "
        f"({layer_k_bytes / 2**20:.0f} MiB): the decode copies the cache")
    assert mem.alias_size_in_bytes >= 2 * LAYERS * layer_k_bytes, "the donated cache is not updated in place"
