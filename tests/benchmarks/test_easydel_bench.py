"""Smoke test of benchmarks/easydel_vs_ours.py: OUR side (forward and generate on a model loaded from
a saved transformers checkpoint) runs end to end at tiny size; the EasyDeL config workarounds, the
per-round ratio and `--write-md` behave. EasyDeL itself is not needed (it lives in its own venv);
no timing is asserted."""

import json
import os

import numpy as np
import pytest
from bench_loader import BENCH_DIR, load_benchmark

TINY = ["--batch", "2", "--prompt", "12", "--new", "3", "--repeats", "1", "--hidden", "64", "--layers", "1",
        "--vocab", "300", "--no-easydel"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("easydel_vs_ours.py")


def test_our_side_runs_without_easydel(bench):
    result = bench.main(TINY)
    rows = {r["op"]: r for r in result["rows"]}
    assert set(rows) == set(bench.OPS)
    assert rows["forward"]["tokens"] == 2 * 12 and rows["generate"]["tokens"] == 2 * 3
    for r in rows.values():
        assert r["ours_s"] > 0 and r["ours_tok_s"] > 0 and "ratio" not in r
    assert bench.table(result["rows"]).count("n/a") == 2 * 5


def test_easydel_config_workarounds(bench, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {"vocab_size": 300}}))
    (src / "model.safetensors").write_bytes(b"weights")
    bench.easydel_config(str(src), str(dst))
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["vocab_size"] == 300 and cfg["text_config"]["attention_bias"] is True
    assert (dst / "model.safetensors").read_bytes() == b"weights"
    assert "attention_bias" not in json.loads((src / "config.json").read_text())["text_config"]  # source untouched


def test_ratio_stats_pair_rounds(bench):
    # Rounds pair the two sides' calls: ratios 0.5, 2.0, 1.0 (not median(ours) / median(peer) = 1.0).
    q = bench.ratio_stats([1.0, 4.0, 2.0], [2.0, 2.0, 2.0])
    assert q == dict(min=0.5, median=1.0, max=2.0)


def test_write_md_replaces_only_its_section(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# t\n\n## Other\n\nkeep me\n\n" + bench.SECTION + "\n\nold table\n\n## Last\n\nkeep too\n")
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    rows = [dict(op="forward", tokens=24, ours_first_s=1.0, ours_s=0.01, ours_tok_s=2400.0, ed_first_s=2.0,
                 ed_s=0.02, ed_tok_s=1200.0, ratio=dict(min=0.4, median=0.5, max=0.6), logits_rel=1e-3),
            dict(op="generate", tokens=6, ours_first_s=3.0, ours_s=0.1, ours_tok_s=60.0, ed_first_s=9.0,
                 ed_s=1.0, ed_tok_s=6.0, ratio=dict(min=0.09, median=0.1, max=0.11), agreement=1.0)]
    versions = dict(jax="j", flax="f", transformers="t", easydel_venv_easydel="0.3.0", easydel_venv_jax="0.9.2",
                    easydel_venv_flax="0.12.3", easydel_venv_transformers="5.5.4")
    result = dict(rows=rows, config=cfg, versions=versions, load=("1.0", "2.0"))
    bench.write_section(result, bench.parse_args(TINY), path=str(path))
    text = path.read_text()
    assert "old table" not in text and "keep me" in text and "keep too" in text
    assert text.count(bench.SECTION) == 1 and "easydel 0.3.0" in text
    assert "| forward | 24 | 1.00 | 0.0100 | 2400 | 2.00 | 0.0200 | 1200 | 0.50 (0.40 - 0.60) |" in text
    assert "greedy agreement 1.000" in text
    assert text.index("## Other") < text.index(bench.SECTION) < text.index("## Last")


def test_missing_easydel_venv_is_a_clear_error(bench, monkeypatch):
    monkeypatch.delenv("ZIPR1_EASYDEL_PYTHON", raising=False)
    args = bench.parse_args(TINY[:-1] + ["--easydel-python", "/nonexistent/python"])
    with pytest.raises(SystemExit, match="setup_easydel_venv.sh"):
        bench._easydel_python(args)


def test_args_are_checked(bench):
    with pytest.raises(SystemExit, match="hidden"):
        bench.parse_args(["--hidden", "48"])
    with pytest.raises(SystemExit, match="repeats"):
        bench.parse_args(["--repeats", "0"])


def test_setup_script_pins_cpu_torch_and_refuses_project_venvs():
    script = open(os.path.join(BENCH_DIR, "setup_easydel_venv.sh")).read()
    assert 'TORCH_VERSION="2.13.0+cpu"' in script and "--dry-run" in script
    assert "nvidia|cuda|triton" in script and "/work/venv" in script
    assert np.all([s in script for s in ('"easydel==${EASYDEL_VERSION}"', '"jax==${JAX_VERSION}"')])
