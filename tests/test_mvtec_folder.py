"""The MVTec-layout folder source: the user's split and defect types kept exactly, masks matched by
name in any format, clear errors naming the file, and a hash of what was read."""
from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from ad_models.data.layout import DatasetError, count_table, read_inputs_record, read_manifest
from ad_models.data.sources import SOURCES, folder, prepare_category
from ad_models.data.sources import mvtec_folder as mf
from pipelines.params import load_params

SIZE = (32, 32)
# what the tree holds: split/type -> image names (a .jpg kept as is, a .webp converted to PNG)
IMAGES = {
    "train/good": ["000.png", "001.png", "002.png", "003.webp"],
    "validation/good": ["000.png"],
    "test/good": ["000.png", "001.png"],
    "test/broken_large": ["000.png", "001.png"],
    "test/scratch": ["000.jpg"],
}
MASKS = {  # masks as the user has them: `_mask` or not, PNG or BMP, 0/255 or 0/1
    "ground_truth/broken_large/000_mask.png": 255,
    "ground_truth/broken_large/001_mask.png": 255,
    "ground_truth/scratch/000.bmp": 1,
}


def write_image(path: Path, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.as_posix().encode()))  # each file its own pixels
    assert cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return path


def write_mask(path: Path, value: int, size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, np.uint8)
    mask[4:12, 6:20] = value
    assert cv2.imwrite(str(path), mask)
    return path


def build_mvtec_tree(root: Path) -> Path:
    """A tiny category folder in MVTec AD layout at `root`, with a stray text file and hidden file."""
    for folder, names in IMAGES.items():
        for name in names:
            write_image(root / folder / name)
    for rel, value in MASKS.items():
        write_mask(root / rel, value)
    (root / "readme.txt").write_text("notes of the user: not read")
    (root / "test" / "good" / ".DS_Store").write_bytes(b"\0\1")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return build_mvtec_tree(tmp_path / "lines" / "capacitor")


def test_registered_for_any_category():
    assert SOURCES["mvtec_folder"] is mf and mf.CATEGORIES is None and mf.EXPECTED_COUNTS == {}


def test_split_types_and_names_kept(tree, tmp_path):
    out = tmp_path / "out" / "capacitor"
    df = mf.prepare("capacitor", out, source_dir=tree, progress=False)
    assert count_table(df) == {f"{folder}": len(names) for folder, names in IMAGES.items()}
    written = {Path(p).relative_to(out).as_posix() for p in df["path"]}
    assert written == {f"{folder}/{Path(n).stem}.png" if n.endswith(".webp") else f"{folder}/{n}"
                       for folder, names in IMAGES.items() for n in names}
    for rel in ("train/good/000.png", "test/scratch/000.jpg"):  # kept byte for byte
        assert (out / rel).read_bytes() == (tree / rel).read_bytes()
    assert cv2.imread(str(out / "train/good/003.png")).shape == (*SIZE, 3)

    assert (df.loc[df.label == 0, "mask_path"] == "").all()  # good test images need no mask
    sources = {"test/broken_large/000.png": "ground_truth/broken_large/000_mask.png",
               "test/broken_large/001.png": "ground_truth/broken_large/001_mask.png",
               "test/scratch/000.jpg": "ground_truth/scratch/000.bmp"}
    for row in df[df.label == 1].itertuples():
        rel = Path(row.path).relative_to(out).as_posix()
        assert Path(row.mask_path) == out / "ground_truth" / row.defect_type / f"{Path(rel).stem}_mask.png"
        mask = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
        source = cv2.imread(str(tree / sources[rel]), cv2.IMREAD_GRAYSCALE)
        assert mask.ndim == 2 and np.array_equal(mask, np.where(source > 0, 255, 0))
    assert set(df.category) == {"capacitor"} and set(df.dataset) == {"mvtec_folder"}
    assert read_manifest(out).equals(df)


def test_seed_changes_nothing_and_source_dir_may_hold_the_category(tree, tmp_path):
    a = mf.prepare("capacitor", tmp_path / "a" / "capacitor", source_dir=tree, seed=0)
    b = prepare_category("mvtec_folder", "capacitor", tmp_path / "b" / "capacitor", source_dir=tree.parent, seed=7)
    relative = [df.assign(path=[Path(p).name for p in df.path], mask_path=[Path(p).name for p in df.mask_path])
                for df in (a, b)]
    assert relative[0].equals(relative[1])
    with pytest.raises(DatasetError, match=r"holds no train/ folder, nor does .*resistor; found: capacitor"):
        mf.prepare("resistor", tmp_path / "r", source_dir=tree.parent)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _emptied(path: Path) -> None:
    for p in path.iterdir():
        p.unlink()


