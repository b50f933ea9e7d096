"""The per-device memory table (scripts/memory_table.py, zipr1_jax/train/memory.py) on the real
Qwen2.5-VL-7B preset (shapes only): its numbers against independent arithmetic, and the README
holds exactly what the script prints."""

import contextlib
import io
import math
import os
import runpy

import numpy as np
import pytest

from zipr1_jax.train import memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def estimates():
    return memory.default_estimates()


def test_rows_cover_the_targets(estimates):
    assert [e.target.name for e in estimates] == ["v4-32", "v5e-64", "8xH100"]
    assert {e.model for e in estimates} == {"qwen2_5_vl_7b"}
    for e in estimates:
        assert math.prod(e.mesh.values()) == e.target.num_devices
    assert [e.mesh_str for e in estimates] == ["2x8x1", "4x8x2", "1x8x1"]  # data=-1 takes the rest


def test_params_and_optimizer_against_arithmetic(estimates):
    from zipr1_jax.models.qwen_vl.config import preset

    mc = preset("qwen2_5_vl_7b", dtype="bfloat16", param_dtype="float32")
    params = memory._abstract_params(mc)
    n_total = sum(x.size for x in jax_leaves(params))
    n_vision = sum(x.size for x in jax_leaves(params["visual"]))
    for e in estimates:
        split = e.mesh["fsdp"] * e.mesh["tensor"]  # parameters are not split over "data"
        assert e.num_params == n_total
        # A few small leaves (norms, biases) do not divide and stay whole: within 3% of an even split.
        assert n_total * 4 / split <= e.params <= 1.03 * n_total * 4 / split
        # AdamW mu + nu in fp32 for the trainable (non-vision: freeze_vision) parameters.
        want_opt = 2 * (n_total - n_vision) * 4 / split
        assert want_opt <= e.opt_state <= 1.03 * want_opt
        assert e.reference == e.params  # rl.beta_kl > 0: a frozen copy, same sharding


def test_kv_cache_against_arithmetic(estimates):
    """k + v of 28 layers x rows x (2048 + 512) slots x 4 kv heads x 128 dims in bf16; rows split
    over data x fsdp, kv heads over tensor."""
    rows = {"v4-32": 16 * 8, "v5e-64": 8 * 8, "8xH100": 8 * 8}
    for e in estimates:
        m = e.mesh
        rows_per_device = rows[e.target.name] // (m["data"] * m["fsdp"])
        heads_per_device = 4 // m["tensor"]
        want = 2 * 28 * rows_per_device * 2560 * heads_per_device * 128 * 2 + 28 * rows[e.target.name] * 4
        assert e.kv_cache == want, e.target.name


def test_update_logits_against_arithmetic(estimates):
    """fp32 logits of one update micro-batch: 512 response positions x 152064 vocab entries per
    row; rows = rollouts / grad_accum (128 / 4, 64 / 4, 64 / 4) split over the longest dividing
    prefix of (data, fsdp): 32 / 16, 16 / 4 (16 rows do not split 32 ways), 16 / 8; vocab over
    tensor. Projecting every position would take (2048 + 512) / 512 = 5x as much."""
    rows_per_device = {"v4-32": 2, "v5e-64": 4, "8xH100": 2}
    for e in estimates:
        vocab_per_device = 152064 // e.mesh["tensor"]
        assert e.logits == rows_per_device[e.target.name] * 512 * vocab_per_device * 4, e.target.name
        assert e.logits_all == 5 * e.logits


def test_script_output_is_the_readme_table(estimates):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(os.path.join(ROOT, "scripts", "memory_table.py"), run_name="__not_main__")["main"]([])
    table = memory.markdown_table(estimates)
    assert table in out.getvalue()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert table in readme, "README's memory table is stale: paste the output of `python scripts/memory_table.py`"


def test_totals_fit_the_devices(estimates):
    for e in estimates:
        assert e.total == e.params + e.opt_state + e.reference + e.kv_cache
        assert e.total < e.target.hbm_gib * memory.GIB, e.target.name  # before activations / gradients
    assert np.isclose(estimates[1].params * 2, estimates[2].params, rtol=0.01)  # tensor=2 halves them


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
