#!/usr/bin/env bash
# One-shot check of the whole project on a CUDA machine, in under 8 minutes, every step bounded by `timeout`:
#   environment -> carried wheels (optuna) -> imports -> CUDA latency table (profile, validate) -> target ->
#   training throughput (supernet vs plain) -> search.py end to end -> pack -> results.json
#
#   OUT=/some/empty/dir bash benchmarks/cuda_check.sh                   # on the GPU machine, from the repo root
#   OUT=/tmp/cudacheck_out CUDA_CHECK_DEVICE=cpu SMALL=1 PYTHON=.venv/bin/python \
#       taskset -c 1 bash benchmarks/cuda_check.sh                      # the CPU dry run: same steps, tiny sizes
#
# Needs, in the repo root: .whl/ (optuna and the wheels it needs that the machine lacks) and .data/fashion-mnist/
# (the four IDX .gz files); both are ignored by git (.git/info/exclude) and travel as `carry`.
# What comes back, in $OUT (5 files): log.txt (every step's full output), cuda_lut.json (the latency table),
# cuda_validation.md (its held-out validation), results.json (every step's status, time and figures),
# search_run.tar.gz (search.py's run directory, the validation JSON/PNG, the throughput table, env and config).
# A failed or timed-out step is recorded and the script goes on; it exits 0 when every step passed, else 1.

# shellcheck disable=SC2317  # the step_* functions are called indirectly, as "step_$2"
set -u
: "${OUT:?set OUT to an empty folder for the results}"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$ROOT/benchmarks/cuda_check.sh
export ROOT
export PY=${PYTHON:-python3}
export DEVICE=${CUDA_CHECK_DEVICE:-cuda}
export SMALL=${SMALL:-0}
export PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=5          # tqdm bars go to the log: one refresh per 5 s is enough
export MPLBACKEND=Agg

if [[ ${1:-} != __step ]]; then    # the top-level run (a step re-enters this file as `__step NAME`)
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/cuda_check.XXXXXX")
    export OUT WORK
fi
export LOG=$OUT/log.txt
export LUT=$WORK/cuda_lut.json
export SITE=$WORK/site
export SPACE=experiments/spaces/fashion_mnist.yaml

# Sizes: the CUDA ones are the real check; SMALL shrinks them so the CPU dry run takes a few minutes on one core.
if [[ $SMALL == 1 ]]; then
    export BUDGET_S=${CUDA_CHECK_BUDGET_S:-600}
    export PROFILE_FLAGS="--rounds 1 --block-ms 2 --group 16"
    export VALIDATE_N=6 VALIDATE_FLAGS="--rounds 2 --block-ms 5"
    export THROUGHPUT_FLAGS="--batch-size 16 --steps 1 --repeats 1"
    export SEARCH_FLAGS="--trials 4 --threads 1"
    export SEARCH_MAX_S=420 TARGET_FALLBACK_MS=10
else
    export BUDGET_S=${CUDA_CHECK_BUDGET_S:-440}   # + packing and the kill grace: under 8 minutes in all
    export PROFILE_FLAGS="--rounds 5 --block-ms 30 --group 16"   # latency_lut's defaults
    export VALIDATE_N=50 VALIDATE_FLAGS="--rounds 6 --block-ms 50"  # 50 archs, as BENCHMARKS.md's CPU tables
    export THROUGHPUT_FLAGS="--batch-size 128 --steps 20 --repeats 5"
    export SEARCH_FLAGS=""
    export SEARCH_MAX_S=300 TARGET_FALLBACK_MS=5
fi
RESERVE_S=30        # kept for packing and results.json at the end
SEARCH_MIN_S=200    # the steps before the search leave it at least this much

# ---- the steps (each runs as `timeout LIMIT bash THIS_FILE __step NAME`, its output appended to log.txt) ---------

step_env() {
    uname -a
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PY" -c 'import onnxruntime, torch; print("onnxruntime", onnxruntime.__version__, "torch", torch.__version__)'
    "$PY" benchmarks/cuda_check.py env --device "$DEVICE" --out "$WORK/env.json"
}

