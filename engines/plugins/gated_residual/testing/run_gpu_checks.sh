#!/usr/bin/env bash
# Every GPU-side check of the fused hi-gate kernel in one go (run from the repository root on a CUDA machine):
#   1. plugin host harness with real enqueues (FP32/FP16/BF16) against the TensorRT-free API subset
#   2. the same harness under compute-sanitizer memcheck (if installed)
#   3. tests/test_plugin_compile.py (kernel for every target arch, C launcher, plugin host logic)
#   4. engines/plugins/gated_residual/testing/gpu_kernel_check.py: correctness vs the float64 reference + timings, JSON to $RESULTS
# Usage: bash engines/plugins/gated_residual/testing/run_gpu_checks.sh [RESULTS_DIR]   (default: bench/results)
set -uo pipefail
RESULTS=${1:-bench/results}
PY=${PYTHON:-python3}
SRC=engines/plugins/gated_residual
BUILD=$(mktemp -d /tmp/cheers_gr_gpu.XXXXXX)
mkdir -p "$RESULTS"
status=0

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
nvcc --version | tail -1
$PY -c "import sys, numpy; print('python', sys.version.split()[0], 'numpy', numpy.__version__)"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>/dev/null || echo "no torch"
$PY -c "import cupy; print('cupy', cupy.__version__)" 2>/dev/null || echo "no cupy"
CAP=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')" 2>/dev/null \
      || nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
echo "compute capability: sm_$CAP"

echo "== 1. plugin host harness (real enqueue)"
nvcc -std=c++17 -O3 -c -Xcompiler -fPIC -gencode "arch=compute_$CAP,code=sm_$CAP" -I "$SRC" \
     -o "$BUILD/kernel.o" "$SRC/gated_residual_kernel.cu" || status=1
nvcc -std=c++17 -O1 -I "$SRC/testing/trt_api_subset" -I "$SRC" -o "$BUILD/plugin_host_check" \
     "$SRC/testing/plugin_host_check.cpp" "$SRC/GatedResidualPlugin.cpp" "$BUILD/kernel.o" || status=1
"$BUILD/plugin_host_check" 2>&1 | tee "$RESULTS/plugin_host_check.log" | grep -v "^CheersGatedResidual:" || status=1

echo "== 2. compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null 2>&1; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/plugin_host_check" > "$RESULTS/memcheck.log" 2>&1
  rc=$?; tail -n 3 "$RESULTS/memcheck.log"; [ $rc -eq 0 ] || { echo "memcheck rc=$rc"; status=1; }
else
  echo "compute-sanitizer not installed: skipped"
fi

echo "== 3. pytest tests/test_plugin_compile.py"
$PY -m pytest tests/test_plugin_compile.py -q -rs -p no:cacheprovider 2>&1 | tail -n 8 || status=1

echo "== 4. engines/plugins/gated_residual/testing/gpu_kernel_check.py"
PYTHONUNBUFFERED=1 $PY engines/plugins/gated_residual/testing/gpu_kernel_check.py --backend all --out "$RESULTS/gated_residual_$(date +%F).json" \
  || status=1
rm -rf "$BUILD"
echo "run_gpu_checks: status $status"
exit $status
