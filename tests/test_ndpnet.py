"""NDP-Net: its pieces against hand-made cases, a short training run, save/load, real data."""
import pandas as pd
import pytest
import torch

from ad_models import runs
from ad_models.data.layout import read_manifest
from ad_models.data.loading import ImageDataset
from ad_models.data.sources import prepare_category
from ad_models.defects.bank import build_bank
from ad_models.methods import create_method, load_method
from ad_models.methods.ndpnet import (NDPNetConfig, defect_perception_loss, focal_loss, reference_repair,
                                      smooth_map, to_patches)

TINY = {"image_size": 64, "widths": (8, 8, 16, 16, 16), "ffm_channels": 8, "phase1_epochs": 2,
        "phase2_epochs": 2, "batch_size": 4, "select_every": 1}


def test_config_rejects_what_the_network_cannot_do():
    with pytest.raises(ValueError, match="multiple of 64"):
        NDPNetConfig(image_size=100)
    with pytest.raises(ValueError, match="five layers"):
        NDPNetConfig(widths=(8, 16))
    with pytest.raises(ValueError, match="larger than the largest patch size"):
        NDPNetConfig(ffm_kernel=3)
    with pytest.raises(ValueError, match="unknown option"):
        create_method("ndpnet", {"epochs": 3})


def test_reference_repair_rebuilds_a_feature_map_from_reference_patches():
    torch.manual_seed(0)
    ref = torch.randn(1, 4, 8, 8)
    # a sharp softmax and the reference itself as input: every patch finds itself
    assert torch.allclose(reference_repair(ref, ref, 2, temperature=1e-3), ref, atol=1e-4)
    # a defective patch (a flipped sign) is replaced by reference content, not copied
    damaged = ref.clone()
    damaged[..., :2, :2] *= -1
    repaired = reference_repair(damaged, ref, 2, temperature=1e-3)
    patches = to_patches(ref, 2)[0]
    first = to_patches(repaired, 2)[0, 0]
    assert torch.isclose((patches - first).abs().sum(1), torch.tensor(0.0), atol=1e-3).any()
    assert not torch.allclose(repaired[..., :2, :2], damaged[..., :2, :2])
    # Eq. 4 as printed (temperature 1): a convex combination of reference patches, shape kept
    soft = reference_repair(damaged, ref, 4)
    assert soft.shape == ref.shape
    assert soft.abs().max() <= ref.abs().max() + 1e-5


def test_reference_repair_takes_one_reference_per_image():
    torch.manual_seed(0)
    refs = torch.randn(2, 4, 8, 8)
    # each image rebuilt from its own reference: with a sharp softmax, exactly that reference
    repaired = reference_repair(refs, refs, 2, temperature=1e-3)
    assert torch.allclose(repaired, refs, atol=1e-4)
    swapped = reference_repair(refs, refs.flip(0), 2, temperature=1e-3)
    assert not torch.allclose(swapped[0], refs[0], atol=0.1)


def test_several_references_cover_the_training_set_and_each_image_uses_its_nearest(tiny_category):
    dataset, _ = tiny_category
    rows = read_manifest(dataset)
    train = ImageDataset(rows[rows.split == "train"], 64)
    one = create_method("ndpnet", {**TINY, "phase2_epochs": 1})
    log_one = one.fit(train, device="cpu", progress=False)
    three = create_method("ndpnet", {**TINY, "phase2_epochs": 1, "references": 3})
    log = three.fit(train, device="cpu", progress=False)
    # the first reference is the paper's typical image; the others are further, distinct images
    assert log["reference_images"][0] == log_one["reference_image"]
    assert len(set(log["reference_images"])) == 3 and three.net.reference.shape[0] == 3
    # an image that is a reference is repaired with itself at test time (its nearest), and never
    # during training; the choice changes the reconstruction
    refs = three.net.reference
    with torch.no_grad():
        features = three.net.encoder(refs)
        own, _ = three._reconstruct(features)
        others, _ = three._reconstruct(features, torch.eye(3, dtype=torch.bool))
    assert not torch.allclose(own, others)
    with pytest.raises(ValueError, match=f"only {len(train)} training images"):
        create_method("ndpnet", {**TINY, "references": len(train) + 1}).fit(train, device="cpu", progress=False)


def test_defect_perception_loss_is_zero_when_feature_differences_trace_the_mask():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:6] = 1
    good = [torch.zeros(1, 3, 8, 8)]
    defect = [mask.expand(1, 3, 8, 8) * 2.0]
    assert defect_perception_loss(good, defect, mask) < 1e-8
    shifted = [torch.roll(defect[0], 3, dims=-1)]
    assert defect_perception_loss(good, shifted, mask) > 0.05


def test_focal_loss_prefers_the_right_answer():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    right = torch.cat([1 - target, target], 1) * 8 - 4
    assert focal_loss(right, target) < 1e-3 < focal_loss(-right, target)
    # soft targets at a lower scale work (masks are area-resized to each MSDSM scale)
    assert focal_loss(right[..., ::2, ::2], target).isfinite()


