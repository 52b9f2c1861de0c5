"""`foldkit train`: train an IA3 or LoRA adapter in either form on a frozen base, data-parallel with accelerate."""

from __future__ import annotations

import difflib
import json
import math
import re
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from foldkit.adapter_writer import save_adapter
from foldkit.checkpoint import read_config
from foldkit.errors import InputError, UsageError
from foldkit.model_info import resolve_model_class
from foldkit.modules import FORMS, inject_ia3, inject_lora
from foldkit.output_dir import check_output_path
from foldkit.train_data import collate, load_examples

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
LOSS_FILE = "losses.json"
CURVE_FILE = "loss_curve.png"


@dataclass
class TrainOptions:
    method: str = "ia3"  # ia3 or lora
    form: str = "activation"  # activation or weight
    targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    rank: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    lr: float = 3e-3
    steps: int | None = 100  # optimizer steps; None trains `epochs` full passes instead
    epochs: int = 1
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_length: int = 256
    chat_template: bool = False  # format prompt/completion records with the tokenizer's chat template
    seed: int = 0
    save_every: int = 0  # optimizer steps between checkpoints; 0 saves only at the end
    resume: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    tokens: int
    seconds: float
    adapter: str
    main_process: bool = True  # False on the other processes of a data-parallel run

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(options: TrainOptions) -> None:
    if options.method not in ("ia3", "lora"):
        raise UsageError(f"invalid method {options.method!r}; choose ia3 or lora")
    if options.form not in FORMS:
        raise UsageError(f"invalid form {options.form!r}; choose one of {', '.join(FORMS)}")
    for name in ("batch_size", "grad_accum", "max_length", "epochs", "rank"):
        if getattr(options, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(options, name)}")
    if options.steps is not None and options.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {options.steps}")
    if not (options.lr > 0 and math.isfinite(options.lr)):
        raise UsageError(f"--lr must be a positive finite number, got {options.lr}")
    if not math.isfinite(options.lora_alpha):
        raise UsageError(f"--lora-alpha must be finite, got {options.lora_alpha}")
    if options.max_length < 2:
        raise UsageError(f"--max-length must be at least 2 (one input and one predicted token), got {options.max_length}")
    if options.save_every < 0:
        raise UsageError(f"--save-every must be 0 or more, got {options.save_every}")
    if not options.targets:
        raise UsageError("--targets is empty; name at least one module, such as k_proj")
    if options.method == "ia3":
        outside = [entry for entry in options.feedforward if entry not in options.targets]
        if outside:
            raise UsageError(f"--feedforward names modules that are not in --targets: {', '.join(outside)}; "
                             "PEFT requires feedforward_modules to be a subset of target_modules")


def load_base(base: Path, options: TrainOptions):
    """Load the tokenizer and the float32 model; raise before training for a sequence beyond its limit."""
    from transformers import AutoTokenizer

    config = read_config(base)
    _, model_class = resolve_model_class(config, base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise InputError(f"no usable tokenizer in {base}: {error}") from error
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if limit is not None and options.max_length > limit:
        raise InputError(f"--max-length {options.max_length} is beyond the model's limit of {limit} positions")
    try:
        model = model_class.from_pretrained(str(base), dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise InputError(f"transformers failed to load {base}: {' '.join(str(error).split())[:300]}") from error
    return tokenizer, model


def inject(model: nn.Module, options: TrainOptions) -> list[str]:
    """Freeze the base and wrap the targets; raise listing close module names when a target matches none."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for target in options.targets:
        if not any(name == target or name.endswith("." + target) for name in linear_names):
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
            close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.4) or suffixes[:8]
            raise InputError(f"target {target!r} matches no linear module; close names: {', '.join(close)}")
    if options.method == "ia3":
        return inject_ia3(model, options.targets, options.feedforward, options.form)
    return inject_lora(model, options.targets, options.rank, options.lora_alpha, options.form, options.use_rslora,
                       seed=options.seed)


def train(base: str | Path, data: str | Path, out: str | Path, options: TrainOptions | None = None) -> TrainResult:
    """Train an adapter and save it to OUT in PEFT's format, with losses.json and loss_curve.png."""
    from accelerate import Accelerator

    options = options or TrainOptions()
    check_options(options)
    base, data, out = Path(base), Path(data), Path(out)
    check_output_path(out, force=options.resume, inputs=[base])
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    tokenizer, model = load_base(base, options)
    examples = load_examples(data, tokenizer, options.max_length, options.chat_template)
    if not examples:
        raise InputError(f"training data {data} gives no example of at least 2 tokens")
    inject(model, options)

    # A seeded permutation fixed before sharding, so any number of processes gets the same global batches.
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(options.seed)).tolist()
    examples = [examples[index] for index in order]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loader = torch.utils.data.DataLoader(examples, batch_size=options.batch_size, shuffle=False,
                                         collate_fn=lambda batch: collate(batch, pad_id))
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=options.lr)
    accelerator = Accelerator(gradient_accumulation_steps=options.grad_accum, cpu=not torch.cuda.is_available())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses, step, tokens, window = [], 0, 0, []
    total_steps = options.steps or options.epochs * max(1, len(loader) // options.grad_accum)
    if options.resume:
        step, losses = _resume(out, accelerator.unwrap_model(model), optimizer, options)
        if step >= total_steps:
            raise InputError(f"--resume: the latest checkpoint is at step {step}, which is not before --steps "
                             f"{total_steps}; raise --steps to continue training")
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (options.progress and
                                                                          accelerator.is_main_process))
    start = time.perf_counter()
    model.train()
    # After --resume, skip the micro-batches that the completed steps consumed in the current pass.
    skip = (step * options.grad_accum) % max(len(loader), 1)
    while step < total_steps:
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            window.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            # The step's loss: the mean over its micro-batches and over all processes.
            losses.append(accelerator.reduce(torch.stack(window).mean(), reduction="mean").item())
            window = []
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
            if options.save_every and step % options.save_every == 0 and step < total_steps:
                _save(out / f"checkpoint-{step}", accelerator, model, optimizer, options, base, step, losses)
            if step >= total_steps:
                break
    bar.close()
    _save(out, accelerator, model, optimizer, options, base, step, losses)
    return TrainResult(losses, step, tokens, time.perf_counter() - start, str(out), accelerator.is_main_process)


