#!/usr/bin/env bash
# Every GPU check and benchmark of the GPU fast path (torch backend: static cache, CUDA graphs, torch.compile, fused
# gate) and of the energy readers, in one run of at most TOTAL_S seconds (default 480 = 8 minutes) on one H100.
# Run from the repository root on a CUDA machine, with a python3 that has CUDA torch:
#
#   1. python -m cheers_deploy.bench.gpu_step: the official architecture (random weights, bf16) at 512 px, 80 steps,
#      CFG 9.5: naive -> eager -> +static_cache -> +batched_cfg -> +device_rope -> +cuda_graphs -> +compile ->
#      +fused_gate (-> compile_ro), with warm-up, peak GPU memory and NVML energy (--energy) per row
#      -> gpu_step.json
#   2. a second process with the same TORCHINDUCTOR_CACHE_DIR: the +compile row's warm-up with inductor's on-disk
#      cache filled by step 1 (what a restarted service pays) -> gpu_step_restart.json
#   3. pytest -m gpu over tests/: CUDA graphs replay the eager results, no device sync inside the Euler loop, compile
#      inside the graphs, the bench's tiny CUDA run, the device-memory layer
#   4. the gated-residual kernel checks (engines/plugins/gated_residual/testing/run_gpu_checks.sh), time allowing
#      -> gated_residual/
#   summary.json: device, date, command, versions, each step's exit code and seconds; run_gpu_checks.log: all output
#
# Usage: bash bench/run_gpu_checks.sh [RESULTS_DIR]    (default: $OUT when set, else bench/results/gpu_<date>)
# Dry run of the plumbing on a CPU: PRESET=tiny RESOLUTION=32 STEPS=2 TOTAL_S=240 bash bench/run_gpu_checks.sh DIR
# At most 7 files are written (the device tool returns 8), none deeper than RESULTS_DIR/gated_residual/.
# Energy (NVML) needs nvidia-ml-py; a machine without network gets it from a wheel carried along:
#   pip download nvidia-ml-py --no-deps -d .devcarry      (then carry .devcarry to the GPU machine)
set -uo pipefail
CMDLINE="bash $0 $*"
RESULTS=${1:-${OUT:-bench/results/gpu_$(date +%F)}}
TOTAL_S=${TOTAL_S:-480}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
export PY RESULTS PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/cheers_inductor_cache}
START=$SECONDS
STEPS_FILE=$(mktemp /tmp/cheers_gpu_steps.XXXXXX)
exec > >(tee "$RESULTS/run_gpu_checks.log") 2>&1

left() { echo $((TOTAL_S - (SECONDS - START))); }

summary() {   # rewritten after every step: a run cut short still says what ran
  "$PY" - "$RESULTS/summary.json" "$STEPS_FILE" "$CMDLINE" <<'EOF'
import datetime, json, platform, subprocess, sys
out, steps_file, command = sys.argv[1], sys.argv[2], sys.argv[3]
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"
info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command.strip(),
        "python": platform.python_version(), "host": platform.node(),
        "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader"),
        "nvcc": sh("nvcc --version | tail -1")}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    import triton
    info["triton"] = triton.__version__
except Exception as exc:  # noqa: BLE001
    info["import_error"] = repr(exc)
steps = []
for line in open(steps_file):
    name, rc, secs = line.split()
    steps.append({"step": name, "exit_code": None if rc == "skipped" else int(rc), "status":
                  "skipped" if rc == "skipped" else ("ok" if rc == "0" else ("timeout" if rc == "124" else "failed")),
                  "seconds": int(secs)})
info["steps"] = steps
try:
    from cheers_deploy.bench.reproducibility import reproducibility
    info["reproducibility_now"] = reproducibility()
except Exception as exc:  # noqa: BLE001
    info["reproducibility_now"] = f"unavailable: {exc!r}"
info["no_gpu_numbers_invented"] = "every figure comes from the files beside this one"
json.dump(info, open(out, "w"), indent=1)
EOF
}

run_step() {  # run_step NAME MAX_S MIN_S FUNCTION [ARGS]: timeout min(MAX_S, time left); skipped below MIN_S
  local name=$1 max=$2 min=$3 l t t0 rc
  shift 3
  l=$(left)
  t=$((l < max ? l : max))
  if [ "$t" -lt "$min" ]; then
    echo "== $name: skipped (${l} s left)"
    echo "$name skipped 0" >> "$STEPS_FILE"
  else
    echo "== $name (limit ${t} s, $(date +%T))"
    t0=$SECONDS
    STEP_LIMIT=$t timeout -k 15 "$t" bash -c '"$@"' _ "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    echo "$name $rc $((SECONDS - t0))" >> "$STEPS_FILE"
  fi
  summary >/dev/null 2>&1 || echo "summary.json not written"
}

if ! "$PY" -c "import pynvml" 2>/dev/null; then          # pure Python: unpack the carried wheel onto PYTHONPATH
  WHL=$(ls .devcarry/nvidia_ml_py-*.whl 2>/dev/null | tail -1)
  if [ -n "$WHL" ] && "$PY" -m zipfile -e "$WHL" /tmp/cheers_pynvml; then
    export PYTHONPATH="/tmp/cheers_pynvml:$PYTHONPATH"
    echo "pynvml from $WHL"
  else
    echo "no pynvml: energy and GPU clocks will be 'unavailable'"
  fi
fi

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
echo "results: $RESULTS   inductor cache: $TORCHINDUCTOR_CACHE_DIR   budget: ${TOTAL_S} s"

gpu_step() {  # the benchmark within the step's limit (STEP_LIMIT), leaving 20 s to write and exit
  "$PY" -m cheers_deploy.bench.gpu_step --preset "${PRESET:-cheers-official}" --resolution "${RESOLUTION:-512}" \
    --steps "${STEPS:-80}" --energy --budget-s $((STEP_LIMIT - 20)) "$@"
}
restart() {
  STEPS=4 gpu_step --variants +compile --compile-reserve-s 0 --out "$RESULTS/gpu_step_restart.json"
}
pytest_gpu() {
  "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider --continue-on-collection-errors
}
gated_residual() {
  mkdir -p "$RESULTS/gated_residual"
  PYTHON="$PY" bash engines/plugins/gated_residual/testing/run_gpu_checks.sh "$RESULTS/gated_residual"
}

export -f gpu_step restart pytest_gpu gated_residual

run_step gpu_step 300 120 gpu_step --out "$RESULTS/gpu_step.json"
run_step pytest_gpu 130 60 pytest_gpu
run_step gpu_step_restart 70 45 restart
run_step gated_residual 120 60 gated_residual
summary || echo "summary.json not written"
status=0
while read -r name rc secs; do
  [ "$rc" = 0 ] || [ "$rc" = skipped ] || { echo "FAILED: $name (exit $rc)"; status=1; }
done < "$STEPS_FILE"
rm -f "$STEPS_FILE"
echo "== run_gpu_checks: status $status after $((SECONDS - START)) s; files:"
ls -la "$RESULTS" "$RESULTS/gated_residual" 2>/dev/null
exit $status
