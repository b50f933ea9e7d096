"""Procedural verifiable visual tasks: each generator is a pure function of (rng, difficulty, size).

Layout: most tasks place shapes in the cells of a ``g x g`` grid (g = difficulty + 1), one shape
per cell and fully inside it, so answers can be recounted from pixels (the tests do). Difficulty
grows the grid (more objects/distractors), the palette, and digit-string length; image size grows
the number of vision tokens.

Default tiny run: ``spot_color`` (one square of 2x2 merged vision tokens on a blank 168-px image:
36 vision tokens of which 4 hold the answer; 4 colours, chance = 25%) is the task
the 4-layer / hidden-64 demo model learns in a few CPU minutes and then learns to prune for.
``big_color`` (one big square) is the easiest task. ``color_at`` / ``compare_counts``
are the next step up; ``count_color``, ``shape_at`` and ``read_digits`` need a real model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from zipr1_jax.data.tasks import drawing

ANSWER_TYPES = ("exact", "choice", "number")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskExample:
  """One verifiable example. ``answer`` is checked by ``verifiers.verify(..., answer_type)``."""

  uid: str
  task: str
  image: np.ndarray  # uint8 [H, W, 3]
  question: str
  answer: str
  answer_type: str
  choices: tuple[str, ...] = ()
  difficulty: int = 1

  def __post_init__(self):
    if self.answer_type not in ANSWER_TYPES:
      raise ValueError(f"TaskExample.answer_type must be one of {ANSWER_TYPES}, "
                       f"got {self.answer_type!r}")
    img = self.image
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3
            and img.shape[-1] == 3):
      raise ValueError("TaskExample.image must be a uint8 [H, W, 3] array, got "
                       f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def grid_size(difficulty: int) -> int:
  return difficulty + 1


def palette(difficulty: int) -> tuple[str, ...]:
  return tuple(drawing.COLORS)[:min(len(drawing.COLORS), 2 + difficulty)]


def cell_box(row: int, col: int, g: int, height: int, width: int) -> tuple[int, int, int, int]:
  """(top, left, cell_h, cell_w) of grid cell (row, col)."""
  ch, cw = height // g, width // g
  return row * ch, col * cw, ch, cw


def _grid_scene(rng, difficulty, height, width, *, fill=0.6, min_objects=1):
  """Random shapes on a grid; returns (image, {(row, col): (shape, color)})."""
  g = grid_size(difficulty)
  if min(height, width) // g < 6:
    # Shapes below 4 px are ambiguous (a 3-px circle is a square); cells need room for 4 px + margin.
    raise ValueError(f"image_size {(height, width)} too small for a {g}x{g} grid at difficulty "
                     f"{difficulty}: need at least {6 * g} px per side")
  colors = palette(difficulty)
  img = drawing.blank(height, width)
  occupied = rng.random((g, g)) < fill
  if occupied.sum() < min_objects:
    flat = rng.choice(g * g, size=min_objects, replace=False)
    occupied.flat[flat] = True
  scene = {}
  for r in range(g):
    for c in range(g):
      if not occupied[r, c]:
        continue
      top, left, ch, cw = cell_box(r, c, g, height, width)
      # Shapes stay inside their cell with a 1-pixel margin so cells never touch.
      size = int(rng.integers(max(4, min(ch, cw) // 2), min(ch, cw) - 1))
      y = top + 1 + int(rng.integers(0, ch - size - 1))
      x = left + 1 + int(rng.integers(0, cw - size - 1))
      shape = drawing.SHAPES[int(rng.integers(len(drawing.SHAPES)))]
      color = colors[int(rng.integers(len(colors)))]
      drawing.draw_shape(img, shape, color, y, x, size)
      scene[(r, c)] = (shape, color)
  return img, scene


def big_color(rng, difficulty, height, width):
  """'what color is the big square?' — one large square (+ small distractors at difficulty > 1)."""
  colors = tuple(drawing.COLORS)[:4]
  color = colors[int(rng.integers(len(colors)))]
  img = drawing.blank(height, width)
  size = int(min(height, width) * 0.6)
  top = int(rng.integers(0, height - size + 1))
  left = int(rng.integers(0, width - size + 1))
  drawing.draw_shape(img, "square", color, top, left, size)
  for _ in range(difficulty - 1):
    # Distractors: small circles of other colours, drawn outside the big square when they fit.
    s = max(3, min(height, width) // 8)
    y, x = int(rng.integers(0, height - s + 1)), int(rng.integers(0, width - s + 1))
    if y + s <= top or y >= top + size or x + s <= left or x >= left + size:
      other = [c for c in colors if c != color]
      drawing.draw_shape(img, "circle", other[int(rng.integers(len(other)))], y, x, s)
  return img, "what color is the big square?", color, "exact", ()


def spot_color(rng, difficulty, height, width):
  """'what color is the small square?' — one square covering 2x2 merged vision tokens (56 px on the
  28-px token grid), so on a 168-px image 4 of the 36 vision tokens hold the answer (the regime
  token sparsity is for). Difficulty > 1 adds grey clutter (squares and circles) outside it.
  """
  unit = 28  # one merged vision token (2x2 patches of 14 px)
  colors = tuple(drawing.COLORS)[:4]
  color = colors[int(rng.integers(len(colors)))]
  img = drawing.blank(height, width)
  size = 2 * unit
  if height < size or width < size:
    raise ValueError(f"spot_color: image {height}x{width} is smaller than the {size}-px square")
  top = unit * int(rng.integers(0, (height - size) // unit + 1))
  left = unit * int(rng.integers(0, (width - size) // unit + 1))
  for _ in range((difficulty - 1) * 4):
    s = int(rng.integers(unit // 3, unit + 1))
    y, x = int(rng.integers(0, height - s + 1)), int(rng.integers(0, width - s + 1))
    if y + s <= top or y >= top + size or x + s <= left or x >= left + size:
      mask = drawing.shape_mask(("square", "circle")[int(rng.integers(2))], s)[..., None]
      img[y:y + s, x:x + s] = np.where(mask, np.uint8(drawing.GREY), img[y:y + s, x:x + s])
  drawing.draw_shape(img, "square", color, top, left, size)
  return img, "what color is the small square?", color, "exact", ()


def count_color(rng, difficulty, height, width):
  img, scene = _grid_scene(rng, difficulty, height, width)
  colors = palette(difficulty)
  target = colors[int(rng.integers(len(colors)))]
  n = sum(1 for _, c in scene.values() if c == target)
  return img, f"how many {target} shapes are there?", str(n), "number", ()


def _pick_cell(rng, scene):
  cells = sorted(scene)
  return cells[int(rng.integers(len(cells)))]


def color_at(rng, difficulty, height, width):
  img, scene = _grid_scene(rng, difficulty, height, width)
  r, c = _pick_cell(rng, scene)
  return (img, f"what color is the shape in row {r + 1} column {c + 1}?", scene[(r, c)][1],
          "exact", ())


def shape_at(rng, difficulty, height, width):
  img, scene = _grid_scene(rng, difficulty, height, width)
  r, c = _pick_cell(rng, scene)
  return (img, f"what shape is in row {r + 1} column {c + 1}?", scene[(r, c)][0], "exact", ())


def compare_counts(rng, difficulty, height, width):
  """Which of two colours has more shapes? Resampled until the counts differ (bounded tries)."""
  colors = palette(difficulty)
  for _ in range(64):
    img, scene = _grid_scene(rng, difficulty, height, width, min_objects=1)
    a, b = rng.choice(len(colors), size=2, replace=False)
    ca, cb = colors[int(a)], colors[int(b)]
    na = sum(1 for _, c in scene.values() if c == ca)
    nb = sum(1 for _, c in scene.values() if c == cb)
    if na != nb:
      break
  else:  # pragma: no cover - probability ~0
    raise RuntimeError("compare_counts: could not draw a scene with different counts")
  answer = "A" if na > nb else "B"
  q = f"which color has more shapes? (a) {ca} (b) {cb}"
  return img, q, answer, "choice", (ca, cb)


def digit_boxes(n: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
  """Fixed (top, left, h, w) boxes for ``n`` digits centred in the image."""
  pitch = width // (n + 1)
  w = max(4, int(pitch * 0.7))
  h = min(height - 4, 2 * w)
  top = (height - h) // 2
  start = (width - pitch * n) // 2
  return [(top, start + i * pitch + (pitch - w) // 2, h, w) for i in range(n)]


def read_digits(rng, difficulty, height, width):
  n = difficulty + 1
  if width // (n + 1) < 6 or height < 12:
    raise ValueError(f"read_digits: image {height}x{width} too small for {n} digits")
  digits = "".join(str(int(d)) for d in rng.integers(0, 10, size=n))
  img = drawing.blank(height, width)
  for d, (t, l, h, w) in zip(digits, digit_boxes(n, height, width)):
    drawing.draw_digit(img, d, t, l, h, w)
  return img, "what number is shown?", digits, "exact", ()


GENERATORS: dict[str, Callable] = {
    "big_color": big_color,
    "count_color": count_color,
    "color_at": color_at,
    "shape_at": shape_at,
    "compare_counts": compare_counts,
    "read_digits": read_digits,
    "spot_color": spot_color,
}
# Stable ids feed the RNG key: append new tasks at the end only.
TASKS: tuple[str, ...] = tuple(GENERATORS)
TINY_RUN_TASKS: tuple[str, ...] = ("spot_color",)


def generate_example(task: str, *, seed: int, index: int, difficulty: int = 1,
                     image_size: tuple[int, int] = (56, 56)) -> TaskExample:
  """Deterministic example: a pure function of its arguments (rng keyed by [seed, index, task])."""
  if task not in GENERATORS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if not isinstance(difficulty, int) or not 1 <= difficulty <= 4:
    raise ValueError(f"difficulty must be an int in [1, 4], got {difficulty!r}")
  height, width = (int(v) for v in image_size)
  if height < 28 or width < 28:
    raise ValueError(f"image_size must be at least (28, 28), got {image_size}")
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
  rng = np.random.default_rng([seed, index, TASKS.index(task)])
  img, question, answer, answer_type, choices = GENERATORS[task](rng, difficulty, height, width)
  return TaskExample(uid=f"{task}-s{seed}-d{difficulty}-{height}x{width}-{index}", task=task,
                     image=img, question=question, answer=answer, answer_type=answer_type,
                     choices=tuple(choices), difficulty=difficulty)
