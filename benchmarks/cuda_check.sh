#!/usr/bin/env bash
# One-shot check of the project on a CUDA machine, in under 10 minutes, every step bounded by `timeout`:
#   environment -> carried wheels (optuna) -> imports -> config -> which runtimes run here ->
#   latency tables (eager and cudagraph, batch 1, float32) -> search.py --preset quick end to end ->
#   the winner's shipped files measured (python -m latency_lut measure) -> the supernet's first-epoch cost by cuDNN
#   mode -> then, while time is left: supernet training (experiments/imagenet.yaml's recipe, 224 px) fed by the
#   ImageFolder loader against the same batches already on the device (the goal: >= 0.90 of the in-memory rate) ->
#   the tests marked gpu -> the rest of the table matrix (batch 1 and 64, float32 and bfloat16, every launch-free
#   runtime that runs here) -> cuDNN autotuning's first-epoch cost -> pack -> results.json
#
#   OUT=/some/empty/dir bash benchmarks/cuda_check.sh                   # on the GPU machine, from the repo root
#   OUT=/tmp/cc CUDA_CHECK_DEVICE=cpu SMALL=1 PYTHON=.venv/bin/python \
#       nice bash benchmarks/cuda_check.sh                              # the CPU dry run: same steps, tiny sizes
#   OUT=/tmp/cc WORK=/tmp/cc/work ... bash benchmarks/cuda_check.sh __step loader   # one step alone, into WORK
#
# Needs, in the repo root: .whl/ (optuna and the wheels it needs that the machine lacks; not needed where optuna
# imports) and .data/fashion-mnist/ (the four IDX .gz files; /usr/share/datasets/fashion-mnist where .data is
# absent); both are ignored by git and travel as `carry`.
# Knobs: SEARCH_TARGET (default 0.75xshufflenet_v2_x0_5: three quarters of x0.5 measured now, which binds; the dry
# run 1.5x),
# SEARCH_RUNTIME (default eager, the default on cuda), CUDA_CHECK_BUDGET_S (the driver's deadline), LOADER_MAX_S (the
# loader step's limit; 0 leaves the step out).
# On the CPU dry run the CUDA-only runtimes' tables are recorded as unavailable (with the one-line reason every CLI
# gives), and the shipped model.onnx is measured in onnxruntime in their place.
# What comes back, in $OUT: log.txt (every step's full output), results.json (every step's status, time and figures),
# cuda_check.md (the figures as tables), luts/ (every latency table) and search_run.tar.gz (search.py's run
# directory, the validation reports and plots, the measurements, env and config).
# A failed or timed-out step is recorded and the script goes on; it exits 0 when every step that ran passed, else 1.

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
export SEARCH_RUNTIME=${SEARCH_RUNTIME:-eager}

if [[ ${1:-} != __step ]]; then    # the top-level run (a step re-enters this file as `__step FUNCTION`)
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/cuda_check.XXXXXX")
    export OUT WORK
fi
export LOG=$OUT/log.txt
export LUTS=$WORK/luts
export SPACE=experiments/spaces/fashion_mnist.yaml
export SHUFFLENAS_HOME=$WORK/home  # a fresh store: the search trains its supernet here, and the first epoch shows
if [[ -d .data/fashion-mnist || ! -d /usr/share/datasets/fashion-mnist ]]; then
    export DATA_ROOT=${DATA_ROOT:-.data/fashion-mnist}
else
    export DATA_ROOT=${DATA_ROOT:-/usr/share/datasets/fashion-mnist}
fi

