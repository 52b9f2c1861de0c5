"""Write synthetic Llama-architecture bf16 checkpoints and rank-r LoRA adapters straight to disk.

The tensors are random but reused across layers (one random block per shape), so a 26 GB checkpoint
is written at disk speed without holding more than a few tensors in memory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from foldkit.checkpoint import TensorInfo
from foldkit.safetensors_writer import SafetensorsWriter
from foldkit.shards import reshard, write_index

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int = 32000
    heads: int = 16

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
        }

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        h, m = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
                "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        names = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        shapes = self.projection_shapes()
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}"
            names.append((f"{prefix}.input_layernorm.weight", (self.hidden,)))
            names.append((f"{prefix}.post_attention_layernorm.weight", (self.hidden,)))
            for projection in PROJECTIONS:
                part = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                names.append((f"{prefix}.{part}.{projection}.weight", shapes[projection]))
        names.append(("model.norm.weight", (self.hidden,)))
        names.append(("lm_head.weight", (self.vocab, self.hidden)))
        return names

    def nbytes(self) -> int:
        total = 0
        for _, shape in self.tensors():
            count = 1
            for size in shape:
                count *= size
            total += count * 2
        return total


def shape_for_size(target_bytes: int, hidden: int = 2048, intermediate: int = 8192) -> LlamaShape:
    """Return the Llama shape of this width whose bf16 size is closest to target_bytes."""
    per_layer = LlamaShape(2, hidden, intermediate).nbytes() - LlamaShape(1, hidden, intermediate).nbytes()
    fixed = LlamaShape(1, hidden, intermediate).nbytes() - per_layer
    layers = max(1, round((target_bytes - fixed) / per_layer))
    return LlamaShape(layers, hidden, intermediate)


def write_checkpoint(directory: Path, shape: LlamaShape, shard_bytes: int, seed: int = 0) -> None:
    """Write config.json and sharded bf16 safetensors with an index."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=2))
    entries = [TensorInfo(name, "", torch.bfloat16, size) for name, size in shape.tensors()]
    layout = reshard(entries, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    blocks: dict[tuple[int, ...], torch.Tensor] = {}
    for file, file_entries in layout.items():
        writer = SafetensorsWriter(directory / file, file_entries, {"format": "pt"})
        for info in file_entries:
            if info.shape not in blocks:
                std = 1.0 if len(info.shape) == 1 else info.shape[-1] ** -0.5
                blocks[info.shape] = (torch.randn(info.shape, generator=generator) * std).to(torch.bfloat16)
            writer.write(info.name, blocks[info.shape])
        writer.close()
    if len(layout) > 1:
        write_index(layout, directory)


def write_lora_adapter(directory: Path, shape: LlamaShape, rank: int = 16, alpha: int = 32, seed: int = 1) -> None:
    """Write a PEFT-format LoRA adapter on all seven projections of every layer."""
    from safetensors.torch import save_file

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.layers):
        for projection, (out_features, in_features) in shape.projection_shapes().items():
            part = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{projection}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(PROJECTIONS),
              "bias": "none", "base_model_name_or_path": None, "task_type": "CAUSAL_LM",
              "init_lora_weights": True, "use_rslora": False, "use_dora": False, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None, "fan_in_fan_out": False, "lora_dropout": 0.0}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
