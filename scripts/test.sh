#!/usr/bin/env bash
# Installs everything, then runs the unit tests and the notebook in smoke mode (offline, bundled teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers (pytest-xdist), one torch thread each: most tests are tiny models bound by Python, not by matmuls
python -m pytest -q -p no:benchmark -n 2 --dist loadgroup tests
SPOONFEED_PRESET=smoke python -m pytest -q --nbmake --nbmake-timeout=900 spoon_feed.ipynb
