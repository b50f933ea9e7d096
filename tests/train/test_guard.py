"""The divergence guard on golden numbers, and the metrics rows a resume supersedes."""

import json
import math

import pytest

from zipr1_jax.train.config import GuardSection, TrainConfigError
from zipr1_jax.train.guard import DivergenceGuard, divergence_message
from zipr1_jax.train.metrics import SUPERSEDED_NAME, set_aside_rows_after


def _ok(**kw):
    return {"loss": 1.0, "grad_norm": 0.5, "param_norm": 10.0, "update_norm": 0.1, **kw}


def test_non_finite_values_are_named():
    g = DivergenceGuard(GuardSection())
    assert g.problem(_ok(), "sft") is None
    assert g.problem(_ok(loss=math.nan, update_norm=math.inf), "sft") == "non-finite loss (nan), update_norm (inf)"


def test_update_ratio_uses_the_norm_before_the_step():
    g = DivergenceGuard(GuardSection(max_update_ratio=1.0))
    # |params| after = 10, |update| = 4: before the step |params| >= 6, ratio 4/6 < 1.
    assert g.problem(_ok(param_norm=10.0, update_norm=4.0), "rl") is None
    # An lr of 1e6: the update dwarfs the parameters it was applied to.
    msg = g.problem(_ok(param_norm=3.0e6, update_norm=3.0e6 - 5.0), "rl")
    assert msg.startswith("the update is 6e+05x the parameters' norm") and "guard.max_update_ratio 1" in msg


def test_loss_spike_needs_half_a_window_and_respects_the_floor_and_phase():
    g = DivergenceGuard(GuardSection(loss_spike=10.0, loss_window=4, loss_floor=0.1))
    assert g.problem(_ok(loss=0.01), "sft") is None
    assert g.problem(_ok(loss=50.0), "sft") is None  # one value seen: too early to judge (and recorded)
    g = DivergenceGuard(GuardSection(loss_spike=10.0, loss_window=4, loss_floor=0.1))
    for _ in range(2):
        assert g.problem(_ok(loss=0.01), "sft") is None
    # mean |loss| 0.01 is below the floor 0.1: the threshold is 10 x 0.1, and 0.9 passes.
    assert g.problem(_ok(loss=0.9), "sft") is None
    # Now mean |loss| = (0.01 + 0.01 + 0.9) / 3: the threshold is 3.067.
    assert g.problem(_ok(loss=-3.0), "sft") is None
    assert g.problem(_ok(loss=-40.0), "sft").startswith("loss spike: -40 vs a recent mean |loss| of 0.98")
    # A new phase starts a new window (RL losses have another scale than SFT's).
    assert g.problem(_ok(loss=-40.0), "rl") is None
    assert DivergenceGuard(GuardSection(loss_spike=0.0)).problem(_ok(loss=1e9), "rl") is None


def test_guard_config_is_validated():
    with pytest.raises(TrainConfigError, match="guard.max_update_ratio: must be > 0.0"):
        GuardSection(max_update_ratio=0)
    with pytest.raises(TrainConfigError, match="guard.loss_window: must be >= 2"):
        GuardSection(loss_window=1)


def test_the_hint_suggests_clipping_only_when_it_is_off():
    kw = dict(phase="rl", step=4, latest=3, directory="/ck")
    on = divergence_message("non-finite loss (nan)", grad_clip=1.0, **kw)
    off = divergence_message("non-finite loss (nan)", grad_clip=0.0, **kw)
    assert "gradient clipping" not in on and "lower rl.lr" in on
    assert "enable gradient clipping (rl.grad_clip=1.0)" in off
    assert "Latest good checkpoint: step 3 in /ck" in on and "checkpoint.resume_step=N" in on
    assert "Latest good checkpoint: none" in divergence_message("x", grad_clip=1.0, **{**kw, "latest": None})


def test_resume_moves_the_redone_rows_aside(tmp_path):
    rows = [{"phase": "sft", "step": 1}, {"phase": "sft", "step": 2}, {"phase": "eval", "step": 2},
            {"phase": "rl", "step": 3}, {"phase": "rl", "step": 4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"phase": "rl", "st')
    assert set_aside_rows_after(tmp_path, 2) == 2
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:3]  # the killed run's half line is gone too
    moved = [json.loads(x) for x in (tmp_path / SUPERSEDED_NAME).read_text().splitlines()]
    assert moved == rows[3:]
    assert set_aside_rows_after(tmp_path, -1) == 3  # a fresh start: every row is superseded
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert set_aside_rows_after(tmp_path / "nothing", 5) == 0
