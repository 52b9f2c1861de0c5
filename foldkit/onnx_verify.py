"""Check an exported graph in ONNX Runtime against the PyTorch model it came from, on several shapes.

The reference is the plain transformers model called the usual way (2D attention mask, DynamicCache),
not the wrapper that was traced, so the check also covers foldkit's own mask building. Compared: logits
at real (non-padding) positions, present keys and values at real key positions, and encoder outputs.
Decoders with a cache also generate greedily in both runtimes; the tokens must be equal.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from foldkit.onnx_generate import greedy_generate
from foldkit.onnx_graphs import KIND_CACHE, KIND_ENCODER, KIND_LOGITS, CacheShape
from foldkit.errors import CheckpointError
from foldkit.tolerances import NOISE_FACTOR, Tolerance

logger = logging.getLogger(__name__)

SEED = 0
MIN_POSITIONS = 16  # the shortest cases need 11 positions plus a 5-token continuation
GREEDY_PROMPT = 12
GREEDY_NEW_TOKENS = 8


@dataclass
class OutputDiff:
    case: str
    output: str
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / max|reference|
    allowed_abs_diff: float  # atol + rtol * max|reference| + NOISE_FACTOR * rounding_sensitivity
    passed: bool
    rounding_sensitivity: float = 0.0  # float16 graphs: max|PyTorch float16 - PyTorch float32|


@dataclass
class GraphCheck:
    provider: str
    atol: float
    rtol: float
    diffs: list[OutputDiff] = field(default_factory=list)
    greedy: dict | None = None  # prompt shape, tokens from each runtime, equal

    @property
    def passed(self) -> bool:
        return all(diff.passed for diff in self.diffs) and (self.greedy is None or self.greedy["equal"])

    def to_dict(self) -> dict:
        return {"passed": self.passed, **asdict(self)}

    def failures(self) -> list[str]:
        lines = [f"{diff.output} on {diff.case}: max abs diff {diff.max_abs_diff:.3g} > allowed "
                 f"{diff.allowed_abs_diff:.3g}" for diff in self.diffs if not diff.passed]
        if self.greedy is not None and not self.greedy["equal"]:
            lines.append("greedy tokens differ from PyTorch's generate")
        return lines


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    tokens: int
    left_padding: tuple[int, ...] = ()  # padding tokens at the start of each row
    right_padding: tuple[int, ...] = ()
    continues: bool = False  # feed the previous case's cache as the past


def _cases(kind: str, limit: int) -> list[Case]:
    """Return the shapes to check, shortened for models with fewer than 128 positions."""
    long = max(2, min(128, limit))
    medium = max(2, min(32, limit - 5))  # leaves room for the 1 + 4 tokens that continue it
    short = min(8, medium)
    padding = max(1, medium // 4)
    if kind == KIND_ENCODER:
        return [Case(f"batch 1, {short} tokens", 1, short),
                Case(f"batch 2, {medium} tokens, left-padded", 2, medium, left_padding=(padding, 0)),
                Case(f"batch 2, {medium} tokens, right-padded", 2, medium, right_padding=(0, padding + 2)),
                Case(f"batch 2, {long} tokens", 2, long)]
    cases = [Case(f"batch 1, {short} tokens", 1, short),
             Case(f"batch 1, {long} tokens", 1, long),
             Case(f"batch 2, {medium} tokens, left-padded", 2, medium, left_padding=(padding, 0))]
    if kind == KIND_LOGITS:
        return cases + [Case(f"batch 2, {long} tokens, left-padded", 2, long, left_padding=(0, max(1, long // 10)))]
    return cases + [Case(f"batch 2, 1 token after {medium} past, left-padded", 2, 1, continues=True),
                    Case(f"batch 2, 4 tokens after {medium + 1} past, left-padded", 2, 4, continues=True)]


def position_limit(config) -> int:
    """Return how many positions the model can embed (4096 when the config has no such field)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096


