"""What the ZipR1 selection itself costs at real size, next to the prefill it saves (ESTIMATES).

Per sparse decoder layer of Qwen2.5-VL-7B (N=28 q heads, K=4 kv heads, H=128, bf16 q/k; the
selection scores in float32), B=1, a prefill of S tokens, default SelectionConfig: R = probe slots
(`num_probe_slots`: 5% recent + 5% random of S, at least 16; 820 at 8k, 3278 at 32k).

  scores  `choose_probes` + `probe_scores`: logits q_probe . k as [K, G, R, S] float32 (2*N*R*S*H
          FLOPs, ~8 FLOPs per element for scale / masks / max / exp / sums / divide). Bytes: XLA
          materialises the logits once and reads them in 3 reductions (max; sum of exp; sum of the
          probabilities): 4 passes of 4*N*R*S bytes, + q probes, k and the [S] outputs.
  cut     `topp_keep` + `always_kept` + `compact` (+ `attend_kept`'s compact): 5 stable sorts of S
          keys (2 in choose_probes, 1 top-p, 2 compactions), each ~S log2 S compares, 16*S bytes,
          + ~12 elementwise [S] passes; and the compaction gather of the kept K and V (T = keep*S
          rows read + written: 8*T*K*H bytes, bf16).
  soft    the learner's relaxed ratio, grad of `jax.checkpoint(soft_token_ratio)` w.r.t. q and k:
          forward, rematerialised forward, dq and dk = 4 matmuls of 2*N*R*S*H; bytes 13 logits
          passes (forward 4, remat 4, backward 5: recompute probabilities twice, write dlogits,
          read them for dq and dk).

Cross-check: the same functions are compiled with abstract `ShapeDtypeStruct` inputs (no memory
allocated) for XLA CPU and, with `--deps DIR` (.ci/aot_deps.sh), deviceless for TPU v5e (libtpu
v5e:2x2) and H100 (jax CUDA plugin); `cost_analysis()` gives FLOPs and bytes accessed (CPU, TPU;
None for CUDA), `memory_analysis()` the temp allocation. Time = max(FLOPs / peak, bytes / HBM bw).

Saving: dense minus sparse prefill of a layer with `roofline.prefill_count` (our kernels' issued
FLOPs and compulsory bytes, kv mode, K/V gather moved to the selection), at keep 0.5 and 0.3. In
kv mode (and qkv) every token still runs the projections and the MLP, so the saving is attention only.

    .ci/aot_deps.sh /tmp/aot_deps   # once
    python benchmarks/selection_cost.py --deps /tmp/aot_deps --write
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import roofline  # noqa: E402
from _markdown import replace_section  # noqa: E402

SECTION = "## Selection cost at real size (deviceless compiles)"
LENGTHS = (8192, 32768)
KEEPS = (0.5, 0.3)
N, K, H, ITEM = roofline.N_HEADS, roofline.KV_HEADS, roofline.HEAD_DIM, roofline.ITEM
D, F, LAYERS = 3584, 18944, 28  # Qwen2.5-VL-7B text (qwen2_5_vl_7b().text; checked by the test)
PEAKS = roofline.PEAKS
ELEM, SORTS, S_PASSES, SOFT_ELEM = 8, 5, 12, 24
SCORE_PASSES, SOFT_PASSES = 4, 13


def probes(S: int) -> int:
    from zipr1_jax.kernels.sparse_attention.config import SelectionConfig
    from zipr1_jax.kernels.sparse_attention.selection import num_probe_slots

    return num_probe_slots(S, SelectionConfig())


def analytic(S: int, keep: float) -> dict:
    """(FLOPs, HBM bytes) per layer of each part; see the module docstring."""
    R, T = probes(S), math.ceil(keep * S)
    nrs = N * R * S
    inputs = R * N * H * (ITEM + 4) + S * K * H * (ITEM + 4) + 3 * S * 4
    scores = (2 * nrs * H + ELEM * nrs, SCORE_PASSES * 4 * nrs + inputs)
    cut = (SORTS * S * math.log2(S) + S_PASSES * S, SORTS * 16 * S + S_PASSES * 4 * S + 8 * T * K * H)
    soft = (4 * 2 * nrs * H + SOFT_ELEM * nrs, SOFT_PASSES * 4 * nrs + 3 * inputs)
    # Not built: a flash-style two-pass bf16 scoring kernel (pass 1 row max / sum, pass 2 recompute and add
    # a / den per key) does the matmul twice and keeps the [N, R, S] logits on chip.
    fused = (2 * scores[0] + cut[0], inputs - (R * N + S * K) * H * 4 + cut[1])
    return dict(R=R, T=T, scores=scores, cut=cut, selection=tuple(a + b for a, b in zip(scores, cut)),
                soft=soft, fused=fused)


# ---------------------------------------------------------------------------------------------
def functions(S: int, keep: float):
    """(name -> (fn, abstract-arg shapes)) of the parts; called as the model calls them."""
    import jax
    import jax.numpy as jnp

    from zipr1_jax.kernels.sparse_attention.config import SelectionConfig
    from zipr1_jax.kernels.sparse_attention.selection import (always_kept, choose_probes, compact,
                                                              probe_scores, soft_token_ratio, topp_keep)

    cfg, T = SelectionConfig(), math.ceil(keep * S)
    bf, f32 = jnp.bfloat16, jnp.float32
    qkv = [((1, S, N, H), bf), ((1, S, K, H), bf), ((1, S), jnp.bool_), ((), jnp.uint32)]

    def scores(q, k, valid, seed):
        pos, ok, _ = choose_probes(valid, cfg, jax.random.key(seed)[None])
        return probe_scores(q, k, valid, pos, ok, normalise=cfg.normalise)

    def cut(score, valid, p, k, v):
        keep_BS = topp_keep(score, valid, p) | always_kept(valid, cfg)
        sel = compact(compact(keep_BS, valid).keep_BS, keep_BS)  # select_topp's, then attend_kept's
        idx = sel.kept_idx_BT[:, :T]
        return jnp.take_along_axis(k, idx[:, :, None, None], 1), jnp.take_along_axis(v, idx[:, :, None, None], 1)

    def soft(q, k, valid, seed):
        def ratio(q, k):
            return soft_token_ratio(q, k, valid, jnp.full((1,), 0.95, f32), temperature=0.05, config=cfg,
                                    rng=jax.random.key(seed)[None]).sum()
        return jax.value_and_grad(jax.checkpoint(ratio), argnums=(0, 1))(q, k)  # the loss uses the value

    cut_args = [((1, S), f32), ((1, S), jnp.bool_), ((1,), f32), ((1, S, K, H), bf), ((1, S, K, H), bf)]
    return dict(scores=(scores, qkv), cut=(cut, cut_args), soft=(soft, qkv))


def compiled_cost(name: str, S: int, keep: float, platform: str = "cpu"):
    """(flops, bytes accessed, temp bytes) of one part compiled for `platform` (cpu / v5e / h100)."""
    import jax
    from jax.sharding import SingleDeviceSharding

    fn, specs = functions(S, keep)[name]
    sh = None if platform == "cpu" else SingleDeviceSharding(roofline._device(platform))
    args = [jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in specs]
    try:
        compiled = jax.jit(fn).trace(*args).lower().compile()
    except Exception as e:  # noqa: BLE001 - a real-size compile may not fit the target: report it
        print(f"[{platform}] {name} S={S}: compile failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
        return None, None, f"compile failed ({type(e).__name__})"
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    mem = compiled.memory_analysis()
    return cost.get("flops"), cost.get("bytes accessed"), None if mem is None else mem.temp_size_in_bytes


def layer_prefill(platform: str, L: int) -> dict:
    """Roofline seconds of one layer's prefill: attention at keep 1 / KEEPS (kernel), projections + MLP."""
    peak, bw = PEAKS[platform]
    att = {}
    for keep in (1.0,) + KEEPS:
        c = roofline.prefill_count(platform, L, keep)
        gather = 2 * 2 * int(L * keep) * K * H * ITEM  # the K/V gather of prefill_count, counted in the selection
        att[keep] = max(c.flops_kernel / peak, (c.bytes_min - gather) / bw)
    w = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    dense_rest = max(2 * L * w / peak, (w * ITEM + L * (4 * D + 2 * F) * ITEM) / bw)
    return dict(att=att, rest=dense_rest, saving={k: att[1.0] - att[k] for k in KEEPS})


