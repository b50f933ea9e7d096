"""Attention settings are checked against every model before any evaluation work starts (a FastV K
beyond a model's layers used to fail only after the earlier settings had run), and the README's
evaluate command runs as written on a run of the default model (4 decoder layers)."""

import os
import re
import shlex

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from zipr1_jax.checkpoint import Checkpointer, save_params
from zipr1_jax.eval import harness, loading, methods
from zipr1_jax.models.qwen_vl import config as C
from zipr1_jax.models.qwen_vl.model import QwenVLForConditionalGeneration
from zipr1_jax.train.cli import load_config
from zipr1_jax.train.builders import build_model, split_params

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SMALL = ["model.preset=tiny_qwen2_vl", "data.image_size=[56,56]", "data.tasks=null", "data.length_buckets=[128]"]


def _cli():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "scripts", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(path, overrides, *, random_weights: bool = True) -> str:
    """A training run's layout (a checkpoint step with its config, and checkpoints/reference) holding
    weights of the config's model: what scripts/evaluate.py reads. Zero weights skip the random
    init (~10 s on CPU) where nothing is evaluated."""
    cfg = load_config(None, list(overrides) + [f"log.out_dir={path}"])
    if random_weights:
        _, params = split_params(build_model(cfg.model))
    else:
        abstract = nnx.eval_shape(lambda: QwenVLForConditionalGeneration(cfg.model.model_config(), rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), split_params(abstract)[1])
    with Checkpointer(os.path.join(path, "checkpoints"), async_save=False) as ck:
        ck.save(cfg.sft.steps + cfg.rl.steps, params=params, meta={"config": cfg.to_dict()}, force=True)
    save_params(os.path.join(path, "checkpoints", "reference"), params)
    return str(path)


def _no_evaluation(monkeypatch):
    calls = []
    monkeypatch.setattr(harness, "evaluate_setting", lambda *a, **k: calls.append(a) or pytest.fail("evaluated"))
    monkeypatch.setattr(loading, "eval_set", lambda *a, **k: calls.append(a) or pytest.fail("built a set"))
    return calls


def test_check_settings_against_the_layer_count():
    two, one = C.tiny_qwen2_vl(), C.tiny_qwen2_vl(layers=1)
    specs = ["dense", "topp:0.975", "topp:0.9", "topk:0.25", "fastv:2:0.5"]
    with pytest.raises(methods.SettingError, match=r"model 'm' \(2 decoder layers\): fastv:2:0.5: FastV layer K=2 "
                                                   r"must be in \[1, 1\]"):
        methods.check_settings(specs, two, model_name="m")
    assert [s.spec for s in methods.check_settings(specs, C.tiny_qwen2_vl_demo())] == specs  # 4 layers: fine
    assert [s.key for s in methods.check_settings(["fastv:1:0.5"], two)] == ["fastv1_0.5"]
    with pytest.raises(methods.SettingError, match=r"fastv:1:0.5: FastV needs at least 2 decoder layers.*has 1"):
        methods.check_settings(["dense", "fastv:1:0.5"], one)
    for spec in ("dense", "topp:0.9", "topk:0.25", "threshold:0.01", "fastv:3:0.25:all"):
        assert methods.parse_setting(methods.parse_setting(spec).spec) == methods.parse_setting(spec)


def test_evaluate_fails_before_evaluating_anything(monkeypatch):
    calls = _no_evaluation(monkeypatch)
    # Shapes only (nothing allocated): the check must not need more than the model's config.
    model = nnx.eval_shape(lambda: QwenVLForConditionalGeneration(C.tiny_qwen2_vl(), rngs=nnx.Rngs(0)))
    with pytest.raises(methods.SettingError, match=r"'tiny' \(2 decoder layers\): fastv:2:0.5"):
        harness.evaluate(model, {"set": []}, None, ["dense", "topp:0.9", "fastv:2:0.5"],
                         config=harness.HarnessConfig(eos_ids=(256,), pad_id=257), model_name="tiny")
    assert calls == []


def test_cli_checks_every_model_before_any_work(tmp_path, monkeypatch):
    run = _run_dir(tmp_path / "run", SMALL, random_weights=False)
    calls = _no_evaluation(monkeypatch)
    with pytest.raises(SystemExit, match=r"model 'before' \(2 decoder layers\): fastv:2:0.5: FastV layer K=2"):
        _cli().main([f"before={run}/checkpoints/reference", f"after={run}", "--settings", "dense", "topp:0.9",
                     "fastv:2:0.5", "--out-dir", str(tmp_path / "eval")])
    with pytest.raises(SystemExit, match=r"--heatmap-layer 5 is outside model 'after'"):
        _cli().main([f"after={run}", "--heatmap-layer", "5", "--out-dir", str(tmp_path / "eval")])
    assert calls == []


def readme_evaluate_command() -> list[str]:
    """The evaluate command of README.md's "Evaluate, convert, ship" block, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^python scripts/evaluate\.py before=.*?(?<!\\)$", text, flags=re.M | re.S)
    assert m, "README.md no longer holds a `python scripts/evaluate.py before=...` command"
    return shlex.split(m.group(0).replace("\\\n", " "))


@pytest.mark.slow
def test_readme_evaluate_command_runs_on_a_default_run(tmp_path):
    argv = readme_evaluate_command()
    assert argv[:2] == ["python", "scripts/evaluate.py"] and "runs/default" in " ".join(argv)
    # The default run's model (tiny_qwen2_vl_demo, 4 decoder layers) and data; only the run is short.
    run = _run_dir(tmp_path / "default", ["sft.steps=1", "rl.steps=1", "rl.max_new_tokens=4"])
    args = [a.replace("runs/default", run) for a in argv[2:]]
    out = _cli().main(args + ["--limit", "4", "--batch-size", "4", "--out-dir", str(tmp_path / "eval"),
                              "--capacity-buckets", "1.0", "--no-prefill-timing", "--progress", "none"])
    settings = argv[argv.index("--settings") + 1:]
    assert [(r.model, r.key) for r in out["results"]] == [
        (m, methods.parse_setting(s).key) for m in ("before", "after") for s in settings]
    assert all(r.num_examples == 4 for r in out["results"])
    assert all(os.path.getsize(p) > 0 for p in out["paths"]["pictures"])
