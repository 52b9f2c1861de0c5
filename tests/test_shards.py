"""Sharded input and output: re-sharding, the index, and faults in a sharded base found before writing."""

import json
import shutil
import struct

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tiny_models import read_checkpoint, save_peft_adapter
from typer.testing import CliRunner

from foldkit.checkpoint import INDEX_FILE, open_checkpoint
from foldkit.cli import app
from foldkit.errors import CheckpointError, UsageError
from foldkit.merge import MergeOptions, merge
from foldkit.shards import parse_size

runner = CliRunner()


@pytest.fixture(scope="module")
def lora_dir(llama_base, tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return save_peft_adapter(llama_base, config, tmp_path_factory.mktemp("shards-lora"), seed=5)


@pytest.fixture(scope="module")
def sharded_lora_dir(llama_sharded_base, tmp_path_factory):
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return save_peft_adapter(llama_sharded_base, config, tmp_path_factory.mktemp("shards-sharded-lora"), seed=5)


@pytest.mark.parametrize("text,expected", [("1000", 1000), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30),
                                           ("500 MB", 500 * 10**6), ("1.5KB", 1500), ("7b", 7)])
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1", "0", "GB", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


def test_reshard_respects_max_size(tmp_path, llama_base, lora_dir):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    merge(llama_base.directory, lora_dir, single, MergeOptions(progress=False, verify="modules"))
    max_size = 30_000

    report = merge(llama_base.directory, lora_dir, sharded,
                   MergeOptions(progress=False, max_shard_size=max_size, verify="all"))

    assert report.status == "PASSED"
    index = json.loads((sharded / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    checkpoint = open_checkpoint(sharded)
    for shard in shards:
        tensors = [info for info in checkpoint.tensors.values() if info.file == shard]
        assert len(tensors) == 1 or sum(info.nbytes for info in tensors) <= max_size, shard
    assert index["metadata"]["total_size"] == sum(info.nbytes for info in checkpoint.tensors.values())
    assert {name: info.file for name, info in checkpoint.tensors.items()} == index["weight_map"]

    expected, actual = read_checkpoint(single), read_checkpoint(sharded)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_reshard_sharded_base_to_one_file(tmp_path, llama_sharded_base, sharded_lora_dir):
    out = tmp_path / "out"

    merge(llama_sharded_base.directory, sharded_lora_dir, out, MergeOptions(progress=False, max_shard_size="1GB"))

    assert (out / "model.safetensors").is_file()
    assert not (out / INDEX_FILE).exists()
    assert read_checkpoint(out).keys() == read_checkpoint(llama_sharded_base.directory).keys()


def test_mirrored_shards_keep_names(tmp_path, llama_sharded_base, sharded_lora_dir):
    out = tmp_path / "out"

    merge(llama_sharded_base.directory, sharded_lora_dir, out, MergeOptions(progress=False, verify="modules"))

    base_index = json.loads((llama_sharded_base.directory / INDEX_FILE).read_text())
    out_index = json.loads((out / INDEX_FILE).read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]


@pytest.fixture
def broken_base(tmp_path, llama_sharded_base):
    """A writable copy of the sharded base, for tests that damage it."""
    copy = tmp_path / "base"
    shutil.copytree(llama_sharded_base.directory, copy)
    return copy


def shard_names(base):
    return sorted(set(json.loads((base / INDEX_FILE).read_text())["weight_map"].values()))


def merge_fails(base, adapter, out, message):
    result = runner.invoke(app, ["merge", str(base), str(adapter), str(out)])
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.foldkit-*"))


def test_missing_shard_rejected(tmp_path, broken_base, sharded_lora_dir):
    missing = shard_names(broken_base)[1]
    (broken_base / missing).unlink()

    merge_fails(broken_base, sharded_lora_dir, tmp_path / "out", f"missing from {broken_base}: {missing}")


def test_truncated_shard_rejected(tmp_path, broken_base, sharded_lora_dir):
    shard = broken_base / shard_names(broken_base)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])

    merge_fails(broken_base, sharded_lora_dir, tmp_path / "out", f"invalid or truncated safetensors file {shard}")


def test_tensor_in_two_shards_rejected(tmp_path, broken_base, sharded_lora_dir):
    first, second = shard_names(broken_base)[:2]
    first_tensors = read_checkpoint(broken_base)
    name = next(key for key, file in json.loads((broken_base / INDEX_FILE).read_text())["weight_map"].items()
                if file == first)
    second_tensors = {key: value for key, value in first_tensors.items()
                      if json.loads((broken_base / INDEX_FILE).read_text())["weight_map"][key] == second}
    second_tensors[name] = first_tensors[name]
    save_file(second_tensors, str(broken_base / second), metadata={"format": "pt"})

    merge_fails(broken_base, sharded_lora_dir, tmp_path / "out", f"tensor {name} is present in two shards")


def test_index_disagreeing_with_shards_rejected(tmp_path, broken_base, sharded_lora_dir):
    index = json.loads((broken_base / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard_names(broken_base)[0]
    (broken_base / INDEX_FILE).write_text(json.dumps(index))

    merge_fails(broken_base, sharded_lora_dir, tmp_path / "out", "listed but not found in their shard")


def write_raw_safetensors(path, header, data=b""):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.parametrize("header,data,message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "truncated"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12 bytes"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "unsupported dtype Q4"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "bad header entry for a"),
])
def test_reader_rejects_bad_headers(tmp_path, header, data, message):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    write_raw_safetensors(tmp_path / "model.safetensors", header, data)

    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path)


def test_reader_rejects_huge_header_length(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")

    with pytest.raises(CheckpointError, match="header of 1099511627776 bytes"):
        open_checkpoint(tmp_path)


def test_reader_returns_owned_tensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(tmp_path / "model.safetensors"))
    checkpoint = open_checkpoint(tmp_path)

    tensor = checkpoint.read("w")
    tensor.mul_(0)

    assert torch.equal(checkpoint.read("w"), torch.arange(6.0).reshape(2, 3))
    checkpoint.close()


def test_device_without_cuda_rejected(tmp_path, monkeypatch, llama_base, lora_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["merge", str(llama_base.directory), str(lora_dir), str(tmp_path / "out"),
                                 "--device", "cuda"])

    assert result.exit_code == 1
    assert "CUDA is not available" in result.stderr


def test_device_invalid_rejected(tmp_path, llama_base, lora_dir):
    result = runner.invoke(app, ["merge", str(llama_base.directory), str(lora_dir), str(tmp_path / "out"),
                                 "--device", "tpu9"])

    assert result.exit_code == 2
    assert "invalid device 'tpu9'" in result.stderr or "unsupported device 'tpu9'" in result.stderr
