"""Evaluation harness on a tiny Qwen2-VL (fp32, CPU, built-in visual tasks through the real eval
loader): dense greedy answers and accuracy equal transformers' `generate` on the same weights and
prompts; top-p at p = 1, top-k at ratio 1 and FastV with R = 0 reproduce dense exactly; token
ratios equal `select_topp`'s counts on each layer's q/k; FastV prunes only visual tokens after
layer K; the baseline keep rules; tables; checkpoint loading; bad inputs."""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from hf_utils import tiny_hf_model  # noqa: E402

from zipr1_jax.checkpoint import CheckpointError, Checkpointer, save_params  # noqa: E402
from zipr1_jax.data.pipelines import PipelineConfig, eval_loader  # noqa: E402
from zipr1_jax.data.sources import BuiltinSource, RecordListSource  # noqa: E402
from zipr1_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer  # noqa: E402
from zipr1_jax.data.verifiers import extract_answer, verify  # noqa: E402
from zipr1_jax.eval import harness, loading, methods  # noqa: E402
from zipr1_jax.kernels.sparse_attention import masked_dense_attention, select_topp  # noqa: E402
from zipr1_jax.kernels.sparse_attention import variants  # noqa: E402
from zipr1_jax.models.qwen_vl import config as C  # noqa: E402
from zipr1_jax.models.qwen_vl.loader import from_hf_state_dict  # noqa: E402
from zipr1_jax.data.model_inputs import vision_arrays  # noqa: E402
from zipr1_jax.train.cli import load_config  # noqa: E402
from zipr1_jax.train.builders import sparsity_config, split_params  # noqa: E402

EOS = (256, 255)  # <|im_end|>, <|endoftext|> of the tiny tokenizer
PAD = 257
T_NEW = 6
# Exact probes (every query; rng-free) so selection counts can be recomputed independently.
# The 2-layer tiny model on 56-px images of every task (the env fixture's), not the default demo's.
SMALL = ["model.preset=tiny_qwen2_vl", "data.image_size=[56,56]", "data.tasks=null"]
TRAIN = load_config(None, SMALL + ["sparsity.probes=all", "sparsity.min_probes=2", "sparsity.probe_recent_frac=0.1",
                                   "sparsity.backend=xla", "rl.max_new_tokens=6", "data.length_buckets=[128]"])
# One capacity bucket (no lax.switch over kernel sizes) keeps compile times low.
SPARSITY = dataclasses.replace(sparsity_config(TRAIN.sparsity), capacity_buckets=(1.0,))
CONFIG = harness.HarnessConfig(max_new_tokens=T_NEW, eos_ids=EOS, pad_id=PAD, measure_prefill=False, warmup=False,
                               progress="none")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tok_dir = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok = load_tokenizer(tok_dir)
    cfg = C.tiny_qwen2_vl()
    hf = tiny_hf_model(cfg, seed=0)
    # Shared graphdef and committed arrays, like a model load_model restores: the CLI test's
    # checkpoints then hit the programs compiled here instead of compiling them again.
    graphdef, state = nnx.split(loading.shared_graph(from_hf_state_dict(cfg, hf.state_dict())))
    model = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    records = [BuiltinSource(6, seed=3, image_size=(56, 56))[i] for i in range(6)]
    pipe = PipelineConfig(batch_size=4, length_buckets=(128,), image_size=(56, 56), shuffle=False)
    loader = eval_loader(RecordListSource(records), tok, pipe, model_config=cfg)
    return dict(tok=tok, tok_dir=tok_dir, cfg=cfg, hf=hf, model=model, records=records, pipe=pipe, loader=loader)


