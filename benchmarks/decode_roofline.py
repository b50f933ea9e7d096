"""The cached decode step as a fraction of its memory roofline on THIS machine, measured in one run.

    python benchmarks/decode_roofline.py --batch 8 --prompt 512 --new 64 --write-md

A decode step reads every text weight once (embedding row aside) and each layer's KV cache; at this
size it does ~2 FLOP per weight byte per row, so it is memory-bound and its floor is
bytes / (copy bandwidth). The bandwidth is measured in the same run with a jitted read + write of
a buffer several times the last-level cache. The step time is the median per step of a jitted
`fori_loop` of `decode_step` calls on a donated cache (what the rollout's while_loop runs), dense
(cache capacity = prompt + new) and with a pruned cache (the kept fraction of the prompt).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_model import add_model_args, bench_config  # noqa: E402
from _markdown import add_md_args, replace_section  # noqa: E402

from zipr1_jax.models.qwen_vl.cache import KVCache  # noqa: E402
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration  # noqa: E402

SECTION = "## Decode step vs its memory roofline"


def step_bytes(model, batch: int, capacity: int) -> dict[str, int]:
    """Bytes one decode step must move at least: text weights (no vision tower, one embedding row
    per token) and every layer's K and V cache over `capacity` slots (the xla path reads them all)."""
    t = model.config.text
    params = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    text = sum(x.size * x.dtype.itemsize for path, x in flat if "visual" not in jax.tree_util.keystr(path))
    embed = t.vocab_size * t.hidden_size * 4
    if not t.tie_word_embeddings:
        text -= embed  # the input embedding is gathered (B rows), not read whole; lm_head is
    cache = 2 * t.num_hidden_layers * batch * capacity * t.num_key_value_heads * t.head_dim * 4
    return {"weights": int(text), "cache": int(cache), "total": int(text + cache)}


def copy_bandwidth(mb: int = 256, repeats: int = 7) -> float:
    """Bytes/s of a jitted in-place elementwise read + write of an `mb` MiB float32 buffer (median)."""
    x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    nbytes = x.nbytes
    # Donated: written in place, so no fresh output buffer (and its first-touch page faults) per call.
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x = f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def decode_loop(model, batch: int, capacity: int, kept: int, steps: int):
    """A jitted function running `steps` greedy decode steps on a cache of `capacity` slots whose
    rows hold `kept` entries (random keys / values: the cost does not depend on them)."""
    t = model.config.text
    shape = (t.num_hidden_layers, batch, capacity, t.num_key_value_heads, t.head_dim)
    keys = jax.random.split(jax.random.key(0), 2)
    k, v = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    length = jnp.full((t.num_hidden_layers, batch), kept, jnp.int32)
    graphdef, state = nnx.split(model)

    def run(state, k, v, length, tok):
        m = nnx.merge(graphdef, state)

        def body(i, carry):
            k, v, length, tok = carry
            pos = jnp.broadcast_to((length[0] + i)[None, :, None], (3, batch, 1))
            logits, cache = m.decode_step(tok[:, None], KVCache(k=k, v=v, length=length), position_ids_3BT=pos,
                                          backend="xla")
            return cache.k, cache.v, cache.length, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (k, v, length, tok))

    fn = jax.jit(run, donate_argnums=(1, 2))
    return fn, (state, k, v, length, jnp.zeros((batch,), jnp.int32))


def time_steps(fn, args, steps: int, repeats: int) -> list[float]:
    state, k, v, length, tok = args
    out = fn(state, k, v, length, tok)  # compile + one run
    times = []
    for _ in range(repeats):
        k, v, length, tok = out
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(state, k, v, length - steps, tok))  # same lengths every call
        times.append((time.perf_counter() - t0) / steps)
    return times


