"""Smoke test of benchmarks/grpo_step_vs_trl.py and its modules (grpo_shared, grpo_ours_side,
grpo_check, grpo_report, grpo_trl_side): OUR side (dense and sparse GRPO steps) runs end to end at
tiny size with finite outputs and full-length completions; the pieces shared with the TRL worker
(tokenizer, reward) behave and the worker's modules import without jax / zipr1_jax; `--write-md`
touches only its section. TRL itself is not needed (it lives in its own venv). No timing is
asserted."""

import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
from bench_loader import BENCH_DIR, load_benchmark

TINY = ["--prompts", "2", "--group", "2", "--prompt", "16", "--new", "4", "--repeats", "1", "--hidden", "64",
        "--layers", "1", "--vocab", "300", "--no-trl"]


@pytest.fixture(scope="module")
def bench():
    """The driver; loading it puts benchmarks/ on sys.path, so its modules import by name below."""
    return load_benchmark("grpo_step_vs_trl.py")


@pytest.fixture(scope="module")
def shared(bench):
    return importlib.import_module("grpo_shared")


@pytest.fixture(scope="module")
def report(bench):
    return importlib.import_module("grpo_report")


@pytest.fixture(scope="module")
def check(bench):
    return importlib.import_module("grpo_check")


@pytest.fixture(scope="module")
def ours(bench):
    return importlib.import_module("grpo_ours_side")


def _check_rows(report, shared, result, sides):
    rows = {r["side"]: r for r in result["rows"]}
    assert set(rows) == set(sides)
    for name, r in rows.items():
        for key in ("first_s", "steady_s", "loss", "reward", "kl", "grad_norm"):
            assert r[key] is not None and math.isfinite(r[key]), (name, key)
        assert r["steady_s"] > 0 and r["kl"] >= 0
        assert r["length"] == 4 and r["finished"] == 0  # the stop id is outside the vocabulary
        assert 0 < r["token_ratio"] <= 1
        assert "ratio" not in r  # no TRL column to compare with
        assert set(r["phases"]) == set(shared.PHASES) and all(v >= 0 for v in r["phases"].values())
        assert sum(r["phases"].values()) == pytest.approx(r["steady_s"], rel=0.5)  # medians of parts ~ the whole
    assert "n/a" in report.table(result["rows"])
    return rows


def test_our_dense_step_runs_and_is_finite(bench, report, shared):
    rows = _check_rows(report, shared, bench.main(TINY + ["--no-sparse"]), ["zipr1_jax dense"])
    assert rows["zipr1_jax dense"]["token_ratio"] == 1.0


@pytest.mark.slow
def test_our_dense_and_sparse_steps_run_and_are_finite(bench, report, shared):
    _check_rows(report, shared, bench.main(TINY), ["zipr1_jax dense", f"zipr1_jax sparse p={shared.SPARSE_P}"])


