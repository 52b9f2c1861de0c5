"""Choose and run the equivalence checks after a merge, and record which ran and why."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from foldkit.checkpoint import Checkpoint, open_checkpoint
from foldkit.errors import UsageError
from foldkit.plan import FoldPlan
from foldkit.tolerances import least_precise
from foldkit.verify_logits import verify_logits
from foldkit.verify_modules import ModuleCheck, check_modules, summarize

logger = logging.getLogger(__name__)

CHECK_MODES = ("auto", "modules", "logits", "all", "none")
# The logits check keeps one float32 copy of the model in memory at a time, plus activations and
# loading overhead. "auto" runs it only when that estimate fits in the available memory.
LOGITS_MEMORY_FACTOR = 1.5


@dataclass
class Verification:
    """Results of the checks that ran, with the reason for each choice."""

    mode: str
    modules: dict | None = None
    logits: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.modules is not None or self.logits is not None

    @property
    def passed(self) -> bool:
        results = [result for result in (self.modules, self.logits) if result is not None]
        return bool(results) and all(result["passed"] for result in results)

    @property
    def status(self) -> str:
        if not self.ran:
            return "NOT VERIFIED"
        return "PASSED" if self.passed else "FAILED"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "status": self.status}


def run_verification(base: Checkpoint, plan: FoldPlan, merged_dir: Path, mode: str = "auto",
                     atol: float | None = None, rtol: float | None = None,
                     module_checks: list[ModuleCheck] | None = None) -> Verification:
    """Run the checks `mode` selects on a merged directory. atol and rtol apply to the logits check.

    module_checks, when given, are the per-module results the merge computed while writing, which
    saves reading every folded tensor again.
    """
    if mode not in CHECK_MODES:
        raise UsageError(f"invalid verify mode {mode!r}; choose one of {', '.join(CHECK_MODES)}")
    verification = Verification(mode)
    if mode == "none":
        verification.notes.append("no checks: verification was turned off")
        return verification

    merged = open_checkpoint(merged_dir)
    if mode in ("auto", "modules", "all"):
        if module_checks is not None:
            verification.modules = summarize(module_checks).to_dict()
            verification.notes.append("modules: every folded weight checked with random probe vectors while writing")
        else:
            logger.info("checking %d folded modules against their activation form", len(plan.tasks))
            verification.modules = check_modules(base, merged, plan).to_dict()
            verification.notes.append("modules: every folded weight read back and checked with random probe vectors")

    run_logits, reason = _should_run_logits(mode, base)
    verification.notes.append(reason)
    if run_logits:
        logger.info("comparing logits of the merged model with the base plus the adapter in activation form")
        merged_dtype = least_precise(merged.tensors[task.target_weight].dtype for task in plan.tasks)
        merged.close()
        verification.logits = verify_logits(base.path, base.config, plan, merged_dir, merged_dtype, atol, rtol).to_dict()
    merged.close()
    return verification


def _should_run_logits(mode: str, base: Checkpoint) -> tuple[bool, str]:
    if mode == "modules":
        return False, "logits: skipped, --verify modules"
    if mode in ("logits", "all"):
        return True, f"logits: requested by --verify {mode}"
    needed = LOGITS_MEMORY_FACTOR * sum(info.nbytes // info.dtype.itemsize * 4 for info in base.tensors.values())
    available = available_memory()
    if available is not None and needed > available:
        return False, (f"logits: skipped, a float32 copy of the model needs about {needed / 2**30:.1f} GiB "
                       f"and {available / 2**30:.1f} GiB is available")
    return True, "logits: the model fits in memory"


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
