"""How a defect is put in: full replacement, DRAEM's beta blending, and CutPaste's pasted patches.

All functions take images [n, 3, H, W] in [0, 1] and masks [n, H, W] or [n, 1, H, W] (bool or
{0, 1}); pixels outside a mask come back bit-identical.
"""
from __future__ import annotations

import math

import torch

from ad_models.defects.masks import _check_generator, _fallback_square, _uniform, random_points
from ad_models.defects.sources import color_jitter


def _mask4(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    masks = masks if masks.dim() == 4 else masks[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    return masks.to(images.device).bool()


def blend_replace(images: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x * (1 - M) + src * M (NDP-Net's Eq. 1): the source replaces the image inside the mask."""
    return torch.where(_mask4(masks, images), sources.to(images.dtype), images)


def blend_beta(images: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """DRAEM: inside the mask (1 - beta) * src + beta * x, beta [n] per image (DRAEM draws U(0, 0.8))."""
    beta = beta.to(images.device, images.dtype).view(-1, 1, 1, 1)
    mixed = (1 - beta) * sources.to(images.dtype) + beta * images
    return torch.where(_mask4(masks, images), mixed, images)


# CutPaste (Li et al. 2021) at 256 px: patches of 2-15 % of the image with aspect ratio in
# [0.3, 1/0.3]; scars 2-16 px wide, 10-25 px long, rotated by U(-45, 45) degrees. Scar sizes scale
# with the short side / 256 (inferred: the paper only gives them at 256 px).
PATCH_AREA, PATCH_ASPECT = (0.02, 0.15), (0.3, 1 / 0.3)
SCAR_WIDTH, SCAR_LENGTH, SCAR_ROTATION = (2.0, 16.0), (10.0, 25.0), 45.0


def cutpaste_geometry(n: int, height: int, width: int, generator: torch.Generator, scar: bool = False,
                      region: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random patch geometries, float64 CPU tensors [n]: size (h, w), source and destination
    centres (sy, sx, dy, dx) in pixels and rotation `angle` in radians.

    The source patch always lies inside the image. The destination does too, unless `region`
    ([n, H, W] bool) is given: then it is centred on a random point of the region. Unrotated
    patches have whole-pixel sizes and offsets, so pasting copies pixels exactly.
    """
    u = _uniform(generator, n, 6)
    if scar:
        scale = min(height, width) / 256
        w = (SCAR_WIDTH[0] + u[:, 0] * (SCAR_WIDTH[1] - SCAR_WIDTH[0])) * scale
        h = (SCAR_LENGTH[0] + u[:, 1] * (SCAR_LENGTH[1] - SCAR_LENGTH[0])) * scale
        h, w = h.clamp(1, height), w.clamp(1, width)
        angle = (u[:, 2] * 2 - 1) * SCAR_ROTATION * math.pi / 180
    else:
        pixels = (PATCH_AREA[0] + u[:, 0] * (PATCH_AREA[1] - PATCH_AREA[0])) * height * width
        lo, hi = math.log(PATCH_ASPECT[0]), math.log(PATCH_ASPECT[1])
        ratio = torch.exp(lo + u[:, 1] * (hi - lo))  # h / w
        h = (pixels / ratio).sqrt().round().clamp(1, height)
        w = (pixels * ratio).sqrt().round().clamp(1, width)
        angle = torch.zeros(n, dtype=torch.float64)
    # source: an axis-aligned crop inside the image; whole-pixel corner, so centre = corner + (size - 1) / 2
    sy = (u[:, 3] * (height - h.ceil() + 1)).floor() + (h - 1) / 2
    sx = (u[:, 4] * (width - w.ceil() + 1)).floor() + (w - 1) / 2
    if region is None:  # destination: the rotated patch's bounding box inside the image
        cos, sin = angle.cos().abs(), angle.sin().abs()
        ey, ex = cos * h + sin * w, sin * h + cos * w
        dy = (u[:, 5] * (height - ey.ceil() + 1).clamp(min=1)).floor() + (ey - 1) / 2
        dx = (_uniform(generator, n) * (width - ex.ceil() + 1).clamp(min=1)).floor() + (ex - 1) / 2
    else:
        py, px = random_points(region, generator)
        dy, dx = py.cpu().double() + (h - 1) / 2 - (h / 2).floor(), px.cpu().double() + (w - 1) / 2 - (w / 2).floor()
    return dict(h=h, w=w, sy=sy, sx=sx, dy=dy, dx=dx, angle=angle)


def paste(images: torch.Tensor, geometry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch of each image described by `geometry`, moved to its destination.

    Returns (moved [n, 3, H, W], region [n, H, W] bool): `moved` holds, at every pixel, the image
    pixel it maps from (nearest neighbour; clamped to the image outside the patch), and `region`
    is where the patch lands. Paste with `blend_replace(images, moved, region)`.
    """
    n, c, height, width = images.shape
    device = images.device
    g = {k: v.to(device, torch.float32).view(n, 1, 1) for k, v in geometry.items()}
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1) - g["dy"]
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width) - g["dx"]
    cos, sin = torch.cos(g["angle"]), torch.sin(g["angle"])
    ly = cos * ys + sin * xs  # destination pixel in the patch's frame
    lx = -sin * ys + cos * xs
    region = (ly.abs() <= g["h"] / 2) & (lx.abs() <= g["w"] / 2)
    qy = (g["sy"] + ly).round().clamp(0, height - 1).long()
    qx = (g["sx"] + lx).round().clamp(0, width - 1).long()
    index = (qy * width + qx).view(n, 1, -1).expand(n, c, -1)
    moved = images.reshape(n, c, -1).gather(2, index).view(n, c, height, width)
    return moved, region


def cutpaste(images: torch.Tensor, generator: torch.Generator, scar: bool = False,
             region: torch.Tensor | None = None, min_fraction: float = 0.001,
             tries: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste (or CutPaste-scar) on every image: (defective [n, 3, H, W], masks [n, 1, H, W] float32).

    A patch of the same image, colour-jittered (CutPaste's ColorJitter 0.1), is pasted elsewhere;
    the mask is exactly the pasted region (intersected with `region` when given). A geometry
    whose mask covers less than `min_fraction` of the image is drawn again (up to `tries` times),
    then replaced by a small square of the region, so a mask is never empty.
    """
    _check_generator(generator)
    n, _, height, width = images.shape
    x = images.float()
    need = max(1, math.ceil(min_fraction * height * width))
    geometry = cutpaste_geometry(n, height, width, generator, scar, region)
    moved, masks = paste(x, geometry)
    if region is not None:
        masks &= region
    for _ in range(tries):
        small = (masks.sum((1, 2)) < need).cpu()
        if not small.any():
            break
        idx = small.nonzero().flatten()
        redo = cutpaste_geometry(len(idx), height, width, generator, scar,
                                 None if region is None else region[idx.to(region.device)])
        for key in geometry:
            geometry[key][idx] = redo[key]
        d = idx.to(images.device)
        moved[d], masks[d] = paste(x[d], redo)
        if region is not None:
            masks[d] &= region[d]
    small = (masks.sum((1, 2)) < need).cpu()
    if small.any():  # last resort: a square around a point of the region, copied from inside the image
        idx = small.nonzero().flatten()
        d = idx.to(images.device)
        area = torch.ones_like(masks[d]) if region is None else region[d]
        square, py, px, radius = _fallback_square(area, max(need, math.ceil(0.01 * height * width)), generator)
        r = radius.cpu().double()
        sub = dict(h=2 * r + 1, w=2 * r + 1, dy=py.cpu().double(), dx=px.cpu().double(),
                   sy=torch.minimum(geometry["sy"][idx].round().clamp(min=r), height - 1 - r),
                   sx=torch.minimum(geometry["sx"][idx].round().clamp(min=r), width - 1 - r),
                   angle=torch.zeros(len(idx), dtype=torch.float64))
        moved[d], _ = paste(x[d], sub)
        masks[d] = square
    moved = color_jitter(moved, generator)
    return blend_replace(images, moved, masks).clamp(0, 1), masks[:, None].float()
