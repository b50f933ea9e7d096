"""Deviceless AOT compiles of the sparse-attention kernels for TPU v5e / v4 and the H100 target.

Lowering alone (tests/kernels/test_lowering.py) misses Mosaic layout errors, VMEM overflow and
Triton shared-memory overflow; a real compile for a named target catches them on this CPU box.
Shapes are Qwen2.5-VL-7B's attention (28 q heads, 4 kv heads, head_dim 128, bf16) with our DEFAULT
block sizes. Matrix (chosen to keep the whole module within ~8 min on 2 cores): forward at
L = 8k and 32k with 25% and 100% kept, backward (jax.grad through the custom_vjp, gather
included) at 8k and at 32k / 25% kept, decode over caches of S = 8k and 32k (B = 8), `select_topp`
at 8k, and one full 7B decoder layer (selection + Pallas attention + MLP) under shard_map on the
4-chip v5e:2x2 topology.

Every compile failure is re-raised as an AssertionError naming the target, the kernel and the
input shapes. Run via .ci/aot.sh (marker `aot`; needs the toolchains of .ci/aot_deps.sh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from zipr1_jax.kernels.sparse_attention import (SelectionConfig, decode_attention, select_and_attend,
                                                select_topp, sparse_attention)
from zipr1_jax.kernels.sparse_attention.blocks import BlockSizes

pytestmark = pytest.mark.aot

# Qwen2.5-VL-7B attention geometry.
N_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
DT = jnp.bfloat16
TARGETS = {"v5e": ("v5e_topology", "pallas_tpu"), "v4": ("v4_topology", "pallas_tpu"),
           "h100": ("h100_topology", "pallas_triton")}
PREFILL = [(8192, 0.25), (8192, 1.0), (32768, 0.25), (32768, 1.0)]  # (L, kept fraction)
BACKWARD = [(8192, 0.25), (8192, 1.0), (32768, 0.25)]
DECODE_S = [8192, 32768]
DECODE_BATCH = 8


def _describe(args) -> str:
    return ", ".join(f"{jnp.dtype(a.dtype).name}{list(a.shape)}" for a in jax.tree.leaves(args))


def aot_compile(target: str, label: str, fn, args, *, shapes: str | None = None):
    """jit(fn).trace(*args).lower().compile() for a deviceless target; a failure names target,
    kernel and input shapes (the compiler's own message follows)."""
    try:
        return jax.jit(fn).trace(*args).lower().compile()
    except Exception as e:  # noqa: BLE001 - re-raised with the kernel and shapes in the message
        raise AssertionError(f"deviceless {target} compile of {label} failed; inputs: "
                             f"{shapes or _describe(args)}: {type(e).__name__}: {e}") from e


def _assert_kernels(compiled, backend: str, *names: str):
    """The executable really runs our Pallas kernels (no silent XLA fallback)."""
    text = compiled.as_text()
    call = "tpu_custom_call" if backend == "pallas_tpu" else "__gpu$xla.gpu.triton"
    assert call in text, f"no {call} in the compiled {backend} executable"
    for name in names:
        assert name in text, f"kernel {name} missing from the compiled {backend} executable"


def _spec(sharding):
    return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _target(request, name):
    fixture, backend = TARGETS[name]
    topo = request.getfixturevalue(fixture)
    return topo, backend, _spec(SingleDeviceSharding(topo.devices[0]))


def _prefill_args(S_, L: int, kept: float, B: int = 1):
    T = int(L * kept)
    return (S_((B, L, N_HEADS, HEAD_DIM), DT), S_((B, L, KV_HEADS, HEAD_DIM), DT),
            S_((B, L, KV_HEADS, HEAD_DIM), DT), S_((B, T), jnp.int32), S_((B,), jnp.int32)), T


def _sparse_fn(backend: str, T: int):
    def f(q, k, v, idx, count):
        return sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count, backend=backend,
                                capacity=T)
    return f


@pytest.fixture(scope="module", autouse=True)
def _production_precision():
    # tests/conftest.py forces "highest" matmul precision for CPU numerics; compile what
    # production runs instead (bf16 MXU / tensor-core passes).
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", None)
    yield
    jax.config.update("jax_default_matmul_precision", old)


@pytest.mark.parametrize("L,kept", PREFILL, ids=[f"L{L // 1024}k-kept{int(k * 100)}" for L, k in PREFILL])
@pytest.mark.parametrize("target", list(TARGETS))
def test_forward_compiles(request, target, L, kept):
    _, backend, S_ = _target(request, target)
    args, T = _prefill_args(S_, L, kept)
    compiled = aot_compile(target, f"sparse_attention forward ({backend}, L={L}, T={T})",
                           _sparse_fn(backend, T), args)
    _assert_kernels(compiled, backend, "zipr1_compact_attention_fwd")


