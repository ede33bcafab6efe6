#!/usr/bin/env bash
# Usage: benchmarks/gpu_check.sh RESULTS_DIR
#
# One script for a GPU machine that has torch and triton and nothing of ours: it
#   1. installs the wheels carried beside it (benchmarks/wheels/*.whl, or $DVSFT_WHEELS; fill it with
#      benchmarks/fetch_wheels.sh where PyPI is reachable) into a private target dir, no network;
#   2. puts this working tree on PYTHONPATH (no pip install: no build isolation, no network);
#   3. runs the CUDA tests: the op tests (tests/ops pick CUDA when present) and every test marked
#      `cuda` elsewhere, within $DVSFT_TEST_TIMEOUT s in all (default 230; xdist workers when
#      pytest-xdist is there: $DVSFT_TEST_WORKERS, default 8); first the fused tests matching
#      $DVSFT_TEST_FIRST_K (default "cuda or deterministic or chunking or compact": the GPU-only
#      tests and the staged backward, which no GPU has run yet);
#   4. runs the GPU benchmark suite (`run.py --suite gpu`), starting cells for $DVSFT_BENCH_BUDGET s
#      (default 150; 0 skips it) with a hard stop 70 s later;
#   5. runs the fused tile and row-count sweep (`fused_sweep.py`), starting cells for
#      $DVSFT_SWEEP_BUDGET s (default 50; 0 skips it) with a hard stop 80 s later; extra arguments
#      in $DVSFT_SWEEP_ARGS (e.g. "--parts scaling");
#   6. writes everything to RESULTS_DIR, 7 files, flat: gpu*.json, gpu*.md (no plots: make them
#      here with `python -m benchmarks.report RESULTS_DIR/gpu.json`), fused_sweep.json,
#      gpu_check.log (all output, pytest's PASSED lines left out), failures.log (each failed test's
#      traceback, written as it fails), tests.tsv (each test's outcome and time, likewise) and
#      gpu_check.json (what ran and how it ended).
# With the defaults the whole script stays under 10 minutes (230 + 150 + 70 + 50 + 80 s at most).
# Extra arguments for run.py: $DVSFT_BENCH_ARGS (e.g. "--quick" or "--providers dvsft_*,floor").
# The git SHA recorded in the rows: $DVSFT_GIT_SHA when the tree has no .git.
#
# Exit codes: 0 everything ran and passed, or no CUDA device (soft skip: the message says so and
# gpu_check.json has status "skipped"); 1 CUDA tests failed (benchmarks still ran); 2 usage;
# 3 the benchmark run failed or overran its limit.
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 RESULTS_DIR" >&2
    exit 2
fi
RES=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${DVSFT_WHEELS:-$ROOT/benchmarks/wheels}
TEST_TIMEOUT=${DVSFT_TEST_TIMEOUT:-230}
BUDGET=${DVSFT_BENCH_BUDGET:-150}
SWEEP_BUDGET=${DVSFT_SWEEP_BUDGET:-50}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
LOG=$RES/gpu_check.log
: >"$LOG"
START=$(date +%s)

log() { echo "gpu_check: $*" | tee -a "$LOG"; }
# the fused deterministic (staged) backward is refused on CUDA until a GPU run verifies it: the
# tests, the suite's dvsft_fused_det rows and the sweep's staged rows are that check
export DVSFT_FUSED_DETERMINISTIC=${DVSFT_FUSED_DETERMINISTIC:-1}

status() { # status STATUS REASON TESTS_RC BENCH_RC
    "$PY" - "$RES/gpu_check.json" "$1" "$2" "${3:-}" "${4:-}" "$START" "$WHEEL_LIST" <<'PYEOF'
import json, sys, time
path, status, reason, tests_rc, bench_rc, start, wheels = sys.argv[1:8]
json.dump({"status": status, "reason": reason,
           "tests_rc": int(tests_rc) if tests_rc else None,
           "bench_rc": int(bench_rc) if bench_rc else None,
           "elapsed_s": round(time.time() - float(start)),
           "wheels": [w for w in wheels.split(",") if w]}, open(path, "w"), indent=1)
PYEOF
}
WHEEL_LIST=""

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >>"$LOG" 2>&1; then
    log "no CUDA device visible to torch ($PY): nothing to check on this machine."
    log "soft skip, exit 0; run this script on a GPU machine (see benchmarks/README.md)."
    status skipped "no CUDA device visible to torch"
    exit 0
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())' 2>&1 | tee -a "$LOG"

