"""PNG plots of a run's metrics (accuracy, token ratio, relaxed ratio, pathwise gradient share, reward, KL, loss) from its metrics.jsonl.

Matplotlib with the Agg backend (no display). A resumed run may log a step twice; the last record
of each (phase, step) wins, so the curves show what the final run did.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

DEFAULT_KEYS = ("accuracy", "token_ratio", "soft_ratio", "path_grad_share", "reward", "kl", "loss")
TITLES = {"accuracy": "accuracy", "token_ratio": "token ratio (kept / all)", "reward": "mean reward",
          "kl": "KL(pi || ref), k3", "loss": "loss",
          "soft_ratio": "relaxed token ratio (pathwise term, sparse layers)",
          "path_grad_share": "pathwise term's share of the gradient norm"}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl; a truncated last line (killed run) is ignored, others must parse."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from e
    return records


def series(records: Sequence[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """{phase: (steps, values)} for `key`, last record per (phase, step), nulls dropped."""
    last: dict[tuple[str, int], float] = {}
    for r in records:
        if key in r and r[key] is not None and "step" in r:
            last[(r.get("phase", "train"), int(r["step"]))] = float(r[key])
    out: dict[str, tuple[list[int], list[float]]] = {}
    for (phase, step) in sorted(last, key=lambda ps: (ps[0], ps[1])):
        xs, ys = out.setdefault(phase, ([], []))
        xs.append(step)
        ys.append(last[(phase, step)])
    return out


def _figure():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_metrics(jsonl_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 keys: Sequence[str] = DEFAULT_KEYS) -> list[str]:
    """Write `<key>.png` for each key with data, plus `summary.png` (accuracy and token ratio).

    Returns the paths written. Raises FileNotFoundError when the JSONL is missing.
    """
    if not os.path.isfile(jsonl_path):
        raise FileNotFoundError(f"no metrics file at {jsonl_path}")
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(os.path.dirname(os.fspath(jsonl_path)), "plots")
    os.makedirs(out_dir, exist_ok=True)
    records = read_jsonl(jsonl_path)
    plt = _figure()
    written = []
    data = {k: series(records, k) for k in keys}
    for key, per_phase in data.items():
        if not per_phase:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for phase, (xs, ys) in per_phase.items():
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=phase)
        ax.set_xlabel("step")
        ax.set_title(TITLES.get(key, key))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    summary = {k: data[k] if k in data else series(records, k) for k in ("accuracy", "token_ratio")}
    summary = {k: v for k, v in summary.items() if v}
    if summary:
        fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.5), dpi=100, squeeze=False)
        for ax, (key, per_phase) in zip(axes[0], summary.items()):
            for phase, (xs, ys) in per_phase.items():
                ax.plot(xs, ys, label=phase)
            ax.set_xlabel("step")
            ax.set_title(TITLES[key])
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "summary.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    path = _plot_eval(plt, records, out_dir)
    if path:
        written.append(path)
    return written


def _plot_eval(plt, records: Sequence[dict], out_dir: str) -> str | None:
    """`eval.png`: evaluation accuracy and token ratio per attention setting (dense, p=...) over
    the global step (before RL, during, final), from records of phase "eval"."""
    evals = [r for r in records if r.get("phase") == "eval"]
    if not evals:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100, squeeze=False)
    for ax, prefix, title in zip(axes[0], ("accuracy_", "token_ratio_"), ("eval accuracy", "eval token ratio")):
        keys = sorted({k for r in evals for k in r if k.startswith(prefix)})
        for key in keys:
            pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=key[len(prefix):])
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "eval.png")
    fig.savefig(path)
    plt.close(fig)
    return path