@pytest.mark.parametrize("L,kept", BACKWARD, ids=[f"L{L // 1024}k-kept{int(k * 100)}" for L, k in BACKWARD])
@pytest.mark.parametrize("target", list(TARGETS))
def test_backward_compiles(request, target, L, kept):
    _, backend, S_ = _target(request, target)
    args, T = _prefill_args(S_, L, kept)
    f = _sparse_fn(backend, T)

    def loss(q, k, v, idx, count):
        return jnp.sum(f(q, k, v, idx, count).astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    compiled = aot_compile(target, f"sparse_attention backward / custom_vjp ({backend}, L={L}, T={T})",
                           grad, args)
    _assert_kernels(compiled, backend, "zipr1_compact_attention_fwd", "zipr1_compact_attention_dq",
                    "zipr1_compact_attention_dkv")


@pytest.mark.parametrize("S", DECODE_S, ids=[f"S{s // 1024}k" for s in DECODE_S])
@pytest.mark.parametrize("target", list(TARGETS))
def test_decode_compiles(request, target, S):
    _, backend, S_ = _target(request, target)
    B = DECODE_BATCH
    args = (S_((B, 1, N_HEADS, HEAD_DIM), DT), S_((B, S, KV_HEADS, HEAD_DIM), DT),
            S_((B, S, KV_HEADS, HEAD_DIM), DT), S_((B,), jnp.int32))
    compiled = aot_compile(target, f"decode_attention ({backend}, B={B}, S={S})",
                           functools.partial(decode_attention, backend=backend), args)
    # The Triton decode re-uses the forward kernel (decode=True); TPU has its own decode kernel.
    _assert_kernels(compiled, backend, "zipr1_decode_attention" if backend == "pallas_tpu"
                    else "zipr1_compact_attention_fwd")


@pytest.mark.parametrize("target", list(TARGETS))
def test_selection_compiles(request, target):
    _, _, S_ = _target(request, target)
    L = 8192
    args = (S_((1, L, N_HEADS, HEAD_DIM), DT), S_((1, L, KV_HEADS, HEAD_DIM), DT), S_((1, L), jnp.bool_),
            S_((1,), jnp.float32), S_((2,), jnp.uint32))

    def f(q, k, valid, p, key_data):
        return select_topp(q, k, valid, p, config=SelectionConfig(), rng=jax.random.wrap_key_data(key_data))

    aot_compile(target, f"select_topp (L={L})", f, args)


def test_decoder_layer_shard_map_v5e(v5e_topology):
    """One Qwen2.5-VL-7B decoder layer (bf16) whose attention is top-p selection + the Pallas TPU
    sparse kernels, data-parallel under shard_map over the 4 chips of v5e:2x2 (a Pallas call
    cannot be auto-partitioned). Bucketed capacity (lax.switch) as in production."""
    from zipr1_jax.models.qwen_vl.config import preset
    from zipr1_jax.models.qwen_vl.text import DecoderLayer

    cfg = preset("qwen2_5_vl_7b", dtype="bfloat16", param_dtype="bfloat16").text
    layer = nnx.eval_shape(lambda: DecoderLayer(cfg, dtype=DT, param_dtype=DT, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(layer)
    devices = v5e_topology.devices
    assert len(devices) == 4, devices
    mesh = Mesh(np.asarray(devices), ("data",))
    repl, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    B, L, D, H = 4, 8192, cfg.hidden_size, cfg.head_dim
    S_ = _spec(by_batch)
    x, cos, sin = S_((B, L, D), DT), S_((B, L, H), jnp.float32), S_((B, L, H), jnp.float32)

    def attend(q, k, v, mask):
        del mask  # causal; no padding in this compile
        b, s = k.shape[:2]
        key = jax.random.fold_in(jax.random.key(0), jax.lax.axis_index("data"))
        out, _ = select_and_attend(q, k, v, jnp.ones((b, s), bool), jnp.full((b,), 0.975), rng=key,
                                   backend="pallas_tpu")
        return out

    def local(state, x, cos, sin):
        return nnx.merge(graphdef, state)(x, cos, sin, None, attend=attend)

    def f(state, x, cos, sin):
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                             out_specs=P("data"), check_vma=False)(state, x, cos, sin)

    compiled = aot_compile("v5e:2x2", f"qwen2_5_vl_7b decoder layer + pallas_tpu sparse attention "
                           f"under shard_map (B={B}, L={L}, D={D})", f, (state, x, cos, sin),
                           shapes=f"x {list(x.shape)} bf16, cos/sin {list(cos.shape)} f32, "
                                  "7B layer params bf16")
    _assert_kernels(compiled, "pallas_tpu", "zipr1_compact_attention_fwd")


# ---------------------------------------------------------------------------------------------
# Teeth: our validation rejects an oversized block with a clear error, and the same block sizes
# smuggled past the validation fail the real deviceless compile.
# ---------------------------------------------------------------------------------------------
TPU_BIG = BlockSizes(block_q=2048, block_k=4096, block_q_bwd=256, block_k_bwd=256, block_k_decode=512)
TRITON_BIG = BlockSizes(block_q=256, block_k=256, block_q_bwd=32, block_k_bwd=32, block_k_decode=64,
                        num_stages=4)


@pytest.mark.parametrize("target", ["v5e", "h100"])
def test_oversized_blocks_rejected_then_fail_compile(request, monkeypatch, target):
    _, backend, S_ = _target(request, target)
    big, platform = (TPU_BIG, "tpu") if backend == "pallas_tpu" else (TRITON_BIG, "triton")
    limit = "TPU VMEM budget" if platform == "tpu" else "GPU shared memory budget"
    # TPU: 100% kept so the 4096-key block is not shrunk to the compact length.
    L, kept = 8192, (1.0 if platform == "tpu" else 0.25)
    args, T = _prefill_args(S_, L, kept)

    def f(q, k, v, idx, count):
        return sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count, backend=backend,
                                capacity=T, block_sizes=big)

    with pytest.raises(ValueError, match=limit):
        big.validate(platform, HEAD_DIM, DT)
    with pytest.raises(ValueError, match=limit):  # through the public entry point, before compiling
        jax.jit(f).trace(*args)

    # Bypass our check: the compiler itself must refuse these blocks.
    monkeypatch.setattr(BlockSizes, "validate", lambda self, *a, **k: self)
    with pytest.raises(AssertionError) as err:
        aot_compile(target, f"sparse_attention forward with {big}", f, args)
    msg = str(err.value)
    if platform == "tpu":
        assert "vmem" in msg.lower() or "RESOURCE_EXHAUSTED" in msg, msg[:2000]
    else:
        assert "Shared memory size limit exceeded" in msg, msg[:2000]
