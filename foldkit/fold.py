"""Fold rules: pure tensor functions that turn an adapter into an equivalent weight and bias.

Weights use nn.Linear's (out_features, in_features) layout unless `fan_in_fan_out` marks the stored
weight as transposed, as in GPT-2's Conv1D. Every rule computes in float32 (float64 stays float64) and
returns results in that compute dtype, so the caller casts once, at the end. No rule edits its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from foldkit.adapter import ModuleAdapter

FoldResult = tuple[torch.Tensor, "torch.Tensor | None"]
FoldRule = Callable[[torch.Tensor, "torch.Tensor | None", ModuleAdapter, bool], FoldResult]

FOLD_RULES: dict[str, FoldRule] = {}


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def fold_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *,
              fan_in_fan_out: bool = False, bias: torch.Tensor | None = None,
              lora_B_bias: torch.Tensor | None = None) -> FoldResult:
    """Return W' = W + s·B·A and b' = b + s·b_B without editing the inputs.

    Shapes: lora_A (r, in), lora_B (out, r), weight (out, in), or (in, out) with fan_in_fan_out.
    A LoRA bias on a layer without a bias yields a new bias s·b_B.
    """
    dtype = compute_dtype(weight, lora_A, lora_B)
    # One float32 copy of W, updated in place: the delta is never materialised as a separate tensor.
    new_weight = weight.to(dtype, copy=True)
    lora_A, lora_B = lora_A.to(new_weight.device, dtype), lora_B.to(new_weight.device, dtype)
    if fan_in_fan_out:
        new_weight.addmm_(lora_A.T, lora_B.T, alpha=scaling)
    else:
        new_weight.addmm_(lora_B, lora_A, alpha=scaling)

    new_bias = None if bias is None else bias.to(dtype)
    if lora_B_bias is not None:
        scaled = scaling * lora_B_bias.to(new_weight.device, dtype)
        new_bias = scaled if new_bias is None else new_bias + scaled
    return new_weight, new_bias


def fold_ia3(weight: torch.Tensor, ia3_l: torch.Tensor, *, feedforward: bool, fan_in_fan_out: bool = False,
             bias: torch.Tensor | None = None) -> FoldResult:
    """Return the IA3 weight form without editing the inputs.

    Output scaling (feedforward=False): W' = diag(l)·W and b' = l ⊙ b, with l of out_features values.
    Input scaling (feedforward=True): W' = W·diag(l) and b' = b, with l of in_features values.
    Both broadcast l over the weight instead of building diag(l).
    """
    dtype = compute_dtype(weight, ia3_l)
    new_weight = weight.to(dtype, copy=True)
    scale = ia3_l.to(new_weight.device, dtype).reshape(-1)
    # In (out, in) layout, output scaling multiplies rows and input scaling columns. Conv1D's (in, out)
    # layout swaps the two.
    scales_rows = feedforward == fan_in_fan_out
    new_weight.mul_(scale[:, None] if scales_rows else scale[None, :])

    new_bias = None if bias is None else bias.to(dtype)
    if new_bias is not None and not feedforward:
        new_bias = new_bias * scale
    return new_weight, new_bias


def register_rule(kind: str) -> Callable[[FoldRule], FoldRule]:
    def decorator(rule: FoldRule) -> FoldRule:
        FOLD_RULES[kind] = rule
        return rule

    return decorator


@register_rule("lora")
def _fold_lora_module(weight, bias, adapter: ModuleAdapter, fan_in_fan_out: bool) -> FoldResult:
    tensors = adapter.tensors
    return fold_lora(weight, tensors["lora_A"], tensors["lora_B"], adapter.scaling,
                     fan_in_fan_out=fan_in_fan_out, bias=bias, lora_B_bias=tensors.get("lora_B_bias"))


@register_rule("ia3")
def _fold_ia3_module(weight, bias, adapter: ModuleAdapter, fan_in_fan_out: bool) -> FoldResult:
    return fold_ia3(weight, adapter.tensors["ia3_l"], feedforward=adapter.feedforward,
                    fan_in_fan_out=fan_in_fan_out, bias=bias)


def describe_rule(adapter: ModuleAdapter) -> str:
    """Return the formula of a module's fold, for the report."""
    if adapter.kind == "lora":
        bias = ", b' = b + s*b_B" if "lora_B_bias" in adapter.tensors else ""
        return f"W' = W + s*B*A (s = {adapter.scaling:g}){bias}"
    if adapter.feedforward:
        return "W' = W*diag(l), b' = b (input scaling)"
    return "W' = diag(l)*W, b' = l*b (output scaling)"
