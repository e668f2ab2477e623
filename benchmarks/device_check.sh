#!/usr/bin/env bash
# Everything this project checks on a lent GPU, in one run that ends within DEADLINE_S seconds (default 545):
# the CUDA tests, a short bf16 training run with paste + BSGAL and the generation chain on CUDA, then the detector
# benchmarks (device_detector.sh) and the generation benchmarks (device_generate.sh). From the repository root on
# the GPU machine, with wheels of the packages it lacks in .whl/ (diffusers, open_clip_torch, segment_anything, ...):
#
#   bash benchmarks/device_check.sh OUTDIR
#
# Each part has its own timeout, cut to the time left, and a failing part does not stop the others. OUTDIR gets at
# most 7 files, results first: detector.jsonl and generate.jsonl (one JSON line per measurement), the logs
# (parts.log, detector.log, generate.log), the generation run's summary and the training metrics.
set -u
OUTDIR=${1:?usage: bash benchmarks/device_check.sh OUTDIR}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/parts.log
DEADLINE_S=${DEADLINE_S:-545}
START=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
SUMMARY=()

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see parts.log)"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, diffusers, open_clip, segment_anything, lvis; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'open_clip', open_clip.__version__)" 2>&1 | tail -n 1 | tee -a "$LOG"

# part NAME WANT_S CMD...: run CMD with a timeout of WANT_S seconds, cut to what is left before the deadline.
part() {
    local name=$1 want=$2 left rc t0
    shift 2
    left=$((DEADLINE_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("SKIP  $name (no time left)")
        return
    fi
    [ "$want" -gt "$left" ] && want=$left
    t0=$(date +%s)
    echo "[$((t0 - START))s] $name (timeout ${want}s)" | tee -a "$LOG"
    echo "\$ $*" >>"$LOG"
    timeout -k 5 "$want" "$@" >"$OUTDIR/.part.log" 2>&1
    rc=$?
    cat "$OUTDIR/.part.log" >>"$LOG"
    SUMMARY+=("$(printf '%-6s %s: %ds' "$([ $rc = 0 ] && echo ok || echo rc=$rc)" "$name" $(($(date +%s) - t0)))")
    tail -n 2 "$OUTDIR/.part.log"
    rm -f "$OUTDIR/.part.log"
}

part tests_cuda 75 python3 -m pytest -q -p no:cacheprovider tests/test_bsgal.py -k cuda
part demo_data 30 python3 -m divergen.synthetic --root data/synthetic --pool-per-category 40
part train_bf16_bsgal 70 env ACCELERATE_MIXED_PRECISION=bf16 python3 train.py --config configs/demo.toml \
    --set train.output_dir=output/gpu_bsgal --set train.max_iter=60 --set train.checkpoint_period=60 \
    --set train.log_period=10 --set data.num_workers=6 --set paste.enabled=true --set bsgal.enabled=true
part tiny_models 30 python3 -m divergen.tiny_models --root data/tiny_models
part generate_cuda 45 python3 generate.py --config configs/generate_demo.toml --no-progress --set device=cuda \
    --set output_dir=output/generate_cuda --set prompts.images_per_category=2 \
    --set 'generators=[{kind="sd", model="data/tiny_models/sd", dtype="float16", steps=10, size=64, batch_size=8}]'
part detector_bench 170 env BUDGET_S=135 HARD_S=165 bash benchmarks/device_detector.sh "$OUTDIR"
part generate_bench 180 bash benchmarks/device_generate.sh "$OUTDIR"

cp output/generate_cuda/report/summary.json "$OUTDIR/generate_cuda_summary.json" 2>/dev/null
cp output/gpu_bsgal/metrics.jsonl "$OUTDIR/train_bf16_bsgal_metrics.jsonl" 2>/dev/null
echo "== device_check.sh summary ($(($(date +%s) - START))s)"
printf '%s\n' "${SUMMARY[@]}"
