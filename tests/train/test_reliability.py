"""What the trainer guarantees when things go wrong (README "Failure behaviour"): an exploding step
is never saved, a chosen older step can be resumed from, a second run never mixes into a run
directory, a resume checks the resolved model and writes nothing when it refuses, and unwritable
directories stop the run before its first step."""

import json
import os

import jax
import numpy as np
import pytest

from zipr1_jax.checkpoint import CheckpointError, Checkpointer, restore_params
from zipr1_jax.train.cli import load_config
from zipr1_jax.train.config import TrainConfigError
from zipr1_jax.train.trainer import TrainingDivergedError, run

from tests.train.tiny_run import TINY

ONE = jax.devices()[:1]
# 2 SFT + 3 GRPO steps; RL at an absurd learning rate (the reproduction used 1e6). Dense
# evaluation only: one program fewer to compile.
EXPLODE = ["sft.steps=2", "rl.steps=3", "rl.lr=1e6", "eval.p_list=[1.0]"]


def _cfg(out, *extra):
    return load_config(None, TINY + [f"log.out_dir={out}"] + list(extra))


def _steps(out):
    return sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())


def _rows(out, name="metrics.jsonl"):
    with open(out / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    out = tmp_path_factory.mktemp("diverged")
    with pytest.raises(TrainingDivergedError) as err:
        run(_cfg(out, *EXPLODE), devices=ONE)
    return out, str(err.value)


def test_an_exploding_step_is_not_saved(diverged):
    out, msg = diverged
    assert msg.startswith("rl step 3 diverged: the update is ")
    assert "Latest good checkpoint: step 2 in " in msg and "checkpoint.resume_step=N" in msg
    assert "gradient clipping" not in msg  # rl.grad_clip is on (1.0): lowering the lr is the advice
    assert _steps(out) == [1, 2]  # the SFT steps; the first RL step never landed
    # What is on disk is sane: the saved parameters are those of a normal SFT step.
    from zipr1_jax.train.setup import Job

    job = Job(_cfg(out, *EXPLODE), devices=ONE)
    try:
        params = restore_params(out / "checkpoints" / "2" / "params", job.params0)
        norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(params))))
        norm0 = float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(job.params0))))
        assert norm < 2 * norm0, (norm, norm0)
    finally:
        job.close()


def test_a_fresh_run_into_a_used_directory_is_refused_before_writing(diverged):
    out, _ = diverged
    before = {p: (out / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(TrainConfigError, match=r"checkpoint.resume=false, but the run directory already holds "
                                               r"checkpoint steps \[1, 2\]"):
        run(_cfg(out, *EXPLODE, "checkpoint.resume=false"), devices=ONE)
    assert {p: (out / p).read_bytes() for p in before} == before


def test_a_resume_into_another_model_names_the_key_and_writes_nothing(diverged):
    out, _ = diverged
    before = (out / "config.yaml").read_bytes()
    with pytest.raises(TrainConfigError, match=r"text.num_hidden_layers: checkpoint 2 vs now 3"):
        run(_cfg(out, *EXPLODE, "model.layers=3"), devices=ONE)
    assert (out / "config.yaml").read_bytes() == before
    with pytest.raises(TrainConfigError, match=r"checkpoint.resume_step: no step 7 in .*available steps: \[1, 2\]"):
        run(_cfg(out, *EXPLODE, "checkpoint.resume_step=7"), devices=ONE)
    # Other data (here: fewer records) is named too, before anything is written.
    with pytest.raises(TrainConfigError, match=r"step 2 in .* was trained on other data \(64 records, hash \w+; now "
                                               r"48 records.*checkpoint.allow_data_change=true"):
        run(_cfg(out, *EXPLODE, "data.num_examples=48"), devices=ONE)
    assert (out / "config.yaml").read_bytes() == before


@pytest.mark.slow  # a full resumed run (~50 s); the set-aside itself is tested in tests/checkpoint
def test_resume_from_an_older_step_sets_the_later_ones_aside(diverged, tmp_path):
    import shutil

    src, _ = diverged
    out = tmp_path / "run"
    shutil.copytree(src, out)
    # The preset's own depth spelled out (model.layers=2) is the same model: accepted.
    summary = run(_cfg(out, "sft.steps=2", "rl.steps=3", "eval.p_list=[1.0]", "model.layers=2",
                       "checkpoint.resume_step=1"), devices=ONE)
    assert summary["global_step"] == 5 and not summary["stopped_early"]
    # Kept, not deleted: step 2 and the KL reference the first run wrote when its RL began.
    assert sorted(os.listdir(out / "checkpoints" / "superseded")) == ["2", "reference"]
    assert _steps(out) == [1, 2, 3, 4, 5]
    rows = [(r["phase"], r["step"]) for r in _rows(out)]
    assert len(rows) == len(set(rows)), rows  # each step once in metrics.jsonl
    assert [r["step"] for r in _rows(out) if r["phase"] == "sft"] == [1, 2]
    assert ("sft", 2) in [(r["phase"], r["step"]) for r in _rows(out, "metrics.superseded.jsonl")]


def test_unwritable_directories_stop_the_run_up_front(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"log.out_dir .*file/run is not writable"):
        run(_cfg(tmp_path / "file" / "run"), devices=ONE)
    with pytest.raises(CheckpointError, match=r"checkpoint.dir .*file/ck is not writable"):
        run(_cfg(tmp_path / "ok", f"checkpoint.dir={tmp_path / 'file' / 'ck'}"), devices=ONE)
    assert not (tmp_path / "ok" / "config.yaml").exists()


def test_a_failed_background_save_is_reported_at_once(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "ck", async_save=True)
    params = {"w": np.ones((4,), np.float32)}
    assert ck.save(1, params=params, force=True)
    ck.wait()

    def failed():
        raise RuntimeError("[Errno 28] No space left on device")

    monkeypatch.setattr(ck._manager, "check_for_errors", failed)
    with pytest.raises(CheckpointError, match=r"saving a checkpoint to .*ck failed \(RuntimeError: \[Errno 28\] No "
                                              r"space left on device\)"):
        ck.check()
    with pytest.raises(CheckpointError, match="No space left"):  # and before another save starts
        ck.save(2, params=params, force=True)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="step 1 already exists"):  # never skipped silently
        ck.save(1, params=params, force=True)
    ck.close()


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_clear_error(tmp_path):
    """A real failed background save: the process may write files of at most 300 kB (the checkpoint's
    arrays are bigger; metrics and config lines are not), as on a disk that fills up mid-run."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [a for a in TINY if not a.startswith("checkpoint.")] + ["checkpoint.async_save=true",
                                                                    f"log.out_dir={tmp_path}"]
    done = subprocess.run([sys.executable, os.path.join(root, "scripts", "train.py")] + args, preexec_fn=small_files,
                          env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 1, done.stderr[-3000:]
    # Orbax's threads print tracebacks concurrently (C-level, unbuffered), so the error line can share
    # a line with their text: look for it anywhere.
    import re

    errors = re.findall(r"error: [^\n]*", done.stderr)
    assert len(errors) == 1, done.stderr[-3000:]
    # The step's async save or the KL reference's save, whichever the full disk hits first.
    assert re.match(rf"error: saving (a checkpoint|parameters) to {tmp_path / 'checkpoints'}\S* failed \(", errors[0])
    assert "File too large" in errors[0]
    assert not (tmp_path / "summary.json").exists()
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]  # no half step looks finished
