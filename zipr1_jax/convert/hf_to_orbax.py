"""Hugging Face Qwen-VL directory -> Orbax checkpoint the trainer (and `export_hf`) can read.

    result = convert_hf_to_orbax("Qwen2.5-VL-7B-Instruct", "ckpt/qwen25vl7b", dtype="bfloat16",
                                 mesh=make_mesh(fsdp=-1))

The output is a `Checkpointer` directory holding ONE step, 0, so every reader of trainer
checkpoints reads it too:
  <out>/0/params     the weights (Orbax, sharded as they were on `mesh`)
  <out>/0/opt_state  only with `optimizer=`: a fresh optimizer state (all moments zero)
  <out>/0/meta       {"phase": "init", "phase_step": 0, "global_step": 0, "hf_config": config.json
                      of the model (our `to_hf_config()`), "source": {...}, "optimizer": {...}}

Streaming: tensors are read one at a time (`load_hf_checkpoint`) into host memory, cast to `dtype`
on the way, then placed shard by shard on the mesh (each device only receives its slice), so the
host holds the model once and no device ever holds more than its shard.

Starting training from it:
  - `restore_params("<out>/0/params", target)` reads the weights into any mesh's shardings.
  - With `optimizer=OptimConfig(...)` (same clipping / freeze_vision as the run's optimizer; the
    state is all zeros, so only its STRUCTURE matters), `scripts/train.py model.hf_dir=<hf dir>
    checkpoint.dir=<out> ...` resumes from step 0 as from any checkpoint: SFT (if sft.steps > 0)
    or RL (fresh RL optimizer, this policy as the reference) starts from these weights. Note the
    trainer still builds its model from `model.hf_dir` before restoring over it.

The output appears complete or not at all: everything is written into a temporary directory next
to `out_dir` and renamed into place at the end; a non-empty `out_dir` is refused unless
`overwrite=True` (then it is replaced only once the new checkpoint is complete).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from zipr1_jax.checkpoint.orbax import CheckpointError, Checkpointer
from zipr1_jax.models.qwen_vl.config import DTYPES, QwenVLConfig
from zipr1_jax.models.qwen_vl.loader import load_hf_checkpoint
from zipr1_jax.sharding.mesh import make_mesh
from zipr1_jax.sharding.rules import abstract_with_shardings, opt_state_shardings, state_shardings
from zipr1_jax.train.optim import OptimConfig, make_optimizer, phase_optim_config

log = logging.getLogger(__name__)

CONVERSION_STEP = 0


class ConversionError(CheckpointError):
    """A conversion cannot proceed or failed; the message names the file, key or step at fault."""


@dataclasses.dataclass(frozen=True)
class ImportResult:
    out_dir: str
    step: int
    config: QwenVLConfig
    num_params: int
    with_optimizer: bool
    mesh_shape: dict[str, int]


# ------------------------------------------------------------------ shared helpers (also used by export)
def check_dtype(dtype: str | None, name: str = "dtype", *, optional: bool = False) -> None:
    if optional and dtype is None:
        return
    if dtype not in DTYPES:
        raise ConversionError(f"{name} must be one of {list(DTYPES)}, got {dtype!r}")


def default_mesh(devices=None) -> jax.sharding.Mesh:
    """FSDP over all (given) devices: parameters split along `embed`, as small per device as possible."""
    return make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)


def params_target(params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Restore target: ShapeDtypeStructs with the mesh's shardings (DEFAULT_RULES)."""
    return abstract_with_shardings(params, state_shardings(params, mesh))


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool, inputs: tuple[str, ...] = ()) -> str:
    """Absolute path of `out_dir`; refuses a file, a non-empty directory unless `overwrite`, and a
    directory that is or contains one of the `inputs` (overwriting it would destroy them)."""
    out = os.path.abspath(os.fspath(out_dir))
    for src in inputs:
        if os.path.commonpath([out, os.path.abspath(src)]) == out:
            raise ConversionError(f"output directory {out} is or contains the input {src}; choose another one")
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise ConversionError(f"output {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise ConversionError(f"output directory {out} is not empty; choose another one or pass "
                                  "overwrite=True (--overwrite) to replace it")
    return out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, *, overwrite: bool) -> Iterator[str]:
    """Yield a temporary directory next to `out_dir`; on success rename it to `out_dir`.

    On any error the temporary directory is removed and `out_dir` is left as it was (absent, or the
    previous complete output when overwriting), so a half-written output never looks complete.
    The temporary name is deterministic (every process of a multi-host job agrees on it); a stale
    one left by a killed run is removed first.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    parent, base = os.path.dirname(out), os.path.basename(out)
    tmp = os.path.join(parent, f".{base}.partial")
    old = os.path.join(parent, f".{base}.replaced")
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(tmp):
            log.warning("removing %s left by an earlier interrupted conversion", tmp)
            shutil.rmtree(tmp)
        if os.path.exists(old):  # killed while swapping: `old` is the previous complete output
            if os.path.exists(out):
                shutil.rmtree(old)
            else:
                log.warning("restoring %s from %s (an interrupted overwrite)", out, old)
                os.rename(old, out)
                check_output_dir(out, overwrite=overwrite)
        os.makedirs(tmp)
    _sync(f"staged_output:start:{out}")
    try:
        yield tmp
        _sync(f"staged_output:written:{out}")
        if primary:
            _publish(tmp, out, old)
        _sync(f"staged_output:done:{out}")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: str, out: str, old: str) -> None:
    if os.path.isdir(out) and os.listdir(out):  # overwrite: move the old output aside first
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(out):
            os.rmdir(out)  # empty: nothing to keep
        os.rename(tmp, out)


@contextlib.contextmanager
def _on_host():
    """Make freshly read tensors land in host memory (not on an accelerator's device 0)."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend initialised (JAX_PLATFORMS without cpu)
        yield
        return
    with jax.default_device(cpu):
        yield


def _place(params: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """Put each host tensor on the mesh leaf by leaf (a device receives only its own shard)."""
    shardings = state_shardings(params, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


# ------------------------------------------------------------------ import
def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
                        compute_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                        optimizer=None, overwrite: bool = False) -> ImportResult:
    """Convert a local HF Qwen2-VL / Qwen2.5-VL directory into an Orbax checkpoint at step 0.

    Args:
      hf_dir: directory with config.json and model.safetensors (or a sharded index).
      out_dir: the checkpoint directory to create (see the module docstring for its layout).
      dtype: parameter dtype stored ("bfloat16" for real models; "float32" keeps fp32 weights exact).
      compute_dtype: the model's activation dtype recorded in the meta (default: `dtype`).
      mesh: where the parameters are placed (and saved from); default: FSDP over all devices.
      optimizer: a `zipr1_jax.train.optim.OptimConfig`; when given, a fresh optimizer state is saved
        too (a full train state the trainer resumes from).
      overwrite: replace a non-empty `out_dir` (only once the new checkpoint is complete).
    Returns:
      ImportResult(out_dir, step=0, config, num_params, with_optimizer, mesh_shape).
    """
    check_dtype(dtype)
    check_dtype(compute_dtype, "compute_dtype", optional=True)
    hf_dir = os.path.abspath(os.fspath(hf_dir))
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ConversionError(f"hf_dir {hf_dir} is not a Hugging Face model directory (no config.json)")
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=(hf_dir,))  # fail before the long read
    mesh = default_mesh() if mesh is None else mesh
    try:
        with _on_host():
            config, model = load_hf_checkpoint(hf_dir, dtype=compute_dtype or dtype, param_dtype=dtype)
    except ValueError as e:  # loader CheckpointError / ConfigError: already name the key or field
        raise ConversionError(f"cannot import {hf_dir}: {e}") from e
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model, graphdef
    if jax.tree.leaves(rest):
        raise ConversionError(f"the imported model holds non-parameter state {list(rest.keys())}")
    params = _place(params, mesh)
    opt_state = None
    if optimizer is not None:
        opt_state = _fresh_opt_state(optimizer, params, mesh)
    meta = {"phase": "init", "phase_step": 0, "global_step": 0, "hf_config": config.to_hf_config(),
            "source": {"format": "huggingface", "hf_dir": hf_dir, "dtype": dtype},
            "optimizer": None if optimizer is None else dataclasses.asdict(optimizer)}
    with staged_output(out, overwrite=overwrite) as tmp:
        ck = Checkpointer(tmp, keep_last=1, save_every=0, async_save=False)
        try:
            ck.save(CONVERSION_STEP, params=params, opt_state=opt_state, meta=meta, force=True)
            ck.wait()
        except OSError as e:
            raise ConversionError(f"writing the checkpoint for {out} failed ({e}); nothing was written to "
                                  f"{out}") from e
        finally:
            ck.close()
    n = int(sum(x.size for x in jax.tree.leaves(params)))
    log.info("converted %s -> %s (%d parameters, %s)", hf_dir, out, n, dtype)
    return ImportResult(out_dir=out, step=CONVERSION_STEP, config=config, num_params=n,
                        with_optimizer=optimizer is not None, mesh_shape=dict(mesh.shape))


def rl_optimizer_config(cfg) -> Any:
    """The OptimConfig a trainer run of `cfg` (a TrainConfig) restores a phase-"init" checkpoint
    with: its RL optimizer."""
    return phase_optim_config(cfg, "rl")


def _fresh_opt_state(optimizer, params: nnx.State, mesh: jax.sharding.Mesh):
    """The optimizer's initial state, built directly in the shardings the trainer uses."""
    if not isinstance(optimizer, OptimConfig):
        raise ConversionError(f"optimizer must be a zipr1_jax.train.optim.OptimConfig, got {type(optimizer).__name__}")
    tx = make_optimizer(optimizer, params)
    shardings = opt_state_shardings(jax.eval_shape(tx.init, params), state_shardings(params, mesh))
    return jax.jit(tx.init, out_shardings=shardings)(params)