def roof(platform: str, flops: float, nbytes: float):
    peak, bw = PEAKS[platform]
    return max(flops / peak, nbytes / bw), ("compute" if flops / peak >= nbytes / bw else "memory")


# ---------------------------------------------------------------------------------------------
def rows(lengths, targets):
    out = []
    for L in lengths:
        a = {keep: analytic(L, keep) for keep in KEEPS}
        xla = {}
        for plat in ("cpu",) + tuple(targets):
            for part in ("scores", "cut", "soft"):
                t0 = time.time()
                xla[(plat, part)] = compiled_cost(part, L, KEEPS[0], plat)
                print(f"[{plat}] {part} L={L}: {time.time() - t0:.1f}s {xla[(plat, part)]}", file=sys.stderr)
        for plat in ("v5e", "h100"):
            pre = layer_prefill(plat, L)
            for part, label, mult in (("selection", "selection (rollout prefill)", 1.0),
                                      ("fused", "selection, fused bf16 scoring (hypothetical)", 1.0),
                                      ("soft", "soft ratio fwd + remat bwd (learner)", 3.5)):
                fl, by = a[KEEPS[0]][part]
                t, bound = roof(plat, fl, by)
                frac = {}
                for keep in KEEPS:
                    tk = roof(plat, *a[keep][part])[0]
                    frac[keep] = tk / (mult * pre["saving"][keep])
                none = (None, None, None)
                xc = _sum_parts(xla, "cpu", part) if part != "fused" else none
                xt = _sum_parts(xla, plat, part) if plat in targets and part != "fused" else none
                out.append(dict(target=roofline.TARGET_NAMES[plat], plat=plat, L=L, R=a[KEEPS[0]]["R"], part=label,
                                flops=fl, bytes=by, xla_cpu=xc, xla_tgt=xt, t=t, bound=bound, frac=frac,
                                saving=pre["saving"], mult=mult,
                                layer=mult * (pre["att"][1.0] + pre["rest"])))
    return out


