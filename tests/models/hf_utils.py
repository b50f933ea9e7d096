"""Helpers for parity tests: tiny random transformers Qwen-VL models (no hub) and input builders."""

from __future__ import annotations

import math

import numpy as np
import torch
import transformers

from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.loader import from_hf_state_dict


def hf_classes(family: str):
    if family == "qwen2_vl":
        return transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    return transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration


def hf_config(cfg: C.QwenVLConfig, attn: str = "eager"):
    cls, _ = hf_classes(cfg.family)
    hc = cls(**cfg.to_hf_config())
    hc._attn_implementation = attn
    hc.text_config._attn_implementation = attn
    hc.vision_config._attn_implementation = attn
    return hc


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """O(1)-scale random weights (HF's 0.02 init makes logits too small for a meaningful parity)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            # Embeddings double as the tied lm head: 0.25 keeps tied logits O(1), like untied ones.
            scale = 0.25 if "embed_tokens" in name else 1.0 / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:  # norm weights
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)


def tiny_hf_model(cfg: C.QwenVLConfig, seed: int = 0, attn: str = "eager"):
    _, model_cls = hf_classes(cfg.family)
    torch.manual_seed(seed)
    model = model_cls(hf_config(cfg, attn)).eval()
    randomize_(model, seed)
    if cfg.text.tie_word_embeddings:
        model.tie_weights()
    return model


def tiny_pair(cfg: C.QwenVLConfig, seed: int = 0):
    """(hf_model, our_model) with identical weights (ours imported through the key table)."""
    hf = tiny_hf_model(cfg, seed)
    return hf, from_hf_state_dict(cfg, hf.state_dict())


def mm_token_type_ids(cfg: C.QwenVLConfig, ids: np.ndarray) -> np.ndarray:
    return np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))


def vision_block(cfg: C.QwenVLConfig, grid_thw, *, video: bool = False) -> list[int]:
    """<vision_start> pad * (t*h*w / merge^2) <vision_end>."""
    n = int(np.prod(grid_thw)) // cfg.vision.merge_unit
    pad = cfg.video_token_id if video else cfg.image_token_id
    return [cfg.vision_start_token_id] + [pad] * n + [cfg.vision_end_token_id]


def text_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, 250, size=n).tolist()


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    L = max(len(r) for r in rows)
    ids = np.full((len(rows), L), pad_id, np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    return ids, mask


def pixels(rng: np.random.Generator, cfg: C.QwenVLConfig, grid_thw) -> np.ndarray:
    return rng.standard_normal((int(np.prod(grid_thw)), cfg.vision.patch_dim)).astype(np.float32)
