#!/usr/bin/env bash
# Train DIFD on the 5 folds of one dataset and setting (spec sections 3-4; official schedule).
# Usage: bash script/train.sh [abd_mri|abd_ct|cmr] [setting1|setting2] [Sacred overrides ...]
#   e.g. bash script/train.sh abd_ct setting2 pretrained_path=/data/weights/deeplabv3_resnet101_coco-586e9e4e.pth
# Folds: FOLDS="0 1 2 3 4" (default). Each fold gets its own run folder runs/<DATASET>_setting<k>/fold<f>/;
# an interrupted fold continues with: bash script/train.sh <dataset> <setting> resume=True
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET="${1:-abd_mri}"
SETTING="${2:-setting1}"
shift $(($# < 2 ? $# : 2))
case "$DATASET" in abd_mri|abd_ct|cmr) ;; *) echo "dataset must be abd_mri, abd_ct or cmr, got '$DATASET'" >&2; exit 2;; esac
case "$SETTING" in setting1|setting2) ;; *) echo "setting must be setting1 or setting2, got '$SETTING'" >&2; exit 2;; esac
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
FOLDS="${FOLDS:-0 1 2 3 4}"

for fold in $FOLDS; do
    echo "=== train $DATASET $SETTING fold $fold ==="
    "$PYTHON" train.py with "$DATASET" "$SETTING" official_script eval_fold="$fold" "$@"
done
