"""Greedy-decode a few tokens from a model directory, and print the new text.

Usage:
    python examples/generate.py MODEL_DIR --prompt "What is the capital of France?" --max-new-tokens 20

The prompt goes through the tokenizer's chat template when the tokenizer has one. A directory with
model.onnx (from foldkit export) runs in ONNX Runtime with foldkit's greedy loop; any other runs in
transformers. Loading uses only the directory's own files, so it also shows that a merged model is a
plain transformers model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 20, dtype: str | None = None) -> str:
    """Return the text that greedy decoding appends to PROMPT, without special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # In the dtype stored in config.json unless `dtype` is given.
    model = AutoModelForCausalLM.from_pretrained(model_dir, **({"dtype": getattr(torch, dtype)} if dtype else {}))
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


def generate_onnx(model_dir: Path, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy decoding with the exported graph in ONNX Runtime; same prompt handling as generate()."""
    import json

    from transformers import AutoTokenizer

    from foldkit.onnx_generate import greedy_generate
    from foldkit.onnx_runtime import open_session

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="np", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="np")
    session = open_session(model_dir / "model.onnx", "CPUExecutionProvider")
    generation = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").is_file() else {}
    eos = generation.get("eos_token_id", tokenizer.eos_token_id)
    eos = [eos] if isinstance(eos, int) else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = greedy_generate(session, inputs["input_ids"], inputs["attention_mask"], max_new_tokens, eos, pad)
    return tokenizer.decode(tokens[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greedy-decode from a Hugging Face causal LM directory.")
    parser.add_argument("model_dir", type=Path, help="Model directory with config.json, weights and tokenizer files.")
    parser.add_argument("--prompt", required=True, help="User message; wrapped in the chat template if the tokenizer has one.")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="Number of tokens to generate at most (default: 20).")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="Run transformers in this dtype (default: as stored). An ONNX graph runs in its own dtype.")
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("--prompt is empty; pass the text to continue")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not (args.model_dir / "config.json").is_file():
        print(f"Error: {args.model_dir} has no config.json; pass a Hugging Face model directory", file=sys.stderr)
        return 1

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if (args.model_dir / "model.onnx").is_file():
        try:
            print(generate_onnx(args.model_dir, args.prompt, args.max_new_tokens))
        except ValueError as error:  # a graph without a cache: an encoder, or a --no-cache export
            print(f"Error: {args.model_dir / 'model.onnx'}: {error}", file=sys.stderr)
            return 1
    else:
        print(generate(args.model_dir, args.prompt, args.max_new_tokens, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
