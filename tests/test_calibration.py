"""Threshold maths against brute force and scipy; the calibration file: validation, history, rollback, crash safety."""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from linewatch import bundle
from linewatch.calibrate.store import (
    Calibration,
    history_path,
    history_versions,
    load_calibration,
    rollback,
    save_calibration,
    write_calibration,
)
from linewatch.calibrate.thresholds import (
    beta_cdf,
    check_enough_samples,
    effective_pixel_count,
    fpr_confidence_bound,
    min_samples_for_fpr,
    pixel_threshold_for_fpr,
)
from linewatch.errors import BundleError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model(deviation_bundle, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(deviation_bundle, dst)
    return dst


# --- quantile ---------------------------------------------------------------------------------------------------


def brute_force_threshold(scores: np.ndarray, fpr: float) -> float:
    """Lowest candidate (each distinct score, or just above the max) leaving at most fpr·n scores strictly above.

    When no score may be above (fpr·n < 1), the documented answer is the next float above the max."""
    values = np.sort(scores.ravel())
    n = values.size
    allowed = Fraction(repr(fpr)) * n
    just_above_max = float(np.nextafter(values[-1], values.dtype.type(np.inf)))  # in the scores' precision
    for t in np.unique(values):
        above = int((values > t).sum())
        if above <= allowed:
            return float(t) if above > 0 or allowed >= 1 else just_above_max
    return just_above_max


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(6))
def test_threshold_equals_brute_force_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    for scores in (
        rng.random(200).astype(np.float32),  # distinct values
        rng.random(300),  # float64
        rng.integers(0, 12, 150).astype(np.float32) / 11,  # heavy ties
        np.r_[np.zeros(90), np.ones(10)].astype(np.float32),
    ):  # one tie block at the top
        for fpr in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.99):
            t = pixel_threshold_for_fpr(scores, fpr)
            assert t == brute_force_threshold(scores, fpr), (scores[:5], fpr)
            assert (scores > t).sum() <= Fraction(repr(fpr)) * scores.size


@pytest.mark.unit
def test_rate_is_exact_where_no_ties_and_typed_fractions_are_honoured():
    scores = np.arange(10, dtype=np.float32)
    assert pixel_threshold_for_fpr(scores, 0.3) == 6.0  # exactly 3 of 10 above (0.3 is 3/10, not 0.2999...)
    assert ((scores > 6.0).sum(), (scores > 5.0).sum()) == (3, 4)


@pytest.mark.unit
def test_fpr_zero_is_just_above_the_max_and_flags_nothing():
    maps = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    t = pixel_threshold_for_fpr(maps, 0.0)
    assert t > maps.max() and np.nextafter(np.float32(t), -np.float32(np.inf)) == maps.max()
    assert not (maps > t).any() and not (maps >= t).any()  # also in float32, as NumPy compares float32 maps
    wide = maps.astype(np.float64)
    assert (
        np.nextafter(wide.max(), -np.inf)
        < wide.max()
        < pixel_threshold_for_fpr(wide, 0.0)
        <= np.nextafter(wide.max(), np.inf)
    )


@pytest.mark.unit
def test_tie_block_is_never_split_so_the_realised_rate_stays_below_target():
    scores = np.r_[np.zeros(90), np.ones(10)]
    t = pixel_threshold_for_fpr(scores, 0.05)  # 5 allowed, but the top 10 are tied
    assert t == 1.0 and (scores > t).mean() == 0.0


@pytest.mark.unit
def test_constant_map():
    maps = np.full((4, 8, 8), 0.25, np.float32)
    assert pixel_threshold_for_fpr(maps, 0.01) == 0.25 and not (maps > 0.25).any()
    assert pixel_threshold_for_fpr(maps, 0.0) > 0.25


@pytest.mark.unit
@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_scores_are_refused(bad, word):
    scores = np.zeros(100, np.float32)
    scores[7] = bad
    with pytest.raises(ValueError, match=word):
        pixel_threshold_for_fpr(scores, 0.01)


@pytest.mark.unit
@pytest.mark.parametrize("fpr", [-0.1, 1.0, 1.5, float("nan")])
def test_rates_outside_zero_one_are_refused(fpr):
    with pytest.raises(ValueError, match="rate"):
        pixel_threshold_for_fpr(np.arange(10.0), fpr)


