"""Everything a run needs, built once from the config: mesh placement, tokenizer, model, data
iterators, optimizers, checkpointer and logger (`Job`), plus resume / save / eval helpers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from zipr1_jax.checkpoint import Checkpointer, check_writable, params_dir, restore_params, save_params
from zipr1_jax.data import sources
from zipr1_jax.data.chat import SpecialIds
from zipr1_jax.data.pipelines import PipelineConfig, eval_loader, rl_prompt_loader, sft_loader
from zipr1_jax.data.process_rows import ProcessRows, gather_batch
from zipr1_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from zipr1_jax.data.validate import source_fingerprint, validate_source
from zipr1_jax.rl.state import TrainState
from zipr1_jax.sharding.launch import barrier
from zipr1_jax.sharding.logical import use_mesh
from zipr1_jax.sharding.mesh import make_mesh
from zipr1_jax.sharding.placement import Placement
from zipr1_jax.sharding.rules import DEFAULT_RULES, opt_state_shardings, state_shardings
from zipr1_jax.train.builders import (build_model, learner_config, sampling_config, sparsity_config,
                                      split_params)
from zipr1_jax.train.cli import to_yaml
from zipr1_jax.train.config import TrainConfig, TrainConfigError
from zipr1_jax.train.greedy_eval import evaluate_greedy
from zipr1_jax.train.guard import DivergenceGuard
from zipr1_jax.train.metrics import MetricsLogger, set_aside_rows_after
from zipr1_jax.train.optim import learning_rate_schedule, make_optimizer, phase_optim_config
from zipr1_jax.train.plots import plot_metrics
from zipr1_jax.train.summary import write_summary

BEFORE_RL_EVAL = "eval_before_rl.json"  # in the run's out_dir


def _tokenizer(cfg: TrainConfig, out_dir: str):
    path = cfg.tokenizer_dir()
    if path == "builtin":
        # Deterministic: other processes build their own copy (no race on, or need for, a shared out_dir).
        path = build_tiny_tokenizer(os.path.join(out_dir, "tokenizer") if jax.process_index() == 0
                                    else tempfile.mkdtemp(prefix="zipr1_tokenizer_"))
    return load_tokenizer(path)


def _source(cfg: TrainConfig, *, eval_split: bool, train=None):
    d = cfg.data
    if d.source == "builtin":
        kw = dict(seed=d.seed + (1_000_003 if eval_split else 0), difficulty=d.difficulty, image_size=d.image_size)
        if d.tasks is not None:
            kw["tasks"] = d.tasks
        n = cfg.eval.num_examples if eval_split else d.num_examples
        return sources.BuiltinSource(n, **kw)
    if eval_split and train is not None:  # the validated (and, with skip_bad_records, filtered) records
        src = train
    elif d.source == "jsonl":
        src = sources.JsonlSource(d.path)
    elif d.source == "hf_disk":
        src = sources.HFDiskSource(d.path)
    else:
        src = sources.TfdsSource(d.path)
    if eval_split:  # first eval.num_examples records (scripts/evaluate.py takes held-out sets)
        rows = [src[i] for i in range(min(cfg.eval.num_examples, len(src)))]
        return sources.RecordListSource(rows, name=f"{d.source}:eval")
    return src


def _process_rows(source, pc, field: str):
    """(source, PipelineConfig) of this process's rows of every global batch (one process: as is)."""
    if jax.process_count() == 1:
        return source, pc
    if pc.batch_size % jax.process_count():
        raise TrainConfigError(f"{field}: the global batch of {pc.batch_size} does not split over "
                               f"{jax.process_count()} processes; use a multiple of the process count")
    rows = ProcessRows(source, global_batch=pc.batch_size, index=jax.process_index(), count=jax.process_count(),
                       seed=pc.seed, shuffle=pc.shuffle)
    return rows, dataclasses.replace(pc, batch_size=rows.local_batch, shuffle=False)


