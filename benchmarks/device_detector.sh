#!/usr/bin/env bash
# Detector benchmarks on one GPU, in ~4 minutes on an H100: train-step and inference time and peak CUDA memory
# of CenterNet2 R50 / Swin-L (step.py), and BSGAL's grad cache against the lookahead estimator (bsgal.py,
# bsgal.md §3). Run from the repository root:
#
#   bash benchmarks/device_detector.sh OUTDIR              # on the GPU machine (python3 there holds torch)
#   DEVICE=cpu SMOKE=1 bash benchmarks/device_detector.sh /tmp/smoke   # the plumbing, tiny sizes on CPU
#
# Results: one JSON line per configuration in OUTDIR/detector.jsonl, every command's output in
# OUTDIR/detector.log, progress and the final Markdown tables on stdout. A failing configuration (OOM, error,
# timeout) is a row with its error; the next command still runs. Commands that would start after BUDGET_S
# seconds are skipped (listed at the end); each command's timeout is cut so that the script ends by HARD_S.
#
# Environment (defaults): DEVICE (cuda), SMOKE (0), PYTHON (python3), BUDGET_S (240), HARD_S (420),
# WARMUP (2), ITERS (5), BSGAL_WARMUP (2), BSGAL_ITERS (3).
set -u

OUTDIR=${1:?usage: bash benchmarks/device_detector.sh OUTDIR}
mkdir -p "$OUTDIR"
JSONL=$OUTDIR/detector.jsonl
LOG=$OUTDIR/detector.log
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-240}
HARD_S=${HARD_S:-420}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then  # every path once, at sizes a CPU runs in seconds
    WARMUP=${WARMUP:-0} ITERS=${ITERS:-1} BSGAL_WARMUP=${BSGAL_WARMUP:-0} BSGAL_ITERS=${BSGAL_ITERS:-1}
    R50_SIZE=128 SWINL_SIZE=128 INFER_SIZE="128 160" BIG_TRAIN=2 BIG_INFER=2
    BUDGET_S=${BUDGET_S_SMOKE:-100000} HARD_S=${HARD_S_SMOKE:-100000} UNIT=600
else  # the official sizes: R50 2 × 640², Swin-L 2 × 896² per GPU; test 800×1333 (centernet2.md §4)
    WARMUP=${WARMUP:-2} ITERS=${ITERS:-5} BSGAL_WARMUP=${BSGAL_WARMUP:-2} BSGAL_ITERS=${BSGAL_ITERS:-3}
    R50_SIZE=640 SWINL_SIZE=896 INFER_SIZE="800 1333" BIG_TRAIN=8 BIG_INFER=8
    UNIT=75  # seconds per configuration (process start, model build, warm-up and timed steps) before it fails
fi

START=$(date +%s)
SKIPPED=()
ABORT=""  # set when the first command gave no result at all: the rest would fail the same way
: >>"$JSONL"
echo "device_detector.sh: DEVICE=$DEVICE SMOKE=$SMOKE; step warm-up $WARMUP iters $ITERS;" \
    "bsgal warm-up $BSGAL_WARMUP iters $BSGAL_ITERS" | tee -a "$LOG"
$PY - <<'PY' 2>&1 | tee -a "$LOG"
import torch

if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("torch", torch.__version__, "|", p.name, f"{p.total_memory / 1024**3:.1f} GiB")
else:
    print("torch", torch.__version__, "| no CUDA")
PY

# bench NAME CONFIGS CMD...: run CMD (which runs CONFIGS configurations) under a timeout, unless over budget.
bench() {
    local name=$1 configs=$2 elapsed limit rc
    shift 2
    elapsed=$(($(date +%s) - START))
    if [ -n "$ABORT" ] || [ "$elapsed" -ge "$BUDGET_S" ]; then
        SKIPPED+=("$name")
        echo "[${elapsed}s] SKIP $name (${ABORT:-past BUDGET_S=$BUDGET_S})" | tee -a "$LOG"
        return
    fi
    limit=$((configs * UNIT + 15))
    [ $((HARD_S - elapsed)) -lt "$limit" ] && limit=$((HARD_S - elapsed))
    echo "[${elapsed}s] $name (timeout ${limit}s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" --timeout "$UNIT" --json "$JSONL" >>"$LOG" 2>&1
    rc=$?
    echo "[$(($(date +%s) - START))s] $name: exit $rc" | tee -a "$LOG"
}

