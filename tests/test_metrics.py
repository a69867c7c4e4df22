"""Tests for ad_models.metrics against sklearn and a slow, obviously correct AU-PRO."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from ad_models.metrics import (
    UndefinedMetricError,
    aupro,
    evaluate,
    f1_max,
    image_auroc,
    pixel_auroc,
    roc_points,
)

# ------------------------------------------------------------------ references


def reference_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """One binarisation per distinct threshold; slow but plainly the definition."""
    masks = masks.astype(bool)
    regions = []  # boolean [N,H,W] mask of each 8-connected region
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            region = np.zeros_like(masks)
            region[i] = labelled == k
            regions.append(region)
    negatives = ~masks

    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fpr = (predicted & negatives).sum() / negatives.sum()
        pro = np.mean([(predicted & r).sum() / r.sum() for r in regions])
        points.append((fpr, pro))

    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # interpolate the curve at exactly fpr_limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# ------------------------------------------------------------------ data


def random_image_data(rng: np.random.Generator, n: int = 200):
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounding makes many ties
    return labels, scores


def random_pixel_data(rng: np.random.Generator, n: int = 4, size: int = 16, decimals: int | None = 1):
    """Maps with rectangles and blobs as defects; image 0 always has a diagonal pair."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):
        for _ in range(rng.integers(0, 3)):  # some images stay defect-free
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, y : y + h, x : x + w] = True
        if rng.random() < 0.5:
            blob = ndimage.gaussian_filter(rng.random((size, size)), 2) > 0.55
            masks[i] |= blob
    # two squares touching only at a corner: one region under 8-connectivity
    masks[0, 1:3, 1:3] = True
    masks[0, 3:6, 3:6] = True
    maps = rng.random((n, size, size)) + 0.6 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# ------------------------------------------------------------------ image level


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn(seed):
    labels, scores = random_image_data(np.random.default_rng(seed))
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_sklearn(seed):
    labels, scores = random_image_data(np.random.default_rng(seed))
    assert f1_max(labels, scores) == pytest.approx(reference_f1_max(labels, scores), abs=1e-9)


def test_f1_max_simple_cases():
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    # all equal scores: the only threshold predicts everything defective
    assert f1_max([0, 1, 1, 0], [0.5] * 4) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_image_auroc_one_class_raises():
    with pytest.raises(ValueError, match="both"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])


def test_roc_points():
    fpr, tpr = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    labels, scores = random_image_data(np.random.default_rng(0))
    assert image_auroc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(
        image_auroc(labels, scores)
    )
    masks, maps = random_pixel_data(np.random.default_rng(0))
    assert aupro(torch.tensor(masks), torch.tensor(maps, dtype=torch.float16)) == pytest.approx(
        aupro(masks, maps.astype(np.float16))
    )


# ------------------------------------------------------------------ pixel AUROC


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_matches_sklearn(seed, dtype):
    masks, maps = random_pixel_data(np.random.default_rng(seed), n=6, size=24, decimals=2)
    maps = maps.astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-6)


def test_pixel_auroc_uint8_masks_and_channel_axis():
    masks, maps = random_pixel_data(np.random.default_rng(1))
    expected = pixel_auroc(masks, maps)
    assert pixel_auroc(masks.astype(np.uint8) * 255, maps) == expected
    assert pixel_auroc(masks[:, None], maps[:, None]) == expected


def test_pixel_auroc_without_defects_raises():
    with pytest.raises(UndefinedMetricError):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))


# ------------------------------------------------------------------ AU-PRO


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [1, 2, None])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, decimals, fpr_limit):
    masks, maps = random_pixel_data(np.random.default_rng(seed), decimals=decimals)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_limit_at_a_curve_point():
    # 10 negatives with distinct scores: every FPR multiple of 0.1 is a curve point
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.array([[[0.55, 0.05, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]]])
    for limit in (0.1, 0.3, 0.5):
        assert aupro(masks, maps, limit) == pytest.approx(reference_aupro(masks, maps, limit))


def test_aupro_perfect_map_is_one():
    masks, _ = random_pixel_data(np.random.default_rng(0))
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_aupro_constant_map():
    # a single threshold predicts everything: the curve is (0,0) -> (1,1), so the
    # area up to 0.3 is 0.3**2 / 2 = 0.045, normalised by 0.3 -> 0.15
    masks, _ = random_pixel_data(np.random.default_rng(0))
    maps = np.full(masks.shape, 0.5)
    assert aupro(masks, maps) == pytest.approx(0.15)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_inverted_map_is_zero():
    masks, _ = random_pixel_data(np.random.default_rng(0))
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_diagonal_regions_merge():
    # 2x2 and 3x3 squares touching at a corner form ONE region of 13 pixels.
    # Only the small square is detected: the curve is (0,0) -> (0, 4/13) -> (1,1).
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 2:5, 2:5] = True
    maps = np.zeros((1, 8, 8))
    maps[0, 0:2, 0:2] = 1.0
    expected = 4 / 13 + (1 - 4 / 13) / 2  # area under the line from (0, 4/13) to (1, 1)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(expected)
    # with separate regions the PRO step would be (1 + 0) / 2 instead
    assert not math.isclose(aupro(masks, maps, fpr_limit=1.0), 0.5 + 0.5 / 2)


def test_aupro_without_defects_raises():
    with pytest.raises(ValueError, match="regions"):
        aupro(np.zeros((2, 4, 4), dtype=bool), np.random.default_rng(0).random((2, 4, 4)))


def test_aupro_bad_limit_raises():
    masks, maps = random_pixel_data(np.random.default_rng(0))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


# ------------------------------------------------------------------ evaluate


def test_evaluate_all_metrics():
    rng = np.random.default_rng(3)
    masks, maps = random_pixel_data(rng, n=6)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    results = evaluate(labels, scores, masks, maps)
    assert set(results) == {"image_auroc", "f1_max", "pixel_auroc", "aupro"}
    assert results["aupro"] == pytest.approx(aupro(masks, maps))
    assert results["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert set(evaluate(labels, scores)) == {"image_auroc", "f1_max"}


def test_evaluate_undefined_metrics_are_nan():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8))
    # no defective image at all
    results = evaluate([0, 0, 0], [0.1, 0.2, 0.3], np.zeros((3, 8, 8)), maps)
    assert all(math.isnan(v) for v in results.values())
    # defective images but empty masks: image metrics defined, pixel metrics not
    results = evaluate([0, 1, 1], [0.1, 0.2, 0.3], np.zeros((3, 8, 8)), maps)
    assert results["image_auroc"] == 1.0 and results["f1_max"] == 1.0
    assert math.isnan(results["pixel_auroc"]) and math.isnan(results["aupro"])


# ------------------------------------------------------------------ bad input


def test_mismatched_pixel_shapes_raise():
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        pixel_auroc(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(3, 8, 8\)"):
        aupro(np.zeros((2, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        evaluate([0, 1], [0.1, 0.2], np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


def test_mismatched_image_shapes_raise():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        image_auroc([0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        evaluate([0, 1, 1], [0.1, 0.2, 0.3, 0.4])


def test_non_binary_labels_and_nan_raise():
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        f1_max([0, 1, 1], [0.1, np.nan, 0.3])
    maps = np.random.default_rng(0).random((2, 4, 4))
    maps[1, 2, 2] = np.nan
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, maps)


def test_evaluate_needs_masks_and_maps_together():
    with pytest.raises(ValueError, match="both"):
        evaluate([0, 1], [0.1, 0.2], masks=np.zeros((2, 4, 4)))
