"""YAML + dotted command-line overrides -> `TrainConfig` (OmegaConf does the parsing and merging).

    python scripts/train.py                                 # the embedded default (TrainConfig())
    python scripts/train.py --config configs/qwen2_5_vl_7b_tpu_v5e.yaml model.hf_dir=/ckpt/qwen
    python scripts/train.py rl.steps=5 mesh.fsdp=2 sparsity.p_grid=[0.95,0.97]

Precedence: dataclass defaults < YAML < overrides. Unknown keys (in the YAML or an override) raise
`TrainConfigError` naming the dotted key and the closest valid names; bad values raise the config's
own field errors. We use OmegaConf only as a parser/merger (not `OmegaConf.structured`), because the
schema's unions and tuples are validated by the dataclasses themselves.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from zipr1_jax.train.config import SECTIONS, TrainConfig, TrainConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(key: str, where: str, valid: Sequence[str]) -> TrainConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return TrainConfigError(f"unknown config key {key!r}{hint} (valid keys of {where or 'the root'}: {sorted(valid)})")


def _build(cls, values: Mapping[str, Any], prefix: str):
    """Instantiate dataclass `cls` from a plain dict, recursing into section dataclasses."""
    if not isinstance(values, Mapping):
        raise TrainConfigError(f"{prefix or 'config'}: must be a mapping of keys, got {values!r}")
    names = _field_names(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise _unknown(dotted, prefix, names)
        sub = SECTIONS.get(key) if cls is TrainConfig else None
        if sub is not None:
            kwargs[key] = _build(sub, value if value is not None else {}, dotted)
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # should not happen after the key check; keep the message useful
        raise TrainConfigError(f"{prefix or 'config'}: {e}") from e


def config_from_dict(values: Mapping[str, Any] | None) -> TrainConfig:
    """TrainConfig from a nested plain dict (missing keys keep their defaults)."""
    return _build(TrainConfig, dict(values or {}), "")


def _check_override(item: str) -> None:
    if "=" not in item or item.startswith("="):
        raise TrainConfigError(f"override {item!r} must look like section.key=value (e.g. rl.steps=5)")
    key = item.split("=", 1)[0].lstrip("+")
    parts = key.split(".")
    cls, prefix = TrainConfig, ""
    for i, part in enumerate(parts):
        names = _field_names(cls)
        dotted = ".".join(parts[: i + 1])
        if part not in names:
            raise _unknown(dotted, prefix, names)
        sub = SECTIONS.get(part) if cls is TrainConfig else None
        if sub is None:
            if i != len(parts) - 1:
                raise TrainConfigError(f"override {item!r}: {dotted!r} is a value, not a section")
            return
        cls, prefix = sub, dotted
    raise TrainConfigError(f"override {item!r} sets a whole section; set its fields ({key}.<field>=...)")


def load_config(config_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML file (or the embedded default when None) and apply dotted overrides."""
    merged = OmegaConf.create({})
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise TrainConfigError(f"config file {str(config_path)!r} does not exist")
        try:
            merged = OmegaConf.load(config_path)
        except (OmegaConfBaseException, Exception) as e:  # yaml errors come through as various types
            raise TrainConfigError(f"cannot parse config file {str(config_path)!r}: {e}") from e
        if not isinstance(OmegaConf.to_container(merged), dict):
            raise TrainConfigError(f"config file {str(config_path)!r} must hold a mapping at the top level")
    overrides = list(overrides)
    for item in overrides:
        _check_override(item)
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        except OmegaConfBaseException as e:
            raise TrainConfigError(f"cannot apply overrides {overrides}: {e}") from e
    try:
        values = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise TrainConfigError(f"cannot resolve config: {e}") from e
    where = f" (from {config_path})" if config_path else ""
    try:
        return config_from_dict(values)
    except TrainConfigError as e:
        raise TrainConfigError(f"{e}{where}") from None


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """`[--config path.yaml] [section.key=value ...]` -> TrainConfig (no args: the default run)."""
    parser = argparse.ArgumentParser(
        prog="train.py", description="ZipR1 token-sparsity GRPO for Qwen-VL (SFT warm-up, then RL).",
        epilog="Overrides: dotted keys, e.g. rl.steps=5 mesh.fsdp=2 model.hf_dir=/path/to/Qwen2.5-VL-7B")
    parser.add_argument("--config", default=None, help="YAML under configs/ (default: the embedded tiny CPU run)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def shipped_configs() -> list[str]:
    """Paths of every YAML under configs/ (for tests and --help listings)."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(os.path.join(CONFIG_DIR, f) for f in os.listdir(CONFIG_DIR) if f.endswith((".yaml", ".yml")))


def to_yaml(config: TrainConfig) -> str:
    """The config as YAML (written next to checkpoints and metrics)."""
    if not is_dataclass(config):
        raise TypeError(f"to_yaml expects a TrainConfig, got {type(config).__name__}")
    return OmegaConf.to_yaml(OmegaConf.create(config.to_dict()))
