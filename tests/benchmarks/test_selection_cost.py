"""benchmarks/selection_cost.py: shapes of the real preset, probe counts, the analytic FLOP / byte counts
against XLA CPU's cost analysis of the compiled selection at a small length (real heads, L=512), and the
script end to end at that length (CPU cross-check only; the deviceless TPU / H100 compiles need
.ci/aot_deps.sh). No timing is asserted."""

import functools

import pytest
from bench_loader import load_benchmark

SMALL = 512
# XLA's count vs the analytic one. FLOPs: the probe matmul dominates both, so they agree closely.
# Bytes: the analytic count is what XLA must materialise (4 passes over the [N, R, S] float32 logits
# forward, 13 for the learner's gradient); XLA CPU fuses less (seen 1.6x forward, 3.6x gradient at
# L=512; the TPU compile is 0.85x at 8k), so a factor 4 either way.
FLOP_RANGE = (0.9, 1.15)
BYTE_RANGE = (0.25, 4.0)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("selection_cost.py")


def test_shapes_are_the_preset(bench):
    from zipr1_jax.models.qwen_vl.config import qwen2_5_vl_7b

    t = qwen2_5_vl_7b().text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (bench.D, bench.F, bench.LAYERS)
    assert (t.num_attention_heads, t.num_key_value_heads, t.hidden_size // t.num_attention_heads) == (
        bench.N, bench.K, bench.H)


def test_probe_slots_golden(bench):
    assert [bench.probes(S) for S in (SMALL, 8192, 32768)] == [52, 820, 3278]


def test_analytic_golden(bench):
    a = bench.analytic(8192, 0.5)
    nrs = 28 * 820 * 8192
    assert a["scores"][0] == 2 * nrs * 128 + 8 * nrs
    assert a["soft"][0] == 4 * 2 * nrs * 128 + 24 * nrs
    assert a["scores"][1] > 16 * nrs and a["cut"][1] < 0.02 * a["selection"][1]
    assert a["fused"][1] < 0.05 * a["selection"][1]


@pytest.mark.parametrize("part", ["selection", "soft"])
def test_analytic_vs_cost_analysis(bench, part):
    a = bench.analytic(SMALL, 0.5)[part]
    names = ("scores", "cut") if part == "selection" else ("soft",)
    got = [bench.compiled_cost(n, SMALL, 0.5, "cpu") for n in names]
    assert all(g[0] is not None and g[1] is not None for g in got), got
    flops, nbytes = sum(g[0] for g in got), sum(g[1] for g in got)
    assert FLOP_RANGE[0] <= flops / a[0] <= FLOP_RANGE[1], (flops, a[0])
    assert BYTE_RANGE[0] <= nbytes / a[1] <= BYTE_RANGE[1], (nbytes, a[1])


def test_script_small(bench, tmp_path, monkeypatch):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# b\n\n## Other section\n\nkeep me\n")
    monkeypatch.setattr(bench, "replace_section", functools.partial(bench.replace_section, path=str(md)))
    rs = bench.main(["--lengths", str(SMALL), "--write"])
    assert len(rs) == 6  # 2 targets x (selection, fused, soft)
    for r in rs:
        assert r["t"] > 0 and all(r["frac"][k] > 0 for k in bench.KEEPS) and r["xla_tgt"] == (None, None, None)
    text = md.read_text()
    assert "keep me" in text and text.count(bench.SECTION) == 1 and "Reading:" in text
