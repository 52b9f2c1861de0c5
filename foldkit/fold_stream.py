"""Produce a merge's output tensors in write order: read ahead, fold, cast, and check each module."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from foldkit.checkpoint import Checkpoint
from foldkit.fold import FOLD_RULES
from foldkit.plan import FoldPlan
from foldkit.verify_modules import ModuleCheck, check_module_tensors


class FoldStream:
    """Produce each output tensor: a folded weight or bias, or the base tensor unchanged.

    A fold yields a weight and a bias together, so whichever is requested second is kept until its
    turn. A bias usually precedes its weight in a file because safetensors sorts names. One background
    thread reads the next tensor while the current one is folded, so one extra tensor is in memory.
    """

    def __init__(self, checkpoint: Checkpoint, plan: FoldPlan, device: torch.device, dtypes: dict[str, torch.dtype],
                 check_modules: bool):
        self.checkpoint = checkpoint
        self.device = device
        self.dtypes = dtypes
        self.checks: list[ModuleCheck] | None = [] if check_modules else None
        self.tasks = {task.target_weight: task for task in plan.tasks}
        self.tasks.update({task.target_bias: task for task in plan.tasks if task.target_bias is not None})
        self._kept: dict[str, torch.Tensor] = {}
        self._reads: dict[str, Future] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foldkit-read")

    def read_ahead(self, name: str) -> None:
        """Start reading the base tensor that output `name` needs first, unless it is already kept."""
        if name in self._kept:
            return
        task = self.tasks.get(name)
        source = task.source_weight if task is not None else name
        if source not in self._reads:
            self._reads[source] = self._reader.submit(self.checkpoint.read, source)

    def _read(self, name: str) -> torch.Tensor:
        future = self._reads.pop(name, None)
        return future.result() if future is not None else self.checkpoint.read(name)

    def produce(self, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._kept.pop(name)
        task = self.tasks.get(name)
        if task is None:
            return self._read(name).to(self.dtypes[name])

        # NOTE: with --device cuda the fold runs on the GPU. That path has not run on a GPU yet, since
        # no machine of this project has one; tests cover it only with CPU tensors.
        base_weight = self._read(task.source_weight)
        base_bias = self._read(task.source_bias) if task.source_bias else None
        weight, bias = FOLD_RULES[task.adapter.kind](
            base_weight.to(self.device), None if base_bias is None else base_bias.to(self.device), task.adapter,
            task.fan_in_fan_out)
        weight = weight.to("cpu", self.dtypes[task.target_weight])
        if bias is not None:
            bias = bias.to("cpu", self.dtypes[task.target_bias])
        if self.checks is not None:
            self.checks.append(check_module_tensors(task, base_weight, base_bias, weight, bias))
        if name == task.target_weight:
            if task.target_bias is not None:
                self._kept[task.target_bias] = bias
            return weight
        self._kept[task.target_weight] = weight
        return bias

    def close(self) -> None:
        """Wait for reads still in flight and stop the reader thread."""
        for future in self._reads.values():
            future.cancel()
        self._reads.clear()
        self._reader.shutdown(wait=True)
