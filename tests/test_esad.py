"""ESAD: its pieces against hand-made cases, a short training run, save/load, selection on a bank."""
import dataclasses
from unittest import mock

import pytest
import torch
from torch.utils.data import Dataset

from ad_models import metrics, runs
from ad_models.data.layout import read_manifest
from ad_models.data.loading import ImageDataset
from ad_models.data.sources import prepare_category
from ad_models.defects import grid_masks
from ad_models.defects.bank import build_bank, read_bank
from ad_models.methods import create_method, esad, load_method
from ad_models.methods.base import probe_checkpoints
from ad_models.methods.esad import (ESAD, ESADConfig, FeatureBlock, LightUNet, feature_distance_map, feature_loss,
                                    fill, gaussian_kernel, gaussian_smooth, inpaint_all, ssim)

TINY = {"image_size": 32, "widths": (8, 8, 16, 16, 16), "feature_network": "efficientnet_lite0",
        "epochs": 2, "batch_size": 4, "test_cell_sizes": (8, 16), "smoothing_sigma": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


class RandomImages(Dataset):
    def __init__(self, n: int, size: int):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="unknown option"):
        create_method("esad", {"epochz": 3})
    with pytest.raises(ValueError, match="five layers"):
        ESADConfig(widths=(8, 16))
    with pytest.raises(ValueError, match="multiple of groups"):
        ESADConfig(widths=(8, 8, 16, 16, 18))
    with pytest.raises(ValueError, match="multiple of 16"):
        ESADConfig(image_size=100)
    with pytest.raises(ValueError, match="test_fill"):
        ESADConfig(test_fill="zeros")
    with pytest.raises(ValueError, match="feature_network"):
        ESADConfig(feature_network="alexnet")


def test_feature_block_is_group_then_depthwise_then_standard_conv():
    block = FeatureBlock(8, 16, groups=4)
    names = [name for name, _ in block.named_children()]
    assert names == ["group", "depthwise", "standard"]
    group, depthwise, standard = block.group[0], block.depthwise[0], block.standard[0]
    assert (group.in_channels, group.out_channels, group.groups, group.kernel_size) == (8, 16, 4, (3, 3))
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (16, 16, 16)
    assert (standard.in_channels, standard.out_channels, standard.groups) == (16, 16, 1)
    for part in (block.group, block.depthwise, block.standard):
        assert [type(m) for m in part] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    x = torch.rand(2, 8, 6, 6)
    block.eval()
    assert torch.equal(block(x), block.standard(block.depthwise(block.group(x))))

    # five layers each side: conv-BN-ReLU first, feature blocks after; output in [0, 1]
    net = LightUNet(4, (8, 8, 16, 16, 16), groups=4)
    assert len(net.down) == 5 and len(net.up) + 1 == 5
    assert [type(m) for m in net.down[0]] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert all(isinstance(m, FeatureBlock) for m in list(net.down[1:]) + list(net.up))
    out = net.eval()(torch.rand(1, 4, 32, 32))
    assert out.shape == (1, 3, 32, 32) and 0 <= out.min() and out.max() <= 1


def test_fill_rules_training_and_testing():
    g = torch.Generator().manual_seed(0)
    img, pre = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    keep = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    train, test = fill(img, pre, keep, test=False), fill(img, pre, keep, test=True)
    assert torch.equal(train, img * keep + pre * (1 - keep))
    assert torch.equal(test, img * keep + 0.5 * pre * (1 - keep) + 0.5 * img * (1 - keep))
    visible, hidden = keep.expand_as(img).bool(), ~keep.expand_as(img).bool()
    assert torch.equal(train[visible], img[visible]) and torch.equal(test[visible], img[visible])
    assert torch.equal(train[hidden], pre[hidden])
    assert torch.allclose(test[hidden], (pre[hidden] + img[hidden]) / 2)
    assert not torch.allclose(train[hidden], test[hidden])


