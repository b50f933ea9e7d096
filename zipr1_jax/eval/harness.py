"""Evaluation harness: a model x evaluation sets x attention settings -> the paper's table.

    results = evaluate(model, {"builtin": loader}, tokenizer, parse_settings(["dense", "topp:0.975"]),
                       config=HarnessConfig(max_new_tokens=32, eos_ids=(im_end,), pad_id=pad),
                       sparsity=SparsityConfig(...))
    write_tables(results, "eval_out")          # eval_out/results.{md,csv,json}

For every (set, setting) it greedy-decodes each batch with the rollout sampler (`generate`: one
jitted prefill + decode loop, sparse settings on the pruned KV cache), verifies the answers and
reports: accuracy; mean token ratio and per-layer ratios (kept / valid prompt keys per layer,
dense layers 1, docs/method.md 1.6); prefill and decode time; KV-cache bytes of the prompt after
pruning (and dense, for the ratio).

Timing: the first batch of each (set, setting) runs once untimed first (`warmup`: the compile);
then generate is timed per batch with `block_until_ready`. Prefill time comes from running the
rollout's own prefill program again on the same batch (`measure_prefill`; no extra compile); decode
time = generate time - prefill time. The loop itself (batch keys fold_in(key(seed), i), decoding,
verification) is the trainer's (`train.greedy_eval.decode_batches`), so dense / top-p results equal
the trainer's eval.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zipr1_jax.eval.methods import Setting, TopPRule, bind, check_settings
from zipr1_jax.kernels.sparse_attention import SparsityConfig
from zipr1_jax.rl.rollout import SamplingConfig, prefill_program, rollout_keys
from zipr1_jax.train.greedy_eval import batch_key, decode_batches, model_inputs, run_generate
from zipr1_jax.train.metrics import PROGRESS



@dataclasses.dataclass(frozen=True, kw_only=True)
class HarnessConfig:
    """Decoding and measurement settings of one evaluation run."""

    max_new_tokens: int = 32
    eos_ids: tuple[int, ...]
    pad_id: int
    seed: int = 0
    measure_prefill: bool = True
    warmup: bool = True
    progress: str = "tqdm"

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"HarnessConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        if not self.eos_ids:
            raise ValueError("HarnessConfig.eos_ids must hold at least one stop token id")
        if self.progress not in PROGRESS:
            raise ValueError(f"HarnessConfig.progress must be one of {PROGRESS}, got {self.progress!r}")
        for name in ("measure_prefill", "warmup"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HarnessConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                              temperature=0.0)


@dataclasses.dataclass
class SettingResult:
    """One row of the table. Times in seconds (totals over the set, warm-up excluded); kv_bytes:
    mean per example over all layers of the prompt KV cache after pruning (kv_bytes_dense: before)."""

    model: str
    set: str
    setting: str
    key: str
    kind: str
    budget: float | None
    accuracy: float
    token_ratio: float
    layer_ratio: list[float]
    num_examples: int
    total_s: float
    prefill_s: float | None
    decode_s: float | None
    compile_s: float | None
    new_tokens: int
    kv_bytes: float
    kv_bytes_dense: float
    responses: list[str] = dataclasses.field(default_factory=list, repr=False)
    correct: list[bool] = dataclasses.field(default_factory=list, repr=False)
    token_ratio_se: float | None = None  # standard error of token_ratio over the examples

    @property
    def accuracy_se(self) -> float:
        """Binomial standard error of the accuracy."""
        n = max(self.num_examples, 1)
        return float(np.sqrt(max(self.accuracy * (1.0 - self.accuracy), 0.0) / n))

    @property
    def examples_per_s(self) -> float:
        return self.num_examples / self.total_s if self.total_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.decode_s is None or self.decode_s <= 0:
            return None
        return self.new_tokens / self.decode_s

    def to_dict(self, *, responses: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not responses:
            d.pop("responses")
            d.pop("correct")
        d["examples_per_s"] = self.examples_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SettingResult:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in names - {"responses", "correct", "token_ratio_se"} if n not in d)
        if missing:
            raise ValueError(f"result record lacks fields {missing} (not written by write_tables?)")
        return cls(**{k: v for k, v in d.items() if k in names})


def _run_prefill(model, x: dict, key, p_B, config: HarnessConfig, sparsity):
    """The rollout's own prefill program on the same inputs (timing only; the cache is an output,
    so its compaction is part of the measured work)."""
    out = prefill_program(model, x["ids"], x["mask"], x["pos"], x["deltas"], p_B, key,
                          pixel_values=x["pixel_values"], pixel_values_videos=x["pixel_values_videos"],
                          image_grid=x["image_grid"], video_grid=x["video_grid"],
                          max_new_tokens=config.max_new_tokens, sparsity=sparsity)
    return jax.block_until_ready(out)


def kv_entry_bytes(model) -> int:
    """Bytes of one cached token of one layer: its key and value over all kv heads."""
    t = model.config.text
    return 2 * t.num_key_value_heads * t.head_dim * jnp.dtype(model.config.dtype).itemsize


class _Progress:
    def __init__(self, mode: str, total: int | None, desc: str):
        self.mode, self.desc, self.n, self.bar = mode, desc, 0, None
        if mode == "tqdm":
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False)

    def update(self, **postfix):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def close(self, line: str):
        if self.bar is not None:
            self.bar.close()
        if self.mode != "none":
            print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- evaluation
class _Timer:
    """The `run` hook of `decode_batches`: generate timed per batch (the first batch's compile run
    apart when warming up), plus a separately jitted prefill of the same batch."""

    def __init__(self, config: HarnessConfig, sparsity):
        self.config, self.sparsity = config, sparsity
        self.total_s, self.prefill_s, self.compile_s = 0.0, 0.0, None

    def __call__(self, model, x: dict, key, p_B):
        c = self.config
        if self.compile_s is None and c.warmup:
            t0 = time.perf_counter()
            run_generate(model, x, key, p_B, c.sampling, self.sparsity)
            if c.measure_prefill:
                _run_prefill(model, x, key, p_B, c, self.sparsity)
            self.compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_generate(model, x, key, p_B, c.sampling, self.sparsity)
        self.total_s += time.perf_counter() - t0
        if c.measure_prefill:
            t0 = time.perf_counter()
            _run_prefill(model, x, key, p_B, c, self.sparsity)
            self.prefill_s += time.perf_counter() - t0
        return out


def evaluate_setting(model: nnx.Module, batches: Iterable[dict], tokenizer, setting: Setting, *,
                     config: HarnessConfig, sparsity=None, set_name: str = "set", model_name: str = "model"
                     ) -> SettingResult:
    """Greedy-evaluate one setting over every valid row of `batches` (an eval loader) with the
    shared loop (`decode_batches`), timing each batch's generate and prefill."""
    entry = kv_entry_bytes(model)
    correct, responses, ratios, layer_ratios, kv, kv_dense, new_tokens = [], [], [], [], [], [], 0
    total = len(batches) if hasattr(batches, "__len__") else None
    bar = _Progress(config.progress, total, f"{model_name} | {set_name} | {setting.label}")
    timer = _Timer(config, sparsity)
    for d in decode_batches(bind(model, setting), batches, tokenizer, sampling=config.sampling,
                            budget_B=setting.budget_B, seed=config.seed, sparsity=sparsity, run=timer):
        layer_BY = np.asarray(d.out.layer_ratio_BY, np.float64)
        n_valid_B = np.asarray(d.inputs["mask"] > 0).sum(axis=1)
        responses += d.texts
        correct += d.correct
        new_tokens += int(np.asarray(d.out.mask_BT)[d.rows].sum())
        kv += [float(np.rint(layer_BY[r] * n_valid_B[r]).sum()) * entry for r in d.rows]
        kv_dense += [float(n_valid_B[r] * layer_BY.shape[1]) * entry for r in d.rows]
        ratios.append(np.asarray(d.out.token_ratio_B, np.float64)[d.rows])
        layer_ratios.append(layer_BY[d.rows])
        bar.update(accuracy=float(np.mean(correct)) if correct else 0.0,
                   ratio=float(np.concatenate(ratios).mean()) if correct else 1.0)
    if not correct:
        raise ValueError(f"evaluate_setting: set {set_name!r} held no valid example")
    measured, all_ratios = config.measure_prefill, np.concatenate(ratios)
    result = SettingResult(
        model=model_name, set=set_name, setting=setting.label, key=setting.key, kind=setting.kind,
        budget=setting.budget, accuracy=float(np.mean(correct)), token_ratio=float(all_ratios.mean()),
        layer_ratio=np.concatenate(layer_ratios).mean(axis=0).tolist(), num_examples=len(correct),
        total_s=timer.total_s, prefill_s=timer.prefill_s if measured else None,
        decode_s=max(timer.total_s - timer.prefill_s, 0.0) if measured else None, compile_s=timer.compile_s,
        new_tokens=new_tokens, kv_bytes=float(np.mean(kv)), kv_bytes_dense=float(np.mean(kv_dense)),
        responses=responses, correct=correct,
        token_ratio_se=float(all_ratios.std(ddof=1) / np.sqrt(len(all_ratios))) if len(all_ratios) > 1 else 0.0)
    bar.close(f"{model_name} | {set_name} | {setting.label}: accuracy {result.accuracy:.3f}, token ratio "
              f"{result.token_ratio:.3f}, {result.examples_per_s:.2f} ex/s")
    return result


