"""MetricsLogger files (JSONL, TensorBoard, progress) and the PNG plots."""

import io
import json
import os

import numpy as np
import pytest

from zipr1_jax.train.metrics import MetricsLogger, format_eta
from zipr1_jax.train.plots import plot_metrics, read_jsonl, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, **kw):
    stream = io.StringIO()
    with MetricsLogger(tmp_path, total_steps=4, phase="sft", progress="line", stream=stream, **kw) as log:
        for s in range(1, 3):
            log.log(s, {"loss": 2.0 / s, "accuracy": 0.1 * s})
        log.start_phase("rl", 4)
        for s in range(1, 5):
            log.log(s, {"reward": np.float32(0.5 + 0.1 * s), "accuracy": 0.25 * s, "token_ratio": 1.0 - 0.1 * s,
                        "kl": 0.01 * s, "loss": float("nan") if s == 3 else 0.1})
    return stream.getvalue()


def test_jsonl_tensorboard_and_progress(tmp_path):
    text = _run(tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["phase"] for r in records] == ["sft"] * 2 + ["rl"] * 4
    assert records[3]["step"] == 2 and records[3]["token_ratio"] == pytest.approx(0.8)
    assert records[4]["loss"] is None and records[4]["nonfinite"] == ["loss"]
    # Every line is standard JSON (no NaN literals).
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert all(os.path.getsize(tmp_path / "tensorboard" / e) > 0 for e in events)
    assert "rl 4/4 | reward 0.900 | acc 1.000 | ratio 0.600 | kl 0.0400 | loss 0.1000" in text
    assert "steps/s | ETA" in text and "loss nan" in text


def test_tqdm_bar_and_non_main(tmp_path):
    stream = io.StringIO()
    with MetricsLogger(tmp_path / "a", total_steps=3, phase="rl", progress="tqdm", stream=stream) as log:
        for s in range(1, 4):
            log.log(s, {"reward": 1.0, "token_ratio": 0.5})
    assert "3/3" in stream.getvalue() and "ratio=0.500" in stream.getvalue()
    # Non-zero processes write nothing.
    with MetricsLogger(tmp_path / "b", total_steps=3, is_main=False, progress="line", stream=stream) as log:
        rec = log.log(1, {"reward": 1.0})
    assert rec["reward"] == 1.0 and not os.path.exists(tmp_path / "b")


def test_bad_metric_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, progress="none") as log:
        with pytest.raises(ValueError, match="scalars"):
            log.log(1, {"x": np.zeros(3)})
    with pytest.raises(RuntimeError, match="after close"):
        log.log(2, {"x": 1.0})
    with pytest.raises(ValueError, match="progress"):
        MetricsLogger(tmp_path, progress="bar")


def test_format_eta():
    assert format_eta(3725) == "1:02:05" and format_eta(float("nan")) == "?"


def test_plots_are_valid_pngs(tmp_path):
    _run(tmp_path)
    paths = plot_metrics(tmp_path / "metrics.jsonl")
    names = {os.path.basename(p) for p in paths}
    assert names == {"accuracy.png", "token_ratio.png", "reward.png", "kl.png", "loss.png", "summary.png"}
    import matplotlib.image as mpimg

    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        # Something was drawn: the image is not one flat colour.
        assert float(np.std(img[..., :3])) > 0.01


def test_series_last_record_wins_and_truncated_tail(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [{"phase": "rl", "step": 1, "accuracy": 0.1}, {"phase": "rl", "step": 2, "accuracy": 0.2},
             {"phase": "rl", "step": 2, "accuracy": 0.3}, {"phase": "rl", "step": 3, "accuracy": None}]
    p.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"phase": "rl", "st')
    recs = read_jsonl(p)
    assert len(recs) == 4
    assert series(recs, "accuracy") == {"rl": ([1, 2], [0.1, 0.3])}
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)
    with pytest.raises(FileNotFoundError):
        plot_metrics(tmp_path / "nope.jsonl")