# Sizes: the CUDA ones are the real check; SMALL shrinks them so that the CPU dry run takes minutes on one core.
if [[ $SMALL == 1 ]]; then
    export BUDGET_S=${CUDA_CHECK_BUDGET_S:-900}
    export PROFILE_FLAGS="--rounds 1 --block-ms 2 --group 16"
    export VALIDATE_N=6 VALIDATE_FLAGS="--rounds 2 --block-ms 5"
    export SEARCH_FLAGS="--trials 4 --threads 1"
    export MEASURE_ROUNDS=2 MEASURE_MAX_S=120 EPOCH_STEPS=3 EPOCH_MAX_S=60 EPOCH_FLAGS="--batch-size 8"
    export SEARCH_MAX_S=480 LUT_MAX_S=150 P2_BATCHES="" P2_DTYPES="bfloat16"
    # The loader step at 64 px, batch 2: eight sandwich steps, about a minute on a quiet CPU (more when it is shared).
    export LOADER_MAX_S=${LOADER_MAX_S:-150} LOADER_MIN_S=30
    export LOADER_FLAGS="--per-class 5 --batch-size 2 --image-size 64 --steps 2 --warmup 1 --rounds 1 --arch-sets 1"
    # A shared CPU's load moves its timings by 1.5x and more between the table and the search: a budget that binds
    # on a GPU can be refused here ("cannot be met as the device measures now"), so the dry run gives room.
    export SEARCH_TARGET=${SEARCH_TARGET:-1.5xshufflenet_v2_x0_5}
else
    export BUDGET_S=${CUDA_CHECK_BUDGET_S:-540}   # + packing and results (seconds): under 10 minutes in all
    export PROFILE_FLAGS="--rounds 3 --block-ms 10 --group 16"
    export VALIDATE_N=30 VALIDATE_FLAGS="--rounds 4 --block-ms 30"   # 30 archs: 12 fit the correction, 18 held out
    export SEARCH_FLAGS=""
    export MEASURE_ROUNDS=5 MEASURE_MAX_S=45 EPOCH_STEPS=20 EPOCH_MAX_S=30 EPOCH_FLAGS=""
    export SEARCH_MAX_S=270 LUT_MAX_S=70 P2_BATCHES="64" P2_DTYPES="bfloat16"
    # 2,000 JPEG files; batch 256 at 224 px; blocks of 4 warm-up and 32 timed steps, two rounds if they fit.
    export LOADER_MAX_S=${LOADER_MAX_S:-75} LOADER_MIN_S=30 LOADER_FLAGS=""
    export SEARCH_TARGET=${SEARCH_TARGET:-0.75xshufflenet_v2_x0_5}
fi
RESERVE_S=25        # kept for packing and results.json at the end
SEARCH_MIN_S=200    # the steps before the search leave it at least this much

# ---- the steps (each runs as `timeout LIMIT bash THIS_FILE __step FUNCTION`, its output appended to log.txt) -----

step_env() {
    uname -a
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PY" benchmarks/cuda_check.py env --device "$DEVICE" --out "$WORK/env.json"
}

