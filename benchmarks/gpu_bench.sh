#!/usr/bin/env bash
# GPU speed check: builds a paper-setting bundle (f_{1:12}, 256², c_d 200), exports fp32 and fp16,
# and prints images/s and p50/p99 latency for the CUDA and TensorRT providers at batch 1/8/32.
# On a machine without an NVIDIA GPU it runs the same steps on the CPU with tiny settings (used by CI).
#
#   benchmarks/gpu_bench.sh [OUT_DIR]
#
# Environment overrides: PYTHON, LW_SIZE, LW_LAYERS, LW_CD, LW_BATCHES, LW_PROVIDERS, LW_ITERS, LW_DEVICE=cpu|gpu.
# Speed does not depend on trained CAE weights, so the CAE is random; the backbone uses the real VGG19 weights
# when `linewatch fetch-weights` has stored them, else random weights (the summary says which).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
OUT=${1:-${TMPDIR:-/tmp}/linewatch-gpu-bench}
mkdir -p "$OUT"
START=$(date +%s)

device=${LW_DEVICE:-}
if [[ -z "$device" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi

cuda_loads() {
  "$PY" - <<'EOF'
import sys
import onnxruntime as ort
from linewatch.line.engine import preload_gpu_libraries
preload_gpu_libraries()
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 1)
EOF
}

if [[ "$device" == gpu ]]; then
  nvidia-smi -L
  if ! cuda_loads; then
    wheel=$(ls "$ROOT"/.whl/onnxruntime_gpu-*.whl 2>/dev/null | head -n1 || true)
    if [[ -n "$wheel" ]]; then
      echo "installing carried $wheel"
      "$PY" -m pip install --no-deps --force-reinstall -q "$wheel"
    else
      echo "onnxruntime lacks the CUDA provider and no .whl/onnxruntime_gpu-*.whl is carried" >&2
    fi
  fi
  SIZE=${LW_SIZE:-256}; LAYERS=${LW_LAYERS:-1:12}; CD=${LW_CD:-200}
  BATCHES=${LW_BATCHES:-1,8,32}; PROVIDERS=${LW_PROVIDERS:-cuda,tensorrt}; ITERS=${LW_ITERS:-50}
  REFERENCE=--no-reference  # the naive reference is a CPU torch model: measured by benchmarks/cpu_speed.py
else
  SIZE=${LW_SIZE:-64}; LAYERS=${LW_LAYERS:-1:4}; CD=${LW_CD:-16}
  BATCHES=${LW_BATCHES:-1,2}; PROVIDERS=${LW_PROVIDERS:-cpu}; ITERS=${LW_ITERS:-3}
  REFERENCE=
fi
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

BUNDLE="$OUT/bundle"
rm -rf "$BUNDLE"
"$PY" - "$BUNDLE" "$LAYERS" "$SIZE" "$CD" <<'EOF'
import sys
from linewatch.training.weights import resolve
from linewatch.errors import BundleError
from linewatch.export.synthetic import make_untrained_bundle
out, layers, size, c_d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    resolve()
    random_init = False
except BundleError:
    random_init = True
make_untrained_bundle(out, layers, size, c_d, random_init=random_init)
print(f"bundle: f_{{{layers}}} at {size}x{size}, c_d {c_d}, backbone "
      f"{'RANDOM weights (no VGG19 weights found)' if random_init else 'real VGG19 weights'}, untrained CAE")
EOF
"$PY" -m linewatch.cli export "$BUNDLE" --fp16

status=0
IFS=',' read -ra provs <<<"$PROVIDERS"
for prov in "${provs[@]}"; do
  for precision in fp32 fp16; do
    echo "== $prov $precision"
    if ! "$PY" -m linewatch.cli bench "$BUNDLE" --provider "$prov" --batch "$BATCHES" --iters "$ITERS" \
        --precision "$precision" \
        $REFERENCE --json "$OUT/bench_${prov}_${precision}.json"; then
      echo "FAILED: $prov $precision" >&2
      status=1
    fi
    REFERENCE=--no-reference  # the reference is the same for every provider: measure it once
  done
done

"$PY" - "$OUT" <<'EOF'
import glob, json, sys
print(f"{'provider':<10} {'prec':<5} {'batch':>5} {'images/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
for path in sorted(glob.glob(f"{sys.argv[1]}/bench_*.json")):
    report = json.load(open(path))
    prec = report["results"][0]["precision"] if report["results"] else "?"
    for r in report["results"]:
        print(f"{r['provider']:<10} {prec:<5} {r['batch']:>5} {r['images_per_s']:>10.1f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f}   ({'/'.join(r['providers'])})")
EOF
echo "total $(( $(date +%s) - START )) s"
exit $status
