"""Each process's rows of a global batch, and one global host batch from every process's rows.

Data. `data.batch_size` / `sft.batch_size` are GLOBAL batch sizes. Process i of P reads only its
rows of every global batch (`ProcessRows`): rows [i*B/P, (i+1)*B/P) of the batch the single-process
pipeline would have made (same shuffle, same epochs). Processes then exchange their collated rows
(`gather_batch`) so every host holds the same global host batch: the rollout sampler takes host
prompts, rewards need every response's text, and the vision inputs are replicated anyway. Placing
the batch on the mesh (`Placement.put_rows`) uses each leaf's global shape, so any device order
works. The losses of a P-process run therefore equal those of one process with the same mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from zipr1_jax.sharding.host import allgather_objects
from zipr1_jax.sharding.launch import DistributedError, is_multiprocess


class ProcessRows:
    """Random-access view of one process's rows of the single-process example stream.

    The single-process pipeline reads `source` shuffled (grain, `seed`) and repeated forever, then
    batches `global_batch` consecutive examples. Element m of this view is example
    (m // b) * B + i * b + m % b of that stream (B = global_batch, b = B / count, i = index), so
    batch m of a pipeline over this view (batch size b, no shuffle) holds rows [i*b, (i+1)*b) of
    global batch m. The view is 2**40 examples long (endless in practice).
    """

    def __init__(self, source, *, global_batch: int, index: int, count: int, seed: int, shuffle: bool = True):
        if count < 1 or not 0 <= index < count:
            raise DistributedError(f"ProcessRows: index {index} must be in [0, count={count})")
        if global_batch % count:
            raise DistributedError(f"a global batch of {global_batch} examples does not split over {count} "
                                   f"processes: make the batch size a multiple of the process count")
        self.source, self.index, self.count = source, index, count
        self.global_batch, self.local_batch = global_batch, global_batch // count
        order = grain.MapDataset.range(len(source))
        if shuffle:
            order = order.shuffle(seed=seed)
        self._order = order.repeat(None)
        # Endless in practice; bounded so grain's own repeat / length arithmetic stays in int64.
        self._len = min(len(self._order), 2**40) // global_batch * self.local_batch

    def stream_index(self, m: int) -> int:
        b = self.local_batch
        return (m // b) * self.global_batch + self.index * b + m % b

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, m: int):
        return self.source[int(self._order[self.stream_index(int(m))])]

    def __repr__(self) -> str:
        return f"ProcessRows({self.source!r}, process {self.index}/{self.count}, batch {self.local_batch})"


# ---------------------------------------------------------------------- one global batch
# Keys of a collated batch (zipr1_jax/data/batching.py) by how they combine across processes.
TOKEN_KEYS = ("input_ids", "attention_mask", "loss_mask")  # [R, L]
PIXEL_KEYS = {"pixel_values": "pixel_mask", "pixel_values_videos": "pixel_mask_videos"}
CONCAT_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")  # per image / video
VIDEO_KEYS = ("pixel_values_videos", "pixel_mask_videos", "video_grid_thw", "video_counts", "second_per_grid_ts")


def _pad_tokens(x: np.ndarray, length: int, side: str, value) -> np.ndarray:
    extra = length - x.shape[-1]
    if extra == 0:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(extra, 0) if side == "left" else (0, extra)]
    return np.pad(x, pad, constant_values=value)


def _fill_missing_video(batches: list[dict]) -> list[dict]:
    """Batches without videos lack the video keys (batching.py); give them empty ones."""
    if not any("video_grid_thw" in b for b in batches):
        return batches
    width = next(b["pixel_values_videos"].shape[1] for b in batches if "pixel_values_videos" in b)
    out = []
    for b in batches:
        if "video_grid_thw" not in b:
            rows = np.asarray(b["input_ids"]).shape[0]
            b = dict(b, pixel_values_videos=np.zeros((0, width), np.float32), pixel_mask_videos=np.zeros((0,), bool),
                     video_grid_thw=np.zeros((0, 3), np.int64), video_counts=np.zeros((rows,), np.int32),
                     second_per_grid_ts=np.zeros((0,), np.float32))
        out.append(b)
    return out


def merge_batches(batches: Sequence[dict], *, padding_side: str, pad_id: int) -> dict:
    """One batch from per-process collated batches (process order), equal to what `collate` makes
    of all their examples at once: token arrays padded to the longest (= the common length
    bucket), pixel rows and grids concatenated, prompt indices renumbered."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    batches = _fill_missing_video([dict(b) for b in batches])
    keys = list(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if set(b) != set(keys):
            raise DistributedError(f"process {i}'s batch has keys {sorted(b)}, process 0's {sorted(keys)}")
    if len(batches) == 1:
        return batches[0]
    length = max(np.asarray(b["input_ids"]).shape[1] for b in batches)
    out: dict[str, Any] = {}
    for key in keys:
        vals = [b[key] for b in batches]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            out[key] = np.concatenate([_pad_tokens(np.asarray(v), length, padding_side, fill) for v in vals])
        elif key == "position_ids":  # [3, R, L]; padding positions hold 0 (rope.get_rope_index)
            out[key] = np.concatenate([_pad_tokens(np.asarray(v), length, padding_side, 0) for v in vals], axis=1)
        elif key in PIXEL_KEYS:
            masks = [np.asarray(b[PIXEL_KEYS[key]]) for b in batches]
            real = [np.asarray(v)[m] for v, m in zip(vals, masks)]
            widths = {r.shape[1] for r in real if r.size}
            width = widths.pop() if widths else np.asarray(vals[0]).shape[1]
            out[key] = np.concatenate([r.reshape(-1, width) for r in real]).astype(np.asarray(vals[0]).dtype)
            out[PIXEL_KEYS[key]] = np.ones((out[key].shape[0],), bool)
        elif key in PIXEL_KEYS.values():
            continue  # written with its pixel array
        elif key == "prompt_index":
            offsets = np.cumsum([0] + [int(np.max(v)) + 1 for v in vals[:-1]])
            out[key] = np.concatenate([np.asarray(v) + o for v, o in zip(vals, offsets)])
        elif key in CONCAT_KEYS or isinstance(vals[0], (list, tuple)):
            out[key] = np.concatenate([np.asarray(v) for v in vals]) if key in CONCAT_KEYS else \
                [x for v in vals for x in v]
        elif isinstance(vals[0], np.ndarray) and vals[0].ndim >= 1:
            out[key] = np.concatenate(vals)  # per-row arrays: lengths, valid, rope_deltas, *_counts
        else:
            raise DistributedError(f"merge_batches: do not know how to combine batch key {key!r} "
                                   f"({type(vals[0]).__name__}) across processes")
    return out


def gather_batch(local: dict, *, padding_side: str, pad_id: int) -> dict:
    """The global host batch on every process from each process's local rows (see module doc)."""
    if not is_multiprocess():
        return local
    return merge_batches(allgather_objects(local), padding_side=padding_side, pad_id=pad_id)
