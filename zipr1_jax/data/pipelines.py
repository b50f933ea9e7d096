"""grain loaders for RL prompts, SFT and evaluation: deterministic, resumable, static shapes.

    source -> [shuffle(seed)] -> repeat(num_epochs) -> map(process) -> batch(collate) -> iterator

`process` decodes the record's images, runs the Qwen image processor, and builds the chat prompt
(vision pad counts validated against the grids); `collate` (batching.py) pads to the smallest
length bucket, stacks pixel rows into a row bucket and repeats each prompt G times contiguously.
Iterating a `Loader` yields a grain iterator whose `get_state()` / `set_state()` make a
checkpointable position: a restored iterator produces exactly the batches that would have followed.

Batch layout (R = batch_size * G rows for `rl_prompt_loader`, batch_size for the others):
  input_ids       int32 [R, L]     L in cfg.length_buckets; left padded (right padded for SFT)
  attention_mask  int32 [R, L]     1 on tokens
  lengths         int32 [R]        unpadded lengths
  prompt_index    int32 [R]        row // G: which prompt of the batch (rows of a group are adjacent)
  valid           bool  [R]        False on filler rows of a kept last partial batch (eval_loader)
  loss_mask       bool  [R, L]     SFT only: True on the answer tokens and <|im_end|> (targets: token t
                                   is predicted from position t - 1, so shift before use)
  pixel_values    float32 [P, C]   rows of every image of every row in row order, zero padded to P in
                                   cfg.pixel_row_buckets (next power of two >= 64 when unset)
  pixel_mask      bool  [P]        True on real rows: the real ones are pixel_values[:sum(prod(grid))]
  image_grid_thw  int64 [I, 3]     one row per image in row order (repeated with its prompt)
  image_counts    int32 [R]        images per row
  pixel_values_videos, pixel_mask_videos, video_grid_thw, video_counts, second_per_grid_ts [V]:
                  the same for videos, present only in batches holding a video
  position_ids    int32 [3, R, L]  M-RoPE ids (only when a model config is given); rope_deltas int32 [R]
  uid, question, answer, answer_type, choices: lists of length R (repeated with the prompt)

Static shapes: with `cfg.image_size` set (the built-in tasks always use one size), every image
has the same grid, so `image_grid_thw` and the pixel row count are constant; with free-size images
the grids vary and the vision tower (which takes grids as static) compiles once per distinct set.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import grain
import numpy as np

from zipr1_jax.data import batching, chat
from zipr1_jax.data.sources import load_image
from zipr1_jax.data.vision import process_image, process_video
from zipr1_jax.models.qwen_vl.rope import get_rope_index


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Batching, shuffling, bucketing and image settings shared by all loaders."""

    batch_size: int = 8  # distinct prompts per batch (RL rows = batch_size * group_size)
    group_size: int = 1  # G rollouts per prompt (rl_prompt_loader only)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True
    length_buckets: tuple[int, ...] = (128, 256, 512)
    pixel_row_buckets: tuple[int, ...] | None = None  # None: next power of two >= 64
    image_size: tuple[int, int] | None = None  # resize every image to (H, W): static grids
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    video_fps: float = 2.0  # frame rate of record videos without an "fps": sets second_per_grid_ts
    system_prompt: str | None = chat.DEFAULT_SYSTEM_PROMPT
    answer_template: str = chat.ANSWER_TEMPLATE
    shard_index: int = 0  # multi-host: this process reads examples shard_index::shard_count
    shard_count: int = 1
    num_threads: int = 0  # grain read threads; 0 reads in the consuming thread
    prefetch_buffer_size: int = 16

    def __post_init__(self):
        for name in ("batch_size", "group_size", "patch_size", "temporal_patch_size", "merge_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PipelineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"PipelineConfig.num_epochs must be >= 1 or None (forever), got {self.num_epochs}")
        for name in ("length_buckets", "pixel_row_buckets"):
            b = getattr(self, name)
            if b is None and name == "pixel_row_buckets":
                continue
            b = tuple(int(x) for x in b)
            object.__setattr__(self, name, b)
            if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"PipelineConfig.{name} must be positive and strictly increasing, got {b}")
        if self.image_size is not None:
            size = tuple(int(x) for x in self.image_size)
            object.__setattr__(self, "image_size", size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"PipelineConfig.image_size must be (H, W) > 0 or None, got {self.image_size}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"PipelineConfig.min_pixels/max_pixels must satisfy 0 < min <= max, "
                             f"got {self.min_pixels}, {self.max_pixels}")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"PipelineConfig.shard_index must be in [0, shard_count={self.shard_count}), "
                             f"got {self.shard_index}")
        if self.video_fps <= 0:
            raise ValueError(f"PipelineConfig.video_fps must be > 0, got {self.video_fps}")
        if self.num_threads < 0 or self.prefetch_buffer_size < 1:
            raise ValueError("PipelineConfig.num_threads must be >= 0 and prefetch_buffer_size >= 1")


