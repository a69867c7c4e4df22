"""The synthetic validation bank: which images it holds out, what it writes, how training uses it."""
import json

import cv2
import numpy as np
import pytest

from ad_models import runs
from ad_models.data.sources import prepare_category
from ad_models.defects.bank import BankConfig, build_bank, holdout_paths, read_bank
from ad_models.thresholds import DecisionPolicy


def test_holdout_is_stable_when_new_images_arrive():
    old = [f"train/good/{i:03d}.png" for i in range(200)]
    chosen = holdout_paths(old, 0.1, 4, seed=0)
    assert 5 <= len(chosen) <= 40 and chosen == sorted(chosen)  # a hash draw per image: about 10 %
    grown = holdout_paths(old + [f"train/good/new_{i}.png" for i in range(50)], 0.1, 4, seed=0)
    assert set(chosen) <= set(grown)  # adding images never reshuffles the bank
    assert holdout_paths(old, 0.1, 4, seed=1) != chosen
    assert len(holdout_paths(old[:5], 0.1, 4, seed=0)) == 4  # the minimum tops it up
    assert len(holdout_paths(old[:3], 0.1, 4, seed=0)) == 2  # ... but one image always stays for training


def test_bank_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown option"):
        BankConfig.from_dict({"holdout": 0.2})
    with pytest.raises(ValueError, match="holdout_fraction"):
        BankConfig.from_dict({"holdout_fraction": 1.5})
    with pytest.raises(ValueError, match="variants.odd"):
        BankConfig.from_dict({"variants": {"odd": {"blend": "glue"}}})


@pytest.fixture
def category(tmp_path):
    folder = tmp_path / "granite"
    prepare_category("synthetic", "granite", folder, n_train=12, n_test_good=4, n_test_defect=6, size=64, seed=0)
    return folder


def test_bank_writes_held_out_good_images_and_defects_with_masks(category, tmp_path):
    bank = build_bank(category, tmp_path / "bank", {"image_size": 48, "min_holdout": 3, "defects_per_image": 3},
                      progress=False)
    good, defective = bank[bank.label == 0], bank[bank.label == 1]
    assert len(good) == 3 and len(defective) == 9
    assert set(defective.defect_type) == {"synthetic_perlin_texture", "synthetic_perlin_blend", "synthetic_stroke",
                                          "synthetic_cutpaste", "synthetic_cutpaste_scar"}  # 9 defects cycle all 5
    for path, mask_path in zip(defective.path, defective.mask_path):
        image, mask = cv2.imread(path), cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
        assert image.shape == (48, 48, 3) and mask.shape == (48, 48)
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).any()
    _, held_out = read_bank(tmp_path / "bank")
    assert len(held_out) == 3 and all(h.startswith("train/good/") for h in held_out)
    info = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert info["counts"]["train_remaining"] == 9


def test_bank_is_deterministic(category, tmp_path):
    first = build_bank(category, tmp_path / "a", {"image_size": 32}, progress=False)
    second = build_bank(category, tmp_path / "b", {"image_size": 32}, progress=False)
    for a, b in zip(first.path, second.path):
        assert np.array_equal(cv2.imread(a), cv2.imread(b))
    other = build_bank(category, tmp_path / "c", {"image_size": 32, "seed": 5}, progress=False)
    assert list(other.path) != list(first.path) or any(
        not np.array_equal(cv2.imread(a), cv2.imread(b)) for a, b in zip(first.path, other.path))


def test_training_leaves_the_bank_out_and_evaluation_sets_thresholds_on_it(category, tmp_path):
    build_bank(category, tmp_path / "bank", {"image_size": 64, "min_holdout": 3}, progress=False)
    log = runs.train("mean_image", {"image_size": 64}, category, tmp_path / "model", bank_dir=tmp_path / "bank",
                     device="cpu", progress=False)
    assert log["counts"]["train"] == 9 and log["counts"]["held_out_for_bank"] == 3
    assert log["train_images"] == 9
    assert not (tmp_path / "model" / "calibration.json").exists()  # thresholds are not the model's: no retraining
    result = runs.evaluate(tmp_path / "model", category, tmp_path / "eval", bank_dir=tmp_path / "bank",
                           policy=DecisionPolicy(policy="bank_f1"), device="cpu", progress=False)
    calibration = json.loads((tmp_path / "eval" / "calibration.json").read_text())
    assert calibration["n_good_images"] == 3 and calibration["n_defective"] == 6
    assert calibration["policy"]["policy"] == "bank_f1" and calibration["bank_f1"] == pytest.approx(calibration["bank_f1_max"])
    assert calibration["validation_sets"]["bank"]["n_defective"] == 6
    assert result["image_threshold"] == calibration["image"] and result["pixel_threshold"] == calibration["pixel"]
    assert result["decision_policy"] == "best F1 on the synthetic defect bank"
    for key in ("precision_at_threshold", "recall_at_threshold", "f1_at_threshold", "good_pass_rate_at_threshold",
                "bank_recall"):
        assert 0 <= result[key] <= 1, key
    # the gallery's fourth row is the mask the model draws at its pixel threshold
    assert cv2.imread(str(tmp_path / "eval" / "gallery.png")).shape[0] == 4 * 128
    plain = runs.evaluate(tmp_path / "model", category, tmp_path / "eval_plain", device="cpu", progress=False)
    assert "image_threshold" not in plain and not (tmp_path / "eval_plain" / "calibration.json").exists()


def test_a_missing_bank_is_a_clear_error(category, tmp_path):
    with pytest.raises(FileNotFoundError, match="defect bank is not built"):
        runs.train("mean_image", {"image_size": 32}, category, tmp_path / "m", bank_dir=tmp_path / "nope",
                   device="cpu", progress=False)
