"""Learn a model's module types and tied weights from its config alone, on the meta device."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from foldkit.errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """Module layout of a model architecture, built without allocating weights."""

    architecture: str
    model_class: type
    base_model_prefix: str
    modules: dict[str, nn.Module]
    tied_weights: dict[str, str]  # tied parameter name -> the parameter it shares storage with

    def close_names(self, name: str, count: int = 3) -> list[str]:
        """Return names of Linear and Conv1D modules similar to `name`, the only layers an adapter can target."""
        layers = [key for key, module in self.modules.items() if layer_kind(module) in ("linear", "conv1d")]
        return difflib.get_close_matches(name, layers, n=count, cutoff=0.5)


def resolve_model_class(config: dict, where: Path) -> tuple[str, type]:
    """Return the transformers class named by config.json's architectures. Never runs remote code."""
    architectures = config.get("architectures") or []
    if not architectures:
        model_type = config.get("model_type")
        if not model_type:
            raise CheckpointError(f"config.json in {where} names neither architectures nor model_type")
        return str(model_type), transformers.AutoModel
    architecture = architectures[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None or not isinstance(model_class, type):
        raise CheckpointError(
            f"architecture {architecture} from {where / 'config.json'} is not part of the installed transformers "
            f"({transformers.__version__}); foldkit does not run remote model code"
        )
    return architecture, model_class


def load_model_config(directory: Path):
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"transformers cannot read config.json in {directory}: {error}") from error


def inspect_model(directory: Path, config: dict) -> ModelInfo:
    """Build the model on the meta device to read its module names, types and weight ties."""
    architecture, model_class = resolve_model_class(config, directory)
    hf_config = load_model_config(directory)
    try:
        with torch.device("meta"):
            if model_class is transformers.AutoModel:
                model = transformers.AutoModel.from_config(hf_config)
            else:
                model = model_class(hf_config)
    except Exception as error:  # model constructors raise many types for configs they reject
        raise CheckpointError(f"failed to build {architecture} from {directory / 'config.json'}: {error}") from error

    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):
        tied = {}
    if not _ties_embeddings(hf_config):
        tied = {target: source for target, source in tied.items() if not _is_output_embedding(model, target)}
    return ModelInfo(
        architecture=architecture,
        model_class=type(model),
        base_model_prefix=getattr(model, "base_model_prefix", "") or "",
        modules=dict(model.named_modules()),
        tied_weights=dict(tied),
    )


def _ties_embeddings(hf_config) -> bool:
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _is_output_embedding(model: nn.Module, parameter_name: str) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None:
        return False
    return any(module is output and f"{name}.weight" == parameter_name for name, module in model.named_modules())


def layer_kind(module: nn.Module) -> str:
    """'linear' or 'conv1d' for layers foldkit can fold into, else the class name."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    return type(module).__name__
