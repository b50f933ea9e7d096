"""Sparse rollouts of a TRAINED low-ratio model vs dense ones, side by side: tokens/s and decode KV bytes.

    python scripts/train.py --config configs/tiny_long.yaml log.out_dir=runs/tiny_long    # the model (~10 min)
    python benchmarks/sparse_rollout_trained.py runs/tiny_long [--p 0.975] [--batch 64] [--new 64] \\
        [--rounds 7] [--accuracy-examples 512] [--write-md]

Models: the run's last checkpoint ("after RL") and the weights its RL started from
(`checkpoints/reference`: "before RL"). Both on the run's own held-out split, prepared as the run
prepares it (`eval.loading.run_eval_set`):
  1. answers: greedy accuracy, dense and at top-p `--p`, with the run's stop tokens, over
     `--accuracy-examples` examples (the trainer's evaluation loop, `train.greedy_eval.evaluate_greedy`);
     the same sparse-prefill selection keys as the timed calls.
  2. timing: one batch of `--batch` prompts, `rl.rollout.generate` (greedy) of exactly `--new` tokens
     per row (stop id outside the vocabulary, so dense and sparse run the same number of decode
     steps), every (model, attention) once per round for `--rounds` rounds after one untimed call
     (the compile); tokens/s = batch * new / median seconds; the sparse / dense time ratio is taken
     per round (median, min - max).
  3. KV cache of the decode: slots per row and layer (`kv_capacity`: the longest kept prompt over
     rows AND layers, rounded up to 1/8 of the prompt, plus the new tokens), bytes allocated
     (layers x rows x slots x K/V entry), and bytes kept = every layer's own kept prompt entries plus
     the new tokens (what a decode kernel that stops at each layer's length reads: the Pallas kernels
     on TPU / GPU; the xla path on CPU reads every allocated slot).
`--write-md` replaces the "Sparse rollouts of a trained model" section of BENCHMARKS.md.
`main(argv) -> dict` is importable (tests/benchmarks/test_sparse_rollout_trained.py runs it tiny).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _markdown import replace_section  # noqa: E402

from zipr1_jax.eval.loading import load_model, load_tokenizer_for, run_eval_set  # noqa: E402
from zipr1_jax.rl.rollout import SamplingConfig, generate  # noqa: E402
from zipr1_jax.eval.harness import kv_entry_bytes  # noqa: E402
from zipr1_jax.train.greedy_eval import batch_key, evaluate_greedy, model_inputs  # noqa: E402

SECTION = "## Sparse rollouts of a trained model"


def accuracy(loaded, es, tokenizer, *, p: float, sampling: SamplingConfig, sparsity) -> dict:
    """Greedy accuracy (with its binomial standard error) and mean token ratio over the eval set
    (`train.greedy_eval.evaluate_greedy`: the trainer's evaluation loop)."""
    r = evaluate_greedy(loaded.model, es.loader, tokenizer, p=p, max_new_tokens=sampling.max_new_tokens,
                        eos_ids=sampling.eos_ids, pad_id=sampling.pad_id, sparsity=sparsity)
    return dict(n=r.num_examples, accuracy=r.accuracy, token_ratio=r.token_ratio,
                accuracy_se=float(np.sqrt(r.accuracy * (1 - r.accuracy) / r.num_examples)))


def kv_bytes(out, mask_BL, entry: int, layers: int) -> dict:
    """Decode cache of one rollout: allocated slots / bytes, and bytes of the entries each layer keeps."""
    B, T = out.tokens_BT.shape
    n_valid_B = np.asarray(mask_BL > 0).sum(axis=1)
    kept_BY = np.rint(np.asarray(out.layer_ratio_BY, np.float64) * n_valid_B[:, None])
    return dict(slots=int(out.kv_capacity), allocated=layers * B * out.kv_capacity * entry,
                kept=float((kept_BY + T).sum() * entry),
                layer_ratio=np.asarray(out.layer_ratio_BY, np.float64).mean(axis=0).tolist())


def run_bench(args) -> dict:
    after = load_model(args.run)
    if after.kind != "run":
        raise SystemExit(f"{args.run} is a {after.kind} checkpoint: pass a training run directory (scripts/train.py's "
                         "log.out_dir, holding checkpoints/ and checkpoints/reference)")
    before = load_model(os.path.join(after.path, "checkpoints", "reference"))
    tc = after.train_config
    tokenizer = load_tokenizer_for(after, workdir=args.workdir)
    sparsity = after.sparsity()
    eos = (int(tokenizer.convert_tokens_to_ids("<|im_end|>")), int(tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[1])
    answer_sampling = SamplingConfig(max_new_tokens=tc.rl.max_new_tokens, eos_ids=eos, pad_id=pad, temperature=0.0)
    models = {"before RL": before, "after RL": after}
    acc_set = run_eval_set(tc, tokenizer, after.config, num_examples=args.accuracy_examples, batch_size=args.batch)
    answers = {(name, p): accuracy(m, acc_set, tokenizer, p=p, sampling=answer_sampling, sparsity=sparsity)
               for name, m in models.items() for p in (1.0, args.p)}
    for (name, p), a in answers.items():
        print(f"  {name} p={p:g}: accuracy {a['accuracy']:.3f} +- {a['accuracy_se']:.3f}, token ratio "
              f"{a['token_ratio']:.3f} (n={a['n']})", flush=True)

    # Timing batch: the first full batch of the same split; every row decodes exactly --new tokens.
    batch = next(iter(run_eval_set(tc, tokenizer, after.config, num_examples=args.batch, batch_size=args.batch).loader))
    never = after.config.text.vocab_size  # outside the vocabulary: no row stops early
    timed = SamplingConfig(max_new_tokens=args.new, eos_ids=(never,), pad_id=pad, temperature=0.0)
    key = batch_key(0, 0)
    calls = {}
    for name, m in models.items():
        x = model_inputs(m.model, batch)
        vision = dict(pixel_values=x["pixel_values"], image_grid_thw=x["image_grid"],
                      pixel_values_videos=x["pixel_values_videos"], video_grid_thw=x["video_grid"])
        for label, p_B in (("dense", None), (f"p={args.p:g}", np.full((x["ids"].shape[0],), args.p, np.float32))):
            calls[(name, label)] = (lambda m=m, x=x, p_B=p_B, vision=vision: generate(
                m.model, x["ids"], x["mask"], key, config=timed, p_B=p_B, position_ids_3BL=x["pos"],
                rope_deltas_B=x["deltas"], sparsity=sparsity, **vision), x["mask"])
    res = {k: dict(times=[]) for k in calls}
    for k, (call, mask) in calls.items():
        t0 = time.perf_counter()
        out = jax.block_until_ready(call())
        res[k].update(first_s=time.perf_counter() - t0, kv=kv_bytes(out, np.asarray(mask), kv_entry_bytes(after.model),
                                                                     after.config.text.num_hidden_layers),
                      ratio=float(np.mean(np.asarray(out.token_ratio_B))), new=int(np.asarray(out.mask_BT).sum()))
        if res[k]["new"] != out.tokens_BT.shape[0] * args.new:
            raise RuntimeError(f"{k}: {res[k]['new']} tokens generated, expected exactly {args.new} per row")
    for i in range(args.rounds):
        print(f"  round {i + 1}/{args.rounds} ...", flush=True)
        for k, (call, _) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            res[k]["times"].append(time.perf_counter() - t0)
    rows = []
    for (name, label), r in res.items():
        dense = res[(name, "dense")]["times"]
        per_round = [a / b for a, b in zip(r["times"], dense)]
        p = 1.0 if label == "dense" else args.p
        rows.append(dict(model=name, attention=label, answers=answers[(name, p)], first_s=r["first_s"],
                         s=statistics.median(r["times"]), tok_s=r["new"] / statistics.median(r["times"]),
                         vs_dense=statistics.median(per_round), vs_dense_min=min(per_round),
                         vs_dense_max=max(per_round), ratio=r["ratio"], **r["kv"]))
    B, L = np.asarray(model_inputs(after.model, batch)["ids"]).shape
    return dict(rows=rows, run=args.run, step=after.step, batch=B, prompt=L, p=args.p, new=args.new,
                rounds=args.rounds)


def table(rows: list[dict]) -> str:
    lines = ["| model | attention | accuracy (n) | token ratio | s / rollout (median) | tok/s | time / dense: median "
             "(min - max) | per-layer ratio | KV slots per row and layer | KV MB allocated | KV MB kept | "
             "kept / dense kept |",
             "|" + "---|" * 12]
    dense_kept = {r["model"]: r["kept"] for r in rows if r["attention"] == "dense"}
    for r in rows:
        a = r["answers"]
        lines.append(f"| {r['model']} | {r['attention']} | {a['accuracy']:.3f} +- {a['accuracy_se']:.3f} ({a['n']}) | "
                     f"{r['ratio']:.3f} | {r['s']:.3f} | {r['tok_s']:.0f} | {r['vs_dense']:.2f} "
                     f"({r['vs_dense_min']:.2f} - {r['vs_dense_max']:.2f}) | "
                     f"{' '.join(f'{x:.2f}' for x in r['layer_ratio'])} | {r['slots']} | "
                     f"{r['allocated'] / 2**20:.2f} | {r['kept'] / 2**20:.2f} | {r['kept'] / dense_kept[r['model']]:.2f} |")
    return "\n".join(lines)


def write_section(result: dict, argv, path: str | None = None) -> str:
    cmd = "python benchmarks/sparse_rollout_trained.py " + " ".join(shlex.quote(a) for a in argv)
    body = (f"{SECTION}\n\nCommand: `{cmd.strip()}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"jax {jax.__version__}, CPU, float32). Model: the run `{result['run']}` (step {result['step']}) and the "
            f"weights its RL started from; timing batch: {result['batch']} held-out prompts of the run's task "
            f"(padded to {result['prompt']} tokens), {result['new']} new tokens per row (greedy; no early stop), "
            f"{result['rounds']} interleaved rounds. Accuracy: the run's stop tokens, on the held-out split "
            "(+- one binomial standard error).\n\n"
            f"{table(result['rows'])}\n\n{NOTE}")
    return replace_section(SECTION, body, path)


NOTE = ("Reading: 'KV MB allocated' is the decode cache the rollout holds (CPU and accelerators alike); its slots "
        "are set by the longest kept prompt over rows AND layers (one stacked [layers, rows, slots] cache), so the "
        "layer that keeps most of its prompt (see the per-layer ratios of the timing batch) sizes the cache for all. 'KV MB kept' is what each layer really keeps (plus the new tokens): the bytes a decode "
        "kernel that stops at each layer's length reads per step (the Pallas decode kernels on TPU / GPU); the "
        "xla path used on CPU reads every allocated slot, so the CPU time follows the allocated column. Timings "
        "are CPU timings of a TINY model on a shared 2-core machine.\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="training run directory (scripts/train.py's log.out_dir)")
    ap.add_argument("--p", type=float, default=0.975, help="top-p threshold of the sparse rollouts")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64, help="new tokens per row in the timed rollouts")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--accuracy-examples", type=int, default=512)
    ap.add_argument("--workdir", default=None, help="where a tokenizer may be written (default: a temp dir)")
    ap.add_argument("--write-md", action="store_true", help="update the section of BENCHMARKS.md in place")
    args = ap.parse_args(argv)
    if not 0.0 < args.p < 1.0:
        raise SystemExit(f"--p must be in (0, 1) (a sparse threshold), got {args.p}")
    for name in ("batch", "new", "rounds", "accuracy_examples"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run_bench(args)
    print(table(result["rows"]))
    if args.write_md:
        write_section(result, argv)
    return result


if __name__ == "__main__":
    main()