def _hf_greedy(env, loader) -> list[str]:
    """transformers greedy `generate` on exactly the loader's prompts; decoded responses of valid rows."""
    out = []
    for batch in loader:
        arrays, grids = vision_arrays(batch)
        ids = torch.tensor(np.asarray(batch["input_ids"], np.int64))
        kw = dict(input_ids=ids, attention_mask=torch.tensor(np.asarray(batch["attention_mask"], np.int64)),
                  pixel_values=torch.tensor(arrays["pixel_values"]),
                  image_grid_thw=torch.tensor(np.asarray(grids["image_grid"], np.int64)),
                  mm_token_type_ids=(ids == env["cfg"].image_token_id).long())
        with torch.no_grad():
            seq = env["hf"].generate(**kw, do_sample=False, max_new_tokens=T_NEW, eos_token_id=list(EOS),
                                     pad_token_id=PAD)[:, ids.shape[1]:].numpy()
        for r in np.flatnonzero(batch["valid"]):
            toks = seq[r].tolist()
            stop = next((i for i, t in enumerate(toks) if t in EOS), len(toks) - 1)
            out.append(env["tok"].decode(toks[:stop + 1], skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def dense(env):
    """Dense harness results with timing on, on a set whose answers are rigged from transformers'
    responses (even rows right, odd rows wrong) so accuracy is neither 0 nor 1 by construction."""
    hf_resp = _hf_greedy(env, env["loader"])
    rigged = [dict(r, answer=(extract_answer(t) or "x") if i % 2 == 0 else "no such answer", answer_type="exact",
                   choices=()) for i, (r, t) in enumerate(zip(env["records"], hf_resp))]
    loader = eval_loader(RecordListSource(rigged), env["tok"], env["pipe"], model_config=env["cfg"])
    timed = harness.HarnessConfig(max_new_tokens=T_NEW, eos_ids=EOS, pad_id=PAD, progress="none")
    res = harness.evaluate_setting(env["model"], loader, env["tok"], methods.Dense(), config=timed,
                                   sparsity=SPARSITY, set_name="rigged")
    hf_correct = [verify(t, r["answer"], "exact") for t, r in zip(hf_resp, rigged)]
    return dict(res=res, hf_resp=hf_resp, hf_correct=hf_correct, loader=loader)


def test_dense_equals_transformers_greedy(dense):
    res = dense["res"]
    assert res.responses == dense["hf_resp"]
    assert len(set(res.responses)) > 1 and any(len(t) > 2 for t in res.responses)  # real text, not empty
    assert res.correct == dense["hf_correct"]
    assert res.accuracy == pytest.approx(np.mean(dense["hf_correct"])) and 0 < res.accuracy < 1
    assert res.num_examples == 6 and res.token_ratio == 1.0 and res.layer_ratio == [1.0, 1.0]
    assert res.kv_bytes == res.kv_bytes_dense > 0
    assert res.total_s > 0 and res.prefill_s > 0 and res.decode_s >= 0 and res.compile_s > 0
    assert 0 < res.new_tokens <= 6 * T_NEW


@pytest.fixture(scope="module")
def sweep(env):
    specs = ["dense", "topp:1.0", "topk:1.0", "fastv:1:0", "topp:0.6", "topk:0.5", "fastv:1:0.5"]
    res = harness.evaluate(env["model"], {"tasks": env["loader"]}, env["tok"], specs, config=CONFIG,
                           sparsity=SPARSITY, model_name="tiny")
    return {r.key: r for r in res}


def test_full_budget_settings_equal_dense(sweep):
    dense = sweep["dense"]
    for key in ("topp1", "topk1", "fastv1_0"):
        r = sweep[key]
        assert r.responses == dense.responses, key
        assert r.accuracy == dense.accuracy and r.token_ratio == 1.0 and r.layer_ratio == [1.0, 1.0], key
        assert r.kv_bytes == dense.kv_bytes_dense


def _oracle_impl(graphdef, state, ids, mask, pos, pixels, p, *, grid):
    """Independent sparse forward: every layer's attention replaced by `select_topp` on its q/k and a
    brute-force masked dense attention over the kept keys. Returns kept / valid per (row, layer)."""
    model = nnx.merge(graphdef, state)
    valid = mask > 0
    ratios = []

    def attend(q, k, v, _):
        sel = select_topp(q, k, valid, jnp.full((q.shape[0],), p), config=SPARSITY.selection)
        ratios.append(sel.kept_count_B / valid.sum(1))
        return masked_dense_attention(q, k, v, sel.keep_BS, valid)

    model(ids, attention_mask_BL=mask, position_ids_3BL=pos, pixel_values=pixels, image_grid_thw=np.asarray(grid),
          attend=attend)
    return jnp.stack(ratios, axis=1)


_oracle_jit = jax.jit(_oracle_impl, static_argnames=("graphdef", "grid"))


def _oracle_counts(model, batch, p):
    arrays, grids = vision_arrays(batch)
    graphdef, state = nnx.split(model)
    args = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "position_ids")]
    out = _oracle_jit(graphdef, state, *args, jnp.asarray(arrays["pixel_values"]), p, grid=grids["image_grid"])
    return np.asarray(out, np.float64)


