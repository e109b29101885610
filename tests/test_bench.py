"""`linewatch bench` and benchmarks/gpu_bench.sh (CPU path), run for real on tiny bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linewatch.errors import ConfigError
from linewatch.evaluation.bench import latency_stats, parse_batches
from linewatch.export.cli import export_bundle
from linewatch.export.synthetic import make_untrained_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    path = make_untrained_bundle(tmp_path_factory.mktemp("bench") / "b", "1:4", 32, c_d=8, random_init=True)
    export_bundle(path)
    return path


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "linewatch.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.unit
def test_latency_stats_by_hand():
    stats = latency_stats([0.1, 0.2, 0.3, 0.4], batch=2)
    assert stats["iters"] == 4
    assert stats["images_per_s"] == pytest.approx(8 / 1.0)
    assert stats["p50_ms"] == pytest.approx(250.0)
    assert stats["p99_ms"] == pytest.approx(397.0)  # linear interpolation between 300 and 400 ms


@pytest.mark.unit
def test_parse_batches():
    assert parse_batches("1, 8,32") == [1, 8, 32]
    for bad in ("", "0", "1,x"):
        with pytest.raises(ConfigError, match="--batch"):
            parse_batches(bad)


@pytest.mark.e2e
def test_bench_reports_engine_reference_and_ratios(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench", str(tiny_bundle), "--batch", "1,2", "--provider", "cpu", "--iters", "3", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["providers"] == ["CPUExecutionProvider"] and r["iters"] == 3
        assert r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] and r["peak_rss_mb"] > 10
    ref = report["reference"]
    assert ref["providers"] == ["torch-cpu"] and ref["batch"] == 1 and ref["images_per_s"] > 0
    for ratio, r in zip(report["ratios"], report["results"]):
        assert ratio["speedup_per_image"] == pytest.approx(r["images_per_s"] / ref["images_per_s"])
        assert ratio["memory_ratio"] == pytest.approx(ref["peak_rss_mb"] / r["peak_rss_mb"])
    assert "naive torch reference" in result.stdout and "faster per image" in result.stdout


@pytest.mark.e2e
def test_bench_without_checkpoint_says_why_the_reference_is_skipped(deviation_bundle):
    result = run_cli("bench", str(deviation_bundle), "--batch", "1", "--provider", "cpu", "--iters", "2", "--json", "-")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "model.pt" in report["reference"]["skipped"]
    assert "reference: skipped" in result.stderr


@pytest.mark.e2e
def test_bench_unknown_provider_is_a_usage_error(deviation_bundle):
    result = run_cli("bench", str(deviation_bundle), "--provider", "gpu9")
    assert result.returncode == 2 and "unknown provider" in result.stderr


@pytest.fixture(scope="module")
def gpu_tools():
    """benchmarks/gpu_prepare.py and gpu_check.py as modules (stdlib only at import; benchmarks/ is no package)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
        import gpu_prepare

        yield gpu_prepare, gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def gpu_cpu_run(tmp_path_factory):
    """benchmarks/gpu_bench.sh on the CPU, once: (completed process, OUT folder, its gpu_check.json)."""
    tmp = tmp_path_factory.mktemp("gpu_bench")
    env = dict(
        os.environ,
        LW_DEVICE="cpu",
        LW_SIZE="32",
        LW_CD="8",
        LW_DAEMON="off",  # the daemon stage runs in benchmarks/gpu_rehearsal.sh
        LW_REQUIRE="ort,torch",
        LW_WORK=str(tmp / "work"),
        LW_STORE=str(tmp / "store"),
        PYTHON=sys.executable,
    )
    env.pop("OUT", None)
    out = tmp / "out"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result, out, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.e2e
def test_gpu_bench_script_cpu_path(gpu_cpu_run):
    """The GPU check's command on the CPU: the ONNX Runtime stage end to end; only three files land in OUT."""
    result, out, report = gpu_cpu_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.txt"]
    stages = report["stages"]
    assert stages["environment"]["onnxruntime"]["providers"][-1] == "CPUExecutionProvider"
    ort = stages["onnxruntime"]
    assert ort["status"] == "ok"
    assert sorted((r["precision"], r["batch"]) for r in ort["results"]) == [
        ("fp16", 1),
        ("fp16", 2),
        ("fp32", 1),
        ("fp32", 2),
    ]
    assert all(r["providers"] == ["CPUExecutionProvider"] and r["images_per_s"] > 0 for r in ort["results"])
    assert stages["daemon"]["status"] == "skipped" and stages["daemon"]["reason"] == "--daemon off"
    table = (out / "gpu_check.txt").read_text()
    assert "onnxruntime  cpu        fp16      2" in table and "not judged here" in table
    assert table in result.stdout


@pytest.mark.e2e
def test_gpu_bench_torch_stage_runs_on_the_cpu(gpu_cpu_run):
    """The torch way to a number (FusedDFR as a module) cannot rot: eager fp16/fp32 run here, CUDA-only skipped."""
    _, out, report = gpu_cpu_run
    torch_stage = report["stages"]["torch"]
    assert torch_stage["status"] == "ok" and torch_stage["backend"] == "torch" and torch_stage["device"] == "cpu"
    rows = {(r["precision"], r["batch"]): r for r in torch_stage["results"]}
    assert set(rows) == {("fp16", 1), ("fp16", 2), ("fp32", 1), ("fp32", 2)}
    assert all(r["variant"] == "eager" and r["images_per_s"] > 0 for r in rows.values())
    assert rows[("fp32", 2)]["map_err"] == 0.0  # the same module as the reference
    assert 0 < rows[("fp16", 2)]["map_err"] < 2e-2  # the fp16 ONNX graph's export tolerance
    assert {s["reason"] for s in torch_stage["skipped"]} == {"cudagraph needs CUDA", "compile needs CUDA"}
    assert "torch        eager      fp32      1" in (out / "gpu_check.txt").read_text()


