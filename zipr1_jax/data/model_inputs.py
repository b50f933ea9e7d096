"""Host-side views of a loader batch as model inputs (see zipr1_jax/data/pipelines.py for the layout).

Vision grids fix the vision tower's shapes, so they travel as STATIC jit arguments (tuples); the
pixel rows are cut to the real ones (the loader pads them to a bucket). Everything else is a
device array that `Placement.put_batch` / `put_rows` place on the mesh.
"""

from __future__ import annotations

import numpy as np

Grid = tuple[tuple[int, int, int], ...] | None


def static_grid(grid) -> Grid:
    if grid is None:
        return None
    g = np.asarray(grid).reshape(-1, 3)
    if g.shape[0] == 0:
        return None
    return tuple(tuple(int(x) for x in row) for row in g.tolist())


def vision_arrays(batch: dict) -> tuple[dict[str, np.ndarray], dict[str, Grid]]:
    """(arrays, grids): real pixel rows of images / videos and their static grids."""
    arrays, grids = {}, {"image_grid": None, "video_grid": None}
    for pix_key, mask_key, grid_key, name in (("pixel_values", "pixel_mask", "image_grid_thw", "image_grid"),
                                               ("pixel_values_videos", "pixel_mask_videos", "video_grid_thw",
                                                "video_grid")):
        grid = static_grid(batch.get(grid_key))
        if grid is None:
            continue
        n_rows = int(sum(t * h * w for t, h, w in grid))
        pix = np.asarray(batch[pix_key])
        if mask_key in batch and int(np.sum(batch[mask_key])) != n_rows:
            raise ValueError(f"batch {pix_key}: {int(np.sum(batch[mask_key]))} real rows but the grids "
                             f"{grid} need {n_rows}")
        arrays[pix_key] = pix[:n_rows]
        grids[name] = grid
    return arrays, grids


def model_kwargs(arrays: dict, grids: dict) -> dict:
    """Keyword arguments of the model's forward for the vision part (inside jit)."""
    return dict(pixel_values=arrays.get("pixel_values"),
                image_grid_thw=None if grids["image_grid"] is None else np.asarray(grids["image_grid"]),
                pixel_values_videos=arrays.get("pixel_values_videos"),
                video_grid_thw=None if grids["video_grid"] is None else np.asarray(grids["video_grid"]))


def response_positions(rope_deltas_R: np.ndarray, n_valid_R: np.ndarray, T: int) -> np.ndarray:
    """M-RoPE ids [3, R, T] of generated tokens: token i sits at position n_valid + i + delta."""
    pos_RT = (np.asarray(n_valid_R)[:, None] + np.arange(T)[None] + np.asarray(rope_deltas_R)[:, None])
    return np.broadcast_to(pos_RT[None], (3,) + pos_RT.shape).astype(np.int32)
