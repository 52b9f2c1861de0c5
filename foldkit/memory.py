"""Estimate what each adapter form costs in memory, from a model's config alone.

The figures count the bytes of the tensors that one forward pass of each wrapper in foldkit/modules.py
creates, besides its inputs and parameters. The formulas follow those modules op by op; a test counts
the allocations of real forward passes and compares. With T = batch x sequence, d the model dtype's
size in bytes, and a layer of in_features `in` and out_features `out`:

- IA3 activation form, output scaling: layer output and scaled output, 2·T·out·d.
- IA3 activation form, input scaling: scaled input and layer output, T·in·d + T·out·d.
- IA3 weight form: a float32 copy of W (out·in·4), W' cast back to d when d is not 4 bytes
  (out·in·d), l in float32 when d is not 4 bytes (n·4), bias copies, and the output T·out·d.
- LoRA activation form: layer output, x·Aᵀ, B·(x·Aᵀ), the scaled update and the sum: 4·T·out·d + T·r·d.
- LoRA weight form: a float32 copy of W, A and B in float32 when d is not 4 bytes, W' cast back to d,
  and the output T·out·d.

Training state: parameters in the model dtype, gradients and both Adam moments in float32.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from foldkit.checkpoint import read_config
from foldkit.errors import InputError, UsageError
from foldkit.model_info import load_model_config, resolve_model_class
from foldkit.patterns import is_feedforward, matches_module_list

FLOAT32_BYTES = 4


@dataclass
class FormCost:
    """Bytes one forward creates, as a T-dependent part and a fixed part: per_token * T + fixed."""

    per_token: int
    fixed: int
    formula: str

    def at(self, tokens: int) -> int:
        return self.per_token * tokens + self.fixed


@dataclass
class ModuleKindEstimate:
    """One targeted module kind (a target entry such as k_proj) in one block, and its two forms."""

    name: str
    modules_per_block: int
    in_features: int
    out_features: int
    feedforward: bool
    trainable_parameters: int  # per module
    activation_form_bytes: int  # per module, one forward
    weight_form_bytes: int
    activation_formula: str
    weight_formula: str
    crossover_tokens: int | None  # batch x sequence above which the weight form is cheaper; None: never


@dataclass
class MemoryEstimate:
    method: str
    dtype: str
    batch: int
    sequence: int
    blocks: int
    kinds: list[ModuleKindEstimate] = field(default_factory=list)
    trainable_parameters: int = 0
    activation_form_bytes: int = 0  # whole model, one forward
    weight_form_bytes: int = 0
    parameter_bytes: int = 0
    gradient_bytes: int = 0
    adam_moment_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def form_costs(method: str, in_features: int, out_features: int, feedforward: bool, dtype_bytes: int,
               rank: int, has_bias: bool) -> tuple[FormCost, FormCost]:
    """Return the cost of the activation form and of the weight form of one module."""
    d = dtype_bytes
    converts = d != FLOAT32_BYTES
    weight_fixed = in_features * out_features * FLOAT32_BYTES + (in_features * out_features * d if converts else 0)
    weight_text = f"out*in*4{' + out*in*' + str(d) if converts else ''}"
    if has_bias and converts:
        # The bias is copied to float32 for the fold and back to d for F.linear.
        weight_fixed += out_features * FLOAT32_BYTES + out_features * d
        weight_text += " + bias copies"

    if method == "ia3":
        width = in_features if feedforward else out_features
        if converts:
            weight_fixed += width * FLOAT32_BYTES
            weight_text += f" + {'in' if feedforward else 'out'}*4"
        if has_bias and not feedforward:
            weight_fixed += out_features * FLOAT32_BYTES
        weight = FormCost(out_features * d, weight_fixed, f"T*out*{d} + {weight_text}")
        if feedforward:
            activation = FormCost((in_features + out_features) * d, 0, f"T*(in + out)*{d}")
        else:
            activation = FormCost(2 * out_features * d, 0, f"2*T*out*{d}")
        return activation, weight

    if converts:
        weight_fixed += rank * (in_features + out_features) * FLOAT32_BYTES
        weight_text += " + r*(in + out)*4"
    weight = FormCost(out_features * d, weight_fixed, f"T*out*{d} + {weight_text}")
    activation = FormCost((4 * out_features + rank) * d, 0, f"T*(4*out + r)*{d}")
    return activation, weight


def crossover(activation: FormCost, weight: FormCost) -> int | None:
    """Return the smallest T at which the weight form creates fewer bytes than the activation form."""
    slope = activation.per_token - weight.per_token
    if slope <= 0:
        return None
    return (weight.fixed - activation.fixed) // slope + 1


def estimate_memory(model_dir_or_config: str | Path, method: str, targets: list[str], feedforward: list[str],
                    batch: int, sequence: int, dtype: torch.dtype, rank: int = 8) -> MemoryEstimate:
    """Estimate adapter memory for a model described by a config.json (no weights needed)."""
    if method not in ("ia3", "lora"):
        raise UsageError(f"unsupported method {method!r}; choose ia3 or lora")
    if not targets:
        raise UsageError("--targets is empty; name at least one module, such as k_proj")
    modules, blocks = _linear_modules(Path(model_dir_or_config))
    d = torch.empty((), dtype=dtype).element_size()
    estimate = MemoryEstimate(method, str(dtype).removeprefix("torch."), batch, sequence, blocks)

    # One kind per target entry and layer shape: GPT-2's attn.c_proj and mlp.c_proj share a name.
    kinds: OrderedDict[tuple, list[tuple[str, nn.Module]]] = OrderedDict()
    for name, module in modules.items():
        entry = next((target for target in targets if matches_module_list(name, [target])), None)
        if entry is not None:
            key = (entry, *_features(module), is_feedforward(name, feedforward))
            kinds.setdefault(key, []).append((name, module))
    unmatched = [target for target in targets if not any(key[0] == target for key in kinds)]
    if unmatched:
        raise InputError(f"targets {', '.join(unmatched)} match no Linear or Conv1D module of this model")

    tokens = batch * sequence
    shared_names = {key[0] for key in kinds if sum(other[0] == key[0] for other in kinds) > 1}
    for key, members in kinds.items():
        name, module = members[0]
        entry = key[0] if key[0] not in shared_names else f"{key[0]} ({key[1]}x{key[2]})"
        in_features, out_features = _features(module)
        is_ff = is_feedforward(name, feedforward)
        has_bias = getattr(module, "bias", None) is not None
        activation, weight = form_costs(method, in_features, out_features, is_ff, d, rank, has_bias)
        if method == "ia3":
            params = in_features if is_ff else out_features
        else:
            params = rank * (in_features + out_features)
        kind = ModuleKindEstimate(entry, len(members) // max(blocks, 1) or len(members), in_features, out_features,
                                  is_ff, params, activation.at(tokens), weight.at(tokens), activation.formula,
                                  weight.formula, crossover(activation, weight))
        estimate.kinds.append(kind)
        estimate.trainable_parameters += params * len(members)
        estimate.activation_form_bytes += activation.at(tokens) * len(members)
        estimate.weight_form_bytes += weight.at(tokens) * len(members)

    estimate.parameter_bytes = estimate.trainable_parameters * d
    estimate.gradient_bytes = estimate.trainable_parameters * FLOAT32_BYTES
    estimate.adam_moment_bytes = 2 * estimate.trainable_parameters * FLOAT32_BYTES
    return estimate


def _linear_modules(path: Path) -> tuple[dict[str, nn.Module], int]:
    if path.is_file() and path.name != "config.json":
        raise InputError(f"{path} is not a config.json: pass a model directory or its config.json")
    directory = path.parent if path.is_file() else path
    config = read_config(directory, role="model")
    _, model_class = resolve_model_class(config, directory)
    hf_config = load_model_config(directory)
    with torch.device("meta"):
        model = model_class.from_config(hf_config) if hasattr(model_class, "from_config") else model_class(hf_config)
    modules = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    blocks = getattr(hf_config.get_text_config(), "num_hidden_layers", 1) or 1
    return modules, blocks


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features
