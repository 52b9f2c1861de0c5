"""The `foldkit` command line. Only this module turns exceptions into messages and exit codes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from foldkit import __version__
from foldkit.errors import FoldkitError, UsageError, VerificationError

EXIT_OK = 0
EXIT_FAILURE = 1  # a known failure: bad input, unwritable output
EXIT_USAGE = 2  # invalid command-line usage (typer's own code)
EXIT_MISMATCH = 3  # the merged outputs did not match the reference within tolerance
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="foldkit",
    help="Fold LoRA and IA3 adapters into plain model weights and prove the result is equivalent.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click output: usage errors end in one "Error: ..." line instead of a box.
    rich_markup_mode=None,
)
logger = logging.getLogger("foldkit")


class CheckMode(str, Enum):
    auto = "auto"
    modules = "modules"
    logits = "logits"
    all = "all"
    none = "none"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result; no progress bars.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print debug logs on stderr.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Atol = Annotated[Optional[float], typer.Option(min=0.0, help="Absolute tolerance; default from the dtype's table entry.")]
Rtol = Annotated[Optional[float], typer.Option(min=0.0, help="Tolerance relative to max|reference|; default from the table.")]
Checks = Annotated[CheckMode, typer.Option(
    "--verify", help="Checks to run: modules (every folded weight, streaming), logits (whole model, in memory), "
    "all, none, or auto (modules, plus logits when a float32 copy of the model fits in memory).")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Load an adapter_model.bin pickle (weights only). Off: pickles are rejected.")]


class ExternalData(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class Provider(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ExportDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


NoCache = Annotated[bool, typer.Option(
    "--no-cache", help="Decoders: export logits only, without past key/value inputs and present outputs.")]
Opset = Annotated[Optional[int], typer.Option(
    help="ONNX opset to write. Below 18 only when onnx's converter can rewrite every operator.", show_default="18")]
OnnxDType = Annotated[ExportDType, typer.Option(
    "--onnx-dtype", help="dtype of the ONNX graph's weights and activations.")]
ExternalDataOption = Annotated[ExternalData, typer.Option(
    "--external-data", help="Store weights in one model.onnx.data file beside the graph: auto (only past 2 GB), "
    "always or never.")]
ProviderOption = Annotated[Provider, typer.Option(
    help="ONNX Runtime execution provider for the check: auto (CUDA when the runtime has it), cpu or cuda.")]


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record is logged, not when it was created."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it
        pass


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.INFO
    if quiet:
        level = logging.ERROR
    elif verbose:
        level = logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _fail(message: str, code: int) -> None:
    one_line = " ".join(message.split())
    typer.echo(f"Error: {one_line}", err=True)
    raise typer.Exit(code)


def _run(action, interrupted: str = "interrupted; no partial output was written and any existing OUT is unchanged",
         on_mismatch=None):
    try:
        return action()
    except VerificationError as error:
        if on_mismatch is not None:
            on_mismatch(error)
        _fail(str(error), EXIT_MISMATCH)
    except UsageError as error:
        _fail(str(error), EXIT_USAGE)
    except FoldkitError as error:
        _fail(str(error), EXIT_FAILURE)
    except KeyboardInterrupt:
        _fail(interrupted, EXIT_INTERRUPTED)


def _print_verification(verification: dict) -> None:
    typer.echo(f"verification: {verification['status']}")
    modules = verification["modules"]
    if modules is not None:
        typer.echo(f"  modules: {'passed' if modules['passed'] else 'FAILED'}, {modules['modules_checked']} checked, "
                   f"worst {modules['worst_module']} at {modules['worst_bound_ratio']:.3g} of its rounding bound")
        if modules["failed_modules"]:
            failed = modules["failed_modules"]
            more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
            typer.echo(f"  modules beyond their bound: {', '.join(failed[:10])}{more}")
    logits = verification["logits"]
    if logits is not None:
        typer.echo(f"  {logits['compared']}: {'passed' if logits['passed'] else 'FAILED'}, "
                   f"max abs diff {logits['max_abs_diff']:.3g}, max rel diff {logits['max_rel_diff']:.3g} "
                   f"(allowed {logits['allowed_abs_diff']:.3g}: atol {logits['atol']:g} + rtol {logits['rtol']:g} x "
                   f"{logits['reference_max_abs']:.3g} + 4 x rounding sensitivity {logits['rounding_sensitivity']:.3g}, "
                   f"merged dtype {logits['merged_dtype']})")
        if logits["top1_agreement"] is not None:
            typer.echo(f"  greedy top-1 agreement {logits['top1_agreement']:.2%}")
        typer.echo(f"  adapter effect on outputs (max abs) {logits['adapter_effect_max_abs']:.3g}")
    for note in verification["notes"]:
        typer.echo(f"  {note}")


@app.command()
def merge(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="Base model directory (config.json and safetensors weights).")],
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="PEFT adapter directory (adapter_config.json and weights).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory; created atomically.")],
    dtype: Annotated[Optional[DType], typer.Option(help="Store floating-point tensors in this dtype; default: the base's.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists and is not empty.")] = False,
    max_shard_size: Annotated[Optional[str], typer.Option(
        help="Write shards of at most this size, such as 5GB (10^9 bytes) or 2GiB; default: the base's shards.")] = None,
    device: Annotated[str, typer.Option(
        help="Device for the fold math (cpu, cuda, cuda:N); reading and writing stay streaming on the CPU.")] = "cpu",
    checks: Checks = CheckMode.auto,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip all checks (same as --verify none).")] = False,
    atol: Atol = None,
    rtol: Rtol = None,
    allow_pickle: AllowPickle = False,
    output_format: Annotated[str, typer.Option(
        "--format", help="What to write: safetensors, onnx (the graph only), or safetensors,onnx (graph in OUT/onnx).")
    ] = "safetensors",
    no_cache: NoCache = False,
    opset: Opset = None,
    onnx_dtype: OnnxDType = ExportDType.float32,
    external_data: ExternalDataOption = ExternalData.auto,
    provider: ProviderOption = Provider.auto,
    onnx_atol: Annotated[Optional[float], typer.Option(
        min=0.0, help="Absolute tolerance of the ONNX check; default from the export table.")] = None,
    onnx_rtol: Annotated[Optional[float], typer.Option(
        min=0.0, help="Relative tolerance of the ONNX check; default from the export table.")] = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Fold ADAPTER into BASE and write a plain model to OUT, then verify it.

    Example: foldkit merge ./SmolLM2-135M ./my-lora ./merged
    """
    _setup_logging(quiet, verbose)
    if no_verify and checks is not CheckMode.auto:
        _fail(f"--no-verify conflicts with --verify {checks.value}; pass one of them", EXIT_USAGE)
    from foldkit.merge import MergeOptions, merge as run_merge

    options = MergeOptions(dtype=dtype.value if dtype else None, force=force, allow_pickle=allow_pickle,
                           max_shard_size=max_shard_size, device=device,
                           verify="none" if no_verify else checks.value, atol=atol, rtol=rtol, progress=not quiet and sys.stderr.isatty())
    from foldkit.merge_export import merge_and_export, parse_formats

    formats = _run(lambda: parse_formats(output_format))
    if "onnx" in formats:
        export_options = _export_options(no_cache, opset, onnx_dtype, external_data, provider, not no_verify,
                                         onnx_atol, onnx_rtol)
        result = _run(lambda: merge_and_export(base, adapter, out, formats, options, export_options),
                      on_mismatch=lambda error: _export_failure(error, as_json))
        if as_json:
            _echo_json(result.to_dict())
            return
        typer.echo(f"merged {len(result.merge.folded)} {result.merge.peft_type} modules")
        _print_verification(result.merge.verification)
        _print_export(result.export.to_dict(), Path(result.onnx_directory))
        return
    if no_cache or opset is not None or onnx_dtype is not ExportDType.float32 or external_data is not ExternalData.auto \
            or provider is not Provider.auto or onnx_atol is not None or onnx_rtol is not None:
        _fail("--no-cache, --opset, --onnx-dtype, --external-data, --provider, --onnx-atol and --onnx-rtol apply to "
              "ONNX output; add --format onnx or --format safetensors,onnx", EXIT_USAGE)
    report = _run(lambda: run_merge(base, adapter, out, options))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(f"merged {len(report.folded)} {report.peft_type} modules into {out}")
        _print_verification(report.verification)
    if report.status == "FAILED":
        typer.echo("Error: the merged model's outputs differ from the reference beyond tolerance; "
                   f"the output is kept in {out} and its report says FAILED", err=True)
        raise typer.Exit(EXIT_MISMATCH)


