"""The trivial baseline every method must beat: distance of each pixel from the mean good image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ad_models.data.loading import image_shape
from ad_models.methods.base import (AnomalyMethod, check_input_geometry, image_batches, resolve_device, timed,
                                    top_k_mean)


@dataclass
class MeanImageConfig:
    image_size: int | tuple[int, int] = 256  # or [height, width]
    resize: str = "stretch"  # or "keep_aspect", "tiles" (loading.RESIZE_POLICIES)

    def __post_init__(self):
        check_input_geometry(self, "mean_image")


class MeanImage(AnomalyMethod):
    """Anomaly map = Euclidean colour distance to the per-pixel mean of the good training images."""

    name = "mean_image"
    Config = MeanImageConfig

    def __init__(self, config: MeanImageConfig | dict | None = None, pretrained_backbones: bool = True):
        super().__init__(config, pretrained_backbones)
        self.net = nn.Module()
        self.net.register_buffer("mean", torch.zeros(1, 3, *image_shape(self.config.image_size)))

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        size = image_shape(self.config.image_size)
        images = images.to(self.device).float()
        return images if images.shape[-2:] == size else F.interpolate(images, size=size, mode="bilinear",
                                                                      align_corners=False, antialias=True)

    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        self.to(resolve_device(device))
        with timed() as t:
            total = torch.zeros_like(self.net.mean)
            for batch in image_batches(train, 16):
                total += self._resize(batch["image"]).sum(0, keepdim=True)
            self.net.mean.copy_(total / len(train))
        return {"train_images": len(train), "train_seconds": t["seconds"]}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        maps = (self._resize(images) - self.net.mean).pow(2).sum(1).sqrt()
        maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return top_k_mean(maps, 1, valid), maps
