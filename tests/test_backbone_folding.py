"""FeatureExtractor's forward runs a copy of its backbone with the batch norms folded into the
convolutions: the same features, the same saved weights, rebuilt whenever the weights change."""
import pytest
import torch
from torch import nn

from ad_models.backbones import BackboneConfig, FeatureExtractor, fold_batch_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def _unfolded(fe: FeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
    return fe.body((images - fe.mean) / fe.std)


def _close(got: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = 1e-4) -> bool:
    return all(float((g - e).abs().max()) <= rtol * float(e.abs().max()) for g, e in zip(got, expected))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "tf_efficientnet_lite0"])  # tf_: TF "same" padding convs
def test_folded_features_equal_unfolded_and_saved_weights_stay(name):
    fe = FeatureExtractor(BackboneConfig(name), fold=True)
    keys = list(fe.state_dict())
    n_parameters = len(list(fe.parameters()))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        folded, unfolded = fe(images), _unfolded(fe, images)
    assert _close(folded, unfolded)
    copy = fe.folded()
    assert copy is not fe.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy.modules())  # every norm follows a conv here
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fe.body.modules()) > 10  # the saved network keeps them
    assert list(fe.state_dict()) == keys and len(list(fe.parameters())) == n_parameters
    assert not any(p.requires_grad for p in copy.parameters())


def test_folded_copy_is_rebuilt_after_load_state_dict_and_to():
    fe = FeatureExtractor(BackboneConfig("efficientnet_lite0"), fold=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fe(images)
    # other weights, loaded the way methods load a checkpoint: through the owner's load_state_dict
    other = FeatureExtractor(BackboneConfig("efficientnet_lite0", pretrained=False))
    owner = nn.ModuleDict({"net": fe})
    owner.load_state_dict({f"net.{k}": v for k, v in other.state_dict().items()})
    with torch.no_grad():
        after, expected = fe(images), _unfolded(fe, images)
    assert _close(after, expected)
    assert not _close(after, before, rtol=1e-2)  # the new weights are in use, not the old folded copy
    first = fe.folded()
    fe.to(torch.float64)
    assert fe.folded() is not first and next(fe.folded().parameters()).dtype == torch.float64


def test_gradients_flow_to_the_input():
    """Methods use frozen networks as perceptual losses: the input still gets gradients."""
    fe = FeatureExtractor(BackboneConfig("efficientnet_lite0"), fold=True)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    sum(f.square().mean() for f in fe(images)).backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    assert all(p.grad is None for p in fe.parameters())


def test_a_conv_output_read_twice_is_not_folded():
    """Folding would change the residual's copy of the conv output too: the network is used as it is."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    net = Residual().eval()
    with torch.no_grad():
        net.bn.running_mean.fill_(0.5)
        net.bn.running_var.fill_(4.0)
    assert fold_batch_norms(net, torch.rand(1, 3, 8, 8)) is net


def test_a_body_being_fine_tuned_gets_its_gradients_and_in_place_updates_refold():
    """SLSG pre-trains its encoder's weights: they must receive gradients, and an optimizer's in-place
    step (no load_state_dict, no .to) must reach the frozen forward that follows."""
    fe = FeatureExtractor(BackboneConfig("efficientnet_lite0"), fold=True)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fe(images)
    fe.requires_grad_(True)
    sum(f.square().mean() for f in fe(images)).backward()
    weights = [p for p in fe.body.parameters() if p.grad is not None]
    assert weights and any(float(p.grad.abs().sum()) > 0 for p in weights)
    torch.optim.SGD(fe.parameters(), lr=10.0).step()
    fe.requires_grad_(False)
    with torch.no_grad():
        after, expected = fe(images), _unfolded(fe, images)
    assert _close(after, expected) and not _close(after, before, rtol=1e-2)


def test_without_fold_forward_is_the_body_itself():
    fe = FeatureExtractor(BackboneConfig("efficientnet_lite0"))
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(fe(images), _unfolded(fe, images)))
