"""Pass/fail decisions: the thresholds a model predicts with, set by a policy the user names.

A quality engineer needs a threshold before any real defect has been seen. The policies
(`DecisionPolicy`, params.yaml `decision`):

    false_alarm_rate   the image threshold is the score a good part exceeds with probability
                       `max_false_alarm_rate`, estimated on held-out good images only (the bank's
                       good images and validation/good, never training images: the model has seen
                       those); the pixel threshold likewise with `max_pixel_false_alarm_rate` of the
                       good images' pixels. Needs no defect, real or synthetic. The default.
    bank_f1            the image and pixel thresholds that maximise F1 on the synthetic defect bank
    fixed              thresholds the user gives (a number, or one per method: scores are on each
                       method's own scale)

Whatever the policy, `choose_thresholds` records what the line should expect: the estimated share of
good parts failed (`expected_false_alarm_rate`), the most it can be with 95 % confidence whatever the
scores' distribution (`false_alarm_rate_bound`: with few held-out good images the estimate leans on a
fitted tail, and this says how far to trust it), and the share of the bank's defects caught
(`bank_recall`). A part fails where its score is >= the image threshold (`fails`); a pixel belongs
to the drawn defect mask where its map value is >= the pixel threshold.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import stats

from ad_models import metrics

POLICIES = ("false_alarm_rate", "bank_f1", "fixed")
PIXEL_GRID = 128  # about this many pixels a side per image is plenty for a pixel threshold


def fails(scores, threshold: float) -> np.ndarray:
    """The decision for each score: True (fail) where score >= threshold; a NaN score fails too."""
    scores = np.asarray(scores, dtype=np.float64)
    return ~(scores < threshold)


@dataclass(frozen=True)
class DecisionPolicy:
    policy: str = "false_alarm_rate"
    max_false_alarm_rate: float = 0.02  # share of good parts that may fail
    max_pixel_false_alarm_rate: float = 0.001  # share of a good part's pixels the drawn mask may cover
    image_threshold: float | dict | None = None  # policy fixed: a number, or {method: number}
    pixel_threshold: float | dict | None = None

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("max_false_alarm_rate", "max_pixel_false_alarm_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{name} must be a number in (0, 1) (a share of good parts or pixels), got {value!r}")
        if self.policy == "fixed":
            for name in ("image_threshold", "pixel_threshold"):
                value = getattr(self, name)
                values = value.values() if isinstance(value, dict) else [value]
                if value is None or not values or not all(_is_finite_number(v) for v in values):
                    raise ValueError(f"policy fixed needs {name}: a number, or {{method: number}}, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "DecisionPolicy":
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown decision option(s) {unknown}; known: {sorted(f.name for f in fields(cls))}")
        return cls(**values)

    def fixed_threshold(self, name: str, method: str | None) -> float:
        value = getattr(self, name)
        if isinstance(value, dict):
            if method not in value:
                raise ValueError(f"policy fixed: {name} has no value for method {method!r} (it has {sorted(value)})")
            value = value[method]
        return float(value)

    def describe(self) -> str:
        """One line for logs, reports and `adpipe predict`."""
        if self.policy == "false_alarm_rate":
            return (f"at most {self.max_false_alarm_rate:.2%} of good parts fail "
                    f"(pixels: {self.max_pixel_false_alarm_rate:.2%}), set on held-out good images")
        if self.policy == "bank_f1":
            return "best F1 on the synthetic defect bank"
        return "fixed thresholds"


def _is_finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# ----------------------------------------------------------------------------- the data thresholds are set on

@dataclass
class ScoreSample:
    """A model's image scores and a subsample of its map values on validation data (the bank,
    validation images), with labels: everything a policy needs, in memory or in a few MB."""
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pixel_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pixel_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    pixel_of_good_image: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @classmethod
    def from_predictions(cls, pred: dict[str, Any], mask_known=None) -> "ScoreSample":
        """From `predict_dataset`'s output. `mask_known` (per image): whether every pixel has a
        label; defective images without a mask add their image score but no pixel."""
        labels, maps, masks = np.asarray(pred["labels"]), pred["maps"], pred["masks"]
        known = np.ones(len(labels), bool) if mask_known is None else np.asarray(mask_known, bool) | (labels == 0)
        step = max(1, maps.shape[-1] // PIXEL_GRID)
        values, truth = maps[known][:, ::step, ::step], masks[known][:, ::step, ::step]
        good_image = np.broadcast_to((labels[known] == 0)[:, None, None], values.shape)
        return cls(labels.astype(np.int64), np.asarray(pred["scores"], np.float64),
                   values.ravel().astype(np.float64), truth.ravel().astype(bool), good_image.ravel().copy())

    @classmethod
    def concat(cls, samples: list["ScoreSample"]) -> "ScoreSample":
        return cls(**{f.name: np.concatenate([getattr(s, f.name) for s in samples]) if samples
                      else getattr(cls(), f.name) for f in fields(cls)})

    @property
    def good_scores(self) -> np.ndarray:
        return self.scores[self.labels == 0]

    @property
    def defect_scores(self) -> np.ndarray:
        return self.scores[self.labels == 1]

    @property
    def good_pixels(self) -> np.ndarray:
        return self.pixel_values[self.pixel_of_good_image]

    def finite(self) -> bool:
        return bool(np.isfinite(self.scores).all() and np.isfinite(self.pixel_values).all())


# ----------------------------------------------------------------------------- estimates from good images

def _predictive(values: np.ndarray):
    """The distribution of one more good value given these, under a normal fit: Student's t with
    n - 1 degrees of freedom around the mean, scale std * sqrt(1 + 1/n) (the prediction interval),
    so the estimate's own uncertainty widens the tail; None when the values cannot give one."""
    std = values.std(ddof=1) if values.size > 1 else 0.0
    if values.size < 2 or not std > 0:
        return None
    return stats.t(df=values.size - 1, loc=values.mean(), scale=std * math.sqrt(1 + 1 / values.size))