def _compare(check: GraphCheck, tolerance: Tolerance, case: str, output: str, got: np.ndarray,
             reference: torch.Tensor, select: torch.Tensor | None = None,
             float32_reference: torch.Tensor | None = None) -> OutputDiff:
    """Append and return the diff of one output; `float32_reference` adds the measured rounding term."""
    dtype = reference.dtype
    reference = reference.detach().float()
    got_tensor = torch.from_numpy(np.asarray(got)).float()
    if got_tensor.shape != reference.shape:
        check.diffs.append(OutputDiff(case, output, float("inf"), float("inf"), 0.0, False))
        return check.diffs[-1]
    if select is not None:
        reference, got_tensor = reference[select], got_tensor[select]
    if not torch.isfinite(reference).all():
        raise CheckpointError(f"PyTorch's own {output} in {str(dtype).removeprefix('torch.')} is not finite on "
                              f"{case}: the model overflows in this dtype (a weight near its limit?), so there is "
                              "nothing to check the graph against")
    scale = reference.abs().max().item() if reference.numel() else 0.0
    diff = (got_tensor - reference).abs().max().item() if reference.numel() else 0.0
    sensitivity = 0.0
    if float32_reference is not None and reference.numel():
        wide = float32_reference.detach().float()
        wide = wide[select] if select is not None else wide
        sensitivity = (reference - wide).abs().max().item()
    allowed = tolerance.atol + tolerance.rtol * scale + NOISE_FACTOR * sensitivity
    passed = bool(np.isfinite(diff) and diff <= allowed)
    check.diffs.append(OutputDiff(case, output, diff, diff / scale if scale else diff, allowed, passed, sensitivity))
    return check.diffs[-1]


def _mask(case: Case, past: torch.Tensor | None) -> torch.Tensor:
    mask = torch.ones(case.batch, case.tokens, dtype=torch.long)
    for row, count in enumerate(case.left_padding):
        mask[row, :count] = 0
    for row, count in enumerate(case.right_padding):
        if count:
            mask[row, -count:] = 0
    return mask if past is None else torch.cat([past, mask], dim=1)


