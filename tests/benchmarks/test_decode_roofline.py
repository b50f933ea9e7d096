"""benchmarks/decode_roofline.py: the byte count on golden numbers, and the script end to end."""

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decode_roofline.py")


def test_step_bytes_golden(bench):
    from flax import nnx

    from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration

    cfg = bench.bench_config(hidden=64, layers=2, vocab=100)
    model = QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    b = bench.step_bytes(model, batch=3, capacity=10)
    # K and V, 2 layers, 3 rows, 10 slots, 2 kv heads of 16 dims, float32
    assert b["cache"] == 2 * 2 * 3 * 10 * 2 * 16 * 4
    # text weights: per layer q/k/v (+ biases), o, gate/up/down, 2 norms; final norm; lm_head (not the embedding)
    D, F, N, K, H = 64, 176, 4, 2, 16
    layer = D * N * H + N * H + 2 * (D * K * H + K * H) + N * H * D + 3 * D * F + 2 * D
    assert b["weights"] == 4 * (2 * layer + D + 100 * D)


def test_script_end_to_end(bench, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    result = bench.main(["--batch", "2", "--prompt", "16", "--new", "4", "--steps", "2", "--repeats", "1",
                         "--hidden", "64", "--layers", "2", "--vocab", "100", "--copy-mb", "8", "--write-md",
                         "--md-path", str(md)])
    assert result["bandwidth_gbs"] > 0 and [r["capacity"] for r in result["rows"]] == [20, 16]
    assert all(0 < r["fraction"] and r["ms"] > 0 for r in result["rows"])
    assert md.read_text().startswith("# zipr1_jax benchmarks") and "## Decode step vs its memory roofline" in md.read_text()