step_wheels() {
    ls -l .whl/
    local flags=()
    # The wheels are for CPython 3.12 (the GPU machine's). A dry run on another Python still installs them (as 3.12):
    # optuna is pure Python and imports SQLAlchemy only for database storages, which search.py does not use here.
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        flags=(--python-version 3.12 --only-binary=:all:)
        echo "note: $PY is not Python 3.12: installing the 3.12 wheels anyway (dry run)"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "${flags[@]}" \
        --target "$SITE" .whl/*.whl
    ls "$SITE"
}

step_imports() {
    "$PY" benchmarks/cuda_check.py imports
}

step_lut_profile() {
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" -m latency_lut profile --space "$SPACE" --device "$DEVICE" --batch-size 1 --threads 1 --dtype float32 \
        --runtime eager --num-classes 10 --out "$LUT" --seed 0 --quiet $PROFILE_FLAGS
}

step_lut_validate() {
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" -m latency_lut validate --lut "$LUT" --space "$SPACE" --device "$DEVICE" --n "$VALIDATE_N" --seed 0 \
        --report-dir "$WORK/validation" --quiet $VALIDATE_FLAGS || return
    "$PY" benchmarks/cuda_check.py validation-md --report "$WORK/validation/validate-cuda_lut.json" \
        --out "$OUT/cuda_validation.md"
}

step_target() {
    "$PY" -m latency_lut show --lut "$LUT" --space "$SPACE" || true
    "$PY" benchmarks/cuda_check.py target --lut "$LUT" --device "$DEVICE" --frac 0.4 --out "$WORK/target.json"
}

step_throughput() {
    set -o pipefail
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" benchmarks/bench_training.py throughput --device "$DEVICE" --threads 1 $THROUGHPUT_FLAGS \
        | tee "$WORK/throughput.md"
}

step_config() {
    local small=()
    [[ $SMALL == 1 ]] && small=(--small)
    "$PY" benchmarks/cuda_check.py config --data-root .data/fashion-mnist --out "$WORK/fashion_mnist.yaml" "${small[@]}"
    ls -l .data/fashion-mnist/
}

step_search() {
    echo "target: $TARGET_MS ms ($TARGET_SOURCE)"
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" search.py --target-ms "$TARGET_MS" --device "$DEVICE" --config "$WORK/fashion_mnist.yaml" --preset quick \
        --run-dir "$WORK/run" --searcher optuna --lut "$LUT" $SEARCH_FLAGS
}

step_pack() {
    # The run directory without what only a resumed run needs; the tarball must stay under 16 MiB.
    local tarball=$OUT/search_run.tar.gz excluded="none"
    # cuda_lut-validation/: where search.py validates the table itself when the lut steps did not finish it
    local items=(run validation cuda_lut-validation throughput.md fashion_mnist.yaml env.json target.json)
    local present=() item
    for item in "${items[@]}"; do [[ -e $WORK/$item ]] && present+=("$item"); done
    tar -czf "$tarball" -C "$WORK" "${present[@]}" || return
    if (( $(stat -c %s "$tarball") > 15 * 1024 * 1024 )); then
        excluded="supernet.pt retrain.pt"
        tar -czf "$tarball" -C "$WORK" --exclude=supernet.pt --exclude=retrain.pt "${present[@]}" || return
    fi
    if (( $(stat -c %s "$tarball") > 15 * 1024 * 1024 )); then
        excluded="$excluded model.pt model.pt2 model.onnx"
        tar -czf "$tarball" -C "$WORK" --exclude=supernet.pt --exclude=retrain.pt --exclude=model.pt \
            --exclude=model.pt2 --exclude=model.onnx "${present[@]}" || return
    fi
    tar -tzvf "$tarball"
    printf '{"tarball_bytes": %d, "excluded": "%s"}\n' "$(stat -c %s "$tarball")" "$excluded" >"$WORK/pack.json"
    cat "$WORK/pack.json"
}

if [[ ${1:-} == __step ]]; then
    cd "$ROOT" || exit 1
    "step_$2"
    exit $?
fi

# ---- the driver ------------------------------------------------------------------------------------------------

cd "$ROOT" || exit 1
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
FAILED=0
: >"$WORK/steps.tsv"
printf '{"device": "%s", "small": %s, "budget_s": %d, "python": "%s", "work": "%s", "started": "%s"}\n' \
    "$DEVICE" "$SMALL" "$BUDGET_S" "$PY" "$WORK" "$(date -u +%FT%TZ)" >"$WORK/settings.json"
echo "cuda_check: device $DEVICE, small $SMALL, budget ${BUDGET_S}s, work $WORK, log $LOG" | tee "$LOG"

results() {
    timeout 30 "$PY" benchmarks/cuda_check.py results --work "$WORK" --out "$OUT/results.json" >>"$LOG" 2>&1
}

# run_step NAME MAX_S RESERVE_S: runs step_NAME for at most MAX_S seconds, and never past the deadline minus RESERVE_S
run_step() {
    local name=$1 max=$2 reserve=$3 limit left start rc seconds status
    left=$((DEADLINE - $(date +%s) - reserve))
    limit=$((max < left ? max : left))
    if ((limit < 5)); then
        printf '%s\tskipped\t-1\t0\t%d\n' "$name" "$limit" >>"$WORK/steps.tsv"
        printf '%-12s skipped (no time left)\n' "$name" | tee -a "$LOG"
        FAILED=1
        results
        return 1
    fi
    printf '\n===== %s (limit %d s) %s =====\n' "$name" "$limit" "$(date -u +%T)" >>"$LOG"
    start=$(date +%s.%N)
    timeout -k 10 "$limit" bash "$SELF" __step "$name" >>"$LOG" 2>&1
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $status == ok ]] || FAILED=1
    printf '%s\t%s\t%d\t%s\t%d\n' "$name" "$status" "$rc" "$seconds" "$limit" >>"$WORK/steps.tsv"
    printf '%-12s %-8s rc %-3d %7s s (limit %d s)\n' "$name" "$status" "$rc" "$seconds" "$limit" | tee -a "$LOG"
    results
    return $((rc != 0))
}

before_search=$((RESERVE_S + SEARCH_MIN_S))
run_step env 45 "$before_search"
if run_step wheels 45 "$before_search"; then
    export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
echo "PYTHONPATH=$PYTHONPATH" >>"$LOG"
run_step imports 60 "$before_search"
run_step config 30 "$before_search"
run_step lut_profile 150 "$before_search"
cp -f "$LUT" "$OUT/cuda_lut.json" 2>/dev/null
run_step lut_validate 90 "$before_search"
cp -f "$LUT" "$OUT/cuda_lut.json" 2>/dev/null
if run_step target 60 "$before_search"; then
    TARGET_MS=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["target_ms"])' "$WORK/target.json")
    TARGET_SOURCE=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["source"])' "$WORK/target.json")
else
    TARGET_MS=$TARGET_FALLBACK_MS
    TARGET_SOURCE="fallback: the target step failed"
fi
export TARGET_MS TARGET_SOURCE
echo "target: $TARGET_MS ms ($TARGET_SOURCE)" | tee -a "$LOG"
run_step throughput 75 "$before_search"
run_step search "$SEARCH_MAX_S" "$RESERVE_S"
cp -f "$LUT" "$OUT/cuda_lut.json" 2>/dev/null   # search.py completes the table itself if profiling did not
RESERVE_S=0
DEADLINE=$(($(date +%s) + 25))
run_step pack 20 0

echo "total $(($(date +%s) - START)) s; files in $OUT:" | tee -a "$LOG"
# shellcheck disable=SC2012  # a listing for people
ls -l "$OUT" | tee -a "$LOG"
grep -E '^(\| |target|  #|done:|error:)' "$LOG" | tail -n 40
timeout 30 "$PY" benchmarks/cuda_check.py summary --results "$OUT/results.json"
exit "$FAILED"
