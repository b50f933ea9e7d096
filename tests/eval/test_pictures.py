"""Evaluation pictures: (a) accuracy vs token ratio (two models on one plot), (b) per-layer ratio
bars, (c) a kept-token heatmap over the input image from a real model's top-p keep masks; each is
a valid PNG. Also the token -> image-patch mapping and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from zipr1_jax.eval.harness import SettingResult, image_keep_grid, kept_masks
from zipr1_jax.eval.pictures import plot_accuracy_vs_ratio, plot_all, plot_kept_heatmap, plot_layer_ratios
from zipr1_jax.kernels.sparse_attention import SelectionConfig, SparsityConfig
from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration

SPARSITY = SparsityConfig(backend="xla", selection=SelectionConfig(probes="all", probe_recent=0.1, min_probes=2),
                          capacity_buckets=(1.0,))
PAD = 257


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _result(model, set_name, kind, budget, acc, ratio, layers=(1.0, 1.0, 1.0)):
    label = "dense" if kind == "dense" else {"topp": f"top-p {budget:g}", "topk": f"top-k {budget:g}",
                                             "fastv": "FastV K=1 R=0.5"}[kind]
    return SettingResult(model=model, set=set_name, setting=label, key=label, kind=kind, budget=budget,
                         accuracy=acc, token_ratio=ratio, layer_ratio=list(layers), num_examples=8, total_s=1.0,
                         prefill_s=None, decode_s=None, compile_s=None, new_tokens=40, kv_bytes=ratio * 1e4,
                         kv_bytes_dense=1e4)


@pytest.fixture(scope="module")
def results():
    out = []
    for model, shift in (("before RL", 0.0), ("after RL", 0.3)):
        for set_name in ("shapes", "digits"):
            out.append(_result(model, set_name, "dense", None, 0.6, 1.0))
            for p, r in ((0.95, 0.8), (0.9, 0.7), (0.8, 0.5)):
                rr = r - shift
                out.append(_result(model, set_name, "topp", p, 0.6 - (1 - p) * 0.8, rr, (rr + 0.1, rr, rr - 0.1)))
            out.append(_result(model, set_name, "topk", 0.25, 0.2, 0.25, (0.25,) * 3))
            out.append(_result(model, set_name, "fastv", 0.5, 0.4, 0.7, (1.0, 0.55, 0.55)))
    return out


def test_accuracy_vs_ratio_and_layer_bars_are_pngs(results, tmp_path):
    w, h = _png(plot_accuracy_vs_ratio(results, tmp_path / "a" / "acc.png", title="tiny"))
    assert w > 2 * h  # one panel per set, side by side
    assert min(_png(plot_layer_ratios(results, tmp_path / "layers.png", set_name="digits"))) > 0
    # Results read back from JSON (dicts) plot the same way.
    assert min(_png(plot_accuracy_vs_ratio([r.to_dict() for r in results[:6]], tmp_path / "a2.png"))) > 0


def _tiny_model():
    """Tiny Qwen2-VL with O(1)-scale weights (the 0.02 init attends almost uniformly: top-p keeps all)."""
    cfg = C.tiny_qwen2_vl()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: QwenVLForConditionalGeneration(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if len(x.shape) >= 2:
            std = 1.0 if "embed_tokens" in name else x.shape[0] ** -0.5
            return jnp.asarray(rng.normal(size=x.shape) * std, x.dtype)
        return jnp.ones(x.shape, x.dtype) if "scale" in name else jnp.zeros(x.shape, x.dtype)

    return cfg, nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def _image_batch(cfg, grid=(1, 8, 8), lengths=(40, 32)):
    """Left-padded rows: text, one image block, text. Returns the batch and the image block start."""
    rng = np.random.default_rng(1)
    n_img = int(np.prod(grid)) // cfg.vision.merge_unit
    L = max(lengths)
    ids = np.full((len(lengths), L), PAD, np.int32)
    mask = np.zeros((len(lengths), L), np.int32)
    for b, n in enumerate(lengths):
        row = rng.integers(0, 250, n)
        row[3:5 + n_img] = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
        ids[b, L - n:], mask[b, L - n:] = row, 1
    pixels = rng.standard_normal((len(lengths) * int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": np.asarray([grid] * len(lengths), np.int64)}


def test_kept_heatmap_of_a_real_selection(results, tmp_path):
    cfg, model = _tiny_model()
    batch = _image_batch(cfg)
    keep_YBL, ratio_BY = kept_masks(model, batch, "topp:0.5", sparsity=SPARSITY)
    assert keep_YBL.shape == (2, 2, 40) and (ratio_BY < 1).all()
    grid = image_keep_grid(keep_YBL[1, 0], batch["input_ids"][0], batch["image_grid_thw"][:1],
                           image_token_id=cfg.image_token_id)
    on_image = keep_YBL[1, 0][batch["input_ids"][0] == cfg.image_token_id]
    assert grid.shape == (1, 4, 4) and grid.sum() == on_image.sum()
    image = np.random.default_rng(2).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    assert min(_png(plot_kept_heatmap(image, grid, tmp_path / "kept.png", layer=1))) > 0
    paths = plot_all(results, tmp_path / "all", heatmaps={"row 0": (image, grid, 1),
                                                           "mean": (image, grid.mean(0) * 0.5, 0)})
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == ["accuracy_vs_token_ratio.png", "kept_mean.png", "kept_row_0.png", "layer_ratios_digits.png",
                     "layer_ratios_shapes.png"]
    assert all(min(_png(p)) > 0 for p in paths)


def test_image_tokens_map_row_major_onto_the_patch_grid():
    img = 251
    # Two images: grid (1, 4, 8) -> 2 x 4 merged tokens, then (1, 2, 2) -> 1 token.
    ids = np.array([PAD, 1, 253] + [img] * 8 + [254, 2, 253, img, 254])
    keep = np.zeros(len(ids), bool)
    keep[3 + 5] = True  # 6th token of image 0: row 1, column 1
    keep[-2] = True
    grids = [[1, 4, 8], [1, 2, 2]]
    g0 = image_keep_grid(keep, ids, grids, image_token_id=img)
    assert g0.shape == (1, 2, 4) and g0[0, 1, 1] and g0.sum() == 1
    assert image_keep_grid(keep, ids, grids, image_token_id=img, image=1).tolist() == [[[True]]]
    with pytest.raises(ValueError, match="need 8"):
        image_keep_grid(keep, ids, grids[:1], image_token_id=img)
    with pytest.raises(ValueError, match="asked for image 2"):
        image_keep_grid(keep, ids, grids, image_token_id=img, image=2)


def test_picture_inputs_are_checked(results, tmp_path):
    with pytest.raises(ValueError, match="no results"):
        plot_accuracy_vs_ratio([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no results for set 'nope'"):
        plot_layer_ratios(results, tmp_path / "x.png", set_name="nope")
    image = np.zeros((28, 28, 3), np.uint8)
    with pytest.raises(ValueError, match="image must be"):
        plot_kept_heatmap(image[..., 0], np.ones((2, 2)), tmp_path / "x.png", layer=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        plot_kept_heatmap(image, np.full((2, 2), 2.0), tmp_path / "x.png", layer=0)
    with pytest.raises(ValueError, match="lacks fields"):
        plot_accuracy_vs_ratio([{"model": "m"}], tmp_path / "x.png")
