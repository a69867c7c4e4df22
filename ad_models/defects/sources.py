"""What a defect is made of: procedural textures, a folder of images, and their photometric augmentation.

A source has `sample(n, height, width, generator, device) -> [n, 3, H, W] float32 in [0, 1]`.
`rearrange` makes a source from the images themselves (SLSG's "scar" anomalies: the image's own
content, out of place). `augment` is DRAEM's random photometric augmentation of a source, in torch;
`color_jitter` is CutPaste's, for patches taken from the image itself.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ad_models.data.layout import read_image_file
from ad_models.defects.masks import _check_generator, _check_size, _uniform, rotation_grid

# the formats OpenCV decodes (imread's list); matched case-insensitively
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jp2", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                     ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".sr", ".ras", ".exr", ".hdr", ".pic")


def _colorize(field: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Scalar fields [n, H, W] in [0, 1] -> RGB [n, 3, H, W] between two colours [n, 2, 3]."""
    a, b = colors[:, 0, :, None, None], colors[:, 1, :, None, None]
    return a + (b - a) * field[:, None]


def _normalize(field: torch.Tensor) -> torch.Tensor:
    """Stretch each field [n, H, W] to [0, 1]."""
    lo = field.amin((1, 2), keepdim=True)
    hi = field.amax((1, 2), keepdim=True)
    return (field - lo) / (hi - lo).clamp(min=1e-6)


