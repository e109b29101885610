#!/usr/bin/env bash
# Rehearses the GPU check here, in the GPU machine's situation, so that a lent GPU is not spent finding out what is
# missing (docs/BENCHMARKS.md, "GPU"). CI runs the default form.
#
#   bash benchmarks/gpu_rehearsal.sh            # ~1 min with pip's cache
#   bash benchmarks/gpu_rehearsal.sh --ortgpu   # also carries onnxruntime-gpu in pieces, one call each (~255 MB)
#
# 1. A fresh Python 3.12 venv with the GPU machine's packages that the check can touch, at its versions where
#    known (numpy 2.5.2, onnx 1.23.1, onnxruntime 1.30.0 without CUDA; OpenCV headless, Pillow, PyYAML, tqdm,
#    prometheus-client). Left out, and so refused if the check imports them: torch (several GB with its CUDA
#    libraries; no CPU-only wheel on the registry; its path is tested in the main environment by
#    tests/test_bench.py), matplotlib and h5py (the check does not need them), pydantic and pyzmq (absent there
#    too: they must come from the carried wheels).
# 2. What travels, prepared here as a developer would: .whl/ (benchmarks/gpu_prepare.py wheels, fetched when
#    absent), .gpucheck/bundle (a tiny bundle exported with this environment's torch, because the venv has none);
#    and `gpu_prepare.py audit`: every module the check imports, torch side included, is from a distribution the
#    GPU image holds or .whl/ carries.
# 3. The tree copied as the device tool sends it: tracked files, untracked files git does not ignore, shared/, and
#    the carried paths; the 64 MiB limit checked per call.
# 4. Offline: a network namespace without network (unshare -n, loopback up), PIP_NO_INDEX=1, no pip config, an
#    empty HOME, only the venv on PATH before the system's; the device command of docs/BENCHMARKS.md runs there.
# 5. What comes back is checked: at most 8 files of at most 16 MiB in OUT, the onnxruntime and daemon stages ran,
#    torch was skipped for being absent, and the venv's versions are the GPU machine's.
#
# Environment: PYTHON (the build side here: python), LW_PY312 (a Python 3.12; default: python3.12 or pyenv's),
# LW_REHEARSAL_DIR (default: a new temporary folder, removed at the end unless LW_KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
ORTGPU=0
[[ "${1:-}" == --ortgpu ]] && ORTGPU=1
START=$(date +%s)
LIMIT=$((64 * 1024 * 1024))
# the GPU machine's packages the check may import (docs: /work/.library/device/KINDS.md as read 2026-11)
# nvidia-cuda-runtime stands for torch's CUDA 13 wheels there (2 MB of them): onnxruntime-gpu must find them
BOX_PACKAGES=(numpy==2.5.2 onnx==1.23.1 onnxruntime==1.30.0 opencv-python-headless pillow pyyaml tqdm prometheus-client
  nvidia-cuda-runtime==13.0.96)

REH=${LW_REHEARSAL_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/linewatch-rehearsal.XXXXXX")}
mkdir -p "$REH"
cleanup() { [[ "${LW_KEEP:-0}" == 1 || -n "${LW_REHEARSAL_DIR:-}" ]] || rm -rf "$REH"; }
trap cleanup EXIT
say() { echo "[rehearsal $(($(date +%s) - START)) s] $*"; }

find_py312() {
  local candidate
  for candidate in "${LW_PY312:-}" "$(command -v python3.12 || true)" \
    "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
    if [[ -n "$candidate" && -x "$candidate" ]] &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python 3.12 found: set LW_PY312 (pyenv install 3.12)" >&2
  return 1
}

make_venv() {
  local py312
  py312=$(find_py312)
  "$py312" -m venv "$REH/venv"
  # the GPU machine's versions, not CI's pins (.ci/run exports PIP_CONSTRAINT=config/constraints.txt)
  env -u PIP_CONSTRAINT "$REH/venv/bin/python" -m pip install -q --disable-pip-version-check "${BOX_PACKAGES[@]}" 2>&1 |
    grep -v "is ignored: it is neither a file nor a directory" || true
  "$REH/venv/bin/python" -c "import numpy, onnx, onnxruntime, cv2, yaml, tqdm, prometheus_client, PIL"
  say "venv: $("$REH/venv/bin/python" -V), $("$REH/venv/bin/python" -m pip list --format=freeze 2>/dev/null | tr '\n' ' ')"
}

prepare_carried() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" benchmarks/gpu_prepare.py wheels 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  fi
  rm -rf .gpucheck/bundle
  mkdir -p .gpucheck
  "$PY" - <<'EOF'
from linewatch.export.cli import export_bundle
from linewatch.export.synthetic import make_untrained_bundle

export_bundle(make_untrained_bundle(".gpucheck/bundle", "1:4", 64, 16, random_init=True), fp16=True)
EOF
  say "carried: .whl/ $(du -sh .whl | cut -f1), .gpucheck/ $(du -sh .gpucheck | cut -f1)"
  # the torch side cannot run in the venv: hold its imports to the image's package list here instead
  "$PY" benchmarks/gpu_prepare.py audit
}

