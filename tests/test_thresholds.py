"""Decision policies: thresholds set without real defects, and what they promise."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ad_models.thresholds import (DecisionPolicy, ScoreSample, choose_thresholds, decisions_on, expectation, fails,
                                  false_alarm_rate, false_alarm_rate_bound, good_images_to_confirm, good_threshold)


def _sample(good_scores, defect_scores, size: int = 8, seed: int = 0) -> ScoreSample:
    """Images whose maps are noise around 0, defective ones with a bright square scoring `defect_scores`."""
    rng = np.random.default_rng(seed)
    good_scores, defect_scores = np.asarray(good_scores, float), np.asarray(defect_scores, float)
    labels = np.r_[np.zeros(len(good_scores), int), np.ones(len(defect_scores), int)]
    maps = rng.normal(0, 1, (len(labels), size, size))
    masks = np.zeros(maps.shape, bool)
    masks[len(good_scores):, 2:5, 2:5] = True
    maps[masks] += 6
    return ScoreSample.from_predictions({"labels": labels, "scores": np.r_[good_scores, defect_scores],
                                         "maps": maps, "masks": masks})


def test_good_threshold_is_the_quantile_or_the_prediction_bound_when_too_few_images_show_it():
    assert good_threshold([3.0, 1.0, 2.0, 5.0, 4.0], 0.5) == (3.0, 5)  # the median: both estimates agree
    # ten values cannot show a 0.99 quantile: the normal prediction bound, wider than mean + 2.33 std
    values = np.arange(10.0)
    threshold, n = good_threshold(values)
    bound = 4.5 + stats.t.ppf(0.99, 9) * values.std(ddof=1) * math.sqrt(1 + 1 / 10)
    assert n == 10 and threshold == pytest.approx(bound) and threshold > 4.5 + 2.3263 * values.std(ddof=1)
    heavy = np.r_[np.zeros(49), 100.0]  # one far outlier among 50: none of them may fail at 0.99
    assert 100 < good_threshold(heavy)[0] == pytest.approx(100)
    assert good_threshold([7.0]) == (np.nextafter(7.0, np.inf), 1)  # one good image: it passes
    # enough values (>= 10 / (1 - q)): the empirical quantile alone, as for pixels
    assert good_threshold(np.arange(10001.0), 0.999)[0] == pytest.approx(9990.0)
    for bad, match in (([], "at least one good image"), ([1.0, math.nan], "NaN"), ([1.0], "quantile")):
        with pytest.raises(ValueError, match=match):
            good_threshold(bad, 0 if match == "quantile" else 0.99)


def test_the_prediction_bound_holds_its_false_alarm_rate_on_unseen_good_images():
    # what the bound is for: from 8 good images, the share of new good images failing stays near the
    # target, where a plain normal fit fails about twice as many
    rng = np.random.default_rng(0)
    rates, plain = [], []
    for _ in range(400):
        seen, unseen = rng.normal(size=8), rng.normal(size=500)
        rates.append(fails(unseen, good_threshold(seen, 0.95)[0]).mean())
        plain.append(fails(unseen, seen.mean() + 1.645 * seen.std(ddof=1)).mean())
    assert 0.035 < np.mean(rates) < 0.065 and np.mean(plain) > 0.075
    # and the rate it expects at its own threshold is the target (less when the largest value seen is
    # past the bound: none of them may fail)
    assert false_alarm_rate(np.arange(10.0), good_threshold(np.arange(10.0))[0]) == pytest.approx(0.01)
    seen = rng.normal(size=8)
    assert false_alarm_rate(seen, good_threshold(seen, 0.95)[0]) <= 0.05 + 1e-9


def test_fails_at_or_above_the_threshold_and_on_nan():
    assert fails([0.5, 1.0, 1.5, math.nan], 1.0).tolist() == [False, True, True, True]


def test_the_false_alarm_policy_needs_good_images_only_and_reports_the_banks_recall():
    good = np.linspace(0, 1, 20)
    sample = _sample(good, [0.5, 3.0, 4.0, 5.0])
    chosen = choose_thresholds(DecisionPolicy(max_false_alarm_rate=0.05), sample, "pfm")
    assert chosen["image"] == pytest.approx(good_threshold(good, 0.95)[0])
    assert chosen["expected_false_alarm_rate"] == pytest.approx(0.05)
    assert chosen["bank_recall"] == 0.75 and chosen["n_good_images"] == 20 and chosen["n_defective"] == 4
    assert chosen["pixel"] > 2 and chosen["bank_pixel_recall"] > 0.9  # noise passes, the squares are drawn
    assert chosen["expected_pixel_false_alarm_rate"] <= 0.01
    # good images only: the same thresholds without the defective ones
    alone = choose_thresholds(DecisionPolicy(max_false_alarm_rate=0.05), _sample(good, []), "pfm")
    assert alone["image"] == chosen["image"] and "bank_recall" not in alone
    assert "5.00% of good parts fail" in chosen["policy_text"]
    assert "expected false alarms: 5.0% of good parts" in expectation(chosen)
    assert "caught on the bank: 75% of 4" in expectation(chosen)
    # 20 good images cannot confirm 5 % on their own: the text says so, and how many would
    assert chosen["false_alarm_rate_bound"] == pytest.approx(false_alarm_rate_bound(good, chosen["image"]))
    assert chosen["false_alarm_rate_bound"] > 0.1
    bound = chosen["false_alarm_rate_bound"]
    assert f"at most {bound:.1%} with 95% confidence: 59 would confirm 5.0%" in expectation(chosen)


def test_the_false_alarm_bound_holds_whatever_the_distribution():
    """Clopper-Pearson: the rate at which seeing this few failures has probability 5 %."""
    none_of_17 = false_alarm_rate_bound(np.zeros(17), 1.0)
    assert none_of_17 == pytest.approx(1 - 0.05 ** (1 / 17)) and 0.16 < none_of_17 < 0.17
    one_of_20 = false_alarm_rate_bound(np.r_[np.zeros(19), 2.0], 1.0)
    assert stats.binom.cdf(1, 20, one_of_20) == pytest.approx(0.05)
    assert false_alarm_rate_bound(np.ones(5), 1.0) == 1.0 and math.isnan(false_alarm_rate_bound([], 1.0))
    assert good_images_to_confirm(0.02) == 149
    assert false_alarm_rate_bound(np.zeros(149), 1.0) <= 0.02 < false_alarm_rate_bound(np.zeros(148), 1.0)


def test_bank_f1_and_fixed_policies():
    sample = _sample(np.linspace(0, 1, 10), [0.9, 2.0, 3.0])
    f1 = choose_thresholds(DecisionPolicy(policy="bank_f1"), sample)
    assert f1["image"] == 0.9 and f1["bank_f1"] == pytest.approx(f1["bank_f1_max"]) == pytest.approx(6 / 7)
    assert 0.1 < f1["expected_false_alarm_rate"] < 0.3  # 1.0 of the good scores lies above it
    with pytest.raises(ValueError, match="defect bank"):
        choose_thresholds(DecisionPolicy(policy="bank_f1"), _sample([0.1, 0.2], []))
    fixed = DecisionPolicy(policy="fixed", image_threshold={"pfm": 0.95, "slsg": 3}, pixel_threshold=4.0)
    chosen = choose_thresholds(fixed, sample, "pfm")
    assert chosen["image"] == 0.95 and chosen["pixel"] == 4.0 and chosen["bank_recall"] == 2 / 3
    with pytest.raises(ValueError, match="no value for method 'esad'"):
        choose_thresholds(fixed, sample, "esad")


def test_policy_options_are_checked():
    for bad, match in (({"policy": "f1"}, "one of"), ({"max_false_alarm_rate": 1.5}, r"in \(0, 1\)"),
                       ({"max_false_alarm_rate": True}, "max_false_alarm_rate"), ({"policy": "fixed"}, "needs image_threshold"),
                       ({"policy": "fixed", "image_threshold": 1, "pixel_threshold": {"pfm": "x"}}, "pixel_threshold"),
                       ({"quantile": 0.99}, "unknown decision option")):
        with pytest.raises(ValueError, match=match):
            DecisionPolicy.from_dict(bad)


def test_nan_scores_set_no_threshold():
    sample = _sample([0.1, math.nan, 0.3], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        choose_thresholds(DecisionPolicy(), sample)


def test_decisions_on_a_test_set():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.95])
    masks = np.zeros((6, 4, 4), bool)
    masks[4:, :2, :2] = True
    maps = masks * 2.0
    seen = decisions_on(labels, scores, masks, maps, {"image": 0.5, "pixel": 1.0, "expected_false_alarm_rate": 0.01})
    assert seen["recall_at_threshold"] == 1.0 and seen["precision_at_threshold"] == pytest.approx(2 / 3)
    assert seen["f1_at_threshold"] == pytest.approx(0.8) and seen["good_pass_rate_at_threshold"] == 0.75
    assert seen["false_alarm_rate_at_threshold"] == 0.25 and seen["expected_false_alarm_rate"] == 0.01
    assert seen["pixel_iou_at_threshold"] == 1.0 and seen["good_pixels_flagged_at_threshold"] == 0.0
    # one of four good images failing where 1 % were expected: P(>= 1 of 4) = 1 - 0.99^4
    assert seen["false_alarm_p_value"] == pytest.approx(1 - 0.99 ** 4)
    many = decisions_on(labels, np.r_[np.full(4, 0.9), scores[4:]], masks, maps, {"image": 0.5, "pixel": 1.0,
                                                                                   "expected_false_alarm_rate": 0.01})
    assert many["false_alarm_p_value"] == pytest.approx(0.01 ** 4)  # all four: the promise did not hold
