"""BVPN: Biomimetic Visual Perception Network for industrial image anomaly detection (IEEE T-ASE;
official code `TSAAAAA/BVPN`, read in full for `docs/methods/bvpn.md`, whose sections are cited).

Three convolutional networks imitate central, para-central and peripheral vision; two
student-teacher modules and a logical module each score an image:

    Focus Module       frozen Central Net (teacher T)  vs  Para-central Net S_p (student)    local detail
    Peripheral Module  two autoencoders A7, A3 (mimic T)  vs  a trainable Central Net S_c   global context
    Logical Module     component segmentation -> count, area, colour -> kNN   (`bvpn_logical.py`)

    M_st = mean_c (T~ - S_p)^2;  M_ae = mean_c [0.5 (A7 - S_c)^2 + 0.5 (A3 - S_c)^2]
    map = 0.5 * 0.1 (M_st - q_a) / (q_b - q_a) + 0.5 * (the same for M_ae), bilinear to the image size
    image score = z(max of map) + logical_weight * z(logical score), z = standardised on good
    validation images (the calibration images, never the test set)

From the official code (Sec. 2, 4, 5): the four networks layer by layer (ConvBlock = 3 x 3 conv
plus 1 x 1 conv, summed, then ReLU; the para-central net's paddings 3 and 4 and its "projection
cell", two Linear layers on the WIDTH axis of the B x C x H x W map; AE-7 with 7 x 7 kernels and
AE-3, EfficientAD's autoencoder with 3 x 3 kernels), the teacher normalisation (mean of per-image
channel means; sqrt of the mean of per-image mean squared deviations), the losses (hard-feature
loss on the top 0.1 % of the squared differences for the Focus module and for AE vs S_c with the
AE outputs not detached; the AE loss against the normalised teacher on the augmented view; minus
SSIM between T~(x_ae) and A7 with a Gaussian window of 32, sigma 1.5, per channel, padding 16),
the x_ae augmentation (one of rotation +-15 deg, brightness, contrast or saturation 0.2), Adam lr
1e-4 wd 1e-5 with a x0.1 step at 95 % of the iterations, batch 1, 50 000 iterations, the 0.9 / 0.995
quantile normalisation of each map on good validation images, bilinear upsampling without
smoothing, image score = max of the map.

Fixed here (Sec. 8):
- Checkpoint selection (`select_every`, off by default = the final model, as the spec advises)
  ranks states on the synthetic validation bank, never on the test set (the release evaluated the
  test set every 1000 iterations and reported the best image and pixel AUROC separately).
- Ground truth is never paired with images by sorted folder order (our loader reads each image's
  own mask), so the release's misaligned MVTec AD / LOCO masks cannot happen.
- The Logical Module's component count is on, and its score is fused with the structural one
  (the release switches the count off and never fuses), see `bvpn_logical.py` and "Fusion" below.

Inferred (the paper text was not available; each is a config option):
- Teacher (`teacher`): the release loads `teacher_state.pth` (Google Drive; its pretraining code is
  not released). `teacher_weights` = a Central Net state dict (keys paired in order, every shape
  checked) is that path ("file"). Without it ("distill", the offline path) the Central Net is
  distilled here, per category, following EfficientAD's pretraining recipe (Sec. 3) with the
  offline `tf_efficientnet_lite0` in place of WideResNet-101 and the category's training images
  in place of ImageNet: the backbone sees the image at `distill_scale` x the teacher's input (as
  WRN saw 512 px for a 256 px teacher), its stride 8, 16 and 32 maps are bilinearly resized to
  the teacher's 1/4 grid, each averaged over 3 x 3 neighbourhoods (PatchCore's local
  aggregation), concatenated, adaptive-average-pooled over channels to `channels` and standardised
  per channel over the training images; the Central Net regresses them with MSE (Adam
  `distill_lr`, wd 1e-5). To make the teacher answer anomalous content like the backbone (ImageNet
  gave EfficientAD's teacher that breadth) the distillation images get RandomGrayscale(0.1)
  (EfficientAD's), flips, colour jitter 0.2 and, with probability `distill_anomaly_p`, a
  DRAEM-style Perlin-masked procedural texture: the students only ever see normal images. The
  saved config says which path was used (`teacher`: "file" or "distill") and the provenance where
  its weights came from.
- Image size: the networks follow `image_size` (a multiple of 32): the width-axis Linear has
  image_size / 4 inputs, the autoencoders' Upsample sizes are the release's (fixed for 256) scaled
  by image_size / 256, AE-3's last encoder kernel is image_size / 32 (8 at 256).
- CPU budgets: `channels` (384 in the release), `widths` (the Central / Para-central nets' 256 and
  512), `ae_width` (the autoencoders' 64; their first layers have half), `iterations`, `batch_size`,
  `distill_views` (k augmented views per training image and their backbone targets made once,
  instead of fresh ones every iteration), `ssim_window`. At small maps the top 0.1 % of the
  hard-feature loss is a handful of elements (33 of 32 x 32 x 32), so short CPU runs learn faster
  with a lower `hard_quantile` (0.99 in our tests). The networks run channels-last on every device
  (25 % faster convolutions on the CPU too).
- Calibration images: the good images of the validation data (our synthetic bank's held-out good
  images), topped up to `min_calibration` with training images held out of everything else (a
  bank holds few good images: 4-6 for 60 training images); without any good validation image, a
  share `calibration_fraction` of train (at least `min_calibration`). Never the test set.
- Fusion (the release has none; Sec. 6.3): each image score (structural = max of the map; logical
  = the kNN distance) is standardised with its mean and standard deviation on the calibration
  images (deviation floored at 10 % of the mean's magnitude, so near-equal calibration scores
  cannot blow a score up), and the image score is z_structural + `logical_weight` * z_logical
  (`fusion="sum"`, the spec's proposal). `fusion="max"` takes max(z_structural, w z_logical), an
  "either module flags it" rule; in our runs the sum was as good or better (synthetic circuit,
  logical defects: 0.93 vs 0.92; magnetic tile: 0.76 vs 0.73 image AUROC). The anomaly map is the
  structural map: the logical score is image-level, as in the release (we tried a per-pixel
  "label rarity" map, -log of the training frequency of a pixel's component label at its place:
  it found the circuit's logical defects worse than the kNN score, 0.87 vs 0.90, and was left
  out). `score_parts` gives the standardised structural and logical scores apart.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ad_models.backbones import BackboneConfig, BackboneWeightsError, FeatureExtractor, first_available_network
from ad_models.defects import DefectSynthesizer, color_jitter
from ad_models.data.loading import image_shape
from ad_models.methods.base import (AnomalyMethod, CheckpointSelection, TrainingImages, autocast,
                                    check_input_geometry, images_in_memory, model_input, optimizer_step,
                                    resolve_device, seed_everything, step_phase, top_k_mean)
from ad_models.methods.bvpn_logical import LogicalModule
from ad_models.methods.losses import ssim

TEACHERS = ("auto", "file", "distill")
FUSIONS = ("sum", "max")
LOGICAL_NETWORKS = {  # name -> backbone; "auto" tries the release's DINO ViT-S/8 first, then the offline CNN
    "dino_vits8": {"name": "vit_small_patch8_224.dino", "out_indices": (11,)},
    "efficientnet_lite0": {"name": "tf_efficientnet_lite0", "out_indices": (2, 3)},
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOSS_COLUMNS = ["st", "ae", "stae", "ssim"]


@dataclass
class BVPNConfig:
    image_size: int | tuple[int, int] = 256  # a multiple of 32; or [height, width] of them
    resize: str = "stretch"  # or "keep_aspect", "tiles" (loading.RESIZE_POLICIES)
    channels: int = 384  # output channels of every network (release: 384)
    widths: tuple[int, int] = (256, 512)  # Central / Para-central hidden widths (release)
    ae_width: int = 64  # the autoencoders' width (release: 64; first layers half of it)
    # teacher (Sec. 3)
    teacher: str = "auto"  # TEACHERS: "file" = teacher_weights, "distill" = offline; "auto" picks
    teacher_weights: str | None = None  # a Central Net state dict (the release's teacher_state.pth)
    distill_network: dict = field(default_factory=lambda: {"name": "tf_efficientnet_lite0", "out_indices": (2, 3, 4)})
    distill_scale: int = 2  # the backbone sees distill_scale x image_size (EfficientAD: 512 for 256)
    distill_iterations: int = 10000  # inferred (EfficientAD: 60 000 x 16 ImageNet images; here one category)
    distill_batch_size: int = 8
    distill_lr: float = 1e-4  # EfficientAD's pretraining lr
    distill_anomaly_p: float = 0.5  # share of distillation images given a synthetic anomaly (inferred)
    distill_views: int = 0  # 0: fresh augmented images every iteration; k: k views per image made once
    # Focus + Peripheral training (Sec. 4)
    iterations: int = 50000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_step_at: float = 0.95  # share of the iterations after which lr x 0.1
    hard_quantile: float = 0.999
    ssim_window: int = 32
    ssim_sigma: float = 1.5
    w_ssim: float = 1.0
    # inference (Sec. 5)
    map_quantiles: tuple[float, float] = (0.9, 0.995)
    min_calibration: int = 8  # good images to calibrate on: validation ones, topped up from train
    calibration_fraction: float = 0.1  # held out of train when validation has no good image at all
    select_every: int = 0  # iterations between checkpoint scorings on the bank; 0 = the final model
    # Logical Module (Sec. 6; bvpn_logical.py)
    logical: bool = True
    logical_network: Any = "auto"  # "auto", a name of LOGICAL_NETWORKS, or a backbone dict
    logical_size: int = 224  # the release's 224 x 224 (a ViT uses its own fixed size)
    clusters: int = 6  # release: k-means k = 6
    coreset_ratio: float = 0.01  # release: 1 % of each image's descriptors
    colour_weight: float = 3.0  # inferred (Lab colour beside the CNN features)
    knn: int = 6  # release: mean distance to the 6 nearest training descriptors
    min_component: float = 0.001  # share of the image (release: > 50 px at 224 x 224)
    drop_background: bool = True
    layout: bool = True  # each kept cluster's centroid joins the descriptor
    layout_grid: int = 6  # and its share of each cell of a g x g grid (0: off; off for textures)
    # fusion
    fusion: str = "sum"  # FUSIONS: z_structural + w z_logical, or max(z_structural, w z_logical)
    logical_weight: float = 1.0  # w
    amp: bool = True  # bf16 autocast on CUDA
    seed: int = 42  # the release's

    def __post_init__(self):
        self.widths, self.map_quantiles = tuple(self.widths), tuple(self.map_quantiles)
        if isinstance(self.distill_network, dict) and "out_indices" in self.distill_network:
            self.distill_network = {**self.distill_network, "out_indices": tuple(self.distill_network["out_indices"])}
        check_input_geometry(self, "bvpn", 32, "AE-3 halves it five times")
        if len(self.widths) != 2 or min(self.widths) < 1 or min(self.channels, self.ae_width) < 2:
            raise ValueError(f"widths needs two positive widths (release: 256, 512), channels and ae_width at "
                             f"least 2; got widths={list(self.widths)}, channels={self.channels}, "
                             f"ae_width={self.ae_width}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, not {self.fusion!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {list(TEACHERS)}, not {self.teacher!r}")
        if self.teacher == "file" and not self.teacher_weights:
            raise ValueError("teacher='file' needs teacher_weights: the path of a Central Net state dict "
                             "(the release's teacher_state.pth)")
        if not 0 < self.hard_quantile < 1 or not 0 < self.lr_step_at <= 1:
            raise ValueError(f"hard_quantile must be in (0, 1) and lr_step_at in (0, 1], got {self.hard_quantile}, "
                             f"{self.lr_step_at}")
        lo, hi = self.map_quantiles
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"map_quantiles must be two quantiles lo < hi in [0, 1], got {list(self.map_quantiles)}")
        if not 0 < self.calibration_fraction < 1 or not 0 <= self.distill_anomaly_p <= 1:
            raise ValueError("calibration_fraction must be in (0, 1) and distill_anomaly_p in [0, 1]")
        if min(self.iterations, self.batch_size, self.distill_batch_size, self.distill_scale, self.ssim_window,
               self.clusters, self.knn, self.logical_size, self.min_calibration) < 1:
            raise ValueError("iterations, batch_size, distill_batch_size, distill_scale, ssim_window, clusters, knn, "
                             "logical_size and min_calibration must be at least 1")
        if min(self.distill_iterations, self.select_every, self.distill_views, self.layout_grid) < 0:
            raise ValueError("distill_iterations, distill_views, select_every and layout_grid must be at least 0")
        if not 0 < self.coreset_ratio <= 1 or not 0 <= self.min_component < 1:
            raise ValueError("coreset_ratio must be in (0, 1] and min_component in [0, 1)")
        if not (isinstance(self.logical_network, dict) or self.logical_network == "auto"
                or self.logical_network in LOGICAL_NETWORKS):
            raise ValueError(f"logical_network must be 'auto', one of {sorted(LOGICAL_NETWORKS)} or a backbone "
                             f"dict, not {self.logical_network!r}")

    def resolved_teacher(self) -> str:
        return ("file" if self.teacher_weights else "distill") if self.teacher == "auto" else self.teacher


# ----------------------------------------------------------------------------------- networks

class ConvBlock(nn.Module):
    """Sec. 2.1: a 3 x 3 conv (pad 1) and a 1 x 1 conv on the same input, summed, then ReLU (the
    paper's figure draws a concatenation; the code adds)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(x) + self.conv1(x))


class CentralNet(nn.Module):
    """Sec. 2.1: the teacher and its trainable copy; output [B, channels, S/4, S/4]."""

    def __init__(self, channels: int = 384, widths: tuple[int, int] = (256, 512)):
        super().__init__()
        w1, w2 = widths
        self.layers = nn.Sequential(
            ConvBlock(3, w1), nn.AvgPool2d(3, 2, 1), ConvBlock(w1, w2), nn.AvgPool2d(3, 2, 1),
            ConvBlock(w2, w2), ConvBlock(w2, w2), ConvBlock(w2, channels), nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ParaCentralNet(nn.Module):
    """Sec. 2.2: plain convs (paddings 3, 4, 0, 1, 0) and the "projection cell": Linear + ReLU +
    Linear on the LAST axis of the [B, C, H, W] map, i.e. mixing the columns of each row per
    channel (horizontal context). Its size is the map's width, image_size / 4 (64 at 256)."""

    def __init__(self, channels: int = 384, widths: tuple[int, int] = (256, 512), map_size: int = 64):
        super().__init__()
        w1, w2 = widths
        self.layers = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=3), nn.ReLU(), nn.AvgPool2d(3, 2, 1),
            nn.Conv2d(w1, w2, 3, padding=4), nn.ReLU(), nn.AvgPool2d(3, 2, 1),
            nn.Conv2d(w2, w2, 3, padding=0), nn.ReLU(),
            nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w2, channels, 3, padding=0), nn.ReLU(),
            nn.Conv2d(channels, channels, 1))
        self.projection = nn.Sequential(nn.Linear(map_size, map_size), nn.ReLU(), nn.Linear(map_size, map_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layers(x))  # nn.Linear acts on the last (width) axis


def _like(sides: tuple[int, int], image_size) -> int | tuple[int, int]:
    # an int for a square image_size, so the modules of square models stay as they were
    return tuple(sides) if isinstance(image_size, (list, tuple)) else sides[0]


def scaled(size: int, image_size) -> int | tuple[int, int]:
    """One of the release's fixed Upsample sizes (for 256 px inputs) at `image_size` (int, or
    [height, width]: each side scaled by its own length)."""
    return _like([max(1, round(size * side / 256)) for side in image_shape(image_size)], image_size)


def quarter(image_size) -> int | tuple[int, int]:
    """The output grid of the student-teacher maps: image_size / 4 per side."""
    return _like([side // 4 for side in image_shape(image_size)], image_size)


class AutoEncoder7(nn.Module):
    """Sec. 2.3, AE-7: 7 x 7 kernels; bottleneck 3 x 3 at 256 px; Upsample to 32, 63, 127 (scaled)
    then to the output grid image_size / 4."""

    def __init__(self, channels: int = 384, width: int = 64, image_size: int | tuple[int, int] = 256):
        super().__init__()
        half = width // 2
        self.encoder = nn.Sequential(
            nn.Conv2d(3, half, 7, 2, 3), nn.ReLU(), nn.AvgPool2d(2, 2, 1),
            nn.Conv2d(half, half, 7, 2, 3), nn.ReLU(), nn.AvgPool2d(2, 2, 1),
            nn.Conv2d(half, width, 7, 2, 3), nn.ReLU(),
            nn.Conv2d(width, width, 7, 2, 3), nn.AvgPool2d(2, 2, 1))
        stages = []
        for size in (32, 63, 127):
            stages += [nn.Upsample(size=scaled(size, image_size), mode="bilinear"),
                       nn.Conv2d(width, width, 7, padding=4), nn.ReLU(), nn.Dropout(0.2)]
        self.decoder = nn.Sequential(
            *stages, nn.Upsample(size=quarter(image_size), mode="bilinear"),
            nn.Conv2d(width, width, 7, padding=3), nn.ReLU(), nn.Conv2d(width, channels, 7, padding=3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AutoEncoder3(nn.Module):
    """Sec. 2.3, AE-3: EfficientAD's autoencoder with 3 x 3 kernels; the last encoder conv's kernel
    is image_size / 32 (8 at 256) so the bottleneck is 1 x 1; Upsample to 3, 8, 15, 32, 63, 127
    (scaled), then to image_size / 4."""

    def __init__(self, channels: int = 384, width: int = 64, image_size: int | tuple[int, int] = 256):
        super().__init__()
        half = width // 2
        widths = [3, half, half, width, width, width]
        encoder = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            encoder += [nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder, nn.Conv2d(width, width, tuple(s // 32 for s in image_shape(image_size))))
        stages = []
        for size in (3, 8, 15, 32, 63, 127):
            stages += [nn.Upsample(size=scaled(size, image_size), mode="bilinear"),
                       nn.Conv2d(width, width, 3, padding=2), nn.ReLU(), nn.Dropout(0.2)]
        self.decoder = nn.Sequential(
            *stages, nn.Upsample(size=quarter(image_size), mode="bilinear"),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class BVPNNet(nn.Module):
    """Teacher (frozen), student = [Para-central, Central copy], AE-7, AE-3, the logical module's
    frozen feature network, and the constants set on data (teacher normalisation, map quantiles,
    fusion statistics), so that one state dict restores a trained model."""

    def __init__(self, cfg: BVPNConfig, logical_features: FeatureExtractor | None):
        super().__init__()
        c = cfg.channels
        self.teacher = CentralNet(c, cfg.widths).requires_grad_(False)
        self.para = ParaCentralNet(c, cfg.widths, image_shape(cfg.image_size)[1] // 4)  # the map's width
        self.central = CentralNet(c, cfg.widths)
        self.ae7 = AutoEncoder7(c, cfg.ae_width, cfg.image_size)
        self.ae3 = AutoEncoder3(c, cfg.ae_width, cfg.image_size)
        self.logical_features = logical_features
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, c, 1, 1))
        self.register_buffer("quantiles", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # q_a, q_b of M_st, then of M_ae
        self.register_buffer("fusion", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # mean, std of structural, logical

    def train(self, mode: bool = True) -> "BVPNNet":
        super().train(mode)
        self.teacher.eval()
        if self.logical_features is not None:
            self.logical_features.eval()
        return self

    def trained_modules(self) -> list[nn.Module]:
        return [self.para, self.central, self.ae7, self.ae3]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        # channels-last: the convolutions run faster on NHWC, on the CPU too (~25 % here)
        return ((images - self.input_mean) / self.input_std).contiguous(memory_format=torch.channels_last)

    def teacher_output(self, x: torch.Tensor) -> torch.Tensor:
        """T~ = (T(x) - mu) / sigma on normalised input x."""
        return (self.teacher(x).float() - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M_st, M_ae), each [B, S/4, S/4], before quantile normalisation (Sec. 5)."""
        x = self.normalise(images)
        t = self.teacher_output(x)
        s_p, s_c = self.para(x).float(), self.central(x).float()
        a7, a3 = self.ae7(x).float(), self.ae3(x).float()
        m_st = ((t - s_p) ** 2).mean(1)
        m_ae = (0.5 * (a7 - s_c) ** 2 + 0.5 * (a3 - s_c) ** 2).mean(1)
        return m_st, m_ae

    def combine(self, m_st: torch.Tensor, m_ae: torch.Tensor) -> torch.Tensor:
        """M = 0.5 * 0.1 (M_st - q_a) / (q_b - q_a) + the same for M_ae (Sec. 5)."""
        q = self.quantiles
        st = 0.1 * (m_st - q[0]) / (q[1] - q[0]).clamp(min=1e-12)
        ae = 0.1 * (m_ae - q[2]) / (q[3] - q[2]).clamp(min=1e-12)
        return 0.5 * st + 0.5 * ae


# ------------------------------------------------------------------------------------- losses

def hard_feature_loss(distance: torch.Tensor, quantile: float = 0.999) -> torch.Tensor:
    """Mean of the elements at or above the `quantile` of `distance` (EfficientAD's hard loss)."""
    flat = distance.flatten()
    if flat.numel() <= 16_000_000:  # torch.quantile's input limit
        threshold = torch.quantile(flat.float(), quantile)
    else:
        threshold = flat.float().kthvalue(max(1, math.ceil(quantile * flat.numel()))).values
    return distance[distance >= threshold].mean()


def augment_ae(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_ae (Sec. 4): per image one of RandomRotation(15) (nearest, black fill, torchvision's
    defaults), ColorJitter(brightness=0.2), (contrast=0.2), (saturation=0.2)."""
    out = []
    for image in images:
        choice = int(torch.randint(4, (1,), generator=generator))
        u = float(torch.rand(1, generator=generator))
        if choice == 0:
            image = TF.rotate(image, 30 * u - 15)
        else:
            adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[choice - 1]
            image = adjust(image, 0.8 + 0.4 * u)
        out.append(image.clamp(0, 1))
    return torch.stack(out)


# ------------------------------------------------------------------------------------- method

def load_central_net(net: CentralNet, path: str) -> None:
    """A Central Net state dict from `path` (or a checkpoint holding one under "state_dict" /
    "model"), keys paired in order when the names differ, every shape checked."""
    from pathlib import Path

    if not Path(path).is_file():
        raise BackboneWeightsError(f"teacher_weights: the file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    target = net.state_dict()
    if not isinstance(state, dict) or len(state) != len(target):
        raise BackboneWeightsError(f"teacher_weights {path}: expected a Central Net state dict with {len(target)} "
                                   f"tensors, got {len(state) if isinstance(state, dict) else type(state).__name__}")
    remapped = {}
    for (src, value), (dst, expected) in zip(state.items(), target.items()):
        if tuple(value.shape) != tuple(expected.shape):
            raise BackboneWeightsError(f"teacher_weights {path}: {src} {tuple(value.shape)} does not fit {dst} "
                                       f"{tuple(expected.shape)} (check channels / widths)")
        remapped[dst] = value
    net.load_state_dict(remapped)


def distill_target(features: list[torch.Tensor], grid: tuple[int, int], channels: int) -> torch.Tensor:
    """The offline teacher's regression target [B, channels, *grid] from backbone maps: each
    bilinearly resized to the grid, averaged over 3 x 3 neighbourhoods, concatenated, then
    adaptive-average-pooled over channels (EfficientAD's pretraining recipe)."""
    levels = [F.avg_pool2d(F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False),
                           3, 1, 1, count_include_pad=False) for f in features]
    x = torch.cat(levels, 1)
    b, d, h, w = x.shape
    x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b * h * w, 1, d), channels)
    return x.reshape(b, h, w, channels).permute(0, 3, 1, 2)


class BVPN(AnomalyMethod):
    name = "bvpn"
    Config = BVPNConfig

    def __init__(self, config: BVPNConfig | dict | None = None, pretrained_backbones: bool = True):
        super().__init__(config, pretrained_backbones)
        cfg = self.config
        features = None
        if cfg.logical:
            resolved, features, provenance = first_available_network(
                cfg.logical_network, LOGICAL_NETWORKS, "logical_network", pretrained_backbones)
            self.provenance.update(provenance)
            cfg = dataclasses.replace(cfg, logical_network=resolved)  # `load` rebuilds the same one
        self.config = cfg = dataclasses.replace(cfg, teacher=cfg.resolved_teacher())
        with torch.random.fork_rng(devices=[]):  # same seed, same initial networks
            torch.manual_seed(cfg.seed)
            self.net = BVPNNet(cfg, features)
        if cfg.teacher == "file":
            if pretrained_backbones:  # a saved model has the teacher in its own weights
                load_central_net(self.net.teacher, cfg.teacher_weights)
            self.provenance["teacher"] = f"file:{cfg.teacher_weights}"
        self.logical = None
        if features is not None:
            self.logical = LogicalModule(
                features, size=cfg.logical_size, clusters=cfg.clusters, coreset_ratio=cfg.coreset_ratio,
                colour_weight=cfg.colour_weight, knn=cfg.knn, min_component=cfg.min_component,
                drop_background=cfg.drop_background, layout=cfg.layout,
                layout_grid=cfg.layout_grid, seed=cfg.seed)
        self.net.eval()

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return model_input(images, self.config.image_size, self.device)

    def _float(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images from `images_in_memory` -> float in [0, 1] on the device."""
        return images.to(self.device).float().div_(255)

    def to(self, device: torch.device) -> "BVPN":
        super().to(device)  # channels-last on CUDA; these nets gain from it on the CPU too (normalise)
        for module in [self.net.teacher, *self.net.trained_modules()]:
            module.to(memory_format=torch.channels_last)
        return self

    # -- the teacher ------------------------------------------------------------------------------
    def distill_teacher(self, images: torch.Tensor, generator: torch.Generator, progress: bool) -> list[float]:
        """The offline path (module docstring): regress the Central Net on EfficientNet-Lite features."""
        cfg = self.config
        backbone = FeatureExtractor(BackboneConfig.from_dict(cfg.distill_network)).to(self.device)
        self.provenance["teacher"] = (f"distilled here from {backbone.config.name} ({backbone.weights_source}) "
                                      f"on {len(images)} training images, {cfg.distill_iterations} iterations")
        grid = quarter(cfg.image_size)
        big = [side * cfg.distill_scale for side in image_shape(cfg.image_size)]

        def target(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(self.device, cfg.amp):
                return distill_target(backbone(model_input(x, big, self.device)), grid, cfg.channels)

        with torch.no_grad():  # channel standardisation over the (plain) training images
            targets = torch.cat([target(self._float(b)) for b in images.split(16)])
            mean = targets.mean((0, 2, 3), keepdim=True)
            std = targets.std((0, 2, 3), keepdim=True).clamp(min=1e-6)
            del targets
        anomalies = DefectSynthesizer({"masks": {"perlin": 1.0}, "source": "procedural", "blend": "replace",
                                       "p_defect": cfg.distill_anomaly_p})
        views = None
        if cfg.distill_views:  # the CPU budget: augmented views and their targets computed once
            with torch.no_grad():
                views = [self._distill_augment(self._float(b), generator, anomalies)
                         for _ in range(cfg.distill_views) for b in images.split(16)]
                views = (TrainingImages(torch.cat([(v * 255).round().to(torch.uint8).cpu() for v in views]),
                                        self.device),
                         torch.cat([((target(v.float()) - mean) / std).half() for v in views]))
        teacher = self.net.teacher.requires_grad_(True).train()
        optimizer = torch.optim.Adam(teacher.parameters(), lr=cfg.distill_lr, weight_decay=1e-5)
        losses = []
        try:
            for _ in tqdm(range(cfg.distill_iterations), desc="bvpn: distil teacher", disable=not progress,
                          leave=False):
                with step_phase("data"):
                    if views is None:
                        idx = torch.randint(len(images), (cfg.distill_batch_size,), generator=generator)
                        x = self._distill_augment(self._float(images[idx]), generator, anomalies)
                        y = (target(x) - mean) / std
                    else:
                        idx = torch.randint(len(views[0]), (cfg.distill_batch_size,), generator=generator)
                        x, y = views[0].batch(idx), views[1][idx.to(views[1].device)].float()
                with step_phase("forward"):
                    with autocast(self.device, cfg.amp):
                        out = teacher(self.net.normalise(x))
                    loss = F.mse_loss(out.float(), y)
                optimizer_step(optimizer, loss)
                losses.append(loss.detach())
        finally:
            teacher.requires_grad_(False).eval()
        return torch.stack(losses).tolist() if losses else []  # one sync, not one per iteration

    @staticmethod
    def _distill_augment(x: torch.Tensor, generator: torch.Generator, anomalies: DefectSynthesizer) -> torch.Tensor:
        """Flips, colour jitter 0.2, RandomGrayscale(0.1) (EfficientAD), then synthetic anomalies."""
        n = len(x)
        flips = torch.rand((n, 2), generator=generator).to(x.device) < 0.5
        x = torch.where(flips[:, 0].view(n, 1, 1, 1), x.flip(-1), x)
        x = torch.where(flips[:, 1].view(n, 1, 1, 1), x.flip(-2), x)
        x = color_jitter(x, generator, 0.2)
        grey = (torch.rand(n, generator=generator) < 0.1).to(x.device).view(n, 1, 1, 1)
        x = torch.where(grey, TF.rgb_to_grayscale(x, 3), x)
        return anomalies(x, generator)[0]

    @torch.no_grad()
    def teacher_statistics(self, images: torch.Tensor) -> None:
        """Sec. 4: mu = mean of per-image channel means; sigma = sqrt(mean of per-image mean squared
        deviations from mu)."""
        net = self.net
        outputs = []
        for batch in images.split(8):
            with autocast(self.device, self.config.amp):
                outputs.append(net.teacher(net.normalise(self._float(batch))).float())
        t = torch.cat(outputs)
        mean = t.mean((2, 3)).mean(0).view(1, -1, 1, 1)
        std = ((t - mean) ** 2).mean((2, 3)).mean(0).sqrt().view(1, -1, 1, 1)
        net.teacher_mean.copy_(mean)
        net.teacher_std.copy_(std.clamp(min=1e-6))

    # -- calibration ------------------------------------------------------------------------------
    def _calibration_images(self, train_images: torch.Tensor, valid: Dataset | None, generator: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(calibration images, training images, where the calibration images come from): the good
        validation images, topped up to `min_calibration` with held-out training images (at least
        `calibration_fraction` of them when there are no good validation images at all)."""
        cfg = self.config
        good = torch.zeros(0, *train_images.shape[1:], dtype=torch.uint8)
        if valid is not None and len(valid):
            labels = getattr(valid, "labels", None)
            if labels is None:
                labels = [int(valid[i]["label"]) for i in range(len(valid))]
            index = [i for i, y in enumerate(labels) if int(y) == 0]
            if index:
                good = images_in_memory(Subset(valid, index), self._resize)
        n = len(train_images)
        k = max(cfg.min_calibration - len(good), 0 if len(good) else max(1, round(cfg.calibration_fraction * n)))
        if n - k < 1:
            raise ValueError(f"bvpn needs {k} training images to calibrate its scores (good validation images: "
                             f"{len(good)}, min_calibration: {cfg.min_calibration}) and at least one to train on; "
                             f"got {n} training images")
        order = torch.randperm(n, generator=generator)
        source = ", ".join(([f"{len(good)} good validation images"] if len(good) else [])
                           + ([f"{k} held-out training images"] if k else []))
        return torch.cat([good, train_images[order[:k]]]), train_images[order[k:]], source

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
        """Map quantiles (Sec. 5) and the fusion statistics, on good images (uint8)."""
        net, cfg = self.net, self.config
        net.eval()
        m_st, m_ae = [], []
        for batch in images.split(batch_size):
            with autocast(self.device, cfg.amp):
                st, ae = net.raw_maps(self._float(batch))
            m_st.append(st.float().cpu())
            m_ae.append(ae.float().cpu())
        lo, hi = cfg.map_quantiles
        q = [float(np.quantile(torch.cat(m).numpy(), p)) for m in (m_st, m_ae) for p in (lo, hi)]
        net.quantiles.copy_(torch.tensor(q))
        structural = torch.cat([self._structural(net.combine(st.to(self.device), ae.to(self.device)))
                                for st, ae in zip(m_st, m_ae)])
        stats = [structural.mean(), self._spread(structural)]
        if self.logical is not None:
            logical = torch.cat([self.logical.score(self._float(b)) for b in images.split(batch_size)])
            stats += [logical.mean(), self._spread(logical)]
        else:
            stats += [torch.tensor(0.0), torch.tensor(1.0)]
        net.fusion.copy_(torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in stats]))
        names = ["structural_mean", "structural_std", "logical_mean", "logical_std"]
        return {"q_st": q[:2], "q_ae": q[2:], **dict(zip(names, net.fusion.tolist()))}

    @staticmethod
    def _spread(scores: torch.Tensor) -> torch.Tensor:
        return scores.float().std(unbiased=False).cpu().maximum(0.1 * scores.float().mean().abs().cpu() + 1e-6)

    def _structural(self, small_maps: torch.Tensor) -> torch.Tensor:
        return F.interpolate(small_maps[:, None], size=image_shape(self.config.image_size), mode="bilinear",
                             align_corners=False)[:, 0].flatten(1).amax(1).cpu()

    # -- training ---------------------------------------------------------------------------------
    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        net = self.net
        self.to(resolve_device(device))
        generator = seed_everything(cfg.seed)
        start = time.perf_counter()
        images = images_in_memory(train, self._resize)
        calibration, images, calibration_source = self._calibration_images(images, valid, generator)
        log: dict[str, Any] = {"train_images": len(images), "calibration_images": len(calibration),
                               "calibration_source": calibration_source}
        # 1. the teacher: distilled here (offline path) or loaded in __init__ (file)
        if cfg.teacher == "distill":
            losses = self.distill_teacher(images, generator, progress)
            log["distill_loss_first_last"] = [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))] if losses \
                else []
        log["teacher"] = self.provenance.get("teacher")
        self.teacher_statistics(images)
        log["teacher_seconds"] = time.perf_counter() - start
        # 2. the Logical Module (training-free)
        if self.logical is not None:
            with torch.no_grad():
                log["logical"] = self.logical.fit(images.float().div(255))
        log["logical_seconds"] = time.perf_counter() - start - log["teacher_seconds"]
        # 3. Focus + Peripheral modules
        trained = net.trained_modules()
        optimizer = torch.optim.Adam([p for m in trained for p in m.parameters()], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(cfg.lr_step_at * cfg.iterations)),
                                                   gamma=0.1)
        selection = CheckpointSelection(self, valid, trained, 8)
        select = bool(cfg.select_every) and selection.enabled
        every = max(1, min(cfg.select_every or max(1, cfg.iterations // 10), cfg.iterations))
        history: list[list[float]] = []
        running = torch.zeros(len(LOSS_COLUMNS), device=self.device)  # summed on the device: no sync per step
        resident = TrainingImages(images, self.device)
        net.train()
        bar = tqdm(range(cfg.iterations), desc="bvpn: train", disable=not progress, leave=False)
        for step in bar:
            with step_phase("data"):
                idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
                x_st = resident.batch(idx)
                x_ae = augment_ae(x_st, generator)
                x_st, x_ae = net.normalise(x_st), net.normalise(x_ae)
            with step_phase("forward"):
                with torch.no_grad():
                    with autocast(self.device, cfg.amp):
                        t = net.teacher(torch.cat([x_st, x_ae])).float()
                    t = (t - net.teacher_mean) / net.teacher_std
                    t_st, t_ae = t.chunk(2)
                with autocast(self.device, cfg.amp):
                    s_p, s_c = net.para(x_st).float(), net.central(x_ae).float()
                    a7, a3 = net.ae7(x_ae).float(), net.ae3(x_ae).float()
                loss_st = hard_feature_loss((t_st - s_p) ** 2, cfg.hard_quantile)
                loss_ae = (0.5 * (t_ae - a7) ** 2 + 0.5 * (t_ae - a3) ** 2).mean()
                loss_stae = hard_feature_loss(0.5 * (a7 - s_c) ** 2 + 0.5 * (a3 - s_c) ** 2, cfg.hard_quantile)
                similarity = ssim(t_ae, a7, cfg.ssim_window, cfg.ssim_sigma)
                loss = loss_st + loss_ae + loss_stae - cfg.w_ssim * similarity
            optimizer_step(optimizer, loss, schedule)
            running += torch.stack([loss_st, loss_ae, loss_stae, similarity]).detach().float()
            if (step + 1) % every == 0 or step + 1 == cfg.iterations:
                with step_phase("log"):
                    history.append((running / ((step % every) + 1)).tolist())
                    running.zero_()
                    bar.set_postfix(loss=f"{history[-1][0] + history[-1][1] + history[-1][2] - history[-1][3]:.4f}")
                if select:
                    self.calibrate(calibration)
                    selection.consider(step + 1)
                    net.train()
        selection.restore()
        log["score_calibration"] = self.calibrate(calibration)  # ("calibration" is the thresholds runs.train adds)
        net.eval()
        log.update({"iterations": cfg.iterations, "train_seconds": time.perf_counter() - start,
                    "device": str(self.device), "loss_columns": LOSS_COLUMNS, "loss_per_epoch": history,
                    "loss_every_iterations": every, "final_loss": history[-1][0] + history[-1][1] + history[-1][2]
                    - history[-1][3], **selection.summary(cfg.iterations)})
        return log

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def score_parts(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The standardised structural and logical image scores [B], their fusion `score` [B]
        (what `predict` returns) and the structural map [B, H, W] at the input resolution; the
        structural score over the `valid` pixels only when given (the logical one sees the image)."""
        cfg, net = self.config, self.net
        net.eval()
        height, width = images.shape[-2:]
        x = self._resize(images)
        with autocast(self.device, cfg.amp):
            m_st, m_ae = net.raw_maps(x)
        small = net.combine(m_st.float(), m_ae.float())
        maps = F.interpolate(small[:, None], size=image_shape(cfg.image_size), mode="bilinear",
                             align_corners=False)[:, 0]
        mu_s, sd_s, mu_l, sd_l = net.fusion.tolist()
        structural = (top_k_mean(maps, 1, valid) - mu_s) / sd_s
        parts = {"structural": structural}
        score = structural
        if self.logical is not None:
            logical = ((self.logical.score(x) - mu_l) / sd_l).to(structural.device)
            parts["logical"] = logical
            weighted = cfg.logical_weight * logical
            score = torch.maximum(structural, weighted) if cfg.fusion == "max" else structural + weighted
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return {**parts, "score": score, "map": maps}

    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.score_parts(images, valid)
        return parts["score"], parts["map"]

    def predict_parts(self, images: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        parts = self.score_parts(images, valid)
        return parts.pop("score"), parts.pop("map"), parts

    # -- persistence --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"logical": self.logical.state_dict() if self.logical is not None else None}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.logical is not None and state.get("logical") is not None:
            self.logical.load_state_dict(state["logical"])
