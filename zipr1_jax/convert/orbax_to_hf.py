"""Orbax checkpoint (any step, written on any mesh) -> a directory `transformers` loads.

    export_hf("runs/x/checkpoints", "export/x", source_hf_dir="runs/x/tokenizer")

writes
  config.json                    our `to_hf_config()` (model_type, text + vision config), plus
                                 "zipr1_sparsity": the sparsity settings of the training run
                                 ({"p": p_eval, "mode", "probes", "layers", "p_grid", ...}), when the
                                 checkpoint's meta records a training config
  model-0000i-of-0000n.safetensors  tensors in the hub key layout, shards of <= max_shard_size
                                 (a single larger tensor gets a shard of its own)
  model.safetensors.index.json   {"metadata": {"total_size"}, "weight_map": {key: file}}
  generation_config.json         copied from `source_hf_dir`, else bos / eos / pad ids of the config
  tokenizer / processor / chat-template files copied from `source_hf_dir` (see COPIED_FILES)

The model architecture comes from (first that applies): `model_config=`; the meta of a converted
checkpoint (`hf_config`); the meta of a training checkpoint (its `model` section: preset, or
`hf_dir` if that still exists); `source_hf_dir/config.json`. Parameters are restored into the
shardings of `mesh` with the dtypes they were stored in, then gathered to the host one tensor at
a time while shards are written, so the host never holds more than one shard of output. The
result is bit-identical whatever mesh the checkpoint was written on or restored to.

Everything is written into a temporary directory next to `out_dir` and renamed at the end (see
`hf_to_orbax.staged_output`): a failed export leaves no directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zipr1_jax.checkpoint.orbax import CheckpointError, Checkpointer
from zipr1_jax.convert.hf_to_orbax import (ConversionError, check_dtype, check_output_dir,
                                           default_mesh, params_target, staged_output)
from zipr1_jax.models.qwen_vl import hf_params
from zipr1_jax.models.qwen_vl.config import QwenVLConfig
from zipr1_jax.sharding.rules import norm_path
from zipr1_jax.train.builders import abstract_params
from zipr1_jax.train.config import ModelSection

log = logging.getLogger(__name__)

SPARSITY_FIELD = "zipr1_sparsity"
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out_dir: str
    step: int
    config: QwenVLConfig
    files: tuple[str, ...]  # safetensors shards, in order
    num_tensors: int
    total_bytes: int
    sparsity: dict | None  # what was recorded under config.json's SPARSITY_FIELD
    copied: tuple[str, ...]  # files copied from source_hf_dir


def parse_size(size: int | str) -> int:
    """Bytes of a shard size limit: an int, or "5GB" / "500MB" / "100KB" (powers of 10), "2GiB" (of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if m is None:
            raise ConversionError(f"max_shard_size must be bytes or like '5GB' / '500MB' / '2GiB', got {size!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n < 1:
        raise ConversionError(f"max_shard_size must be >= 1 byte, got {size!r}")
    return n


# ------------------------------------------------------------------ what the checkpoint holds
def resolve_model_config(meta: dict, model_config: QwenVLConfig | None = None,
                         source_hf_dir: str | None = None) -> tuple[QwenVLConfig, str]:
    """(config, where it came from) for a checkpoint's meta; see the module docstring for the order."""
    if model_config is not None:
        if not isinstance(model_config, QwenVLConfig):
            raise ConversionError(f"model_config must be a QwenVLConfig, got {type(model_config).__name__}")
        return model_config, "model_config argument"
    if isinstance(meta.get("hf_config"), dict):
        return QwenVLConfig.from_hf_config(meta["hf_config"]), "the checkpoint's hf_config"
    section = (meta.get("config") or {}).get("model")
    if isinstance(section, dict):
        model = ModelSection(**section)
        hf_dir = model.hf_dir
        if hf_dir is None:
            return model.model_config(), f"the training config (preset {model.preset!r})"
        if os.path.isfile(os.path.join(hf_dir, "config.json")):
            return model.model_config(), f"the training config's model.hf_dir {hf_dir}"
    if source_hf_dir is not None and os.path.isfile(os.path.join(source_hf_dir, "config.json")):
        return QwenVLConfig.from_hf_config(source_hf_dir), f"{source_hf_dir}/config.json"
    raise ConversionError("cannot tell the model architecture of this checkpoint (its meta records neither "
                          "hf_config nor a usable model section): pass model_config=QwenVLConfig(...) or a "
                          "source_hf_dir holding the model's config.json")


def sparsity_record(meta: dict) -> dict | None:
    """The training run's sparsity settings for config.json (None when the meta has no training config)."""
    section = (meta.get("config") or {}).get("sparsity")
    if not isinstance(section, dict):
        return None
    rest = {k: v for k, v in section.items() if k != "p_eval"}
    return {"p": section.get("p_eval"), **rest, "global_step": meta.get("global_step")}


def stored_dtypes(params_dir: str) -> dict[tuple[str, ...], Any]:
    """Dtype of every stored parameter (by canonical key path) from the Orbax metadata."""
    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # a params item has no _CHECKPOINT_METADATA of its own: harmless warning
    try:
        with ocp.StandardCheckpointer() as ckptr:
            md = ckptr.metadata(params_dir)
    except Exception as e:  # orbax raises many types for damaged files
        raise ConversionError(f"{params_dir}: unreadable parameter metadata ({type(e).__name__}: "
                              f"{str(e).strip()[:300]})") from e
    finally:
        absl.setLevel(level)
    tree = getattr(getattr(md, "item_metadata", md), "tree", None)
    out: dict[tuple[str, ...], Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (str(k),))
        elif getattr(node, "dtype", None) is not None:
            out[prefix] = jnp.dtype(node.dtype)

    walk(tree if isinstance(tree, dict) else {}, ())
    return out


def _natural(key: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


@dataclasses.dataclass(frozen=True)
class _Entry:
    key: str  # HF hub-layout key
    leaf: jax.Array
    transform: hf_params.Transform
    hf_shape: tuple[int, ...]
    dtype: Any

    @property
    def nbytes(self) -> int:
        return math.prod(self.hf_shape) * jnp.dtype(self.dtype).itemsize

    def host(self) -> np.ndarray:
        value = np.asarray(jax.device_get(self.leaf))
        return np.ascontiguousarray(self.transform.to_hf(value, self.hf_shape).astype(self.dtype))


def _entries(config: QwenVLConfig, params, dtype: str | None) -> list[_Entry]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        ours = ".".join(norm_path(path))
        found = hf_params.ours_to_hf(config, ours)
        if found is None:
            raise ConversionError(f"parameter {ours!r} has no Hugging Face key in the {config.family} table")
        key, transform = found
        hf_shape = hf_params.hf_shape_of(config, ours, tuple(leaf.shape))
        out.append(_Entry(key, leaf, transform, hf_shape, jnp.dtype(dtype) if dtype else leaf.dtype))
    return sorted(out, key=lambda e: _natural(e.key))


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of consecutive tensors per shard, each shard <= max_bytes unless one tensor exceeds it."""
    shards: list[list[int]] = []
    current, total = [], 0
    for i, n in enumerate(sizes):
        if current and total + n > max_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        shards.append(current)
    return shards


# ------------------------------------------------------------------ export
def export_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
              source_hf_dir: str | os.PathLike | None = None, model_config: QwenVLConfig | None = None,
              dtype: str | None = None, max_shard_size: int | str = "5GB", mesh: jax.sharding.Mesh | None = None,
              overwrite: bool = False) -> ExportResult:
    """Export step `step` (default: the latest) of a Checkpointer directory as a Hugging Face model.

    Args:
      checkpoint_dir: a trainer checkpoint directory (`<out_dir>/checkpoints`) or one written by
        `convert_hf_to_orbax`.
      out_dir: directory to create (a non-empty one is refused unless `overwrite`).
      source_hf_dir: copy tokenizer / processor / chat template / generation config files from here
        (the original HF model, or a run's `tokenizer` directory).
      model_config: the architecture, when the checkpoint's meta cannot tell it.
      dtype: cast tensors to this dtype ("float32" / "bfloat16" / "float16"); default: as stored.
      max_shard_size: bytes per safetensors file (int, or "5GB", "500MB", ...).
      mesh: restore onto this mesh (default: FSDP over the local devices).
    Returns:
      ExportResult(out_dir, step, config, files, num_tensors, total_bytes, sparsity, copied).
    """
    if jax.process_count() > 1:
        raise ConversionError("export_hf gathers every tensor to this host: run it in a single process")
    check_dtype(dtype, optional=True)
    max_bytes = parse_size(max_shard_size)
    ckpt = os.path.abspath(os.fspath(checkpoint_dir))
    if not os.path.isdir(ckpt):
        raise ConversionError(f"checkpoint directory {ckpt} does not exist")
    src = None if source_hf_dir is None else os.path.abspath(os.fspath(source_hf_dir))
    if src is not None and not os.path.isdir(src):
        raise ConversionError(f"source_hf_dir {src} does not exist")
    inputs = (ckpt,) if src is None else (ckpt, src)
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)  # fail before the long restore

    ck = Checkpointer(ckpt, async_save=False)
    try:
        steps = ck.all_steps()
        if not steps:
            raise ConversionError(f"{ckpt} holds no checkpoint step (expected <dir>/<step>/params as written by the "
                                  "trainer or convert_hf_to_orbax)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConversionError(f"no checkpoint for step {step} in {ckpt}; available steps: {steps}")
        meta = ck.restore_meta(step)
        config, origin = resolve_model_config(meta, model_config, src)
        _, abstract = abstract_params(config)
        stored = stored_dtypes(os.path.join(ckpt, str(step), "params"))
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, stored.get(norm_path(p), x.dtype)), abstract)
        target = params_target(abstract, mesh if mesh is not None else default_mesh(jax.local_devices()))
        try:
            params = ck.restore(step, params_target=target)["params"]
        except CheckpointError as e:
            raise ConversionError(f"step {step} of {ckpt} is not the {config.family} model of {origin} "
                                  f"({config.text.num_hidden_layers} layers, hidden {config.text.hidden_size}, "
                                  f"vocab {config.text.vocab_size}): {e}") from e
    finally:
        ck.close()

    entries = _entries(config, params, dtype)
    out_dtype = dtype or (jnp.dtype(entries[0].dtype).name if entries else config.param_dtype)
    check_dtype(out_dtype, "the stored parameter dtype")
    hf_config = config.replace(param_dtype=out_dtype).to_hf_config()
    sparsity = sparsity_record(meta)
    if sparsity is not None:
        hf_config[SPARSITY_FIELD] = sparsity
    shards = plan_shards([e.nbytes for e in entries], max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    copied = tuple(f for f in COPIED_FILES if src is not None and os.path.isfile(os.path.join(src, f)))

    with staged_output(out, overwrite=overwrite) as tmp:
        weight_map = {}
        for name, shard in zip(names, shards, strict=True):
            tensors = {entries[i].key: entries[i].host() for i in shard}
            _write(tmp, name, lambda path, t=tensors: _save_safetensors(t, path), out)
            weight_map.update({k: name for k in tensors})
            del tensors
        total = int(sum(e.nbytes for e in entries))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items(),
                                                                              key=lambda kv: _natural(kv[0])))}
        _write(tmp, INDEX_FILE, lambda path: _dump_json(index, path), out)
        _write(tmp, "config.json", lambda path: _dump_json(hf_config, path), out)
        for f in copied:
            _write(tmp, f, lambda path, f=f: shutil.copyfile(os.path.join(src, f), path), out)
        if "generation_config.json" not in copied:
            generation = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["text_config"]["eos_token_id"],
                          "pad_token_id": config.pad_token_id}
            _write(tmp, "generation_config.json", lambda path: _dump_json(generation, path), out)
    log.info("exported step %d of %s -> %s (%d tensors in %d shards)", step, ckpt, out, len(entries), len(names))
    return ExportResult(out_dir=out, step=int(step), config=config, files=tuple(names), num_tensors=len(entries),
                        total_bytes=total, sparsity=sparsity, copied=copied)


def _save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    from safetensors import numpy as st_numpy

    # "format": "pt" is what transformers checks for before it loads a safetensors file.
    st_numpy.save_file(tensors, path, metadata={"format": "pt"})
    # safetensors creates its files 0600; give them the mode any other file of the export gets.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _dump_json(obj: Any, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _write(tmp: str, name: str, fn, out: str) -> None:
    try:
        fn(os.path.join(tmp, name))
    except OSError as e:
        raise ConversionError(f"export to {out} failed while writing {name} ({e}); nothing was written to "
                              f"{out}") from e
