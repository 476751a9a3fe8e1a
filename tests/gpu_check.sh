#!/usr/bin/env bash
# What a kernel change must pass on a GPU machine before it lands (CI has no GPU):
#   1. the whole test suite, CUDA tests included;
#   2. compute-sanitizer memcheck and racecheck, 0 errors, on the kernels at partial-tile sizes;
#   3. bench.py, for the numbers in the README.
# Usage: bash tests/gpu_check.sh [log folder, default $OUT or gpu-logs]. Exits non-zero if 1 or 2 fail.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-${OUT:-gpu-logs}}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
failed=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
python3 -m pytest -q -n 8 -rs tests 2>&1 | tee "$logs/pytest.txt" || failed=1
for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 python3 tests/sanitize.py 2>&1 \
        | tee "$logs/sanitizer-$tool.txt" | grep -E "SUMMARY|rel err|rror" || failed=1
done
python3 bench.py --seq-len 64 128 512 1024 2>&1 | tee "$logs/bench.txt"
python3 bench.py --version 2 --no-profile --seq-len 64 128 512 1024 2>&1 | tee "$logs/bench-version2.txt"
echo "gpu_check: $([ $failed = 0 ] && echo PASSED || echo FAILED)"
exit $failed
