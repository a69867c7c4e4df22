"""Reading images and masks, and a torch Dataset over a manifest.

Images come out as float tensors in [0, 1] without normalisation: each backbone normalises
its input itself, so the data never has to know which network will read it.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from ad_models.data.layout import COLUMNS, DatasetError, read_image_file


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int (pixels per side), got {size!r}")
    return int(size)


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


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB image as size x size, the way every model sees its input: area interpolation when
    shrinking (no aliasing), bilinear when enlarging."""
    size = _check_size(size)
    h, w = image.shape[:2]
    if (h, w) != (size, size):
        shrinking = size < h or size < w
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return image


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read an image as size x size x 3 uint8 RGB (grayscale replicated to 3 channels)."""
    size = _check_size(size)
    return resize_rgb(read_rgb(path), size)


def load_mask(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read a mask as size x size bool (> 127 is defective); an empty path means no defect."""
    size = _check_size(size)
    if not path:
        return np.zeros((size, size), dtype=bool)
    mask = _read(path, cv2.IMREAD_GRAYSCALE, "mask")
    if mask.shape != (size, size):
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return mask > 127


class ImageDataset(torch.utils.data.Dataset):
    """The rows of a manifest as dicts of image [3,H,W] float in [0,1], mask [1,H,W] float 0/1,
    label, path and defect_type."""

    def __init__(self, manifest: pd.DataFrame, size: int = 256):
        if not isinstance(manifest, pd.DataFrame):
            raise TypeError(f"manifest must be a pandas DataFrame, got {type(manifest).__name__}")
        missing = [c for c in COLUMNS if c not in manifest.columns]
        if missing:
            raise DatasetError(f"manifest lacks the columns {missing}; expected {COLUMNS}")
        self.size = _check_size(size)
        self.paths = [str(p) for p in manifest["path"]]
        self.mask_paths = [str(p) for p in manifest["mask_path"]]
        self.labels = [int(x) for x in manifest["label"]]
        self.defect_types = [str(x) for x in manifest["defect_type"]]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = load_image(self.paths[i], self.size)
        mask = load_mask(self.mask_paths[i], self.size)
        return dict(
            image=torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            mask=torch.from_numpy(mask).float()[None],
            label=self.labels[i],
            path=self.paths[i],
            defect_type=self.defect_types[i],
        )
