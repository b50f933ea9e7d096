"""Vision tower parity with transformers (fp32, 1e-5): rotary, a block, the merger, the whole tower."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.models.hf_utils import tiny_pair
from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl import vision as V

TOL = 1e-5
FAMILIES = {"qwen2_vl": C.tiny_qwen2_vl, "qwen2_5_vl": C.tiny_qwen2_5_vl}
GRIDS = {
    "one_image": ((1, 4, 6),),
    "two_images": ((1, 4, 4), (1, 6, 8)),
    "video": ((2, 4, 4),),
    "many_windows": ((1, 8, 12),),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    cfg = FAMILIES[request.param]()
    return cfg, *tiny_pair(cfg, seed=3)


def _pixels(cfg, grid, seed=0):
    n = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).standard_normal((n, cfg.vision.patch_dim)).astype(np.float32)


def _hf_visual(hf):
    return hf.model.visual


def test_rotary_matches_hf(pair):
    cfg, hf, _ = pair
    grid = GRIDS["two_images"]
    pos_hw, _ = V.grid_layout(grid, cfg.vision.spatial_merge_size)
    from transformers.vision_utils import get_vision_position_ids
    ref_pos = get_vision_position_ids(torch.tensor(grid), cfg.vision.spatial_merge_size).numpy()
    np.testing.assert_array_equal(pos_hw, ref_pos)
    x = torch.zeros(1)
    cos_ref, sin_ref = _hf_visual(hf).rotary_pos_emb(x, torch.tensor(ref_pos))
    cos, sin = V.vision_rotary(pos_hw, cfg.vision.head_dim)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=TOL)


def test_window_index_matches_hf():
    cfg = C.tiny_qwen2_5_vl()
    from transformers.vision_utils import get_vision_window_index
    v = cfg.vision
    for grid in GRIDS.values():
        ref_idx, ref_cu = get_vision_window_index(torch.tensor(grid), v.spatial_merge_size, v.window_size, v.patch_size)
        idx, seg = V.window_layout(grid, v.spatial_merge_size, v.window_size, v.patch_size)
        np.testing.assert_array_equal(idx, ref_idx.numpy())
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [seg.size]])
        np.testing.assert_array_equal(bounds, ref_cu.numpy())
    assert len(np.unique(V.window_layout(GRIDS["many_windows"][0:1], 2, v.window_size, 14)[1])) > 1


def test_one_block_and_merger_match_hf(pair):
    cfg, hf, ours = pair
    grid = GRIDS["one_image"]
    P = sum(t * h * w for t, h, w in grid)
    x = np.random.default_rng(1).standard_normal((P, cfg.vision.hidden_size)).astype(np.float32)
    pos_hw, seg = V.grid_layout(grid, 2)
    cos, sin = V.vision_rotary(pos_hw, cfg.vision.head_dim)
    out = ours.visual.blocks[0](jnp.asarray(x), cos, sin, jnp.asarray(seg))
    with torch.no_grad():
        ref = _hf_visual(hf).blocks[0](torch.tensor(x), cu_seqlens=torch.tensor([0, P], dtype=torch.int32),
                                       position_embeddings=(torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))))
        ref_m = _hf_visual(hf).merger(torch.tensor(x))
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.visual.merger(jnp.asarray(x))), ref_m.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(GRIDS))
def test_tower_matches_hf(pair, case):
    cfg, hf, ours = pair
    grid = GRIDS[case]
    pv = _pixels(cfg, grid, seed=len(case))
    with torch.no_grad():
        ref = _hf_visual(hf)(torch.tensor(pv), grid_thw=torch.tensor(grid))
    ref = getattr(ref, "pooler_output", ref).numpy()
    out = jax.jit(lambda p: ours.visual(p, grid))(jnp.asarray(pv))
    assert out.shape == ref.shape == (sum(t * h * w for t, h, w in grid) // 4, cfg.text.hidden_size)
    np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_bf16_compute_close(pair):
    cfg, hf, ours = pair
    grid = GRIDS["one_image"]
    pv = _pixels(cfg, grid)
    ref = np.asarray(ours.visual(jnp.asarray(pv), grid))
    from tests.models.hf_utils import tiny_pair as _tp
    _, ours_bf16 = _tp(cfg.replace(dtype="bfloat16"), seed=3)
    out = np.asarray(ours_bf16.visual(jnp.asarray(pv), grid)).astype(np.float32)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 5e-2, rel  # BF16_REL_TOL: bf16 activations over 2-3 blocks


def test_bad_inputs_raise(pair):
    cfg, _, ours = pair
    with pytest.raises(ValueError, match="rows but grid_thw"):
        ours.visual(jnp.zeros((10, cfg.vision.patch_dim)), ((1, 4, 4),))
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours.visual(jnp.zeros((16, 7)), ((1, 4, 4),))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        ours.visual(jnp.zeros((15, cfg.vision.patch_dim)), ((1, 3, 5),))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda g: ours.visual(jnp.zeros((16, cfg.vision.patch_dim)), g))(jnp.array([[1, 4, 4]]))
