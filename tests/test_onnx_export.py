"""foldkit export on tiny models of every supported family: graph names and axes, ONNX Runtime against
PyTorch (checked here independently of foldkit's own check), greedy generation, external data, tied
weights, and merge --format onnx against PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel
from typer.testing import CliRunner

import foldkit.onnx_export
from foldkit.cli import app
from foldkit.onnx_export import ExportOptions, export
from foldkit.onnx_generate import greedy_generate
from foldkit.onnx_graphs import CacheShape
from foldkit.tolerances import EXPORT_TOLERANCES
from tiny_models import VOCAB_SIZE, load_base, save_peft_adapter, save_tiny_base

runner = CliRunner()
FP32 = EXPORT_TOLERANCES[torch.float32]
SEEDS = {"llama": 31, "gemma": 32, "gpt2": 33, "opt": 34, "mistral": 35, "qwen2": 36, "bert": 37}
EXTRA_CONFIG = {
    "mistral": (transformers.MistralForCausalLM, lambda **kw: transformers.MistralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None, **kw)),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda **kw: transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **kw)),
}


def save_base(architecture: str, directory: Path, **overrides):
    if architecture in EXTRA_CONFIG:
        import tiny_models

        tiny_models.ARCHITECTURES.setdefault(architecture, EXTRA_CONFIG[architecture])
    return save_tiny_base(architecture, directory, SEEDS[architecture], with_tokenizer=True, **overrides)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each family once (cache graphs for decoders); map architecture -> (base, out, report)."""
    cache = {}

    def get(architecture: str):
        if architecture not in cache:
            root = tmp_path_factory.mktemp(f"export-{architecture}")
            base = save_base(architecture, root / "base")
            report = export(base.directory, root / "onnx")
            cache[architecture] = (base, root / "onnx", report)
        return cache[architecture]

    return get


def session(directory: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def left_padded(batch: int, tokens: int, padding: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch, tokens), generator=generator)
    mask = torch.ones_like(input_ids)
    for row, count in enumerate(padding):
        mask[row, :count] = 0
    return input_ids, mask


def assert_close(got: np.ndarray, reference: torch.Tensor, where: torch.Tensor | None = None) -> None:
    reference = reference.detach().float()
    got = torch.from_numpy(got).float()
    if where is not None:
        reference, got = reference[where], got[where]
    allowed = FP32.atol + FP32.rtol * reference.abs().max().item()
    assert (got - reference).abs().max().item() <= allowed


DECODERS = ["llama", "gemma", "gpt2", "opt", "mistral", "qwen2"]


@pytest.mark.parametrize("architecture", DECODERS)
def test_cache_graph_matches_pytorch(exported, architecture):
    base, out, report = exported(architecture)
    assert report.status == "PASSED"
    assert report.verification["greedy"]["equal"]
    cases = {diff["case"] for diff in report.verification["diffs"]}
    assert any("left-padded" in case for case in cases)
    assert any("past" in case for case in cases)
    assert any(case.startswith("batch 1") for case in cases)
    assert any(case.startswith("batch 2") for case in cases)

    graph = onnx.load(str(out / "model.onnx"))
    inputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.graph.input}
    layers = base.model_class.config_class.from_pretrained(str(base.directory)).num_hidden_layers
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(inputs) == 3 + 2 * layers
    assert "past_key_values.1.value" in inputs
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["past_key_values.0.key"][0] == "batch"
    assert inputs["past_key_values.0.key"][2] == "past_sequence"
    assert [value.name for value in graph.graph.output][:2] == ["logits", "present.0.key"]
    assert graph.opset_import[0].version == 18

    # An independent run: a prompt of 3 rows with different left padding, then one decode step.
    model = load_base(base)
    sess = session(out)
    input_ids, mask = left_padded(3, 10, [0, 3, 6], seed=5)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = CacheShape(layers, *sess.get_inputs()[3].shape[1:2], sess.get_inputs()[3].shape[3])
    empty = np.zeros((3, cache.heads, 0, cache.head_dim), dtype=np.float32)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({node.name: empty for node in sess.get_inputs()[3:]})
    got = sess.run(None, feeds)
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
    assert_close(got[0], reference.logits, mask.bool())
    base_logits = got[0]

    prompt, prompt_mask = left_padded(2, 9, [4, 0], seed=6)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        expected = model.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=1)[:, 9:]
    tokens = greedy_generate(sess, prompt.numpy(), prompt_mask.numpy(), 12, None, 1, cache)
    assert tokens.tolist() == expected.tolist(), eos
    # Without a cache shape, greedy_generate reads it from the graph's inputs.
    assert greedy_generate(sess, prompt.numpy(), prompt_mask.numpy(), 12, None, 1).tolist() == expected.tolist()
    assert np.isfinite(base_logits).all()