ImageProcessor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _with_settings(fn, cfg: PipelineConfig):
    wanted = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size,
                  temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size)
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return partial(fn, **{k: v for k, v in wanted.items() if takes_all or k in params})


def default_image_processor(cfg: PipelineConfig) -> ImageProcessor:
    """`zipr1_jax.data.vision.process_image` with the config's settings (only the kwargs it takes)."""
    return _with_settings(process_image, cfg)


def default_video_processor(cfg: PipelineConfig) -> ImageProcessor:
    """`zipr1_jax.data.vision.process_video` (frames uint8 [T, H, W, 3]) with the config's settings."""
    return _with_settings(process_video, cfg)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class _Process:
    """Record -> processed example (a picklable map function for grain)."""

    tokenizer: Any
    cfg: PipelineConfig
    image_processor: ImageProcessor
    video_processor: ImageProcessor | None
    special: chat.SpecialIds
    sft: bool

    def _videos(self, record: dict, where: str):
        pixels, grids, seconds = [], [], []
        for i, video in enumerate(record.get("videos") or ()):
            if isinstance(video, (str, bytes)):
                raise ValueError(f"{where} video {i}: give decoded frames (array [T, H, W, 3] or a list of frames), "
                                 "not an encoded video file")
            frames = np.stack([load_image(f, f"{where} video {i} frame {t}") for t, f in enumerate(video)])
            if self.cfg.image_size is not None:
                frames = np.stack([_resize(f, self.cfg.image_size) for f in frames])
            if self.video_processor is None:
                raise ValueError(f"{where} has a video but no video processor was given")
            pv, grid = self.video_processor(frames)
            pixels.append(np.asarray(pv, np.float32))
            grids.append(np.asarray(grid, np.int64).reshape(3))
            # Qwen2.5-VL's temporal RoPE step: seconds covered by one temporal patch.
            seconds.append(self.cfg.temporal_patch_size / float(record.get("fps") or self.cfg.video_fps))
        return pixels, grids, seconds

    def __call__(self, record: dict) -> dict:
        cfg = self.cfg
        where = f"example {record.get('uid')!r}"
        pixels, grids = [], []
        for i, img in enumerate(record["images"]):
            arr = load_image(img, f"{where} image {i}")
            if cfg.image_size is not None:
                arr = _resize(arr, cfg.image_size)
            pv, grid = self.image_processor(arr)
            pixels.append(np.asarray(pv, np.float32))
            grids.append(np.asarray(grid, np.int64).reshape(3))
        grid_arr = np.stack(grids) if grids else np.zeros((0, 3), np.int64)
        v_pixels, v_grids, seconds = self._videos(record, where)
        v_grid_arr = np.stack(v_grids) if v_grids else None
        kwargs = dict(system_prompt=cfg.system_prompt, merge_size=cfg.merge_size, special=self.special)
        if self.sft:
            ids, loss_mask = chat.build_sft_example(self.tokenizer, record["question"], record["answer"], grid_arr,
                                                    v_grid_arr, answer_template=cfg.answer_template, **kwargs)
        else:
            ids, loss_mask = chat.build_prompt(self.tokenizer, record["question"], grid_arr, v_grid_arr,
                                               **kwargs), None
        if len(ids) > cfg.length_buckets[-1]:
            raise ValueError(f"{where} has {len(ids)} tokens, more than the largest length bucket "
                             f"{cfg.length_buckets[-1]}: add a larger value to data.length_buckets, or make images "
                             "smaller (data.image_size)")
        out = {k: record[k] for k in batching.TEXT_FIELDS}
        out.update(ids=ids, image_grid_thw=grid_arr,
                   pixel_values=np.concatenate(pixels) if pixels else np.zeros((0, 0), np.float32))
        if v_pixels:
            out.update(pixel_values_videos=np.concatenate(v_pixels), video_grid_thw=v_grid_arr,
                       second_per_grid_ts=np.asarray(seconds, np.float32))
        if loss_mask is not None:
            out["loss_mask"] = loss_mask
        return out


