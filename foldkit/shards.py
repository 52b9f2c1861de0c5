"""Decide which output file each tensor goes to: mirror the base's shards, or re-shard by size."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from foldkit.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, TensorInfo
from foldkit.errors import UsageError
from foldkit.plan import FoldPlan, FoldTask

logger = logging.getLogger(__name__)

Layout = dict[str, list[TensorInfo]]  # output file name -> its tensors, in write order

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Parse a byte count such as "5GB" (10^9), "500MiB" (2^20) or "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise UsageError(f"invalid size {text!r}: use a number of bytes or a unit such as 500MB, 5GB or 2GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise UsageError(f"invalid size {text!r}: it must be positive")
    return size


def output_layout(checkpoint: Checkpoint, plan: FoldPlan, output_dtype: torch.dtype | None,
                  max_shard_size: int | None = None) -> Layout:
    """Map output files to their tensors, in write order.

    Without max_shard_size the output mirrors the base's files, and a new tensor (an untied lm_head, a
    new LoRA bias) joins the file of the weight it comes from. With it, tensors keep that order and fill
    shards of at most max_shard_size bytes (a larger tensor gets a shard of its own).
    """
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
    if max_shard_size is not None:
        return reshard([info for entries in layout.values() for info in entries], max_shard_size)
    return layout


def _retyped(info: TensorInfo, name: str, output_dtype: torch.dtype | None) -> TensorInfo:
    dtype = output_dtype if output_dtype is not None and info.dtype.is_floating_point else info.dtype
    return TensorInfo(name, info.file, dtype, info.shape)


def reshard(entries: list[TensorInfo], max_shard_size: int) -> Layout:
    """Split tensors, in order, into HF-style shards of at most max_shard_size bytes each."""
    oversized = [info.name for info in entries if info.nbytes > max_shard_size]
    if oversized:
        logger.warning("%d tensors are larger than --max-shard-size %d bytes and get a shard of their own, "
                       "for example %s", len(oversized), max_shard_size, oversized[0])
    groups: list[list[TensorInfo]] = [[]]
    size = 0
    for info in entries:
        if groups[-1] and size + info.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(info)
        size += info.nbytes
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    count = len(groups)
    return {f"model-{number:05d}-of-{count:05d}.safetensors": group for number, group in enumerate(groups, start=1)}


def needs_index(layout: Layout) -> bool:
    return len(layout) > 1 or SINGLE_FILE not in layout


def write_index(layout: Layout, staging: Path) -> None:
    """Write model.safetensors.index.json with the weight map and metadata.total_size in bytes."""
    weight_map = {info.name: file for file, entries in layout.items() for info in entries}
    total = sum(info.nbytes for entries in layout.values() for info in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


