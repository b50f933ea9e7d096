"""Checkpoints: Orbax save / restore of training state into any mesh's shardings."""

from zipr1_jax.checkpoint.orbax import (CheckpointError, Checkpointer, check_writable, params_dir, restore_params,
                                        save_params, to_canonical)

__all__ = ["CheckpointError", "Checkpointer", "check_writable", "params_dir", "restore_params", "save_params", "to_canonical"]