def test_token_ratios_equal_selection_counts(env, sweep):
    r = sweep["topp0.6"]
    per_row = np.concatenate([_oracle_counts(env["model"], b, 0.6)[np.asarray(b["valid"])] for b in env["loader"]])
    assert 0.2 < r.token_ratio < 0.95  # really pruned
    np.testing.assert_allclose(r.layer_ratio, per_row.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(r.token_ratio, per_row.mean(), rtol=1e-6)
    # The same selection, recorded per row through the keep-rule hook, for the first batch.
    batch = next(iter(env["loader"]))
    keep_YBL, ratio_BY = harness.kept_masks(env["model"], batch, "topp:0.6", sparsity=SPARSITY)
    np.testing.assert_allclose(ratio_BY, _oracle_counts(env["model"], batch, 0.6), rtol=1e-6)
    n_valid = np.asarray(batch["attention_mask"]).sum(1)
    np.testing.assert_allclose(keep_YBL.sum(-1).T / n_valid[:, None], ratio_BY, rtol=1e-6)
    assert r.kv_bytes < sweep["dense"].kv_bytes


def test_harness_matches_the_trainers_greedy_eval(env, sweep):
    from zipr1_jax.train.greedy_eval import evaluate_greedy  # noqa: PLC0415

    got = evaluate_greedy(env["model"], env["loader"], env["tok"], p=0.6, max_new_tokens=T_NEW, eos_ids=EOS,
                          pad_id=PAD, sparsity=SPARSITY)
    r = sweep["topp0.6"]
    assert got.responses == r.responses and got.accuracy == r.accuracy
    np.testing.assert_allclose(got.layer_ratio, r.layer_ratio, rtol=1e-7)


def test_jsonl_set_equals_the_same_examples_in_memory(env, sweep, tmp_path):
    """`--sets jsonl:PATH`: the same six examples written as a JSONL file with PNG image files (paths
    relative to the file) evaluate exactly like the in-memory records (responses and token ratios)."""
    from PIL import Image  # noqa: PLC0415

    with open(tmp_path / "set.jsonl", "w") as f:
        for i, r in enumerate(env["records"]):
            Image.fromarray(r["images"][0]).save(tmp_path / f"img{i}.png")
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "answer_type": r["answer_type"],
                                "image": f"img{i}.png"}) + "\n")
    es = loading.eval_set(f"jsonl:{tmp_path / 'set.jsonl'}", env["tok"], env["cfg"], batch_size=4,
                          length_buckets=(128,), image_size=(56, 56))
    assert es.name == "jsonl:set.jsonl" and len(es.source) == 6
    res = {r.key: r for r in harness.evaluate(env["model"], {es.name: es.loader}, env["tok"], ["dense", "topp:0.6"],
                                              config=CONFIG, sparsity=SPARSITY, model_name="tiny")}
    for key in ("dense", "topp0.6"):
        assert res[key].responses == sweep[key].responses, key
        assert res[key].accuracy == sweep[key].accuracy and res[key].num_examples == 6, key
        np.testing.assert_allclose(res[key].layer_ratio, sweep[key].layer_ratio, rtol=1e-7)
    limited = loading.eval_set(f"jsonl:{tmp_path / 'set.jsonl'}", env["tok"], env["cfg"], limit=2)
    assert len(limited.source) == 2
    with pytest.raises(ValueError, match="does not exist"):
        loading.eval_set(f"jsonl:{tmp_path / 'missing.jsonl'}", env["tok"], env["cfg"])


def test_fastv_prunes_only_visual_tokens_after_layer_k(env, sweep):
    r = sweep["fastv1_0.5"]
    batch = next(iter(env["loader"]))
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]) > 0
    n_img = (ids == env["cfg"].image_token_id).sum(1)
    want = (mask.sum(1) - np.round(0.5 * n_img)) / mask.sum(1)
    keep_YBL, ratio_BY = harness.kept_masks(env["model"], batch, "fastv:1:0.5", sparsity=SPARSITY)
    np.testing.assert_allclose(ratio_BY[:, 0], 1.0)
    np.testing.assert_allclose(ratio_BY[:, 1], want, rtol=1e-6)
    text = mask & (ids != env["cfg"].image_token_id)
    assert (keep_YBL[1][text]).all() and (keep_YBL[0] == mask).all()
    assert r.layer_ratio[0] == 1.0 and r.layer_ratio[1] < 1.0 and r.kv_bytes < sweep["dense"].kv_bytes


def test_topk_ratio_is_the_budget(env, sweep):
    r = sweep["topk0.5"]
    n = np.concatenate([np.asarray(b["attention_mask"]).sum(1)[np.asarray(b["valid"])] for b in env["loader"]])
    forced_keep = jax.jit(variants.forced_keep, static_argnames="config")
    forced = int(forced_keep(jnp.ones((1, int(n.max())), bool), config=SPARSITY.selection).sum())
    assert forced <= np.ceil(0.5 * n.min())  # the always-kept set fits the budget here
    np.testing.assert_allclose(r.layer_ratio, [np.mean(np.ceil(0.5 * n) / n)] * 2, rtol=1e-6)


