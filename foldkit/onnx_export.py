"""`foldkit export`: trace a Hugging Face model directory into an ONNX graph, check it in ONNX Runtime, write OUT.

Stages:
1. Check the inputs and options.
2. Load the model in PyTorch (safetensors only, no remote code).
3. Trace it with torch.onnx's dynamo exporter.
4. Save the graph, with the weights as external data in one file when they pass the 2 GB protobuf limit.
5. Check the graph in ONNX Runtime against PyTorch, then rename the staging directory to OUT.
A mismatch beyond tolerance raises VerificationError and leaves no OUT behind.

The whole model is loaded into memory to be traced: export is not streaming, unlike merge.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from foldkit import __version__
from foldkit.checkpoint import open_checkpoint
from foldkit.errors import CheckpointError, InputError, UsageError, VerificationError
from foldkit.onnx_graphs import KIND_ENCODER, GraphSpec, UnsupportedModelError, graph_kind, graph_spec
from foldkit.onnx_runtime import PROVIDER_CHOICES, choose_provider, open_session
from foldkit.output_dir import check_output_path, copy_side_files, staged_directory
from foldkit.report import json_safe
from foldkit.tolerances import EXPORT_TOLERANCES, export_tolerance_for

logger = logging.getLogger(__name__)

GRAPH_FILE = "model.onnx"
EXPORT_REPORT_FILE = "foldkit_export.json"
# torch.onnx's dynamo exporter writes opset 18 graphs natively and converts others with onnx's version
# converter, which cannot take some operators back (Shape-15, Split-18, LayerNormalization-17). Opset 18
# runs in every ONNX Runtime release since 1.14.
DEFAULT_OPSET = 18
MIN_OPSET = 7  # the oldest opset ONNX Runtime runs
# A protobuf message cannot exceed 2 GiB, so the threshold leaves 64 MiB for the graph beside the weights.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
EXTERNAL_DATA_CHOICES = ("auto", "always", "never")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class ExportOptions:
    cache: bool = True  # decoders: past key/value inputs and present outputs (False: logits only)
    opset: int = DEFAULT_OPSET
    dtype: str = "float32"  # a key of EXPORT_DTYPES
    external_data: str = "auto"  # auto: only when the weights pass EXTERNAL_DATA_THRESHOLD
    verify: bool = True
    provider: str = "auto"  # auto, cpu or cuda: where ONNX Runtime runs the check
    atol: float | None = None
    rtol: float | None = None
    force: bool = False
    # onnxscript's graph optimiser. Off: its constant folding stores a transposed copy of a tied embedding
    # as a second weight (seen on tiny Llama and Gemma), and it adds a third to SmolLM2's export time.
    # ONNX Runtime folds constants itself when it opens the graph.
    optimize: bool = False


@dataclass
class ExportReport:
    """Record of the files `foldkit export` wrote and the checks it ran, saved as foldkit_export.json."""

    foldkit_version: str
    model: str
    model_type: str
    kind: str
    opset: int
    dtype: str
    inputs: list[str]
    outputs: list[str]
    external_data: bool
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    weight_bytes: int = 0
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    verification: dict | None = None
    status: str = "NOT VERIFIED"  # PASSED or NOT VERIFIED (a failed check raises VerificationError)

    def to_dict(self) -> dict:
        return asdict(self)


def check_export_options(options: ExportOptions) -> None:
    """Raise UsageError for option values that are invalid whatever the model."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= options.opset <= newest:
        raise UsageError(f"opset {options.opset} is outside what foldkit can export: choose {DEFAULT_OPSET} (the "
                         f"default) to {newest} (the installed onnx's newest). Opsets {MIN_OPSET} to "
                         f"{DEFAULT_OPSET - 1} work only when onnx's converter can rewrite every operator of the graph")
    if options.dtype not in EXPORT_DTYPES:
        raise UsageError(f"invalid export dtype {options.dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    if options.external_data not in EXTERNAL_DATA_CHOICES:
        raise UsageError(f"invalid external data choice {options.external_data!r}; choose one of "
                         f"{', '.join(EXTERNAL_DATA_CHOICES)}")
    if options.provider not in PROVIDER_CHOICES:
        raise UsageError(f"invalid provider {options.provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")


def export(model_dir: str | Path, out: str | Path, options: ExportOptions | None = None,
           source: str | None = None) -> ExportReport:
    """Export MODEL_DIR to OUT atomically and check the graph; return the report.

    `source` is what the report names as the exported model (default: MODEL_DIR).

    Raises VerificationError (OUT not written) when ONNX Runtime's outputs differ beyond tolerance.
    """
    options = options or ExportOptions()
    model_dir, out = Path(model_dir), Path(os.path.abspath(out))
    check_export_options(options)
    check_output_path(out, options.force, [model_dir])
    with staged_directory(out, options.force) as staging:
        return export_into(model_dir, staging, options, source)


def export_into(model_dir: Path, directory: Path, options: ExportOptions, source: str | None = None) -> ExportReport:
    """Export MODEL_DIR into the existing empty `directory` (no staging, no rename).

    The caller has checked `options` with check_export_options, as export() and merge_and_export() do.
    """
    checkpoint = open_checkpoint(model_dir, role="model")
    checkpoint.close()
    config = read_config(model_dir)
    kind = graph_kind(config, options.cache)
    if kind == KIND_ENCODER and not options.cache:
        logger.warning("--no-cache applies to decoders only; %s is an encoder, whose graph has no cache anyway",
                       config.model_type)
    if options.verify:
        from foldkit.onnx_verify import MIN_POSITIONS, position_limit

        positions = position_limit(config)
        if positions < MIN_POSITIONS:
            raise UnsupportedModelError(f"cannot check a model with only {positions} positions: the check needs at "
                                        f"least {MIN_POSITIONS}, so export it with --no-verify")
        provider = choose_provider(options.provider)
    else:
        provider = None
        if options.provider != "auto":
            logger.warning("--provider %s is ignored: it chooses where the check runs, and --no-verify skips the check",
                           options.provider)
    dtype = EXPORT_DTYPES[options.dtype]
    model = load_model(model_dir, kind, dtype)
    weight_bytes = unique_weight_bytes(model)
    external = _use_external_data(options.external_data, weight_bytes)
    spec = graph_spec(model, kind)
    report = ExportReport(__version__, source or str(model_dir), config.model_type, kind, options.opset, options.dtype,
                          spec.input_names, spec.output_names, external, weight_bytes=weight_bytes)
    logger.info("exporting %s (%s, %.0f MB of %s weights) to ONNX opset %d; tracing time grows with the layer "
                "count (30-layer SmolLM2-135M: about 45 s on 2 cores)", source or model_dir, kind, weight_bytes / 1e6,
                options.dtype, options.opset)
    start = time.perf_counter()
    program = trace(spec, options.opset, options.optimize, config.model_type)
    graph = directory / GRAPH_FILE
    save_graph(program, graph, external)
    report.export_seconds = round(time.perf_counter() - start, 2)
    logger.info("exported in %.1f s", report.export_seconds)
    (directory / "config.json").write_text((model_dir / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    copy_side_files(model_dir, directory)
    if options.verify:
        start = time.perf_counter()
        tolerance = export_tolerance_for(dtype, options.atol, options.rtol)
        logger.info("checking the graph in ONNX Runtime (%s) against PyTorch", provider)
        session = open_session(graph, provider, fallback=options.provider == "auto")
        provider = session.get_providers()[0]
        from foldkit.onnx_verify import check_graph

        # A float16 graph is held to how far PyTorch's own float16 result is from float32 (see check_graph).
        float32_model = load_model(model_dir, kind, torch.float32) if dtype != torch.float32 else None
        check = check_graph(session, model, kind, tolerance, provider, spec.cache, float32_model)
        del float32_model
        del session
        report.verify_seconds = round(time.perf_counter() - start, 2)
        report.verification = check.to_dict()
        if not check.passed:
            report.status = "FAILED"
            raise VerificationError(
                f"the ONNX graph's outputs differ from PyTorch's beyond tolerance ({'; '.join(check.failures()[:3])}); "
                "nothing was written", report)
        report.status = "PASSED"
    # Every file written, in subdirectories too (sentence-transformers' 1_Pooling/), but the report itself.
    report.files = {str(path.relative_to(directory)): path.stat().st_size
                    for path in sorted(directory.rglob("*")) if path.is_file()}
    (directory / EXPORT_REPORT_FILE).write_text(json.dumps(json_safe(report.to_dict()), indent=2) + "\n",
                                                encoding="utf-8")
    return report


def read_config(model_dir: Path):
    """Read config.json with transformers (no remote code); raise UnsupportedModelError when it cannot."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as error:  # transformers validates configs with many exception types
        raise UnsupportedModelError(f"transformers cannot read {model_dir / 'config.json'}: "
                                    f"{_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    """Return the error's type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_model(model_dir: Path, kind: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load the model from safetensors only; raise when any weight would be left at random init."""
    import transformers

    model_class = transformers.AutoModel if kind == KIND_ENCODER else transformers.AutoModelForCausalLM
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
    try:
        model, info = model_class.from_pretrained(str(model_dir), **kwargs)
        missing = list(info.get("missing_keys") or [])
        if missing and kind == KIND_ENCODER and all(name.startswith("pooler.") for name in missing):
            # An encoder saved without its pooler (from a masked-LM or sentence checkpoint): export
            # last_hidden_state only rather than a randomly initialised pooler.
            model, info = model_class.from_pretrained(str(model_dir), add_pooling_layer=False, **kwargs)
            missing = list(info.get("missing_keys") or [])
    except Exception as error:  # transformers raises many types for configs and weights it cannot use
        mismatch = _shape_mismatch(model_dir, model_class)
        raise CheckpointError(f"transformers cannot load {model_dir}: {mismatch or _first_line(error)}") from error
    if missing:
        raise CheckpointError(f"{model_dir} lacks weights {', '.join(sorted(missing)[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                              + ": exporting would write randomly initialised tensors")
    unexpected = list(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning("%s has %d tensors that the model does not use and the graph leaves out, such as %s",
                       model_dir, len(unexpected), ", ".join(sorted(unexpected)[:3]))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"weight {name} in {model_dir} contains NaN or infinite values; "
                                  "fix the checkpoint before exporting it")
    return model.eval()


def _shape_mismatch(model_dir: Path, model_class) -> str | None:
    """Name the first checkpoint tensor whose shape differs from what the config builds, if any."""
    try:
        config = read_config(model_dir)
        with torch.device("meta"):
            model = model_class.from_config(config)
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        checkpoint = open_checkpoint(model_dir, role="model")
        checkpoint.close()
    except Exception:  # only an aid for the message, since the original error is reported either way
        return None
    for name, info in checkpoint.tensors.items():
        # Base-model classes (AutoModel) drop the task model's prefix, such as "bert.".
        key = name if name in expected else name.partition(".")[2]
        if key in expected and tuple(info.shape) != expected[key]:
            return (f"tensor {name} has shape {list(info.shape)} in the checkpoint but {list(expected[key])} "
                    "in the model that config.json describes")
    return None


def unique_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, counting tied (shared) tensors once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def _use_external_data(choice: str, weight_bytes: int) -> bool:
    if choice == "never" and weight_bytes > EXTERNAL_DATA_THRESHOLD:
        raise UsageError(f"the weights take {weight_bytes / 2**30:.2f} GiB, past the 2 GiB limit of a single ONNX "
                         "file; use --external-data auto or always")
    return choice == "always" or (choice == "auto" and weight_bytes > EXTERNAL_DATA_THRESHOLD)


def trace(spec: GraphSpec, opset: int, optimize: bool, model_type: str):
    """Run torch.onnx's dynamo exporter on the spec's wrapper; turn its failures into InputError."""
    captured = io.StringIO()
    # The exporter, torch.export and onnxscript log warnings, tracebacks and whole FX graphs (a failed
    # opset conversion, an untraceable model) that foldkit reports itself in one line.
    quiet_loggers = {name: logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")}
    levels = {name: quiet.level for name, quiet in quiet_loggers.items()}
    for quiet in quiet_loggers.values():
        quiet.setLevel(logging.CRITICAL if not logger.isEnabledFor(logging.DEBUG) else logging.DEBUG)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), \
                torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(spec.module, spec.example, dynamic_shapes=spec.dynamic_shapes,
                                     input_names=spec.input_names, output_names=spec.output_names,
                                     opset_version=opset, dynamo=True, optimize=optimize, verbose=False,
                                     report=False)
    except Exception as error:  # the exporter raises many unrelated types, and all mean "cannot export"
        logger.debug("exporter output:\n%s", captured.getvalue())
        summary = _exporter_summary(error)
        raise UnsupportedModelError(
            f"torch.onnx could not export this {model_type} model at opset {opset}: {summary}") from error
    finally:
        for name, quiet in quiet_loggers.items():
            quiet.setLevel(levels[name])
    written = program.model.opset_imports.get("")
    if written != opset:
        raise UnsupportedModelError(f"cannot write this {model_type} graph at opset {opset}: {_conversion_error(program, opset)}")
    return program


def _conversion_error(program, opset: int) -> str:
    """Explain why the graph is not at `opset`, because torch.onnx only logs its converter's failure."""
    import onnx

    absent, newer = set(), {}
    for node in program.model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset)
        except onnx.defs.SchemaError:
            absent.add(node.op_type)
            continue
        try:
            since = onnx.defs.get_schema(node.op_type, DEFAULT_OPSET).since_version
        except onnx.defs.SchemaError:  # an operator newer than opset 18, such as Attention-23
            continue
        if since > opset:
            newer[node.op_type] = since
    hint = f"choose --opset {DEFAULT_OPSET} or newer"
    if absent:
        return f"the graph uses the operators {', '.join(sorted(absent))}, which opset {opset} does not have; {hint}"
    if newer:
        latest = sorted(newer.items(), key=lambda item: (-item[1], item[0]))[:4]
        listed = ", ".join(f"{name}-{since}" for name, since in latest)
        more = f" and {len(newer) - len(latest)} more" if len(newer) > len(latest) else ""
        return f"onnx's version converter cannot rewrite operators newer than opset {opset} ({listed}{more}); {hint}"
    return (f"torch.onnx wrote opset {program.model.opset_imports.get('')} because its converter cannot produce "
            f"opset {opset} for this graph; choose --opset {DEFAULT_OPSET} (the default) or another opset it can write")


def _exporter_summary(error: Exception) -> str:
    """Return the first line of the innermost cause, because the exporter wraps it in long reports."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return _first_line(cause)[:400]


def save_graph(program, path: Path, external: bool) -> None:
    """Save the graph. With `external`, every weight over 256 bytes (onnx_ir's threshold) goes to one
    PATH.data file beside it, and smaller ones (norm weights of tiny models, rotary frequencies) stay inline."""
    try:
        program.save(str(path), external_data=external)
    except OSError:
        raise  # the staging directory turns it into OutputError
    except Exception as error:  # onnx/protobuf serialisation errors, such as a graph over 2 GiB
        raise InputError(f"cannot save the ONNX graph to {path}: {_exporter_summary(error)}") from error
    if not external:
        data = path.with_name(path.name + ".data")
        if data.exists() and data.stat().st_size == 0:
            data.unlink()

