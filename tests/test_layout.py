from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ad_models.data.layout import (
    COLUMNS,
    DatasetError,
    read_manifest,
    scan_category,
    validate_manifest,
    write_manifest,
)


def _image(path: Path, size=(8, 8), ext_ok=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(len(str(path))).integers(0, 255, (*size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def _mask(path: Path, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[2:4, 2:5] = 255
    assert cv2.imwrite(str(path), mask)
    return path


def make_category(root: Path) -> Path:
    # written in a scrambled order: the scan must sort
    _image(root / "test" / "scratch" / "001.png")
    _mask(root / "ground_truth" / "scratch" / "001.png")  # the "<stem>.png" mask naming
    _image(root / "test" / "scratch" / "000.png")
    _mask(root / "ground_truth" / "scratch" / "000_mask.png")
    _image(root / "train" / "good" / "b.JPG")  # upper-case extension
    _image(root / "train" / "good" / "a.png")
    _image(root / "train" / "good" / "c.bmp")
    _image(root / "validation" / "good" / "v.tiff")
    _image(root / "test" / "good" / "g.jpeg")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    return root


def test_scan_category_rows_columns_and_order(tmp_path):
    root = make_category(tmp_path / "cat")
    df = scan_category(root, "cat", "toy")
    assert list(df.columns) == COLUMNS
    rel = [Path(p).relative_to(root).as_posix() for p in df["path"]]
    assert rel == [
        "train/good/a.png", "train/good/b.JPG", "train/good/c.bmp",
        "validation/good/v.tiff",
        "test/good/g.jpeg", "test/scratch/000.png", "test/scratch/001.png",
    ]
    assert df["split"].tolist() == ["train"] * 3 + ["validation", "test", "test", "test"]
    assert df["label"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert df["defect_type"].tolist() == ["good"] * 5 + ["scratch", "scratch"]
    masks = [Path(m).relative_to(root).as_posix() if m else "" for m in df["mask_path"]]
    assert masks == [""] * 5 + ["ground_truth/scratch/000_mask.png", "ground_truth/scratch/001.png"]
    assert set(df["category"]) == {"cat"} and set(df["dataset"]) == {"toy"}
    assert all(Path(p).is_absolute() for p in df["path"])
    pd.testing.assert_frame_equal(df, scan_category(root, "cat", "toy"))
    validate_manifest(df)  # a sound folder passes


def test_scan_refuses_defects_in_train_and_missing_folder(tmp_path):
    root = make_category(tmp_path / "cat")
    _image(root / "train" / "scratch" / "x.png")
    with pytest.raises(DatasetError, match="train/good"):
        scan_category(root, "cat", "toy")
    with pytest.raises(DatasetError, match="does not exist"):
        scan_category(tmp_path / "nowhere", "cat", "toy")


def test_validate_lists_every_problem_with_the_files(tmp_path):
    root = make_category(tmp_path / "cat")
    (root / "test" / "good" / "broken.png").write_bytes(b"\x89PNG not really")
    _image(root / "test" / "hole" / "nomask.png")
    _image(root / "test" / "hole" / "big.png", size=(8, 8))
    _mask(root / "ground_truth" / "hole" / "big_mask.png", size=(6, 9))
    df = scan_category(root, "cat", "toy")
    with pytest.raises(DatasetError) as info:
        validate_manifest(df)
    message = str(info.value)
    assert str(root) in message and "cat" in message
    assert "1 missing, unreadable or undecodable images" in message and "test/good/broken.png" in message
    assert "1 defective test images without a mask file" in message and "test/hole/nomask.png" in message
    assert "1 masks whose size differs" in message and "ground_truth/hole/big_mask.png is 9x6" in message


def test_validate_empty_train_good(tmp_path):
    root = make_category(tmp_path / "cat")
    df = scan_category(root, "cat", "toy")
    with pytest.raises(DatasetError, match="train/good is empty"):
        validate_manifest(df[df["split"] != "train"].reset_index(drop=True))


def test_validate_lists_first_twenty_and_a_count(tmp_path):
    root = make_category(tmp_path / "cat")
    for i in range(25):
        _image(root / "test" / "crack" / f"{i:02d}.png")
    with pytest.raises(DatasetError) as info:
        validate_manifest(scan_category(root, "cat", "toy"))
    message = str(info.value)
    assert "25 defective test images without a mask file" in message
    assert "test/crack/19.png" in message and "test/crack/20.png" not in message
    assert "... and 5 more" in message


def test_validate_checks_columns_and_consistency(tmp_path):
    df = scan_category(make_category(tmp_path / "cat"), "cat", "toy")
    with pytest.raises(DatasetError, match="columns"):
        validate_manifest(df.drop(columns=["dataset"]))
    bad = df.copy()
    bad.loc[0, "label"] = 1  # a train/good image labelled defective
    with pytest.raises(DatasetError, match="disagree"):
        validate_manifest(bad)


def test_manifest_roundtrip_relative_paths(tmp_path):
    root = make_category(tmp_path / "cat")
    df = scan_category(root, "cat", "toy")
    manifest = write_manifest(df, root)
    assert manifest == root / "manifest.csv"
    text = manifest.read_text()
    assert str(tmp_path) not in text  # relative paths: the folder can move
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert "train/good/a.png,train,0,good,,cat,toy" in text
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp file left behind
    pd.testing.assert_frame_equal(read_manifest(root), df)

    moved = tmp_path / "moved"
    root.rename(moved)
    back = read_manifest(moved)
    assert back["path"].tolist() == [p.replace(str(root), str(moved)) for p in df["path"]]
    assert all(Path(p).is_file() for p in back["path"])


def test_write_manifest_refuses_paths_outside_root(tmp_path):
    df = scan_category(make_category(tmp_path / "cat"), "cat", "toy")
    with pytest.raises(DatasetError, match="not inside"):
        write_manifest(df, tmp_path / "elsewhere")


def test_read_manifest_missing_says_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "manifest.csv")) + ".*not prepared"):
        read_manifest(tmp_path)
