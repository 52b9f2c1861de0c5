"""Step time and adapter memory of the activation and weight forms across batch x sequence on SmolLM2.

Usage: python benchmarks/forms_benchmark.py [--results benchmarks/forms_results.json]

IA3 on k_proj, v_proj and down_proj (input scaling), float32 on the CPU. For each batch x sequence
T and form it reports three figures. These are the median time of a training step (forward and
backward), the bytes that the adapter wrappers' forward passes allocate (counted with a dispatch
mode), and foldkit memory's estimate of the same bytes. The estimate puts the crossover where the weight form becomes cheaper.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from models import prepare_smollm2  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from foldkit.memory import estimate_memory  # noqa: E402
from foldkit.modules import AdapterLayer, inject_ia3  # noqa: E402

TARGETS = ["k_proj", "v_proj", "down_proj"]
FEEDFORWARD = ["down_proj"]
SHAPES = [(4, 32), (4, 128), (4, 256), (8, 256)]


class AdapterForwardBytes(TorchDispatchMode):
    """Sum the bytes of new storages created while an adapter wrapper's forward runs."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        existing = {tensor.untyped_storage().data_ptr() for tensor in tensors}
        output = func(*args, **(kwargs or {}))
        if self.depth:
            for value in tree_flatten(output)[0]:
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in existing:
                    self.total += value.untyped_storage().nbytes()
        return output


def measure(base: Path, form: str, batch: int, sequence: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    inject_ia3(model, TARGETS, FEEDFORWARD, form)
    counter = AdapterForwardBytes()
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.register_forward_pre_hook(lambda *_: setattr(counter, "depth", counter.depth + 1))
            module.register_forward_hook(lambda *_: setattr(counter, "depth", counter.depth - 1))
    input_ids = torch.randint(0, 49152, (batch, sequence), generator=torch.Generator().manual_seed(1))

    with torch.no_grad(), counter:
        model(input_ids=input_ids)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        times.append(time.perf_counter() - start)
    return {"step_median_s": statistics.median(times), "step_min_s": min(times), "step_max_s": max(times),
            "adapter_forward_bytes": counter.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "forms_results.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = prepare_smollm2()
    rows = []
    for batch, sequence in SHAPES:
        estimate = estimate_memory(base, "ia3", TARGETS, FEEDFORWARD, batch, sequence, torch.float32)
        row = {"batch": batch, "sequence": sequence, "tokens": batch * sequence,
               "estimate_activation_bytes": estimate.activation_form_bytes,
               "estimate_weight_bytes": estimate.weight_form_bytes,
               "crossover_tokens": {kind.name: kind.crossover_tokens for kind in estimate.kinds}}
        for form in ("activation", "weight"):
            print(f"batch {batch} x sequence {sequence}: {form}", file=sys.stderr, flush=True)
            row[form] = measure(base, form, batch, sequence, args.repeats)
        rows.append(row)
    args.results.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    print("| B x S | T | activation: step, adapter bytes (estimate) | weight: step, adapter bytes (estimate) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        cells = []
        for form, estimate_key in (("activation", "estimate_activation_bytes"), ("weight", "estimate_weight_bytes")):
            cells.append(f"{row[form]['step_median_s']:.2f} s, {row[form]['adapter_forward_bytes'] / 2**20:.1f} MiB "
                         f"({row[estimate_key] / 2**20:.1f} MiB)")
        print(f"| {row['batch']} x {row['sequence']} | {row['tokens']} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