def test_test_assembly_takes_every_pixel_once_from_the_pass_that_hid_it():
    hidden = grid_masks(16, 16, 2, 3, torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 16, 16) + 1  # never 0, so hidden pixels are recognisable
    seen = []

    def fake_inpaint(x):  # pass i (batch chunk i) answers i + 1 everywhere
        seen.append(x)
        return torch.arange(1.0, 4.0).repeat_interleave(2).view(6, 1, 1, 1).expand(6, 3, 16, 16)

    out = inpaint_all(fake_inpaint, images, hidden)
    expected = sum((i + 1) * hidden[i] for i in range(3))
    assert torch.equal(out, expected.expand(2, 3, 16, 16))
    ones = inpaint_all(lambda x: torch.ones(x.shape[0], 3, 16, 16), images, hidden)
    assert torch.equal(ones, torch.ones(2, 3, 16, 16))  # 0 = a pixel never taken, 2 = taken twice
    x = seen[0]  # each pass saw its pixels hidden (zeros) and its mask as the 4th channel
    for i in range(3):
        passed = x[2 * i:2 * i + 2]
        assert torch.equal(passed[:, 3], hidden[i].expand(2, 16, 16))
        assert torch.equal(passed[:, :3] == 0, hidden[i].bool().expand(2, 3, 16, 16))


def test_training_masks_hide_one_of_n_grid_masks_per_sample():
    method = ESAD({**TINY, "cell_sizes": (64, 128)})  # 8 and 16 px cells at 32 px
    hidden = method._train_masks(6, torch.Generator().manual_seed(0))
    assert hidden.shape == (6, 1, 32, 32) and set(hidden.unique().tolist()) == {0.0, 1.0}
    share = hidden.mean((1, 2, 3))
    assert torch.all((share > 0.1) & (share < 0.6))  # one of 3 masks: about a third hidden


def test_feature_map_and_smoothing():
    f = [torch.rand(2, 5, 4, 4), torch.rand(2, 7, 2, 2)]
    assert torch.allclose(feature_distance_map(f, f, (8, 8)), torch.zeros(2, 8, 8), atol=1e-6)
    opposite = feature_distance_map(f, [-a for a in f], (8, 8))
    assert torch.allclose(opposite, torch.full((2, 8, 8), 4.0), atol=1e-5)  # 2 per level, 2 levels
    delta = torch.zeros(1, 41, 41)
    delta[0, 20, 20] = 1.0
    blurred = gaussian_smooth(delta, 4.0)
    assert torch.isclose(blurred.sum(), torch.tensor(1.0), atol=1e-5)
    rows = torch.arange(41.0) - 20
    assert torch.isclose((blurred[0].sum(1) * rows ** 2).sum().sqrt(), torch.tensor(4.0), atol=0.05)
    assert torch.allclose(gaussian_smooth(torch.full((1, 9, 9), 0.7), 4.0), torch.full((1, 9, 9), 0.7))


def test_feature_loss_is_scale_free():
    g = torch.Generator().manual_seed(0)
    fx = [torch.randn(2, 5, 8, 8, generator=g) * 30, torch.randn(2, 7, 4, 4, generator=g) + 2]
    fr = [a + torch.randn(a.shape, generator=g) * 5 for a in fx]
    assert feature_loss(fx, fx) == 0
    # a reconstruction that knows nothing (zero features) costs exactly 1 per level, whatever the scale
    assert torch.isclose(feature_loss(fx, [torch.zeros_like(a) for a in fx]), torch.tensor(2.0))
    scaled = feature_loss([a * 100 for a in fx], [b * 100 for b in fr])
    assert torch.isclose(scaled, feature_loss(fx, fr), rtol=1e-5)
    # per image and level: the MSE over the image's own mean squared feature
    expected = sum(((b - a).pow(2).mean((1, 2, 3)) / a.pow(2).mean((1, 2, 3))).mean() for a, b in zip(fx, fr))
    assert torch.isclose(feature_loss(fx, fr), expected, rtol=1e-5)
    # the denominator is a constant: gradients reach the reconstruction only, along the raw MSE's
    a, b = fx[0].clone().requires_grad_(), fr[0].clone().requires_grad_()
    feature_loss([a], [b]).backward()
    raw = 2 * (b - a).detach() / a[0].numel() / 2  # d/db of the batch mean of per-image MSEs
    assert torch.allclose(b.grad, raw / a.detach().pow(2).mean((1, 2, 3), keepdim=True), rtol=1e-4)
    assert torch.allclose(a.grad, -b.grad)  # no term from the detached scale


