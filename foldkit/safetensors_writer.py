"""Write a safetensors file one tensor at a time, so a merge never keeps the whole model in memory.

The header is computed up front from the declared names, dtypes and shapes; each tensor's bytes are
then appended in declared order. The file layout follows the safetensors format: an 8-byte
little-endian header length, the JSON header padded with spaces to a multiple of 8, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from foldkit.checkpoint import TensorInfo
from foldkit.safetensors_reader import DTYPE_CODES
from foldkit.errors import OutputError


class SafetensorsWriter:
    """Stream tensors into one safetensors file; `write` must be called in the declared order."""

    def __init__(self, path: Path, entries: list[TensorInfo], metadata: dict[str, str] | None = None):
        self.path = path
        self._entries = entries
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
        offset = 0
        for entry in entries:
            header[entry.name] = {
                "dtype": DTYPE_CODES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        # Unbuffered: Python's BufferedWriter copies large writes through its buffer, which made writes
        # about ten times slower than the disk (measured on this project's 2-core benchmark machine).
        self._file = open(path, "wb", buffering=0)
        self._write_all(memoryview(struct.pack("<Q", len(encoded)) + encoded))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._entries[self._next]
        if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise OutputError(
                f"internal error writing {self.path}: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected {entry.name} {entry.dtype} {entry.shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._write_all(memoryview(data))
        self._next += 1

    def _write_all(self, data: memoryview) -> None:
        written = 0
        while written < len(data):
            written += self._file.write(data[written:])

    def close(self) -> None:
        if self._next != len(self._entries):
            self._file.close()
            raise OutputError(f"internal error writing {self.path}: {len(self._entries) - self._next} tensors missing")
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
