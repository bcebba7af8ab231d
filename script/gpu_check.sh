#!/usr/bin/env bash
# The first minutes on a GPU as one command: bash script/gpu_check.sh [--cpu-smoke] [--out DIR]
#
# Measures, in order of value, each step under its own time limit (one hang cannot eat the rest), at most
# about 10 minutes on one GPU, and writes one report folder: summary.md (the Markdown summary) and the raw
# log of every step (docs/speed.md, "The GPU check"):
#   1. environment: GPU, driver, torch/CUDA/cuDNN/NCCL versions, the wheels installed from .whl/
#      (script/fetch_gpu_wheels.sh downloads them on a machine with the registry), missing packages;
#   2. the CUDA tests: python -m pytest -m cuda (tests/test_cuda.py);
#   3. benchmarks.speed at 256 px, fp32 and bf16, the fast model against the naive port in one process,
#      and the loader with 0, 4 and 8 workers;
#   4. a real run: train.py on CHAOST2 at 256 px for the steps that fit in about 3 minutes (from step 3's
#      ms per step), with the label-free curve and the organ validation, then test.py on its snapshot,
#      GPU utilisation sampled by nvidia-smi during both;
#   5. the grid: script/launch.py --cluster local --gpus-per-run 1 on two short runs.
# Without a GPU it says so in one line and exits 1. --cpu-smoke runs every step at toy sizes on the CPU
# (a small encoder, 32 px, 2 steps; CI runs it, tests/test_gpu_check.py): it checks the script, it
# measures nothing. Exit status: 0 when every step passed, 1 otherwise (summary.md says which failed).
#
# Environment: DIFD_DATA_ROOT (the CHAOST2 data root; default ../shared/data as utils.resolve_data_root),
# DIFD_GPU_CHECK_OUT (parent of the report folder; default gpu_check/), DIFD_GPU_CHECK_SCALE (multiplies
# every time limit; default 1).
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) smoke=1 ;;
        --out) out="${2:?--out needs a folder}"; shift ;;
        *) echo "gpu_check: unknown argument $1 (expected --cpu-smoke or --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