def evaluate(model: nnx.Module, sets: Mapping[str, Iterable[dict]], tokenizer, settings: Sequence[Setting | str], *,
             config: HarnessConfig, sparsity=None, model_name: str = "model") -> list[SettingResult]:
    """Every set x every setting (settings as objects or spec strings, see methods.SETTINGS_HELP)."""
    if not sets:
        raise ValueError("evaluate: no evaluation sets given")
    settings = check_settings(settings, model.config, model_name=model_name)  # all of them before any runs
    return [evaluate_setting(model, batches, tokenizer, s, config=config, sparsity=sparsity, set_name=name,
                             model_name=model_name)
            for name, batches in sets.items() for s in settings]


# ---------------------------------------------------------------------- kept masks (pictures)
@dataclasses.dataclass(frozen=True)
class _DenseRule:
    def __call__(self, **kw):
        return lambda y, q, k, rng: None


def _record_rule(setting: Setting):
    rule = setting.keep_rule()
    if rule is not None:
        return rule
    return TopPRule() if setting.kind == "topp" else _DenseRule()


def _kept_impl(graphdef, state, ids, mask, pos, p_B, rng, pixel_values, pixel_values_videos, *, image_grid,
               video_grid, rule, sparsity):
    model = nnx.merge(graphdef, state)
    recorded = {}

    def recording(**kw):
        inner = rule(**kw)

        def layer_fn(y, q, k, layer_key):
            out = inner(y, q, k, layer_key)
            recorded[y] = kw["valid_BL"] if out is None else out[0]
            return out
        return layer_fn

    rng_select, _ = rollout_keys(rng)
    out = model.sparse_forward(ids, sparsity=sparsity, p_B=p_B, rng=rng_select, attention_mask_BL=mask,
                               position_ids_3BL=pos, keep_fn=recording, pixel_values=pixel_values,
                               image_grid_thw=None if image_grid is None else np.asarray(image_grid),
                               pixel_values_videos=pixel_values_videos,
                               video_grid_thw=None if video_grid is None else np.asarray(video_grid))
    return jnp.stack([recorded[y] for y in range(len(recorded))]), out.layer_ratio_BY