def _export_options(no_cache: bool, opset: int | None, dtype: "ExportDType", external_data: "ExternalData",
                    provider: "Provider", verify: bool, atol: float | None, rtol: float | None, force: bool = False):
    """Build ExportOptions from the ONNX options that export and merge --format onnx share."""
    from foldkit.onnx_export import DEFAULT_OPSET, ExportOptions

    return ExportOptions(cache=not no_cache, opset=DEFAULT_OPSET if opset is None else opset, dtype=dtype.value,
                         external_data=external_data.value, verify=verify, provider=provider.value, atol=atol,
                         rtol=rtol, force=force)


def _echo_json(result: dict) -> None:
    """Print `result` as strict JSON on stdout (a NaN difference becomes the string "nan")."""
    from foldkit.report import json_safe

    typer.echo(json.dumps(json_safe(result), indent=2))


def _print_export(report: dict, directory: Path | None) -> None:
    """Print what was exported (unless `directory` is None: nothing was written) and every check row."""
    if directory is not None:
        files = report["files"]
        size = sum(files.values())
        typer.echo(f"exported {report['model_type']} as {report['kind']} (opset {report['opset']}, {report['dtype']}) "
                   f"to {directory} in {report['export_seconds']:.1f} s: {', '.join(files)} ({size / 1e6:.1f} MB)")
    verification = report["verification"]
    if verification is None:
        typer.echo("ONNX Runtime check: NOT VERIFIED (--no-verify)")
        return
    typer.echo(f"ONNX Runtime check on {verification['provider']}: {'PASSED' if verification['passed'] else 'FAILED'} "
               f"(atol {verification['atol']:g} + rtol {verification['rtol']:g} x max|reference|)")
    for diff in verification["diffs"]:
        typer.echo(f"  {'ok  ' if diff['passed'] else 'FAIL'} {diff['case']}: {diff['output']}: max abs diff "
                   f"{diff['max_abs_diff']:.3g} (allowed {diff['allowed_abs_diff']:.3g}), "
                   f"max rel diff {diff['max_rel_diff']:.3g}")
    greedy = verification["greedy"]
    if greedy is not None:
        typer.echo(f"  {'ok  ' if greedy['equal'] else 'FAIL'} greedy generation, prompt {greedy['prompt_shape'][0]} x "
                   f"{greedy['prompt_shape'][1]} left-padded, {greedy['new_tokens']} new tokens: "
                   f"{'same tokens as' if greedy['equal'] else 'tokens differ from'} PyTorch's generate")


