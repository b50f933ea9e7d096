"""TrainConfig validation and the YAML / dotted-override loader."""

import os

import pytest

from zipr1_jax.train import cli
from zipr1_jax.train.config import DEFAULT_P_GRID, MeshSection, TrainConfig, TrainConfigError


def test_shipped_configs_parse():
    paths = cli.shipped_configs()
    names = {os.path.basename(p) for p in paths}
    assert {"default.yaml", "qwen2_vl_7b_tpu_v4.yaml", "qwen2_5_vl_3b_tpu_v5e.yaml",
            "qwen2_5_vl_7b_tpu_v5e.yaml", "qwen2_5_vl_7b_8xgpu.yaml"} <= names
    for path in paths:
        cfg = cli.load_config(path)
        assert isinstance(cfg, TrainConfig)
        hash(cfg)  # frozen + tuples: usable as a static jit argument


def test_default_yaml_equals_embedded_default():
    assert cli.load_config(os.path.join(cli.CONFIG_DIR, "default.yaml")) == TrainConfig()
    assert cli.parse_args([]) == TrainConfig()


def test_default_values():
    cfg = TrainConfig()
    assert cfg.model.preset == "tiny_qwen2_vl_demo" and cfg.model.is_tiny
    assert cfg.model.model_config().text.num_hidden_layers == 4
    # the demo: vision-heavy prompts, the pathwise term on, anchored to the dense reference
    assert cfg.data.tasks == ("spot_color",) and cfg.data.image_size == (168, 168) and cfg.data.system_prompt is None
    assert cfg.rl.lambda_path > 0 and cfg.rl.beta_kl == 0.5 and cfg.eval.num_examples >= 256
    assert cfg.sparsity.p_eval == 0.975
    assert cfg.sparsity.p_grid == DEFAULT_P_GRID == (0.94, 0.945, 0.95, 0.955, 0.96, 0.965, 0.97, 0.975)
    assert cfg.data.group_size == 8 and cfg.sft.steps > 0 and cfg.rl.steps > 0
    assert cfg.checkpoint_dir == os.path.join("runs/default", "checkpoints")


def test_real_configs_build_their_model_configs():
    for name, preset in [("qwen2_5_vl_7b_tpu_v5e.yaml", "qwen2_5_vl_7b"), ("qwen2_vl_7b_tpu_v4.yaml", "qwen2_vl_7b")]:
        cfg = cli.load_config(os.path.join(cli.CONFIG_DIR, name))
        mc = cfg.model.model_config()
        assert mc.name == preset and mc.dtype == "bfloat16"


def test_overrides_apply_and_coerce():
    cfg = cli.parse_args(["rl.steps=5", "mesh.fsdp=2", "rl.lr=1e-5", "sparsity.p_grid=[0.9,0.95]",
                          "data.group_size=2", "model.hf_dir=/tmp/x", "rl.gate=false", "eval.p_list=[1]"])
    assert cfg.rl.steps == 5 and cfg.mesh.fsdp == 2 and cfg.rl.lr == pytest.approx(1e-5)
    assert cfg.sparsity.p_grid == (0.9, 0.95) and isinstance(cfg.sparsity.p_grid, tuple)
    assert cfg.model.hf_dir == "/tmp/x" and cfg.rl.gate is False and cfg.eval.p_list == (1.0,)
    # Overrides win over the YAML.
    path = os.path.join(cli.CONFIG_DIR, "qwen2_5_vl_7b_8xgpu.yaml")
    assert cli.load_config(path, ["mesh.fsdp=4", "mesh.data=2"]).mesh.data == 2


