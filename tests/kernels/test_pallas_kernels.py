"""Numerics of the Pallas compact-attention kernels (TPU and Triton) in interpret mode on CPU.

Every case is compared with a private float32 oracle (dense masked softmax, written here so these
tests do not depend on the algorithm side's reference module). Named tolerances:
  fp32 forward and gradients: max abs error <= 1e-5 (values are O(1)).
  bf16 forward: max abs error <= 5e-3 * max|ref| (STYLE's "~3e-3 in bf16": p is rounded to bf16
  before the p @ v matmul and the output itself is bf16; measured 2.5e-3 for both kernels).
  bf16 gradients: max abs error <= 1.5e-2 * max|ref grad| per gradient (dq, dk, dv); measured
  3.3e-3 - 3.8e-3 (p and ds are rounded to bf16 before their matmuls).
Inputs of the bf16 cases are rounded to bf16 first and the oracle runs on those rounded values in
float32, so the tolerance only covers the kernel's own bf16 arithmetic.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zipr1_jax.kernels.sparse_attention import gpu, pallas_common, tpu
from zipr1_jax.kernels.sparse_attention.blocks import BlockSizes

FP32_TOL = 1e-5
BF16_FWD_REL_TOL = 5e-3
BF16_GRAD_REL_TOL = 1.5e-2


def oracle(q, k, v, q_pos, k_pos, k_count, sm_scale=None):
    """float32 dense reference: query l sees key t iff t < k_count and k_pos[t] <= q_pos[l]."""
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    _, _, N, H = q.shape
    T, K = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(H) if sm_scale is None else sm_scale
    kr, vr = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    s = jnp.einsum("blnh,btnh->bnlt", q, kr, precision="highest") * scale
    t = jnp.arange(T)
    mask = (t[None, None, :] < k_count[:, None, None]) & (k_pos[:, None, :] <= q_pos[:, :, None])
    mask = mask[:, None]
    p = jnp.where(mask, jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1), 0.0)
    return jnp.einsum("bnlt,btnh->blnh", p, vr, precision="highest")


def make_inputs(seed, B, L, T, N, K, H, counts, dtype=jnp.float32, pos_range=None):
    r = np.random.default_rng(seed)
    pos_range = pos_range or 2 * max(L, T) + 3
    q = r.normal(size=(B, L, N, H)).astype(np.float32)
    k = r.normal(size=(B, T, K, H)).astype(np.float32)
    v = r.normal(size=(B, T, K, H)).astype(np.float32)
    q_pos = np.sort(r.integers(0, pos_range, size=(B, L)), axis=1).astype(np.int32)
    k_pos = np.sort(np.stack([r.choice(pos_range, size=T, replace=False) for _ in range(B)]),
                    axis=1).astype(np.int32)
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(k), cast(v), jnp.asarray(q_pos), jnp.asarray(k_pos),
            jnp.asarray(np.asarray(counts, np.int32)))


def max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


class _KernelTests:
    INTERPRET = True
    attend = None
    decode = None
    BLOCKS: tuple[BlockSizes, ...] = ()

    def run(self, *args, block_sizes=None, **kw):
        return type(self).attend(*args, block_sizes=block_sizes or self.BLOCKS[0],
                                 interpret=self.INTERPRET, **kw)

    # ---- forward -----------------------------------------------------------------------------
    @pytest.mark.parametrize("block_idx", [0, 1])
    def test_forward_fp32_gqa_padding_odd_lengths(self, block_idx):
        # Row 0: partial count; row 1: count 0 (all outputs must be exactly 0); odd L and T.
        args = make_inputs(0, B=2, L=13, T=150, N=4, K=2, H=32, counts=[141, 0])
        out = self.run(*args, block_sizes=self.BLOCKS[block_idx])
        assert out.shape == args[0].shape and out.dtype == jnp.float32
        assert max_err(out, oracle(*args)) <= FP32_TOL
        assert bool(jnp.all(out[1] == 0.0))
        assert not bool(jnp.any(jnp.isnan(out)))

    def test_forward_bf16(self):
        args = make_inputs(1, B=2, L=24, T=200, N=2, K=1, H=64, counts=[200, 77], dtype=jnp.bfloat16)
        out = self.run(*args)
        ref = oracle(*args)
        assert out.dtype == jnp.bfloat16
        assert max_err(out, ref) <= BF16_FWD_REL_TOL * float(jnp.max(jnp.abs(ref)))

    def test_garbage_beyond_count_does_not_leak(self):
        q, k, v, qp, kp, kc = make_inputs(2, B=1, L=9, T=40, N=2, K=2, H=16, counts=[17])
        k_bad = k.at[:, 17:].set(jnp.nan)
        v_bad = v.at[:, 17:].set(jnp.inf)
        out = self.run(q, k_bad, v_bad, qp, kp, kc)
        assert max_err(out, oracle(q, k, v, qp, kp, kc)) <= FP32_TOL
        grads = jax.grad(lambda a, b, c: jnp.sum(self.run(a, b, c, qp, kp, kc)), argnums=(0, 1, 2))(
            q, k_bad, v_bad)
        for g in grads:
            assert not bool(jnp.any(jnp.isnan(g)))

    # ---- backward ----------------------------------------------------------------------------
    def _grad_check(self, args, tol_fn):
        q, k, v, qp, kp, kc = args
        w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
        loss = lambda f: (lambda a, b, c: jnp.sum(f(a, b, c, qp, kp, kc).astype(jnp.float32) * w))
        got = jax.grad(loss(self.run), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(loss(oracle), argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in (q, k, v)))
        for name, g, ref in zip(("dq", "dk", "dv"), got, want):
            assert g.dtype == q.dtype
            assert not bool(jnp.any(jnp.isnan(g))), name
            err = max_err(g, ref)
            assert err <= tol_fn(ref), (name, err)

    def test_grads_fp32_gqa_padding(self):
        args = make_inputs(3, B=2, L=13, T=150, N=4, K=2, H=32, counts=[141, 0])
        self._grad_check(args, lambda ref: FP32_TOL)

    def test_head_dim_128_fwd_and_grads(self):
        # H = 128: the production head_dim (full 128-lane tiles on TPU, no head_dim padding on GPU).
        args = make_inputs(6, B=1, L=10, T=130, N=4, K=2, H=128, counts=[120])
        assert max_err(self.run(*args), oracle(*args)) <= FP32_TOL
        self._grad_check(args, lambda ref: FP32_TOL)

    def test_grads_bf16(self):
        args = make_inputs(4, B=1, L=24, T=100, N=2, K=1, H=64, counts=[90], dtype=jnp.bfloat16)
        self._grad_check(args, lambda ref: BF16_GRAD_REL_TOL * float(jnp.max(jnp.abs(ref))))

    # ---- shapes drawn by hypothesis --------------------------------------------------------------
    # The same test runs in two subclasses (TPU, Triton): that is the differing-executor case,
    # harmless here because the test reads no per-instance state.
    @hypothesis.settings(max_examples=3, deadline=None, derandomize=True,
                         suppress_health_check=[hypothesis.HealthCheck.differing_executors])
    @hypothesis.given(L=st.integers(1, 20), T=st.integers(1, 140), groups=st.sampled_from([1, 2]),
                      seed=st.integers(0, 100))
    def test_forward_random_shapes(self, L, T, groups, seed):
        r = np.random.default_rng(seed)
        counts = r.integers(0, T + 1, size=2)
        args = make_inputs(seed, B=2, L=L, T=T, N=2 * groups, K=2, H=16, counts=counts)
        assert max_err(self.run(*args), oracle(*args)) <= FP32_TOL

    # ---- decode ------------------------------------------------------------------------------
    @pytest.mark.parametrize("t_new", [1, 3])
    def test_decode_poisoned_cache(self, t_new):
        B, S, N, K, H = 3, 200, 4, 2, 32  # S is not a block multiple
        r = np.random.default_rng(5 + t_new)
        q = jnp.asarray(r.normal(size=(B, t_new, N, H)), jnp.float32)
        kc = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
        vc = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
        length = jnp.asarray([t_new, 130, S], jnp.int32)
        beyond = (jnp.arange(S)[None, :] >= length[:, None])[:, :, None, None]
        out = type(self).decode(q, jnp.where(beyond, jnp.nan, kc), jnp.where(beyond, jnp.nan, vc),
                                length, interpret=self.INTERPRET)
        q_pos = length[:, None] - t_new + jnp.arange(t_new)[None, :]
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        ref = oracle(q, jnp.where(beyond, 0.0, kc), jnp.where(beyond, 0.0, vc), q_pos, k_pos, length)
        assert out.shape == q.shape
        assert not bool(jnp.any(jnp.isnan(out)))
        assert max_err(out, ref) <= FP32_TOL

    def test_decode_bf16_gqa8(self):
        B, S, N, K, H, t_new = 2, 256, 8, 1, 128, 2
        r = np.random.default_rng(11)
        q = jnp.asarray(r.normal(size=(B, t_new, N, H)), jnp.bfloat16)
        kc = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.bfloat16)
        vc = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.bfloat16)
        length = jnp.asarray([100, 256], jnp.int32)
        out = type(self).decode(q, kc, vc, length, interpret=self.INTERPRET)
        q_pos = length[:, None] - t_new + jnp.arange(t_new)[None, :]
        k_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        ref = oracle(q, kc, vc, q_pos, k_pos, length)
        assert max_err(out, ref) <= BF16_FWD_REL_TOL * float(jnp.max(jnp.abs(ref)))

    @pytest.mark.parametrize("H", [32, 24])  # 24: Triton pads head_dim, so it copies one layer
    def test_decode_reads_layer_of_stacked_cache(self, H):
        # layer=y of a stacked [Y, B, S, K, H] cache (indexed in the kernel's block index map, no
        # slice copy) equals the kernel on cache[y].
        Y, B, S, N, K, t_new = 3, 2, 150, 4, 2, 2
        r = np.random.default_rng(13)
        q = jnp.asarray(r.normal(size=(B, t_new, N, H)), jnp.float32)
        kc = jnp.asarray(r.normal(size=(Y, B, S, K, H)), jnp.float32)
        vc = jnp.asarray(r.normal(size=(Y, B, S, K, H)), jnp.float32)
        length = jnp.asarray([40, S], jnp.int32)
        for y in (0, Y - 1):
            got = type(self).decode(q, kc, vc, length, layer=y, interpret=self.INTERPRET)
            want = type(self).decode(q, kc[y], vc[y], length, interpret=self.INTERPRET)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # ---- validation --------------------------------------------------------------------------
    def test_bad_inputs_raise(self):
        q, k, v, qp, kp, kc = make_inputs(0, B=1, L=4, T=8, N=3, K=2, H=16, counts=[8])
        with pytest.raises(ValueError, match="multiple of kv heads"):
            self.run(q, k, v, qp, kp, kc)
        q, k, v, qp, kp, kc = make_inputs(0, B=1, L=4, T=8, N=2, K=2, H=16, counts=[8])
        with pytest.raises(ValueError, match="k_pos_BT must have shape"):
            self.run(q, k, v, qp, kp[:, :3], kc)
        with pytest.raises(ValueError, match="dtypes differ"):
            self.run(q, k.astype(jnp.bfloat16), v, qp, kp, kc)


class TestTpuKernels(_KernelTests):
    attend = staticmethod(tpu.attend_compact_tpu)
    decode = staticmethod(functools.partial(
        tpu.decode_attention_tpu,
        block_sizes=BlockSizes(block_q=8, block_k=128, block_q_bwd=8, block_k_bwd=128,
                               block_k_decode=128)))
    BLOCKS = (BlockSizes(block_q=8, block_k=128, block_q_bwd=8, block_k_bwd=128, block_k_decode=128),
              BlockSizes(block_q=16, block_k=256, block_q_bwd=8, block_k_bwd=128,
                         block_k_decode=128))


class TestTritonKernels(_KernelTests):
    attend = staticmethod(gpu.attend_compact_triton)
    decode = staticmethod(functools.partial(
        gpu.decode_attention_triton,
        block_sizes=BlockSizes(block_q=16, block_k=32, block_q_bwd=16, block_k_bwd=16,
                               block_k_decode=64)))
    BLOCKS = (BlockSizes(block_q=16, block_k=32, block_q_bwd=16, block_k_bwd=64, block_k_decode=32),
              BlockSizes(block_q=32, block_k=16, block_q_bwd=32, block_k_bwd=16, block_k_decode=16))


def test_block_sizes_validation_names_the_limit():
    with pytest.raises(ValueError, match="TPU tiling.*block_k=100.*128"):
        BlockSizes(block_q=8, block_k=100, block_q_bwd=8, block_k_bwd=128,
                   block_k_decode=128).validate("tpu", 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="TPU tiling.*block_q=12.*8"):
        BlockSizes(block_q=12, block_k=128, block_q_bwd=8, block_k_bwd=128,
                   block_k_decode=128).validate("tpu", 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="Triton.*power of 2"):
        BlockSizes(block_q=48, block_k=64, block_q_bwd=32, block_k_bwd=32,
                   block_k_decode=64).validate("triton", 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="BlockSizes.block_q must be a positive int"):
        BlockSizes(block_q=0, block_k=64, block_q_bwd=32, block_k_bwd=32, block_k_decode=64)
    for platform in ("tpu", "triton"):
        for h in (64, 128):
            BlockSizes.default(platform).validate(platform, h, jnp.bfloat16)
            BlockSizes.default(platform).validate(platform, h, jnp.float32)


def test_skip_tables_skip_future_and_uncounted_blocks():
    # Row 0: queries at positions 0..15, keys at 0..255 of which 200 are counted.
    # Row 1: queries far in the future see every counted key; row 2 counts nothing.
    q_pos = jnp.asarray([np.arange(16), np.arange(1000, 1016), np.arange(16)], jnp.int32)
    k_pos = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (3, 256))
    counts = jnp.asarray([200, 200, 0], jnp.int32)
    qp, kp, n_kb, first_q = pallas_common.positions_and_tables(q_pos, k_pos, counts, 24, 384, 8, 128)
    assert qp.shape == (3, 24) and bool(jnp.all(qp[:, 16:] == pallas_common.QPOS_PAD))
    assert bool(jnp.all(kp[0, 200:] == pallas_common.KPOS_INVALID))
    # q blocks [0..7], [8..15], [pad]: only key block 0 can be visible; padding block needs none.
    np.testing.assert_array_equal(n_kb, [[1, 1, 0], [2, 2, 0], [0, 0, 0]])
    # dk/dv pass: key block 0 is first needed by q block 0 (row 0/1); unneeded -> clamped nq - 1.
    np.testing.assert_array_equal(first_q, [[0, 2, 2], [0, 0, 2], [2, 2, 2]])


@pytest.mark.parametrize("attend,blocks", [(tpu.attend_compact_tpu, TestTpuKernels.BLOCKS[0]),
                                           (gpu.attend_compact_triton, TestTritonKernels.BLOCKS[0])])
def test_agrees_with_contract_reference(attend, blocks):
    # The algorithm side's pure-jnp contract (reference.py) and this file's oracle must agree
    # with the kernels; imported lazily so the rest of this file does not depend on it.
    from zipr1_jax.kernels.sparse_attention.reference import attend_compact_reference
    args = make_inputs(12, B=2, L=11, T=70, N=4, K=1, H=16, counts=[70, 33])
    out = attend(*args, sm_scale=0.3, block_sizes=blocks, interpret=True)
    assert max_err(out, attend_compact_reference(*args, sm_scale=0.3)) <= FP32_TOL
    assert max_err(out, oracle(*args, sm_scale=0.3)) <= FP32_TOL
