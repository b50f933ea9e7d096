"""Training metrics: JSONL per step, TensorBoard scalars, and a progress bar / line.

Only process 0 writes (multi-host runs would otherwise write N copies and race on files); the other
processes get a logger whose methods do nothing. Values may be Python numbers, NumPy or JAX
scalars; non-finite values are written as JSON null (JSON has no NaN) and listed under
"nonfinite" so a NaN never disappears silently.

    logger = MetricsLogger("runs/x", total_steps=40, phase="rl")
    logger.log(step, {"reward": r, "accuracy": a, "token_ratio": t, "kl": kl, "loss": loss})
    logger.close()
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

PROGRESS = ("tqdm", "line", "none")  # progress display: a bar, a line per step, nothing

JSONL_NAME = "metrics.jsonl"
TB_DIR_NAME = "tensorboard"
# Shown on the progress bar when present (short label, metric key, format).
PROGRESS_FIELDS = (("reward", "reward", ".3f"), ("acc", "accuracy", ".3f"), ("ratio", "token_ratio", ".3f"),
                   ("soft", "soft_ratio", ".3f"), ("kl", "kl", ".4f"), ("loss", "loss", ".4f"))


def _process_index() -> int:
    try:
        import jax  # noqa: PLC0415

        return jax.process_index()
    except Exception:  # jax not initialised / not importable: a single process
        return 0


def to_float(value: Any) -> float:
    """A Python float from a number, NumPy or JAX scalar (raises on non-scalars)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric values must be scalars, got shape {arr.shape}")
    return float(arr.reshape(()))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


SUPERSEDED_NAME = "metrics.superseded.jsonl"


def set_aside_rows_after(out_dir: str | os.PathLike, step: int) -> int:
    """Move the rows of `<out_dir>/metrics.jsonl` with a step after `step` (work a resume redoes)
    to `metrics.superseded.jsonl`, so the main file holds each step once. Call before a logger
    opens the file. Returns the number of rows moved; a truncated last line (kill) is dropped."""
    path = os.path.join(os.fspath(out_dir), JSONL_NAME)
    if not os.path.isfile(path):
        return 0
    keep, moved = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written line of a killed run
            (moved if int(row.get("step", 0)) > step else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(os.path.join(os.fspath(out_dir), SUPERSEDED_NAME), "a", encoding="utf-8") as f:
            f.writelines(moved)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(moved)


class MetricsLogger:
    """Writes `<out_dir>/metrics.jsonl`, `<out_dir>/tensorboard/`, and shows progress.

    Args:
      out_dir: run directory (created on process 0).
      total_steps: steps of the current phase (for the ETA); `start_phase` changes it.
      phase: label stored with each record ("sft", "rl", "eval") and used as TensorBoard prefix.
      tensorboard: write TensorBoard event files (tensorboardX).
      progress: "tqdm" (a bar), "line" (one printed line per log call) or "none".
      is_main: override the process-0 check (tests).
      stream: where progress goes (default stderr).
    """

    def __init__(self, out_dir: str | os.PathLike, *, total_steps: int = 0, phase: str = "train",
                 tensorboard: bool = True, progress: str = "tqdm", is_main: bool | None = None,
                 stream: TextIO | None = None):
        if progress not in PROGRESS:
            raise ValueError(f"progress must be one of {list(PROGRESS)}, got {progress!r}")
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.out_dir = os.fspath(out_dir)
        self.is_main = (_process_index() == 0) if is_main is None else bool(is_main)
        self.progress = progress
        self.stream = stream if stream is not None else sys.stderr
        self.jsonl_path = os.path.join(self.out_dir, JSONL_NAME)
        self.tb_dir = os.path.join(self.out_dir, TB_DIR_NAME)
        self._file = None
        self._tb = None
        self._bar = None
        self._closed = False
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            # Append: a resumed run continues the same file (plots keep the last record per step).
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(self.tb_dir)
        self.start_phase(phase, total_steps)

    # ------------------------------------------------------------------ phases and timing
    def start_phase(self, phase: str, total_steps: int, *, first_step: int = 0) -> None:
        """Begin a new phase (e.g. "sft" then "rl"): resets the rate / ETA clock and the bar."""
        if not phase or not isinstance(phase, str):
            raise ValueError(f"phase must be a non-empty string, got {phase!r}")
        self.phase = phase
        self.total_steps = int(total_steps)
        self._t0 = time.perf_counter()
        self._first_step = first_step
        self._last_step = first_step
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.is_main and self.progress == "tqdm":
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=self.total_steps or None, initial=first_step, desc=phase, file=self.stream,
                             dynamic_ncols=True, leave=True)

    def _rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self._t0
        done = step - self._first_step
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: Mapping[str, Any], *, phase: str | None = None,
            show: bool = True) -> dict[str, Any]:
        """Record `metrics` for `step` (the number of completed steps). Returns the JSON record.

        show=False records without touching the progress bar / line (e.g. evaluation results
        logged in the middle of a phase, which `write` reports as text instead)."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        phase = phase or self.phase
        values, nonfinite = {}, []
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"metric names must be non-empty strings, got {key!r}")
            v = to_float(value)
            if math.isfinite(v):
                values[key] = v
            else:
                values[key] = None
                nonfinite.append(key)
        rate = self._rate(step)
        record: dict[str, Any] = {"phase": phase, "step": int(step), "time": time.time(), **values}
        if math.isfinite(rate):
            record["steps_per_sec"] = rate
        if nonfinite:
            record["nonfinite"] = nonfinite
        if not self.is_main:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, v in values.items():
                if v is not None:
                    self._tb.add_scalar(f"{phase}/{key}", v, global_step=int(step))
            if math.isfinite(rate):
                self._tb.add_scalar(f"{phase}/steps_per_sec", rate, global_step=int(step))
        if show:
            self._show(step, values, rate)
            self._last_step = step
        return record

    def progress_text(self, step: int, values: Mapping[str, float | None], rate: float) -> str:
        parts = [f"{self.phase} {step}/{self.total_steps}" if self.total_steps else f"{self.phase} {step}"]
        for label, key, fmt in PROGRESS_FIELDS:
            if key in values:
                v = values[key]
                parts.append(f"{label} {format(v, fmt) if v is not None else 'nan'}")
        parts.append(f"{rate:.2f} steps/s" if math.isfinite(rate) else "- steps/s")
        remaining = (self.total_steps - step) / rate if self.total_steps and math.isfinite(rate) and rate > 0 else float("nan")
        parts.append(f"ETA {format_eta(remaining)}")
        return " | ".join(parts)

    def _show(self, step: int, values, rate: float) -> None:
        if self.progress == "none":
            return
        if self._bar is not None:
            self._bar.update(max(step - self._last_step, 0))
            short = {label: (format(values[key], fmt) if values[key] is not None else "nan")
                     for label, key, fmt in PROGRESS_FIELDS if key in values}
            self._bar.set_postfix(short, refresh=True)
        else:
            print(self.progress_text(step, values, rate), file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """Print a message without breaking the progress bar (process 0 only)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
