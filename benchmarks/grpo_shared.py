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


# The vision markers of Qwen2-VL's tokenizer, as `bench_config` numbers them (image pad = vocab - 7).
VISION_TOKENS = {"<|image_pad|>": 0, "<|vision_start|>": 2, "<|vision_end|>": 3}  # offset from vocab - 7
# A user turn renders as its image blocks then its text; no role markers (the word tokenizer has none).
CHAT_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endfor %}")


def vlm_processor(vocab_size: int, pad_id: int):
    """A `Qwen2VLProcessor` built offline for the VLM step: the word tokenizer with Qwen2-VL's vision
    markers as special tokens at the tiny model's ids, transformers' own Qwen2-VL image processor (its PIL backend: no torchvision)
    (default patch 14, merge 2, temporal patch 2) and a minimal chat template. TRL's GRPOTrainer
    takes images only through such a processor (conversational prompts + its chat template)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, ProcessorMixin, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    top = vocab_size - 7
    special = {name: top + off for name, off in VISION_TOKENS.items()}
    vocab = {("<pad>" if i == pad_id else f"w{i}"): i for i in range(vocab_size) if i not in special.values()}
    vocab.update(special)
    vocab.update({"<eos>": vocab_size, "<unk>": vocab_size + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")

    class ImageOnlyProcessor(Qwen2VLProcessor):
        # Without torchvision transformers has no video processor class, and ProcessorMixin type-checks
        # every sub-processor named in __init__ (even a None one): this signature names only two.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id, self.video_token_id = special["<|image_pad|>"], None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=fast, chat_template=CHAT_TEMPLATE)


def conversation(text: str) -> list[dict]:
    """The VLM prompt of one text prompt: one user turn, an image placeholder then the text (TRL
    fills the placeholder from the dataset's `image` column)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def noise_images(n: int, side: int, seed: int):
    """`n` random RGB images of side x side pixels (uint8 noise: PNG keeps them exact)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB") for _ in range(n)]


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
