"""The sparsity effect with its controls: one SFT checkpoint, three RL arms, several seeds.

    report = run_controls(load_config("configs/default.yaml"), out_dir="runs/controls", seeds=(0, 1))

1. SFT once (the config's `sft` section, `rl.steps=0`): the shared starting checkpoint.
2. For every seed and arm, GRPO from that checkpoint with the same data order (`data.seed`), the
   seed changing only the rollout / selection keys (`seed`), and one knob changed per arm:
     no_efficiency   rl.lambda_eff = 0,  rl.lambda_path = 0   (accuracy reward only)
     paper_literal   rl.lambda_eff = 1,  rl.lambda_path = 0   (the paper's reward, GRPO as specified)
     pathwise        rl.lambda_eff = 1,  rl.lambda_path = the config's (> 0)  (+ the efficiency gradient)
3. Greedy evaluation of the SFT model and every final model with the harness on the trainer's
   held-out split: dense and top-p over `p_grid`; accuracy and token ratio with standard errors,
   per-layer ratios, the accuracy-vs-token-ratio curve (PNG) and the floor the always-kept tokens
   (first token + probe window) put on the ratio.

Writes `<out_dir>/controls.md` (the table), `controls.json`, `curve.png`, `layers.png` and each
run's own directory (metrics, plots, checkpoints). Reruns reuse finished runs (they resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from zipr1_jax.eval.harness import HarnessConfig, SettingResult, evaluate
from zipr1_jax.eval.loading import load_model, load_tokenizer_for, run_eval_set
from zipr1_jax.eval.pictures import plot_layer_ratios, plot_tradeoff
from zipr1_jax.kernels.sparse_attention.selection import always_kept
from zipr1_jax.train.builders import sparsity_config
from zipr1_jax.train.config import TrainConfig
from zipr1_jax.train.trainer import run

ARMS: dict[str, dict[str, float | None]] = {
    "no_efficiency": {"lambda_eff": 0.0, "lambda_path": 0.0},
    "paper_literal": {"lambda_eff": 1.0, "lambda_path": 0.0},
    "pathwise": {"lambda_eff": 1.0, "lambda_path": None},  # None: the config's lambda_path
}
DEFAULT_P_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)


def _replace(cfg: TrainConfig, **sections) -> TrainConfig:
    kw = {}
    for name, fields in sections.items():
        if isinstance(fields, dict):
            kw[name] = dataclasses.replace(getattr(cfg, name), **fields)
        else:
            kw[name] = fields
    return dataclasses.replace(cfg, **kw)


def arm_config(cfg: TrainConfig, arm: str, seed: int, sft_ckpt: str, out_dir: str) -> TrainConfig:
    """The RL run of one arm and seed, from the shared SFT checkpoint."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {sorted(ARMS)}")
    rl = {k: (cfg.rl.lambda_path if v is None else v) for k, v in ARMS[arm].items()}
    if arm == "pathwise" and rl["lambda_path"] <= 0:
        raise ValueError("the pathwise arm needs rl.lambda_path > 0 in the base config")
    return _replace(cfg, seed=seed, model={"init_params": sft_ckpt}, sft={"steps": 0}, rl=rl,
                    eval={"num_examples": 16, "p_list": (cfg.sparsity.p_eval,)},
                    log={"out_dir": os.path.join(out_dir, f"{arm}_seed{seed}"), "progress": "line"})


def ratio_floor(n_valid: int, cfg: TrainConfig) -> float:
    """Fraction of an n-token prompt kept whatever the scores: the first token + the probe window."""
    import jax.numpy as jnp  # noqa: PLC0415

    kept = always_kept(jnp.ones((1, n_valid), bool), sparsity_config(cfg.sparsity).selection)
    return float(kept.sum()) / n_valid