def _export_failure(error: VerificationError, as_json: bool) -> None:
    report = error.result
    if as_json and report is not None and hasattr(report, "to_dict"):
        _echo_json(report.to_dict())
    elif report is not None and getattr(report, "verification", None) and "diffs" in report.verification:
        _print_export(getattr(report, "export", report).to_dict(), None)
    _fail(str(error), EXIT_MISMATCH)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(metavar="MODEL_DIR", help="Hugging Face model directory (config.json, safetensors).")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory for model.onnx; created atomically.")],
    output_format: Annotated[str, typer.Option("--format", help="Output format; only onnx.")] = "onnx",
    no_cache: NoCache = False,
    opset: Opset = None,
    onnx_dtype: OnnxDType = ExportDType.float32,
    external_data: ExternalDataOption = ExternalData.auto,
    provider: ProviderOption = Provider.auto,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the ONNX Runtime check.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists and is not empty.")] = False,
    atol: Atol = None,
    rtol: Rtol = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Export MODEL_DIR to an ONNX graph in OUT and check it in ONNX Runtime against PyTorch; exit 3 on a mismatch.

    Example: foldkit export ./merged ./merged-onnx --format onnx
    """
    _setup_logging(quiet, verbose)
    if output_format.strip().lower() != "onnx":
        _fail(f"invalid --format {output_format!r} for export; only onnx is supported", EXIT_USAGE)
    from foldkit.onnx_export import export as run_export

    options = _export_options(no_cache, opset, onnx_dtype, external_data, provider, not no_verify, atol, rtol, force)
    report = _run(lambda: run_export(model, out, options), on_mismatch=lambda error: _export_failure(error, as_json))
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_export(report.to_dict(), out)


@app.command()
def verify(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="Base model directory.")],
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="PEFT adapter directory.")],
    merged: Annotated[Path, typer.Argument(metavar="MERGED", help="Merged model directory to check.")],
    checks: Checks = CheckMode.auto,
    atol: Atol = None,
    rtol: Rtol = None,
    allow_pickle: AllowPickle = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Check that MERGED computes what BASE with ADAPTER computes; exit 3 on a mismatch.

    Example: foldkit verify ./SmolLM2-135M ./my-lora ./merged --json
    """
    _setup_logging(quiet, verbose)
    if checks is CheckMode.none:
        _fail("--verify none leaves nothing to check; choose auto, modules, logits or all", EXIT_USAGE)
    from foldkit.verify_command import verify_merged

    result = _run(lambda: verify_merged(base, adapter, merged, checks.value, atol, rtol, allow_pickle))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_verification(result.to_dict())
    if not result.passed:
        _fail(f"{merged} does not compute what {base} with {adapter} computes, beyond tolerance", EXIT_MISMATCH)


