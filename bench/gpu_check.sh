#!/usr/bin/env bash
# The whole device check in one call: the GPU tests, then the target rows of `python -m bench.speed`, with
# everything it made in the folder named by its argument (the device's $OUT; three files come back:
# the log, a summary and a tarball of the speed results).
#
#   bash bench/gpu_check.sh "$OUT"              # on a lent GPU: installs nothing, done within 7 minutes
#   bash bench/gpu_check.sh --dry-run DIR       # the same plumbing on CPU at tiny sizes (CI runs it)
#
# The steps run most telling first, each under its own limit and all under one deadline
# (GPU_CHECK_SECONDS, 420 s, less 15 s kept for the summary): a step gets at most the time left, and
# once it is spent the rest are listed as skipped, so the check fits one device call of 7 minutes
# whatever the device's speed.
#
# The device image has its own python3 (torch, triton, sentence-transformers, pytest, hypothesis) and
# no registry. Inf-CL, pure Python, travels as a wheel in .gpu_wheels/ (named in `carry`): it is
# unpacked into a scratch folder on PYTHONPATH, not installed. The tests run with one pinned kernel
# config (no autotuning: a fresh machine has no Triton cache, and tuning every launch variant would
# take the whole budget); the bench autotunes only the rows it times. Each step prints its wall time,
# compile and tuning included, and a failing step does not stop the next.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

BUDGET=${GPU_CHECK_SECONDS:-420}
DEADLINE=$(( $(date +%s) + BUDGET - 15 ))
step() {  # step NAME SECONDS COMMAND...: run within its limit and the deadline, report exit status and wall time
    local name=$1 limit=$2 t0 rc left
    shift 2
    t0=$(date +%s)
    left=$(( DEADLINE - t0 ))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, the check's $BUDGET s are spent"
        echo "| $name | skipped | 0 s |" >> "$WORK/steps.md"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name: (limit $limit s) $*"
    timeout "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
    echo "| $name | $rc | $(( $(date +%s) - t0 )) s |" >> "$WORK/steps.md"
}

