import math

import pytest
import torch

from ad_models.methods import METHODS, create_method, load_method
from ad_models.methods.pefm import PEFMConfig
from ad_models.methods.pfm import DualProjector, PFMConfig, latent_widths, position_encoding_2d


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, seed: int = 0):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        size = self.images.shape[-1]
        return {"image": self.images[i], "mask": torch.zeros(1, size, size), "label": 0, "path": f"{i}.png",
                "defect_type": "good"}


def test_latent_rule_reproduces_the_papers_widths():
    resnet34, resnet50 = [64, 128, 256], [256, 512, 1024]
    assert latent_widths(PFMConfig().latent_ratios, resnet34, resnet50) == [200, 400, 900]
    assert latent_widths(PEFMConfig().latent_ratios, resnet34, resnet50) == [200, 400, 800]


def test_projector_parameter_count_matches_the_spec():
    """Spec: level 1 of MB-PFM (64 -> 256, L=200) has 0.89 M parameters, level 3 (L=900) 17.10 M."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(DualProjector(64, 256, 200)) / 1e6 - 0.89) < 0.01
    assert abs(count(DualProjector(256, 1024, 900)) / 1e6 - 17.10) < 0.01


def test_position_encoding_layout():
    pe = position_encoding_2d(8, 3, 5)  # D = 4: x in channels 0-3, y in 4-7
    assert pe.shape == (8, 3, 5)
    x = torch.arange(5.0)
    assert torch.allclose(pe[0, 0], torch.sin(x)) and torch.allclose(pe[1, 2], torch.cos(x))
    w1 = math.exp(-2 * math.log(10000.0) / 4)
    assert torch.allclose(pe[2, 1], torch.sin(x * w1))
    y = torch.arange(3.0)
    assert torch.allclose(pe[4, :, 0], torch.sin(y)) and torch.allclose(pe[5, :, 4], torch.cos(y))
    with pytest.raises(ValueError, match="divisible by 4"):
        position_encoding_2d(6, 2, 2)


@pytest.mark.parametrize("name", ["pfm", "pefm"])
def test_fit_predict_save_load(name, tmp_path):
    method = create_method(name, {"epochs": 2, "image_size": 64, "batch_size": 4})
    log = method.fit(RandomImages(6, 64), device="cpu", progress=False)
    assert len(log["loss_per_epoch"]) == 2 and log["feature_cache"]
    assert log["loss_per_epoch"][1][0] < log["loss_per_epoch"][0][0]  # level 1 learns something
    images = torch.rand(3, 3, 80, 96)  # not the training size: maps must come back at input size
    scores, maps = method.predict(images)
    assert scores.shape == (3,) and maps.shape == (3, 80, 96)
    assert torch.all(maps >= 0) and torch.allclose(scores, maps.flatten(1).amax(1))
    method.save(tmp_path / "model")
    restored = load_method(tmp_path / "model", device="cpu")
    assert type(restored) is type(method) and restored.provenance == method.provenance
    scores2, maps2 = restored.predict(images)
    assert torch.equal(scores, scores2) and torch.equal(maps, maps2)


def test_pfm_image_score_averages_the_top_k_scaled_with_the_map_area():
    method = create_method("pfm", {"epochs": 1, "image_size": 64, "batch_size": 4, "score_top_k": 256})
    method.fit(RandomImages(4, 64), device="cpu", progress=False)
    images = torch.rand(2, 3, 128, 128)  # 256 at 256 x 256 is 64 pixels of a 128 x 128 map
    scores, maps = method.predict(images)
    top = maps.flatten(1).topk(64, dim=1).values
    assert torch.allclose(scores, top.mean(1)) and torch.all(scores < top[:, 0])
    with pytest.raises(ValueError, match="score_top_k must be at least 1"):
        create_method("pfm", {"score_top_k": 0})


def test_feature_cache_off_gives_the_same_training():
    logs = []
    for cache_gb in (4.0, 0.0):
        method = create_method("pfm", {"epochs": 1, "image_size": 32, "batch_size": 2, "feature_cache_gb": cache_gb})
        logs.append(method.fit(RandomImages(4, 32), device="cpu", progress=False))
    assert logs[0]["feature_cache"] and not logs[1]["feature_cache"]
    assert logs[0]["loss_per_epoch"][0] == pytest.approx(logs[1]["loss_per_epoch"][0], rel=1e-4)


def test_pefm_uses_position_encoding_and_pfm_does_not():
    assert create_method("pefm", {"image_size": 32}).net.projectors[0].position_encoding
    assert not create_method("pfm", {"image_size": 32}).net.projectors[0].position_encoding


def test_unknown_option_and_method_are_clear_errors():
    with pytest.raises(ValueError, match="unknown option.*epochz"):
        create_method("pfm", {"epochz": 3})
    with pytest.raises(KeyError, match="known methods"):
        create_method("nope")
    assert {"pfm", "pefm", "mean_image"} <= set(METHODS)


def test_mean_image_baseline_finds_a_bright_spot():
    method = create_method("mean_image", {"image_size": 32})
    train = RandomImages(8, 32)
    train.images[:] = 0.5
    method.fit(train, device="cpu", progress=False)
    image = torch.full((1, 3, 32, 32), 0.5)
    image[..., 10:14, 20:24] = 1.0
    _, maps = method.predict(image)
    assert maps[0, 11, 21] > 0.5 and maps[0, 0, 0] < 1e-6