@pytest.mark.unit
def test_too_few_images_for_the_rate_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"too few samples.*0\.001.*at least 63 calibration images.*got 3"):
        check_enough_samples(3, 0.001)
    check_enough_samples(63, 0.001)
    assert min_samples_for_fpr(0.0) == 4  # "above everything seen" needs no tail
    assert min_samples_for_fpr(0.005) == 13  # 13 images * 16 regions * 0.005 >= 1
    assert min_samples_for_fpr(0.1, regions_per_image=1) == 10  # image-score rule: one unit per image
    with pytest.raises(ValueError, match="image-score.*at least 100"):
        check_enough_samples(99, 0.01, "image-score", 1)


# --- confidence bounds ------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("k, n", [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (0, 50000), (120, 40000), (7, 12)])
def test_clopper_pearson_matches_scipy(k, n):
    lo, hi = fpr_confidence_bound(k, n, 0.95)
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    assert lo == pytest.approx(ci.low, rel=1e-7, abs=1e-12)
    assert hi == pytest.approx(ci.high, rel=1e-7, abs=1e-12)


@pytest.mark.unit
def test_non_integer_effective_counts_match_beta_quantiles():
    k, n = 37.4, 2153.7
    lo, hi = fpr_confidence_bound(k, n, 0.9)
    assert lo == pytest.approx(stats.beta.ppf(0.05, k, n - k + 1), rel=1e-7)
    assert hi == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), rel=1e-7)
    for x, a, b in [(1e-6, 2.0, 3e6), (0.3, 0.5, 0.5), (0.999, 40.0, 2.0)]:
        assert beta_cdf(x, a, b) == pytest.approx(stats.beta.cdf(x, a, b), rel=1e-8)


@pytest.mark.unit
def test_effective_count_sees_clustered_false_positives():
    rng = np.random.default_rng(0)
    pixels, m = 4096, 20
    iid = rng.binomial(pixels, 0.01, m)  # independent pixels
    blob = 137
    clustered = np.where(rng.random(m) < 0.3, blob, 0)  # false positives come as whole blobs
    assert effective_pixel_count(iid, pixels) > 0.3 * m * pixels
    # a blob-sized patch behaves like one unit: about pixels/blob units per image, far fewer than pixels
    assert 0.5 * m * pixels / blob < effective_pixel_count(clustered, pixels) < 1.5 * m * pixels / blob
    assert effective_pixel_count(np.zeros(m), pixels) == m  # no exceedance: one unit per image


# --- file format ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_write_load_history_and_versions(model):
    first = write_calibration(model, 0.3, min_defect_area=5)
    second = write_calibration(model, 0.5, image_threshold=0.8)
    cal = load_calibration(model)
    assert (first.version, second.version) == (1, 2) and cal == second
    assert (cal.pixel_threshold, cal.image_threshold, cal.min_defect_area, cal.previous_version) == (0.5, 0.8, 0, 1)
    assert cal.model_sha256 == bundle.sha256_file(model / bundle.GRAPH)
    assert history_versions(model) == [1, 2]  # every version is in the history from the moment it is written
    assert json.loads(history_path(model, 1).read_text())["pixel_threshold"] == 0.3
    assert json.loads(history_path(model, 2).read_bytes()) == json.loads((model / bundle.CALIBRATION).read_bytes())


@pytest.mark.integration
def test_save_refuses_a_version_that_is_not_new(model):
    cal = write_calibration(model, 0.3)
    with pytest.raises(BundleError, match="must be above the current 1"):
        save_calibration(model, cal)


@pytest.mark.integration
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(schema="other"), "not a linewatch calibration"),
        (lambda d: d.update(schema_version=2), "unsupported schema_version 2"),
        (lambda d: d.pop("pixel_threshold"), "pixel_threshold: required key missing"),
        (lambda d: d.pop("image_threshold"), "image_threshold: required key missing"),  # never guessed
        (lambda d: d.update(pixel_threshold="0.5"), "pixel_threshold: expected a number, got str '0.5'"),
        (lambda d: d.update(pixel_threshold=float("inf")), "pixel_threshold: expected a finite number"),
        (lambda d: d.update(min_defect_area=-1), "min_defect_area: expected a value >= 0, got int -1"),
        (lambda d: d.update(min_defect_area=True), "min_defect_area: expected an integer, got bool True"),
        (lambda d: d.update(fpr_target=1.5), "fpr_target: expected a value < 1"),
        (lambda d: d.update(previous_version=0), "previous_version: expected a value >= 1"),
        (lambda d: d.update(settings=[]), "settings: expected a mapping"),
        (lambda d: d.update(model_sha256="AB" * 32), "model_sha256: expected 64 lowercase hex digits"),
        (lambda d: d.update(model_sha256="ab" * 32), "calibrated for model abababababab.*re-exported"),
    ],
)
def test_invalid_files_are_refused_naming_the_file(model, edit, message):
    write_calibration(model, 0.3)
    path = model / bundle.CALIBRATION
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message) as err:
        load_calibration(model)
    assert str(path) in str(err.value)


