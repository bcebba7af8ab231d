#!/usr/bin/env bash
# Quick start: bash script/demo.sh
#
# The whole pipeline on a CPU in minutes, on a phantom (no dataset needed): writes an MR-like abdominal
# phantom in the CHAOST2 layout (data/phantom.py) unless DIFD_DATA_ROOT points at real data, makes its 3D
# supervoxels, trains DIFD self-supervised on fold 0's training volumes, evaluates fold 0 with the protocol
# (method.md §5: Dice per organ, NIfTI predictions, overlays), and prints first the label-free curve:
# how well the run follows a support's supervoxel into query slices of volumes it never trains on
# (engine/label_free.py; the AUC of the foreground probability, chance 0.5, and the thresholded Dice), then
# the organ Dice table. Measured times and curves: docs/results.md ("The demo").
#
# Sized for the machine: on a CPU, ResNet-101 from random weights at 64 px, bf16 and 250 steps where the CPU
# has bfloat16 instructions (engine.runtime.cpu_precision), else fp32 and 60 steps; on CUDA the full configuration (official schedule, native
# 256 px, COCO DeepLabV3 weights when their file is in torch's hub folder).
#
# Environment (all optional):
#   DIFD_DATA_ROOT            use this data root (CHAOST2 layout, e.g. ../shared/data) instead of the phantom
#   DIFD_DEMO_OUT             output folder (default demo_output): data/ (phantom) and runs/
#   DIFD_DEMO_DEVICE          auto (default), cpu or cuda
#   DIFD_DEMO_STEPS           training steps (CPU with bfloat16 instructions 250, other CPUs 60; CUDA 40000)
#   DIFD_DEMO_SIZE            slice size for training and testing (CPU default 64, CUDA native)
#   DIFD_DEMO_LR              SGD learning rate (default the official 0.001)
#   DIFD_DEMO_PRECISION       auto (default: bf16 on a CPU with bfloat16 instructions, else fp32), fp32, bf16
#   DIFD_DEMO_VALIDATE_EVERY  steps between validations (CPU 50 with bf16 instructions, else 20; CUDA 2000; 0: off)
#   DIFD_DEMO_EPISODES        label-free validation episodes (default 40; 20 on a CPU without bf16 instructions)
#   DIFD_DEMO_VALIDATE_CASES  fold 0 query volumes of the organ validation during training (CPU default 0:
#                             the organ Dice comes from the evaluation at the end; CUDA 2)
#   DIFD_DEMO_CASES, DIFD_DEMO_SLICES, DIFD_DEMO_PHANTOM_SIZE, DIFD_DEMO_SEED   phantom size and seed
#   DIFD_DEMO_NSV             supervoxel min_size (default 5000 as for CHAOST2)
#   DIFD_DEMO_SKIP_SETUP=1    use the existing .venv without installing (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
start_time=$SECONDS

if [ "${DIFD_DEMO_SKIP_SETUP:-0}" = 1 ]; then
    source script/setup_env.sh activate-only
else
    source script/setup_env.sh install
fi
setup_seconds=$(( SECONDS - start_time ))

out="${DIFD_DEMO_OUT:-demo_output}"
n_sv="${DIFD_DEMO_NSV:-5000}"
mkdir -p "$out"

device="${DIFD_DEMO_DEVICE:-auto}"
if [ "$device" = auto ]; then
    device="$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
fi

# 1. Data: the phantom, or the user's CHAOST2 copy.
if [ -n "${DIFD_DATA_ROOT:-}" ]; then
    data_root="$DIFD_DATA_ROOT"
    echo "[demo] using the data root DIFD_DATA_ROOT=$data_root"
else
    data_root="$out/data"
    echo "[demo] writing the phantom dataset to $data_root"
    python -m data.phantom --out "$data_root" --n-cases "${DIFD_DEMO_CASES:-10}" \
        --n-slices "${DIFD_DEMO_SLICES:-30}" --size "${DIFD_DEMO_PHANTOM_SIZE:-256}" --seed "${DIFD_DEMO_SEED:-0}"
fi

# 2. Supervoxels (method.md §2); kept when every image already has one (e.g. the published ones).
sv_dir="$data_root/CHAOST2/supervoxels_$n_sv"
image_dir="$data_root/CHAOST2/chaos_MR_T2_normalized"
if [ ! -d "$image_dir" ]; then
    echo "[demo] no CHAOST2 images under the data root: expected $image_dir" >&2
    exit 1
fi
n_images=$(find "$image_dir" -name 'image_*.nii.gz' | wc -l)
n_sv_files=0
if [ -d "$sv_dir" ]; then
    n_sv_files=$(find "$sv_dir" -name 'superpix-MIDDLE_*.nii.gz' | wc -l)
fi
if [ -z "${DIFD_DATA_ROOT:-}" ] || [ "$n_sv_files" -lt "$n_images" ]; then
    echo "[demo] making supervoxels (min_size $n_sv) in $sv_dir"
    python data/supervoxels/generate_supervoxels.py --dataset CHAOST2 --data-root "$data_root" \
        --n-sv "$n_sv" --jobs "$(python -c 'import os; print(min(4, os.cpu_count() or 1))')"
else
    echo "[demo] using the existing supervoxels in $sv_dir"
fi

