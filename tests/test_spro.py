"""Tests for the MVTec LOCO metrics in ad_models.metrics: sPRO curve, AU-sPRO, LOCO image AUROCs.

Hand-computed cases first, then a slow reference written like the official evaluation script
(threshold by threshold, map > t, FPR over every pixel outside the regions of every image)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ad_models.metrics import (
    UndefinedMetricError,
    auspro,
    image_auroc,
    loco_auspros,
    loco_image_aurocs,
    spro_curve,
)

# ------------------------------------------------------------------ the reference


def reference_auspro(maps, regions, fpr_limit):
    """One binarisation per threshold, as src/metrics.py of the official evaluation does."""
    scores = np.unique(np.concatenate([m.ravel() for m in maps]))
    thresholds = [scores.max() + 1.0, *scores[::-1], scores.min() - 1.0]  # descending
    free = [np.ones(m.shape, bool) for m in maps]
    for f, image_regions in zip(free, regions):
        for mask, _ in image_regions:
            f &= ~mask
    n_free = sum(f.sum() for f in free)
    points = []
    for t in thresholds:
        predicted = [m > t for m in maps]
        fp = sum((p & f).sum() for p, f in zip(predicted, free))
        overlaps = [min((p & mask).sum() / s, 1.0)
                    for p, image_regions in zip(predicted, regions) for mask, s in image_regions]
        points.append((fp / n_free, np.mean(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def saturable(regions):
    """The same regions with every saturation area at most the region's area."""
    return [[(mask, min(s, mask.sum())) for mask, s in r] for r in regions]


def random_loco_data(rng, n=6, shape=(10, 12), decimals=1):
    """Maps with good and defective images; regions overlap each other and image borders, and their
    saturation areas are relative (floored, as LOCO's), absolute, above the area or below 1."""
    maps, regions, types = [], [], []
    for i in range(n):
        kind = ["good", "logical_anomalies", "structural_anomalies"][i % 3]
        image_regions = []
        if kind != "good":
            for _ in range(rng.integers(1, 4)):
                mask = np.zeros(shape, bool)
                y, x = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
                h, w = rng.integers(1, 6, 2)
                mask[y:y + h, x:x + w] = True
                area = mask.sum()
                saturation = rng.choice([
                    max(1, int(rng.uniform(0.2, 1.0) * area)),  # relative
                    min(int(rng.integers(1, 12)), area),  # absolute
                    area + 3.0,  # can never saturate
                    0.5,  # one pixel saturates
                ])
                image_regions.append((mask, float(saturation)))
        m = rng.random(shape)
        for mask, _ in image_regions:
            m = m + 0.4 * mask
        maps.append(np.round(m, decimals) if decimals is not None else m)
        regions.append(image_regions)
        types.append(kind)
    return maps, regions, types


# ------------------------------------------------------------------ hand-computed cases


def two_image_case(saturation):
    """A defective 1x5 map whose first 3 pixels are one region, and a good 1x5 map; 7 defect-free
    pixels in all (2 in the defective image's background, 5 in the good image)."""
    defective = np.array([[0.9, 0.7, 0.5, 0.3, 0.1]])
    good = np.array([[0.8, 0.6, 0.4, 0.2, 0.0]])
    region = np.zeros((1, 5), bool)
    region[0, :3] = True
    return [defective, good], [[(region, saturation)], []]


def test_hand_computed_saturated_curve():
    # saturation 2: the region is saturated once 2 of its 3 pixels are detected.
    # t=0.9: 1/2 detected, no FP; 0.8: one FP (1/7); 0.7: 2/2 -> 1; then sPRO stays 1.
    maps, regions = two_image_case(2.0)
    fpr, spro = spro_curve(maps, regions)
    assert fpr[:4] == pytest.approx([0, 0, 1 / 7, 1 / 7])
    assert spro[:4] == pytest.approx([0, 0.5, 0.5, 1.0])
    assert spro[-1] == 1.0 and fpr[-1] == 1.0
    assert auspro(maps, regions, 0.05) == pytest.approx(0.5)  # flat at 0.5 below FPR 1/7
    # up to 0.3: 0.5 * 1/7 + 1 * (0.3 - 1/7), divided by 0.3
    assert auspro(maps, regions, 0.3) == pytest.approx((0.5 / 7 + 0.3 - 1 / 7) / 0.3)
    assert auspro(maps, regions, 1.0) == pytest.approx(1 - 0.5 / 7)


def test_hand_computed_unsaturated_curve_is_pro():
    # saturation = area (3): each detected pixel adds 1/3, the plain per-region overlap.
    # (0,0) (0,1/3) (1/7,1/3) (1/7,2/3) (2/7,2/3) (2/7,1) ... (1,1): area 1/21 + 2/21 + 5/7 = 6/7
    maps, regions = two_image_case(3.0)
    assert auspro(maps, regions, 1.0) == pytest.approx(6 / 7)
    fpr, spro = spro_curve(maps, regions, fpr_limit=0.2)
    assert fpr[-1] == pytest.approx(0.2) and spro[-1] == pytest.approx(2 / 3)


