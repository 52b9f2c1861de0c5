"""Tolerances of the equivalence checks, keyed by the dtype the merged weights are stored in.

Both models run in float32 during verification, so the only expected differences come from float32
summation order and from rounding the folded weights to the stored dtype once. A check passes when
max|merged - reference| <= atol + rtol * max|reference| + NOISE_FACTOR * rounding_sensitivity over
all compared outputs. rounding_sensitivity is measured on the model itself: how far the reference
moves when each folded weight gets random noise the size of one rounding to the stored dtype. Deep
models with strong adapters amplify rounding (measured: random non-identity IA3 on SmolLM2-135M moves
bfloat16 logits by 18% of max|logit|), so no fixed rtol fits every model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# How many times the measured rounding sensitivity a merged model may differ from the reference. Real
# rounding errors and the simulated noise have the same size; the factor covers their random spread.
NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-8, 1e-8, "no rounding; only summation order differs"),
    torch.float32: Tolerance(1e-4, 1e-4, "float32 summation order differs between the folded and activation forms"),
    torch.float16: Tolerance(1e-3, 1e-3, "each folded weight is rounded to float16 once; see rounding_sensitivity"),
    torch.bfloat16: Tolerance(1e-2, 1e-2, "each folded weight is rounded to bfloat16 once; see rounding_sensitivity"),
}


# ONNX export: the graph in ONNX Runtime against the same model in PyTorch, both in the exported dtype, so
# only kernel choice and summation order differ. Allowed per output: atol + rtol * max|reference|, plus
# for float16 NOISE_FACTOR * max|PyTorch float16 - PyTorch float32|, because float16 kernels that
# accumulate differently can differ by about as much as float16 itself moves the outputs.
EXPORT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-4, 1e-4, "ONNX Runtime and PyTorch kernels sum in different orders"),
    torch.float16: Tolerance(1e-2, 1e-2, "float16 kernels round intermediate results differently"),
}


def export_tolerance_for(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """Return the export table's tolerance for `dtype`, with user overrides for atol and rtol."""
    base = EXPORT_TOLERANCES[dtype]
    if atol is None and rtol is None:
        return base
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol, "set by the user")


def tolerance_for(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """Return the table's tolerance for `dtype`, with user overrides for atol and rtol."""
    base = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    if atol is None and rtol is None:
        return base
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol, "set by the user")


def least_precise(dtypes) -> torch.dtype:
    """Return the dtype among `dtypes` with the loosest tolerance, or float32 when none is a float."""
    present = set(dtypes)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        if dtype in present:
            return dtype
    return torch.float32
