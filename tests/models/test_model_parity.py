"""End-to-end logits parity with transformers' Qwen2-VL / Qwen2.5-VL (fp32, max abs diff <= 1e-4):
text only, one image, two images of different sizes, a video (2.5 with second_per_grid_ts), and
left-padded batches (compared on valid positions; a long one runs the causal query blocks)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import left_pad, mm_token_type_ids, pixels, text_tokens, tiny_pair, vision_block

from zipr1_jax.models.qwen_vl import config as C

TOL = 1e-4
# Tied / untied lm head is independent of the family: one of each.
FAMILIES = {"qwen2_vl": lambda: C.tiny_qwen2_vl(), "qwen2_5_vl_tied": lambda: C.tiny_qwen2_5_vl(tie=True)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    cfg = FAMILIES[request.param]()
    hf, ours = tiny_pair(cfg, seed=7)
    return cfg, hf, ours


@torch.no_grad()
def _compare(cfg, hf, ours, ids, mask=None, images=(), videos=(), secs=None):
    """Run both models on the same inputs; return max |diff| of logits over valid positions."""
    rng = np.random.default_rng(11)
    img_grid = np.array(images).reshape(-1, 3) if images else None
    vid_grid = np.array(videos).reshape(-1, 3) if videos else None
    pv = np.concatenate([pixels(rng, cfg, g) for g in images]) if images else None
    pvv = np.concatenate([pixels(rng, cfg, g) for g in videos]) if videos else None
    hf_kw = dict(input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor(mm_token_type_ids(cfg, ids)))
    if mask is not None:
        hf_kw["attention_mask"] = torch.tensor(mask)
        if not images and not videos:
            # HF only derives mask-aware M-RoPE ids when vision inputs are present: pass its own ids.
            pos, _ = hf.model.get_rope_index(torch.tensor(ids), torch.zeros_like(torch.tensor(ids)),
                                             attention_mask=torch.tensor(mask))
            hf_kw["position_ids"] = pos
    if images:
        hf_kw.update(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(img_grid))
    if videos:
        hf_kw.update(pixel_values_videos=torch.tensor(pvv), video_grid_thw=torch.tensor(vid_grid))
        if secs is not None:
            hf_kw["second_per_grid_ts"] = torch.tensor(secs, dtype=torch.float32)
    ref = hf(**hf_kw).logits.numpy()
    out = ours(jnp.asarray(ids), attention_mask_BL=None if mask is None else jnp.asarray(mask), pixel_values=pv,
               image_grid_thw=img_grid, pixel_values_videos=pvv, video_grid_thw=vid_grid,
               second_per_grid_ts=secs).logits
    out = np.asarray(out)
    assert out.dtype == np.float32 and out.shape == ref.shape
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    return float(np.max(np.abs(out[valid] - ref[valid])))


def test_text_only(pair):
    cfg, hf, ours = pair
    ids = np.array([text_tokens(np.random.default_rng(0), 13)])
    assert _compare(cfg, hf, ours, ids) <= TOL


def test_text_left_padded_batch(pair):
    cfg, hf, ours = pair
    rng = np.random.default_rng(1)
    ids, mask = left_pad([text_tokens(rng, 12), text_tokens(rng, 7)], cfg.pad_token_id)
    assert _compare(cfg, hf, ours, ids, mask) <= TOL


def test_long_left_padded_batch_runs_causal_blocks(pair):
    """Prompts long enough that the decoder attention runs in causal query blocks (3 blocks of
    the 389-column batch, the upper triangle skipped): still HF's logits."""
    from zipr1_jax.kernels.sparse_attention.reference import causal_block_count

    cfg, hf, ours = pair
    rng = np.random.default_rng(2)
    ids, mask = left_pad([text_tokens(rng, 389), text_tokens(rng, 200)], cfg.pad_token_id)
    assert causal_block_count(ids.shape[1]) == 3
    assert _compare(cfg, hf, ours, ids, mask) <= TOL


def test_one_image(pair):
    cfg, hf, ours = pair
    rng = np.random.default_rng(2)
    grid = [1, 4, 6]
    ids = np.array([text_tokens(rng, 3) + vision_block(cfg, grid) + text_tokens(rng, 4)])
    assert _compare(cfg, hf, ours, ids, images=[grid]) <= TOL


