"""`run(cfg)`: the whole ZipR1 job. SFT warm-up, then multi-budget GRPO with sparse rollouts,
evaluation (dense and top-p) before and after RL, Orbax checkpoints with automatic resume,
JSONL + TensorBoard metrics, plots, and a summary.

Steps are numbered globally: [0, sft.steps) are SFT steps, then rl.steps GRPO steps. A checkpoint
at global step g holds the params and optimizer state after g steps, the data iterators' positions
and the phase; restarting the same command continues from the latest one (same batches, same
random keys: step g always uses fold_in(seed, g)). The frozen reference model of the KL term (the
policy at the start of RL) is written once to `<checkpoint dir>/reference`.
"""

from __future__ import annotations

import contextlib
import time

import jax

from zipr1_jax.rl.learner import GRPOLearner
from zipr1_jax.train.config import TrainConfig, TrainConfigError
from zipr1_jax.train.guard import TrainingDivergedError, divergence_message
from zipr1_jax.train.setup import setup
from zipr1_jax.train.sft import sft_step
from zipr1_jax.train.summary import summary_line  # public here too (scripts/train.py, tests)


def run(cfg: TrainConfig, *, stop_after_step: int | None = None, devices=None) -> dict:
    """Run (or resume) the job of `cfg`; returns the summary dict (also written to summary.json).

    stop_after_step: stop once this global step is done (as if killed right after a checkpoint);
    for tests and for splitting a job into chunks.
    devices: the devices of the mesh (default: all); e.g. one device in a test session with 8.
    """
    cfg.check_runnable()
    job = setup(cfg, devices=devices)
    try:
        summary = _run(cfg, job, stop_after_step)
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            job.close()
        raise
    job.close()
    return summary


def _checked(metrics: dict, phase: str, step: int, job) -> None:
    """Stop before step `step` can be saved if the guard finds it diverged, or if a background
    save of an earlier step failed."""
    job.ckpt.check()
    problem = job.guard.problem(metrics, phase)
    if problem is not None:
        job.ckpt.wait()
        clip = job.cfg.sft.grad_clip if phase == "sft" else job.cfg.rl.grad_clip
        raise TrainingDivergedError(divergence_message(problem, phase=phase, step=step, latest=job.ckpt.latest_step(),
                                                       directory=str(job.ckpt.directory), grad_clip=clip))


def _run(cfg: TrainConfig, job, stop_after_step):
    n_sft, n_rl = cfg.sft.steps, cfg.rl.steps
    mc = job.model_config
    skip = None if cfg.sft.targets == "answer" else (mc.image_token_id, mc.video_token_id)
    total = n_sft + n_rl
    state, g, phase = job.restore_or_init()
    log = job.logger
    if g > 0:
        log.write(f"resumed from checkpoint step {g} ({phase}) in {job.ckpt.directory}")
    t_start = time.perf_counter()

    def done(step):
        return stop_after_step is not None and step >= stop_after_step

    # ---------------------------------------------------------------- SFT
    if g < n_sft:
        log.start_phase("sft", n_sft, first_step=g)
        while g < n_sft:
            state, m = sft_step(state, job.next_batch("sft"), tx=job.sft_tx, graphdef=job.graphdef,
                                placement=job.placement, state_shardings=job.state_shardings(job.sft_tx),
                                all_targets_except=skip)
            g += 1
            _checked(m, "sft", g, job)
            m["lr"] = float(job.sft_schedule(g - 1))
            if g % cfg.log.log_every == 0 or g == n_sft:
                log.log(g, m, phase="sft")
            job.maybe_save(g, state, "sft", force=(g == n_sft))
            if done(g):
                return job.finish(state, g, stopped=True)
    # ---------------------------------------------------------------- RL
    if n_rl > 0:
        if phase != "rl":
            job.eval_and_log(state.params, g, "before_rl")
            state = job.start_rl(state)
        learner = GRPOLearner(job.learner_config, job.graphdef, job.rl_tx, job.tokenizer, job.placement,
                              state_shardings=job.state_shardings(job.rl_tx))
        log.start_phase("rl", total, first_step=g)
        key = jax.random.key(cfg.seed)
        while g < total:
            batch = job.next_batch("rl")
            state, m, _ = learner.step(state, job.ref_params, batch, jax.random.fold_in(key, g), step=g)
            g += 1
            _checked(m, "rl", g, job)
            m["lr"] = float(job.rl_schedule(g - n_sft - 1))
            if g % cfg.log.log_every == 0 or g == total:
                log.log(g, m, phase="rl")
            if cfg.eval.every and (g - n_sft) % cfg.eval.every == 0 and g < total:
                job.eval_and_log(state.params, g, "rl")
            job.maybe_save(g, state, "rl", force=(g == total))
            if done(g):
                return job.finish(state, g, stopped=True)
    summary = job.finish(state, g, stopped=False, final_eval=True)
    summary["wall_time_s"] = time.perf_counter() - t_start
    return summary


__all__ = ["TrainConfigError", "TrainingDivergedError", "run", "summary_line"]
