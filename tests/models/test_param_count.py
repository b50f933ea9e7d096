"""Abstract init (nnx.eval_shape, no memory) of every real preset has exactly the parameter count of
transformers' model for the same config built on the meta device."""

import math

import numpy as np
import pytest
import torch
from hf_utils import hf_classes, hf_config

from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.loader import abstract_model, param_variables


def _ours(cfg):
    model = abstract_model(cfg)
    counts = {"visual": 0, "text": 0}
    for path, var in param_variables(model).items():
        counts["visual" if path.startswith("visual.") else "text"] += math.prod(var.shape)
    return counts


def _hf(cfg):
    _, cls = hf_classes(cfg.family)
    with torch.device("meta"):
        model = cls(hf_config(cfg, attn="sdpa"))
    counts = {"visual": 0, "text": 0}
    # named_parameters() de-duplicates tied weights, as our tree (no lm_head when tied) does.
    for name, p in model.named_parameters():
        counts["visual" if ".visual." in f".{name}" else "text"] += p.numel()
    return counts


@pytest.mark.parametrize("name", C.REAL_PRESETS)
def test_param_count_equals_transformers(name):
    cfg = C.preset(name)
    ours, ref = _ours(cfg), _hf(cfg)
    assert ours == ref, f"{name}: ours {ours} vs transformers {ref}"


def test_abstract_model_allocates_nothing():
    model = abstract_model(C.qwen2_5_vl_72b())
    leaf = model.embed_tokens.embedding
    assert not isinstance(leaf.get_value(), np.ndarray) and tuple(leaf.shape) == (152064, 8192)