BREAKAGES = {
    "train missing": (lambda t: _remove(t / "train"),
                      r"capacitor is not in MVTec layout: it holds no train/ folder, nor does \S*capacitor/capacitor; "
                      r"found: ground_truth, readme.txt, test, validation"),
    "train/good missing": (lambda t: _remove(t / "train/good"), r"capacitor is not usable in MVTec layout as it is:\n  train/good/ does not exist"),
    "train/good empty": (lambda t: _emptied(t / "train/good"), r"  train/good/ holds no images"),
    "test missing": (lambda t: _remove(t / "test"), r"  test/ does not exist"),
    "type without ground truth": (lambda t: _remove(t / "ground_truth/scratch"),
                                  r"  1 defect type folders without ground truth.*\n"
                                  r"    test/scratch/ \(1 images\) has no ground_truth/scratch/"),
    "image without mask": (lambda t: _remove(t / "ground_truth/broken_large/001_mask.png"),
                           r"  1 defective test images without a mask:\n    test/broken_large/001.png "
                           r"\(no ground_truth/broken_large/001_mask\.\* or 001\.\*\)"),
    "mask of another size": (lambda t: write_mask(t / "ground_truth/broken_large/000_mask.png", 255, (30, 32)),
                             r"masks whose size differs from their image:\n    ground_truth/broken_large/"
                             r"000_mask.png is 32x30, image test/broken_large/000.png is 32x32(.|\n)*"
                             r"ground_truth/broken_large/000_mask.png <- \S*capacitor/ground_truth/broken_large/"
                             r"000_mask.png"),
    "undecodable image": (lambda t: (t / "test/good/001.png").write_bytes(b"not a png"),
                          r"undecodable images:\n    test/good/001.png(.|\n)*"
                          r"test/good/001.png <- \S*capacitor/test/good/001.png"),
    "undecodable mask": (lambda t: (t / "ground_truth/scratch/000.bmp").write_bytes(b"not a bmp"),
                         r"cannot read or write(.|\n)*capacitor/ground_truth/scratch/000.bmp"),
    "defects in train": (lambda t: write_image(t / "train/crack/000.png"),
                         r"  train/ holds \['crack'\]: only train/good/ belongs there"),
    "defects in validation": (lambda t: write_image(t / "validation/crack/000.png"),
                              r"  validation/ holds \['crack'\]: only validation/good/ belongs there"),
    "image directly in test": (lambda t: write_image(t / "test/loose.png"),
                               r"  1 images directly in test/ \(they belong in test/good/ or "
                               r"test/<defect_type>/\):\n    loose.png"),
    "images in a subfolder": (lambda t: write_image(t / "test/broken_large/cam2/000.png"),
                              r"images in subfolders of test/broken_large/.*\n    test/broken_large/cam2/000.png"),
    "two images, one name": (lambda t: write_image(t / "train/good/003.png"),  # beside 003.webp
                             r"same name(.|\n)*003.png and \S*003.webp -> train/good/003.png"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_errors_name_the_file_and_keep_the_previous_folder(breakage, tree, tmp_path):
    out = tmp_path / "out" / "capacitor"
    before = mf.prepare("capacitor", out, source_dir=tree)
    damage, message = BREAKAGES[breakage]
    damage(tree)
    with pytest.raises(DatasetError, match=message):
        mf.prepare("capacitor", out, source_dir=tree)
    assert read_manifest(out).equals(before)  # the failed run left the previous version whole


def test_bad_arguments(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source_dir \S*nowhere is not a folder"):
        mf.prepare("capacitor", tmp_path / "x", source_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="folder-safe"):
        mf.prepare("../capacitor", tmp_path / "x", source_dir=tree)
    assert not (tmp_path / "x").exists()


def test_inputs_hash_follows_the_files_read(tree, tmp_path):
    out = tmp_path / "out" / "capacitor"
    mf.prepare("capacitor", out, source_dir=tree)
    first = read_inputs_record(out)
    assert first["files"] == sum(map(len, IMAGES.values())) + len(MASKS) and len(first["sha256"]) == 64

    (tree / "notes.txt").write_text("not an image: not read")
    moved = shutil.copytree(tree, tmp_path / "elsewhere" / "capacitor")  # same files, another path
    mf.prepare("capacitor", out, source_dir=moved)
    assert read_inputs_record(out) == first

    image = cv2.imread(str(tree / "test/good/000.png"))
    image[0, 0] = 255 - image[0, 0]  # one pixel of one test image
    assert cv2.imwrite(str(tree / "test/good/000.png"), image)
    mf.prepare("capacitor", out, source_dir=tree)
    changed = read_inputs_record(out)
    assert changed["sha256"] != first["sha256"] and changed["files"] == first["files"]

    (tree / "test/good/000.png").rename(tree / "test/good/100.png")  # the same bytes under another name
    mf.prepare("capacitor", out, source_dir=tree)
    assert read_inputs_record(out)["sha256"] not in (first["sha256"], changed["sha256"])


def test_params_yaml_with_a_folder_per_category(tree, tmp_path):
    build_mvtec_tree(tmp_path / "lines" / "resistor")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "datasets": {"mine": {"source": "mvtec_folder", "options": {"source_dir": "lines/{category}"}}},
        "categories": ["mine/capacitor", "mine/resistor"], "methods": ["mean_image"]}))
    params = load_params(path)
    for name in ("capacitor", "resistor"):
        source, category, options = params.source_of(f"mine/{name}")
        assert (source, category) == ("mvtec_folder", name)
        assert options["source_dir"] == str(tmp_path / "lines" / name)  # relative to params.yaml
        df = prepare_category(source, category, params.dataset_dir(f"mine/{name}"), **options)
        assert count_table(df)["test/broken_large"] == 2 and set(df.category) == {name}


def test_the_folder_source_records_its_inputs_the_same_way(tmp_path):
    for i in range(3):
        write_image(tmp_path / "ok" / f"{i}.png")
    out = tmp_path / "out" / "parts"
    folder.prepare("parts", out, good_dir=tmp_path / "ok", test_good_fraction=0.0)
    first = read_inputs_record(out)
    assert first["files"] == 3
    write_image(tmp_path / "ok" / "3.png")
    folder.prepare("parts", out, good_dir=tmp_path / "ok", test_good_fraction=0.0)
    assert read_inputs_record(out)["sha256"] != first["sha256"]
