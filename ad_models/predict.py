"""Score new images with a deployed model: a pass/fail verdict, an anomaly map and a defect mask each.

    table = predict_images("data/deployed/pfm/synthetic/fabric", ["a.png", "b.png"], "out/")

writes into `out/`, per image, `<name>_map.png` (the anomaly map coloured over the image, blue
normal, red anomalous, the pixel threshold mid-scale) and `<name>_mask.png` (white where the map
exceeds the pixel threshold), both at the image's own size, and `predictions.csv` (image, score,
threshold, verdict, map, mask). `<name>` is the file's stem, or, where two inputs share a stem,
its path below their common folder with "/" as "_" (test/crack/000.png -> crack_000).

The thresholds are the deployment's, set by the decision policy (`thresholds`). Every
file is written to a temporary name and renamed, so an interrupted run leaves no half file; files
in `out/` that this run does not write are left alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from ad_models.data.loading import read_rgb
from ad_models.deploy import DECISION, DEPLOYMENT, deployed_info
from ad_models.io import read_json, write_bytes, write_text
from ad_models.methods import load_method
from ad_models.runs import colourise
from ad_models.thresholds import fails

PREDICTIONS = "predictions.csv"


def model_and_thresholds(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(model folder, thresholds) for a deployment folder (its current/ model), or for a model folder
    holding a decision record (current/ itself, or a rejected/<id>/ copy kept for inspection)."""
    path = Path(path)
    info = deployed_info(path)
    if info is not None:
        return Path(info["model_dir"]), info["threshold"]
    for name in (DEPLOYMENT, DECISION):
        if (path / name).is_file():
            threshold = read_json(path / name).get("threshold")
            if not threshold:
                raise ValueError(f"{path / name} has no thresholds (the model's scores were not finite)")
            return path, threshold
    if (path / "config.json").is_file():
        raise ValueError(f"{path} is a trained model without good-image thresholds: promote it first "
                         f"(ad_models.deploy.promote), then predict with its deployment folder")
    raise FileNotFoundError(f"{path}: no deployed model here (expected current/{DEPLOYMENT}, or a model "
                            f"folder with {DEPLOYMENT} or {DECISION})")


def output_names(paths: list[Path]) -> list[str]:
    """A distinct file-name stem per input: its own stem, or, where stems collide, its path below
    the inputs' common folder with "/" replaced by "_"."""
    stems = [p.stem for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
    names = [s if stems.count(s) == 1 else p.relative_to(common).with_suffix("").as_posix().replace("/", "_")
             for s, p in zip(stems, paths)]
    repeated = sorted({str(p) for p, n in zip(paths, names) if names.count(n) > 1})
    if repeated:
        raise ValueError(f"these images would write the same output files (given twice?): {repeated}")
    return names


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    image = rgb_or_gray[..., ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise OSError(f"could not encode {path}")
    write_bytes(path, data.tobytes())


def predict_images(model: str | os.PathLike, image_paths: list[str | os.PathLike], out_dir: str | os.PathLike,
                   device: str = "auto", batch_size: int = 8) -> pd.DataFrame:
    """Score `image_paths` with the deployed model of `model` (a deployment folder, or see
    `model_and_thresholds`); write maps, masks and predictions.csv into `out_dir`; return the table.

    Images become the model's input exactly as in training and evaluation (`predict_images`, under
    the model's `resize` policy), and maps come back at each image's own size; a score
    at or above the image threshold is "fail", else "pass" (`thresholds.fails`); the mask is where the
    map is at or above the pixel threshold. A missing or undecodable file is an error
    naming it (missing files are found before anything is computed).
    """
    if isinstance(image_paths, (str, os.PathLike)):  # one path, not a list of its characters
        image_paths = [image_paths]
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no images given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_dir, threshold = model_and_thresholds(model)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
    names = output_names([p.absolute() for p in paths])
    method = load_method(model_dir, device)
    lo, pixel = float(threshold["map_low"]), float(threshold["pixel"])
    hi = pixel + max(pixel - lo, 1e-12)  # the pixel threshold in the middle of the colour scale
    out_dir = Path(out_dir)
    rows = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        originals = [read_rgb(p) for p in batch]  # names the file when it does not decode
        scores, maps = method.predict_images(originals, batch_size)
        for path, name, image, score, amap in zip(batch, names[start:], originals, scores, maps):
            overlay = (0.5 * image + 0.5 * colourise(amap, lo, hi)).astype(np.uint8)
            _write_png(out_dir / f"{name}_map.png", overlay)
            _write_png(out_dir / f"{name}_mask.png", fails(amap, pixel).astype(np.uint8) * 255)
            rows.append({"image": str(path), "score": float(score), "threshold": float(threshold["image"]),
                         "verdict": "fail" if fails(score, threshold["image"]) else "pass",
                         "map": f"{name}_map.png", "mask": f"{name}_mask.png"})
    table = pd.DataFrame(rows, columns=["image", "score", "threshold", "verdict", "map", "mask"])
    write_text(out_dir / PREDICTIONS, table.to_csv(index=False, lineterminator="\n"))
    return table