@app.command()
def train(
    base: Annotated[Path, typer.Argument(metavar="BASE", help="Base model directory with a tokenizer.")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Plain text, or JSONL with text or prompt/completion.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Directory for the PEFT-format adapter.")],
    method: Annotated[str, typer.Option(help="Adapter method: ia3 or lora.")] = "ia3",
    form: Annotated[str, typer.Option(help="Adapter form during training: activation or weight.")] = "activation",
    targets: Annotated[str, typer.Option(help="Comma-separated target module names.")] = "k_proj,v_proj,down_proj",
    feedforward: Annotated[str, typer.Option(help="Comma-separated IA3 feedforward modules (input scaling).")] = "down_proj",
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha; scaling is alpha / r.")] = 16.0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-3,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; default: --epochs full passes.")] = None,
    epochs: Annotated[int, typer.Option(help="Full passes over DATA when --steps is not given.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch and process.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Max tokens per example.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed for the adapter init and the data order.")] = 0,
    chat_template: Annotated[bool, typer.Option(
        "--chat-template", help="Format each JSONL prompt as a user turn with the tokenizer's chat template.")] = False,
    save_every: Annotated[int, typer.Option(help="Save OUT/checkpoint-STEP every this many steps; 0: only at the end.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest OUT/checkpoint-STEP.")] = False,
    as_json: AsJson = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Train an IA3 or LoRA adapter on a frozen BASE and save it to OUT in PEFT's format.

    Example: foldkit train ./SmolLM2-135M examples/data/style.txt ./adapter --method lora --targets q_proj,v_proj --steps 40
    """
    _setup_logging(quiet, verbose)
    from foldkit.train import TrainOptions, train as run_train

    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    options = TrainOptions(method=method, form=form, targets=split(targets), feedforward=split(feedforward),
                           rank=rank, lora_alpha=lora_alpha, lr=lr, steps=steps, epochs=epochs, batch_size=batch_size,
                           grad_accum=grad_accum, max_length=max_length, seed=seed, save_every=save_every,
                           chat_template=chat_template,
                           resume=resume, progress=not quiet and sys.stderr.isatty())
    result = _run(lambda: run_train(base, data, out, options),
                  interrupted="interrupted; checkpoints already saved in OUT are kept, continue with --resume")
    if not result.main_process:
        return
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif result.losses:
        typer.echo(f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.1f} s; "
                   f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; adapter in {out}")


@app.command()
def memory(
    model: Annotated[Path, typer.Argument(metavar="MODEL_DIR_OR_CONFIG",
                                          help="Model directory or its config.json; no weights are needed.")],
    method: Annotated[str, typer.Option(help="Adapter method: ia3 or lora.")] = "ia3",
    targets: Annotated[str, typer.Option(help="Comma-separated target module names (PEFT suffix rule).")] = "k_proj,v_proj,down_proj",
    feedforward: Annotated[str, typer.Option(help="Comma-separated IA3 feedforward modules (input scaling).")] = "down_proj",
    batch: Annotated[int, typer.Option(min=1, help="Batch size.")] = 1,
    seq: Annotated[int, typer.Option(min=1, help="Sequence length in tokens.")] = 512,
    dtype: Annotated[DType, typer.Option(help="Model dtype of weights and activations.")] = DType.bfloat16,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank r.")] = 8,
    as_json: AsJson = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Estimate the memory of each adapter form (activation and weight) from a config alone.

    Example: foldkit memory ./gemma-2b --method ia3 --targets k_proj,v_proj,down_proj --feedforward down_proj --batch 32 --seq 216
    """
    _setup_logging(quiet, verbose)
    import torch

    from foldkit.memory import estimate_memory

    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    estimate = _run(lambda: estimate_memory(model, method, split(targets), split(feedforward), batch, seq,
                                            getattr(torch, dtype.value), rank))
    if as_json:
        typer.echo(json.dumps(estimate.to_dict(), indent=2))
        return
    _print_memory(estimate)


