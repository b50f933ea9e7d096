"""zipr1_jax: ZipR1 token-sparsity RL post-training for Qwen2-VL / Qwen2.5-VL in JAX/Flax."""

__version__ = "0.1.0"
