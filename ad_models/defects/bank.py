"""The synthetic validation bank: artificial defects on held-out good training images.

Every method picks its thresholds and checkpoints here, never on the test set, so a model can be
trained, calibrated and deployed from good images alone. One bank per category:

    <bank>/good/<nnnn>_<stem>.png                 held-out good images (resized)
    <bank>/defective/<variant>/<nnnn>_<stem>_<j>.png   artificial defects on them
    <bank>/masks/<variant>/<nnnn>_<stem>_<j>_mask.png  their masks (0/255)
    <bank>/manifest.csv                           the usual manifest columns (split "validation")
    <bank>/holdout.csv                            the train images held out (relative to the dataset),
                                                  which training must leave out
    <bank>/bank.json                              config, seed, counts

Which images are held out depends only on each image's path and the seed (a hash), so adding new
good images never reshuffles the bank. Each held-out image gets `defects_per_image` defects,
cycling through the configured `variants` (different masks, sources and blends), so the bank does
not favour any one method's own training defects.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ad_models.data.layout import COLUMNS, MANIFEST_NAME, read_manifest, write_manifest
from ad_models.data.loading import check_resize, content_box, read_rgb, resize_rgb
from ad_models.defects.synthesis import DefectConfig, DefectSynthesizer
from ad_models.io import atomic_dir, atomic_path, read_json, write_json

HOLDOUT_NAME = "holdout.csv"
BANK_INFO = "bank.json"


def default_variants() -> dict[str, dict[str, Any]]:
    return {
        "perlin_texture": {"masks": {"perlin": 1.0}, "source": "procedural", "blend": "replace"},
        "perlin_blend": {"masks": {"perlin": 1.0}, "source": "procedural", "blend": "beta"},
        "stroke": {"masks": {"stroke": 1.0, "rectangle": 0.5}, "source": "procedural", "blend": "replace"},
        "cutpaste": {"masks": {"rectangle": 1.0}, "source": "self", "blend": "cutpaste"},
        "cutpaste_scar": {"masks": {"rectangle": 1.0}, "source": "self", "blend": "cutpaste_scar"},
    }


@dataclass
class BankConfig:
    holdout_fraction: float = 0.1  # share of train/good held out of training
    min_holdout: int = 4  # at least this many, whatever the fraction
    defects_per_image: int = 2
    image_size: int = 256  # bank images are written at this size (methods resize as they train)
    # "keep_aspect": the long side is image_size and the aspect kept, for categories whose models
    # use the keep_aspect resize policy (a squashed bank would not look like their inputs); "tiles":
    # the images at their own size, for models that tile (image_size is then unused)
    resize: str = "stretch"
    foreground: bool = False  # keep defects on the object (object categories on a plain background)
    variants: dict = field(default_factory=default_variants)  # name -> DefectConfig dict
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.min_holdout < 1 or self.defects_per_image < 1 or self.image_size < 8:
            raise ValueError("min_holdout and defects_per_image must be >= 1, image_size >= 8")
        check_resize(self.resize)
        if not self.variants:
            raise ValueError("variants: at least one defect variant is needed")
        for name, spec in self.variants.items():
            try:
                DefectConfig.from_dict({**spec, "p_defect": 1.0, "foreground": self.foreground})
            except (TypeError, ValueError) as e:
                raise ValueError(f"variants.{name}: {e}") from e

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "BankConfig":
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"defect bank: unknown option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**values)


def holdout_paths(paths: list[str], fraction: float, minimum: int, seed: int) -> list[str]:
    """The paths held out: hash(seed, path) below `fraction`, topped up to `minimum` by lowest hash.
    `paths` should be relative (stable across machines); at least one path stays for training."""
    def unit(path: str) -> float:
        digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64
    ranked = sorted(paths, key=unit)
    chosen = [p for p in ranked if unit(p) < fraction]
    count = min(max(len(chosen), minimum), len(paths) - 1)
    return sorted(ranked[:count])


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rgb_or_gray[..., ::-1] if rgb_or_gray.ndim == 3 else rgb_or_gray
    if not cv2.imwrite(str(path), np.ascontiguousarray(image)):
        raise OSError(f"could not write {path}")


def build_bank(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike,
               config: BankConfig | dict | None = None, progress: bool = True) -> pd.DataFrame:
    """Hold out good training images of `dataset_dir` and write the bank into `out_dir` (atomically)."""
    cfg = config if isinstance(config, BankConfig) else BankConfig.from_dict(config)
    dataset_dir = Path(dataset_dir).absolute()
    manifest = read_manifest(dataset_dir)
    train = manifest[(manifest.split == "train") & (manifest.label == 0)]
    if len(train) < 2:
        raise ValueError(f"{dataset_dir}: {len(train)} good training image(s); a validation bank needs at least 2")
    relative = {Path(p).relative_to(dataset_dir).as_posix(): p for p in train.path}
    held_out = holdout_paths(list(relative), cfg.holdout_fraction, cfg.min_holdout, cfg.seed)
    category, dataset = str(train.category.iloc[0]), str(train.dataset.iloc[0])
    names = list(cfg.variants)
    synthesizers = {name: DefectSynthesizer(DefectConfig.from_dict(
        {**spec, "p_defect": 1.0, "foreground": cfg.foreground})) for name, spec in cfg.variants.items()}
    generator = torch.Generator().manual_seed(cfg.seed)

    rows = []
    with atomic_dir(out_dir) as tmp:
        for i, rel in enumerate(tqdm(held_out, desc=f"defect bank {category}", disable=not progress, leave=False)):
            image = read_rgb(relative[rel])
            image = resize_rgb(image, content_box(*image.shape[:2], cfg.image_size, cfg.resize)[2:])
            stem = f"{i:04d}_{Path(rel).stem}"
            _write_png(tmp / "good" / f"{stem}.png", image)
            rows.append([f"good/{stem}.png", "validation", 0, "good", ""])
            tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
            for j in range(cfg.defects_per_image):
                variant = names[(i * cfg.defects_per_image + j) % len(names)]
                defective, mask = synthesizers[variant](tensor, generator)
                out = (defective[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
                mask = (mask[0, 0] > 0.5).numpy().astype(np.uint8) * 255
                image_rel = f"defective/{variant}/{stem}_{j}.png"
                mask_rel = f"masks/{variant}/{stem}_{j}_mask.png"
                _write_png(tmp / image_rel, out)
                _write_png(tmp / mask_rel, mask)
                rows.append([image_rel, "validation", 1, f"synthetic_{variant}", mask_rel])
        table = pd.DataFrame(rows, columns=["path", "split", "label", "defect_type", "mask_path"])
        table = table.assign(category=category, dataset=dataset)[COLUMNS]
        table["path"] = [str(tmp / p) for p in table.path]
        table["mask_path"] = [str(tmp / p) if p else "" for p in table.mask_path]
        write_manifest(table, tmp)
        with atomic_path(tmp / HOLDOUT_NAME) as f:
            pd.DataFrame({"path": held_out}).to_csv(f, index=False, lineterminator="\n")
        counts = {"held_out_good": len(held_out), "train_remaining": len(train) - len(held_out),
                  "defective": int(table.label.sum()),
                  "per_variant": {f"synthetic_{n}": int((table.defect_type == f"synthetic_{n}").sum()) for n in names}}
        write_json(tmp / BANK_INFO, {"config": asdict(cfg), "dataset_dir": str(dataset_dir), "counts": counts})
    return read_bank(out_dir)[0]


def read_bank(bank_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """(the bank's manifest with absolute paths, the held-out train paths relative to the dataset)."""
    bank_dir = Path(bank_dir)
    for name in (MANIFEST_NAME, HOLDOUT_NAME):
        if not (bank_dir / name).is_file():
            raise FileNotFoundError(f"{bank_dir / name} not found: the defect bank is not built "
                                    f"(materialize the defect_bank asset)")
    held_out = pd.read_csv(bank_dir / HOLDOUT_NAME, dtype=str, keep_default_na=False).path.tolist()
    return read_manifest(bank_dir), held_out


def bank_info(bank_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(bank_dir) / BANK_INFO)


def bank_preview(manifest: pd.DataFrame, per_variant: int = 2, tile: int = 96) -> np.ndarray:
    """BGR grid: one row per (variant, example): image | mask | mask outlined on the image."""
    rows = []
    for _, group in manifest[manifest.label == 1].groupby("defect_type", sort=True):
        for path, mask_path in zip(group.path[:per_variant], group.mask_path[:per_variant]):
            image = cv2.resize(cv2.imread(path), (tile, tile), interpolation=cv2.INTER_AREA)
            mask = cv2.resize(cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE), (tile, tile),
                              interpolation=cv2.INTER_NEAREST)
            overlay = image.copy()
            overlay[mask > 127] = (0.5 * overlay[mask > 127] + (0, 0, 127)).astype(np.uint8)
            contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(overlay, contours, -1, (0, 0, 255), 1)
            cv2.putText(image, Path(path).parent.name[:14], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (255, 255, 255), 1, cv2.LINE_AA)
            rows.append(np.concatenate([image, cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR), overlay], 1))
    return np.concatenate(rows, 0) if rows else np.full((tile, 3 * tile, 3), 255, np.uint8)
