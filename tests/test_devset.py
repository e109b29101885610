"""The dev-benchmark dataset builder (benchmarks/make_devset.py, run as a subprocess) and its z-score baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from sklearn.metrics import roc_auc_score

from linewatch.evaluation.datasets import good_image_folder, read_test_set
from linewatch.evaluation.evaluate import evaluate_scorer

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
DEFECTS = ["crack", "cutpaste", "draem", "pit", "scratch", "stain"]


def make_devset(out: Path, *extra: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "make_devset.py"),
            "--out",
            str(out),
            "--size",
            str(SIZE),
            "--n-train",
            "3",
            "--n-good",
            "2",
            "--n-defect",
            "2",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def devset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("devset")
    make_devset(out, "--categories", "brick,gravel", "--seed", "3")
    return out


def clean_crop(category: str, entry: dict) -> np.ndarray:
    """The photo crop an image was cut from, recomputed from the recorded position (grey, SIZE×SIZE)."""
    photo = getattr(skimage.data, category)()
    r, c, k = entry["row"], entry["col"], entry["crop"]
    patch = photo[r : r + k, c : c + k]
    patch = patch[:, ::-1] if entry["flip_h"] else patch
    patch = patch[::-1] if entry["flip_v"] else patch
    return cv2.resize(np.ascontiguousarray(patch), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


@pytest.mark.unit
@pytest.mark.parametrize("category", ["brick", "gravel"])
def test_layout_and_masks_match_the_changed_pixels(devset, category):
    root = devset / category
    assert len(list(good_image_folder(root).glob("*.png"))) == 3
    samples = read_test_set(root)
    assert sorted({s.defect_type for s in samples}) == sorted(["good", *DEFECTS])
    assert sum(s.defect_type == "good" for s in samples) == 2
    manifest = json.loads((root / "devset.json").read_text())
    entries = {e["file"]: e for e in manifest["images"]}
    for s in samples:
        image = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (SIZE, SIZE, 3)
        source = clean_crop(category, entries[str(s.path.relative_to(root))])
        changed = np.any(image != source[..., None], axis=2)
        if s.mask_path is None:
            assert not changed.any()  # good test images are untouched crops
            continue
        mask = cv2.imread(str(s.mask_path), cv2.IMREAD_GRAYSCALE) > 127
        assert mask.any(), s.mask_path
        assert not changed[~mask].any(), f"{s.path}: pixels changed outside the mask"
        assert changed[mask].mean() > 0.8, f"{s.path}: mask covers mostly unchanged pixels"


@pytest.mark.unit
def test_train_and_test_crops_come_from_disjoint_rows(devset):
    for category in ("brick", "gravel"):
        manifest = json.loads((devset / category / "devset.json").read_text())
        height = getattr(skimage.data, category)().shape[0]
        train = [e for e in manifest["images"] if e["file"].startswith("train/")]
        test = [e for e in manifest["images"] if e["file"].startswith("test/")]
        assert len(train) == 3 and len(test) == 2 + 2 * len(DEFECTS)
        last_train_row = max(e["row"] + e["crop"] for e in train)
        first_test_row = min(e["row"] for e in test)
        boundary = int(0.6 * height)  # the top 60 % of the photo's rows are for training
        assert last_train_row <= boundary <= first_test_row
        for e in train:  # and the train images really are those crops
            img = cv2.imread(str(devset / category / e["file"]), cv2.IMREAD_GRAYSCALE)
            assert np.array_equal(img, clean_crop(category, e))


@pytest.mark.e2e
def test_deterministic_and_independent_of_other_categories(devset, tmp_path):
    make_devset(tmp_path, "--categories", "gravel", "--seed", "3")
    first = sorted(p.relative_to(devset / "gravel") for p in (devset / "gravel").rglob("*.png"))
    again = sorted(p.relative_to(tmp_path / "gravel") for p in (tmp_path / "gravel").rglob("*.png"))
    assert first == again
    for rel in first:
        assert (devset / "gravel" / rel).read_bytes() == (tmp_path / "gravel" / rel).read_bytes(), rel


@pytest.mark.unit
def test_baseline_runs_through_evaluate(devset):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from baseline import ZScoreBaseline
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    root = devset / "brick"
    baseline = ZScoreBaseline.fit(good_image_folder(root), (48, 48))
    frames = np.stack(
        [
            cv2.resize(cv2.imread(str(p)), (48, 48), interpolation=cv2.INTER_AREA)
            for p in sorted(good_image_folder(root).glob("*.png"))
        ]
    )
    maps, scores = baseline.score(frames)
    # independent z-score of the training frames themselves: per-pixel mean/std over the 3 images
    grey = frames.astype(np.float64)
    z = np.abs(grey - grey.mean(0)) / (grey.std(0) + baseline.eps)
    assert np.allclose(maps, z.mean(axis=3), atol=1e-4)
    assert np.allclose(scores, maps.max(axis=(1, 2)))
    result = evaluate_scorer(baseline, root, batch=4)
    assert set(result["per_type"]) == set(DEFECTS)
    assert 0.0 <= result["overall"]["pixel_roc_auc"] <= 1.0


@pytest.mark.e2e
def test_run_devbench_trains_evaluates_and_tabulates(devset, tmp_path):
    # a real (tiny, random-backbone) DFR through linewatch train/eval subprocesses, next to the baseline
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_devbench.py"),
            "--data",
            str(devset),
            "--out",
            str(out),
            "--categories",
            "brick",
            "--presets",
            "fast",
            "--train-args",
            "--random-init --size 32 --layers 1:2 --epochs 1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "devbench.json").read_text())["results"]
    assert set(results) == {"brick"} and set(results["brick"]) == {"baseline", "fast"}
    fast, base = results["brick"]["fast"], results["brick"]["baseline"]
    evaluated = json.loads((out / "brick-fast" / "eval.json").read_text())
    assert fast["input_size"] == [32, 32] and fast["backend"] == "torch"
    for key in ("pixel_roc_auc", "pro_auc", "image_roc_auc"):
        assert fast[key] == evaluated["overall"][key]
        assert 0.0 <= base[key] <= 1.0
    assert base["input_size"] == [SIZE, SIZE]
    table = (out / "devbench.md").read_text()
    assert table.strip() in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| brick")]
    assert len(rows) == 2 and f"{fast['pixel_roc_auc']:.4f}" in rows[1] and f"{base['pro_auc']:.4f}" in rows[0]

    # the feature-separability diagnostic on the same bundle: its DFR numbers are `linewatch eval`'s
    ceiling_json = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "feature_ceiling.py"),
            str(out / "brick-fast"),
            "--data",
            str(devset / "brick"),
            "--bank",
            "16",
            "--probe-c",
            "0.01,1",
            "--json",
            str(ceiling_json),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ceiling = json.loads(ceiling_json.read_text())
    assert set(ceiling) >= {"dfr", "knn", "probe C=0.01", "probe C=1", "mlp probe"} and ceiling["bank"] == 16
    for key in ("pixel_roc_auc", "pro_auc", "image_roc_auc"):
        assert ceiling["dfr"]["overall"][key] == pytest.approx(evaluated["overall"][key], abs=1e-9)
    assert set(ceiling["knn"]["per_type"]) == set(DEFECTS)
    assert "brick knn" in proc.stdout and "brick probe C=1" in proc.stdout

    # eval-only score weightings: the shipped one reproduces `linewatch eval` exactly
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "score_variants.py"),
            str(out / "brick-fast"),
            "--data",
            str(devset / "brick"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split("  pixel")[0].split(" ", 1)[1].strip(): line for line in proc.stdout.splitlines()}
    assert set(lines) == {"standardised", "layer-balanced", "plain", "plain layer-balanced"}
    assert (  # new bundles score layer-balanced (issue 15)
        f"pixel {evaluated['overall']['pixel_roc_auc']:.4f}  PRO {evaluated['overall']['pro_auc']:.4f}"
        in lines["layer-balanced"]
    )

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_devbench.py"),
            "--data",
            str(devset),
            "--out",
            str(out),
            "--categories",
            "nope",
            "--presets",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "nope" in proc.stderr and "make_devset.py" in proc.stderr


@pytest.mark.e2e
def test_adding_the_draem_type_leaves_every_earlier_image_unchanged(devset, tmp_path):
    """DRAEM-style defects were added after the first dev benchmark: its earlier images must stay the same."""
    make_devset(tmp_path, "--categories", "brick", "--seed", "3", "--defects", "scratch,crack,pit,stain,cutpaste")
    old = sorted(p.relative_to(tmp_path / "brick") for p in (tmp_path / "brick").rglob("*.png"))
    new = sorted(p.relative_to(devset / "brick") for p in (devset / "brick").rglob("*.png"))
    assert old and set(old) < set(new)
    assert {p.parts[1] for p in set(new) - set(old) if p.parts[0] == "test"} == {"draem"}
    for rel in old:
        assert (tmp_path / "brick" / rel).read_bytes() == (devset / "brick" / rel).read_bytes(), rel


def load_ceiling_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("feature_ceiling", ROOT / "benchmarks" / "feature_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_feature_ceiling_helpers_against_brute_force():
    import torch

    fc = load_ceiling_module()
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.normal(size=(300, 7)).astype(np.float32))
    queries = torch.from_numpy(rng.normal(size=(5000, 7)).astype(np.float32))  # more than one query chunk
    brute = np.sqrt(((queries.numpy()[:, None, :] - bank.numpy()[None]) ** 2).sum(-1)).min(1)
    assert np.allclose(fc.nearest_distance(queries, bank).numpy(), brute, atol=1e-4)
    assert np.allclose(fc.nearest_distance(bank[:10], bank).numpy(), 0.0, atol=1e-3)  # a bank row is its own nearest

    masks = np.zeros((1, 8, 8), bool)
    masks[0, :2, :4] = True  # top-left 4×4 region half defect, top-right none
    masks[0, 4:, 4:] = True  # bottom-right region all defect
    assert fc.region_fraction(masks, 4).tolist() == [[[0.5, 0.0], [0.0, 1.0]]]

    types = np.array(["good"] * 3 + ["crack"] * 2 + ["pit"] * 1)
    fold = fc.folds(types)
    assert fold.tolist() == [0, 1, 0, 0, 1, 0]  # alternating within each type, so both folds hold good and crack

    # the MLP probe is ranked by its pre-sigmoid output: the logit of its own probabilities where they don't saturate
    x = rng.normal(size=(400, 5))
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    mlp = fc.mlp_probe(0).fit(x, y)
    prob = mlp.predict_proba(x)[:, 1]
    assert np.allclose(fc.probe_logit(mlp, x), np.log(prob / (1 - prob)), atol=1e-6)

    # cross-fitted probes find a defect that is in the features, scoring each image with the probe that did not see it
    types = np.array(["good"] * 4 + ["crack"] * 4)
    fraction = np.zeros((8, 64, 64))
    fraction[4:, :32, :32] = 1.0  # enough regions for the MLP's mini-batches
    features = rng.normal(size=(8, 64 * 64, 6)).astype(np.float32)
    features[:, :, 0] += 3.0 * fraction.reshape(8, -1)  # 3σ shift in one channel: best possible AUC ≈ 0.98
    labels = fraction.reshape(-1) > 0
    for make, balance in ((lambda: fc.linear_probe(0.1), False), (lambda: fc.mlp_probe(0), True)):
        logits = fc.probe_grid(features, fraction, fc.folds(types), 0, make, balance)
        assert logits.shape == (8, 64 * 64)
        assert roc_auc_score(labels, logits.reshape(-1)) > 0.95
