"""Collation with static shapes: length buckets, pixel-row buckets, rollout-group repetition.

jit recompiles for every new input shape, so a batch's token length is padded up to the smallest
of a few `length_buckets` that fits and its stacked `pixel_values` rows up to a row bucket. The
group repetition for GRPO copies each prompt G times contiguously TOGETHER with its own block of
pixel rows and grid rows (peers mis-slice pixel_values here: rows belong to images, not prompts).

Per-example inputs (made by pipelines.py) are dicts with `ids` int32 [L_i], optional `loss_mask`
bool [L_i], `pixel_values` float32 [P_i, C], `image_grid_thw` int64 [n_i, 3], optional
`pixel_values_videos` / `video_grid_thw` / `second_per_grid_ts`, and text fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

TEXT_FIELDS = ("uid", "question", "answer", "answer_type", "choices")


def pick_bucket(n: int, buckets: Sequence[int], what: str = "length") -> int:
    """Smallest bucket >= n; ValueError if n exceeds the largest bucket."""
    for b in buckets:
        if n <= b:
            return int(b)
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)} (buckets {tuple(buckets)})")


def pixel_row_bucket(rows: int, buckets: Sequence[int] | None) -> int:
    """Row count pixel_values is padded to: a configured bucket, else the next power of two (>= 64)."""
    if buckets:
        return pick_bucket(rows, buckets, "pixel_values rows")
    return max(64, 1 << max(rows - 1, 0).bit_length())


def stack_pixels(examples: Sequence[dict], pixel_buckets, kind: str = "image") -> dict[str, np.ndarray]:
    """Concatenate the examples' pixel rows (row order) into one row-bucketed array with its grids.

    kind "image" reads pixel_values / image_grid_thw and writes pixel_values, pixel_mask,
    image_grid_thw, image_counts; kind "video" the `_videos` / video_grid_thw counterparts plus
    second_per_grid_ts.
    """
    pv_key, grid_key = ("pixel_values", "image_grid_thw") if kind == "image" else \
        ("pixel_values_videos", "video_grid_thw")
    grids = [np.asarray(ex.get(grid_key, np.zeros((0, 3))), np.int64).reshape(-1, 3) for ex in examples]
    pixels = [np.asarray(ex.get(pv_key, np.zeros((0, 0))), np.float32) for ex in examples]
    widths = {p.shape[1] for p in pixels if p.size}
    if len(widths) > 1:
        raise ValueError(f"{pv_key} rows of one batch have different widths {sorted(widths)}: "
                         "all images must use the same patch/temporal patch size")
    width = widths.pop() if widths else 0
    rows = sum(p.shape[0] for p in pixels)
    padded = pixel_row_bucket(rows, pixel_buckets) if rows else 0
    out = np.zeros((padded, width), np.float32)
    if rows:
        out[:rows] = np.concatenate([p for p in pixels if p.size], axis=0)
    mask = np.zeros((padded,), bool)
    mask[:rows] = True
    suffix = "" if kind == "image" else "_videos"
    batch = {pv_key: out, f"pixel_mask{suffix}": mask, grid_key: np.concatenate(grids, axis=0),
             f"{kind}_counts": np.asarray([g.shape[0] for g in grids], np.int32)}
    if kind == "video":
        batch["second_per_grid_ts"] = np.concatenate(
            [np.asarray(ex.get("second_per_grid_ts", np.ones(len(g))), np.float32).reshape(-1)
             for ex, g in zip(examples, grids)])
    return batch


def collate(examples: Sequence[dict], *, length_buckets: Sequence[int], pad_id: int, padding_side: str,
            group_size: int = 1, batch_size: int | None = None, pixel_buckets: Sequence[int] | None = None,
            rope_fn: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Pad, bucket and group-repeat a list of processed examples into one batch.

    Args:
      examples: processed examples (see module docstring), at most `batch_size` of them.
      padding_side: "left" for prompts (generation continues at the right edge), "right" for SFT.
      group_size: G; row r of the output is example r // G (contiguous groups).
      batch_size: if given and more than len(examples), the batch is filled with copies of the
        first example and `valid` marks the real rows (eval's last partial batch).
      rope_fn: `(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        -> (position_ids [3, R, L], rope_deltas [R])`.

    Returns:
      dict of NumPy arrays and lists, R = batch_size * G rows (see pipelines.py for the layout).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n_real = len(examples)
    batch_size = n_real if batch_size is None else batch_size
    if n_real > batch_size:
        raise ValueError(f"{n_real} examples do not fit batch_size {batch_size}")
    examples = list(examples) + [examples[0]] * (batch_size - n_real)
    valid = np.arange(batch_size) < n_real
    # Group repetition happens on whole examples, so tokens, pixel rows and grids stay together.
    rows = [ex for ex in examples for _ in range(group_size)]
    valid = np.repeat(valid, group_size)
    lengths = np.asarray([len(ex["ids"]) for ex in rows], np.int32)
    length = pick_bucket(int(lengths.max()), length_buckets, "prompt length")
    ids = np.full((len(rows), length), pad_id, np.int32)
    attn = np.zeros((len(rows), length), np.int32)
    has_loss = "loss_mask" in rows[0]
    loss = np.zeros((len(rows), length), bool) if has_loss else None
    for r, ex in enumerate(rows):
        n = lengths[r]
        sl = slice(length - n, length) if padding_side == "left" else slice(0, n)
        ids[r, sl] = ex["ids"]
        attn[r, sl] = 1
        if has_loss:
            loss[r, sl] = ex["loss_mask"]
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": attn, "lengths": lengths,
                             "prompt_index": np.repeat(np.arange(batch_size, dtype=np.int32), group_size),
                             "valid": valid}
    if has_loss:
        batch["loss_mask"] = loss
    batch.update(stack_pixels(rows, pixel_buckets, "image"))
    has_video = any(len(np.asarray(ex.get("video_grid_thw", ())).reshape(-1)) for ex in rows)
    if has_video:  # video keys only in batches that hold a video (image datasets never see them)
        batch.update(stack_pixels(rows, pixel_buckets, "video"))
    for key in TEXT_FIELDS:
        batch[key] = [ex.get(key) for ex in rows]
    if rope_fn is not None:
        pos, deltas = rope_fn(ids, attn, batch["image_grid_thw"] if len(batch["image_grid_thw"]) else None,
                              batch.get("video_grid_thw"), batch.get("second_per_grid_ts"))
        batch["position_ids"] = np.asarray(pos, np.int32)
        batch["rope_deltas"] = np.asarray(deltas, np.int32)
    return batch
