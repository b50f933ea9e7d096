"""Evaluation: greedy accuracy and token ratios of a policy under dense / sparse attention."""

from zipr1_jax.eval.greedy import EvalResult, evaluate_greedy

__all__ = ["EvalResult", "evaluate_greedy"]
