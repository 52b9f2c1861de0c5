"""Bad inputs and failed checks for foldkit export and merge --format onnx.

Each must end with one "Error: " line naming the problem and the documented exit code, leave no OUT and
no staging or temporary merge directory, and leave the model directory unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import onnx
import pytest
import torch
import transformers
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import foldkit.onnx_export
import foldkit.onnx_graphs
import foldkit.onnx_runtime
from foldkit.cli import app
from foldkit.onnx_export import ExportOptions, export
from foldkit.onnx_runtime import open_session
from foldkit.onnx_verify import check_graph
from foldkit.tolerances import EXPORT_TOLERANCES
from tiny_models import VOCAB_SIZE, load_base, save_peft_adapter, save_tiny_base

EXIT_FAILURE, EXIT_USAGE, EXIT_MISMATCH = 1, 2, 3
runner = CliRunner()


def digest(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base("llama", tmp_path_factory.mktemp("onnx-errors") / "base", 41, with_tokenizer=True)


def run_export(args: list[str], workdir: Path, code: int, *needles: str, model: Path | None = None):
    """Run foldkit export; check the exit code, the one-line error, and that nothing was left in workdir."""
    before = digest(model) if model is not None else None
    entries = set(workdir.iterdir())
    result = runner.invoke(app, ["export", *args])
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert set(workdir.iterdir()) == entries, "a half-written or temporary directory was left behind"
    if model is not None:
        assert digest(model) == before
    return errors[0]


def test_unsupported_family_is_named(tmp_path):
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    run_export([str(tmp_path / "neox"), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "gpt_neox",
               "GPTNeoXForCausalLM", "llama", model=tmp_path / "neox")


def test_sliding_window_is_rejected(tmp_path):
    config = transformers.MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    run_export([str(tmp_path / "mistral"), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "sliding", "mistral")


def test_decoder_without_head_is_rejected(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaModel(config).save_pretrained(tmp_path / "trunk")
    run_export([str(tmp_path / "trunk"), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "LlamaModel", "ForCausalLM")


def test_directory_without_weights(tmp_path, base):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((base.directory / "config.json").read_text())
    run_export([str(tmp_path / "empty"), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "no weights",
               model=tmp_path / "empty")
    run_export([str(tmp_path / "missing"), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "not found")


def test_pickled_weights_are_not_loaded(tmp_path, base):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((base.directory / "config.json").read_text())
    torch.save(load_base(base).state_dict(), model_dir / "pytorch_model.bin")
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "pickled", model=model_dir)


def test_missing_weight_is_rejected(tmp_path, base):
    model_dir = tmp_path / "partial"
    load_base(base).save_pretrained(model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "lacks weights", "up_proj",
               model=model_dir)


def test_output_problems(tmp_path, base):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("keep")
    run_export([str(base.directory), str(tmp_path / "busy")], tmp_path, EXIT_FAILURE, "not empty", "--force")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    run_export([str(base.directory), str(tmp_path / "file")], tmp_path, EXIT_FAILURE, "not a directory")
    run_export([str(base.directory), str(tmp_path / "no" / "such" / "out")], tmp_path, EXIT_FAILURE, "does not exist")
    run_export([str(base.directory), str(base.directory / "onnx")], tmp_path, EXIT_FAILURE, "overlaps")


def test_disk_full_leaves_nothing(tmp_path, base, monkeypatch):
    def full(program, path, external):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(foldkit.onnx_export, "save_graph", full)
    run_export([str(base.directory), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "No space left", "nothing was written")


def test_opset_choices(tmp_path, base):
    run_export([str(base.directory), str(tmp_path / "out"), "--opset", "12"], tmp_path, EXIT_FAILURE,
               "opset 12", "operator", "--opset 18")
    run_export([str(base.directory), str(tmp_path / "out"), "--opset", "3"], tmp_path, EXIT_USAGE, "opset 3")
    run_export([str(base.directory), str(tmp_path / "out"), "--opset", "999"], tmp_path, EXIT_USAGE, "opset 999")


def test_usage_errors(tmp_path, base):
    run_export([str(base.directory), str(tmp_path / "out"), "--format", "tflite"], tmp_path, EXIT_USAGE, "tflite")
    run_export([str(base.directory), str(tmp_path / "out"), "--provider", "cuda"], tmp_path, EXIT_USAGE,
               "CUDAExecutionProvider", "foldkit[gpu]")


def test_runtime_problems_are_explained(tmp_path, base, monkeypatch):
    monkeypatch.setattr(foldkit.onnx_runtime, "installed_runtimes", lambda: ["onnxruntime", "onnxruntime-gpu"])
    run_export([str(base.directory), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "both onnxruntime and onnxruntime-gpu")
    monkeypatch.setattr(foldkit.onnx_runtime, "installed_runtimes", lambda: [])
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    run_export([str(base.directory), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "foldkit[cpu]")
    # Without the check, export needs no runtime at all.
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "unchecked"), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "NOT VERIFIED" in result.stdout
    assert (tmp_path / "unchecked" / "model.onnx").is_file()


# --- A graph that computes something else must be caught ----------------------------------------


def scale_one_weight(path: Path, factor: float) -> str:
    graph = onnx.load(str(path))
    target = next(init for init in graph.graph.initializer if "layers.1.mlp.down_proj" in init.name)
    array = onnx.numpy_helper.to_array(target) * factor
    target.CopyFrom(onnx.numpy_helper.from_array(array.astype(array.dtype), target.name))
    onnx.save(graph, str(path))
    return target.name


def test_check_catches_a_changed_weight(tmp_path, base):
    export(base.directory, tmp_path / "onnx", ExportOptions(verify=False))
    scale_one_weight(tmp_path / "onnx" / "model.onnx", 1.02)
    session = open_session(tmp_path / "onnx" / "model.onnx", "CPUExecutionProvider")
    model = load_base(base)
    from foldkit.onnx_graphs import cache_shape

    check = check_graph(session, model, "decoder-with-cache", EXPORT_TOLERANCES[torch.float32],
                        "CPUExecutionProvider", cache_shape(model))
    assert not check.passed
    assert all(not diff.passed for diff in check.diffs if diff.output == "logits")


def test_cli_broken_graph_exits_3(tmp_path, base, monkeypatch):
    save = foldkit.onnx_export.save_graph

    def save_then_break(program, path, external):
        save(program, path, external)
        scale_one_weight(path, 1.02)

    monkeypatch.setattr(foldkit.onnx_export, "save_graph", save_then_break)
    error = run_export([str(base.directory), str(tmp_path / "out")], tmp_path, EXIT_MISMATCH, "differ",
                       "nothing was written", model=base.directory)
    assert "logits" in error
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "out"), "--json"])
    assert result.exit_code == EXIT_MISMATCH
    assert '"passed": false' in result.stdout


def test_check_catches_padding_ignored(tmp_path, base, monkeypatch):
    """The bug that transformers' own mask logic showed under tracing: padding ignored. Unpadded cases pass."""
    original = foldkit.onnx_graphs.additive_causal_mask

    def causal_only(attention_mask, sequence, dtype):
        return original(torch.ones_like(attention_mask), sequence, dtype)

    monkeypatch.setattr(foldkit.onnx_graphs, "additive_causal_mask", causal_only)
    with pytest.raises(foldkit.errors.VerificationError) as caught:
        export(base.directory, tmp_path / "out")
    diffs = caught.value.result.verification["diffs"]
    assert all(diff["passed"] for diff in diffs if "padded" not in diff["case"])
    assert not all(diff["passed"] for diff in diffs if "padded" in diff["case"])
    assert not (tmp_path / "out").exists()


