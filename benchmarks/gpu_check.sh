#!/usr/bin/env bash
# One command for a lent GPU machine (H200: 16 cores, torch + CUDA 13 + nvcc, no network):
#
#   bash benchmarks/gpu_check.sh [OUTDIR]   # default: $OUT, else benchmarks/out/gpu-check
#
# 1. build the extension in place for sm_90, and check it has sm_90 CUDA kernels
# 2. the CUDA tests (pytest -m cuda)
# 3. the persistent loops' sweep (benchmarks/persistent.py): cuDNN, our generic loop and our
#    persistent loops side by side, the issue's targets first, with the cooperative design's
#    barrier and matvec probes
# 4. compute-sanitizer memcheck, then racecheck, on a small forward + backward (both persistent
#    designs included)
# 5. the benchmark (default preset, all dtypes, both TF32 settings) in the time that is left
# 6. a summary of the steps, the persistent targets and the ratio table printed last
#
# Every step has a time cap and the whole run a deadline (GPU_CHECK_BUDGET seconds, default 540),
# so it ends in about 9 minutes (give the caller's timeout 20 s more: a step may overrun by 10);
# a step that fails or times out is reported and the next one still runs. If the build fails,
# the benchmark times the baselines alone.
#
# What lands in OUTDIR: eight files, all small, since a lent machine sends back at most eight
# (the benchmarks' terminal output is not among them: check.log has it, step by step):
#   check.log  every step's command, output, exit status and duration (also nvidia-smi, versions)
#   bench.csv  bench.md  bench.png  the benchmark's results (see benchmarks/README.md)
#   tests.xml  the CUDA tests, one entry per test (JUnit XML)
#   persistent/persistent.csv  persistent.md  cuda_crossovers.json  the persistent loops'
#              sweep, and the crossover table it measured for the "auto" time loop
#
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default
# 16), GPU_CHECK_BUDGET, BENCH_ARGS (extra arguments for the benchmark, e.g. "--quick"),
# HANDLSTM_GIT_COMMIT (the commit to write into the results when the tree is a copy without
# .git, as on a lent machine), HANDLSTM_PREBUILT (a folder made by benchmarks/prebuild_device.sh:
# its extension is used instead of building when it was built for this machine's torch and
# Python and from these sources).
#
#   bash benchmarks/gpu_check.sh --build-id   # prints what an extension built here is built for

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}

# What an extension built here would be built for: $PY's torch version (with its local tag),
# Python major.minor, and a hash of the sources. benchmarks/prebuild_device.sh records it.
build_id() {
    echo "$("$PY" -c "import sys, torch; print(torch.__version__, '%d.%d' % sys.version_info[:2])")" \
        "$(find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)"
}
if [[ ${1:-} == --build-id ]]; then
    build_id
    exit 0
fi

OUTDIR=${1:-${OUT:-benchmarks/out/gpu-check}}
mkdir -p "$OUTDIR" || exit 1
OUTDIR=$(cd "$OUTDIR" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
# This script is how the CUDA kernels get verified, so it runs them (they are off by default).
export HANDLSTM_CUDA_KERNELS=1
LOG=$OUTDIR/check.log
# The benchmarks' terminal output, for the end of this script's own output; outside OUTDIR.
SCRATCH=$(mktemp -d) || exit 1
trap 'rm -rf "$SCRATCH"' EXIT
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET:-540}))
SUMMARY=()
: >"$LOG"

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME CAP_SECONDS CMD...: run CMD with its output appended to the log, under
# min(CAP, time left before the deadline); record its status for the summary.
step() {
    local name=$1 cap=$2 t rc t0
    shift 2
    t=$(left)
    ((t > cap)) && t=$cap
    if ((t < 15)); then
        SUMMARY+=("$(printf '%-10s skipped (deadline)' "$name")")
        echo "=== $name: skipped, $(left)s left before the deadline" >>"$LOG"
        return 124
    fi
    echo "=== $name (cap ${t}s): $*" >>"$LOG"
    t0=$(date +%s)
    # bash -c so that CMD may be one of the functions below (exported with export -f);
    # STEP_SECONDS tells it the time it has.
    # SIGINT first: pytest then still writes tests.xml and the benchmarks their partial results.
    STEP_SECONDS=$t timeout -s INT -k 10 "$t" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
    rc=$?
    local verdict="ok"
    ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict="FAILED (exit $rc)"
    echo "=== $name: exit $rc after $(($(date +%s) - t0))s" >>"$LOG"
    SUMMARY+=("$(printf '%-10s %-18s %4ss' "$name" "$verdict" $(($(date +%s) - t0)))")
    return "$rc"
}

env_info() {
    date -Is
    nvidia-smi || true
    command -v nvcc && nvcc --version | tail -2
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available()
      and torch.cuda.get_device_name())
EOF
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS nproc=$(nproc)"
    # What the build, the tests and the benchmarks import; a missing one explains a failure.
    for m in ninja pytest hypothesis numpy matplotlib pandas tqdm xdist; do
        "$PY" -c "import $m" 2>/dev/null && echo "python module $m: yes" \
            || echo "python module $m: MISSING"
    done
}

built_for_sm90() {
    local so
    so=$(ls handlstm_cuda/_C*.so 2>/dev/null | head -1)
    [[ -n $so ]] || { echo "no handlstm_cuda/_C*.so"; return 1; }
    "$PY" -c "import handlstm_cuda as h, sys; print('has_cuda_kernels', h.has_cuda_kernels());
sys.exit(0 if h.has_cuda_kernels() else 1)" || return 1
    if command -v cuobjdump >/dev/null; then
        cuobjdump --list-elf "$so" | sed 's/^/  /'
        cuobjdump --list-elf "$so" | grep -q sm_90
    else
        echo "cuobjdump not on PATH: the sm_90 code was not checked"
    fi
}

