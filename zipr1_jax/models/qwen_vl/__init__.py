"""Qwen2-VL / Qwen2.5-VL in Flax NNX with Hugging Face parity.

Public API:
  config:    QwenVLConfig, TextConfig, VisionConfig, ConfigError, preset, PRESETS, REAL_PRESETS
  model:     QwenVLForConditionalGeneration (forward, prefill, decode_step), ModelOutput
  cache:     KVCache
  rope:      get_rope_index (host NumPy, transformers-exact), mrope_cos_sin, apply_rotary
  text:      dense_attention (the attention core the sparse path replaces), DecoderLayer
  loader:    from_pretrained, load_hf_checkpoint, from_hf_state_dict, hf_state_dict, abstract_model, CheckpointError
  hf_params: KEY_TABLES (declarative HF <-> Flax key table per family)
"""

from zipr1_jax.models.qwen_vl.cache import KVCache
from zipr1_jax.models.qwen_vl.config import (PRESETS, REAL_PRESETS, ConfigError, QwenVLConfig, TextConfig,
                                             VisionConfig, preset)
from zipr1_jax.models.qwen_vl.hf_params import KEY_TABLES
from zipr1_jax.models.qwen_vl.loader import (CheckpointError, abstract_model, from_hf_state_dict, from_pretrained,
                                             hf_state_dict, load_hf_checkpoint)
from zipr1_jax.models.qwen_vl.model import ModelOutput, QwenVLForConditionalGeneration
from zipr1_jax.models.qwen_vl.rope import apply_rotary, get_rope_index, mrope_cos_sin
from zipr1_jax.models.qwen_vl.text import DecoderLayer, dense_attention

__all__ = [
    "PRESETS", "REAL_PRESETS", "KEY_TABLES", "CheckpointError", "ConfigError", "DecoderLayer", "KVCache",
    "ModelOutput", "QwenVLConfig", "QwenVLForConditionalGeneration", "TextConfig", "VisionConfig", "abstract_model",
    "apply_rotary", "dense_attention", "from_hf_state_dict", "from_pretrained", "get_rope_index", "hf_state_dict",
    "load_hf_checkpoint", "mrope_cos_sin", "preset",
]
