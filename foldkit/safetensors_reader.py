"""Read safetensors files with plain positioned reads, one tensor at a time.

Memory-mapped reads keep every touched page of a checkpoint in the process's resident set until the
file is closed, so peak RSS grows with the shard. Positioned reads into a fresh buffer keep memory at
the size of the tensor being read, and give tensors that the caller owns.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from foldkit.errors import CheckpointError

# safetensors dtype codes, as written in a file header.
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # a sanity limit: headers of real checkpoints are a few MB at most


@dataclass(frozen=True)
class HeaderEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, HeaderEntry], dict[str, str] | None]:
    """Parse and validate a safetensors header: every tensor must lie inside the file, without overlap.

    Raises CheckpointError naming the file and the first problem found.
    """
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"invalid or truncated safetensors file {file}: {size} bytes, no header")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
                raise CheckpointError(
                    f"invalid or truncated safetensors file {file}: header of {header_size} bytes in a file of {size}"
                )
            raw = handle.read(header_size)
    except OSError as error:
        raise CheckpointError(f"failed to read {file}: {error}") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"invalid safetensors file {file}: header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"invalid safetensors file {file}: header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_size
    data_size = size - data_start
    entries = {name: _parse_entry(file, name, value, data_start) for name, value in header.items()}
    _check_layout(file, entries, data_start, data_size)
    return entries, metadata


def _parse_entry(file: Path, name: str, value: object, data_start: int) -> HeaderEntry:
    try:
        code = value["dtype"]
        shape = tuple(int(size) for size in value["shape"])
        start, end = (int(offset) for offset in value["data_offsets"])
    except (TypeError, KeyError, ValueError) as error:
        raise CheckpointError(f"invalid safetensors file {file}: bad header entry for {name}") from error
    if code not in DTYPES:
        raise CheckpointError(f"tensor {name} in {file} has unsupported dtype {code}")
    dtype = DTYPES[code]
    count = 1
    for size in shape:
        count *= size
    nbytes = count * dtype.itemsize
    if min(shape, default=0) < 0 or end - start != nbytes or start < 0:
        raise CheckpointError(
            f"invalid safetensors file {file}: tensor {name} of shape {shape} and dtype {code} needs {nbytes} "
            f"bytes but its offsets span {end - start}"
        )
    return HeaderEntry(dtype, shape, data_start + start, nbytes)


def _check_layout(file: Path, entries: dict[str, HeaderEntry], data_start: int, data_size: int) -> None:
    previous_end, previous_name = data_start, None
    for name, entry in sorted(entries.items(), key=lambda item: item[1].offset):
        if entry.offset < previous_end:
            raise CheckpointError(f"invalid safetensors file {file}: tensors {previous_name} and {name} overlap")
        previous_end, previous_name = entry.offset + entry.nbytes, name
    if previous_end > data_start + data_size:
        raise CheckpointError(
            f"invalid or truncated safetensors file {file}: tensor {previous_name} ends at byte {previous_end} "
            f"but the file has {data_start + data_size} bytes"
        )


def read_tensor(fd: int, file: Path, name: str, entry: HeaderEntry) -> torch.Tensor:
    """Read one tensor's bytes into a new tensor with positioned reads."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy()) if entry.nbytes else memoryview(b"")
    done = 0
    while done < entry.nbytes:
        count = os.preadv(fd, [view[done:]], entry.offset + done)
        if count == 0:
            raise CheckpointError(f"failed to read tensor {name} from {file}: the file ended early")
        done += count
    return buffer.view(entry.dtype).reshape(entry.shape)
