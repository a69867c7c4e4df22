"""Where a defect goes: Perlin, rectangle, stroke and grid masks, and the object's foreground.

Every random draw comes from the CPU `torch.Generator` the caller passes; the masks are then
computed on `device`. Batched functions take a count `n` and return [n, H, W] float32 in {0, 1};
`region` ([n, H, W] bool, optional) restricts a mask to it, and rectangles and strokes are placed
around a random point of it so that they rarely miss a small object.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def _check_size(height: int, width: int) -> tuple[int, int]:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
    return int(height), int(width)


def _check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must live on the CPU (draws are made there so that a seed gives the same "
                         f"defects on every device), got one on {generator.device}")
    return generator


def _uniform(generator: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)  # 6t^5 - 15t^4 + 10t^3, Perlin's improved fade


def _lattice_weights(n: int, size: int, res: torch.Tensor, side: int, gradient_axis: bool) -> torch.Tensor:
    """[n, size, side]: row p holds the weights of lattice points i and i + 1 for pixel p along one axis.

    Position u = p * res / size (DRAEM's grid), i = floor(u), f = u - i, t = fade(f); the weights
    are (1 - t, t), times the offsets (f, f - 1) on the axis whose gradient component they meet.
    """
    u = torch.arange(size, device=res.device, dtype=torch.float32).view(1, size) * (res.view(n, 1) / size)
    i = torch.minimum(u.floor(), res.view(n, 1) - 1)
    f = u - i
    t = _fade(f)
    w0, w1 = 1 - t, t
    if gradient_axis:
        w0, w1 = w0 * f, w1 * (f - 1)
    weights = torch.zeros(n, size, side, device=res.device)
    weights.scatter_(2, i.long()[..., None], w0[..., None])
    weights.scatter_(2, i.long()[..., None] + 1, w1[..., None])
    return weights


def rotation_grid(n: int, height: int, width: int, radians: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """grid_sample's grid [n, H, W, 2] that rotates images about their centre by `radians` [n].

    Built by broadcasting: ~5x faster than affine_grid's batched matmul on a CPU.
    """
    device = radians.device
    if align_corners:  # pixel centres at -1 .. 1
        ys, xs = torch.linspace(-1, 1, height, device=device), torch.linspace(-1, 1, width, device=device)
        ky, kx = max(height - 1, 1), max(width - 1, 1)
    else:
        ys = (torch.arange(height, device=device) * 2 + 1) / height - 1
        xs = (torch.arange(width, device=device) * 2 + 1) / width - 1
        ky, kx = height, width
    cos, sin = torch.cos(radians).view(n, 1, 1), torch.sin(radians).view(n, 1, 1)
    ys, xs = ys.view(1, height, 1), xs.view(1, 1, width)
    gx = cos * xs - (sin * (ky / kx)) * ys  # normalised units differ per axis: correct for the aspect
    gy = (sin * (kx / ky)) * xs + cos * ys
    return torch.stack([gx, gy], dim=3)


def _rotate(fields: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate fields [n, H, W] about their centre, bilinear, 0 outside (imgaug's Affine defaults)."""
    n, height, width = fields.shape
    radians = degrees.to(fields.device, torch.float32) * (math.pi / 180)
    grid = rotation_grid(n, height, width, radians, align_corners=True)
    return F.grid_sample(fields[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


def perlin_noise(n: int, height: int, width: int, generator: torch.Generator, *,
                 scale_exponents: tuple[int, int] = (0, 6), rotation: float = 90.0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """n rotated Perlin noise fields [n, H, W], roughly in [-1, 1] (the DRAEM recipe).

    Per field: `rand_perlin_2d` on a 2^a x 2^b lattice, a, b uniform integers in [lo, hi) of
    `scale_exponents`, fade 6t^5 - 15t^4 + 10t^3; then, as DRAEM's imgaug Affine, a rotation by
    U(-rotation, rotation) degrees about the centre, bilinear, 0 where it brings in the outside.
    Any size works (DRAEM needs sizes divisible by the lattice).

    Interpolating a gradient lattice is linear in the gradients, so each field is two matrix
    chains, rows [H, L] @ gradients [L, L] @ columns [L, W], with two non-zero weights per row:
    the same values as the pixel-wise formula, ~8x faster on a CPU.
    """
    _check_generator(generator)
    height, width = _check_size(height, width)
    lo, hi = (int(e) for e in scale_exponents)
    if not 0 <= lo < hi:
        raise ValueError(f"scale_exponents must be (lo, hi) with 0 <= lo < hi, got {scale_exponents!r}")
    exps = torch.randint(lo, hi, (2, n), generator=generator)
    side = 2 ** (hi - 1) + 1
    angles = _uniform(generator, n, side, side, high=2 * math.pi)
    degrees = _uniform(generator, n, low=-rotation, high=rotation)

    device = torch.device(device or "cpu")
    res = (2.0 ** exps).to(device, torch.float32)
    angles = angles.to(device, torch.float32)
    rows_y = _lattice_weights(n, height, res[0], side, True)  # meets the gradients' y component
    rows_1 = _lattice_weights(n, height, res[0], side, False)
    cols_1 = _lattice_weights(n, width, res[1], side, False)
    cols_x = _lattice_weights(n, width, res[1], side, True)
    noise = (rows_y @ torch.cos(angles) @ cols_1.transpose(1, 2)
             + rows_1 @ torch.sin(angles) @ cols_x.transpose(1, 2)) * math.sqrt(2)
    return _rotate(noise, degrees) if rotation else noise


def _perlin_masks(n, height, width, generator, device, threshold=0.5, scale_exponents=(0, 6)) -> torch.Tensor:
    return perlin_noise(n, height, width, generator, scale_exponents=scale_exponents, device=device) > threshold


def perlin_masks(n: int, height: int, width: int, generator: torch.Generator, *, threshold: float = 0.5,
                 scale_exponents: tuple[int, int] = (0, 6), region: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """n thresholded Perlin masks [n, H, W] float32 in {0, 1}; may be empty (see DefectSynthesizer)."""
    _check_generator(generator)
    device = device or (region.device if region is not None else "cpu")
    masks = _perlin_masks(n, height, width, generator, device, threshold, scale_exponents)
    return (masks if region is None else masks & region.to(masks.device).bool()).float()


def perlin_mask(height: int, width: int, generator: torch.Generator, threshold: float = 0.5,
                scale_exponents: tuple[int, int] = (0, 6), device: torch.device | str | None = None) -> torch.Tensor:
    """One DRAEM Perlin mask [H, W] float32 in {0, 1}: noise > threshold. May be empty."""
    return perlin_masks(1, height, width, generator, threshold=threshold, scale_exponents=scale_exponents,
                        device=device)[0]


def random_points(region: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly drawn pixel (y, x) of each region [n, H, W] bool; long tensors [n] on its device.

    The k-th set pixel is found by integer cumsum/searchsorted, so the choice is the same on any
    device. An empty region gives a uniform pixel of the whole image.
    """
    n, height, width = region.shape
    flat = region.reshape(n, -1)
    flat = torch.where(flat.any(1, keepdim=True), flat, torch.ones_like(flat))
    cum = flat.cumsum(1)
    u = _uniform(generator, n).to(region.device)
    k = (u * cum[:, -1]).long().clamp_(max=cum[:, -1] - 1)
    index = torch.searchsorted(cum, (k + 1).view(n, 1)).view(n)
    return index // width, index % width


def _rectangle_masks(n, height, width, generator, device, region=None, area=(0.02, 0.15),
                     aspect=(0.3, 1 / 0.3)) -> torch.Tensor:
    u = _uniform(generator, n, 4)
    pixels = (u[:, 0] * (area[1] - area[0]) + area[0]) * height * width
    ratio = torch.exp(u[:, 1] * (math.log(aspect[1]) - math.log(aspect[0])) + math.log(aspect[0]))
    h = (pixels / ratio).sqrt().round().clamp(1, height).long()
    w = (pixels * ratio).sqrt().round().clamp(1, width).long()
    if region is None:  # fully inside the image, as CutPaste places its patches
        top = (u[:, 2] * (height - h + 1)).long()
        left = (u[:, 3] * (width - w + 1)).long()
    else:  # centred on a random point of the region, clipped by the image border
        py, px = random_points(region, generator)
        top, left = py.cpu() - h // 2, px.cpu() - w // 2
    device = torch.device(device or "cpu")
    ys = torch.arange(height, device=device).view(1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, width)
    top, left, h, w = (t.to(device).view(n, 1, 1) for t in (top, left, h, w))
    masks = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    return masks if region is None else masks & region


def rectangle_masks(n: int, height: int, width: int, generator: torch.Generator, *,
                    area: tuple[float, float] = (0.02, 0.15), aspect: tuple[float, float] = (0.3, 1 / 0.3),
                    region: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """n axis-aligned rectangles [n, H, W] float32: CutPaste's geometry (area U(area) of the image,
    aspect ratio h/w log-uniform in `aspect`)."""
    _check_generator(generator)
    height, width = _check_size(height, width)
    device = device or (region.device if region is not None else "cpu")
    region = None if region is None else region.to(device).bool()
    return _rectangle_masks(n, height, width, generator, device, region, area, aspect).float()


def rectangle_mask(height: int, width: int, generator: torch.Generator, **kwargs) -> torch.Tensor:
    """One rectangle mask [H, W] float32; keyword arguments as `rectangle_masks`."""
    return rectangle_masks(1, height, width, generator, **kwargs)[0]


def _stroke_masks(n, height, width, generator, device, region=None, strokes=(1, 4), vertices=(4, 12),
                  brush=(12 / 512, 40 / 512)) -> torch.Tensor:
    """Free-form brush strokes, the DeepFill v2 recipe (Yu et al. 2019, `brush_stroke_mask`).

    Per stroke: a polyline of U{vertices} segments of length N(r, r/2) clipped to [0, 2r],
    r = diagonal / 8, zig-zagging around a mean angle of 2pi/5, drawn with a round brush of width
    U(brush) x the short side; then random horizontal/vertical flips. Drawn with OpenCV on the
    CPU (microseconds per polyline; a distance field in torch costs a full-image pass per
    segment), then moved to `device`; the parameters come from `generator`.
    """
    max_strokes, max_vertices = strokes[1] - 1, vertices[1] - 1
    n_strokes = torch.randint(strokes[0], strokes[1], (n,), generator=generator)
    n_vertices = torch.randint(vertices[0], vertices[1], (n, max_strokes), generator=generator)
    u = _uniform(generator, n, max_strokes, max_vertices + 5)
    z = torch.randn((n, max_strokes, max_vertices), generator=generator, dtype=torch.float64)
    flips = _uniform(generator, n, 2) < 0.5
    if region is not None:  # the first stroke starts on the region
        starts = torch.stack(random_points(region, generator), 1).cpu()

    radius = math.hypot(height, width) / 8
    mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
    out = np.zeros((n, height, width), dtype=np.uint8)
    for i in range(n):
        for s in range(int(n_strokes[i])):
            k = int(n_vertices[i, s])
            row = u[i, s].numpy()
            lo = mean_angle - row[0] * angle_range
            hi = mean_angle + row[1] * angle_range
            angles = lo + row[5:5 + k] * (hi - lo)
            angles[::2] = 2 * math.pi - angles[::2]
            y, x = row[2] * height, row[3] * width
            if region is not None and s == 0:
                y, x = float(starts[i, 0]), float(starts[i, 1])
            steps = np.clip(radius + z[i, s, :k].numpy() * (radius / 2), 0, 2 * radius)
            points = [(x, y)]
            for a, r in zip(angles, steps):
                x = float(np.clip(x + r * math.cos(a), 0, width - 1))
                y = float(np.clip(y + r * math.sin(a), 0, height - 1))
                points.append((x, y))
            thickness = max(1, int(round((brush[0] + row[4] * (brush[1] - brush[0])) * min(height, width))))
            cv2.polylines(out[i], [np.round(points).astype(np.int32)], False, 1, thickness)  # round caps and joins
    masks = torch.from_numpy(out).to(device or "cpu").bool()
    masks = torch.where(flips[:, 0].to(masks.device).view(n, 1, 1), masks.flip(2), masks)
    masks = torch.where(flips[:, 1].to(masks.device).view(n, 1, 1), masks.flip(1), masks)
    return masks if region is None else masks & region


def stroke_masks(n: int, height: int, width: int, generator: torch.Generator, *, strokes: tuple[int, int] = (1, 4),
                 vertices: tuple[int, int] = (4, 12), brush: tuple[float, float] = (12 / 512, 40 / 512),
                 region: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """n free-form stroke masks [n, H, W] float32 (DeepFill v2's recipe; integer ranges are
    [lo, hi), `brush` is the stroke width as a share of the short side)."""
    _check_generator(generator)
    height, width = _check_size(height, width)
    device = device or (region.device if region is not None else "cpu")
    region = None if region is None else region.to(device).bool()
    return _stroke_masks(n, height, width, generator, device, region, strokes, vertices, brush).float()


def stroke_mask(height: int, width: int, generator: torch.Generator, **kwargs) -> torch.Tensor:
    """One stroke mask [H, W] float32; keyword arguments as `stroke_masks`."""
    return stroke_masks(1, height, width, generator, **kwargs)[0]


def _fallback_square(region: torch.Tensor, pixels: int, generator: torch.Generator):
    """(masks, centre y, centre x, radius) of `fallback_masks`; centres and radii are long [n]."""
    n, height, width = region.shape
    py, px = random_points(region, generator)
    ys = torch.arange(height, device=region.device).view(1, height, 1)
    xs = torch.arange(width, device=region.device).view(1, 1, width)
    dist = torch.maximum((ys - py.view(n, 1, 1)).abs(), (xs - px.view(n, 1, 1)).abs())
    dist = dist.masked_fill(~region, height + width).reshape(n, -1)
    k = min(max(1, int(pixels)), height * width)
    radius = dist.kthvalue(k, dim=1).values
    return region & (dist.view(n, height, width) <= radius.view(n, 1, 1)), py, px, radius


def fallback_masks(region: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """A small square of at least `pixels` pixels of each region [n, H, W] bool, around a random point.

    The square grows (in whole pixels, Chebyshev distance) until it holds `pixels` pixels of the
    region, so the result is never empty and never leaves the region (unless the region is smaller
    than `pixels`: then it is the whole region). Returns [n, H, W] bool.
    """
    _check_generator(generator)
    return _fallback_square(region.bool(), pixels, generator)[0]


def grid_masks(height: int, width: int, cell: int, n: int, generator: torch.Generator,
               device: torch.device | str | None = None) -> torch.Tensor:
    """RIAD's random inpainting masks: [n, H, W] float32, disjoint, summing to 1 at every pixel.

    The image is cut into cell x cell squares (the last row/column may be cropped); a random
    permutation deals the squares to the n masks in turn, so each mask gets floor or ceil of
    (cells / n) of them. Inpainting each mask from the other pixels and stitching the n results
    reconstructs the whole image. RIAD uses cell sizes {2, 4, 8, 16} at 256 px: see `grid_cell_sizes`.
    """
    _check_generator(generator)
    height, width = _check_size(height, width)
    if isinstance(cell, bool) or not isinstance(cell, (int, np.integer)) or cell < 1:
        raise ValueError(f"cell must be a positive int (pixels per grid square), got {cell!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (number of masks), got {n!r}")
    rows, cols = -(-height // cell), -(-width // cell)
    if n > rows * cols:
        raise ValueError(f"cannot deal {rows * cols} grid cells of {cell} px ({height}x{width} image) to {n} "
                         f"non-empty masks; use a smaller cell or fewer masks")
    order = torch.randperm(rows * cols, generator=generator)
    owner = torch.empty(rows * cols, dtype=torch.long)
    owner[order] = torch.arange(rows * cols) % n
    owner = owner.to(device or "cpu").view(rows, cols)
    owner = owner.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:height, :width]
    return F.one_hot(owner, n).permute(2, 0, 1).float()


def grid_cell_sizes(height: int, width: int, sizes: tuple[int, ...] = (2, 4, 8, 16),
                    reference: int = 256) -> tuple[int, ...]:
    """RIAD's cell sizes (pixels at a `reference`-pixel image) scaled to this image's short side."""
    height, width = _check_size(height, width)
    return tuple(max(1, round(k * min(height, width) / reference)) for k in sizes)


def _box_count(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Set pixels in each (2r+1)^2 window of masks [n, H, W] (0 outside), by cumulative sums:
    the cost does not grow with the radius (max_pool2d's does, and is ~10x slower on a CPU)."""
    n, height, width = masks.shape
    c = F.pad(masks.to(torch.int32), (0, 0, radius + 1, radius)).cumsum(1, dtype=torch.int32)
    rows = c[:, 2 * radius + 1:] - c[:, :height]
    c = F.pad(rows, (radius + 1, radius)).cumsum(2, dtype=torch.int32)
    return c[:, :, 2 * radius + 1:] - c[:, :, :width]


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    return _box_count(masks, radius) > 0


def _erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    # only pixels inside the image count: the border does not eat into an object touching it
    inside = _box_count(torch.ones_like(masks[:1]), radius)
    return _box_count(masks, radius) == inside


def foreground_mask(images: torch.Tensor, threshold: float = 0.1, border: float = 0.05,
                    min_fraction: float = 0.05) -> torch.Tensor:
    """Estimated object pixels [B, H, W] bool of images [B, 3, H, W] in [0, 1] on a plain background.

    The background colour is the per-channel median of a border band (`border` x the short side);
    a pixel is foreground when some channel differs from it by more than max(threshold, 3 x the
    median difference inside the band), the second term adapting to a noisy background. A
    closing (fills small holes) and an opening (drops specks), square windows of radius 2 % and
    1 % of the short side, clean the result.
    Where less than `min_fraction` of the image is foreground the estimate is not trusted and the
    whole image is returned.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    b, _, height, width = images.shape
    x = images.float()
    side = min(height, width)
    band = max(1, round(border * side))
    if 2 * band >= min(height, width):
        return torch.ones(b, height, width, dtype=torch.bool, device=images.device)
    edge = torch.cat([x[:, :, :band].reshape(b, 3, -1), x[:, :, -band:].reshape(b, 3, -1),
                      x[:, :, band:-band, :band].reshape(b, 3, -1),
                      x[:, :, band:-band, -band:].reshape(b, 3, -1)], 2)
    background = edge.median(2).values  # [B, 3]
    edge_distance = (edge - background[:, :, None]).abs().amax(1)  # [B, K]
    limit = torch.clamp(3 * edge_distance.median(1).values, min=threshold).view(b, 1, 1)
    fg = (x - background[:, :, None, None]).abs().amax(1) > limit
    close, open_ = max(1, round(0.02 * side)), max(1, round(0.01 * side))
    fg = _erode(_dilate(fg, close), close)  # closing: fills small holes and gaps
    fg = _dilate(_erode(fg, open_), open_)  # opening: drops specks of noise
    tiny = fg.float().mean((1, 2)) < min_fraction
    return fg | tiny.view(b, 1, 1)
