"""What the GPU check carries to the lent GPU machine, and how it is put back together there (stdlib only).

The GPU machine has no package registry and takes at most 64 MiB of the working tree per call
(docs/BENCHMARKS.md, "GPU"). Its image lacks pydantic and pyzmq (the daemon path needs them) and has the plain
`onnxruntime`, most likely without the CUDA provider. So:

Here, with a registry (versions from config/constraints.txt, wheels for CPython 3.12 on manylinux x86-64):
  python benchmarks/gpu_prepare.py wheels              # .whl/: pydantic, pydantic-core, annotated-types,
                                                       # typing-inspection, typing-extensions, pyzmq (~5 MB)
  python benchmarks/gpu_prepare.py ortgpu              # .ortgpu/01 .. NN/: the onnxruntime-gpu wheel (~255 MB)
                                                       # in pieces of <= 60 MB, each with a manifest

  python benchmarks/gpu_prepare.py audit               # every import of the check (torch side too) is in the
                                                       # GPU image's package list or carried (exit 1 if not)

There (stdlib only; benchmarks/gpu_bench.sh calls these):
  python3 benchmarks/gpu_prepare.py stash --store DIR  # copy the carried .ortgpu/NN/ pieces into DIR (checked)
  python3 benchmarks/gpu_prepare.py join --store DIR --dest DIR
                                                       # all pieces there: join, check the sha256, print the
                                                       # wheel's path (exit 0); else say how many (exit 3)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "config" / "constraints.txt"
WHEELS_DIR = ROOT / ".whl"
PIECES_DIR = ROOT / ".ortgpu"
# what the GPU machine's image lacks for the check's daemon path (typing-extensions: pydantic needs a recent one)
CARRIED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pyzmq")
ORT_GPU = "onnxruntime-gpu"
PIECE_BYTES = 60_000_000  # <= 60 MB a piece: with the tree (~2 MB) one call stays under 64 MiB
CARRY_LIMIT = 64 * 1024 * 1024
INCOMPLETE = 3
# Python packages the GPU machine's image holds ('cuda' image, as read 2026-11-17; the device tool's KINDS.md)
IMAGE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flax
    flatbuffers fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
    humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping
    jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
    mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
    requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
    tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)
# what the check imports on the GPU machine: its scripts, and the linewatch commands they run as subprocesses
CHECK_MODULES = (
    "gpu_check",
    "gpu_torch",
    "gpu_daemon",
    "linewatch.cli",
    "linewatch.evaluation.bench",
    "linewatch.line.engine",
    "linewatch.line.daemon",
    "linewatch.calibrate.store",
    "linewatch.export.cli",
    "linewatch.export.synthetic",
    "linewatch.training.weights",
)
MANIFEST = "manifest.json"
PIECE = "piece"


def pinned(names: tuple[str, ...] | list[str], constraints: Path = CONSTRAINTS) -> list[str]:
    """`name==version` for each name, from the exact pins CI tests (config/constraints.txt)."""
    pins: dict[str, str] = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"{constraints}: no pin for {', '.join(missing)}")
    return [f"{n}=={pins[n]}" for n in names]


def platform_args() -> list[str]:
    """CPython 3.12 wheels that install on the GPU machine (Ubuntu 24.04: glibc 2.39)."""
    tags = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
    args = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps"]
    for tag in tags:
        args += ["--platform", tag]
    return args


def download(specs: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "-q", *platform_args(), "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)
    return sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheels(dest: Path = WHEELS_DIR) -> list[Path]:
    """The small wheels the check installs offline there; one version of each (two would stop pip)."""
    if dest.is_dir():
        for old in dest.glob("*.whl"):
            old.unlink()
    wheels = download(pinned(CARRIED), dest)
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 1e6:7.2f} MB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 1e6:.1f} MB in {dest}")
    return wheels


def split(wheel: Path, dest: Path, piece_bytes: int = PIECE_BYTES) -> list[Path]:
    """dest/01 .. dest/NN, each a piece of `wheel` and a manifest naming the whole: carried one per call."""
    if dest.is_dir():
        shutil.rmtree(dest)
    size = wheel.stat().st_size
    count = max(1, -(-size // piece_bytes))
    each = -(-size // count)  # equal pieces, each <= piece_bytes
    whole = {"wheel": wheel.name, "size": size, "sha256": sha256(wheel), "pieces": count}
    folders = []
    with open(wheel, "rb") as f:
        for index in range(1, count + 1):
            folder = dest / f"{index:02d}"
            folder.mkdir(parents=True)
            data = f.read(each)
            (folder / PIECE).write_bytes(data)
            piece = {"index": index, "bytes": len(data), "piece_sha256": hashlib.sha256(data).hexdigest()}
            (folder / MANIFEST).write_text(json.dumps({**whole, **piece}, indent=1) + "\n")
            folders.append(folder)
    return folders


def fetch_ortgpu(dest: Path = PIECES_DIR, piece_bytes: int = PIECE_BYTES) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="ortgpu_") as tmp:
        (wheel,) = download(pinned([ORT_GPU]), Path(tmp))
        folders = split(wheel, dest, piece_bytes)
    for folder in folders:
        print(f"{(folder / PIECE).stat().st_size / 1e6:6.1f} MB  {folder}")
    return folders


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and {"sha256", "index", "pieces", "wheel"} <= meta.keys() else None


def stash(carried: Path, store: Path) -> int:
    """Copy each carried piece whose own sha256 checks into store/<wheel sha256[:16]>/; returns how many."""
    count = 0
    for folder in sorted(p for p in carried.glob("*") if p.is_dir()) if carried.is_dir() else []:
        meta = read_manifest(folder)
        if meta is None or not (folder / PIECE).is_file():
            continue
        if sha256(folder / PIECE) != meta["piece_sha256"]:
            print(f"piece {folder} does not match its manifest: not stashed", file=sys.stderr)
            continue
        target = store / str(meta["sha256"])[:16]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / PIECE, target / f"{int(meta['index']):02d}.piece")
        (target / f"{int(meta['index']):02d}.json").write_text(json.dumps(meta))
        print(f"stashed piece {meta['index']} of {meta['pieces']} of {meta['wheel']} in {target}")
        count += 1
    return count


def join(store: Path, dest: Path) -> Path | None:
    """The wheel from a complete, checked set of pieces in `store`, or None (what is missing goes to stderr)."""
    for target in sorted(p for p in store.glob("*") if p.is_dir()) if store.is_dir() else []:
        metas = [json.loads(p.read_text()) for p in sorted(target.glob("*.json"))]
        if not metas:
            continue
        need = int(metas[0]["pieces"])
        have = sorted({int(m["index"]) for m in metas})
        if have != list(range(1, need + 1)):
            print(f"{metas[0]['wheel']}: {len(have)} of {need} pieces in {target}", file=sys.stderr)
            continue
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / str(metas[0]["wheel"])
        with open(wheel, "wb") as out:
            for index in range(1, need + 1):
                with open(target / f"{index:02d}.piece", "rb") as f:
                    shutil.copyfileobj(f, out)
        if sha256(wheel) != metas[0]["sha256"]:
            wheel.unlink()
            print(f"{target}: the joined pieces do not match the wheel's sha256", file=sys.stderr)
            continue
        return wheel
    return None


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def audit(modules: tuple[str, ...] = CHECK_MODULES) -> list[str]:
    """Distributions the check's imports need that neither the GPU machine's image nor .whl/ provides.

    Run where the whole check can import (the build side here: torch included): every non-stdlib top-level module
    loaded afterwards is mapped to its distribution. The rehearsal's venv has no torch, so this is how the torch
    side of the check (export, torch stage) is held to the image's package list."""
    import importlib
    import importlib.metadata

    here = str(Path(__file__).resolve().parent)
    sys.path.insert(0, here)
    try:
        for module in modules:
            importlib.import_module(module)
    finally:
        sys.path.remove(here)
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    owners = importlib.metadata.packages_distributions()
    have = {normalise(n) for n in IMAGE_PACKAGES | set(CARRIED)} | {"onnxruntime-gpu"}  # either onnxruntime
    missing = set()
    for top in {name.split(".")[0] for name in list(sys.modules)} - stdlib:
        dists = {normalise(d) for d in owners.get(top, [])} - {"linewatch"}
        if dists and not dists & have:
            missing.add(f"{top} ({', '.join(sorted(dists))})")
    return sorted(missing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheels", help="download the small carried wheels into .whl/")
    w.add_argument("--dest", type=Path, default=WHEELS_DIR)
    o = sub.add_parser("ortgpu", help="download onnxruntime-gpu and split it into .ortgpu/NN/")
    o.add_argument("--dest", type=Path, default=PIECES_DIR)
    o.add_argument("--piece-bytes", type=int, default=PIECE_BYTES)
    s = sub.add_parser("stash", help="copy carried pieces into a store that outlives the call")
    s.add_argument("--carried", type=Path, default=PIECES_DIR)
    s.add_argument("--store", type=Path, required=True)
    sub.add_parser("audit", help="check the check's imports against the GPU image's packages and .whl/")
    j = sub.add_parser("join", help="join a complete set of pieces; print the wheel path")
    j.add_argument("--store", type=Path, required=True)
    j.add_argument("--dest", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "wheels":
        fetch_wheels(args.dest)
    elif args.command == "ortgpu":
        fetch_ortgpu(args.dest, args.piece_bytes)
    elif args.command == "stash":
        stash(args.carried, args.store)
    elif args.command == "audit":
        missing = audit()
        print("imports the GPU machine lacks: " + (", ".join(missing) or "none"))
        return 1 if missing else 0
    else:
        wheel = join(args.store, args.dest)
        if wheel is None:
            return INCOMPLETE
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