def _positions(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """Position of each new token: count of real tokens before it (padding gets 0, as generate does)."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -tokens:]


def _reference(model, kind: str, feeds: dict[str, torch.Tensor], past: list[torch.Tensor] | None) -> dict:
    """Run the plain transformers model the usual way; return its outputs by graph output name."""
    if kind == KIND_ENCODER:
        output = model(**feeds)
        pooled = getattr(output, "pooler_output", None)
        return {"last_hidden_state": output.last_hidden_state,
                **({"pooler_output": pooled} if pooled is not None else {})}
    if kind == KIND_LOGITS:
        return {"logits": model(**feeds, use_cache=False).logits}
    dtype = model.get_input_embeddings().weight.dtype
    past = [tensor.to(dtype) for tensor in past]
    output = model(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"],
                   position_ids=feeds["position_ids"], cache=_dynamic_cache(past, model), use_cache=True)
    present = _flatten(output.past_key_values)
    names = [f"present.{index // 2}.{'key' if index % 2 == 0 else 'value'}" for index in range(len(present))]
    return {"logits": output.logits, **dict(zip(names, present))}


@torch.no_grad()
def check_graph(session, model: torch.nn.Module, kind: str, tolerance: Tolerance, provider: str,
                cache: CacheShape | None = None, float32_model: torch.nn.Module | None = None) -> GraphCheck:
    """Run every case in ONNX Runtime and in PyTorch and compare each output against `tolerance`.

    For a float16 graph pass `float32_model`, the same weights in float32. Each output's allowed
    difference then grows by NOISE_FACTOR times how far PyTorch's own float16 result is from float32.
    """
    check = GraphCheck(provider, tolerance.atol, tolerance.rtol)
    generator = torch.Generator().manual_seed(SEED)
    vocab = model.config.vocab_size
    names = {node.name for node in session.get_inputs()}
    outputs = [node.name for node in session.get_outputs()]
    previous_mask, previous_cache = None, None
    for case in _cases(kind, position_limit(model.config)):
        input_ids = torch.randint(0, vocab, (case.batch, case.tokens), generator=generator)
        mask = _mask(case, previous_mask if case.continues else None)
        logger.debug("checking %s", case.name)
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        past = None
        if kind == KIND_ENCODER:
            if "token_type_ids" in names:
                feeds["token_type_ids"] = torch.zeros_like(input_ids)
        else:
            feeds["position_ids"] = _positions(mask, case.tokens)
        if kind == KIND_CACHE:
            past = _past_tensors(previous_cache if case.continues else None, cache, case.batch, model)
            for index, tensor in enumerate(past):
                feeds[f"past_key_values.{index // 2}.{'key' if index % 2 == 0 else 'value'}"] = tensor
        reference = _reference(model, kind, feeds, past)
        wide = _reference(float32_model, kind, feeds, past) if float32_model is not None else {}
        got = dict(zip(outputs, session.run(outputs, _numpy(feeds))))
        real = mask[:, -case.tokens:].bool()
        for name in outputs:
            if name.startswith("present."):
                continue
            # Decoders: padding positions are garbage in both runtimes, so only real tokens count.
            select = None if kind == KIND_ENCODER else real
            _compare(check, tolerance, case.name, name, got[name], reference[name], select, wide.get(name))
        present = [name for name in outputs if name.startswith("present.")]
        if present:
            # One row for all present tensors: the first that failed, else the one closest to its allowance.
            diffs = []
            for name in present:
                # batch x heads x length x head_dim -> the real key positions of every head.
                select = mask.bool()[:, None, :].expand(-1, reference[name].shape[1], -1)
                diffs.append(_compare(check, tolerance, case.name, name, got[name], reference[name], select,
                                      wide.get(name)))
                check.diffs.pop()
            failed = [diff for diff in diffs if not diff.passed]
            if failed:
                worst = failed[0]
                worst.output = f"present ({len(failed)} of {len(present)} failed, first: {worst.output})"
            else:
                worst = max(diffs, key=lambda diff: diff.max_abs_diff - diff.allowed_abs_diff)
                worst.output = f"present (worst of {len(present)}: {worst.output})"
            check.diffs.append(worst)
            previous_mask, previous_cache = mask, [reference[name] for name in present]
    if kind == KIND_CACHE:
        check.greedy = _check_greedy(session, model, cache, generator)
    return check


def _numpy(feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in feeds.items()}


def _flatten(cache) -> list[torch.Tensor]:
    tensors = []
    for layer in cache.layers:
        tensors += [layer.keys, layer.values]
    return tensors


def _past_tensors(past: list[torch.Tensor] | None, cache: CacheShape, batch: int, model) -> list[torch.Tensor]:
    if past is not None:
        return [tensor.clone() for tensor in past]
    dtype = model.get_input_embeddings().weight.dtype
    return [torch.zeros(batch, cache.heads, 0, cache.head_dim, dtype=dtype) for _ in range(2 * cache.layers)]


def _dynamic_cache(tensors: list[torch.Tensor], model) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if tensors[0].shape[2]:
        for layer in range(len(tensors) // 2):
            cache.update(tensors[2 * layer].clone(), tensors[2 * layer + 1].clone(), layer)
    return cache


def _check_greedy(session, model, cache: CacheShape, generator: torch.Generator) -> dict:
    """Generate greedily from a left-padded batch in both runtimes; the tokens must be equal."""
    limit = position_limit(model.config)
    prompt = max(2, min(GREEDY_PROMPT, limit - GREEDY_NEW_TOKENS))
    new_tokens = max(1, min(GREEDY_NEW_TOKENS, limit - prompt))
    input_ids = torch.randint(0, model.config.vocab_size, (2, prompt), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[0, :prompt // 3] = 0
    eos, pad = generation_ids(model)
    reference = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                               do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
    reference = reference[:, prompt:].numpy()
    got = greedy_generate(session, input_ids.numpy(), mask.numpy(), new_tokens, eos, pad, cache)
    # generate stops early when every row has ended, and the ONNX loop has only padding after that point.
    got = got[:, :reference.shape[1]]
    return {"prompt_shape": list(input_ids.shape), "new_tokens": new_tokens,
            "pytorch": reference.tolist(), "onnxruntime": got.tolist(), "equal": bool(np.array_equal(got, reference))}


def generation_ids(model) -> tuple[list[int] | None, int]:
    """Return (eos ids, pad id) as generate would use them for this model."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        eos = [eos]
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, pad