def _save(directory: Path, accelerator, model, optimizer, options: TrainOptions, base: Path, step: int,
          losses: list[float]) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    save_adapter(unwrapped, directory, options.method, options.targets, options.feedforward, options.rank,
                 options.lora_alpha, options.use_rslora, str(base))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "losses": losses,
                "torch_rng": torch.get_rng_state()}, directory / STATE_FILE)
    (directory / LOSS_FILE).write_text(json.dumps(losses) + "\n", encoding="utf-8")
    _plot(losses, directory / CURVE_FILE)


def _resume(out: Path, model: nn.Module, optimizer, options: TrainOptions) -> tuple[int, list[float]]:
    """Load the latest complete checkpoint in OUT; the adapter weights come from its adapter_model.safetensors."""
    from safetensors.torch import load_file

    checkpoints = [path for path in out.glob("checkpoint-*")
                   if re.fullmatch(r"checkpoint-\d+", path.name) and (path / STATE_FILE).is_file()
                   and (path / "adapter_model.safetensors").is_file()]
    checkpoints.sort(key=lambda path: int(path.name.split("-")[1]))
    if not checkpoints:
        raise InputError(f"--resume: no complete checkpoint-STEP directory in {out}")
    latest = checkpoints[-1]
    _check_same_adapter(latest, options)
    state = torch.load(latest / STATE_FILE, weights_only=True)
    adapter = load_file(str(latest / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, tensor in adapter.items():
            module_name, _, parameter = key.removeprefix("base_model.model.").rpartition(".")
            if parameter == "ia3_l":
                modules[module_name].ia3_l.copy_(tensor.reshape(-1))
            else:
                module_name, _, matrix = module_name.rpartition(".")
                getattr(modules[module_name], matrix).copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    logger.info("resumed from %s at step %d", latest, state["step"])
    return state["step"], list(state["losses"])


def _check_same_adapter(checkpoint: Path, options: TrainOptions) -> None:
    """Raise unless the checkpoint was trained with the same method, targets and rank as requested."""
    config = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    saved = {"method": str(config.get("peft_type", "")).lower(), "targets": config.get("target_modules"),
             "rank": config.get("r", options.rank) if options.method == "lora" else options.rank}
    requested = {"method": options.method, "targets": options.targets, "rank": options.rank}
    if options.method == "ia3":
        saved["feedforward"], requested["feedforward"] = config.get("feedforward_modules"), options.feedforward
    changed = [key for key in requested if saved.get(key) != requested[key]]
    if changed:
        details = ", ".join(f"{key} {saved.get(key)} in the checkpoint but {requested[key]} now" for key in changed)
        raise InputError(f"--resume: {checkpoint} was trained with other settings ({details})")


def _plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
