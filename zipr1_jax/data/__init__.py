"""Data: Qwen-VL preprocessing (vision), verifiers, built-in tasks, tokenizer/chat, pipelines.

Import submodules directly (e.g. ``zipr1_jax.data.vision``); nothing heavy is imported here.
"""
