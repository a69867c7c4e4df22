"""NDP-Net: Normal Reference Attention and Defective Feature Perception Network (Luo, Yao, Yu,
IEEE TIM 2023, arXiv 2211.10060).

A reconstruction network that repairs defects in feature space with the help of one fixed
defect-free reference image, then segments defects from the (input, reconstruction) pair:

    encoder (5 layers)  ->  RBAM at layers 3-5 (repair with reference patches)  ->  decoder
    input + reconstruction  ->  encoder layers 1-3  ->  MSDSM (3 scales)  ->  anomaly map

Training, two phases (paper Sec. III-E): phase 1 trains encoder + decoder to reconstruct good images
(MSE x 100 + perceptual L1 x 1) while the pixel-level defect perception loss (Eq. 2) makes the
encoder's features differ exactly where an artificial defect was pasted (Eq. 1). Phase 2 freezes
the encoder and trains RBAM + decoder + MSDSM on artificial defects: reconstruction of the
defect-free original (MSE x 100 + perceptual x 1), feature repair (Eq. 9) and focal segmentation
(Eq. 10), weights 1. Adam 1e-4, weight decay 1e-5, 400 + 200 epochs. Test: weighted multi-scale map
0.2 AM1 + 0.2 g(AM2) + 0.6 g(AM3), 5x5 median and mean filters, image score = max.

The paper is authoritative (no official code exists). What it leaves open, and what we chose
(`docs/methods/ndpnet.md` Sec. 2; all marked *inferred*):

- Layers: layer 1 works at full resolution (AM1 is not upsampled in Eq. 11), layers 2-5 at 1/2 to
  1/16, each 2 x (3x3 conv, BN, ReLU) after a 2x2 max-pool; widths `widths`.
- Decoder: U-Net style with skips only from the *repaired* layers 3 and 4 (RBAM exists to keep
  defective features out of skips, so layers 1-2 give none); sigmoid output in [0, 1].
- RBFRM follows Eqs. 3-5 literally: cosine similarity, softmax without temperature
  (`repair_temperature` = 1), non-overlapping K x K patches, K = 2 and 4. FFM (Eqs. 6-8): m = 5,
  compression conv = conv-BN-ReLU to 64 channels (SKNet), three 5x5 convs, softmax across them.
- Eq. 2's normalisation N: per-image min-max over positions; the mask I_m^l is area-resized.
  Eq. 9's 1/(l2-l1) is read as the mean over the three RBAM layers.
- MSDSM sub-network per scale: concat(E_l(x), E_l(x_hat)) -> 2 x (3x3 conv, BN, ReLU) -> 1x1 conv
  -> 2 logits; focal loss gamma 2, no alpha, label smoothing 1e-5 (the DRAEM lineage); masks
  area-resized as soft targets. The segmentation loss also reaches the decoder (joint phase 2).
- Artificial defects: Eq. 1 (full replacement) with Perlin masks (DRAEM recipe) and natural
  images from `defects.source` (a folder such as DTD/ImageNet; offline the procedural source).
  Phase 1 always pastes (Eq. 2 needs the pair); phase 2 pastes with probability
  `phase2_p_defect` = 0.5 so the segmentation head also sees good images.
- Perceptual loss: VGG-16 (first five ReLU stages, i.e. timm's feature stages) when its weights
  are available (file or hub), else the offline `tf_efficientnet_lite0`; the saved config's
  provenance says which. It is only needed for training.
- Reference image: the training image whose pooled deep feature (perceptual network) is closest
  to the mean of all training images' features: the most typical good image. Kept in the weights.
- `references` > 1 (*extension*, not in the paper): one fixed reference cannot stand for a category
  whose good parts differ from one another (magnetic tile: several tile types, lightings and
  orientations), and RBFRM can only rebuild a patch from content the reference has. Then the typical
  image is joined by further training images chosen by farthest-point sampling on the same
  perceptual features, and each image is repaired with the reference nearest to it (pooled layer-5
  encoder feature; a training image never with itself). 1 (default) is the paper's design.
- Batch size 4 (the authors' lab convention; the paper does not say).
- Checkpoint selection: every `select_every` phase-2 epochs the model is scored on the validation
  data when it holds defective images (our synthetic validation bank: mean of image and pixel
  AUROC) and the best state is kept. Never on the test set (the lab's code selects on test).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ad_models.backbones import FeatureExtractor, first_available_network
from ad_models.defects import DefectConfig, DefectSynthesizer
from ad_models.data.loading import image_shape
from ad_models.methods.base import (AnomalyMethod, CheckpointSelection, TrainingImages, autocast,
                                    check_input_geometry, images_in_memory, model_input, optimizer_step,
                                    resolve_device, seed_everything, step_phase, top_k_mean)

PERCEPTUAL_NETWORKS = {  # name -> backbone; "auto" tries VGG-16 first, then the offline network
    "vgg16": {"name": "vgg16.tv_in1k", "out_indices": (0, 1, 2, 3, 4)},
    "efficientnet_lite0": {"name": "tf_efficientnet_lite0", "out_indices": (0, 1, 2, 3, 4)},
}


@dataclass
class NDPNetConfig:
    image_size: int | tuple[int, int] = 256  # paper: 256 x 256; or [height, width]
    resize: str = "stretch"  # or "keep_aspect", "tiles" (loading.RESIZE_POLICIES)
    widths: tuple[int, ...] = (32, 64, 128, 256, 256)  # inferred: the paper gives no widths
    patch_sizes: tuple[int, ...] = (2, 4)  # RBFRM's K
    ffm_kernel: int = 5  # m
    ffm_channels: int = 64
    repair_temperature: float = 1.0  # softmax(S / t); 1 = Eq. 4 as printed
    phase1_epochs: int = 400
    phase2_epochs: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-5
    w_rec: float = 100.0  # w_rec^1 = w_rec^2
    w_per: float = 1.0
    w_def_per: float = 1.0
    w_fea_rep: float = 1.0
    w_seg: float = 1.0
    focal_gamma: float = 2.0
    scale_weights: tuple[float, ...] = (0.2, 0.2, 0.6)  # lambda_1..3 of Eq. 11
    smoothing: int = 5  # 5 x 5 median then mean filter at test time
    perceptual: str = "auto"  # "auto", "vgg16", "efficientnet_lite0", or a backbone dict
    defects: dict = field(default_factory=lambda: {"masks": {"perlin": 1.0}, "source": "procedural",
                                                   "blend": "replace", "p_defect": 1.0})
    phase2_p_defect: float = 0.5
    references: int = 1  # reference images; 1 = the paper's one typical image, k > 1: the nearest of k
    select_every: int = 10  # phase-2 epochs between checkpoint scorings on the validation bank
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU

    def __post_init__(self):
        if len(self.widths) != 5:
            raise ValueError(f"widths: the encoder has five layers, got {list(self.widths)}")
        multiple = 16 * max(self.patch_sizes)  # layer 5 (1/16) must split into K x K patches
        check_input_geometry(self, "ndpnet", multiple, f"1/16 resolution split into {max(self.patch_sizes)} x "
                                                      f"{max(self.patch_sizes)} patches")
        if self.ffm_kernel <= max(self.patch_sizes):
            raise ValueError("ffm_kernel m must be larger than the largest patch size K (paper Sec. III-C2)")
        if len(self.scale_weights) != 3:
            raise ValueError("scale_weights: one weight per MSDSM scale (3)")
        if min(self.phase1_epochs, self.phase2_epochs, self.batch_size, self.references) < 1:
            raise ValueError("phase1_epochs, phase2_epochs, batch_size and references must be at least 1")
        DefectConfig.from_dict(self.defects)  # fail early on a bad defects config


# ----------------------------------------------------------------------------------- networks

def _cbr(cin: int, cout: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_cbr(cin, cout), *_cbr(cout, cout))


class Encoder(nn.Module):
    """Five layers: full resolution, then 1/2 ... 1/16 (2x2 max-pool before each)."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        cins = (3,) + tuple(widths[:-1])
        self.layers = nn.ModuleList(double_conv(cin, cout) for cin, cout in zip(cins, widths))

    def forward(self, x: torch.Tensor, upto: int = 5) -> list[torch.Tensor]:
        features = []
        for i, layer in enumerate(self.layers[:upto]):
            x = layer(x if i == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features


def to_patches(f: torch.Tensor, k: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/k)(W/k), C*k*k] non-overlapping k x k patches."""
    return F.unfold(f, k, stride=k).transpose(1, 2)


def from_patches(p: torch.Tensor, k: int, shape: torch.Size) -> torch.Tensor:
    return F.fold(p.transpose(1, 2), shape[-2:], k, stride=k)


def reference_repair(f: torch.Tensor, ref: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """RBFRM (Eqs. 3-5): each k x k patch of `f` becomes a softmax(cosine)-weighted sum of the
    reference's patches. f [B, C, H, W], ref [1 or B, C, H, W] (one reference per image)."""
    p, b = to_patches(f, k), to_patches(ref, k)
    similarity = F.normalize(p, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)  # [B, N, N_ref]
    repaired = (similarity / temperature).softmax(-1) @ b
    return from_patches(repaired, k, f.shape)


