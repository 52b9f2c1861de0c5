"""Read a base model's safetensors checkpoint one tensor at a time, with positioned reads."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from foldkit.errors import CheckpointError
from foldkit.safetensors_reader import HeaderEntry, read_header, read_tensor

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

@dataclass(frozen=True)
class TensorInfo:
    """Location, dtype and shape of one tensor in a checkpoint."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset of the data in `file`; -1 for a tensor not yet written

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class Checkpoint:
    """A model directory: its config.json and its safetensors files, read one tensor at a time."""

    def __init__(self, path: Path, config: dict, files: list[str], tensors: dict[str, TensorInfo],
                 file_metadata: dict[str, dict | None], sharded: bool):
        self.path = path
        self.config = config
        self.files = files
        self.tensors = tensors
        self.file_metadata = file_metadata
        self.sharded = sharded
        self._descriptors: dict[str, int] = {}

    def names_in(self, file: str) -> list[str]:
        return [info.name for info in self.tensors.values() if info.file == file]

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into new memory that the caller owns."""
        info = self.tensors[name]
        file = self.path / info.file
        fd = self._descriptors.get(info.file)
        try:
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                self._descriptors[info.file] = fd
            entry = HeaderEntry(info.dtype, info.shape, info.offset, info.nbytes)
            return read_tensor(fd, file, name, entry)
        except OSError as error:
            raise CheckpointError(f"failed to read tensor {name} from {file}: {error}") from error

    def close(self) -> None:
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()


def read_config(directory: Path, role: str = "base model") -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"config.json not found in {directory}: the {role} must be a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"invalid config.json in {directory}: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"invalid config.json in {directory}: expected a JSON object")
    return config


def open_checkpoint(directory: str | Path, role: str = "base model") -> Checkpoint:
    """Open a model directory and check its weight files before anything is written.

    `role` names the directory in error messages ("base model", "merged model").
    Raises CheckpointError for a missing directory, config or weights, a pickled-only checkpoint, a
    corrupt or truncated safetensors file, or an index that disagrees with its shards.
    """
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"{role} directory not found: {path}")
    config = read_config(path, role)

    if (path / INDEX_FILE).is_file():
        files, expected = _read_index(path)
        sharded = True
    elif (path / SINGLE_FILE).is_file():
        files, expected = [SINGLE_FILE], None
        sharded = False
    elif any((path / name).is_file() for name in PICKLED_FILES):
        raise CheckpointError(
            f"{path} contains only a pickled checkpoint (pytorch_model.bin), but foldkit reads only safetensors. "
            "Convert it first, for example with transformers: from_pretrained(...).save_pretrained(OUT)"
        )
    else:
        raise CheckpointError(f"no weights found in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")

    tensors: dict[str, TensorInfo] = {}
    file_metadata: dict[str, dict | None] = {}
    for file in files:
        entries, file_metadata[file] = read_header(path / file)
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name} is present in two shards ({tensors[name].file} and {file}) in {path}"
                )
            tensors[name] = TensorInfo(name, file, entry.dtype, entry.shape, entry.offset)

    if expected is not None:
        _check_index_matches(path, expected, tensors)
    logger.debug("opened %s: %d tensors in %d file(s)", path, len(tensors), len(files))
    return Checkpoint(path, config, files, tensors, file_metadata, sharded)


def _read_index(path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"invalid {INDEX_FILE} in {path}: {error}") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"invalid {INDEX_FILE} in {path}: weight_map must be a non-empty object")

    files = list(dict.fromkeys(weight_map.values()))
    for file in files:
        if not isinstance(file, str) or Path(file).name != file:
            raise CheckpointError(f"invalid {INDEX_FILE} in {path}: shard name {file!r} is not a plain file name")
    missing = [file for file in files if not (path / file).is_file()]
    if missing:
        raise CheckpointError(f"shards listed in {INDEX_FILE} but missing from {path}: {', '.join(missing)}")
    return files, weight_map


def _check_index_matches(path: Path, expected: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    wrong = [name for name, file in expected.items() if name in tensors and tensors[name].file != file]
    absent = [name for name in expected if name not in tensors]
    unlisted = [name for name in tensors if name not in expected]
    problems = []
    if absent:
        problems.append(f"listed but not found in their shard: {', '.join(absent[:5])}")
    if wrong:
        problems.append(f"found in another shard than listed: {', '.join(wrong[:5])}")
    if unlisted:
        problems.append(f"present in a shard but not listed: {', '.join(unlisted[:5])}")
    if problems:
        raise CheckpointError(f"{INDEX_FILE} in {path} disagrees with its shards: " + "; ".join(problems))
