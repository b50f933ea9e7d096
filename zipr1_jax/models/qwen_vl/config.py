"""Frozen configs for Qwen2-VL and Qwen2.5-VL, with Hugging Face conversion and real-size presets.

One codebase serves both families; `family` selects the few places where they differ
(vision blocks: LayerNorm + QuickGELU MLP vs RMSNorm + SwiGLU, window attention and
video temporal scaling in 2.5).

Configs are `@dataclass(frozen=True, kw_only=True)` so they are hashable and can be static jit
arguments. Every field is validated in `__post_init__` with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from zipr1_jax import checks

Family = Literal["qwen2_vl", "qwen2_5_vl"]
FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config field has a value the port does not support."""


def _check(cond: bool, field_name: str, msg: str) -> None:
    checks.require(cond, field_name, msg, error=ConfigError)


_positive = functools.partial(checks.check_positive_ints, error=ConfigError)


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The vision tower (ViT + patch merger).

    `hidden_size` is the ViT width (HF Qwen2-VL calls it `embed_dim`); `out_hidden_size` is the
    merger's output width, i.e. the language model's hidden size.
    """

    family: Family
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    # Qwen2.5-VL only: window attention and video time scaling.
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: int = 2
    norm_eps: float = 1e-6

    def __post_init__(self):
        _check(self.family in FAMILIES, "VisionConfig.family", f"must be one of {FAMILIES}, got {self.family!r}")
        _positive(self, "depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                  "patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels",
                  "window_size", "tokens_per_second")
        _check(self.hidden_size % self.num_heads == 0, "VisionConfig.hidden_size",
               f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check((self.hidden_size // self.num_heads) % 4 == 0, "VisionConfig.num_heads",
               "vision head_dim must be a multiple of 4 (2D rotary over height and width)")
        _check(self.hidden_act in ("quick_gelu", "silu", "gelu", "gelu_pytorch_tanh"),
               "VisionConfig.hidden_act", f"unsupported activation {self.hidden_act!r}")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        for i in self.fullatt_block_indexes:
            _check(0 <= i < self.depth, "VisionConfig.fullatt_block_indexes",
                   f"index {i} outside [0, depth={self.depth})")
        if self.family == "qwen2_5_vl":
            unit = self.patch_size * self.spatial_merge_size
            _check(self.window_size % unit == 0, "VisionConfig.window_size",
                   f"{self.window_size} must be a multiple of patch_size*spatial_merge_size={unit}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features of one flattened patch row of `pixel_values`: C * tp * p * p."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The Qwen2 decoder (GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        _check(self.hidden_size % self.num_attention_heads == 0, "TextConfig.hidden_size",
               f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "TextConfig.num_key_value_heads",
               f"num_attention_heads={self.num_attention_heads} is not a multiple of {self.num_key_value_heads}")
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        _check(len(self.mrope_section) == 3, "TextConfig.mrope_section",
               f"must have 3 entries (temporal, height, width), got {self.mrope_section}")
        _check(sum(self.mrope_section) * 2 == self.head_dim, "TextConfig.mrope_section",
               f"sum {sum(self.mrope_section)} must equal head_dim/2 = {self.head_dim // 2}")
        _check(self.hidden_act == "silu", "TextConfig.hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        _check(self.rope_theta > 0, "TextConfig.rope_theta", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True, kw_only=True)
class QwenVLConfig:
    """A whole Qwen-VL model: vision tower + decoder + special token ids + dtypes."""

    family: Family
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    name: str = "custom"
    extra_hf: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        _check(self.family in FAMILIES, "QwenVLConfig.family", f"must be one of {FAMILIES}, got {self.family!r}")
        _check(self.vision.family == self.family, "QwenVLConfig.vision.family",
               f"{self.vision.family!r} does not match the model family {self.family!r}")
        _check(self.vision.out_hidden_size == self.text.hidden_size, "QwenVLConfig.vision.out_hidden_size",
               f"{self.vision.out_hidden_size} must equal text.hidden_size={self.text.hidden_size}")
        _check(self.dtype in DTYPES, "QwenVLConfig.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.param_dtype in DTYPES, "QwenVLConfig.param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            tid = getattr(self, name)
            _check(0 <= tid < self.text.vocab_size, f"QwenVLConfig.{name}",
                   f"{tid} is outside the vocabulary [0, {self.text.vocab_size})")

    def replace(self, **changes) -> "QwenVLConfig":
        return dataclasses.replace(self, **changes)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_config(cls, hf: Any, *, dtype: str = "float32", param_dtype: str = "float32",
                       name: str = "hf") -> "QwenVLConfig":
        """Build from a transformers config object, a config.json dict, or a path to one.

        Accepts both the hub's flat layout (text fields at the top level, `rope_scaling`) and
        transformers 5's nested `text_config`. Raises ConfigError naming any unsupported field.
        """
        if isinstance(hf, (str, os.PathLike)):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            with open(path) as f:
                hf = json.load(f)
        if not isinstance(hf, dict):
            hf = hf.to_dict()
        model_type = hf.get("model_type")
        _check(model_type in FAMILIES, "config.json model_type",
               f"{model_type!r} is not supported (expected one of {FAMILIES})")
        family: Family = model_type  # type: ignore[assignment]
        text = dict(hf)
        text.update(hf.get("text_config") or {})
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        if text.get("use_sliding_window"):
            raise ConfigError("text.use_sliding_window: sliding-window attention is not supported by this port")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _check(rope_type in ("default", "mrope"), "text.rope_parameters.rope_type",
               f"{rope_type!r} is not supported (only default M-RoPE)")
        _check("mrope_section" in rope, "text.rope_parameters.mrope_section", "missing")
        tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        text_cfg = TextConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            mrope_section=tuple(rope["mrope_section"]),
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            hidden_act=text.get("hidden_act", "silu"), tie_word_embeddings=tie)
        v = dict(hf.get("vision_config") or {})
        if family == "qwen2_vl":
            embed_dim = v.get("embed_dim", 1280)
            vis = VisionConfig(
                family=family, depth=v.get("depth", 32), hidden_size=embed_dim,
                num_heads=v.get("num_heads", 16), intermediate_size=int(embed_dim * v.get("mlp_ratio", 4)),
                out_hidden_size=v.get("hidden_size", text_cfg.hidden_size),
                patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
                hidden_act=v.get("hidden_act", "quick_gelu"))
        else:
            vis = VisionConfig(
                family=family, depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 1280),
                num_heads=v.get("num_heads", 16), intermediate_size=v.get("intermediate_size", 3420),
                out_hidden_size=v.get("out_hidden_size", text_cfg.hidden_size),
                patch_size=v.get("patch_size", 14), temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2), in_channels=v.get("in_channels", 3),
                hidden_act=v.get("hidden_act", "silu"), window_size=v.get("window_size", 112),
                fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
                tokens_per_second=v.get("tokens_per_second", 2))
        eos = hf.get("eos_token_id", text.get("eos_token_id"))
        return cls(
            family=family, text=text_cfg, vision=vis,
            image_token_id=hf.get("image_token_id", 151655), video_token_id=hf.get("video_token_id", 151656),
            vision_start_token_id=hf.get("vision_start_token_id", 151652),
            vision_end_token_id=hf.get("vision_end_token_id", 151653),
            bos_token_id=hf.get("bos_token_id", text.get("bos_token_id")),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id", text.get("pad_token_id")),
            dtype=dtype, param_dtype=param_dtype, name=name)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict in transformers 5's nested layout (loads with `from_pretrained`)."""
        t, v = self.text, self.vision
        hf_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[self.param_dtype]
        text_config = {
            "model_type": f"{self.family}_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings, "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                "mrope_section": list(t.mrope_section)},
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id, "dtype": hf_dtype,
        }
        if self.family == "qwen2_vl":
            vision_config = {
                "model_type": "qwen2_vl_vision", "depth": v.depth, "embed_dim": v.hidden_size,
                "hidden_size": v.out_hidden_size, "num_heads": v.num_heads,
                "mlp_ratio": (v.intermediate_size // v.hidden_size if v.intermediate_size % v.hidden_size == 0
                              else v.intermediate_size / v.hidden_size), "hidden_act": v.hidden_act,
            }
        else:
            vision_config = {
                "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
                "out_hidden_size": v.out_hidden_size, "num_heads": v.num_heads,
                "intermediate_size": v.intermediate_size, "hidden_act": v.hidden_act,
                "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
            }
        vision_config.update({"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                              "spatial_merge_size": v.spatial_merge_size, "in_channels": v.in_channels})
        arch = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[self.family]
        out = {
            "architectures": [arch], "model_type": self.family, "text_config": text_config,
            "vision_config": vision_config, "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id, "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": hf_dtype,
        }
        out.update(dict(self.extra_hf))
        return out


# ---------------------------------------------------------------------- presets
def _qwen2_vl(name: str, *, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int,
              tie: bool, **kw) -> QwenVLConfig:
    text = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)
    vision = VisionConfig(family="qwen2_vl", depth=32, hidden_size=1280, num_heads=16, intermediate_size=5120,
                          out_hidden_size=hidden, hidden_act="quick_gelu")
    return QwenVLConfig(family="qwen2_vl", text=text, vision=vision, name=name, **kw)


def _qwen2_5_vl(name: str, *, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int,
                tie: bool, vis_inter: int, **kw) -> QwenVLConfig:
    text = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
                      max_position_embeddings=128000)
    vision = VisionConfig(family="qwen2_5_vl", depth=32, hidden_size=1280, num_heads=16,
                          intermediate_size=vis_inter, out_hidden_size=hidden, hidden_act="silu",
                          window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)
    return QwenVLConfig(family="qwen2_5_vl", text=text, vision=vision, name=name, **kw)


