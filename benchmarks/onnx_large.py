"""Export a synthetic Llama whose float32 weights pass the 2 GB protobuf limit, with the check on.

Usage: python benchmarks/onnx_large.py [--layers 8] [--results benchmarks/onnx_large_results.json]

The default shape (8 layers, hidden 2048, intermediate 8192, vocabulary 32000) has 670M parameters:
1.34 GB in bfloat16 on disk and 2.68 GB in the float32 graph. The run records the command's time, its
peak RSS (VmHWM, read by benchmarks/peak_rss.py), the files written, and the check's status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import LlamaShape, write_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--results", type=Path, default=HERE / "onnx_large_results.json")
    args = parser.parse_args()
    shape = LlamaShape(args.layers, 2048, 8192)
    with tempfile.TemporaryDirectory(prefix="foldkit-onnx-large-") as scratch:
        scratch = Path(scratch)
        write_checkpoint(scratch / "model", shape, shard_bytes=2 * 10**9)
        peak_file = scratch / "peak.json"
        command = [sys.executable, str(HERE / "peak_rss.py"), str(peak_file), "-m", "foldkit.cli", "export",
                   str(scratch / "model"), str(scratch / "onnx"), "--json", "--quiet"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"foldkit export failed with exit {done.returncode}: {done.stderr.strip()}")
        report = json.loads(done.stdout)
        peak = int(peak_file.read_text())
    results = {
        "model": f"synthetic Llama, {shape.layers} layers, hidden 2048, intermediate 8192, vocabulary 32000",
        "bfloat16_checkpoint_bytes": shape.nbytes(),
        "command_seconds": seconds,
        "export_seconds": report["export_seconds"],
        "verify_seconds": report["verify_seconds"],
        "peak_rss_bytes": peak,
        "external_data": report["external_data"],
        "files": report["files"],
        "status": report["status"],
        "worst_diff": max(report["verification"]["diffs"], key=lambda diff: diff["max_abs_diff"] / diff["allowed_abs_diff"]),
        "greedy_equal": report["verification"]["greedy"]["equal"],
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