def test_saturation_caps_overlap_at_one():
    # saturation 1: the top pixel alone saturates the region, and more detections do not exceed 1
    maps, regions = two_image_case(1.0)
    fpr, spro = spro_curve(maps, regions)
    assert spro.max() == 1.0 and spro[1] == 1.0
    assert auspro(maps, regions, 0.05) == pytest.approx(1.0)
    # a saturation area above the region's area never reaches 1: 3 of 4 at most
    maps, regions = two_image_case(4.0)
    assert spro_curve(maps, regions)[1].max() == pytest.approx(0.75)


def test_fractional_saturation_area():
    # saturation 2.5 (an absolute threshold scaled to a smaller image): 1/2.5, 2/2.5, then 1
    maps, regions = two_image_case(2.5)
    _, spro = spro_curve(maps, regions)
    assert sorted(set(np.round(spro, 9))) == pytest.approx([0, 0.4, 0.8, 1.0])


def test_mean_over_regions_of_all_images():
    # two defective images, one region each; region A found at the top score, B never above any
    # negative: sPRO is 1/2 all along until the last threshold
    a = np.array([[1.0, 0.5, 0.4]])
    b = np.array([[0.0, 0.6, 0.3]])
    ra = np.array([[True, False, False]])
    rb = np.array([[True, False, False]])
    fpr, spro = spro_curve([a, b], [[(ra, 1.0)], [(rb, 1.0)]])
    assert spro[1] == 0.5 and spro[-2] == 0.5 and spro[-1] == 1.0
    assert auspro([a, b], [[(ra, 1.0)], [(rb, 1.0)]], 1.0) == pytest.approx(0.5)


def test_fpr_counts_background_of_defective_images():
    # no good image at all: the defect-free pixels of the defective image still define the FPR,
    # as in the official script (a pixel outside every region of its image is a negative)
    m = np.array([[0.9, 0.2, 0.8, 0.1]])
    region = np.array([[True, True, False, False]])
    fpr, spro = spro_curve([m], [[(region, 2.0)]])
    # t=0.9: 1/2; t=0.8: FP 1/2; t=0.2: 2/2; t=0.1: FP 2/2
    assert fpr == pytest.approx([0, 0, 0.5, 0.5, 1, 1])
    assert spro == pytest.approx([0, 0.5, 0.5, 1, 1, 1])


def test_pixels_of_other_regions_are_not_false_positives():
    # two overlapping regions in one image: their union is excluded from the negatives
    m = np.array([[0.9, 0.8, 0.7, 0.1]])
    r1 = np.array([[True, True, False, False]])
    r2 = np.array([[False, True, True, False]])
    fpr, spro = spro_curve([m], [[(r1, 2.0), (r2, 2.0)]])
    assert set(fpr.tolist()) == {0.0, 1.0}  # the single negative is the 0.1 pixel
    assert auspro([m], [[(r1, 2.0), (r2, 2.0)]], 0.05) == pytest.approx(1.0)


# ------------------------------------------------------------------ normalisation by the limit


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 1.0])
def test_perfect_map_is_one(limit):
    maps, regions, _ = random_loco_data(np.random.default_rng(0))
    regions = saturable(regions)
    perfect = [np.zeros(m.shape) for m in maps]
    for p, image_regions in zip(perfect, regions):
        for mask, _ in image_regions:
            p[mask] = 1.0
    assert auspro(perfect, regions, limit) == pytest.approx(1.0)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_constant_map_is_the_diagonal(limit):
    # one threshold predicts everything: (0,0) -> (1,1), so area limit**2/2, normalised limit/2
    maps, regions, _ = random_loco_data(np.random.default_rng(1))
    regions = saturable(regions)
    constant = [np.full(m.shape, 0.5) for m in maps]
    assert auspro(constant, regions, limit) == pytest.approx(limit / 2)


def test_inverted_map_is_zero():
    maps, regions, _ = random_loco_data(np.random.default_rng(2))
    inverted = [np.ones(m.shape) for m in maps]
    for p, image_regions in zip(inverted, regions):
        for mask, _ in image_regions:
            p[mask] = 0.0
    assert auspro(inverted, regions, 0.3) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [1, 2, None])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_auspro_matches_reference(seed, decimals, fpr_limit):
    maps, regions, _ = random_loco_data(np.random.default_rng(seed), decimals=decimals)
    expected = reference_auspro(maps, regions, fpr_limit)
    assert auspro(maps, regions, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_images_of_different_sizes():
    rng = np.random.default_rng(3)
    maps, regions, _ = random_loco_data(rng, n=3, shape=(6, 9))
    more, more_regions, _ = random_loco_data(rng, n=3, shape=(11, 4))
    maps, regions = maps + more, regions + more_regions
    assert auspro(maps, regions, 0.3) == pytest.approx(reference_auspro(maps, regions, 0.3), abs=1e-9)


def test_array_tensor_and_float16_inputs_agree():
    torch = pytest.importorskip("torch")
    maps, regions, _ = random_loco_data(np.random.default_rng(4), decimals=2)
    stacked = np.stack(maps).astype(np.float16)
    expected = auspro(list(stacked), regions, 0.3)
    assert auspro(stacked, regions, 0.3) == expected
    assert auspro(stacked[:, None], regions, 0.3) == expected
    assert auspro(torch.tensor(stacked), regions, 0.3) == pytest.approx(expected)
    uint8_regions = [[(mask.astype(np.uint8) * 255, s) for mask, s in r] for r in regions]
    assert auspro(stacked, uint8_regions, 0.3) == expected


def test_curve_is_monotone_and_ends_at_the_limit():
    maps, regions, _ = random_loco_data(np.random.default_rng(5), decimals=None)
    for limit in (0.05, 0.3):
        fpr, spro = spro_curve(maps, regions, limit)
        assert fpr[0] == 0 and spro[0] == 0 and fpr[-1] == pytest.approx(limit)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(spro) >= -1e-12)