def test_separable_ssim_equals_the_full_window():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 24, 20, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    k = gaussian_kernel(1.5, 5)
    w = (k[:, None] * k[None, :]).expand(3, 1, 11, 11)

    def blur(x):
        return torch.nn.functional.conv2d(x, w, padding=5, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    full = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))).mean()
    assert torch.isclose(ssim(a, b), full, atol=1e-6) and 0.3 < full < 0.99
    assert torch.isclose(ssim(a, a), torch.tensor(1.0), atol=1e-6)


@pytest.fixture(scope="module")
def trained():
    method = ESAD(TINY)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    log = method.fit(RandomImages(6, 32), device="cpu", progress=False)
    return method, before, log


def test_training_runs_and_maps_come_back_at_input_size(trained):
    method, before, log = trained
    assert log["device"] == "cpu" and log["train_seconds"] > 0 and log["checkpoint_selection"] == []
    assert len(log["loss_per_epoch"]) == 2 and all(len(r) == len(log["loss_columns"]) for r in log["loss_per_epoch"])
    assert torch.isfinite(torch.tensor(log["loss_per_epoch"])).all()
    assert log["final_loss"] == pytest.approx(sum(log["loss_per_epoch"][-1]))
    after = method.net.state_dict()
    # the frozen feature network is untouched, BN running statistics included; both U-Nets learned
    frozen = [k for k in before if k.startswith("features.")]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["inpaint.out.weight"], after["inpaint.out.weight"])
    assert not torch.equal(before["reconstruct.out.weight"], after["reconstruct.out.weight"])
    method.net.train()
    assert method.net.inpaint.training and not method.net.features.training
    assert not any(m.training for m in method.net.features.modules())
    method.net.eval()

    for shape in ((32, 32), (40, 48)):
        images = torch.rand(2, 3, *shape)
        scores, maps = method.predict(images)
        assert scores.shape == (2,) and maps.shape == (2, *shape)
        assert torch.all(maps >= 0) and torch.allclose(scores, maps.flatten(1).amax(1))
        again = method.predict(images)  # fixed test masks: deterministic
        assert torch.equal(again[0], scores) and torch.equal(again[1], maps)


def test_score_top_k_is_given_at_256_px_and_scaled_with_the_map_area(trained):
    method = trained[0]
    top_k = dataclasses.replace(method.config, score_top_k=1024)  # 16 pixels of a 32 x 32 map
    images = torch.rand(2, 3, 32, 32)
    with mock.patch.object(method, "config", top_k):
        scores, maps = method.predict(images)
    assert torch.allclose(scores, maps.flatten(1).topk(16, dim=1).values.mean(1))


@pytest.mark.parametrize("joint", [False, True])
def test_the_reconstruction_losses_train_g1_only_when_asked(joint):
    # only the feature loss on G2's output: by default it must not reach G1, whose inpainting it
    # kept from learning (pixel MSE 0.088 after 8 epochs against 0.001 without it, docstring)
    method = ESAD({**TINY, "epochs": 1, "w_px": 0.0, "w_ssim": 0.0, "w_feat": 1.0, "joint_gradients": joint})
    g1 = {k: v.clone() for k, v in method.net.inpaint.named_parameters()}
    g2 = {k: v.clone() for k, v in method.net.reconstruct.named_parameters()}
    method.fit(RandomImages(4, 32), device="cpu", progress=False)
    assert not all(torch.equal(g2[k], v) for k, v in method.net.reconstruct.named_parameters())
    assert all(torch.equal(g1[k], v) for k, v in method.net.inpaint.named_parameters()) != joint


def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    method, _, _ = trained
    method.save(tmp_path / "model")
    restored = load_method(tmp_path / "model", device="cpu")
    assert type(restored) is ESAD and restored.config == method.config
    assert restored.config.feature_network == "efficientnet_lite0"
    assert restored.provenance == method.provenance and "feature_network" in restored.provenance
    images = torch.rand(3, 3, 36, 32)
    scores, maps = method.predict(images)
    scores2, maps2 = restored.predict(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)


def test_auto_feature_network_falls_back_and_records_the_choice(monkeypatch):
    # a first choice whose weights cannot load here (no file, no wheel, no hub), then the offline one
    monkeypatch.setattr(esad, "FEATURE_NETWORKS", {"unavailable": {"name": "resnet18", "out_indices": (1, 2, 3)},
                                                   "efficientnet_lite0": esad.FEATURE_NETWORKS["efficientnet_lite0"]})
    method = ESAD({**TINY, "feature_network": "auto"})
    assert method.config.feature_network == "efficientnet_lite0"  # what `save` writes for `load`
    assert method.provenance["feature_network"].startswith("tf_efficientnet_lite0 (wheel:")
    assert "resnet18" in method.provenance["feature_network_not_used"][0]


