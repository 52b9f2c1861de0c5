"""Read training data for `foldkit train`: plain text, or JSONL with text or prompt/completion fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from foldkit.errors import InputError

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def load_examples(path: Path, tokenizer, max_length: int, chat_template: bool = False) -> list[Example]:
    """Tokenize DATA into examples of at most max_length tokens.

    A .jsonl file (or one whose first character is "{") contains one JSON object a line, with a `text`
    field, or `prompt` and `completion` fields (the loss covers the completion only). Any other file
    is plain text, tokenized whole and cut into blocks of max_length tokens. With chat_template, each
    prompt becomes a user turn formatted by the tokenizer's chat template, ending in the assistant's
    turn header, so an instruction-tuned model learns its replies in its own format.
    """
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise InputError("--chat-template needs a tokenizer with a chat template, and this one has none")
    if not path.is_file():
        raise InputError(f"training data not found: {path}")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"failed to read training data {path}: {error}") from error
    if not content.strip():
        raise InputError(f"training data {path} is empty")
    if path.suffix == ".jsonl" or content.lstrip().startswith("{"):
        return _jsonl_examples(path, content, tokenizer, max_length, chat_template)
    return _text_examples(content, tokenizer, max_length)


def _text_examples(content: str, tokenizer, max_length: int) -> list[Example]:
    ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    examples = []
    for start in range(0, len(ids), max_length):
        block = ids[start:start + max_length]
        if len(block) >= 2:
            examples.append(Example(block, list(block)))
    return examples


def _jsonl_examples(path: Path, content: str, tokenizer, max_length: int, chat_template: bool) -> list[Example]:
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"invalid JSON on line {number} of {path}: {error.msg}") from error
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            ids = (tokenizer(record["text"], add_special_tokens=False)["input_ids"] + eos)[:max_length]
            examples.append(Example(ids, list(ids)))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            prompt = _prompt_ids(tokenizer, record["prompt"], chat_template)
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + eos
            if len(prompt) >= max_length:
                raise InputError(f"line {number} of {path}: the prompt has {len(prompt)} tokens, so no completion "
                                 f"token fits in --max-length {max_length}")
            ids = (prompt + completion)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
            examples.append(Example(ids, labels))
        else:
            raise InputError(f"line {number} of {path} has neither a string text field nor string prompt and "
                             "completion fields")
    if not examples:
        raise InputError(f"training data {path} contains no records")
    return examples


def _prompt_ids(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    if not chat_template:
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label IGNORE_INDEX."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