echo "== $(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), dry run: $DRY"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name(0))" || true
for wheel in .gpu_wheels/*.whl; do
    [ -e "$wheel" ] && "$PY" -m zipfile -e "$wheel" "$WORK/site"
done
mkdir -p "$WORK/speed"

if [ "$DRY" = 1 ]; then
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_api.py -k "hint"
    step speed 120 "$PY" -m bench.speed --device cpu --workloads samtone matryoshka-samtone --sizes 64 --dim 32 \
        --repeats 1 --impls ours-fused ours-hybrid ours-eager eager-chunked ours-per-prefix --out "$WORK/speed" --no-plot
    TILES="16,32,16,4,1,0,1" TILE_ARGS=(--device cpu --sizes 64 --dim 32 --repeats 1)
    RESIDENT_TILES="16,16,32,4,1,0,1,1" RESIDENT_ARGS=(--device cpu --sizes 64 --dim 32 --repeats 1)
    WIDE_TILES="" # (the device's D = 256 step: its nine-field pin is parsed in tests/test_autotune.py)
else
    export SAMTONE_TRITON_CONFIG=${SAMTONE_TRITON_CONFIG:-64,64,64,8,3,1,2} HYPOTHESIS_PROFILE=gpu
    step tests 140 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_autotune.py \
        tests/test_hybrid.py tests/test_api.py tests/test_distributed.py -m "gpu or not gpu"
    unset SAMTONE_TRITON_CONFIG
    step samtone 130 "$PY" -m bench.speed --workloads samtone --sizes 16384 32768 --dtypes bfloat16 --repeats 3 \
        --impls ours-fused ours-hybrid ours-auto ours-eager eager-chunked torch.compile sentence-transformers \
        --out "$WORK/speed"
    # D = 128 and 256: the swept backward sm_90 is offered against its resident one for that D
    # (configs.RESIDENT_TILES), each pinned (the forward takes the pinned tile's first seven fields).
    RESIDENT_TILES="64,64,64,8,3,1,2 128,32,128,8,2,0,1,1" RESIDENT_ARGS=(--sizes 16384 --dtypes bfloat16 --dim 128)
    WIDE_TILES="64,64,64,8,3,1,2 32,32,256,4,1,0,1,1,255" WIDE_ARGS=(--sizes 16384 --dtypes bfloat16 --dim 256)
    # D = 768: sm_90's two swept configs, paired 64 x 64 with the products as they are and transposed
    # (configs.TRANSPOSED_TILES), each pinned; last, each segment alone at 64 x 128 (sm_80 / sm_89's;
    # one small spill on sm_90) and the paired walk at 64 x 128, which moves fewer bytes and spills in
    # some backward variants (bench/RESULTS.md, tools/kernel_analysis/traffic_model.py).
    TILES="64,64,64,8,3,1,2 64,64,64,8,3,1,2,0,0,1" TILE_ARGS=(--sizes 16384 --dtypes bfloat16)
    MORE_TILES="64,128,64,8,3,0,1 64,128,64,8,3,1,2"
fi
for tile in $TILES; do
    step "tile $tile" 35 env SAMTONE_TRITON_CONFIG="$tile" "$PY" -m bench.speed --workloads samtone \
        --impls ours-fused "${TILE_ARGS[@]}" --out "$WORK/speed/tile-$tile" --no-plot
done
for tile in $RESIDENT_TILES; do
    step "d128 tile $tile" 30 env SAMTONE_TRITON_CONFIG="$tile" "$PY" -m bench.speed --workloads samtone \
        --impls ours-fused "${RESIDENT_ARGS[@]}" --out "$WORK/speed/d128-$tile" --no-plot
done
for tile in $WIDE_TILES; do
    step "d256 tile $tile" 30 env SAMTONE_TRITON_CONFIG="$tile" "$PY" -m bench.speed --workloads samtone \
        --impls ours-fused "${WIDE_ARGS[@]}" --out "$WORK/speed/d256-$tile" --no-plot
done
if [ "$DRY" = 0 ]; then
    # Matryoshka (dims 64 .. 768): the two one-pass paths (hybrid, eager) against a loss per prefix
    # (fused, eager) and sentence-transformers' MatryoshkaLoss(MNRL) computation.
    step matryoshka 45 "$PY" -m bench.speed --workloads matryoshka-samtone --sizes 16384 --dtypes bfloat16 \
        --repeats 3 --impls ours-hybrid ours-eager ours-auto ours-fused ours-per-prefix sentence-transformers \
        --out "$WORK/speed" --no-plot
    step infonce 50 "$PY" -m bench.speed --workloads symmetric-infonce --sizes 32768 --dtypes bfloat16 \
        --impls ours-fused ours-hybrid inf-cl --out "$WORK/speed"
    step large 50 "$PY" -m bench.speed --workloads samtone --sizes 262144 --dtypes bfloat16 --impls ours-fused \
        --out "$WORK/speed" --no-plot
    for tile in $MORE_TILES; do
        step "tile $tile" 35 env SAMTONE_TRITON_CONFIG="$tile" "$PY" -m bench.speed --workloads samtone \
            --impls ours-fused "${TILE_ARGS[@]}" --out "$WORK/speed/tile-$tile" --no-plot
    done
fi

{
    echo "# Device check, $(date -u '+%Y-%m-%d %H:%M') UTC"
    echo
    echo "| step | exit | wall |"
    echo "|---|---|---|"
    cat "$WORK/steps.md"
    echo
    echo '```'
    grep -h -E "^(== (d128 |d256 )?tile [0-9,]+: \(limit [0-9]+ s\) env|# (GPU|CPU|python|peers|commit|eff|[a-z.-]+: )|workload|[a-z-]+ +[0-9]+ +[0-9]+ )" \
        "$OUT/gpu_check.log"
    echo '```'
} > "$OUT/summary.md"
tar czf "$OUT/speed.tar.gz" -C "$WORK/speed" .
echo "== wrote $OUT/summary.md, $OUT/speed.tar.gz, $OUT/gpu_check.log"