@pytest.mark.unit
def test_gpu_pieces_split_stash_join(gpu_tools, tmp_path):
    """The onnxruntime-gpu wheel's way there: pieces carried one call at a time, joined only when all are in."""
    gpu_prepare, _ = gpu_tools
    wheel = tmp_path / "onnxruntime_gpu-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(os.urandom(10_000))
    folders = gpu_prepare.split(wheel, tmp_path / "carried", piece_bytes=3_000)
    assert [f.name for f in folders] == ["01", "02", "03", "04"]
    assert all((f / "piece").stat().st_size <= 3_000 for f in folders)
    store, dest = tmp_path / "store", tmp_path / "joined"
    for folder in folders[:3]:  # one call per piece: only that piece is carried
        call = tmp_path / "call" / folder.name
        call.parent.mkdir(exist_ok=True)
        folder.rename(call)
        assert gpu_prepare.stash(call.parent, store) == 1
        call.rename(folder)
        assert gpu_prepare.join(store, dest) is None  # incomplete: nothing installed yet
    bad = folders[3] / "piece"
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    assert gpu_prepare.stash(folders[3].parent, store) == 3  # the first three again; the corrupt one refused
    assert gpu_prepare.join(store, dest) is None
    gpu_prepare.split(wheel, tmp_path / "again", piece_bytes=3_000)
    assert gpu_prepare.stash(tmp_path / "again", store) == 4
    joined = gpu_prepare.join(store, dest)
    assert joined is not None and joined.name == wheel.name and joined.read_bytes() == wheel.read_bytes()


@pytest.mark.unit
def test_gpu_carried_wheels_are_pinned(gpu_tools):
    """What gpu_prepare.py downloads is what CI tests: every carried package has its exact pin."""
    gpu_prepare, _ = gpu_tools
    specs = gpu_prepare.pinned([*gpu_prepare.CARRIED, gpu_prepare.ORT_GPU])
    assert [s.split("==")[0] for s in specs] == [*gpu_prepare.CARRIED, "onnxruntime-gpu"]
    assert all(s.split("==")[1] for s in specs)


@pytest.mark.e2e
def test_gpu_check_imports_only_what_the_gpu_machine_has():
    """Every module the GPU check imports (torch side included) comes from the GPU image's packages or .whl/;
    in fresh interpreters, so that only the check's imports are counted."""
    script = ROOT / "benchmarks" / "gpu_prepare.py"
    result = subprocess.run([sys.executable, str(script), "audit"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "lacks: none" in result.stdout, result.stdout + result.stderr
    probe = "import gpu_prepare; print(gpu_prepare.audit(('radon.complexity',)))"  # a dev tool the image lacks
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks"
    )
    assert result.stdout.strip() == "['radon (radon)']", result.stdout + result.stderr


def _row(backend, how, precision, batch, images_per_s, p99_ms):
    return {
        "backend": backend,
        "variant" if backend == "torch" else "provider": how,
        "precision": precision,
        "batch": batch,
        "images_per_s": images_per_s,
        "p50_ms": p99_ms / 2,
        "p99_ms": p99_ms,
    }


@pytest.mark.unit
def test_gpu_table_judges_the_goals_at_paper_settings_only(gpu_tools):
    _, gpu_check = gpu_tools
    rows = [
        _row("torch", "eager", "fp16", 32, 1500.0, 30.0),
        _row("torch", "cudagraph", "fp16", 32, 2400.0, 14.0),
        _row("torch", "cudagraph", "fp32", 1, 400.0, 2.9),
        _row("torch", "eager", "fp16", 1, 300.0, 4.0),
    ]
    report = {
        "started": "2026-12-01T00:00:00+00:00",
        "device": "gpu",
        "seconds": 100.0,
        "stages": {
            "environment": {"status": "ok", "gpus": ["NVIDIA H200, 580.159.04, 143771 MiB"], "onnxruntime": {}},
            "bundle": {"status": "ok", "input": [256, 256], "layers": "1:12", "c_d": 200, "weights": "random"},
            "onnxruntime": {"status": "skipped", "reason": "cuda: onnxruntime 1.30.0 has no CUDA provider"},
            "torch": {"status": "ok", "results": rows},
            "daemon": {"status": "skipped", "reason": "needs the ONNX Runtime CUDA provider"},
        },
    }
    table = gpu_check.format_table(report)
    assert "goals, torch: batch 32 fp16 2400 img/s (cudagraph) (goal >= 2000)" in table
    assert "batch 1 p99 2.90 ms (cudagraph fp32) (goal <= 3 ms)" in table
    assert "goals, onnxruntime" not in table  # nothing measured there: no line claims it
    assert "RANDOM VGG19 weights" in table and "stage onnxruntime: skipped" in table
    report["stages"]["bundle"]["input"] = [64, 64]
    assert "not judged here" in gpu_check.format_table(report)
