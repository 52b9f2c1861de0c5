"""Bad inputs for `foldkit merge` and `foldkit verify`: exit codes, error messages, and what is left on disk.

Every rejected input must produce one stderr line that starts with "Error: " and names the thing at
fault. The exit code is 1 (known failure), 2 (usage) or 3 (outputs did not match), with no traceback.
No OUT directory and no `.OUT.foldkit-*` staging sibling may be left, and BASE and ADAPTER must not change.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import foldkit.fold
import foldkit.report
import foldkit.safetensors_writer
from foldkit.cli import app

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MISMATCH = 3
EXIT_INTERRUPTED = 130

HIDDEN_SIZE = 32
OTHER_HIDDEN_SIZE = 48
VOCAB_SIZE = 128
LORA_RANK = 4
# The interruption tests make the writer raise after this many tensors. The tiny Llama has 21.
TENSORS_BEFORE_FAILURE = 3

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
BASE_WEIGHTS = "model.safetensors"
# Key prefix of the first layer's query projection in PEFT's adapter_model.safetensors.
Q_PROJ_KEY = "base_model.model.model.layers.0.self_attn.q_proj"

runner = CliRunner()


# --- Inputs --------------------------------------------------------------------------------------


def tiny_llama(hidden_size: int = HIDDEN_SIZE, vocab_size: int = VOCAB_SIZE) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).to(torch.float32)


def save_adapter(base_dir: Path, directory: Path, peft_config, safe_serialization: bool = True) -> Path:
    """Wrap a fresh copy of the base with `peft_config` and save only the adapter to `directory`."""
    model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    get_peft_model(model, peft_config).save_pretrained(str(directory), safe_serialization=safe_serialization)
    return directory


def lora_config(**overrides) -> LoraConfig:
    settings = dict(r=LORA_RANK, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    settings.update(overrides)
    return LoraConfig(**settings)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    torch.manual_seed(101)
    directory = tmp_path_factory.mktemp("errors-base")
    tiny_llama().save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, base_dir) -> Path:
    torch.manual_seed(102)
    return save_adapter(base_dir, tmp_path_factory.mktemp("errors-lora"), lora_config())


@pytest.fixture(scope="module")
def ia3_dir(tmp_path_factory, base_dir) -> Path:
    torch.manual_seed(103)
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False)
    return save_adapter(base_dir, tmp_path_factory.mktemp("errors-ia3"), config)


@pytest.fixture(scope="module")
def pickle_lora_dir(tmp_path_factory, base_dir) -> Path:
    """The LoRA adapter saved as adapter_model.bin (a pickle) instead of safetensors."""
    torch.manual_seed(104)
    return save_adapter(base_dir, tmp_path_factory.mktemp("errors-lora-bin"), lora_config(),
                        safe_serialization=False)


@pytest.fixture(scope="module")
def wide_lora_dir(tmp_path_factory) -> Path:
    """A LoRA made for a Llama with hidden size 48, so its tensors do not fit the hidden-32 base."""
    torch.manual_seed(105)
    wide_base = tmp_path_factory.mktemp("errors-wide-base")
    tiny_llama(hidden_size=OTHER_HIDDEN_SIZE).save_pretrained(str(wide_base))
    return save_adapter(wide_base, tmp_path_factory.mktemp("errors-wide-lora"), lora_config(target_modules=["q_proj"]))


@pytest.fixture(scope="module")
def wide_base_dir(tmp_path_factory) -> Path:
    torch.manual_seed(106)
    directory = tmp_path_factory.mktemp("errors-wide-model")
    tiny_llama(hidden_size=OTHER_HIDDEN_SIZE).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def ia3_merged_dir(tmp_path_factory, base_dir, ia3_dir) -> Path:
    """BASE with the IA3 adapter folded in: a valid merge, but not of the LoRA adapter."""
    out = tmp_path_factory.mktemp("errors-ia3-merged") / "merged"
    result = invoke("merge", base_dir, ia3_dir, out, "--no-verify", "--quiet")
    assert result.exit_code == EXIT_OK, result.stderr
    return out


class MarkerOnLoad:
    """A pickled object that creates a directory when unpickled, which weights-only loading must prevent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def copy_tree(source: Path, tmp_path: Path, name: str) -> Path:
    destination = tmp_path / name
    shutil.copytree(source, destination)
    return destination


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def rename_tensors(path: Path, old: str, new: str) -> None:
    """Rewrite a safetensors file with `old` replaced by `new` in every tensor name."""
    tensors = load_file(str(path))
    save_file({name.replace(old, new): tensor for name, tensor in tensors.items()}, str(path))


