"""The Qwen2-VL / Qwen2.5-VL vision tower: patch embed, 2D rotary ViT blocks, 2x2 patch merger.

`pixel_values` rows are flattened patches in (C, t, p, p) order (what the image processor emits),
so HF's Conv3d with kernel == stride is a bias-free Linear over a row. Rows come grouped by merge
window (2x2 neighbouring patches are adjacent), which is why the merger is a plain reshape.

Everything that depends on the image grid (2D position ids, per-frame attention segments, the
Qwen2.5 window permutation) is computed on the host from a STATIC grid: `grid_thw` fixes shapes,
so under jit it must be a concrete NumPy array / tuple (the data pipeline buckets image sizes so
only a few grids occur).

Qwen2.5-VL differences: RMSNorm and a biased SwiGLU MLP in the blocks, RMSNorm in the merger, and
window attention: patches are permuted so each window (window_size px, in merge units) is
contiguous; blocks not listed in `fullatt_block_indexes` attend within windows, the others within
each frame; the merged output is permuted back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zipr1_jax.models.qwen_vl.config import QwenVLConfig, VisionConfig
from zipr1_jax.models.qwen_vl.text import RMSNorm, _linear
from zipr1_jax.sharding.logical import constrain, param_axes
from zipr1_jax.typing import Array, Float

Grid = tuple[tuple[int, int, int], ...]
VISION_ROPE_THETA = 10000.0


# ---------------------------------------------------------------------- host-side grid layout
def as_grid(grid_thw) -> Grid:
    """A hashable grid ((t, h, w), ...) from a NumPy/list/tuple; rejects traced values."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise ValueError("grid_thw must be concrete host values (NumPy / tuple), not a traced array: it "
                         "fixes the vision tower's shapes; pass it as a static argument under jit")
    arr = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (arr <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {arr.tolist()}")
    return tuple((int(t), int(h), int(w)) for t, h, w in arr)


@functools.lru_cache(maxsize=64)
def grid_layout(grid: Grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(pos_hw [P, 2] rotary ids in merge-window order, frame_seg [P] attention segment per patch)."""
    pos, seg = [], []
    frame = 0
    for t, h, w in grid:
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size={merge}")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        pos.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
        seg.append(np.repeat(np.arange(frame, frame + t), h * w))  # each frame is its own segment (HF)
        frame += t
    return np.concatenate(pos).astype(np.int32), np.concatenate(seg).astype(np.int32)


@functools.lru_cache(maxsize=64)
def window_layout(grid: Grid, merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5 windows: (window_index [P/merge^2] merged-unit permutation, window_seg [P] segment per
    patch in the PERMUTED order). Windows tile each frame in units of merged patches."""
    win = window_size // merge // patch_size
    unit = merge * merge
    index, seg = [], []
    offset, seg_id = 0, 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        nh, nw = -(-gh // win), -(-gw // win)
        padded = np.full((t, nh * win, nw * win), -1, dtype=np.int64)
        padded[:, :gh, :gw] = idx
        blocks = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        for block in blocks:
            members = block[block >= 0]
            if members.size == 0:
                continue
            index.append(members + offset)
            seg.append(np.full(members.size * unit, seg_id))
            seg_id += 1
        offset += t * gh * gw
    return np.concatenate(index).astype(np.int32), np.concatenate(seg).astype(np.int32)


# ---------------------------------------------------------------------- rotary
def vision_rotary(pos_hw_P2: np.ndarray | jax.Array, head_dim: int,
                  theta: float = VISION_ROPE_THETA) -> tuple[jax.Array, jax.Array]:
    """cos, sin [P, head_dim] (float32): head_dim/4 frequencies for h, then for w, repeated twice."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs_P2F = jnp.asarray(pos_hw_P2, jnp.float32)[..., None] * inv_freq
    freqs_PF = jnp.concatenate([freqs_P2F[:, 0], freqs_P2F[:, 1]], axis=-1)
    emb = jnp.concatenate([freqs_PF, freqs_PF], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_vision_rotary(x_PNH: jax.Array, cos_PH: jax.Array, sin_PH: jax.Array) -> jax.Array:
    """Rotary in float32 (as HF), cast back to the input dtype."""
    x32 = x_PNH.astype(jnp.float32)
    out = x32 * cos_PH[:, None] + _rotate_half(x32) * sin_PH[:, None]
    return out.astype(x_PNH.dtype)


# ---------------------------------------------------------------------- modules
def _layernorm(dim: int, *, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                         scale_init=param_axes(jax.nn.initializers.ones, ("vision_embed",)),
                         bias_init=param_axes(jax.nn.initializers.zeros, ("vision_embed",)), rngs=rngs)


def _norm(v: VisionConfig, dim: int, *, dtype, param_dtype, rngs):
    if v.family == "qwen2_vl":
        return _layernorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return RMSNorm(dim, eps=v.norm_eps, param_dtype=param_dtype, axis_name="vision_embed")


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):  # gelu_pytorch_tanh
    return jax.nn.gelu(x, approximate=True)


def _act(name: str):
    """Module-level functions (not fresh lambdas/partials): two models of one config then have
    equal graphdefs and share compiled programs."""
    return {"quick_gelu": _quick_gelu, "silu": jax.nn.silu, "gelu": _gelu_exact}.get(name, _gelu_tanh)


class PatchEmbed(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype, param_dtype, rngs):
        self.proj = _linear(v.patch_dim, v.hidden_size, ("patch_features", "vision_embed"), bias=False,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values_PC: jax.Array) -> jax.Array:
        return self.proj(pixel_values_PC)


class VisionAttention(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype, param_dtype, rngs):
        self.num_heads, self.head_dim = v.num_heads, v.head_dim
        self.qkv = _linear(v.hidden_size, 3 * v.hidden_size, ("vision_embed", "vision_heads"), bias=True,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = _linear(v.hidden_size, v.hidden_size, ("vision_heads", "vision_embed"), bias=True,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PD: jax.Array, cos_PH, sin_PH, seg_P) -> jax.Array:
        """seg_P: attention segment per patch. A static NumPy array (the tower passes one: grids are
        static) runs each group of equal-length contiguous segments as one batched attention, so the
        cost is sum(len^2), not P^2 (32 images of 144 patches: 32x less work and memory); a traced
        array falls back to the dense block-diagonal mask."""
        P = x_PD.shape[0]
        qkv_P3NH = self.qkv(x_PD).reshape(P, 3, self.num_heads, self.head_dim)
        q_PNH, k_PNH, v_PNH = qkv_P3NH[:, 0], qkv_P3NH[:, 1], qkv_P3NH[:, 2]
        q_PNH = apply_vision_rotary(q_PNH, cos_PH, sin_PH)
        k_PNH = apply_vision_rotary(k_PNH, cos_PH, sin_PH)
        if isinstance(seg_P, np.ndarray) and _contiguous(seg_P):
            o_PNH = _segment_attention(q_PNH, k_PNH, v_PNH, seg_P, self.head_dim**-0.5)
        else:
            o_PNH = _block_diagonal_attention(q_PNH, k_PNH, v_PNH, jnp.asarray(seg_P), self.head_dim**-0.5)
        return self.proj(o_PNH.reshape(P, -1))


def _attend(q_SLNH, k_SLNH, v_SLNH, scale):
    logits = jnp.einsum("slnh,smnh->snlm", q_SLNH, k_SLNH, preferred_element_type=jnp.float32).astype(jnp.float32)
    probs = jax.nn.softmax(logits * scale, axis=-1).astype(v_SLNH.dtype)
    return jnp.einsum("snlm,smnh->slnh", probs, v_SLNH)


def _block_diagonal_attention(q_PNH, k_PNH, v_PNH, seg_P, scale):
    logits_NPQ = jnp.einsum("pnh,qnh->npq", q_PNH, k_PNH,
                            preferred_element_type=jnp.float32).astype(jnp.float32) * scale
    # Block-diagonal: a patch attends only within its own frame (or window); never across images.
    same_PQ = seg_P[:, None] == seg_P[None, :]
    logits_NPQ = jnp.where(same_PQ[None], logits_NPQ, jnp.finfo(jnp.float32).min)
    probs_NPQ = jax.nn.softmax(logits_NPQ, axis=-1).astype(v_PNH.dtype)
    return jnp.einsum("npq,qnh->pnh", probs_NPQ, v_PNH)


def _contiguous(seg_P: np.ndarray) -> bool:
    """Every segment id occupies one contiguous run (true of frames and of permuted windows)."""
    starts = np.concatenate([[True], seg_P[1:] != seg_P[:-1]])
    return len(np.unique(seg_P)) == int(starts.sum())


def _segment_attention(q_PNH, k_PNH, v_PNH, seg_P: np.ndarray, scale):
    """Exact block-diagonal attention, one batched attention per distinct segment length."""
    bounds = np.flatnonzero(np.concatenate([[True], seg_P[1:] != seg_P[:-1], [True]]))
    starts, lengths = bounds[:-1], np.diff(bounds)
    out_PNH = jnp.zeros_like(v_PNH)
    for length in np.unique(lengths):
        idx_SL = starts[lengths == length][:, None] + np.arange(length)[None, :]
        o_SLNH = _attend(q_PNH[idx_SL], k_PNH[idx_SL], v_PNH[idx_SL], scale)
        if len(np.unique(lengths)) == 1:
            return o_SLNH.reshape(v_PNH.shape)  # one group covering every patch in order
        out_PNH = out_PNH.at[idx_SL.reshape(-1)].set(o_SLNH.reshape(-1, *v_PNH.shape[1:]))
    return out_PNH


class VisionMLP(nnx.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, v: VisionConfig, *, dtype, param_dtype, rngs):
        self.act = _act(v.hidden_act)
        self.fc1 = _linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = _linear(v.intermediate_size, v.hidden_size, ("vision_mlp", "vision_embed"), bias=True,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nnx.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), all with bias."""

    def __init__(self, v: VisionConfig, *, dtype, param_dtype, rngs):
        self.act = _act(v.hidden_act)
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.up_proj = _linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.down_proj = _linear(v.intermediate_size, v.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, v: VisionConfig, *, dtype, param_dtype, rngs):
        self.norm1 = _norm(v, v.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = _norm(v, v.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = VisionAttention(v, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mlp_cls = VisionMLP if v.family == "qwen2_vl" else VisionGatedMLP
        self.mlp = mlp_cls(v, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PD, cos_PH, sin_PH, seg_P):
        x_PD = x_PD + self.attn(self.norm1(x_PD), cos_PH, sin_PH, seg_P)
        return x_PD + self.mlp(self.norm2(x_PD))


class PatchMerger(nnx.Module):
    """ln_q over each patch, concatenate each 2x2 merge unit, then Linear -> GELU(erf) -> Linear."""

    def __init__(self, v: VisionConfig, *, dtype, param_dtype, rngs):
        self.unit_dim = v.hidden_size * v.merge_unit
        self.ln_q = _norm(v, v.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_0 = _linear(self.unit_dim, self.unit_dim, ("vision_mlp", "vision_mlp"), bias=True,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_2 = _linear(self.unit_dim, v.out_hidden_size, ("vision_mlp", "embed"), bias=True,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PD: jax.Array) -> jax.Array:
        x_MU = self.ln_q(x_PD).reshape(-1, self.unit_dim)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x_MU), approximate=False))


class VisionTower(nnx.Module):
    """pixel_values [P, C*t*p*p] + static grid -> merged visual tokens [P / merge^2, out_hidden]."""

    def __init__(self, config: QwenVLConfig, *, rngs: nnx.Rngs):
        v = config.vision
        self.vcfg = v
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.patch_embed = PatchEmbed(v, **kw)
        self.blocks = nnx.List([VisionBlock(v, **kw) for _ in range(v.depth)])
        self.merger = PatchMerger(v, **kw)

    def __call__(self, pixel_values_PC: Float[Array, "P C"], grid_thw,
                 *, return_block_outputs: bool = False) -> Float[Array, "M D"]:
        v = self.vcfg
        grid = as_grid(grid_thw)
        num_patches = sum(t * h * w for t, h, w in grid)
        if pixel_values_PC.ndim != 2 or pixel_values_PC.shape[1] != v.patch_dim:
            raise ValueError(f"pixel_values must be [patches, {v.patch_dim}] (C*t*p*p = {v.in_channels}*"
                             f"{v.temporal_patch_size}*{v.patch_size}^2), got shape {tuple(pixel_values_PC.shape)}")
        if pixel_values_PC.shape[0] != num_patches:
            raise ValueError(f"pixel_values has {pixel_values_PC.shape[0]} rows but grid_thw {list(grid)} "
                             f"describes {num_patches} patches (sum of t*h*w)")
        pos_hw, frame_seg = grid_layout(grid, v.spatial_merge_size)
        x_PD = self.patch_embed(pixel_values_PC.astype(self.patch_embed.proj.kernel.dtype))
        x_PD = constrain(x_PD, ("vision_patches", "vision_embed"))
        cos_PH, sin_PH = vision_rotary(pos_hw, v.head_dim)
        full_seg = frame_seg  # static NumPy: VisionAttention batches equal-length segments
        win_seg, order_P = full_seg, None
        if v.family == "qwen2_5_vl":
            window_index, window_seg = window_layout(grid, v.spatial_merge_size, v.window_size, v.patch_size)
            unit = v.merge_unit
            # Permute whole merge units so every window is contiguous (HF's permute_input_for_window_attn).
            order_P = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
            x_PD, cos_PH, sin_PH = x_PD[order_P], cos_PH[order_P], sin_PH[order_P]
            full_seg = frame_seg[order_P]  # frames stay contiguous under the permutation
            win_seg = window_seg
        outputs = []
        for i, block in enumerate(self.blocks):
            use_full = v.family == "qwen2_vl" or i in v.fullatt_block_indexes
            x_PD = block(x_PD, cos_PH, sin_PH, full_seg if use_full else win_seg)
            if return_block_outputs:
                outputs.append(x_PD)
        merged_MD = self.merger(x_PD)
        if order_P is not None:
            merged_MD = merged_MD[np.argsort(window_index)]
        if return_block_outputs:
            return merged_MD, outputs
        return merged_MD