copy_tree() {  # DEST CARRIED...: the tree as the device tool sends it, plus the carried paths
  local dest=$1 size
  shift
  rm -rf "$dest"
  mkdir -p "$dest"
  {
    git ls-files -z --cached --others --exclude-standard
    [[ -d shared ]] && find shared -type f -print0
    for path in "$@"; do find "$path" -type f -print0; done
  } | "$PY" -c '
import os, shutil, sys
dest = sys.argv[1]
for name in sorted(set(p for p in sys.stdin.buffer.read().decode().split("\0") if p)):
    if os.path.isfile(name) and not os.path.islink(name):
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(name, target)
' "$dest"
  size=$(du -sb "$dest" | cut -f1)
  if ((size > LIMIT)); then
    echo "the tree with ${*:-nothing} carried is $((size / 1048576)) MiB: over the device tool's 64 MiB" >&2
    return 1
  fi
  echo "$size"
}

offline() {  # TREE OUT COMMAND: run COMMAND in TREE as on the GPU machine: no network, no index, venv python3
  local tree=$1 out=$2 cmd=$3 netns=()
  mkdir -p "$out" "$REH/home" "$REH/tmp"
  if unshare -n true 2>/dev/null && command -v ip >/dev/null; then
    netns=(unshare -n)
    cmd="ip link set lo up && $cmd"
  else
    say "no network namespace here (unshare -n): offline by PIP_NO_INDEX only"
  fi
  (cd "$tree" && env -i PATH="$REH/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" HOME="$REH/home" \
    TMPDIR="$REH/tmp" OUT="$out" PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null LANG=C.UTF-8 \
    LW_BUNDLE=.gpucheck/bundle LW_REQUIRE=ort,daemon \
    "${netns[@]}" bash -c "$cmd")
}

check_out() {  # OUT plain|ortgpu: what the device tool would bring back, and what the check must have done
  "$PY" - "$1" "$2" <<'EOF'
import json, re, sys
from pathlib import Path

out, ortgpu = Path(sys.argv[1]), sys.argv[2] == "ortgpu"
files = [p for p in out.rglob("*") if p.is_file()]
assert len(files) <= 8, f"{len(files)} files in OUT: the device tool returns 8 at most"
for p in files:
    assert p.stat().st_size <= 16 * 1024 * 1024, f"{p} over 16 MiB"
    assert len(p.relative_to(out).parts) <= 3 and re.fullmatch(r"[A-Za-z0-9._-]+", p.name), p
report = json.loads((out / "gpu_check.json").read_text())
stages, env = report["stages"], report["stages"]["environment"]
assert env["python"].startswith("3.12."), env["python"]
want = {"numpy": "2.5.2", "onnx": "1.23.1", "onnxruntime": "1.30.0"}  # the image's; onnxruntime-gpu beside it
for name, version in want.items():
    assert env["versions"][name] == version, (name, env["versions"][name])
assert not env["modules"]["torch"] and not env["modules"]["matplotlib"], env["modules"]
assert env["versions"]["pydantic"] and env["versions"]["pyzmq"], "carried wheels not installed"
for name in ("onnxruntime", "daemon"):
    assert stages[name]["status"] == "ok", (name, stages[name])
assert stages["torch"]["status"] == "skipped", stages["torch"]
assert ("not in --stages" if ortgpu else "torch is not installed") in stages["torch"]["reason"], stages["torch"]
ort = env["onnxruntime"]
if ortgpu:
    assert env["versions"]["onnxruntime-gpu"] and ort["version"] == env["versions"]["onnxruntime-gpu"], ort
    assert "CUDAExecutionProvider" in ort["providers"] and "/site/" in ort["file"], ort
    # preload_dlls found the image's CUDA runtime wheel through the nvidia/ links gpu_bench.sh made beside it
    assert any(p.endswith("/nvidia/cu13/lib/libcudart.so.13") for p in ort["cuda_libraries"]), ort
rows = stages["onnxruntime"]["results"]
print(f"checked OUT: {len(files)} files; onnxruntime {ort['version']} from {ort['file']}; {len(rows)} ORT rows; "
      f"daemon {stages['daemon']['images_per_s']:.0f} results/s; torch {stages['torch']['reason']}")
EOF
}

say "in $REH"
make_venv
say "venv ready"
prepare_carried
# the calls docs/BENCHMARKS.md gives, in order; .gpucheck only because this venv has no torch to make a bundle
call() {  # NAME EXPECT COMMAND CARRIED...
  local name=$1 expect=$2 cmd=$3 size t
  shift 3
  size=$(copy_tree "$REH/tree" .gpucheck "$@")
  t=$(date +%s)
  rm -rf "$REH/out"
  if [[ "$expect" == stash ]]; then
    offline "$REH/tree" "$REH/out" "$cmd" >/dev/null
  else
    offline "$REH/tree" "$REH/out" "$cmd"
    check_out "$REH/out" "$expect"
  fi
  say "call $name ($*): $((size / 1048576)) MiB travel, the command took $(($(date +%s) - t)) s"
}
if ((ORTGPU)); then
  [[ -f .ortgpu/05/manifest.json ]] || "$PY" benchmarks/gpu_prepare.py ortgpu
  call A plain "bash benchmarks/gpu_bench.sh" .whl .ortgpu/01
  for k in 02 03 04; do
    call "B$k" stash "bash benchmarks/gpu_bench.sh --stash" ".ortgpu/$k"
  done
  call E ortgpu "LW_STAGES=onnxruntime,daemon bash benchmarks/gpu_bench.sh" .whl .ortgpu/05
else
  call A plain "bash benchmarks/gpu_bench.sh" .whl
fi
say "rehearsal passed"
