"""Lowering of the Pallas kernels for TPU (Mosaic) and CUDA (Triton) on a CPU-only machine.

`jax.jit(f).trace(...).lower(lowering_platforms=...)` runs the Pallas lowering for the named
platform without hardware: TPU kernels must appear as `tpu_custom_call`, the GPU kernels as the
Triton custom call `__gpu$xla.gpu.triton` (not Mosaic GPU). Covers forward, backward (jax.grad
through the custom_vjp) and decode, with the default block sizes at bf16 / head_dim 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from zipr1_jax.kernels.sparse_attention import gpu, tpu
from zipr1_jax.kernels.sparse_attention.blocks import BlockSizes

SDS = jax.ShapeDtypeStruct
B, L, T, N, K, H = 2, 300, 700, 4, 2, 128  # odd lengths on purpose: padding paths lower too

BACKENDS = {
    "tpu": (tpu.attend_compact_tpu, tpu.decode_attention_tpu, "tpu_custom_call"),
    "cuda": (gpu.attend_compact_triton, gpu.decode_attention_triton, "__gpu$xla.gpu.triton"),
}


def _compact_args(dtype=jnp.bfloat16):
    return (SDS((B, L, N, H), dtype), SDS((B, T, K, H), dtype), SDS((B, T, K, H), dtype),
            SDS((B, L), jnp.int32), SDS((B, T), jnp.int32), SDS((B,), jnp.int32))


def _lower_text(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_forward_lowers(platform):
    attend, _, marker = BACKENDS[platform]
    text = _lower_text(attend, _compact_args(), platform)
    assert text.count(marker) == 1
    if platform == "cuda":
        assert "mosaic_gpu" not in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_backward_lowers(platform):
    attend, _, marker = BACKENDS[platform]

    def loss(q, k, v, qp, kp, kc):
        return jnp.sum(attend(q, k, v, qp, kp, kc).astype(jnp.float32))

    text = _lower_text(jax.grad(loss, argnums=(0, 1, 2)), _compact_args(), platform)
    assert text.count(marker) == 3  # forward (residuals) + dq + dk/dv


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("t_new", [1, 5])
def test_decode_lowers(platform, t_new):
    _, decode, marker = BACKENDS[platform]
    S = 1000
    args = (SDS((B, t_new, N, H), jnp.bfloat16), SDS((B, S, K, H), jnp.bfloat16),
            SDS((B, S, K, H), jnp.bfloat16), SDS((B,), jnp.int32))
    assert _lower_text(decode, args, platform).count(marker) == 1


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_oversized_block_rejected_with_clear_error(platform):
    attend, _, _ = BACKENDS[platform]
    huge = BlockSizes(block_q=2048, block_k=4096, block_q_bwd=2048, block_k_bwd=4096,
                      block_k_decode=4096)
    limit = "TPU VMEM budget" if platform == "tpu" else "GPU shared memory budget"
    with pytest.raises(ValueError, match=limit):
        jax.jit(lambda *a: attend(*a, block_sizes=huge)).trace(*_compact_args())
