"""Render benchmarks/results.json as the Markdown tables of benchmarks/RESULTS.md.

Usage: python benchmarks/render_results.py [results.json]
"""

import json
import sys
from pathlib import Path

GIB = 2**30


def seconds(entry: dict) -> str:
    return f"{entry['wall_median_s']:.1f} s ({entry['wall_min_s']:.1f}-{entry['wall_max_s']:.1f})"


def memory(entry: dict) -> str:
    return f"{entry['rss_median_bytes'] / GIB:.2f} GiB"


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"Measured on {results['date']}: {machine['cpus']} CPUs, {machine['memory_bytes'] / GIB:.0f} GiB memory, "
        f"{machine['platform']}, Python {machine['python']}, torch {machine['torch']}.",
        "",
        "| case | checkpoint | I/O floor | foldkit merge | PEFT merge | foldkit / floor | PEFT / foldkit (time) "
        "| foldkit / PEFT (peak RSS) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in results["cases"]:
        if "skipped" in case:
            lines.append(f"| {case['case']} | skipped: {case['skipped']} | | | | | | |")
            continue
        row = [case["case"], f"{case['checkpoint_bytes'] / 1e9:.2f} GB"]
        for method in ("io_floor", "foldkit", "peft"):
            entry = case.get(method)
            row.append(f"{seconds(entry)}, {memory(entry)}" if entry else "not run")
        row.append(f"{case['foldkit_vs_floor_wall']:.2f}x" if "foldkit_vs_floor_wall" in case else "")
        row.append(f"{case['peft_vs_foldkit_wall']:.2f}x" if "peft_vs_foldkit_wall" in case else "")
        row.append(f"{case['foldkit_vs_peft_rss']:.2f}" if "foldkit_vs_peft_rss" in case else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("results.json")
    print(render(json.loads(path.read_text())))
