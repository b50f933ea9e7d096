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
from easydel_vs_ours import easydel_config  # noqa: E402  (stdlib + numpy at import time)
from grpo_easydel_side import easydel_phases  # noqa: E402
from grpo_ours_side import ours_batch, ours_runner  # noqa: E402
from grpo_report import machine_note, table, write_section  # noqa: E402


class WorkerProcess:
    """One peer's worker subprocess (TRL at a torch thread count, or EasyDeL), stepped from the driver.
    Between calls the worker is blocked in its step-begin callback (or finished), so it never runs
    beside a timed step of another side."""

    def __init__(self, label: str, python: str, script: str, flag: str, spec: dict, workdir: str):
        self.label = label
        tag = label.replace(" ", "_").replace("@", "")
        path = os.path.join(workdir, f"spec_{tag}.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        self.log_path = os.path.join(workdir, f"{tag}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, script, flag, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=worker_env())
        self.versions = self._expect("init")["versions"]
        self._last = self._expect("ready", "end")

    def _expect(self, *kinds: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTO):
                msg = json.loads(line[len(PROTO):])
                if msg["kind"] not in kinds:
                    raise RuntimeError(f"{self.label} worker sent {msg['kind']!r}, expected {kinds}")
                return msg
        self.proc.wait()
        self._log.flush()
        tail = "".join(open(self.log_path).readlines()[-30:])
        raise RuntimeError(f"{self.label} worker exited with code {self.proc.returncode} while the driver waited "
                           f"for {kinds}; last lines of {self.log_path}:\n{tail}")

    def step(self) -> dict:
        """Run one trainer step; returns the worker's "done" message (its seconds and phase data)."""
        if self._last["kind"] != "ready":
            raise RuntimeError(f"{self.label} worker has no step left (max steps reached)")
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        done = self._expect("done")
        self._last = self._expect("ready", "end")
        return done

    def finish(self) -> list[dict]:
        """Per-step logs of the trainer (loss, reward, kl, completion lengths, ...)."""
        if self._last["kind"] != "end":
            self.close()
            raise RuntimeError(f"{self.label} worker still has steps left: the driver miscounted")
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


EASYDEL_SIDE = "EasyDeL GRPOTrainer"
EASYDEL_SCRIPT = os.path.join(HERE, "grpo_easydel_side.py")  # run by the EasyDeL venv's python


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
                 phases={k: _median_or_none([p[k] for p in phases]) for k in phases[0]})
    return res


def _median_or_none(values: list):
    """Median of a phase over rounds; None when the side cannot measure it (EasyDeL's reference)."""
    return None if any(v is None for v in values) else statistics.median(values)


def _worker_side(worker: WorkerProcess, phases):
    """A side for `time_interleaved`: one worker step, its phases from `phases(seconds, done message)`."""
    def run():
        done = worker.step()
        return done["seconds"], {"phases": phases(done["seconds"], done)}
    return run


def _peer_python(given: str | None, env: str, venv: str, setup: str, skip: str) -> str:
    python = given or os.environ.get(env) or os.path.join(os.path.dirname(os.path.dirname(HERE)), venv, "bin",
                                                          "python")
    if not os.path.isfile(python):
        raise SystemExit(f"no python at {python!r}: build its venv with `bash benchmarks/{setup}` and pass its "
                         f"python or set {env} (or run with {skip})")
    return python


def _trl_python(args) -> str:
    return _peer_python(args.trl_python, "ZIPR1_TRL_PYTHON", "trl_venv", "setup_trl_env.sh", "--no-trl")


