"""Greedy evaluation of a policy on an eval loader: accuracy (verifiers) and token ratios.

`decode_batches` is the one evaluation loop (batch keys, decoding, verification); the trainer's
`evaluate_greedy` and the harness's `evaluate_setting` (eval/harness.py) are thin consumers of it.

p = 1.0 runs dense attention (token ratio 1 by definition); p < 1 runs ZipVL top-p selection in
the prefill and decodes over the pruned KV cache, exactly as at inference after training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from zipr1_jax.data.model_inputs import vision_arrays
from zipr1_jax.data.verifiers import verify
from zipr1_jax.rl.rollout import SamplingConfig, generate


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


@dataclass
class DecodedBatch:
    """One eval batch after greedy decoding: the sampler's output, the model inputs it decoded
    from, and for every valid row (index in `rows`) its response text and verdict."""

    index: int
    batch: dict
    inputs: dict
    out: object  # RolloutOutput
    rows: np.ndarray
    texts: list[str]
    correct: list[bool]


def model_inputs(model: nnx.Module, batch: dict) -> dict:
    """Host-side model inputs of a loader batch (M-RoPE ids computed when the loader gave none)."""
    arrays, grids = vision_arrays(batch)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    pos, deltas = batch.get("position_ids"), batch.get("rope_deltas")
    if pos is None or deltas is None:
        as_np = lambda g: None if g is None else np.asarray(g)  # noqa: E731
        pos, deltas = model.position_ids(ids, mask, as_np(grids["image_grid"]), as_np(grids["video_grid"]),
                                         batch.get("second_per_grid_ts"))
    return dict(ids=ids, mask=mask, pos=np.asarray(pos, np.int32), deltas=np.asarray(deltas, np.int32),
                pixel_values=arrays.get("pixel_values"), pixel_values_videos=arrays.get("pixel_values_videos"),
                image_grid=grids["image_grid"], video_grid=grids["video_grid"])


def run_generate(model: nnx.Module, x: dict, key, p_B, sampling: SamplingConfig, sparsity=None):
    """`generate` on `model_inputs`, waited for (so a caller may time it)."""
    grid = lambda g: None if g is None else np.asarray(g)  # noqa: E731
    out = generate(model, x["ids"], x["mask"], key, config=sampling, p_B=p_B, position_ids_3BL=x["pos"],
                   rope_deltas_B=x["deltas"], pixel_values=x["pixel_values"], image_grid_thw=grid(x["image_grid"]),
                   pixel_values_videos=x["pixel_values_videos"], video_grid_thw=grid(x["video_grid"]),
                   sparsity=sparsity)
    return jax.block_until_ready(out)


def batch_key(seed: int, index: int) -> jax.Array:
    """The decoding key of eval batch `index`: the same for every evaluator of a seed."""
    return jax.random.fold_in(jax.random.key(seed), index)


def decode_batches(model: nnx.Module, batches: Iterable[dict], tokenizer, *, sampling: SamplingConfig,
                   budget_B: Callable[[int], np.ndarray | None], seed: int = 0, sparsity=None, context=None,
                   run: Callable | None = None) -> Iterator[DecodedBatch]:
    """THE evaluation loop: greedy-decode every batch and verify each valid row's answer.

    Batch i decodes with `batch_key(seed, i)`, so every evaluator (the trainer's eval, the
    harness's table) gives the same responses for the same model, data and budget.
    Args:
      budget_B: rows -> per-row top-p thresholds [R] (None: dense).
      context: optional context manager factory (e.g. `Placement.context`) active while decoding.
      run: `run(model, inputs, key, p_B)` in place of `run_generate` (the harness times it).
    """
    run = run or (lambda m, x, key, p_B: run_generate(m, x, key, p_B, sampling, sparsity))
    for i, batch in enumerate(batches):
        x = model_inputs(model, batch)
        key, p_B = batch_key(seed, i), budget_B(x["ids"].shape[0])
        with context() if context is not None else contextlib.nullcontext():
            out = run(model, x, key, p_B)
        tokens, mask = np.asarray(out.tokens_BT), np.asarray(out.mask_BT)
        rows = np.flatnonzero(np.asarray(batch.get("valid", np.ones(x["ids"].shape[0], bool)), bool))
        texts = [tokenizer.decode(tokens[r][mask[r]].tolist(), skip_special_tokens=True) for r in rows]
        correct = [bool(verify(t, batch["answer"][r], batch["answer_type"][r],
                               choices=batch["choices"][r] if "choices" in batch else ()))
                   for t, r in zip(texts, rows)]
        yield DecodedBatch(index=i, batch=batch, inputs=x, out=out, rows=rows, texts=texts, correct=correct)


def evaluate_greedy(model: nnx.Module, batches: Iterable[dict], tokenizer, *, p: float, max_new_tokens: int,
                    eos_ids: tuple[int, ...], pad_id: int, seed: int = 0, context=None, sparsity=None) -> EvalResult:
    """Accuracy and token ratios of greedy decoding at one top-p threshold (`decode_batches`).

    Args:
      model: the policy (an nnx module with prefill / decode_step and, for p < 1, sparse_prefill).
      p: top-p threshold; 1.0 = dense.
      context: optional context manager factory (e.g. `Placement.context`) active while decoding.
      sparsity: SparsityConfig of the sparse prefill (None: the model's default).
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"evaluate_greedy: p must be in (0, 1], got {p!r}")
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, temperature=0.0)
    budget_B = lambda R: None if p >= 1.0 else np.full((R,), p, np.float32)  # noqa: E731
    correct, ratios, layer_ratios, responses = [], [], [], []
    for d in decode_batches(model, batches, tokenizer, sampling=sampling, budget_B=budget_B, seed=seed,
                            sparsity=sparsity, context=context):
        responses += d.texts
        correct += d.correct
        ratios.append(np.asarray(d.out.token_ratio_B)[d.rows])
        layer_ratios.append(np.asarray(d.out.layer_ratio_BY)[d.rows])
    if not correct:
        raise ValueError("evaluate_greedy: the eval batches held no valid example")
    ratio = np.concatenate(ratios)
    return EvalResult(p=float(p), accuracy=float(np.mean(correct)), token_ratio=float(ratio.mean()),
                      layer_ratio=np.concatenate(layer_ratios).mean(axis=0).tolist(), num_examples=len(correct),
                      responses=responses)
