"""Check that a merged model computes what the base model with the adapter in activation form computes."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from functools import partial
from torch import nn

from foldkit.errors import CheckpointError
from foldkit.model_info import resolve_model_class
from foldkit.fold import FOLD_RULES
from foldkit.modules import AdapterLayer, inject_adapters
from foldkit.plan import FoldPlan
from foldkit.tolerances import NOISE_FACTOR, tolerance_for
from foldkit.verify_modules import unit_roundoff

logger = logging.getLogger(__name__)

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Adapters can be folded into the weights of a linear layer once, before deployment.",
)
PROBE_SEED = 1234
PROBE_SHAPE = (2, 16)
NOISE_SEED = 99
# A directory with none of these has no tokenizer, whatever AutoTokenizer returns for it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


@dataclass
class VerificationResult:
    """Figures of one equivalence check, as written to the report."""

    compared: str  # "logits" or "last_hidden_state"
    merged_dtype: str
    atol: float
    rtol: float
    tolerance_reason: str
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / max|reference|
    reference_max_abs: float
    rounding_sensitivity: float  # max change of the reference under one rounding of every folded weight
    allowed_abs_diff: float  # atol + rtol * reference_max_abs + NOISE_FACTOR * rounding_sensitivity
    adapter_effect_max_abs: float  # max|reference - base|: how much the adapter changes the outputs
    top1_agreement: float | None  # share of positions whose greedy token matches; None for encoders
    probes: list[str] = field(default_factory=list)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def load_model(directory: Path, config: dict) -> nn.Module:
    """Load a model with its own transformers class, in float32, and check every weight was found."""
    _, model_class = resolve_model_class(config, directory)
    try:
        model, info = model_class.from_pretrained(str(directory), dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"transformers failed to load {directory}: {error}") from error
    problems = {key: value for key, value in info.items() if value and key in ("missing_keys", "unexpected_keys",
                                                                                  "mismatched_keys")}
    if problems:
        raise CheckpointError(f"transformers loaded {directory} with problems: {problems}")
    return model.eval()


def make_probes(directory: Path, vocab_size: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Fixed token ids from a seeded generator, plus tokenized text when the directory has a tokenizer."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    input_ids = torch.randint(0, vocab_size, PROBE_SHAPE, generator=generator)
    probes = [(f"random token ids {tuple(PROBE_SHAPE)}, seed {PROBE_SEED}",
               {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})]
    encoded = _tokenize_probe_texts(directory, vocab_size)
    if encoded is not None:
        probes.append((f"{len(PROBE_TEXTS)} tokenized texts", encoded))
    return probes


def _tokenize_probe_texts(directory: Path, vocab_size: int) -> dict[str, torch.Tensor] | None:
    """Tokenize PROBE_TEXTS with the directory's tokenizer, or return None when it has no usable one."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = _load_tokenizer(directory)
    if tokenizer is None:
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        logger.debug("tokenizer in %s has no pad, eos or unk token: probing with token ids only", directory)
        return None
    try:
        encoded = dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))
    except Exception as error:  # tokenizers raise many types for unusual vocabularies
        logger.debug("tokenizer in %s failed (%s): probing with token ids only", directory, error)
        return None
    input_ids = encoded.get("input_ids")
    if input_ids is None or input_ids.numel() == 0 or int(input_ids.max()) >= vocab_size:
        logger.debug("tokenizer in %s gives empty or out-of-vocabulary ids: probing with token ids only", directory)
        return None
    return encoded


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as error:  # a directory without tokenizer files raises several types
        logger.debug("no tokenizer in %s (%s): probing with token ids only", directory, error)
        return None


@torch.no_grad()
def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    output = model(**inputs)
    if getattr(output, "logits", None) is not None:
        return "logits", output.logits.float()
    return "last_hidden_state", output.last_hidden_state.float()


