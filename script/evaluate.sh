#!/usr/bin/env bash
# Evaluate the 5 folds of one dataset and setting (method.md §5), then write the per-organ Dice table.
# Usage: bash script/evaluate.sh [abd_mri|abd_ct|cmr] [setting1|setting2] [Sacred overrides ...]
# Each fold is evaluated with the newest snapshot of its run folder runs/<DATASET>_setting<k>/fold<f>/snapshots/
# (test.py finds it; a fold without snapshot is an error). Results: fold<f>/test/<id>/results.json, and the
# table runs/<DATASET>_setting<k>/summary.{md,csv}. A fold whose evaluation fails does not stop the others:
# the table flags it (summarize.py reads each run's Sacred status) and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=script/fold_args.sh
source script/fold_args.sh

failed=()
for fold in $FOLDS; do
    echo "=== evaluate $DATASET $SETTING fold $fold ==="
    "$PYTHON" test.py with "$DATASET" "$SETTING" official_script eval_fold="$fold" "$@" || failed+=("$fold")
done
RUN_ROOT="$("$PYTHON" -m config print_run_root with "$DATASET" "$SETTING" official_script "$@" 2>/dev/null)"
"$PYTHON" script/summarize.py "$RUN_ROOT"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "evaluation failed for fold(s) ${failed[*]}: see the messages above" >&2
    exit 1
fi
