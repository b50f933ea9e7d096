"""Random-access source of built-in task examples (grain ``RandomAccessDataSource`` protocol)."""

from __future__ import annotations

from typing import Sequence

from zipr1_jax.data.tasks.generators import TASKS, generate_example


class BuiltinTaskSource:
  """``num_examples`` examples; item i uses task ``tasks[i % len(tasks)]`` and index ``i``.

  Items are dicts {uid, task, image, question, answer, answer_type, choices, difficulty},
  regenerated on access (deterministic), so the source is cheap to pickle for grain workers.
  """

  def __init__(self, num_examples: int, *, tasks: Sequence[str] = TASKS, seed: int = 0,
               difficulty: int = 1, image_size: tuple[int, int] = (56, 56)):
    if not isinstance(num_examples, int) or num_examples <= 0:
      raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    tasks = tuple(tasks)
    if not tasks:
      raise ValueError("tasks must name at least one task")
    for t in tasks:
      if t not in TASKS:
        raise ValueError(f"unknown task {t!r}; expected one of {TASKS}")
    self.num_examples = num_examples
    self.tasks = tasks
    self.seed = seed
    self.difficulty = difficulty
    self.image_size = tuple(image_size)
    # Fail fast on bad difficulty / size rather than at the first __getitem__.
    generate_example(tasks[0], seed=seed, index=0, difficulty=difficulty,
                     image_size=self.image_size)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not -self.num_examples <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    index %= self.num_examples
    ex = generate_example(self.tasks[index % len(self.tasks)], seed=self.seed, index=index,
                          difficulty=self.difficulty, image_size=self.image_size)
    return ex.to_dict()

  def __repr__(self) -> str:
    return (f"BuiltinTaskSource(num_examples={self.num_examples}, tasks={self.tasks}, "
            f"seed={self.seed}, difficulty={self.difficulty}, image_size={self.image_size})")