# --- merge --format onnx ----------------------------------------------------------------------


def test_merge_format_errors_leave_nothing(tmp_path, base):
    adapter = save_peft_adapter(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                tmp_path / "adapter", seed=1)
    inputs = digest(base.directory), digest(adapter)
    entries = set(tmp_path.iterdir())
    for args, code, needle in [
        (["--format", "pdf"], EXIT_USAGE, "pdf"),
        (["--opset", "20"], EXIT_USAGE, "--format onnx"),
        (["--format", "onnx", "--opset", "12"], EXIT_FAILURE, "operator"),
    ]:
        result = runner.invoke(app, ["merge", str(base.directory), str(adapter), str(tmp_path / "out"), *args])
        assert result.exit_code == code, result.output
        assert needle in result.stderr
        assert "Traceback" not in result.output
        assert set(tmp_path.iterdir()) == entries
    assert (digest(base.directory), digest(adapter)) == inputs


def test_merge_onnx_rejects_family_first(tmp_path):
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    (tmp_path / "adapter").mkdir()
    result = runner.invoke(app, ["merge", str(tmp_path / "neox"), str(tmp_path / "adapter"), str(tmp_path / "out"),
                                 "--format", "onnx"])
    assert result.exit_code == EXIT_FAILURE
    assert "gpt_neox" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter", "neox"]
    assert not os.listdir(tmp_path / "adapter")


