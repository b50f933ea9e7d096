"""The learner's update core (policy forward, token log-probs, backward) on THIS machine: the model's
2-D token dots vs N-d dots side by side, and the step as a fraction of its FLOP roofline.

    python benchmarks/update_layout.py --rows 16 --prompt 64 --new 64 --rounds 15 --write-md

`flat` is the model as shipped: every text projection is a `TokenLinear`, one [tokens, din] dot.
`nd` is the control, the same model with `nnx.Linear`'s own N-d dot ([B, L, din] x [din, dout]).
Both compile the same loss on the same weights and tokens; their values and gradients are checked
equal before timing, then the rounds alternate (one call of each per round). The FLOP roofline is
the compiled program's FLOP count (XLA cost analysis) over the float32 matmul rate measured in the
same run (a jitted square matmul), so the fraction says how much of the time is matmul-rate work.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_model import add_model_args, bench_config  # noqa: E402
from _markdown import add_md_args, replace_section  # noqa: E402

from zipr1_jax.models.qwen_vl import text as text_module  # noqa: E402
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration  # noqa: E402
from zipr1_jax.rl.losses import token_logprobs_from_logits  # noqa: E402
from zipr1_jax.train.builders import split_params  # noqa: E402

SECTION = "## Update step: dot layout and FLOP roofline"
VARIANTS = ("flat", "nd")


def matmul_rate(n: int = 1024, repeats: int = 7) -> float:
    """FLOP/s of a jitted float32 [n, n] x [n, n] matmul (median)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def compile_variant(variant: str, graphdef, params, ids_BL, prompt: int):
    """The compiled value-and-grad of the mean completion log-prob with the chosen dot layout."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    L = ids_BL.shape[1]

    def loss(prm):
        out = nnx.merge(graphdef, prm)(ids_BL, logits_slice=(prompt - 1, L - 1))
        return -token_logprobs_from_logits(out.logits, ids_BL[:, prompt:]).mean()

    shipped = text_module.TokenLinear.__call__
    if variant == "nd":  # the control: nnx.Linear's own N-d dot, traced while patched
        text_module.TokenLinear.__call__ = nnx.Linear.__call__
    try:
        return jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    finally:
        text_module.TokenLinear.__call__ = shipped


def layout_ops(compiled) -> int:
    """copy + transpose instructions of the optimised program (the layout changes XLA inserted)."""
    return len(re.findall(r"\b(?:copy|transpose)\(", compiled.as_text()))


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def run_bench(args) -> dict:
    cfg = bench_config(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    graphdef, params = split_params(QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    ids_BL = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab - 8, (args.rows, args.prompt + args.new)),
                         jnp.int32)
    fns = {v: compile_variant(v, graphdef, params, ids_BL, args.prompt) for v in VARIANTS}
    (v_flat, g_flat), (v_nd, g_nd) = fns["flat"](params), fns["nd"](params)
    grad_gap = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                   for a, b in zip(jax.tree.leaves(g_flat), jax.tree.leaves(g_nd), strict=True))
    loss_gap = abs(float(v_flat) - float(v_nd)) / max(abs(float(v_nd)), 1e-30)
    if loss_gap > 1e-5 or grad_gap > 1e-4:
        raise RuntimeError(f"the two layouts disagree: loss gap {loss_gap:.1e}, gradient gap {grad_gap:.1e}")
    rate = matmul_rate(args.matmul_n)
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params))
            times[v].append(time.perf_counter() - t0)
    ratios = np.array(times["flat"]) / np.array(times["nd"])
    rows = []
    for v, f in fns.items():
        med, fl = statistics.median(times[v]), flops(f)
        rows.append(dict(variant=v, s=med, s_min=min(times[v]), s_max=max(times[v]), gflop=fl / 1e9,
                         layout_ops=layout_ops(f), fraction=fl / rate / med))
    return {"rate_gflops": rate / 1e9, "loss_gap": loss_gap, "grad_gap": grad_gap, "rows": rows,
            "ratio": float(np.median(ratios)), "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max())}


def write_section(result: dict, args, path: str | None = None) -> str:
    lines = ["| dots | s / call (median; min - max) | GFLOP (XLA) | copy + transpose ops | FLOP roofline / measured |",
             "|---|---|---|---|---|"]
    names = {"flat": "2-D token dots (shipped)", "nd": "N-d dots (control)"}
    for r in result["rows"]:
        lines.append(f"| {names[r['variant']]} | {r['s']:.3f} ({r['s_min']:.3f} - {r['s_max']:.3f}) | "
                     f"{r['gflop']:.1f} | {r['layout_ops']} | {r['fraction']:.0%} |")
    body = (f"{SECTION}\n\nCommand: `python benchmarks/update_layout.py --rows {args.rows} --prompt {args.prompt} "
            f"--new {args.new} --rounds {args.rounds} --write-md` (run "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__}, CPU, float32). Model: "
            f"the rollout section's tiny Qwen2-VL (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}); "
            f"{args.rows} rows of {args.prompt} prompt + {args.new} completion tokens (the GRPO section's batch). "
            "Timed: one compiled value-and-grad of the mean completion log-prob (the learner update's forward + "
            "backward, without the optimizer), the two dot layouts alternating for "
            f"{args.rounds} rounds. Same values checked first: loss gap {result['loss_gap']:.1e}, gradient gap "
            f"{result['grad_gap']:.1e} (relative). Matmul rate measured in the same run: "
            f"{result['rate_gflops']:.1f} GFLOP/s (float32 {args.matmul_n}^2 matmul).\n\n" + "\n".join(lines) +
            f"\n\n2-D / N-d time per round: {result['ratio']:.2f} (min - max {result['ratio_min']:.2f} - "
            f"{result['ratio_max']:.2f}).\n\nReading: with N-d dots XLA's CPU backend transposes every activation "
            "that feeds a weight gradient (dW contracts over batch and length) into a 2-D layout, a copy per "
            "projection per layer; `TokenLinear` flattens the tokens first so those gradients are plain 2-D dots "
            "(the remaining copies are the attention's head / group transposes). The roofline fraction is the "
            "share of the time the program would need at the measured matmul rate; the rest is memory-bound "
            "elementwise work (softmax, RoPE, norms and their backward) and per-op overhead at this tiny size. "
            "Also tried on this core (interleaved A/B, same values, 2026-12-06), none faster: gate and up "
            "projections as one fused dot 1.05x the time (XLA already runs the two on the two cores), "
            "rematerialised decoder layers 1.19x (full) and 1.01x (dots saved) - no memory pressure here to trade "
            "against.\n")
    return replace_section(SECTION, body, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--matmul-n", type=int, default=1024)
    add_model_args(ap)
    add_md_args(ap)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_bench(args)
    print(f"matmul rate {result['rate_gflops']:.1f} GFLOP/s; gaps loss {result['loss_gap']:.1e} "
          f"grad {result['grad_gap']:.1e}")
    for r in result["rows"]:
        print(f"{r['variant']}: {r['s']:.3f} s, {r['gflop']:.1f} GFLOP, {r['layout_ops']} layout ops, "
              f"{r['fraction']:.0%} of the FLOP roofline")
    print(f"flat / nd time: {result['ratio']:.2f} ({result['ratio_min']:.2f} - {result['ratio_max']:.2f})")
    if args.write_md:
        write_section(result, args, args.md_path)
    return result


if __name__ == "__main__":
    main()
