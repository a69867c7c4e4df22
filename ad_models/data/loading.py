"""Reading images and masks, and a torch Dataset over a manifest.

Images come out as float tensors in [0, 1] without normalisation: each backbone normalises
its input itself, so the data never has to know which network will read it.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from ad_models.data.layout import COLUMNS, DatasetError, read_image_file


RESIZE_POLICIES = ("stretch", "keep_aspect")
"""How an image becomes the model's [height, width] input: `stretch` resizes it to exactly that
(squashing elongated parts); `keep_aspect` scales it to fit inside, keeping its aspect ratio, and
fills the rest with a reflected border that maps, image scores and metrics ignore."""


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
    of `size` under `resize`: all of it for stretch, the centred, aspect-keeping fit for keep_aspect."""
    rows, cols = image_shape(size)
    if check_resize(resize) == "stretch":
        return 0, 0, rows, cols
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

    The mask is the ground truth stretched to [H, W] under every policy: the frame evaluation
    compares maps in, once `AnomalyMethod.predict_dataset` has cut the padding off them
    (`restore_map`), so metrics never see padding and stretch and keep_aspect are scored alike."""

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

    def __len__(self) -> int:
        return len(self.paths)

    def with_resize(self, resize: str) -> "ImageDataset":
        """The same images and masks (same size, so maps stay comparable) under another policy:
        how a model sees a shared validation set its own way."""
        other = copy.copy(self)
        other.resize = check_resize(resize)
        return other

    def __getitem__(self, i: int) -> dict:
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
