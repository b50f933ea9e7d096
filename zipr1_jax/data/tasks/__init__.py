"""Built-in procedurally generated verifiable visual tasks (deterministic from a seed)."""

from zipr1_jax.data.tasks.generators import (TASKS, TINY_RUN_TASKS, TaskExample,
                                             generate_example)
from zipr1_jax.data.tasks.source import BuiltinTaskSource

__all__ = ["TASKS", "TINY_RUN_TASKS", "TaskExample", "generate_example", "BuiltinTaskSource"]
