"""`foldkit merge`: fold an adapter into a base checkpoint tensor by tensor, write, then verify."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from foldkit import __version__
from foldkit.adapter import Adapter, load_adapter
from foldkit.checkpoint import INDEX_FILE, Checkpoint, TensorInfo, open_checkpoint
from foldkit.errors import OutputError
from foldkit.fold import FOLD_RULES, describe_rule
from foldkit.model_info import inspect_model
from foldkit.output_dir import check_output_path, copy_side_files, staged_directory
from foldkit.plan import FoldPlan, FoldTask, plan_fold
from foldkit.report import FoldedModule, MergeReport
from foldkit.safetensors_writer import SafetensorsWriter
from foldkit.verification import CHECK_MODES, run_verification

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeOptions:
    dtype: str | None = None  # a key of OUTPUT_DTYPES; None keeps the base's dtypes
    force: bool = False
    allow_pickle: bool = False
    verify: str = "auto"  # one of CHECK_MODES
    atol: float | None = None
    rtol: float | None = None
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.verify, bool):
            self.verify = "auto" if self.verify else "none"


def prepare(base: Path, adapter_dir: Path, allow_pickle: bool) -> tuple[Checkpoint, Adapter, FoldPlan]:
    """Open both inputs and plan every fold; raises before anything is written."""
    checkpoint = open_checkpoint(base)
    adapter = load_adapter(adapter_dir, allow_pickle=allow_pickle)
    model = inspect_model(checkpoint.path, checkpoint.config)
    plan = plan_fold(checkpoint, adapter, model)
    return checkpoint, adapter, plan


def merge(base: str | Path, adapter_dir: str | Path, out: str | Path, options: MergeOptions | None = None) -> MergeReport:
    """Merge ADAPTER into BASE and write OUT atomically; return the report.

    A verification beyond tolerance does not raise: the output is kept and the report's status is
    FAILED, so the caller decides (the CLI exits with the mismatch code).
    """
    options = options or MergeOptions()
    base, adapter_dir, out = Path(base), Path(adapter_dir), Path(os.path.abspath(out))
    if options.dtype is not None and options.dtype not in OUTPUT_DTYPES:
        raise OutputError(f"invalid dtype {options.dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    if options.verify not in CHECK_MODES:
        raise OutputError(f"invalid verify mode {options.verify!r}; choose one of {', '.join(CHECK_MODES)}")
    output_dtype = OUTPUT_DTYPES.get(options.dtype) if options.dtype else None
    check_output_path(out, options.force, [base, adapter_dir])

    checkpoint, adapter, plan = prepare(base, adapter_dir, options.allow_pickle)
    report = MergeReport(__version__, str(base), str(adapter_dir), adapter.peft_type, options.dtype,
                         untied_embeddings=plan.untie_embeddings)
    logger.info("folding %d %s modules into %s", len(plan.tasks), adapter.peft_type, base)

    with staged_directory(out, options.force) as staging:
        layout = output_layout(checkpoint, plan, output_dtype)
        write_tensors(checkpoint, plan, layout, staging, report, options.progress)
        write_config(checkpoint, plan, output_dtype, staging)
        copy_side_files(checkpoint.path, staging)

        verification = run_verification(checkpoint, plan, staging, options.verify, options.atol, options.rtol)
        report.verification = verification.to_dict()
        report.status = verification.status
        report.write(staging)
    checkpoint.close()
    logger.info("wrote %s", out)
    return report


def output_layout(checkpoint: Checkpoint, plan: FoldPlan, output_dtype: torch.dtype | None) -> dict[str, list[TensorInfo]]:
    """Output file -> tensors, in write order. Mirrors the base's files; a new untied weight joins its source."""
    new_tensors: dict[str, list[FoldTask]] = {}
    for task in plan.tasks:
        if task.target_weight != task.source_weight:
            new_tensors.setdefault(task.source_weight, []).append(task)

    layout: dict[str, list[TensorInfo]] = {}
    for file in checkpoint.files:
        entries = []
        for name in checkpoint.names_in(file):
            info = checkpoint.tensors[name]
            entries.append(_retyped(info, info.name, output_dtype))
            for task in new_tensors.get(name, []):
                entries.append(_retyped(info, task.target_weight, output_dtype))
        layout[file] = entries
    for task in plan.tasks:
        if task.target_bias is not None and task.target_bias not in checkpoint.tensors:
            file = checkpoint.tensors[task.source_weight].file
            weight_info = checkpoint.tensors[task.source_weight]
            out_features = weight_info.shape[1] if task.fan_in_fan_out else weight_info.shape[0]
            layout[file].append(TensorInfo(task.target_bias, file, output_dtype or weight_info.dtype, (out_features,)))
    return layout


