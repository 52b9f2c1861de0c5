"""Build tiny Hugging Face models from configs, make PEFT adapters for them, and read checkpoints back.

Everything here runs offline: models come from configs with seeded random weights, never from a hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from peft import PeftConfig, get_peft_model
from safetensors import safe_open
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

VOCAB_SIZE = 128
HIDDEN_SIZE = 32
INTERMEDIATE_SIZE = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 64
# Biases start at zero in transformers' init, which would hide a fold rule that drops or misscales them.
BIAS_STD = 0.1
# Words of foldkit's probe texts, so that its tokenized-text probe gets known tokens and padding.
TOKENIZER_WORDS = ("the quick brown fox jumps over lazy dog adapters can be folded into weights of a linear "
                   "layer once before deployment").split()


@dataclass(frozen=True)
class TinyBase:
    """A tiny base model saved in float32 safetensors, and the transformers class that loads it."""

    name: str
    directory: Path
    model_class: type


def _llama_config(**overrides) -> transformers.LlamaConfig:
    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                    max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def _gemma_config(**overrides) -> transformers.GemmaConfig:
    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True)
    settings.update(overrides)
    return transformers.GemmaConfig(**settings)


def _gpt2_config(**overrides) -> transformers.GPT2Config:
    settings = dict(vocab_size=VOCAB_SIZE, n_embd=HIDDEN_SIZE, n_inner=INTERMEDIATE_SIZE, n_layer=LAYERS,
                    n_head=HEADS, n_positions=MAX_POSITIONS, bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    return transformers.GPT2Config(**settings)


def _opt_config(**overrides) -> transformers.OPTConfig:
    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, word_embed_proj_dim=HIDDEN_SIZE,
                    ffn_dim=INTERMEDIATE_SIZE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    max_position_embeddings=MAX_POSITIONS)
    settings.update(overrides)
    return transformers.OPTConfig(**settings)


def _bert_config(**overrides) -> transformers.BertConfig:
    settings = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS)
    settings.update(overrides)
    return transformers.BertConfig(**settings)


# Architecture name -> (model class, config factory).
ARCHITECTURES: dict[str, tuple[type, Callable[..., transformers.PretrainedConfig]]] = {
    "llama": (transformers.LlamaForCausalLM, _llama_config),
    "gemma": (transformers.GemmaForCausalLM, _gemma_config),
    "gpt2": (transformers.GPT2LMHeadModel, _gpt2_config),
    "opt": (transformers.OPTForCausalLM, _opt_config),
    "bert": (transformers.BertModel, _bert_config),
}


def build_tiny_model(architecture: str, seed: int, **config_overrides) -> torch.nn.Module:
    """Build a float32 model with seeded random weights and random (non-zero) biases."""
    model_class, make_config = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    model = model_class(make_config(**config_overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, BIAS_STD)
    return model.eval()


def save_word_tokenizer(directory: Path) -> None:
    """Save a lowercasing word-level tokenizer (ids below VOCAB_SIZE) with a pad and an eos token."""
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for word in TOKENIZER_WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                     pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(str(directory))


def save_tiny_base(architecture: str, directory: Path, seed: int, max_shard_size: str | None = None,
                   with_tokenizer: bool = False, **config_overrides) -> TinyBase:
    """Build a tiny model and save it with save_pretrained as float32 safetensors (sharded when asked)."""
    model = build_tiny_model(architecture, seed, **config_overrides)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    if with_tokenizer:
        save_word_tokenizer(directory)
    return TinyBase(architecture, directory, type(model))


def load_base(base: TinyBase) -> torch.nn.Module:
    return base.model_class.from_pretrained(str(base.directory), dtype=torch.float32).eval()


def save_peft_adapter(base: TinyBase, config: PeftConfig, directory: Path, seed: int,
                      save_embedding_layers: bool | str = False) -> Path:
    """Create an adapter with PEFT on the saved base (seeded init) and save it with save_pretrained.

    PEFT's own default, save_embedding_layers="auto", also saves the full lm_head weight when lm_head is
    a target; pass "auto" to get that layout.
    """
    model = load_base(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(directory), save_embedding_layers=save_embedding_layers)
    return directory


def probe_input_ids(seed: int, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, shape, generator=generator)


@torch.no_grad()
def model_outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Return the logits of a causal LM, or the last_hidden_state of an encoder, as float32."""
    output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits.float()
    return output.last_hidden_state.float()


def checkpoint_files(directory: Path) -> list[str]:
    """Return the safetensors files of a model directory: the index's shards, or model.safetensors."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    return ["model.safetensors"]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a single-file or sharded safetensors checkpoint."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(directory):
        tensors.update(read_safetensors(directory / file))
    return tensors