@pytest.mark.parametrize("override, needle", [
    ("rl.stepz=5", "'rl.stepz'; did you mean 'steps'"),
    ("rll.steps=5", "'rll'; did you mean 'rl'"),
    ("sparsity.p_gird=[0.9]", "did you mean 'p_grid'"),
    ("rl=3", "whole section"),
    ("rl.steps.x=3", "is a value, not a section"),
    ("nonsense", "section.key=value"),
])
def test_unknown_keys_error(override, needle):
    with pytest.raises(TrainConfigError, match=None) as e:
        cli.parse_args([override])
    assert needle in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rl:\n  stpes: 3\n")
    with pytest.raises(TrainConfigError, match=r"unknown config key 'rl.stpes'; did you mean 'steps'"):
        cli.load_config(p)
    with pytest.raises(TrainConfigError, match="does not exist"):
        cli.load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, field", [
    ("rl.lr=-1", "rl.lr"),
    ("rl.eps_clip_low=1.5", "rl.eps_clip_low"),
    ("rl.advantage=ppo", "rl.advantage"),
    ("rl.aggregation=mean", "rl.aggregation"),
    ("rl.top_p=0", "rl.top_p"),
    ("rl.max_new_tokens=0", "rl.max_new_tokens"),
    ("rl.steps=2.5", "rl.steps"),
    ("rl.gate=maybe", "rl.gate"),
    ("sparsity.p_eval=1.5", "sparsity.p_eval"),
    ("sparsity.p_grid=[0.9,0.0,0.95,0.96,0.97,0.98,0.99,1.0]", "sparsity.p_grid[1]"),
    ("sparsity.mode=xyz", "sparsity.mode"),
    ("sparsity.backend=cuda", "sparsity.backend"),
    ("data.group_size=4", "sparsity.p_grid"),  # 8 thresholds but G = 4
    ("data.image_size=[10,56]", "data.image_size"),
    ("data.length_buckets=[128,64]", "data.length_buckets"),
    ("data.source=jsonl", "data.path"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("mesh.data=-1", "mesh"),  # two -1 axes
    ("model.preset=qwen9", "model.preset"),
    ("model.dtype=int8", "model.dtype"),
    ("rl.grad_accum=3", "rl.grad_accum"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("eval.p_list=[]", "eval.p_list"),
])
def test_impossible_values_error(override, field):
    with pytest.raises(TrainConfigError) as e:
        cli.parse_args([override])
    assert str(e.value).startswith(f"{field}:") or f"{field}:" in str(e.value), str(e.value)


def test_single_budget_and_group_of_two():
    cfg = cli.parse_args(["sparsity.budget=single", "data.group_size=2"])
    assert cfg.data.group_size == 2
    with pytest.raises(TrainConfigError, match="data.group_size"):
        cli.parse_args(["sparsity.budget=single", "data.group_size=1"])


def test_mesh_resolve():
    assert MeshSection(data=2, fsdp=-1, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert MeshSection().resolve(1) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(TrainConfigError, match="mesh.fsdp: -1 cannot fill 8 devices"):
        MeshSection(data=3, fsdp=-1).resolve(8)
    with pytest.raises(TrainConfigError, match=r"mesh: data\*fsdp\*tensor = 2\*2\*1 = 4 but 8"):
        MeshSection(data=2, fsdp=2).resolve(8)


def test_yaml_round_trip(tmp_path):
    cfg = cli.parse_args(["rl.steps=7", "sparsity.layers=[0,1]", "model.layers=2"])
    p = tmp_path / "saved.yaml"
    p.write_text(cli.to_yaml(cfg))
    assert cli.load_config(p) == cfg
    with pytest.raises(TrainConfigError, match="sparsity.layers: indices \\[3\\]"):
        cli.parse_args(["sparsity.layers=[0,3]", "model.layers=2"])


def test_check_runnable(tmp_path):
    TrainConfig().check_runnable()  # the tiny default needs nothing on disk
    real = cli.load_config(os.path.join(cli.CONFIG_DIR, "qwen2_5_vl_7b_8xgpu.yaml"))
    with pytest.raises(TrainConfigError, match="model.hf_dir: preset 'qwen2_5_vl_7b' is a real model"):
        real.check_runnable()
    d = tmp_path / "qwen"
    d.mkdir()
    cfg = cli.load_config(os.path.join(cli.CONFIG_DIR, "qwen2_5_vl_7b_8xgpu.yaml"), [f"model.hf_dir={d}"])
    with pytest.raises(TrainConfigError, match="no config.json"):
        cfg.check_runnable()
    (d / "config.json").write_text("{}")
    with pytest.raises(TrainConfigError, match="no \\*.safetensors"):
        cfg.check_runnable()
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(TrainConfigError, match="data.tokenizer: .* has no tokenizer files"):
        cfg.check_runnable()
    (d / "tokenizer.json").write_text("{}")
    cfg.check_runnable()
    assert cfg.tokenizer_dir() == str(d)
    with pytest.raises(TrainConfigError, match="data.path"):
        cli.parse_args(["data.source=jsonl", f"data.path={tmp_path}/none.jsonl"]).check_runnable()
