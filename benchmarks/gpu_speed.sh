#!/usr/bin/env bash
# GPU speed benchmark: `hybridcls bench speed --device cuda` at a few batch sizes, with and
# without torch.compile and GPU JPEG decoding. Installs nothing; needs the project installed
# and a CUDA device. Meant to finish in under 5 minutes on an H200 (random weights, offline).
#
#   bash benchmarks/gpu_speed.sh [OUT_DIR]
set -euo pipefail
OUT="${1:-hybridcls-bench-gpu}"
IMAGES="${IMAGES:-4096}"
WORKERS="${WORKERS:-12}"
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

run() {  # name, extra flags...
    local name="$1"; shift
    echo "== $name: $*"
    # 500x375 only (4096 camera-size files would take long to write); the GPU's own precision
    timeout 120 hybridcls bench speed --device cuda --images "$IMAGES" --workers "$WORKERS" \
        --sizes 500x375 --precisions auto --out "$OUT/work" "$@" | tee "$OUT/$name.txt" \
        || echo "!! $name failed or timed out"
    cp "$OUT/work/speed.json" "$OUT/$name.json" 2>/dev/null || true
}

run bs256 --batch-size 256
run bs512 --batch-size 512
run bs512-gpudecode --batch-size 512 --gpu-decode
run bs512-compile-gpudecode --batch-size 512 --compile --gpu-decode

echo
echo "| run | end-to-end img/s | model-only img/s | efficiency | naive img/s |"
echo "|---|---:|---:|---:|---:|"
for f in "$OUT"/bs*.json; do
    python - "$f" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["rows"]
name = sys.argv[1].rsplit("/", 1)[-1][:-5]
row = lambda start: next(v for k, v in r.items() if k.startswith(start))  # names carry the precision
print(f"| {name} | {row('end-to-end, full hybrid, 500x375, auto'):.0f} | {row('model-only, auto'):.0f} | "
      f"{r['pipeline efficiency (end-to-end / model-only)']:.2f} | {row('naive baseline, 500x375'):.0f} |")
PY
done
