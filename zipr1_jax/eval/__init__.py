"""Evaluation: accuracy and token ratios of a policy under dense / sparse attention settings.

  greedy.py    evaluate_greedy: the trainer's in-loop evaluator (accuracy, token ratio)
  methods.py   attention settings: dense, top-p, fixed top-k ratio, fixed threshold, FastV
  harness.py   sets x settings -> accuracy, ratios, prefill/decode time, KV bytes; tables
  pictures.py  accuracy-vs-ratio curve, per-layer ratio bars, kept-token heatmap over the image
  loading.py   load a model from an Orbax checkpoint / run dir / HF directory; eval set specs
"""

from zipr1_jax.eval.greedy import EvalResult, evaluate_greedy

__all__ = ["EvalResult", "evaluate_greedy"]
