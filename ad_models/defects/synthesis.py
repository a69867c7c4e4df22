"""DefectConfig (plain data) and DefectSynthesizer (images -> defective images + masks).

    synth = DefectSynthesizer(DefectConfig(masks={"perlin": 1.0}, source="procedural", blend="replace"))
    defective, masks = synth(images, generator)   # [B, 3, H, W] in [0, 1]; CPU torch.Generator

Order of the random draws for one call, all from `generator`: who gets a defect; then, for those,
the mask kinds and masks (redrawn where too small), the source images, their augmentation and the
betas; or, for CutPaste, the patch geometries and the colour jitter. Only the CPU generator is
used, so a seed gives the same draws on every device: identical results on the CPU, equal up to
float rounding on a GPU (where a rounding difference in a mask's size can, rarely, change the
number of redraws and so everything drawn after it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ad_models.defects.blend import blend_beta, blend_replace, cutpaste
from ad_models.defects.masks import (_check_generator, _fallback_square, _perlin_masks, _rectangle_masks,
                                     _stroke_masks, _uniform, foreground_mask)
from ad_models.defects.sources import (AUGMENTATIONS, REARRANGEMENTS, FolderSource, ProceduralSource, augment,
                                      rearrange)

MASK_KINDS = ("perlin", "rectangle", "stroke")
BLENDS = ("replace", "beta", "cutpaste", "cutpaste_scar")
CUTPASTE_BLENDS = ("cutpaste", "cutpaste_scar")
BUILTIN_SOURCES = ("procedural", "self", "rearranged")
MAX_TRIES = 10  # redraws of a too-small mask before the fallback square
FALLBACK_FRACTION = 0.01  # the fallback square covers at least this share of the image


@dataclass
class DefectConfig:
    """What artificial defects to make. Plain data: `from_dict` / `to_dict` round-trip through JSON."""

    masks: dict = field(default_factory=lambda: {"perlin": 1.0})  # kind -> sampling weight (MASK_KINDS)
    source: str = "procedural"  # "procedural", "self" (the CutPaste blends), "rearranged" or a folder of images
    blend: str = "replace"  # BLENDS; the CutPaste blends make their own masks and ignore `masks`
    beta_range: tuple[float, float] = (0.0, 0.8)  # blend="beta": DRAEM's U(0, 0.8) share of the image kept
    p_defect: float = 0.5  # probability that an image gets a defect at all (DRAEM: 0.5)
    augment_ops: int = 3  # DRAEM's photometric ops on the source (not used by the CutPaste blends)
    foreground: bool = False  # keep defects on the estimated object (plain-background object categories)
    perlin_scale_exponents: tuple[int, int] = (0, 6)  # lattice 2^a x 2^b, a, b in [lo, hi)
    perlin_threshold: float = 0.5
    min_mask_fraction: float = 0.001  # a requested defect covers at least this share of the pixels
    # source="rearranged": the images' own content out of place (sources.rearrange), kind -> weight
    rearrange: dict = field(default_factory=lambda: {"grid_shuffle": 1.0})
    shuffle_grid: tuple[int, int] = (4, 8)  # rows x cols of the grid shuffle (SLSG's default)

    def __post_init__(self):
        # JSON turns tuples into lists; take them back so that configs compare equal
        for name in ("beta_range", "perlin_scale_exponents", "shuffle_grid"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad option and its valid values."""
        if not isinstance(self.masks, dict) or not self.masks:
            raise ValueError(f"masks must be a non-empty dict kind -> weight with kinds from {list(MASK_KINDS)}, "
                             f"got {self.masks!r}")
        unknown = sorted(set(self.masks) - set(MASK_KINDS))
        if unknown:
            raise ValueError(f"masks: unknown kind(s) {unknown}; valid kinds: {list(MASK_KINDS)}")
        weights = list(self.masks.values())
        if not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"masks: weights must be finite numbers >= 0, not all 0, got {self.masks!r}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {list(BLENDS)}, got {self.blend!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must be 'procedural', 'self' or a folder path (a string), got {self.source!r}")
        if (self.source == "self") != (self.blend in CUTPASTE_BLENDS):
            raise ValueError(f"source='self' goes with the CutPaste blends {list(CUTPASTE_BLENDS)} and only with "
                             f"them (they take their patch from the image itself); got source={self.source!r} "
                             f"with blend={self.blend!r}")
        lo_hi = self.beta_range
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2 or not all(_is_number(b) for b in lo_hi)
                or not 0 <= lo_hi[0] <= lo_hi[1] <= 1):
            raise ValueError(f"beta_range must be (lo, hi) with 0 <= lo <= hi <= 1, got {lo_hi!r}")
        if not _is_number(self.p_defect) or not 0 <= self.p_defect <= 1:
            raise ValueError(f"p_defect must be a probability in [0, 1], got {self.p_defect!r}")
        if not _is_int(self.augment_ops) or not 0 <= self.augment_ops <= len(AUGMENTATIONS):
            raise ValueError(f"augment_ops must be an int in [0, {len(AUGMENTATIONS)}] (ops out of "
                             f"{list(AUGMENTATIONS)}), got {self.augment_ops!r}")
        if not isinstance(self.foreground, bool):
            raise ValueError(f"foreground must be True or False, got {self.foreground!r}")
        e = self.perlin_scale_exponents
        if not isinstance(e, tuple) or len(e) != 2 or not all(_is_int(v) for v in e) or not 0 <= e[0] < e[1] <= 10:
            raise ValueError(f"perlin_scale_exponents must be ints (lo, hi) with 0 <= lo < hi <= 10 "
                             f"(lattice 2^a, a in [lo, hi)), got {e!r}")
        if not _is_number(self.perlin_threshold) or not -1 < self.perlin_threshold < 1:
            raise ValueError(f"perlin_threshold must be in (-1, 1) (the noise's range), got {self.perlin_threshold!r}")
        if not _is_number(self.min_mask_fraction) or not 0 <= self.min_mask_fraction <= 0.5:
            raise ValueError(f"min_mask_fraction must be in [0, 0.5], got {self.min_mask_fraction!r}")
        r = self.rearrange
        if (not isinstance(r, dict) or not r or set(r) - set(REARRANGEMENTS)
                or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in r.values()) or sum(r.values()) <= 0):
            raise ValueError(f"rearrange must be a dict kind -> weight >= 0 (not all 0) with kinds from "
                             f"{list(REARRANGEMENTS)}, got {r!r}")
        g = self.shuffle_grid
        if not isinstance(g, tuple) or len(g) != 2 or not all(_is_int(v) and v >= 1 for v in g) or g == (1, 1):
            raise ValueError(f"shuffle_grid must be (rows, cols), ints >= 1 and not (1, 1), got {g!r}")

    @classmethod
    def from_dict(cls, values: "DefectConfig | dict[str, Any] | None") -> "DefectConfig":
        """Plain data -> config; unknown keys are rejected with the valid ones listed."""
        if isinstance(values, DefectConfig):
            return dataclasses.replace(values)
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"DefectConfig.from_dict takes a dict, got {type(values).__name__}")
        values = dict(values or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"DefectConfig: unknown option(s) {unknown}; valid options: {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able plain data (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["masks"] = {str(k): float(v) for k, v in self.masks.items()}
        d["beta_range"] = [float(v) for v in self.beta_range]
        d["perlin_scale_exponents"] = [int(v) for v in self.perlin_scale_exponents]
        d["rearrange"] = {str(k): float(v) for k, v in self.rearrange.items()}
        d["shuffle_grid"] = [int(v) for v in self.shuffle_grid]
        return d


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_source(source: str):
    """The source object a config's `source` names; None for "self" and "rearranged" (made from
    the images themselves)."""
    if source == "procedural":
        return ProceduralSource()
    if source in ("self", "rearranged"):
        return None
    return FolderSource(source)


class DefectSynthesizer:
    """Adds artificial defects to a batch: `defective, masks = synth(images, generator)`.

    images [B, 3, H, W] float in [0, 1] on any device; generator a CPU torch.Generator (None: torch's
    default one). Returns defective images (same device and dtype) and masks [B, 1, H, W] float32 in
    {0, 1}. An image gets a defect with probability `p_defect`; the others come back unchanged with
    an empty mask. A requested defect's mask covers at least max(1 pixel, min_mask_fraction) of
    the image (and of its foreground when `foreground`): too-small masks are redrawn up to
    MAX_TRIES times, then replaced by a small square. Pixels outside the mask are never changed.
    """

    def __init__(self, config: DefectConfig | dict[str, Any] | None = None):
        self.config = DefectConfig.from_dict(config)
        self.config.validate()
        self.source = make_source(self.config.source)  # a folder is checked here: missing/empty fails now
        kinds = [k for k in MASK_KINDS if self.config.masks.get(k, 0) > 0]
        self._kinds = kinds
        self._weights = torch.tensor([float(self.config.masks[k]) for k in kinds], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"DefectSynthesizer({self.config!r})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        generator = _check_generator(torch.default_generator if generator is None else generator)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, 3, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        cfg = self.config
        b, _, height, width = images.shape
        defective = images.clone()
        masks = torch.zeros(b, 1, height, width, device=images.device)
        chosen = (_uniform(generator, b) < cfg.p_defect).nonzero().flatten()
        if len(chosen) == 0:
            return defective, masks
        d = chosen.to(images.device)
        x = images[d].float()
        region = foreground_mask(x) if cfg.foreground else None
        if cfg.blend in CUTPASTE_BLENDS:
            out, m = cutpaste(x, generator, scar=cfg.blend == "cutpaste_scar", region=region,
                              min_fraction=cfg.min_mask_fraction, tries=MAX_TRIES)
        else:
            m = self.draw_masks(len(d), height, width, generator, region, images.device)[:, None]
            if cfg.source == "rearranged":  # from the whole batch: "other_image" may pick any image
                src = rearrange(images.float(), generator, cfg.rearrange, cfg.shuffle_grid)[d]
            else:
                src = self.source.sample(len(d), height, width, generator, images.device)
            src = augment(src, generator, cfg.augment_ops)
            if cfg.blend == "beta":
                lo, hi = cfg.beta_range
                out = blend_beta(x, src, m, _uniform(generator, len(d), low=lo, high=hi))
            else:
                out = blend_replace(x, src, m)
            m = m.float()
        defective[d] = out.clamp(0, 1).to(images.dtype)
        masks[d] = m
        return defective, masks

    def draw_masks(self, n: int, height: int, width: int, generator: torch.Generator,
                   region: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """n masks [n, H, W] bool of the configured kinds (drawn by weight), inside `region` [n, H, W]
        bool when given, each covering at least max(1, min_mask_fraction x H x W) pixels (or all of a
        region smaller than that)."""
        cfg = self.config
        device = torch.device(device or "cpu")
        if len(self._kinds) == 1:
            kinds = torch.zeros(n, dtype=torch.long)
        else:
            kinds = torch.multinomial(self._weights, n, replacement=True, generator=generator)
        need = max(1, math.ceil(cfg.min_mask_fraction * height * width))
        out = torch.zeros(n, height, width, dtype=torch.bool, device=device)
        todo = torch.ones(n, dtype=torch.bool)
        for _ in range(MAX_TRIES):
            for k, kind in enumerate(self._kinds):
                idx = ((kinds == k) & todo).nonzero().flatten()
                if len(idx):
                    out[idx.to(device)] = self._draw(kind, idx, height, width, generator, region, device)
            todo = (out.sum((1, 2)) < need).cpu()
            if not todo.any():
                return out
        idx = todo.nonzero().flatten()
        d = idx.to(device)
        area = torch.ones_like(out[d]) if region is None else region[d]
        out[d] = _fallback_square(area, max(need, math.ceil(FALLBACK_FRACTION * height * width)), generator)[0]
        return out

    def _draw(self, kind: str, idx: torch.Tensor, height: int, width: int, generator: torch.Generator,
              region: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        cfg = self.config
        sub = None if region is None else region[idx.to(region.device)]
        if kind == "perlin":
            m = _perlin_masks(len(idx), height, width, generator, device, cfg.perlin_threshold,
                              cfg.perlin_scale_exponents)
            return m if sub is None else m & sub
        if kind == "rectangle":
            return _rectangle_masks(len(idx), height, width, generator, device, sub)
        return _stroke_masks(len(idx), height, width, generator, device, sub)


class DefectMixture:
    """Several kinds of defect, one kind per image drawn by weight (SLSG's texture and scar modes):

        mix = DefectMixture({"texture": (0.4, texture_config), "scar": (0.6, scar_config)})
        defective, masks = mix(images, generator)

    Same contract as DefectSynthesizer; each kind's synthesizer sees only the images drawn for it.
    """

    def __init__(self, kinds: dict[str, tuple[float, DefectConfig | dict[str, Any]]]):
        if not kinds:
            raise ValueError("DefectMixture needs at least one kind of defect")
        weights = [w for w, _ in kinds.values()]
        if not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"DefectMixture: weights must be finite numbers >= 0, not all 0, got {weights}")
        self.names = list(kinds)
        self.synthesizers = [DefectSynthesizer(config) for _, config in kinds.values()]
        self._weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"DefectMixture({dict(zip(self.names, self.synthesizers))!r})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        generator = _check_generator(torch.default_generator if generator is None else generator)
        kinds = torch.multinomial(self._weights, len(images), replacement=True, generator=generator)
        defective = images.clone()
        masks = torch.zeros(len(images), 1, *images.shape[-2:], device=images.device)
        for k, synth in enumerate(self.synthesizers):
            idx = (kinds == k).nonzero().flatten()
            if len(idx):
                d = idx.to(images.device)
                defective[d], masks[d] = synth(images[d], generator)
        return defective, masks