def verify_logits(base_dir: Path, base_config: dict, plan: FoldPlan, merged_dir: Path, merged_dtype: torch.dtype,
                  atol: float | None = None, rtol: float | None = None) -> VerificationResult:
    """Compare the merged model with the base plus the adapter in activation form, on fixed probes.

    The check passes when max|merged - reference| <= atol + rtol * max|reference| + NOISE_FACTOR *
    rounding_sensitivity, where rounding_sensitivity is how far the reference moves when every folded
    weight gets random noise of one rounding to the merged dtype (measured on this model and adapter).
    """
    tolerance = tolerance_for(merged_dtype, atol, rtol)
    reference = load_model(base_dir, base_config)
    vocab_size = reference.get_input_embeddings().num_embeddings
    probes = make_probes(base_dir, vocab_size)

    base_outputs = _run_all(reference, probes)
    wrapped = inject_adapters(reference, {task.model_module: task.adapter for task in plan.tasks}, form="activation")
    reference_outputs = _run_all(reference, probes)
    with rounding_noise(reference, wrapped, merged_dtype):
        noisy_outputs = _run_all(reference, probes)
    del reference

    merged = load_model(merged_dir, base_config)
    merged_outputs = _run_all(merged, probes)
    del merged

    compared = reference_outputs[0][0]
    max_abs = reference_max = effect = sensitivity = 0.0
    agree = total = 0
    for index, (_, inputs) in enumerate(probes):
        mask = inputs["attention_mask"].bool()
        ref_out = reference_outputs[index][1][mask]
        merged_out = merged_outputs[index][1][mask]
        max_abs = max(max_abs, (merged_out - ref_out).abs().max().item())
        reference_max = max(reference_max, ref_out.abs().max().item())
        effect = max(effect, (ref_out - base_outputs[index][1][mask]).abs().max().item())
        sensitivity = max(sensitivity, (noisy_outputs[index][1][mask] - ref_out).abs().max().item())
        if compared == "logits":
            agree += (merged_out.argmax(-1) == ref_out.argmax(-1)).sum().item()
            total += ref_out.shape[0]

    allowed = tolerance.atol + tolerance.rtol * reference_max + NOISE_FACTOR * sensitivity
    result = VerificationResult(
        compared=compared,
        merged_dtype=str(merged_dtype).removeprefix("torch."),
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        tolerance_reason=tolerance.reason,
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / reference_max if reference_max else 0.0,
        reference_max_abs=reference_max,
        rounding_sensitivity=sensitivity,
        allowed_abs_diff=allowed,
        adapter_effect_max_abs=effect,
        top1_agreement=agree / total if total else None,
        probes=[description for description, _ in probes],
        passed=max_abs <= allowed,
    )
    if effect == 0.0:
        logger.warning("the adapter does not change the outputs on the probes: it may be an identity adapter")
    logger.info("logits check %s: max abs diff %.3g, allowed %.3g", "passed" if result.passed else "FAILED",
                result.max_abs_diff, allowed)
    return result


def _run_all(model: nn.Module, probes) -> list[tuple[str, torch.Tensor]]:
    return [_run(model, inputs) for _, inputs in probes]


@contextmanager
def rounding_noise(model: nn.Module, wrapped: list[str], dtype: torch.dtype):
    """Add to each wrapped layer's output the effect of noise of one rounding to `dtype` on its folded weight.

    The noise on each element of W' (and b') is uniform in [-u, u] * |W'|, with u the unit roundoff of
    `dtype`, drawn from a generator seeded per layer so that runs repeat.
    """
    unit = unit_roundoff(dtype)
    handles = []
    for index, name in enumerate(wrapped):
        layer = model.get_submodule(name)
        handles.append(layer.register_forward_hook(partial(_add_noise, unit=unit, seed=NOISE_SEED + index)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _add_noise(layer: AdapterLayer, inputs: tuple, output: torch.Tensor, unit: float, seed: int) -> torch.Tensor:
    base = layer.base_layer
    adapter = layer.as_module_adapter()
    weight, bias = FOLD_RULES[adapter.kind](base.weight, base.bias, adapter, layer.fan_in_fan_out)
    if layer.fan_in_fan_out:
        weight = weight.T
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand(weight.shape, generator=generator) * 2 - 1) * unit * weight.abs()
    bias_noise = None
    if bias is not None:
        bias_noise = (torch.rand(bias.shape, generator=generator) * 2 - 1) * unit * bias.abs()
    x = inputs[0]
    return output + F.linear(x, noise.to(x.dtype), None if bias_noise is None else bias_noise.to(x.dtype))
