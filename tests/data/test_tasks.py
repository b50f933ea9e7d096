"""Built-in tasks: determinism, validity, and answers recomputed from the pixels."""

import numpy as np
import pytest

from zipr1_jax.data import verifiers
from zipr1_jax.data.tasks import (TASKS, TINY_RUN_TASKS, BuiltinTaskSource, TaskExample,
                                  generate_example)
from zipr1_jax.data.tasks import drawing, generators

SIZES = [(56, 56), (84, 112)]


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_valid(task):
  for d in (1, 2, 3, 4):
    for size in SIZES:
      a = generate_example(task, seed=3, index=5, difficulty=d, image_size=size)
      b = generate_example(task, seed=3, index=5, difficulty=d, image_size=size)
      assert a.image.tobytes() == b.image.tobytes() and a.answer == b.answer
      assert a.question == b.question and a.uid == b.uid
      assert a.image.dtype == np.uint8 and a.image.shape == (*size, 3)
      assert a.answer_type in ("exact", "choice", "number") and a.difficulty == d
      assert a.question.isascii() and a.answer.isascii() and 0 < len(a.answer) <= 8
      # The reference answer passes its own verifier; a wrong one fails.
      assert verifiers.verify(f"<answer>{a.answer}</answer>", a.answer, a.answer_type,
                              choices=a.choices)
      assert not verifiers.verify("<answer>zzz</answer>", a.answer, a.answer_type,
                                  choices=a.choices)


@pytest.mark.parametrize("task", TASKS)
def test_indices_and_seeds_differ(task):
  # spot_color's 56-px square fills a 56-px image (one position, only the colour varies): use 168 px.
  size = (168, 168) if task == "spot_color" else (56, 56)
  imgs = {generate_example(task, seed=0, index=i, image_size=size).image.tobytes() for i in range(8)}
  assert len(imgs) >= 6
  a = generate_example(task, seed=0, index=0).image
  b = generate_example(task, seed=1, index=0).image
  c = generate_example(task, seed=0, index=0, image_size=(84, 84)).image
  assert a.tobytes() != b.tobytes() and c.shape == (84, 84, 3)


def _cell_colors(img, g):
  """Recovers {(row, col): colour} from the pixels of each grid cell."""
  h, w, _ = img.shape
  out = {}
  for r in range(g):
    for c in range(g):
      top, left, ch, cw = generators.cell_box(r, c, g, h, w)
      px = img[top:top + ch, left:left + cw].reshape(-1, 3)
      px = px[(px != drawing.BACKGROUND).any(-1)]
      if len(px):
        names = {n for n, rgb in drawing.COLORS.items() if (px == rgb).all(-1).any()}
        assert len(names) == 1, (r, c, names)
        out[(r, c)] = names.pop()
  return out


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_grid_answers_recomputed_from_pixels(difficulty):
  g = generators.grid_size(difficulty)
  for i in range(10):
    ex = generate_example("count_color", seed=1, index=i, difficulty=difficulty)
    color = ex.question.split()[2]
    assert int(ex.answer) == sum(v == color for v in _cell_colors(ex.image, g).values())
    ex = generate_example("color_at", seed=1, index=i, difficulty=difficulty)
    words = ex.question.rstrip("?").split()
    r, c = int(words[-3]) - 1, int(words[-1]) - 1
    assert _cell_colors(ex.image, g)[(r, c)] == ex.answer
    ex = generate_example("compare_counts", seed=1, index=i, difficulty=difficulty)
    counts = list(_cell_colors(ex.image, g).values())
    na, nb = (counts.count(ch) for ch in ex.choices)
    assert na != nb and ex.answer == ("A" if na > nb else "B")
    ex = generate_example("shape_at", seed=1, index=i, difficulty=difficulty)
    words = ex.question.rstrip("?").split()
    r, c = int(words[-3]) - 1, int(words[-1]) - 1
    top, left, ch, cw = generators.cell_box(r, c, g, *ex.image.shape[:2])
    found = (ex.image[top:top + ch, left:left + cw] != drawing.BACKGROUND).any(-1)
    ys, xs = np.nonzero(found)
    # Every shape spans its full box width and touches its box bottom (a triangle's apex row
    # may be empty), so width and bottom row locate the box; the named shape must redraw it.
    size = xs.max() - xs.min() + 1
    y0, x0 = ys.max() - size + 1, xs.min()
    redrawn = np.zeros((ch, cw), bool)
    redrawn[y0:y0 + size, x0:x0 + size] = drawing.shape_mask(ex.answer, size)
    assert (found == redrawn).all(), (i, ex.answer)
    others = [s for s in drawing.SHAPES if s != ex.answer]
    assert all((drawing.shape_mask(o, size) != redrawn[y0:y0 + size, x0:x0 + size]).any()
               for o in others)


