"""Per-module check: each folded weight, as stored, against its module's activation form.

Random probe vectors X go through the activation form (base weight and adapter, in float64) and
through the stored folded weight. Each output element must lie within a rounding-error bound:

    |y_merged - y_ref| <= u * (|X|·|W'|ᵀ + |b'|) + n * eps32 * (|X|·|W'|ᵀ + |b'| + m_ref)

where u is the unit roundoff of the stored dtype (one rounding of W'), n * eps32 bounds float32
summation error over n = in_features terms, and m_ref is the same magnitude sum for the reference.
A wrong rule, scaling, transpose or target gives errors of the size of the adapter's effect, far
above this bound. This check needs only one tensor in memory at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from foldkit.checkpoint import Checkpoint
from foldkit.plan import FoldPlan, FoldTask

PROBE_COUNT = 8
PROBE_SEED = 4321
FLOAT32_EPS = torch.finfo(torch.float32).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    """Max relative error of rounding a real number to `dtype` (round to nearest)."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


@dataclass
class ModuleCheck:
    module: str
    max_abs_diff: float
    max_bound_ratio: float  # max over outputs of |diff| / bound; the check passes when <= 1


@dataclass
class ModuleChecksResult:
    """Per-module figures: the worst module and the count checked."""

    modules_checked: int
    worst_module: str | None
    worst_bound_ratio: float
    max_abs_diff: float
    probe_vectors: int
    passed: bool
    failed_modules: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def check_modules(base: Checkpoint, merged: Checkpoint, plan: FoldPlan) -> ModuleChecksResult:
    """Check every folded module of `plan`, reading one base and one merged tensor at a time."""
    return summarize([check_module(base, merged, task) for task in plan.tasks])


def summarize(checks: list[ModuleCheck]) -> ModuleChecksResult:
    worst = max(checks, key=lambda check: check.max_bound_ratio, default=None)
    failed = [check.module for check in checks if not check.max_bound_ratio <= 1.0]
    return ModuleChecksResult(
        modules_checked=len(checks),
        worst_module=worst.module if worst else None,
        worst_bound_ratio=worst.max_bound_ratio if worst else 0.0,
        max_abs_diff=max((check.max_abs_diff for check in checks), default=0.0),
        probe_vectors=PROBE_COUNT,
        passed=not failed,
        failed_modules=failed,
    )


def check_module(base: Checkpoint, merged: Checkpoint, task: FoldTask) -> ModuleCheck:
    base_bias = base.read(task.source_bias) if task.source_bias else None
    merged_bias = merged.read(task.target_bias) if task.target_bias else None
    return check_module_tensors(task, base.read(task.source_weight), base_bias, merged.read(task.target_weight),
                                merged_bias)


def check_module_tensors(task: FoldTask, base_weight: torch.Tensor, base_bias: torch.Tensor | None,
                         stored_weight: torch.Tensor, stored_bias: torch.Tensor | None) -> ModuleCheck:
    """Check one folded weight (and bias) as stored against the module's activation form."""
    weight = _linear_layout(base_weight, task.fan_in_fan_out).double()
    bias = base_bias.double() if base_bias is not None else None
    stored = stored_weight
    merged_weight = _linear_layout(stored, task.fan_in_fan_out).double()
    merged_bias = stored_bias.double() if stored_bias is not None else None

    generator = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(PROBE_COUNT, weight.shape[1], generator=generator, dtype=torch.float64)
    reference, reference_magnitude = _activation_form(x, weight, bias, task)
    output = x @ merged_weight.T
    magnitude = x.abs() @ merged_weight.abs().T
    if merged_bias is not None:
        output = output + merged_bias
        magnitude = magnitude + merged_bias.abs()

    summation = weight.shape[1] * FLOAT32_EPS
    bound = unit_roundoff(stored.dtype) * magnitude + summation * (magnitude + reference_magnitude)
    bound = bound + torch.finfo(torch.float32).tiny
    diff = (output - reference).abs()
    return ModuleCheck(task.module, diff.max().item(), (diff / bound).max().item())


def _linear_layout(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _activation_form(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, task: FoldTask):
    """Compute the module's output with the adapter applied around the layer, and the magnitude sum for the bound."""
    adapter = task.adapter
    bias_abs = 0 if bias is None else bias.abs()
    if adapter.kind == "ia3":
        scale = adapter.tensors["ia3_l"].double().reshape(-1)
        if adapter.feedforward:
            scaled = x * scale
            out = scaled @ weight.T + (0 if bias is None else bias)
            return out, scaled.abs() @ weight.abs().T + bias_abs
        out = (x @ weight.T + (0 if bias is None else bias)) * scale
        return out, (x.abs() @ weight.abs().T + bias_abs) * scale.abs()

    lora_A = adapter.tensors["lora_A"].double()
    lora_B = adapter.tensors["lora_B"].double()
    lora_B_bias = adapter.tensors.get("lora_B_bias")
    update = (x @ lora_A.T) @ lora_B.T
    update_magnitude = (x.abs() @ lora_A.abs().T) @ lora_B.abs().T
    if lora_B_bias is not None:
        update = update + lora_B_bias.double()
        update_magnitude = update_magnitude + lora_B_bias.double().abs()
    out = x @ weight.T + (0 if bias is None else bias) + adapter.scaling * update
    magnitude = x.abs() @ weight.abs().T + bias_abs + abs(adapter.scaling) * update_magnitude
    return out, magnitude
