"""What an evaluation reads: model weights (an Orbax training checkpoint or a Hugging Face
directory), the tokenizer that belongs to them, and evaluation sets from short specs.

Checkpoint paths `load_model` accepts (detected from the files, never from the name):
  hf      a directory with config.json and *.safetensors (hub layout)
  orbax   a `Checkpointer` directory (<out_dir>/checkpoints: one sub-directory per step); the
          latest step unless `step` is given. The model config comes from the step's meta
          (the TrainConfig the trainer saved), so nothing else is needed.
  run     a training run's out_dir (holds checkpoints/): as orbax, plus its tokenizer/
  params  a params-only Orbax checkpoint (`save_params`, e.g. <ckpt>/reference or
          <ckpt>/<step>/params); the config is taken from the surrounding checkpointer's meta,
          or `model_config` must be given.
Every problem raises `CheckpointError` naming the path and what is missing.

Evaluation-set specs (`eval_set`): builtin[:TASKS[:N]] (TASKS comma separated or "all"),
jsonl:PATH, hf_disk:PATH, tfds:NAME[:SPLIT]; `limit` keeps the first N records.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from flax import nnx

from zipr1_jax.checkpoint import CheckpointError, Checkpointer, restore_params
from zipr1_jax.data import sources
from zipr1_jax.data.pipelines import PipelineConfig, eval_loader
from zipr1_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from zipr1_jax.kernels.sparse_attention import SparsityConfig
from zipr1_jax.models.qwen_vl.loader import load_hf_checkpoint
from zipr1_jax.sharding.rules import abstract_with_shardings, state_shardings
from zipr1_jax.train.builders import abstract_params, sparsity_config
from zipr1_jax.train.cli import config_from_dict

KINDS = ("hf", "orbax", "run", "params")
SET_KINDS = ("builtin", "jsonl", "hf_disk", "tfds")
SETS_HELP = "builtin[:TASKS[:N]] | jsonl:PATH | hf_disk:PATH | tfds:NAME[:SPLIT]"


@dataclasses.dataclass
class LoadedModel:
    """A model ready to evaluate, with where it came from.

    train_config: the TrainConfig of an Orbax checkpoint (None for HF weights); step: the
    checkpoint step (None for HF); tokenizer_dir: where a matching tokenizer lives, "builtin"
    for the tiny offline tokenizer, or None when unknown.
    """

    model: nnx.Module
    config: Any
    kind: str
    path: str
    step: int | None = None
    train_config: Any = None
    tokenizer_dir: str | None = None

    def sparsity(self):
        """The run's SparsityConfig (its probes, mode, layers), else the default one."""
        if self.train_config is None:
            return SparsityConfig()
        return dataclasses.replace(sparsity_config(self.train_config.sparsity), enabled=True)


# ---------------------------------------------------------------------- detection
def _is_step_dir(path: str) -> bool:
    return os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "params"))


def _is_orbax_manager(path: str) -> bool:
    return os.path.isdir(path) and any(_is_step_dir(os.path.join(path, d)) for d in os.listdir(path))