@pytest.mark.integration
def test_unknown_keys_of_a_newer_writer_are_ignored(model):
    written = write_calibration(model, 0.3)
    path = model / bundle.CALIBRATION
    data = json.loads(path.read_text())
    data["added_in_a_later_version"] = {"anything": [1, 2]}
    path.write_text(json.dumps(data))
    assert load_calibration(model) == written


@pytest.mark.integration
def test_deeply_nested_file_is_refused_naming_it_not_a_recursion_error(model):
    write_calibration(model, 0.3)
    path = model / bundle.CALIBRATION
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply") as err:
        load_calibration(model)
    assert str(path) in str(err.value)
    path.write_text('{"settings": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BundleError, match="nested too deeply"):
        load_calibration(model)
    write_calibration(model, 0.4)  # a new calibration still replaces it; the broken one is kept aside
    assert load_calibration(model).pixel_threshold == 0.4
    assert list((model / bundle.CALIBRATION_HISTORY).glob("invalid_*.json"))


@pytest.mark.integration
def test_truncated_file_is_never_loaded(model):
    write_calibration(model, 0.3)
    path = model / bundle.CALIBRATION
    text = path.read_text()
    for cut in (1, len(text) // 3, len(text) // 2, len(text) - 3):
        path.write_text(text[:cut])
        with pytest.raises(BundleError, match="calibration"):
            load_calibration(model)


@pytest.mark.integration
def test_failed_rename_keeps_the_old_calibration(model, monkeypatch):
    write_calibration(model, 0.3)

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_calibration(model, 0.9)
    monkeypatch.undo()
    assert load_calibration(model).pixel_threshold == 0.3
    assert not list(model.glob(".calibration.json.*"))  # the temp file was removed


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after it)."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


@pytest.mark.integration
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o444])
def test_a_replaced_file_keeps_its_mode(model, umask, mode):
    """`sudo linewatch calibrate` must not turn a calibration the daemon can read into a 0600 one."""
    umask(0o077)  # even under the strictest umask: the replaced file's mode wins
    write_calibration(model, 0.3)
    path = model / bundle.CALIBRATION
    path.chmod(mode)
    write_calibration(model, 0.4)
    assert stat.S_IMODE(path.stat().st_mode) == mode and load_calibration(model).pixel_threshold == 0.4
    metadata = model / bundle.METADATA
    metadata.chmod(mode)
    bundle.write_metadata(model, bundle.read_metadata(model))
    assert stat.S_IMODE(metadata.stat().st_mode) == mode


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a file away")
def test_root_keeps_the_replaced_files_owner(model):
    nobody = pwd.getpwnam("nobody")
    write_calibration(model, 0.3)
    path = model / bundle.CALIBRATION
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    path.chmod(0o640)
    write_calibration(model, 0.4)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, 0o640)


