#!/usr/bin/env bash
# The GPU check (docs/BENCHMARKS.md, "GPU"): what a session with a lent GPU runs, as one command.
#
#   bash benchmarks/gpu_bench.sh [OUT_DIR]   # OUT_DIR: default $OUT (the device tool's), else /tmp/linewatch-gpu-out
#   bash benchmarks/gpu_bench.sh --stash     # only keep the carried onnxruntime-gpu piece (.ortgpu/NN/) for later
#
# Made for the GPU machine as it comes: Python 3.12 with torch, the plain onnxruntime (no CUDA provider), OpenCV,
# PyYAML, tqdm, but no pydantic, no pyzmq, no package registry, and at most 64 MiB carried per call:
#  - wheels carried in .whl/ (benchmarks/gpu_prepare.py wheels) are installed offline into $WORK/site;
#  - onnxruntime-gpu pieces carried in .ortgpu/NN/ (benchmarks/gpu_prepare.py ortgpu), one per call, are kept in
#    $LW_STORE, which outlives a call while the machine stays warm; once all are there they are joined, checked
#    against the wheel's sha256 and installed into $WORK/site, ahead of the image's onnxruntime;
#  - the tree's linewatch (export/ as linewatch.export) is made importable without installing anything.
# Then benchmarks/gpu_check.py runs its stages (environment, bundle, onnxruntime, torch, daemon) within LW_BUDGET_S
# seconds and writes OUT_DIR/gpu_check.json, gpu_check.txt and gpu_check.log (nothing else goes to OUT_DIR).
# Without an NVIDIA GPU the same steps run on the CPU with tiny settings (CI, benchmarks/gpu_rehearsal.sh).
#
# Environment: PYTHON (python3), LW_WORK, LW_STORE, LW_BUDGET_S (240), LW_DEVICE=gpu|cpu, LW_BUNDLE (an exported
# bundle to measure instead of making one: where torch is absent), LW_SIZE, LW_LAYERS, LW_CD, LW_BATCHES, LW_ITERS,
# LW_PROVIDERS, LW_TORCH_VARIANTS, LW_DAEMON=auto|on|off, LW_STAGES (onnxruntime,torch,daemon: which to run),
# LW_REQUIRE (stages that must run: ort,torch,daemon).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
STORE=${LW_STORE:-${TMPDIR:-/tmp}/linewatch-ortgpu}
export PYTHONUNBUFFERED=1

if [[ -d .ortgpu ]]; then
  "$PY" benchmarks/gpu_prepare.py stash --carried .ortgpu --store "$STORE" || exit 1
fi
if [[ "${1:-}" == --stash ]]; then
  ls -l "$STORE"/*/ 2>/dev/null
  exit 0
fi

OUT_DIR=${1:-${OUT:-${TMPDIR:-/tmp}/linewatch-gpu-out}}
WORK=${LW_WORK:-${TMPDIR:-/tmp}/linewatch-gpu-work}
mkdir -p "$OUT_DIR" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(cd "$WORK" && pwd)

pip_offline() {  # into $WORK/site, never from a registry
  PIP_NO_INDEX=1 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$WORK/site" "$@"
}

link_nvidia() {
  # onnxruntime.preload_dlls looks for CUDA and cuDNN in nvidia/ beside its own folder: an onnxruntime-gpu in
  # $WORK/site would miss the image's (torch's) nvidia-* wheels and fail to load the CUDA provider
  "$PY" - "$WORK/site/nvidia" <<'EOF'
import importlib.util, os, sys
try:
    spec = importlib.util.find_spec("nvidia")
except (ImportError, ValueError):
    spec = None
dest, linked = sys.argv[1], []
for portion in list(spec.submodule_search_locations or []) if spec else []:
    for name in sorted(os.listdir(portion)):
        if not os.path.exists(os.path.join(dest, name)) and os.path.isdir(os.path.join(portion, name)):
            os.makedirs(dest, exist_ok=True)
            os.symlink(os.path.join(portion, name), os.path.join(dest, name))
            linked.append(name)
print(f"nvidia wheels linked for onnxruntime: {', '.join(linked) or 'none found'}")
EOF
}

setup() {
  local start wheels wheel
  start=$(date +%s)
  rm -rf "$WORK/site" "$WORK/src" "$WORK/wheels"
  mkdir -p "$WORK/site" "$WORK/src"
  wheels=(.whl/*.whl)
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "carried wheels are for CPython 3.12 (the GPU machine's): not installed for $("$PY" -V 2>&1)"
  elif [[ -e "${wheels[0]}" ]]; then
    echo "installing ${#wheels[@]} carried wheels offline: ${wheels[*]##*/}"
    pip_offline "${wheels[@]}" || return 1
  fi
  if [[ -d "$STORE" ]] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' &&
    wheel=$("$PY" benchmarks/gpu_prepare.py join --store "$STORE" --dest "$WORK/wheels"); then
    echo "installing joined $wheel"
    pip_offline "$wheel" || return 1
    rm -f "$wheel"
  fi
  if [[ -d "$WORK/site/onnxruntime" ]]; then
    link_nvidia
  fi
  # the tree's sources, importable as installed: linewatch, and export/ as linewatch.export
  if [[ -d linewatch && -d export ]]; then
    cp -r linewatch "$WORK/src/linewatch"
    ln -s "$ROOT/export" "$WORK/src/linewatch/export"
  else
    echo "no linewatch/ and export/ in $ROOT: using the installed linewatch"
  fi
  echo "setup $(($(date +%s) - start)) s"
}

check() {
  local args=(--out "$OUT_DIR" --work "$WORK" --budget-s "${LW_BUDGET_S:-240}")
  [[ -n "${LW_DEVICE:-}" ]] && args+=(--device "$LW_DEVICE")
  [[ -n "${LW_BUNDLE:-}" ]] && args+=(--bundle "$(cd "$LW_BUNDLE" && pwd)")
  [[ -n "${LW_SIZE:-}" ]] && args+=(--size "$LW_SIZE")
  [[ -n "${LW_LAYERS:-}" ]] && args+=(--layers "$LW_LAYERS")
  [[ -n "${LW_CD:-}" ]] && args+=(--c-d "$LW_CD")
  [[ -n "${LW_BATCHES:-}" ]] && args+=(--batches "$LW_BATCHES")
  [[ -n "${LW_ITERS:-}" ]] && args+=(--iters "$LW_ITERS")
  [[ -n "${LW_PROVIDERS:-}" ]] && args+=(--providers "$LW_PROVIDERS")
  [[ -n "${LW_TORCH_VARIANTS:-}" ]] && args+=(--torch-variants "$LW_TORCH_VARIANTS")
  [[ -n "${LW_DAEMON:-}" ]] && args+=(--daemon "$LW_DAEMON")
  [[ -n "${LW_STAGES:-}" ]] && args+=(--stages "$LW_STAGES")
  [[ -n "${LW_REQUIRE:-}" ]] && args+=(--require "$LW_REQUIRE")
  "$PY" benchmarks/gpu_check.py "${args[@]}"
}

main() {
  echo "linewatch GPU check: $("$PY" -V 2>&1) at $(command -v "$PY"), tree $ROOT, out $OUT_DIR, work $WORK"
  setup || { echo "setup failed" >&2; return 1; }
  PYTHONPATH="$WORK/site:$WORK/src${PYTHONPATH:+:$PYTHONPATH}" check
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