def test_checkpoint_selection_on_a_defect_bank(tmp_path, monkeypatch):
    dataset = tmp_path / "fabric"
    prepare_category("synthetic", "fabric", dataset, n_train=10, n_test_good=4, n_test_defect=6, size=64, seed=0)
    bank = tmp_path / "bank"
    build_bank(dataset, bank, {"image_size": 64, "min_holdout": 3, "defects_per_image": 2}, progress=False)

    # score on the bank for real, but make epoch 1 the best, so keeping the last state would show
    real_score, calls = ESAD.validation_score, []

    def scripted(self, valid, batch_size=8):
        score = real_score(self, valid, batch_size)
        calls.append((score, {k: v.clone() for k, v in self.net.state_dict().items()}))
        return {**score, "selection_score": 1.0 / len(calls)}

    monkeypatch.setattr(ESAD, "validation_score", scripted)
    config = {**TINY, "image_size": 64, "select_every": 1, "test_cell_sizes": (16, 32), "test_fill": "average"}
    log = runs.train("esad", config, dataset, tmp_path / "model", bank_dir=bank, device="cpu", progress=False)
    assert log["counts"]["train"] == 7 and log["train_images"] == 7
    assert [s["epoch"] for s in log["checkpoint_selection"]] == [1, 2] and log["selected_epoch"] == 1
    for s in log["checkpoint_selection"]:
        assert 0 <= s["image_auroc"] <= 1 and 0 <= s["pixel_auroc"] <= 1

    model = load_method(tmp_path / "model", device="cpu")
    saved, (first, second) = model.net.state_dict(), [state for _, state in calls]
    assert all(torch.equal(saved[k], first[k]) for k in saved)
    assert not all(torch.equal(saved[k], second[k]) for k in saved)
    monkeypatch.setattr(ESAD, "validation_score", real_score)
    again = model.validation_score(ImageDataset(read_bank(bank)[0], 64))
    assert again["image_auroc"] == pytest.approx(calls[0][0]["image_auroc"])
    assert again["pixel_auroc"] == pytest.approx(calls[0][0]["pixel_auroc"])


