"""Match each adapter module to the checkpoint tensors it folds into, and check shapes first."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from foldkit.adapter import Adapter, ModuleAdapter
from foldkit.checkpoint import Checkpoint
from foldkit.errors import AdapterError, UnsupportedAdapterError
from foldkit.model_info import ModelInfo, layer_kind


@dataclass
class FoldTask:
    """One targeted module: where its weight is read from and written to, and how it is folded."""

    module: str  # module name as the adapter names it
    model_module: str  # the same module's name in the transformers model
    adapter: ModuleAdapter
    fan_in_fan_out: bool  # the stored weight is (in, out), as in Conv1D
    source_weight: str  # checkpoint tensor read
    target_weight: str  # output tensor written; differs from source_weight when a tie is broken
    source_bias: str | None
    target_bias: str | None
    unties: bool = False  # the module shared its weight with another (tied embeddings)


@dataclass
class FoldPlan:
    tasks: list[FoldTask]
    untie_embeddings: bool  # the output config must set tie_word_embeddings to false

    def by_source(self) -> dict[str, list[FoldTask]]:
        grouped: dict[str, list[FoldTask]] = {}
        for task in self.tasks:
            grouped.setdefault(task.source_weight, []).append(task)
        return grouped


def plan_fold(checkpoint: Checkpoint, adapter: Adapter, model: ModelInfo) -> FoldPlan:
    """Plan every fold, raising AdapterError for the first module that does not fit the base model."""
    tasks = []
    for name, module_adapter in adapter.modules.items():
        tasks.append(_plan_module(checkpoint, adapter, model, name, module_adapter))
    _check_no_double_targets(tasks)
    return FoldPlan(tasks, untie_embeddings=any(task.unties for task in tasks))


def _plan_module(checkpoint: Checkpoint, adapter: Adapter, model: ModelInfo, name: str,
                 module_adapter: ModuleAdapter) -> FoldTask:
    module_name = _find_module(adapter, model, name)
    module = model.modules[module_name]
    kind = layer_kind(module)
    if kind not in ("linear", "conv1d"):
        raise UnsupportedAdapterError(
            f"module {name} is a {kind}; foldkit folds {adapter.peft_type} only into Linear and Conv1D layers"
        )
    fan_in_fan_out = kind == "conv1d"

    parameter = f"{module_name}.weight"
    unties = parameter in model.tied_weights or parameter in model.tied_weights.values()
    target_weight = _checkpoint_name(checkpoint, model, parameter)
    source_weight = target_weight
    if source_weight is None and parameter in model.tied_weights:
        source_weight = _checkpoint_name(checkpoint, model, model.tied_weights[parameter])
        target_weight = _output_name(checkpoint, model, parameter)
    if source_weight is None:
        raise AdapterError(
            f"module {name} has no weight {parameter} in the base checkpoint {checkpoint.path}"
        )
    if unties and parameter not in model.tied_weights:
        raise UnsupportedAdapterError(
            f"module {name} owns a weight that other modules share ({parameter}); folding into it would change them too"
        )

    _check_saved_base_copy(checkpoint, source_weight, name, module_adapter)
    weight_shape = checkpoint.tensors[source_weight].shape
    out_features, in_features = (weight_shape[1], weight_shape[0]) if fan_in_fan_out else weight_shape[:2]
    _check_shapes(name, module_adapter, weight_shape, out_features, in_features)

    bias_name = _checkpoint_name(checkpoint, model, f"{module_name}.bias")
    target_bias = bias_name
    if bias_name is None and "lora_B_bias" in module_adapter.tensors:
        target_bias = _output_name(checkpoint, model, f"{module_name}.bias")
    return FoldTask(name, module_name, module_adapter, fan_in_fan_out, source_weight, target_weight, bias_name, target_bias,
                    unties)


def _check_saved_base_copy(checkpoint: Checkpoint, source_weight: str, name: str, adapter: ModuleAdapter) -> None:
    """Raise if the adapter's stored copy of the base weight differs from BASE's weight."""
    saved = adapter.tensors.pop("base_layer_weight", None)
    if saved is None:
        return
    base_weight = checkpoint.read(source_weight)
    if saved.shape != base_weight.shape or not torch.equal(saved.to(base_weight.dtype), base_weight):
        raise AdapterError(
            f"module {name}: the adapter's saved copy of the base weight ({tuple(saved.shape)}) differs from "
            f"{source_weight} ({tuple(base_weight.shape)}) in {checkpoint.path}: was the adapter made for another base?"
        )


def _find_module(adapter: Adapter, model: ModelInfo, name: str) -> str:
    for candidate in _name_variants(name, model.base_model_prefix):
        if candidate in model.modules:
            return candidate
    close = model.close_names(name)
    hint = f" Close names in the base: {', '.join(close)}." if close else ""
    raise AdapterError(
        f"module {name} from the adapter is not in the base model ({model.architecture}). "
        f"Was the adapter made for another base?{hint}"
    )


def _name_variants(name: str, prefix: str) -> list[str]:
    """Return the name as given, then without the base model prefix, or with it."""
    variants = [name]
    if prefix:
        if name.startswith(prefix + "."):
            variants.append(name[len(prefix) + 1:])
        else:
            variants.append(f"{prefix}.{name}")
    return variants


def _checkpoint_name(checkpoint: Checkpoint, model: ModelInfo, parameter: str) -> str | None:
    for candidate in _name_variants(parameter, model.base_model_prefix):
        if candidate in checkpoint.tensors:
            return candidate
    return None


def _output_name(checkpoint: Checkpoint, model: ModelInfo, parameter: str) -> str:
    """Name a new output tensor in the checkpoint's naming: drop the prefix if the checkpoint has none."""
    prefix = model.base_model_prefix
    has_prefix = any(name.startswith(prefix + ".") for name in checkpoint.tensors) if prefix else True
    if prefix and not has_prefix and parameter.startswith(prefix + "."):
        return parameter[len(prefix) + 1:]
    return parameter


def _check_shapes(name: str, adapter: ModuleAdapter, weight_shape: tuple, out_features: int,
                  in_features: int) -> None:
    layout = f"base weight {tuple(weight_shape)} (out_features={out_features}, in_features={in_features})"
    if len(weight_shape) != 2:
        raise AdapterError(f"module {name}: {layout} is not a 2-D linear weight")
    tensors = adapter.tensors
    if adapter.kind == "lora":
        lora_A, lora_B = tensors["lora_A"], tensors["lora_B"]
        if lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
            raise AdapterError(
                f"module {name}: shape mismatch, lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} "
                f"do not fit the {layout}: was the adapter made for another base?"
            )
        bias = tensors.get("lora_B_bias")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise AdapterError(f"module {name}: lora_B bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        return
    ia3_l = tensors["ia3_l"]
    expected = (1, in_features) if adapter.feedforward else (out_features, 1)
    if tuple(ia3_l.shape) != expected:
        raise AdapterError(
            f"module {name}: shape mismatch, ia3_l {tuple(ia3_l.shape)} does not fit the {layout}; "
            f"expected {expected}: was the adapter made for another base?"
        )


def _check_no_double_targets(tasks: list[FoldTask]) -> None:
    seen: dict[str, str] = {}
    for task in tasks:
        if task.target_weight in seen:
            raise AdapterError(
                f"modules {seen[task.target_weight]} and {task.module} both fold into {task.target_weight}"
            )
        seen[task.target_weight] = task.module