@dataclass
class Loader:
    """An iterable over batches; `iter(loader)` is a grain iterator with get_state()/set_state()."""

    dataset: grain.MapDataset
    read_options: grain.ReadOptions | None
    num_batches: int | None  # None when it repeats forever

    def __iter__(self) -> Iterator[dict]:
        if self.read_options is None:
            return iter(self.dataset)
        return iter(self.dataset.to_iter_dataset(self.read_options))

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this loader repeats forever (num_epochs=None): it has no length")
        return self.num_batches


def record_processor(tokenizer, cfg: PipelineConfig, *, sft: bool, image_processor: ImageProcessor | None = None,
                     video_processor: ImageProcessor | None = None) -> Callable[[dict], dict]:
    """The loaders' record -> example map (images decoded and processed, prompt built and checked
    against the largest length bucket); `data.validate` runs the same one over a whole source."""
    if video_processor is None:
        try:
            video_processor = default_video_processor(cfg)
        except ImportError:  # only needed when a record holds a video: _Process raises then
            video_processor = None
    return _Process(tokenizer, cfg, image_processor or default_image_processor(cfg), video_processor,
                    chat.SpecialIds.from_tokenizer(tokenizer), sft)


def _rope_fn(model_config, merge_size: int, special: chat.SpecialIds):
    if model_config is None:
        return None
    if model_config.image_token_id != special.image_pad or model_config.video_token_id != special.video_pad:
        raise ValueError(f"tokenizer image/video pad ids ({special.image_pad}, {special.video_pad}) differ from the "
                         f"model config's ({model_config.image_token_id}, {model_config.video_token_id})")
    if model_config.vision.spatial_merge_size != merge_size:
        raise ValueError(f"PipelineConfig.merge_size {merge_size} != model spatial_merge_size "
                         f"{model_config.vision.spatial_merge_size}")
    def rope(ids, mask, image_grid, video_grid, seconds):
        return get_rope_index(model_config, ids, mask, image_grid_thw=image_grid, video_grid_thw=video_grid,
                              second_per_grid_ts=seconds)

    return rope