class RBAM(nn.Module):
    """Reference-based attention at one layer: RBFRM for each K, fused with the input by FFM."""

    def __init__(self, channels: int, patch_sizes: tuple[int, ...], kernel: int, hidden: int,
                 temperature: float):
        super().__init__()
        self.patch_sizes, self.temperature = tuple(patch_sizes), temperature
        self.compress = nn.Sequential(*_cbr(channels, hidden, kernel))
        # one attention map per candidate: the input itself, then each repaired version
        self.attend = nn.ModuleList(nn.Conv2d(hidden, channels, kernel, padding=kernel // 2)
                                    for _ in range(len(self.patch_sizes) + 1))

    def forward(self, f: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        candidates = [f] + [reference_repair(f, ref, k, self.temperature) for k in self.patch_sizes]
        fused = self.compress(torch.stack(candidates).sum(0))  # Eq. 6, then the m x m compression
        weights = torch.stack([conv(fused) for conv in self.attend]).softmax(0)  # Eq. 7
        return (weights * torch.stack(candidates)).sum(0)  # Eq. 8


class Decoder(nn.Module):
    """From layer-5 features back to an RGB image, with skips from layers 4 and 3."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.up4 = double_conv(w5 + w4, w4)
        self.up3 = double_conv(w4 + w3, w3)
        self.up2 = double_conv(w3, w2)
        self.up1 = double_conv(w2, w1)
        self.out = nn.Conv2d(w1, 3, 1)

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, f3: torch.Tensor, f4: torch.Tensor, f5: torch.Tensor) -> torch.Tensor:
        x = self.up4(torch.cat([self._up(f5), f4], 1))
        x = self.up3(torch.cat([self._up(x), f3], 1))
        x = self.up1(self._up(self.up2(self._up(x))))
        return torch.sigmoid(self.out(x))


class MSDSM(nn.Module):
    """One small segmentation network per scale over concat(E_l(x), E_l(x_hat)), l = 1..3."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(*_cbr(2 * w, w), *_cbr(w, w), nn.Conv2d(w, 2, 1))
                                   for w in widths[:3])

    def forward(self, fx: list[torch.Tensor], fr: list[torch.Tensor]) -> list[torch.Tensor]:
        return [head(torch.cat([a, b], 1)) for head, a, b in zip(self.heads, fx, fr)]


class NDPNetwork(nn.Module):
    def __init__(self, cfg: NDPNetConfig):
        super().__init__()
        self.encoder = Encoder(cfg.widths)
        self.rbams = nn.ModuleList(RBAM(w, cfg.patch_sizes, cfg.ffm_kernel, cfg.ffm_channels,
                                        cfg.repair_temperature) for w in cfg.widths[2:])
        self.decoder = Decoder(cfg.widths)
        self.msdsm = MSDSM(cfg.widths)
        self.register_buffer("reference", torch.zeros(cfg.references, 3, *image_shape(cfg.image_size)))

    def repair(self, features: list[torch.Tensor], ref_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """RBAM outputs at layers 3-5."""
        return [rbam(f, r) for rbam, f, r in zip(self.rbams, features[2:], ref_features[2:])]

    def segment(self, features: list[torch.Tensor], reconstruction: torch.Tensor) -> list[torch.Tensor]:
        """MSDSM logits at layers 1-3 from the input's features and the reconstruction's."""
        return self.msdsm(features[:3], self.encoder(reconstruction, upto=3))


# ------------------------------------------------------------------------------------- losses

def defect_perception_loss(f_good: list[torch.Tensor], f_defect: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Eq. 2: the channel-mean squared feature difference, min-max normalised per image, should
    equal the defect mask at every encoder layer."""
    losses = []
    for a, b in zip(f_good, f_defect):
        diff = (a - b).pow(2).mean(1, keepdim=True)
        lo = diff.amin((2, 3), keepdim=True)
        hi = diff.amax((2, 3), keepdim=True)
        normalised = (diff - lo) / (hi - lo + 1e-8)
        target = F.interpolate(mask, size=diff.shape[-2:], mode="area")
        losses.append(F.mse_loss(normalised, target))
    return torch.stack(losses).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on a 2-class softmax with a soft target in [0, 1] (DRAEM's variant, alpha = 1)."""
    target = F.interpolate(target, size=logits.shape[-2:], mode="area")
    one_hot = torch.cat([1 - target, target], 1).clamp(smooth, 1 - smooth)
    pt = (one_hot * logits.float().softmax(1)).sum(1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def perceptual_loss(net: FeatureExtractor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eqs. 13/16: mean over the network's five stages of the L1 feature distance."""
    with torch.no_grad():
        fa = net(a)
    return torch.stack([F.l1_loss(y, x) for x, y in zip(fa, net(b))]).mean()


def optimise(optimizer: torch.optim.Optimizer, weights: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """One step on the weighted sum of `losses`; returns them detached (on the device: no sync) for the log."""
    optimizer_step(optimizer, (weights * losses.float()).sum())
    return losses.detach().float()


def smooth_map(maps: torch.Tensor, size: int) -> torch.Tensor:
    """size x size median filter, then size x size mean filter (paper Sec. III-D); [B, H, W].

    The paper names both filters but not their order (inferred): the median first removes isolated
    hot pixels, which a mean filter applied first would spread into a plateau the median keeps."""
    pad = size // 2
    windows = F.unfold(F.pad(maps[:, None], (pad,) * 4, mode="replicate"), size)  # [B, size*size, H*W]
    median = windows.median(1).values.view(maps.shape[0], 1, *maps.shape[1:])
    return F.avg_pool2d(F.pad(median, (pad,) * 4, mode="replicate"), size, stride=1)[:, 0]


# ------------------------------------------------------------------------------------- method

class NDPNet(AnomalyMethod):
    name = "ndpnet"
    Config = NDPNetConfig

    def __init__(self, config: NDPNetConfig | dict | None = None, pretrained_backbones: bool = True):
        super().__init__(config, pretrained_backbones)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial network
            torch.manual_seed(self.config.seed)
            self.net = NDPNetwork(self.config)
        self._ref_features: list[torch.Tensor] | None = None
        self._ref_keys: torch.Tensor | None = None
        self.reference_paths: list[str] = []

    # -- the pieces of a forward pass ---------------------------------------------------------
    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return model_input(images, self.config.image_size, self.device)

    def _reference_features(self) -> list[torch.Tensor]:
        """The references' features at the RBAM layers 3-5 (None at 1-2, which are not repaired);
        also their keys for the nearest-reference lookup (pooled layer 5)."""
        if self._ref_features is None:  # the encoder is frozen from phase 2 on: compute once
            with torch.no_grad():
                chunks = [self.net.encoder(chunk) for chunk in self.net.reference.split(8)]
                self._ref_features = [None, None] + [torch.cat([c[level] for c in chunks])
                                                     for level in range(2, 5)]
                self._ref_keys = self._ref_features[-1].float().mean((2, 3))
        return self._ref_features

    def _reconstruct(self, features: list[torch.Tensor],
                     own_reference: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Repair and decode. With several references each image uses its nearest one;
        `own_reference` [B, k] marks the references that are the image itself (training)."""
        references = self._reference_features()
        if len(self.net.reference) > 1:
            distance = torch.cdist(features[-1].float().mean((2, 3)), self._ref_keys)
            if own_reference is not None:
                distance = distance.masked_fill(own_reference, float("inf"))
            nearest = distance.argmin(1)
            references = [None if r is None else r[nearest] for r in references]
        repaired = self.net.repair(features, references)
        return self.net.decoder(*repaired), repaired

    def _fuse(self, logits: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Eq. 11 on the defect probabilities; every scale resized to the input size."""
        maps = [F.interpolate(x.float().softmax(1)[:, 1:], size=size, mode="bilinear", align_corners=False)
                for x in logits]
        return sum(w * m for w, m in zip(self.config.scale_weights, maps))[:, 0]

    # -- training -----------------------------------------------------------------------------
    def _perceptual_network(self) -> FeatureExtractor:
        """Only training needs it, so it is not part of the saved weights."""
        _, net, provenance = first_available_network(self.config.perceptual, PERCEPTUAL_NETWORKS, "perceptual")
        self.provenance.update(provenance)
        return net

    @torch.no_grad()
    def _choose_references(self, images: torch.Tensor, perceptual: FeatureExtractor) -> list[int]:
        """Indices of the references: the most typical image (pooled deepest feature closest to
        the mean one), then farthest-point sampling in the same space up to `references`."""
        pooled = torch.cat([perceptual(self._resize(chunk.float() / 255))[-1].float().mean((2, 3))
                            for chunk in images.split(16)])
        chosen = [int((pooled - pooled.mean(0)).norm(dim=1).argmin())]
        nearest = (pooled - pooled[chosen[0]]).norm(dim=1)
        while len(chosen) < min(self.config.references, len(images)):
            chosen.append(int(nearest.argmax()))
            nearest = torch.minimum(nearest, (pooled - pooled[chosen[-1]]).norm(dim=1))
        return chosen

    def _batches(self, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        return list(torch.randperm(n, generator=generator).split(self.config.batch_size))

    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        self.to(resolve_device(device))
        generator = seed_everything(cfg.seed)
        start = time.perf_counter()
        images = TrainingImages(images_in_memory(train, self._resize), self.device)
        n = len(images)
        perceptual = self._perceptual_network().to(self.device)
        chosen = self._choose_references(images.data, perceptual)
        if len(chosen) < cfg.references:
            raise ValueError(f"references: {cfg.references} reference images asked for, but only "
                             f"{n} training images")
        self.net.reference.copy_(images.batch(torch.tensor(chosen)))
        self.reference_paths = [str(train[i].get("path", i)) for i in chosen]
        reference_index = torch.tensor(chosen, device=self.device)
        phase1_defects = DefectSynthesizer(DefectConfig.from_dict({**cfg.defects, "p_defect": 1.0}))
        phase2_defects = DefectSynthesizer(DefectConfig.from_dict({**cfg.defects, "p_defect": cfg.phase2_p_defect}))

        def weights(*w: float) -> torch.Tensor:
            return torch.tensor(w, device=self.device)

        # phase 1: encoder + decoder; reconstruction, perceptual, defect perception (Eq. 14)
        params = list(self.net.encoder.parameters()) + list(self.net.decoder.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.net.train()
        phase1: list[list[float]] = []
        bar = tqdm(range(cfg.phase1_epochs), desc="ndpnet: phase 1", disable=not progress, leave=False)
        for _ in bar:
            totals = torch.zeros(3, device=self.device)
            for idx in (steps := self._batches(n, generator)):
                with step_phase("data"):
                    good = images.batch(idx)
                    defective, mask = phase1_defects(good, generator)
                with step_phase("forward"), autocast(self.device, cfg.amp):
                    f_good = self.net.encoder(good)
                    f_defect = self.net.encoder(defective)
                    rebuilt = self.net.decoder(*f_good[2:]).float()
                    losses = torch.stack([F.mse_loss(rebuilt, good), perceptual_loss(perceptual, good, rebuilt),
                                          defect_perception_loss(f_good, f_defect, mask)])
                totals += optimise(optimizer, weights(cfg.w_rec, cfg.w_per, cfg.w_def_per), losses)
            with step_phase("log"):
                phase1.append((totals / len(steps)).tolist())
                bar.set_postfix(rec=f"{phase1[-1][0]:.4f}", def_per=f"{phase1[-1][2]:.4f}")

        # phase 2: frozen encoder (eval: its BN statistics stay as phase 1 left them)
        self.net.encoder.requires_grad_(False).eval()
        self._ref_features = None
        trained = [self.net.rbams, self.net.decoder, self.net.msdsm]
        optimizer = torch.optim.Adam([p for m in trained for p in m.parameters()], lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        for module in trained:
            module.train()
        selection = CheckpointSelection(self, valid, trained, cfg.batch_size)
        phase2: list[list[float]] = []
        bar = tqdm(range(cfg.phase2_epochs), desc="ndpnet: phase 2", disable=not progress, leave=False)
        for epoch in bar:
            totals = torch.zeros(4, device=self.device)
            for idx in (steps := self._batches(n, generator)):
                with step_phase("data"):
                    good = images.batch(idx)
                    defective, mask = phase2_defects(good, generator)
                with step_phase("forward"), autocast(self.device, cfg.amp):
                    with torch.no_grad():
                        f_good = self.net.encoder(good)
                        f_defect = self.net.encoder(defective)
                    rebuilt, repaired = self._reconstruct(f_defect, idx.to(self.device)[:, None] == reference_index)
                    logits = self.net.segment(f_defect, rebuilt)
                    rebuilt = rebuilt.float()
                    losses = torch.stack([
                        F.mse_loss(rebuilt, good), perceptual_loss(perceptual, good, rebuilt),
                        torch.stack([F.mse_loss(r.float(), g.float()) for r, g in zip(repaired, f_good[2:])]).mean(),
                        torch.stack([focal_loss(x, mask, cfg.focal_gamma) for x in logits]).mean()])
                totals += optimise(optimizer, weights(cfg.w_rec, cfg.w_per, cfg.w_fea_rep, cfg.w_seg), losses)
            with step_phase("log"):
                phase2.append((totals / len(steps)).tolist())
                bar.set_postfix(rec=f"{phase2[-1][0]:.4f}", seg=f"{phase2[-1][3]:.4f}")
            last = epoch + 1 == cfg.phase2_epochs
            if selection.enabled and ((epoch + 1) % cfg.select_every == 0 or last):
                selection.consider(epoch + 1)
                for module in trained:
                    module.train()
        selection.restore()
        self.net.eval()
        return {"phase1_epochs": cfg.phase1_epochs, "phase2_epochs": cfg.phase2_epochs, "train_images": n,
                "train_seconds": time.perf_counter() - start, "device": str(self.device),
                "loss_names": {"phase1": ["rec", "per", "def_per"], "phase2": ["rec", "per", "fea_rep", "seg"]},
                "loss_columns": ["w_rec rec", "w_per per", "def_per (phase 1) / fea_rep + seg (phase 2)"],
                "phase1_losses": phase1, "phase2_losses": phase2,
                "loss_per_epoch": [[cfg.w_rec * a, cfg.w_per * b, cfg.w_def_per * c] for a, b, c in phase1]
                + [[cfg.w_rec * a, cfg.w_per * b, cfg.w_fea_rep * c + cfg.w_seg * d] for a, b, c, d in phase2],
                "final_loss": float(np.dot([cfg.w_rec, cfg.w_per, cfg.w_fea_rep, cfg.w_seg], phase2[-1])),
                "reference_image": self.reference_paths[0], "reference_images": self.reference_paths,
                **selection.summary(cfg.phase2_epochs)}

    # -- persistence ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"reference_paths": self.reference_paths}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.reference_paths = state.get("reference_paths") or [state.get("reference_path", "")]
        self._ref_features = None

    def to(self, device: torch.device) -> "NDPNet":
        super().to(device)
        self._ref_features = None
        return self

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        height, width = images.shape[-2:]
        x = self._resize(images)
        with autocast(self.device, self.config.amp):
            features = self.net.encoder(x)
            rebuilt, _ = self._reconstruct(features)
            logits = self.net.segment(features, rebuilt)
        maps = smooth_map(self._fuse(logits, x.shape[-2:]), self.config.smoothing)
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return top_k_mean(maps, 1, valid), maps
