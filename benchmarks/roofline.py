"""Roofline ESTIMATES (not measurements) of the Pallas sparse-attention kernels on TPU v5e and H100.

No accelerator is lent to this project, so every number here comes from a deviceless AOT compile
(the recipe of tests/aot: libtpu's v5e:2x2 topology, the jax CUDA plugin's H100 target) plus
analytic counts of what our kernels do:

- FLOPs: XLA's `cost_analysis()` does not count the FLOPs inside a Pallas custom call (and is None
  for the CUDA compile), so they are analytic: 2 matmuls (QK^T, PV) of 2 FLOPs per MAC ->
  `4 * B * N * H * pairs`, where `pairs` = sum over queries of the keys they see. "useful" counts
  the causally visible kept pairs exactly (about L * T_eff with T_eff ~ kept * (L + 1) / 2); "kernel"
  counts what the kernel issues: every executed (q block, k block) tile, i.e. after the block-skip
  tables of pallas_common.positions_and_tables, `4 * B * N * H * bq * bk * tiles` (decode: padded
  GQA rows x executed key blocks). Softmax exp/max work (EUP/SFU) is not counted.
- Bytes: analytic HBM traffic of the kernels with their real block sizes (q read and o written
  once per query block; every executed tile's K/V (+ key positions) block DMA'd once per query
  head; the TPU kernels' lane-broadcast [rows, 128] f32 position / logsumexp blocks included) plus
  the read+write of the kept K/V gather. The compiled footprint (`memory_analysis()`: arguments +
  outputs + temps) is reported alongside as a cross-check of what the executable allocates.
- Time: max(FLOPs_kernel / peak, bytes / bandwidth), peaks below; "bound" says which term wins.

Prefill: B=1, Qwen2.5-VL-7B attention (N=28, K=4, H=128, bf16), kv mode: all L queries attend to
the kept keys (25% kept: a random 25% of positions plus the first token; dense: every key),
causal. Decode: B=8, one new token, cache holding the prefill context (dense) or its 25% kept
entries (pruned). Run with the toolchains of .ci/aot_deps.sh:

    .ci/aot_deps.sh /tmp/aot_deps   # once
    python benchmarks/roofline.py --deps /tmp/aot_deps --write
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from _markdown import replace_section  # noqa: E402

PEAKS = {  # (peak dense bf16 FLOP/s, HBM bytes/s), public spec sheets
    "v5e": (197e12, 819e9),
    "h100": (989e12, 3.35e12),
}
TARGET_NAMES = {"v5e": "TPU v5e (1 chip)", "h100": "H100 SXM"}
N_HEADS, KV_HEADS, HEAD_DIM, ITEM = 28, 4, 128, 2  # bf16
PREFILL_L = (8192, 32768)
DECODE_CTX = (8192, 32768)
DECODE_B = 8
KEPT = 0.25
SECTION = "## Roofline estimates (deviceless compiles)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_TARGET = os.environ.get("ZIPR1_H100_TARGET",
                             os.path.join(ROOT, "tests", "aot", "targets", "h100_sxm.txtpb"))


def _env(deps: str | None):
    """Environment of the deviceless recipe; must run before jax is imported."""
    if deps:
        sys.path.insert(0, os.path.abspath(deps))
    for k, v in (("JAX_PLATFORMS", "cpu"), ("TPU_SKIP_MDS_QUERY", "1"),
                 ("TPU_WORKER_HOSTNAMES", "localhost"), ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")):
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------------------------------------
# Analytic counts
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Count:
    flops_useful: float
    flops_kernel: float
    bytes: float  # kernel DMA traffic: every executed tile's K/V block fetched per query head
    bytes_min: float  # compulsory: every kernel operand / result touched once


def kept_positions(L: int, kept: float):
    import numpy as np

    if kept >= 1.0:
        return np.arange(L)
    rng = np.random.default_rng(0)
    T = int(L * kept)
    rest = rng.choice(np.arange(1, L), size=T - 1, replace=False)
    return np.sort(np.concatenate([[0], rest]))


def prefill_count(platform: str, L: int, kept: float) -> Count:
    """Forward of sparse_attention(kv mode, capacity T) with the platform's default blocks."""
    import numpy as np

    from zipr1_jax.kernels.sparse_attention import gpu, tpu
    from zipr1_jax.kernels.sparse_attention.blocks import TPU_LANE, TPU_SUBLANE, BlockSizes, next_pow2

    B, N, K, H = 1, N_HEADS, KV_HEADS, HEAD_DIM
    k_pos = kept_positions(L, kept)
    T = len(k_pos)
    bs = BlockSizes.default("tpu" if platform == "v5e" else "triton")
    if platform == "v5e":
        bq, bq_b = tpu._fit(bs.block_q, L, TPU_SUBLANE), tpu._fit(bs.block_q_bwd, L, TPU_SUBLANE)
        bk, bk_b = tpu._fit(bs.block_k, T, TPU_LANE), tpu._fit(bs.block_k_bwd, T, TPU_LANE)
        mq, mk = math.lcm(bq, bq_b), math.lcm(bk, bk_b)  # tpu.attend_compact_tpu's padding
        Lp, Tp, Hp = -(-L // mq) * mq, -(-T // mk) * mk, H
    else:
        bq, bq_b = gpu._fit(bs.block_q, L), gpu._fit(bs.block_q_bwd, L)
        bk, bk_b = gpu._fit(bs.block_k, T), gpu._fit(bs.block_k_bwd, T)
        mq, mk = max(bq, bq_b), max(bk, bk_b)  # gpu.attend_compact_triton's padding
        Lp, Tp, Hp = -(-L // mq) * mq, -(-T // mk) * mk, next_pow2(H)
    q_pos = np.concatenate([np.arange(L), np.full(Lp - L, -1)])
    kp = np.concatenate([k_pos, np.full(Tp - T, np.iinfo(np.int32).max)])
    q_max = q_pos.reshape(-1, bq).max(-1)
    k_min = kp.reshape(-1, bk).min(-1)
    needed = k_min[None, :] <= q_max[:, None]
    n_kb = np.max(np.where(needed, np.arange(1, len(k_min) + 1)[None, :], 0), axis=1)
    tiles = int(n_kb.sum())
    pairs = float(np.searchsorted(k_pos, np.arange(L), side="right").sum())
    useful = 4.0 * B * N * H * pairs
    kernel = 4.0 * B * N * Hp * bq * bk * tiles
    if platform == "v5e":  # q, o (bf16) + lse and q-position blocks lane-broadcast to 128 f32
        row_bytes, pos_row = 2 * Hp * ITEM + TPU_LANE * 4, TPU_LANE * 4
        per_tile, kpos_col = 2 * bk * Hp * ITEM + TPU_SUBLANE * bk * 4, TPU_SUBLANE * 4
    else:  # q, o (bf16, head_dim padded to a power of 2) + lse, q positions (f32 / int32)
        row_bytes, pos_row = 2 * Hp * ITEM + 4, 4
        per_tile, kpos_col = 2 * bk * Hp * ITEM + bk * 4, 4
    gather = 2 * 2 * B * T * K * H * ITEM  # kept K and V: read rows + write compact copy
    traffic = B * N * (Lp * (row_bytes + pos_row) + tiles * per_tile) + gather
    compulsory = B * (N * Lp * row_bytes + Lp * pos_row + Tp * (2 * K * Hp * ITEM + kpos_col)) + gather
    return Count(useful, kernel, traffic, compulsory)


def decode_count(platform: str, B: int, S: int) -> Count:
    """One new token per row over a cache of S valid entries (length == S)."""
    from zipr1_jax.kernels.sparse_attention import gpu, tpu
    from zipr1_jax.kernels.sparse_attention.blocks import TPU_LANE, TPU_SUBLANE, BlockSizes, next_pow2

    N, K, H = N_HEADS, KV_HEADS, HEAD_DIM
    G = N // K
    useful = 4.0 * B * N * H * S
    if platform == "v5e":
        bk = tpu._fit(BlockSizes.default("tpu").block_k_decode, S, TPU_LANE)
        Rp, Hp = -(-G // TPU_SUBLANE) * TPU_SUBLANE, H
        n_kb = -(-S // bk)
        kernel = 4.0 * B * K * Rp * bk * Hp * n_kb
        nbytes = B * (2 * K * Rp * Hp * ITEM + Rp * TPU_LANE * 4 + n_kb * 2 * bk * K * Hp * ITEM)
    else:
        bk = gpu._fit(BlockSizes.default("triton").block_k_decode, S)
        Rp, Hp = max(16, next_pow2(G)), next_pow2(H)
        n_kb = -(-S // bk)
        kernel = 4.0 * B * K * Rp * bk * Hp * n_kb
        nbytes = B * K * (2 * Rp * Hp * ITEM + Rp * 4 + n_kb * 2 * bk * Hp * ITEM)
    return Count(useful, kernel, nbytes, nbytes)  # each cache block is fetched once per row


# ---------------------------------------------------------------------------------------------
# Deviceless compiles (footprint + XLA's own cost analysis of the glue)
# ---------------------------------------------------------------------------------------------
def _device(platform: str):
    from jax.experimental import topologies

    if platform == "h100":
        with open(H100_TARGET) as f:
            topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=f.read())
    else:
        topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    return topo.devices[0]


def compile_stats(platform: str, kind: str, size: int, kept: float):
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from zipr1_jax.kernels.sparse_attention import decode_attention, sparse_attention

    backend = "pallas_tpu" if platform == "v5e" else "pallas_triton"
    sh = SingleDeviceSharding(_device(platform))

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    bf = jnp.bfloat16
    if kind == "prefill":
        L, T = size, int(size * kept)
        args = (spec((1, L, N_HEADS, HEAD_DIM), bf), spec((1, L, KV_HEADS, HEAD_DIM), bf),
                spec((1, L, KV_HEADS, HEAD_DIM), bf), spec((1, T), jnp.int32), spec((1,), jnp.int32))

        def fn(q, k, v, idx, count):
            return sparse_attention(q, k, v, kept_idx_BT=idx, kept_count_B=count, backend=backend,
                                    capacity=T)
    else:
        S = int(size * kept)
        args = (spec((DECODE_B, 1, N_HEADS, HEAD_DIM), bf), spec((DECODE_B, S, KV_HEADS, HEAD_DIM), bf),
                spec((DECODE_B, S, KV_HEADS, HEAD_DIM), bf), spec((DECODE_B,), jnp.int32))
        fn = functools.partial(decode_attention, backend=backend)
    t0 = time.time()
    try:
        compiled = jax.jit(fn).trace(*args).lower().compile()
    except Exception as e:  # noqa: BLE001 - name the case, keep the compiler's message
        raise RuntimeError(f"deviceless {platform} compile of {kind} size={size} kept={kept} failed: "
                           f"{type(e).__name__}: {e}") from e
    mem = compiled.memory_analysis()
    footprint = None
    if mem is not None:
        footprint = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_flops = None if not cost else cost.get("flops")
    return footprint, xla_flops, time.time() - t0


# ---------------------------------------------------------------------------------------------
def _fmt(x, scale, nd=1):
    return "n/a" if x is None else f"{x / scale:.{nd}f}"


def rows():
    out = []
    for platform in ("v5e", "h100"):
        peak, bw = PEAKS[platform]
        cases = [("prefill fwd", "prefill", L, kept) for L in PREFILL_L for kept in (KEPT, 1.0)]
        cases += [("decode step", "decode", S, kept) for S in DECODE_CTX for kept in (KEPT, 1.0)]
        times = {}
        for label, kind, size, kept in cases:
            c = prefill_count(platform, size, kept) if kind == "prefill" else \
                decode_count(platform, DECODE_B, int(size * kept))
            footprint, xla_flops, secs = compile_stats(platform, kind, size, kept)
            t_c, t_m = c.flops_kernel / peak, c.bytes / bw
            t, t_min = max(t_c, t_m), max(t_c, c.bytes_min / bw)
            times[(kind, size, kept)] = (t_min, t)
            what = (f"L={size}, {'sparse 25% kept' if kept < 1 else 'dense'}" if kind == "prefill"
                    else f"B={DECODE_B}, ctx {size}, {'pruned cache (25%)' if kept < 1 else 'dense cache'}")
            out.append(dict(target=TARGET_NAMES[platform], case=f"{label}: {what}", c=c, t=t,
                            t_min=t_min,
                            bound="compute" if t_c >= t_m else "memory",
                            bound_min="compute" if t_c >= c.bytes_min / bw else "memory",
                            footprint=footprint,
                            xla_flops=xla_flops, secs=secs, key=(platform, kind, size, kept)))
            print(f"[{platform}] {label} {what}: compile {secs:.1f}s", file=sys.stderr)
        for r in out:
            p, kind, size, kept = r["key"]
            if p == platform:
                dense = times[(kind, size, 1.0)]
                r["speedup"] = (dense[0] / r["t_min"], dense[1] / r["t"]) if kept < 1 else None
    return out


def table(rs) -> str:
    lines = ["| target | case | GFLOP useful | GFLOP kernel | MB compulsory | MB kernel DMA | compiled "
             "footprint MB | XLA GFLOP (glue) | est. time us (compulsory bytes) | est. time us (kernel DMA) "
             "| est. speed-up vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        c = r["c"]
        sp = "" if r["speedup"] is None else f"{r['speedup'][0]:.2f}x / {r['speedup'][1]:.2f}x"
        lines.append(f"| {r['target']} | {r['case']} | {c.flops_useful / 1e9:.1f} | "
                     f"{c.flops_kernel / 1e9:.1f} | "
                     f"{c.bytes_min / 1e6:.1f} | {c.bytes / 1e6:.1f} | {_fmt(r['footprint'], 1e6)} | "
                     f"{_fmt(r['xla_flops'], 1e9, 3)} | {r['t_min'] * 1e6:.1f} ({r['bound_min']}) | "
                     f"{r['t'] * 1e6:.1f} ({r['bound']}) | {sp} |")
    return "\n".join(lines) + "\n"


def section(tab: str, cmd: str) -> str:
    import jax

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{SECTION}\n\n"
        "**ESTIMATES, not measurements**: no TPU or GPU was used. Each row is compiled ahead of time "
        "for the named target on a CPU-only machine (libtpu `v5e:2x2` topology, jax CUDA plugin with "
        "the H100 SXM target description); the time is a roofline bound from analytic FLOP / byte "
        "counts of our kernels, so real kernels will be slower (softmax/exp work, pipeline bubbles, "
        "imperfect overlap, launch overheads are not modelled).\n\n"
        f"Command: `{cmd}` (jax {jax.__version__}, run {when}).\n\n"
        "Peaks used: TPU v5e 197 TFLOP/s bf16 and 819 GB/s HBM (one chip); H100 SXM 989 TFLOP/s dense "
        "bf16 (no sparsity) and 3.35 TB/s HBM3. Estimated time = max(GFLOP kernel / peak, bytes / bandwidth), "
        "once with the compulsory bytes and once with the kernel DMA bytes (lower / upper view of the "
        "memory term).\n\n"
        "Shapes: Qwen2.5-VL-7B attention, N=28 query heads, K=4 kv heads, head_dim 128, bf16, default "
        "block sizes (TPU fwd 256x512, decode keys 512; Triton fwd 64x64, decode keys 64). Prefill: B=1, "
        "`sparse_attention` kv mode (every query attends to the kept keys, causal), 25% kept = the first "
        "token + a random 25% of positions (seed 0); dense = the same kernel with every key kept. Decode: "
        "B=8, one new token, cache of the prefill context (dense) or of its 25% kept entries (pruned).\n\n"
        "FLOPs: `cost_analysis()` does not see inside Pallas custom calls (the 'XLA GFLOP (glue)' column "
        "is all it counts: gathers, transposes, skip tables) and is unavailable for the CUDA compile, so "
        "FLOPs are analytic: `4 * B * N * H * pairs` (QK^T and PV, 2 FLOPs per MAC). 'useful' = causally "
        "visible kept (query, key) pairs (prefill: ~ L * kept * (L + 1) / 2; decode: the cache length per "
        "token); 'kernel' = what the kernel issues after block skipping (executed tiles x bq x bk; decode: "
        "GQA rows padded to 8 on TPU / 16 on Triton). Bytes: 'compulsory' = every kernel operand and "
        "result touched once (q, o, logsumexp, positions, compact K/V; on TPU the logsumexp and query "
        "positions are lane-broadcast [rows, 128] f32) + the read/write of the kept K/V gather; 'kernel "
        "DMA' = what the kernels' BlockSpecs fetch (K/V blocks of every executed tile again for every "
        "query head and query block). 'compiled footprint' = `memory_analysis()` arguments + outputs + "
        "temps of the same executable. Speed-up = dense time / sparse time (compulsory / kernel DMA).\n\n"
        + tab +
        "\nReading:\n"
        "- Prefill at 25% kept: the kernels issue ~4x fewer FLOPs than dense; the excess over 'useful' is "
        "block granularity (TPU 8k: a 512-key block of the compact sequence spans ~2k original positions, "
        "so diagonal tiles are partly masked: 150 vs 119 GFLOP; 7% at 32k; 1-4% for the 64x64 Triton tiles).\n"
        "- With compulsory bytes prefill is compute-bound on both targets and the estimate follows the FLOP "
        "ratio (3.4x-4.0x). Counting every K/V block re-fetch, the default TPU forward tile (256 queries x "
        "512 keys, ~240 FLOP/byte) sits at the v5e ridge (197e12 / 819e9 = 240 FLOP/byte), so a larger "
        "block_q would be needed to be safely compute-bound (untested on hardware). The Triton 64x64 tiles "
        "would be memory-bound if every re-read went to HBM; on H100 the 7 query heads of a GQA group and "
        "neighbouring query blocks share K/V through the 50 MB L2, so the real time lies between the two "
        "columns.\n"
        "- Decode is memory-bound: the step time follows the cache bytes read, so the pruned (25%) cache "
        "gives ~4x on both targets; the kernels read only blocks below `length`.\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deps", help="directory with libtpu + jax CUDA plugin (.ci/aot_deps.sh DIR)")
    ap.add_argument("--write", action="store_true",
                    help=f"replace/append the '{SECTION}' section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    _env(args.deps)
    t0 = time.time()
    tab = table(rows())
    print(tab)
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
    if args.write:
        deps = "--deps DIR " if args.deps else ""
        cmd = f".ci/aot_deps.sh DIR && python benchmarks/roofline.py {deps}--write"
        replace_section(SECTION, section(tab, cmd))


if __name__ == "__main__":
    main()