class Job:
    """A run's parts, built in order: directories, mesh and model, data, optimizers and learner,
    then the resume decision (before anything is written) and the logger."""

    def __init__(self, cfg: TrainConfig, devices=None):
        self.cfg = cfg
        self.out_dir = cfg.log.out_dir
        if jax.process_index() == 0:  # an unwritable directory stops the run here, not at its first save
            check_writable(self.out_dir, "log.out_dir")
            check_writable(cfg.checkpoint_dir, "checkpoint.dir")
        params = self._build_model(devices)
        self._build_data()
        self._build_optim(params)
        self.ckpt = Checkpointer(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                                 save_every=cfg.checkpoint.save_every, async_save=cfg.checkpoint.async_save)
        # Decide what to resume from (and refuse) before this run writes anything into out_dir.
        self.resume_step = plan_resume(cfg, self.ckpt, self.model_config, self.data_fingerprint)
        if jax.process_index() == 0:
            set_aside_rows_after(self.out_dir, -1 if self.resume_step is None else self.resume_step)
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        self.guard = DivergenceGuard(cfg.guard)
        self.logger = MetricsLogger(self.out_dir, total_steps=cfg.sft.steps, phase="sft",
                                    tensorboard=cfg.log.tensorboard, progress=cfg.log.progress)
        self.ref_params = None
        self._sh_cache = {}

    def _build_model(self, devices) -> nnx.State:
        """Mesh, tokenizer, model (checked against the tokenizer), placed params; returns the host
        (or abstract) params the optimizers are built from."""
        cfg = self.cfg
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = make_mesh(**cfg.mesh.resolve(len(devices)), devices=devices)
        self.placement = Placement(self.mesh, DEFAULT_RULES)
        self.tokenizer = _tokenizer(cfg, self.out_dir)
        self.special = SpecialIds.from_tokenizer(self.tokenizer)
        model = build_model(cfg.model)
        self.model_config = mc = model.config
        if (mc.image_token_id, mc.video_token_id) != (self.special.image_pad, self.special.video_pad):
            raise TrainConfigError(f"data.tokenizer: its image/video pad ids ({self.special.image_pad}, "
                                   f"{self.special.video_pad}) differ from the model's ({mc.image_token_id}, "
                                   f"{mc.video_token_id}): tokenizer and model do not belong together")
        self.graphdef, params = split_params(model)
        del model
        self.param_shardings = state_shardings(params, self.mesh)
        if cfg.model.init_params is not None:  # abstract params: read the weights into their shardings
            self.params0 = restore_params(params_dir(cfg.model.init_params),
                                          self._abstract(params, self.param_shardings))
        else:
            self.params0 = jax.device_put(params, self.param_shardings)
        return params

    def _build_data(self):
        """Validated training records, loaders and iterators. Batch sizes are global. With several
        processes each reads only its rows of every global batch (data.process_rows.ProcessRows)
        and `next_batch` gathers the global host batch."""
        cfg, d, mc = self.cfg, self.cfg.data, self.model_config
        common = dict(seed=d.seed, length_buckets=d.length_buckets, image_size=d.image_size,
                      system_prompt=d.system_prompt)
        train_src, self.skipped_records = validate_source(
            _source(cfg, eval_split=False), self.tokenizer, PipelineConfig(batch_size=1, **common),
            sft=cfg.sft.steps > 0, skip_bad=d.skip_bad_records)
        for index, problem in self.skipped_records:
            print(f"data.skip_bad_records: skipped record {index}: {problem}", flush=True)
        self.data_fingerprint = source_fingerprint(train_src)  # a resume checks it is the same data
        self.sft_loader = self.rl_loader = None
        if cfg.sft.steps > 0:
            src, pc = _process_rows(train_src, PipelineConfig(batch_size=cfg.sft.batch_size, **common),
                                    "sft.batch_size")
            self.sft_loader = sft_loader(src, self.tokenizer, pc, model_config=mc)
        if cfg.rl.steps > 0:
            src, pc = _process_rows(train_src, PipelineConfig(batch_size=d.batch_size, group_size=d.group_size,
                                                              **common), "data.batch_size")
            self.rl_loader = rl_prompt_loader(src, self.tokenizer, pc, model_config=mc)
        eval_common = dict(common, seed=d.seed, shard_index=0, shard_count=1)
        self.eval_loader = eval_loader(_source(cfg, eval_split=True, train=train_src), self.tokenizer,
                                       PipelineConfig(batch_size=cfg.eval.batch_size, **eval_common), model_config=mc)
        self.sft_iter = iter(self.sft_loader) if self.sft_loader is not None else None
        self.rl_iter = iter(self.rl_loader) if self.rl_loader is not None else None

    def _build_optim(self, params):
        """Both phases' optimizers and schedules, the sampling, sparsity and learner configs."""
        cfg = self.cfg
        self.sft_opt, self.rl_opt = phase_optim_config(cfg, "sft"), phase_optim_config(cfg, "rl")
        self.sft_tx = make_optimizer(self.sft_opt, params)
        self.rl_tx = make_optimizer(self.rl_opt, params)
        self.sft_schedule = learning_rate_schedule(self.sft_opt)
        self.rl_schedule = learning_rate_schedule(self.rl_opt)
        self.eos_ids = (self.special.im_end, int(self.tokenizer.convert_tokens_to_ids("<|endoftext|>")))
        self.sparsity = sparsity_config(cfg.sparsity)
        self.learner_config = learner_config(cfg, sampling_config(cfg, self.special, self.eos_ids), self.sparsity)

    def next_batch(self, phase: str) -> dict:
        """The next global host batch of `phase` ("sft" / "rl"); with several processes, every
        process's rows gathered in process order (a collective: all processes call it)."""
        batch = next(self.sft_iter if phase == "sft" else self.rl_iter)
        if jax.process_count() == 1:
            return batch
        return gather_batch(batch, padding_side="right" if phase == "sft" else "left", pad_id=self.special.pad)

    # ------------------------------------------------------------------ state
    def state_shardings(self, tx):
        key = id(tx)
        if key not in self._sh_cache:
            abstract_opt = jax.eval_shape(tx.init, self.params0)
            self._sh_cache[key] = TrainState(step=self.placement.replicated, params=self.param_shardings,
                                             opt_state=opt_state_shardings(abstract_opt, self.param_shardings))
        return self._sh_cache[key]

    def init_state(self, params, tx):
        sh = self.state_shardings(tx)
        opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
        return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), sh.step), params=params, opt_state=opt_state)

    def _abstract(self, tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    def restore_or_init(self):
        """(state, global step, phase) from the latest checkpoint, or a fresh start."""
        cfg = self.cfg
        latest = self.resume_step
        if latest is None:
            if cfg.sft.steps > 0:
                return self.init_state(self.params0, self.sft_tx), 0, "sft"
            return self.init_state(self.params0, self.rl_tx), 0, "init"
        meta = self.ckpt.restore_meta(latest)
        phase = meta["phase"]
        tx = self.sft_tx if phase == "sft" else self.rl_tx
        sh = self.state_shardings(tx)
        abstract_opt = jax.eval_shape(tx.init, self.params0)
        got = self.ckpt.restore(latest, params_target=self._abstract(self.params0, self.param_shardings),
                                opt_state_target=self._abstract(abstract_opt, sh.opt_state))
        state = TrainState(step=jax.device_put(jnp.asarray(meta["phase_step"], jnp.int32), sh.step),
                           params=got["params"], opt_state=got["opt_state"])
        ds = got.get("data_state") or {}
        if ds.get("sft") is not None and self.sft_iter is not None:
            self.sft_iter.set_state(ds["sft"])
        if ds.get("rl") is not None and self.rl_iter is not None:
            self.rl_iter.set_state(ds["rl"])
        if phase == "rl":
            self.ref_params = self._load_reference()
        if phase == "sft" and latest >= cfg.sft.steps:
            phase = "sft_done"
        return state, int(latest), phase

    def _reference_dir(self) -> str:
        return os.path.join(self.ckpt.directory, "reference")

    def _load_reference(self):
        if self.cfg.rl.beta_kl == 0:
            return None
        return restore_params(self._reference_dir(), self._abstract(self.params0, self.param_shardings))

    def start_rl(self, state):
        """The policy at the start of RL becomes the frozen DENSE reference; fresh RL optimizer."""
        if self.cfg.rl.beta_kl > 0:
            self.ref_params = jax.tree.map(lambda x: x.copy(), state.params)
            ref_dir = self._reference_dir()
            exists = os.path.exists(ref_dir)
            barrier("zipr1_reference_check")  # all processes decide before any of them writes
            if not exists:
                save_params(ref_dir, self.ref_params)
        return self.init_state(state.params, self.rl_tx)

    def maybe_save(self, g: int, state, phase: str, *, force: bool = False) -> bool:
        phase_step = g if phase == "sft" else g - self.cfg.sft.steps
        data_state = {"sft": None if self.sft_iter is None else self.sft_iter.get_state(),
                      "rl": None if self.rl_iter is None else self.rl_iter.get_state()}
        meta = {"phase": phase, "phase_step": int(phase_step), "global_step": int(g),
                "fingerprint": fingerprint(self.cfg, self.model_config), "data_fingerprint": self.data_fingerprint,
                "config": self.cfg.to_dict()}
        return self.ckpt.save(g, params=state.params, opt_state=state.opt_state, meta=meta, data_state=data_state,
                              force=force)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, params) -> dict:
        model = nnx.merge(self.graphdef, params)
        context = self.placement.context
        if jax.process_count() > 1:
            # evaluate_greedy reads the sampler's outputs with np.asarray, which only works for arrays
            # every process holds whole: do not split eval rows over processes (parameters stay sharded).
            rules = tuple((name, None if name == "batch" else axes) for name, axes in self.placement.rules)
            context = lambda: use_mesh(self.mesh, rules)  # noqa: E731
        results = {}
        for p in self.cfg.eval.p_list:
            if p < 1.0 and not self.sparsity.enabled:
                continue
            res = evaluate_greedy(model, iter(self.eval_loader), self.tokenizer, p=p,
                                  max_new_tokens=self.cfg.rl.max_new_tokens, eos_ids=self.eos_ids,
                                  pad_id=self.special.pad, seed=self.cfg.seed, context=context,
                                  sparsity=self.sparsity)
            results.update(res.metrics())
            results["eval_examples"] = res.num_examples
        return results

    def eval_and_log(self, params, g: int, tag: str) -> dict:
        metrics = self.evaluate(params)
        self.logger.log(g, metrics, phase="eval", show=False)
        self.logger.write(f"eval ({tag}, step {g}): " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if tag == "before_rl" and jax.process_index() == 0:
            # Kept on disk: a run resumed mid-RL still compares its final numbers with the SFT model.
            with open(os.path.join(self.out_dir, BEFORE_RL_EVAL), "w") as f:
                json.dump({"step": int(g), **metrics}, f, indent=2)
        return metrics

    # ------------------------------------------------------------------ end
    def finish(self, state, g: int, *, stopped: bool, final_eval: bool = False) -> dict:
        self.ckpt.wait()
        summary = {"global_step": int(g), "stopped_early": stopped, "out_dir": self.out_dir,
                   "checkpoint_dir": str(self.ckpt.directory), "latest_checkpoint": self.ckpt.latest_step()}
        if final_eval:
            summary["final_eval"] = self.eval_and_log(state.params, g, "final")
            before = os.path.join(self.out_dir, BEFORE_RL_EVAL)
            if self.cfg.rl.steps > 0 and os.path.isfile(before):
                with open(before) as f:
                    ev = json.load(f)
                if ev.get("step") == self.cfg.sft.steps:  # this run's RL start, not a stale file of another
                    summary["before_rl_eval"] = ev
        if jax.process_index() == 0:
            if self.cfg.log.plots and os.path.isfile(self.logger.jsonl_path):
                summary["plots"] = plot_metrics(self.logger.jsonl_path, os.path.join(self.out_dir, "plots"))
            write_summary(os.path.join(self.out_dir, "summary.json"), summary)
        return summary

    def close(self):
        self.ckpt.close()
        self.logger.close()


def fingerprint(cfg: TrainConfig, model_config) -> dict:
    """What a resume must agree on: the resolved model architecture (presets expanded, so
    `model.layers=2` equals a preset's default of 2) and the sparsity mode."""
    arch = {k: v for k, v in dataclasses.asdict(model_config).items() if k not in ("name", "extra_hf")}
    return {"model_config": json.loads(json.dumps(arch, default=str)), "sparsity_mode": cfg.sparsity.mode}


def _differences(a, b, prefix: str = "") -> list[str]:
    """'key: checkpoint X vs now Y' for every leaf where nested dicts a (saved) and b (now) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r} vs now {b!r}"]


def plan_resume(cfg: TrainConfig, ckpt, model_config, data_fingerprint: dict | None = None) -> int | None:
    """The step this run resumes from (None: a fresh start), after every refusal that must come
    before anything is written: a fresh run into a directory holding another run, an unknown
    checkpoint.resume_step, a checkpoint of a different model. With resume_step the later steps
    are moved to `<checkpoint dir>/superseded/` (and the KL reference too when going back before RL)."""
    c = cfg.checkpoint
    steps = ckpt.all_steps()
    metrics = os.path.join(cfg.log.out_dir, "metrics.jsonl")
    if not c.resume:
        if steps or (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
            held = f"checkpoint steps {steps} in {ckpt.directory}" if steps else f"a metrics file {metrics}"
            raise TrainConfigError(f"checkpoint.resume=false, but the run directory already holds {held} of "
                                   "another run; a new run there would mix with it. Use a new log.out_dir (and "
                                   "checkpoint.dir), or resume it (checkpoint.resume=true, optionally "
                                   "checkpoint.resume_step=N)")
        return None
    if c.resume_step is not None and c.resume_step not in steps:
        raise TrainConfigError(f"checkpoint.resume_step: no step {c.resume_step} in {ckpt.directory}; available "
                               f"steps: {steps or 'none'}")
    latest = c.resume_step if c.resume_step is not None else (steps[-1] if steps else None)
    if latest is None:
        return None
    meta = ckpt.restore_meta(latest)
    saved_data = meta.get("data_fingerprint")
    if saved_data is not None and data_fingerprint is not None and saved_data != data_fingerprint \
            and not c.allow_data_change:
        raise TrainConfigError(f"checkpoint step {latest} in {ckpt.directory} was trained on other data "
                               f"({saved_data['num_records']} records, hash {saved_data['hash']}; now "
                               f"{data_fingerprint['num_records']} records, hash {data_fingerprint['hash']}): the "
                               "batches after the resume would not continue the run. Restore the data, use a new "
                               "log.out_dir, or set checkpoint.allow_data_change=true to continue on the new data")
    saved = meta.get("fingerprint") or {}
    if "model_config" in saved:  # checkpoints of older versions: the restore's shape check still applies
        now = fingerprint(cfg, model_config)
        diff = _differences(saved, now)
        if diff:
            raise TrainConfigError(f"checkpoint.dir {ckpt.directory} holds step {latest} of a different model / "
                                   f"sparsity setup: {'; '.join(diff[:5])}. Use another log.out_dir / "
                                   "checkpoint.dir, or the checkpoint's settings")
    if c.resume_step is not None and jax.process_index() == 0:
        # Going back to before RL: RL restarts and rebuilds its KL reference.
        ckpt.set_aside_after(latest, also=("reference",) if latest <= cfg.sft.steps else ())
    return latest


def setup(cfg: TrainConfig, devices=None) -> Job:
    return Job(cfg, devices)
