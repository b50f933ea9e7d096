"""One GRPO step: zipr1_jax `GRPOLearner.step` vs TRL's `GRPOTrainer` on transformers, one run.

Same on both sides: a tiny random Qwen2-VL (built as in benchmarks/rollout.py; TRL loads it with
`from_pretrained`, ours imports the weights with `from_hf_state_dict`); B text prompts with identical
token ids (a word-level tokenizer maps id i to the word "w<i>"); G sampled completions per prompt of
exactly `--new` tokens (the stop id lies outside the vocabulary); one reward on the decoded text;
group-normalised advantages; reference log-probs (beta > 0); ONE AdamW update (mu = 1) of the
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

This file is also the TRL worker (`--trl-worker SPEC.json`, run by the TRL venv's python), so jax
and zipr1_jax are imported lazily. `main(argv) -> dict` is importable; `--no-trl` runs our side
only (tests/benchmarks/test_grpo_bench.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as scripts or loaded by path (tests)
from _markdown import replace_section  # noqa: E402

for _k, _v in (("JAX_PLATFORMS", "cpu"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
               ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

SECTION = "## One GRPO step vs TRL GRPOTrainer"
PROTO = "@@grpo-bench "  # prefix of the worker's protocol lines on stdout (other output is skipped)
SPARSE_P = 0.9
REWARD_NAME = "bench_even_words"
PHASES = ("rollout", "reference", "update", "other")
HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------- shared by both sides
def word_tokenizer(vocab_size: int, pad_id: int):
    """A word-level HF tokenizer over "w0".."w<V-1>" (pad_id is "<pad>"), with "<eos>" = V OUTSIDE the
    model's vocabulary: the model can never sample it, so every completion runs to max length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {("<pad>" if i == pad_id else f"w{i}"): i for i in range(vocab_size)}
    vocab.update({"<eos>": vocab_size, "<unk>": vocab_size + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def even_word_reward(text: str) -> float:
    """Fraction of the completion's words "w<i>" with even i: cheap, computed from decoded text on
    both sides alike, and it varies within a group (non-zero advantages)."""
    ids = [int(w[1:]) for w in text.split() if re.fullmatch(r"w\d+", w)]
    return float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0


def prompt_texts(ids_BL: np.ndarray, mask_BL: np.ndarray) -> list[str]:
    return [" ".join(f"w{i}" for i in ids[m > 0]) for ids, m in zip(ids_BL, mask_BL)]


def _emit(kind: str, **payload) -> None:
    print(PROTO + json.dumps({"kind": kind, **payload}), flush=True)


# ---------------------------------------------------------------------- the TRL side (TRL venv)
def trl_worker(spec_path: str) -> None:
    """Build a GRPOTrainer from the spec and train `steps` steps, each started by a "go" on stdin."""
    import datasets
    import torch
    import transformers
    import trl
    import trl.extras.profiling
    from transformers import Qwen2VLForConditionalGeneration, TrainerCallback

    spec = json.load(open(spec_path))
    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    tok = word_tokenizer(spec["vocab"], spec["pad_id"])
    got = [tok(t)["input_ids"] for t in spec["prompts"]]
    if got != spec["prompt_ids"]:
        raise RuntimeError("the TRL side tokenizes the prompts to other ids than ours")
    model = Qwen2VLForConditionalGeneration.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                            attn_implementation="sdpa")
    model.generation_config.eos_token_id = spec["vocab"]  # outside the vocabulary: no early stop

    def even_words(completions, **_):
        return [even_word_reward(c) for c in completions]

    # TRL times its blocks (generate, _prepare_inputs, _get_per_token_logps..., compute_loss) for its
    # loggers; keep them per step for the phase breakdown.
    blocks = []
    trl.extras.profiling.ProfilingContext._log_metrics = lambda self, d: blocks.append((self.name.split(".", 1)[1], d))

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t0, self.logs = None, []

        def on_step_begin(self, args, state, control, **kw):
            _emit("ready", step=state.global_step)
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("grpo bench worker: the driver closed the pipe")
            blocks.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _emit("done", seconds=time.perf_counter() - self.t0, blocks=list(blocks))

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})

    R = len(spec["prompts"]) * spec["group"]
    args = trl.GRPOConfig(
        output_dir=os.path.join(os.path.dirname(spec_path), f"trl_out_{spec['threads']}"), use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, per_device_train_batch_size=R,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=spec["group"],
        max_completion_length=spec["new"], temperature=1.0, top_p=1.0, top_k=0, beta=spec["beta"],
        epsilon=spec["eps_low"], epsilon_high=spec["eps_high"], loss_type="dapo", scale_rewards="group",
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["steps"], logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        shuffle_dataset=False, dataloader_num_workers=0, seed=spec["seed"])
    clock = StepClock()
    trainer = trl.GRPOTrainer(model=model, reward_funcs=even_words, args=args, processing_class=tok,
                              train_dataset=datasets.Dataset.from_dict({"prompt": spec["prompts"]}),
                              callbacks=[clock])
    _emit("init", versions={"trl": trl.__version__, "transformers": transformers.__version__,
                            "torch": torch.__version__, "python": platform.python_version()})
    trainer.train()
    _emit("end", logs=clock.logs)


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
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--trl-worker", path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env)
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


