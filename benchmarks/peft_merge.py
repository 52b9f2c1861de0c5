"""PEFT's merge path: load the base and the adapter, merge_and_unload, save_pretrained.

Usage: python benchmarks/peft_merge.py BASE ADAPTER OUT
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base: str, adapter: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