def _sum_parts(xla, plat, part):
    """Summed flops / bytes of the part's executables (None if any is missing); temp = the largest (they
    run one after another) or the compile failure."""
    got = [xla.get((plat, n), (None, None, None)) for n in (("scores", "cut") if part == "selection" else ("soft",))]
    fails = [g[2] for g in got if isinstance(g[2], str)]
    if fails:
        return None, None, fails[0]
    flops, nbytes = ([g[i] for g in got] for i in (0, 1))
    temps = [g[2] for g in got if g[2] is not None]
    return (None if None in flops else sum(flops), None if None in nbytes else sum(nbytes),
            max(temps) if temps else None)


def _f(x, scale, nd=1):
    return "n/a" if x is None else f"{x / scale:.{nd}f}"


def _fx(x, scale, nd=1):
    return x if isinstance(x, str) else _f(x, scale, nd)


def table(rs) -> str:
    lines = ["| target | L | part (per sparse layer) | R | GFLOP | GB HBM | XLA CPU GFLOP / GB | XLA target GFLOP / "
             "GB | target temp GB | est. us (bound) | whole model ms (28 layers) | saving us keep 0.5 / 0.3 | "
             "cost / saving keep 0.5 | cost / saving keep 0.3 | cost / dense layer (attn + MLP) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        xc, xt = r["xla_cpu"], r["xla_tgt"]
        tgt = f"{_f(xt[0], 1e9)} / {_f(xt[1], 1e9, 2)}"
        temp = xt[2] if isinstance(xt[2], str) else _f(xt[2], 1e9, 2)
        if r["part"].startswith("selection, fused"):
            tgt = temp = "-"
            xc = ("-",) * 2
        sv = " / ".join(f"{r['mult'] * r['saving'][k] * 1e6:.0f}" for k in KEEPS)
        lines.append(f"| {r['target']} | {r['L'] // 1024}k | {r['part']} | {r['R']} | {r['flops'] / 1e9:.1f} | "
                     f"{r['bytes'] / 1e9:.2f} | {_fx(xc[0], 1e9)} / {_fx(xc[1], 1e9, 2)} | {tgt} | {temp} | "
                     f"{r['t'] * 1e6:.0f} ({r['bound']}) | {r['t'] * LAYERS * 1e3:.1f} | {sv} | "
                     f"{100 * r['frac'][0.5]:.0f}% | {100 * r['frac'][0.3]:.0f}% | {100 * r['t'] / r['layer']:.1f}% |")
    return "\n".join(lines) + "\n"


def section(tab: str, cmd: str, rs) -> str:
    import jax

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{SECTION}\n\n"
        "**ESTIMATES, not measurements** (no TPU or GPU used). What the selection itself costs per sparse decoder "
        "layer of Qwen2.5-VL-7B, next to the prefill it saves. Command: "
        f"`{cmd}` (jax {jax.__version__}, run {when}; `benchmarks/selection_cost.py` docstring has the formulas).\n\n"
        "Assumptions: B=1 prompt of L tokens, every one of the 28 decoder layers sparse (SparsityConfig default), "
        "default `SelectionConfig` (probes 5% recent + 5% random, min 16: R probe slots), N=28 q heads summed per "
        "K=4 kv-head group, H=128, q/k bf16 and probe logits float32 (`precision='highest'`), K/V bf16. "
        "selection = `choose_probes` + `probe_scores` + `topp_keep` + `always_kept` + `compact` (x2) + the "
        "gather of the kept K/V (T = keep x L rows); soft ratio = grad of the checkpointed `soft_token_ratio` "
        "(what the learner adds per layer; it reuses the rollout's kept sets, so it runs no hard selection). "
        "GFLOP / GB: analytic, at keep 0.5. XLA columns: `cost_analysis()` flops / bytes accessed of the "
        "same functions compiled from abstract inputs for XLA CPU and deviceless for the target (libtpu v5e:2x2; "
        "for H100 the CUDA compile gives no cost analysis, only `memory_analysis()` temp), summed over the "
        "scores and cut executables. Time = max(GFLOP / peak, GB / HBM bandwidth) with the bf16 peaks "
        "(v5e 197 TF/s, 819 GB/s; H100 989 TF/s, 3.35 TB/s). Saving = dense minus sparse attention prefill of "
        "the layer from `benchmarks/roofline.py`'s kernel counts (issued FLOPs, compulsory bytes, kv mode, "
        "the K/V gather moved into the selection); for the soft ratio the learner's saving is taken as 3.5x "
        "the forward one (flash-style backward: 5 matmuls vs 2). Projections and MLP run on every token in "
        "both modes, so they are not saved; the last column compares with the whole dense layer "
        "(attention + projections + MLP; x3.5 for the learner row, slightly generous to the MLP whose fwd + "
        "bwd is 3x).\n\n"
        + tab +
        "\nReading:\n" + reading(rs) + "\n")