# ---------------------------------------------------------------------- our side (project venv)
def _rollout_bench():
    spec = importlib.util.spec_from_file_location("rollout_bench", os.path.join(HERE, "rollout.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ours_runner(cfg, hf_state: dict, batch: dict, args, *, sparse: bool):
    """A no-argument callable running one `GRPOLearner.step` (state carried across calls) ->
    (seconds, metrics + the step's phases: rollout, reference, update (jitted calls, each waited for)
    and other (host decoding, rewards, transfers))."""
    import jax
    import jax.numpy as jnp

    from zipr1_jax.kernels.sparse_attention.config import SparsityConfig
    from zipr1_jax.models.qwen_vl.loader import from_hf_state_dict
    from zipr1_jax.rl.rewards import register_reward
    from zipr1_jax.rl.rollout import SamplingConfig
    from zipr1_jax.sharding.mesh import make_mesh
    from zipr1_jax.sharding.rules import DEFAULT_RULES, opt_state_shardings, state_shardings
    from zipr1_jax.train.learner import GRPOLearner, LearnerConfig
    from zipr1_jax.train.optim import OptimConfig, make_optimizer
    from zipr1_jax.train.parallel import Placement
    from zipr1_jax.train.state import TrainState, split_params

    class TimedPlacement(Placement):  # waits for each jitted call and books its time by function
        def jit(self, fn, *a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(super().jit(fn, *a, **k))
            key = {"_logprobs_only": "reference", "_update_static_kw": "update"}.get(fn.__name__)
            if key:  # anything else stays in "other"
                phases[key] += time.perf_counter() - t0
            return out

    class TimedLearner(GRPOLearner):
        def rollout(self, *a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(super().rollout(*a, **k))
            phases["rollout"] += time.perf_counter() - t0
            return out

    phases = {}
    register_reward(REWARD_NAME, override=True)(
        lambda inputs: np.array([even_word_reward(r) for r in inputs.responses], np.float32))
    V = cfg.text.vocab_size
    lcfg = LearnerConfig(
        group_size=args.group, sampling=SamplingConfig(max_new_tokens=args.new, eos_ids=(V,), pad_id=cfg.pad_token_id,
                                                       temperature=1.0),
        sparsity=SparsityConfig(enabled=sparse, p=SPARSE_P), p_grid=(SPARSE_P,), budget="single", beta=args.beta,
        eps_low=0.2, eps_high=0.28, mu=1, advantage="grpo", aggregation="token", lambda_eff=0.0, gate=False,
        extra_rewards=((REWARD_NAME, 1.0),))
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    pl = TimedPlacement(mesh, DEFAULT_RULES)
    graphdef, params = split_params(from_hf_state_dict(cfg, hf_state))
    p_sh = state_shardings(params, mesh)
    params = jax.device_put(params, p_sh)
    tx = make_optimizer(OptimConfig(lr=args.lr, total_steps=1000, schedule="constant", grad_clip=1.0))
    opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), p_sh)
    sh = TrainState(step=pl.replicated, params=p_sh, opt_state=opt_sh)
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), pl.replicated), params=params,
                       opt_state=jax.jit(tx.init, out_shardings=sh.opt_state)(params))
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    learner = TimedLearner(lcfg, graphdef, tx, word_tokenizer(V, cfg.pad_token_id), pl, state_shardings=sh)
    box = {"state": state, "i": 0}

    def run():
        phases.update(rollout=0.0, reference=0.0, update=0.0)
        t0 = time.perf_counter()
        box["state"], metrics, _ = learner.step(box["state"], ref_params, batch, jax.random.key(args.seed + box["i"]),
                                                step=box["i"])
        total = time.perf_counter() - t0
        box["i"] += 1
        return total, dict(metrics, phases=dict(phases, other=total - sum(phases.values())))
    return run


