"""ONNX export of real models: merged SmolLM2 generates PyTorch's greedy tokens; MiniLM embeds sentences alike."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from foldkit.merge import MergeOptions
from foldkit.merge_export import merge_and_export
from foldkit.onnx_export import ExportOptions, export
from foldkit.onnx_generate import greedy_generate
from foldkit.onnx_graphs import CacheShape
from foldkit.onnx_runtime import open_session
from foldkit.onnx_verify import generation_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import minilm_directory, prepare_smollm2  # noqa: E402

pytestmark = pytest.mark.real_model

NEW_TOKENS = 24
PROMPTS = ["Write one sentence about folding paper.", "What is a linear layer in a neural network? Answer briefly."]


def test_smollm2_onnx_greedy_tokens(tmp_path):
    base = prepare_smollm2()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    # PEFT's non-default init is strong, so scale it down to keep the merged model's text worth comparing.
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.05)
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    out = tmp_path / "out"
    result = merge_and_export(base, tmp_path / "adapter", out, ("safetensors", "onnx"), MergeOptions(), ExportOptions())
    assert result.merge.status == "PASSED"
    assert result.export.status == "PASSED"
    assert result.export.verification["greedy"]["equal"]
    # SmolLM2 ties lm_head to the embedding, so the weights file contains it once (134.5M float32 parameters).
    assert result.export.files["model.onnx.data" if result.export.external_data else "model.onnx"] < 600e6

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True) for prompt in PROMPTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the prompts should need left padding"
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    eos, pad = generation_ids(merged)
    with torch.no_grad():
        expected = merged.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                   pad_token_id=pad)[:, batch["input_ids"].shape[1]:]
    session = open_session(out / "onnx" / "model.onnx", "CPUExecutionProvider")
    shape = session.get_inputs()[3].shape
    cache = CacheShape(merged.config.num_hidden_layers, shape[1], shape[3])
    tokens = greedy_generate(session, batch["input_ids"].numpy(), batch["attention_mask"].numpy(), NEW_TOKENS,
                             eos, pad, cache)[:, :expected.shape[1]]
    assert tokens.tolist() == expected.tolist(), tokenizer.batch_decode(tokens)

    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with torch.no_grad():
        base_tokens = plain.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad)[:, batch["input_ids"].shape[1]:]
    assert base_tokens.tolist() != expected.tolist(), "the merged model should not generate what the base does"


def test_minilm_onnx_embeddings(tmp_path):
    directory = minilm_directory()
    report = export(directory, tmp_path / "onnx")
    assert report.status == "PASSED"
    assert report.kind == "encoder"
    assert report.outputs == ["last_hidden_state", "pooler_output"]
    assert (tmp_path / "onnx" / "1_Pooling").is_dir()
    assert (tmp_path / "onnx" / "vocab.txt").is_file()
    assert "1_Pooling/config.json" in report.files

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "onnx"))
    sentences = ["Adapters fold into weights.", "A longer sentence makes the tokenizer pad the shorter one in the batch."]
    batch = tokenizer(sentences, return_tensors="np", padding=True)
    session = open_session(tmp_path / "onnx" / "model.onnx", "CPUExecutionProvider")
    hidden = session.run(["last_hidden_state"], {name: batch[name].astype(np.int64) for name in
                                                  ("input_ids", "attention_mask", "token_type_ids")})[0]
    model = AutoModel.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        reference = model(**{name: torch.from_numpy(value) for name, value in batch.items()}).last_hidden_state

    def mean_pool(states, mask):
        mask = mask[..., None].astype(np.float32)
        return (states * mask).sum(1) / mask.sum(1)

    got = mean_pool(hidden, batch["attention_mask"])
    expected = mean_pool(reference.numpy(), batch["attention_mask"])
    assert np.abs(got - expected).max() < 1e-4
