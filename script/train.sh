#!/usr/bin/env bash
# Train DIFD on the 5 folds of one dataset and setting (method.md §3-§4; official schedule).
# Usage: bash script/train.sh [abd_mri|abd_ct|cmr] [setting1|setting2] [Sacred overrides ...]
#   e.g. bash script/train.sh abd_ct setting2 pretrained_path=/data/weights/deeplabv3_resnet101_coco-586e9e4e.pth
# Folds: FOLDS="0 1 2 3 4" (default). Each fold gets its own run folder runs/<DATASET>_setting<k>/fold<f>/;
# an interrupted fold continues with: bash script/train.sh <dataset> <setting> resume=True
# Each run validates every 2000 steps on the fold's test volumes (monitoring only; validate_every=0 turns it
# off) and redraws runs/<DATASET>_setting<k>/fold<f>/train/<id>/progress.png.
# GPUs: the folds are spread over the visible GPUs, one training process per GPU (CUDA_VISIBLE_DEVICES
# set per fold), in groups of the GPU count run in parallel; GPUS="0 1" picks them, GPUS="" (or no GPU)
# trains the folds one after another on the default device. Each parallel fold logs to
# runs/train_<dataset>_<setting>_fold<f>.log. To put several GPUs on ONE fold instead, use torchrun:
#   torchrun --nproc_per_node=4 train.py with abd_mri setting1 official_script eval_fold=0
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=script/fold_args.sh
source script/fold_args.sh
if [ -z "${GPUS+set}" ]; then
    GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)"
fi
read -r -a gpu_list <<< "$GPUS"
read -r -a fold_list <<< "$FOLDS"

if [ "${#gpu_list[@]}" -le 1 ]; then
    for fold in "${fold_list[@]}"; do
        echo "=== train $DATASET $SETTING fold $fold${gpu_list[0]:+ (GPU ${gpu_list[0]})} ==="
        if [ "${#gpu_list[@]}" -eq 1 ]; then
            CUDA_VISIBLE_DEVICES="${gpu_list[0]}" "$PYTHON" train.py with "$DATASET" "$SETTING" official_script eval_fold="$fold" "$@"
        else
            "$PYTHON" train.py with "$DATASET" "$SETTING" official_script eval_fold="$fold" "$@"
        fi
    done
    exit 0
fi

mkdir -p runs
failed=0
for ((start = 0; start < ${#fold_list[@]}; start += ${#gpu_list[@]})); do
    pids=()
    for ((k = 0; k < ${#gpu_list[@]} && start + k < ${#fold_list[@]}; k++)); do
        fold="${fold_list[start + k]}"
        log="runs/train_${DATASET}_${SETTING}_fold${fold}.log"
        echo "=== train $DATASET $SETTING fold $fold on GPU ${gpu_list[k]} (log $log) ==="
        CUDA_VISIBLE_DEVICES="${gpu_list[k]}" "$PYTHON" train.py with "$DATASET" "$SETTING" official_script \
            eval_fold="$fold" "$@" > "$log" 2>&1 &
        pids+=("$!:$fold")
    done
    for entry in "${pids[@]}"; do
        if ! wait "${entry%%:*}"; then
            echo "fold ${entry##*:} failed: see runs/train_${DATASET}_${SETTING}_fold${entry##*:}.log" >&2
            failed=1
        fi
    done
done
exit "$failed"
