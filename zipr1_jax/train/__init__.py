"""The ZipR1 trainer: run config (config.py), YAML/CLI loading (cli.py), metrics (metrics.py), plots."""

from zipr1_jax.train.config import (
    CheckpointSection, DataSection, EvalSection, LogSection, MeshSection, ModelSection, RLSection,
    SFTSection, SparsitySection, TrainConfig, TrainConfigError,
)
from zipr1_jax.train.cli import config_from_dict, load_config, parse_args, to_yaml

__all__ = [
    "CheckpointSection", "DataSection", "EvalSection", "LogSection", "MeshSection", "ModelSection",
    "RLSection", "SFTSection", "SparsitySection", "TrainConfig", "TrainConfigError",
    "config_from_dict", "load_config", "parse_args", "to_yaml",
]
