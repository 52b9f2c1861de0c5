"""foldkit train: both forms train alike, PEFT loads the result, resume and data-parallel runs match."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import TOKENIZER_WORDS, load_base, probe_input_ids, save_tiny_base
from typer.testing import CliRunner

from foldkit.cli import app
from foldkit.merge import MergeOptions, merge
from foldkit.train import TrainOptions, train
from foldkit.train_data import IGNORE_INDEX, load_examples

runner = CliRunner()
MAX_LENGTH = 8


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base("llama", tmp_path_factory.mktemp("train-base"), seed=11, with_tokenizer=True)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    # 16 words a line and 8 lines: 128 tokens, so every block of MAX_LENGTH tokens is full.
    words = list(TOKENIZER_WORDS[:16])
    lines = [" ".join(words[shift:] + words[:shift]) for shift in range(8)]
    path = tmp_path_factory.mktemp("train-data") / "data.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def options(**overrides):
    settings = dict(method="ia3", targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"], lr=0.05,
                    steps=4, batch_size=2, max_length=MAX_LENGTH, seed=3, progress=False)
    settings.update(overrides)
    return TrainOptions(**settings)


@pytest.mark.parametrize("method", ["ia3", "lora"])
def test_forms_train_alike(tmp_path, base, text_data, method):
    results = {form: train(base.directory, text_data, tmp_path / form, options(method=method, form=form))
               for form in ("activation", "weight")}

    activation, weight = results["activation"].losses, results["weight"].losses
    assert len(activation) == 4
    torch.testing.assert_close(torch.tensor(weight), torch.tensor(activation), rtol=1e-5, atol=1e-6)
    adapters = {form: load_file(str(tmp_path / form / "adapter_model.safetensors")) for form in results}
    # Adam divides by the gradient's running RMS, so float32 rounding differences between the forms in
    # near-zero gradients move single elements by up to about lr * 1e-3 after a few steps.
    for key, tensor in adapters["activation"].items():
        torch.testing.assert_close(adapters["weight"][key], tensor, rtol=1e-3, atol=1e-4)
    # Training moved the adapter away from its identity start (l = 1, B = 0).
    trained = [tensor for key, tensor in adapters["activation"].items() if "ia3_l" in key or "lora_B" in key]
    identity = 1.0 if method == "ia3" else 0.0
    assert all((tensor - identity).abs().max() > 1e-3 for tensor in trained)


@pytest.mark.parametrize("method", ["ia3", "lora"])
def test_peft_loads_trained_adapter(tmp_path, base, text_data, method):
    adapter = tmp_path / "adapter"
    train(base.directory, text_data, adapter, options(method=method, targets=["q_proj", "v_proj", "down_proj"]))
    merged = tmp_path / "merged"
    report = merge(base.directory, adapter, merged, MergeOptions(progress=False, verify="all"))

    input_ids = probe_input_ids(seed=4)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_base(base), str(adapter)).eval()(input_ids=input_ids).logits
        merged_model = type(load_base(base)).from_pretrained(str(merged), dtype=torch.float32).eval()
        merged_logits = merged_model(input_ids=input_ids).logits
        base_logits = load_base(base)(input_ids=input_ids).logits

    assert report.status == "PASSED"
    torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-4, atol=1e-4)
    assert (peft_logits - base_logits).abs().max() > 1e-3
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((adapter / "losses.json").read_text())) == 4


def test_resume_matches_uninterrupted(tmp_path, base, text_data):
    straight = train(base.directory, text_data, tmp_path / "straight", options(steps=4))
    train(base.directory, text_data, tmp_path / "resumed", options(steps=2, save_every=1))
    (tmp_path / "resumed" / "adapter_model.safetensors").unlink()

    resumed = train(base.directory, text_data, tmp_path / "resumed", options(steps=4, resume=True))

    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses), rtol=1e-5, atol=1e-6)


def test_two_processes_match_one(tmp_path, base, text_data):
    common = [str(base.directory), str(text_data), "--steps", "3", "--max-length", str(MAX_LENGTH), "--lr", "0.05",
              "--seed", "3", "--quiet"]
    single = runner.invoke(app, ["train", *common[:2], str(tmp_path / "one"), *common[2:], "--batch-size", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # On a machine without GPUs, accelerate's --cpu launcher starts a single process; --multi_gpu starts
    # torchrun, whose processes then train on the CPU over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "foldkit.cli", "train", *common[:2], str(tmp_path / "two"), *common[2:], "--batch-size", "1"]

    completed = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)

    assert single.exit_code == 0, single.output
    assert completed.returncode == 0, completed.stderr[-3000:]
    single_losses = json.loads((tmp_path / "one" / "losses.json").read_text())
    parallel_losses = json.loads((tmp_path / "two" / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(parallel_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    single_adapter = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    parallel_adapter = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for key, tensor in single_adapter.items():
        torch.testing.assert_close(parallel_adapter[key], tensor, rtol=1e-4, atol=1e-6)


def test_prompt_completion_masks_prompt(tmp_path, base):
    from transformers import AutoTokenizer

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "the quick brown", "completion": "fox jumps"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(base.directory))

    (example,) = load_examples(path, tokenizer, 16)

    assert example.labels[:3] == [IGNORE_INDEX] * 3
    assert example.labels[3:] == example.input_ids[3:]
    assert len(example.input_ids) == 3 + 2 + 1  # prompt, completion, eos


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ('{"text": "the fox"}\n{"text": \n', "invalid JSON on line 2"),
    ('{"text": "the fox"}\n{"prompt": "the"}\n', "line 2 of"),
])
def test_bad_data_rejected(tmp_path, base, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)

    result = runner.invoke(app, ["train", str(base.directory), str(data), str(tmp_path / "out"), "--max-length", "8"])

    assert result.exit_code == 1
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_target_lists_close_names(tmp_path, base, text_data):
    result = runner.invoke(app, ["train", str(base.directory), str(text_data), str(tmp_path / "out"),
                                 "--targets", "k_prj", "--feedforward", "", "--max-length", "8"])

    assert result.exit_code == 1
    assert "target 'k_prj' matches no linear module; close names: k_proj" in result.stderr


def test_max_length_beyond_limit_rejected(tmp_path, base, text_data):
    result = runner.invoke(app, ["train", str(base.directory), str(text_data), str(tmp_path / "out"),
                                 "--max-length", "100000"])

    assert result.exit_code == 1
    assert "beyond the model's limit of 64 positions" in result.stderr


def test_feedforward_outside_targets_rejected(tmp_path, base, text_data):
    result = runner.invoke(app, ["train", str(base.directory), str(text_data), str(tmp_path / "out"),
                                 "--targets", "k_proj,v_proj", "--feedforward", "down_proj", "--max-length", "8"])

    assert result.exit_code == 2
    assert "--feedforward names modules that are not in --targets: down_proj" in result.stderr


def test_data_without_examples_rejected(tmp_path, base):
    data = tmp_path / "one.txt"
    data.write_text("fox\n")

    result = runner.invoke(app, ["train", str(base.directory), str(data), str(tmp_path / "out"), "--max-length", "8"])

    assert result.exit_code == 1
    assert "gives no example of at least 2 tokens" in result.stderr


@pytest.mark.parametrize("out_name", ["base", "base/adapter", "nonempty"])
def test_train_out_checked(tmp_path, base, text_data, out_name):
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("keep")
    out = {"base": base.directory, "base/adapter": base.directory / "adapter", "nonempty": nonempty}[out_name]

    result = runner.invoke(app, ["train", str(base.directory), str(text_data), str(out), "--max-length", "8"])

    assert result.exit_code == 1
    assert not (base.directory / "adapter_config.json").exists()
    assert not (base.directory / "adapter").exists()
    assert (nonempty / "keep.txt").read_text() == "keep"


def test_resume_with_other_method_rejected(tmp_path, base, text_data):
    train(base.directory, text_data, tmp_path / "out", options(steps=2, save_every=1))

    result = runner.invoke(app, ["train", str(base.directory), str(text_data), str(tmp_path / "out"), "--resume",
                                 "--method", "lora", "--steps", "4", "--max-length", "8"])

    assert result.exit_code == 1
    assert "was trained with other settings (method ia3 in the checkpoint but lora now" in result.stderr
