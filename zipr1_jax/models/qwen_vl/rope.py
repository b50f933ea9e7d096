"""Multimodal rotary position embedding (M-RoPE) of the Qwen2 / Qwen2.5-VL decoder.

Every token has three position ids (temporal, height, width). The rotary frequency bands of a head
are split into `mrope_section` chunks; chunk i takes its angle from position axis i % 3. Text tokens
carry the same id on all three axes, so for pure text M-RoPE equals ordinary 1D RoPE.

`get_rope_index` reproduces transformers' host-side position-id computation (5.x semantics: a
vision block advances the text position by max(h, w) // merge, video time ids are scaled by
`second_per_grid_ts * tokens_per_second` in Qwen2.5-VL). It runs in NumPy because grids fix shapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zipr1_jax.models.qwen_vl.config import QwenVLConfig
from zipr1_jax.typing import Array, Float, Int

# Modality codes, as in transformers' `mm_token_type_ids`.
TEXT, IMAGE, VIDEO = 0, 1, 2


def inv_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Inverse rotary frequencies [H/2], float32 exactly as transformers builds them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def mrope_cos_sin(position_ids_3BL: Int[Array, "3 B L"], *, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[Float[Array, "B L H"], Float[Array, "B L H"]]:
    """cos / sin tables [B, L, H] (float32) for M-RoPE.

    Band j of the H/2 frequency bands belongs to section i (cumulative `mrope_section`) and uses
    position axis i % 3; the table is then duplicated over both halves (rotate-half convention).
    """
    if position_ids_3BL.ndim != 3 or position_ids_3BL.shape[0] != 3:
        raise ValueError(f"position_ids must have shape [3, B, L], got {position_ids_3BL.shape}")
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    inv_freq = jnp.asarray(inv_frequencies(head_dim, theta))
    angles_3BLh = position_ids_3BL.astype(jnp.float32)[..., None] * inv_freq
    # Band -> position axis map, static: section i covers bands [c_i, c_{i+1}).
    axis_of_band = np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)])
    onehot_3h = jnp.asarray(np.eye(3, dtype=bool)[:, axis_of_band])
    # Select (not sum) so the float32 values are bit-identical to indexing.
    angles_BLh = jnp.where(onehot_3h[0][None, None], angles_3BLh[0],
                           jnp.where(onehot_3h[1][None, None], angles_3BLh[1], angles_3BLh[2]))
    angles_BLH = jnp.concatenate([angles_BLh, angles_BLh], axis=-1)
    return jnp.cos(angles_BLH), jnp.sin(angles_BLH)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_BLNH: Float[Array, "B L N H"], cos_BLH: Float[Array, "B L H"],
                 sin_BLH: Float[Array, "B L H"]) -> Float[Array, "B L N H"]:
    """Rotate queries or keys; the rotation is done in float32 and cast back to x's dtype."""
    x = x_BLNH.astype(jnp.float32)
    cos, sin = cos_BLH[:, :, None, :], sin_BLH[:, :, None, :]
    return (x * cos + rotate_half(x) * sin).astype(x_BLNH.dtype)


def text_position_ids(attention_mask_BL: jax.Array) -> jax.Array:
    """[3, B, L] ids for pure text: arange over valid tokens, 0 at padding (jit friendly)."""
    mask = attention_mask_BL.astype(jnp.int32)
    pos = jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)
    return jnp.broadcast_to(pos[None], (3, *pos.shape))


def _vision_positions(start: int, grid_thw: np.ndarray, merge: int, time_interval) -> np.ndarray:
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    # transformers multiplies an int64 arange by a float32 interval and truncates (`.long()`).
    pos_t = (np.arange(t, dtype=np.float32) * np.float32(time_interval)).astype(np.int64) + start
    tt, hh, ww = np.meshgrid(pos_t, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])


def get_rope_index(config: QwenVLConfig, input_ids, attention_mask=None, image_grid_thw=None,
                   video_grid_thw=None, second_per_grid_ts=None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids for a batch of mixed text / image / video sequences (host NumPy).

    Args:
      input_ids: [B, L] int. Image (video) pad tokens mark where merged vision tokens go.
      attention_mask: [B, L] (1 = token, 0 = padding) or None.
      image_grid_thw / video_grid_thw: [n, 3] patch grids, in the order the blocks appear (row-major
        over the batch).
      second_per_grid_ts: [n_videos] seconds per temporal grid step (Qwen2.5-VL only; default 1).

    Returns:
      position_ids [3, B, L] int64 (0 at padding) and rope_deltas [B] int64 (max position + 1 minus
      the number of valid tokens): decode position of the n-th new token is len + n + delta.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {ids.shape}")
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    merge = config.vision.spatial_merge_size
    grids = {IMAGE: iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(()),
             VIDEO: iter(np.asarray(video_grid_thw).reshape(-1, 3)) if video_grid_thw is not None else iter(())}
    seconds = iter(np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1)) if second_per_grid_ts is not None \
        else itertools.repeat(np.float32(1.0))
    types = np.where(ids == config.image_token_id, IMAGE, np.where(ids == config.video_token_id, VIDEO, TEXT))
    position_ids = np.zeros((3, *ids.shape), dtype=np.int64)
    deltas = np.zeros((ids.shape[0],), dtype=np.int64)
    for b in range(ids.shape[0]):
        row_types = types[b][mask[b]]
        pieces, pos = [], 0
        for kind, group in itertools.groupby(row_types.tolist()):
            n = len(list(group))
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
                pos += n
                continue
            grid = next(grids[kind], None)
            if grid is None:
                name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                raise ValueError(f"row {b} has more {'image' if kind == IMAGE else 'video'} blocks than {name} rows")
            interval = 1.0
            if kind == VIDEO and config.family == "qwen2_5_vl":
                interval = np.float32(config.vision.tokens_per_second) * next(seconds)
            block = _vision_positions(pos, grid, merge, interval)
            if block.shape[1] != n:
                raise ValueError(f"row {b}: a block of {n} {'image' if kind == IMAGE else 'video'} pad tokens does "
                                 f"not match grid {tuple(int(g) for g in grid)} ({block.shape[1]} merged tokens)")
            pieces.append(block)
            pos += max(int(grid[1]), int(grid[2])) // merge
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b]] = row
        deltas[b] = (row.max() + 1 if row.size else 0) - row.shape[1]
    return position_ids, deltas
