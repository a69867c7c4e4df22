"""The user-folder source: hash split of good images, defective images with parallel masks, formats."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ad_models.data.layout import DatasetError, count_table
from ad_models.data.sources import folder
from ad_models.data.sources.magnetic_tile import is_test_good

SIZE = (20, 28)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path


def _mask(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(SIZE, np.uint8)
    mask[3:9, 4:12] = value
    assert cv2.imwrite(str(path), mask)
    return path


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    good, bad, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    for i in range(30):
        _image(good / f"part_{i:02d}.png")
    _image(good / "line2" / "part_00.png")  # same name in a subfolder: kept apart
    _image(good / "scan.bmp")  # copied as is
    _image(good / "photo.webp")  # converted to PNG
    (good / "notes.txt").write_text("not an image")
    _image(bad / "d1.jpg")  # directly in defective_dir: defect type "defect"
    _mask(masks / "d1_mask.png", 255)
    _image(bad / "scratch" / "s1.png")  # in a subfolder: defect type "scratch"
    _mask(masks / "scratch" / "s1.bmp", 1)  # a 0/1 mask in another format, without "_mask"
    return {"good_dir": good, "defective_dir": bad, "mask_dir": masks}


def test_folders_restructured(folders, tmp_path):
    out = tmp_path / "my-parts"
    df = folder.prepare("my-parts", out, **folders, progress=False)
    names = [p.relative_to(folders["good_dir"]).as_posix() for p in sorted(folders["good_dir"].rglob("*"))
             if p.suffix != ".txt" and p.is_file()]
    n_test = sum(is_test_good(n, 0.2) for n in names)
    assert count_table(df) == {"test/defect": 1, "test/good": n_test, "test/scratch": 1,
                               "train/good": len(names) - n_test}
    assert 0 < n_test < len(names)
    by_name = {Path(p).name: p for p in df["path"]}
    assert "line2__part_00.png" in by_name and "part_00.png" in by_name
    assert Path(by_name["scan.bmp"]).read_bytes() == (folders["good_dir"] / "scan.bmp").read_bytes()
    assert "photo.png" in by_name and cv2.imread(by_name["photo.png"]).shape == (*SIZE, 3)
    for row in df[df["label"] == 1].itertuples():
        mask = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and set(np.unique(mask)) == {0, 255} and mask.shape == SIZE
    assert set(df["category"]) == {"my-parts"} and set(df["dataset"]) == {"folder"}

    # the split is a hash of the name: a new image never moves the old ones
    _image(folders["good_dir"] / "part_99.png")
    more = folder.prepare("my-parts", out, **folders, progress=False)
    old = {Path(p).name: s for p, s in zip(df["path"], df["split"])}
    assert all(old[Path(p).name] == s for p, s in zip(more["path"], more["split"]) if Path(p).name in old)


def test_good_only_and_masks_beside_images(tmp_path):
    good = tmp_path / "good"
    for i in range(6):
        _image(good / f"{i}.png")
    df = folder.prepare("x", tmp_path / "x", good_dir=good, test_good_fraction=0.0)
    assert count_table(df) == {"train/good": 6}
    bad = tmp_path / "bad"
    _image(bad / "a.png")
    _mask(bad / "a_mask.png", 255)
    df = folder.prepare("y", tmp_path / "y", good_dir=good, defective_dir=bad, mask_dir=bad)
    assert count_table(df)["test/defect"] == 1


def test_folder_errors(folders, tmp_path):
    (folders["mask_dir"] / "scratch" / "s1.bmp").unlink()
    with pytest.raises(DatasetError, match=r"1 defective images .* have no mask .*\n  scratch/s1.png"):
        folder.prepare("p", tmp_path / "p", **folders)
    _mask(folders["mask_dir"] / "scratch" / "s1.png", 255)
    _image(folders["good_dir"] / "part_00.webp")  # would become part_00.png beside part_00.png
    with pytest.raises(DatasetError, match="same name"):
        folder.prepare("p", tmp_path / "p", **folders)
    with pytest.raises(ValueError, match="folder-safe"):
        folder.prepare("../p", tmp_path / "p", **folders)
    with pytest.raises(ValueError, match="go together"):
        folder.prepare("p", tmp_path / "p", good_dir=folders["good_dir"], defective_dir=folders["defective_dir"])
    with pytest.raises(FileNotFoundError, match="good_dir"):
        folder.prepare("p", tmp_path / "p", good_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        folder.prepare("p", tmp_path / "p", good_dir=tmp_path / "empty")
    assert not (tmp_path / "p").exists()