def run_bench(args) -> dict:
    model = QwenVLForConditionalGeneration(bench_config(hidden=args.hidden, layers=args.layers, vocab=args.vocab),
                                           rngs=nnx.Rngs(0))
    dense_cap = args.prompt + args.new
    kept = max(1, int(round(args.keep * args.prompt)))
    sparse_cap = -(-(kept + args.new) // 8) * 8
    bw = copy_bandwidth(args.copy_mb)
    rows = []
    for name, cap, n in (("dense", dense_cap, args.prompt), (f"pruned (keep {args.keep:g})", sparse_cap, kept)):
        fn, fargs = decode_loop(model, args.batch, cap, n, args.steps)
        times = time_steps(fn, fargs, args.steps, args.repeats)
        b = step_bytes(model, args.batch, cap)
        med = statistics.median(times)
        rows.append(dict(case=name, capacity=cap, ms=med * 1e3, ms_min=min(times) * 1e3, ms_max=max(times) * 1e3,
                         weights_mb=b["weights"] / 1e6, cache_mb=b["cache"] / 1e6, floor_ms=b["total"] / bw * 1e3,
                         fraction=b["total"] / bw / med))
    return {"bandwidth_gbs": bw / 1e9, "rows": rows}


def write_section(result: dict, args, path: str | None = None) -> str:
    lines = ["| cache | slots | ms / step (median; min - max) | weights MB | KV cache MB | roofline ms | "
             "roofline / measured |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['capacity']} | {r['ms']:.2f} ({r['ms_min']:.2f} - {r['ms_max']:.2f}) | "
                     f"{r['weights_mb']:.1f} | {r['cache_mb']:.1f} | {r['floor_ms']:.2f} | {r['fraction']:.0%} |")
    body = (f"{SECTION}\n\nCommand: `python benchmarks/decode_roofline.py --batch {args.batch} --prompt {args.prompt} "
            f"--new {args.new} --keep {args.keep} --write-md` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"jax {jax.__version__}, CPU, float32). Model: the rollout section's tiny Qwen2-VL (hidden {args.hidden}, "
            f"{args.layers} layers, vocab {args.vocab}), B = {args.batch}. Copy bandwidth measured in the same run: "
            f"{result['bandwidth_gbs']:.1f} GB/s (jitted read + write of {args.copy_mb} MiB). Step = median over "
            f"{args.repeats} calls of a jitted `fori_loop` of {args.steps} greedy `decode_step`s on a donated cache "
            "(xla path). Roofline = (text weights + K/V cache bytes) / bandwidth.\n\n" + "\n".join(lines) +
            "\n\nReading: the fraction is how close a step comes to only streaming its weights and cache once "
            "from memory. The working set (~30 MB) is near the last-level cache, so the DRAM floor is itself "
            "optimistic. The pruned cache cuts the step roughly in proportion to its bytes. Where the rest goes "
            "(XLA's profiler on the dense step, 2026-12-06): ~45 large ops of ~170 per step take 90% of it - the "
            "four layers' score dots (~0.3 ms each: 2.4 MB of keys read at ~7 GB/s, the value dots reach ~17 GB/s), "
            "the MLP's [8, 256] x [256, 704] dots (~0.15 ms each, against ~0.04 ms for the same dot in a loop of "
            "its own) and the per-layer slice / zeroing copies of the cache; a step pinned to ONE core takes the "
            "same time as on two (a serial chain of small ops). Tried in interleaved A/B runs, none faster by more "
            "than the noise (time ratios 0.97-1.2): per-layer cache buffers (no slice copies), skipping the value "
            "zeroing, scores as a multiply-reduce, fused q/k/v and gate/up weights, the batch split into "
            "independent halves (in one program or two), and XLA CPU options (YNN fusion types, oneDNN, XNNPACK "
            "off, fast math, flush-to-zero).\n")
    return replace_section(SECTION, body, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.4, help="kept fraction of the prompt in the pruned cache")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--copy-mb", type=int, default=256)
    add_model_args(ap)
    add_md_args(ap)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_bench(args)
    print(f"copy bandwidth {result['bandwidth_gbs']:.1f} GB/s")
    for r in result["rows"]:
        print(f"{r['case']}: {r['ms']:.2f} ms/step, roofline {r['floor_ms']:.2f} ms ({r['fraction']:.0%})")
    if args.write_md:
        write_section(result, args, args.md_path)
    return result


if __name__ == "__main__":
    main()
