"""foldkit's report file: what was folded, with which rule, and the verification figures."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_FILE = "foldkit_report.json"


@dataclass
class FoldedModule:
    module: str
    kind: str
    rule: str
    weight: str  # output tensor written
    source_weight: str  # base tensor read
    bias: str | None
    shape: list[int]


@dataclass
class MergeReport:
    """Everything `foldkit merge` did, written as JSON beside the merged weights."""

    foldkit_version: str
    base: str
    adapter: str
    peft_type: str
    output_dtype: str | None  # None: each tensor keeps the base's dtype
    folded: list[FoldedModule] = field(default_factory=list)
    untied_embeddings: bool = False
    tensors_written: int = 0
    bytes_written: int = 0
    verification: dict | None = None
    status: str = "NOT VERIFIED"  # PASSED, FAILED or NOT VERIFIED

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, directory: Path) -> None:
        (directory / REPORT_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def json_safe(value):
    """Return `value` with NaN and infinite floats as strings, which strict JSON parsers accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value
