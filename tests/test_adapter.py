"""Adapter reading agrees with what the installed PEFT builds: keys, shapes, scaling, feedforward flags."""

import json

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from foldkit.adapter import load_adapter
from foldkit.errors import AdapterError, UnsupportedAdapterError

TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def peft_model(config):
    torch.manual_seed(0)
    return get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), config)


def peft_layers(model):
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "base_layer") and not name.endswith("base_layer")}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_scaling_matches_peft(tmp_path, use_rslora):
    config = LoraConfig(r=4, lora_alpha=12, use_rslora=use_rslora, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 8},
                        alpha_pattern={"down_proj": 5})
    model = peft_model(config)
    model.save_pretrained(tmp_path)

    adapter = load_adapter(tmp_path)

    layers = peft_layers(model)
    assert adapter.modules.keys() == layers.keys()
    for name, layer in layers.items():
        assert adapter.modules[name].scaling == pytest.approx(layer.scaling["default"], rel=1e-12), name
        assert torch.equal(adapter.modules[name].tensors["lora_A"], layer.lora_A["default"].weight.detach())
        assert torch.equal(adapter.modules[name].tensors["lora_B"], layer.lora_B["default"].weight.detach())


def test_lora_keys_have_peft_prefix(tmp_path):
    peft_model(LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()

    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys


@pytest.mark.parametrize("feedforward", [["down_proj"], r".*\.down_proj"])
def test_ia3_feedforward_matches_peft(tmp_path, feedforward):
    targets = ["k_proj", "v_proj", "down_proj"] if isinstance(feedforward, list) else r".*\.(k_proj|v_proj|down_proj)"
    model = peft_model(IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False))
    model.save_pretrained(tmp_path)

    adapter = load_adapter(tmp_path)

    layers = peft_layers(model)
    assert adapter.modules.keys() == layers.keys()
    for name, layer in layers.items():
        assert adapter.modules[name].feedforward == layer.is_feedforward, name
        assert adapter.modules[name].tensors["ia3_l"].shape == layer.ia3_l["default"].shape


def test_lora_rank_mismatch_with_config(tmp_path):
    peft_model(LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))

    with pytest.raises(AdapterError, match="r=8 but lora_A has rank 4"):
        load_adapter(tmp_path)


def test_ia3_flag_contradicts_shape(tmp_path):
    peft_model(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["feedforward_modules"] = ["k_proj", "down_proj"]
    config_path.write_text(json.dumps(config))

    with pytest.raises(AdapterError, match="k_proj: ia3_l has shape"):
        load_adapter(tmp_path)


def test_dora_is_rejected(tmp_path):
    peft_model(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path)

    with pytest.raises(UnsupportedAdapterError, match="use_dora"):
        load_adapter(tmp_path)