def _is_params_only(path: str) -> bool:
    names = set(os.listdir(path))
    return bool(names & {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"})


def checkpoint_kind(path: str | os.PathLike) -> str:
    """One of KINDS for `path` (see the module docstring); CheckpointError when it is none."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise CheckpointError(f"checkpoint path {p!r} does not exist")
    if not os.path.isdir(p):
        raise CheckpointError(f"checkpoint path {p!r} is a file; expected a checkpoint directory")
    names = os.listdir(p)
    if "config.json" in names and any(n.endswith(".safetensors") or n == "model.safetensors.index.json"
                                      for n in names):
        return "hf"
    if _is_orbax_manager(p):
        return "orbax"
    if _is_orbax_manager(os.path.join(p, "checkpoints")):
        return "run"
    if _is_params_only(p):
        return "params"
    hint = " (config.json without *.safetensors)" if "config.json" in names else ""
    raise CheckpointError(f"{p!r} is not a checkpoint{hint}: expected a Hugging Face directory (config.json + "
                          "*.safetensors), an Orbax checkpoint directory (step sub-directories), a training run "
                          "directory (with checkpoints/) or a params-only Orbax checkpoint")


# ---------------------------------------------------------------------- loading
# One graphdef per model config in this process. Two separately built models of one config do not
# have equal graphdefs (the vision MLP stores a per-instance activation lambda), and the graphdef is
# a static jit argument: without sharing, every checkpoint loaded would recompile every program.
_GRAPHS: dict = {}


def shared_graph(model: nnx.Module) -> nnx.Module:
    """`model` re-merged onto the process-wide graphdef of its config (parameters shared, nothing
    copied), so models of one config hit the same jit caches."""
    graphdef, state = nnx.split(model)
    return nnx.merge(_GRAPHS.setdefault(model.config, graphdef), state)


def _train_config(meta: dict, where: str):
    if "config" not in meta:
        raise CheckpointError(f"{where} has no training config in its meta; pass model_config")
    try:
        return config_from_dict(meta["config"])
    except ValueError as e:
        raise CheckpointError(f"{where}: its saved training config is not valid here: {e}") from e


def _target(config, mesh):
    graphdef, abstract = abstract_params(config)
    graphdef = _GRAPHS.setdefault(config, graphdef)
    if mesh is not None:
        abstract = abstract_with_shardings(abstract, state_shardings(abstract, mesh))
    return graphdef, abstract


def _tokenizer_of_run(run_dir: str | None, train_config) -> str | None:
    if train_config is None:
        return None
    if train_config.data.tokenizer == "builtin":
        local = None if run_dir is None else os.path.join(run_dir, "tokenizer")
        return local if local is not None and os.path.isdir(local) else "builtin"
    return train_config.tokenizer_dir()


def _load_orbax(ckpt_dir: str, step: int | None, mesh, run_dir: str | None) -> LoadedModel:
    if run_dir is None and os.path.basename(os.path.normpath(ckpt_dir)) == "checkpoints":
        run_dir = os.path.dirname(os.path.normpath(ckpt_dir))
    with Checkpointer(ckpt_dir, async_save=False) as ck:
        steps = ck.all_steps()
        if not steps:
            raise CheckpointError(f"{ckpt_dir} holds no finished checkpoint step")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir}; available steps: {steps}")
        step = steps[-1] if step is None else step
        train_config = _train_config(ck.restore_meta(step), f"checkpoint step {step} in {ckpt_dir}")
        config = train_config.model.model_config()
        graphdef, target = _target(config, mesh)
        params = ck.restore(step, params_target=target)["params"]
    return LoadedModel(model=nnx.merge(graphdef, params), config=config, kind="orbax", path=ckpt_dir, step=step,
                       train_config=train_config, tokenizer_dir=_tokenizer_of_run(run_dir, train_config))


def _surrounding_meta(path: str) -> tuple[dict, int | None, str] | None:
    """(meta, step, checkpointer dir) around a params-only checkpoint: <ckpt>/<step>/params (that
    step) or <ckpt>/reference (step None; the meta of the latest step). None when neither."""
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.basename(os.path.normpath(path)) == "params" and _is_step_dir(parent):
        ckpt_dir, step = os.path.dirname(parent), int(os.path.basename(parent))
    elif _is_orbax_manager(parent):
        ckpt_dir, step = parent, None
    else:
        return None
    with Checkpointer(ckpt_dir, async_save=False) as ck:
        meta_step = ck.latest_step() if step is None else step
        if meta_step is None:
            return None
        return ck.restore_meta(meta_step), step, ckpt_dir


def load_model(path: str | os.PathLike, *, step: int | None = None, model_config=None, mesh=None,
               dtype: str = "float32", param_dtype: str = "float32") -> LoadedModel:
    """Load weights for evaluation from any of the checkpoint kinds (module docstring).

    Args:
      step: Orbax step (default: the latest); an error for HF / params-only checkpoints.
      model_config: QwenVLConfig for a params-only checkpoint outside a checkpointer.
      mesh: optional Mesh: arrays are restored straight into the logical-rule shardings.
      dtype, param_dtype: of a Hugging Face import.
    """
    p = os.path.abspath(os.fspath(path))
    kind = checkpoint_kind(p)
    if step is not None and kind not in ("orbax", "run"):
        raise CheckpointError(f"{p} is a {kind} checkpoint: it has no steps, do not pass step={step}")
    if kind == "hf":
        config, model = load_hf_checkpoint(p, dtype=dtype, param_dtype=param_dtype)
        model = shared_graph(model)
        has_tok = any(os.path.isfile(os.path.join(p, f)) for f in ("tokenizer.json", "vocab.json"))
        return LoadedModel(model=model, config=config, kind="hf", path=p, tokenizer_dir=p if has_tok else None)
    if kind == "orbax":
        return _load_orbax(p, step, mesh, None)
    if kind == "run":
        return dataclasses.replace(_load_orbax(os.path.join(p, "checkpoints"), step, mesh, p), kind="run", path=p)
    train_config, found_step, run_dir = None, None, None
    if model_config is None:
        found = _surrounding_meta(p)
        if found is None:
            raise CheckpointError(f"{p} is a params-only checkpoint outside a training checkpoint directory: "
                                  "pass model_config (the QwenVLConfig it was saved from)")
        meta, found_step, ckpt_dir = found
        train_config = _train_config(meta, p)
        model_config = train_config.model.model_config()
        if os.path.basename(ckpt_dir) == "checkpoints":
            run_dir = os.path.dirname(ckpt_dir)
    graphdef, target = _target(model_config, mesh)
    params = restore_params(p, target)
    return LoadedModel(model=nnx.merge(graphdef, params), config=model_config, kind="params", path=p,
                       step=found_step, train_config=train_config,
                       tokenizer_dir=_tokenizer_of_run(run_dir, train_config))


def load_tokenizer_for(loaded: LoadedModel | None = None, override: str | None = None, *,
                       workdir: str | None = None):
    """The tokenizer: `override` (a directory, or "builtin"), else the checkpoint's own."""
    where = override if override is not None else (None if loaded is None else loaded.tokenizer_dir)
    if where is None:
        raise FileNotFoundError(f"no tokenizer known for checkpoint {getattr(loaded, 'path', None)!r}: pass a "
                                "tokenizer directory (or 'builtin' for the tiny offline tokenizer)")
    if where == "builtin":
        where = build_tiny_tokenizer(os.path.join(workdir or tempfile.mkdtemp(prefix="zipr1_tok_"), "tokenizer"))
    return load_tokenizer(where)


# ---------------------------------------------------------------------- evaluation sets
def eval_source(spec: str, *, limit: int | None = None, seed: int = 1_000_003, image_size=(56, 56),
                difficulty: int = 1):
    """(name, random-access source) of an evaluation-set spec (module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"evaluation set spec must be a non-empty string ({SETS_HELP}), got {spec!r}")
    kind, _, rest = spec.partition(":")
    if kind not in SET_KINDS:
        raise ValueError(f"unknown evaluation set {spec!r}: kind {kind!r} is not one of {SET_KINDS} ({SETS_HELP})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    if kind == "builtin":
        tasks, _, n = rest.partition(":")
        try:
            num = int(n) if n else (limit or 64)
        except ValueError:
            raise ValueError(f"evaluation set {spec!r}: N must be an int, got {n!r}") from None
        kw = dict(seed=seed, difficulty=difficulty, image_size=tuple(image_size or (56, 56)))
        if tasks and tasks != "all":
            kw["tasks"] = tuple(t for t in tasks.split(",") if t)
        num = min(num, limit) if limit else num
        return f"builtin({tasks or 'all'})", sources.BuiltinSource(num, **kw)
    if not rest:
        raise ValueError(f"evaluation set {spec!r} needs a path or name after '{kind}:' ({SETS_HELP})")
    if kind == "jsonl":
        src = sources.JsonlSource(rest)
    elif kind == "hf_disk":
        src = sources.HFDiskSource(rest)
    else:
        name, _, split = rest.partition(":")
        src = sources.TfdsSource(name, split=split or "test")
    if limit is not None and limit < len(src):
        src = sources.RecordListSource([src[i] for i in range(limit)], name=f"{src.name}[:{limit}]")
    return f"{kind}:{os.path.basename(rest.rstrip('/')) or rest}", src


@dataclasses.dataclass
class EvalSet:
    """name; loader: the eval Loader (re-iterable batches); source: its records (row i of the
    first batch is source[i]: no shuffling); image_size: the size every image is resized to."""

    name: str
    loader: Any
    source: Any
    image_size: tuple[int, int] | None


def eval_set(spec: str, tokenizer, model_config, *, batch_size: int = 8, length_buckets=(128, 256, 512),
             image_size=(56, 56), limit: int | None = None, seed: int = 1_000_003, difficulty: int = 1,
             system_prompt: str | None = "default") -> EvalSet:
    """An EvalSet for a spec: one ordered pass, left-padded prompts, M-RoPE ids, and the last
    partial batch filled and marked invalid. Images are resized to `image_size` (static grids).
    `system_prompt`: the system turn of every prompt (use the one the model was trained with; None: no
    system turn; "default": the pipeline's default instruction)."""
    name, src = eval_source(spec, limit=limit, seed=seed, image_size=image_size, difficulty=difficulty)
    size = tuple(int(x) for x in image_size) if image_size is not None else None
    extra = {} if system_prompt == "default" else {"system_prompt": system_prompt}
    cfg = PipelineConfig(batch_size=batch_size, length_buckets=tuple(length_buckets), shuffle=False, image_size=size,
                         **extra)
    return EvalSet(name=name, loader=eval_loader(src, tokenizer, cfg, model_config=model_config), source=src,
                   image_size=size)


def run_eval_set(train_config, tokenizer, model_config, *, num_examples: int | None = None, batch_size: int = 8,
                 limit: int | None = None, image_size=None, length_buckets=None) -> EvalSet:
    """The held-out examples a training run evaluates on, prepared as it prepares them (its image
    size, length buckets, system prompt; builtin tasks: the eval split seed `data.seed + 1_000_003`
    and difficulty). `num_examples`: builtin sets only (default `eval.num_examples`); other sources
    give their first `limit or eval.num_examples` records. `image_size` / `length_buckets` override
    the run's."""
    d = train_config.data
    common = dict(batch_size=batch_size, image_size=tuple(image_size or d.image_size),
                  length_buckets=tuple(length_buckets or d.length_buckets), system_prompt=d.system_prompt)
    if d.source == "builtin":
        tasks = ",".join(d.tasks) if d.tasks else "all"
        n = num_examples or train_config.eval.num_examples
        return eval_set(f"builtin:{tasks}:{n}", tokenizer, model_config, seed=d.seed + 1_000_003,
                        difficulty=d.difficulty, limit=limit, **common)
    return eval_set(f"{d.source}:{d.path}", tokenizer, model_config, limit=limit or train_config.eval.num_examples,
                    **common)