def _build(source, tokenizer, cfg: PipelineConfig, *, sft: bool, group_size: int, shuffle: bool,
           num_epochs: int | None, drop_remainder: bool, padding_side: str,
           image_processor: ImageProcessor | None, video_processor: ImageProcessor | None,
           model_config) -> Loader:
    if len(source) == 0:
        raise ValueError(f"source {source!r} has no examples")
    special = chat.SpecialIds.from_tokenizer(tokenizer)
    process = record_processor(tokenizer, cfg, sft=sft, image_processor=image_processor,
                               video_processor=video_processor)
    collate = partial(batching.collate, length_buckets=cfg.length_buckets, pad_id=special.pad,
                      padding_side=padding_side, group_size=group_size, pixel_buckets=cfg.pixel_row_buckets,
                      batch_size=cfg.batch_size,  # a kept partial batch is filled: shapes stay static
                      rope_fn=_rope_fn(model_config, cfg.merge_size, special))
    ds = grain.MapDataset.source(source)
    if cfg.shard_count > 1:
        # Before shuffling, so hosts read disjoint examples; equal shard sizes (dropping at most
        # shard_count - 1 examples) so every host yields the same number of batches (no hang).
        ds = ds[:len(ds) // cfg.shard_count * cfg.shard_count][cfg.shard_index::cfg.shard_count]
        if len(ds) == 0:
            raise ValueError(f"shard {cfg.shard_index} of {cfg.shard_count} of {source!r} has no examples")
    n_examples = len(ds)
    if shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(process).batch(cfg.batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    num_batches = None
    if num_epochs is not None:
        total = n_examples * num_epochs
        num_batches = total // cfg.batch_size if drop_remainder else -(-total // cfg.batch_size)
        if num_batches == 0:
            raise ValueError(f"{total} examples make no full batch of {cfg.batch_size} (drop_remainder=True)")
    # num_threads = 0 must be said explicitly: grain's default ReadOptions (16 threads, 500 elements,
    # here 500 BATCHES ahead per loader) would fill memory and fight the model for the CPU.
    read = (grain.ReadOptions(num_threads=0, prefetch_buffer_size=0) if cfg.num_threads == 0
            else grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))
    return Loader(ds, read, num_batches)


def rl_prompt_loader(source, tokenizer, cfg: PipelineConfig, *, image_processor: ImageProcessor | None = None,
                     video_processor: ImageProcessor | None = None, model_config=None) -> Loader:
    """Batches of left-padded prompts, each repeated `cfg.group_size` times contiguously.

    Args:
      source: random-access records (sources.py).
      tokenizer: HF tokenizer with the Qwen special tokens.
      image_processor: image uint8 [H, W, 3] -> (pixel_values [P, C], grid_thw [3]); default
        `vision.process_image` with the config's settings.
      video_processor: frames uint8 [T, H, W, 3] -> (pixel_values_videos [P, C], grid_thw [3]);
        default `vision.process_video`. Records carry videos as "videos": [frames, ...].
      model_config: a QwenVLConfig; when given, batches carry M-RoPE `position_ids` / `rope_deltas`.
    """
    return _build(source, tokenizer, cfg, sft=False, group_size=cfg.group_size, shuffle=cfg.shuffle,
                  num_epochs=cfg.num_epochs, drop_remainder=cfg.drop_remainder,
                  padding_side="left", image_processor=image_processor, video_processor=video_processor,
                  model_config=model_config)


def sft_loader(source, tokenizer, cfg: PipelineConfig, *, image_processor: ImageProcessor | None = None,
               video_processor: ImageProcessor | None = None, model_config=None) -> Loader:
    """Batches of right-padded prompt + target ids with `loss_mask` on the target (no group repeat)."""
    return _build(source, tokenizer, cfg, sft=True, group_size=1, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
                  drop_remainder=cfg.drop_remainder, padding_side="right",
                  image_processor=image_processor, video_processor=video_processor,
                  model_config=model_config)


def eval_loader(source, tokenizer, cfg: PipelineConfig, *, image_processor: ImageProcessor | None = None,
                video_processor: ImageProcessor | None = None, model_config=None, group_size: int = 1) -> Loader:
    """One ordered pass, no shuffle; the last partial batch is filled and marked by `valid`."""
    return _build(source, tokenizer, cfg, sft=False, group_size=group_size, shuffle=False,
                  num_epochs=1, drop_remainder=False, padding_side="left",
                  image_processor=image_processor, video_processor=video_processor,
                  model_config=model_config)