# 3. Configuration for this machine.
common=(abd_mri setting1 "data_root=$data_root" "n_sv=$n_sv" "device=$device" "path.log_dir=$out/runs")
# The label-free validation reads fold 0's volumes without their labels; the organ validation reads fold
# 0's test volumes: for monitoring only, never to pick the snapshot whose Dice is reported.
validation=("label_free_episodes=${DIFD_DEMO_EPISODES:-40}")
if [ "$device" = cpu ]; then
    # CPU: ResNet-101 from random initialisation (no pretrained weights offline) on 64 px slices, the
    # official learning rate without decay, min_size scaled with the slice area (200 px at 256 px).
    size="${DIFD_DEMO_SIZE:-64}"
    lr="${DIFD_DEMO_LR:-0.001}"
    precision="${DIFD_DEMO_PRECISION:-auto}"
    [ "$precision" != auto ] || precision="$(python -c 'from engine.runtime import cpu_precision; print(cpu_precision())')"
    # Sized for this CPU: with bfloat16 instructions (bf16 about 0.5 s a 64 px step) 250 steps validated
    # every 50 on 40 episodes; without them (fp32 about 1.3 s a step, a validation about 13 s) 60 steps
    # validated every 20 on 20 episodes: the label-free AUC rose from chance to 0.71-0.73 by step 50 and no
    # further to step 250 (docs/results.md, "The demo").
    if [ "$precision" = bf16 ] && python -c 'import sys; from engine.runtime import cpu_has_native_bf16 as f; sys.exit(0 if f() else 1)'; then
        default_steps=250 default_every=50 default_episodes=40
    else
        default_steps=60 default_every=20 default_episodes=20
    fi
    steps="${DIFD_DEMO_STEPS:-$default_steps}"
    validation=("label_free_episodes=${DIFD_DEMO_EPISODES:-$default_episodes}")
    min_size="$(python -c "from dataloaders.train_dataset import scaled_min_size; print(scaled_min_size($size))")"
    exp_str=demo_cpu
    config=("${common[@]}" "exp_str=$exp_str" "image_size=$size" "min_size=$min_size" "n_steps=$steps"
        "max_iters_per_load=$steps" "save_snapshot_every=$steps" "print_interval=$(( steps < 50 ? 1 : 25 ))"
        "optim.lr=$lr" "pretrained_weights=None" "num_workers=0" "precision=$precision" "${validation[@]}"
        "validate_every=${DIFD_DEMO_VALIDATE_EVERY:-$default_every}" "validate_cases=${DIFD_DEMO_VALIDATE_CASES:-0}")
    test_config=("${common[@]}" "exp_str=$exp_str" "image_size=$size" "precision=$precision")
else
    # CUDA: the official schedule (40000 steps, native slices); COCO DeepLabV3 weights when their file is
    # in torch's hub folder (no download here), else random initialisation.
    steps="${DIFD_DEMO_STEPS:-40000}"
    lr="${DIFD_DEMO_LR:-0.001}"
    precision="${DIFD_DEMO_PRECISION:-fp32}"
    [ "$precision" != auto ] || precision=fp32
    exp_str=demo_cuda
    config=("${common[@]}" official_script "exp_str=$exp_str" "n_steps=$steps" "optim.lr=$lr"
        "precision=$precision" "${validation[@]}" "validate_every=${DIFD_DEMO_VALIDATE_EVERY:-2000}"
        "validate_cases=${DIFD_DEMO_VALIDATE_CASES:-2}")
    if [ -n "${DIFD_DEMO_SIZE:-}" ]; then
        config+=("image_size=$DIFD_DEMO_SIZE")
    fi
    weights="$(python -c 'import torch, pathlib; print(pathlib.Path(torch.hub.get_dir()) / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth")')"
    if [ ! -f "$weights" ]; then
        echo "[demo] $weights not found: training from random initialisation (docs/training.md: pretrained weights)"
        config+=("pretrained_weights=None")
    fi
    test_config=("${common[@]}" official_script "exp_str=$exp_str" "precision=$precision")
    if [ -n "${DIFD_DEMO_SIZE:-}" ]; then
        test_config+=("image_size=$DIFD_DEMO_SIZE")
    fi
fi
run_root="$out/runs/$exp_str"
# A demo run starts from scratch: its previous run folder (snapshots, test runs) is removed.
rm -rf "$run_root"

# 4. Train and evaluate fold 0.
echo "[demo] training on $device ($precision): ${config[*]}"
python train.py with "${config[@]}"
echo "[demo] evaluating fold 0"
python test.py with "${test_config[@]}"

# 5. Report: the label-free curve first, then the organ Dice.
train_dir="$run_root/fold0/train/1"
echo
echo "[demo] label-free validation curve (held-out fold 0 volumes, no label read: AUC of p_fg, chance 0.5;"
echo "       Dice % of p_fg > 0.5 against the supervoxel; loss = smoothed total):"
python script/plot_run.py "$train_dir" --table
echo
echo "[demo] Dice per organ on the held-out fold 0 (the protocol of test.py):"
python script/summarize.py "$run_root"
if [ "$device" = cpu ]; then
    echo "[demo] Organ Dice needs general-purpose features, which ResNet-101 from random weights cannot learn in"
    echo "       $steps CPU steps: the paper starts from COCO DeepLabV3 weights and trains 40000 steps on a GPU,"
    echo "       which is what 'bash script/demo.sh' runs on a CUDA machine (the weights file in"
    echo "       torch.hub.get_dir()/checkpoints/), or per fold: python train.py with abd_mri setting1 official_script eval_fold=0"
fi
test_dir="$(dirname "$(find "$run_root/fold0/test" -name results.json -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2)")"
echo "[demo] predictions (NIfTI, query geometry): $test_dir/predictions/<ORGAN>/pred_<case>.nii.gz"
echo "[demo] overlays (green ground truth, red prediction): $test_dir/overlays/<ORGAN>/"
echo "[demo] results.json: $test_dir/results.json"
echo "[demo] picture of the training run (losses, learning rate, validation curves): $train_dir/progress.png"
echo "[demo] done in $(( SECONDS - start_time )) s ($setup_seconds s of set-up)"
