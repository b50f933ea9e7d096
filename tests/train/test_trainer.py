"""The main job end to end on a tiny run: SFT -> GRPO with sparse rollouts -> eval, metrics,
plots, checkpoints; resume equals an uninterrupted run; a non-finite loss stops without saving;
the same run on a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices gives the same losses."""

import json
import math
import os

import jax
import numpy as np
import pytest

from zipr1_jax.train.cli import load_config
from zipr1_jax.train.sft import all_text_targets
from zipr1_jax.train.trainer import TrainingDivergedError, run, summary_line

from tests.train.tiny_run import MESH_222, TINY

ONE = jax.devices()[:1]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"log.out_dir={tmp_path}"] + list(extra))


def _records(path, phase):
    out = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["phase"] == phase:
                out[r["step"]] = r
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = run(_cfg(out), devices=ONE)
    return out, summary


def test_end_to_end_outputs(full_run):
    out, summary = full_run
    assert summary["global_step"] == 5 and not summary["stopped_early"]
    ev = summary["final_eval"]
    assert set(ev) == {"accuracy_dense", "token_ratio_dense", "accuracy_p0.9", "token_ratio_p0.9", "eval_examples"}
    assert ev["eval_examples"] == 4
    assert ev["token_ratio_dense"] == 1.0 and 0.0 < ev["token_ratio_p0.9"] < 1.0
    sft, rl = _records(out, "sft"), _records(out, "rl")
    assert sorted(sft) == [1, 2, 3] and sorted(rl) == [4, 5]
    for r in rl.values():
        for key in ("loss", "reward", "accuracy", "token_ratio", "kl", "clip_frac", "grad_norm", "lr", "kv_fraction"):
            assert r[key] is not None and math.isfinite(r[key]), key
        assert 0.0 < r["token_ratio"] < 1.0  # sparse rollouts at p in {0.9, 0.95}
        # The learner recomputes the rollout's log-probs over the kept sets the rollout hands over
        # (select_end = prompt length): sampler and trainer agree.
        assert r["logp_mismatch"] < 1e-4, r["logp_mismatch"]
        assert 0.0 < r["kv_fraction"] <= 1.0  # decode cache slots vs a whole-prompt cache
    assert os.path.isfile(out / "plots" / "summary.png") and os.path.isfile(out / "plots" / "eval.png")
    assert json.load(open(out / "summary.json"))["global_step"] == 5
    # The final line compares with the model before RL (the SFT model, evaluated at step 3).
    assert summary["before_rl_eval"]["step"] == 3
    assert set(summary["before_rl_eval"]) == {"step"} | set(ev)
    line = summary_line(summary)
    assert line.startswith("final eval (step 5) vs before RL (step 3), n=4: dense: accuracy ")
    r0, r1 = summary["before_rl_eval"]["token_ratio_p0.9"], ev["token_ratio_p0.9"]
    assert f"token ratio {r0:.3f} -> {r1:.3f} ({r1 / r0:.2f}x)" in line
    assert os.path.isdir(out / "checkpoints" / "reference")
    assert sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit()) == [1, 2, 3, 4, 5]


