"""Rollout throughput: zipr1_jax `generate` vs Hugging Face `model.generate`, same weights, one run.

Both sides get the same tiny random Qwen2-VL (built with transformers' `Qwen2VLConfig`, our copy
imported with `from_hf_state_dict`) and the same left-padded prompt batch, and decode greedily for
exactly `--new` tokens (the stop id is outside the vocabulary, so no row stops early on either
side). Reported per case (text-only prompts, and prompts holding one image per row):

  - ours: first-call time (jit compile + one rollout) and the steady-state median over `--repeats`
    calls (`jax.block_until_ready`), as generated tokens per second (B * new / seconds);
  - HF: `model.generate(do_sample=False, max_new_tokens=new)` on CPU torch (one untimed warm-up
    call, then the median over `--repeats`), timed with `torch.set_num_threads(<cores>)` and with
    one thread (on a shared machine OpenMP's all-core barriers can be 10x slower than one thread:
    the ours / HF ratio uses the faster HF);
  - the timed calls are interleaved (one call of every sampler per round), so a load change on a
    shared machine hits every column alike; the load average is reported with the results;
  - ours / HF throughput ratio and the greedy agreement (fraction of equal generated tokens; fp32
    on both sides, so it should be 1.0 — a real correctness check, not just a timing);
  - sparse rollouts (every row p = --sparse-p, default 0.9, `model.sparse_prefill`) if the model
    has that hook, with the decode KV-cache slots they held versus the dense rollouts'.

    nice -n 10 python benchmarks/rollout.py [--batch 8 --prompt 64 --new 64 --repeats 3] [--write-md]

`--write-md` replaces the "Rollout throughput vs Hugging Face generate" section of BENCHMARKS.md.
`main(argv) -> dict` is importable (tests/benchmarks/test_rollout_bench.py runs it tiny).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from zipr1_jax.models.qwen_vl import config as C  # noqa: E402
from zipr1_jax.models.qwen_vl.loader import from_hf_state_dict  # noqa: E402
from zipr1_jax.rl.rollout import SPARSE_PREFILL_METHOD, SamplingConfig, generate  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from _bench_model import bench_config  # noqa: E402, F401 (used here and by the other benchmarks as rb.bench_config)
from _markdown import replace_section  # noqa: E402

SECTION = "## Rollout throughput vs Hugging Face generate"
SPARSE_P = 0.9
IMAGE_GRID = (1, 8, 8)  # 112x112 px -> 64 patches -> 16 merged image tokens per row
NOTE = ("Reading: CPU timings of a TINY model, so they measure per-token overhead more than FLOPs: HF "
        "`generate` runs a Python loop with one eager torch forward per token (logits processors, "
        "stopping criteria, a growing DynamicCache), ours is two compiled XLA programs per rollout (the "
        "prefill, then a `lax.while_loop` decode over a static-capacity cache), paid for by jit compiles "
        "once per (prompt shape, image grid, SamplingConfig, cache capacity). Do not read the ratio as "
        "an accelerator or real-size-model number: at real sizes both sides are matmul-bound and the gap "
        "shrinks. Sparse column: the top-p selection and KV compaction run in the prefill; the decode "
        "cache is then allocated at the kept size (rounded up to 1/8 of the prompt) plus the new tokens, "
        "so decode holds and reads fewer slots (the KV slots in brackets); selection costs prefill time, "
        "so short prompts and high p gain little or lose (this random tiny model attends nearly "
        "uniformly: the token ratio is about p). On this shared machine HF is very sensitive to other "
        "jobs: with all cores, torch's OpenMP regions wait for threads whose core another process took, "
        "so its time swings by 10x run to run, while one thread is stable; our XLA program varies by "
        "about +-20%. On a quieter machine the all-core HF column is the one to compare with and the "
        "ratio is smaller than under load.\n")


# ---------------------------------------------------------------------- model + prompts
@torch.no_grad()
def random_hf_model(cfg: C.QwenVLConfig, seed: int) -> transformers.Qwen2VLForConditionalGeneration:
    """HF model with O(1)-scale random weights: HF's 0.02 init gives near-uniform logits, where greedy
    ties would make the token-agreement check meaningless."""
    hf_cfg = transformers.Qwen2VLConfig(**cfg.to_hf_config())
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            scale = 0.25 if "embed_tokens" in name else 1.0 / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:  # norm weights
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    return model


def prompt_batch(cfg: C.QwenVLConfig, *, batch: int, prompt: int, image: bool, seed: int) -> dict:
    """Left-padded prompts of lengths in [prompt/2, prompt] (the last row full), optionally with one
    image block per row; returns numpy ids / mask / mm_token_type_ids (+ pixels and grids)."""
    rng = np.random.default_rng(seed)
    n_img = int(np.prod(IMAGE_GRID)) // cfg.vision.merge_unit
    block = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
    shortest = len(block) + 2 if image else 1
    if prompt < shortest:
        raise ValueError(f"--prompt {prompt} is too short for an image block of {len(block)} tokens "
                         f"(need >= {shortest})")
    lengths = rng.integers(max(prompt // 2, shortest), prompt + 1, size=batch)
    lengths[-1] = prompt
    ids = np.full((batch, prompt), cfg.pad_token_id, np.int64)
    mask = np.zeros((batch, prompt), np.int64)
    for b, n in enumerate(lengths):
        row = rng.integers(0, cfg.image_token_id, size=n)  # ordinary text ids only
        if image:
            row[1:1 + len(block)] = block
        ids[b, prompt - n:], mask[b, prompt - n:] = row, 1
    out = dict(ids=ids, mask=mask, mm=(ids == cfg.image_token_id).astype(np.int64))
    if image:
        out["grid"] = np.array([IMAGE_GRID] * batch, np.int64)
        out["pixels"] = rng.standard_normal((batch * int(np.prod(IMAGE_GRID)), cfg.vision.patch_dim)).astype(np.float32)
    return out


# ---------------------------------------------------------------------- the two samplers
def ours_runner(model, p: dict, sampling: SamplingConfig, *, p_B=None):
    """A no-argument call of our `generate` that waits for the result (host -> RolloutOutput)."""
    vision = dict(pixel_values=p["pixels"], image_grid_thw=p["grid"]) if "grid" in p else {}
    key = jax.random.key(0)
    return lambda: jax.block_until_ready(generate(model, p["ids"], p["mask"], key, config=sampling, p_B=p_B,
                                                  **vision))


def hf_runner(model, p: dict, *, new: int, eos_id: int, pad_id: int, threads: int):
    """A no-argument greedy `model.generate` call on `threads` torch threads, returning the generated
    ids [B, new] (numpy)."""
    kw = dict(input_ids=torch.tensor(p["ids"]), attention_mask=torch.tensor(p["mask"]))
    if "grid" in p:
        kw.update(pixel_values=torch.tensor(p["pixels"]), image_grid_thw=torch.tensor(p["grid"]),
                  mm_token_type_ids=torch.tensor(p["mm"]))

    @torch.no_grad()
    def run():
        torch.set_num_threads(threads)
        seq = model.generate(**kw, do_sample=False, max_new_tokens=new, eos_token_id=eos_id, pad_token_id=pad_id)
        return seq[:, p["ids"].shape[1]:].numpy()
    return run


def time_interleaved(runners: dict, *, repeats: int) -> dict:
    """First call of each runner (our jit compile; HF's untimed warm-up), then `repeats` rounds that
    call every runner once in turn, so load changes on a shared machine hit all sides alike.
    Returns {name: dict(first_s, steady_s (median), out (last result))}."""
    res = {}
    for name, run in runners.items():
        print(f"  first call: {name} ...", flush=True)
        t0 = time.perf_counter()
        res[name] = dict(out=run(), first_s=time.perf_counter() - t0, times=[])
    for i in range(repeats):
        print(f"  round {i + 1}/{repeats} ...", flush=True)
        for name, run in runners.items():
            t0 = time.perf_counter()
            res[name]["out"] = run()
            res[name]["times"].append(time.perf_counter() - t0)
    for r in res.values():
        r["steady_s"] = statistics.median(r.pop("times"))
    return res


def bench_case(name: str, hf, ours, cfg: C.QwenVLConfig, args, *, image: bool) -> dict:
    p = prompt_batch(cfg, batch=args.batch, prompt=args.prompt, image=image, seed=args.seed)
    never = cfg.text.vocab_size  # outside the vocabulary: no row stops, both sides decode `new` tokens
    sampling = SamplingConfig(max_new_tokens=args.new, eos_ids=(never,), pad_id=cfg.pad_token_id, temperature=0.0)
    runners = dict(ours=ours_runner(ours, p, sampling))
    for n in args.threads:
        runners[f"hf@{n}"] = hf_runner(hf, p, new=args.new, eos_id=never, pad_id=cfg.pad_token_id, threads=n)
    if hasattr(ours, SPARSE_PREFILL_METHOD):
        runners["sparse"] = ours_runner(ours, p, sampling, p_B=np.full(args.batch, args.sparse_p, np.float32))
    print(f"[{name}]", flush=True)
    res = time_interleaved(runners, repeats=args.repeats)
    ours_tok = np.asarray(res["ours"]["out"].tokens_BT)
    n_tokens = args.batch * args.new
    hf_by_threads, agreement = {}, 1.0
    for n in args.threads:
        hf_tok = res[f"hf@{n}"]["out"]
        if hf_tok.shape != ours_tok.shape:
            raise RuntimeError(f"HF generated {hf_tok.shape} tokens, ours {ours_tok.shape}: a row stopped early, "
                               "so the throughputs are not comparable")
        hf_by_threads[n] = n_tokens / res[f"hf@{n}"]["steady_s"]
        agreement = min(agreement, float(np.mean(ours_tok == hf_tok)))
    best = max(hf_by_threads, key=hf_by_threads.get)
    dense = res["ours"]
    row = dict(case=name, batch=args.batch, prompt=args.prompt, new=args.new,
               ours_compile_s=max(dense["first_s"] - dense["steady_s"], 0.0), ours_first_s=dense["first_s"],
               ours_s=dense["steady_s"], ours_tok_s=n_tokens / dense["steady_s"], hf_by_threads=hf_by_threads,
               hf_threads=best, hf_s=res[f"hf@{best}"]["steady_s"], hf_tok_s=hf_by_threads[best],
               agreement=agreement, ours_tokens=ours_tok, hf_tokens=res[f"hf@{args.threads[0]}"]["out"])
    row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
    if "sparse" in res:
        sparse = res["sparse"]
        row.update(sparse_tok_s=n_tokens / sparse["steady_s"],
                   sparse_compile_s=max(sparse["first_s"] - sparse["steady_s"], 0.0),
                   sparse_token_ratio=float(np.mean(np.asarray(sparse["out"].token_ratio_B))),
                   sparse_p=args.sparse_p, sparse_kv=sparse["out"].kv_capacity, dense_kv=dense["out"].kv_capacity)
    return row


# ---------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    threads = list(rows[0]["hf_by_threads"])
    hf_cols = " | ".join(f"HF tok/s ({n} thr)" for n in threads)
    lines = [f"| case | B x (prompt + new) | ours compile s | ours s / rollout | ours tok/s | {hf_cols} | "
             f"ours / best HF | greedy agreement | sparse p={rows[0].get('sparse_p', SPARSE_P)} tok/s (token ratio; "
             "decode KV slots sparse / dense) |",
             "|" + "---|" * (8 + len(threads))]
    for r in rows:
        sparse = (f"{r['sparse_tok_s']:.0f} ({r['sparse_token_ratio']:.2f}; {r.get('sparse_kv', '?')} / "
                  f"{r.get('dense_kv', '?')})" if "sparse_tok_s" in r
                  else "n/a (no `sparse_prefill`)")
        hf = " | ".join(f"{r['hf_by_threads'][n]:.0f}" for n in threads)
        lines.append(f"| {r['case']} | {r['batch']} x ({r['prompt']} + {r['new']}) | {r['ours_compile_s']:.1f} | "
                     f"{r['ours_s']:.3f} | {r['ours_tok_s']:.0f} | {hf} | {r['ratio']:.1f}x | "
                     f"{r['agreement']:.3f} | {sparse} |")
    return "\n".join(lines)


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def machine_note(threads: list[int], load_before: str, load_after: str) -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs: "
            f"load average (1/5/15 min) {load_before} before, {load_after} after; torch {torch.__version__} with "
            f"{' and '.join(map(str, threads))} threads, jax on its default CPU thread pool, "
            f"transformers {transformers.__version__}, jax {jax.__version__}, "
            f"flax {flax.__version__}; float32 on both sides")


def write_section(result: dict, args, path: str | None = None) -> str:
    cfg = result["config"]
    t = cfg.text
    cmd = (f"nice -n 10 python benchmarks/rollout.py --batch {args.batch} --prompt {args.prompt} --new {args.new} "
           f"--repeats {args.repeats} --threads {','.join(map(str, args.threads))} --sparse-p {args.sparse_p}"
           f"{' --no-image' if args.no_image else ''} --write-md")
    body = (f"{SECTION}\n\n"
            f"Command: `{cmd}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{result['machine']}).\n"
            f"Model: random Qwen2-VL built with transformers' `Qwen2VLConfig` (hidden {t.hidden_size}, "
            f"{t.num_hidden_layers} layers, {t.num_attention_heads} heads / {t.num_key_value_heads} KV heads, "
            f"MLP {t.intermediate_size}, vocab {t.vocab_size}; vision depth {cfg.vision.depth}, width "
            f"{cfg.vision.hidden_size}), the same weights imported into ours with `from_hf_state_dict`. Prompts: "
            f"left padded to {args.prompt} (lengths {args.prompt // 2}..{args.prompt}); the image case puts one "
            f"{IMAGE_GRID} grid image ({int(np.prod(IMAGE_GRID)) // cfg.vision.merge_unit} tokens) in every row. "
            f"Greedy, exactly {args.new} new tokens per row (stop id outside the vocabulary). Ours: "
            "`zipr1_jax.rl.rollout.generate`, compile = first call - steady median; steady = median of "
            f"{args.repeats} calls with `block_until_ready`. HF: `model.generate(do_sample=False, "
            f"max_new_tokens={args.new})`, default attention (sdpa), one untimed warm-up, median of "
            f"{args.repeats}, once per torch thread count ({', '.join(map(str, args.threads))}; the ratio uses the "
            "faster). The timed calls alternate (ours, HF per thread count, sparse) round by round. tok/s = "
            "generated tokens (B x new) / seconds per rollout. Greedy agreement = fraction of equal generated "
            "tokens between ours and HF (the lowest over the thread counts).\n\n"
            f"{table(result['rows'])}\n\n{NOTE}")
    return replace_section(SECTION, body, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64, help="padded prompt length")
    ap.add_argument("--new", type=int, default=64, help="generated tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default=None,
                    help="comma-separated torch thread counts to time HF with (default: '<cores>,1'); on a "
                         "shared machine one thread can beat all cores by far (OpenMP waits on stolen cores)")
    ap.add_argument("--sparse-p", type=float, default=SPARSE_P, help="top-p threshold of the sparse rollouts")
    ap.add_argument("--no-image", action="store_true", help="skip the image-prompt case")
    ap.add_argument("--write-md", action="store_true", help="update the section of BENCHMARKS.md in place")
    args = ap.parse_args(argv)
    for name in ("batch", "prompt", "new", "repeats", "layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    cores = os.cpu_count() or 1
    try:
        threads = [int(t) for t in (args.threads or f"{cores},1").split(",")]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated ints, got {args.threads!r}") from None
    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads values must be >= 1, got {args.threads!r}")
    args.threads = list(dict.fromkeys(threads))  # dedupe, keep order (2 cores: "2,1"; 1 core: "1")
    if args.hidden % 32:
        raise SystemExit(f"--hidden must be a multiple of 32 (4 heads, M-RoPE sections), got {args.hidden}")
    return args


def main(argv=None) -> dict:
    """Run every case; returns {"rows": [per-case dicts incl. both token arrays], "config", "machine"}."""
    args = parse_args(argv)
    load_before = load_average()
    transformers.logging.set_verbosity_error()
    cfg = bench_config(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    hf = random_hf_model(cfg, args.seed)
    ours = from_hf_state_dict(cfg, hf.state_dict())
    if not hasattr(ours, SPARSE_PREFILL_METHOD):
        print(f"note: {type(ours).__name__} has no `{SPARSE_PREFILL_METHOD}`: the sparse column is skipped")
    rows = [bench_case("text", hf, ours, cfg, args, image=False)]
    if not args.no_image:
        rows.append(bench_case(f"image {IMAGE_GRID[1]}x{IMAGE_GRID[2]} patches", hf, ours, cfg, args, image=True))
    result = dict(rows=rows, config=cfg, machine=machine_note(args.threads, load_before, load_average()))
    print(f"machine: {result['machine']}")
    print(table(rows))
    for r in rows:
        if r["agreement"] < 1.0:
            print(f"WARNING [{r['case']}]: greedy tokens agree on only {r['agreement']:.3f} of positions")
    if args.write_md:
        write_section(result, args)
    return result


if __name__ == "__main__":
    main()
