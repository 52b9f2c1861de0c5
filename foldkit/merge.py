"""`foldkit merge`: fold an adapter into a base checkpoint tensor by tensor, write, then verify."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from foldkit import __version__
from foldkit.adapter import Adapter, load_adapter
from foldkit.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from foldkit.errors import InputError, OutputError, UsageError
from foldkit.fold import describe_rule
from foldkit.fold_stream import FoldStream
from foldkit.model_info import inspect_model
from foldkit.output_dir import check_output_path, copy_side_files, staged_directory
from foldkit.plan import FoldPlan, plan_fold
from foldkit.report import FoldedModule, MergeReport
from foldkit.safetensors_writer import SafetensorsWriter
from foldkit.shards import Layout, needs_index, output_layout, parse_size, write_index
from foldkit.verification import CHECK_MODES, run_verification
from foldkit.verify_modules import ModuleCheck

logger = logging.getLogger(__name__)

WRITE_QUEUE = 2  # tensors produced but not yet written
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeOptions:
    dtype: str | None = None  # a key of OUTPUT_DTYPES; None keeps the base's dtypes
    force: bool = False
    allow_pickle: bool = False
    verify: str = "auto"  # one of CHECK_MODES
    atol: float | None = None
    rtol: float | None = None
    progress: bool | None = None  # None: show the bar only when stderr is a terminal
    max_shard_size: int | str | None = None  # bytes, or a size such as "5GB"; None mirrors the base's shards
    device: str = "cpu"  # where the fold math runs; reading and writing stay on the CPU

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
        raise UsageError(f"invalid dtype {options.dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    if options.verify not in CHECK_MODES:
        raise UsageError(f"invalid verify mode {options.verify!r}; choose one of {', '.join(CHECK_MODES)}")
    output_dtype = OUTPUT_DTYPES.get(options.dtype) if options.dtype else None
    check_output_path(out, options.force, [base, adapter_dir])
    max_shard_size = parse_size(options.max_shard_size) if options.max_shard_size is not None else None
    device = resolve_device(options.device)

    checkpoint, adapter, plan = prepare(base, adapter_dir, options.allow_pickle)
    report = MergeReport(__version__, str(base.resolve()), str(adapter_dir.resolve()), adapter.peft_type, options.dtype,
                         untied_embeddings=plan.untie_embeddings)
    logger.info("folding %d %s modules of %s with base %s into %s", len(plan.tasks), adapter.peft_type, adapter_dir,
                base, out)

    with staged_directory(out, options.force) as staging:
        layout = output_layout(checkpoint, plan, output_dtype, max_shard_size)
        check_inline = options.verify in ("auto", "modules", "all")
        progress = sys.stderr.isatty() if options.progress is None else options.progress
        module_checks = write_tensors(checkpoint, plan, layout, staging, report, progress, device, check_inline)
        write_config(checkpoint, plan, output_dtype, staging)
        copy_side_files(checkpoint.path, staging)

        verification = run_verification(checkpoint, plan, staging, options.verify, options.atol, options.rtol,
                                        module_checks)
        report.verification = verification.to_dict()
        report.status = verification.status
        report.write(staging)
    checkpoint.close()
    logger.info("wrote %s", out)
    return report


def write_tensors(checkpoint: Checkpoint, plan: FoldPlan, layout: Layout, staging: Path,
                  report: MergeReport, progress: bool, device: torch.device = torch.device("cpu"),
                  check_modules: bool = True) -> list[ModuleCheck] | None:
    """Read, fold and write one tensor at a time; return the per-module checks when check_modules is set.

    The module check runs on the folded tensors in memory, cast exactly as written, so it costs no
    extra reads.
    """
    dtypes = {info.name: info.dtype for entries in layout.values() for info in entries}
    folded = FoldStream(checkpoint, plan, device, dtypes, check_modules)
    total_bytes = sum(info.nbytes for entries in layout.values() for info in entries)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
               disable=not progress, leave=False)
    # One background thread writes while the main thread reads and folds the next tensor. Waiting on
    # the oldest pending write keeps at most WRITE_QUEUE tensors in flight, which bounds memory.
    pending: deque[tuple[Future, int]] = deque()

    def finish_oldest() -> None:
        future, nbytes = pending.popleft()
        future.result()
        bar.update(nbytes)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="foldkit-write") as executor:
        try:
            for file, entries in layout.items():
                metadata = checkpoint.file_metadata.get(file) or {"format": "pt"}
                writer = SafetensorsWriter(staging / file, entries, metadata)
                try:
                    for position, info in enumerate(entries):
                        if position + 1 < len(entries):
                            folded.read_ahead(entries[position + 1].name)
                        tensor = folded.produce(info.name)
                        pending.append((executor.submit(writer.write, info.name, tensor), info.nbytes))
                        while len(pending) > WRITE_QUEUE:
                            finish_oldest()
                    while pending:
                        finish_oldest()
                except BaseException:
                    for future, _ in pending:
                        if not future.cancel():
                            future.exception()  # wait for a running write before closing its file
                    pending.clear()
                    writer.abort()
                    raise
                writer.close()
        finally:
            bar.close()
            folded.close()

    if needs_index(layout):
        write_index(layout, staging)
    report.tensors_written = sum(len(entries) for entries in layout.values())
    report.bytes_written = total_bytes
    for task in plan.tasks:
        info = checkpoint.tensors[task.source_weight]
        report.folded.append(FoldedModule(task.module, task.adapter.kind, describe_rule(task.adapter),
                                          task.target_weight, task.source_weight, task.target_bias,
                                          list(info.shape)))
    return folded.checks


def resolve_device(name: str) -> torch.device:
    """Parse --device and check that it is usable here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"invalid device {name!r}: use cpu, cuda or cuda:N") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name} requested but CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return device


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
