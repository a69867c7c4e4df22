"""Reading images and masks, and a torch Dataset over a manifest.

Images come out as float tensors in [0, 1] without normalisation: each backbone normalises
its input itself, so the data never has to know which network will read it.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from ad_models.data.layout import COLUMNS, DatasetError, read_image_file


RESIZE_POLICIES = ("stretch", "keep_aspect", "tiles")
"""How an image becomes the model's [height, width] input: `stretch` resizes it to exactly that
(squashing elongated parts); `keep_aspect` scales it to fit inside, keeping its aspect ratio, and
fills the rest with a reflected border that maps, image scores and metrics ignore; `tiles` keeps the
image at its own resolution and cuts it into overlapping tiles of that size (`tile_grid`), whose
maps are stitched back (`stitch_tiles`): thin defects keep their pixels, at the cost of one
prediction per tile."""
TILE_OVERLAP = 0.25  # share of a tile its neighbour covers at least: a defect on a seam is seen whole once


def image_shape(size) -> tuple[int, int]:
    """`image_size` as (height, width): an int is a square, a pair is [height, width]."""
    sides = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(sides) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in sides):
        raise ValueError(f"image size must be a positive int (pixels per side) or a pair [height, width] of "
                         f"them, got {size!r}")
    return int(sides[0]), int(sides[1])


def check_resize(resize: str) -> str:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {list(RESIZE_POLICIES)}, got {resize!r}")
    return resize


def content_box(height: int, width: int, size, resize: str = "stretch") -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of `height` x `width` pixels inside the model's input
    of `size` under `resize`: all of it for stretch, the centred, aspect-keeping fit for keep_aspect;
    under tiles the image keeps its own size (its tiles are the inputs)."""
    rows, cols = image_shape(size)
    if check_resize(resize) == "stretch":
        return 0, 0, rows, cols
    if resize == "tiles":
        return 0, 0, height, width
    scale = min(rows / height, cols / width)
    h, w = min(rows, max(1, round(height * scale))), min(cols, max(1, round(width * scale)))
    return (rows - h) // 2, (cols - w) // 2, h, w


def _read(path: str | os.PathLike, flags: int, what: str) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    array = read_image_file(path, flags)
    if array is None:
        raise DatasetError(f"cannot decode {what} {path}: unreadable or not an image OpenCV reads")
    return array


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image at its own size as H x W x 3 uint8 RGB (grayscale replicated to 3 channels);
    FileNotFoundError or DatasetError naming the file when it is missing or does not decode."""
    image = _read(path, cv2.IMREAD_COLOR, "image")  # IMREAD_COLOR: gray -> 3 channels, 16 bit -> 8 bit
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_rgb(image: np.ndarray, size) -> np.ndarray:
    """An RGB image as `size` (an int: square, or [height, width]), stretched: area interpolation
    when shrinking (no aliasing), bilinear when enlarging."""
    rows, cols = image_shape(size)
    h, w = image.shape[:2]
    if (h, w) != (rows, cols):
        shrinking = rows < h or cols < w
        image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return image


def fit_image(image: np.ndarray, size, resize: str = "stretch") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An RGB image as the model's input of `size` under `resize` (`RESIZE_POLICIES`), and the box
    (top, left, height, width) its content fills; the one place training, validation, evaluation and
    `adpipe predict` turn an image into a model input."""
    box = top, left, h, w = content_box(*image.shape[:2], size, resize)
    rows, cols = image_shape(size)
    if (h, w) == (rows, cols):
        return resize_rgb(image, size), box
    # a reflected border continues the texture, so the padding adds no edge a model could flag
    return cv2.copyMakeBorder(resize_rgb(image, (h, w)), top, rows - h - top, left, cols - w - left,
                              cv2.BORDER_REFLECT), box


