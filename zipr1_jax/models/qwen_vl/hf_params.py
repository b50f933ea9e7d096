"""Declarative Hugging Face <-> Flax parameter key table, one per family, used in both directions.

A rule pairs an HF key template with our NNX path template and a transform. Templates use named
fields (`{i}` layer / block index, `{proj}` ...); each field has a regex, so a template compiles to
a matcher for import and formats back for export.

HF keys come in two layouts; both are reduced to the hub / `save_pretrained` layout (`visual.*`,
`model.embed_tokens`, `model.layers.N.*`, `model.norm`, `lm_head.weight`) before matching, and
export emits that layout:
  transformers 5 in-memory:  model.visual.X -> visual.X,  model.language_model.X -> model.X
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from zipr1_jax.models.qwen_vl.config import QwenVLConfig

# --------------------------------------------------------------------------- transforms
# A transform maps the HF tensor to our layout (`to_ours`) and back (`to_hf`, given the HF shape).


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_ours: Callable  # (x) -> x
    to_hf: Callable  # (x, hf_shape) -> x
    ours_shape: Callable  # hf_shape -> our shape


IDENTITY = Transform("identity", lambda x: x, lambda x, s: x, lambda s: tuple(s))
# torch Linear weight [out, in] -> kernel [in, out].
LINEAR = Transform("linear", lambda x: x.T, lambda x, s: x.T, lambda s: (s[1], s[0]))
# Conv3d weight [D, C, tp, p, p] with stride == kernel is a Linear over flattened patches
# (C, tp, p, p row-major, matching `pixel_values` rows): kernel [C*tp*p*p, D].
CONV3D = Transform("conv3d", lambda x: x.reshape(x.shape[0], -1).T, lambda x, s: x.T.reshape(s),
                   lambda s: (int(np.prod(s[1:])), s[0]))


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # template over hub-layout keys, e.g. "model.layers.{i}.{proj}.weight"
    ours: str  # template over our dotted NNX paths
    transform: Transform = IDENTITY
    fields: tuple[tuple[str, str], ...] = (("i", r"\d+"),)

    def _regex(self, template: str) -> re.Pattern:
        pattern, pos = "", 0
        for m in re.finditer(r"\{(\w+)\}", template):
            pattern += re.escape(template[pos:m.start()]) + f"(?P<{m.group(1)}>{dict(self.fields)[m.group(1)]})"
            pos = m.end()
        return re.compile(pattern + re.escape(template[pos:]) + r"\Z")

    def match_hf(self, key: str) -> str | None:
        m = self._regex(self.hf).match(key)
        return None if m is None else self.ours.format(**m.groupdict())

    def match_ours(self, path: str) -> str | None:
        m = self._regex(self.ours).match(path)
        return None if m is None else self.hf.format(**m.groupdict())


_LIN_TEXT = r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
TEXT_RULES = (
    Rule("model.embed_tokens.weight", "embed_tokens.embedding"),
    Rule("model.layers.{i}.{proj}.weight", "layers.{i}.{proj}.kernel", LINEAR,
         (("i", r"\d+"), ("proj", _LIN_TEXT))),
    Rule("model.layers.{i}.self_attn.{proj}.bias", "layers.{i}.self_attn.{proj}.bias", IDENTITY,
         (("i", r"\d+"), ("proj", r"[qkv]_proj"))),
    Rule("model.layers.{i}.{norm}.weight", "layers.{i}.{norm}.scale", IDENTITY,
         (("i", r"\d+"), ("norm", r"input_layernorm|post_attention_layernorm"))),
    Rule("model.norm.weight", "norm.scale"),
    Rule("lm_head.weight", "lm_head.kernel", LINEAR),
)


def _vision_rules(mlp: str, norm_bias: bool) -> tuple[Rule, ...]:
    lin = (("i", r"\d+"), ("proj", r"attn\.qkv|attn\.proj|" + mlp))
    rules = [
        Rule("visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", CONV3D),
        Rule("visual.blocks.{i}.{proj}.weight", "visual.blocks.{i}.{proj}.kernel", LINEAR, lin),
        Rule("visual.blocks.{i}.{proj}.bias", "visual.blocks.{i}.{proj}.bias", IDENTITY, lin),
        Rule("visual.blocks.{i}.{norm}.weight", "visual.blocks.{i}.{norm}.scale", IDENTITY,
             (("i", r"\d+"), ("norm", r"norm[12]"))),
        Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.scale"),
        Rule("visual.merger.mlp.{j}.weight", "visual.merger.mlp_{j}.kernel", LINEAR, (("j", r"[02]"),)),
        Rule("visual.merger.mlp.{j}.bias", "visual.merger.mlp_{j}.bias", IDENTITY, (("j", r"[02]"),)),
    ]
    if norm_bias:  # Qwen2-VL uses LayerNorm (weight + bias); Qwen2.5-VL uses RMSNorm.
        rules += [Rule("visual.blocks.{i}.{norm}.bias", "visual.blocks.{i}.{norm}.bias", IDENTITY,
                       (("i", r"\d+"), ("norm", r"norm[12]"))),
                  Rule("visual.merger.ln_q.bias", "visual.merger.ln_q.bias")]
    return tuple(rules)


KEY_TABLES: dict[str, tuple[Rule, ...]] = {
    "qwen2_vl": TEXT_RULES + _vision_rules(r"mlp\.fc1|mlp\.fc2", norm_bias=True),
    "qwen2_5_vl": TEXT_RULES + _vision_rules(r"mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj", norm_bias=False),
}

_LAYOUT_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_hf_key(key: str) -> str:
    """Reduce a transformers-5 in-memory key to the hub layout (hub keys pass through)."""
    for src, dst in _LAYOUT_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def hf_to_ours(config: QwenVLConfig, key: str) -> tuple[str, Transform] | None:
    """Our dotted path and transform for an HF key (either layout), or None if no rule matches."""
    canon = canonical_hf_key(key)
    for rule in KEY_TABLES[config.family]:
        path = rule.match_hf(canon)
        if path is not None:
            return path, rule.transform
    return None


def ours_to_hf(config: QwenVLConfig, path: str) -> tuple[str, Transform] | None:
    """The hub-layout HF key and transform for one of our dotted paths."""
    for rule in KEY_TABLES[config.family]:
        key = rule.match_ours(path)
        if key is not None:
            return key, rule.transform
    return None


def hf_shape_of(config: QwenVLConfig, path: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of one of our parameters (inverse of the transform's shape map)."""
    found = ours_to_hf(config, path)
    if found is None:
        raise KeyError(f"no HF key for parameter {path!r}")
    _, tr = found
    if tr is CONV3D:
        v = config.vision
        return (our_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if tr is LINEAR:
        return (our_shape[1], our_shape[0])
    return tuple(our_shape)