def qwen2_vl_2b(**kw) -> QwenVLConfig:
    return _qwen2_vl("qwen2_vl_2b", hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936, tie=True, **kw)


def qwen2_vl_7b(**kw) -> QwenVLConfig:
    return _qwen2_vl("qwen2_vl_7b", hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064, tie=False, **kw)


def qwen2_vl_72b(**kw) -> QwenVLConfig:
    return _qwen2_vl("qwen2_vl_72b", hidden=8192, inter=29568, layers=80, heads=64, kv=8, vocab=152064, tie=False, **kw)


def qwen2_5_vl_3b(**kw) -> QwenVLConfig:
    return _qwen2_5_vl("qwen2_5_vl_3b", hidden=2048, inter=11008, layers=36, heads=16, kv=2, vocab=151936,
                       tie=True, vis_inter=3420, **kw)


def qwen2_5_vl_7b(**kw) -> QwenVLConfig:
    return _qwen2_5_vl("qwen2_5_vl_7b", hidden=3584, inter=18944, layers=28, heads=28, kv=4, vocab=152064,
                       tie=False, vis_inter=3420, **kw)


def qwen2_5_vl_32b(**kw) -> QwenVLConfig:
    return _qwen2_5_vl("qwen2_5_vl_32b", hidden=5120, inter=27648, layers=64, heads=40, kv=8, vocab=152064,
                       tie=False, vis_inter=3456, **kw)