def test_smoothing_removes_a_single_hot_pixel_and_keeps_a_blob():
    maps = torch.zeros(1, 24, 24)
    maps[0, 3, 3] = 10.0
    maps[0, 8:18, 8:18] = 1.0
    smoothed = smooth_map(maps, 5)
    assert smoothed[0, :6, :6].max() == 0 and smoothed[0, 12, 12] == 1.0
    assert torch.allclose(smooth_map(torch.full((2, 9, 9), 0.3), 5), torch.full((2, 9, 9), 0.3))


def test_two_phase_training_selects_on_the_bank_and_round_trips(tiny_category, tmp_path):
    dataset, bank = tiny_category
    log = runs.train("ndpnet", TINY, dataset, tmp_path / "model", bank_dir=bank, device="cpu", progress=False)
    assert log["counts"]["train"] == 7 and log["counts"]["held_out_for_bank"] == 3
    assert len(log["phase1_losses"]) == 2 and len(log["phase2_losses"]) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in log["phase1_losses"] + log["phase2_losses"])
    assert [s["epoch"] for s in log["checkpoint_selection"]] == [1, 2]
    assert log["selected_epoch"] in (1, 2)
    assert log["reference_image"].endswith(".png") and "/train/good/" in log["reference_image"]
    assert log["reference_images"] == [log["reference_image"]]  # the paper's one reference
    assert "perceptual" in log["provenance"]  # which network the perceptual loss used

    model = load_method(tmp_path / "model", device="cpu")
    images = torch.rand(2, 3, 80, 72)  # not the training size: maps come back at input size
    scores, maps = model.predict(images)
    assert scores.shape == (2,) and maps.shape == (2, 80, 72)
    assert torch.all((maps >= 0) & (maps <= 1)) and torch.allclose(scores, maps.flatten(1).amax(1))
    again = load_method(tmp_path / "model", device="cpu").predict(images)
    assert torch.equal(again[0], scores) and torch.equal(again[1], maps)
    result = runs.evaluate(tmp_path / "model", dataset, tmp_path / "eval", bank_dir=bank, device="cpu",
                           progress=False)
    assert "f1_at_threshold" in result and 0 <= result["good_pass_rate_at_threshold"] <= 1

    # the learning curve puts phase-2 checkpoints after phase 1's epochs, where their losses are
    curve = pd.read_csv(tmp_path / "eval" / "learning_curve.csv")
    assert curve.step.tolist() == [1, 2, 3, 4] and set(curve.unit) == {"epoch"}
    assert curve.bank_image_auroc.notna().tolist() == [False, False, True, True]
    assert curve.step[curve.selected].tolist() == [2 + log["selected_epoch"]]
    assert curve.loss.tolist() == pytest.approx([sum(row) for row in log["loss_per_epoch"]])


def test_phase_two_leaves_the_encoder_as_phase_one_made_it(tiny_category):
    dataset, _ = tiny_category
    rows = read_manifest(dataset)
    train = ImageDataset(rows[rows.split == "train"], 64)
    states = []
    for phase2 in (1, 3):  # same seed, same phase 1; only the length of phase 2 differs
        method = create_method("ndpnet", {**TINY, "phase1_epochs": 1, "phase2_epochs": phase2})
        method.fit(train, device="cpu", progress=False)
        states.append({k: v.clone() for k, v in method.net.state_dict().items()})
    encoder = [k for k in states[0] if k.startswith("encoder.")]
    assert encoder and all(torch.equal(states[0][k], states[1][k]) for k in encoder)  # BN stats included
    assert not torch.equal(states[0]["decoder.out.weight"], states[1]["decoder.out.weight"])


@pytest.mark.slow
def test_ndpnet_beats_the_mean_image_baseline_on_magnetic_tile(shared_data, tmp_path):
    dataset = tmp_path / "tile"
    prepare_category("magnetic_tile", "tile", dataset, source_dir=shared_data / "magnetic_tile", limit_per_kind=60)
    bank = tmp_path / "bank"
    build_bank(dataset, bank, {"image_size": 64}, progress=False)
    results = {}
    # a CPU budget: 64 px, narrow layers, 20 + 40 epochs at lr 1e-3 (paper: 256 px, 400 + 200 at 1e-4)
    configs = {"ndpnet": {"image_size": 64, "widths": (16, 16, 32, 32, 64), "phase1_epochs": 20, "phase2_epochs": 40,
                          "batch_size": 8, "select_every": 5, "lr": 1e-3},
               "mean_image": {"image_size": 64}}
    for method, config in configs.items():
        runs.train(method, config, dataset, tmp_path / "models" / method, bank_dir=bank, device="cpu", progress=False)
        results[method] = runs.evaluate(tmp_path / "models" / method, dataset, tmp_path / "eval" / method,
                                        device="cpu", progress=False)
    print({m: {k: round(r[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")} for m, r in results.items()})
    ndp, baseline = results["ndpnet"], results["mean_image"]
    # measured: image 0.744 / pixel 0.577 / AUPRO 0.274 against 0.726 / 0.551 / 0.154: at this budget
    # NDP-Net's lead is in localisation; it must at least not lose on detection
    assert ndp["aupro"] > baseline["aupro"] + 0.08
    assert ndp["pixel_auroc"] > baseline["pixel_auroc"] + 0.01
    assert ndp["image_auroc"] > baseline["image_auroc"] + 0.01
