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
    "f1_max_threshold",
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
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1, the lowest score predicted defective at it): predict defective where score >= threshold."""
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
    f1 = 2 * tp / (predicted + n_pos)
    best = int(f1.argmax())
    return float(f1[best]), float(scores[last_of_run][best])


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


def _top_negative_runs(neg: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores among the top `fpr_limit` share of the sorted negatives, with the number
    of negatives >= and > each.

    Only those negatives move the curve below the limit (the one extra keeps the run that crosses
    it). Each distinct negative score v is one segment of the curve, from threshold "just above v"
    to "v": (fpr(> v), overlap(> v)) -> (fpr(>= v), overlap(>= v)); thresholds hitting only defect
    pixels add vertical steps of zero area."""
    n_neg = neg.size
    n_top = min(n_neg, math.ceil(fpr_limit * n_neg) + 1)
    top_start = int(np.searchsorted(neg, neg[n_neg - n_top], side="left"))
    top = neg[top_start:]
    run_start = np.flatnonzero(np.append(True, top[1:] != top[:-1]))
    n_ge = n_neg - top_start - run_start
    return top[run_start], n_ge, np.append(n_ge[1:], 0)


def _overlap_above(pos: np.ndarray, weights: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive-pixel scores sorted ascending, and above[i] = the mean region overlap (PRO, or
    sPRO with saturating weights) when predicting pos[i:]: suffix sums of each pixel's share of
    its region, over the number of regions, clipped at 1."""
    order = np.argsort(pos, kind="stable")
    pos, weights = pos[order], weights[order]
    del order
    if pos.dtype.kind == "f" and pos.size and np.isnan(pos[-1]):  # NaN sorts last
        raise ValueError("maps contain NaN")
    above = np.zeros(pos.size + 1)
    np.cumsum(weights[::-1], out=above[-2::-1])
    above /= n_regions
    np.clip(above, None, 1.0, out=above)
    return pos, above


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
    pos, pro_above = _overlap_above(maps[masks], weights, n_regions)
    del weights

    neg = _sort_in_place(maps[~masks])
    n_neg = neg.size
    if n_neg == 0:
        raise UndefinedMetricError("aupro needs defect-free pixels, but all masks are full")

    values, n_ge, n_gt = _top_negative_runs(neg, fpr_limit)
    del neg

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


# ------------------------------------------------------------------ sPRO (MVTec LOCO)
#
# The saturated per-region overlap of MVTec LOCO AD (Bergmann et al., IJCV 2022), computed as the
# official evaluation script does (src/metrics.py, src/aggregation.py, evaluate_experiment.py):
# - a pixel is predicted anomalous where map > t;
# - each ground-truth region (one PNG of a test image's ground-truth folder) scores
#   min(|region & predicted| / saturation_area, 1); sPRO(t) is the mean over all regions;
# - FPR(t) counts the predicted pixels among all pixels outside every region, over every image
#   evaluated: good images and the defect-free background of defective images alike;
# - the curve starts at (0, 0) and is integrated with the trapezoid rule up to an FPR limit
#   (interpolated there) and divided by it.
# The official script samples thresholds and refines them until curve points are 0.01 apart;
# here every distinct score is a threshold, so the curve is exact.

__all__ += ["spro_curve", "auspro", "loco_auspros", "loco_image_aurocs"]

# our defect_type names for LOCO's two kinds of anomaly
LOCO_DEFECT_TYPES = {"logical": "logical_anomalies", "structural": "structural_anomalies"}


def _as_map_list(maps: Any) -> list[np.ndarray]:
    """[N,H,W] (or [N,1,H,W]) array/tensor, or a sequence of [H,W] maps, as a list of 2-D views."""
    if isinstance(maps, np.ndarray) or hasattr(maps, "detach"):
        maps = _to_numpy(maps)
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.ndim != 3:
            raise ValueError(f"expected maps of shape [N,H,W], got {maps.shape}")
        maps = list(maps)
    out = []
    for i, m in enumerate(maps):
        m = _to_numpy(m)
        if m.ndim == 3 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 2 or m.size == 0:
            raise ValueError(f"map {i} must be a non-empty [H,W] array, got shape {m.shape}")
        if m.dtype == np.float16:  # half-precision sorting is slow; upcasting is exact
            m = m.astype(np.float32)
        out.append(m)
    return out


def _as_region_lists(regions: Any, shapes: list[tuple[int, ...]]) -> list[list[tuple[np.ndarray, float]]]:
    """Check regions[i] = [(mask [H,W], saturation_area > 0), ...] against map i's shape."""
    regions = list(regions)
    if len(regions) != len(shapes):
        raise ValueError(f"got {len(shapes)} maps but regions for {len(regions)} images")
    out = []
    for i, (image_regions, shape) in enumerate(zip(regions, shapes)):
        checked = []
        for j, region in enumerate(image_regions):
            try:
                mask, saturation = region
            except (TypeError, ValueError):
                raise ValueError(f"region {j} of image {i} must be a pair (mask, saturation_area)") from None
            mask = _to_numpy(mask)
            if mask.dtype != bool:
                mask = mask > 0.5
            if mask.shape != shape:
                raise ValueError(f"region {j} of image {i} has shape {mask.shape}, its map {shape}")
            if not mask.any():
                raise ValueError(f"region {j} of image {i} is empty")
            saturation = float(saturation)
            if not (saturation > 0 and math.isfinite(saturation)):
                raise ValueError(f"region {j} of image {i} has saturation_area {saturation}; it must be > 0")
            checked.append((mask, saturation))
        out.append(checked)
    return out


def _spro_points(maps: list[np.ndarray], regions: list[list[tuple[np.ndarray, float]]], fpr_limit: float):
    """The exact (FPR, sPRO) polyline from (0, 0) up to at least `fpr_limit`, and sPRO when every
    pixel is predicted. Memory: one copy of the defect-free scores plus the scored region pixels."""
    # Positives: within a region sorted by descending score, the k-th pixel raises that region's
    # overlap from min((k-1)/s, 1) to min(k/s, 1). That increment is its weight; pixels beyond
    # saturation weigh 0 and are dropped. Ties need no care: a threshold passes a run of equal
    # scores all at once, and the run's total weight does not depend on the order within it.
    pos_scores, pos_weights, defect_free = [], [], []
    for m, image_regions in zip(maps, regions):
        free = np.ones(m.shape, dtype=bool)
        for mask, saturation in image_regions:
            scores = np.sort(m[mask])[::-1]
            covered = np.minimum(np.arange(1, scores.size + 1) / saturation, 1.0)
            weights = np.diff(covered, prepend=0.0)
            keep = weights > 0
            pos_scores.append(scores[keep])
            pos_weights.append(weights[keep])
            free &= ~mask
        defect_free.append(free)
    n_regions = len(pos_scores)
    if n_regions == 0:
        raise UndefinedMetricError("sPRO needs defect regions, but no image has any")

    pos, spro_above = _overlap_above(np.concatenate(pos_scores), np.concatenate(pos_weights), n_regions)
    del pos_scores, pos_weights

    # Negatives: every defect-free pixel, copied once into a preallocated array and sorted there.
    n_neg = sum(int(f.sum()) for f in defect_free)
    if n_neg == 0:
        raise UndefinedMetricError("sPRO needs defect-free pixels, but the regions cover every pixel")
    neg = np.empty(n_neg, dtype=np.result_type(*{m.dtype for m in maps}))  # dtypes: few arguments
    start = 0
    for m, free in zip(maps, defect_free):
        values = m[free]
        neg[start : start + values.size] = values
        start += values.size
    del defect_free
    neg = _sort_in_place(neg)

    values, n_ge, n_gt = _top_negative_runs(neg, fpr_limit)  # as in aupro
    del neg

    # Polyline in ascending FPR (descending threshold): (0,0), then per run (gt point, ge point).
    k = values.size
    fpr = np.zeros(2 * k + 1)
    spro = np.zeros(2 * k + 1)
    fpr[1::2] = n_gt[::-1] / n_neg
    fpr[2::2] = n_ge[::-1] / n_neg
    spro[1::2] = spro_above[np.searchsorted(pos, values, side="right")][::-1]
    spro[2::2] = spro_above[np.searchsorted(pos, values, side="left")][::-1]
    return fpr, spro, float(spro_above[0])


def _clip_curve(fpr: np.ndarray, spro: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The polyline up to fpr_limit, ending with a point interpolated at exactly fpr_limit."""
    n_inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:n_inside], spro[:n_inside]
    if x[-1] < fpr_limit and n_inside < fpr.size:
        x0, x1, y0, y1 = fpr[n_inside - 1], fpr[n_inside], spro[n_inside - 1], spro[n_inside]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return x, y


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _check_fpr_limit(fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def spro_curve(maps: Any, regions: Any, fpr_limit: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, spro) of the sPRO curve, from (0, 0) up to `fpr_limit` (interpolated there).

    `maps`: [N,H,W] anomaly maps, or a list of [H,W] maps (sizes may differ between images).
    `regions[i]`: the defect regions of image i as (bool mask [H,W], saturation_area in pixels)
    pairs, e.g. from ad_models.data.sources.mvtec_loco.load_spro_regions; [] for a good image.
    At fpr_limit 1 the curve ends with the vertical step to the sPRO of "every pixel anomalous".
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    maps = _as_map_list(maps)
    regions = _as_region_lists(regions, [m.shape for m in maps])
    fpr, spro, spro_all = _spro_points(maps, regions, fpr_limit)
    fpr, spro = _clip_curve(fpr, spro, fpr_limit)
    if fpr_limit == 1.0:
        fpr, spro = np.append(fpr, 1.0), np.append(spro, spro_all)
    return fpr, spro


def auspro(maps: Any, regions: Any, fpr_limit: float = 0.05) -> float:
    """Normalised area under the sPRO curve up to `fpr_limit` (MVTec LOCO reports 0.05 first; a
    perfect map gives 1). Arguments as in `spro_curve`."""
    fpr, spro = spro_curve(maps, regions, fpr_limit)
    return _area(fpr, spro) / fpr_limit


def _loco_groups(defect_types: Any, n: int, has_regions: list[bool] | None = None) -> dict[str, np.ndarray]:
    """Indices of good + logical and good + structural images; checks the defect types."""
    defect_types = np.asarray([str(t) for t in defect_types])
    if defect_types.shape != (n,):
        raise ValueError(f"got {n} images but {defect_types.size} defect_types")
    known = {"good", *LOCO_DEFECT_TYPES.values()}
    unknown = sorted(set(defect_types.tolist()) - known)
    if unknown:
        raise ValueError(f"unknown MVTec LOCO defect types {unknown}; expected {sorted(known)}")
    good = defect_types == "good"
    if has_regions is not None and np.any(good & np.asarray(has_regions, dtype=bool)):
        first = int(np.flatnonzero(good & np.asarray(has_regions, dtype=bool))[0])
        raise ValueError(f"image {first} is 'good' but has defect regions")
    return {name: np.flatnonzero(good | (defect_types == t)) for name, t in LOCO_DEFECT_TYPES.items()}


def loco_auspros(
    maps: Any, regions: Any, defect_types: Any, fpr_limits: tuple[float, ...] = (0.05, 0.3)
) -> dict[str, dict[float, float]]:
    """AU-sPRO per FPR limit for logical and structural anomalies, each over the good test images
    plus that kind's images, and their mean, as the official LOCO evaluation reports them:
    {"logical": {0.05: .., 0.3: ..}, "structural": {...}, "mean": {...}}.

    defect_types[i] is "good", "logical_anomalies" or "structural_anomalies". A kind without
    images (e.g. in a structural-only view) gives NaN, and so does the mean."""
    limits = [_check_fpr_limit(limit) for limit in fpr_limits]
    maps = _as_map_list(maps)
    regions = _as_region_lists(regions, [m.shape for m in maps])
    groups = _loco_groups(defect_types, len(maps), [bool(r) for r in regions])
    results: dict[str, dict[float, float]] = {}
    for name, indices in groups.items():
        try:
            fpr, spro, _ = _spro_points([maps[i] for i in indices], [regions[i] for i in indices], max(limits))
            results[name] = {limit: _area(*_clip_curve(fpr, spro, limit)) / limit for limit in limits}
        except UndefinedMetricError:
            results[name] = {limit: float("nan") for limit in limits}
    results["mean"] = {limit: (results["logical"][limit] + results["structural"][limit]) / 2 for limit in limits}
    return results


def loco_image_aurocs(labels: Any, scores: Any, defect_types: Any) -> dict[str, float]:
    """Image AUROC of logical and of structural anomalies, each against the good test images, and
    their mean: {"logical": .., "structural": .., "mean": ..}. A kind without images gives NaN."""
    labels, scores = _check_image_level(labels, scores)
    groups = _loco_groups(defect_types, labels.size)
    types = np.asarray([str(t) for t in defect_types])
    if np.any(labels != (types != "good")):
        raise ValueError("labels must be 0 exactly for defect_type 'good' and 1 for the anomalies")
    good = np.sort(scores[~labels])
    results = {}
    for name, indices in groups.items():
        anomalous = np.sort(scores[indices][labels[indices]])
        try:
            results[name] = _auroc_sorted(good, anomalous)
        except UndefinedMetricError:
            results[name] = float("nan")
    results["mean"] = (results["logical"] + results["structural"]) / 2
    return results