def test_baseline_keep_rules_on_scores():
    valid = jnp.array([[False, True, True, True, True, True]])
    score = jnp.array([[9.0, 0.1, 0.5, 0.3, 0.05, 0.2]])
    forced = jnp.array([[False, False, False, False, False, True]])
    visual = jnp.array([[False, True, True, True, True, False]])
    topk = jax.jit(variants.topk_keep)
    thr = jax.jit(variants.threshold_keep)
    fastv = jax.jit(variants.fastv_keep)
    assert topk(score, valid, 0.4, None).tolist() == [[False, False, True, True, False, False]]
    assert topk(score, valid, 1.0, None).tolist() == valid.tolist()
    assert topk(score, valid, 0.4, forced).tolist() == [[False, False, True, False, False, True]]
    assert thr(score, valid, 0.25, None).tolist() == [[False, False, True, True, False, False]]
    assert thr(score, valid, 0.9, None).tolist() == [[False, False, True, False, False, False]]
    assert fastv(score, valid, visual, 0.5).tolist() == [[False, False, True, True, False, True]]
    assert fastv(score, valid, visual, 1.0).tolist() == valid.tolist()
    # Received attention: the "last" query's row of a softmax sums to 1 over the keys it sees.
    q = jax.random.normal(jax.random.key(0), (1, 6, 4, 8))
    k = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))
    received = jax.jit(variants.received_attention, static_argnames="query")
    last = received(q, k, valid, query="last")
    assert float(last.sum()) == pytest.approx(1.0, abs=1e-5) and float(last[0, 0]) == 0.0
    every = received(q, k, valid, query="all")
    assert every.shape == (1, 6) and float(every[0, 0]) == 0.0 and bool(jnp.all(every[0, 1:] > 0))


def test_tables_are_written(sweep, tmp_path):
    results = list(sweep.values())
    paths = harness.write_tables(results, tmp_path / "out", meta={"note": "test"})
    md = open(paths["md"]).read()
    assert md.count("\n") == len(results) + 2 and "| tiny | tasks | top-p 0.6 |" in md
    lines = open(paths["csv"]).read().splitlines()
    assert lines[0].split(",")[-2:] == ["layer_0", "layer_1"] and len(lines) == len(results) + 1
    data = json.load(open(paths["json"]))
    assert data["meta"] == {"note": "test"} and "responses" not in data["results"][0]
    back = harness.read_results(paths["json"])
    assert [b.key for b in back] == [r.key for r in results]
    assert back[4].layer_ratio == results[4].layer_ratio and back[4].accuracy == results[4].accuracy


def test_settings_parse_and_reject_bad_input():
    assert methods.parse_setting("topp").p == 0.975 and methods.parse_setting("TOPP:0.9").budget == 0.9
    fv = methods.parse_setting("fastv:2:0.25:all")
    assert (fv.layer, fv.drop, fv.query, fv.budget) == (2, 0.25, "all", 0.75)
    assert methods.parse_setting("threshold:0.01").key == "thr0.01"
    bad = ["nope", "topp:1.5", "topp:0", "topp:x", "topk", "topk:0", "threshold:2", "fastv:0:0.5", "fastv:2:1",
           "fastv:2", "fastv:a:0.5", "fastv:2:0.5:middle", "dense:1", ""]
    for spec in bad:
        with pytest.raises(methods.SettingError):
            methods.parse_setting(spec)
    with pytest.raises(methods.SettingError, match="repeat"):
        methods.parse_settings(["topp:0.9", "topp:0.90"])
    with pytest.raises(ValueError, match="progress"):
        harness.HarnessConfig(eos_ids=EOS, pad_id=PAD, progress="bar")
    with pytest.raises(ValueError, match="unknown evaluation set"):
        loading.eval_source("csv:/x")


def test_fastv_layer_outside_model_is_an_error(env):
    batch = next(iter(env["loader"]))
    with pytest.raises(methods.SettingError, match="FastV layer K=2"):
        harness.kept_masks(env["model"], batch, "fastv:2:0.5", sparsity=SPARSITY)


