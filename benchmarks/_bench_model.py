"""The benchmarks' tiny Qwen2-VL config (no torch import: the decode roofline runs without it)."""

from __future__ import annotations

import argparse

from zipr1_jax.models.qwen_vl import config as C


def bench_config(*, hidden: int, layers: int, vocab: int) -> C.QwenVLConfig:
    """A tiny Qwen2-VL: 4 query heads / 2 KV heads, special ids at the top of the vocabulary."""
    half = hidden // 4 // 2  # head_dim / 2, split over (t, h, w) like the real 16/24/24
    side = 3 * half // 8
    text = C.TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(half - 2 * side, side, side), max_position_embeddings=4096)
    vision = C.VisionConfig(family="qwen2_vl", depth=2, hidden_size=64, num_heads=2, intermediate_size=256,
                            out_hidden_size=hidden, hidden_act="quick_gelu")
    top = vocab - 7
    return C.QwenVLConfig(family="qwen2_vl", text=text, vision=vision, image_token_id=top,
                          video_token_id=top + 1, vision_start_token_id=top + 2, vision_end_token_id=top + 3,
                          bos_token_id=top + 4, eos_token_id=top + 5, pad_token_id=top + 6, name="bench_qwen2_vl")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--hidden / --layers / --vocab of `bench_config` (defaults: the BENCHMARKS.md tiny model)."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
