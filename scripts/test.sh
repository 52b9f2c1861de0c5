#!/usr/bin/env bash
# Install foldkit into .venv and run the whole test suite (about a minute on 2 CPU cores once installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest -q "$@"