@pytest.mark.slow
def test_esad_beats_the_mean_image_baseline_on_magnetic_tile(shared_data, tmp_path):
    dataset = tmp_path / "tile"
    prepare_category("magnetic_tile", "tile", dataset, source_dir=shared_data / "magnetic_tile", limit_per_kind=60)
    bank = tmp_path / "bank"
    # 10 good + 30 defective bank images: with the default 5 + 10, checkpoint selection was noise
    # (it picked epoch 5 of 30 on one run)
    build_bank(dataset, bank, {"image_size": 64, "min_holdout": 10, "defects_per_image": 3}, progress=False)
    results, seconds = {}, {}
    # a CPU budget: 64 px, narrow U-Nets, 20 epochs at lr 1e-3 (spec: 256 px, widths 32-512, 300+ epochs at
    # 1e-4). Chosen on this bank, not on the test set: w_feat 1 (bank 0.881 vs 0.873 at the default 0.3); 20
    # epochs as a 30-epoch run's bank score was flat after epoch 10 (0.87 at 10 and at 30; it kept 10);
    # test masks of 2 and 4 px cells and smoothing sigma 2 px (4 px at 64 px is 16 px at 256; the bank scored
    # sigma 4 lowest), which also save a third of the inference time
    configs = {"esad": {"image_size": 64, "widths": (16, 16, 32, 32, 64), "feature_network": "efficientnet_lite0",
                        "w_feat": 1.0, "epochs": 20, "lr": 1e-3, "select_every": 5, "test_cell_sizes": (8, 16),
                        "smoothing_sigma": 2.0},
               "mean_image": {"image_size": 64}}
    for method, config in configs.items():
        log = runs.train(method, config, dataset, tmp_path / "models" / method, bank_dir=bank, device="cpu",
                         progress=False)
        seconds[method] = round(log["train_seconds"], 1)
        results[method] = runs.evaluate(tmp_path / "models" / method, dataset, tmp_path / "eval" / method,
                                        device="cpu", progress=False)
    print({m: {k: round(r[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")} for m, r in results.items()},
          "train seconds", seconds)
    ours, baseline = results["esad"], results["mean_image"]
    # measured (one thread): image 0.827 / pixel 0.646 / AUPRO 0.399 against 0.726 / 0.551 / 0.155; 149 s
    # of training, 220 s for the test with other jobs competing for the two cores (150 s of CPU time); seed 1
    # (30 epochs, kept 25): 0.828 / 0.626 / 0.388. The frozen features localise by themselves: after 1 epoch
    # ESAD already scored 0.763 / 0.650 / 0.542, so the image margin is the one that shows the U-Nets learned
    # something, and it must stay above what 1 epoch reaches
    assert ours["image_auroc"] > baseline["image_auroc"] + 0.07
    assert ours["pixel_auroc"] > baseline["pixel_auroc"] + 0.04
    assert ours["aupro"] > baseline["aupro"] + 0.15


def test_auto_test_fill_is_the_rule_that_ranks_the_bank_better(tiny_category, tmp_path, monkeypatch):
    dataset, bank = tiny_category
    real_score = ESAD.validation_score

    def favour_inpainted(self, valid, batch_size=8):  # the real score, plus a margin for one rule
        score = real_score(self, valid, batch_size)
        return {**score, "selection_score": score["selection_score"] + (self.config.test_fill == "inpainted")}

    monkeypatch.setattr(ESAD, "validation_score", favour_inpainted)
    config = {**TINY, "image_size": 64, "select_every": 1}
    log = runs.train("esad", config, dataset, tmp_path / "model", bank_dir=bank, device="cpu", progress=False)
    assert log["test_fill"] == "inpainted" and set(log["test_fill_bank_scores"]) == {"average", "inpainted"}
    assert load_method(tmp_path / "model", device="cpu").config.test_fill == "inpainted"  # saved resolved
    # without a bank nothing can rank the rules: the README's
    method = ESAD(TINY)
    assert method.config.test_fill == "auto"
    log = method.fit(RandomImages(4, 32), device="cpu", progress=False)
    assert method.config.test_fill == "average" and log["test_fill"] == "average"


@pytest.mark.slow
def test_training_on_magnetic_tile_does_not_end_below_its_first_epoch(shared_data, tmp_path):
    """What a user gets after training (the bank-selected checkpoint and test rule) must not score
    below the model after one epoch: the GPU run that found ESAD getting worse as it trained."""
    dataset = tmp_path / "tile"
    prepare_category("magnetic_tile", "tile", dataset, source_dir=shared_data / "magnetic_tile", limit_per_kind=60)
    bank = tmp_path / "bank"
    build_bank(dataset, bank, {"image_size": 64, "min_holdout": 10, "defects_per_image": 2}, progress=False)
    test = read_manifest(dataset).query("split == 'test'")
    first = {}

    def after_first_epoch(model):  # the test set only judges the training here, it selects nothing
        if not first:
            pred = model.predict_dataset(ImageDataset(test, 64), progress=False)
            first.update(image=metrics.image_auroc(pred["labels"], pred["scores"]),
                         pixel=metrics.pixel_auroc(pred["masks"], pred["maps"]))
        return {}

    config = {"image_size": 64, "widths": (16, 16, 32, 32, 64), "feature_network": "efficientnet_lite0",
              "epochs": 8, "lr": 1e-3, "select_every": 1}
    with probe_checkpoints(after_first_epoch):
        log = runs.train("esad", config, dataset, tmp_path / "model", bank_dir=bank, device="cpu", progress=False)
    final = runs.evaluate(tmp_path / "model", dataset, tmp_path / "eval", device="cpu", progress=False)
    print("after epoch 1", first, "final", {k: round(final[k], 4) for k in ("image_auroc", "pixel_auroc")},
          "selected epoch", log["selected_epoch"], "test fill", log["test_fill"], log["test_fill_bank_scores"])
    # measured: image AUROC 0.722 after epoch 1, 0.724 kept (epoch 2, README rule; the bank's two rules
    # within 0.003). Pixel AUROC still falls, 0.658 -> 0.631: not asserted, issue 14 stays open for it
    assert final["image_auroc"] >= first["image"] - 0.02
