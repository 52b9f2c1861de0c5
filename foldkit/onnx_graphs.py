"""The modules foldkit traces into ONNX graphs: their inputs, outputs and dynamic axes, per model family.

A decoder graph takes `input_ids`, `attention_mask` (batch x past+sequence) and `position_ids`. In the
cache variant it also takes `past_key_values.N.key` / `.value` for every layer and returns
`present.N.key` / `.value` beside `logits`. An encoder graph takes `input_ids`, `attention_mask` (and `token_type_ids`
where the model has them) and returns `last_hidden_state` (and `pooler_output`).

The decoder wrappers build the 4D additive attention mask themselves (causal and padding, offset by the
past length) and hand it to the model, which uses a 4D mask as given. Left to transformers, the mask
logic branches on the example inputs at trace time, and an export traced on an unpadded example gave
wrong logits for left-padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from foldkit.errors import InputError

# model_type -> kind. Each family listed here is exported and verified in tests/test_onnx_export.py.
DECODERS = ("llama", "gemma", "gpt2", "opt", "mistral", "qwen2")
ENCODERS = ("bert",)
KIND_CACHE = "decoder-with-cache"
KIND_LOGITS = "decoder-logits"
KIND_ENCODER = "encoder"


class UnsupportedModelError(InputError):
    """A model family, or a feature of one, that foldkit's ONNX export does not handle."""


def graph_kind(config, cache: bool) -> str:
    """Return the graph kind for `config`, or raise naming the model type and what is supported."""
    model_type = getattr(config, "model_type", None)
    architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers < 1:
        raise UnsupportedModelError(f"cannot export {model_type} ({architectures}) with num_hidden_layers={layers}")
    if model_type in DECODERS:
        # transformers' DynamicCache keeps only the last sliding_window keys whenever the config sets one,
        # even for families whose attention ignores it (a Llama config with sliding_window: 16).
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True):
            raise UnsupportedModelError(
                f"cannot export {model_type} ({architectures}) with sliding-window attention (sliding_window="
                f"{window}): foldkit's decoder graphs use full causal attention")
        if not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in config.architectures or []):
            raise UnsupportedModelError(
                f"cannot export {model_type} model with architectures [{architectures}]: decoder export needs a "
                "causal language model (an architecture ending in ForCausalLM or LMHeadModel)")
        return KIND_CACHE if cache else KIND_LOGITS
    if model_type in ENCODERS:
        return KIND_ENCODER
    raise UnsupportedModelError(
        f"cannot export model type {model_type!r} ({architectures}) to ONNX: foldkit exports decoders of type "
        f"{', '.join(DECODERS)} and encoders of type {', '.join(ENCODERS)}")


def additive_causal_mask(attention_mask: torch.Tensor, sequence: int, dtype: torch.dtype) -> torch.Tensor:
    """Return the batch x 1 x sequence x total mask: 0 where a query may attend to a key, dtype's min elsewhere.

    Query i is at absolute position past + i, where past = total - sequence. It may attend to key j when
    j <= past + i and attention_mask[b, j] is 1. A padding query sees no key: its row is all min, which
    softmax turns into uniform weights, so its outputs are finite and never compared.
    """
    total = attention_mask.shape[1]
    query_positions = torch.arange(sequence, device=attention_mask.device) + (total - sequence)
    key_positions = torch.arange(total, device=attention_mask.device)
    causal = key_positions[None, :] <= query_positions[:, None]
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class DecoderWithCache(torch.nn.Module):
    """input_ids, attention_mask, position_ids, past key/values per layer -> logits, present key/values."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = additive_causal_mask(attention_mask, input_ids.shape[1], dtype)
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        output = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            cache=cache, use_cache=True)
        present = []
        for layer in output.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (output.logits, *present)


class DecoderLogits(torch.nn.Module):
    """input_ids, attention_mask, position_ids -> logits, without a cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = additive_causal_mask(attention_mask, input_ids.shape[1], dtype)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits


class EncoderOutputs(torch.nn.Module):
    """input_ids, attention_mask[, token_type_ids] -> last_hidden_state[, pooler_output]."""

    def __init__(self, model: torch.nn.Module, pooled: bool):
        super().__init__()
        self.model = model
        self.pooled = pooled

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooled:
            return output.last_hidden_state, output.pooler_output
        return output.last_hidden_state


@dataclass(frozen=True)
class CacheShape:
    """Per-layer key/value shape batch x heads x length x head_dim, read off one forward pass."""

    layers: int
    heads: int
    head_dim: int


@dataclass
class GraphSpec:
    """Tracing recipe: the wrapper module, its example inputs, input and output names, and dynamic axes."""

    kind: str
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: dict
    cache: CacheShape | None = None


def cache_shape(model: torch.nn.Module) -> CacheShape:
    """Run a two-token forward pass and read the layer count and key/value shape from its cache."""
    with torch.no_grad():
        output = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layers = output.past_key_values.layers
    keys = layers[0].keys
    return CacheShape(layers=len(layers), heads=keys.shape[1], head_dim=keys.shape[3])


def past_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{part}" for layer in range(layers) for part in ("key", "value")]


def graph_spec(model: torch.nn.Module, kind: str) -> GraphSpec:
    """Build the wrapper and example inputs for `kind`. Example sizes are at least 2 on every dynamic
    axis: torch.export fixes an axis whose example size is 0 or 1."""
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    total = torch.export.Dim("total_sequence")
    example_batch, example_sequence, example_past = 2, 3, 4
    input_ids = torch.ones(example_batch, example_sequence, dtype=torch.long)

    if kind == KIND_ENCODER:
        config = model.config
        names = ["input_ids", "attention_mask"]
        example = [input_ids, torch.ones_like(input_ids)]
        if getattr(config, "type_vocab_size", 0):
            names.append("token_type_ids")
            example.append(torch.zeros_like(input_ids))
        pooled = getattr(model, "pooler", None) is not None
        # Keyed by the wrapper's argument names, which are the graph's input names.
        shapes = {name: {0: batch, 1: sequence} for name in names}
        return GraphSpec(kind, EncoderOutputs(model, pooled), tuple(example), names,
                         ["last_hidden_state", "pooler_output"] if pooled else ["last_hidden_state"], shapes)

    names = ["input_ids", "attention_mask", "position_ids"]
    if kind == KIND_LOGITS:
        example = (input_ids, torch.ones_like(input_ids), torch.arange(example_sequence).expand(example_batch, -1))
        shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence},
                  "position_ids": {0: batch, 1: sequence}}
        return GraphSpec(kind, DecoderLogits(model), example, names, ["logits"], shapes)

    shape = cache_shape(model)
    past_length = torch.export.Dim("past_sequence")
    dtype = model.get_input_embeddings().weight.dtype
    past = tuple(torch.zeros(example_batch, shape.heads, example_past, shape.head_dim, dtype=dtype)
                 for _ in range(2 * shape.layers))
    example = (input_ids, torch.ones(example_batch, example_past + example_sequence, dtype=torch.long),
               torch.arange(example_past, example_past + example_sequence).expand(example_batch, -1), *past)
    shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: total},
              "position_ids": {0: batch, 1: sequence},
              "past": tuple({0: batch, 2: past_length} for _ in past)}
    return GraphSpec(kind, DecoderWithCache(model, shape.layers), example,
                     names + past_names(shape.layers, "past_key_values"),
                     ["logits"] + past_names(shape.layers, "present"), shapes, shape)