@pytest.mark.integration
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_a_new_file_gets_0666_less_the_umask(model, umask, mask):
    umask(mask)
    write_calibration(model, 0.3)  # a new calibration.json
    write_calibration(model, 0.4)  # v1 copied into a new history file
    for path in (model / bundle.CALIBRATION, history_path(model, 1)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert not list(model.glob(".calibration.json.*"))


WRITER = """
import sys
from linewatch.calibrate.store import write_calibration
i = 0
print("ready", flush=True)
while True:
    i += 1
    write_calibration(sys.argv[1], 0.001 * (i % 900 + 1), settings={"pad": "x" * 200000, "i": i})
"""

# Stops inside the write window on purpose: the temp file holds the new data, the rename has not happened.
FROZEN_WRITER = """
import os, sys, time
from linewatch.calibrate.store import write_calibration
real_fsync = os.fsync
def fsync_then_freeze(fd):
    real_fsync(fd)
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(".calibration.json.") and name.endswith(".tmp"):
        print("mid-write", flush=True)
        time.sleep(3600)
os.fsync = fsync_then_freeze
write_calibration(sys.argv[1], 0.7, settings={"pad": "y" * 200000})
"""


@pytest.mark.e2e
def test_sigkill_mid_write_leaves_the_old_calibration_whole(model):
    write_calibration(model, 0.5)
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", FROZEN_WRITER, str(model)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"mid-write"
        (tmp,) = model.glob(".calibration.json.*.tmp")
        assert tmp.stat().st_size > 200000  # the new file is written in full, only not renamed yet
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    cal = load_calibration(model)
    assert cal.version == 1 and cal.pixel_threshold == 0.5  # the old one, whole
    assert write_calibration(model, 0.6).version == 2  # the leftover temp file is never read and never in the way
    assert load_calibration(model).pixel_threshold == 0.6


@pytest.mark.e2e
def test_sigkill_at_random_moments_never_leaves_a_partial_file(model):
    write_calibration(model, 0.5)
    env = dict(os.environ)
    versions = []
    for delay in (0.05, 0.11, 0.17, 0.23, 0.07, 0.13):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(model)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        cal = load_calibration(model)  # must be a whole, valid file every time
        assert cal.settings.get("pad", "x" * 200000) == "x" * 200000 and 0 < cal.pixel_threshold <= 0.9
        versions.append(cal.version)
    assert versions == sorted(versions) and versions[-1] > 1  # the writer did replace it meanwhile
    for v in history_versions(model):  # history copies are atomic too
        assert json.loads(history_path(model, v).read_text())["version"] == v


# --- rollback ---------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_rollback_walks_back_under_new_version_numbers(model):
    write_calibration(model, 0.1)
    write_calibration(model, 0.2)
    write_calibration(model, 0.3)
    back = rollback(model)
    assert load_calibration(model) == back
    assert (back.version, back.pixel_threshold, back.restored_version, back.rolled_back_from) == (4, 0.2, 2, 3)
    back = rollback(model)
    assert (back.version, back.pixel_threshold, back.restored_version, back.rolled_back_from) == (5, 0.1, 1, 4)
    with pytest.raises(BundleError, match="no earlier calibration"):
        rollback(model)
    assert history_versions(model) == [1, 2, 3, 4, 5]
    again = write_calibration(model, 0.7)  # a new calibration after rollbacks goes on numbering
    assert again.version == 6 and rollback(model).pixel_threshold == 0.1


@pytest.mark.integration
def test_rollback_refuses_a_calibration_made_for_another_graph(model):
    from tests.bundles import make_deviation_bundle

    write_calibration(model, 0.1)
    make_deviation_bundle(model, 32, 32)  # re-exported: a different graph
    write_calibration(model, 0.2)
    with pytest.raises(BundleError, match=r"calibration_v000001\.json.*calibrated for model"):
        rollback(model)
    assert load_calibration(model).pixel_threshold == 0.2


@pytest.mark.unit
def test_calibration_dataclass_is_frozen():
    cal = Calibration(version=1, model_sha256="0" * 64, pixel_threshold=0.5)
    with pytest.raises(Exception):
        cal.pixel_threshold = 0.1  # type: ignore[misc]
    assert math.isfinite(cal.pixel_threshold) and cal.to_dict()["schema"] == "linewatch-calibration"


@pytest.mark.integration
def test_a_damaged_current_file_never_reuses_a_version_or_replaces_a_good_history_entry(model):
    """Found by the soak: a corrupt calibration.json claiming version 2 made the next write reuse 2, and was itself
    archived over the good calibration_v000002.json that rollback would restore."""
    from linewatch.calibrate.store import history_path, history_versions

    bundle_dir = model
    write_calibration(bundle_dir, 0.5)
    second = write_calibration(bundle_dir, 0.6)
    assert history_versions(bundle_dir) == [1, 2]  # each version is in the history as soon as it is written
    good_v2 = history_path(bundle_dir, 2).read_bytes()
    damaged = json.loads((bundle_dir / "calibration.json").read_text()) | {"pixel_threshold": "high"}
    (bundle_dir / "calibration.json").write_text(json.dumps(damaged))
    third = write_calibration(bundle_dir, 0.7)
    assert third.version == 3 and second.version == 2
    assert history_path(bundle_dir, 2).read_bytes() == good_v2
    kept = sorted(p.name for p in history_path(bundle_dir, 1).parent.glob("invalid_*.json"))
    assert len(kept) == 1  # the damaged file is kept for inspection, under a name rollback never reads
    assert load_calibration(bundle_dir).pixel_threshold == pytest.approx(0.7)
