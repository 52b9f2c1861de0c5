"""Per-module check: each folded weight, as stored, against its module's activation form.

Random probe vectors x go through the stored weight and through the activation form (the base
layer with the adapter around it). The check compares the change each makes to the base layer's
output: x·(W' - W)ᵀ against the adapter's own term, which is s·B·A·x for LoRA, (l - 1) ⊙ W·x for
output scaling and W·((l - 1) ⊙ x) for input scaling. Float32 arithmetic errors therefore stay
relative to the adapter's effect rather than to W. Each output i must lie within a rounding-error bound:

    |diff_i| <= (u + u32) * |x| * |W'_i| + (n + r + 2) * eps32 * |x| * (|D_i| + m_i) + bias terms

with |.| the Euclidean norm (by Cauchy-Schwarz it bounds the sum of |x_j| |W'_ij|), u the unit
roundoff of the stored dtype (one rounding of W'), u32 that of float32 (the fold's own rounding),
D = W' - W, n = in_features, r the LoRA rank and m_i the norm bound of the adapter term. A wrong rule,
scaling, transpose or target gives errors of the size of the adapter's effect, far above the bound.
Up to MAX_ROWS rows of each module are checked. Only the tensors of one module are in memory at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from foldkit.checkpoint import Checkpoint
from foldkit.plan import FoldPlan, FoldTask

PROBE_COUNT = 8
PROBE_SEED = 4321
MAX_ROWS = 256  # output rows checked per module
FLOAT32_EPS = torch.finfo(torch.float32).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    """Return the max relative error of rounding a real number to `dtype` (round to nearest)."""
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
    max_rows_per_module: int
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
        max_rows_per_module=MAX_ROWS,
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
    """Check one folded weight (and bias) as stored against the module's activation form.

    Up to MAX_ROWS output rows, spread evenly, are checked. A wrong rule, scaling, transpose or target
    changes every row, so the sample catches it while the check's cost stays a small part of a merge.
    """
    weight = _linear_layout(base_weight, task.fan_in_fan_out)
    out_features, in_features = weight.shape
    rows = _sample_rows(out_features)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(PROBE_COUNT, in_features, generator=generator)
    x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    expected, expected_magnitude, rank = _adapter_term(x, x_norm, weight.index_select(0, rows).float(), rows, task)

    merged = _linear_layout(stored_weight, task.fan_in_fan_out).index_select(0, rows).float()
    difference = merged - weight.index_select(0, rows).float()
    diff = x @ difference.T - expected
    rounding = unit_roundoff(stored_weight.dtype) + unit_roundoff(torch.float32)
    arithmetic = (in_features + rank + 2) * FLOAT32_EPS
    merged_norms = torch.linalg.vector_norm(merged, dim=1)
    difference_norms = torch.linalg.vector_norm(difference, dim=1)
    bound = rounding * x_norm * merged_norms + arithmetic * (x_norm * difference_norms + expected_magnitude)

    if stored_bias is not None:
        base_rows = None if base_bias is None else base_bias.index_select(0, rows)
        bias_diff, bias_bound = _bias_check(task, base_rows, stored_bias.index_select(0, rows), rows,
                                            stored_weight.dtype)
        diff = diff + bias_diff
        bound = bound + bias_bound
    bound = bound + torch.finfo(torch.float32).tiny
    absolute = diff.abs()
    return ModuleCheck(task.module, absolute.max().item(), (absolute / bound).max().item())


def _sample_rows(out_features: int) -> torch.Tensor:
    if out_features <= MAX_ROWS:
        return torch.arange(out_features)
    return torch.linspace(0, out_features - 1, MAX_ROWS).round().long().unique()


def _adapter_term(x: torch.Tensor, x_norm: torch.Tensor, weight_rows: torch.Tensor, rows: torch.Tensor,
                  task: FoldTask):
    """Compute the adapter's change to the sampled outputs without the bias, a bound on its size, and the rank."""
    adapter = task.adapter
    if adapter.kind == "lora":
        lora_A = adapter.tensors["lora_A"].float()
        lora_B = adapter.tensors["lora_B"].float().index_select(0, rows)
        term = adapter.scaling * ((x @ lora_A.T) @ lora_B.T)
        magnitude = abs(adapter.scaling) * x_norm * torch.linalg.vector_norm(lora_B, dim=1) * torch.linalg.norm(lora_A)
        return term, magnitude, lora_A.shape[0]

    scale = adapter.tensors["ia3_l"].float().reshape(-1) - 1
    weight_norms = torch.linalg.vector_norm(weight_rows, dim=1)
    if adapter.feedforward:
        scaled = x * scale
        return scaled @ weight_rows.T, torch.linalg.vector_norm(scaled, dim=1, keepdim=True) * weight_norms, 0
    scale = scale.index_select(0, rows)
    return (x @ weight_rows.T) * scale, x_norm * weight_norms * scale.abs(), 0


def _bias_check(task: FoldTask, base_bias: torch.Tensor | None, stored_bias: torch.Tensor, rows: torch.Tensor,
                dtype: torch.dtype):
    """Compare the bias change with the adapter's on the sampled rows; return the difference and its bound."""
    adapter = task.adapter
    stored = stored_bias.float()
    base = torch.zeros_like(stored) if base_bias is None else base_bias.float()
    if adapter.kind == "lora":
        lora_B_bias = adapter.tensors.get("lora_B_bias")
        expected = torch.zeros_like(stored)
        if lora_B_bias is not None:
            expected = adapter.scaling * lora_B_bias.float().index_select(0, rows)
    elif adapter.feedforward:
        expected = torch.zeros_like(stored)
    else:
        expected = (adapter.tensors["ia3_l"].float().reshape(-1).index_select(0, rows) - 1) * base
    rounding = unit_roundoff(dtype) + unit_roundoff(torch.float32)
    bound = rounding * stored.abs() + 4 * FLOAT32_EPS * (stored.abs() + base.abs() + expected.abs())
    return (stored - base) - expected, bound


def _linear_layout(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight
