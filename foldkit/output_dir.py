"""Create an output directory atomically: write into a temporary sibling, rename it into place at the end."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from foldkit.errors import OutputError

logger = logging.getLogger(__name__)

# Files copied from the base model directory: configs and tokenizer files, never weights.
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    # sentence-transformers' pipeline description (pooling, normalisation), as in all-MiniLM-L6-v2.
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# sentence-transformers module folders such as 1_Pooling: copied when they contain no weight files.
MODULE_FOLDER = re.compile(r"\d+_[A-Za-z]\w*")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx")


def check_output_path(out: Path, force: bool, inputs: list[Path]) -> None:
    """Reject an OUT that exists and is not empty (unless force) or that overlaps an input directory."""
    resolved = out.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise OutputError(f"output directory {out} is the current directory or contains it; choose a new directory")
    for source in inputs:
        source = source.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputError(f"output directory {out} overlaps input directory {source}; choose another OUT")
    if out.is_symlink():
        raise OutputError(f"output path {out} is a symbolic link; pass the directory it points to, or another OUT")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(
            f"output directory {out} exists and is not empty; pass --force (force=True in Python) to replace it"
        )
    if not out.parent.exists():
        raise OutputError(f"parent directory of {out} does not exist: {out.parent}")


@contextmanager
def staged_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success rename it to `out`, on any error delete it."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.foldkit-", dir=out.parent))
    except OSError as error:
        raise OutputError(f"cannot create a directory beside {out}: {error}") from error
    # mkdtemp creates mode 0700; give the output the permissions a plain mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        _replace(staging, out, force)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"failed to write output directory {out}: {error}; nothing was written") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Ignore SIGINT inside the block (main thread only; elsewhere Python delivers no signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _replace(staging: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force and any(out.iterdir()):
            raise OutputError(f"output directory {out} was created by someone else during the merge")
        backup = out.with_name(f".{out.name}.foldkit-old")
        shutil.rmtree(backup, ignore_errors=True)
        # Ctrl-C is held back from here on: between the renames it would leave OUT missing, and during the
        # backup's removal it would report an interruption although the new OUT is already in place.
        with _sigint_held():
            os.rename(out, backup)
            os.rename(staging, out)
            shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(staging, out)
    logger.debug("renamed %s to %s", staging, out)


def copy_side_files(base: Path, staging: Path) -> list[str]:
    """Copy config-adjacent files (tokenizer, generation config) from the base; return their names."""
    copied = []
    for name in COPIED_FILES:
        source = base / name
        if source.is_file():
            shutil.copyfile(source, staging / name)
            copied.append(name)
    for folder in sorted(base.iterdir()):
        if not folder.is_dir() or not MODULE_FOLDER.fullmatch(folder.name):
            continue
        files = [path for path in folder.rglob("*") if path.is_file()]
        if any(path.suffix in WEIGHT_SUFFIXES for path in files):
            logger.warning("not copying %s: it contains weight files that foldkit does not merge", folder)
            continue
        shutil.copytree(folder, staging / folder.name)
        copied.append(folder.name)
    return copied
