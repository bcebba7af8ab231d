#!/usr/bin/env bash
# Train and evaluate DIFD on the 5 folds of one dataset and setting on this machine (method.md §3-§5;
# official schedule), through the grid launcher on submitit's local executor (script/launch.py, docs/cluster.md).
# Usage: bash script/train.sh [abd_mri|abd_ct|cmr] [setting1|setting2] [Sacred overrides ...]
#   e.g. bash script/train.sh abd_ct setting2 pretrained_path=/data/weights/deeplabv3_resnet101_coco-586e9e4e.pth
# Folds: FOLDS="0 1 2 3 4" (default). Each fold trains in runs/<DATASET>_setting<k>/fold<f>/ with resume=True
# (an interrupted fold continues where it stopped when the command runs again; a finished one is skipped),
# then test.py evaluates its final snapshot. The script waits for the folds and exits non-zero if one failed;
# `python script/launch.py status runs` shows them meanwhile, `bash script/evaluate.sh` re-evaluates and
# writes the table. Each run validates every 2000 steps on the fold's test volumes (monitoring only;
# validate_every=0 turns it off).
# GPUs: one fold per visible GPU, the folds dealt onto the GPUs in order (CUDA_VISIBLE_DEVICES picks them;
# GPUS="0 1" is the same, GPUS="" hides them); without a GPU the folds run one after another on the CPU.
# To put several GPUs on ONE fold (torchrun, DDP): GPUS_PER_RUN=4.
# Another method (docs/methods.md): METHOD=<name> (run folders runs/<name>_<DATASET>_setting<k>/), and for
# a method of your own PLUGIN=my_method.py (the launcher's --method and --plugin).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=script/fold_args.sh
source script/fold_args.sh
if [ -n "${GPUS+set}" ]; then
    export CUDA_VISIBLE_DEVICES="${GPUS// /,}"
fi
gpus_per_run="${GPUS_PER_RUN:-$("$PYTHON" -c 'import torch; print(min(1, torch.cuda.device_count()))')}"
exec "$PYTHON" script/launch.py submit --grid "$DATASET:${SETTING#setting}:${FOLDS// /,}" --cluster local \
    --method "${METHOD:-difd}" ${PLUGIN:+--plugin "$PLUGIN"} --gpus-per-run "$gpus_per_run" --wait with "$@"
