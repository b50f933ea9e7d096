import pytest

from zipr1_jax.models.qwen_vl import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_presets_build_and_roundtrip_hf_dict(name):
    cfg = C.preset(name)
    back = C.QwenVLConfig.from_hf_config(cfg.to_hf_config(), name=cfg.name)
    assert back == cfg


def test_unknown_preset_names_choices():
    with pytest.raises(C.ConfigError, match="unknown"):
        C.preset("qwen3_vl")


def test_bad_fields_name_the_field():
    with pytest.raises(C.ConfigError, match="mrope_section"):
        C.tiny_qwen2_vl().text.__class__(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 2, 2))
    with pytest.raises(C.ConfigError, match="model_type"):
        C.QwenVLConfig.from_hf_config({"model_type": "llava"})
    hf = C.tiny_qwen2_vl().to_hf_config()
    hf["text_config"]["use_sliding_window"] = True
    with pytest.raises(C.ConfigError, match="sliding"):
        C.QwenVLConfig.from_hf_config(hf)


def test_config_is_hashable_static_arg():
    assert hash(C.tiny_qwen2_5_vl()) == hash(C.tiny_qwen2_5_vl())


def test_transformers_accepts_our_hf_dict():
    import transformers
    for cfg in (C.tiny_qwen2_vl(), C.tiny_qwen2_5_vl()):
        cls = transformers.Qwen2VLConfig if cfg.family == "qwen2_vl" else transformers.Qwen2_5_VLConfig
        assert C.QwenVLConfig.from_hf_config(cls(**cfg.to_hf_config()), name=cfg.name) == cfg