# The extension: the one benchmarks/prebuild_device.sh made (HANDLSTM_PREBUILT names its folder,
# carried to this machine) when it was built for this torch, Python and sources and imports
# with its CUDA kernels here; otherwise a build in place.
build_ext() {
    local pre=${HANDLSTM_PREBUILT:-} here
    if [[ -n $pre ]]; then
        here=$(build_id)
        if [[ -f $pre/built_for && $(cat "$pre/built_for") == "$here" ]] && ls "$pre"/_C*.so >/dev/null 2>&1; then
            cp "$pre"/_C*.so handlstm_cuda/
            if "$PY" -c "import handlstm_cuda as h, sys; sys.exit(not h.has_cuda_kernels())"; then
                echo "using the prebuilt extension from $pre (built for $here)"
                return 0
            fi
            echo "the prebuilt extension does not import here: building"
            rm -f handlstm_cuda/_C*.so
        else
            echo "the prebuilt extension in $pre was built for '$(cat "$pre/built_for" 2>/dev/null)'," \
                "this machine and tree have torch, Python, sources '$here': building"
        fi
    fi
    "$PY" setup.py build_ext --inplace
}

run_tests() {
    # Four workers when pytest-xdist is there (the lent machine's image has it): the CUDA tests
    # are many small launch-bound calls, so they share one GPU well.
    local par=()
    "$PY" -c "import xdist" 2>/dev/null && par=(-n 4)
    # A test hung on the GPU (a persistent kernel that never finishes) costs that test alone,
    # not the step: pytest-timeout, where the image has it, ends its worker (xdist starts
    # another).
    "$PY" -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 90 --timeout-method thread)
    # --durations: the slowest tests, to size this step's cap on the next lease.
    "$PY" -m pytest tests -m cuda -q --maxfail=5 -p no:cacheprovider "${par[@]}" \
        --durations=15 --junitxml "$OUTDIR/tests.xml"
    local rc=$?
    ((rc == 5)) && echo "no test carries the cuda marker: nothing was verified"
    return "$rc"
}

sanitize() {
    local tool=$1 cs
    cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool "$tool" --error-exitcode 3 --print-limit 30 \
        --target-processes all "$PY" -m benchmarks.sanitize_case
}

bench() {
    local impls=$1 t rc
    set -o pipefail
    t=$((STEP_SECONDS - 10))
    ((t < 26)) && t=26  # a budget of at least 1 s below
    # --budget stops starting new points (the seed and fastrnns workloads of every dtype come
    # first); the margin covers the point in flight and writing the outputs.
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.bench --device cuda --impls "$impls" --budget $((t - 25)) \
        --no-progress --out "$OUTDIR" ${BENCH_ARGS:-} | tee -i "$SCRATCH/bench.txt"
    rc=$?
    if ((rc == 2)); then
        # 'ours' was refused (message above); the baselines are still worth having.
        echo "=== 'ours' unavailable: timing the baselines only"
        # shellcheck disable=SC2086
        "$PY" -m benchmarks.bench --device cuda --impls torch,reference \
            --budget $((t - 40)) --no-progress --out "$OUTDIR" ${BENCH_ARGS:-} \
            | tee -i "$SCRATCH/bench.txt"
        return 2
    fi
    return "$rc"
}

# The persistent CUDA time loops (off by default, never run before this script) against cuDNN
# and our generic loop, in OUTDIR/persistent; --budget stops starting new points.
bench_persistent() {
    set -o pipefail
    mkdir -p "$OUTDIR/persistent"
    # (a budget of 0 still measures the first point: the seed workload)
    local b=$((STEP_SECONDS - 30))
    ((b < 0)) && b=0
    "$PY" -m benchmarks.persistent --budget "$b" --out "$OUTDIR/persistent" \
        | tee -i "$SCRATCH/sweep.txt"
}

export PY OUTDIR SCRATCH DEADLINE
export -f left build_id env_info build_ext built_for_sm90 run_tests sanitize bench bench_persistent

step env 30 env_info
if step build 240 build_ext; then
    step kernels 30 built_for_sm90
    step tests 150 run_tests
    step persistent 120 bench_persistent
    step memcheck 45 sanitize memcheck
    step racecheck 45 sanitize racecheck
    # The benchmark (our generic CUDA loop, persistent loops off, against cuDNN) with whatever
    # time is left (at most 220 s).
    step bench 220 bench ours,torch,reference
else
    echo "=== the build failed: timing the baselines only" >>"$LOG"
    step bench 300 bench torch,reference
fi

# The end of the output is what a lent machine's reply shows (its last 12,000 characters): the
# ratio table first, then the persistent targets, then the step summary last.
if [[ -s $SCRATCH/bench.txt ]]; then
    cat "$SCRATCH/bench.txt"
else
    echo "no benchmark output; see $LOG"
    tail -20 "$LOG"
fi
if [[ -s $OUTDIR/persistent/persistent.md ]]; then
    echo
    sed -n '/^## Targets/,$p' "$OUTDIR/persistent/persistent.md"
fi
{
    echo
    echo "gpu_check: $(($(date +%s) - START))s in all; logs and results in $OUTDIR"
    printf '  %s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
