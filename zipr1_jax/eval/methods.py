"""Attention settings the evaluation harness compares (docs/method.md sections 4-5).

    dense                 full attention (model.prefill; token ratio 1)
    topp:P                ZipVL / ZipR1 top-p selection at threshold P (the production path)
    topk:RATIO            fixed top-k ratio per layer, same scores as top-p
    threshold:T           fixed score threshold per layer (mean attention received >= T)
    fastv:K:R[:last|all]  FastV: after decoder layer K drop the R fraction of visual tokens that
                          received the least attention in layer K - 1, for all later layers

Every sparse setting runs through the same machinery: `model.sparse_prefill` (pruned per-layer
KV cache) then decode over it, with the token ratio counted one way (kept / valid prompt keys per
layer, mean over layers; dense layers count 1). Top-p is the model's native path; the others plug
a keep rule into the model's `keep_fn` hook (zipr1_jax/models/qwen_vl/sparse.py).

A setting's knob (p, ratio, threshold, 1 - R) travels as the per-row `p_B` array, a traced value:
one compiled program serves every knob value of a kind, so a sweep compiles once per kind. Keep
rules are frozen dataclasses: hashable, so they can sit in the model graph as static data.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from zipr1_jax.kernels.sparse_attention.variants import FASTV_QUERIES, select_fastv, select_threshold, select_topk
from zipr1_jax.models.qwen_vl.sparse import layer_keep

KINDS = ("dense", "topp", "topk", "threshold", "fastv")
DEFAULT_P = 0.975
SETTINGS_HELP = ("dense | topp:P (0 < P <= 1, default 0.975) | topk:RATIO (0 < RATIO <= 1) | threshold:T "
                 "(0 < T <= 1) | fastv:K:R[:last|all] (layer K >= 1, drop fraction 0 <= R < 1)")


class SettingError(ValueError):
    """An attention setting is unknown or out of range."""


# ---------------------------------------------------------------------- keep rules (model hook)
def _prompt_rule(select, valid_BL, select_end):
    """Wrap `select(q, k, valid) -> Selection` over prompt columns [0, E); columns >= E are kept."""
    E = valid_BL.shape[1] if select_end is None else select_end

    def run(q_BLNH, k_BLKH, **kw):
        sel = select(q_BLNH[:, :E], k_BLKH[:, :E], valid_BL[:, :E], **kw)
        return jnp.concatenate([sel.keep_BS, valid_BL[:, E:]], axis=1), sel.token_ratio_B
    return run


@dataclasses.dataclass(frozen=True)
class TopPRule:
    """ZipR1 top-p as a keep rule (identical to the native path; used to record kept masks)."""

    def __call__(self, *, input_ids_BL, valid_BL, p_B, select_end, sparsity, model_config):
        def layer_fn(y, q_BLNH, k_BLKH, rng):
            if not sparsity.is_sparse_layer(y):
                return None
            return layer_keep(q_BLNH, k_BLKH, valid_BL, p_B, selection=sparsity.selection, rng=rng,
                              select_end=select_end)
        return layer_fn


@dataclasses.dataclass(frozen=True)
class TopKRule:
    """Fixed top-k ratio (ratio per row = p_B) in the layers of `sparsity.layers`."""

    def __call__(self, *, input_ids_BL, valid_BL, p_B, select_end, sparsity, model_config):
        run = _prompt_rule(lambda q, k, v, rng: select_topk(q, k, v, p_B, config=sparsity.selection, rng=rng),
                           valid_BL, select_end)
        return lambda y, q, k, rng: run(q, k, rng=rng) if sparsity.is_sparse_layer(y) else None


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """Fixed score threshold (threshold per row = p_B) in the layers of `sparsity.layers`."""

    def __call__(self, *, input_ids_BL, valid_BL, p_B, select_end, sparsity, model_config):
        run = _prompt_rule(lambda q, k, v, rng: select_threshold(q, k, v, p_B, config=sparsity.selection, rng=rng),
                           valid_BL, select_end)
        return lambda y, q, k, rng: run(q, k, rng=rng) if sparsity.is_sparse_layer(y) else None


@dataclasses.dataclass(frozen=True)
class FastVRule:
    """FastV: layers < K dense; layer K - 1's attention ranks the visual (image / video pad) tokens;
    layers >= K keep all text and the kept visual tokens (keep fraction per row = p_B = 1 - R)."""

    layer: int
    query: str = "last"

    def __call__(self, *, input_ids_BL, valid_BL, p_B, select_end, sparsity, model_config):
        _check_fastv_layer(self.layer, model_config)
        ids = jnp.asarray(input_ids_BL)
        visual_BL = (ids == model_config.image_token_id) | (ids == model_config.video_token_id)
        run = _prompt_rule(lambda q, k, v: select_fastv(q, k, v, visual_BL[:, :v.shape[1]], p_B, query=self.query),
                           valid_BL, select_end)
        kept = {}

        def layer_fn(y, q_BLNH, k_BLKH, rng):
            if y == self.layer - 1:
                kept["mask"] = run(q_BLNH, k_BLKH)
            return kept["mask"] if y >= self.layer else None
        return layer_fn


def _check_fastv_layer(layer: int, model_config) -> None:
    n_layers = model_config.text.num_hidden_layers
    if n_layers < 2:
        raise SettingError(f"FastV needs at least 2 decoder layers (K >= 1 dense ones, then pruned ones); the "
                           f"model has {n_layers}")
    if not 1 <= layer < n_layers:
        raise SettingError(f"FastV layer K={layer} must be in [1, {n_layers - 1}]: the model has "
                           f"{n_layers} decoder layers and K counts the dense ones before pruning")


# ---------------------------------------------------------------------- settings
def _fraction(value, name: str, *, lo_open: bool = True, hi_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a number, got {value!r}") from None
    lo_ok = v > 0 if lo_open else v >= 0
    hi_ok = v < 1 if hi_open else v <= 1
    if not (lo_ok and hi_ok and np.isfinite(v)):
        raise SettingError(f"{name} must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, got {value!r}")
    return v


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """Base of the settings. `budget` is the knob sent as p_B (None: dense prefill)."""

    kind: ClassVar[str] = ""

    @property
    def budget(self) -> float | None:
        return None

    @property
    def label(self) -> str:
        return self.kind

    @property
    def key(self) -> str:
        """Short identifier (file names, metric keys)."""
        return self.kind

    @property
    def spec(self) -> str:
        """The spec string `parse_setting` reads back into this setting (for messages)."""
        return self.kind if self.budget is None else f"{self.kind}:{self.budget:g}"

    def check(self, model_config) -> None:
        """Raise SettingError when this setting cannot run on a model of `model_config`."""

    def keep_rule(self):
        """The model's `keep_fn` for this setting (None: the native dense / top-p path)."""
        return None

    def budget_B(self, rows: int) -> np.ndarray | None:
        return None if self.budget is None else np.full((rows,), self.budget, np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dense(Setting):
    kind: ClassVar[str] = "dense"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopP(Setting):
    kind: ClassVar[str] = "topp"
    p: float = DEFAULT_P

    def __post_init__(self):
        object.__setattr__(self, "p", _fraction(self.p, "top-p threshold p"))

    @property
    def budget(self) -> float:
        return self.p

    @property
    def label(self) -> str:
        return f"top-p {self.p:g}"

    @property
    def key(self) -> str:
        return f"topp{self.p:g}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TopK(Setting):
    kind: ClassVar[str] = "topk"
    ratio: float

    def __post_init__(self):
        object.__setattr__(self, "ratio", _fraction(self.ratio, "top-k ratio"))

    @property
    def budget(self) -> float:
        return self.ratio

    @property
    def label(self) -> str:
        return f"top-k {self.ratio:.4g}"

    @property
    def key(self) -> str:
        return f"topk{self.ratio:g}"

    def keep_rule(self):
        return TopKRule()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Threshold(Setting):
    kind: ClassVar[str] = "threshold"
    threshold: float

    def __post_init__(self):
        object.__setattr__(self, "threshold", _fraction(self.threshold, "score threshold"))

    @property
    def budget(self) -> float:
        return self.threshold

    @property
    def label(self) -> str:
        return f"threshold {self.threshold:g}"

    @property
    def key(self) -> str:
        return f"thr{self.threshold:g}"

    def keep_rule(self):
        return ThresholdRule()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FastV(Setting):
    """layer: K (number of dense layers before pruning, >= 1); drop: R in [0, 1)."""

    kind: ClassVar[str] = "fastv"
    layer: int = 2
    drop: float = 0.5
    query: str = "last"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or self.layer < 1:
            raise SettingError(f"FastV layer K must be an int >= 1, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "drop", _fraction(self.drop, "FastV drop ratio R", lo_open=False, hi_open=True))
        if self.query not in FASTV_QUERIES:
            raise SettingError(f"FastV query must be one of {FASTV_QUERIES}, got {self.query!r}")

    @property
    def budget(self) -> float:
        return 1.0 - self.drop

    @property
    def label(self) -> str:
        q = "" if self.query == "last" else f" ({self.query})"
        return f"FastV K={self.layer} R={self.drop:g}{q}"

    @property
    def key(self) -> str:
        return f"fastv{self.layer}_{self.drop:g}" + ("" if self.query == "last" else f"_{self.query}")

    @property
    def spec(self) -> str:
        return f"fastv:{self.layer}:{self.drop:g}" + ("" if self.query == "last" else f":{self.query}")

    def check(self, model_config) -> None:
        _check_fastv_layer(self.layer, model_config)

    def keep_rule(self):
        return FastVRule(layer=self.layer, query=self.query)


def parse_setting(spec: str | Setting) -> Setting:
    """A setting from its spec string (see SETTINGS_HELP), e.g. "topp:0.95", "fastv:2:0.5"."""
    if isinstance(spec, Setting):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SettingError(f"attention setting must be a non-empty string ({SETTINGS_HELP}), got {spec!r}")
    kind, *args = spec.strip().lower().split(":")
    n = {"dense": (0, 0), "topp": (0, 1), "topk": (1, 1), "threshold": (1, 1), "fastv": (2, 3)}
    if kind not in n:
        raise SettingError(f"unknown attention setting {spec!r}: kind {kind!r} is not one of {KINDS} "
                           f"({SETTINGS_HELP})")
    lo, hi = n[kind]
    if not lo <= len(args) <= hi:
        raise SettingError(f"attention setting {spec!r}: {kind} takes {lo}..{hi} ':'-separated values "
                           f"({SETTINGS_HELP})")
    if kind == "dense":
        return Dense()
    if kind == "topp":
        return TopP(p=args[0]) if args else TopP()
    if kind == "topk":
        return TopK(ratio=args[0])
    if kind == "threshold":
        return Threshold(threshold=args[0])
    try:
        layer = int(args[0])
    except ValueError:
        raise SettingError(f"attention setting {spec!r}: FastV layer K must be an int, got {args[0]!r}") from None
    return FastV(layer=layer, drop=args[1], query=args[2] if len(args) > 2 else "last")


def parse_settings(specs) -> list[Setting]:
    """Settings from spec strings (or Setting objects); duplicates are an error."""
    settings = [parse_setting(s) for s in specs]
    if not settings:
        raise SettingError("at least one attention setting is needed")
    keys = [s.key for s in settings]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SettingError(f"attention settings repeat: {dup}")
    return settings


def check_settings(settings, model_config, *, model_name: str | None = None) -> list[Setting]:
    """The parsed settings, each checked against the model (e.g. FastV's K against its layer count),
    so that a bad one fails before any evaluation work starts rather than after the earlier ones ran.

    Raises:
      SettingError naming every setting that cannot run, the model and its decoder layer count.
    """
    settings = parse_settings(settings)
    problems = []
    for s in settings:
        try:
            s.check(model_config)
        except SettingError as e:
            problems.append(f"{s.spec}: {e}")
    if problems:
        where = f"model {model_name!r}" if model_name else "the model"
        raise SettingError(f"attention settings that cannot run on {where} "
                           f"({model_config.text.num_hidden_layers} decoder layers): " + "; ".join(problems))
    return settings


def bind(model: nnx.Module, setting: Setting) -> nnx.Module:
    """The model to run `setting` with: itself for native paths, else a shallow clone (parameters
    shared, nothing copied) whose `keep_fn` is the setting's keep rule."""
    rule = setting.keep_rule()
    if rule is None and getattr(model, "keep_fn", None) is None:
        return model
    clone = nnx.merge(*nnx.split(model))
    clone.keep_fn = rule
    return clone
