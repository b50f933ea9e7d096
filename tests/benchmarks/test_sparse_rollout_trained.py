"""Smoke test of benchmarks/sparse_rollout_trained.py on a tiny stand-in run directory (a random tiny
model saved as the run's step and, perturbed, as its RL-start reference): every (model, attention)
row is produced with exactly --new tokens per row, the KV accounting is consistent (dense keeps its
whole prompt; a low p keeps less than dense and never more than it allocates), and --write-md touches
only its section. No timing is asserted."""

from __future__ import annotations


import jax
import numpy as np
import pytest

from zipr1_jax.checkpoint import Checkpointer, save_params
from zipr1_jax.train.builders import build_model, split_params
from zipr1_jax.train.cli import load_config
from bench_loader import load_benchmark

SMALL = ["model.preset=tiny_qwen2_vl", "data.image_size=[56,56]", "data.tasks=[spot_color]",
         "data.length_buckets=[128]", "rl.max_new_tokens=4"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("sparse_rollout_trained.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, SMALL + [f"log.out_dir={run}"])
    _, params = split_params(build_model(cfg.model))
    with Checkpointer(run / "checkpoints", async_save=False) as ck:
        ck.save(3, params=params, meta={"config": cfg.to_dict()}, force=True)
    before = jax.tree.map(lambda x: x * 1.01, params)
    save_params(run / "checkpoints" / "reference", before)
    return run


def test_rows_and_kv_accounting(bench, run_dir, tmp_path):
    argv = [str(run_dir), "--p", "0.5", "--batch", "4", "--new", "3", "--rounds", "1", "--accuracy-examples", "4",
            "--workdir", str(tmp_path)]
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# t\n\n## Other\n\nkeep\n\n" + bench.SECTION + "\n\nOLD-TABLE\n\n## Last\n\nkeep too\n")
    result = bench.main(argv)
    rows = {(r["model"], r["attention"]): r for r in result["rows"]}
    assert set(rows) == {(m, a) for m in ("before RL", "after RL") for a in ("dense", "p=0.5")}
    assert result["step"] == 3 and result["batch"] == 4 and result["new"] == 3
    for (model, attention), r in rows.items():
        assert r["tok_s"] > 0 and r["s"] > 0 and r["answers"]["n"] == 4
        assert 0.0 <= r["answers"]["accuracy"] <= 1.0
        assert r["kept"] <= r["allocated"]
        if attention == "dense":
            assert r["ratio"] == 1.0 and r["vs_dense"] == 1.0
            # dense keeps every valid prompt token in every layer, plus the new ones
            assert r["slots"] == result["prompt"] + 3
        else:
            assert r["ratio"] < 1.0 and r["kept"] < rows[(model, "dense")]["kept"]
            assert r["slots"] <= rows[(model, "dense")]["slots"]
    bench.write_section(result, argv, path=str(md))
    text = md.read_text()
    assert "OLD-TABLE" not in text and "keep too" in text and text.count(bench.SECTION) == 1
    assert "| after RL | p=0.5 |" in text and "--p 0.5" in text


def test_args_are_checked(bench):
    with pytest.raises(SystemExit, match="--p"):
        bench.parse_args(["run", "--p", "1.0"])
    with pytest.raises(SystemExit, match="--rounds"):
        bench.parse_args(["run", "--rounds", "0"])


def test_refuses_a_checkpoint_that_is_not_a_run(bench, run_dir):
    with pytest.raises(SystemExit, match="training run directory"):
        bench.main([str(run_dir / "checkpoints" / "reference"), "--batch", "2", "--rounds", "1"])
