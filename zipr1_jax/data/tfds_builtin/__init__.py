"""tfds builder of the built-in tasks (in its own package: tfds locates a builder by its module)."""

from zipr1_jax.data.tfds_builtin.builtin_tasks import BuiltinTasks, BuiltinTasksConfig, prepare_builtin_tasks

__all__ = ["BuiltinTasks", "BuiltinTasksConfig", "prepare_builtin_tasks"]
