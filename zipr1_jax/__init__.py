"""zipr1_jax: ZipR1 token-sparsity RL post-training for Qwen2-VL / Qwen2.5-VL in JAX/Flax.

The public API, importable from the package itself (README "Python API"):

  from_pretrained(hf_dir)          a Hugging Face Qwen-VL directory -> QwenVLForConditionalGeneration;
                                   model(ids, attention_mask=...), model.sparse_forward(...),
                                   model.sparse_prefill(...)
  load_hf_checkpoint(hf_dir)       the same as (config, model)
  load_tokenizer(dir)              the directory's tokenizer (transformers)
  generate(model, ids, mask, rng, config=SamplingConfig(...), p_B=None)
                                   sampling; p_B gives per-row top-p sparse prefill thresholds
  SparsityConfig, SelectionConfig  how sparse attention selects keys
  convert_hf_to_orbax, export_hf   HF directory -> Orbax, trained checkpoint -> HF directory
  TrainConfig, load_config, run    the training job (`run(cfg)` is what scripts/train.py runs)

Names load on first use, so `import zipr1_jax` stays cheap and starts no JAX backend.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "from_pretrained": "zipr1_jax.models.qwen_vl.loader",
    "load_hf_checkpoint": "zipr1_jax.models.qwen_vl.loader",
    "QwenVLForConditionalGeneration": "zipr1_jax.models.qwen_vl.model",
    "QwenVLConfig": "zipr1_jax.models.qwen_vl.config",
    "load_tokenizer": "zipr1_jax.data.tokenizer",
    "generate": "zipr1_jax.rl.rollout",
    "SamplingConfig": "zipr1_jax.rl.rollout",
    "SparsityConfig": "zipr1_jax.kernels.sparse_attention",
    "SelectionConfig": "zipr1_jax.kernels.sparse_attention",
    "convert_hf_to_orbax": "zipr1_jax.convert",
    "export_hf": "zipr1_jax.convert",
    "TrainConfig": "zipr1_jax.train.config",
    "load_config": "zipr1_jax.train.cli",
    "run": "zipr1_jax.train.trainer",  # not "train": that is the subpackage's name
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zipr1_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
