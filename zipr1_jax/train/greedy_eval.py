"""Greedy evaluation of a policy on an eval loader: accuracy (verifiers) and token ratios.

p = 1.0 runs dense attention (token ratio 1 by definition); p < 1 runs ZipVL top-p selection in
the prefill and decodes over the pruned KV cache, exactly as at inference after training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from zipr1_jax.data.verifiers import verify
from zipr1_jax.rl.rollout import SamplingConfig, generate
from zipr1_jax.train.batch import vision_arrays


@dataclass
class EvalResult:
    p: float
    accuracy: float
    token_ratio: float
    layer_ratio: list[float]
    num_examples: int
    responses: list[str] = field(default_factory=list, repr=False)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        tag = "dense" if self.p >= 1.0 else f"p{self.p:g}"
        return {f"{prefix}accuracy_{tag}": self.accuracy, f"{prefix}token_ratio_{tag}": self.token_ratio}


def evaluate_greedy(model: nnx.Module, batches: Iterable[dict], tokenizer, *, p: float, max_new_tokens: int,
                    eos_ids: tuple[int, ...], pad_id: int, seed: int = 0, context=None, sparsity=None) -> EvalResult:
    """Greedy-decode every valid row of `batches` (an eval loader) and verify its answer.

    Args:
      model: the policy (an nnx module with prefill / decode_step and, for p < 1, sparse_prefill).
      p: top-p threshold; 1.0 = dense.
      context: optional context manager factory (e.g. `Placement.context`) active while decoding.
      sparsity: SparsityConfig of the sparse prefill (None: the model's default).
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"evaluate_greedy: p must be in (0, 1], got {p!r}")
    config = SamplingConfig(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=0.0)
    correct, ratios, layer_ratios, responses = [], [], [], []
    rng = jax.random.key(seed)
    for i, batch in enumerate(batches):
        vision, grids = vision_arrays(batch)
        R = batch["input_ids"].shape[0]
        p_B = None if p >= 1.0 else np.full((R,), p, np.float32)
        kwargs = dict(config=config, p_B=p_B, position_ids_3BL=batch.get("position_ids"),
                      rope_deltas_B=batch.get("rope_deltas"), pixel_values=vision.get("pixel_values"),
                      image_grid_thw=grids["image_grid"], pixel_values_videos=vision.get("pixel_values_videos"),
                      video_grid_thw=grids["video_grid"], sparsity=sparsity)
        key = jax.random.fold_in(rng, i)
        if context is not None:
            with context():
                out = generate(model, batch["input_ids"], batch["attention_mask"], key, **kwargs)
        else:
            out = generate(model, batch["input_ids"], batch["attention_mask"], key, **kwargs)
        tokens, mask = np.asarray(out.tokens_BT), np.asarray(out.mask_BT)
        valid = np.asarray(batch.get("valid", np.ones(R, bool)))
        for r in range(R):
            if not valid[r]:
                continue
            text = tokenizer.decode(tokens[r][mask[r]].tolist(), skip_special_tokens=True)
            responses.append(text)
            choices = batch["choices"][r] if "choices" in batch else ()
            correct.append(bool(verify(text, batch["answer"][r], batch["answer_type"][r], choices=choices)))
        ratios.append(np.asarray(out.token_ratio_B)[valid])
        layer_ratios.append(np.asarray(out.layer_ratio_BY)[valid])
    if not correct:
        raise ValueError("evaluate_greedy: the eval batches held no valid example")
    ratio = np.concatenate(ratios)
    return EvalResult(p=float(p), accuracy=float(np.mean(correct)), token_ratio=float(ratio.mean()),
                      layer_ratio=np.concatenate(layer_ratios).mean(axis=0).tolist(), num_examples=len(correct),
                      responses=responses)