step_wheels() {
    if [[ ! -d .whl ]]; then
        echo "no .whl/: using the installed packages"
        "$PY" -c 'import optuna; print("optuna", optuna.__version__, "is installed")'
        return
    fi
    ls -l .whl/
    local flags=()
    # The wheels are for CPython 3.12 (the GPU machine's). A dry run on another Python still installs them (as 3.12):
    # optuna is pure Python and imports SQLAlchemy only for database storages, which search.py does not use here.
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        flags=(--python-version 3.12 --only-binary=:all:)
        echo "note: $PY is not Python 3.12: installing the 3.12 wheels anyway (dry run)"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "${flags[@]}" \
        --target "$WORK/site" .whl/*.whl
    ls "$WORK/site"
}

step_imports() {
    "$PY" benchmarks/cuda_check.py imports
}

step_config() {
    local small=()
    [[ $SMALL == 1 ]] && small=(--small)
    "$PY" benchmarks/cuda_check.py config --data-root "$DATA_ROOT" --out "$WORK/fashion_mnist.yaml" "${small[@]}"
    ls -l "$DATA_ROOT"
}

step_runtimes() {
    "$PY" benchmarks/cuda_check.py runtimes --device "$DEVICE" --out "$WORK/runtimes.json"
}

# One latency table: LUT_RUNTIME, LUT_BATCH, LUT_DTYPE (set by the driver); profile, range, held-out validation.
step_lut() {
    local name=$LUT_RUNTIME-b$LUT_BATCH-$LUT_DTYPE
    local lut=$LUTS/$name.json
    mkdir -p "$LUTS"
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" -m latency_lut profile --space "$SPACE" --device "$DEVICE" --batch-size "$LUT_BATCH" --threads 1 \
        --dtype "$LUT_DTYPE" --runtime "$LUT_RUNTIME" --num-classes 10 --out "$lut" --seed 0 --quiet \
        $PROFILE_FLAGS || return
    "$PY" -m latency_lut show --lut "$lut" --space "$SPACE"
    # shellcheck disable=SC2086
    "$PY" -m latency_lut validate --lut "$lut" --space "$SPACE" --device "$DEVICE" --n "$VALIDATE_N" --seed 0 \
        --report-dir "$WORK/validation" --quiet $VALIDATE_FLAGS
}

step_search() {
    local lut=$LUTS/$SEARCH_RUNTIME-b1-float32.json
    echo "target: $SEARCH_TARGET, runtime $SEARCH_RUNTIME, table $lut"
    # A table the lut steps did not finish is completed (and calibrated) by search.py itself.
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" search.py --target-ms "$SEARCH_TARGET" --device "$DEVICE" --config "$WORK/fashion_mnist.yaml" \
        --preset quick --run-dir "$WORK/run" --searcher optuna --lut "$lut" --runtime "$SEARCH_RUNTIME" $SEARCH_FLAGS
}

# The winners' shipped files, each in every runtime that runs it here, in a fresh process (latency_lut measure).
step_measure() {
    mkdir -p "$WORK/measure"
    local file runtime runtimes name rc=0 found=0
    for file in "$WORK"/run/winners/*/model.pt2 "$WORK"/run/winners/*/model.onnx \
                "$WORK"/run/winners/*/*/model.pt2 "$WORK"/run/winners/*/*/model.onnx; do
        [[ -f $file ]] || continue
        found=1
        runtimes=$("$PY" benchmarks/cuda_check.py file-runtimes --runtimes "$WORK/runtimes.json" --file "$file")
        for runtime in $runtimes; do
            name=$(basename "$(dirname "$file")")-$(basename "$file")-$runtime
            echo "== $file in $runtime"
            "$PY" -m latency_lut measure "$file" --device "$DEVICE" --runtime "$runtime" --rounds "$MEASURE_ROUNDS" \
                --json >"$WORK/measure/$name.json" || rc=1
            "$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("  p50", m["p50_ms"], "p90", m["p90_ms"], "p99", m["p99_ms"], "ms,", m["calls"], "calls")' \
                "$WORK/measure/$name.json" || rc=1
        done
    done
    ((found)) || { echo "no shipped files under $WORK/run/winners"; return 1; }
    return $rc
}

# The supernet's per-step cost on new convolution shapes and on the same shapes again, in one cuDNN mode.
step_epoch() {
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" benchmarks/cuda_check.py first-epoch --device "$DEVICE" --config "$WORK/fashion_mnist.yaml" \
        --mode "$EPOCH_MODE" --steps "$EPOCH_STEPS" --max-seconds "$EPOCH_MAX_S" --out "$WORK/epoch-$EPOCH_MODE.json" \
        $EPOCH_FLAGS
}

# Supernet training steps (experiments/imagenet.yaml's recipe) fed by the ImageFolder training loader, against the same
# batches already on the device, on a Fashion-MNIST JPEG tree written first; sized to the step's limit (STEP_LIMIT).
step_loader() {
    # shellcheck disable=SC2086  # *_FLAGS are lists of options: split on purpose
    "$PY" benchmarks/cuda_check.py loader --device "$DEVICE" --source "$DATA_ROOT" --tree "$WORK/jpeg-tree" \
        --max-seconds $((${STEP_LIMIT:-$LOADER_MAX_S} - 15)) --out "$WORK/loader.json" $LOADER_FLAGS
}

# The tests marked gpu (they skip without CUDA): the runtimes' real paths, on tiny networks.
step_gpu_tests() {
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/latency_lut
}

