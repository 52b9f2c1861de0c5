"""Save adapters trained with foldkit's wrappers as PEFT-format adapter directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from foldkit.adapter import CONFIG_FILE, KEY_PREFIX, SAFETENSORS_FILE
from foldkit.modules import AdapterLayer, IA3Activation, LoRAActivation


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collect adapter tensors under PEFT's key names and shapes (ia3_l as (out, 1) or (1, in))."""
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        key = KEY_PREFIX + name
        if isinstance(module, IA3Activation):
            vector = module.ia3_l.detach().cpu().contiguous()
            state[f"{key}.ia3_l"] = vector.reshape(1, -1) if module.feedforward else vector.reshape(-1, 1)
        elif isinstance(module, LoRAActivation):
            state[f"{key}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous()
            state[f"{key}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous()
    return state


def save_adapter(model: nn.Module, directory: Path, method: str, targets: list[str], feedforward: list[str],
                 rank: int, lora_alpha: float, use_rslora: bool, base_model: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors that PEFT and foldkit merge both load."""
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state(model)
    # Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    # truncated adapter in place of a complete older one.
    partial = directory / f".{SAFETENSORS_FILE}.partial"
    save_file(state, str(partial), metadata={"format": "pt"})
    os.replace(partial, directory / SAFETENSORS_FILE)
    config = {
        "peft_type": "IA3" if method == "ia3" else "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": targets,
        "inference_mode": True,
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }
    if method == "ia3":
        config.update({"feedforward_modules": feedforward, "init_ia3_weights": True})
    else:
        config.update({"r": rank, "lora_alpha": lora_alpha, "use_rslora": use_rslora, "lora_dropout": 0.0,
                       "bias": "none", "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
                       "use_dora": False})
    partial = directory / f".{CONFIG_FILE}.partial"
    partial.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, directory / CONFIG_FILE)
