"""What both sides of benchmarks/grpo_step_vs_trl.py share: the objective's constants, the word-level
tokenizer, the reward, the worker protocol prefix and the offline environment.

Imported by the driver (project venv) and by benchmarks/grpo_trl_side.py (the TRL venv, which has no
jax or zipr1_jax), so it needs only the standard library and numpy at import time.
"""

from __future__ import annotations

import os
import re

import numpy as np

for _k, _v in (("JAX_PLATFORMS", "cpu"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

HERE = os.path.dirname(os.path.abspath(__file__))
TRL_SCRIPT = os.path.join(HERE, "grpo_trl_side.py")  # run by the TRL venv's python
PROTO = "@@grpo-bench "  # prefix of the worker's protocol lines on stdout (other output is skipped)
SPARSE_P = 0.9
REWARD_NAME = "bench_even_words"
PHASES = ("rollout", "reference", "update", "other")
# The advantage both sides use. Ours' "grpo" divides by the population std (ddof 0) + adv_eps; TRL's
# scale_rewards="group" by the Bessel-corrected std (ddof 1) + 1e-4; neither side can choose the ddof
# (ours can set eps, TRL only the scope: group / batch / none), so the one normalisation both compute
# alike is none: A = r - group mean (ours "drgrpo", TRL scale_rewards="none"). A per-group scale of
# the advantages changes the objective's weighting, not the work of a step.
ADVANTAGE = "center"
OURS_ADVANTAGE = {"center": "drgrpo"}
TRL_SCALE_REWARDS = {"center": "none"}
# check_objective: ours vs TRL on the same fixed batch, float32 (measured gaps are ~1e-6 relative).
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3
EPS = (0.2, 0.28)  # clip range (eps_low, eps_high), both sides


def word_tokenizer(vocab_size: int, pad_id: int):
    """A word-level HF tokenizer over "w0".."w<V-1>" (pad_id is "<pad>"), with "<eos>" = V OUTSIDE the
    model's vocabulary: the model can never sample it, so every completion runs to max length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {("<pad>" if i == pad_id else f"w{i}"): i for i in range(vocab_size)}
    vocab.update({"<eos>": vocab_size, "<unk>": vocab_size + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def even_word_reward(text: str) -> float:
    """Fraction of the completion's words "w<i>" with even i: cheap, computed from decoded text on
    both sides alike, and it varies within a group (non-zero advantages)."""
    ids = [int(w[1:]) for w in text.split() if re.fullmatch(r"w\d+", w)]
    return float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0


def prompt_texts(ids_BL: np.ndarray, mask_BL: np.ndarray) -> list[str]:
    return [" ".join(f"w{i}" for i in ids[m > 0]) for ids, m in zip(ids_BL, mask_BL)]


def worker_env() -> dict:
    """The environment of a TRL worker subprocess: ours without PYTHONPATH and XLA_FLAGS."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