# The environment: the project's .venv where it exists, else the host's Python with the wheels of .whl/.
wheels_note="no .whl/ folder (not needed where every package is installed)"
if [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
elif compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/difd_gpu_site"
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl > /dev/null 2>&1; then
        wheels_note="installed into $site: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        wheels_note="FAILED to install .whl/*.whl (python3 -m pip install --no-index --target $site .whl/*.whl)"
    fi
fi
PYTHON="$(command -v python || command -v python3)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning}" PYTHONUNBUFFERED=1  # a killed step keeps its log

if [ "$smoke" = 0 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "sees none")' 2>&1 | tail -n1)); bash script/gpu_check.sh --cpu-smoke checks the script on a CPU" >&2
    exit 1
fi

out="${out:-${DIFD_GPU_CHECK_OUT:-gpu_check}/$(date -u +%Y%m%dT%H%M%SZ)$([ "$smoke" = 1 ] && echo _cpu_smoke)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
scale="${DIFD_GPU_CHECK_SCALE:-1}"
data_root="$("$PYTHON" -c 'from utils import resolve_data_root; print(resolve_data_root())' 2>/dev/null || true)"
summary="$out/summary.md"
failed=0

if [ "$smoke" = 1 ]; then
    device=cpu; size=32; bench=(--tiny --size 32 --repeats 1 --warmup 0 --eval-chunk 2 --episodes 5 --workers 0 --synthetic-loader)
    train_steps=2; validate=(validate_every=1 label_free_episodes=2 validate_cases=1)
    run_config=(debug "image_size=$size" "test_label=[2]") train_only=(max_volumes=2)
    grid_config=(debug "image_size=$size" n_steps=2 max_volumes=2 "test_label=[2]")
    gpus_per_run=0 util_sampler=""
    limits=(env=60 tests=120 bench=120 train=180 test=120 grid=240)  # hang guards on a busy CI machine
else
    device=cuda; size=256; bench=(--size 256 --repeats 20 --warmup 5 --eval-chunk 8 --episodes 300 --workers 0 4 8)
    validate=(label_free_episodes=40 validate_cases=2)
    run_config=(official_script "image_size=$size") train_only=(pretrained_weights=None num_workers=4)
    grid_config=(official_script "image_size=$size" pretrained_weights=None n_steps=50 "test_label=[2]"
        validate_every=0 save_snapshot_every=50 max_iters_per_load=50)
    gpus_per_run=1 util_sampler=nvidia-smi
    limits=(env=30 tests=90 bench=150 train=210 test=60 grid=150)
fi
limit() {  # the time limit of step $1, in seconds, times DIFD_GPU_CHECK_SCALE
    local item
    for item in "${limits[@]}"; do
        [ "${item%%=*}" != "$1" ] || "$PYTHON" -c "print(max(1, round(${item#*=} * $scale)))"
    done
}

{
    echo "# GPU check $([ "$smoke" = 1 ] && echo '(CPU smoke test: toy sizes, no measurement)')"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), device $device; raw logs beside this file."
    echo
    echo "| step | result | seconds | limit s | log |"
    echo "|---|---|---|---|---|"
} > "$summary"
details="$out/.details.md"
: > "$details"

step() {  # step NAME COMMAND...: run it under its limit, log to NAME.log, one row of the summary
    local name="$1" seconds rc result start
    shift
    local max
    max="$(limit "$name")"
    start=$SECONDS
    timeout --kill-after=10 "$max" "$@" > "$out/$name.log" 2>&1
    rc=$?
    seconds=$(( SECONDS - start ))
    case $rc in
        0) result=ok ;;
        124 | 137) result="**TIMED OUT**"; failed=1 ;;
        *) result="**FAILED** (exit $rc)"; failed=1 ;;
    esac
    echo "| $name | $result | $seconds | $max | [$name.log]($name.log) |" >> "$summary"
    echo "[gpu_check] $name: $result in $seconds s (log $out/$name.log)"
    return $rc
}
section() { printf '\n## %s\n\n```\n%s\n```\n' "$1" "$2" >> "$details"; }

# 1. The environment.
env_step() {
    echo "wheels: $wheels_note"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$PYTHON" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else 'n/a'}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
needed = {"numpy": "numpy", "scipy": "scipy", "cv2": "opencv-python-headless", "skimage": "scikit-image",
          "sacred": "sacred", "submitit": "submitit", "matplotlib": "matplotlib", "pytest": "pytest"}
missing = [pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None]
if importlib.util.find_spec("SimpleITK") is None and importlib.util.find_spec("nibabel") is None:
    missing.append("nibabel")
for pip in missing:
    print(f"missing: {pip} (fetch it with: bash script/fetch_gpu_wheels.sh on a machine with the registry, "
          f"then copy .whl/ here)")
sys.exit(1 if missing else 0)
EOF
}
export -f env_step
export PYTHON wheels_note
step env bash -c env_step
section "environment" "$(cat "$out/env.log")"

# 2. The CUDA tests (on a CPU they skip with their reason: the smoke test checks that they are collected).
step tests "$PYTHON" -m pytest -m cuda -p no:cacheprovider -q -rs -o addopts="" tests/test_cuda.py
section "CUDA tests (python -m pytest -m cuda)" "$(tail -n 12 "$out/tests.log")"

# 3. The benchmark.
step bench "$PYTHON" -m benchmarks.speed --device "$device" "${bench[@]}"
section "benchmarks.speed ${bench[*]}" "$(cat "$out/bench.log")"

# 4. A real run, then its evaluation; steps from the fast fp32 ms per step (3 minutes minus start-up).
if [ "$smoke" = 0 ]; then
    ms="$(awk '$1 == "fp32" && $2 == "fast" {print $3}' "$out/bench.log")"
    train_steps="$("$PYTHON" -c "print(max(20, min(40000, int(150000 / float('${ms:-1000}')))))")"
    validate+=("validate_every=$(( train_steps / 4 > 0 ? train_steps / 4 : 1 ))")
fi
common=(abd_mri setting1 "device=$device" "path.log_dir=$out/runs" exp_str=gpu_check)
[ -z "$data_root" ] || common+=("data_root=$data_root")
# test.py refuses train.py's keys: those go to train.py only.
train=("${common[@]}" "${run_config[@]}" "${train_only[@]}" "n_steps=$train_steps" "max_iters_per_load=$train_steps"
    "save_snapshot_every=$train_steps" "print_interval=$(( train_steps < 50 ? 1 : 25 ))" "${validate[@]}")
sampler_pid=""
if [ -n "$util_sampler" ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
        > "$out/gpu_util.csv" 2>&1 &
    sampler_pid=$!
fi
echo "train.py with ${train[*]}" > "$out/train.cmd"
step train "$PYTHON" train.py with "${train[@]}" && train_ok=1 || train_ok=0
util_train="$([ -s "$out/gpu_util.csv" ] && wc -l < "$out/gpu_util.csv" || echo 0)"
test_ok=0
if [ "$train_ok" = 1 ]; then
    step test "$PYTHON" test.py with "${common[@]}" "${run_config[@]}" && test_ok=1
else
    echo "| test | **not run** (training failed) | 0 | $(limit test) | |" >> "$summary"; failed=1
fi
[ -z "$sampler_pid" ] || kill "$sampler_pid" 2> /dev/null
train_dir="$out/runs/gpu_check/fold0/train/1"
curve="$("$PYTHON" script/plot_run.py "$train_dir" --table 2>&1 | tail -n 30)"
speed_line="$(grep -E 'steps? .*s/step|s per step|it/s' "$out/train.log" | tail -n 2)"
dice="test.py did not finish: no Dice (see test.log)"
[ "$test_ok" = 0 ] || dice="$("$PYTHON" script/summarize.py "$out/runs/gpu_check" 2>&1 | tail -n 8)"
section "train.py ($train_steps steps at $size px) then test.py" "$(printf '%s\n%s\n\n%s' "$speed_line" "$curve" "$dice")"
if [ -n "$util_sampler" ]; then
    section "GPU utilisation (nvidia-smi every 0.5 s; training then testing)" "$("$PYTHON" - "$out/gpu_util.csv" "$util_train" <<'EOF'
import sys
rows = [line.split(",") for line in open(sys.argv[1]) if line.count(",") == 2]
values = [(float(u), float(m)) for _, u, m in rows if u.strip().replace(".", "").isdigit()]
n_train = int(sys.argv[2])
for name, part in (("training", values[:n_train]), ("testing", values[n_train:])):
    if part:
        util = [u for u, _ in part]
        print(f"{name}: {len(part)} samples, utilisation mean {sum(util) / len(util):.0f} %, "
              f"max {max(util):.0f} %, memory max {max(m for _, m in part):.0f} MiB")
EOF
)"
else
    section "GPU utilisation" "not sampled (no GPU: CPU smoke test)"
fi

# 5. The grid through the launcher, two short runs on this machine.
step grid "$PYTHON" script/launch.py submit --grid "abd_mri:1,2:0" --cluster local --gpus-per-run "$gpus_per_run" \
    --wait with "${grid_config[@]}" "device=$device" "path.log_dir=$out/grid" ${data_root:+"data_root=$data_root"}
grid_rc=$?
# A launcher stopped by its limit leaves its local jobs running: end them (ids in launch.json; SIGKILL, as
# submitit takes SIGTERM for a preemption and requeues). Their train.py/test.py first.
if [ "$grid_rc" != 0 ]; then
    for state in "$out"/grid/*/*/launch.json; do
        [ -f "$state" ] || continue
        for pid in $("$PYTHON" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(s.get("pid") or "", s.get("job") or "")' "$state"); do
            pkill -9 -P "$pid" 2> /dev/null  # its train.py or test.py
            kill -9 "$pid" 2> /dev/null && echo "[gpu_check] ended grid job process $pid ($state)"
        done
    done
fi
section "grid (script/launch.py --cluster local --gpus-per-run $gpus_per_run)" "$(tail -n 6 "$out/grid.log")"

cat "$details" >> "$summary"
rm -f "$details"
echo "[gpu_check] report: $summary"
exit $failed
