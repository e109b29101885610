"""Recipes (product changeover) with the daemon as a subprocess: a real video camera, real ZeroMQ sockets, two real
ONNX bundles that score the same frame differently (tests/bundles.py's |grey - 128| / 127 and a twin centred on
100), switched by trigger `recipe` requests; golden sets gating switches, reloads and `verify` requests."""

from __future__ import annotations

import re
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from linewatch import bundle
from linewatch.calibrate.store import write_calibration
from linewatch.errors import ConfigError
from linewatch.line.config import load_config
from linewatch.line.trigger import RequestError, parse_request
from linewatch.protocol.client import TriggerClient
from tests.bundles import make_deviation_bundle
from tests.helpers import free_port, grey, with_white_square, write_video
from tests.test_daemon import Subscriber, daemon_log, start_daemon, status_fields, stop, write_config

PERIOD = 4  # video frame i shows a white square when i % PERIOD == 1
N_FRAMES = 8


def centred_bundle(path: Path, mid: float) -> Path:
    """A twin of the deviation bundle whose map is |grey - mid| / 127: another graph (another model id) that scores
    every frame differently, so a result shows which recipe judged it."""
    make_deviation_bundle(path, 64, 64)
    model = onnx.load(str(path / bundle.GRAPH))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "mid":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(mid, np.float32), "mid"))
    onnx.save(model, str(path / bundle.GRAPH))
    meta = bundle.read_metadata(path)
    meta["graph"]["sha256"] = bundle.sha256_file(path / bundle.GRAPH)
    bundle.write_metadata(path, meta)
    return path


def expected_score(recipe: str, frame_index: int) -> float:
    """What each recipe's graph gives the video's frame (frame_index counts from 1, the video loops)."""
    square = (frame_index - 1) % N_FRAMES % PERIOD == 1
    level = 255.0 if square else 128.0
    mid = 128.0 if recipe == "default" else 100.0
    return abs(level - mid) / 127.0


def write_golden(root: Path, good: list[np.ndarray], defect: list[np.ndarray]) -> Path:
    for kind, images in (("good", good), ("defect", defect)):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            assert cv2.imwrite(str(root / kind / f"{kind}_{i}.png"), img)
    return root


@pytest.fixture
def bundles(deviation_bundle, tmp_path):
    """Recipe default: the deviation bundle at 0.5; recipe b: the twin centred on 100 at 0.4 (grey 128 scores 0.22:
    OK); recipe broken: a bundle whose calibration file is garbage."""
    a = tmp_path / "bundle_a"
    shutil.copytree(deviation_bundle, a)
    write_calibration(a, 0.5, min_defect_area=4)
    b = centred_bundle(tmp_path / "bundle_b", 100.0)
    write_calibration(b, 0.4, min_defect_area=4)
    broken = tmp_path / "bundle_broken"
    shutil.copytree(deviation_bundle, broken)
    (broken / bundle.CALIBRATION).write_text('{"version": ')
    return a, b, broken


def recipe_config(tmp_path: Path, a: Path, recipes: dict, **sections) -> tuple[Path, str, str]:
    video = write_video(tmp_path / "line.avi", [with_white_square() if i % PERIOD == 1 else grey() for i in range(8)])
    trigger = f"tcp://127.0.0.1:{free_port()}"
    camera = {"name": "cam1", "kind": "video", "source": str(video), "loop": True, "fps": 50}
    camera |= {"frames_are_parts": True, "queue_size": 1000}  # a frame that could not be judged would be an ERROR
    config, endpoint = write_config(
        tmp_path, a, [camera], trigger={"enabled": True, "endpoint": trigger, "timeout_s": 5.0}, **sections
    )
    data = yaml.safe_load(config.read_text())
    data["recipes"] = recipes
    config.write_text(yaml.safe_dump(data))
    return config, endpoint, trigger


def control(client: TriggerClient, **request) -> dict:
    reply, mask = client.request(request, timeout_s=30)
    assert mask == b""
    return reply