def _tile_starts(length: int, tile: int) -> list[int]:
    """Evenly spread starts of tiles of `tile` pixels covering `length`, neighbours overlapping by at
    least TILE_OVERLAP of a tile; one start (0) when the image is no longer than a tile."""
    if length <= tile:
        return [0]
    n = math.ceil((length - tile) / (tile * (1 - TILE_OVERLAP))) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_grid(height: int, width: int, size) -> list[tuple[int, int, int, int]]:
    """The tiles of an image of `height` x `width` under the `tiles` policy, as boxes (top, left,
    height, width) in the image: tiles of `size` (int or [height, width]), fewer pixels on a side
    where the image is smaller than a tile (`cut_tile` pads those)."""
    rows, cols = image_shape(size)
    return [(top, left, min(rows, height), min(cols, width))
            for top in _tile_starts(height, rows) for left in _tile_starts(width, cols)]


def cut_tile(image: np.ndarray, tile_box, size) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One tile of `image` as the model's input of `size`, and the box its content fills there: the
    pixels themselves (no resizing), with a reflected border where the image is smaller than a tile."""
    top, left, h, w = tile_box
    rows, cols = image_shape(size)
    tile = image[top:top + h, left:left + w]
    if (h, w) == (rows, cols):
        return np.ascontiguousarray(tile), (0, 0, rows, cols)
    return cv2.copyMakeBorder(tile, 0, rows - h, 0, cols - w, cv2.BORDER_REFLECT), (0, 0, h, w)


def stitch_tiles(maps: np.ndarray, tile_boxes, height: int, width: int) -> np.ndarray:
    """Tile maps [T, h, w] back into one map of `height` x `width`: the mean where tiles overlap
    (each tile's padding cut off)."""
    total = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for amap, (top, left, h, w) in zip(maps, tile_boxes):
        total[top:top + h, left:left + w] += amap[:h, :w]
        count[top:top + h, left:left + w] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def content_mask(boxes: torch.Tensor, size) -> torch.Tensor:
    """[B, H, W] bool, True on the image's content and False on padding, from `fit_image`'s boxes [B, 4]."""
    rows, cols = image_shape(size)
    valid = torch.zeros(len(boxes), rows, cols, dtype=torch.bool)
    for mask, (top, left, h, w) in zip(valid, boxes.tolist()):
        mask[top:top + h, left:left + w] = True
    return valid


def restore_map(amap: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """An anomaly map of the model's input back on an image of `height` x `width`: the padding cut
    off (`box` from `fit_image`), the content resized (bilinear) to that size."""
    top, left, h, w = (int(v) for v in box)
    amap = amap[top:top + h, left:left + w]
    if amap.shape != (height, width):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
    return amap


def load_image(path: str | os.PathLike, size) -> np.ndarray:
    """Read an image as `size` (int: square, or [height, width]) x 3 uint8 RGB, stretched
    (grayscale replicated to 3 channels)."""
    shape = image_shape(size)  # a wrong size is an error before any file is read
    return resize_rgb(read_rgb(path), shape)


def load_mask(path: str | os.PathLike, size) -> np.ndarray:
    """Read a mask as `size` (int: square, or [height, width]) bool, stretched (> 127 is
    defective); an empty path means no defect."""
    rows, cols = image_shape(size)
    if not path:
        return np.zeros((rows, cols), dtype=bool)
    mask = _read(path, cv2.IMREAD_GRAYSCALE, "mask")
    if mask.shape != (rows, cols):
        mask = cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST)
    return mask > 127


class ImageDataset(torch.utils.data.Dataset):
    """The rows of a manifest as dicts of image [3,H,W] float in [0,1] (`fit_image` under `resize`),
    box [4] (where the image's content lies in it), mask [1,H,W] float 0/1, label, path and
    defect_type.

    The mask is the ground truth stretched to [H, W] under stretch and keep_aspect: the frame
    evaluation compares maps in, once `AnomalyMethod.predict_dataset` has cut the padding off them
    (`restore_map`), so metrics never see padding and stretch and keep_aspect are scored alike.

    Under `tiles` each item is one tile (`tile_grid`) of an image at its own resolution, with the
    mask's tile and label 1 when the tile holds defect pixels (or, for a defective image without a
    mask, when the image is defective): what training and checkpoint selection see.
    `AnomalyMethod.predict_dataset` predicts whole images (`full_image`) and compares maps and masks
    in `frame`: the images' own size, or the median size when sizes differ."""

    def __init__(self, manifest: pd.DataFrame, size=256, resize: str = "stretch"):
        if not isinstance(manifest, pd.DataFrame):
            raise TypeError(f"manifest must be a pandas DataFrame, got {type(manifest).__name__}")
        missing = [c for c in COLUMNS if c not in manifest.columns]
        if missing:
            raise DatasetError(f"manifest lacks the columns {missing}; expected {COLUMNS}")
        self.size = image_shape(size)
        self.resize = check_resize(resize)
        self.paths = [str(p) for p in manifest["path"]]
        self.mask_paths = [str(p) for p in manifest["mask_path"]]
        self.labels = [int(x) for x in manifest["label"]]
        self.defect_types = [str(x) for x in manifest["defect_type"]]
        self.image_sizes: list[tuple[int, int]] = []  # (height, width) of each image, under tiles
        self.tiles = self._tile_index() if self.resize == "tiles" else None

    def _tile_index(self) -> list[tuple[int, tuple[int, int, int, int]]]:
        """(image index, tile box) of every tile; image sizes from the files' headers."""
        from PIL import Image  # header only: no decoding for the index

        index, self.image_sizes = [], []
        for i, path in enumerate(self.paths):
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except (OSError, ValueError) as error:
                raise DatasetError(f"cannot read the size of image {path}: {error}") from None
            self.image_sizes.append((height, width))
            index += [(i, box) for box in tile_grid(height, width, self.size)]
        return index

    @property
    def frame(self) -> tuple[int, int]:
        """Under tiles, the (height, width) whole-image maps and masks are compared in: the images'
        own size when they share one, else the median height and width."""
        sizes = np.asarray(self.image_sizes or [self.size])
        return int(np.median(sizes[:, 0])), int(np.median(sizes[:, 1]))

    def __len__(self) -> int:
        return len(self.tiles) if self.tiles is not None else len(self.paths)

    def with_resize(self, resize: str) -> "ImageDataset":
        """The same images and masks (same size, so maps stay comparable) under another policy:
        how a model sees a shared validation set its own way."""
        other = copy.copy(self)
        other.resize = check_resize(resize)
        other.tiles = other._tile_index() if resize == "tiles" else None
        return other

    @functools.lru_cache(maxsize=8)  # the tiles of one image come in a row when not shuffled
    def _native(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_rgb(self.paths[i])
        return image, load_mask(self.mask_paths[i], image.shape[:2])

    def full_image(self, i: int) -> dict:
        """Image `i` at its own size (uint8 RGB), its mask in `frame`, label, path and defect_type."""
        image, mask = self._native(i)
        if mask.shape != self.frame:
            mask = load_mask(self.mask_paths[i], self.frame)
        return dict(image=image, mask=mask, label=self.labels[i], path=self.paths[i],
                    defect_type=self.defect_types[i])

    def __getitem__(self, i: int) -> dict:
        if self.tiles is not None:
            return self._tile_item(*self.tiles[i])
        image, box = fit_image(read_rgb(self.paths[i]), self.size, self.resize)
        mask = load_mask(self.mask_paths[i], self.size)
        return dict(
            image=torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            box=torch.tensor(box),
            mask=torch.from_numpy(mask).float()[None],
            label=self.labels[i],
            path=self.paths[i],
            defect_type=self.defect_types[i],
        )

    def _tile_item(self, i: int, tile_box) -> dict:
        image, mask = self._native(i)
        tile, box = cut_tile(image, tile_box, self.size)
        top, left, h, w = tile_box
        rows, cols = self.size
        mask_tile = np.zeros((rows, cols), dtype=bool)
        mask_tile[:h, :w] = mask[top:top + h, left:left + w]
        label = int(mask_tile.any()) if self.mask_paths[i] else self.labels[i]
        return dict(image=torch.from_numpy(tile).permute(2, 0, 1).float().div_(255.0), box=torch.tensor(box),
                    mask=torch.from_numpy(mask_tile).float()[None], label=label, path=self.paths[i],
                    defect_type=self.defect_types[i] if label else "good")
