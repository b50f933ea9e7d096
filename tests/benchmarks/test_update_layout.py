"""benchmarks/update_layout.py: the two dot layouts agree, the shipped one has fewer layout ops,
and the script end to end (no timing asserted)."""

import pytest
from bench_loader import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("update_layout.py")


def test_script_end_to_end(bench, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    result = bench.main(["--rows", "2", "--prompt", "8", "--new", "4", "--rounds", "1", "--hidden", "64",
                         "--layers", "2", "--vocab", "100", "--matmul-n", "64", "--write-md", "--md-path", str(md)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert result["loss_gap"] <= 1e-5 and result["grad_gap"] <= 1e-4
    # the 2-D token dots remove the weight-gradient transposes the N-d dots need (structure, not time)
    assert rows["flat"]["layout_ops"] < rows["nd"]["layout_ops"]
    assert rows["flat"]["gflop"] == pytest.approx(rows["nd"]["gflop"], rel=0.05)
    assert all(r["s"] > 0 and r["fraction"] > 0 for r in rows.values())
    assert "## Update step: dot layout and FLOP roofline" in md.read_text()


def test_unknown_variant_is_named(bench):
    with pytest.raises(ValueError, match="variant must be one of"):
        bench.compile_variant("fused", None, None, None, 1)
