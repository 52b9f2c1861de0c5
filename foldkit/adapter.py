"""Read a PEFT adapter directory (LoRA or IA3) into per-module tensors and settings."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from foldkit.errors import AdapterError, UnsupportedAdapterError
from foldkit.patterns import is_feedforward, pattern_value

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA", "IA3")

# Each adapter tensor key is MODULE + one of these suffixes. PEFT's default save also stores an
# unchanged copy of a targeted lm_head's weight as base_layer.weight. foldkit checks that copy against
# BASE and folds nothing from it.
LORA_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_B.bias": "lora_B_bias",
                 ".base_layer.weight": "base_layer_weight"}
IA3_SUFFIXES = {".ia3_l": "ia3_l"}


@dataclass
class ModuleAdapter:
    """The adapter tensors and settings for one targeted module."""

    module: str
    kind: str  # "lora" or "ia3"
    tensors: dict[str, torch.Tensor]
    scaling: float = 1.0  # LoRA: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    feedforward: bool = False  # IA3: scale the input (True) or the output (False)


@dataclass
class Adapter:
    """A PEFT adapter: its config and the tensors of each targeted module."""

    path: Path
    peft_type: str
    config: dict
    modules: dict[str, ModuleAdapter] = field(default_factory=dict)


def load_adapter(directory: str | Path, allow_pickle: bool = False) -> Adapter:
    """Load and validate an adapter directory. Raises AdapterError naming what is wrong and where."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    config = _read_config(path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise UnsupportedAdapterError(
            f"unsupported peft_type {config.get('peft_type')!r} in {path / CONFIG_FILE}; "
            f"foldkit folds: {', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    _check_option_types(path, config)
    _reject_unfoldable_options(path, peft_type, config)

    state = _read_tensors(path, allow_pickle)
    _check_finite(path, state)
    if peft_type == "LORA":
        modules = _group_lora(path, config, state)
    else:
        modules = _group_ia3(path, config, state)
    if not modules:
        raise AdapterError(f"adapter in {path} contains no {peft_type} tensors")
    logger.debug("loaded %s adapter from %s: %d modules", peft_type, path, len(modules))
    return Adapter(path, peft_type, config, modules)


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{CONFIG_FILE} not found in {path}: ADAPTER must be a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"invalid {CONFIG_FILE} in {path}: {error}") from error
    if not isinstance(config, dict):
        raise AdapterError(f"invalid {CONFIG_FILE} in {path}: expected a JSON object")
    return config


def _check_option_types(path: Path, config: dict) -> None:
    """Raise for options whose JSON type foldkit cannot use, before any arithmetic on them."""
    where = path / CONFIG_FILE

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for option in ("r", "lora_alpha"):
        if option in config and not is_number(config[option]):
            raise AdapterError(f"invalid {option} {config[option]!r} in {where}: expected a number")
    for option in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(option)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(is_number(value) for value in patterns.values()):
            raise AdapterError(f"invalid {option} in {where}: expected an object mapping module patterns to numbers")
    for option in ("target_modules", "feedforward_modules"):
        value = config.get(option)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(entry, str) for entry in value)):
            raise AdapterError(f"invalid {option} in {where}: expected a string or a list of strings")


def _reject_unfoldable_options(path: Path, peft_type: str, config: dict) -> None:
    """Raise for adapter options whose effect is not a LoRA or IA3 delta on a linear weight."""
    where = path / CONFIG_FILE
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"{where} sets modules_to_save {config['modules_to_save']}: foldkit cannot fold whole-module replacements"
        )
    if config.get("trainable_token_indices"):
        raise UnsupportedAdapterError(f"{where} sets trainable_token_indices: foldkit cannot fold embedding rows")
    if config.get("layer_replication"):
        raise UnsupportedAdapterError(f"{where} sets layer_replication: foldkit cannot fold replicated layers")
    if peft_type != "LORA":
        return
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"{where} sets use_dora: foldkit does not fold DoRA adapters yet")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"{where} sets bias={config['bias']!r}: foldkit cannot fold trained base biases; use bias='none'"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise UnsupportedAdapterError(
            f"{where} uses init_lora_weights={init!r}, which rewrites the base weights: save the adapter "
            "converted to a plain LoRA (PEFT's path_initial_model_for_weight_conversion) and merge that"
        )
    for option in ("target_parameters", "alora_invocation_tokens", "use_qalora"):
        if config.get(option):
            raise UnsupportedAdapterError(f"{where} sets {option}: foldkit cannot fold this LoRA variant")