def _print_memory(estimate) -> None:
    gib = 2**30
    tokens = estimate.batch * estimate.sequence
    typer.echo(f"{estimate.method.upper()}, {estimate.dtype}, batch {estimate.batch} x sequence {estimate.sequence} "
               f"= T {tokens} tokens, {estimate.blocks} blocks")
    for kind in estimate.kinds:
        scaling = "input scaling" if kind.feedforward else "output scaling"
        typer.echo(f"{kind.name}: in {kind.in_features}, out {kind.out_features}"
                   + (f", {scaling}" if estimate.method == "ia3" else "")
                   + f", {kind.modules_per_block} per block, {kind.trainable_parameters:,} trainable parameters each")
        typer.echo(f"  activation form: {kind.activation_form_bytes:,} bytes per module  ({kind.activation_formula})")
        typer.echo(f"  weight form:     {kind.weight_form_bytes:,} bytes per module  ({kind.weight_formula})")
        if kind.crossover_tokens is None:
            typer.echo("  the weight form is never cheaper")
        else:
            typer.echo(f"  the weight form is cheaper from batch x sequence = {kind.crossover_tokens:,}")
    per_block_activation = sum(kind.activation_form_bytes * kind.modules_per_block for kind in estimate.kinds)
    per_block_weight = sum(kind.weight_form_bytes * kind.modules_per_block for kind in estimate.kinds)
    typer.echo(f"per block: activation form {per_block_activation:,} bytes, weight form {per_block_weight:,} bytes")
    typer.echo(f"trainable parameters: {estimate.trainable_parameters:,}")
    typer.echo(f"activation form, all blocks: {estimate.activation_form_bytes:,} bytes "
               f"({estimate.activation_form_bytes / gib:.2f} GiB)")
    typer.echo(f"weight form, all blocks:     {estimate.weight_form_bytes:,} bytes "
               f"({estimate.weight_form_bytes / gib:.2f} GiB)")
    typer.echo(f"parameters {estimate.parameter_bytes:,} bytes ({estimate.dtype}), gradients "
               f"{estimate.gradient_bytes:,} bytes (float32), Adam moments {estimate.adam_moment_bytes:,} bytes (float32)")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"foldkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Fold LoRA and IA3 adapters into plain model weights and prove the result is equivalent."""


def run() -> None:
    """Run the command line (the `foldkit` console script), then ignore Ctrl-C while Python shuts down.

    Shutting down after an export takes over a second. By then OUT is complete or absent, so a Ctrl-C
    would only make the exit status (130, "interrupted") contradict what is on disk.
    """
    try:
        app()
    except SystemExit as done:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if done.code == EXIT_INTERRUPTED:
            # CPython kills itself with SIGINT at exit (status -2, not 130) when a KeyboardInterrupt passed
            # through code it ran from C, even one that foldkit handled (seen once in CI during export).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