def reading(rs) -> str:
    """The conclusions, with the numbers of this run."""
    by = {(r["plat"], r["L"], r["part"].split(",")[0].split(" (")[0]): r for r in rs}
    sel = [r for r in rs if r["part"].startswith("selection (")]
    fus = [r for r in rs if r["part"].startswith("selection, fused")]
    soft = [r for r in rs if r["part"].startswith("soft")]

    def span(group, keep):
        vals = [100 * r["frac"][keep] for r in group]
        return f"{min(vals):.0f}-{max(vals):.0f}%"

    lo, hi = min(r["L"] for r in rs), max(r["L"] for r in rs)
    nrs_gb = {L: 4 * N * by[("v5e", L, "selection")]["R"] * L / 1e9 for L in (lo, hi)}
    def ratio(key, plats):
        got = [r[key][1] / r["bytes"] for r in sel + soft if r["plat"] in plats and r[key][1]]
        return f"{min(got):.2f}-{max(got):.2f}x" if got else "n/a"

    ratios = (f"XLA's bytes accessed / analytic: TPU compile {ratio('xla_tgt', ('v5e',))}, "
              f"CPU {ratio('xla_cpu', ('v5e', 'h100'))}")
    a = analytic(lo, 0.5)
    cut_pct = 100 * a["cut"][1] / a["selection"][1]
    temps = ", ".join(f"{r['target']} {_fx(r['xla_tgt'][2], 1e9, 1)} GB" for r in soft if r["L"] == hi)
    whole = [f"{r['target']} {r['L'] // 1024}k {r['t'] * LAYERS * 1e3:.0f} ms vs "
             f"{r['saving'][0.5] * LAYERS * 1e3:.0f} ms saved" for r in sel]
    return (
        f"- The probe logits dominate: [N, R, S] float32 is {nrs_gb[lo]:.2f} GB per layer at {lo // 1024}k and "
        f"{nrs_gb[hi]:.1f} GB at {hi // 1024}k; XLA writes it once and reads it back for the max, the exp-sum and "
        f"the probability sum ({ratios}; the temp column shows the logits live in HBM). At ~16 FLOP/byte "
        "this is memory-bound on both targets (ridges "
        "240 and 295 FLOP/byte), so the float32 `highest` matmul (6 bf16 passes on TPU, no tensor cores on H100) "
        f"does not change the estimate. Sorts, cumsum, compaction and the K/V gather are {cut_pct:.1f}% of the "
        "analytic bytes (XLA TPU counts ~8x that for them, its sorts making several passes; sort latency is "
        "not modelled).\n"
        f"- As written, the selection costs {span(sel, 0.5)} of the attention prefill it saves at keep 0.5 and "
        f"{span(sel, 0.3)} at keep 0.3: probes x keys grows like attention (R ~ 10% of L), but each logit costs "
        "16 bytes of HBM while the attention kernels keep theirs on chip. For the whole model (28 layers, keep "
        f"0.5): {'; '.join(whole)}. Against the whole dense layer (projections + MLP included) it is the "
        "last column. The prefill does not pay for itself; the pruned KV cache in decode (not counted here) "
        "is where the selection earns its keep.\n"
        f"- The learner's soft ratio (fwd + rematerialised bwd) costs {span(soft, 0.5)} of the learner's "
        f"attention saving at keep 0.5 ({span(soft, 0.3)} at 0.3). Its compiled temp at {hi // 1024}k: {temps} "
        f"(HBM: v5e 16 GB, H100 80 GB), alive one layer at a time (rematerialised).\n"
        f"- A fused two-pass bf16 scoring kernel (not built) would bring the selection to {span(fus, 0.5)} of the "
        f"saving at keep 0.5 ({span(fus, 0.3)} at 0.3): {'/'.join(sorted({r['bound'] for r in fus}))}-bound, 2x the "
        "matmul, no logits in HBM.\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deps", help="directory with libtpu + jax CUDA plugin (.ci/aot_deps.sh DIR); "
                                   "without it only the XLA CPU cross-check runs")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated prompt lengths")
    ap.add_argument("--write", action="store_true", help=f"replace/append the '{SECTION}' section of BENCHMARKS.md")
    args = ap.parse_args(argv)
    roofline._env(args.deps)
    targets = ("v5e", "h100") if args.deps else ()
    rs = rows([int(x) for x in args.lengths.split(",")], targets)
    tab = table(rs)
    print(tab)
    if args.write:
        cmd = (".ci/aot_deps.sh DIR && python benchmarks/selection_cost.py --deps DIR --write" if args.deps
               else "python benchmarks/selection_cost.py --write")
        replace_section(SECTION, section(tab, cmd, rs))
    return rs


if __name__ == "__main__":
    main()