class ProceduralSource:
    """Textures generated in torch, so that defects need no download: fBm noise, stripes, blobs,
    colour gradients and blocky cells, coloured between two random colours, plus grain.

    The random numbers (small grids and parameters) are drawn on the CPU; the images are then
    built on `device` by upsampling and elementwise maths.
    """

    KINDS = ("noise", "stripes", "blobs", "gradient", "cells")

    def __repr__(self) -> str:
        return "ProceduralSource()"

    def sample(self, n: int, height: int, width: int, generator: torch.Generator,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n textures [n, 3, H, W] float32 in [0, 1] on `device`; each of a random kind."""
        _check_generator(generator)
        height, width = _check_size(height, width)
        device = torch.device(device or "cpu")
        kinds = torch.randint(0, len(self.KINDS), (n,), generator=generator)
        colors = _uniform(generator, n, 2, 3).float().to(device)
        grain = _uniform(generator, n, high=0.08).float().to(device)
        noise_grid = torch.rand((n, 1, max(1, height // 2), max(1, width // 2)), generator=generator)
        fields = torch.empty(n, height, width, device=device)
        for k, kind in enumerate(self.KINDS):
            idx = (kinds == k).nonzero().flatten()
            if len(idx):  # every kind draws its parameters only for its own samples, in a fixed order
                fields[idx.to(device)] = getattr(self, f"_{kind}")(len(idx), height, width, generator, device)
        out = _colorize(fields, colors)
        fine = F.interpolate(noise_grid.to(device), size=(height, width), mode="bilinear", align_corners=False)
        return (out + (fine - 0.5) * grain.view(n, 1, 1, 1)).clamp_(0, 1)

    @staticmethod
    def _fbm(n, height, width, generator, device, octaves=5) -> torch.Tensor:
        """Fractal value noise: random grids, each octave twice as fine (random base of 2-8 cells,
        persistence 0.35-0.75), summed coarse to fine (upsample the sum 2x, add the next grid) and
        brought to full size once: one full-size interpolation instead of one per octave."""
        base = int(torch.randint(2, 9, (1,), generator=generator))
        persistence = _uniform(generator, n, low=0.35, high=0.75).float().to(device).view(n, 1, 1, 1)
        total = torch.zeros(n, 1, 1, 1, device=device)
        amplitude = torch.ones_like(persistence)
        for o in range(octaves):  # octave o weighs persistence^o
            size = (min(base * 2 ** o, height), min(base * 2 ** o, width))
            grid = torch.rand((n, 1, *size), generator=generator).to(device)
            total = F.interpolate(total, size=size, mode="bicubic", align_corners=False) + amplitude * grid
            amplitude = amplitude * persistence
        total = F.interpolate(total, size=(height, width), mode="bilinear", align_corners=False)
        return _normalize(total[:, 0])

    def _noise(self, n, height, width, generator, device) -> torch.Tensor:
        contrast = _uniform(generator, n, low=1.0, high=6.0).float().to(device).view(n, 1, 1)
        field = self._fbm(n, height, width, generator, device)
        return torch.sigmoid((field - 0.5) * 2 * contrast)  # from soft clouds to hard-edged blotches

    def _stripes(self, n, height, width, generator, device) -> torch.Tensor:
        """Sine stripes: random direction, period 3-40 % of the short side, waviness, sharpness."""
        u = _uniform(generator, n, 5).float().to(device)
        angle = u[:, 0] * math.pi
        period = (0.03 + u[:, 1] * 0.37) * min(height, width)
        ys = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1)
        xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width)
        along = ys * torch.sin(angle).view(n, 1, 1) + xs * torch.cos(angle).view(n, 1, 1)
        warp = self._fbm(n, height, width, generator, device) * (u[:, 2] * 3).view(n, 1, 1)
        phase = 2 * math.pi * (along / period.view(n, 1, 1) + warp + u[:, 3].view(n, 1, 1))
        sharp = (1 + u[:, 4] * 15).view(n, 1, 1)
        return torch.sigmoid(torch.sin(phase) * sharp)

    def _blobs(self, n, height, width, generator, device, most=12) -> torch.Tensor:
        """Up to `most` axis-aligned Gaussian blobs; separable, so one batched matmul draws them all."""
        count = torch.randint(1, most + 1, (n,), generator=generator)
        u = _uniform(generator, n, most, 5).float()
        weight = torch.where(torch.arange(most) < count.view(n, 1), 0.3 + 0.7 * u[..., 4], 0.0)
        u, weight = u.to(device), weight.to(device)
        side = min(height, width)
        sy = (0.03 + 0.2 * u[..., 2]) * side  # [n, most]
        sx = (0.03 + 0.2 * u[..., 3]) * side
        ys = torch.arange(height, device=device, dtype=torch.float32)
        xs = torch.arange(width, device=device, dtype=torch.float32)
        gy = torch.exp(-0.5 * ((ys - (u[..., 0] * height)[..., None]) / sy[..., None]) ** 2)  # [n, most, H]
        gx = torch.exp(-0.5 * ((xs - (u[..., 1] * width)[..., None]) / sx[..., None]) ** 2)  # [n, most, W]
        field = torch.einsum("nkh,nkw->nhw", gy * weight[..., None], gx)
        return torch.tanh(2 * field)

    def _gradient(self, n, height, width, generator, device) -> torch.Tensor:
        """A linear colour ramp in a random direction, mottled by low-frequency noise."""
        u = _uniform(generator, n, 2).float().to(device)
        angle = u[:, 0] * 2 * math.pi
        ys = torch.linspace(-0.5, 0.5, height, device=device).view(1, height, 1)
        xs = torch.linspace(-0.5, 0.5, width, device=device).view(1, 1, width)
        ramp = 0.5 + ys * torch.sin(angle).view(n, 1, 1) + xs * torch.cos(angle).view(n, 1, 1)
        mottle = (u[:, 1] * 0.5).view(n, 1, 1)
        return ((1 - mottle) * ramp + mottle * self._fbm(n, height, width, generator, device)).clamp(0, 1)

    def _cells(self, n, height, width, generator, device) -> torch.Tensor:
        """Blocky tiles: a random 2-16 cell grid upsampled with nearest neighbours, or a checkerboard."""
        size = int(torch.randint(2, 17, (1,), generator=generator))
        grid = torch.rand((n, 1, size, size), generator=generator)
        checker = _uniform(generator, n) < 0.3
        board = ((torch.arange(size).view(size, 1) + torch.arange(size).view(1, size)) % 2).float()
        grid = torch.where(checker.view(n, 1, 1, 1), board, grid).to(device)
        return F.interpolate(grid, size=(height, width), mode="nearest")[:, 0]


class FolderSource:
    """Images of a folder (searched recursively; DTD, ImageNet, ...), resized to the defect's size.

    Any file OpenCV decodes counts (`FOLDER_EXTENSIONS`). The constructor lists the folder and
    decodes files until one works, so a missing folder or one without a readable image fails at
    once, naming the folder. A file that later fails to decode is dropped and another one drawn.
    Decoded, resized images are kept in an LRU cache of `cache_size` entries.
    """

    def __init__(self, folder: str | os.PathLike, cache_size: int = 256):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise FileNotFoundError(f"defect source folder {self.folder} {what}; give a folder of images "
                                    f"(e.g. DTD's images/), or source='procedural' to work offline")
        self.files = sorted(p for p in self.folder.rglob("*")
                            if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Path, int, int], np.ndarray] = OrderedDict()
        for path in list(self.files):  # usually stops at the first file
            if self._decode(path) is not None:
                break
            self.files.remove(path)
        if not self.files:
            raise ValueError(f"defect source folder {self.folder} holds no image OpenCV can read "
                             f"(searched recursively for {', '.join(FOLDER_EXTENSIONS)})")

    def __repr__(self) -> str:
        return f"FolderSource({str(self.folder)!r}, {len(self.files)} images)"

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _decode(path: Path) -> np.ndarray | None:
        image = read_image_file(path, cv2.IMREAD_COLOR)  # gray -> 3 channels, 16 bit -> 8 bit
        return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def _load(self, path: Path, height: int, width: int) -> np.ndarray | None:
        key = (path, height, width)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = self._decode(path)
        if image is None:
            return None
        shrinking = height < image.shape[0] or width < image.shape[1]
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        if self.cache_size > 0:
            self._cache[key] = image
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def sample(self, n: int, height: int, width: int, generator: torch.Generator,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n images drawn uniformly (with replacement), resized to H x W: [n, 3, H, W] float32 in [0, 1]."""
        _check_generator(generator)
        height, width = _check_size(height, width)
        images = []
        for _ in range(n):
            while True:
                if not self.files:
                    raise ValueError(f"defect source folder {self.folder}: none of its images can be decoded any more")
                path = self.files[int(torch.randint(len(self.files), (1,), generator=generator))]
                image = self._load(path, height, width)
                if image is not None:
                    break
                self.files.remove(path)  # unreadable since listing: drop it and draw again
            images.append(image)
        batch = torch.from_numpy(np.stack(images)).to(device or "cpu")
        return batch.permute(0, 3, 1, 2).float().div_(255)


# ---- photometric augmentation (DRAEM's list, in torch) --------------------------------------------
# Each op maps images [m, 3, H, W] in [0, 1] and uniforms u [m, 8] to images; u gives its parameters,
# so every op consumes the same draws and the sequence of draws never depends on the ops chosen.

_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0] * _LUMA[0] + x[:, 1] * _LUMA[1] + x[:, 2] * _LUMA[2])[:, None]


