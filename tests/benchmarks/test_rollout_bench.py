"""Smoke test of benchmarks/rollout.py at tiny sizes: it runs end to end, reports positive
throughputs, and — the real check — greedy tokens of zipr1_jax `generate` and transformers
`generate` are identical on the same weights (fp32). No timing is asserted."""

import numpy as np
import pytest
from bench_loader import load_benchmark

TINY = ["--batch", "3", "--prompt", "24", "--new", "6", "--repeats", "1", "--hidden", "64", "--layers", "2",
        "--vocab", "300"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("rollout.py", "rollout_bench")


def _check_rows(result, n_cases):
    rows = result["rows"]
    assert len(rows) == n_cases
    for r in rows:
        assert r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["ratio"] > 0
        assert all(v > 0 for v in r["hf_by_threads"].values())
        assert r["ours_tokens"].shape == r["hf_tokens"].shape == (3, 6)
        np.testing.assert_array_equal(r["ours_tokens"], r["hf_tokens"])  # same weights, fp32 greedy
        assert r["agreement"] == 1.0
        # Both samplers really generated (no stop token inside the vocabulary ends a row early).
        assert (r["ours_tokens"] < 300).all()
        if "sparse_tok_s" in r:
            assert r["sparse_tok_s"] > 0 and 0 < r["sparse_token_ratio"] <= 1


def test_text_prompts_agree_with_transformers(bench):
    _check_rows(bench.main(TINY + ["--no-image"]), 1)


@pytest.mark.slow
def test_image_prompts_agree_with_transformers(bench):
    _check_rows(bench.main(TINY + ["--prompt", "32"]), 2)


def test_write_md_replaces_only_its_section(bench, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# t\n\n## Other\n\nkeep me\n\n" + bench.SECTION + "\n\nold table\n\n## Last\n\nkeep too\n")
    cfg = bench.bench_config(hidden=64, layers=2, vocab=300)
    row = dict(case="text", batch=3, prompt=24, new=6, ours_compile_s=1.0, ours_first_s=1.1, ours_s=0.1, hf_s=0.5,
               ours_tok_s=180.0, hf_tok_s=36.0, hf_by_threads={2: 9.0, 1: 36.0}, hf_threads=1, ratio=5.0,
               agreement=1.0)
    args = bench.parse_args(TINY + ["--threads", "2,1"])
    bench.write_section(dict(rows=[row], config=cfg, machine="test machine"), args, path=str(path))
    text = path.read_text()
    assert "old table" not in text and "keep me" in text and "keep too" in text
    assert text.count(bench.SECTION) == 1 and "| text | 3 x (24 + 6) |" in text
    assert "HF tok/s (2 thr) | HF tok/s (1 thr)" in text and "| 9 | 36 | 5.0x |" in text
    assert text.index("## Other") < text.index(bench.SECTION) < text.index("## Last")
    assert "n/a (no `sparse_prefill`)" in text  # a row without the sparse column says so


def test_threads_flag_is_parsed_and_checked(bench):
    assert bench.parse_args(TINY + ["--threads", "2,1,2"]).threads == [2, 1]
    with pytest.raises(SystemExit, match="threads"):
        bench.parse_args(TINY + ["--threads", "0"])


def test_prompt_batch_is_left_padded_and_rejects_too_short_image_prompts(bench):
    cfg = bench.bench_config(hidden=64, layers=2, vocab=300)
    p = bench.prompt_batch(cfg, batch=4, prompt=32, image=True, seed=0)
    assert (p["mask"][:, -1] == 1).all() and (np.diff(p["mask"], axis=1) >= 0).all()
    n_img = int(np.prod(bench.IMAGE_GRID)) // cfg.vision.merge_unit
    assert (p["mm"].sum(1) == n_img).all() and p["pixels"].shape[0] == 4 * int(np.prod(bench.IMAGE_GRID))
    with pytest.raises(ValueError, match="too short"):
        bench.prompt_batch(cfg, batch=2, prompt=10, image=True, seed=0)
