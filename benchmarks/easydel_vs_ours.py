"""The JAX peer side by side: zipr1_jax vs EasyDeL on the same tiny Qwen2-VL weights, one run.

Same on both sides: a random Qwen2-VL built with transformers (benchmarks/rollout.py's
`bench_config` / `random_hf_model`) and saved with `save_pretrained`; ours loads the directory
with zipr1_jax's HF loader (`load_hf_checkpoint`), EasyDeL with
`AutoEasyDeLModelForImageTextToText.from_pretrained` (its torch-checkpoint converter; float32
params, fp32 attention dtypes, `Precision.HIGHEST`, vanilla attention, a 1-device mesh). Prompts: B text
rows left padded to L. Timed, each side's call waited for:
  forward  - one jitted full forward of the B x L prompt batch to logits (tokens/s = B*L / s);
  generate - greedy decoding of exactly `--new` tokens per row (stop id outside the vocabulary):
             ours `zipr1_jax.rl.rollout.generate`, EasyDeL `model.generate` (its HF-style jitted
             sampler); tokens/s = B*new / s.
Before timing both sides' logits and greedy tokens are compared (a loader or model mismatch
fails the run). EasyDeL runs in its OWN venv (benchmarks/setup_easydel_venv.sh; `--easydel-python`
or ZIPR1_EASYDEL_PYTHON), in one subprocess stepped over a pipe; after one untimed call per
(side, op) (the compile, reported apart), `--repeats` rounds run every (side, op) once in turn,
so load changes on this shared machine hit both sides alike. Reported: ours / EasyDeL time
ratio per round, min / median / max.

    nice -n 10 python benchmarks/easydel_vs_ours.py [--batch 8 --prompt 512 --new 64 --repeats 5]
        [--easydel-python /work/easydel_venv/bin/python] [--write-md]

Two workarounds for EasyDeL 0.3.0 bugs, applied to EasyDeL's copy of the checkpoint's config.json
only (the weights are the same file): (1) its Qwen2VLForConditionalGeneration reads a top-level
`vocab_size`, which transformers 5's `save_pretrained` writes only under `text_config`
(AttributeError: 'Qwen2VLConfig' object has no attribute 'vocab_size'); the hub's Qwen2-VL
config.json has it at the top level, so we add it there. (2) Its Qwen2-VL text attention takes
its projection biases from `text_config.attention_bias` (default False), but Qwen2 has q/k/v
biases: without `attention_bias: true` the checkpoint's biases are silently dropped (loading
allows mismatches) and the logits differ; with it o_proj gets a bias too, absent from the
checkpoint, which loads as unset (unused; a loaded value would be zeroed). Also its attention
dtypes default to bf16 (`attn_dtype`, `kvdtype`): the worker sets them to fp32.

This file is also the EasyDeL worker (`--easydel-worker SPEC.json`, run by the EasyDeL venv's
python), so jax, torch and zipr1_jax are imported lazily. `main(argv) -> dict` is importable;
`--no-easydel` runs our side only (tests/benchmarks/test_easydel_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from _markdown import replace_section  # noqa: E402

for _k, _v in (("JAX_PLATFORMS", "cpu"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

SECTION = "## zipr1_jax vs EasyDeL (the JAX peer)"
PROTO = "@@easydel-bench "  # prefix of the worker's protocol lines on stdout (other output is skipped)
OPS = ("forward", "generate")
HERE = os.path.dirname(os.path.abspath(__file__))
# Logit gap allowed, relative to the largest |logit|. Ours matches transformers to ~1e-6; EasyDeL 0.3.0
# stays ~1e-3 relative away even in fp32 (its RoPE tables are cast to bf16 in `get_frequencies`, and a
# gap remains at position 0, untraced); a dropped or mis-mapped tensor gives ~0.1 (seen: the q/k/v
# biases without workaround (2)).
LOGITS_RTOL = 2e-2


def _emit(kind: str, **payload) -> None:
    print(PROTO + json.dumps({"kind": kind, **payload}), flush=True)


def easydel_config(src_dir: str, dst_dir: str) -> None:
    """EasyDeL's copy of the checkpoint: the same safetensors (hard link or copy) and a config.json
    with the two workarounds of the module docstring."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in os.listdir(src_dir):
        if name != "config.json":
            try:
                os.link(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            except OSError:
                shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.setdefault("vocab_size", cfg["text_config"]["vocab_size"])
    cfg["text_config"]["attention_bias"] = True
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# ---------------------------------------------------------------------- the EasyDeL side (its venv)
def load_easydel_model(model_dir: str):
    """(EasyDeL's Qwen2-VL from `model_dir`, the o_proj biases zeroed by workaround (2)): float32
    params and attention dtypes, `Precision.HIGHEST`, vanilla attention, a 1-device CPU mesh. Also
    used by the GRPO bench's EasyDeL worker (grpo_easydel_side.py)."""
    import easydel as ed
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model = ed.AutoEasyDeLModelForImageTextToText.from_pretrained(
        model_dir, dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
        backend=ed.EasyDeLBackends.CPU, platform=ed.EasyDeLPlatforms.JAX, sharding_axis_dims=(1, 1, 1, 1, 1),
        auto_shard_model=True, local_files_only=True, verbose=False,
        config_kwargs=ed.EasyDeLBaseConfigDict(attn_mechanism=ed.AttentionMechanisms.VANILLA, attn_dtype=jnp.float32,
                                               attn_softmax_dtype=jnp.float32, kvdtype=jnp.float32))
    zeroed = []
    for path, node in nnx.iter_graph(model):
        names = tuple(map(str, path))
        bias = getattr(node, "bias", None)
        # workaround (2): Qwen2 has no o_proj bias (a bias absent from the checkpoint loads as None: unused)
        if names and names[-1] == "o_proj" and "language_model" in names and bias is not None and \
                bias.get_value() is not None:
            bias.set_value(jnp.zeros_like(bias.get_value()))
            zeroed.append(".".join(names) + ".bias")
    return model, zeroed


def easydel_versions() -> dict:
    import easydel as ed
    import jax
    return {"easydel": ed.__version__, "jax": jax.__version__, "flax": getattr(__import__("flax"), "__version__", "?"),
            "transformers": __import__("transformers").__version__, "python": platform.python_version()}


def easydel_worker(spec_path: str) -> None:
    """Load the model, then serve "forward" / "generate" / "quit" lines from stdin; each op answers
    with its seconds, the first of each op also writes its outputs to spec["out_<op>"] (npz)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import GenerationConfig

    spec = json.load(open(spec_path))
    model, zeroed = load_easydel_model(spec["model_dir"])
    ids = jnp.asarray(np.load(spec["prompts"])["ids"], jnp.int32)
    mask = jnp.asarray(np.load(spec["prompts"])["mask"], jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(input_ids=ids, attention_mask=mask).logits

    gen_cfg = GenerationConfig(max_new_tokens=spec["new"], do_sample=False, eos_token_id=spec["never"],
                               pad_token_id=spec["pad_id"])

    def generate():
        return model.generate(ids, attention_mask=mask, generation_config=gen_cfg).sequences[:, ids.shape[1]:]

    ops = {"forward": lambda: forward(state, ids, mask), "generate": generate}
    _emit("init", versions=easydel_versions(), zeroed=zeroed)
    first = set()
    with model.mesh:
        for line in sys.stdin:
            op = line.strip()
            if op == "quit":
                break
            t0 = time.perf_counter()
            out = jax.block_until_ready(ops[op]())
            seconds = time.perf_counter() - t0
            if op not in first:
                first.add(op)
                np.savez(spec[f"out_{op}"], out=np.asarray(out))
            _emit("done", seconds=seconds)
    _emit("end")


class EasydelProcess:
    """The EasyDeL worker subprocess; between calls it waits on stdin, so it never runs beside a
    timed call of ours."""

    def __init__(self, python: str, spec: dict, workdir: str):
        path = os.path.join(workdir, "easydel_spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        self.log_path = os.path.join(workdir, "easydel.log")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--easydel-worker", path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env)
        init = self._expect("init")
        self.versions, self.zeroed = init["versions"], init["zeroed"]

    def _expect(self, kind: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                msg = json.loads(line[len(PROTO):])
                if msg["kind"] != kind:
                    raise RuntimeError(f"EasyDeL worker sent {msg['kind']!r}, expected {kind!r}")
                return msg
        self.proc.wait()
        self._log.flush()
        tail = "".join(open(self.log_path).readlines()[-40:])
        raise RuntimeError(f"EasyDeL worker exited with code {self.proc.returncode} while the driver waited for "
                           f"{kind!r}; last lines of {self.log_path}:\n{tail}")

    def run(self, op: str) -> float:
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        return self._expect("done")["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---------------------------------------------------------------------- our side (project venv)
def ours_ops(model_dir: str, p: dict, args, never: int, pad_id: int) -> tuple[dict, object]:
    """({op: no-argument call -> seconds}, outputs box) for our model loaded from `model_dir`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zipr1_jax.models.qwen_vl.loader import load_hf_checkpoint
    from zipr1_jax.models.qwen_vl.rope import get_rope_index
    from zipr1_jax.rl.rollout import SamplingConfig, generate

    cfg, model = load_hf_checkpoint(model_dir)
    ids, mask = jnp.asarray(p["ids"], jnp.int32), jnp.asarray(p["mask"], jnp.int32)
    pos_3BL = jnp.asarray(np.asarray(get_rope_index(cfg, p["ids"], p["mask"])[0]), jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask, pos):
        return nnx.merge(graphdef, state)(ids, attention_mask_BL=mask, position_ids_3BL=pos).logits

    sampling = SamplingConfig(max_new_tokens=args.new, eos_ids=(never,), pad_id=pad_id, temperature=0.0)
    key = jax.random.key(0)
    calls = {"forward": lambda: forward(state, ids, mask, pos_3BL),
             "generate": lambda: generate(model, ids, mask, key, config=sampling).tokens_BT}
    outs = {}

    def timed(op):
        def run():
            t0 = time.perf_counter()
            out = jax.block_until_ready(calls[op]())
            seconds = time.perf_counter() - t0
            outs.setdefault(op, np.asarray(out))
            return seconds
        return run
    return {op: timed(op) for op in OPS}, outs


# ---------------------------------------------------------------------- driver
def time_interleaved(sides: dict, *, repeats: int) -> dict:
    """sides: {(side, op): call -> seconds}. One untimed first call each, then `repeats` rounds of
    every call in turn. Returns {(side, op): dict(first_s, times)}."""
    res = {}
    for key, run in sides.items():
        print(f"  first call: {key} ...", flush=True)
        res[key] = dict(first_s=run(), times=[])
    for i in range(repeats):
        print(f"  round {i + 1}/{repeats} ...", flush=True)
        for key, run in sides.items():
            res[key]["times"].append(run())
    return res


def ratio_stats(ours: list[float], peer: list[float]) -> dict:
    """Per-round ours / peer time ratios: min, median, max (rounds pair the calls made side by side)."""
    r = [a / b for a, b in zip(ours, peer)]
    return dict(min=min(r), median=statistics.median(r), max=max(r))


def _easydel_python(args) -> str:
    python = args.easydel_python or os.environ.get("ZIPR1_EASYDEL_PYTHON") or os.path.join(
        os.path.dirname(os.path.dirname(HERE)), "easydel_venv", "bin", "python")
    if not os.path.isfile(python):
        raise SystemExit(f"no EasyDeL python at {python!r}: build it with `bash benchmarks/setup_easydel_venv.sh` and "
                         "pass --easydel-python or set ZIPR1_EASYDEL_PYTHON (or run with --no-easydel)")
    return python


def _rollout_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rollout_bench", os.path.join(HERE, "rollout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(args) -> dict:
    import flax
    import jax
    import transformers

    transformers.logging.set_verbosity_error()
    rb = _rollout_bench()
    load_before = rb.load_average()
    cfg = rb.bench_config(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    never = cfg.text.vocab_size  # outside the vocabulary: every row decodes exactly `new` tokens
    p = rb.prompt_batch(cfg, batch=args.batch, prompt=args.prompt, image=False, seed=args.seed)
    peer, result = None, dict(config=cfg, args=vars(args))
    with tempfile.TemporaryDirectory(prefix="easydel_bench_") as work:
        model_dir = os.path.join(work, "model")
        rb.random_hf_model(cfg, args.seed).save_pretrained(model_dir)
        ours_calls, outs = ours_ops(model_dir, p, args, never, cfg.pad_token_id)
        sides = {("zipr1_jax", op): run for op, run in ours_calls.items()}
        try:
            if not args.no_easydel:
                ed_dir = os.path.join(work, "model_easydel")
                easydel_config(model_dir, ed_dir)
                np.savez(os.path.join(work, "prompts.npz"), ids=p["ids"], mask=p["mask"])
                spec = dict(model_dir=ed_dir, prompts=os.path.join(work, "prompts.npz"), new=args.new, never=never,
                            pad_id=cfg.pad_token_id, **{f"out_{op}": os.path.join(work, f"ed_{op}.npz") for op in OPS})
                print("  starting the EasyDeL worker ...", flush=True)
                peer = EasydelProcess(_easydel_python(args), spec, work)
                for op in OPS:
                    sides[("EasyDeL", op)] = (lambda op: lambda: peer.run(op))(op)
            res = time_interleaved(sides, repeats=args.repeats)
            if peer is not None:
                peer_out = {op: np.load(spec[f"out_{op}"])["out"] for op in OPS}
        finally:
            if peer is not None:
                peer.close()
    valid = p["mask"].astype(bool)
    rows = []
    for op in OPS:
        n_tok = args.batch * (args.prompt if op == "forward" else args.new)
        o = res[("zipr1_jax", op)]
        row = dict(op=op, tokens=n_tok, ours_first_s=o["first_s"], ours_s=statistics.median(o["times"]),
                   ours_tok_s=n_tok / statistics.median(o["times"]))
        if peer is not None:
            e = res[("EasyDeL", op)]
            row.update(ed_first_s=e["first_s"], ed_s=statistics.median(e["times"]),
                       ed_tok_s=n_tok / statistics.median(e["times"]), ratio=ratio_stats(o["times"], e["times"]))
            if op == "forward":
                gap_BL = np.where(valid[..., None], np.abs(outs[op] - peer_out[op]), 0.0).max(-1)
                diff = float(gap_BL.max()) / float(np.abs(outs[op][valid]).max())
                row["logits_max_abs_by_row"] = [float(g) for g in gap_BL.max(-1)]
                row["pad_by_row"] = [int(n) for n in (~valid).sum(-1)]
                row["logits_rel"] = diff
                if not diff <= LOGITS_RTOL:
                    raise RuntimeError(f"ours and EasyDeL logits differ by {diff:.3g} x max |logit| on the same "
                                       f"weights (> {LOGITS_RTOL}): the two models are not the same function (max "
                                       f"gap by "
                                       f"row {row['logits_max_abs_by_row']}, left padding by row {row['pad_by_row']})")
            else:
                if peer_out[op].shape != outs[op].shape:
                    raise RuntimeError(f"EasyDeL generated {peer_out[op].shape} tokens, ours {outs[op].shape}")
                row["agreement"] = float(np.mean(peer_out[op] == outs[op]))
        rows.append(row)
    versions = dict(jax=jax.__version__, flax=flax.__version__, transformers=transformers.__version__)
    if peer is not None:
        versions.update({f"easydel_venv_{k}": v for k, v in peer.versions.items()})
        result["zeroed"] = peer.zeroed
    result.update(rows=rows, versions=versions, load=(load_before, rb.load_average()))
    return result


# ---------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    lines = ["| op | tokens per call | ours first call s | ours s (median) | ours tok/s | EasyDeL first call s | "
             "EasyDeL s (median) | EasyDeL tok/s | ours / EasyDeL time: median (min - max over rounds) | check |",
             "|" + "---|" * 10]
    for r in rows:
        if "ratio" in r:
            q = r["ratio"]
            peer = (f"{r['ed_first_s']:.2f} | {r['ed_s']:.4f} | {r['ed_tok_s']:.0f} | "
                    f"{q['median']:.2f} ({q['min']:.2f} - {q['max']:.2f})")
            check = (f"logits max gap / max abs {r['logits_rel']:.1e}" if "logits_rel" in r
                     else f"greedy agreement {r['agreement']:.3f}")
        else:
            peer, check = "n/a | n/a | n/a | n/a", "n/a"
        lines.append(f"| {r['op']} | {r['tokens']} | {r['ours_first_s']:.2f} | {r['ours_s']:.4f} | "
                     f"{r['ours_tok_s']:.0f} | {peer} | {check} |")
    return "\n".join(lines)


def write_section(result: dict, args, path: str | None = None, note: str = "") -> str:
    v, t = result["versions"], result["config"].text
    cmd = (f"bash benchmarks/setup_easydel_venv.sh /work/easydel_venv && "
           f"ZIPR1_EASYDEL_PYTHON=/work/easydel_venv/bin/python nice -n 10 python benchmarks/easydel_vs_ours.py "
           f"--batch {args.batch} --prompt {args.prompt} --new {args.new} --repeats {args.repeats} --write-md")
    ed_v = (f"EasyDeL venv: easydel {v['easydel_venv_easydel']}, jax {v['easydel_venv_jax']}, flax "
            f"{v['easydel_venv_flax']}, transformers {v['easydel_venv_transformers']}; "
            if "easydel_venv_easydel" in v else "EasyDeL not run; ")
    body = (f"{SECTION}\n\n"
            f"Command: `{cmd}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU "
            f"cores shared with other jobs, load average {result['load'][0]} before, {result['load'][1]} after; "
            f"float32 on both sides). Versions: {ed_v}project venv: jax {v['jax']}, flax {v['flax']}, "
            f"transformers {v['transformers']}.\n"
            f"Model: random Qwen2-VL built with transformers' `Qwen2VLConfig` as in the rollout section (hidden "
            f"{t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads / {t.num_key_value_heads} "
            f"KV heads, MLP {t.intermediate_size}, vocab {t.vocab_size}), saved with `save_pretrained`; ours loads "
            "the directory with `zipr1_jax.models.qwen_vl.loader.load_hf_checkpoint`, EasyDeL with "
            "`AutoEasyDeLModelForImageTextToText.from_pretrained` (fp32, `Precision.HIGHEST`, vanilla attention, "
            f"1-device mesh). Prompts: {args.batch} text rows left padded to {args.prompt} (lengths "
            f"{args.prompt // 2}..{args.prompt}). forward = one jitted full forward to logits (tok/s = B x L / s); "
            f"generate = greedy, exactly {args.new} new tokens per row (stop id outside the vocabulary; ours "
            "`zipr1_jax.rl.rollout.generate`, EasyDeL `model.generate`), tok/s = B x new / s. First call = compile "
            f"+ one call; then {args.repeats} rounds, every (side, op) once per round in turn; the ratio is ours / "
            "EasyDeL time per round (lower is better for ours). Check = both sides on the same inputs, before "
            "timing (the run fails if the logits' largest gap exceeds "
            f"{LOGITS_RTOL} x their largest magnitude).\n\n{table(result['rows'])}\n\n"
            "EasyDeL 0.3.0 needed two config workarounds to load a transformers-5 Qwen2-VL checkpoint correctly "
            "(applied to its copy of config.json only; see the script's docstring): a top-level `vocab_size`, and "
            "`text_config.attention_bias: true` - without it EasyDeL builds Qwen2-VL's text attention without the "
            "q/k/v biases and silently drops them from the checkpoint (greedy tokens then diverge from the first "
            "step); with it o_proj is given a bias Qwen2 lacks, which loads as unset (unused; the worker would zero a "
            f"loaded one: zeroed here: {result.get('zeroed') or 'none'}). Its attention dtypes default to bf16 "
            "(`attn_dtype`, `kvdtype`); we set them to fp32. A ~2e-3 relative logit gap remains (its RoPE tables are "
            "cast to bf16 in `get_frequencies`; a gap at position 0 was not traced further); greedy tokens agree. "
            "EasyDeL runs in its own venv (jax 0.9.2: its ejkernel pin needs jax~=0.9.0), so the two sides also "
            "differ in XLA version. A GRPO step with EasyDeL's own `GRPOTrainer` (it runs on CPU) is timed beside "
            f"ours and TRL's in 'One GRPO step vs TRL GRPOTrainer' (`grpo_step_vs_trl.py --easydel`).{note}\n")
    return replace_section(SECTION, body, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512, help="padded prompt length")
    ap.add_argument("--new", type=int, default=64, help="generated tokens per row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--easydel-python", default=None, help="python of the EasyDeL venv (else $ZIPR1_EASYDEL_PYTHON)")
    ap.add_argument("--no-easydel", action="store_true", help="our side only (no EasyDeL venv needed)")
    ap.add_argument("--write-md", action="store_true", help="update the section of BENCHMARKS.md in place")
    args = ap.parse_args(argv)
    for name in ("batch", "prompt", "new", "repeats", "layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden % 32:
        raise SystemExit(f"--hidden must be a multiple of 32 (4 heads, M-RoPE sections), got {args.hidden}")
    return args


def main(argv=None) -> dict:
    """Run the comparison; returns {"rows": [per-op dicts], "config", "versions", "load"}."""
    args = parse_args(argv)
    result = run_bench(args)
    print(f"versions: {result['versions']}")
    print(table(result["rows"]))
    if args.write_md:
        write_section(result, args)
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--easydel-worker":
        easydel_worker(sys.argv[2])
    else:
        main()
