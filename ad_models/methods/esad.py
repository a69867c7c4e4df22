"""ESAD: Enhanced Structural Anomaly Detection through Improved Image Inpainting and Feature-Level
Discrimination (Fei Dongce, Wu Qiling, The Visual Computer).

Two lightweight U-Nets in series turn reconstruction into inpainting -> filling -> reconstruction:

    image, random mask  ->  G1 inpaints the hidden pixels  ->  fill the hidden pixels  ->  G2 rebuilds
    anomaly map = sum over levels of 1 - cos(phi_l(image), phi_l(rebuilt)), phi a frozen ImageNet CNN

The filling differs between training and testing (the authors' README, its only code):

    training:  filled = img * keep + pre * (1 - keep)
    testing:   filled = img * keep + 0.5 * pre * (1 - keep) + 0.5 * img * (1 - keep)

so at test time G2 sees real and generated content mixed, which it rebuilds easily where the image
is normal. Each U-Net has five encoder and five decoder layers; the first encoder layer is
conv-BN-ReLU, the others are feature-extraction blocks: group conv -> depthwise conv -> standard
conv (README). Losses: MSE and 1 - SSIM on both outputs, plus a feature loss in the frozen
network's space (spec: weight 0.1 on raw features; here scale-free, see the loss weights). Adam
1e-4, batch 8, 256 x 256.

No official code or paper text was found (`docs/methods/esad.md` Sec. 1); the README gives the
facts above. Everything else follows the spec's reference design (Sec. 3, a proposal) and is
*inferred*; each choice is a config option:

- Masks: RIAD's grid masks, cell sizes (2, 4, 8, 16) px at 256 scaled to `image_size`, n = 3
  complementary masks (`cell_sizes`, `n_masks`). Training: one random cell size and one of the n
  masks per sample (`train_masks="stroke"`: DeepFill v2 free-form strokes instead). Testing: all n
  masks; each pixel is taken from the pass where it was hidden, so the assembled inpainting covers
  the whole image and the README's test rule becomes 0.5 * (pre + img) everywhere. The map is the
  mean over the cell sizes `test_cell_sizes` (RIAD's multi-scale averaging); the masks come from a
  generator seeded with `seed`, so predictions are deterministic.
- G1 input: masked image + hidden-mask channel (`mask_channel`); G2 input: the filled image only
  (`g2_sees_input` adds the image itself). Both end in a sigmoid, images stay in [0, 1].
- Layers: 2 x 2 max-pool before encoder layers 2-5 (1/1 ... 1/16), bilinear x2 up and a skip
  concat before decoder layers 1-4, decoder layer 5 = 1 x 1 conv + sigmoid. Widths
  (32, 64, 128, 256, 512) (the spec's base width 32, doubled per level). Feature block: 3 x 3 group
  conv (`groups` = 4, changes the width) -> 3 x 3 depthwise conv -> 1 x 1 standard conv that mixes
  the groups, each with BN + ReLU.
- Feature network (`feature_network`): "auto" tries VGG-16 (relu1_2, relu2_2, relu3_3; file or hub)
  then the offline `tf_efficientnet_lite0` (strides 4, 8, 16); the choice is written into the config
  and the provenance, and the frozen network is part of the saved weights, so `load` rebuilds the
  same one without any download. Feature loss: see the loss weights.
- Loss weights: pixel MSE 1, SSIM 1 (11 x 11 Gaussian window, sigma 1.5), feature `w_feat` 0.3;
  RIAD's MSGMS term is available (`w_msgms`) but off, as the spec's loss has none.
  Feature loss (*inferred*, `feature_loss`): sum over levels of the feature MSE divided by the mean
  squared magnitude of the input image's own features at that level (per image, detached). The
  spec's sum of raw feature MSEs has the network's scale: with EfficientNet-Lite0 on our synthetic
  fabric it starts near 350 (35 at weight 0.1) against about 2 for the pixel terms, so the weight
  meant nothing and the feature term dominated training. Normalised, a level costs about 1 for a
  reconstruction that knows nothing of the image and 0 for a perfect one, for any network, and the
  levels count equally (raw, the stride-4 level weighed about 3x the stride-16 one). Chosen over
  1 - cosine per position (what the map measures) because it keeps the spec's MSE: within a level
  the gradient is the raw MSE's up to a constant, magnitude errors still cost (cosine ignores
  them), and weak feature vectors do not get cosine's 1/|phi| gradients. `w_feat` = 0.3 from a
  comparison on synthetic validation banks (64 px, widths (16, 16, 32, 32, 64), 30 epochs at lr
  1e-3, best checkpoint's mean of image and pixel AUROC, 2 seeds each; no test set): synthetic
  fabric 0.883 / 0.872 / 0.869 / 0.860 for w_feat 0 / 0.1 / 0.3 / 1 (3: 0.857, one seed), the
  magnetic-tile bank 0.818 / 0.846 / 0.873 / 0.881 (0 and 0.1 one seed; without the feature
  loss the tile model got worse as it trained). 0.3 has the best mean over both banks (0.871, 1:
  0.870); the spec's 0.1 on raw features scored 0.871 on fabric, 1 - cosine at weight 1 0.863
  (one seed each). Small banks: differences below about 0.01 are noise.
- Map: per level 1 - cosine similarity over channels, bilinear to `image_size`, summed; Gaussian
  smoothing sigma 4 px at `image_size` (`smoothing_sigma`); image score = max of the map
  (`score_top_k` > 1: mean of the top k, k given at 256 x 256 and scaled with the map's area, as
  PFM's). Maps are resized to the input resolution.
- Budget: 300 epochs (the paper's is unknown; spec: RIAD-like 300-800). No augmentation.
- Checkpoint selection: every `select_every` epochs (and after the last) the model is scored on the
  validation data when it holds defective images (our synthetic validation bank: mean of image and
  pixel AUROC) and the best G1/G2 state is kept. Never on the test set.
- Test fill (`test_fill`, *deviation*): the README's rule puts half of the test image itself into
  G2's input, so the better G2 reconstructs, the more of a defect it passes through; the training
  rule ("inpainted") gives G2 only G1's inpainting. Neither wins everywhere (64 px, CPU widths, 10
  epochs, test AUROC image / pixel, measured with bench/bench_selection.py's probe): magnetic tile
  0.664 / 0.650 average vs 0.664 / 0.723 inpainted, synthetic fabric 0.797 / 0.857 vs 0.461 / 0.710.
  "auto" (default) scores both on the bank after training and keeps the better; the bank agreed
  with the test set on 3 of 4 models (fabric by 0.19, the miss a tie within 0.002). Without a bank:
  the README's rule.

Why ESAD seemed to get worse as it trained (paper widths, lr 1e-4, short GPU budgets): at that lr
the U-Nets barely move in a few hundred steps. On magnetic tile at 128 px, 8 epochs (136 steps):
G1's pixel MSE went 0.0886 -> 0.0849 (its weights are nearly those at initialisation) and both
U-Nets output coloured noise, so the map's 1 - cos is about 0.7 per level on every good image. The
map then measures how unlike noise the image's frozen features are, a saliency that happens to
rank some categories well after one epoch and drifts as the nets start to learn. A second brake:
the feature loss reaches G1 through G2's input and dominates its update (Adam scales gradients, the
direction is the feature loss's): at lr 1e-3, 12 epochs, G1's pixel MSE 0.022 with it against
0.0008 when G1 gets no gradient from G2's losses (`joint_gradients: False`; G2 alone without the
feature loss reaches 0.0005). Kept joint (the spec trains the pair end to end): the better
inpainter also copies defects, and test AUROC did not improve (tile 64 px: 0.625 joint vs 0.614
alone at epoch 12). On our data no fall remained: tile, 128 px, paper widths, lr 1e-4: test image
AUROC 0.62 after epoch 1 -> 0.73 after 8 (README rule) and 0.60 -> 0.75 (inpainted); fabric, CPU
widths, 64 px: 0.59 -> 0.79. The mean-image baseline scores 0.56 on the same tile subset. The
paper-size budget (300 epochs at 1e-4) needs a GPU.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ad_models.backbones import FeatureExtractor, first_available_network
from ad_models.defects import grid_cell_sizes, grid_masks, stroke_masks
from ad_models.data.loading import image_shape
from ad_models.methods.base import (AnomalyMethod, CheckpointSelection, TrainingImages, autocast,
                                    check_input_geometry, images_in_memory, model_input, optimizer_step,
                                    resolve_device, seed_everything, step_phase, top_k_at, top_k_mean)
from ad_models.methods.losses import ssim

FEATURE_NETWORKS = {  # name -> backbone; "auto" tries VGG-16 first, then the offline network
    "vgg16": {"name": "vgg16.tv_in1k", "out_indices": (0, 1, 2)},  # relu1_2, relu2_2, relu3_3
    "efficientnet_lite0": {"name": "tf_efficientnet_lite0", "out_indices": (1, 2, 3)},  # strides 4, 8, 16
}
TEST_FILLS = ("average", "inpainted")  # "auto" tries both on the bank after training
LOSS_COLUMNS = ["px_inpaint", "px_rec", "ssim_inpaint", "ssim_rec", "msgms", "feature"]  # weighted terms


@dataclass
class ESADConfig:
    image_size: int | tuple[int, int] = 256  # spec: 256 x 256; or [height, width]
    resize: str = "stretch"  # or "keep_aspect", "tiles" (loading.RESIZE_POLICIES)
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)  # inferred: base 32, doubled per level
    groups: int = 4  # inferred: groups of the feature block's group conv
    mask_channel: bool = True  # G1 sees the hidden mask as a 4th channel (spec proposal)
    g2_sees_input: bool = False  # G2 sees filled image + image (spec's "optionally")
    train_masks: str = "grid"  # "grid" (RIAD) or "stroke" (free-form, the spec's alternative)
    cell_sizes: tuple[int, ...] = (2, 4, 8, 16)  # RIAD, px at 256; scaled to image_size
    n_masks: int = 3  # complementary masks per cell size
    test_cell_sizes: tuple[int, ...] = (2, 4, 8, 16)  # maps averaged over these (px at 256)
    test_fill: str = "auto"  # "average" (README's test rule), "inpainted" (the training rule), "auto": the bank's pick
    feature_network: str | dict = "auto"  # "auto", a FEATURE_NETWORKS key, or a backbone dict
    w_px: float = 1.0
    w_ssim: float = 1.0
    w_msgms: float = 0.0  # RIAD's extra term; off in the spec's loss
    w_feat: float = 0.3  # on the scale-free feature loss; chosen on synthetic banks (docstring)
    ssim_window: int = 11
    smoothing_sigma: float = 4.0  # px at image_size; 0 = no smoothing
    score_top_k: int = 1  # image score = mean of the k largest map values (1 = max); at 256 x 256, scaled
    epochs: int = 300  # inferred: the paper's budget is unknown
    batch_size: int = 8
    lr: float = 1e-4
    select_every: int = 10  # epochs between checkpoint scorings on the validation bank
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    joint_gradients: bool = True  # G2's losses (the feature loss too) also train G1; False: G1 learns alone

    def __post_init__(self):
        self.widths, self.cell_sizes = tuple(self.widths), tuple(self.cell_sizes)
        self.test_cell_sizes = tuple(self.test_cell_sizes)
        if len(self.widths) != 5:
            raise ValueError(f"widths: the encoder has five layers, got {list(self.widths)}")
        if self.groups < 1 or any(w % self.groups for w in self.widths):
            raise ValueError(f"every width must be a multiple of groups={self.groups}, got {list(self.widths)}")
        check_input_geometry(self, "esad", 16, "four 2x2 poolings")
        if self.train_masks not in ("grid", "stroke"):
            raise ValueError(f"train_masks must be 'grid' or 'stroke', not {self.train_masks!r}")
        if self.test_fill not in TEST_FILLS + ("auto",):
            raise ValueError(f"test_fill must be 'average' (README), 'inpainted' or 'auto', not {self.test_fill!r}")
        if self.n_masks < 2:
            raise ValueError(f"n_masks must be at least 2 (one mask would hide the whole image), got {self.n_masks}")
        if not self.cell_sizes or not self.test_cell_sizes or min(self.cell_sizes + self.test_cell_sizes) < 1:
            raise ValueError("cell_sizes and test_cell_sizes need at least one positive size each")
        if min(self.epochs, self.batch_size, self.select_every, self.score_top_k) < 1:
            raise ValueError("epochs, batch_size, select_every and score_top_k must be at least 1")
        if not (isinstance(self.feature_network, dict) or self.feature_network == "auto"
                or self.feature_network in FEATURE_NETWORKS):
            raise ValueError(f"feature_network must be 'auto', one of {sorted(FEATURE_NETWORKS)} or a backbone "
                             f"dict, not {self.feature_network!r}")


# ----------------------------------------------------------------------------------- networks

def conv_bn_relu(cin: int, cout: int, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FeatureBlock(nn.Module):
    """The README's feature-extraction block: group conv -> depthwise conv -> standard conv.

    The group conv changes the width at 1/groups of a full conv's cost, the depthwise conv widens
    the receptive field per channel, and the 1 x 1 standard conv mixes what the groups kept apart."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.group = conv_bn_relu(cin, cout, 3, groups)
        self.depthwise = conv_bn_relu(cout, cout, 3, cout)
        self.standard = conv_bn_relu(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standard(self.depthwise(self.group(x)))


class LightUNet(nn.Module):
    """Five encoder layers (conv-BN-ReLU, then 4 feature blocks after 2x2 max-pools) and five
    decoder layers (4 feature blocks after bilinear x2 + skip concat, then 1 x 1 conv + sigmoid)."""

    def __init__(self, cin: int, widths: tuple[int, ...], groups: int):
        super().__init__()
        self.down = nn.ModuleList([conv_bn_relu(cin, widths[0])] +
                                  [FeatureBlock(a, b, groups) for a, b in zip(widths[:-1], widths[1:])])
        self.up = nn.ModuleList(FeatureBlock(deep + skip, skip, groups)
                                for deep, skip in zip(widths[:0:-1], widths[-2::-1]))
        self.out = nn.Conv2d(widths[0], 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, layer in enumerate(self.down):
            x = layer(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for layer, skip in zip(self.up, skips[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = layer(torch.cat([x, skip], 1))
        return torch.sigmoid(self.out(x))


class ESADNetwork(nn.Module):
    """G1 (inpainting), G2 (reconstruction) and the frozen feature network phi."""

    def __init__(self, cfg: ESADConfig, features: FeatureExtractor):
        super().__init__()
        self.inpaint = LightUNet(4 if cfg.mask_channel else 3, cfg.widths, cfg.groups)
        self.reconstruct = LightUNet(6 if cfg.g2_sees_input else 3, cfg.widths, cfg.groups)
        self.features = features

    def train(self, mode: bool = True) -> "ESADNetwork":
        super().train(mode)
        self.features.eval()  # frozen: its BN statistics must never drift
        return self


# ------------------------------------------------------------------------ the README's filling

def fill(images: torch.Tensor, inpainted: torch.Tensor, keep: torch.Tensor, test: bool) -> torch.Tensor:
    """Fill the hidden pixels (keep = 0) of `images`; the README's `selecttest` 0 / 1 rules.

    Training puts G1's output there; testing puts the mean of G1's output and the image itself."""
    if not test:
        return images * keep + inpainted * (1 - keep)
    return images * keep + 0.5 * inpainted * (1 - keep) + 0.5 * images * (1 - keep)


def inpaint_all(inpaint, images: torch.Tensor, hidden: torch.Tensor, mask_channel: bool = True) -> torch.Tensor:
    """Spec Sec. 3.3's test-time inpainting: sum_i M_i * G1(I * (1 - M_i), M_i).

    images [B, 3, H, W]; hidden [n, H, W], the n complementary masks (1 = hidden). All n passes run
    as one batch; each pixel is taken from the pass where it was hidden."""
    n, b = hidden.shape[0], images.shape[0]
    masks = hidden[:, None, None].expand(n, b, 1, *hidden.shape[-2:]).reshape(n * b, 1, *hidden.shape[-2:])
    masks = masks.to(images.dtype)
    masked = images.repeat(n, 1, 1, 1) * (1 - masks)
    out = inpaint(torch.cat([masked, masks], 1) if mask_channel else masked)
    return (out.float() * masks).reshape(n, b, *out.shape[1:]).sum(0)


# ------------------------------------------------------------------------------------- losses

def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def msgms_loss(a: torch.Tensor, b: torch.Tensor, scales: int = 4, c: float = 0.0026) -> torch.Tensor:
    """RIAD's multi-scale gradient magnitude similarity loss: mean of 1 - GMS over 4 scales."""
    prewitt = torch.tensor([[1.0, 0, -1], [1, 0, -1], [1, 0, -1]], device=a.device) / 3
    kernels = torch.stack([prewitt, prewitt.T])[:, None]
    a, b = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
    losses = []
    for s in range(scales):
        if s:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        ga = F.conv2d(a, kernels, padding=1).pow(2).sum(1).add(1e-12).sqrt()
        gb = F.conv2d(b, kernels, padding=1).pow(2).sum(1).add(1e-12).sqrt()
        losses.append((1 - (2 * ga * gb + c) / (ga ** 2 + gb ** 2 + c)).mean())
    return torch.stack(losses).mean()


def feature_loss(fx: list[torch.Tensor], fr: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Scale-free feature loss: sum over levels of ||phi_l(rec) - phi_l(img)||^2 / ||phi_l(img)||^2.

    Per image and level, the feature MSE divided by the mean squared magnitude of the input
    image's own features at that level (detached: a per-level constant, not a target the U-Nets
    could push up), then averaged over the batch. Each level costs about 1 for a reconstruction
    that knows nothing of the image (a grey one, an untrained G2) and 0 for a perfect one,
    whatever the network's feature scale; within a level the gradient points where the raw MSE's
    does. fx: features of the image, fr: of the reconstruction, lists of [B, C_l, h_l, w_l]."""
    terms = []
    for a, b in zip(fx, fr):
        a, b = a.float(), b.float()
        err = (b - a).pow(2).flatten(1).mean(1)
        scale = a.detach().pow(2).flatten(1).mean(1).clamp_min(eps)
        terms.append((err / scale).mean())
    return torch.stack(terms).sum()


def feature_distance_map(fa: list[torch.Tensor], fb: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Feature-level discrimination: sum over levels of 1 - cos over channels, upsampled; [B, H, W]."""
    maps = [F.interpolate((1 - F.cosine_similarity(a.float(), b.float(), dim=1))[:, None], size=size,
                          mode="bilinear", align_corners=False) for a, b in zip(fa, fb)]
    return torch.stack(maps).sum(0)[:, 0]


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W], truncated at 4 sigma (scipy's default), edges replicated."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(4 * sigma))
    k = gaussian_kernel(sigma, radius).to(maps.device)
    x = F.pad(maps[:, None], (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


# ------------------------------------------------------------------------------------- method

class ESAD(AnomalyMethod):
    name = "esad"
    Config = ESADConfig

    def __init__(self, config: ESADConfig | dict | None = None, pretrained_backbones: bool = True):
        super().__init__(config, pretrained_backbones)
        resolved, features, self.provenance = first_available_network(
            self.config.feature_network, FEATURE_NETWORKS, "feature_network", pretrained_backbones)
        # the saved config names the network actually used, so `load` rebuilds the same one
        self.config = dataclasses.replace(self.config, feature_network=resolved)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial networks
            torch.manual_seed(self.config.seed)
            self.net = ESADNetwork(self.config, features)
        self.net.eval()

    # -- the pieces of a forward pass ---------------------------------------------------------
    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return model_input(images, self.config.image_size, self.device)

    def _inpaint(self, masked: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.net.inpaint(torch.cat([masked, hidden], 1) if self.config.mask_channel else masked)

    def _reconstruct(self, filled: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.net.reconstruct(torch.cat([filled, images], 1) if self.config.g2_sees_input else filled)

    def _cells(self, sizes: tuple[int, ...]) -> list[int]:
        # small images may merge sizes
        return list(dict.fromkeys(grid_cell_sizes(*image_shape(self.config.image_size), sizes)))

    def _train_masks(self, b: int, generator: torch.Generator) -> torch.Tensor:
        """[B, 1, H, W], 1 = hidden: per sample one random cell size and one of its n grid masks."""
        (rows, cols), n = image_shape(self.config.image_size), self.config.n_masks
        if self.config.train_masks == "stroke":
            hidden = stroke_masks(b, rows, cols, generator)
        else:
            cells = self._cells(self.config.cell_sizes)
            picks = torch.randint(len(cells), (b,), generator=generator)
            which = torch.randint(n, (b,), generator=generator)
            hidden = torch.stack([grid_masks(rows, cols, cells[int(k)], n, generator)[int(i)]
                                  for k, i in zip(picks, which)])
        return hidden[:, None].to(self.device)

    # -- training -----------------------------------------------------------------------------
    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        self.to(resolve_device(device))
        generator = seed_everything(cfg.seed)
        start = time.perf_counter()
        images = TrainingImages(images_in_memory(train, self._resize), self.device)
        n = len(images)
        trained = [self.net.inpaint, self.net.reconstruct]
        optimizer = torch.optim.Adam([p for m in trained for p in m.parameters()], lr=cfg.lr)
        weights = torch.tensor([cfg.w_px, cfg.w_px, cfg.w_ssim, cfg.w_ssim, cfg.w_msgms, cfg.w_feat],
                               device=self.device)
        selection = CheckpointSelection(self, valid, trained, cfg.batch_size)
        history: list[list[float]] = []
        bar = tqdm(range(cfg.epochs), desc="esad: train", disable=not progress, leave=False)
        for epoch in bar:
            self.net.train()
            totals, steps = torch.zeros(len(weights), device=self.device), 0  # summed on the device
            for idx in torch.randperm(n, generator=generator).split(cfg.batch_size):
                with step_phase("data"):
                    x = self._resize(images.batch(idx))
                    keep = 1 - self._train_masks(len(idx), generator)
                with step_phase("forward"):
                    with autocast(self.device, cfg.amp):
                        pre = self._inpaint(x * keep, 1 - keep)
                        rec = self._reconstruct(fill(x, pre if cfg.joint_gradients else pre.detach(), keep,
                                                     test=False), x)
                        with torch.no_grad():
                            fx = self.net.features(x)
                        fr = self.net.features(rec)
                    pre, rec = pre.float(), rec.float()
                    zero = x.new_zeros(())
                    losses = torch.stack([
                        F.mse_loss(pre, x), F.mse_loss(rec, x),
                        1 - ssim(pre, x, cfg.ssim_window), 1 - ssim(rec, x, cfg.ssim_window),
                        msgms_loss(pre, x) + msgms_loss(rec, x) if cfg.w_msgms else zero,
                        feature_loss(fx, fr)])
                    weighted = weights * losses
                optimizer_step(optimizer, weighted.sum())
                totals += weighted.detach()
                steps += 1
            with step_phase("log"):
                history.append((totals / steps).tolist())
                bar.set_postfix(loss=f"{sum(history[-1]):.4f}")
            if selection.enabled and ((epoch + 1) % cfg.select_every == 0 or epoch + 1 == cfg.epochs):
                selection.consider(epoch + 1)
        selection.restore()
        self.net.eval()
        fills = self._choose_test_fill(selection)
        return {"epochs": cfg.epochs, "train_images": n, "train_seconds": time.perf_counter() - start,
                "device": str(self.device), "loss_columns": LOSS_COLUMNS, "loss_per_epoch": history,
                "final_loss": sum(history[-1]), **selection.summary(cfg.epochs), **fills}

    def _choose_test_fill(self, selection: CheckpointSelection) -> dict[str, Any]:
        """Resolve test_fill "auto": the rule whose maps rank the bank better (README's "average"
        without a bank); the saved config names the rule, so a loaded model predicts the same."""
        if self.config.test_fill != "auto":
            return {}
        scores = {}
        for rule in TEST_FILLS if selection.enabled else ():
            self.config = dataclasses.replace(self.config, test_fill=rule)
            scores[rule] = self.validation_score(selection.valid, selection.batch_size)["selection_score"]
        chosen = max(scores, key=scores.get) if scores else "average"
        self.config = dataclasses.replace(self.config, test_fill=chosen)
        return {"test_fill": chosen, "test_fill_bank_scores": scores}

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        self.net.eval()
        height, width = images.shape[-2:]
        x = self._resize(images)
        size = x.shape[-2:]
        generator = torch.Generator().manual_seed(cfg.seed)  # the same test masks for every image
        maps = []
        with autocast(self.device, cfg.amp):
            fx = self.net.features(x)
            for cell in self._cells(cfg.test_cell_sizes):
                hidden = grid_masks(size[0], size[1], cell, cfg.n_masks, generator, device=self.device)
                pre = inpaint_all(self.net.inpaint, x, hidden, cfg.mask_channel)
                keep = 1 - hidden.sum(0)  # all zeros: every pixel was hidden in exactly one pass
                filled = fill(x, pre, keep, test=cfg.test_fill != "inpainted")  # "auto" before the bank's pick
                rec = self._reconstruct(filled, x)
                maps.append(feature_distance_map(fx, self.net.features(rec), size))
        maps = gaussian_smooth(torch.stack(maps).mean(0), cfg.smoothing_sigma)
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        scores = top_k_mean(maps, top_k_at(cfg.score_top_k, maps.shape[-2:]), valid)
        return scores, maps
