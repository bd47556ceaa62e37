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
    timeout 120 hybridcls bench speed --device cuda --images "$IMAGES" --workers "$WORKERS" \
        --out "$OUT/work" "$@" | tee "$OUT/$name.txt" || echo "!! $name failed or timed out"
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
print(f"| {name} | {r['end-to-end, full hybrid (img/s)']:.0f} | {r['model-only (img/s)']:.0f} | "
      f"{r['pipeline efficiency (end-to-end / model-only)']:.2f} | {r['naive baseline (img/s)']:.0f} |")
PY
done
