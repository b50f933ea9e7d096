"""The whole training run's configuration: one frozen, kw_only dataclass per section.

`TrainConfig()` with no arguments is the embedded default run (tiny Qwen2-VL-architecture model,
built-in visual task, SFT warm-up then ZipR1 GRPO on CPU); `configs/default.yaml` spells out the
same values and a test keeps the two equal. YAML files and dotted command-line overrides are turned
into these dataclasses by `zipr1_jax.train.cli`.

Every field is validated in `__post_init__`; errors are `TrainConfigError` and name the dotted field
(`rl.eps_clip_high`, `mesh.fsdp`, ...) and the allowed values. Checks that need two sections (the
p grid against the group size, SFT/RL batch against the mesh) live in `TrainConfig.__post_init__`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from zipr1_jax import checks
from zipr1_jax.kernels.sparse_attention.config import ATTENTION_MODES as SPARSE_MODES
from zipr1_jax.kernels.sparse_attention.config import BACKENDS as KERNEL_BACKENDS
from zipr1_jax.models.qwen_vl.config import DTYPES, PRESETS, QwenVLConfig, preset
from zipr1_jax.rl.advantages import ADVANTAGE_KINDS as ADVANTAGE_ESTIMATORS
from zipr1_jax.rl.losses import AGGREGATIONS
from zipr1_jax.rl.rewards import PATH_WEIGHTS
from zipr1_jax.rl.rollout import BUDGETS
from zipr1_jax.sharding.mesh import MESH_AXES
from zipr1_jax.train.metrics import PROGRESS
from zipr1_jax.train.optim import SCHEDULES


class TrainConfigError(ValueError):
    """A training config value is missing, unknown or impossible."""


# Allowed values, each defined once by the code that implements them.
BACKENDS = ("auto",) + KERNEL_BACKENDS  # "auto": chosen by platform
PROBE_MODES = ("zipcache", "all")  # zipcache: recent + random probes (SelectionConfig "sampled")

# The paper's multi-budget grid: 0.940, 0.945, ..., 0.975 (8 values, one per rollout of a group).
DEFAULT_P_GRID = tuple(round(0.940 + 0.005 * i, 3) for i in range(8))

# The shared field validators (zipr1_jax.checks), raising TrainConfigError with the dotted field name.
_is_int, _is_num = checks.is_int, checks.is_number
_int = functools.partial(checks.check_int, error=TrainConfigError)
_float = functools.partial(checks.check_float, error=TrainConfigError)
_choice = functools.partial(checks.check_choice, error=TrainConfigError)
_bool = functools.partial(checks.check_bool, error=TrainConfigError)
_str = functools.partial(checks.check_str, error=TrainConfigError)
_tuple = functools.partial(checks.check_tuple, error=TrainConfigError)


def _check(cond: bool, name: str, msg: str) -> None:
    checks.require(cond, name, msg, error=TrainConfigError)


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Which model: a preset (shapes; random init for tiny presets) and/or a local HF directory."""

    PREFIX = "model"
    preset: str = "tiny_qwen2_vl_demo"
    hf_dir: str | None = None  # local directory with config.json + *.safetensors; overrides `preset`
    layers: int | None = None  # decoder depth of a tiny preset (None: the preset's)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    freeze_vision: bool = False  # no gradient / optimizer state for `visual.*`
    init_seed: int = 0  # random init of models built from a preset
    # Start from these weights instead (no HF read): a params-only Orbax checkpoint (save_params,
    # `<ckpt>/reference`), a step directory or a checkpoint directory (its latest step). The shapes
    # come from `hf_dir`'s config.json or the preset; restored straight into the mesh shardings.
    init_params: str | None = None

    def __post_init__(self):
        _str(self, "preset")
        _str(self, "init_params", optional=True)
        _check(self.preset in PRESETS, "model.preset", f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        _str(self, "hf_dir", optional=True)
        if self.layers is not None:
            _int(self, "layers", 1)
            _check(self.preset.startswith("tiny"), "model.layers",
                   f"only tiny presets take a layer count (preset is {self.preset!r}); leave it null")
        _choice(self, "dtype", DTYPES)
        _choice(self, "param_dtype", DTYPES)
        _bool(self, "freeze_vision")
        _int(self, "init_seed", 0)

    @property
    def is_tiny(self) -> bool:
        return self.hf_dir is None and self.preset.startswith("tiny")

    def model_config(self):
        """The QwenVLConfig: read from `hf_dir/config.json` when given, else the preset."""
        if self.hf_dir is not None:
            return QwenVLConfig.from_hf_config(self.hf_dir, dtype=self.dtype, param_dtype=self.param_dtype)
        kw: dict[str, Any] = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.layers is not None:
            kw["layers"] = self.layers
        return preset(self.preset, **kw)


@dataclass(frozen=True, kw_only=True)
class SparsitySection:
    """ZipVL top-p token selection in the decoder layers (docs/method.md sections 1-2)."""

    PREFIX = "sparsity"
    enabled: bool = True  # False: dense policy (baseline)
    p_eval: float = 0.975
    p_grid: tuple[float, ...] = DEFAULT_P_GRID  # training thresholds; "multi": rollout n uses p_grid[n]
    budget: str = "multi"  # "single" (paper v1): one p per group, drawn from p_grid
    probes: str = "zipcache"  # recent 5% + random 5% of queries, or "all" (exact)
    probe_recent_frac: float = 0.05
    probe_random_frac: float = 0.05
    min_probes: int = 16
    mode: str = "kv"
    layers: tuple[int, ...] | None = None  # sparse decoder layers (None: all)
    per_kv_head: bool = False
    backend: str = "auto"

    def __post_init__(self):
        _bool(self, "enabled", "per_kv_head")
        _float(self, "p_eval", 0.0, 1.0, lo_open=True)
        grid = _tuple(self, "p_grid")
        _check(len(grid) > 0, "sparsity.p_grid", "must hold at least one threshold")
        for i, p in enumerate(grid):
            _check(_is_num(p) and 0.0 < p <= 1.0, f"sparsity.p_grid[{i}]", f"must be in (0, 1], got {p!r}")
        object.__setattr__(self, "p_grid", tuple(float(p) for p in grid))
        _choice(self, "budget", BUDGETS)
        _choice(self, "probes", PROBE_MODES)
        _float(self, "probe_recent_frac", 0.0, 1.0)
        _float(self, "probe_random_frac", 0.0, 1.0)
        _check(self.probe_recent_frac + self.probe_random_frac > 0, "sparsity.probe_recent_frac",
               "probe_recent_frac + probe_random_frac must be > 0 (use probes='all' for every query)")
        _int(self, "min_probes", 1)
        _choice(self, "mode", SPARSE_MODES)
        layers = _tuple(self, "layers", optional=True)
        if layers is not None:
            _check(len(layers) > 0, "sparsity.layers", "must be null (all layers) or a non-empty list")
            for i, y in enumerate(layers):
                _check(_is_int(y) and y >= 0, f"sparsity.layers[{i}]", f"must be a layer index >= 0, got {y!r}")
            _check(len(set(layers)) == len(layers), "sparsity.layers", f"has duplicates: {list(layers)}")
        _choice(self, "backend", BACKENDS)


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Prompts: the built-in procedural visual tasks (or a dataset), bucketing, batch and group."""

    PREFIX = "data"
    source: str = "builtin"  # "builtin" | "jsonl" | "hf_disk" | "tfds"
    path: str | None = None  # dataset path / name for non-builtin sources
    # Built-in task names (None: every registered task). The demo's spot_color: one square of 2x2
    # vision tokens on a 168-px image (36 vision tokens of a 65-token prompt; 4 hold the answer).
    tasks: tuple[str, ...] | None = ("spot_color",)
    num_examples: int = 2048
    image_size: tuple[int, int] = (168, 168)
    difficulty: int = 1
    length_buckets: tuple[int, ...] = (72, 80)
    batch_size: int = 4  # distinct prompts per RL step
    group_size: int = 8  # G rollouts per prompt
    tokenizer: str = "builtin"  # "builtin" (offline tiny tokenizer), "model" (files in model.hf_dir) or a dir
    seed: int = 0
    # System turn of every prompt; null: none (the demo keeps prompts short so vision tokens dominate,
    # as in real MLLM prompts). Real-model configs set an instruction here.
    system_prompt: str | None = None
    # Every record is checked before the first step (data.validate); false: any bad record stops the
    # run with a list of them; true: bad records are dropped and listed, training uses the rest.
    skip_bad_records: bool = False

    SOURCES = ("builtin", "jsonl", "hf_disk", "tfds")

    def __post_init__(self):
        _choice(self, "source", self.SOURCES)
        _str(self, "path", optional=True)
        _check(self.source == "builtin" or self.path is not None, "data.path",
               f"is required when data.source={self.source!r}")
        tasks = _tuple(self, "tasks", optional=True)
        if tasks is not None:
            _check(len(tasks) > 0, "data.tasks", "must be null (all tasks) or a non-empty list")
            for i, t in enumerate(tasks):
                _check(isinstance(t, str) and t != "", f"data.tasks[{i}]", f"must be a task name, got {t!r}")
        _int(self, "num_examples", 1)
        size = _tuple(self, "image_size")
        _check(len(size) == 2 and all(_is_int(s) and s >= 28 for s in size), "data.image_size",
               f"must be [H, W] with H, W >= 28 (two 14-px patches, one merge unit), got {list(size)}")
        _int(self, "difficulty", 1)
        buckets = _tuple(self, "length_buckets")
        _check(len(buckets) > 0 and all(_is_int(b) and b > 0 for b in buckets)
               and list(buckets) == sorted(set(buckets)), "data.length_buckets",
               f"must be positive ints in strictly increasing order, got {list(buckets)}")
        _int(self, "batch_size", 1)
        _int(self, "group_size", 1)
        _str(self, "tokenizer")
        _int(self, "seed", 0)
        _str(self, "system_prompt", optional=True)
        _bool(self, "skip_bad_records")


SFT_TARGETS = ("answer", "all")


@dataclass(frozen=True, kw_only=True)
class SFTSection:
    """Supervised warm-up so that a randomly initialised model can earn accuracy reward."""

    PREFIX = "sft"
    steps: int = 200  # 0 skips the warm-up
    lr: float = 3e-3
    warmup_steps: int = 20
    batch_size: int = 16
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # "answer": cross entropy on the answer tokens only (instruction tuning of a pretrained model).
    # "all": on every text token too (language-model pretraining of a from-scratch model): without it
    # the prompt tokens' attention is never trained and stays near uniform, unlike a real MLLM's.
    targets: str = "answer"

    def __post_init__(self):
        _int(self, "steps", 0)
        _choice(self, "targets", SFT_TARGETS)
        _float(self, "lr", 0.0, lo_open=True)
        _int(self, "warmup_steps", 0)
        _int(self, "batch_size", 1)
        _float(self, "weight_decay", 0.0)
        _float(self, "grad_clip", 0.0)


@dataclass(frozen=True, kw_only=True)
class RLSection:
    """ZipR1 GRPO (docs/method.md section 3): optimiser, objective, rewards and sampling."""

    PREFIX = "rl"
    steps: int = 80
    lr: float = 1e-3
    warmup_steps: int = 10  # 2 at this lr made the first GRPO steps collapse accuracy (measured)
    schedule: str = "cosine"  # warmup then cosine decay to min_lr_ratio * lr, or constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    weight_decay: float = 0.0
    # k3 KL(pi_theta || pi_ref) coefficient; 0 skips the reference model. 0.5 (not the usual 0.04):
    # the dense reference is the anchor that keeps accuracy while the pathwise term prunes.
    beta_kl: float = 0.5
    eps_clip_low: float = 0.2
    eps_clip_high: float = 0.28  # clip-higher: the upper epsilon may differ
    mu: int = 1  # inner optimisation iterations per rollout batch
    advantage: str = "grpo"
    adv_eps: float = 1e-6
    aggregation: str = "token"
    lambda_eff: float = 1.0  # weight of r_eff = 1 - token ratio
    gate: bool = True  # r_eff only counts in groups with at least one correct rollout
    # The pathwise efficiency term (the gradient of the reward's direct dependence on the weights,
    # through a relaxed token ratio): loss += lambda_path * mean(w * tau_soft). 0: paper-literal.
    lambda_path: float = 1.0
    path_weight: str = "correct"  # w: "correct" (C * r_acc), "gate" (C) or "one"
    path_temperature: float = 0.05  # sigmoid temperature of the relaxed top-p cut (in attention mass)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 16
    grad_accum: int = 1  # micro-batches per optimiser step
    # Sparse rollouts decode over a KV cache cut to the kept prompt, rounded up to 1/cache_steps of
    # the prompt length (at most cache_steps decode compiles per prompt length); 1: never cut.
    cache_steps: int = 8

    def __post_init__(self):
        _int(self, "steps", 0)
        _int(self, "cache_steps", 1)
        _float(self, "lr", 0.0, lo_open=True)
        _int(self, "warmup_steps", 0)
        _choice(self, "schedule", SCHEDULES)
        _float(self, "min_lr_ratio", 0.0, 1.0)
        _float(self, "grad_clip", 0.0)
        _float(self, "weight_decay", 0.0)
        _float(self, "beta_kl", 0.0)
        _float(self, "eps_clip_low", 0.0, 1.0, lo_open=True, hi_open=True)
        _float(self, "eps_clip_high", 0.0, lo_open=True)
        _int(self, "mu", 1)
        _choice(self, "advantage", ADVANTAGE_ESTIMATORS)
        _float(self, "adv_eps", 0.0, lo_open=True)
        _choice(self, "aggregation", AGGREGATIONS)
        _float(self, "lambda_eff", 0.0)
        _bool(self, "gate")
        _float(self, "lambda_path", 0.0)
        _choice(self, "path_weight", PATH_WEIGHTS)
        _float(self, "path_temperature", 0.0, lo_open=True)
        _float(self, "temperature", 0.0)
        _float(self, "top_p", 0.0, 1.0, lo_open=True)
        _int(self, "top_k", 0)
        _int(self, "max_new_tokens", 1)
        _int(self, "grad_accum", 1)


@dataclass(frozen=True, kw_only=True)
class MeshSection:
    """Device mesh (data, fsdp, tensor). -1 on one axis means "all remaining devices"."""

    PREFIX = "mesh"
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    AXES = MESH_AXES

    def __post_init__(self):
        for name in self.AXES:
            v = getattr(self, name)
            _check(_is_int(v) and (v >= 1 or v == -1), f"mesh.{name}", f"must be a positive int or -1 (the rest), got {v!r}")
        _check(sum(getattr(self, a) == -1 for a in self.AXES) <= 1, "mesh",
               f"at most one axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices`; raises TrainConfigError if they cannot fit."""
        sizes = {a: getattr(self, a) for a in self.AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        for a, v in sizes.items():
            if v == -1:
                _check(num_devices % fixed == 0, f"mesh.{a}",
                       f"-1 cannot fill {num_devices} devices: the other axes multiply to {fixed}")
                sizes[a] = num_devices // fixed
        total = math.prod(sizes.values())
        _check(total == num_devices, "mesh",
               f"data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']} = {total} but "
               f"{num_devices} devices are available")
        return sizes


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    PREFIX = "checkpoint"
    dir: str | None = None  # None: <log.out_dir>/checkpoints
    save_every: int = 20  # steps; 0 saves only at the end
    keep_last: int = 2
    resume: bool = True  # restore the latest step in `dir` when present
    # Resume from this older step instead of the latest (e.g. the last one before a divergence);
    # the later steps are moved to `<dir>/superseded/`, not deleted.
    resume_step: int | None = None
    # A resume on data that differs from the checkpoint's (record count / content hash) is refused
    # unless this is set: the data iterator's saved position would not mean the same batches.
    allow_data_change: bool = False
    async_save: bool = True

    def __post_init__(self):
        _str(self, "dir", optional=True)
        _int(self, "save_every", 0)
        _int(self, "keep_last", 1)
        if self.resume_step is not None:
            _int(self, "resume_step", 0)
        _bool(self, "resume", "async_save", "allow_data_change")
        _check(self.resume or self.resume_step is None, "checkpoint.resume_step",
               "needs checkpoint.resume=true (it names the step to resume from)")


@dataclass(frozen=True, kw_only=True)
class GuardSection:
    """When a step counts as diverged: the run stops before saving it, so every saved step passed."""

    PREFIX = "guard"
    # Largest allowed |update| / |params| of one optimizer step (global L2 norms). Healthy steps
    # are far below 1 (Adam moves each weight by about lr); an exploding step is orders above.
    max_update_ratio: float = 1.0
    # A loss above loss_spike x max(mean |loss| of the last loss_window steps of the phase, loss_floor)
    # is a spike (0 disables); the floor keeps losses near zero (GRPO) from flagging noise.
    loss_spike: float = 10.0
    loss_window: int = 20
    loss_floor: float = 0.1

    def __post_init__(self):
        _float(self, "max_update_ratio", 0.0, lo_open=True)
        _float(self, "loss_spike", 0.0)
        _int(self, "loss_window", 2)
        _float(self, "loss_floor", 0.0, lo_open=True)


@dataclass(frozen=True, kw_only=True)
class LogSection:
    PREFIX = "log"
    out_dir: str = "runs/default"
    log_every: int = 1
    tensorboard: bool = True
    plots: bool = True
    progress: str = "tqdm"  # tqdm bar, a plain line per log step, or nothing

    def __post_init__(self):
        _str(self, "out_dir")
        _int(self, "log_every", 1)
        _bool(self, "tensorboard", "plots")
        _choice(self, "progress", PROGRESS)


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    PREFIX = "eval"
    num_examples: int = 256
    p_list: tuple[float, ...] = (1.0, 0.975)  # 1.0 = dense attention
    batch_size: int = 64
    every: int = 0  # evaluate every N RL steps (0: only before RL and at the end)

    def __post_init__(self):
        _int(self, "num_examples", 1)
        ps = _tuple(self, "p_list")
        _check(len(ps) > 0, "eval.p_list", "must hold at least one threshold")
        for i, p in enumerate(ps):
            _check(_is_num(p) and 0.0 < p <= 1.0, f"eval.p_list[{i}]", f"must be in (0, 1], got {p!r}")
        object.__setattr__(self, "p_list", tuple(float(p) for p in ps))
        _int(self, "batch_size", 1)
        _int(self, "every", 0)


SECTIONS: dict[str, type] = {
    "model": ModelSection, "sparsity": SparsitySection, "data": DataSection, "sft": SFTSection,
    "rl": RLSection, "mesh": MeshSection, "checkpoint": CheckpointSection, "guard": GuardSection,
    "log": LogSection, "eval": EvalSection,
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Root of the config tree. `TrainConfig()` is the embedded default CPU run."""

    PREFIX = ""
    name: str = "zipr1_tiny_cpu"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    data: DataSection = field(default_factory=DataSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rl: RLSection = field(default_factory=RLSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    guard: GuardSection = field(default_factory=GuardSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        _check(isinstance(self.name, str) and self.name != "", "name", f"must be a non-empty string, got {self.name!r}")
        _check(_is_int(self.seed) and self.seed >= 0, "seed", f"must be an int >= 0, got {self.seed!r}")
        for key, cls in SECTIONS.items():
            _check(isinstance(getattr(self, key), cls), key, f"must be a {cls.__name__}, got {type(getattr(self, key)).__name__}")
        G = self.data.group_size
        sp = self.sparsity
        if sp.enabled and sp.budget == "multi":
            _check(len(sp.p_grid) == G, "sparsity.p_grid",
                   f"multi-budget rollouts use one threshold per rollout: {len(sp.p_grid)} values but "
                   f"data.group_size={G} (set them equal, or sparsity.budget=single)")
        if self.rl.steps > 0:
            _check(G >= 2, "data.group_size", f"group-relative advantages need G >= 2 rollouts, got {G}")
        rows = self.data.batch_size * G
        _check(rows % self.rl.grad_accum == 0, "rl.grad_accum",
               f"{rows} rollouts per step (data.batch_size*data.group_size) do not split into "
               f"{self.rl.grad_accum} micro-batches")
        if sp.layers is not None:
            depth = self.model.layers
            if depth is not None:
                bad = [y for y in sp.layers if y >= depth]
                _check(not bad, "sparsity.layers", f"indices {bad} are outside the model's {depth} layers")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir if self.checkpoint.dir is not None else os.path.join(self.log.out_dir, "checkpoints")

    def tokenizer_dir(self) -> str:
        """"builtin", or the directory holding the tokenizer files ("model" -> model.hf_dir)."""
        if self.data.tokenizer == "model":
            _check(self.model.hf_dir is not None, "data.tokenizer",
                   "'model' reads the tokenizer from model.hf_dir, which is not set")
            return self.model.hf_dir
        return self.data.tokenizer

    def check_runnable(self) -> None:
        """Checks that need the filesystem (run before any work, so nothing saved is at risk).

        Real-size presets need weights (`model.hf_dir`): a 7B model from random init is never wanted.
        """
        m = self.model
        if m.init_params is not None:
            _check(os.path.isdir(m.init_params), "model.init_params", f"{m.init_params!r} is not a directory")
        if m.hf_dir is None:
            _check(m.is_tiny or m.init_params is not None, "model.hf_dir",
                   f"preset {m.preset!r} is a real model: set model.hf_dir=/path/to/its Hugging Face directory "
                   "(config.json + *.safetensors) or model.init_params=/path/to/orbax/params; only tiny presets "
                   "start from random weights")
        else:
            _check(os.path.isdir(m.hf_dir), "model.hf_dir", f"{m.hf_dir!r} is not a directory")
            _check(os.path.isfile(os.path.join(m.hf_dir, "config.json")), "model.hf_dir",
                   f"{m.hf_dir!r} has no config.json")
            weights = [f for f in os.listdir(m.hf_dir) if f.endswith(".safetensors")]
            _check(bool(weights) or m.init_params is not None, "model.hf_dir",
                   f"{m.hf_dir!r} holds no *.safetensors weight files")
        tok = self.tokenizer_dir()
        if tok != "builtin":
            _check(os.path.isdir(tok), "data.tokenizer", f"{tok!r} is not a directory")
            _check(any(os.path.isfile(os.path.join(tok, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                       "vocab.json")),
                   "data.tokenizer", f"{tok!r} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
        if self.data.source != "builtin":
            _check(os.path.exists(self.data.path) or self.data.source == "tfds", "data.path",
                   f"{self.data.path!r} does not exist")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), e.g. to save next to a checkpoint or print."""
        def conv(x):
            if isinstance(x, tuple):
                return [conv(v) for v in x]
            if hasattr(x, "__dataclass_fields__"):
                return {f.name: conv(getattr(x, f.name)) for f in fields(x)}
            return x
        return conv(self)