_kept_jit = jax.jit(_kept_impl, static_argnames=("graphdef", "image_grid", "video_grid", "rule", "sparsity"))


def kept_masks(model: nnx.Module, batch: dict, setting: Setting | str, *, sparsity=None, seed: int = 0,
               batch_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keep masks of every decoder layer for one batch, with the selection keys the evaluation
    used for batch `batch_index` (same seed): (keep_YBL bool, layer_ratio_BY)."""
    setting = check_settings([setting], model.config)[0]
    sparsity = sparsity or getattr(model, "sparsity", None) or SparsityConfig()  # the model's own fallback
    x = model_inputs(model, batch)
    R = x["ids"].shape[0]
    p_B = setting.budget_B(R)
    p_B = np.ones((R,), np.float32) if p_B is None else p_B
    graphdef, state = nnx.split(model)
    opt = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    key = batch_key(seed, batch_index)
    keep, ratio = _kept_jit(graphdef, state, jnp.asarray(x["ids"], jnp.int32), jnp.asarray(x["mask"], jnp.int32),
                            jnp.asarray(x["pos"]), jnp.asarray(p_B), key, opt(x["pixel_values"]),
                            opt(x["pixel_values_videos"]), image_grid=x["image_grid"], video_grid=x["video_grid"],
                            rule=_record_rule(setting), sparsity=sparsity)
    return np.asarray(keep), np.asarray(ratio)


def image_keep_grid(keep_L: np.ndarray, ids_L: np.ndarray, grids_thw, *, image_token_id: int, merge_size: int = 2,
                    image: int = 0) -> np.ndarray:
    """The keep mask of one row's image `image` on its merged-patch grid: bool [t, h/m, w/m].

    The i-th image pad token of a row is the i-th merged patch in row-major (t, h, w) order.
    """
    grids = np.asarray(grids_thw, np.int64).reshape(-1, 3)
    if not 0 <= image < len(grids):
        raise ValueError(f"image_keep_grid: row has {len(grids)} images, asked for image {image}")
    sizes = [int(t * (h // merge_size) * (w // merge_size)) for t, h, w in grids]
    pos = np.flatnonzero(np.asarray(ids_L) == image_token_id)
    if len(pos) != sum(sizes):
        raise ValueError(f"image_keep_grid: {len(pos)} image tokens in the row but the grids {grids.tolist()} "
                         f"need {sum(sizes)}")
    start = sum(sizes[:image])
    t, h, w = grids[image]
    return np.asarray(keep_L)[pos[start:start + sizes[image]]].reshape(t, h // merge_size, w // merge_size)


# ---------------------------------------------------------------------- tables
COLUMNS = ("model", "set", "setting", "accuracy", "token_ratio", "kv_ratio", "kv_MiB", "prefill_ms_per_ex",
           "decode_tok_per_s", "ex_per_s", "num_examples", "layer_ratio")


def table_rows(results: Sequence[SettingResult]) -> list[dict[str, Any]]:
    """Flat rows: one per result, columns COLUMNS plus layer_<y> (CSV) in place of the list."""
    rows = []
    for r in results:
        kv_ratio = r.kv_bytes / r.kv_bytes_dense if r.kv_bytes_dense else float("nan")
        rows.append({
            "model": r.model, "set": r.set, "setting": r.setting, "accuracy": r.accuracy, "token_ratio": r.token_ratio,
            "kv_ratio": kv_ratio, "kv_MiB": r.kv_bytes / 2**20,
            "prefill_ms_per_ex": None if r.prefill_s is None else 1e3 * r.prefill_s / r.num_examples,
            "decode_tok_per_s": r.decode_tokens_per_s, "ex_per_s": r.examples_per_s, "num_examples": r.num_examples,
            "layer_ratio": list(r.layer_ratio)})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    if isinstance(v, list):
        return " ".join(f"{x:.2f}" for x in v)
    return str(v)


def markdown_table(results: Sequence[SettingResult]) -> str:
    rows = table_rows(results)
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |\n" for row in rows)


def csv_table(results: Sequence[SettingResult]) -> str:
    rows = table_rows(results)
    n_layers = max((len(r["layer_ratio"]) for r in rows), default=0)
    cols = [c for c in COLUMNS if c != "layer_ratio"] + [f"layer_{y}" for y in range(n_layers)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {c: row[c] for c in cols if c in row}
        flat.update({f"layer_{y}": v for y, v in enumerate(row["layer_ratio"])})
        writer.writerow(flat)
    return buf.getvalue()


def write_tables(results: Sequence[SettingResult], out_dir: str | os.PathLike, *, stem: str = "results",
                 responses: bool = False, meta: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write <stem>.md, <stem>.csv and <stem>.json (full records; `responses` adds the decoded
    answers) into `out_dir`. Returns {"md": path, "csv": path, "json": path}."""
    if not results:
        raise ValueError("write_tables: no results to write")
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(os.fspath(out_dir), f"{stem}.{ext}") for ext in ("md", "csv", "json")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(results))
    with open(paths["csv"], "w", encoding="utf-8") as f:
        f.write(csv_table(results))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": dict(meta or {}), "results": [r.to_dict(responses=responses) for r in results]}, f,
                  indent=2)
    return paths


def read_results(path: str | os.PathLike) -> list[SettingResult]:
    """Results back from a <stem>.json written by `write_tables` (e.g. to plot two runs together)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results file at {path}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError(f"{path} is not a results file of write_tables (no 'results' list)")
    return [SettingResult.from_dict(d) for d in data["results"]]
