"""benchmarks/pathwise_cost.py: the analytic counts on golden numbers, and the script's table."""

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("pathwise_cost.py")


def test_probe_counts_golden(bench):
    # 5% recent + 5% random (ceil each), at least 16
    assert [bench.probes(S) for S in (40, 65, 2048, 8192)] == [16, 16, 206, 820]


def test_counts_golden(bench):
    m = bench.model_shapes()
    assert (m["N"], m["K"], m["H"], m["Y"]) == (28, 4, 128, 28)
    c = bench.counts(8192)
    assert c["R"] == 820
    # forward probe logits 2*N*R*S*H per layer, x4 for the rematerialised backward, 28 layers
    assert c["soft_flops"] == 28 * 4 * 2 * 28 * 820 * 8192 * 128
    assert c["transient"] == 2 * 4 * 28 * 820 * 8192
    assert 0.005 < c["frac"] < 0.05


def test_table_without_compile(bench):
    body = bench.main(["--no-compile"])
    assert body.startswith(bench.HEADING) and body.count("\n| ") >= 4