STEP="$PY benchmarks/step.py --device $DEVICE --warmup $WARMUP --iters $ITERS"
BSGAL="$PY benchmarks/bsgal.py --device $DEVICE --warmup $BSGAL_WARMUP --iters $BSGAL_ITERS"

# Training step, batch 2 per GPU, fp32 (as the heads always are) against bf16 autocast (Accelerate's).
bench "step train r50 fp32/bf16" 2 $STEP --modes train --backbone r50 --size $R50_SIZE --precision fp32 bf16
if [ "$(grep -vc '"error"' "$JSONL")" = 0 ]; then
    ABORT="the first command gave no result"
    echo "$ABORT; the rest is skipped. The end of $LOG:"
    tail -n 5 "$LOG"
fi
bench "step train swinl fp32/bf16" 2 $STEP --modes train --backbone swinl --size $SWINL_SIZE \
    --precision fp32 bf16
bench "step train swinl bf16 batch $BIG_TRAIN" 1 $STEP --modes train --backbone swinl --size $SWINL_SIZE \
    --precision bf16 --batch $BIG_TRAIN
# Inference at the test size, batch 1 and a larger batch.
bench "step infer r50 bf16" 2 $STEP --modes infer --backbone r50 --infer-size $INFER_SIZE \
    --precision bf16 --infer-batch 1 $BIG_INFER
bench "step infer swinl bf16" 2 $STEP --modes infer --backbone swinl --infer-size $INFER_SIZE \
    --precision bf16 --infer-batch 1 $BIG_INFER
# BSGAL: every mode, bf16 (grad cache vs lookahead: time and extra memory).
bench "bsgal r50 bf16" 5 $BSGAL --backbone r50 --size $R50_SIZE --precision bf16
bench "bsgal swinl bf16" 5 $BSGAL --backbone swinl --size $SWINL_SIZE --precision bf16
# Extras, while the budget lasts: the heads under autocast too; the reference pass in fp32 (the engine before it
# ran the selector under accelerator.autocast()).
bench "step train swinl bf16 amp-heads" 1 $STEP --modes train --backbone swinl --size $SWINL_SIZE \
    --precision bf16 --amp-heads
bench "bsgal swinl bf16 autocast-forward" 2 $BSGAL --backbone swinl --size $SWINL_SIZE --precision bf16 \
    --autocast forward --modes fused-accept lookahead

{
    echo
    sizes=$([ "$SMOKE" = 1 ] && echo ', SMOKE sizes')
    echo "## Detector benchmarks ($DEVICE$sizes, $(($(date +%s) - START)) s)"
    echo
    echo "step.py: warm-up $WARMUP, median of $ITERS; memory = torch.cuda peaks over the timed steps (GiB)."
    echo
    $PY benchmarks/step.py --summary "$JSONL"
    echo
    echo "bsgal.py: warm-up $BSGAL_WARMUP, median of $BSGAL_ITERS; extra = peak alloc minus plain's."
    echo
    $PY benchmarks/bsgal.py --summary "$JSONL"
    echo
    [ ${#SKIPPED[@]} -gt 0 ] && printf 'skipped: %s\n' "${SKIPPED[@]}"
    errors=$(grep -c '"error"' "$JSONL")
    echo "rows: $(wc -l <"$JSONL") in $JSONL; errors: $errors; log: $LOG"
    if [ "$errors" != 0 ]; then  # the first traceback, so that the cause shows in the output's tail
        echo
        echo "first traceback in $LOG:"
        awk '/^Traceback/ {on = 1; print; next} on {print} on && !/^[ \t]/ {exit}' "$LOG" | tail -n 25
    fi
} 2>&1 | tee -a "$LOG"