class FakeRuntime:
    """An onnxruntime-gpu on a machine without a GPU: it lists CUDA but opens sessions on the CPU."""

    class SessionOptions:
        pass

    class GraphOptimizationLevel:
        ORT_ENABLE_ALL = 99

    class InferenceSession:
        def __init__(self, path, options, providers):
            self.requested = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    @staticmethod
    def get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_fallback_only_in_auto(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(foldkit.onnx_runtime, "import_runtime", lambda: FakeRuntime)
    monkeypatch.setattr(foldkit.onnx_runtime.logger, "warning", lambda message, *args: warnings.append(message % args))
    assert foldkit.onnx_runtime.choose_provider("auto") == "CUDAExecutionProvider"
    session = open_session(tmp_path / "model.onnx", "CUDAExecutionProvider", fallback=True)
    assert session.requested == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert len(warnings) == 1
    assert "instead" in warnings[0]
    with pytest.raises(foldkit.errors.InputError, match="--provider cpu"):
        open_session(tmp_path / "model.onnx", "CUDAExecutionProvider", fallback=False)


# --- Found by a hostile test: odd configs and weights ---------------------------------------------


def edited_copy(base, directory: Path, config_changes: dict | None = None, tensor_change=None) -> Path:
    """Copy the tiny Llama to `directory` with config.json keys changed and/or one tensor edited."""
    import json
    import shutil

    shutil.copytree(base.directory, directory)
    if config_changes:
        config = json.loads((directory / "config.json").read_text())
        config.update(config_changes)
        (directory / "config.json").write_text(json.dumps(config))
    if tensor_change:
        tensors = load_file(str(directory / "model.safetensors"))
        tensor_change(tensors)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("changes, needle", [
    ({"num_attention_heads": 3}, "config.json"),
    ({"num_hidden_layers": "two"}, "config.json"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"hidden_act": "no_such_activation"}, "cannot load"),
])
def test_invalid_config_values(tmp_path, base, changes, needle):
    model_dir = edited_copy(base, tmp_path / "model", changes)
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, needle, model=model_dir)


def test_nan_weight_is_bad_input(tmp_path, base):
    def poison(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")

    model_dir = edited_copy(base, tmp_path / "model", tensor_change=poison)
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "NaN", "up_proj", model=model_dir)


def test_wrong_shape_is_named(tmp_path, base):
    def widen(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 65)

    model_dir = edited_copy(base, tmp_path / "model", tensor_change=widen)
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "down_proj", "[32, 65]", "[32, 64]")


def test_sliding_window_field_on_llama(tmp_path, base):
    """transformers' cache truncates to the window even for Llama, so the graph would not match full attention."""
    model_dir = edited_copy(base, tmp_path / "model", {"sliding_window": 16})
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "sliding_window=16")


@pytest.mark.parametrize("architecture, positions", [("gpt2", {"n_positions": 16}),
                                                     ("bert", {"max_position_embeddings": 16}),
                                                     ("opt", {"max_position_embeddings": 16})])
def test_few_positions_shorten_the_cases(tmp_path, architecture, positions):
    tiny = save_tiny_base(architecture, tmp_path / "base", 42, **positions)
    report = export(tiny.directory, tmp_path / "out")
    assert report.status == "PASSED"
    assert max(int(diff["case"].split(", ")[1].split()[0]) for diff in report.verification["diffs"]) <= 16


def test_newest_opsets_fail_cleanly(tmp_path, base):
    import onnx as onnx_module

    newest = onnx_module.defs.onnx_opset_version()
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "out"), "--opset", str(newest)])
    assert result.exit_code in (0, EXIT_FAILURE), result.output
    assert "Traceback" not in result.output
    if result.exit_code == EXIT_FAILURE:
        assert "--opset 18" in result.stderr


def test_failed_check_json_is_strict(tmp_path, base, monkeypatch):
    import json

    save = foldkit.onnx_export.save_graph

    def save_then_break(program, path, external):
        save(program, path, external)
        scale_one_weight(path, float("inf"))

    monkeypatch.setattr(foldkit.onnx_export, "save_graph", save_then_break)
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "out"), "--json"])
    assert result.exit_code == EXIT_MISMATCH

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    report = json.loads(result.stdout, parse_constant=reject)
    assert report["status"] == "FAILED"
    assert not (tmp_path / "out").exists()


def test_dangling_symlink_out(tmp_path, base):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    run_export([str(base.directory), str(tmp_path / "link")], tmp_path, EXIT_FAILURE, "symbolic link")