def test_load_orbax_run_hf_and_errors(env, tmp_path):
    graphdef, params = split_params(env["model"])
    run = tmp_path / "run"
    cfg = load_config(None, SMALL + [f"log.out_dir={run}"])
    with Checkpointer(run / "checkpoints", async_save=False) as ck:
        ck.save(7, params=params, meta={"config": cfg.to_dict()}, force=True)
    save_params(run / "checkpoints" / "reference", params)
    want = jax.tree.leaves(params)
    for path, kind, step in ((run, "run", 7), (run / "checkpoints", "orbax", 7),
                             (run / "checkpoints" / "reference", "params", None),
                             (run / "checkpoints" / "7" / "params", "params", 7)):
        got = loading.load_model(path)
        assert (got.kind, got.step, got.tokenizer_dir) == (kind, step, "builtin")
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(split_params(got.model)[1]), want))
        assert got.sparsity() == sparsity_config(cfg.sparsity) and got.train_config == cfg
    hf_dir = tmp_path / "hf"
    env["hf"].save_pretrained(hf_dir)
    got = loading.load_model(hf_dir)
    assert got.kind == "hf" and got.train_config is None and got.tokenizer_dir is None
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(split_params(got.model)[1]), want))
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"step 3 .*available steps: \[7\]"):
        loading.load_model(run, step=3)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        loading.load_model(tmp_path)
    with pytest.raises(CheckpointError, match="has no steps"):
        loading.load_model(hf_dir, step=1)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        loading.load_tokenizer_for(got)


def _cli():
    import importlib.util  # noqa: PLC0415

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "evaluate.py")
    spec = importlib.util.spec_from_file_location("evaluate_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_run_directory_to_tables_and_pictures(env, tmp_path, capsys):
    """scripts/evaluate.py on a training run: two labelled checkpoints (the run and its reference),
    tables and the three pictures. Shapes and configs match the fixtures, so programs are reused."""
    run = tmp_path / "run"
    _, params = split_params(env["model"])
    with Checkpointer(run / "checkpoints", async_save=False) as ck:
        ck.save(2, params=params, meta={"config": dataclasses.replace(TRAIN).to_dict()}, force=True)
    save_params(run / "checkpoints" / "reference", params)
    out = _cli().main([f"before={run / 'checkpoints' / 'reference'}", f"after={run}", "--sets", "builtin:all:6",
                       "--settings", "dense", "topp:0.6", "--batch-size", "4", "--capacity-buckets", "1.0",
                       "--tokenizer", env["tok_dir"], "--no-prefill-timing", "--progress", "none",
                       "--out-dir", str(tmp_path / "eval"), "--heatmap-examples", "2"])
    res = out["results"]
    assert [(r.model, r.key) for r in res] == [("before", "dense"), ("before", "topp0.6"), ("after", "dense"),
                                               ("after", "topp0.6")]
    assert res[0].responses == res[2].responses and res[1].token_ratio == res[3].token_ratio < 1.0
    for key in ("md", "csv", "json"):
        assert os.path.getsize(out["paths"][key]) > 0
    names = sorted(os.path.basename(p) for p in out["paths"]["pictures"])
    assert names == ["accuracy_vs_token_ratio.png", "kept_after_topp0.6_layer1_ex0.png",
                     "kept_after_topp0.6_layer1_ex1.png", "kept_before_topp0.6_layer1_ex0.png",
                     "kept_before_topp0.6_layer1_ex1.png", "layer_ratios_builtin_all.png"]
    assert "| after | builtin(all) | top-p 0.6 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _cli().parse_args([str(run), "--settings", "topp:2"])


@pytest.mark.parametrize("p", [None, 0.6])
def test_measured_prefill_is_the_rollouts_own_program(env, p, monkeypatch):
    """The harness times the prefill program `generate` itself runs (one program, no extra
    compile), so decode time = generate time - prefill time compares like with like."""
    from zipr1_jax.rl import rollout  # noqa: PLC0415
    from zipr1_jax.train.greedy_eval import model_inputs, run_generate  # noqa: PLC0415

    cfg = harness.HarnessConfig(max_new_tokens=T_NEW, eos_ids=EOS, pad_id=PAD, progress="none")
    x = model_inputs(env["model"], next(iter(env["loader"])))
    p_B = None if p is None else np.full((x["ids"].shape[0],), p, np.float32)
    key = jax.random.key(0)
    run_generate(env["model"], x, key, p_B, cfg.sampling, SPARSITY)
    program, calls = rollout._prefill_jit, []
    compiled = program._cache_size()
    monkeypatch.setattr(rollout, "_prefill_jit", lambda *a, **k: calls.append(1) or program(*a, **k))
    logits, cache, *_ = harness._run_prefill(env["model"], x, key, p_B, cfg, SPARSITY)
    assert calls == [1] and program._cache_size() == compiled  # generate's program, already compiled
    assert logits.shape == (x["ids"].shape[0], env["cfg"].text.vocab_size)