def _hue_saturation(x: torch.Tensor, hue: torch.Tensor, saturation: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `hue` radians and scale the chroma by `saturation`, per image, as one 3x3
    matrix in YIQ space (a cheap linear stand-in for an HSV round trip)."""
    to_yiq = _RGB_TO_YIQ.to(x.device)
    cos, sin = torch.cos(hue) * saturation, torch.sin(hue) * saturation
    rot = torch.zeros(len(x), 3, 3, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("mij,mjhw->mihw", matrix, x)


def _gamma(x, u):  # imgaug GammaContrast((0.5, 2.0), per_channel=True)
    gamma = 0.5 + 1.5 * u[:, :3]
    return torch.exp(torch.log(x.clamp(min=0)) * gamma[:, :, None, None])  # 0 -> exp(-inf) = 0; faster than pow


def _brightness(x, u):  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): on the luma only
    mul, add = 0.8 + 0.4 * u[:, 0], (u[:, 1] * 60 - 30) / 255
    y = _luma(x)
    return x + y * (mul.view(-1, 1, 1, 1) - 1) + add.view(-1, 1, 1, 1)


def _sharpness(x, u):  # pillike.EnhanceSharpness(factor 0..2): blend with PIL's smoothed image
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], device=x.device) / 13
    # channels_last: the depthwise conv is ~5x faster on a CPU
    smooth = F.conv2d(x.contiguous(memory_format=torch.channels_last), kernel.expand(3, 1, 3, 3),
                      padding=1, groups=3).contiguous()
    # as PIL, the one-pixel border keeps its values (the zero padding would darken it)
    smooth[..., [0, -1], :] = x[..., [0, -1], :]
    smooth[..., :, [0, -1]] = x[..., :, [0, -1]]
    return torch.lerp(smooth, x, (2 * u[:, 0]).view(-1, 1, 1, 1))  # 0: smooth, 1: unchanged, 2: sharper


def _hue_sat(x, u):  # AddToHueAndSaturation((-50, 50), per_channel=True): +-70 degrees, chroma x0.6-1.4
    hue = (u[:, 0] * 100 - 50) / 255 * 2 * math.pi
    saturation = 1 + (u[:, 1] * 100 - 50) / 255 * 2
    return _hue_saturation(x, hue, saturation)


def _solarize(x, u):  # Solarize(p=0.5, threshold=(32, 128))
    threshold = ((32 + 96 * u[:, 0]) / 255).view(-1, 1, 1, 1)
    apply = (u[:, 1] < 0.5).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def _posterize(x, u):  # Posterize(nb_bits=(1, 8)): keep the top 1-8 bits of each 8-bit value
    step = 2.0 ** (8 - (1 + (u[:, 0] * 8).floor().clamp(max=7))).view(-1, 1, 1, 1)
    return (x * 255).round_().div_(step).floor_().mul_(step).div_(255)


def _invert(x, u):  # Invert()
    return 1 - x


def _autocontrast(x, u):  # pillike.Autocontrast(): stretch each channel to [0, 1]
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)


def _equalize(x, u):  # pillike.Equalize(): per-channel histogram equalisation on 256 levels
    m, c, h, w = x.shape
    q = (x.clamp(0, 1) * 255).round().long().view(m * c, h * w)
    hist = torch.zeros(m * c, 256, device=x.device).scatter_add_(1, q, torch.ones(1, 1, device=x.device).expand_as(q))
    cdf = hist.cumsum(1)
    first = cdf.gather(1, q.amin(1, keepdim=True))  # count of the darkest occupied level
    lut = ((cdf - first) / (h * w - first).clamp(min=1)).clamp(0, 1)
    return lut.gather(1, q).view(m, c, h, w)


def _rotate(x, u):  # Affine(rotate=(-45, 45)): bilinear, black outside, as imgaug's constant mode
    grid = rotation_grid(len(x), x.shape[2], x.shape[3], (u[:, 0] * 90 - 45) * (math.pi / 180), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


AUGMENTATIONS = {"gamma": _gamma, "brightness": _brightness, "sharpness": _sharpness,
                 "hue_saturation": _hue_sat, "solarize": _solarize, "posterize": _posterize,
                 "invert": _invert, "autocontrast": _autocontrast, "equalize": _equalize, "rotate": _rotate}


def augment(images: torch.Tensor, generator: torch.Generator, ops: int = 3) -> torch.Tensor:
    """DRAEM's source augmentation: per image, `ops` distinct ops out of `AUGMENTATIONS`, in random order.

    images [n, 3, H, W] in [0, 1] on any device; the result is clamped to [0, 1]. Equalize and the
    hue/saturation shift approximate imgaug's (256-level histograms; a YIQ rotation instead of HSV).
    """
    _check_generator(generator)
    n, k = len(images), len(AUGMENTATIONS)
    if not 0 <= ops <= k:
        raise ValueError(f"ops must be between 0 and {k} (the number of augmentations), got {ops}")
    if ops == 0 or n == 0:
        return images
    chosen = torch.rand((n, k), generator=generator).argsort(1)[:, :ops].tolist()  # distinct ops, random order
    params = torch.rand((n, ops, 8), generator=generator).to(images.device)
    functions = list(AUGMENTATIONS.values())
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    for i in range(n):  # image by image: faster than grouping images by op, which costs a gather and a scatter
        x = images[i:i + 1].float()
        for step, op in enumerate(chosen[i]):
            x = functions[op](x, params[i:i + 1, step]).clamp_(0, 1)
        out[i] = x[0]
    return out


def color_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """CutPaste's ColorJitter(0.1, 0.1, 0.1, 0.1): brightness, contrast and saturation factors
    U(1 - s, 1 + s) and a hue shift of U(-s, s) turns, per image, in that fixed order."""
    _check_generator(generator)
    n = len(images)
    u = (torch.rand((n, 4), generator=generator) * 2 - 1).to(images.device) * strength
    x = images.float() * (1 + u[:, 0]).view(n, 1, 1, 1)
    x = x.clamp(0, 1)
    mean = _luma(x).mean((1, 2, 3), keepdim=True)
    x = (mean + (1 + u[:, 1]).view(n, 1, 1, 1) * (x - mean)).clamp(0, 1)
    x = _hue_saturation(x, u[:, 3] * 2 * math.pi, 1 + u[:, 2])
    return x.clamp(0, 1)


REARRANGEMENTS = ("grid_shuffle", "flip", "other_image")


def grid_shuffle(images: torch.Tensor, generator: torch.Generator, grid: tuple[int, int]) -> torch.Tensor:
    """Albumentations' RandomGridShuffle: cut each image into rows x cols cells and put them back in
    a random order (one permutation per image). Cells are floor(H / rows) x floor(W / cols); the
    remainder strip at the bottom/right stays where it is."""
    _check_generator(generator)
    rows, cols = grid
    n, c, height, width = images.shape
    ch, cw = height // rows, width // cols
    if ch == 0 or cw == 0:
        raise ValueError(f"a {rows} x {cols} grid does not fit {height} x {width} images")
    out = images.clone()
    cells = images[:, :, :rows * ch, :cols * cw].reshape(n, c, rows, ch, cols, cw).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(n, rows * cols, c, ch, cw)
    order = torch.rand((n, rows * cols), generator=generator).argsort(1).to(images.device)
    shuffled = cells[torch.arange(n, device=images.device)[:, None], order]
    out[:, :, :rows * ch, :cols * cw] = (shuffled.reshape(n, rows, cols, c, ch, cw).permute(0, 3, 1, 4, 2, 5)
                                         .reshape(n, c, rows * ch, cols * cw))
    return out


def rearrange(images: torch.Tensor, generator: torch.Generator, weights: dict[str, float],
              grid: tuple[int, int] = (4, 8)) -> torch.Tensor:
    """A source made of the batch's own content, out of place (SLSG's "scar" mode), per image one of
    (drawn by `weights`):

    grid_shuffle   the image turned by 180 degrees with p 0.5, then `grid_shuffle`d (SLSG's default)
    flip           the image flipped vertically or horizontally (p 0.5 each)
    other_image    another image of the batch (a normal part in the wrong place; with one image in
                   the batch, the image turned by 180 degrees)

    images [n, 3, H, W] in [0, 1]; returns the sources, same shape."""
    _check_generator(generator)
    unknown = sorted(set(weights) - set(REARRANGEMENTS))
    if unknown:
        raise ValueError(f"rearrange: unknown kind(s) {unknown}; valid kinds: {list(REARRANGEMENTS)}")
    n = len(images)
    w = torch.tensor([float(weights.get(k, 0)) for k in REARRANGEMENTS], dtype=torch.float64)
    kinds = torch.multinomial(w, n, replacement=True, generator=generator)
    u = torch.rand((n, 2), generator=generator)
    turned = images.flip(-1, -2)
    out = images.clone()
    shuffle = (kinds == 0).nonzero().flatten()
    if len(shuffle):
        turn = (u[shuffle, 0] < 0.5).view(-1, 1, 1, 1).to(images.device)
        idx = shuffle.to(images.device)
        out[idx] = grid_shuffle(torch.where(turn, turned[idx], images[idx]), generator, grid)
    flip = (kinds == 1).nonzero().flatten()
    if len(flip):
        vertical = (u[flip, 1] < 0.5).view(-1, 1, 1, 1).to(images.device)
        idx = flip.to(images.device)
        out[idx] = torch.where(vertical, images[idx].flip(-2), images[idx].flip(-1))
    other = (kinds == 2).nonzero().flatten()
    if len(other):
        idx = other.to(images.device)
        if n == 1:
            out[idx] = turned[idx]
        else:
            offset = 1 + (u[other, 1] * (n - 1)).long().clamp(max=n - 2)
            out[idx] = images[((other + offset) % n).to(images.device)]
    return out