def run_controls(cfg: TrainConfig, *, out_dir: str, seeds: Sequence[int] = (0, 1),
                 arms: Sequence[str] = tuple(ARMS), p_grid: Sequence[float] = DEFAULT_P_GRID,
                 eval_examples: int = 512, eval_batch: int = 64) -> dict:
    """Run (or resume) the whole comparison; returns the report dict (also controls.json)."""
    if cfg.data.source != "builtin":
        raise ValueError("run_controls evaluates on the built-in tasks' held-out split: data.source must be builtin")
    os.makedirs(out_dir, exist_ok=True)
    sft_cfg = _replace(cfg, rl={"steps": 0}, eval={"num_examples": 16},
                       log={"out_dir": os.path.join(out_dir, "sft"), "progress": "line"})
    run(sft_cfg)
    sft_ckpt = os.path.join(out_dir, "sft", "checkpoints")
    runs = {}
    for seed in seeds:
        for arm in arms:
            c = arm_config(cfg, arm, seed, sft_ckpt, out_dir)
            run(c)
            runs[(arm, seed)] = c.log.out_dir

    # Evaluation: the same held-out examples, settings and keys for every model.
    models = [("before RL", sft_ckpt)] + [(f"{arm} s{seed}", path) for (arm, seed), path in runs.items()]
    first = load_model(sft_ckpt)
    tokenizer = load_tokenizer_for(first, workdir=out_dir)
    es = run_eval_set(cfg, tokenizer, first.config, num_examples=eval_examples, batch_size=eval_batch)
    eos = (int(tokenizer.convert_tokens_to_ids("<|im_end|>")), int(tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[1]
    hc = HarnessConfig(max_new_tokens=cfg.rl.max_new_tokens, eos_ids=eos, pad_id=int(pad), seed=cfg.seed,
                       measure_prefill=False, progress="none")
    settings = ["dense"] + [f"topp:{p:g}" for p in p_grid]
    sparsity = sparsity_config(cfg.sparsity)
    results = []
    for label, path in models:
        loaded = first if path == sft_ckpt else load_model(path)
        results += evaluate(loaded.model, {"eval": es.loader}, tokenizer, settings, config=hc, sparsity=sparsity,
                            model_name=label)
    batch = next(iter(es.loader))
    n_valid = int(np.asarray(batch["attention_mask"]).sum(axis=1).max())
    with open(os.path.join(out_dir, "controls.json"), "w") as f:  # kept even if the report below fails
        json.dump({"prompt_tokens": n_valid, "results": [r.to_dict() for r in results]}, f, indent=2)
    return write_report(cfg, out_dir=out_dir, seeds=seeds, arms=arms)


def write_report(cfg: TrainConfig, *, out_dir: str, seeds: Sequence[int] = (0, 1),
                 arms: Sequence[str] = tuple(ARMS)) -> dict:
    """(Re)write controls.md / controls.json / curve.png / layers.png from the evaluated results."""
    with open(os.path.join(out_dir, "controls.json")) as f:
        saved = json.load(f)
    results = [SettingResult.from_dict(r) for r in saved["results"]]
    report = _report(results, cfg, seeds, arms, int(saved["prompt_tokens"]))
    at_p = [r for r in results if r.kind == "topp" and abs(r.budget - cfg.sparsity.p_eval) < 1e-9]
    report["curve_png"] = plot_tradeoff(report["curves"], os.path.join(out_dir, "curve.png"),
                                        title=f"accuracy vs token ratio over p (arms: mean of {len(seeds)} seeds)",
                                        annotate=("before RL", "pathwise"))
    report["layers_png"] = plot_layer_ratios(at_p, os.path.join(out_dir, "layers.png"),
                                             title=f"per-layer token ratio at p = {cfg.sparsity.p_eval:g}")
    with open(os.path.join(out_dir, "controls.json"), "w") as f:
        json.dump({**report, "results": saved["results"]}, f, indent=2)
    with open(os.path.join(out_dir, "controls.md"), "w") as f:
        f.write(report["markdown"])
    return report


def _report(results, cfg: TrainConfig, seeds, arms, n_valid: int) -> dict:
    """The controls table (markdown) and the per-arm summary at p = sparsity.p_eval."""
    p = cfg.sparsity.p_eval

    def tag(r):
        return "dense" if r.kind == "dense" else round(float(r.budget), 6)

    by = {(r.model, tag(r)): r for r in results if r.kind in ("dense", "topp")}
    P = round(float(p), 6)
    base = by[("before RL", P)]
    base_dense = by[("before RL", "dense")]
    floor = ratio_floor(n_valid, cfg)
    lines = [f"p = {p:g}; {base.num_examples} held-out examples per row; +- is one standard error "
             f"(accuracy: binomial; token ratio: over examples). Floor of the ratio (first token + probe window "
             f"of a {n_valid}-token prompt): {floor:.3f}.", "",
             "| model | dense accuracy | accuracy | token ratio | ratio / before | per-layer ratio |",
             "|---|---|---|---|---|---|"]

    def row(label):
        r, rd = by[(label, P)], by[(label, "dense")]
        lines.append(f"| {label} | {rd.accuracy:.3f} +- {rd.accuracy_se:.3f} | {r.accuracy:.3f} +- {r.accuracy_se:.3f} | "
                     f"{r.token_ratio:.3f} +- {(r.token_ratio_se or 0.0):.3f} | {r.token_ratio / base.token_ratio:.3f} | "
                     f"{' '.join(f'{x:.2f}' for x in r.layer_ratio)} |")
    row("before RL")
    summary = {}
    for arm in arms:
        for seed in seeds:
            row(f"{arm} s{seed}")
        mine = [by[(f"{arm} s{s}", P)] for s in seeds]
        summary[arm] = {"accuracy": float(np.mean([r.accuracy for r in mine])),
                        "token_ratio": float(np.mean([r.token_ratio for r in mine])),
                        "ratio_vs_before": float(np.mean([r.token_ratio for r in mine]) / base.token_ratio),
                        "dense_accuracy": float(np.mean([by[(f"{arm} s{s}", "dense")].accuracy for s in seeds]))}
    # The trade-off curves: (p, ratio, accuracy) per group, the arms averaged over their seeds.
    ps = sorted({k[1] for k in by if k[1] != "dense"})
    curves = {"before RL": [(q, by[("before RL", q)].token_ratio, by[("before RL", q)].accuracy) for q in ps]}
    for arm in arms:
        curves[arm] = [(q, float(np.mean([by[(f"{arm} s{s}", q)].token_ratio for s in seeds])),
                        float(np.mean([by[(f"{arm} s{s}", q)].accuracy for s in seeds]))) for q in ps]
    lines += ["", "Accuracy / token ratio over p (arms: mean of the seeds):", "",
              "| p | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for i, q in enumerate(ps):
        lines.append(f"| {q:g} | " + " | ".join(f"{c[i][2]:.3f} / {c[i][1]:.3f}" for c in curves.values()) + " |")
    lines += ["", "| arm (mean of seeds) | accuracy | token ratio | ratio / before |", "|---|---|---|---|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['accuracy']:.3f} | {s['token_ratio']:.3f} | {s['ratio_vs_before']:.3f} |")
    return {"p": p, "before": {"accuracy": base.accuracy, "token_ratio": base.token_ratio,
                               "dense_accuracy": base_dense.accuracy},
            "arms": summary, "ratio_floor": floor, "prompt_tokens": n_valid, "curves": curves,
            "markdown": "\n".join(lines) + "\n"}
