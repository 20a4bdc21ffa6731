#!/usr/bin/env bash
# The quality harness's long runs (issue 24): parity -> study -> grid -> news -> report, in that order, each stage
# resumable, committing results/fidelity/*.jsonl (only the results files) after each stage's runs land.
#
#   benchmarks/run_quality.sh                    # every stage in order (the grid with TASK_TRAIN as it is then)
#   benchmarks/run_quality.sh parity study       # the first half; then write the study's winner into
#                                                # xpeft/fit/recipes.py TASK_TRAIN, commit it, and:
#   benchmarks/run_quality.sh grid news report   # the second half
#   FIDELITY_FLAGS="--workers 2 --threads 1" benchmarks/run_quality.sh    # flags for every stage
#
# Killed? Run the same command again: finished runs are skipped, a failed run is tried again. Each stage's log
# goes to runs/quality/<stage>.log; `python benchmarks/fidelity.py report --plan` prints the sizes first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/fidelity
PY=${PYTHON:-python}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(parity study grid news report)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p runs/quality "$OUT"

commit() {  # the stage's results files only, whatever else is staged (git commit --only)
  local files=() f
  for f in "$OUT"/*.jsonl "$OUT"/fidelity.md "$OUT"/figure5.png "$OUT"/figure7.png; do
    [ -e "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -eq 0 ] && return 0
  git add -- "${files[@]}"
  if ! git diff --cached --quiet -- "${files[@]}"; then
    git commit -q -m "Quality harness (issue 24): the $1 stage's results (benchmarks/run_quality.sh)" -- "${files[@]}"
    echo "committed: $(git log --oneline -1)"
  fi
}

# shellcheck disable=SC2086  # FIDELITY_FLAGS is a list of flags
$PY benchmarks/fidelity.py report --plan ${FIDELITY_FLAGS:-} | grep -v '^    ' | tee runs/quality/plan.log
for stage in "${STAGES[@]}"; do
  if [ "$stage" = parity ] && ! $PY -c "from xpeft.config import TrainConfig; TrainConfig(packing=False, bf16='off')"; then
    echo "parity needs the fast fit loop (TrainConfig.packing and .bf16): merge it first" >&2
    exit 1
  fi
  echo "$(date '+%F %T') $stage: python benchmarks/fidelity.py $stage --out $OUT ${FIDELITY_FLAGS:-}"
  # shellcheck disable=SC2086
  $PY benchmarks/fidelity.py "$stage" --out "$OUT" ${FIDELITY_FLAGS:-} >"runs/quality/$stage.log" 2>&1
  commit "$stage"
done
echo "$(date '+%F %T') done: $OUT/fidelity.md"
