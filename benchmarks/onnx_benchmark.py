"""ONNX Runtime (CPU) against PyTorch eager on the merged SmolLM2: prefill and decode latency, export time, size.

Usage: python benchmarks/onnx_benchmark.py [--results benchmarks/onnx_results.json] [--repeats 7]

Steps, all in one run so that the ratios share the machine's load:
1. Merge a seeded non-identity LoRA (q, k, v, o, gate, up, down; r=8) into SmolLM2-135M-Instruct (bfloat16).
2. Time `foldkit export MERGED OUT --format onnx` as a whole command (load, trace, save, check in ONNX
   Runtime). Read the export and check seconds and the files' sizes from its report.
3. Load both runtimes in float32 with the same thread count. Time the median of `--repeats` runs,
   interleaved with a 0.5 s pause before each, of: prefill at batch x sequence (1,128) and (4,128), with
   the cache outputs; and greedy decode of 32 tokens after a 128-token prompt at batch 1 and 4, per
   token. PyTorch is called the way the graph is: input_ids, attention_mask, position_ids and a
   DynamicCache, under no_grad.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from models import prepare_smollm2  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from foldkit.onnx_graphs import past_names  # noqa: E402
from foldkit.onnx_runtime import open_session  # noqa: E402

PREFILL_SHAPES = [(1, 128), (4, 128)]
DECODE_BATCHES = [1, 4]
PROMPT = 128
DECODE_TOKENS = 32
TARGET_RATIO = 0.8
TARGET_EXPORT_SECONDS = 90
SETTLE_SECONDS = 0.5  # pause before each timed run, see interleaved()


def foldkit(*args: str) -> dict:
    command = [sys.executable, "-m", "foldkit.cli", *args, "--json", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed with exit {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or the machine type where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def make_adapter(base: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(str(out))


def inputs(batch: int, sequence: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(100, 40000, (batch, sequence), generator=generator)
    mask = torch.ones_like(input_ids)
    return input_ids, mask, torch.arange(sequence).expand(batch, -1).contiguous()


class Runtimes:
    """The same merged model in PyTorch eager and in an ONNX Runtime session, float32, same threads."""

    def __init__(self, merged: Path, graph: Path, threads: int):
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        self.session = open_session(graph, "CPUExecutionProvider", threads=threads)
        self.layers = self.model.config.num_hidden_layers
        self.names = past_names(self.layers, "past_key_values")
        self.outputs = [node.name for node in self.session.get_outputs()]
        shape = self.session.get_inputs()[3].shape
        self.heads, self.head_dim = shape[1], shape[3]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, self.heads, 0, self.head_dim), np.float32) for name in self.names}

    @torch.no_grad()
    def torch_step(self, input_ids, mask, positions, cache):
        output = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True)
        return output.logits, output.past_key_values

    def ort_step(self, input_ids, mask, positions, past):
        results = self.session.run(self.outputs, {"input_ids": input_ids, "attention_mask": mask,
                                                  "position_ids": positions, **past})
        return results[0], dict(zip(self.names, results[1:]))

    def prefill_torch(self, batch: int, sequence: int) -> float:
        input_ids, mask, positions = inputs(batch, sequence, 1)
        start = time.perf_counter()
        self.torch_step(input_ids, mask, positions, DynamicCache(config=self.model.config))
        return time.perf_counter() - start

    def prefill_ort(self, batch: int, sequence: int) -> float:
        input_ids, mask, positions = (tensor.numpy() for tensor in inputs(batch, sequence, 1))
        start = time.perf_counter()
        self.ort_step(input_ids, mask, positions, self.empty_past(batch))
        return time.perf_counter() - start

    def decode_torch(self, batch: int) -> tuple[float, list[list[int]]]:
        input_ids, mask, positions = inputs(batch, PROMPT, 2)
        logits, cache = self.torch_step(input_ids, mask, positions, DynamicCache(config=self.model.config))
        tokens = []
        start = time.perf_counter()
        for step in range(DECODE_TOKENS):
            next_ids = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(next_ids[:, 0].tolist())
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            positions = torch.full((batch, 1), PROMPT + step)
            logits, cache = self.torch_step(next_ids, mask, positions, cache)
        return (time.perf_counter() - start) / DECODE_TOKENS, tokens

    def decode_ort(self, batch: int) -> tuple[float, list[list[int]]]:
        input_ids, mask, positions = (tensor.numpy() for tensor in inputs(batch, PROMPT, 2))
        logits, past = self.ort_step(input_ids, mask, positions, self.empty_past(batch))
        tokens = []
        start = time.perf_counter()
        for step in range(DECODE_TOKENS):
            next_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(next_ids[:, 0].tolist())
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            positions = np.full((batch, 1), PROMPT + step, np.int64)
            logits, past = self.ort_step(next_ids, mask, positions, past)
        return (time.perf_counter() - start) / DECODE_TOKENS, tokens


def interleaved(first, second, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of each callable over `repeats` alternating runs, after one warm-up run each.

    Each run starts after a pause: PyTorch's OpenMP threads and ONNX Runtime's thread pool spin for a
    while after their work, and on 2 cores that spinning would slow whichever runtime runs next.
    """
    first_result, second_result = first(), second()
    first_times, second_times = [], []
    for _ in range(repeats):
        time.sleep(SETTLE_SECONDS)
        value = first()
        first_times.append(value[0] if isinstance(value, tuple) else value)
        time.sleep(SETTLE_SECONDS)
        value = second()
        second_times.append(value[0] if isinstance(value, tuple) else value)
    return statistics.median(first_times), statistics.median(second_times), first_result, second_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "onnx_results.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    load_before = os.getloadavg()
    base = prepare_smollm2()
    with tempfile.TemporaryDirectory(prefix="foldkit-onnx-bench-") as scratch:
        scratch = Path(scratch)
        make_adapter(base, scratch / "adapter")
        foldkit("merge", str(base), str(scratch / "adapter"), str(scratch / "merged"))
        start = time.perf_counter()
        report = foldkit("export", str(scratch / "merged"), str(scratch / "onnx"), "--format", "onnx")
        command_seconds = time.perf_counter() - start
        print(f"export: {command_seconds:.1f} s for the command, {report['export_seconds']:.1f} s tracing and saving, "
              f"{report['verify_seconds']:.1f} s checking; {report['status']}", file=sys.stderr)

        runtimes = Runtimes(scratch / "merged", scratch / "onnx" / "model.onnx", args.threads)
        rows = []
        for batch, sequence in PREFILL_SHAPES:
            pt, ort_seconds, _, _ = interleaved(lambda: runtimes.prefill_torch(batch, sequence),
                                               lambda: runtimes.prefill_ort(batch, sequence), args.repeats)
            rows.append({"case": f"prefill ({batch},{sequence})", "pytorch_ms": pt * 1e3, "onnxruntime_ms": ort_seconds * 1e3,
                         "ratio": ort_seconds / pt})
            print(rows[-1], file=sys.stderr)
        for batch in DECODE_BATCHES:
            pt, ort_seconds, pt_result, ort_result = interleaved(lambda: runtimes.decode_torch(batch),
                                                                 lambda: runtimes.decode_ort(batch), args.repeats)
            rows.append({"case": f"decode per token, batch {batch}, past {PROMPT}..{PROMPT + DECODE_TOKENS}",
                         "pytorch_ms": pt * 1e3, "onnxruntime_ms": ort_seconds * 1e3, "ratio": ort_seconds / pt,
                         "same_greedy_tokens": pt_result[1] == ort_result[1]})
            print(rows[-1], file=sys.stderr)
        results = {
            "model": "SmolLM2-135M-Instruct + LoRA r=8 on all linear layers, merged (bfloat16), exported float32",
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads in both runtimes",
            "load_average_before": load_before,
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
            "repeats": args.repeats, "target_ratio": TARGET_RATIO,
            "export": {"command_seconds": command_seconds, "export_seconds": report["export_seconds"],
                       "verify_seconds": report["verify_seconds"], "target_seconds": TARGET_EXPORT_SECONDS,
                       "status": report["status"], "opset": report["opset"], "files": report["files"],
                       "weight_bytes": report["weight_bytes"]},
            "latency": rows,
        }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
