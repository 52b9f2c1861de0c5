"""Measure foldkit merge against the I/O floor and PEFT: wall time and peak RSS, as ratios in one run.

Usage:
    python benchmarks/merge_benchmark.py --work /path/with/space [--cases smollm2,synthetic,scaling,huge]
        [--repeats 3] [--results benchmarks/results.json]

Cases:
    smollm2    SmolLM2-135M-Instruct with a rank-16 LoRA on all linear layers (made with PEFT)
    synthetic  a synthetic ~1.5B-parameter bf16 Llama with a rank-16 LoRA on all seven projections
    scaling    synthetic checkpoints of about 0.5, 2 and 8 GB: foldkit and the I/O floor only
    huge       a synthetic checkpoint larger than this machine's memory (about 26 GB): foldkit only

Each measurement runs in a fresh process; peak RSS is that process's VmHWM (see peak_rss.py). Files
stay in the page cache between runs where memory allows, for every method alike, and dirty pages are
flushed before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from synthetic import LlamaShape, shape_for_size, write_checkpoint, write_lora_adapter  # noqa: E402

PYTHON = sys.executable
FOLDKIT = [PYTHON, "-m", "foldkit.cli"]
GB = 10**9


def measure(command: list[str], out: Path) -> tuple[float, int]:
    """Run a Python command once in a fresh process; return wall seconds and its peak RSS in bytes.

    Dirty pages of the previous run are flushed first (untimed), so each run starts alike.
    """
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    peak_file = out.with_name(out.name + ".peak")
    wrapped = [PYTHON, str(HERE / "peak_rss.py"), str(peak_file), *command[1:]]
    start = time.perf_counter()
    completed = subprocess.run(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        stderr = completed.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    peak = int(peak_file.read_text())
    peak_file.unlink()
    return wall, peak


def repeat(command: list[str], out: Path, repeats: int) -> dict:
    runs = [measure(command, out) for _ in range(repeats)]
    walls = [wall for wall, _ in runs]
    rss = [peak for _, peak in runs]
    return {"wall_median_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "rss_median_bytes": statistics.median(rss), "rss_max_bytes": max(rss), "runs": len(runs),
            "command": " ".join(command)}


def run_case(name: str, base: Path, adapter: Path, work: Path, repeats: int, methods: tuple[str, ...]) -> dict:
    out = work / f"{name}-out"
    commands = {
        "io_floor": [PYTHON, str(HERE / "io_floor.py"), str(base), str(out)],
        "foldkit": FOLDKIT + ["merge", str(base), str(adapter), str(out), "-q", "--verify", "modules"],
        "peft": [PYTHON, str(HERE / "peft_merge.py"), str(base), str(adapter), str(out)],
    }
    checkpoint_bytes = sum(file.stat().st_size for file in base.glob("*.safetensors"))
    result = {"case": name, "checkpoint_bytes": checkpoint_bytes}
    for method in methods:
        print(f"{name}: {method} x{repeats}", file=sys.stderr, flush=True)
        result[method] = repeat(commands[method], out, repeats)
        if method == "foldkit":
            report = json.loads((out / "foldkit_report.json").read_text())
            result["foldkit_verification"] = report["verification"]
            result["foldkit_status"] = report["status"]
    shutil.rmtree(out, ignore_errors=True)
    if "io_floor" in result and "foldkit" in result:
        result["foldkit_vs_floor_wall"] = result["foldkit"]["wall_median_s"] / result["io_floor"]["wall_median_s"]
    if "peft" in result and "foldkit" in result:
        result["peft_vs_foldkit_wall"] = result["peft"]["wall_median_s"] / result["foldkit"]["wall_median_s"]
        result["foldkit_vs_peft_rss"] = result["foldkit"]["rss_median_bytes"] / result["peft"]["rss_median_bytes"]
    print(json.dumps(result, indent=1), file=sys.stderr, flush=True)
    return result


def smollm2_case(work: Path, repeats: int) -> dict:
    import torch
    from models import prepare_smollm2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = prepare_smollm2()
    adapter = work / "smollm2-lora16"
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(adapter))
    return run_case("smollm2-135m", base, adapter, work, repeats, ("io_floor", "foldkit", "peft"))


def synthetic_case(work: Path, name: str, shape: LlamaShape, shard_bytes: int, repeats: int,
                   methods: tuple[str, ...], keep: bool = True) -> dict:
    base, adapter = work / f"{name}-base", work / f"{name}-lora16"
    print(f"{name}: writing {shape.nbytes() / GB:.1f} GB checkpoint ({shape.layers} layers)", file=sys.stderr)
    write_checkpoint(base, shape, shard_bytes)
    write_lora_adapter(adapter, shape)
    result = run_case(name, base, adapter, work, repeats, methods)
    result["shape"] = shape.__dict__
    if not keep:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(adapter, ignore_errors=True)
    return result


def huge_case(work: Path) -> dict:
    shape = LlamaShape(layers=52, hidden=4096, intermediate=14336, heads=32)
    needed = 2 * shape.nbytes() + 2 * GB
    free = shutil.disk_usage(work).free
    if free < needed:
        return {"case": "huge", "skipped": f"needs {needed / GB:.0f} GB free in {work}, has {free / GB:.0f} GB"}
    result = synthetic_case(work, "huge-26gb", shape, 5 * GB, 1, ("foldkit",), keep=False)
    result["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return result


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="directory for checkpoints and outputs")
    parser.add_argument("--cases", default="smollm2,synthetic,scaling,huge")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")

    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "cases": []}
    if "smollm2" in cases:
        results["cases"].append(smollm2_case(args.work, args.repeats))
    if "synthetic" in cases:
        shape = LlamaShape(layers=20, hidden=2048, intermediate=8192)
        results["cases"].append(synthetic_case(args.work, "synthetic-1.5b", shape, GB // 2, args.repeats,
                                               ("io_floor", "foldkit", "peft"), keep=False))
    if "scaling" in cases:
        for size in (0.5, 2, 8):
            shape = shape_for_size(int(size * GB))
            results["cases"].append(synthetic_case(args.work, f"scaling-{size:g}gb", shape, GB // 2, args.repeats,
                                                   ("io_floor", "foldkit"), keep=False))
    if "huge" in cases:
        results["cases"].append(huge_case(args.work))
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
