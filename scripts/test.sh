#!/usr/bin/env bash
# Installs everything, then runs the unit tests and the notebook in smoke mode (offline, bundled teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers (pytest-xdist), one torch thread each: most tests are tiny models bound by Python, not by matmuls.
# The notebook runs in the same session (nbmake; the smoke preset: tests/nbmake_smoke.py), listed first so that one worker
# starts it while the other works through tests/, instead of after them
python -m pytest -q -p no:benchmark -p tests.nbmake_smoke -n 2 --dist loadgroup --nbmake --nbmake-timeout=900 spoon_feed.ipynb tests
