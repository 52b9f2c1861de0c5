"""foldkit memory: the estimates equal the bytes that real forward passes allocate, and the Gemma-2B case."""

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

from foldkit.adapter import ModuleAdapter
from foldkit.cli import app
from foldkit.memory import crossover, estimate_memory, form_costs
from foldkit.modules import wrap_layer

runner = CliRunner()


class NewStorageBytes(TorchDispatchMode):
    """Sum the bytes of every storage an op creates (views and in-place results share their input's)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        existing = {tensor.untyped_storage().data_ptr() for tensor in tensors}
        output = func(*args, **(kwargs or {}))
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in existing:
                self.total += value.untyped_storage().nbytes()
        return output


def make_adapter(method, feedforward, dtype, in_features, out_features, rank):
    generator = torch.Generator().manual_seed(0)
    if method == "ia3":
        shape = (1, in_features) if feedforward else (out_features, 1)
        return ModuleAdapter("m", "ia3", {"ia3_l": torch.rand(shape, generator=generator).to(dtype)},
                             feedforward=feedforward)
    tensors = {"lora_A": torch.rand(rank, in_features, generator=generator).to(dtype),
               "lora_B": torch.rand(out_features, rank, generator=generator).to(dtype)}
    return ModuleAdapter("m", "lora", tensors, scaling=2.0)


CASES = [(method, form, feedforward, dtype, bias)
         for method, feedforwards in (("ia3", (False, True)), ("lora", (False,)))
         for form in ("activation", "weight")
         for feedforward in feedforwards
         for dtype in (torch.float32, torch.bfloat16)
         for bias in (False, True)]


@pytest.mark.parametrize("method,form,feedforward,dtype,bias", CASES)
def test_estimate_equals_allocated_bytes(method, form, feedforward, dtype, bias):
    in_features, out_features, rank, batch, sequence = 24, 40, 4, 3, 5
    layer = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    wrapped = wrap_layer(layer, make_adapter(method, feedforward, dtype, in_features, out_features, rank), form)
    x = torch.rand(batch, sequence, in_features).to(dtype)

    with torch.no_grad(), NewStorageBytes() as counter:
        wrapped(x)

    activation, weight = form_costs(method, in_features, out_features, feedforward, dtype.itemsize, rank, bias)
    expected = (activation if form == "activation" else weight).at(batch * sequence)
    assert counter.total == expected


def test_crossover_is_first_cheaper_size():
    activation, weight = form_costs("ia3", 2048, 256, False, 2, 8, False)
    tokens = crossover(activation, weight)

    assert weight.at(tokens) < activation.at(tokens)
    assert weight.at(tokens - 1) >= activation.at(tokens - 1)


GEMMA_2B = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 2048,
            "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
            "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "dtype": "bfloat16"}


@pytest.fixture
def gemma_2b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA_2B))
    return tmp_path


def test_gemma_2b_worked_case(gemma_2b_config):
    estimate = estimate_memory(gemma_2b_config, "ia3", ["k_proj", "v_proj", "down_proj"], ["down_proj"],
                               batch=32, sequence=216, dtype=torch.bfloat16)

    kinds = {kind.name: kind for kind in estimate.kinds}
    assert kinds["k_proj"].activation_form_bytes + kinds["v_proj"].activation_form_bytes == 14_155_776
    assert kinds["down_proj"].activation_form_bytes == 254_803_968
    assert estimate.activation_form_bytes == 18 * (14_155_776 + 254_803_968)
    assert f"{estimate.activation_form_bytes / 2**30:.2f}" == "4.51"
    # 368,640 would mean k and v got input-width vectors: one feedforward flag applied to every module.
    assert estimate.trainable_parameters == (256 + 256 + 16384) * 18 == 304_128
    assert kinds["down_proj"].feedforward is True
    assert kinds["k_proj"].feedforward is False


def test_memory_cli_prints_figures(gemma_2b_config):
    result = runner.invoke(app, ["memory", str(gemma_2b_config / "config.json"), "--method", "ia3",
                                 "--targets", "k_proj,v_proj,down_proj", "--feedforward", "down_proj",
                                 "--batch", "32", "--seq", "216", "--dtype", "bfloat16"])

    assert result.exit_code == 0, result.output
    assert "7,077,888 bytes per module" in result.stdout
    assert "254,803,968 bytes per module" in result.stdout
    assert "(4.51 GiB)" in result.stdout
    assert "trainable parameters: 304,128" in result.stdout
    assert "the weight form is cheaper from batch x sequence" in result.stdout


def test_memory_cli_json(gemma_2b_config):
    result = runner.invoke(app, ["memory", str(gemma_2b_config), "--method", "lora", "--targets", "q_proj,v_proj",
                                 "--rank", "16", "--batch", "4", "--seq", "128", "--json"])

    report = json.loads(result.stdout)
    assert result.exit_code == 0
    assert report["trainable_parameters"] == 18 * 16 * ((2048 + 2048) + (2048 + 256))
    assert report["gradient_bytes"] == 4 * report["trainable_parameters"]


def test_memory_unknown_target_rejected(gemma_2b_config):
    result = runner.invoke(app, ["memory", str(gemma_2b_config), "--targets", "k_proj,wq"])

    assert result.exit_code == 1
    assert "targets wq match no Linear or Conv1D module" in result.stderr


def test_same_name_different_shapes(tmp_path):
    # GPT-2's attn.c_proj is (32 -> 32) and mlp.c_proj is (128 -> 32): each is costed with its own shape.
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
              "n_positions": 64, "vocab_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))

    estimate = estimate_memory(tmp_path, "ia3", ["c_attn", "c_proj"], ["c_proj"], batch=1, sequence=8,
                               dtype=torch.float32)

    assert estimate.trainable_parameters == 2 * (96 + 32 + 128)
    assert sorted(kind.in_features for kind in estimate.kinds if kind.name.startswith("c_proj")) == [32, 128]