def test_two_images_of_different_sizes(pair):
    cfg, hf, ours = pair
    rng = np.random.default_rng(3)
    a, b = [1, 4, 4], [1, 6, 8]
    ids = np.array([text_tokens(rng, 2) + vision_block(cfg, a) + text_tokens(rng, 3) + vision_block(cfg, b)
                    + text_tokens(rng, 2)])
    assert _compare(cfg, hf, ours, ids, images=[a, b]) <= TOL


def test_video(pair):
    cfg, hf, ours = pair
    rng = np.random.default_rng(4)
    grid = [2, 4, 4]
    ids = np.array([text_tokens(rng, 3) + vision_block(cfg, grid, video=True) + text_tokens(rng, 3)])
    secs = [1.5] if cfg.family == "qwen2_5_vl" else None
    assert _compare(cfg, hf, ours, ids, videos=[grid], secs=secs) <= TOL


def test_image_left_padded_batch(pair):
    cfg, hf, ours = pair
    rng = np.random.default_rng(5)
    a, b = [1, 4, 4], [1, 4, 6]
    rows = [text_tokens(rng, 2) + vision_block(cfg, a) + text_tokens(rng, 6),
            text_tokens(rng, 1) + vision_block(cfg, b) + text_tokens(rng, 1)]
    ids, mask = left_pad(rows, cfg.pad_token_id)
    assert _compare(cfg, hf, ours, ids, mask, images=[a, b]) <= TOL


def test_pad_token_count_mismatch_names_both_numbers(pair):
    cfg, _, ours = pair
    grid = [1, 4, 4]
    ids = np.array([vision_block(cfg, grid)[:-2] + [cfg.vision_end_token_id]])  # one pad token short
    pv = pixels(np.random.default_rng(0), cfg, grid)
    with pytest.raises(ValueError, match=r"3 pad tokens.*4 merged patches"):
        ours.embed(ids, pixel_values=pv, image_grid_thw=np.array([grid]))


def test_params_carry_logical_axes(pair):
    from zipr1_jax.models.qwen_vl.loader import param_variables  # noqa: PLC0415

    cfg, _, ours = pair
    legend = {"batch", "length", "kv_length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers",
              "vision_patches", "vision_embed", "vision_mlp", "vision_heads", "patch_features", None}
    params = param_variables(ours)
    for path, var in params.items():
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), f"{path}: logical axes {axes} for {var.shape}"
        assert set(axes) <= legend, f"{path}: {axes}"
    assert tuple(params["layers.0.self_attn.q_proj.kernel"].get_metadata()["out_sharding"]) == ("embed", "heads")
    assert tuple(params["embed_tokens.embedding"].get_metadata()["out_sharding"]) == ("vocab", "embed")


def test_sharded_forward_equals_unsharded(pair):
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415

    from zipr1_jax.models.qwen_vl.loader import param_variables  # noqa: PLC0415
    from zipr1_jax.sharding.logical import logical_to_spec, use_mesh  # noqa: PLC0415

    cfg, _, ours = pair
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("kv_heads", "tensor"), ("vocab", "tensor"), ("vision_embed", "fsdp"), ("vision_mlp", "tensor"))
    rng = np.random.default_rng(8)
    ids, mask = left_pad([text_tokens(rng, 8), text_tokens(rng, 5), text_tokens(rng, 8), text_tokens(rng, 3)],
                         cfg.pad_token_id)
    ref = np.asarray(ours(jnp.asarray(ids), attention_mask_BL=jnp.asarray(mask)).logits)
    graph, state = nnx.split(ours)
    sharded = nnx.merge(graph, state)
    for var in param_variables(sharded).values():
        axes = tuple(var.get_metadata()["out_sharding"])
        spec = logical_to_spec(axes, rules)
        spec = jax.sharding.PartitionSpec(*[e if e is None or d % np.prod([mesh.shape[a] for a in ((e,) if isinstance(
            e, str) else e)]) == 0 else None for d, e in zip(var.shape, spec)])
        var.set_value(jax.device_put(var[...], NamedSharding(mesh, spec)))

    @nnx.jit
    def fwd(m, ids, mask):
        with use_mesh(mesh, rules):
            return m(ids, attention_mask_BL=mask).logits

    out = np.asarray(fwd(sharded, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    # End to end (sharded contractions reorder float32 sums): the spec's end-to-end tolerance.
    assert float(np.max(np.abs(out[valid] - ref[valid]))) <= TOL
