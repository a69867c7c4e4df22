"""The public benchmark sources, on tiny archives built here with exactly the published layouts
and file names (a few 32x32 images per folder)."""
from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ad_models.data.layout import DatasetError, count_problems, count_table, read_manifest
from ad_models.data.sources import dagm, mvtec_3d, mvtec_ad, visa

SIZE = (24, 32)  # height, width: not square, so a transposed mask would be caught


# ----------------------------------------------------------------------------- building raw trees

def _image(path: Path, gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(list(hashlib.sha256(path.name.encode()).digest()))
    pixels = rng.integers(0, 256, SIZE if gray else (*SIZE, 3), dtype=np.uint8)
    ok, data = cv2.imencode(path.suffix.lower(), pixels)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def _mask(path: Path, value: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(SIZE, np.uint8)
    mask[4:10, 5:20] = value
    ok, data = cv2.imencode(".png", mask)
    path.write_bytes(data.tobytes())
    return path


def _archive(tree: Path, archive: Path) -> Path:
    """Pack the contents of `tree` (not the folder itself) like the published archives."""
    members = sorted(tree.rglob("*"))
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            for p in members:
                zf.write(p, p.relative_to(tree).as_posix())
    else:
        mode = "w:xz" if archive.name.endswith(".xz") else "w"
        with tarfile.open(archive, mode) as tf:
            for p in members:
                tf.add(p, p.relative_to(tree).as_posix(), recursive=False)
    return archive


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mvtec_ad_tree(root: Path, defects=("broken_large", "broken_small", "contamination")) -> Path:
    cat = root / "bottle"
    for i in range(3):
        _image(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _image(cat / "test" / "good" / f"{i:03d}.png")
    for defect in defects:
        for i in range(2):
            _image(cat / "test" / defect / f"{i:03d}.png")
            _mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    (root / "readme.txt").write_text("MVTec AD\n")
    return root


def mvtec_3d_tree(root: Path) -> Path:
    cat = root / "bagel"
    for split, defect, n in [("train", "good", 3), ("validation", "good", 2), ("test", "good", 2),
                             ("test", "crack", 2), ("test", "hole", 1)]:
        for i in range(n):
            _image(cat / split / defect / "rgb" / f"{i:03d}.png")
            xyz = cat / split / defect / "xyz" / f"{i:03d}.tiff"
            xyz.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(xyz), np.zeros((*SIZE, 3), np.float32))
            if split == "test":
                _mask(cat / split / defect / "gt" / f"{i:03d}.png", value=0 if defect == "good" else 255)
    (cat / "calibration").mkdir()
    (cat / "calibration" / "camera_parameters.json").write_text("{}")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    return root


def visa_tree(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for category in ("candle", "capsules"):
        data = root / category / "Data"
        for i, split in enumerate(["train", "train", "train", "test", "test"]):
            _image(data / "Images" / "Normal" / f"{i:04d}.JPG")
            rows.append(f"{category},{split},normal,{category}/Data/Images/Normal/{i:04d}.JPG,")
        for i in range(2):
            _image(data / "Images" / "Anomaly" / f"{i:03d}.JPG")
            _mask(data / "Masks" / "Anomaly" / f"{i:03d}.png", value=1)  # VisA masks are 0/1
            rows.append(f"{category},test,anomaly,{category}/Data/Images/Anomaly/{i:03d}.JPG,"
                        f"{category}/Data/Masks/Anomaly/{i:03d}.png")
        (root / category / "image_anno.csv").write_text("image,label,mask\n")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (root / "split_csv" / "2cls_fewshot.csv").write_text("object,split,label,image,mask\n")
    (root / "LICENSE-DATASET").write_text("CC BY 4.0\n")
    return root


def dagm_tree(class_dir: Path) -> Path:
    """ClassN/{Train,Test}: 0001-0004 defect-free, 0005-0006 defective, labels as published."""
    for split in ("Train", "Test"):
        lines = ["1"]
        for i in range(1, 7):
            name = f"{i:04d}.PNG"
            _image(class_dir / split / name, gray=True)
            if i <= 4:
                lines.append(f"{i}\t0\t{name}\t0\t0")
            else:
                _mask(class_dir / split / "Label" / f"{i:04d}_label.PNG")
                lines.append(f"{i}\t1\t{name}\t0\t{i:04d}_label.PNG")
        (class_dir / split / "Label").mkdir(parents=True, exist_ok=True)
        (class_dir / split / "Label" / "Labels.txt").write_text("\ufeff" + "\n".join(lines) + "\n")
    return class_dir


# ----------------------------------------------------------------------------- checks shared by all

def check_manifest(df: pd.DataFrame, out: Path) -> None:
    """Labels agree with folders, masks are 0/255, single channel, same size as their image."""
    assert (df["label"] == (df["defect_type"] != "good")).all()
    assert (df.loc[df["label"] == 1, "split"] == "test").all()
    assert df.equals(read_manifest(out))
    for row in df[df["label"] == 1].itertuples():
        mask = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
        image = cv2.imread(row.path, cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2 and set(np.unique(mask)) == {0, 255}
        assert mask.shape == image.shape[:2]
        assert Path(row.mask_path).name == f"{Path(row.path).stem}_mask.png"


def relative(df: pd.DataFrame, out: Path) -> list[tuple]:
    return [(Path(p).relative_to(out).as_posix(), s, l, t) for p, s, l, t in
            zip(df["path"], df["split"], df["label"], df["defect_type"])]


# ----------------------------------------------------------------------------- counts

def test_count_table_and_problems():
    df = pd.DataFrame({"split": ["train"] * 3 + ["test"] * 4,
                       "defect_type": ["good"] * 3 + ["good", "crack", "crack", "hole"]})
    assert count_table(df) == {"test/crack": 2, "test/good": 1, "test/hole": 1, "train/good": 3}
    assert count_problems(df, count_table(df)) == []
    problems = count_problems(df, {"train/good": 5, "test/good": 1, "test/crack": 2, "test/scratch": 4})
    assert problems == ["train/good: 3 images, expected 5", "test/scratch: missing, expected 4 images",
                        "test/hole: 1 images, none expected"]
    # "test/*": all defective test images together, whatever their types
    assert count_problems(df, {"train/good": 3, "test/good": 1, "test/*": 3}) == []
    assert count_problems(df, {"train/good": 3, "test/good": 1, "test/*": 5}) == [
        "defective test images (all types): 3 images, expected 5"]


# ----------------------------------------------------------------------------- MVTec AD

def test_mvtec_ad_archive_and_source_dir(tmp_path):
    tree = mvtec_ad_tree(tmp_path / "staging")
    archive = _archive(tree, tmp_path / "mvtec_anomaly_detection.tar.xz")
    out = tmp_path / "datasets" / "mvtec_ad" / "bottle"
    df = mvtec_ad.prepare("bottle", out, archive=archive, sha256=_sha256(archive), progress=False)
    check_manifest(df, out)
    assert count_table(df) == {"test/broken_large": 2, "test/broken_small": 2, "test/contamination": 2,
                               "test/good": 2, "train/good": 3}
    for row in df.itertuples():  # images copied byte for byte, masks too (they already were 0/255 PNGs)
        for path in filter(None, (row.path, row.mask_path)):
            assert Path(path).read_bytes() == (tree / "bottle" / Path(path).relative_to(out)).read_bytes()
    assert (out.parent / "_raw").is_dir()  # the default raw_dir, shared by the dataset's categories

    again = mvtec_ad.prepare("bottle", tmp_path / "b" / "bottle", source_dir=tree, progress=False)
    assert relative(again, tmp_path / "b" / "bottle") == relative(df, out)

    # a truncated copy: the counts check names what is short and what is missing
    problems = count_problems(df, mvtec_ad.EXPECTED_COUNTS["bottle"])
    assert "train/good: 3 images, expected 209" in problems
    assert "test/contamination: 2 images, expected 21" in problems
    truncated = mvtec_ad_tree(tmp_path / "truncated", defects=("broken_large",))
    short = mvtec_ad.prepare("bottle", tmp_path / "t" / "bottle", source_dir=truncated, progress=False)
    problems = count_problems(short, mvtec_ad.EXPECTED_COUNTS["bottle"])
    assert "test/contamination: missing, expected 21 images" in problems


def test_mvtec_ad_wrong_layouts_fail_clearly_and_keep_the_old_folder(tmp_path):
    tree = mvtec_ad_tree(tmp_path / "raw")
    out = tmp_path / "bottle"
    mvtec_ad.prepare("bottle", out, source_dir=tree, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    with pytest.raises(FileNotFoundError, match=r"no 'cable' folder .*found: bottle, license.txt"):
        mvtec_ad.prepare("cable", tmp_path / "cable", source_dir=tree, progress=False)
    (tree / "bottle" / "ground_truth" / "contamination" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"contamination/001.png \(no ground_truth/contamination/001_mask.png\)"):
        mvtec_ad.prepare("bottle", out, source_dir=tree, progress=False)
    _mask(tree / "bottle" / "ground_truth" / "contamination" / "001_mask.png")
    (tree / "bottle" / "test" / "good" / "000.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="test/good/000.png"):
        mvtec_ad.prepare("bottle", out, source_dir=tree, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the previous version is intact
    with pytest.raises(ValueError, match="unknown mvtec_ad category"):
        mvtec_ad.prepare("bagel", out, source_dir=tree)


# ----------------------------------------------------------------------------- MVTec 3D-AD

def test_mvtec_3d_takes_rgb_and_gt_and_keeps_validation(tmp_path):
    tree = mvtec_3d_tree(tmp_path / "staging")
    archive = _archive(tree, tmp_path / "mvtec_3d_anomaly_detection.tar.xz")
    out = tmp_path / "bagel"
    df = mvtec_3d.prepare("bagel", out, archive=archive, sha256=_sha256(archive), progress=False)
    check_manifest(df, out)
    assert count_table(df) == {"test/crack": 2, "test/good": 2, "test/hole": 1, "train/good": 3, "validation/good": 2}
    assert not list(out.rglob("*.tiff")) and not (out / "ground_truth" / "good").exists()
    row = df[df["defect_type"] == "crack"].iloc[0]
    assert Path(row["path"]).read_bytes() == (tree / "bagel" / "test" / "crack" / "rgb" / "000.png").read_bytes()
    assert row["mask_path"].endswith("ground_truth/crack/000_mask.png")
    assert count_problems(df, mvtec_3d.EXPECTED_COUNTS["bagel"]) == [
        "train/good: 3 images, expected 244", "validation/good: 2 images, expected 22",
        "test/good: 2 images, expected 22", "defective test images (all types): 3 images, expected 88"]

    (tree / "bagel" / "test" / "hole" / "gt" / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"hole/rgb/000.png \(no test/hole/gt/000.png\)"):
        mvtec_3d.prepare("bagel", tmp_path / "again", source_dir=tree, progress=False)
    (tree / "bagel" / "test" / "hole" / "rgb").rename(tree / "bagel" / "test" / "hole" / "RGB")
    with pytest.raises(FileNotFoundError, match="has no rgb/ folder"):
        mvtec_3d.prepare("bagel", tmp_path / "again", source_dir=tree, progress=False)


# ----------------------------------------------------------------------------- VisA

def test_visa_split_by_csv_with_masks_made_0_255(tmp_path):
    tree = visa_tree(tmp_path / "staging")
    archive = _archive(tree, tmp_path / "VisA_20220922.tar")
    out = tmp_path / "candle"
    df = visa.prepare("candle", out, archive=archive, sha256=_sha256(archive), progress=False)
    check_manifest(df, out)  # the 0/1 masks came out 0/255
    assert count_table(df) == {"test/anomaly": 2, "test/good": 2, "train/good": 3}
    assert sorted(Path(p).name for p in df.loc[df["split"] == "train", "path"]) == ["0000.JPG", "0001.JPG", "0002.JPG"]
    jpg = df[df["defect_type"] == "anomaly"].iloc[0]["path"]
    assert Path(jpg).read_bytes() == (tree / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG").read_bytes()
    assert count_problems(df, visa.EXPECTED_COUNTS["candle"]) == [
        "train/good: 3 images, expected 900", "test/good: 2 images, expected 100",
        "test/anomaly: 2 images, expected 100"]

    (tree / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(DatasetError, match=r"1 files listed in split_csv/1cls.csv .*\n  candle/Data/Masks/Anomaly/001"):
        visa.prepare("candle", tmp_path / "x", source_dir=tree, progress=False)
    csv = tree / "split_csv" / "1cls.csv"
    csv.write_text(csv.read_text().replace("candle,test,anomaly", "candle,train,anomaly", 1))
    with pytest.raises(DatasetError, match="anomalies only in test"):
        visa.prepare("candle", tmp_path / "x", source_dir=tree, progress=False)
    csv.write_text("object;split\n")
    with pytest.raises(DatasetError, match="columns must be"):
        visa.prepare("candle", tmp_path / "x", source_dir=tree, progress=False)
    with pytest.raises(FileNotFoundError, match="no split_csv/1cls.csv"):
        visa.prepare("candle", tmp_path / "x", source_dir=tree / "candle", progress=False)


def test_visa_download_over_http_once_for_all_categories(tmp_path, http_server):
    archive = _archive(visa_tree(tmp_path / "staging"), http_server.root / "VisA_20220922.tar")
    options = dict(url=f"{http_server.url}/VisA_20220922.tar", sha256=_sha256(archive),
                   raw_dir=tmp_path / "raw", progress=False)
    candle = visa.prepare("candle", tmp_path / "visa" / "candle", **options)
    capsules = visa.prepare("capsules", tmp_path / "visa" / "capsules", **options)
    assert len(candle) == len(capsules) == 7
    assert (tmp_path / "raw" / "VisA_20220922.tar").read_bytes() == archive.read_bytes()
    assert http_server.requests == ["/VisA_20220922.tar"]  # the second category reuses the extraction


# ----------------------------------------------------------------------------- DAGM

def test_dagm_labels_split_and_train_defects(tmp_path):
    dagm_tree(tmp_path / "staging" / "Class1")
    archive = _archive(tmp_path / "staging", tmp_path / "Class1.zip")
    out = tmp_path / "Class1"
    df = dagm.prepare("Class1", out, archive=archive, progress=False)
    check_manifest(df, out)
    assert count_table(df) == {"test/defect": 2, "test/good": 4, "train/good": 4}
    assert sorted(Path(p).name for p in df.loc[df["label"] == 1, "path"]) == ["0005.PNG", "0006.PNG"]
    assert count_problems(df, dagm.EXPECTED_COUNTS["Class1"])[0] == "train/good: 4 images, expected 1000"
    assert dagm.EXPECTED_COUNTS["Class7"]["test/defect"] == 300

    # the Kaggle copy nests ClassN/ClassN; Train's defective images can join the test set
    nested = dagm_tree(tmp_path / "kaggle" / "Class2" / "Class2")
    both = dagm.prepare("Class2", tmp_path / "Class2", source_dir=tmp_path / "kaggle", train_defects_to_test=True)
    check_manifest(both, tmp_path / "Class2")
    assert sorted(Path(p).name for p in both.loc[both["label"] == 1, "path"]) == [
        "0005.PNG", "0006.PNG", "train_0005.PNG", "train_0006.PNG"]

    labels = nested / "Test" / "Label" / "Labels.txt"
    text = labels.read_text(encoding="utf-8-sig")
    labels.write_text(text.replace("6\t1\t0006.PNG\t0\t0006_label.PNG", "6 x 0006.PNG"))
    with pytest.raises(DatasetError, match=r"Labels.txt, line 7: expected '<id> <0\|1> <image file> 0 <mask file>'"):
        dagm.prepare("Class2", tmp_path / "Class2", source_dir=tmp_path / "kaggle")
    (nested / "Test" / "0003.PNG").unlink()
    labels.write_text("1\n3\t0\t0003.PNG\t0\n")
    with pytest.raises(DatasetError, match=r"missing under .*\n  Test/0003.PNG"):
        dagm.prepare("Class2", tmp_path / "Class2", source_dir=tmp_path / "kaggle")
    with pytest.raises(ValueError, match="no official download address"):
        dagm.prepare("Class3", tmp_path / "Class3")
    with pytest.raises(FileNotFoundError, match="no Class3/ folder"):
        dagm.prepare("Class3", tmp_path / "Class3", source_dir=tmp_path / "kaggle")


def test_dagm_from_a_configured_url(tmp_path, http_server):
    """DAGM has no official address: the archive named by `url` is downloaded, checked when a
    sha256 is given, and its class folders found inside."""
    dagm_tree(tmp_path / "staging" / "DAGM_KaggleUpload" / "Class4")
    archive = _archive(tmp_path / "staging", http_server.root / "DAGM_KaggleUpload.zip")
    raw = tmp_path / "raw"
    df = dagm.prepare("Class4", tmp_path / "Class4", url=f"{http_server.url}/DAGM_KaggleUpload.zip",
                      sha256=_sha256(archive), raw_dir=raw, progress=False)
    assert count_table(df) == {"test/defect": 2, "test/good": 4, "train/good": 4}
    assert (raw / "DAGM_KaggleUpload.zip").is_file() and (raw / "DAGM_KaggleUpload" / "DAGM_KaggleUpload").is_dir()
