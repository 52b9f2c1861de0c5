"""`foldkit merge --format onnx`: merge into a temporary directory, verify, then export what was asked for.

--format onnx writes the ONNX graph with its config, tokenizer files and both reports
(foldkit_report.json from the merge, foldkit_export.json) to OUT. --format safetensors,onnx writes the
merged safetensors model to OUT and the graph to OUT/onnx. A merge that fails
its checks stops here with VerificationError before anything is exported, and OUT is not written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from foldkit.errors import OutputError, UsageError, VerificationError
from foldkit.merge import MergeOptions, merge
from foldkit.onnx_export import ExportOptions, ExportReport, check_export_options, export_into, read_config
from foldkit.onnx_graphs import graph_kind
from foldkit.onnx_runtime import choose_provider
from foldkit.output_dir import check_output_path, staged_directory
from foldkit.report import REPORT_FILE, MergeReport

FORMATS = ("safetensors", "onnx")
ONNX_SUBDIRECTORY = "onnx"


def parse_formats(text: str) -> tuple[str, ...]:
    """Parse a comma-separated --format value into a tuple in FORMATS order."""
    requested = {item.strip().lower() for item in text.split(",") if item.strip()}
    unknown = requested - set(FORMATS)
    if not requested or unknown:
        raise UsageError(f"invalid --format {text!r}; use safetensors, onnx, or safetensors,onnx")
    return tuple(name for name in FORMATS if name in requested)


@dataclass
class MergeExportReport:
    merge: MergeReport
    export: ExportReport
    onnx_directory: str | None  # None: the ONNX check failed and nothing was written

    @property
    def verification(self) -> dict | None:
        return self.export.verification

    def to_dict(self) -> dict:
        return {"merge": self.merge.to_dict(), "export": self.export.to_dict(), "onnx_directory": self.onnx_directory}


def merge_and_export(base: str | Path, adapter: str | Path, out: str | Path, formats: tuple[str, ...],
                     merge_options: MergeOptions, export_options: ExportOptions) -> MergeExportReport:
    """Merge ADAPTER into BASE, check it, and write OUT in `formats` (which include onnx) atomically."""
    base, adapter, out = Path(base), Path(adapter), Path(os.path.abspath(out))
    if "onnx" not in formats:
        raise UsageError("merge_and_export needs onnx among the formats; call merge for safetensors alone")
    check_export_options(export_options)
    check_output_path(out, merge_options.force, [base, adapter])
    if export_options.verify:
        choose_provider(export_options.provider)  # a missing runtime or provider fails before the merge
    # Reject a model family the exporter cannot handle before the merge runs. A missing config is left to
    # merge, which reports it with the other base checks.
    if (base / "config.json").is_file():
        graph_kind(read_config(base), export_options.cache)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.foldkit-merged-", dir=out.parent))
    except OSError as error:
        raise OutputError(f"cannot create a directory beside {out}: {error}") from error
    try:
        merged = work / "merged"
        inner = MergeOptions(**{**merge_options.__dict__, "force": False})
        merge_report = merge(base, adapter, merged, inner)
        if merge_report.status == "FAILED":
            raise VerificationError("the merged model's outputs differ from the reference beyond tolerance; "
                                    "it was not exported and nothing was written", merge_report)
        source = f"{base} merged with {adapter}"
        with staged_directory(out, merge_options.force) as staging:
            try:
                if formats == ("onnx",):
                    # The graph, its config and tokenizer files, and the merge's report beside the export's.
                    export_report = export_into(merged, staging, export_options, source)
                    shutil.copyfile(merged / REPORT_FILE, staging / REPORT_FILE)
                    directory = out
                else:
                    for entry in merged.iterdir():
                        os.rename(entry, staging / entry.name)
                    (staging / ONNX_SUBDIRECTORY).mkdir()
                    export_report = export_into(staging, staging / ONNX_SUBDIRECTORY, export_options, source)
                    directory = out / ONNX_SUBDIRECTORY
            except VerificationError as error:
                # Keep the merge's half of the report, so that --json has the same shape as on success.
                raise VerificationError(str(error), MergeExportReport(merge_report, error.result, None)) from error
        return MergeExportReport(merge_report, export_report, str(directory))
    finally:
        shutil.rmtree(work, ignore_errors=True)
