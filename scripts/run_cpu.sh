#!/usr/bin/env bash
# The main job on a CPU machine: installs everything, then runs the whole notebook headless through papermill
# on the `cpu` preset (bundled teacher, stdlib corpus, offline), showing each cell's title, the phase bars and
# the printed results as they come. Writes the executed notebook to runs/<preset>/, and the run's files to its
# RUN_DIR (runs/<preset>/ unless -p RUN_DIR says otherwise): plots/, student/, student-ternary/, student-hf/,
# student.gguf and checkpoints/. Rerunning resumes or reuses what is finished. The closing line names the
# notebook and every one of these the run wrote, in the RUN_DIR the run used.
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
# RUN_DIR as the run used it: the effective configuration that cell 2 printed
python - "$out/spoon_feed.ipynb" "$(( $(date +%s) - start ))" <<'EOF'
import ast, json, os, re, sys
nb, seconds = sys.argv[1:]
text = "".join("".join(o.get("text", "")) for c in json.load(open(nb))["cells"] for o in c.get("outputs", []))
run_dir = ast.literal_eval(re.search(r"^  run_dir += (.*)$", text, re.M).group(1))
forms = [os.path.join(run_dir, f) for f in ("plots/", "student/", "student-ternary/", "student-hf/", "student.gguf")]
print(f"done in {seconds} s: " + ", ".join([nb] + [f for f in forms if os.path.exists(f)]))
EOF
