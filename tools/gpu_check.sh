#!/usr/bin/env bash
# What a kernel change must pass on a GPU machine before it lands (CI has no GPU):
#   tests      the CUDA tests (the CPU ones run in CI), 14 workers      about 6 minutes on a fresh H100
#              machine, most of it builds (47, 43 of them with mods: 1808 s of compiling in all, at
#              2026-12-06); the 15 slowest tests listed at the end
#   memcheck   compute-sanitizer memcheck on tools/sanitize.py, 0 errors      about 1 minute
#   racecheck  compute-sanitizer racecheck on tools/sanitize.py, 0 hazards    about 5 minutes (--jobs: less)
#   bench      bench.py's default run for both versions, for the README's numbers
#   mods       bench.py --mods (chapter 6, the default version: 4 on an H200): FOLDER/mods.csv, for
#              notebooks/results/h200/mods.csv                                  about 5 minutes
#   combine    tools/combine_share.py: combine's share of a decode step, 32k  about 30 s
#   timeline   tools/block_timeline.py: where version 4's forward blocks spend their time besides
#              their tiles: FOLDER/block_timeline.csv, for notebooks/results/h200/   about 30 s
#   steps      tools/hopper_steps.py, chapter 4's forward steps 1-6 at the N of the committed table:
#              FOLDER/flash3_hopper_forward_steps.csv, for notebooks/results/h200/  a few minutes
#   notebook7  notebook 7 run as a program (tools/run_notebook.py: no jupyter needed); on an H200 it
#              rewrites notebooks/results/h200/gpt.csv and gpt_losses.csv       a few minutes
# Usage: bash tools/gpu_check.sh STEP... [--logs FOLDER] [--versions "1 2"] [--jobs N] (default steps: all
# four; logs: $OUT or gpu-logs; versions, for the sanitizers: all, or e.g. "4 mods:4 dropout:4" (tools/sanitize.py's
# arguments; "3 --part 1/3" a third of version 3's checks); jobs: each sanitizer's checks cut into N parts
# (sanitize.py --part K/N) run side by side on the one GPU, the sanitizers being bound by the host's cores
# (on a 16-core H100 machine, racecheck of "3" and of "4 dropout" in 4 parts each, 154 checks, took 344 s);
# mods, combine, timeline, steps and notebook7 only when named). Each step's log is FOLDER/STEP.txt (with --jobs,
# its parts one after another).
# Exits non-zero if a test or a sanitizer fails.
# One call of a lent device machine may run 10 minutes: give it the steps that fit, e.g. "tests
# memcheck" in one call and "racecheck" in the next.
set -uo pipefail
cd "$(dirname "$0")/.."
steps=() logs=${OUT:-gpu-logs} versions="" jobs=1
while [ $# -gt 0 ]; do
    case $1 in
    --logs) logs=$2; shift 2 ;;
    --versions) versions=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    *) steps+=("$1"); shift ;;
    esac
done
if ! [[ $jobs =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check: --jobs wants a whole number >= 1, not '$jobs'"
    exit 2
fi
if [ "$jobs" -gt 1 ] && [[ " $versions " == *" --part "* ]]; then
    echo "gpu_check: --jobs cuts the checks into parts itself: leave --part out of --versions"
    exit 2
fi
[ ${#steps[@]} -gt 0 ] || steps=(tests memcheck racecheck bench)
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
failed=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
for step in "${steps[@]}"; do
    echo "== $step" | tee "$logs/$step.txt"
    case $step in
    tests) python3 -m pytest -q -n 14 -k cuda --durations=15 tests 2>&1 | tee -a "$logs/$step.txt" || failed=1 ;;
    memcheck | racecheck)
        if [ "$jobs" = 1 ]; then
            compute-sanitizer --tool "$step" --error-exitcode 1 python3 tools/sanitize.py $versions 2>&1 \
                | tee -a "$logs/$step.txt" | grep -E "SUMMARY|rror" || failed=1
        else  # the parts side by side, each to a log of its own; then those logs into STEP.txt, in order
            pids=()
            for part in $(seq "$jobs"); do
                compute-sanitizer --tool "$step" --error-exitcode 1 python3 tools/sanitize.py $versions \
                    --part "$part/$jobs" > "$logs/$step.part$part.txt" 2>&1 &
                pids+=($!)
            done
            for part in $(seq "$jobs"); do
                wait "${pids[$((part - 1))]}" || { failed=1; echo "part $part/$jobs FAILED"; }
                cat "$logs/$step.part$part.txt" >> "$logs/$step.txt"
                grep -E "SUMMARY|rror|checks run" "$logs/$step.part$part.txt"
                rm "$logs/$step.part$part.txt"
            done
        fi ;;
    bench)
        python3 bench.py 2>&1 | tee -a "$logs/$step.txt"
        python3 bench.py --version 2 --no-profile 2>&1 | tee -a "$logs/$step.txt" ;;
    mods) python3 bench.py --mods --out "$logs" 2>&1 | tee -a "$logs/$step.txt" || failed=1 ;;
    combine) python3 tools/combine_share.py 2>&1 | tee -a "$logs/$step.txt" || failed=1 ;;
    timeline)
        python3 tools/block_timeline.py --csv "$logs/block_timeline.csv" 2>&1 | tee -a "$logs/$step.txt" || failed=1 ;;
    steps)
        python3 tools/hopper_steps.py --seq-len 512 1024 2048 4096 8192 16384 \
            --csv "$logs/flash3_hopper_forward_steps.csv" 2>&1 | tee -a "$logs/$step.txt" || failed=1 ;;
    notebook7)
        python3 tools/run_notebook.py notebooks/07_training_a_gpt.ipynb 2>&1 | tee -a "$logs/$step.txt" || failed=1
        cp notebooks/results/h200/gpt.csv notebooks/results/h200/gpt_losses.csv "$logs/" 2>/dev/null ;;
    *) echo "gpu_check: unknown step $step"; failed=1 ;;
    esac
done
echo "gpu_check ${steps[*]}: $([ $failed = 0 ] && echo PASSED || echo FAILED)"
exit $failed
