"""Small helpers that turn files and numbers into Dagster metadata the UI renders."""
from __future__ import annotations

import base64
from pathlib import Path

import cv2
import dagster as dg
import numpy as np


def png_preview(path: Path, max_width: int = 480) -> dg.MetadataValue:
    """An inline, downscaled PNG as markdown, so the UI shows it without opening files."""
    return image_preview(cv2.imread(str(path)), path.name, max_width)


def image_preview(image: np.ndarray, name: str, max_width: int = 480) -> dg.MetadataValue:
    """A BGR image array as inline markdown, downscaled to `max_width`."""
    if image.shape[1] > max_width:
        scale = max_width / image.shape[1]
        image = cv2.resize(image, (max_width, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".png", image)
    return png_markdown(data.tobytes(), name)


def png_markdown(png: bytes, name: str) -> dg.MetadataValue:
    """PNG bytes as inline markdown, as they are (a figure already drawn at preview size)."""
    return dg.MetadataValue.md(f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})")


def markdown_table(header: list[str], rows: list[list]) -> dg.MetadataValue:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def floats(values: dict, keys: list[str]) -> dict[str, dg.MetadataValue]:
    return {k: dg.MetadataValue.float(float(values[k])) for k in keys
            if isinstance(values.get(k), (int, float))}
