"""The controls experiment: arm configs, the ratio floor, the report table, and (slow) a tiny end-to-end run."""

from __future__ import annotations

import os
import sys

import pytest

from zipr1_jax.eval.controls import ARMS, _report, arm_config, ratio_floor
from zipr1_jax.eval.harness import SettingResult
from zipr1_jax.train.cli import load_config
from zipr1_jax.train.config import TrainConfig


def test_arm_configs_change_one_knob():
    cfg = TrainConfig()
    made = {arm: arm_config(cfg, arm, 1, "/ckpt", "/out") for arm in ARMS}
    for arm, c in made.items():
        assert c.seed == 1 and c.sft.steps == 0 and c.model.init_params == "/ckpt"
        assert c.data == cfg.data and c.sparsity == cfg.sparsity  # same data order and selection
        assert c.log.out_dir == f"/out/{arm}_seed1"
    assert (made["no_efficiency"].rl.lambda_eff, made["no_efficiency"].rl.lambda_path) == (0.0, 0.0)
    assert (made["paper_literal"].rl.lambda_eff, made["paper_literal"].rl.lambda_path) == (1.0, 0.0)
    assert (made["pathwise"].rl.lambda_eff, made["pathwise"].rl.lambda_path) == (1.0, cfg.rl.lambda_path)
    # everything else of the RL section is the same in every arm
    import dataclasses
    strip = lambda r: dataclasses.replace(r, lambda_eff=0.0, lambda_path=0.0)  # noqa: E731
    assert len({strip(c.rl) for c in made.values()}) == 1
    with pytest.raises(ValueError, match="unknown arm"):
        arm_config(cfg, "nope", 0, "/c", "/o")


def test_ratio_floor_counts_first_token_and_probe_window():
    cfg = TrainConfig()
    # 65 tokens: 5% recent = 4, 5% random = 4, min 16 probes -> a 12-token recent window, + the first
    assert ratio_floor(65, cfg) == pytest.approx(13 / 65)
    assert ratio_floor(1000, cfg) == pytest.approx(51 / 1000)  # 50-token window + the first token


def _result(model, setting, acc, ratio, n=100, layers=(1.0, 0.5)):
    kind, _, b = setting.partition(":")
    label = "dense" if kind == "dense" else f"top-p {float(b):g}"  # the harness's labels
    return SettingResult(model=model, set="eval", setting=label, key=setting, kind=kind,
                         budget=float(b) if b else None, accuracy=acc, token_ratio=ratio,
                         layer_ratio=list(layers), num_examples=n, total_s=1.0, prefill_s=None, decode_s=None,
                         compile_s=None, new_tokens=0, kv_bytes=0.0, kv_bytes_dense=0.0, token_ratio_se=0.01)


def test_report_table_golden():
    cfg = TrainConfig()
    rs = []
    for model, acc, ratio in (("before RL", 1.0, 0.98), ("pathwise s0", 0.99, 0.49), ("pathwise s1", 0.97, 0.51)):
        rs += [_result(model, "dense", acc, 1.0), _result(model, "topp:0.975", acc, ratio)]
    rep = _report(rs, cfg, (0, 1), ("pathwise",), 65)
    assert rep["arms"]["pathwise"]["token_ratio"] == pytest.approx(0.5)
    assert rep["arms"]["pathwise"]["ratio_vs_before"] == pytest.approx(0.5 / 0.98)
    assert rep["arms"]["pathwise"]["accuracy"] == pytest.approx(0.98)
    md = rep["markdown"]
    assert "| pathwise s1 | 0.970 +- 0.017 | 0.970 +- 0.017 | 0.510 +- 0.010 | 0.520 | 1.00 0.50 |" in md
    assert "| pathwise | 0.980 | 0.500 | 0.510 |" in md
    assert f"{13 / 65:.3f}" in md


@pytest.mark.slow
def test_controls_end_to_end_tiny(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
    from tiny_run import TINY  # noqa: PLC0415

    from zipr1_jax.eval.controls import run_controls  # noqa: PLC0415

    cfg = load_config(None, TINY + [f"log.out_dir={tmp_path}/unused"])
    rep = run_controls(cfg, out_dir=str(tmp_path / "c"), seeds=(0,), p_grid=(0.9,), eval_examples=8, eval_batch=8)
    assert set(rep["arms"]) == set(ARMS)
    for name in ("controls.md", "controls.json", "curve.png", "layers.png"):
        assert os.path.isfile(tmp_path / "c" / name)
