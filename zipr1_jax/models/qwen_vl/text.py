"""Qwen2 decoder blocks: RMSNorm, GQA self-attention with q/k/v bias and M-RoPE, SwiGLU MLP.

The attention math is the one core every path shares (`kernels.sparse_attention.reference.
softmax_attention`; `dense_attention` is it with the model's numerics); a decoder layer calls
whatever `attend` function it is given (default `dense_attention`), which is the single hook
through which sparse attention replaces it. Layers also accept a `kv_update` callback so the same code path serves
the full forward, prefill and cached decode.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from zipr1_jax.kernels.sparse_attention.reference import softmax_attention
from zipr1_jax.models.qwen_vl.config import TextConfig
from zipr1_jax.models.qwen_vl.rope import apply_rotary
from zipr1_jax.sharding.logical import constrain, param_axes
from zipr1_jax.typing import Array, Bool, Float

# (q_BLNH, k_BSKH, v_BSKH, mask_BLS) -> o_BLNH
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]
# (k_BLKH, v_BLKH) -> the keys / values `attend` reads: e.g. write new entries into a cache and return
# all of it (cached decode returns the stacked [Y, B, S, K, H] cache, its attend reads one layer).
KVUpdateFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

DEFAULT_INIT = jax.nn.initializers.normal(0.02)


def dense_attention(q_BLNH: Float[Array, "B L N H"], k_BSKH: Float[Array, "B S K H"],
                    v_BSKH: Float[Array, "B S K H"], mask_BLS: Bool[Array, "B L S"] | None,
                    *, sm_scale: float | None = None, causal: bool = False) -> Float[Array, "B L N H"]:
    """The model's attention: the shared core (`reference.softmax_attention`) with Hugging Face's
    eager numerics (float32 scores, probabilities in the values' dtype). A query row with no
    visible key gets a uniform average rather than NaN (such rows are padding; never used).
    `causal`: the mask is the decoder's causal one (L == S), so the core may skip the scores above
    the diagonal (`softmax_attention(causal=True)`)."""
    return softmax_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, sm_scale=sm_scale, empty_rows="uniform", float32=False,
                             causal=causal)


def causal_dense_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS):
    """`dense_attention` under the decoder's causal mask (the default `attend` of a full forward /
    prefill layer that computes every query)."""
    return dense_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, causal=True)


def slice_positions(h_BLD: jax.Array, logits_slice: tuple[int, int] | None) -> jax.Array:
    """h_BLD[:, start:stop] for a static `logits_slice`, checked; all positions for None."""
    if logits_slice is None:
        return h_BLD
    L = h_BLD.shape[1]
    ok = (isinstance(logits_slice, tuple) and len(logits_slice) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in logits_slice))
    if not ok or not 0 <= logits_slice[0] < logits_slice[1] <= L:
        raise ValueError(f"logits_slice must be a static (start, stop) with 0 <= start < stop <= L={L}, "
                         f"got {logits_slice!r}")
    return h_BLD[:, logits_slice[0]:logits_slice[1]]


# Which positions a layer computes outputs for: [B, Q] int positions, or a static (start, stop).
QueryPositions = jax.Array | tuple[int, int]


def take_positions(x_BL_: jax.Array, positions: QueryPositions) -> jax.Array:
    """x[b, positions[b, q], ...] ([B, L, ...] -> [B, Q, ...]), or x[:, start:stop] for a static
    (start, stop) (a slice: its backward is a pad, not a scatter)."""
    if isinstance(positions, tuple):
        return slice_positions(x_BL_, positions)
    idx = positions.reshape(positions.shape + (1,) * (x_BL_.ndim - 2))
    return jnp.take_along_axis(x_BL_, idx, axis=1)


class RMSNorm(nnx.Module):
    """y = scale * (x / rms(x)); the variance is float32, the result is cast back before scaling."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, axis_name: str = "embed"):
        self.eps = eps
        with nnx.use_eager_sharding(False):  # logical names are metadata; rules shard later
            self.scale = nnx.Param(param_axes(jax.nn.initializers.ones, (axis_name,))(None, (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


class TokenLinear(nnx.Linear):
    """nnx.Linear (same `kernel` / `bias` names) applied to [..., din] as ONE 2-D [tokens, din] dot.

    Why: XLA's CPU backend lowers a dot with several batch-like leading dims by transposing its
    operands into a 2-D layout; in the backward pass that means a copy of every activation feeding
    a weight gradient (dW = x^T dy contracts over batch AND length). Flattening first makes both
    gradients plain 2-D dots: the tiny benchmark model's forward + backward takes 0.84x the time, with
    identical values (benchmarks/update_layout.py). Merging the batch-major dims keeps a batch
    sharding valid. Inputs that are already 2-D (vision patches) are unchanged.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if inputs.ndim <= 2 or out_sharding is not None:  # a given out_sharding names the N-d output
            return super().__call__(inputs, out_sharding=out_sharding)
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), out_sharding=out_sharding)
        return y.reshape(*lead, y.shape[-1])


def _linear(din: int, dout: int, axes: tuple[str, str], *, bias: bool, dtype, param_dtype, rngs) -> TokenLinear:
    with nnx.use_eager_sharding(False):
        return TokenLinear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                          kernel_init=param_axes(DEFAULT_INIT, axes),
                          bias_init=param_axes(jax.nn.initializers.zeros, (axes[1],)), rngs=rngs)


class Attention(nnx.Module):
    """Qwen2 self-attention: biased q/k/v projections, M-RoPE on q and k, unbiased o_proj."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(D, N * H, ("embed", "heads"), bias=True, **kw)
        self.k_proj = _linear(D, K * H, ("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = _linear(D, K * H, ("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = _linear(N * H, D, ("heads", "embed"), bias=False, **kw)

    def __call__(self, x_BLD: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array, mask_BLS: jax.Array | None,
                 *, attend: AttendFn | None = None, kv_update: KVUpdateFn | None = None,
                 queries: QueryPositions | None = None) -> jax.Array:
        """Outputs [B, L, D]; with `queries` only those positions' queries are computed (keys /
        values still cover all L): [B, Q, D]."""
        B, L, _ = x_BLD.shape
        k_BLKH = self.k_proj(x_BLD).reshape(B, L, self.num_kv_heads, self.head_dim)
        v_BLKH = self.v_proj(x_BLD).reshape(B, L, self.num_kv_heads, self.head_dim)
        k_BLKH = constrain(apply_rotary(k_BLKH, cos_BLH, sin_BLH), ("batch", "length", "kv_heads", "head_dim"))
        v_BLKH = constrain(v_BLKH, ("batch", "length", "kv_heads", "head_dim"))
        if queries is not None:
            x_BLD, cos_BLH, sin_BLH = (take_positions(a, queries) for a in (x_BLD, cos_BLH, sin_BLH))
            mask_BLS = None if mask_BLS is None else take_positions(mask_BLS, queries)
        Lq = x_BLD.shape[1]
        q_BLNH = self.q_proj(x_BLD).reshape(B, Lq, self.num_heads, self.head_dim)
        q_BLNH = constrain(apply_rotary(q_BLNH, cos_BLH, sin_BLH), ("batch", "length", "heads", "head_dim"))
        k_BSKH, v_BSKH = (k_BLKH, v_BLKH) if kv_update is None else kv_update(k_BLKH, v_BLKH)
        o_BLNH = (attend or dense_attention)(q_BLNH, k_BSKH, v_BSKH, mask_BLS)
        o_BLNH = constrain(o_BLNH.astype(x_BLD.dtype), ("batch", "length", "heads", "head_dim"))
        return self.o_proj(o_BLNH.reshape(B, Lq, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(D, F, ("embed", "mlp"), **kw)
        self.up_proj = _linear(D, F, ("embed", "mlp"), **kw)
        self.down_proj = _linear(F, D, ("mlp", "embed"), **kw)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h_BLF = jax.nn.silu(self.gate_proj(x_BLD)) * self.up_proj(x_BLD)
        return self.down_proj(constrain(h_BLF, ("batch", "length", "mlp")))


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x_BLD: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array, mask_BLS: jax.Array | None,
                 *, attend: AttendFn | None = None, kv_update: KVUpdateFn | None = None,
                 queries: QueryPositions | None = None) -> jax.Array:
        """[B, L, D] -> [B, L, D]; with `queries` only those positions' outputs ([B, Q, D]):
        a last layer needs every position's keys / values but only the outputs that become logits
        (the prefill's last position, the learner's response positions), which skips its queries,
        o_proj and MLP elsewhere."""
        attn_BQD = self.self_attn(self.input_layernorm(x_BLD), cos_BLH, sin_BLH, mask_BLS, attend=attend,
                                  kv_update=kv_update, queries=queries)
        if queries is not None:
            x_BLD = take_positions(x_BLD, queries)
        h_BLD = x_BLD + attn_BQD
        out_BLD = h_BLD + self.mlp(self.post_attention_layernorm(h_BLD))
        return constrain(out_BLD, ("batch", "length", "embed"))