def test_merge_checks_provider_before_merging(tmp_path, base):
    adapter = save_peft_adapter(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                tmp_path / "adapter", seed=1)
    result = runner.invoke(app, ["merge", str(base.directory), str(adapter), str(tmp_path / "out"),
                                 "--format", "onnx", "--provider", "cuda"])
    assert result.exit_code == EXIT_USAGE
    assert "CUDAExecutionProvider" in result.stderr
    assert "folding" not in result.stderr
    result = runner.invoke(app, ["merge", str(base.directory), str(adapter), str(tmp_path / "out"),
                                 "--format", "onnx", "--onnx-atol", "0.001", "--json"])
    assert result.exit_code == 0, result.output
    assert '"atol": 0.001' in result.stdout


def test_console_script_ignores_ctrl_c_at_exit():
    import subprocess
    import sys

    code = ("import signal, sys\nfrom foldkit import cli\nsys.argv = ['foldkit', '--version']\n"
            "try:\n    cli.run()\nexcept SystemExit:\n    print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("True")


class NanPresentSession:
    """Wrap a session so that one present tensor comes back as NaN and every other output is untouched."""

    def __init__(self, session, broken: str):
        self.session, self.broken = session, broken

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        results = self.session.run(names, feeds)
        return [result * float("nan") if name == self.broken else result for name, result in zip(names, results)]


def test_one_nan_present_fails_the_check(tmp_path, base):
    export(base.directory, tmp_path / "onnx", ExportOptions(verify=False))
    session = open_session(tmp_path / "onnx" / "model.onnx", "CPUExecutionProvider")
    model = load_base(base)
    from foldkit.onnx_graphs import cache_shape

    check = check_graph(NanPresentSession(session, "present.1.value"), model, "decoder-with-cache",
                        EXPORT_TOLERANCES[torch.float32], "CPUExecutionProvider", cache_shape(model))
    assert not check.passed
    rows = [diff for diff in check.diffs if diff.output.startswith("present")]
    assert rows
    assert all(not diff.passed for diff in rows)
    assert "1 of 4 failed, first: present.1.value" in rows[0].output


# --- Found by a second hostile test ---------------------------------------------------------------


def test_symlink_out_is_rejected(tmp_path, base):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run_export([str(base.directory), str(tmp_path / "link")], tmp_path, EXIT_FAILURE, "symbolic link")
    assert not any((tmp_path / "real").iterdir())


def test_too_few_positions_to_check(tmp_path):
    tiny = save_tiny_base("gpt2", tmp_path / "base", 43, n_positions=4)
    run_export([str(tiny.directory), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "4 positions", "--no-verify")
    result = runner.invoke(app, ["export", str(tiny.directory), str(tmp_path / "unchecked"), "--no-verify"])
    assert result.exit_code == 0, result.output


def test_overflowing_weight_is_bad_input(tmp_path, base):
    def huge(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"][3] = 3e38

    model_dir = edited_copy(base, tmp_path / "model", tensor_change=huge)
    run_export([str(model_dir), str(tmp_path / "out")], tmp_path, EXIT_FAILURE, "not finite", model=model_dir)


def test_merge_json_keeps_its_shape_on_mismatch(tmp_path, base):
    import json

    adapter = save_peft_adapter(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                tmp_path / "adapter", seed=1)
    result = runner.invoke(app, ["merge", str(base.directory), str(adapter), str(tmp_path / "out"), "--format", "onnx",
                                 "--onnx-atol", "0", "--onnx-rtol", "0", "--json"])
    assert result.exit_code == EXIT_MISMATCH, result.output
    report = json.loads(result.stdout)
    assert report["merge"]["status"] == "PASSED"
    assert report["export"]["status"] == "FAILED"
    assert report["onnx_directory"] is None
    assert not (tmp_path / "out").exists()


def test_replace_holds_back_ctrl_c():
    import signal

    from foldkit.output_dir import _sigint_held

    before = signal.getsignal(signal.SIGINT)
    with _sigint_held():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before


def test_generate_example_rejects_graph_without_cache(tmp_path):
    import subprocess
    import sys

    tiny = save_tiny_base("llama", tmp_path / "base", 44, with_tokenizer=True)
    export(tiny.directory, tmp_path / "onnx", ExportOptions(cache=False, verify=False))
    script = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "onnx"), "--prompt", "the fox"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("Error: ")
    assert "past_key_values" in done.stderr
    assert "Traceback" not in done.stderr