# --- Running the CLI and checking its results ------------------------------------------------------


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def uncaught_exception(result) -> BaseException | None:
    """Return the exception that escaped the command, or None. typer.Exit and sys.exit count as handled."""
    if result.exception is None or isinstance(result.exception, SystemExit):
        return None
    return result.exception


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


def hash_files(*directories: Path) -> dict[str, str]:
    digests = {}
    for directory in directories:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def staging_leftovers(out: Path) -> list[str]:
    """Names beside OUT that look like foldkit's staging or backup directories."""
    if not out.parent.is_dir():
        return []
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}.foldkit-"))


def assert_one_error_line(result) -> str:
    """Check that stderr ends with exactly one "Error: " line and has no traceback. Return that line."""
    lines = error_lines(result.stderr)
    assert uncaught_exception(result) is None
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == lines[0], result.stderr
    return lines[0]


def assert_rejected(result, exit_code: int, out: Path, inputs_before: dict[str, str], *inputs: Path) -> str:
    """Check a rejected merge: its exit code, one error line, no output, and inputs unchanged."""
    line = assert_one_error_line(result)
    assert result.exit_code == exit_code
    assert not out.exists()
    assert staging_leftovers(out) == []
    assert hash_files(*inputs) == inputs_before
    return line


def merge_rejected(base: Path, adapter: Path, out: Path, *options: str, exit_code: int = EXIT_FAILURE) -> str:
    before = hash_files(base, adapter)
    result = invoke("merge", base, adapter, out, *options)
    return assert_rejected(result, exit_code, out, before, base, adapter)


# --- An adapter made for another base -------------------------------------------------------------


