"""Host-side Qwen2-VL image/video preprocessing (NumPy + PIL), equal to transformers' PIL backend.

Pipeline per image (``transformers.Qwen2VLImageProcessorPil``): convert to RGB, smart-resize to a
multiple of ``patch_size * merge_size`` within [min_pixels, max_pixels] with PIL bicubic, rescale by
1/255, normalise with the OpenAI CLIP mean/std, repeat along time to ``temporal_patch_size`` and
flatten to rows ``[grid_t * grid_h * grid_w, C * tp * p * p]`` ordered by merge window (so the
vision merger can group 2x2 neighbours by consecutive rows).

Videos: every frame is resized to the size smart-resize gives the first frame, the frame count is
padded by repeating the last frame to a multiple of ``temporal_patch_size``, and consecutive frames
form one temporal patch. (transformers' video processor needs torchvision, which this project does
not install; the tests check videos against the image processor's per-frame output.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
# transformers' Qwen2VLVideoProcessor defaults.
DEFAULT_VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_VIDEO_MAX_PIXELS = 28 * 28 * 768


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionProcessorConfig:
  """Preprocessing hyper-parameters (defaults = Qwen2-VL / Qwen2.5-VL image processor)."""

  min_pixels: int = DEFAULT_MIN_PIXELS
  max_pixels: int = DEFAULT_MAX_PIXELS
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2

  def __post_init__(self):
    for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"VisionProcessorConfig.{name} must be a positive int, got {value!r}")
    if self.min_pixels > self.max_pixels:
      raise ValueError(
          f"VisionProcessorConfig.min_pixels ({self.min_pixels}) must be <= max_pixels "
          f"({self.max_pixels})")

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
  """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

  Same rounding as transformers (Python ``round`` = banker's rounding, floor when shrinking, ceil
  when growing) and the same aspect-ratio error.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image height and width must be positive, got {height}x{width}")
  ratio = max(height, width) / min(height, width)
  if ratio > MAX_ASPECT_RATIO:
    raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _to_rgb_array(image: Any, item: str) -> np.ndarray:
  """Loads a PIL image / array / path as uint8 [H, W, 3] (RGBA/L/P converted like HF's convert_rgb)."""
  if isinstance(image, (str, os.PathLike)):
    try:
      with Image.open(image) as im:
        im.load()
        image = im.copy()
    except (OSError, ValueError) as e:
      raise ValueError(f"{item}: cannot read image file {os.fspath(image)!r}: {e}") from e
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      # HF's convert_to_rgb composites transparency onto a white background.
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      image = Image.alpha_composite(white, rgba).convert("RGB")
    elif image.mode != "RGB":
      image = image.convert("RGB")
    arr = np.asarray(image)
  else:
    arr = np.asarray(image)
    if arr.ndim == 2:
      arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3:
      raise ValueError(f"{item}: expected an HxWx3 image, got array of shape {arr.shape}")
    if arr.shape[-1] == 4 and arr.dtype == np.uint8:
      # HF's convert_to_rgb for arrays: blend onto white with alpha/255, rounded.
      alpha = arr[..., 3:4] / 255
      arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    elif arr.shape[-1] == 1:
      arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] != 3:
      raise ValueError(f"{item}: expected 1, 3 or 4 channels (HxWxC), got shape {arr.shape}")
    if arr.dtype != np.uint8:
      raise ValueError(f"{item}: expected a uint8 array, got dtype {arr.dtype}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"{item}: empty image of shape {arr.shape}")
  return arr


def _resize_normalize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [3, height, width], bicubic-resized, rescaled, CLIP-normalised."""
  if arr.shape[:2] != (height, width):
    arr = np.asarray(Image.fromarray(arr).resize((width, height), resample=Image.BICUBIC))
  x = arr.astype(np.float32) * np.float32(1 / 255)
  mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(OPENAI_CLIP_STD, np.float32)
  x = (x - mean) / std
  return np.ascontiguousarray(x.transpose(2, 0, 1))


def _patchify(frames_TCHW: np.ndarray, cfg: VisionProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
  t, c, h, w = frames_TCHW.shape
  tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
  if t % tp:
    # Repeat the last frame so time divides the temporal patch (HF pads the same way).
    frames_TCHW = np.concatenate([frames_TCHW, np.repeat(frames_TCHW[-1:], tp - t % tp, 0)], 0)
    t = frames_TCHW.shape[0]
  gt, gh, gw = t // tp, h // p, w // p
  x = frames_TCHW.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
  # (gt, gh/m, gw/m, mh, mw, C, tp, ph, pw): rows ordered by merge window, features by C,t,y,x.
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  pixel_values = x.reshape(gt * gh * gw, c * tp * p * p).astype(np.float32)
  return pixel_values, np.array([gt, gh, gw], dtype=np.int64)


def _config(config, **overrides) -> VisionProcessorConfig:
  if config is not None:
    return config
  return VisionProcessorConfig(**overrides)


def process_image(image, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                  max_pixels: int = DEFAULT_MAX_PIXELS, patch_size: int = 14,
                  temporal_patch_size: int = 2, merge_size: int = 2,
                  config: VisionProcessorConfig | None = None,
                  item: str = "image") -> tuple[np.ndarray, np.ndarray]:
  """One image (PIL image, HxWx3 uint8 array or path) -> (pixel_values [P, C*tp*p*p] f32, grid_thw int64[3]).

  ``config`` overrides the keyword hyper-parameters when given. Raises ValueError naming ``item``.
  """
  cfg = _config(config, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                temporal_patch_size=temporal_patch_size, merge_size=merge_size)
  arr = _to_rgb_array(image, item)
  try:
    h, w = smart_resize(arr.shape[0], arr.shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
  except ValueError as e:
    raise ValueError(f"{item}: {e}") from e
  x = _resize_normalize(arr, h, w)
  # A still image is a one-temporal-patch clip of identical frames.
  frames = np.broadcast_to(x[None], (cfg.temporal_patch_size, *x.shape))
  return _patchify(frames, cfg)


def process_images(images: Sequence, **kwargs) -> tuple[np.ndarray, np.ndarray]:
  """Several images -> (concatenated pixel_values [sum P, F], grid_thw int64 [n, 3])."""
  if len(images) == 0:
    raise ValueError("process_images: got an empty list of images")
  outs = [process_image(im, item=f"image[{i}]", **kwargs) for i, im in enumerate(images)]
  return np.concatenate([o[0] for o in outs], 0), np.stack([o[1] for o in outs])


def process_video(frames, *, min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS,
                  max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS, patch_size: int = 14,
                  temporal_patch_size: int = 2, merge_size: int = 2,
                  config: VisionProcessorConfig | None = None,
                  item: str = "video") -> tuple[np.ndarray, np.ndarray]:
  """Frames (list of images or array [T, H, W, 3]) -> (pixel_values_videos, video_grid_thw int64[3])."""
  cfg = _config(config, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                temporal_patch_size=temporal_patch_size, merge_size=merge_size)
  if frames is None or len(frames) == 0:
    raise ValueError(f"{item}: a video needs at least one frame")
  arrs = [_to_rgb_array(f, f"{item} frame {i}") for i, f in enumerate(frames)]
  shape = arrs[0].shape
  for i, a in enumerate(arrs):
    if a.shape != shape:
      raise ValueError(f"{item} frame {i}: shape {a.shape} differs from frame 0's {shape}")
  try:
    h, w = smart_resize(shape[0], shape[1], cfg.factor, cfg.min_pixels, cfg.max_pixels)
  except ValueError as e:
    raise ValueError(f"{item}: {e}") from e
  x = np.stack([_resize_normalize(a, h, w) for a in arrs])
  return _patchify(x, cfg)


def num_image_tokens(grid_thw, merge_size: int = 2) -> int | np.ndarray:
  """Merged vision tokens (= <|image_pad|> count): t*h*w / merge_size**2, per row for [n, 3]."""
  g = np.asarray(grid_thw, dtype=np.int64)
  if g.shape[-1] != 3:
    raise ValueError(f"grid_thw must have last dim 3, got shape {g.shape}")
  n = g.prod(-1) // (merge_size * merge_size)
  return int(n) if n.ndim == 0 else n
