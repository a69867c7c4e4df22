from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ad_models.data.layout import DatasetError, scan_category
from ad_models.data.loading import ImageDataset, load_image, load_mask


def _write(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return str(path)


def test_load_image_is_rgb_uint8_resized(tmp_path):
    bgr = np.zeros((10, 20, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    image = load_image(_write(tmp_path / "red.png", bgr), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image[..., 0] == 200).all() and (image[..., 1:] == 0).all()


def test_load_image_replicates_grayscale(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    image = load_image(_write(tmp_path / "gray.png", gray), 8)
    assert image.shape == (8, 8, 3)
    assert (image[..., 0] == gray).all() and (image[..., 1] == gray).all() and (image[..., 2] == gray).all()


def test_load_image_shrinks_with_area_interpolation(tmp_path):
    dots = np.zeros((16, 16), np.uint8)
    dots[::4, ::4] = 255  # one lit pixel per 4x4 block
    image = load_image(_write(tmp_path / "dots.png", dots), 4)
    # INTER_AREA averages each block (255/16); linear or nearest sampling would miss the dots
    assert np.abs(image.astype(int) - 16).max() <= 1


def test_load_image_enlarges(tmp_path):
    image = load_image(_write(tmp_path / "small.png", np.full((4, 6), 77, np.uint8)), 12)
    assert image.shape == (12, 12, 3) and (image == 77).all()


def test_load_mask_threshold_nearest_and_empty(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 100  # below the threshold
    mask[:4, 4:] = 200
    loaded = load_mask(_write(tmp_path / "m.png", mask), 4)
    assert loaded.dtype == bool and loaded.shape == (4, 4)
    assert not loaded[:, :2].any() and loaded[:2, 2:].all() and not loaded[2:, 2:].any()
    empty = load_mask("", 5)
    assert empty.shape == (5, 5) and empty.dtype == bool and not empty.any()


def test_unreadable_and_missing_files_are_named(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image(broken, 8)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_mask(tmp_path / "gone.png", 8)
    with pytest.raises(ValueError, match="size"):
        load_image(broken, 0)


def _category(root: Path) -> Path:
    rng = np.random.default_rng(0)
    _write(root / "train" / "good" / "0.png", np.full((12, 12, 3), 255, np.uint8))
    _write(root / "train" / "good" / "1.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    _write(root / "test" / "good" / "0.png", rng.integers(0, 255, (12, 12), dtype=np.uint8))
    _write(root / "test" / "dent" / "0.png", rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    mask = np.zeros((12, 12), np.uint8)
    mask[3:9, 3:9] = 255
    _write(root / "ground_truth" / "dent" / "0_mask.png", mask)
    return root


def test_image_dataset_items(tmp_path):
    df = scan_category(_category(tmp_path / "cat"), "cat", "toy")
    dataset = ImageDataset(df, size=8)
    assert len(dataset) == 4
    white = dataset[0]
    assert white["image"].dtype == torch.float32 and white["image"].shape == (3, 8, 8)
    assert torch.all(white["image"] == 1.0)  # [0, 1], not normalised
    assert white["mask"].shape == (1, 8, 8) and white["mask"].sum() == 0
    assert white["label"] == 0 and white["defect_type"] == "good" and white["path"] == df["path"][0]
    dent = [dataset[i] for i in range(len(dataset)) if dataset[i]["label"] == 1][0]
    assert dent["defect_type"] == "dent" and dent["mask"].dtype == torch.float32
    assert set(dent["mask"].unique().tolist()) == {0.0, 1.0} and dent["mask"][0, 2:6, 2:6].all()
    assert dent["image"].min() >= 0 and dent["image"].max() <= 1

    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["label"].tolist() == df["label"].tolist()
    assert batch["defect_type"] == df["defect_type"].tolist()


def test_image_dataset_names_unreadable_file(tmp_path):
    df = scan_category(_category(tmp_path / "cat"), "cat", "toy")
    Path(df["path"][1]).write_bytes(b"corrupt")
    dataset = ImageDataset(df, size=8)
    with pytest.raises(DatasetError, match="1.png"):
        dataset[1]
    with pytest.raises(DatasetError, match="columns"):
        ImageDataset(df.drop(columns=["mask_path"]))
