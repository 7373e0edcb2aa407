#!/usr/bin/env bash
# The main job on a CPU machine: installs everything, then runs the whole notebook headless on the `cpu`
# preset (bundled teacher, stdlib corpus, offline). Writes runs/cpu/: the executed notebook, plots/, student/,
# student-ternary/ and checkpoints/. Rerunning resumes or reuses what is finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false SPOONFEED_PRESET="${SPOONFEED_PRESET:-cpu}"
out="runs/${SPOONFEED_PRESET}"
mkdir -p "$out"
start=$(date +%s)
python -m jupyter nbconvert --to notebook --execute spoon_feed.ipynb --ExecutePreprocessor.timeout=-1 \
    --output-dir "$out" --output spoon_feed.ipynb
echo "done in $(( $(date +%s) - start )) s: $out/spoon_feed.ipynb, $out/plots/, $out/student/, $out/student-ternary/"
