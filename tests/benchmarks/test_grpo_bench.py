"""Smoke test of benchmarks/grpo_step_vs_trl.py: OUR side (dense and sparse GRPO steps) runs end to
end at tiny size with finite outputs and full-length completions; the pieces shared with the TRL
worker (tokenizer, reward) behave; `--write-md` touches only its section. TRL itself is not needed
(it lives in its own venv). No timing is asserted."""

import importlib.util
import math
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "grpo_step_vs_trl.py")
TINY = ["--prompts", "2", "--group", "2", "--prompt", "16", "--new", "4", "--repeats", "1", "--hidden", "64",
        "--layers", "1", "--vocab", "300", "--no-trl"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("grpo_step_vs_trl", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_rows(bench, result, sides):
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == set(sides)
    for name, r in rows.items():
        for key in ("first_s", "steady_s", "loss", "reward", "kl", "grad_norm"):
            assert r[key] is not None and math.isfinite(r[key]), (name, key)
        assert r["steady_s"] > 0 and r["kl"] >= 0
        assert r["length"] == 4 and r["finished"] == 0  # the stop id is outside the vocabulary
        assert 0 < r["token_ratio"] <= 1
        assert "ratio" not in r  # no TRL column to compare with
        assert set(r["phases"]) == set(bench.PHASES) and all(v >= 0 for v in r["phases"].values())
        assert sum(r["phases"].values()) == pytest.approx(r["steady_s"], rel=0.5)  # medians of parts ~ the whole
    assert "n/a" in bench.table(result["rows"])
    return rows


def test_our_dense_step_runs_and_is_finite(bench):
    rows = _check_rows(bench, bench.main(TINY + ["--no-sparse"]), ["zipr1_jax dense"])
    assert rows["zipr1_jax dense"]["token_ratio"] == 1.0


@pytest.mark.slow
def test_our_dense_and_sparse_steps_run_and_are_finite(bench):
    _check_rows(bench, bench.main(TINY), ["zipr1_jax dense", f"zipr1_jax sparse p={bench.SPARSE_P}"])


def test_word_tokenizer_round_trips_ids_and_never_emits_eos(bench):
    tok = bench.word_tokenizer(50, pad_id=49)
    ids = np.array([[49, 49, 3, 17], [5, 0, 48, 2]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    texts = bench.prompt_texts(ids, mask)
    assert texts == ["w3 w17", "w5 w0 w48 w2"]
    assert tok(texts)["input_ids"] == [[3, 17], [5, 0, 48, 2]]
    assert tok.eos_token_id == 50 and tok.pad_token_id == 49  # eos outside a 50-token model vocabulary
    assert tok.decode([3, 49, 4], skip_special_tokens=True) == "w3 w4"


def test_even_word_reward(bench):
    assert bench.even_word_reward("w2 w3 w10 w7") == 0.5
    assert bench.even_word_reward("w4") == 1.0
    assert bench.even_word_reward("") == 0.0 and bench.even_word_reward("<pad> x") == 0.0


def test_write_md_replaces_only_its_section(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# t\n\n## Other\n\nkeep me\n\n" + bench.SECTION + "\n\nold table\n\n## Last\n\nkeep too\n")
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    phases = dict(rollout=0.05, reference=0.01, update=0.03, other=0.01)
    rows = [dict(side="zipr1_jax dense", threads="jax pool", first_s=9.0, steady_s=0.1, min_s=0.1, max_s=0.2,
                 ratio=0.25, phases=phases, loss=0.0, reward=0.5, kl=1e-8, length=4, token_ratio=1.0),
            dict(side="TRL @1 thr", threads=1, first_s=1.0, steady_s=0.4, min_s=0.4, max_s=0.5, ratio=1.0,
                 phases=phases, loss=None, reward=0.5, kl=2e-8, length=4, token_ratio=1.0)]
    versions = dict(jax="j", flax="f", transformers="t", torch="p", trl_venv_trl="1.0", trl_venv_transformers="t",
                    trl_venv_torch="p")
    args = bench.parse_args(TINY + ["--threads", "2,1"])
    bench.write_section(dict(rows=rows, config=cfg, versions=versions, machine="test machine"), args, path=str(path))
    text = path.read_text()
    assert "old table" not in text and "keep me" in text and "keep too" in text
    assert text.count(bench.SECTION) == 1 and "| zipr1_jax dense | jax pool | 9.00 | 0.100 |" in text
    assert "| 0.25 | 0.050 | 0.010 | 0.030 | 0.010 |" in text and "trl 1.0" in text
    assert "| 0.400 | 0.400 - 0.500 | - |" in text  # TRL rows carry no ours / TRL ratio
    assert text.index("## Other") < text.index(bench.SECTION) < text.index("## Last")


def test_args_are_checked(bench):
    with pytest.raises(SystemExit, match="group"):
        bench.parse_args(["--group", "1"])
    with pytest.raises(SystemExit, match="threads"):
        bench.parse_args(["--threads", "0"])
    assert bench.parse_args(["--threads", "2,1,2"]).threads == [2, 1]
