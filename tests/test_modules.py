"""Adapter layers: the activation and weight forms agree, and injection wraps each module once."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from foldkit.adapter import ModuleAdapter
from foldkit.modules import AdapterLayer, IA3Activation, IA3Weight, inject_adapters, inject_ia3, wrap_layer
from foldkit.tolerances import TOLERANCES

TOL = TOLERANCES[torch.float32]


def make_layer(kind: str, in_features: int = 6, out_features: int = 4) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    layer = Conv1D(out_features, in_features)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def random_adapter(kind: str, feedforward: bool, in_features: int = 6, out_features: int = 4) -> ModuleAdapter:
    generator = torch.Generator().manual_seed(1)
    if kind == "ia3":
        shape = (1, in_features) if feedforward else (out_features, 1)
        return ModuleAdapter("m", "ia3", {"ia3_l": torch.randn(shape, generator=generator)}, feedforward=feedforward)
    tensors = {
        "lora_A": torch.randn(2, in_features, generator=generator),
        "lora_B": torch.randn(out_features, 2, generator=generator),
        "lora_B_bias": torch.randn(out_features, generator=generator),
    }
    return ModuleAdapter("m", "lora", tensors, scaling=1.5)


@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
@pytest.mark.parametrize("adapter_kind,feedforward", [("ia3", False), ("ia3", True), ("lora", False)])
def test_forms_agree(layer_kind, adapter_kind, feedforward):
    adapter = random_adapter(adapter_kind, feedforward)
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(2))
    base = make_layer(layer_kind)

    activation = wrap_layer(base, adapter, "activation")(x)
    weight = wrap_layer(base, adapter, "weight")(x)

    torch.testing.assert_close(weight, activation, atol=TOL.atol, rtol=TOL.rtol)
    assert not torch.allclose(activation, base(x), atol=1e-3)


@pytest.mark.parametrize("adapter_kind,parameters", [("ia3", ("ia3_l",)), ("lora", ("lora_A", "lora_B"))])
def test_forms_have_same_gradients(adapter_kind, parameters):
    adapter = random_adapter(adapter_kind, feedforward=True)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    grads = {}
    for form in ("activation", "weight"):
        layer = wrap_layer(make_layer("linear"), adapter, form)
        layer(x).square().sum().backward()
        grads[form] = [getattr(layer, name).grad for name in parameters]

    for activation_grad, weight_grad in zip(grads["activation"], grads["weight"]):
        torch.testing.assert_close(weight_grad, activation_grad, atol=TOL.atol, rtol=TOL.rtol)


def test_wrapping_freezes_base_layer():
    layer = wrap_layer(make_layer("linear"), random_adapter("lora", False), "weight")

    assert not layer.base_layer.weight.requires_grad
    assert layer.lora_A.requires_grad


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj = nn.Linear(8, 4)
        self.v_proj = nn.Linear(8, 4)
        self.down_proj = nn.Linear(16, 8)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])


def test_inject_ia3_sets_feedforward_per_module():
    model = TinyModel()

    inject_ia3(model, ["k_proj", "v_proj", "down_proj"], ["down_proj"])

    block = model.layers[0]
    assert block.k_proj.feedforward is False
    assert block.v_proj.feedforward is False
    assert block.down_proj.feedforward is True
    assert block.k_proj.ia3_l.shape == (4,)
    assert block.down_proj.ia3_l.shape == (16,)


def test_inject_ia3_trainable_count():
    model = TinyModel()

    inject_ia3(model, ["k_proj", "v_proj", "down_proj"], ["down_proj"])

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == (4 + 4 + 16) * 2


def test_inject_twice_wraps_once():
    model = TinyModel()

    first = inject_ia3(model, ["k_proj"], [])
    second = inject_ia3(model, ["k_proj"], [])

    assert len(first) == 2
    assert second == []
    assert isinstance(model.layers[0].k_proj, IA3Activation)
    assert not isinstance(model.layers[0].k_proj.base_layer, AdapterLayer)


def test_inject_by_name_skips_wrapped():
    model = TinyModel()
    adapter = ModuleAdapter("layers.0.k_proj", "ia3", {"ia3_l": torch.full((4, 1), 2.0)})

    inject_adapters(model, {"layers.0.k_proj": adapter})
    again = inject_adapters(model, {"layers.0.k_proj": adapter, "layers.0.k_proj.base_layer": adapter})

    assert again == []
    assert not isinstance(model.layers[0].k_proj.base_layer, AdapterLayer)


def test_inject_weight_form():
    model = TinyModel()

    inject_ia3(model, ["v_proj"], [], form="weight")

    assert isinstance(model.layers[1].v_proj, IA3Weight)


def test_inject_ia3_regex_targets():
    model = TinyModel()

    wrapped = inject_ia3(model, r".*\.(k_proj|down_proj)", r".*down_proj")

    assert sorted(wrapped) == ["layers.0.down_proj", "layers.0.k_proj", "layers.1.down_proj", "layers.1.k_proj"]
    assert model.layers[1].down_proj.feedforward is True
