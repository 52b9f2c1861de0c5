"""Greedy-decode a few tokens from a model directory with transformers alone, and print the new text.

Usage:
    python examples/generate.py MODEL_DIR --prompt "What is the capital of France?" --max-new-tokens 20

The prompt goes through the tokenizer's chat template when the tokenizer has one. Loading uses only
the directory's own files, so it also shows that a merged model is a plain transformers model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 20) -> str:
    """Return the text that greedy decoding appends to PROMPT, without special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # in the dtype stored in config.json
    model.eval()

    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")

    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                temperature=None, top_p=None, top_k=None,
                                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                else tokenizer.eos_token_id)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy-decode from a Hugging Face causal LM directory.")
    parser.add_argument("model_dir", type=Path, help="Model directory with config.json, weights and tokenizer files.")
    parser.add_argument("--prompt", required=True, help="User message; wrapped in the chat template if the tokenizer has one.")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="Number of tokens to generate at most (default: 20).")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (args.model_dir / "config.json").is_file():
        print(f"Error: {args.model_dir} has no config.json; pass a Hugging Face model directory", file=sys.stderr)
        return 1

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(generate(args.model_dir, args.prompt, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