def _easydel_python(args) -> str:
    return _peer_python(args.easydel_python, "ZIPR1_EASYDEL_PYTHON", "easydel_venv", "setup_easydel_venv.sh",
                        "without --easydel")


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
            model_dir = os.path.join(work, "model")
            if not args.no_trl or args.easydel:
                hf.save_pretrained(model_dir)
            spec = dict(model_dir=model_dir, prompts=texts, prompt_ids=prompt_ids, vocab=V, pad_id=cfg.pad_token_id,
                        group=args.group, new=args.new, beta=args.beta, eps_low=EPS[0], eps_high=EPS[1], lr=args.lr,
                        seed=args.seed, steps=args.warmup + args.repeats, advantage=ADVANTAGE)
            if not args.no_trl:
                python = _trl_python(args)
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
                    label = f"TRL @{n} thr"
                    w = workers[label] = WorkerProcess(label, python, TRL_SCRIPT, "--trl-worker",
                                                       dict(spec, threads=n), work)
                    sides[label] = _worker_side(w, lambda sec, done: trl_phases(sec, done["blocks"]))
            if args.easydel:
                print("  starting EasyDeL worker ...", flush=True)
                ed_dir = os.path.join(work, "model_easydel")
                easydel_config(model_dir, ed_dir)
                w = workers[EASYDEL_SIDE] = WorkerProcess(EASYDEL_SIDE, _easydel_python(args), EASYDEL_SCRIPT,
                                                          "--easydel-worker", dict(spec, model_dir=ed_dir), work)
                sides[EASYDEL_SIDE] = _worker_side(w, lambda sec, done: easydel_phases(sec, done["metrics"]))
            res = time_interleaved(sides, warmup=args.warmup, repeats=args.repeats)
            peer_logs = {label: w.finish() for label, w in workers.items()}
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
        elif name == EASYDEL_SIDE:
            last = peer_logs[name][-1] if peer_logs[name] else {}
            row.update(threads="jax", loss=last.get("loss"), reward=last.get("reward_mean"), kl=last.get("kl"),
                       length=last.get("completion_length"), token_ratio=1.0, grad_norm=None, logs=peer_logs[name])
        else:
            n = int(name.split("@")[1].split()[0])
            step_logs = [lg for lg in peer_logs[name] if "reward" in lg]  # the last log is the run summary
            last = step_logs[-1] if step_logs else {}
            row.update(threads=n, loss=last.get("loss"), reward=last.get("reward"), kl=last.get("kl"),
                       length=last.get("completions/mean_length"), min_length=last.get("completions/min_length"),
                       token_ratio=1.0, grad_norm=last.get("grad_norm"), logs=peer_logs[name])
        rows.append(row)
        if row["length"] is None or row["length"] != args.new or row.get("min_length", args.new) != args.new:
            raise RuntimeError(f"{name}: completions of {row['length']} tokens on average (min "
                               f"{row.get('min_length')}), expected exactly {args.new}: a row stopped early, so "
                               "the sides did not do the same work")
    trl_rows = [r for r in rows if r["side"].startswith("TRL")]
    peers = {}
    if trl_rows:
        peers["ratio"] = min(trl_rows, key=lambda r: r["steady_s"])["side"]
    if EASYDEL_SIDE in res:
        peers["ratio_easydel"] = EASYDEL_SIDE
    for r in rows:
        if r["side"].startswith("zipr1_jax"):
            for key, peer in peers.items():
                per_round = [a / b for a, b in zip(res[r["side"]]["times"], res[peer]["times"])]
                r.update({key: statistics.median(per_round), key + "_min": min(per_round),
                          key + "_max": max(per_round)})
    versions = dict(jax=jax.__version__, flax=flax.__version__, transformers=transformers.__version__,
                    torch=torch.__version__)
    for label, w in workers.items():
        versions.update({f"{'easydel' if label == EASYDEL_SIDE else 'trl'}_venv_{k}": v for k, v in w.versions.items()})
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
    ap.add_argument("--no-trl", action="store_true", help="no TRL sides (no TRL venv needed)")
    ap.add_argument("--easydel", action="store_true", help="also time EasyDeL's GRPOTrainer (its own venv)")
    ap.add_argument("--easydel-python", default=None, help="python of the EasyDeL venv (else $ZIPR1_EASYDEL_PYTHON)")
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
    if args.image and args.easydel:
        raise SystemExit("--easydel runs the text step only (EasyDeL's GRPOTrainer is not driven with images here)")
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
