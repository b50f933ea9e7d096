"""HF <-> Orbax conversion, checked by transformers itself: round trips of both families (no
missing / unexpected keys, bit-equal tensors, equal logits), mesh-independent exports, a trained
checkpoint whose export generates the same greedy answers as our model, and every refusal.

Runs on 8 virtual CPU devices (tests/conftest.py). fp32 throughout unless a test says otherwise.
"""

import dataclasses
import filecmp
import importlib.util
import json
import os
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "models"))
from hf_utils import mm_token_type_ids, pixels, text_tokens, tiny_hf_model, vision_block  # noqa: E402

from zipr1_jax.convert import (COPIED_FILES, SPARSITY_FIELD, ConversionError, convert_hf_to_orbax,  # noqa: E402
                               export_hf, parse_size)
from zipr1_jax.convert.orbax_to_hf import INDEX_FILE, plan_shards  # noqa: E402
from zipr1_jax.data.tokenizer import build_tiny_tokenizer  # noqa: E402
from zipr1_jax.models.qwen_vl import config as C  # noqa: E402
from zipr1_jax.sharding.mesh import make_mesh  # noqa: E402

FAMILIES = {"qwen2_vl": lambda: C.tiny_qwen2_vl(), "qwen2_5_vl_tied": lambda: C.tiny_qwen2_5_vl(tie=True)}
SHARD = "150KB"  # the tiny models (~0.7 MB in fp32) export as several shards
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh8():
    if jax.device_count() < 8:
        pytest.fail(f"conversion tests need 8 devices, got {jax.device_count()} (see tests/conftest.py)")
    return make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def build(tmp_path_factory, mesh1):
    """Lazily, once per family: transformers model -> save_pretrained (+ tokenizer files) -> Orbax
    (1 device) -> HF export. Returns (cfg, hf_model, root, ImportResult, ExportResult)."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = FAMILIES[name]()
            hf = tiny_hf_model(cfg, seed=5)
            root = tmp_path_factory.mktemp(name)
            hf_dir = str(root / "hf")
            hf.save_pretrained(hf_dir)
            build_tiny_tokenizer(hf_dir)
            imported = convert_hf_to_orbax(hf_dir, root / "ck1", dtype="float32", mesh=mesh1)
            exported = export_hf(root / "ck1", root / "out", source_hf_dir=hf_dir, max_shard_size=SHARD, mesh=mesh1)
            cache[name] = (cfg, hf, root, imported, exported)
        return cache[name]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def roundtrip(request, build):
    """Both families (tests whose outcome depends on the architecture)."""
    return build(request.param)


@pytest.fixture
def one(build):
    """One family, for the family-independent checks (the tied 2.5 model: no lm_head tensor)."""
    return build("qwen2_5_vl_tied")


def _hf_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    grid = [1, 4, 6]
    ids = np.array([text_tokens(rng, 5) + vision_block(cfg, grid) + text_tokens(rng, 7)])
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                pixel_values=torch.tensor(pixels(rng, cfg, grid)), image_grid_thw=torch.tensor([grid]),
                mm_token_type_ids=torch.tensor(mm_token_type_ids(cfg, ids)))


def _tensors_of(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def _tensors(directory):
    out = {}
    for name in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        out.update(_tensors_of(os.path.join(directory, name)))
    return out


# ------------------------------------------------------------------ round trips
@torch.no_grad()
def test_roundtrip_loads_in_transformers_bit_exact(roundtrip):
    cfg, hf, root, imported, exported = roundtrip
    assert imported.step == 0 and imported.num_params == sum(p.numel() for p in hf.parameters())
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(str(root / "out"),
                                                                            output_loading_info=True)
    assert type(loaded) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref, got = hf.state_dict(), loaded.eval().state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    inputs = _hf_inputs(cfg)
    diff = (loaded(**inputs).logits - hf(**inputs).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_export_layout(roundtrip):
    cfg, _, root, _, exported = roundtrip
    out = root / "out"
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(exported.files) and len(files) > 1
    assert index["metadata"]["total_size"] == exported.total_bytes == sum(v.nbytes for v in _tensors(out).values())
    limit = parse_size(SHARD)
    for name in files:
        keys = [k for k, f in index["weight_map"].items() if f == name]
        size = sum(v.nbytes for v in _tensors_of(out / name).values())
        assert size <= limit or len(keys) == 1, (name, size)
    assert ("lm_head.weight" in index["weight_map"]) != cfg.text.tie_word_embeddings
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == cfg.family and config["vision_config"]["depth"] == cfg.vision.depth
    assert config["text_config"]["num_hidden_layers"] == cfg.text.num_hidden_layers
    assert SPARSITY_FIELD not in config  # converted, never trained: no sparsity settings to record
    # Tokenizer + generation config copied byte for byte; nothing else of the source came along.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert name in exported.copied and filecmp.cmp(root / "hf" / name, out / name, shallow=False), name
    assert set(exported.copied) <= set(COPIED_FILES)
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no temporary directories left
    # every exported file has one mode (safetensors writes its files 0600 unless told otherwise)
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)}
    assert len(set(modes.values())) == 1 and modes[INDEX_FILE] & 0o044, modes
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_export_is_independent_of_the_mesh(build, mesh1, mesh8):
    """Checkpoint written on a (2, 2, 2) mesh, exported restoring on 8 devices and on 1: the same
    bytes as the export of the checkpoint written and restored on one device."""
    _, _, root, _, _ = build("qwen2_vl")  # untied: the lm_head is exported too
    res8 = convert_hf_to_orbax(root / "hf", root / "ck8", dtype="float32", mesh=mesh8)
    assert res8.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with ocp.StandardCheckpointer() as ckptr:
        md = ckptr.metadata(str(root / "ck8" / "0" / "params")).item_metadata.tree
    stored = md["embed_tokens"]["embedding"].sharding
    assert list(np.asarray(stored.shape)) == [2, 2, 2] and "fsdp" in stored.partition_spec  # really sharded
    for name, ckpt, mesh in (("out88", "ck8", mesh8), ("out81", "ck8", mesh1)):
        export_hf(root / ckpt, root / name, source_hf_dir=root / "hf", max_shard_size=SHARD, mesh=mesh)
        assert sorted(os.listdir(root / name)) == sorted(os.listdir(root / "out"))
        for f in os.listdir(root / "out"):
            assert filecmp.cmp(root / "out" / f, root / name / f, shallow=False), (name, f)


def test_bfloat16_default_and_dtype_cast(one, mesh1):
    _, hf, root, _, _ = one
    convert_hf_to_orbax(root / "hf", root / "ck_bf16", mesh=mesh1)  # default dtype: bfloat16
    res = export_hf(root / "ck_bf16", root / "out_bf16", mesh=mesh1)
    assert json.loads((root / "out_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    got = _tensors(root / "out_bf16")
    ref = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
           for k, v in hf.state_dict().items()}
    assert set(got) <= set(ref) and len(got) == res.num_tensors
    for k, v in got.items():  # same round-to-nearest-even as torch's cast
        assert v.dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(v.view(np.uint16), ref[k].to(torch.bfloat16).view(torch.int16).numpy()
                                      .view(np.uint16), err_msg=k)
    export_hf(root / "ck_bf16", root / "out_f32", dtype="float32", mesh=mesh1)
    f32 = _tensors(root / "out_f32")
    k = next(iter(got))
    assert f32[k].dtype == np.float32 and np.array_equal(f32[k], got[k].astype(np.float32))


# ------------------------------------------------------------------ refusals and failures
def test_missing_step_lists_the_available_ones(roundtrip, tmp_path):
    _, _, root, _, _ = roundtrip
    with pytest.raises(ConversionError, match=r"no checkpoint for step 7 .*available steps: \[0\]"):
        export_hf(root / "ck1", tmp_path / "x", step=7)
    assert not (tmp_path / "x").exists()


def test_other_architecture_names_the_key(roundtrip, tmp_path, mesh1):
    cfg, _, root, _, _ = roundtrip
    deeper = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=3))
    with pytest.raises(ConversionError, match=r"target keys not in the checkpoint: 'layers/2/"):
        export_hf(root / "ck1", tmp_path / "x", model_config=deeper, mesh=mesh1)
    wider = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=300))
    with pytest.raises(ConversionError, match=r"'embed_tokens/embedding' checkpoint \(263, 64\) vs target \(300, 64\)"):
        export_hf(root / "ck1", tmp_path / "x", model_config=wider, mesh=mesh1)
    other = C.tiny_qwen2_5_vl() if cfg.family == "qwen2_vl" else C.tiny_qwen2_vl()
    with pytest.raises(ConversionError, match=rf"not the {other.family} model.*'visual/blocks/"):
        export_hf(root / "ck1", tmp_path / "x", model_config=other, mesh=mesh1)
    assert not (tmp_path / "x").exists()


def test_non_empty_output_refused_unless_overwrite(one, tmp_path, mesh1):
    _, _, root, _, _ = one
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"not empty.*overwrite"):
        export_hf(root / "ck1", out, mesh=mesh1)
    with pytest.raises(ConversionError, match=r"not empty.*overwrite"):
        convert_hf_to_orbax(root / "hf", out, mesh=mesh1)
    assert os.listdir(out) == ["keep.txt"]
    export_hf(root / "ck1", out, mesh=mesh1, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and (out / INDEX_FILE).exists()
    (tmp_path / "empty").mkdir()  # an empty directory is fine without overwrite
    export_hf(root / "ck1", tmp_path / "empty", mesh=mesh1)
    with pytest.raises(ConversionError, match="is or contains the input"):  # would delete the checkpoint
        export_hf(root / "ck1", root, mesh=mesh1, overwrite=True)
    # A run killed while swapping in an overwrite left the old output aside: it is put back first.
    os.rename(out, tmp_path / ".out.replaced")
    with pytest.raises(ConversionError, match=r"not empty.*overwrite"):
        export_hf(root / "ck1", out, mesh=mesh1)
    assert (out / INDEX_FILE).exists() and not (tmp_path / ".out.replaced").exists()


def test_failed_write_leaves_no_complete_looking_output(one, tmp_path, monkeypatch, mesh1):
    _, _, root, _, _ = one
    from safetensors import numpy as st_numpy

    real, calls = st_numpy.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard: the first one is already on disk
            raise OSError(28, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(st_numpy, "save_file", full_disk)
    with pytest.raises(ConversionError, match=r"failed while writing model-00002-of-\d+\.safetensors.*No space"):
        export_hf(root / "ck1", tmp_path / "new", max_shard_size=SHARD, mesh=mesh1)
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary directory
    # Overwriting a complete export that then fails keeps the old export intact.
    monkeypatch.setattr(st_numpy, "save_file", real)
    export_hf(root / "ck1", tmp_path / "old", mesh=mesh1)
    before = sorted(os.listdir(tmp_path / "old"))
    calls.clear()
    monkeypatch.setattr(st_numpy, "save_file", full_disk)
    with pytest.raises(ConversionError, match="No space"):
        export_hf(root / "ck1", tmp_path / "old", max_shard_size=SHARD, mesh=mesh1, overwrite=True)
    assert sorted(os.listdir(tmp_path / "old")) == before and os.listdir(tmp_path) == ["old"]


def test_bad_inputs(one, tmp_path):
    _, _, root, _, _ = one
    with pytest.raises(ConversionError, match="does not exist"):
        export_hf(tmp_path / "nowhere", tmp_path / "x")
    assert not (tmp_path / "nowhere").exists()  # reading never creates the checkpoint directory
    with pytest.raises(ConversionError, match="holds no checkpoint step"):
        export_hf(root / "hf", tmp_path / "x")
    with pytest.raises(ConversionError, match="no config.json"):
        convert_hf_to_orbax(tmp_path, tmp_path / "x")
    with pytest.raises(ConversionError, match="dtype must be one of"):
        convert_hf_to_orbax(root / "hf", tmp_path / "x", dtype="fp8")
    deep = tmp_path / "deep"  # config.json of 3 layers over the weights of 2
    shutil.copytree(root / "hf", deep)
    config = json.loads((deep / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (deep / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"cannot import .*missing keys.*model\.layers\.2\."):
        convert_hf_to_orbax(deep, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConversionError, match="max_shard_size"):
        export_hf(root / "ck1", tmp_path / "x", max_shard_size="lots")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1234) == 1234
    assert plan_shards([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]


def test_scripts_are_thin_wrappers(one, tmp_path, mesh1):
    _, _, root, _, _ = one

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    assert load("convert_hf_to_orbax").main([str(root / "hf"), str(tmp_path / "ck"), "--dtype", "float32",
                                             "--mesh", "2,2,2"]) == 0
    assert load("export_hf").main([str(tmp_path / "ck"), str(tmp_path / "out"), "--source-hf-dir",
                                   str(root / "hf"), "--max-shard-size", SHARD]) == 0
    for f in os.listdir(root / "out"):
        assert filecmp.cmp(root / "out" / f, tmp_path / "out" / f, shallow=False), f


# ------------------------------------------------------------------ a trained checkpoint
# The tiny trainer config of tests/train/test_trainer.py, cut to what a checkpoint needs: two SFT
# steps (a low learning rate keeps the greedy answers prompt-dependent, so agreement means
# something) and the cheapest final evaluation. The full SFT + GRPO run is the slow variant.
TRAIN = ["model.preset=tiny_qwen2_vl", "data.image_size=[56,56]", "data.tasks=null",
         "data.num_examples=64", "data.batch_size=2", "data.group_size=2", "data.length_buckets=[128]",
         "sparsity.p_grid=[0.9,0.95]", "sparsity.min_probes=4", "sparsity.p_eval=0.93", "sparsity.layers=[1]",
         "sft.batch_size=4", "sft.warmup_steps=1", "rl.max_new_tokens=4", "rl.warmup_steps=0",
         "eval.num_examples=2", "eval.batch_size=2", "eval.p_list=[1.0]",
         "checkpoint.save_every=1", "checkpoint.keep_last=10", "checkpoint.async_save=false",
         "log.progress=none", "log.tensorboard=false", "log.plots=false"]
RUNS = {"sft": ["sft.steps=2", "sft.lr=3e-4", "rl.steps=0"],
        "sft_rl": ["sft.steps=2", "sft.lr=3e-4", "rl.steps=2", "rl.lr=3e-4"]}


@pytest.fixture(scope="module", params=["sft", pytest.param("sft_rl", marks=pytest.mark.slow)])
def trained(request, tmp_path_factory):
    from zipr1_jax.train.cli import load_config
    from zipr1_jax.train.trainer import run

    extra = RUNS[request.param]
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    cfg = load_config(None, TRAIN + extra + [f"log.out_dir={out}"])
    summary = run(cfg, devices=jax.devices()[:1])
    return cfg, out, summary


def test_trained_checkpoint_generates_like_ours(trained, tmp_path, mesh1):
    """Export the latest step of a `trainer.run` checkpoint; transformers' greedy `generate` on 10
    built-in task prompts (our preprocessing's pixel_values / grids fed to HF as they are) gives
    the same tokens and the same per-token log-probs as our dense `generate` on the Orbax params."""
    from flax import nnx

    from zipr1_jax.checkpoint import Checkpointer
    from zipr1_jax.convert.hf_to_orbax import params_target
    from zipr1_jax.train.builders import abstract_params
    from zipr1_jax.data import sources
    from zipr1_jax.data.chat import SpecialIds
    from zipr1_jax.data.pipelines import PipelineConfig, eval_loader
    from zipr1_jax.data.tokenizer import load_tokenizer
    from zipr1_jax.rl.rollout import SamplingConfig, generate
    from zipr1_jax.data.model_inputs import vision_arrays

    cfg, run_dir, summary = trained
    res = export_hf(run_dir / "checkpoints", tmp_path / "hf", source_hf_dir=run_dir / "tokenizer", mesh=mesh1)
    assert res.step == summary["global_step"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    sp = config[SPARSITY_FIELD]
    assert sp["p"] == 0.93 and sp["mode"] == cfg.sparsity.mode and sp["probes"] == "zipcache"
    assert sp["layers"] == [1] and sp["p_grid"] == [0.9, 0.95] and sp["global_step"] == res.step

    graphdef, abstract = abstract_params(res.config)
    with Checkpointer(run_dir / "checkpoints") as ck:
        params = ck.restore(res.step, params_target=params_target(abstract, mesh1))["params"]
    ours_model = nnx.merge(graphdef, params)
    tokenizer = load_tokenizer(tmp_path / "hf")  # the exported copy
    special = SpecialIds.from_tokenizer(tokenizer)
    loader = eval_loader(sources.BuiltinSource(10, seed=11, image_size=(56, 56)), tokenizer,
                         PipelineConfig(batch_size=10, length_buckets=(128,), image_size=(56, 56)),
                         model_config=res.config)
    batch = next(iter(loader))
    vision, grids = vision_arrays(batch)
    eos = (special.im_end, int(tokenizer.convert_tokens_to_ids("<|endoftext|>")))
    new = 12
    out = generate(ours_model, batch["input_ids"], batch["attention_mask"], jax.random.key(0),
                   config=SamplingConfig(max_new_tokens=new, eos_ids=eos, pad_id=special.pad, temperature=0.0),
                   position_ids_3BL=batch["position_ids"], rope_deltas_B=batch["rope_deltas"],
                   pixel_values=vision["pixel_values"], image_grid_thw=grids["image_grid"])
    ours, mask, ours_logp = (np.asarray(x) for x in (out.tokens_BT, out.mask_BT, out.logprobs_BT))

    hf = transformers.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long)
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=torch.tensor(np.asarray(batch["attention_mask"])),
                          pixel_values=torch.tensor(vision["pixel_values"]),
                          image_grid_thw=torch.tensor(np.asarray(grids["image_grid"])),
                          mm_token_type_ids=(ids == res.config.image_token_id).long(), do_sample=False,
                          max_new_tokens=new, eos_token_id=list(eos), pad_token_id=special.pad,
                          return_dict_in_generate=True, output_logits=True)
    theirs = gen.sequences[:, ids.shape[1]:].numpy()
    theirs_logp = torch.stack([torch.log_softmax(x.float(), -1) for x in gen.logits], 1).numpy()
    answers = []
    for r in range(10):
        n = int(mask[r].sum())
        np.testing.assert_array_equal(theirs[r, :n], ours[r, :n], err_msg=f"prompt {r}")
        assert n == new or theirs.shape[1] == n or theirs[r, n] == special.pad  # both stopped at the same eos
        got = theirs_logp[r, np.arange(n), ours[r, :n]]
        np.testing.assert_allclose(got, ours_logp[r, :n], atol=2e-4, err_msg=f"prompt {r}")
        answers.append(tokenizer.decode(ours[r, :n].tolist(), skip_special_tokens=True))
    assert len(set(answers)) > 1, answers  # prompt-dependent answers: agreement is not trivial


@pytest.mark.slow
def test_converted_train_state_starts_the_trainer(tmp_path, mesh1):
    """A full train state from `convert_hf_to_orbax(optimizer=...)` is what `scripts/train.py
    model.hf_dir=A checkpoint.dir=CKPT` resumes from: the first SFT step starts from the converted
    weights (model B), not from model.hf_dir's (model A)."""
    from zipr1_jax.checkpoint import Checkpointer
    from zipr1_jax.convert.hf_to_orbax import params_target, rl_optimizer_config
    from zipr1_jax.train.builders import abstract_params
    from zipr1_jax.train.cli import load_config
    from zipr1_jax.train.trainer import run

    cfg_model = C.tiny_qwen2_vl()
    for name, seed in (("a", 1), ("b", 2)):
        tiny_hf_model(cfg_model, seed=seed).save_pretrained(str(tmp_path / name))
    cfg = load_config(None, TRAIN + ["sft.steps=1", "sft.lr=1e-6", "rl.steps=0", f"model.hf_dir={tmp_path / 'a'}",
                                     f"checkpoint.dir={tmp_path / 'ckpt'}", f"log.out_dir={tmp_path / 'run'}"])
    res = convert_hf_to_orbax(tmp_path / "b", tmp_path / "ckpt", dtype="float32", mesh=mesh1,
                              optimizer=rl_optimizer_config(cfg))
    assert res.with_optimizer and os.path.isdir(tmp_path / "ckpt" / "0" / "opt_state")
    summary = run(cfg, devices=jax.devices()[:1])
    assert summary["global_step"] == 1
    _, abstract = abstract_params(res.config)
    target = params_target(abstract, mesh1)
    with Checkpointer(tmp_path / "ckpt") as ck:
        after, start = (ck.restore(s, params_target=target)["params"] for s in (1, 0))
    b = _tensors_of(tmp_path / "b" / "model.safetensors")
    a = _tensors_of(tmp_path / "a" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    got = np.asarray(after["layers"][0]["mlp"]["up_proj"]["kernel"][...]).T
    np.testing.assert_array_equal(np.asarray(start["layers"][0]["mlp"]["up_proj"]["kernel"][...]).T, b[key])
    assert np.abs(got - b[key]).max() < 1e-4 < np.abs(got - a[key]).max()
