"""Find the installed ONNX Runtime build and open inference sessions on the right execution provider.

foldkit[cpu] installs onnxruntime and foldkit[gpu] installs onnxruntime-gpu. Both ship the same
`onnxruntime` import package, so with both installed one silently overwrites the other's files. foldkit
raises an error in that state rather than check a graph on a runtime it did not choose.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from foldkit.errors import InputError, UsageError

logger = logging.getLogger(__name__)

RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", "cpu", "cuda")


class RuntimeMissingError(InputError):
    """No usable ONNX Runtime is installed."""


def installed_runtimes() -> list[str]:
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def import_runtime():
    """Import onnxruntime, or raise with the install command when it is missing or installed twice."""
    runtimes = installed_runtimes()
    if len(runtimes) > 1:
        raise RuntimeMissingError(
            "both onnxruntime and onnxruntime-gpu are installed and overwrite each other's files; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'foldkit[cpu]' or 'foldkit[gpu]'")
    try:
        import onnxruntime
    except ImportError as error:
        raise RuntimeMissingError(
            f"ONNX Runtime is not installed ({error}); pip install 'foldkit[cpu]' (or 'foldkit[gpu]' for CUDA)"
        ) from error
    return onnxruntime


def choose_provider(requested: str = "auto") -> str:
    """Return the provider name for `requested` (auto: CUDA when this runtime has it, else CPU)."""
    if requested not in PROVIDER_CHOICES:
        raise UsageError(f"invalid provider {requested!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    available = import_runtime().get_available_providers()
    if requested == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    provider = PROVIDERS[requested]
    if provider not in available:
        hint = " (install foldkit[gpu] instead of foldkit[cpu])" if requested == "cuda" else ""
        raise UsageError(f"this ONNX Runtime has no {provider}{hint}; it has {', '.join(available)}")
    return provider


def open_session(path: Path, provider: str, threads: int | None = None, fallback: bool = False):
    """Open an inference session with all graph optimisations on `provider`.

    onnxruntime-gpu lists CUDAExecutionProvider even on a machine without a GPU, and then opens the
    session on the CPU. With `fallback` (provider auto) that is logged; without it, it raises.
    NOTE: the CUDA execution provider path has not run on a GPU yet; only CPU sessions are tested.
    """
    runtime = import_runtime()
    options = runtime.SessionOptions()
    options.graph_optimization_level = runtime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only, because ONNX Runtime prints its warnings on stderr
    if threads:
        options.intra_op_num_threads = threads
    providers = [provider] if provider == PROVIDERS["cpu"] else [provider, PROVIDERS["cpu"]]
    try:
        session = runtime.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for invalid graphs
        raise InputError(f"ONNX Runtime cannot load {path}: {str(error).splitlines()[0]}") from error
    used = session.get_providers()[0]
    if used != provider:
        if not fallback:
            raise InputError(f"ONNX Runtime opened {path} on {used} instead of {provider}: is a GPU visible "
                             "(CUDA_VISIBLE_DEVICES) and are CUDA and cuDNN installed? Use --provider cpu to check on the CPU")
        logger.warning("ONNX Runtime could not use %s and checks the graph on %s instead", provider, used)
    return session