def test_cache_input_shape(exported):
    base, out, report = exported("llama")
    sess = session(out)
    assert sess.get_inputs()[3].shape == ["batch", 2, "past_sequence", 8]


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_no_cache_graph_returns_logits_only(tmp_path, architecture):
    base = save_base(architecture, tmp_path / "base")
    report = export(base.directory, tmp_path / "onnx", ExportOptions(cache=False))
    assert report.status == "PASSED"
    assert report.kind == "decoder-logits"
    assert report.verification["greedy"] is None
    sess = session(tmp_path / "onnx")
    assert [node.name for node in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids"]
    assert [node.name for node in sess.get_outputs()] == ["logits"]
    input_ids, mask = left_padded(2, 17, [5, 0], seed=7)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    got = sess.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(),
                          "position_ids": positions.numpy()})[0]
    with torch.no_grad():
        reference = load_base(base)(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    assert_close(got, reference, mask.bool())


def test_encoder_graph_outputs(exported):
    base, out, report = exported("bert")
    assert report.status == "PASSED"
    assert report.kind == "encoder"
    sess = session(out)
    assert [node.name for node in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [node.name for node in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    input_ids, mask = left_padded(2, 21, [0, 8], seed=8)
    got = sess.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(),
                          "token_type_ids": np.zeros_like(input_ids.numpy())})
    with torch.no_grad():
        reference = load_base(base)(input_ids=input_ids, attention_mask=mask)
    assert_close(got[0], reference.last_hidden_state)
    assert_close(got[1], reference.pooler_output)


def test_encoder_without_pooler(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "base")
    report = export(tmp_path / "base", tmp_path / "onnx")
    assert report.outputs == ["last_hidden_state"]
    assert report.status == "PASSED"


def test_tied_embeddings_are_stored_once(exported):
    base, out, report = exported("gemma")
    graph = onnx.load(str(out / "model.onnx"))
    model = load_base(base)
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == embedding.data_ptr()
    same_shape = [init for init in graph.graph.initializer if tuple(init.dims) in (tuple(embedding.shape),
                                                                                   tuple(embedding.shape[::-1]))]
    assert len(same_shape) == 1
    stored = sum(onnx.numpy_helper.to_array(init).nbytes for init in graph.graph.initializer)
    assert stored < report.weight_bytes + embedding.numel() * 4 // 2


def test_external_data_one_file(tmp_path):
    base = save_base("llama", tmp_path / "base")
    report = export(base.directory, tmp_path / "onnx", ExportOptions(external_data="always"))
    assert report.external_data
    assert report.status == "PASSED"
    files = sorted(path.name for path in (tmp_path / "onnx").iterdir())
    assert [name for name in files if "onnx" in name] == ["model.onnx", "model.onnx.data"]
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    locations = {entry.value for init in graph.graph.initializer for entry in init.external_data
                 if entry.key == "location"}
    assert locations == {"model.onnx.data"}
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size >= report.weight_bytes * 0.9


def test_external_data_size_threshold(tmp_path, monkeypatch):
    base = save_base("opt", tmp_path / "base")
    monkeypatch.setattr(foldkit.onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    report = export(base.directory, tmp_path / "onnx")
    assert report.external_data
    assert (tmp_path / "onnx" / "model.onnx.data").is_file()
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "never"), "--external-data", "never"])
    assert result.exit_code == 2
    assert "2 GiB" in result.output
    assert not (tmp_path / "never").exists()


def test_float16_export_verifies(tmp_path):
    base = save_base("llama", tmp_path / "base")
    report = export(base.directory, tmp_path / "onnx", ExportOptions(dtype="float16"))
    assert report.status == "PASSED"
    assert report.verification["atol"] == EXPORT_TOLERANCES[torch.float16].atol
    # Each row's allowance includes how far PyTorch's float16 result is from float32.
    assert all(diff["rounding_sensitivity"] > 0 for diff in report.verification["diffs"])
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert graph.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_cli_export_output(tmp_path):
    base = save_base("gpt2", tmp_path / "base")
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "onnx"), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    assert "left-padded" in result.output
    assert "greedy generation" in result.output
    result = runner.invoke(app, ["export", str(base.directory), str(tmp_path / "onnx2"), "--json", "-q", "--no-cache"])
    report = json.loads(result.stdout)
    assert report["status"] == "PASSED"
    assert report["kind"] == "decoder-logits"
    assert json.loads((tmp_path / "onnx2" / "foldkit_export.json").read_text())["status"] == "PASSED"


# --- merge --format onnx -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_with_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-onnx")
    base = save_base("llama", root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = save_peft_adapter(base, config, root / "adapter", seed=3)
    return base, adapter


def test_merge_onnx_matches_peft(tmp_path, llama_with_lora):
    base, adapter = llama_with_lora
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(base.directory), str(adapter), str(out), "--format", "onnx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["merge"]["status"] == "PASSED"
    assert report["export"]["status"] == "PASSED"
    assert "model.onnx" in report["export"]["files"]
    assert not list(out.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "foldkit_report.json").read_text())["status"] == "PASSED"
    assert report["export"]["model"] == f"{base.directory} merged with {adapter}"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no temporary merge directory left

    input_ids, mask = left_padded(2, 11, [3, 0], seed=9)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    sess = session(out)
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
    feeds.update({node.name: np.zeros((2, 2, 0, 8), dtype=np.float32) for node in sess.get_inputs()[3:]})
    got = sess.run(["logits"], feeds)[0]
    peft_model = PeftModel.from_pretrained(load_base(base), str(adapter)).eval()
    with torch.no_grad():
        with_adapter = peft_model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        plain = load_base(base)(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_close(got, with_adapter, real)
    assert (torch.from_numpy(got)[real] - plain[real]).abs().max() > 100 * FP32.atol


def test_merge_writes_both_formats(tmp_path, llama_with_lora):
    base, adapter = llama_with_lora
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(base.directory), str(adapter), str(out), "--format", "safetensors,onnx"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert (out / "foldkit_report.json").is_file()
    assert (out / "onnx" / "model.onnx").is_file()
    assert (out / "onnx" / "config.json").is_file()
    merged = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    input_ids, mask = left_padded(1, 7, [0], seed=10)
    sess = session(out / "onnx")
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy(),
             "position_ids": np.arange(7)[None].astype(np.int64)}
    feeds.update({node.name: np.zeros((1, 2, 0, 8), dtype=np.float32) for node in sess.get_inputs()[3:]})
    with torch.no_grad():
        assert_close(sess.run(["logits"], feeds)[0], merged(input_ids=input_ids).logits)