def test_big_color_and_digits_from_pixels():
  for i in range(10):
    ex = generate_example("big_color", seed=2, index=i)
    px = ex.image.reshape(-1, 3)
    assert (px == drawing.COLORS[ex.answer]).all(-1).sum() >= int(56 * 0.6) ** 2
    ex = generate_example("read_digits", seed=2, index=i, difficulty=2)
    h, w, _ = ex.image.shape
    redrawn = drawing.blank(h, w)
    for d, box in zip(ex.answer, generators.digit_boxes(len(ex.answer), h, w)):
      drawing.draw_digit(redrawn, d, *box)
    assert np.array_equal(redrawn, ex.image) and ex.answer.isdigit()


def test_difficulty_scales_content():
  assert [len(generate_example("read_digits", seed=0, index=0, difficulty=d).answer)
          for d in (1, 2, 3, 4)] == [2, 3, 4, 5]
  mean_objects = []
  for d in (1, 3):
    g = generators.grid_size(d)
    mean_objects.append(np.mean([len(_cell_colors(
        generate_example("color_at", seed=0, index=i, difficulty=d).image, g))
        for i in range(10)]))
  assert mean_objects[1] > 2 * mean_objects[0]


def test_source():
  src = BuiltinTaskSource(12, seed=4, difficulty=2, image_size=(56, 84))
  assert len(src) == 12 and src.tasks == TASKS
  item = src[7]
  assert set(item) == {"uid", "task", "image", "question", "answer", "answer_type", "choices",
                       "difficulty"}
  assert item["task"] == TASKS[7 % len(TASKS)] and item["image"].shape == (56, 84, 3)
  ex = generate_example(item["task"], seed=4, index=7, difficulty=2, image_size=(56, 84))
  assert item["image"].tobytes() == ex.image.tobytes() and item["answer"] == ex.answer
  assert src[-1]["uid"] == src[11]["uid"]
  assert len({src[i]["uid"] for i in range(12)}) == 12
  with pytest.raises(IndexError):
    src[12]
  assert BuiltinTaskSource(3, tasks=TINY_RUN_TASKS)[2]["task"] == "spot_color"


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown task"):
    generate_example("nope", seed=0, index=0)
  with pytest.raises(ValueError, match="difficulty"):
    generate_example("count_color", seed=0, index=0, difficulty=0)
  with pytest.raises(ValueError, match="image_size"):
    generate_example("count_color", seed=0, index=0, image_size=(10, 56))
  with pytest.raises(ValueError, match="too small"):
    generate_example("count_color", seed=0, index=0, difficulty=4, image_size=(28, 28))
  with pytest.raises(ValueError, match="num_examples"):
    BuiltinTaskSource(0)
  with pytest.raises(ValueError, match="unknown task"):
    BuiltinTaskSource(2, tasks=("x",))
  with pytest.raises(ValueError, match="answer_type"):
    TaskExample(uid="u", task="t", image=np.zeros((2, 2, 3), np.uint8), question="q",
                answer="a", answer_type="bad")
  with pytest.raises(ValueError, match="image"):
    TaskExample(uid="u", task="t", image=np.zeros((2, 2), np.uint8), question="q",
                answer="a", answer_type="exact")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_spot_color_answer_lives_in_four_vision_tokens(difficulty):
  """The coloured square covers exactly 2x2 merged 28-px tokens; clutter is grey and outside it."""
  for i in range(20):
    ex = generate_example("spot_color", seed=1, index=i, difficulty=difficulty, image_size=(168, 168))
    img = ex.image
    colored = (img != drawing.BACKGROUND).any(-1) & (img != drawing.GREY).any(-1)
    names = {n for n, rgb in drawing.COLORS.items() if (img[colored] == rgb).all(-1).any()}
    assert names == {ex.answer}
    tokens = colored.reshape(6, 28, 6, 28).any(axis=(1, 3))
    assert tokens.sum() == 4 and colored.reshape(6, 28, 6, 28).all(axis=(1, 3)).sum() == 4
    grey = (img == drawing.GREY).all(-1)
    assert (difficulty == 1) == (not grey.any())