def ours_batch(cfg, ids_BL: np.ndarray, mask_BL: np.ndarray, group: int) -> dict:
    """The prompt batch as the RL loader gives it: each prompt repeated G times in contiguous rows,
    M-RoPE ids from the loader's `get_rope_index`, and (unmatchable) answers for the accuracy reward."""
    from zipr1_jax.models.qwen_vl.rope import get_rope_index

    ids_RL, mask_RL = np.repeat(ids_BL, group, axis=0), np.repeat(mask_BL, group, axis=0)
    pos_3RL, deltas_R = get_rope_index(cfg, ids_RL, mask_RL)
    R = ids_RL.shape[0]
    return dict(input_ids=ids_RL.astype(np.int32), attention_mask=mask_RL.astype(np.int32),
                position_ids=np.asarray(pos_3RL, np.int32), rope_deltas=np.asarray(deltas_R, np.int32),
                answer=["<none>"] * R, answer_type=["exact"] * R, choices=[None] * R)


# ---------------------------------------------------------------------- driver
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
        times, phases = r.pop("times"), r.pop("phases")
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
    batch = ours_batch(cfg, p["ids"], p["mask"], args.group)
    hf_state = hf.state_dict()
    sides = {"zipr1_jax dense": ours_runner(cfg, hf_state, batch, args, sparse=False)}
    if args.sparse:
        sides[f"zipr1_jax sparse p={SPARSE_P}"] = ours_runner(cfg, hf_state, batch, args, sparse=True)
    workers = {}
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as work:
        try:
            if not args.no_trl:
                python = _trl_python(args)
                model_dir = os.path.join(work, "model")
                hf.save_pretrained(model_dir)
                spec = dict(model_dir=model_dir, prompts=texts, prompt_ids=prompt_ids, vocab=V, pad_id=cfg.pad_token_id,
                            group=args.group, new=args.new, beta=args.beta, eps_low=0.2, eps_high=0.28, lr=args.lr,
                            seed=args.seed, steps=args.warmup + args.repeats)
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
                r["ratio"] = r["steady_s"] / best["steady_s"]
    versions = dict(jax=jax.__version__, flax=flax.__version__, transformers=transformers.__version__,
                    torch=torch.__version__)
    if workers:
        versions.update({f"trl_venv_{k}": v for k, v in next(iter(workers.values())).versions.items()})
    return dict(rows=rows, config=cfg, versions=versions, machine=machine_note(load_before, rb.load_average()))


# ---------------------------------------------------------------------- report
def _f(x, fmt):
    return "n/a" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    lines = ["| side | torch threads | first step s | s / step (median) | min - max s | ours / best TRL (time) | "
             "rollout s | reference s | update s | other s | loss | reward | kl | completion len | token ratio |",
             "|" + "---|" * 15]
    for r in rows:
        ph = " | ".join(f"{r['phases'][k]:.3f}" for k in PHASES)
        ratio = "-" if r["side"].startswith("TRL") else _f(r.get("ratio"), ".2f")
        lines.append(f"| {r['side']} | {r['threads']} | {r['first_s']:.2f} | {r['steady_s']:.3f} | "
                     f"{r['min_s']:.3f} - {r['max_s']:.3f} | {ratio} | {ph} | "
                     f"{_f(r['loss'], '.4f')} | {_f(r['reward'], '.3f')} | {_f(r['kl'], '.2e')} | "
                     f"{_f(r['length'], '.0f')} | {_f(r['token_ratio'], '.2f')} |")
    return "\n".join(lines)


def machine_note(load_before: str, load_after: str) -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs: "
            f"load average (1/5/15 min) {load_before} before, {load_after} after; float32 on both sides")


NOTE = ("Reading: CPU timings of a TINY model (one step here is ~65 GFLOP: sampling, a reference forward and a "
        "policy forward + backward over B*G rows of prompt + completion), so they mix per-op overhead and matmul "
        "speed. Phases (medians; a phase of ours is a jitted call waited for; TRL's come from its own profiling "
        "blocks): rollout = sampling (ours: a compiled prefill and a compiled `lax.while_loop` decode; TRL: "
        "`model.generate`, a Python loop with one eager forward per token); reference = the frozen model's "
        "log-probs; update = policy forward, loss, backward, clipping and AdamW (ours: one XLA program; TRL: eager "
        "torch on oneDNN/MKL kernels); other = host work (decode, rewards, advantages, transfers / TRL's "
        "tokenising and bookkeeping). The compiled rollout is where ours gains; the update is matmul-bound at "
        "this size and ours' XLA CPU backward is slower than torch's eager one (compare the update columns), "
        "which outweighs that gain here: a jax.profiler trace of ours' update puts ~46% of its op time in "
        "the dots and ~30% in layout copies (transposes fused with elementwise backward ops, e.g. SiLU's, "
        "that feed the weight-gradient dots). First step: ours includes the jit compiles (the sparse step compiles the "
        "selection too). Do not read the ratio as an accelerator or real-size number (there TRL would sample "
        "with vLLM). The sparse row is the ZipR1 step (sparse prefill in the rollout, the same kept sets in the "
        "learner's forward, handed over from the rollout; its KL is against the dense reference): at 64-token "
        "prompts the selection costs about what it saves. On a shared 2-core machine torch with 2 threads can "
        "be far slower than with 1 (OpenMP waits on threads whose core another process took); the ratio uses "
        "the faster TRL column, and "
        "the interleaved rounds keep load changes from favouring one side.\n")


