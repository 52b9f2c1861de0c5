"""Adapter layers as nn.Modules wrapping a frozen Linear or Conv1D layer, in two equivalent forms.

Activation form: scale the layer's output or input (IA3), or add s·B·A·x (LoRA), on every forward.
Weight form: compute the folded weight and bias from the same parameters on every forward, then run
one F.linear. foldkit uses the activation form as the unmerged reference when it verifies a merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from foldkit.adapter import ModuleAdapter
from foldkit.errors import UnsupportedAdapterError, UsageError
from foldkit.fold import fold_ia3, fold_lora
from foldkit.patterns import is_feedforward, matches_module_list

FORMS = ("activation", "weight")


class AdapterLayer(nn.Module):
    """Base class of the wrappers. The frozen layer is `base_layer`."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise UnsupportedAdapterError(f"cannot wrap a {type(base_layer).__name__}: only Linear and Conv1D")
        self.base_layer = base_layer
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)


class IA3Activation(AdapterLayer):
    """y = l ⊙ layer(x) (output scaling) or y = layer(l ⊙ x) (input scaling, feedforward)."""

    def __init__(self, base_layer: nn.Module, ia3_l: torch.Tensor, feedforward: bool):
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(ia3_l.detach().clone().reshape(-1))

    def as_module_adapter(self) -> ModuleAdapter:
        return ModuleAdapter("", "ia3", {"ia3_l": self.ia3_l.detach()}, feedforward=self.feedforward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base_layer(x * self.ia3_l.to(x.dtype))
        out = self.base_layer(x)
        return out * self.ia3_l.to(out.dtype)


class IA3Weight(IA3Activation):
    """y = x·W'ᵀ + b' with W' and b' folded from l on every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = fold_ia3(self.base_layer.weight, self.ia3_l, feedforward=self.feedforward,
                                fan_in_fan_out=self.fan_in_fan_out, bias=self.base_layer.bias)
        return _linear(x, weight, bias, self.fan_in_fan_out)


class LoRAActivation(AdapterLayer):
    """y = layer(x) + s·(B·A·x + b_B)."""

    def __init__(self, base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 lora_B_bias: torch.Tensor | None = None):
        super().__init__(base_layer)
        self.scaling = scaling
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())
        self.lora_B_bias = None if lora_B_bias is None else nn.Parameter(lora_B_bias.detach().clone())

    def as_module_adapter(self) -> ModuleAdapter:
        tensors = {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach()}
        if self.lora_B_bias is not None:
            tensors["lora_B_bias"] = self.lora_B_bias.detach()
        return ModuleAdapter("", "lora", tensors, scaling=self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        lora_B_bias = None if self.lora_B_bias is None else self.lora_B_bias.to(x.dtype)
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype), lora_B_bias)
        return out + self.scaling * update


class LoRAWeight(LoRAActivation):
    """y = x·W'ᵀ + b' with W' = W + s·B·A folded on every forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = fold_lora(self.base_layer.weight, self.lora_A, self.lora_B, self.scaling,
                                 fan_in_fan_out=self.fan_in_fan_out, bias=self.base_layer.bias,
                                 lora_B_bias=self.lora_B_bias)
        return _linear(x, weight, bias, self.fan_in_fan_out)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool) -> torch.Tensor:
    if fan_in_fan_out:
        weight = weight.T
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight.to(x.dtype), bias)


def wrap_layer(base_layer: nn.Module, adapter: ModuleAdapter, form: str) -> AdapterLayer:
    """Wrap one layer with the adapter's activation or weight form."""
    if form not in FORMS:
        raise UsageError(f"invalid adapter form {form!r}; choose one of {', '.join(FORMS)}")
    tensors = adapter.tensors
    if adapter.kind == "ia3":
        layer_class = IA3Activation if form == "activation" else IA3Weight
        return layer_class(base_layer, tensors["ia3_l"], adapter.feedforward)
    layer_class = LoRAActivation if form == "activation" else LoRAWeight
    return layer_class(base_layer, tensors["lora_A"], tensors["lora_B"], adapter.scaling, tensors.get("lora_B_bias"))


def inject_adapters(model: nn.Module, adapters: Mapping[str, ModuleAdapter], form: str = "activation") -> list[str]:
    """Replace each named module of `model` with its wrapped form, in place; return the names wrapped.

    Each module gets its own settings (including the feedforward flag). A module that is already
    wrapped, or that sits inside a wrapper, is never wrapped again.
    """
    targets = []
    for name, adapter in adapters.items():
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) or _inside_wrapper(model, name):
            continue
        targets.append((name, wrap_layer(module, adapter, form)))
    for name, wrapped in targets:
        _set_submodule(model, name, wrapped)
    return [name for name, _ in targets]


def inject_ia3(model: nn.Module, target_modules: str | Iterable[str], feedforward_modules: str | Iterable[str],
               form: str = "activation") -> list[str]:
    """Wrap every Linear/Conv1D whose name matches `target_modules` with a new IA3 layer (l = 1).

    The feedforward flag is decided per module from `feedforward_modules`, with PEFT's rules.
    """
    adapters = {}
    for name, module in _target_layers(model, target_modules):
        feedforward = is_feedforward(name, feedforward_modules)
        width = _in_features(module) if feedforward else _out_features(module)
        shape = (1, width) if feedforward else (width, 1)
        ia3_l = torch.ones(shape, dtype=module.weight.dtype, device=module.weight.device)
        adapters[name] = ModuleAdapter(name, "ia3", {"ia3_l": ia3_l}, feedforward=feedforward)
    return inject_adapters(model, adapters, form)


def inject_lora(model: nn.Module, target_modules: str | Iterable[str], rank: int, lora_alpha: float,
                form: str = "activation", use_rslora: bool = False, seed: int = 0) -> list[str]:
    """Wrap every Linear/Conv1D whose name matches `target_modules` with a new LoRA layer.

    A is drawn like PEFT's default (Kaiming-uniform with a = sqrt(5)) and B is zero, so the wrapped
    model starts equal to the base. The scaling is lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
    """
    generator = torch.Generator().manual_seed(seed)
    scaling = lora_alpha / (rank ** 0.5 if use_rslora else rank)
    adapters = {}
    for name, module in _target_layers(model, target_modules):
        in_features, out_features = _in_features(module), _out_features(module)
        bound = (6 / ((1 + 5) * in_features)) ** 0.5  # kaiming_uniform_ with a = sqrt(5)
        lora_A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        lora_B = torch.zeros(out_features, rank)
        dtype, device = module.weight.dtype, module.weight.device
        tensors = {"lora_A": lora_A.to(device, dtype), "lora_B": lora_B.to(device, dtype)}
        adapters[name] = ModuleAdapter(name, "lora", tensors, scaling=scaling)
    return inject_adapters(model, adapters, form)


def _target_layers(model: nn.Module, target_modules: str | Iterable[str]) -> list[tuple[str, nn.Module]]:
    """Return the unwrapped Linear and Conv1D layers whose names match `target_modules` (PEFT's rules)."""
    layers = []
    for name, module in model.named_modules():
        if not matches_module_list(name, target_modules) or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if not _inside_wrapper(model, name):
            layers.append((name, module))
    return layers


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for end in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:end])), AdapterLayer):
            return True
    return False


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]