def test_word_tokenizer_round_trips_ids_and_never_emits_eos(shared):
    tok = shared.word_tokenizer(50, pad_id=49)
    ids = np.array([[49, 49, 3, 17], [5, 0, 48, 2]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    texts = shared.prompt_texts(ids, mask)
    assert texts == ["w3 w17", "w5 w0 w48 w2"]
    assert tok(texts)["input_ids"] == [[3, 17], [5, 0, 48, 2]]
    assert tok.eos_token_id == 50 and tok.pad_token_id == 49  # eos outside a 50-token model vocabulary
    assert tok.decode([3, 49, 4], skip_special_tokens=True) == "w3 w4"


def test_even_word_reward(shared):
    assert shared.even_word_reward("w2 w3 w10 w7") == 0.5
    assert shared.even_word_reward("w4") == 1.0
    assert shared.even_word_reward("") == 0.0 and shared.even_word_reward("<pad> x") == 0.0


def test_worker_modules_import_without_jax_or_zipr1_jax():
    """The TRL venv has neither, the EasyDeL venv no zipr1_jax (and another jax): the workers' modules
    must import with all three blocked (jax is imported inside the EasyDeL worker function only)."""
    code = ("import sys; sys.modules.update(jax=None, flax=None, zipr1_jax=None); sys.path.insert(0, sys.argv[1]); "
            "import grpo_trl_side, grpo_easydel_side, grpo_shared, easydel_vs_ours; "
            "assert grpo_shared.TRL_SCRIPT == grpo_trl_side.__file__")
    proc = subprocess.run([sys.executable, "-c", code, BENCH_DIR], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_write_md_replaces_only_its_section(bench, report, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# t\n\n## Other\n\nkeep me\n\n" + report.SECTION + "\n\nold table\n\n## Last\n\nkeep too\n")
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    phases = dict(rollout=0.05, reference=0.01, update=0.03, other=0.01)
    rows = [dict(side="zipr1_jax dense", threads="jax pool", first_s=9.0, steady_s=0.1, min_s=0.1, max_s=0.2,
                 ratio=0.25, phases=phases, loss=0.0, reward=0.5, kl=1e-8, length=4, token_ratio=1.0),
            dict(side="TRL @1 thr", threads=1, first_s=1.0, steady_s=0.4, min_s=0.4, max_s=0.5, ratio=1.0,
                 phases=phases, loss=None, reward=0.5, kl=2e-8, length=4, token_ratio=1.0)]
    versions = dict(jax="j", flax="f", transformers="t", torch="p", trl_venv_trl="1.0", trl_venv_transformers="t",
                    trl_venv_torch="p")
    args = bench.parse_args(TINY + ["--threads", "2,1"])
    report.write_section(dict(rows=rows, config=cfg, versions=versions, machine="test machine"), args, path=str(path))
    text = path.read_text()
    assert "old table" not in text and "keep me" in text and "keep too" in text
    assert text.count(report.SECTION) == 1 and "| zipr1_jax dense | jax pool | 9.00 | 0.100 |" in text
    assert "| 0.25 | 0.050 | 0.010 | 0.030 | 0.010 |" in text and "trl 1.0" in text
    assert "| 0.400 | 0.400 - 0.500 | - |" in text  # TRL rows carry no ours / TRL ratio
    assert text.index("## Other") < text.index(report.SECTION) < text.index("## Last")


def test_write_md_easydel_row_gets_its_own_ratio_column(bench, report, tmp_path):
    """With an EasyDeL side: a second ratio column for our rows, its phases it cannot separate shown as
    n/a, its venv in the versions, `--easydel` in the command, and what differs in the notes."""
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# t\n\n" + report.SECTION + "\n\nold\n")
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    phases = dict(rollout=0.05, reference=0.01, update=0.03, other=0.01)
    ed_phases = dict(rollout=0.5, reference=None, update=0.25, other=0.01)
    rows = [dict(side="zipr1_jax dense", threads="jax pool", first_s=9.0, steady_s=0.1, min_s=0.1, max_s=0.2,
                 ratio=0.25, ratio_min=0.2, ratio_max=0.3, ratio_easydel=0.125, ratio_easydel_min=0.1,
                 ratio_easydel_max=0.15, phases=phases, loss=0.0, reward=0.5, kl=1e-8, length=4, token_ratio=1.0),
            dict(side="TRL @1 thr", threads=1, first_s=1.0, steady_s=0.4, min_s=0.4, max_s=0.5, phases=phases,
                 loss=None, reward=0.5, kl=2e-8, length=4, token_ratio=1.0),
            dict(side=bench.EASYDEL_SIDE, threads="jax", first_s=20.0, steady_s=0.8, min_s=0.7, max_s=0.9,
                 phases=ed_phases, loss=0.0, reward=0.5, kl=None, length=4, token_ratio=1.0)]
    versions = dict(jax="j", flax="f", transformers="t", torch="p", trl_venv_trl="1.0", easydel_venv_easydel="0.3.0",
                    easydel_venv_jax="0.9.2", easydel_venv_flax="0.12.3")
    args = bench.parse_args(TINY + ["--easydel"])
    report.write_section(dict(rows=rows, config=cfg, versions=versions, machine="m"), args, path=str(path))
    text = path.read_text()
    assert "ours / EasyDeL time" in text and "| 0.25 (0.20 - 0.30) | 0.12 (0.10 - 0.15) |" in text
    assert "| 0.800 | 0.700 - 0.900 | - | - | 0.500 | n/a | 0.250 | 0.010 |" in text
    assert "easydel 0.3.0, jax 0.9.2" in text and "--easydel --write-md" in text and "setup_easydel_venv.sh" in text
    assert "EasyDeL row:" in text and "PRNGKey(0)" in text
    with pytest.raises(SystemExit, match="text step only"):
        bench.parse_args(["--easydel", "--image", "112"])


def test_easydel_phases_split_only_what_its_timers_measure(bench):
    ed = importlib.import_module("grpo_easydel_side")
    got = ed.easydel_phases(3.0, {"generation_time": 1.8, "preprocessing_time": 2.0, "loss": 0.0})
    assert got == pytest.approx(dict(rollout=1.8, reference=None, update=1.0, other=0.2))
    assert ed.easydel_phases(3.0, {"loss": 0.0}) == dict(rollout=None, reference=None, update=None, other=None)


def test_args_are_checked(bench):
    with pytest.raises(SystemExit, match="group"):
        bench.parse_args(["--group", "1"])
    with pytest.raises(SystemExit, match="threads"):
        bench.parse_args(["--threads", "0"])
    assert bench.parse_args(["--threads", "2,1,2"]).threads == [2, 1]


def _objective(grads: dict, loss=1.0, adv=(0.5, -0.5)):
    return dict(loss=loss, advantages=np.asarray(adv, np.float32), grads=grads)


def test_compare_objectives_passes_equal_and_flags_each_gap(check):
    g = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[3.0]], np.float32)}
    assert check.compare_objectives(_objective(g), _objective(g))["grad_rel"] == 0.0
    with pytest.raises(RuntimeError, match="different objectives"):  # a 1% gap in one tensor
        check.compare_objectives(_objective({**g, "b": g["b"] * 1.01}), _objective(g))
    with pytest.raises(RuntimeError, match="different objectives"):  # advantages normalised differently
        check.compare_objectives(_objective(g, adv=(0.7, -0.7)), _objective(g))
    with pytest.raises(RuntimeError, match="different objectives"):
        check.compare_objectives(_objective(g, loss=1.01), _objective(g))
    with pytest.raises(RuntimeError, match="different tensors"):
        check.compare_objectives(_objective({"a": g["a"]}), _objective(g))
    with pytest.raises(RuntimeError, match="all-zero advantages"):
        check.compare_objectives(_objective(g, adv=(0.0, 0.0)), _objective(g, adv=(0.0, 0.0)))


def test_fixed_completions_vary_rewards_within_groups(bench, shared, check):
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    args = bench.parse_args(TINY + ["--group", "3"])
    comp = check.fixed_completions(cfg, args)
    assert comp.shape == (2 * 3, 4) and (comp >= 0).all() and (comp < cfg.image_token_id).all()
    tok = shared.word_tokenizer(300, cfg.pad_token_id)
    r = np.array([shared.even_word_reward(tok.decode(c)) for c in comp]).reshape(2, 3)
    assert (r.std(axis=1) > 0).all()


def test_ours_objective_on_fixed_completions(bench, ours, check):
    """Ours' side of the same-objective check: finite loss, advantages = r - group mean, and a
    gradient for every HF tensor (hub keys and shapes), non-zero in the text model."""
    rb = bench._rollout_bench()
    cfg = rb.bench_config(hidden=64, layers=1, vocab=300)
    args = bench.parse_args(TINY)
    hf = rb.random_hf_model(cfg, 0)
    p = rb.prompt_batch(cfg, batch=2, prompt=16, image=False, seed=0)
    batch = ours.ours_batch(cfg, p["ids"], p["mask"], args.group)
    comp = check.fixed_completions(cfg, args)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ref = {k: v.detach().numpy() for k, v in check.perturbed_copy(hf, 1).state_dict().items()}
    out = ours.ours_objective(cfg, state, ref, batch, comp, args)
    assert math.isfinite(out["loss"]) and out["loss"] > 0  # the KL to the perturbed reference
    np.testing.assert_allclose(out["advantages"].reshape(2, 2).sum(axis=1), 0.0, atol=1e-6)
    from zipr1_jax.models.qwen_vl.hf_params import canonical_hf_key
    shapes = {canonical_hf_key(k): v.shape for k, v in state.items()}
    assert {k: v.shape for k, v in out["grads"].items()} == shapes
    assert np.abs(out["grads"]["model.layers.0.mlp.up_proj.weight"]).max() > 0


# ---------------------------------------------------------------------- the VLM step (--image)
def test_our_vlm_step_runs_and_is_finite(bench, report, shared):
    rows = _check_rows(report, shared, bench.main(TINY + ["--no-sparse", "--image", "56"]), ["zipr1_jax dense"])
    assert rows["zipr1_jax dense"]["token_ratio"] == 1.0


def test_vlm_processor_renders_the_image_block_at_the_model_ids(bench, shared):
    """The offline processor TRL gets: one image block (start, pad x merged tokens, end) at the tiny
    model's ids, then the word ids; pixel rows as many as the grid's patches; TRL's side renders
    the same ids from its dataset rows (image column filled into the placeholder)."""
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    images = shared.noise_images(2, 84, seed=0)
    prompt_ids, ids_BL, mask_BL, vision = bench.image_prompts(cfg, ["w3 w17", "w5"], images)
    n = (84 // 28) ** 2
    block = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    assert prompt_ids == [block + [3, 17], block + [5]]
    assert ids_BL.shape == (2, n + 4) and mask_BL[1].tolist() == [0] + [1] * (n + 3)
    assert ids_BL[1, 0] == cfg.pad_token_id and ids_BL[1, 1:].tolist() == block + [5]  # left padded
    assert vision["image_grid_thw"].tolist() == [[1, 6, 6]] * 2
    assert vision["pixel_values"].shape == (2 * 36, cfg.vision.patch_dim)
    assert not np.array_equal(vision["pixel_values"][:36], vision["pixel_values"][36:])  # two different images
    trl_side = importlib.import_module("grpo_trl_side")
    proc = shared.vlm_processor(300, cfg.pad_token_id)
    rows = [{"prompt": shared.conversation(t), "image": im} for t, im in zip(["w3 w17", "w5"], images)]
    got = proc.apply_chat_template(conversation=[trl_side.prepare_image(r) for r in rows], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert [list(map(int, g)) for g in got] == prompt_ids
    assert rows[0]["prompt"][0]["content"][0] == {"type": "image"}  # the dataset row is left untouched


def test_ours_batch_repeats_each_prompts_pixels_per_row(bench, ours):
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    images = importlib.import_module("grpo_shared").noise_images(2, 56, seed=1)
    _, ids_BL, mask_BL, vision = bench.image_prompts(cfg, ["w1 w2", "w3"], images)
    batch = ours.ours_batch(cfg, ids_BL, mask_BL, 3, **vision)
    pix = vision["pixel_values"]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 6
    np.testing.assert_array_equal(batch["pixel_values"], np.concatenate([pix[:16]] * 3 + [pix[16:]] * 3))
    assert batch["input_ids"].shape == (6, ids_BL.shape[1]) and (batch["rope_deltas"] < 0).all()
    with pytest.raises(ValueError, match="pixel rows"):
        ours.ours_batch(cfg, ids_BL, mask_BL, 3, pixel_values=pix[:20], image_grid_thw=vision["image_grid_thw"])
    with pytest.raises(ValueError, match="one image per prompt"):
        ours.ours_batch(cfg, ids_BL, mask_BL, 3, pixel_values=pix, image_grid_thw=vision["image_grid_thw"][:1])


def test_image_args_are_checked(bench):
    with pytest.raises(SystemExit, match="multiple of 28"):
        bench.parse_args(["--image", "60"])
    assert bench.parse_args(["--image", "112"]).image == 112


def test_write_md_image_section_leaves_the_text_section(bench, report, tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# t\n\n" + report.SECTION + "\n\ntext table\n\n## Last\n\nkeep\n")
    cfg = bench._rollout_bench().bench_config(hidden=64, layers=1, vocab=300)
    phases = dict(rollout=0.05, reference=0.01, update=0.03, other=0.01)
    rows = [dict(side="zipr1_jax dense", threads="jax pool", first_s=9.0, steady_s=0.1, min_s=0.1, max_s=0.2,
                 phases=phases, loss=0.0, reward=0.5, kl=1e-8, length=4, token_ratio=1.0)]
    versions = dict(jax="j", flax="f", transformers="t", torch="p")
    args = bench.parse_args(TINY + ["--image", "112"])
    report.write_section(dict(rows=rows, config=cfg, versions=versions, machine="m"), args, path=str(path))
    text = path.read_text()
    assert "text table" in text and "keep" in text and text.count(report.SECTION_IMAGE) == 1
    assert "--image 112" in text and "112x112 px noise image (16 merged tokens" in text
