#!/usr/bin/env bash
# The GPU run of benchmarks/generate.py on one lent H100 / H200: SD 1.5 at fp16 and bf16 (batch 1/4/8/16),
# SAM ViT-H and CLIP ViT-L/14, all with random weights; about 3 minutes of wall time.
#
#   bash benchmarks/device_generate.sh OUTDIR                          # on the GPU machine
#   DEVICE=cpu SMOKE=1 bash benchmarks/device_generate.sh /tmp/smoke   # the plumbing, toy sizes on a CPU (~10 min)
#
# Writes OUTDIR/generate.log (everything) and OUTDIR/generate.jsonl (one JSON object per measured row, appended as
# each is measured) and prints a Markdown summary last. Each part is its own process under `timeout`: a missing
# package, an out-of-memory or a hang costs that part only, and the rows it measured before stay in the JSON.
# Needs python3 with torch (CUDA), diffusers, transformers, open_clip (+ ftfy), segment_anything, pycocotools,
# opencv; a missing one is reported, not fatal. No `set -e`: the script always reaches the summary.
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
log=$out/generate.log
jsonl=$out/generate.jsonl
: >"$log"
: >"$jsonl"
# The repository first; keep a PYTHONPATH set by the caller (e.g. carried wheels installed into /tmp/site).
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
begin=$SECONDS
DEVICE=${DEVICE:-cuda}
if [ "${SMOKE:-0}" = 1 ]; then  # --full code paths at toy sizes; CPUs are slow, so no real time limits
    args=(--full --smoke --repeats 1 --threads 2)
    t_gen=1000 t_sam=1000 t_clip=1000 t_pool=100 budget=100000
else  # each part: process start, imports, model build, warm-ups, timed calls
    args=(--full)
    t_gen=105 t_sam=35 t_clip=40 t_pool=25 budget=90
fi

echo "== environment" >>"$log"
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
echo "GPU: $gpu" >>"$log"
packages=$(timeout 60 python3 - 2>&1 <<'EOF'
import importlib

found, missing = [], []
for module in ("torch", "diffusers", "transformers", "open_clip", "ftfy", "segment_anything", "pycocotools",
               "cv2", "safetensors", "PIL"):
    try:
        m = importlib.import_module(module)
    except Exception as e:  # report any import failure (missing, or a broken dependency) by name
        missing.append(f"{module} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        continue
    found.append(f"{module} {getattr(m, '__version__', 'present')}")
import torch

cuda = torch.cuda.is_available() and torch.cuda.get_device_name(0)
print(f"packages: {', '.join(found)}; missing: {'; '.join(missing) or 'none'}; CUDA: {cuda or 'not available'}")
EOF
)
echo "$packages" >>"$log"

status="| part | exit | seconds | outcome |
|---|---:|---:|---|"
part() {  # part NAME SECONDS ARGS...: one generate.py process under timeout, its exit status kept for the summary
    local name=$1 limit=$2 start=$SECONDS rc outcome
    shift 2
    echo "== $name (timeout ${limit}s): python3 benchmarks/generate.py --json $jsonl $*" >>"$log"
    timeout -k 10 "$limit" python3 benchmarks/generate.py --json "$jsonl" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) outcome="ok" ;;
        124 | 137) outcome="timed out after ${limit}s: the rows measured before are kept" ;;
        1) outcome="errors: see the table and generate.log" ;;
        *) outcome="failed: see generate.log" ;;
    esac
    status="$status
| $name | $rc | $((SECONDS - start)) | $outcome |"
    echo "== $name: exit $rc, $((SECONDS - start)) s" >>"$log"
}

# Generation stops starting new (precision, batch) settings it predicts would end after --budget-s.
part generate "$t_gen" --device "$DEVICE" --repeats 2 "${args[@]}" --stages generate --budget-s "$budget"
part annotate "$t_sam" --device "$DEVICE" "${args[@]}" --stages annotate
part clip "$t_clip" --device "$DEVICE" "${args[@]}" --stages clip
part pool "$t_pool" --device cpu "${args[@]}" --stages pool

summary=$(timeout 60 python3 benchmarks/generate.py --summarize "$jsonl" 2>&1)
{
    echo
    echo "# device_generate.sh summary ($((SECONDS - begin)) s wall)"
    echo
    echo "GPU: $gpu"
    echo
    echo "$packages"
    echo
    echo "$status"
    echo
    echo "$summary"
} | tee -a "$log"
exit 0