step_pack() {
    # The run directory without what only a resumed run needs; the tarball must stay under 16 MiB.
    local tarball=$OUT/search_run.tar.gz excluded="none"
    local items=(run validation measure luts home runtimes.json fashion_mnist.yaml env.json)
    local present=() item
    for item in "${items[@]}"; do [[ -e $WORK/$item ]] && present+=("$item"); done
    local common=(--exclude=supernet.pt.lock --exclude='*.lock')
    tar -czf "$tarball" -C "$WORK" --exclude=supernet.pt --exclude=retrain.pt "${common[@]}" "${present[@]}" || return
    excluded="supernet.pt retrain.pt"
    if (( $(stat -c %s "$tarball") > 15 * 1024 * 1024 )); then
        excluded="$excluded model.pt model.pt2 model.onnx"
        tar -czf "$tarball" -C "$WORK" --exclude=supernet.pt --exclude=retrain.pt --exclude=model.pt \
            --exclude=model.pt2 --exclude=model.onnx "${common[@]}" "${present[@]}" || return
    fi
    tar -tzvf "$tarball" | tail -n 30
    mkdir -p "$OUT/luts"
    cp -f "$LUTS"/*.json "$OUT/luts/" 2>/dev/null
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
settings_format='{"device": "%s", "small": %s, "budget_s": %d, "python": "%s", "work": "%s", "started": "%s", '
printf "$settings_format"'"commit": "%s", %s}\n' \
    "$DEVICE" "$SMALL" "$BUDGET_S" "$PY" "$WORK" "$(date -u +%FT%TZ)" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "\"search_target\": \"$SEARCH_TARGET\"" \
    >"$WORK/settings.json"
echo "cuda_check: device $DEVICE, small $SMALL, budget ${BUDGET_S}s, work $WORK, log $LOG" | tee "$LOG"

results() {
    timeout 30 "$PY" benchmarks/cuda_check.py results --work "$WORK" --out "$OUT/results.json" \
        --md "$OUT/cuda_check.md" >>"$LOG" 2>&1
}

# run_step NAME FUNCTION MAX_S RESERVE_S [MIN_S]: runs step_FUNCTION for at most MAX_S seconds, never past the deadline
# minus RESERVE_S, and not at all when that leaves it under MIN_S (default 5); records it as NAME. The step sees its
# limit as STEP_LIMIT.
run_step() {
    local name=$1 fn=$2 max=$3 reserve=$4 min=${5:-5} limit left start rc seconds status
    left=$((DEADLINE - $(date +%s) - reserve))
    limit=$((max < left ? max : left))
    if ((limit < min)); then
        printf '%s\tskipped\t-1\t0\t%d\n' "$name" "$limit" >>"$WORK/steps.tsv"
        printf '%-28s skipped (no time left)\n' "$name" | tee -a "$LOG"
        results
        return 1
    fi
    printf '\n===== %s (limit %d s) %s =====\n' "$name" "$limit" "$(date -u +%T)" >>"$LOG"
    start=$(date +%s.%N)
    STEP_LIMIT=$limit timeout -k 10 "$limit" bash "$SELF" __step "$fn" >>"$LOG" 2>&1
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $status == ok ]] || FAILED=1
    printf '%s\t%s\t%d\t%s\t%d\n' "$name" "$status" "$rc" "$seconds" "$limit" >>"$WORK/steps.tsv"
    printf '%-28s %-8s rc %-3d %7s s (limit %d s)\n' "$name" "$status" "$rc" "$seconds" "$limit" | tee -a "$LOG"
    results
    return $((rc != 0))
}

# A runtime that cannot run here (not installed, no CUDA): recorded with the reason, not run.
unavailable() {
    local name=$1 runtime=$2 why
    why=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["runtimes"][sys.argv[2]]["error"])' \
        "$WORK/runtimes.json" "$runtime" 2>/dev/null || echo "unknown")
    printf '%s\tunavailable\t2\t0\t0\n' "$name" >>"$WORK/steps.tsv"
    printf '%-28s unavailable: %s\n' "$name" "$why" | tee -a "$LOG"
}

available() {
    "$PY" -c 'import json, sys; sys.exit(not json.load(open(sys.argv[1]))["runtimes"][sys.argv[2]]["available"])' \
        "$WORK/runtimes.json" "$1" 2>/dev/null
}

# lut RUNTIME BATCH DTYPE RESERVE_S
lut() {
    local name=lut-$1-b$2-$3
    if ! available "$1"; then unavailable "$name" "$1"; return 1; fi
    LUT_RUNTIME=$1 LUT_BATCH=$2 LUT_DTYPE=$3 run_step "$name" lut "$LUT_MAX_S" "$4"
}

# After the search: the measurements, then the first-epoch modes; the search waits for none of these.
after_search=$((RESERVE_S + MEASURE_MAX_S + 2 * (EPOCH_MAX_S + 15)))
before_search=$((after_search + SEARCH_MIN_S))
run_step env env 45 "$before_search"
if run_step wheels wheels 45 "$before_search" && [[ -d $WORK/site ]]; then
    export PYTHONPATH=$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
echo "PYTHONPATH=$PYTHONPATH" >>"$LOG"
run_step imports imports 60 "$before_search"
run_step config config 30 "$before_search"
run_step runtimes runtimes 30 "$before_search"

# The launch-free runtimes whose tables are measured: cudagraph, and ort-cuda where onnxruntime-gpu is installed
# (ort-tensorrt builds an engine per op: its shipped file is measured, no table). None on the CPU dry run.
if [[ $DEVICE == cpu ]]; then FAST=""; else FAST=cudagraph; fi
lut eager 1 float32 "$before_search"
[[ -n $FAST ]] && lut "$FAST" 1 float32 "$before_search"
[[ $SEARCH_RUNTIME != eager && $SEARCH_RUNTIME != "$FAST" ]] && lut "$SEARCH_RUNTIME" 1 float32 "$before_search"
run_step search search "$SEARCH_MAX_S" "$after_search"
run_step measure measure "$MEASURE_MAX_S" $((RESERVE_S + 2 * (EPOCH_MAX_S + 15)))
for mode in heuristic off; do
    EPOCH_MODE=$mode run_step "first-epoch-$mode" epoch $((EPOCH_MAX_S + 15)) "$RESERVE_S"
done
# From here on, the steps take the time that is left, in this order; the steps above keep their reserves.
((LOADER_MAX_S > 0)) && run_step loader loader "$LOADER_MAX_S" "$RESERVE_S" "$LOADER_MIN_S"
if "$PY" -c 'import pytest' 2>/dev/null; then
    run_step gpu-tests gpu_tests 90 "$RESERVE_S"
else
    printf 'gpu-tests\tunavailable\t2\t0\t0\n' >>"$WORK/steps.tsv"
    printf '%-28s unavailable: pytest is not installed (carry its wheels in .whl/)\n' gpu-tests | tee -a "$LOG"
fi
# The rest of the matrix, most wanted first, while time is left.
for batch in 1 $P2_BATCHES; do
    for dtype in float32 $P2_DTYPES; do
        for runtime in eager $FAST ort-cuda; do
            [[ $batch == 1 && $dtype == float32 && $runtime != ort-cuda ]] && continue   # done above
            [[ $DEVICE == cpu && $runtime == ort-cuda ]] && continue                     # recorded below
            [[ $runtime == ort-cuda && $dtype != float32 ]] && continue                  # float32 only
            lut "$runtime" "$batch" "$dtype" "$RESERVE_S"
        done
    done
done
EPOCH_MODE=autotune run_step first-epoch-autotune epoch $((EPOCH_MAX_S + 15)) "$RESERVE_S"
if [[ $DEVICE == cpu ]]; then
    for runtime in cudagraph ort-cuda ort-tensorrt; do
        available "$runtime" || unavailable "lut-$runtime-b1-float32" "$runtime"
    done
fi
RESERVE_S=0
DEADLINE=$(($(date +%s) + 25))
run_step pack pack 20 0

echo "total $(($(date +%s) - START)) s; files in $OUT:" | tee -a "$LOG"
# shellcheck disable=SC2012  # a listing for people
ls -l "$OUT" | tee -a "$LOG"
timeout 30 "$PY" benchmarks/cuda_check.py summary --results "$OUT/results.json"
exit "$FAILED"