def _read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_path = path / SAFETENSORS_FILE
    pickle_path = path / PICKLE_FILE
    if safetensors_path.is_file():
        try:
            return load_file(str(safetensors_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise AdapterError(f"invalid or truncated safetensors file {safetensors_path}: {error}") from error
    if pickle_path.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{pickle_path} is a pickle file, which can run code when loaded; foldkit loads it only with "
                "--allow-pickle (weights only), or convert the adapter to safetensors"
            )
        try:
            state = torch.load(str(pickle_path), map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for corrupt or hostile pickles
            raise AdapterError(
                f"failed to load {pickle_path} with weights_only=True (it contains objects other than tensors, or is corrupt): "
                f"{_last_line(error)}"
            ) from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{pickle_path} does not contain a dict of tensors")
        return state
    raise AdapterError(f"no adapter weights in {path}: expected {SAFETENSORS_FILE} (or {PICKLE_FILE})")


def _last_line(error: Exception) -> str:
    """Return the line of an exception message that names the cause (torch.load prints several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (cause or lines or [type(error).__name__])[0]


def _check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if torch.isnan(tensor).any():
            raise AdapterError(f"adapter tensor {key} in {path} contains NaN values")
        if torch.isinf(tensor).any():
            raise AdapterError(f"adapter tensor {key} in {path} contains infinite values")


def _split_keys(path: Path, state: dict[str, torch.Tensor], suffixes: dict[str, str]) -> dict[str, dict]:
    """Group tensors by module path. Raise for any key that is not a known adapter tensor."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        for suffix, role in suffixes.items():
            if name.endswith(suffix):
                grouped.setdefault(name[: -len(suffix)], {})[role] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise UnsupportedAdapterError(
            f"adapter in {path} contains tensors foldkit cannot fold: {', '.join(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            + _hint_for(unknown)
        )
    return grouped


def _hint_for(keys: list[str]) -> str:
    joined = " ".join(keys)
    if "lora_embedding" in joined:
        return " (LoRA on an embedding layer is not supported)"
    if "lora_magnitude_vector" in joined:
        return " (DoRA is not supported)"
    if "modules_to_save" in joined or "base_layer" in joined:
        return " (full replacement tensors from modules_to_save or bias training are not supported)"
    return ""


def _group_lora(path: Path, config: dict, state: dict[str, torch.Tensor]) -> dict[str, ModuleAdapter]:
    modules = {}
    for module, tensors in _split_keys(path, state, LORA_SUFFIXES).items():
        if "lora_A" not in tensors or "lora_B" not in tensors:
            missing = "lora_A" if "lora_A" not in tensors else "lora_B"
            raise AdapterError(f"adapter in {path} has no {missing} tensor for module {module}")
        lora_A, lora_B = tensors["lora_A"], tensors["lora_B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2:
            raise UnsupportedAdapterError(
                f"module {module}: LoRA tensors of shapes {tuple(lora_A.shape)} and {tuple(lora_B.shape)} are not "
                "those of a linear layer (convolution LoRA is not supported)"
            )
        rank = lora_A.shape[0]
        if lora_B.shape[1] != rank:
            raise AdapterError(
                f"module {module}: lora_A has rank {rank} but lora_B has shape {tuple(lora_B.shape)}"
            )
        configured_rank = pattern_value(module, config.get("rank_pattern"), config.get("r", 8))
        if configured_rank != rank:
            raise AdapterError(
                f"module {module}: adapter_config.json gives r={configured_rank} but lora_A has rank {rank}"
            )
        alpha = pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        modules[module] = ModuleAdapter(module, "lora", tensors, scaling=float(scaling))
    return modules


def _group_ia3(path: Path, config: dict, state: dict[str, torch.Tensor]) -> dict[str, ModuleAdapter]:
    modules = {}
    feedforward_modules = config.get("feedforward_modules")
    for module, tensors in _split_keys(path, state, IA3_SUFFIXES).items():
        feedforward = is_feedforward(module, feedforward_modules)
        ia3_l = tensors["ia3_l"]
        expected_layout = "(1, in_features)" if feedforward else "(out_features, 1)"
        dim_ok = ia3_l.dim() == 2 and (ia3_l.shape[0] == 1 if feedforward else ia3_l.shape[1] == 1)
        if not dim_ok:
            raise AdapterError(
                f"module {module}: ia3_l has shape {tuple(ia3_l.shape)} but feedforward_modules makes it "
                f"{'feedforward' if feedforward else 'non-feedforward'}, which needs {expected_layout}"
            )
        modules[module] = ModuleAdapter(module, "ia3", tensors, feedforward=feedforward)
    return modules