def test_resume_equals_uninterrupted(full_run, tmp_path):
    out, _ = full_run
    first = run(_cfg(tmp_path), stop_after_step=4, devices=ONE)  # stops mid-RL
    assert first["stopped_early"] and first["latest_checkpoint"] == 4
    second = run(_cfg(tmp_path), devices=ONE)
    assert second["global_step"] == 5
    a, b = _records(out, "rl"), _records(tmp_path, "rl")
    for key in ("loss", "reward", "token_ratio", "kl"):
        np.testing.assert_allclose(b[5][key], a[5][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_nonfinite_loss_stops_and_keeps_checkpoints(tmp_path, monkeypatch):
    import zipr1_jax.train.trainer as trainer  # the name the training loop calls

    real = trainer.sft_step

    def poisoned(state, batch, **kw):
        state, m = real(state, batch, **kw)
        if int(state.step) == 2:
            m["loss"] = float("nan")
        return state, m

    monkeypatch.setattr(trainer, "sft_step", poisoned)
    with pytest.raises(TrainingDivergedError, match="non-finite loss.*step 1"):
        run(_cfg(tmp_path), devices=ONE)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [1]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices: see tests/conftest.py")
def test_sharded_run_matches_single_device(full_run, tmp_path):
    out, _ = full_run
    from zipr1_jax.checkpoint import restore_params
    from zipr1_jax.models.qwen_vl.config import tiny_qwen2_vl
    from zipr1_jax.sharding.mesh import make_mesh
    from zipr1_jax.sharding.rules import abstract_with_shardings, per_device_bytes, state_shardings
    from zipr1_jax.train.builders import abstract_params

    run(_cfg(tmp_path, *MESH_222))
    # Losses of every step (SFT and GRPO). Tolerance: fp32 reductions are split over 8 devices in
    # another order; 1e-4 relative is the end-to-end fp32 budget.
    for phase in ("sft", "rl"):
        a, b = _records(out, phase), _records(tmp_path, phase)
        for step in a:
            for key in ("loss", "grad_norm"):
                np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-4, atol=1e-6,
                                           err_msg=f"{phase} step {step} {key}")
    # Parameters after the first optimizer step, restored on one device from both runs.
    abstract = abstract_params(tiny_qwen2_vl())[1]
    one = make_mesh(1, 1, 1, devices=ONE)
    target = abstract_with_shardings(abstract, state_shardings(abstract, one))
    p1 = restore_params(out / "checkpoints" / "1" / "params", target)
    p8 = restore_params(tmp_path / "checkpoints" / "1" / "params", target)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    # Really sharded: per-device parameter bytes on (2, 2, 2) vs one device.
    mesh8 = make_mesh(2, 2, 2)
    ratio = per_device_bytes(abstract, state_shardings(abstract, mesh8)) / per_device_bytes(
        abstract, state_shardings(abstract, one))
    assert ratio < 0.45, ratio  # ideal 1/(fsdp*tensor) = 0.25; odd tiny dims (131, 263) stay whole


def test_kill_and_resume_subprocess(full_run, tmp_path):
    """SIGKILL a real `scripts/train.py` process right after checkpoint 4 lands, rerun the same
    command: the loss of the remaining step equals the uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    out, _ = full_run
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "scripts", "train.py")] + TINY + [f"log.out_dir={tmp_path}"]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device, like full_run
    ckpt = tmp_path / "checkpoints"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while not (ckpt / "4").is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "summary.json").exists()  # it really died before the end
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint step" in done.stderr
    assert "vs before RL (step 3)" in done.stdout  # read back from eval_before_rl.json after the kill
    a, b = _records(out, "rl"), _records(tmp_path, "rl")
    np.testing.assert_allclose(b[5]["loss"], a[5]["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[5]["reward"], a[5]["reward"], rtol=1e-5, atol=1e-6)


def test_summary_line_golden():
    summary = {"global_step": 340, "final_eval": {"accuracy_dense": 0.4375, "token_ratio_dense": 1.0,
                                                  "accuracy_p0.975": 0.453125, "token_ratio_p0.975": 0.735,
                                                  "eval_examples": 256},
               "before_rl_eval": {"step": 300, "accuracy_dense": 0.484375, "token_ratio_dense": 1.0,
                                  "accuracy_p0.975": 0.515625, "token_ratio_p0.975": 0.98}}
    assert summary_line(summary) == ("final eval (step 340) vs before RL (step 300), n=256: dense: accuracy 0.484 -> "
                                     "0.438; p=0.975: accuracy 0.516 -> 0.453, token ratio 0.980 -> 0.735 (0.75x)")
    del summary["before_rl_eval"]  # e.g. an SFT-only run
    assert summary_line(summary).startswith("final eval (step 340): accuracy_dense 0.438, token_ratio_dense 1.000")
    assert summary_line({"global_step": 3}) == "final eval: none"


def test_sft_all_targets(full_run, tmp_path):
    ids = np.array([[9, 5, 251, 251, 6, 7, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(all_text_targets(ids, mask, (251, 252)), [[1, 1, 0, 0, 1, 1, 0]])
    # sft.targets=all trains on the prompt text too: many more target tokens than the answer alone.
    out, _ = full_run
    run(_cfg(tmp_path, "sft.targets=all", "rl.steps=0", "checkpoint.save_every=0"), devices=ONE)
    answer, every = _records(out, "sft"), _records(tmp_path, "sft")
    # the 4 rows of a batch each add their prompt's text tokens (~30 with no system turn) to the answers'
    assert every[1]["target_tokens"] > answer[1]["target_tokens"] + 4 * 20
    assert math.isfinite(every[3]["loss"])


def test_init_params_from_an_orbax_params_checkpoint(full_run, tmp_path):
    """model.init_params: start RL from the full run's reference (its weights after SFT) without SFT:
    the evaluation before RL equals the full run's (same weights, read into the mesh shardings)."""
    from zipr1_jax.checkpoint import CheckpointError
    from zipr1_jax.train.config import TrainConfigError

    out, summary = full_run
    ref = out / "checkpoints" / "reference"
    got = run(_cfg(tmp_path / "a", f"model.init_params={ref}", "sft.steps=0", "rl.steps=1"), devices=ONE)
    assert got["before_rl_eval"] == {**summary["before_rl_eval"], "step": 0}
    # A step directory and a checkpoint directory (its latest step) work too.
    got = run(_cfg(tmp_path / "b", f"model.init_params={out / 'checkpoints'}", "sft.steps=0", "rl.steps=1",
                   "eval.p_list=[1.0]"), devices=ONE)
    assert got["global_step"] == 1
    # A real preset needs no HF directory when it starts from converted weights (+ a tokenizer).
    real_yaml = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "qwen2_5_vl_7b_tpu_v5e.yaml")
    load_config(real_yaml, [f"model.init_params={ref}", f"data.tokenizer={out / 'tokenizer'}"]).check_runnable()
    with pytest.raises(TrainConfigError, match="model.init_params"):
        load_config(real_yaml, []).check_runnable()
    with pytest.raises(CheckpointError, match="holds no parameters"):
        run(_cfg(tmp_path / "c", f"model.init_params={tmp_path}", "sft.steps=0"), devices=ONE)
    with pytest.raises(TrainConfigError, match="model.init_params"):
        run(_cfg(tmp_path / "d", f"model.init_params={tmp_path / 'missing'}"), devices=ONE)