# 1. Wheels (pure Python peers), into a private dir so the image's packages stay as they are.
SITE=$(mktemp -d /tmp/dvsft-site.XXXXXX)
shopt -s nullglob
whls=("$WHEELS"/*.whl)
if [ ${#whls[@]} -gt 0 ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${whls[@]}" >>"$LOG" 2>&1; then
        WHEEL_LIST=$(for w in "${whls[@]}"; do basename "$w"; done | paste -sd, -)
        log "installed wheels: $WHEEL_LIST"
    else
        log "WARNING: installing wheels from $WHEELS failed (see log); peers may be skipped"
    fi
else
    log "no wheels in $WHEELS: liger / cut-cross-entropy rows will say 'not installed' (benchmarks/fetch_wheels.sh)"
fi
# 2. This working tree.
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$ROOT"

# 3. CUDA tests.
tests_rc=0
if [ -d tests ]; then
    log "CUDA tests (limit ${TEST_TIMEOUT}s): GPU-only paths first (fused, compile, CUDA graphs), then the rest"
    # Kernel compilation dominates: spread the tests over worker processes when xdist is there.
    xdist=()
    "$PY" -c 'import xdist' >/dev/null 2>&1 && xdist=(-n "${DVSFT_TEST_WORKERS:-8}")
    # Each failure's traceback goes to failures.log and each outcome to tests.tsv as it happens
    # (tests/conftest.py): a run cut off by its limit still names what ran and what failed.
    export DVSFT_FAIL_LOG=$RES/failures.log DVSFT_DURATION_LOG=$RES/tests.tsv
    : >"$DVSFT_FAIL_LOG"
    : >"$DVSFT_DURATION_LOG"
    first=(tests/ops/test_fused.py tests/ops/test_compile.py)
    # run_tests LIMIT ARGS...: one pytest run, its PASSED lines kept out of the log
    run_tests() {
        local limit=$1
        shift
        timeout -k 10 "$limit" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider "$@" 2>&1 \
            | grep -v "PASSED\|Benchmarks are automatically disabled\|warner(Pytest" | tee -a "$LOG"
        local rc=${PIPESTATUS[0]}
        [ "$rc" -eq 5 ] && rc=0  # nothing collected
        [ "$rc" -ne 0 ] && [ "$tests_rc" -eq 0 ] && tests_rc=$rc
        return 0
    }
    # what waits for a GPU to be verified at all (the staged backward, CUDA graphs, the GPU tiles)
    # before the rest of the fused tests: $DVSFT_TEST_FIRST_K, a pytest -k expression
    verify=${DVSFT_TEST_FIRST_K:-cuda or deterministic or chunking or compact}
    run_tests $((TEST_TIMEOUT / 3)) "${xdist[@]}" -m "not static" -k "$verify" tests/ops/test_fused.py
    left=$((TEST_TIMEOUT / 2 - ($(date +%s) - START)))
    [ "$left" -lt 30 ] && left=30
    run_tests "$left" "${xdist[@]}" -m "not static" -k "not ($verify)" "${first[@]}" tests/loss
    left=$((TEST_TIMEOUT - ($(date +%s) - START)))
    [ "$left" -lt 30 ] && left=30
    ignore=()
    for f in "${first[@]}"; do ignore+=(--ignore="$f"); done
    run_tests "$left" "${xdist[@]}" -m "not static" "${ignore[@]}" tests/ops
    left=$((TEST_TIMEOUT - ($(date +%s) - START)))
    [ "$left" -lt 30 ] && left=30
    run_tests "$left" -m cuda --ignore=tests/ops --ignore=tests/loss tests
    [ "$tests_rc" -eq 124 ] && log "tests hit their ${TEST_TIMEOUT}s limit"
    log "tests exit code: $tests_rc"
fi

# 4. GPU suite ($DVSFT_BENCH_BUDGET=0 skips it).
bench_rc=0
if [ "$BUDGET" -gt 0 ]; then
log "GPU suite (cells start within ${BUDGET}s)"
set -f  # $DVSFT_BENCH_ARGS may hold shape patterns such as '*N16384/f1/*': no globbing
# shellcheck disable=SC2086
timeout -k 10 $((BUDGET + 70)) "$PY" benchmarks/run.py --suite gpu --out "$RES" --budget-s "$BUDGET" \
    --cell-timeout 60 --no-plots ${DVSFT_BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}
set +f
log "benchmark exit code: $bench_rc; results in $RES"
fi

# 5. Fused tiles and row counts (its rows are written as they come; a timeout keeps them).
if [ "$SWEEP_BUDGET" -gt 0 ]; then
    log "fused sweep (cells start within ${SWEEP_BUDGET}s)"
    timeout -k 10 $((SWEEP_BUDGET + 80)) "$PY" benchmarks/fused_sweep.py --out "$RES/fused_sweep.json" \
        --budget-s "$SWEEP_BUDGET" ${DVSFT_SWEEP_ARGS:-} 2>&1 | tee -a "$LOG"
    log "fused sweep exit code: ${PIPESTATUS[0]}"
fi

if [ "$bench_rc" -ne 0 ]; then
    status bench_failed "benchmark run exited with $bench_rc" "$tests_rc" "$bench_rc"
    exit 3
fi
if [ "$tests_rc" -ne 0 ]; then
    status tests_failed "CUDA tests exited with $tests_rc" "$tests_rc" "$bench_rc"
    exit 1
fi
status ok "" "$tests_rc" "$bench_rc"
exit 0
