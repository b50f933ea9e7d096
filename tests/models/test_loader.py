"""HF checkpoint import / export: both key layouts, sharded index, tied embeddings, and errors that
name the key (missing, unexpected, wrong shape) or the config field."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import text_tokens, tiny_hf_model
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch

from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.loader import CheckpointError, hf_state_dict, load_hf_checkpoint

TOL = 1e-4
CASES = {"qwen2_vl": lambda: C.tiny_qwen2_vl(), "qwen2_5_vl_tied": lambda: C.tiny_qwen2_5_vl(tie=True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """A tiny HF model saved three ways: hub layout, sharded hub layout, in-memory key layout."""
    cfg = CASES[request.param]()
    hf = tiny_hf_model(cfg, seed=3)
    root = tmp_path_factory.mktemp(request.param)
    hub, sharded, memory = str(root / "hub"), str(root / "sharded"), str(root / "memory")
    hf.save_pretrained(hub)
    hf.save_pretrained(sharded, max_shard_size="100KB")
    os.makedirs(memory)
    shutil.copy(os.path.join(hub, "config.json"), memory)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_torch(sd, os.path.join(memory, "model.safetensors"))
    return cfg, hf, {"hub": hub, "sharded": sharded, "memory": memory}


@torch.no_grad()
def _text_logits_diff(hf, model):
    ids = np.array([text_tokens(np.random.default_rng(0), 9)])
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    return float(np.max(np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref)))


@pytest.mark.parametrize("layout", ["hub", "sharded", "memory"])
def test_import_parity_and_export_roundtrip(saved, layout):
    cfg, hf, dirs = saved
    if layout == "sharded":
        assert os.path.exists(os.path.join(dirs["sharded"], "model.safetensors.index.json"))
    cfg2, model = load_hf_checkpoint(dirs[layout])
    assert cfg2.replace(name=cfg.name) == cfg
    assert _text_logits_diff(hf, model) <= TOL
    # Export (the inverse table) reproduces every HF hub-layout tensor exactly.
    exported = hf_state_dict(model)
    with_hub_keys = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                     for k, v in hf.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        with_hub_keys.pop("lm_head.weight")
    assert set(exported) == set(with_hub_keys)
    for k, v in with_hub_keys.items():
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)


def _rewrite(src: str, dst: str, edit) -> str:
    """Copy a single-file checkpoint, editing its tensors dict (NumPy) and/or config."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    edit(tensors, config)
    save_np(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_errors_name_the_key(saved, tmp_path):
    cfg, _, dirs = saved
    key = "model.layers.1.mlp.up_proj.weight"
    d = _rewrite(dirs["hub"], str(tmp_path / "missing"), lambda t, c: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(d)
    d = _rewrite(dirs["hub"], str(tmp_path / "unexpected"),
                 lambda t, c: t.update({"model.layers.0.self_attn.rotary.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.0\.self_attn\.rotary\.weight'"):
        load_hf_checkpoint(d)
    d = _rewrite(dirs["hub"], str(tmp_path / "extra_layer"),
                 lambda t, c: t.update({"model.layers.9.input_layernorm.weight": np.ones(64, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected key 'model\.layers\.9\.input_layernorm\.weight'"):
        load_hf_checkpoint(d)
    d = _rewrite(dirs["hub"], str(tmp_path / "shape"),
                 lambda t, c: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(CheckpointError, match=r"wrong shape for key 'model\.norm\.weight'"):
        load_hf_checkpoint(d)

    def bad_config(t, c):
        c["text_config"]["use_sliding_window"] = True
    d = _rewrite(dirs["hub"], str(tmp_path / "config"), bad_config)
    with pytest.raises(C.ConfigError, match="use_sliding_window"):
        load_hf_checkpoint(d)


def test_tied_lm_head_tolerated_only_if_equal(saved, tmp_path):
    cfg, _, dirs = saved
    if not cfg.text.tie_word_embeddings:
        # Untied: a missing lm_head is an error naming it.
        d = _rewrite(dirs["hub"], str(tmp_path / "nohead"), lambda t, c: t.pop("lm_head.weight"))
        with pytest.raises(CheckpointError, match="lm_head.weight"):
            load_hf_checkpoint(d)
        return
    same = _rewrite(dirs["hub"], str(tmp_path / "same"),
                    lambda t, c: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    load_hf_checkpoint(same)
    diff = _rewrite(dirs["hub"], str(tmp_path / "diff"),
                    lambda t, c: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_hf_checkpoint(diff)


def test_dtype_options(saved):
    _, _, dirs = saved
    cfg, model = load_hf_checkpoint(dirs["hub"], dtype="bfloat16", param_dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert model(jnp.asarray([[1, 2, 3]])).logits.dtype == jnp.float32


def test_truncated_or_missing_safetensors_name_the_file(saved, tmp_path):
    _, _, dirs = saved
    for cut in ("header", "data"):
        d = tmp_path / cut
        shutil.copytree(dirs["hub"], d)
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[:20] if cut == "header" else data[:len(data) // 2])
        with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated or corrupt"):
            load_hf_checkpoint(str(d))
    d = tmp_path / "shard_missing"
    shutil.copytree(dirs["sharded"], d)
    shard = sorted(p for p in os.listdir(d) if p.endswith(".safetensors"))[-1]
    os.remove(d / shard)
    with pytest.raises(CheckpointError, match=f"{shard}: listed in the checkpoint index but missing"):
        load_hf_checkpoint(str(d))