def test_merge_lora_module_missing_from_base(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    rename_tensors(adapter / ADAPTER_WEIGHTS, "layers.0.self_attn.q_proj", "layers.7.self_attn.q_proj")

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "model.layers.7.self_attn.q_proj" in line


def test_merge_ia3_module_missing_from_base(tmp_path, base_dir, ia3_dir):
    adapter = copy_tree(ia3_dir, tmp_path, "adapter")
    rename_tensors(adapter / ADAPTER_WEIGHTS, "layers.1.mlp.down_proj", "layers.1.mlp.out_proj")

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "model.layers.1.mlp.out_proj" in line


def test_merge_shape_mismatch(tmp_path, base_dir, wide_lora_dir):
    line = merge_rejected(base_dir, wide_lora_dir, tmp_path / "out")

    assert "self_attn.q_proj" in line
    assert f"({LORA_RANK}, {OTHER_HIDDEN_SIZE})" in line
    assert f"({HIDDEN_SIZE}, {HIDDEN_SIZE})" in line


# --- Adapter types and options foldkit cannot fold ------------------------------------------------


def test_merge_peft_type_loha(tmp_path, base_dir):
    adapter = save_adapter(base_dir, tmp_path / "loha", LoHaConfig(target_modules=["q_proj"], init_weights=False))

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "LOHA" in line
    assert "LORA" in line
    assert "IA3" in line


def test_merge_peft_type_unknown(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    edit_json(adapter / ADAPTER_CONFIG, peft_type="FOO")

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "FOO" in line
    assert "LORA" in line
    assert "IA3" in line


def test_merge_dora_rejected(tmp_path, base_dir):
    adapter = save_adapter(base_dir, tmp_path / "dora", lora_config(use_dora=True))

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "dora" in line.lower()


def test_merge_modules_to_save_rejected(tmp_path, base_dir):
    adapter = save_adapter(base_dir, tmp_path / "saved", lora_config(modules_to_save=["lm_head"]))

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "modules_to_save" in line


def test_merge_bias_all_rejected(tmp_path, base_dir):
    adapter = save_adapter(base_dir, tmp_path / "bias", lora_config(bias="all"))

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "bias" in line
    assert "'all'" in line


def test_merge_embedding_lora_rejected(tmp_path, base_dir):
    adapter = save_adapter(base_dir, tmp_path / "embedding", lora_config(target_modules=["embed_tokens"]))

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "embed_tokens" in line
    assert "embedding" in line


def test_merge_norm_layer_lora_rejected(tmp_path, base_dir, lora_dir):
    # PEFT cannot put a LoRA on an RMSNorm, so move the query projection's LoRA there by name.
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    rename_tensors(adapter / ADAPTER_WEIGHTS, "layers.0.self_attn.q_proj", "layers.0.input_layernorm")

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "model.layers.0.input_layernorm" in line
    assert "LlamaRMSNorm" in line


# --- Missing and unreadable files -----------------------------------------------------------------


def test_merge_base_dir_missing(tmp_path, lora_dir):
    base = tmp_path / "no-such-base"

    line = merge_rejected(base, lora_dir, tmp_path / "out")

    assert str(base) in line


def test_merge_base_config_missing(tmp_path, base_dir, lora_dir):
    base = copy_tree(base_dir, tmp_path, "base")
    (base / "config.json").unlink()

    line = merge_rejected(base, lora_dir, tmp_path / "out")

    assert "config.json" in line
    assert str(base) in line


def test_merge_base_weights_missing(tmp_path, base_dir, lora_dir):
    base = copy_tree(base_dir, tmp_path, "base")
    (base / BASE_WEIGHTS).unlink()

    line = merge_rejected(base, lora_dir, tmp_path / "out")

    assert BASE_WEIGHTS in line
    assert str(base) in line


def test_merge_base_config_invalid_json(tmp_path, base_dir, lora_dir):
    base = copy_tree(base_dir, tmp_path, "base")
    (base / "config.json").write_text('{"architectures": ["LlamaForCausalLM"', encoding="utf-8")

    line = merge_rejected(base, lora_dir, tmp_path / "out")

    assert "config.json" in line
    assert str(base) in line


def test_merge_adapter_dir_missing(tmp_path, base_dir):
    adapter = tmp_path / "no-such-adapter"

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert str(adapter) in line


def test_merge_adapter_config_missing(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    (adapter / ADAPTER_CONFIG).unlink()

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert ADAPTER_CONFIG in line
    assert str(adapter) in line


def test_merge_adapter_weights_missing(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    (adapter / ADAPTER_WEIGHTS).unlink()

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert ADAPTER_WEIGHTS in line
    assert str(adapter) in line


def test_merge_adapter_config_invalid_json(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    (adapter / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": ', encoding="utf-8")

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert ADAPTER_CONFIG in line
    assert str(adapter) in line


def test_merge_lora_alpha_not_number(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    edit_json(adapter / ADAPTER_CONFIG, lora_alpha="eight")

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert "lora_alpha" in line


@pytest.mark.parametrize("damage", ["random", "truncated"])
@pytest.mark.parametrize("which", ["base", "adapter"])
def test_merge_corrupt_safetensors(tmp_path, base_dir, lora_dir, which, damage):
    base = copy_tree(base_dir, tmp_path, "base")
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    damaged = base / BASE_WEIGHTS if which == "base" else adapter / ADAPTER_WEIGHTS
    size = damaged.stat().st_size
    if damage == "random":
        damaged.write_bytes(random.Random(size).randbytes(size))
    else:
        damaged.write_bytes(damaged.read_bytes()[: size // 2])

    line = merge_rejected(base, adapter, tmp_path / "out")

    assert str(damaged) in line


# --- Non-finite adapter values --------------------------------------------------------------------


@pytest.mark.parametrize(("value", "word"), [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_merge_adapter_not_finite(tmp_path, base_dir, lora_dir, value, word):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    key = f"{Q_PROJ_KEY}.lora_B.weight"
    tensors[key][1, 2] = value
    save_file(tensors, str(adapter / ADAPTER_WEIGHTS))

    line = merge_rejected(base_dir, adapter, tmp_path / "out")

    assert word in line
    assert "layers.0.self_attn.q_proj.lora_B" in line


# --- The output directory -------------------------------------------------------------------------


def test_merge_out_not_empty_rejected(tmp_path, base_dir, lora_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    before = hash_files(base_dir, lora_dir, out)

    result = invoke("merge", base_dir, lora_dir, out)
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert str(out) in line
    assert "--force" in line
    assert hash_files(base_dir, lora_dir, out) == before
    assert staging_leftovers(out) == []


def test_merge_out_not_empty_force_replaces(tmp_path, base_dir, lora_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("replace me", encoding="utf-8")
    before = hash_files(base_dir, lora_dir)

    result = invoke("merge", base_dir, lora_dir, out, "--force", "--no-verify")

    assert result.exit_code == EXIT_OK, result.stderr
    assert not (out / "notes.txt").exists()
    assert (out / BASE_WEIGHTS).is_file()
    assert staging_leftovers(out) == []
    assert hash_files(base_dir, lora_dir) == before


def test_merge_out_equal_base_rejected(tmp_path, base_dir, lora_dir):
    base = copy_tree(base_dir, tmp_path, "base")
    before = hash_files(base, lora_dir)

    result = invoke("merge", base, lora_dir, base, "--force")
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert str(base) in line
    assert hash_files(base, lora_dir) == before
    assert staging_leftovers(base) == []


def test_merge_out_inside_adapter_rejected(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    out = adapter / "merged"

    line = merge_rejected(base_dir, adapter, out, "--force")

    assert str(adapter) in line


def test_merge_out_containing_base_rejected(tmp_path, base_dir, lora_dir):
    # With --force, replacing OUT would delete BASE inside it.
    parent = tmp_path / "models"
    base = copy_tree(base_dir, parent, "base")
    before = hash_files(parent, lora_dir)

    result = invoke("merge", base, lora_dir, parent, "--force")
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert str(parent) in line
    assert hash_files(parent, lora_dir) == before
    assert staging_leftovers(parent) == []


def test_merge_out_symlink_to_base_rejected(tmp_path, base_dir, lora_dir):
    base = copy_tree(base_dir, tmp_path, "base")
    out = tmp_path / "link-to-base"
    out.symlink_to(base, target_is_directory=True)
    before = hash_files(base, lora_dir)

    result = invoke("merge", base, lora_dir, out, "--force")
    assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert out.is_symlink()
    assert hash_files(base, lora_dir) == before
    assert staging_leftovers(out) == []


def test_merge_out_is_file_rejected(tmp_path, base_dir, lora_dir):
    out = tmp_path / "out"
    out.write_text("not a directory", encoding="utf-8")

    result = invoke("merge", base_dir, lora_dir, out, "--force")
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert str(out) in line
    assert out.read_text(encoding="utf-8") == "not a directory"
    assert staging_leftovers(out) == []


def test_merge_out_parent_missing(tmp_path, base_dir, lora_dir):
    out = tmp_path / "missing-parent" / "out"

    line = merge_rejected(base_dir, lora_dir, out)

    assert str(out.parent) in line


def test_merge_out_current_dir_force(tmp_path, monkeypatch, base_dir, lora_dir):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    result = invoke("merge", base_dir, lora_dir, ".", "--force", "--no-verify")

    assert uncaught_exception(result) is None
    assert "Traceback" not in result.stderr
    assert [path.name for path in workdir.iterdir() if ".foldkit-" in path.name] == []
    assert [path.name for path in tmp_path.iterdir() if ".foldkit-" in path.name] == []


# --- Interrupted and failed writes ----------------------------------------------------------------


def fail_after_some_tensors(monkeypatch, error: BaseException) -> None:
    """Make SafetensorsWriter.write raise `error` once TENSORS_BEFORE_FAILURE tensors are written."""
    original_write = foldkit.safetensors_writer.SafetensorsWriter.write
    written = []

    def write(self, name, tensor):
        if len(written) >= TENSORS_BEFORE_FAILURE:
            raise error
        written.append(name)
        return original_write(self, name, tensor)

    monkeypatch.setattr(foldkit.safetensors_writer.SafetensorsWriter, "write", write)


def test_merge_interrupt_leaves_nothing(tmp_path, monkeypatch, base_dir, lora_dir):
    fail_after_some_tensors(monkeypatch, KeyboardInterrupt())

    line = merge_rejected(base_dir, lora_dir, tmp_path / "out", exit_code=EXIT_INTERRUPTED)

    assert "interrupted" in line


def test_merge_interrupt_keeps_old_out(tmp_path, monkeypatch, base_dir, lora_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("previous output", encoding="utf-8")
    before = hash_files(base_dir, lora_dir, out)
    fail_after_some_tensors(monkeypatch, KeyboardInterrupt())

    result = invoke("merge", base_dir, lora_dir, out, "--force")
    assert_one_error_line(result)

    assert result.exit_code == EXIT_INTERRUPTED
    assert hash_files(base_dir, lora_dir, out) == before
    assert staging_leftovers(out) == []


def test_merge_disk_full_during_write(tmp_path, monkeypatch, base_dir, lora_dir):
    out = tmp_path / "out"
    fail_after_some_tensors(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    line = merge_rejected(base_dir, lora_dir, out)

    assert os.strerror(errno.ENOSPC) in line
    assert str(out) in line


def test_merge_disk_full_during_report(tmp_path, monkeypatch, base_dir, lora_dir):
    def write_report(self, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(foldkit.report.MergeReport, "write", write_report)

    line = merge_rejected(base_dir, lora_dir, tmp_path / "out", "--no-verify")

    assert os.strerror(errno.ENOSPC) in line


# --- Pickled adapters -----------------------------------------------------------------------------


def test_merge_pickle_adapter_rejected(tmp_path, base_dir, pickle_lora_dir):
    line = merge_rejected(base_dir, pickle_lora_dir, tmp_path / "out")

    assert "--allow-pickle" in line
    assert ADAPTER_PICKLE in line


def test_merge_pickle_adapter_allowed(tmp_path, base_dir, pickle_lora_dir):
    out = tmp_path / "out"
    before = hash_files(base_dir, pickle_lora_dir)

    result = invoke("merge", base_dir, pickle_lora_dir, out, "--allow-pickle")

    assert result.exit_code == EXIT_OK, result.stderr
    assert (out / BASE_WEIGHTS).is_file()
    assert hash_files(base_dir, pickle_lora_dir) == before


def test_merge_pickle_non_tensor_rejected(tmp_path, base_dir, pickle_lora_dir):
    adapter = copy_tree(pickle_lora_dir, tmp_path, "adapter")
    marker = tmp_path / "created-by-unpickling"
    torch.save({f"{Q_PROJ_KEY}.lora_A.weight": MarkerOnLoad(marker)}, adapter / ADAPTER_PICKLE)

    line = merge_rejected(base_dir, adapter, tmp_path / "out", "--allow-pickle")

    assert ADAPTER_PICKLE in line
    assert not marker.exists()


# --- Outputs that do not match --------------------------------------------------------------------


def test_verify_unmerged_base_mismatch(base_dir, lora_dir):
    before = hash_files(base_dir, lora_dir)

    result = invoke("verify", base_dir, lora_dir, base_dir)
    assert_one_error_line(result)

    assert result.exit_code == EXIT_MISMATCH
    assert "FAILED" in result.stdout
    assert hash_files(base_dir, lora_dir) == before


def test_verify_unmerged_base_json(base_dir, lora_dir):
    result = invoke("verify", base_dir, lora_dir, base_dir, "--json")

    assert result.exit_code == EXIT_MISMATCH
    assert json.loads(result.stdout)["passed"] is False


def test_verify_other_adapter_merge(base_dir, lora_dir, ia3_merged_dir):
    result = invoke("verify", base_dir, lora_dir, ia3_merged_dir, "--json")

    assert uncaught_exception(result) is None
    assert result.exit_code == EXIT_MISMATCH
    assert json.loads(result.stdout)["passed"] is False


def test_verify_merged_dir_missing(tmp_path, base_dir, lora_dir):
    merged = tmp_path / "no-such-model"

    result = invoke("verify", base_dir, lora_dir, merged)
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert str(merged) in line
    assert "merged model" in line


def test_verify_merged_other_hidden_size(base_dir, lora_dir, wide_base_dir):
    result = invoke("verify", base_dir, lora_dir, wide_base_dir)
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_FAILURE
    assert "self_attn.q_proj" in line
    assert f"({OTHER_HIDDEN_SIZE}, {OTHER_HIDDEN_SIZE})" in line
    assert f"({HIDDEN_SIZE}, {HIDDEN_SIZE})" in line


def test_merge_broken_fold_rule_caught(tmp_path, monkeypatch, base_dir, lora_dir):
    # A LoRA rule that omits the scaling: both checks must catch it, and the output is kept.
    def unscaled(weight, bias, adapter, fan_in_fan_out):
        tensors = adapter.tensors
        return foldkit.fold.fold_lora(weight, tensors["lora_A"], tensors["lora_B"], 1.0,
                                      fan_in_fan_out=fan_in_fan_out, bias=bias)

    monkeypatch.setitem(foldkit.fold.FOLD_RULES, "lora", unscaled)
    out = tmp_path / "out"

    result = invoke("merge", base_dir, lora_dir, out, "--verify", "all", "--json")
    line = assert_one_error_line(result)
    report = json.loads(result.stdout)

    assert report["verification"]["modules"]["passed"] is False
    assert report["verification"]["logits"]["passed"] is False

    assert result.exit_code == EXIT_MISMATCH
    assert str(out) in line
    assert (out / BASE_WEIGHTS).is_file()
    assert json.loads((out / "foldkit_report.json").read_text(encoding="utf-8"))["status"] == "FAILED"
    assert staging_leftovers(out) == []


# --- Command-line usage ---------------------------------------------------------------------------


def test_merge_missing_out_argument(base_dir, lora_dir):
    result = invoke("merge", base_dir, lora_dir)
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_USAGE
    assert "out" in line.lower()


def test_verify_missing_merged_argument(base_dir, lora_dir):
    result = invoke("verify", base_dir, lora_dir)
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_USAGE
    assert "merged" in line.lower()


def test_merge_invalid_dtype(tmp_path, base_dir, lora_dir):
    out = tmp_path / "out"

    result = invoke("merge", base_dir, lora_dir, out, "--dtype", "int8")
    line = assert_one_error_line(result)

    assert result.exit_code == EXIT_USAGE
    assert "--dtype" in line
    assert "int8" in line
    assert not out.exists()


# --- Output streams -------------------------------------------------------------------------------


def test_merge_results_stdout_logs_stderr(tmp_path, base_dir, lora_dir):
    out = tmp_path / "out"

    result = invoke("merge", base_dir, lora_dir, out)

    assert result.exit_code == EXIT_OK, result.stderr
    assert f"into {out}" in result.stdout
    assert "verification: PASSED" in result.stdout
    assert f"wrote {out}" in result.stderr
    assert f"wrote {out}" not in result.stdout


def test_merge_json_stdout(tmp_path, base_dir, ia3_dir):
    result = invoke("merge", base_dir, ia3_dir, tmp_path / "out", "--json")

    assert result.exit_code == EXIT_OK, result.stderr
    assert json.loads(result.stdout)["status"] == "PASSED"


def foldkit_executable() -> Path:
    return Path(sys.executable).with_name("foldkit")


def run_foldkit(*args) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([str(foldkit_executable()), *(str(arg) for arg in args)], capture_output=True,
                          text=True, env=environment, timeout=120)


def test_executable_quiet_merge(tmp_path, base_dir, lora_dir):
    out = tmp_path / "out"

    completed = run_foldkit("merge", base_dir, lora_dir, out, "--quiet")

    assert completed.returncode == EXIT_OK, completed.stderr
    assert completed.stderr == ""
    assert f"into {out}" in completed.stdout


def test_executable_error_no_traceback(tmp_path, base_dir, lora_dir):
    adapter = copy_tree(lora_dir, tmp_path, "adapter")
    weights = adapter / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"

    completed = run_foldkit("merge", base_dir, adapter, out)

    assert completed.returncode == EXIT_FAILURE
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("Error: ")
    assert completed.stderr.count("\n") == 1
    assert str(weights) in completed.stderr
    assert not out.exists()
