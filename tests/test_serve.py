"""`linewatch serve` (a real Triton Inference Server through PyTriton, run from its own virtual environment) and
`linewatch export --triton-repository` (parsed with Triton's own model-config schema).

The server side needs numpy<2 (PyTriton 0.7), so it lives in the serve venv: LINEWATCH_SERVE_PYTHON, default
~/.cache/linewatch-ci/serve-venv/bin/python (docs/SCALING.md says how to create it). One server per module."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from linewatch import bundle
from linewatch.errors import BundleError
from linewatch.line.engine import Engine
from linewatch.serving.repository import model_name, write_repository
from linewatch.serving.server import put_interpreter_libpython_first
from tests.bundles import deviation_graph, make_deviation_bundle
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE_VENV_HELP = (
    "create the serve venv: python -m venv ~/.cache/linewatch-ci/serve-venv && "
    "env -u PIP_CONSTRAINT ~/.cache/linewatch-ci/serve-venv/bin/pip install -e '.[serve]' "
    "(or point LINEWATCH_SERVE_PYTHON at a Python with linewatch[serve])"
)
MAX_BATCH = 8
READY = re.compile(r"serving: grpc=\S+ http=\S+ model=linewatch-[0-9a-f]{16}")
STARTUP_S = 90


def serve_python() -> str:
    path = os.environ.get("LINEWATCH_SERVE_PYTHON") or str(Path.home() / ".cache/linewatch-ci/serve-venv/bin/python")
    if not Path(path).is_file():
        pytest.fail(f"no serve venv at {path}: {SERVE_VENV_HELP}")
    return path


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


class Served:
    """`linewatch serve` as a subprocess; its stdout+stderr collected by a thread."""

    def __init__(self, model: Path, *extra: str):
        self.grpc_port, self.http_port, self.metrics_port = distinct_ports(3)
        cmd = [
            serve_python(),
            "-m",
            "linewatch.cli",
            "serve",
            str(model),
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            # tritonserver shares the pipe and may split its own lines around ours: search the text
            found = READY.search(self.output)
            if found:
                return found.group(0)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"linewatch serve did not become ready (rc={self.proc.poll()}):\n{self.output[-4000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture(scope="module")
def served(deviation_bundle):
    server = Served(
        deviation_bundle,
        "--max-batch",
        str(MAX_BATCH),
        "--preferred-batch-sizes",
        "4,8",
        "--max-queue-delay-us",
        "20000",
        "--providers",
        "cpu",
    )
    try:
        server.ready_line = server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_engine(deviation_bundle):
    return Engine(deviation_bundle, "cpu")


def graph_name(bundle_dir: Path) -> str:
    return model_name(bundle.read_metadata(bundle_dir)["graph"]["sha256"])


def metrics(server: Served, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("nv_inference") and f'model="{name}"' in line and "reason=" not in line:
            out[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def infer_grpc(client: grpcclient.InferenceServerClient, name: str, frames: np.ndarray):
    inp = grpcclient.InferInput(bundle.INPUT_NAME, list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames)
    result = client.infer(name, [inp], model_version="1")
    return result.as_numpy(bundle.OUTPUT_MAP), result.as_numpy(bundle.OUTPUT_SCORE)


def infer_http(client: httpclient.InferenceServerClient, name: str, frames: np.ndarray):
    inp = httpclient.InferInput(bundle.INPUT_NAME, list(frames.shape), "UINT8")
    inp.set_data_from_numpy(frames, binary_data=True)
    result = client.infer(name, [inp], model_version="1")
    return result.as_numpy(bundle.OUTPUT_MAP), result.as_numpy(bundle.OUTPUT_SCORE)


@pytest.mark.e2e
def test_served_maps_equal_the_local_engine_over_grpc_and_http_with_concurrent_clients(served, local_engine):
    name = graph_name(local_engine.bundle_dir)
    assert f"model={name}" in served.ready_line and f"grpc=127.0.0.1:{served.grpc_port}" in served.ready_line
    rng = np.random.default_rng(7)
    # noise, plus grey with a white square, so maps span 0..1 with structure
    work = []
    for worker in range(6):
        batches = []
        for k in range(4):
            n = 1 + (worker + k) % 3
            frames = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
            frames[0, 8:24, 8:24] = 255
            batches.append(frames)
        work.append(batches)
    expected = [[local_engine.score(f) for f in batches] for batches in work]

    def client_run(worker: int) -> float:
        if worker % 2 == 0:
            client, call = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}"), infer_grpc
        else:
            client, call = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}"), infer_http
        worst = 0.0
        for frames, (want_map, want_score) in zip(work[worker], expected[worker]):
            got_map, got_score = call(client, name, frames)
            assert got_map.shape == want_map.shape and got_map.dtype == np.float32
            assert got_score.shape == (len(frames), 1)  # Triton serves a batch-only tensor as N×1
            worst = max(
                worst, float(np.abs(got_map - want_map).max()), float(np.abs(got_score[:, 0] - want_score).max())
            )
        client.close()
        return worst

    with ThreadPoolExecutor(6) as pool:
        worst = max(pool.map(client_run, range(6)))
    assert worst <= 1e-5
    assert float(np.max([m.max() for batch in expected for m, _ in batch])) > 0.9  # the square was scored


@pytest.mark.e2e
def test_dynamic_batcher_merges_requests_from_clients(served, deviation_bundle):
    name = graph_name(deviation_bundle)
    before = metrics(served, name)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    frames = np.full((1, 64, 64, 3), 128, np.uint8)
    errors: list[object] = []
    done = threading.Event()

    def callback(result, error) -> None:
        errors.append(error)
        if len(errors) == 16:
            done.set()

    for _ in range(16):
        inp = grpcclient.InferInput(bundle.INPUT_NAME, [1, 64, 64, 3], "UINT8")
        inp.set_data_from_numpy(frames)
        client.async_infer(name, [inp], callback, model_version="1")
    assert done.wait(30)
    assert errors == [None] * 16
    deadline = time.monotonic() + 10  # Triton refreshes its metrics on a period, not on every request
    while True:
        after = metrics(served, name)
        counted = after["nv_inference_count"] - before["nv_inference_count"]
        if counted >= 16 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 16
    assert after["nv_inference_count"] - before["nv_inference_count"] == 16
    # 16 single-frame requests within the 20 ms queue delay: at most MAX_BATCH frames per execution
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert 16 / MAX_BATCH <= executions < 16
    client.close()


@pytest.mark.e2e
def test_metadata_and_config_carry_the_graphs_signature_and_hash(served, local_engine):
    sha = local_engine.graph_sha256
    name = graph_name(local_engine.bundle_dir)
    assert name == "linewatch-" + sha[:16]
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    assert client.is_model_ready(name, "1")
    assert not client.is_model_ready(name, "2")
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("linewatch-" + "0" * 16)
    meta = client.get_model_metadata(name, "1", as_json=True)
    assert meta["versions"] == ["1"]
    session = local_engine.session
    got_inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert got_inputs == {i.name: ("UINT8", [-1, *i.shape[1:]]) for i in session.get_inputs()}
    got_outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert got_outputs == {
        bundle.OUTPUT_MAP: ("FP32", [-1, 64, 64]),
        bundle.OUTPUT_SCORE: ("FP32", [-1, 1]),
    }
    assert {o.name for o in session.get_outputs()} == set(got_outputs)
    config = client.get_model_config(name, as_json=True)["config"]
    assert int(config["max_batch_size"]) == MAX_BATCH
    assert config["dynamic_batching"]["preferred_batch_size"] == [4, 8]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 20000
    http = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    assert http.is_server_ready() and http.is_model_ready(name, "1")
    assert http.get_model_metadata(name, "1")["outputs"] == [
        {"name": bundle.OUTPUT_MAP, "datatype": "FP32", "shape": [-1, 64, 64]},
        {"name": bundle.OUTPUT_SCORE, "datatype": "FP32", "shape": [-1, 1]},
    ]


@pytest.mark.e2e
def test_a_wrong_frame_size_is_refused_and_the_server_keeps_serving(served, local_engine):
    name = graph_name(local_engine.bundle_dir)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        infer_grpc(client, name, np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(InferenceServerException, match=f"batch-size must be <= {MAX_BATCH}"):
        infer_grpc(client, name, np.zeros((MAX_BATCH + 1, 64, 64, 3), np.uint8))
    frames = np.full((2, 64, 64, 3), 255, np.uint8)
    got_map, _ = infer_grpc(client, name, frames)
    assert np.abs(got_map - local_engine.score(frames)[0]).max() <= 1e-5


@pytest.mark.e2e
def test_sigterm_stops_the_server_cleanly(served):
    assert served.proc.poll() is None
    assert served.stop() == 0
    assert "serving: stopped" in served.output
    for port in (served.grpc_port, served.http_port, served.metrics_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.e2e
def test_serve_refuses_a_bundle_without_a_graph(tmp_path):
    bundle_dir = make_deviation_bundle(tmp_path / "b", 64, 64)
    meta = bundle.read_metadata(bundle_dir)
    del meta["graph"]
    bundle.write_metadata(bundle_dir, meta)
    server = Served(bundle_dir)
    assert server.proc.wait(60) == 3  # BundleError
    server.stop()
    assert "no 'graph' section: the bundle is not exported (run linewatch export)" in server.output
    assert "serving:" not in server.output


def parse_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def add_fp16_graph(bundle_dir: Path, height: int, width: int) -> str:
    """A second graph the bundle records as its fp16 one (different bytes, so a different hash and name)."""
    graph = deviation_graph(height, width)
    graph.graph.name = "deviation-fp16"
    onnx.save(graph, str(bundle_dir / bundle.GRAPH_FP16))
    meta = bundle.read_metadata(bundle_dir)
    sha = bundle.sha256_file(bundle_dir / bundle.GRAPH_FP16)
    meta["graph"].update(fp16_file=bundle.GRAPH_FP16, fp16_sha256=sha)
    bundle.write_metadata(bundle_dir, meta)
    return sha


@pytest.mark.integration
def test_triton_repository_parses_with_tritons_schema(tmp_path):
    bundle_dir = make_deviation_bundle(tmp_path / "b", 64, 48)
    sha32 = bundle.read_metadata(bundle_dir)["graph"]["sha256"]
    add_fp16_graph(bundle_dir, 64, 64)  # a graph for another frame size is refused, nothing is written
    with pytest.raises(BundleError, match="do not match"):
        write_repository(bundle_dir, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    sha16 = add_fp16_graph(bundle_dir, 64, 48)
    written = write_repository(bundle_dir, tmp_path / "repo", max_batch=16, preferred=[4, 8], max_queue_delay_us=750)
    assert [d.name for d in written] == [model_name(sha32), model_name(sha16)]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(d.name for d in written)
    for model_dir, sha, precision in zip(written, (sha32, sha16), ("FP32", "FP16")):
        config = parse_config(model_dir)
        assert config.name == model_dir.name == "linewatch-" + sha[:16]
        assert config.backend == "onnxruntime"
        assert config.max_batch_size == 16
        assert list(config.version_policy.specific.versions) == [1]
        assert bundle.sha256_file(model_dir / "1" / "model.onnx") == sha
        assert config.parameters["graph_sha256"].string_value == sha
        (inp,) = config.input
        assert (inp.name, inp.data_type, list(inp.dims)) == ("frames", model_config_pb2.TYPE_UINT8, [64, 48, 3])
        amap, score = config.output
        assert (amap.name, amap.data_type, list(amap.dims)) == ("anomaly_map", model_config_pb2.TYPE_FP32, [64, 48])
        assert (score.name, score.data_type, list(score.dims)) == ("image_score", model_config_pb2.TYPE_FP32, [1])
        assert score.HasField("reshape") and list(score.reshape.shape) == []
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.dynamic_batching.max_queue_delay_microseconds == 750
        (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt"
        assert trt.parameters["precision_mode"] == precision
        assert trt.parameters["trt_profile_max_shapes"] == "frames:16x64x48x3"


@pytest.mark.e2e
def test_export_triton_repository_command_keeps_the_exported_graph(tmp_path):
    bundle_dir = make_deviation_bundle(tmp_path / "b", 64, 64)
    before = (bundle_dir / bundle.GRAPH).read_bytes()
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from linewatch.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)",
            "export",
            str(bundle_dir),
            "--triton-repository",
            str(tmp_path / "repo"),
            "--triton-max-batch",
            "4",
            "--triton-preferred-batch-sizes",
            "2,4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "no re-export" in run.stdout
    assert (bundle_dir / bundle.GRAPH).read_bytes() == before
    (model_dir,) = (tmp_path / "repo").iterdir()
    config = parse_config(model_dir)
    assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    bad = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "export", str(bundle_dir), "--triton-repository", str(tmp_path / "r2")]
        + ["--triton-max-batch", "4", "--triton-preferred-batch-sizes", "8"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode == 2 and "preferred batch sizes [8] must lie in 1..4" in bad.stderr
    assert not (tmp_path / "r2").exists()


@pytest.mark.unit
def test_the_interpreters_own_libpython_goes_first_on_ld_library_path():
    import sysconfig

    environ = {"LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu:/opt/x"}
    lib = put_interpreter_libpython_first(environ)
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert lib is None and environ["LD_LIBRARY_PATH"] == "/usr/lib/x86_64-linux-gnu:/opt/x"
        return
    assert lib is not None and (lib / sysconfig.get_config_var("LDLIBRARY")).exists()
    assert environ["LD_LIBRARY_PATH"] == f"{lib}:/usr/lib/x86_64-linux-gnu:/opt/x"
    put_interpreter_libpython_first(environ)  # idempotent
    assert environ["LD_LIBRARY_PATH"].split(":").count(str(lib)) == 1


@pytest.mark.integration
def test_the_serve_venv_is_the_pinned_one():
    """CI creates the serve venv with -c config/serve-constraints.txt: what it tests is what the pins say."""
    pins = dict(
        line.split("==")
        for line in (ROOT / "config" / "serve-constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    code = (
        "import importlib.metadata as md, json, sys\n"
        "out = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        out[name] = md.version(name)\n"
        "    except md.PackageNotFoundError:\n"
        "        out[name] = None\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run(
        [serve_python(), "-c", code, json.dumps(sorted(pins))], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    installed = json.loads(run.stdout)
    wrong = {name: (installed[name], want) for name, want in pins.items() if installed[name] != want}
    assert not wrong, f"serve venv differs from config/serve-constraints.txt (installed, pinned): {wrong}"
    assert pins["numpy"].startswith("1.") and "nvidia-pytriton" in pins


@pytest.mark.unit
def test_a_model_load_failure_is_summarised_with_the_python_error_it_carries():
    from linewatch.serving.server import error_summary

    exc = RuntimeError(
        "[400] load failed for model 'linewatch-c36f0cf68b9c0cfb': version 1 is at UNAVAILABLE state: "
        "Model initialize error: Traceback (most recent call last):\n"
        '  File "/tmp/x/1/model.py", line 419, in initialize\n'
        "    self._serializer_deserializer.start(data_socket)\n"
        "AttributeError: '_thread.RLock' object has no attribute '_recursion_count'\n"
        "\nAt:\n  model.py(454): initialize\n"
    )
    text = error_summary(exc)
    assert text.startswith("[400] load failed for model 'linewatch-c36f0cf68b9c0cfb'")
    assert text.endswith("AttributeError: '_thread.RLock' object has no attribute '_recursion_count'")
    assert "model.py" not in text
    assert error_summary(TimeoutError()) == "TimeoutError"