@pytest.mark.e2e
def test_a_changeover_during_continuous_inspection_loses_no_frame_and_mixes_no_recipes(bundles, tmp_path):
    a, b, broken = bundles
    config, endpoint, trigger = recipe_config(tmp_path, a, {"b": {"bundle": str(b)}, "broken": {"bundle": str(broken)}})
    sub = Subscriber(endpoint)  # before the daemon binds (ZeroMQ still joins only on its next reconnect try)
    proc = start_daemon(config, tmp_path)
    client = TriggerClient(trigger)
    try:
        sub.until(lambda: len(sub.results) >= 20, 60, "results of recipe default")
        assert sub.field("cam1", "recipe") == "default"

        refused = control(client, request="recipe", recipe="broken", request_id=7)
        assert refused["ok"] is False and refused["code"] == "refused" and refused["request_id"] == 7
        assert "calibration" in refused["error"] and refused["recipe"] == "default"
        unknown = control(client, request="recipe", recipe="nope")
        assert unknown["ok"] is False and unknown["code"] == "refused" and "unknown recipe 'nope'" in unknown["error"]
        n = len(sub.results)
        sub.until(lambda: len(sub.results) >= n + 20, 30, "results after the refused switches")
        assert {h["recipe"] for h in sub.results} == {"default"}  # the recipe running stayed

        t0, wall0 = time.monotonic(), time.time()
        switched = control(client, request="recipe", recipe="b")
        replied = time.monotonic() - t0
        assert switched["ok"] is True and switched["recipe"] == "b" and switched["previous"] == "default"
        sub.until(lambda: sub.results[-1]["recipe"] == "b", 10, "results of recipe b")
        sub.until(lambda: sum(h["recipe"] == "b" for h in sub.results) >= 30, 30, "more results of recipe b")
        assert sub.field("cam1", "recipe") == "b"
        assert sub.field("cam1", "recipes")["unavailable"].keys() == {"broken"}
        assert stop(proc) == 0
        sub.poll(0.5)
    finally:
        client.close()
        stop(proc)
        sub.close()
    final = status_fields(sub.status("cam1"))
    results = sub.results
    # no frame lost: every captured frame has exactly one result, in order, none of them ERROR. The daemon's own
    # counters and seq prove it; this subscriber connected before the daemon bound, yet ZeroMQ's reconnect interval
    # can still cost it the very first message or two on a loaded box (slow joiner), never one later on
    assert final["captured"] == final["results"], final
    assert final["dropped"] == final["dropped_as_error"] == final["publish_dropped"] == final["skipped"] == 0
    seqs = [h["seq"] for h in results]
    assert seqs[0] <= 3 and seqs == list(range(seqs[0], final["results"] + 1)), (seqs[:5], seqs[-5:], final)
    assert [h["frame_index"] for h in results] == seqs
    assert {h["verdict"] for h in results} == {"OK", "NOK"}
    # no recipe mixed: one change, default before it and b after; each score is that recipe's graph on that frame
    names = [h["recipe"] for h in results]
    k = names.index("b")
    assert set(names[:k]) == {"default"} and set(names[k:]) == {"b"}
    model_ids = {h["recipe"]: h["model_id"] for h in results}
    assert model_ids["default"] != model_ids["b"]
    for h in results:
        assert h["image_score"] == pytest.approx(expected_score(h["recipe"], h["frame_index"]), abs=0.04), h
        assert h["calibration_version"] == 1
        assert h["thresholds"]["pixel"] == (0.5 if h["recipe"] == "default" else 0.4)
    log = daemon_log(tmp_path)
    assert "recipe 'broken' cannot be used" in log and "recipe switch to 'broken' refused" in log
    first_b = next(h for h in results if h["recipe"] == "b")["publish_time"] - wall0
    last_a = max(h["publish_time"] for h in results if h["recipe"] == "default") - wall0
    switch_ms = float(re.search(r"recipe default -> b \(.*\) in ([0-9.]+) ms", log).group(1))
    load_s = float(re.search(r"recipe b: model \w+, calibration 1, loaded in ([0-9.]+) s", log).group(1))
    print(
        f"\nswitch: {switch_ms:.2f} ms in the daemon, reply after {replied * 1000:.1f} ms; last result of default "
        f"published {last_a * 1000:.1f} ms, first of b {first_b * 1000:.1f} ms after the request (frames every 20 "
        f"ms); loading recipe b at start took {load_s * 1000:.1f} ms"
    )
    assert switch_ms < 1000 * load_s + 1000