def qwen2_5_vl_72b(**kw) -> QwenVLConfig:
    return _qwen2_5_vl("qwen2_5_vl_72b", hidden=8192, inter=29568, layers=80, heads=64, kv=8, vocab=152064,
                       tie=False, vis_inter=3456, **kw)


# Tiny presets for tests and the default CPU run. Dimensions include primes (vocab, mlp) to catch
# transposes; heads are 4 query / 2 kv so GQA is exercised; head_dim 16 -> mrope_section sums to 8.
TINY_SPECIAL_IDS = dict(image_token_id=251, video_token_id=252, vision_start_token_id=253,
                        vision_end_token_id=254, bos_token_id=255, eos_token_id=256, pad_token_id=257)


def tiny_qwen2_vl(*, vocab_size: int = 263, layers: int = 2, tie: bool = False, **kw) -> QwenVLConfig:
    ids = {**TINY_SPECIAL_IDS, **{k: kw.pop(k) for k in list(kw) if k in TINY_SPECIAL_IDS}}
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=131, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                      tie_word_embeddings=tie, max_position_embeddings=4096)
    vision = VisionConfig(family="qwen2_vl", depth=2, hidden_size=32, num_heads=2, intermediate_size=128,
                          out_hidden_size=64, hidden_act="quick_gelu")
    return QwenVLConfig(family="qwen2_vl", text=text, vision=vision, name="tiny_qwen2_vl", **ids, **kw)


def tiny_qwen2_vl_demo(*, layers: int = 4, **kw) -> QwenVLConfig:
    """The embedded default run's model: `tiny_qwen2_vl` with 4 decoder layers (deep enough that
    its attention can concentrate; the 2-layer model's stays near uniform)."""
    return dataclasses.replace(tiny_qwen2_vl(layers=layers, **kw), name="tiny_qwen2_vl_demo")


def tiny_qwen2_5_vl(*, vocab_size: int = 263, layers: int = 2, tie: bool = False, **kw) -> QwenVLConfig:
    ids = {**TINY_SPECIAL_IDS, **{k: kw.pop(k) for k in list(kw) if k in TINY_SPECIAL_IDS}}
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=131, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                      tie_word_embeddings=tie, max_position_embeddings=4096)
    # window_size 56 = 2 merged units of 28 px: small images already split into several windows.
    vision = VisionConfig(family="qwen2_5_vl", depth=3, hidden_size=32, num_heads=2, intermediate_size=43,
                          out_hidden_size=64, hidden_act="silu", window_size=56, fullatt_block_indexes=(1,),
                          tokens_per_second=2)
    return QwenVLConfig(family="qwen2_5_vl", text=text, vision=vision, name="tiny_qwen2_5_vl", **ids, **kw)


PRESETS = {
    "qwen2_vl_2b": qwen2_vl_2b, "qwen2_vl_7b": qwen2_vl_7b, "qwen2_vl_72b": qwen2_vl_72b,
    "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b, "qwen2_5_vl_32b": qwen2_5_vl_32b,
    "qwen2_5_vl_72b": qwen2_5_vl_72b, "tiny_qwen2_vl": tiny_qwen2_vl, "tiny_qwen2_5_vl": tiny_qwen2_5_vl,
    "tiny_qwen2_vl_demo": tiny_qwen2_vl_demo,
}
REAL_PRESETS = tuple(k for k in PRESETS if not k.startswith("tiny"))


def preset(name: str, **kw) -> QwenVLConfig:
    """Look up a preset by name, e.g. `preset("qwen2_5_vl_7b", dtype="bfloat16")`."""
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kw)
