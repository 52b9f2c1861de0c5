"""`foldkit verify`: the post-merge equivalence check, run on its own against an existing merged model."""

from __future__ import annotations

from pathlib import Path

from foldkit.checkpoint import open_checkpoint
from foldkit.errors import CheckpointError
from foldkit.merge import prepare
from foldkit.tolerances import least_precise
from foldkit.verify import VerificationResult, verify_merge


def verify_merged(base: Path, adapter_dir: Path, merged: Path, atol: float | None = None, rtol: float | None = None,
                  allow_pickle: bool = False) -> VerificationResult:
    """Verify MERGED against BASE with ADAPTER in activation form; the tolerance follows MERGED's dtype."""
    checkpoint, _, plan = prepare(base, adapter_dir, allow_pickle)
    merged_checkpoint = open_checkpoint(merged)
    missing = [task.target_weight for task in plan.tasks if task.target_weight not in merged_checkpoint.tensors]
    if missing:
        raise CheckpointError(
            f"merged model {merged} lacks folded tensors {', '.join(missing[:3])}: was it merged from this base?"
        )
    merged_dtype = least_precise(merged_checkpoint.tensors[task.target_weight].dtype for task in plan.tasks)
    return verify_merge(checkpoint.path, checkpoint.config, plan, merged, merged_dtype, atol, rtol)
