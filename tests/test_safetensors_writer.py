"""The streaming safetensors writer produces files that the safetensors library reads back exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from foldkit.checkpoint import TensorInfo
from foldkit.errors import OutputError
from foldkit.safetensors_writer import SafetensorsWriter


def entries_for(tensors):
    return [TensorInfo(name, "x", t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def test_writer_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "a.bias": torch.randn(7, generator=generator),
        "half": torch.randn(2, 2, generator=generator).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
    }
    path = tmp_path / "model.safetensors"

    writer = SafetensorsWriter(path, entries_for(tensors), {"format": "pt"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()

    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert safe_open(str(path), "pt").metadata() == {"format": "pt"}


def test_writer_accepts_non_contiguous(tmp_path):
    tensor = torch.arange(12.0).reshape(3, 4).T
    path = tmp_path / "t.safetensors"

    writer = SafetensorsWriter(path, entries_for({"t": tensor}))
    writer.write("t", tensor)
    writer.close()

    assert torch.equal(load_file(str(path))["t"], tensor)


def test_writer_rejects_out_of_order(tmp_path):
    tensors = {"first": torch.zeros(2), "second": torch.ones(2)}
    writer = SafetensorsWriter(tmp_path / "t.safetensors", entries_for(tensors))

    with pytest.raises(OutputError, match="expected first"):
        writer.write("second", tensors["second"])
    writer.abort()


def test_writer_rejects_wrong_dtype(tmp_path):
    writer = SafetensorsWriter(tmp_path / "t.safetensors", entries_for({"t": torch.zeros(2)}))

    with pytest.raises(OutputError, match="float16"):
        writer.write("t", torch.zeros(2, dtype=torch.float16))
    writer.abort()


def test_writer_close_detects_missing(tmp_path):
    writer = SafetensorsWriter(tmp_path / "t.safetensors", entries_for({"a": torch.zeros(2), "b": torch.zeros(1)}))
    writer.write("a", torch.zeros(2))

    with pytest.raises(OutputError, match="1 tensors missing"):
        writer.close()
