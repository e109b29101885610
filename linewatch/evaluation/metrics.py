"""Exact anomaly-detection metrics: ROC-AUC and PRO-AUC from sorted scores (numpy, torch-free).

Both curves are built by sorting every score once and accumulating per-sample weights, then keeping one point per
distinct score (ties move together, as a threshold can only take all tied samples or none). Nothing is binned or
subsampled, so the numbers are exact and match `sklearn.metrics.roc_auc_score` and anomalib's AUPRO definition.
"""

from __future__ import annotations

import cv2
import numpy as np

from linewatch.errors import DataError

PRO_FPR_LIMIT = 0.3


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.size == 0:
        raise DataError(f"{what}: no scores")
    if not np.issubdtype(scores.dtype, np.number):
        raise DataError(f"{what}: scores must be numbers, got {scores.dtype}")
    if not np.all(np.isfinite(scores)):
        bad = int(np.count_nonzero(~np.isfinite(scores)))
        raise DataError(f"{what}: {bad} score(s) are NaN or infinite (a broken model or input)")
    return scores


def _check_labels(labels: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise DataError(f"{what}: labels/masks shape {labels.shape} does not match scores shape {shape}")
    if labels.dtype != bool:
        if not np.all((labels == 0) | (labels == 1)):
            raise DataError(f"{what}: labels must be 0/1 or bool")
        labels = labels.astype(bool)
    return labels


def _descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order sorting scores high to low, index of the last sample of each run of equal scores in that order)."""
    flat = scores.ravel()
    order = np.argsort(flat)[::-1]  # tie order is irrelevant: only run ends are kept
    sorted_scores = flat[order]
    last_of_run = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    return order, np.append(last_of_run, flat.size - 1)


def roc_curve(scores: np.ndarray, labels: np.ndarray, what: str = "roc") -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, starting at (0, 0); positives are labels == True."""
    scores = _check_scores(scores, what)
    labels = _check_labels(labels, scores.shape, what)
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"{what}: ROC-AUC needs both anomalous and normal samples (got {n_pos} anomalous, {n_neg} normal)"
        )
    order, cut = _descending(scores)
    true_pos = np.cumsum(labels.ravel()[order], dtype=np.int64)[cut]
    false_pos = (cut + 1) - true_pos
    fpr = np.concatenate(([0.0], false_pos / n_neg))
    tpr = np.concatenate(([0.0], true_pos / n_pos))
    return fpr, tpr


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids between distinct thresholds, so ties count half, as Mann-Whitney)."""
    fpr, tpr = roc_curve(scores, labels, "roc_auc")
    return float(np.trapezoid(tpr, fpr))


def image_roc_auc(image_scores: np.ndarray, is_anomalous: np.ndarray) -> float:
    """Image-level ROC-AUC: one score per image, label True for a defect image."""
    scores = np.asarray(image_scores)
    if scores.ndim != 1:
        raise DataError(f"image_roc_auc: expected one score per image (1-D), got shape {scores.shape}")
    fpr, tpr = roc_curve(scores, is_anomalous, "image_roc_auc")
    return float(np.trapezoid(tpr, fpr))


def _check_maps(maps: np.ndarray, masks: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    maps = _check_scores(maps, what)
    if maps.ndim != 3:
        raise DataError(f"{what}: expected anomaly maps N×H×W, got shape {maps.shape}")
    return maps, _check_labels(masks, maps.shape, what)


def pixel_roc_auc(maps: np.ndarray, masks: np.ndarray) -> float:
    """Pixel-level ROC-AUC over all pixels of all maps (N×H×W) against ground-truth masks."""
    maps, masks = _check_maps(maps, masks, "pixel_roc_auc")
    fpr, tpr = roc_curve(maps, masks, "pixel_roc_auc")
    return float(np.trapezoid(tpr, fpr))


def region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected defect regions (8-connectivity) numbered 1..R across all masks; 0 is normal."""
    labels = np.zeros(masks.shape, np.int32)
    n_regions = 0
    for i, mask in enumerate(masks):
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        if n > 1:
            labels[i] = np.where(lab > 0, lab + n_regions, 0)
            n_regions += n - 1
    return labels, n_regions


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from (0, 0): pro = mean over regions of the region's detected share."""
    maps, masks = _check_maps(maps, masks, "pro_auc")
    regions, n_regions = region_labels(masks)
    n_normal = int(np.count_nonzero(regions == 0))
    if n_regions == 0 or n_normal == 0:
        raise DataError(
            f"pro_auc: needs defect regions and normal pixels (got {n_regions} regions, {n_normal} normal pixels)"
        )
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    # each pixel's contribution once the threshold drops to its score: 1/(|r| R) to PRO, or 1 normal pixel
    weight = np.zeros(n_regions + 1, np.float64)
    weight[1:] = 1.0 / (sizes[1:] * n_regions)
    order, cut = _descending(maps)
    sorted_regions = regions.ravel()[order]
    del order
    pro = np.cumsum(weight[sorted_regions])[cut]
    false_pos = np.cumsum(sorted_regions == 0, dtype=np.int64)[cut]
    return np.concatenate(([0.0], false_pos / n_normal)), np.concatenate(([0.0], pro))


def pro_auc(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1.0 = every region found first)."""
    if not 0.0 < fpr_limit <= 1.0:
        raise DataError(f"pro_auc: fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks)
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the curve (x ascending) over [0, limit], the last segment cut by linear interpolation."""
    inside = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs))
