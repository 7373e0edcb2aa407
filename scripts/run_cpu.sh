#!/usr/bin/env bash
# The main job on a CPU machine: installs everything, then runs the whole notebook headless through papermill
# on the `cpu` preset (bundled teacher, stdlib corpus, offline), showing each cell's title, the phase bars and
# the printed results as they come. Writes runs/<preset>/: the executed notebook, plots/, student/,
# student-ternary/ and checkpoints/. Rerunning resumes or reuses what is finished.
#
#   bash scripts/run_cpu.sh                          # the cpu preset (or SPOONFEED_PRESET from the environment)
#   bash scripts/run_cpu.sh -p SEED 1                # any papermill option; -p NAME value sets a form setting
#   bash scripts/run_cpu.sh -p PRESET smoke          # the CI-sized run, into runs/smoke/
#
# A failing cell is named with its traceback, and the exit status is 1. SPOONFEED_SETUP=0 skips the install.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ "${SPOONFEED_SETUP:-1}" == 0 ]] || bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
preset="${SPOONFEED_PRESET:-cpu}"
args=("$@")
for ((i = 0; i + 2 < ${#args[@]}; i++)); do  # a `-p PRESET name` among the arguments picks the folder
    if [[ "${args[i]}" =~ ^(-p|--parameters)$ && "${args[i + 1]}" == PRESET ]]; then preset="${args[i + 2]}"; fi
done
out="runs/${preset}"
mkdir -p "$out"
start=$(date +%s)
python scripts/run_notebook.py spoon_feed.ipynb "$out/spoon_feed.ipynb" --no-progress-bar -p PRESET "$preset" "$@"
echo "done in $(( $(date +%s) - start )) s: $out/spoon_feed.ipynb, $out/plots/, $out/student/, $out/student-ternary/"
