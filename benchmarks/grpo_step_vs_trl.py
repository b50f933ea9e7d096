"""One GRPO step: zipr1_jax `GRPOLearner.step` vs TRL's `GRPOTrainer` on transformers, one run.

Same on both sides: a tiny random Qwen2-VL (built as in benchmarks/rollout.py; TRL loads it with
`from_pretrained`, ours imports the weights with `from_hf_state_dict`); B text prompts with identical
token ids (a word-level tokenizer maps id i to the word "w<i>"); G sampled completions per prompt of
exactly `--new` tokens (the stop id lies outside the vocabulary); one reward on the decoded text;
group mean-centred advantages (see ADVANTAGE); reference log-probs (beta > 0); ONE AdamW update (mu = 1) of the
token-level clipped surrogate - beta * k3 KL. Dense attention (HF sdpa); our sparse step (p = 0.9)
is an extra row.

TRL runs in its OWN venv (benchmarks/setup_trl_env.sh; `--trl-python` or ZIPR1_TRL_PYTHON), one
subprocess per torch thread count, stepped over a pipe: a trainer callback waits for "go" in
`on_step_begin` and reports the time in `on_step_end`. Ours runs in-process (`GRPOLearner.step`
returns host floats). After each side's first step (ours: jit compile; reported apart) and
`--warmup - 1` more untimed steps, `--repeats` rounds time one step of every side in turn, so load
changes on this shared machine hit all sides alike; medians are reported, split into phases.

    nice -n 10 python benchmarks/grpo_step_vs_trl.py [--prompts 4 --group 4 --prompt 64 --new 64]
        [--repeats 7] [--trl-python /work/trl_venv/bin/python] [--write-md]

Layout: this driver (worker handles, interleaved timing, the run, the command line);
grpo_shared.py (constants, tokenizer, reward: both venvs); grpo_trl_side.py (the TRL worker, run by
the TRL venv's python); grpo_ours_side.py (our learner step and objective); grpo_check.py (the
same-objective check); grpo_report.py (table, notes, BENCHMARKS.md section). jax and zipr1_jax are
imported lazily. `main(argv) -> dict` is importable; `--no-trl` runs our side only
(tests/benchmarks/test_grpo_bench.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from grpo_shared import (ADVANTAGE, EPS, HERE, PROTO, SPARSE_P, TRL_SCRIPT, conversation,  # noqa: E402
                         noise_images, prompt_texts, vlm_processor, word_tokenizer, worker_env)
from grpo_check import check_objective  # noqa: E402
from grpo_ours_side import ours_batch, ours_runner  # noqa: E402
from grpo_report import machine_note, table, write_section  # noqa: E402


class TrlProcess:
    """One TRL worker subprocess at a given torch thread count, stepped from the driver. Between
    calls the worker is blocked in `on_step_begin` (or finished), so it never runs beside a timed
    step of another side."""

    def __init__(self, python: str, spec: dict, workdir: str):
        self.threads = spec["threads"]
        path = os.path.join(workdir, f"spec_{self.threads}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        self.log_path = os.path.join(workdir, f"trl_{self.threads}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, TRL_SCRIPT, "--trl-worker", path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=worker_env())
        self.versions = self._expect("init")["versions"]
        self._last = self._expect("ready", "end")

    def _expect(self, *kinds: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                msg = json.loads(line[len(PROTO):])
                if msg["kind"] not in kinds:
                    raise RuntimeError(f"TRL worker ({self.threads} thr) sent {msg['kind']!r}, expected {kinds}")
                return msg
        self.proc.wait()
        self._log.flush()
        tail = "".join(open(self.log_path).readlines()[-30:])
        raise RuntimeError(f"TRL worker ({self.threads} thr) exited with code {self.proc.returncode} while the "
                           f"driver waited for {kinds}; last lines of {self.log_path}:\n{tail}")

    def step(self) -> tuple[float, dict]:
        """Run one trainer step; returns its time as the worker's callbacks measured it and its phases."""
        if self._last["kind"] != "ready":
            raise RuntimeError(f"TRL worker ({self.threads} thr) has no step left (max_steps reached)")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        done = self._expect("done")
        self._last = self._expect("ready", "end")
        return done["seconds"], trl_phases(done["seconds"], done["blocks"])

    def finish(self) -> list[dict]:
        """Per-step logs of the trainer (loss, reward, kl, completion lengths, ...)."""
        if self._last["kind"] != "end":
            self.close()
            raise RuntimeError(f"TRL worker ({self.threads} thr) still has steps left: the driver miscounted")
        self.close()
        return self._last["logs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def trl_phases(total: float, blocks: list) -> dict:
    """TRL's step split like ours from its profiling blocks: rollout = `transformers.generate`;
    reference = the first `_get_per_token_logps_and_entropies` (inside `_prepare_inputs`, beta > 0);
    update = everything after `_prepare_inputs` (policy forward + loss, backward, clip, AdamW);
    other = the rest of `_prepare_inputs` (tokenising, decoding, rewards, advantages)."""
    def total_of(name):
        return sum(d for n, d in blocks if n == name)

    logps = [d for n, d in blocks if n == "_get_per_token_logps_and_entropies"]
    prepare, rollout = total_of("_prepare_inputs"), total_of("transformers.generate")
    ref = logps[0] if len(logps) > 1 else 0.0
    return dict(rollout=rollout, reference=ref, update=total - prepare, other=prepare - rollout - ref)


def _rollout_bench():
    spec = importlib.util.spec_from_file_location("rollout_bench", os.path.join(HERE, "rollout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_interleaved(sides: dict, *, warmup: int, repeats: int) -> dict:
    """First step of every side (reported apart), `warmup - 1` more untimed steps, then `repeats`
    rounds of one step per side in turn. A side is a callable -> (seconds, dict with "phases": seconds
    per phase). Returns {name: dict(first_s, steady_s, min_s, max_s, phases (medians), out)}."""
    res = {}
    for name, run in sides.items():
        print(f"  first step: {name} ...", flush=True)
        seconds, out = run()
        res[name] = dict(first_s=seconds, out=out, times=[], phases=[])
    for _ in range(warmup - 1):
        for name, run in sides.items():
            res[name]["out"] = run()[1]
    for i in range(repeats):
        print(f"  round {i + 1}/{repeats} ...", flush=True)
        for name, run in sides.items():
            seconds, out = run()
            res[name]["times"].append(seconds)
            res[name]["phases"].append(out["phases"])
            res[name]["out"] = out
    for r in res.values():
        times, phases = r["times"], r.pop("phases")
        r.update(steady_s=statistics.median(times), min_s=min(times), max_s=max(times),
                 phases={k: statistics.median(p[k] for p in phases) for k in phases[0]})
    return res


def _trl_side(worker: TrlProcess):
    def run():
        seconds, phases = worker.step()
        return seconds, {"phases": phases}
    return run


def _trl_python(args) -> str:
    python = args.trl_python or os.environ.get("ZIPR1_TRL_PYTHON") or os.path.join(
        os.path.dirname(os.path.dirname(HERE)), "trl_venv", "bin", "python")
    if not os.path.isfile(python):
        raise SystemExit(f"no TRL python at {python!r}: build it with `bash benchmarks/setup_trl_env.sh` and pass "
                         "--trl-python or set ZIPR1_TRL_PYTHON (or run with --no-trl for our side only)")
    return python


def image_prompts(cfg, texts: list[str], images) -> tuple[list[list[int]], np.ndarray, np.ndarray, dict]:
    """The VLM prompts as TRL's processor renders them (`grpo_shared.vlm_processor`: one image block,
    then the text): (unpadded ids per prompt, left-padded ids / mask [B, L], our pixel rows + grids)."""
    proc = vlm_processor(cfg.text.vocab_size, cfg.pad_token_id)
    convs = [conversation(t) for t in texts]
    for conv, im in zip(convs, images):
        conv[0]["content"][0]["image"] = im
    out = proc.apply_chat_template(conversation=convs, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = [list(map(int, x)) for x in out["input_ids"]]
    L = max(map(len, ids))
    ids_BL = np.full((len(ids), L), cfg.pad_token_id, np.int64)
    mask_BL = np.zeros((len(ids), L), np.int64)
    for b, row in enumerate(ids):
        ids_BL[b, L - len(row):], mask_BL[b, L - len(row):] = row, 1
    vision = dict(pixel_values=np.asarray(out["pixel_values"], np.float32),
                  image_grid_thw=np.asarray(out["image_grid_thw"], np.int64))
    return ids, ids_BL, mask_BL, vision


def run_bench(args) -> dict:
    import flax
    import jax
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    rb = _rollout_bench()
    load_before = rb.load_average()
    cfg = rb.bench_config(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    V = cfg.text.vocab_size
    hf = rb.random_hf_model(cfg, args.seed)
    p = rb.prompt_batch(cfg, batch=args.prompts, prompt=args.prompt, image=False, seed=args.seed)
    texts = prompt_texts(p["ids"], p["mask"])
    prompt_ids = [[int(i) for i in ids[m > 0]] for ids, m in zip(p["ids"], p["mask"])]
    if word_tokenizer(V, cfg.pad_token_id)(texts)["input_ids"] != prompt_ids:
        raise RuntimeError("the word tokenizer does not give back the prompt ids")
    images = noise_images(args.prompts, args.image, args.seed) if args.image else None
    if images:
        prompt_ids, ids_BL, mask_BL, vision = image_prompts(cfg, texts, images)
        batch = ours_batch(cfg, ids_BL, mask_BL, args.group, **vision)
    else:
        batch = ours_batch(cfg, p["ids"], p["mask"], args.group)
    hf_state = hf.state_dict()
    sides = {"zipr1_jax dense": ours_runner(cfg, hf_state, batch, args, sparse=False)}
    if args.sparse:
        sides[f"zipr1_jax sparse p={SPARSE_P}"] = ours_runner(cfg, hf_state, batch, args, sparse=True)
    workers, check = {}, None
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as work:
        try:
            if not args.no_trl:
                python = _trl_python(args)
                model_dir = os.path.join(work, "model")
                hf.save_pretrained(model_dir)
                spec = dict(model_dir=model_dir, prompts=texts, prompt_ids=prompt_ids, vocab=V, pad_id=cfg.pad_token_id,
                            group=args.group, new=args.new, beta=args.beta, eps_low=EPS[0], eps_high=EPS[1], lr=args.lr,
                            seed=args.seed, steps=args.warmup + args.repeats, advantage=ADVANTAGE)
                if images:  # PNG: the worker reads back the exact pixels
                    spec["images"] = [os.path.join(work, f"image_{i}.png") for i in range(len(images))]
                    for im, path in zip(images, spec["images"]):
                        im.save(path)
                if args.check:
                    print("  checking that both sides compute the same loss and gradient ...", flush=True)
                    check = check_objective(python, spec, cfg, hf, batch, args, work)
                    print(f"  objective check: {check}", flush=True)
                for n in args.threads:
                    print(f"  starting TRL worker ({n} torch threads) ...", flush=True)
                    w = workers[n] = TrlProcess(python, dict(spec, threads=n), work)
                    sides[f"TRL @{n} thr"] = _trl_side(w)
            res = time_interleaved(sides, warmup=args.warmup, repeats=args.repeats)
            trl_logs = {n: w.finish() for n, w in workers.items()}
        finally:
            for w in workers.values():
                w.close()
    rows = []
    for name, r in res.items():
        row = dict(side=name, first_s=r["first_s"], steady_s=r["steady_s"], min_s=r["min_s"], max_s=r["max_s"],
                   phases=r["phases"])
        if name.startswith("zipr1_jax"):
            m = r["out"]
            row.update(threads="jax pool", loss=m["loss"], reward=m["reward"], kl=m["kl"],
                       length=m["response_length"], token_ratio=m["token_ratio"], finished=m["finished"],
                       grad_norm=m["grad_norm"])
        else:
            n = int(name.split("@")[1].split()[0])
            step_logs = [lg for lg in trl_logs[n] if "reward" in lg]  # the last log is the run summary
            last = step_logs[-1] if step_logs else {}
            row.update(threads=n, loss=last.get("loss"), reward=last.get("reward"), kl=last.get("kl"),
                       length=last.get("completions/mean_length"), min_length=last.get("completions/min_length"),
                       token_ratio=1.0, grad_norm=last.get("grad_norm"), logs=trl_logs[n])
        rows.append(row)
        if row["length"] is None or row["length"] != args.new or row.get("min_length", args.new) != args.new:
            raise RuntimeError(f"{name}: completions of {row['length']} tokens on average (min "
                               f"{row.get('min_length')}), expected exactly {args.new}: a row stopped early, so "
                               "the sides did not do the same work")
    trl_rows = [r for r in rows if r["side"].startswith("TRL")]
    if trl_rows:
        best = min(trl_rows, key=lambda r: r["steady_s"])
        for r in rows:
            if r["side"].startswith("zipr1_jax"):
                per_round = [a / b for a, b in zip(res[r["side"]]["times"], res[best["side"]]["times"])]
                r.update(ratio=statistics.median(per_round), ratio_min=min(per_round), ratio_max=max(per_round))
    versions = dict(jax=jax.__version__, flax=flax.__version__, transformers=transformers.__version__,
                    torch=torch.__version__)
    if workers:
        versions.update({f"trl_venv_{k}": v for k, v in next(iter(workers.values())).versions.items()})
    return dict(rows=rows, config=cfg, versions=versions, machine=machine_note(load_before, rb.load_average()),
                check=check)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="distinct prompts per step (B)")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--prompt", type=int, default=64, help="padded prompt length")
    ap.add_argument("--new", type=int, default=64, help="generated tokens per completion")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side (the first is reported)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image", type=int, default=0, metavar="PX",
                    help="VLM step: one PX x PX image per prompt, before its text (0: text prompts only)")
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts, one TRL worker each "
                                                    "(default '<cores>,1')")
    ap.add_argument("--trl-python", default=None, help="python of the TRL venv (else $ZIPR1_TRL_PYTHON)")
    ap.add_argument("--no-trl", action="store_true", help="our side only (no TRL venv needed)")
    ap.add_argument("--no-sparse", dest="sparse", action="store_false", help="skip our sparse step")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the same-objective check (loss and gradient of both sides on one batch) before timing")
    ap.add_argument("--write-md", action="store_true", help="update the section of BENCHMARKS.md in place")
    args = ap.parse_args(argv)
    for name in ("prompts", "prompt", "new", "repeats", "warmup", "layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        raise SystemExit(f"--group must be >= 2 (GRPO compares completions within a group), got {args.group}")
    if args.image and (args.image < 56 or args.image % 28):
        raise SystemExit(f"--image must be a multiple of 28 that is >= 56 (patch 14, merge 2), got {args.image}")
    if args.hidden % 32:
        raise SystemExit(f"--hidden must be a multiple of 32 (4 heads, M-RoPE sections), got {args.hidden}")
    try:
        threads = [int(t) for t in (args.threads or f"{os.cpu_count() or 1},1").split(",")]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated ints, got {args.threads!r}") from None
    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads values must be >= 1, got {args.threads!r}")
    args.threads = list(dict.fromkeys(threads))
    return args


def main(argv=None) -> dict:
    """Run the comparison; returns {"rows": [per-side dicts], "config", "versions", "machine"}."""
    args = parse_args(argv)
    result = run_bench(args)
    print(f"machine: {result['machine']}")
    print(f"versions: {result['versions']}")
    print(table(result["rows"]))
    if args.write_md:
        write_section(result, args)
    return result


if __name__ == "__main__":
    main()
