"""`foldkit verify`: the post-merge equivalence checks, run on their own against an existing merged model."""

from __future__ import annotations

from pathlib import Path

from foldkit.checkpoint import Checkpoint, open_checkpoint
from foldkit.errors import CheckpointError
from foldkit.merge import prepare
from foldkit.plan import FoldPlan
from foldkit.verification import Verification, run_verification


def verify_merged(base: Path, adapter_dir: Path, merged: Path, mode: str = "auto", atol: float | None = None,
                  rtol: float | None = None, allow_pickle: bool = False) -> Verification:
    """Verify MERGED against BASE with ADAPTER in activation form; tolerances follow MERGED's dtype."""
    checkpoint, _, plan = prepare(base, adapter_dir, allow_pickle)
    merged_checkpoint = open_checkpoint(merged, role="merged model")
    check_same_layout(checkpoint, merged_checkpoint, plan)
    merged_checkpoint.close()
    return run_verification(checkpoint, plan, merged, mode, atol, rtol)


def check_same_layout(base: Checkpoint, merged: Checkpoint, plan: FoldPlan) -> None:
    """Raise unless MERGED contains every base tensor, and every folded one, with the base's shapes."""
    # Folded tensors first, so that a merge from another base is reported at a targeted module.
    expected = {task.target_weight: base.tensors[task.source_weight].shape for task in plan.tasks}
    for name, info in base.tensors.items():
        expected.setdefault(name, info.shape)
    missing = [name for name in expected if name not in merged.tensors]
    if missing:
        raise CheckpointError(
            f"merged model {merged.path} lacks tensors {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            + ": was it merged from this base?"
        )
    for name, shape in expected.items():
        if merged.tensors[name].shape != shape:
            raise CheckpointError(
                f"tensor {name} has shape {merged.tensors[name].shape} in merged model {merged.path} but {shape} "
                f"in base {base.path}: was it merged from this base?"
            )
