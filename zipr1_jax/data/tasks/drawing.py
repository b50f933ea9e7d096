"""Deterministic NumPy rasterisation of shapes and 7-segment digits (no fonts, no PIL text)."""

from __future__ import annotations

import numpy as np

# Saturated, well-separated colours; names are single short words (small tokenizer vocabulary).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (255, 255, 255)
GREY = (128, 128, 128)  # clutter that is no answer colour

# Segments a..g of a 7-segment display per digit.
_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
    "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}


def blank(height: int, width: int) -> np.ndarray:
  return np.full((height, width, 3), BACKGROUND, dtype=np.uint8)


def shape_mask(shape: str, size: int) -> np.ndarray:
  """Boolean [size, size] mask of a filled square / circle / upward triangle."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    r = size / 2
    return (yy - r) ** 2 + (xx - r) ** 2 <= r * r
  if shape == "triangle":
    # Apex at top centre, base at the bottom: half-width grows linearly with the row.
    half = yy / size * (size / 2)
    return np.abs(xx - size / 2) <= half
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_shape(img: np.ndarray, shape: str, color: str, top: int, left: int, size: int) -> None:
  """Paints ``shape`` in ``color`` with its bounding box at (top, left), in place."""
  mask = shape_mask(shape, size)
  region = img[top:top + size, left:left + size]
  region[mask[:region.shape[0], :region.shape[1]]] = COLORS[color]


def draw_digit(img: np.ndarray, digit: str, top: int, left: int, height: int, width: int,
               color=(0, 0, 0)) -> None:
  """Draws one 7-segment digit in the box (top, left, height, width), in place."""
  t = max(1, min(height, width) // 5)  # stroke thickness
  mid = top + (height - t) // 2
  bot = top + height - t
  right = left + width - t
  half_h = height // 2
  rects = {
      "a": (top, left, t, width), "g": (mid, left, t, width), "d": (bot, left, t, width),
      "f": (top, left, half_h, t), "b": (top, right, half_h, t),
      "e": (top + half_h, left, height - half_h, t), "c": (top + half_h, right, height - half_h, t),
  }
  for seg in _SEGMENTS[digit]:
    y, x, h, w = rects[seg]
    img[y:y + h, x:x + w] = color
