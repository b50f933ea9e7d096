"""Evaluation: accuracy and token ratios of a policy under dense / sparse attention settings.

  methods.py   attention settings: dense, top-p, fixed top-k ratio, fixed threshold, FastV
  harness.py   sets x settings -> accuracy, ratios, prefill/decode time, KV bytes; tables
  pictures.py  accuracy-vs-ratio curve, per-layer ratio bars, kept-token heatmap over the image
  loading.py   load a model from an Orbax checkpoint / run dir / HF directory; eval set specs
"""

# The trainer's in-loop evaluator lives with the trainer (train/greedy_eval.py); re-exported here.
from zipr1_jax.train.greedy_eval import EvalResult, evaluate_greedy

__all__ = ["EvalResult", "evaluate_greedy"]
