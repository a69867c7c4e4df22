"""PEFM: Position Encoding enhanced Feature Mapping (Wan et al., IEEE CASE 2022).

PFM (see `pfm.py`) with a fixed 2-D sinusoidal position encoding added to the L2-normalised inputs
of every projector, so the mapping can depend on where in the image a feature is: this helps
aligned objects. Settings of the authors' logged runs: latent widths [200, 400, 800] for the ResNet
pair (ratio 0.625 of Cs + Ct at every level), lr 3e-4 at every level, batch 16.

As in the official code, the encoding (entries in [-1, 1]) is much larger than the unit-norm
features it is added to (entries about 1/sqrt(C)); we keep that to reproduce the method. Unlike the
official code, the encoding is computed for whatever feature size the input gives (the official
one supports only 128/192/256/512 px) and on whatever device the model is (it was CUDA-only).
"""
from __future__ import annotations

from dataclasses import dataclass

from ad_models.methods.pfm import PFM, PFMConfig


@dataclass
class PEFMConfig(PFMConfig):
    latent_ratios: tuple[float, ...] = (0.625, 0.625, 0.625)  # -> [200, 400, 800] as logged
    lrs: tuple[float, ...] = (3e-4, 3e-4, 3e-4)
    batch_size: int = 16
    position_encoding: bool = True


class PEFM(PFM):
    name = "pefm"
    Config = PEFMConfig
