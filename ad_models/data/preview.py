"""A sample grid of a prepared category: a few images per defect type, defects outlined in red."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd

from ad_models.data.layout import read_image_file


def sample_grid(manifest: pd.DataFrame, per_type: int = 3, tile: int = 96) -> np.ndarray:
    """BGR grid (OpenCV's order), one row per (split, defect type) in manifest order, `per_type` images per row."""
    rows = []
    for (split, defect_type), group in manifest.groupby(["split", "defect_type"], sort=False):
        tiles = []
        for path, mask_path in zip(group.path[:per_type], group.mask_path[:per_type]):
            image = read_image_file(path)
            image = np.zeros((tile, tile, 3), np.uint8) if image is None else cv2.resize(
                image, (tile, tile), interpolation=cv2.INTER_AREA)
            mask = read_image_file(mask_path, cv2.IMREAD_GRAYSCALE) if mask_path else None
            if mask is not None:
                mask = cv2.resize(mask, (tile, tile), interpolation=cv2.INTER_NEAREST) > 127
                contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(image, contours, -1, (0, 0, 255), 1)
            tiles.append(image)
        tiles += [np.full((tile, tile, 3), 255, np.uint8)] * (per_type - len(tiles))
        label = np.full((tile, tile, 3), 255, np.uint8)
        for k, text in enumerate((split, defect_type[:14])):
            cv2.putText(label, text, (3, 20 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([label] + tiles, 1))
    return np.concatenate(rows, 0) if rows else np.full((tile, tile, 3), 255, np.uint8)
