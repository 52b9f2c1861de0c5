"""Shared fixtures: tiny base models saved once per test session, with no network access."""

from __future__ import annotations

import os

# Set before transformers or PEFT read them, so that no code path tries to reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from tiny_models import TinyBase, save_tiny_base  # noqa: E402

# Each base gets its own seed so that no two share weights by accident.
BASE_SEEDS = {"llama": 11, "llama_bias": 12, "llama_sharded": 13, "gemma": 14, "gpt2": 15, "opt": 16, "bert": 17}

# The tiny Llama has about 107 KB of float32 weights, so 40KB shards give three files.
SHARD_SIZE = "40KB"

# The Llama bases have no tokenizer files, so foldkit's verification probes them with token ids only.
# The other bases carry a word-level tokenizer, so its tokenized-text probe (with padding) runs too.


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> TinyBase:
    return save_tiny_base("llama", tmp_path_factory.mktemp("llama-base"), BASE_SEEDS["llama"])


@pytest.fixture(scope="session")
def llama_bias_base(tmp_path_factory) -> TinyBase:
    """A Llama whose attention and MLP projections have biases, for lora_bias=True."""
    return save_tiny_base("llama", tmp_path_factory.mktemp("llama-bias-base"), BASE_SEEDS["llama_bias"],
                          attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="session")
def llama_sharded_base(tmp_path_factory) -> TinyBase:
    return save_tiny_base("llama", tmp_path_factory.mktemp("llama-sharded-base"), BASE_SEEDS["llama_sharded"],
                          max_shard_size=SHARD_SIZE)


@pytest.fixture(scope="session")
def gemma_base(tmp_path_factory) -> TinyBase:
    """A Gemma with tied input and output embeddings (Gemma's default)."""
    return save_tiny_base("gemma", tmp_path_factory.mktemp("gemma-base"), BASE_SEEDS["gemma"],
                          with_tokenizer=True)


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> TinyBase:
    """A GPT-2, whose projections are Conv1D layers with (in, out) weights and biases."""
    return save_tiny_base("gpt2", tmp_path_factory.mktemp("gpt2-base"), BASE_SEEDS["gpt2"],
                          with_tokenizer=True)


@pytest.fixture(scope="session")
def opt_base(tmp_path_factory) -> TinyBase:
    return save_tiny_base("opt", tmp_path_factory.mktemp("opt-base"), BASE_SEEDS["opt"],
                          with_tokenizer=True)


@pytest.fixture(scope="session")
def bert_base(tmp_path_factory) -> TinyBase:
    """A BertModel: an encoder without a language-model head, with biases on every Linear layer."""
    return save_tiny_base("bert", tmp_path_factory.mktemp("bert-base"), BASE_SEEDS["bert"],
                          with_tokenizer=True)
