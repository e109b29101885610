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


@pytest.mark.e2e
def test_gpu_bench_script_cpu_path(tmp_path):
    env = dict(os.environ, LW_DEVICE="cpu", LW_SIZE="32", LW_CD="8", PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), str(tmp_path / "gb")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    reports = {p.name: json.loads(p.read_text()) for p in (tmp_path / "gb").glob("bench_*.json")}
    assert set(reports) == {"bench_cpu_fp32.json", "bench_cpu_fp16.json"}
    for report in reports.values():
        assert [r["batch"] for r in report["results"]] == [1, 2]
        assert all(r["images_per_s"] > 0 for r in report["results"])
    assert "images_per_s" in reports["bench_cpu_fp32.json"]["reference"]
    assert "cpu        fp16      2" in result.stdout