def _more(n: int) -> str:
    return f"then {n} more untimed step{'s' if n > 1 else ''}; " if n > 0 else ""


def write_section(result: dict, args, path: str | None = None) -> str:
    cfg, v = result["config"], result["versions"]
    t = cfg.text
    cmd = (f"bash benchmarks/setup_trl_env.sh /work/trl_venv && ZIPR1_TRL_PYTHON=/work/trl_venv/bin/python "
           f"nice -n 10 python benchmarks/grpo_step_vs_trl.py --prompts {args.prompts} --group {args.group} "
           f"--prompt {args.prompt} --new {args.new} --repeats {args.repeats} --warmup {args.warmup} "
           f"--threads {','.join(map(str, args.threads))} --write-md")
    trl_v = (f"TRL venv: trl {v.get('trl_venv_trl')}, transformers {v.get('trl_venv_transformers')}, torch "
             f"{v.get('trl_venv_torch')}; " if "trl_venv_trl" in v else "TRL not run; ")
    body = (f"{SECTION}\n\n"
            f"Command: `{cmd}` (run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {result['machine']}). "
            f"Versions: {trl_v}project venv: jax {v['jax']}, flax {v['flax']}, transformers {v['transformers']}, "
            f"torch {v['torch']} (torch only builds the shared model).\n"
            f"Model: random Qwen2-VL built with transformers' `Qwen2VLConfig` as in the rollout section (hidden "
            f"{t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads} heads / "
            f"{t.num_key_value_heads} KV heads, MLP {t.intermediate_size}, vocab {t.vocab_size}); TRL loads it "
            "with `from_pretrained` (sdpa attention), ours imports the same weights with `from_hf_state_dict`. "
            f"Step: {args.prompts} TEXT prompts (left padded to {args.prompt}, lengths {args.prompt // 2}.."
            f"{args.prompt}, identical token ids on both sides) x G = {args.group} sampled completions of exactly "
            f"{args.new} tokens (temperature 1, stop id outside the vocabulary), reward = fraction of even token "
            f"words (same function on both sides), group-normalised advantages, beta = {args.beta} (reference "
            "forward on both sides), eps 0.2 / 0.28, token-level loss (ours `aggregation=token`, TRL "
            "`loss_type=dapo`), one AdamW step (mu = 1, lr constant, clip 1.0), fp32. Ours: `GRPOLearner.step` "
            "(rollout, host decode + rewards, reference log-probs, update), timed in-process. TRL: "
            "`GRPOTrainer.train` in a subprocess of the TRL venv, timed from `on_step_begin` to `on_step_end` "
            "(generate, rewards, reference and policy forwards, backward, clip, optimizer step). First step = "
            f"ours' jit compile + one step / TRL's first step; {_more(args.warmup - 1)}then "
            f"{args.repeats} rounds, one step of every side per round (interleaved), median reported. Text "
            "prompts only: TRL's VLM path needs a full `Qwen2VLProcessor` with chat template and images, which "
            "this offline benchmark does not build.\n\n"
            f"{table(result['rows'])}\n\n{NOTE}")
    return replace_section(SECTION, body, path)


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
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts, one TRL worker each "
                                                    "(default '<cores>,1')")
    ap.add_argument("--trl-python", default=None, help="python of the TRL venv (else $ZIPR1_TRL_PYTHON)")
    ap.add_argument("--no-trl", action="store_true", help="our side only (no TRL venv needed)")
    ap.add_argument("--no-sparse", dest="sparse", action="store_false", help="skip our sparse step")
    ap.add_argument("--write-md", action="store_true", help="update the section of BENCHMARKS.md in place")
    args = ap.parse_args(argv)
    for name in ("prompts", "prompt", "new", "repeats", "warmup", "layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.group < 2:
        raise SystemExit(f"--group must be >= 2 (GRPO compares completions within a group), got {args.group}")
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
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2])
    else:
        main()