# ------------------------------------------------------------------ LOCO groups


def test_loco_auspros_use_good_images_plus_one_kind():
    maps, regions, types = random_loco_data(np.random.default_rng(6), n=9)
    results = loco_auspros(maps, regions, types, fpr_limits=(0.05, 0.3))
    for name, kind in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
        keep = [i for i, t in enumerate(types) if t in ("good", kind)]
        for limit in (0.05, 0.3):
            expected = auspro([maps[i] for i in keep], [regions[i] for i in keep], limit)
            assert results[name][limit] == pytest.approx(expected, abs=1e-12)
    assert results["mean"][0.3] == pytest.approx((results["logical"][0.3] + results["structural"][0.3]) / 2)


def test_loco_auspros_missing_kind_is_nan():
    maps, regions, types = random_loco_data(np.random.default_rng(7), n=9)
    keep = [i for i, t in enumerate(types) if t != "logical_anomalies"]  # the structural view
    results = loco_auspros([maps[i] for i in keep], [regions[i] for i in keep], [types[i] for i in keep])
    assert math.isnan(results["logical"][0.05]) and math.isnan(results["mean"][0.05])
    assert 0 <= results["structural"][0.05] <= 1


def test_loco_image_aurocs_hand_computed():
    scores = [0.1, 0.2, 0.3, 0.15, 0.05, 0.25]
    types = ["good", "good", "logical_anomalies", "logical_anomalies",
             "structural_anomalies", "structural_anomalies"]
    labels = [0, 0, 1, 1, 1, 1]
    results = loco_image_aurocs(labels, scores, types)
    # logical: 0.3 beats both goods, 0.15 beats one -> 3/4; structural: 0.25 beats both -> 2/4
    assert results == pytest.approx({"logical": 0.75, "structural": 0.5, "mean": 0.625})
    assert results["logical"] == image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.15])


def test_loco_image_aurocs_missing_kind_is_nan():
    results = loco_image_aurocs([0, 1], [0.1, 0.2], ["good", "structural_anomalies"])
    assert results["structural"] == 1.0 and math.isnan(results["logical"]) and math.isnan(results["mean"])


# ------------------------------------------------------------------ bad input


def test_bad_inputs_raise():
    maps, regions = two_image_case(2.0)
    with pytest.raises(ValueError, match="2 maps but regions for 1"):
        auspro(maps, regions[:1])
    with pytest.raises(ValueError, match=r"shape \(1, 4\), its map \(1, 5\)"):
        auspro(maps, [[(np.ones((1, 4), bool), 2.0)], []])
    with pytest.raises(ValueError, match="empty"):
        auspro(maps, [[(np.zeros((1, 5), bool), 2.0)], []])
    with pytest.raises(ValueError, match="saturation_area"):
        auspro(maps, [[(regions[0][0][0], 0.0)], []])
    with pytest.raises(ValueError, match="pair"):
        auspro(maps, [[regions[0][0][0]], []])
    with pytest.raises(ValueError, match="fpr_limit"):
        auspro(maps, regions, 0.0)
    with pytest.raises(UndefinedMetricError, match="regions"):
        auspro(maps, [[], []])
    with pytest.raises(UndefinedMetricError, match="defect-free"):
        auspro([np.ones((1, 2))], [[(np.ones((1, 2), bool), 1.0)]])
    nan_map = maps[1].copy()
    nan_map[0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        auspro([maps[0], nan_map], regions)


def test_bad_loco_inputs_raise():
    maps, regions = two_image_case(2.0)
    with pytest.raises(ValueError, match="unknown MVTec LOCO defect types"):
        loco_auspros(maps, regions, ["scratch", "good"])
    with pytest.raises(ValueError, match="'good' but has defect regions"):
        loco_auspros(maps, regions, ["good", "good"])
    with pytest.raises(ValueError, match="2 images but 3 defect_types"):
        loco_auspros(maps, regions, ["good"] * 3)
    with pytest.raises(ValueError, match="labels must be 0"):
        loco_image_aurocs([1, 0], [0.1, 0.2], ["good", "logical_anomalies"])