@pytest.mark.e2e
def test_a_bad_golden_set_blocks_a_swap_and_force_lets_it_through(bundles, tmp_path):
    a, b, _ = bundles
    # recipe b judges a grey-100 "defect" OK (its map is centred on 100): its golden set fails
    golden_b = write_golden(tmp_path / "golden_b", [grey()], [with_white_square(), grey(100)])
    golden_a = write_golden(tmp_path / "golden_a", [grey()], [with_white_square()])
    metrics_port = free_port()
    config, endpoint, trigger = recipe_config(
        tmp_path,
        a,
        {"b": {"bundle": str(b), "golden": str(golden_b)}},
        metrics={"enabled": True, "port": metrics_port},
    )
    data = yaml.safe_load(config.read_text())
    data["model"]["golden"] = str(golden_a)
    config.write_text(yaml.safe_dump(data))
    sub = Subscriber(endpoint)
    proc = start_daemon(config, tmp_path)
    client = TriggerClient(trigger)
    try:
        sub.until(lambda: len(sub.results) >= 10, 60, "results of recipe default")
        golden = sub.field("cam1", "golden")  # the start's check of recipe default's golden set
        assert golden["recipe"] == "default" and golden["passed"] is True

        verified = control(client, request="verify")
        assert verified["ok"] is True and verified["verify"]["passed"] is True
        assert verified["verify"]["good"] == {"ok": 1, "total": 1}

        refused = control(client, request="recipe", recipe="b")
        assert refused["ok"] is False and refused["code"] == "refused" and "golden set failed" in refused["error"]
        assert [Path(f["image"]).name for f in refused["golden"]["failed"]] == ["defect_1.png"]
        sub.until(lambda: sub.field("cam1", "golden")["recipe"] == "b", 5, "the failed check in the status")
        assert sub.field("cam1", "golden")["passed"] is False
        n = len(sub.results)
        sub.until(lambda: len(sub.results) >= n + 10, 30, "results after the refusal")
        assert {h["recipe"] for h in sub.results} == {"default"}

        forced = control(client, request="recipe", recipe="b", force=True)
        assert forced["ok"] is True and forced["golden"]["passed"] is False
        sub.until(lambda: sub.results[-1]["recipe"] == "b", 10, "results of recipe b")

        failed = control(client, request="verify")  # the PLC's shift-start check of the active recipe
        assert failed["ok"] is False and failed["code"] == "verify_failed" and "defect_1.png" in failed["error"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'linewatch_golden_passed{recipe="b"} 0.0' in metrics
        assert 'linewatch_golden_passed{recipe="default"} 1.0' in metrics
        assert 'linewatch_recipe_info{recipe="b"} 1.0' in metrics
        assert 'linewatch_recipe_switches_total{outcome="refused"} 1.0' in metrics

        # a SIGHUP whose golden set fails is refused too: the running recipe (b, the PLC's choice: the config's
        # `recipe` did not change) gets a golden set it fails, so the reload is refused and b stays as it was
        (golden_a / "defect" / "not_really.png").write_bytes(cv2.imencode(".png", grey())[1].tobytes())
        data["recipes"]["b"]["golden"] = str(golden_a)
        config.write_text(yaml.safe_dump(data))
        proc.send_signal(signal.SIGHUP)
        sub.until(lambda: "reload refused" in daemon_log(tmp_path), 30, "the refused reload")
        n = len(sub.results)
        sub.until(lambda: len(sub.results) >= n + 10, 30, "results after the refused reload")
        assert {h["recipe"] for h in sub.results[n:]} == {"b"}
        assert stop(proc) == 0
    finally:
        client.close()
        stop(proc)
        sub.close()
    log = daemon_log(tmp_path)
    assert "golden set failed" in log and "forced, going live anyway" in log
    assert re.search(r"reload refused.*reload: golden set failed.*not_really\.png", log)


@pytest.mark.unit
def test_recipe_config_and_requests_are_checked(bundles, tmp_path):
    a, b, _ = bundles
    config, _, _ = recipe_config(tmp_path, a, {"b": {"bundle": str(b), "cameras": {"cam1": {"roi": [0, 0, 32, 32]}}}})
    cfg = load_config(config)
    assert cfg.recipe == "default" and cfg.recipes["b"].cameras["cam1"].roi == (0, 0, 32, 32)
    data = yaml.safe_load(config.read_text())
    for change, message in [
        ({"recipe": "c"}, "recipe: expected 'default' or a recipe"),
        ({"recipes": {"default": {"bundle": str(b)}}}, "other than 'default'"),
        ({"recipes": {"b": {"bundle": str(b), "cameras": {"cam9": {}}}}}, "a camera of this config"),
        ({"recipes": {"b": {"bundle": str(tmp_path / "missing")}}}, "an existing directory"),
    ]:
        config.write_text(yaml.safe_dump(data | change))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(config)
    assert parse_request([b'{"request": "recipe", "recipe": "b", "force": true}']).model_dump()["force"] is True
    for body, message in [
        (b'{"request": "recipe"}', "needs `recipe`"),
        (b'{"request": "reboot"}', "unknown request 'reboot'"),
        (b'{"request": "recipe", "recipe": "b", "force": "yes"}', "force"),
    ]:
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_request([body])


@pytest.mark.integration
def test_check_config_names_a_recipe_whose_bundle_cannot_judge_parts(bundles, tmp_path):
    from linewatch.line.preflight import preflight

    a, b, broken = bundles
    config, _, _ = recipe_config(tmp_path, a, {"b": {"bundle": str(b)}, "broken": {"bundle": str(broken)}})
    problems = [str(p) for p in preflight(load_config(config))]
    assert len(problems) == 1 and problems[0].startswith("recipes.broken: ") and "calibration" in problems[0]
