"""`foldkit verify`: the post-merge equivalence checks, run on their own against an existing merged model."""

from __future__ import annotations

from pathlib import Path

from foldkit.checkpoint import open_checkpoint
from foldkit.errors import CheckpointError
from foldkit.merge import prepare
from foldkit.verification import Verification, run_verification


def verify_merged(base: Path, adapter_dir: Path, merged: Path, mode: str = "auto", atol: float | None = None,
                  rtol: float | None = None, allow_pickle: bool = False) -> Verification:
    """Verify MERGED against BASE with ADAPTER in activation form; tolerances follow MERGED's dtype."""
    checkpoint, _, plan = prepare(base, adapter_dir, allow_pickle)
    merged_checkpoint = open_checkpoint(merged)
    missing = [task.target_weight for task in plan.tasks if task.target_weight not in merged_checkpoint.tensors]
    merged_checkpoint.close()
    if missing:
        raise CheckpointError(
            f"merged model {merged} lacks folded tensors {', '.join(missing[:3])}: was it merged from this base?"
        )
    return run_verification(checkpoint, plan, merged, mode, atol, rtol)