def _retyped(info: TensorInfo, name: str, output_dtype: torch.dtype | None) -> TensorInfo:
    dtype = output_dtype if output_dtype is not None and info.dtype.is_floating_point else info.dtype
    return TensorInfo(name, info.file, dtype, info.shape)


def write_tensors(checkpoint: Checkpoint, plan: FoldPlan, layout: dict[str, list[TensorInfo]], staging: Path,
                  report: MergeReport, progress: bool) -> None:
    """Read, fold and write one tensor at a time."""
    folded = _FoldTargets(plan)
    total_bytes = sum(info.nbytes for entries in layout.values() for info in entries)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
               disable=not progress, leave=False)
    try:
        for file, entries in layout.items():
            writer = SafetensorsWriter(staging / file, entries, checkpoint.file_metadata.get(file) or {"format": "pt"})
            try:
                for info in entries:
                    tensor = folded.produce(checkpoint, info.name)
                    writer.write(info.name, tensor.to(info.dtype))
                    bar.update(info.nbytes)
            except BaseException:
                writer.abort()
                raise
            writer.close()
    finally:
        bar.close()

    if checkpoint.sharded:
        _write_index(layout, staging)
    report.tensors_written = sum(len(entries) for entries in layout.values())
    report.bytes_written = total_bytes
    for task in plan.tasks:
        info = checkpoint.tensors[task.source_weight]
        report.folded.append(FoldedModule(task.module, task.adapter.kind, describe_rule(task.adapter),
                                          task.target_weight, task.source_weight, task.target_bias,
                                          list(info.shape)))


class _FoldTargets:
    """Produce each output tensor: a folded weight or bias, or the base tensor unchanged.

    A fold yields a weight and a bias together, so whichever is requested second is kept until its
    turn. A bias usually precedes its weight in a file because safetensors sorts names.
    """

    def __init__(self, plan: FoldPlan):
        self.tasks = {task.target_weight: task for task in plan.tasks}
        self.tasks.update({task.target_bias: task for task in plan.tasks if task.target_bias is not None})
        self._kept: dict[str, torch.Tensor] = {}

    def produce(self, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._kept.pop(name)
        task = self.tasks.get(name)
        if task is None:
            return checkpoint.read(name)

        weight = checkpoint.read(task.source_weight)
        bias = checkpoint.read(task.source_bias) if task.source_bias else None
        weight, bias = FOLD_RULES[task.adapter.kind](weight, bias, task.adapter, task.fan_in_fan_out)
        if name == task.target_weight:
            if task.target_bias is not None:
                self._kept[task.target_bias] = bias
            return weight
        self._kept[task.target_weight] = weight
        return bias


def _write_index(layout: dict[str, list[TensorInfo]], staging: Path) -> None:
    weight_map = {info.name: file for file, entries in layout.items() for info in entries}
    total = sum(info.nbytes for entries in layout.values() for info in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_config(checkpoint: Checkpoint, plan: FoldPlan, output_dtype: torch.dtype | None, staging: Path) -> None:
    """Copy config.json, untying the embeddings when a tied weight was folded and recording a new dtype."""
    config = json.loads(json.dumps(checkpoint.config))
    if plan.untie_embeddings:
        config["tie_word_embeddings"] = False
        for key in ("text_config",):
            if isinstance(config.get(key), dict) and "tie_word_embeddings" in config[key]:
                config[key]["tie_word_embeddings"] = False
    if output_dtype is not None:
        name = str(output_dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