def good_threshold(good_scores, quantile: float = 0.99) -> tuple[float, int]:
    """(threshold, number of values used): the score a good image exceeds with probability about
    1 - `quantile`, estimated from good images only.

    The estimate is the empirical quantile (linear interpolation) when there are enough values to
    see that tail (at least 10 / (1 - quantile): 1000 for 0.99; always so for pixels). With fewer
    it is the larger of the empirical quantile and the normal fit's prediction bound (`_predictive`),
    and, when the tail lies past the largest value seen (n < 1 / (1 - quantile)), above every value:
    with the 6-20 good images of a bank the empirical 0.99 quantile sits just under their maximum,
    and a plain normal fit (mean + 2.33 std) still failed 25 % of unseen good images in a benchmark
    (6 bank images); the bound (mean + 3.6 std at n = 6, + 2.7 std at n = 20) holds the rate."""
    values = np.asarray(good_scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no good-image scores: a threshold needs at least one good image")
    if not np.isfinite(values).all():
        raise ValueError(f"{int((~np.isfinite(values)).sum())} good-image score(s) are NaN or infinite")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    threshold = float(np.quantile(values, quantile, method="linear"))
    fit = _predictive(values) if quantile < 1 and values.size < 10 / (1 - quantile) else None
    if fit is not None:
        threshold = max(threshold, float(fit.ppf(quantile)))
    if quantile < 1 and values.size < 1 / (1 - quantile):  # the tail lies past every value seen: none may fail
        threshold = max(threshold, float(np.nextafter(values.max(), np.inf)))
    return threshold, int(values.size)


def false_alarm_rate(good_scores, threshold: float) -> float:
    """The share of good parts expected to fail at `threshold`, estimated as `good_threshold` does:
    the empirical share, or with fewer than 1000 values the larger of it and the prediction bound's tail."""
    values = np.asarray(good_scores, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan")
    rate = float(fails(values, threshold).mean())
    fit = _predictive(values) if values.size < 1000 else None
    if fit is not None:
        rate = max(rate, float(fit.sf(threshold)))
    return rate


CONFIDENCE = 0.95  # of the distribution-free bound on the false-alarm rate


def false_alarm_rate_bound(good_scores, threshold: float, confidence: float = CONFIDENCE) -> float:
    """The largest share of good parts failing at `threshold` that the held-out good images leave
    plausible at `confidence`: the one-sided Clopper-Pearson upper bound from how many of them fail,
    whatever the scores' distribution. None failing of n gives 1 - (1 - confidence)^(1/n): 16 % for
    the 17 held-out images of a 100-image category, 2 % only from 149 images on."""
    values = np.asarray(good_scores, dtype=np.float64).ravel()
    if values.size == 0:
        return float("nan")
    failed = int(fails(values, threshold).sum())
    return 1.0 if failed == values.size else float(stats.beta.ppf(confidence, failed + 1, values.size - failed))


def good_images_to_confirm(rate: float, confidence: float = CONFIDENCE) -> int:
    """How many held-out good images, none failing, bound the false-alarm rate by `rate` at `confidence`."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - rate))


# ----------------------------------------------------------------------------- the decision

def choose_thresholds(policy: DecisionPolicy, sample: ScoreSample, method: str | None = None) -> dict[str, Any]:
    """The image and pixel thresholds of `policy` on `sample`, and what they mean for the line.

    Returns {"policy": {...}, "policy_text", "image", "pixel", "map_low" (the good pixels' median:
    the blue end of a map's colour scale), "expected_false_alarm_rate" (good parts),
    "false_alarm_rate_bound" (its 95 % upper bound, `false_alarm_rate_bound`),
    "expected_pixel_false_alarm_rate", "n_good_images", "n_good_pixels", and where the sample has
    defects: "n_defective", "bank_recall", "bank_precision", "bank_f1" (at the threshold),
    "bank_f1_max", "bank_pixel_recall", "bank_image_auroc", "bank_pixel_auroc"}.
    """
    good, defective, good_pixels = sample.good_scores, sample.defect_scores, sample.good_pixels
    if not sample.finite():
        raise ValueError("the model's validation scores or maps contain NaN or inf: no threshold can be set")
    if policy.policy == "false_alarm_rate":
        image, _ = good_threshold(good, 1 - policy.max_false_alarm_rate)
        pixel, _ = good_threshold(good_pixels, 1 - policy.max_pixel_false_alarm_rate)
    elif policy.policy == "bank_f1":
        if not len(defective) or not sample.pixel_labels.any():
            raise ValueError("policy bank_f1 needs defective validation images with masks (build the defect bank)")
        image = metrics.f1_max_threshold(sample.labels, sample.scores)[1]
        pixel = metrics.f1_max_threshold(sample.pixel_labels, sample.pixel_values)[1]
    else:
        image, pixel = policy.fixed_threshold("image_threshold", method), policy.fixed_threshold("pixel_threshold", method)
    out: dict[str, Any] = {
        "policy": asdict(policy), "policy_text": policy.describe(), "image": float(image), "pixel": float(pixel),
        "map_low": float(np.median(good_pixels)) if len(good_pixels) else float(np.min(sample.pixel_values)),
        "expected_false_alarm_rate": false_alarm_rate(good, image),
        "false_alarm_rate_bound": false_alarm_rate_bound(good, image),
        "expected_pixel_false_alarm_rate": float(fails(good_pixels, pixel).mean()) if len(good_pixels) else float("nan"),
        "n_good_images": int(len(good)), "n_good_pixels": int(len(good_pixels)), "n_defective": int(len(defective))}
    if len(defective):
        caught = fails(defective, image)
        predicted = int(caught.sum() + fails(good, image).sum())
        out.update(bank_recall=float(caught.mean()), bank_precision=float(caught.sum() / max(predicted, 1)),
                   bank_f1=float(2 * caught.sum() / (predicted + len(defective))),
                   bank_f1_max=metrics.f1_max(sample.labels, sample.scores))
        if len(good):
            out["bank_image_auroc"] = metrics.image_auroc(sample.labels, sample.scores)
    if sample.pixel_labels.any() and not sample.pixel_labels.all():
        out["bank_pixel_recall"] = float(fails(sample.pixel_values[sample.pixel_labels], pixel).mean())
        out["bank_pixel_auroc"] = metrics.image_auroc(sample.pixel_labels, sample.pixel_values)
    return out


def decisions_on(labels, scores, masks, maps, thresholds: dict[str, Any]) -> dict[str, float]:
    """What a model deployed with `thresholds` does on labelled images (the test set): precision,
    recall, F1 and the share of good images passed at the image threshold, the false-alarm rate seen
    against the one expected, and the IoU of the drawn defect masks with the true ones."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    predicted = fails(scores, thresholds["image"])
    good = labels == 0
    tp, fp, positives = int((predicted & ~good).sum()), int((predicted & good).sum()), int((~good).sum())
    out = {"image_threshold": float(thresholds["image"]), "pixel_threshold": float(thresholds["pixel"]),
           "precision_at_threshold": tp / max(tp + fp, 1), "recall_at_threshold": tp / max(positives, 1),
           "good_pass_rate_at_threshold": float((~predicted[good]).mean()) if good.any() else float("nan"),
           "expected_false_alarm_rate": thresholds.get("expected_false_alarm_rate", float("nan")),
           "false_alarm_rate_bound": thresholds.get("false_alarm_rate_bound", float("nan"))}
    out["false_alarm_rate_at_threshold"] = 1 - out["good_pass_rate_at_threshold"]
    out["f1_at_threshold"] = 2 * tp / max(tp + fp + positives, 1)
    drawn = maps >= thresholds["pixel"]
    inter, union = int((drawn & masks).sum()), int((drawn | masks).sum())
    out["pixel_iou_at_threshold"] = inter / union if union else float("nan")
    if good.any():
        out["good_pixels_flagged_at_threshold"] = float(drawn[good].mean())
        # how surprising the good images failed are if the promise holds: a one-sided binomial p-value
        n_good, n_failed = int(good.sum()), fp
        rate = out["expected_false_alarm_rate"]
        out["false_alarm_p_value"] = float(stats.binom.sf(n_failed - 1, n_good, rate)) if math.isfinite(rate) else float("nan")
    return out


def expectation(thresholds: dict[str, Any]) -> str:
    """What the line should expect from a model deployed with `thresholds`, in one sentence."""
    parts = [f"policy: {thresholds.get('policy_text', 'good-image quantile')}"]
    rate = thresholds.get("expected_false_alarm_rate")
    if rate is not None and math.isfinite(rate):
        expected = (f"expected false alarms: {rate:.1%} of good parts "
                    f"(estimated on {thresholds.get('n_good_images', '?')} held-out good images")
        bound = thresholds.get("false_alarm_rate_bound")
        if bound is not None and math.isfinite(bound) and bound > rate:
            expected += f"; at most {bound:.1%} with {CONFIDENCE:.0%} confidence"
            promised = (thresholds.get("policy") or {}).get("max_false_alarm_rate")
            if (thresholds.get("policy") or {}).get("policy") == "false_alarm_rate" and promised and bound > promised:
                expected += f": {good_images_to_confirm(promised)} would confirm {promised:.1%}"
        parts.append(expected + ")")
    if thresholds.get("bank_recall") is not None:
        parts.append(f"artificial defects caught on the bank: {thresholds['bank_recall']:.0%} "
                     f"of {thresholds.get('n_defective', '?')}")
    return "; ".join(parts)
