"""Anomaly detection metrics: image AUROC, F1-max, pixel AUROC and AU-PRO.

Pixel metrics are exact (every distinct threshold counts) yet memory-bounded:
they never build a full-size float64 copy nor an argsort of all pixels, so
1000 maps of 256x256 fit in well under 2 GB.

Inputs may be numpy arrays or torch tensors. A mask pixel is a defect where
mask > 0.5 (bool, 0/1 and 0/255 masks all work).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "UndefinedMetricError",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "roc_points",
    "evaluate",
]

# searchsorted queries are processed in chunks so their int64 results stay small.
_CHUNK = 1 << 22

# 8-connectivity, as in the MVTec AD evaluation code.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


class UndefinedMetricError(ValueError):
    """The metric is undefined for this data (e.g. only one class present)."""


# ---------------------------------------------------------------- input checks


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _check_image_level(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (bool labels [N], float64 scores [N]) or raise ValueError."""
    labels, scores = _to_numpy(labels), _to_numpy(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D of equal length, got shapes "
            f"{labels.shape} and {scores.shape}"
        )
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:10]}")
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels.astype(bool), scores


def _check_pixel_level(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (bool masks [N,H,W], maps [N,H,W]) without copying maps if possible."""
    masks, maps = _to_numpy(masks), _to_numpy(maps)
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks {masks.shape} "
            f"and maps {maps.shape}"
        )
    if maps.ndim == 4 and maps.shape[1] == 1:  # [N,1,H,W]
        masks, maps = masks[:, 0], maps[:, 0]
    elif maps.ndim == 2:  # a single [H,W] image
        masks, maps = masks[None], maps[None]
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"expected non-empty [N,H,W] masks and maps, got shape {maps.shape}")
    if masks.dtype != bool:
        masks = masks > 0.5
    if maps.dtype == np.float16:  # half-precision sorting is slow; upcasting is exact
        maps = maps.astype(np.float32)
    return masks, maps


def _sort_in_place(values: np.ndarray) -> np.ndarray:
    """Sort a freshly made copy in place (a second full-size copy would double the peak)."""
    values.sort()
    # NaNs sort to the end, so the last element alone tells us.
    if values.size and values.dtype.kind == "f" and np.isnan(values[-1]):
        raise ValueError("maps contain NaN")
    return values


# ------------------------------------------------------------------ AUROC


def _auroc_sorted(neg_sorted: np.ndarray, pos_sorted: np.ndarray) -> float:
    """Mann-Whitney AUROC: P(pos > neg) + P(pos == neg) / 2, counted exactly."""
    n_neg, n_pos = neg_sorted.size, pos_sorted.size
    if n_neg == 0 or n_pos == 0:
        raise UndefinedMetricError(
            f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative samples"
        )
    # twice the Mann-Whitney U: (#neg < s) + (#neg <= s), summed over positives
    u2 = 0
    for start in range(0, n_pos, _CHUNK):
        query = pos_sorted[start : start + _CHUNK]
        u2 += int(np.searchsorted(neg_sorted, query, side="left").sum())
        u2 += int(np.searchsorted(neg_sorted, query, side="right").sum())
    return u2 / (2 * n_pos * n_neg)


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores; labels are 1 for defective."""
    labels, scores = _check_image_level(labels, scores)
    if labels.all() or not labels.any():
        raise UndefinedMetricError(
            f"image_auroc needs both good and defective images, got only label {int(labels[0])}"
        )
    return _auroc_sorted(np.sort(scores[~labels]), np.sort(scores[labels]))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Exact pixel-wise AUROC over all pixels of all images."""
    masks, maps = _check_pixel_level(masks, maps)
    neg = _sort_in_place(maps[~masks])
    pos = _sort_in_place(maps[masks])
    if pos.size == 0:
        raise UndefinedMetricError("pixel_auroc needs defect pixels, but all masks are empty")
    if neg.size == 0:
        raise UndefinedMetricError("pixel_auroc needs defect-free pixels, but all masks are full")
    return _auroc_sorted(neg, pos)


def roc_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the image-level ROC curve, for plotting."""
    from sklearn.metrics import roc_curve

    labels, scores = _check_image_level(labels, scores)
    if labels.all() or not labels.any():
        raise UndefinedMetricError("roc_points needs both good and defective images")
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


# ------------------------------------------------------------------ F1-max


def f1_max(labels: Any, scores: Any) -> float:
    """Best F1 over all thresholds (predict defective where score >= threshold)."""
    labels, scores = _check_image_level(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise UndefinedMetricError("f1_max needs at least one defective sample")
    order = np.argsort(scores, kind="stable")[::-1]
    scores, labels = scores[order], labels[order]
    tp = np.cumsum(labels)
    predicted = np.arange(1, labels.size + 1)
    # only the last position of a run of equal scores is a real threshold
    last_of_run = np.append(scores[1:] != scores[:-1], True)
    tp, predicted = tp[last_of_run], predicted[last_of_run]
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #positive)
    return float((2 * tp / (predicted + n_pos)).max())


# ------------------------------------------------------------------ AU-PRO


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per defect pixel 1 / size of its connected region, in C order of masks[masks]."""
    weights, n_regions = [], 0
    for mask in masks:
        if not mask.any():
            continue
        regions, n = ndimage.label(mask, structure=_STRUCTURE_8)
        sizes = np.bincount(regions.ravel())
        weights.append(1.0 / sizes[regions[mask]])
        n_regions += n
    if n_regions == 0:
        return np.empty(0), 0
    return np.concatenate(weights), n_regions


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`, as in MVTec AD.

    PRO is the mean over all ground-truth regions (8-connected, over the whole
    set) of the fraction of the region above the threshold; FPR is over all
    defect-free pixels. Every distinct threshold is a curve point; the curve
    starts at (0, 0), is integrated with the trapezoid rule up to `fpr_limit`
    (interpolated there) and divided by `fpr_limit`, so a perfect map gives 1.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _check_pixel_level(masks, maps)
    weights, n_regions = _region_weights(masks)
    if n_regions == 0:
        raise UndefinedMetricError("aupro needs defect regions, but all masks are empty")

    # Positives: scores ascending with the PRO mass above each position.
    pos = maps[masks]
    order = np.argsort(pos)
    pos = pos[order]
    if pos.dtype.kind == "f" and np.isnan(pos[-1]):
        raise ValueError("maps contain NaN")
    weights = weights[order]
    del order
    # pro_above[i] = PRO when predicting pos[i:] (suffix sums, summed from the top)
    pro_above = np.zeros(pos.size + 1)
    np.cumsum(weights[::-1], out=pro_above[-2::-1])
    pro_above /= n_regions
    np.clip(pro_above, None, 1.0, out=pro_above)
    del weights

    neg = _sort_in_place(maps[~masks])
    n_neg = neg.size
    if n_neg == 0:
        raise UndefinedMetricError("aupro needs defect-free pixels, but all masks are full")

    # Only negatives within the top `fpr_limit` share move the curve below the limit;
    # the one extra keeps the run that crosses the limit.
    n_top = min(n_neg, math.ceil(fpr_limit * n_neg) + 1)
    top_start = int(np.searchsorted(neg, neg[n_neg - n_top], side="left"))
    top = neg[top_start:]

    # Each distinct negative score v is one segment of the curve, from threshold
    # "just above v" to "v": (fpr(> v), pro(> v)) -> (fpr(>= v), pro(>= v)).
    # Thresholds hitting only defect pixels add vertical steps of zero area.
    run_start = np.flatnonzero(np.append(True, top[1:] != top[:-1]))
    values = top[run_start]
    n_ge = n_neg - top_start - run_start
    n_gt = np.append(n_ge[1:], 0)
    del run_start, neg, top

    fpr_ge, fpr_gt = n_ge / n_neg, n_gt / n_neg
    pro_ge = pro_above[np.searchsorted(pos, values, side="left")]
    pro_gt = pro_above[np.searchsorted(pos, values, side="right")]
    del values, n_ge, n_gt

    inside = fpr_ge <= fpr_limit
    area = float(np.sum((fpr_ge[inside] - fpr_gt[inside]) * (pro_ge[inside] + pro_gt[inside])))
    area /= 2
    crossing = np.flatnonzero((fpr_gt < fpr_limit) & ~inside)
    if crossing.size:  # the segment that crosses fpr_limit, interpolated there
        i = crossing[0]
        x0, x1, y0, y1 = fpr_gt[i], fpr_ge[i], pro_gt[i], pro_ge[i]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return float(area / fpr_limit)


# ------------------------------------------------------------------ all at once


def evaluate(
    labels: Any, scores: Any, masks: Any = None, maps: Any = None
) -> dict[str, float]:
    """Image metrics, plus pixel metrics when masks and maps are given.

    A metric that is undefined for this data is NaN instead of an error.
    """
    if (masks is None) != (maps is None):
        raise ValueError("give both masks and maps, or neither")

    def guarded(metric, *args) -> float:
        try:
            return float(metric(*args))
        except UndefinedMetricError:
            return float("nan")

    results = {
        "image_auroc": guarded(image_auroc, labels, scores),
        "f1_max": guarded(f1_max, labels, scores),
    }
    if masks is not None:
        results["pixel_auroc"] = guarded(pixel_auroc, masks, maps)
        results["aupro"] = guarded(aupro, masks, maps)
    return results
