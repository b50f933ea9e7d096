"""Load Hugging Face Qwen2-VL / Qwen2.5-VL checkpoints into our NNX model, and export back.

`load_hf_checkpoint(path)` reads `config.json` and `model.safetensors` (or the sharded
`model.safetensors.index.json`), builds an ABSTRACT model (no parameter memory), then streams the
checkpoint tensor by tensor (`safe_open`), transforming each to our layout and assigning it in place,
so no tensor is ever held twice. Any missing, unexpected or wrongly shaped key raises
`CheckpointError` naming it: never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zipr1_jax.models.qwen_vl import hf_params
from zipr1_jax.models.qwen_vl.config import QwenVLConfig
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.models.qwen_vl.text import DecoderLayer

_TIED_LM_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """The checkpoint does not match the model: names the offending key(s)."""


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every nnx.Param of the model by dotted path (e.g. 'layers.0.self_attn.q_proj.kernel')."""
    return {_dotted(path): var for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)}


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (single file or sharded index)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


def _iter_tensors(files: list[str]) -> Iterator[tuple[str, tuple[int, ...], callable]]:
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    def read(f, file, key):
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e}); the file is truncated or "
                                  "corrupt") from None

    for file in files:
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: listed in the checkpoint index but missing")
        # framework="flax" reads bf16 too (NumPy has no bfloat16); arrays land on the host CPU device.
        try:
            opened = safe_open(file, framework="flax")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file is truncated or "
                                  "corrupt") from None
        with opened as f:
            for key in f.keys():
                yield key, tuple(f.get_slice(key).get_shape()), (lambda f=f, key=key, file=file: read(f, file, key))


def abstract_model(config: QwenVLConfig) -> QwenVLForConditionalGeneration:
    """The model with ShapeDtypeStruct parameters (no memory), ready to be filled in place."""
    # One trace for the whole model makes flax's per-parameter RNG bookkeeping quadratic in the
    # number of parameters (seconds per real preset); tracing the model with a single decoder layer
    # and each further layer separately keeps it linear. The result is the same module tree.
    t = config.text
    one = config.replace(text=dataclasses.replace(t, num_hidden_layers=1))
    model = nnx.eval_shape(lambda: QwenVLForConditionalGeneration(one, rngs=nnx.Rngs(0)))
    dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    rest = [nnx.eval_shape(lambda: DecoderLayer(t, dtype=dtype, param_dtype=pdtype, rngs=nnx.Rngs(0)))
            for _ in range(t.num_hidden_layers - 1)]
    model.layers = nnx.List([model.layers[0], *rest])
    model.config = config
    return model


def load_hf_checkpoint(path: str, *, dtype: str = "float32", param_dtype: str = "float32",
                       config: QwenVLConfig | None = None) -> tuple[QwenVLConfig, QwenVLForConditionalGeneration]:
    """Import an HF checkpoint directory. Returns (config, model).

    `config` overrides the directory's config.json (its dtype fields are then used as given).
    Accepts the hub layout and transformers-5's in-memory key layout. A redundant `lm_head.weight`
    is tolerated for tied embeddings only if it equals the embedding.
    """
    if config is None:
        config = QwenVLConfig.from_hf_config(path, dtype=dtype, param_dtype=param_dtype)
    return config, _fill(config, _iter_tensors(checkpoint_files(path)), path)


def from_pretrained(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> QwenVLForConditionalGeneration:
    """The model of a Hugging Face Qwen2-VL / Qwen2.5-VL directory (config.json + *.safetensors),
    like transformers' `from_pretrained`; its config is `model.config`."""
    return load_hf_checkpoint(path, dtype=dtype, param_dtype=param_dtype)[1]


def from_hf_state_dict(config: QwenVLConfig, state_dict) -> QwenVLForConditionalGeneration:
    """Build our model from an in-memory HF state dict (torch tensors or arrays, either layout)."""
    def items():
        for key, value in state_dict.items():
            yield key, tuple(value.shape), (lambda value=value: _to_array(value))
    return _fill(config, items(), "state_dict")


def _to_array(value):
    if hasattr(value, "detach"):  # torch tensor (NumPy has no bfloat16: go through float32 then cast)
        import torch  # noqa: PLC0415
        value = value.detach().cpu()
        return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
    return value


def _fill(config: QwenVLConfig, tensors, path: str) -> QwenVLForConditionalGeneration:
    model = abstract_model(config)
    targets = param_variables(model)
    pdtype = jnp.dtype(config.param_dtype)
    loaded: set[str] = set()
    hf_name: dict[str, str] = {}
    tied_head = None
    for key, hf_shape, read in tensors:
        if config.text.tie_word_embeddings and hf_params.canonical_hf_key(key) == _TIED_LM_HEAD:
            tied_head = (key, np.asarray(read(), np.float32))  # read now: the file closes after the loop
            continue
        found = hf_params.hf_to_ours(config, key)
        if found is None or found[0] not in targets:
            raise CheckpointError(f"unexpected key {key!r}: no parameter of the {config.family} model "
                                  f"{'matches it' if found is None else f'at {found[0]!r}'}")
        ours, transform = found
        if ours in loaded:
            raise CheckpointError(f"duplicate key {key!r}: {ours!r} was already loaded from {hf_name[ours]!r}")
        var = targets[ours]
        want = tuple(var.shape)
        got = transform.ours_shape(hf_shape)
        if got != want:
            raise CheckpointError(f"wrong shape for key {key!r}: checkpoint {hf_shape} -> {got} in our layout, "
                                  f"model expects {want} at {ours!r}")
        var.set_value(jnp.asarray(transform.to_ours(read())).astype(pdtype))
        loaded.add(ours)
        hf_name[ours] = key
    abstract_state = [_dotted(p) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)
                      and not isinstance(v, nnx.Param) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract_state:  # non-parameter state would stay abstract: refuse rather than half-build
        raise CheckpointError(f"model state {abstract_state} is not a parameter and cannot be loaded")
    missing = sorted(set(targets) - loaded)
    if missing:
        keys = [hf_params.ours_to_hf(config, m)[0] if hf_params.ours_to_hf(config, m) else m for m in missing]
        raise CheckpointError(f"missing keys in {path}: {keys[:8]}{' ...' if len(keys) > 8 else ''} "
                              f"({len(keys)} missing)")
    if tied_head is not None:
        head = tied_head[1]
        emb = np.asarray(targets["embed_tokens.embedding"][...], np.float32)
        if head.shape != emb.shape or not np.array_equal(head, emb):
            raise CheckpointError(f"unexpected key {tied_head[0]!r}: the config ties word embeddings but the "
                                  "checkpoint's lm_head differs from embed_tokens")
    return model


def hf_state_dict(model: QwenVLForConditionalGeneration) -> dict[str, np.ndarray]:
    """Our parameters as an HF hub-layout state dict (NumPy, HF shapes). Tied: no lm_head key."""
    config = model.config
    out: dict[str, np.ndarray] = {}
    for path, var in param_variables(model).items():
        found = hf_params.ours_to_hf(config, path)
        if found is None:
            raise CheckpointError(f"parameter {path!r} has no HF key in the {config.family} table")
        key, transform = found
        value = np.asarray(jax.device_get(var[...]))
        out[key] = np.ascontiguousarray(transform.to_hf(value, hf_params.hf_shape_of(config, path, value.shape)))
    return out
