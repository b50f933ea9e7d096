"""Per-submodule parity with transformers (1e-5): M-RoPE tables, RMSNorm, decoder layer, and
get_rope_index equality on mixed text / image / video sequences with left padding."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import left_pad, mm_token_type_ids, text_tokens, tiny_pair, vision_block

from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.rope import get_rope_index, mrope_cos_sin
from zipr1_jax.models.qwen_vl.text import RMSNorm, dense_attention

TOL = 1e-5


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request):
    cfg = C.tiny_qwen2_vl() if request.param == "qwen2_vl" else C.tiny_qwen2_5_vl()
    hf, ours = tiny_pair(cfg, seed=1)
    return cfg, hf, ours


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_mrope_cos_sin_matches_hf(pair):
    cfg, hf, _ = pair
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 3000, size=(3, 2, 9))
    x = torch.zeros(2, 9, cfg.text.hidden_size)
    cos_ref, sin_ref = hf.model.language_model.rotary_emb(x, torch.tensor(pos))
    t = cfg.text
    cos, sin = mrope_cos_sin(jnp.asarray(pos), head_dim=t.head_dim, theta=t.rope_theta, mrope_section=t.mrope_section)
    assert cos.dtype == jnp.float32
    assert _max_diff(cos, cos_ref.numpy()) <= TOL
    assert _max_diff(sin, sin_ref.numpy()) <= TOL


def test_rmsnorm_matches_hf(pair):
    cfg, hf, ours = pair
    x = np.random.default_rng(1).standard_normal((2, 5, cfg.text.hidden_size)).astype(np.float32) * 3
    ref = hf.model.language_model.norm(torch.tensor(x)).detach().numpy()
    assert _max_diff(ours.norm(jnp.asarray(x)), ref) <= TOL
    norm = RMSNorm(4, eps=1e-6, param_dtype=jnp.bfloat16)
    assert norm(jnp.ones((1, 4), jnp.bfloat16)).dtype == jnp.bfloat16


@torch.no_grad()
def test_decoder_layer_matches_hf(pair):
    cfg, hf, ours = pair
    rng = np.random.default_rng(2)
    B, L = 2, 7
    x = rng.standard_normal((B, L, cfg.text.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(L) + 5, (3, B, L)).copy()
    pos[1] += rng.integers(0, 3, size=(B, L))  # distinct axes exercise the sections
    valid = np.ones((B, L), bool)
    valid[1, :2] = False  # left padding in row 1
    cos_ref, sin_ref = hf.model.language_model.rotary_emb(torch.tensor(x), torch.tensor(pos))
    mask_BLS = np.tril(np.ones((L, L), bool))[None] & valid[:, None, :]
    additive = torch.tensor(np.where(mask_BLS, 0.0, torch.finfo(torch.float32).min)[:, None], dtype=torch.float32)
    ref = hf.model.language_model.layers[0](torch.tensor(x), attention_mask=additive,
                                            position_embeddings=(cos_ref, sin_ref)).numpy()
    t = cfg.text
    cos, sin = mrope_cos_sin(jnp.asarray(pos), head_dim=t.head_dim, theta=t.rope_theta, mrope_section=t.mrope_section)
    out = np.asarray(ours.layers[0](jnp.asarray(x), cos, sin, jnp.asarray(mask_BLS)))
    assert _max_diff(out[valid], ref[valid]) <= TOL


def test_attention_override_hook_is_used(pair):
    cfg, _, ours = pair
    calls = []

    def spy(q, k, v, mask):
        calls.append(q.shape)
        return dense_attention(q, k, v, mask)

    ids = jnp.asarray([[1, 2, 3, 4]])
    ref = ours(ids).logits
    out = ours(ids, attend=spy).logits
    assert len(calls) == cfg.text.num_hidden_layers
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def _hf_rope_index(hf, cfg, ids, mask, img, vid, secs):
    kw = dict(image_grid_thw=None if img is None else torch.tensor(img),
              video_grid_thw=None if vid is None else torch.tensor(vid),
              attention_mask=None if mask is None else torch.tensor(mask))
    if cfg.family == "qwen2_5_vl":
        kw["second_per_grid_ts"] = None if secs is None else torch.tensor(secs, dtype=torch.float32)
    pos, deltas = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(mm_token_type_ids(cfg, ids)), **kw)
    return pos.numpy(), deltas.numpy().reshape(-1)


def test_get_rope_index_matches_hf_mixed(pair):
    cfg, hf, _ = pair
    rng = np.random.default_rng(3)
    img_a, img_b, vid = [1, 4, 6], [1, 8, 2], [3, 4, 4]
    row0 = (text_tokens(rng, 3) + vision_block(cfg, img_a) + text_tokens(rng, 2) + vision_block(cfg, vid, video=True)
            + text_tokens(rng, 4))
    row1 = text_tokens(rng, 2) + vision_block(cfg, img_b) + text_tokens(rng, 5)
    ids, mask = left_pad([row0, row1], cfg.pad_token_id)
    images, videos, secs = np.array([img_a, img_b]), np.array([vid]), [0.75]
    pos, deltas = get_rope_index(cfg, ids, mask, images, videos, secs if cfg.family == "qwen2_5_vl" else None)
    ref_pos, ref_deltas = _hf_rope_index(hf, cfg, ids, mask, images, videos, secs)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    # Text only, no mask, and fractional video timing without second_per_grid_ts.
    ids2 = np.array([text_tokens(rng, 6)])
    np.testing.assert_array_equal(get_rope_index(cfg, ids2)[0], _hf_rope_index(hf, cfg, ids2, None, None, None,
                                                                                None)[0])
    ids3 = np.array([vision_block(cfg, vid, video=True) + text_tokens(rng, 2)])
    for got, want in zip(get_rope_index(cfg, ids3, video_grid_thw=np.array([vid])),
                         _hf_rope_index(hf, cfg, ids3, None, None, np.array([vid]), None)):
        np.testing.assert_array_equal(got, want)


def test_get_rope_index_errors_name_the_problem():
    cfg = C.tiny_qwen2_vl()
    ids = np.array([vision_block(cfg, [1, 4, 4])])
    with pytest.raises(ValueError, match="image_grid_thw"):
        get_rope_index(cfg, ids)
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(cfg, ids, image_grid_thw=np.array([[1, 4, 6]]))
