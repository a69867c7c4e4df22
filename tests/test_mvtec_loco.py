"""Tests for ad_models.data.sources.mvtec_loco on a tiny archive built with LOCO's real layout."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from ad_models.data.layout import DatasetError, validate_manifest
from ad_models.data.sources import mvtec_loco as loco
from ad_models.metrics import auspro

H, W = 24, 32  # every image of the fixture; masks have the same size
CATEGORY = "pushpins"

DEFECTS = [  # the entries of defects_config.json, in its real format
    {"defect_name": "additional_1_pushpin", "pixel_value": 255, "saturation_threshold": 1.0,
     "relative_saturation": True},
    {"defect_name": "missing_pushpin", "pixel_value": 253, "saturation_threshold": 40,
     "relative_saturation": False},
    {"defect_name": "missing_separator", "pixel_value": 252, "saturation_threshold": 0.5,
     "relative_saturation": True},
    {"defect_name": "broken", "pixel_value": 250, "saturation_threshold": 1.0, "relative_saturation": True},
]


def _box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[rows, cols] = True
    return mask


# ground truth: (defect type, image id) -> [(region mask, pixel value)], one PNG per region
REGIONS = {
    ("logical_anomalies", "000"): [(_box(slice(2, 8), slice(3, 13)), 253),     # 60 px, absolute 40
                                   (_box(slice(6, 14), slice(10, 30)), 255)],  # 160 px, overlaps the first
    ("logical_anomalies", "001"): [(_box(slice(0, 24), slice(5, 6)), 252)],    # a 1 px wide line, relative 0.5
    ("structural_anomalies", "000"): [(_box(slice(15, 20), slice(0, 4)), 250)],
}
IMAGES = {"train/good": 3, "validation/good": 2, "test/good": 2,
          "test/logical_anomalies": 2, "test/structural_anomalies": 1}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def build_loco_tree(root: Path, categories=(CATEGORY, "screw_bag")) -> Path:
    """mvtec_loco_anomaly_detection/<category>/... exactly as published, tiny; returns its parent."""
    rng = np.random.default_rng(0)
    top = root / loco.ARCHIVE_ROOT
    for category in categories:
        base = top / category
        for folder, n in IMAGES.items():
            for i in range(n):
                _png(base / folder / f"{i:03d}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        for (defect_type, image_id), regions in REGIONS.items():
            for k, (mask, value) in enumerate(regions):
                _png(base / "ground_truth" / defect_type / image_id / f"{k:03d}.png",
                     np.where(mask, value, 0).astype(np.uint8))
        (base / loco.DEFECTS_CONFIG).write_text(json.dumps(DEFECTS, indent=4))
    (top / "license.txt").write_text("Creative Commons Attribution-NonCommercial-ShareAlike 4.0\n")
    (top / "readme.txt").write_text("MVTec LOCO AD\n")
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return build_loco_tree(tmp_path / "extracted")


@pytest.fixture
def archive(tree, tmp_path) -> Path:
    path = tmp_path / "downloads" / loco.RAW.filename
    path.parent.mkdir()
    with tarfile.open(path, "w:xz") as tf:
        tf.add(tree / loco.ARCHIVE_ROOT, arcname=loco.ARCHIVE_ROOT)
    return path


def _counts(df) -> dict[str, int]:
    return (df["split"] + "/" + df["defect_type"]).value_counts().to_dict()


def _read(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


# ------------------------------------------------------------------ prepare


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_from_archive(archive, tree, tmp_path):
    out = tmp_path / "datasets" / "mvtec_loco" / CATEGORY
    df = loco.prepare(CATEGORY, out, archive=archive, sha256=_sha256(archive), raw_dir=tmp_path / "raw",
                      progress=False)
    validate_manifest(df)
    assert _counts(df) == IMAGES
    assert set(df["category"]) == {CATEGORY} and set(df["dataset"]) == {"mvtec_loco"}
    assert (df["label"] == (df["defect_type"] != "good")).all()
    assert set(df.loc[df["split"] == "validation", "defect_type"]) == {"good"}

    source = tree / loco.ARCHIVE_ROOT / CATEGORY
    for row in df.itertuples():  # images byte for byte
        rel = Path(row.path).relative_to(out)
        assert Path(row.path).read_bytes() == (source / rel).read_bytes()
    assert (out / loco.DEFECTS_CONFIG).read_bytes() == (source / loco.DEFECTS_CONFIG).read_bytes()

    for (defect_type, image_id), regions in REGIONS.items():
        row = df[df["path"].str.endswith(f"test/{defect_type}/{image_id}.png")].iloc[0]
        assert row.mask_path == (out / "ground_truth" / defect_type / f"{image_id}_mask.png").as_posix()
        merged = _read(row.mask_path)
        union = np.logical_or.reduce([mask for mask, _ in regions])
        assert merged.dtype == np.uint8 and merged.shape == (H, W)
        assert np.array_equal(merged, np.where(union, 255, 0))
        for k in range(len(regions)):  # the per-region folder is kept as published
            name = Path("ground_truth") / defect_type / image_id / f"{k:03d}.png"
            assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not list(out.parent.glob(f".{CATEGORY}.*"))  # no temporary folder left behind


def test_prepare_downloads_and_verifies(archive, http_server, tmp_path):
    shutil.copyfile(archive, http_server.root / archive.name)
    out = tmp_path / "datasets" / "mvtec_loco" / CATEGORY
    url = f"{http_server.url}/{archive.name}"
    df = loco.prepare(CATEGORY, out, url=url, sha256=_sha256(archive), progress=False)
    assert _counts(df) == IMAGES
    assert (tmp_path / "datasets" / "mvtec_loco" / "_raw").is_dir()  # the default raw_dir
    assert http_server.requests == [f"/{archive.name}"]


def test_prepare_from_source_dir_at_either_level(tree, tmp_path):
    by_parent = loco.prepare(CATEGORY, tmp_path / "a" / CATEGORY, source_dir=tree, progress=False)
    by_root = loco.prepare(CATEGORY, tmp_path / "b" / CATEGORY, source_dir=tree / loco.ARCHIVE_ROOT,
                           seed=7, progress=False)

    def relative(df, root):
        return [Path(p).relative_to(root).as_posix() for p in df["path"]]

    assert relative(by_parent, tmp_path / "a" / CATEGORY) == relative(by_root, tmp_path / "b" / CATEGORY)
    assert _counts(by_root) == IMAGES


@pytest.mark.parametrize("view, kept", [("structural", "structural_anomalies"), ("logical", "logical_anomalies")])
def test_views_keep_good_and_one_kind(tree, tmp_path, view, kept):
    out = tmp_path / f"{CATEGORY}.{view}"
    df = loco.prepare(CATEGORY, out, source_dir=tree, view=view, progress=False)
    validate_manifest(df)
    assert _counts(df) == {k: n for k, n in IMAGES.items() if not k.startswith("test/") or k.endswith(("good", kept))}
    other = ({"structural_anomalies", "logical_anomalies"} - {kept}).pop()
    assert not (out / "test" / other).exists() and not (out / "ground_truth" / other).exists()
    assert loco.VIEWS[view] == (kept,)


def test_unknown_category_or_view(tree, tmp_path):
    with pytest.raises(ValueError, match="unknown mvtec_loco category 'bottle'"):
        loco.prepare("bottle", tmp_path / "x", source_dir=tree)
    with pytest.raises(ValueError, match="unknown mvtec_loco view 'texture'"):
        loco.prepare(CATEGORY, tmp_path / "x", source_dir=tree, view="texture")


# ------------------------------------------------------------------ broken copies


def _copy(tree: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken)
    return broken


def test_missing_ground_truth_folder_is_named(tree, tmp_path):
    broken = _copy(tree, tmp_path)
    gt = broken / loco.ARCHIVE_ROOT / CATEGORY / "ground_truth"
    shutil.rmtree(gt / "logical_anomalies" / "001")
    (gt / "structural_anomalies" / "007").mkdir()  # a folder without a test image
    out = tmp_path / "out" / CATEGORY
    with pytest.raises(DatasetError) as error:
        loco.prepare(CATEGORY, out, source_dir=broken, progress=False)
    message = str(error.value)
    assert "ground_truth/logical_anomalies/001/ (for test/logical_anomalies/001)" in message
    assert "ground-truth folders without a test image" in message
    assert "ground_truth/structural_anomalies/007/" in message
    assert not out.exists()  # nothing half-written


def test_empty_ground_truth_folder_is_named(tree, tmp_path):
    broken = _copy(tree, tmp_path)
    folder = broken / loco.ARCHIVE_ROOT / CATEGORY / "ground_truth" / "structural_anomalies" / "000"
    (folder / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"without any region PNG:\n    ground_truth/structural_anomalies/000/"):
        loco.prepare(CATEGORY, tmp_path / "out" / CATEGORY, source_dir=broken, progress=False)


def test_region_with_an_unknown_defect_id_is_named(tree, tmp_path):
    broken = _copy(tree, tmp_path)
    png = broken / loco.ARCHIVE_ROOT / CATEGORY / "ground_truth" / "logical_anomalies" / "000" / "001.png"
    _png(png, np.where(REGIONS[("logical_anomalies", "000")][1][0], 17, 0).astype(np.uint8))
    with pytest.raises(DatasetError, match=r"001\.png has pixel value 17, which defects_config\.json does not list"):
        loco.prepare(CATEGORY, tmp_path / "out" / CATEGORY, source_dir=broken, progress=False)


def test_missing_defects_config_is_named(tree, tmp_path):
    broken = _copy(tree, tmp_path)
    (broken / loco.ARCHIVE_ROOT / CATEGORY / loco.DEFECTS_CONFIG).unlink()
    with pytest.raises(DatasetError, match="defects_config.json not found"):
        loco.prepare(CATEGORY, tmp_path / "out" / CATEGORY, source_dir=broken, progress=False)


def test_source_without_the_category(tmp_path):
    tree = build_loco_tree(tmp_path / "only_screws", categories=("screw_bag",))
    with pytest.raises(FileNotFoundError, match="no pushpins/train/good"):
        loco.prepare(CATEGORY, tmp_path / "out" / CATEGORY, source_dir=tree, progress=False)


# ------------------------------------------------------------------ sPRO regions


@pytest.fixture
def prepared(tree, tmp_path):
    out = tmp_path / "prepared" / CATEGORY
    return out, loco.prepare(CATEGORY, out, source_dir=tree, progress=False)


def _mask_path(df, defect_type: str, image_id: str) -> str:
    return df[df["path"].str.endswith(f"test/{defect_type}/{image_id}.png")].iloc[0].mask_path


def test_load_spro_regions_full_resolution(prepared):
    out, df = prepared
    regions = loco.load_spro_regions(out, _mask_path(df, "logical_anomalies", "000"))
    (a, _), (b, _) = REGIONS[("logical_anomalies", "000")]
    assert [r.mask.dtype for r in regions] == [bool, bool]
    assert np.array_equal(regions[0].mask, a) and np.array_equal(regions[1].mask, b)
    assert regions[0].saturation_area == 40  # absolute: min(40, 60 pixels)
    assert regions[1].saturation_area == 160  # relative 1.0 of 160 pixels
    line = loco.load_spro_regions(out, _mask_path(df, "logical_anomalies", "001"))
    assert [r.saturation_area for r in line] == [12]  # relative: int(0.5 * 24)
    # the region folder itself, or a path relative to the category folder, work too
    folder = out / "ground_truth" / "logical_anomalies" / "000"
    assert [r.saturation_area for r in loco.load_spro_regions(out, folder)] == [40, 160]
    assert len(loco.load_spro_regions(out, "ground_truth/structural_anomalies/000_mask.png")) == 1
    assert loco.load_spro_regions(out, "") == []  # a good image


def test_load_spro_regions_resized(prepared):
    out, df = prepared
    regions = loco.load_spro_regions(out, _mask_path(df, "logical_anomalies", "000"), size=(12, 16))
    (a, _), (b, _) = REGIONS[("logical_anomalies", "000")]
    expected_a = cv2.resize(a.astype(np.uint8), (16, 12), interpolation=cv2.INTER_NEAREST).astype(bool)
    expected_b = cv2.resize(b.astype(np.uint8), (16, 12), interpolation=cv2.INTER_NEAREST).astype(bool)
    assert np.array_equal(regions[0].mask, expected_a) and np.array_equal(regions[1].mask, expected_b)
    # absolute 40 px at 24x32 scales by the area ratio 1/4 to 10 px (below the region's 15 px)
    assert expected_a.sum() == 15 and regions[0].saturation_area == pytest.approx(10.0)
    assert regions[1].saturation_area == expected_b.sum()  # relative 1.0 of the resized area
    square = loco.load_spro_regions(out, _mask_path(df, "logical_anomalies", "000"), size=8)
    assert square[0].mask.shape == (8, 8)
    assert square[0].saturation_area == pytest.approx(min(40 * 64 / (H * W), square[0].mask.sum()))


def test_thin_region_survives_downsizing(prepared):
    # the 1 px line at an odd column vanishes under nearest-neighbour halving; it is kept as
    # the pixels it covers, so it still counts once in the sPRO mean
    out, df = prepared
    (line, _), = REGIONS[("logical_anomalies", "001")]
    nearest = cv2.resize(line.astype(np.uint8), (16, 12), interpolation=cv2.INTER_NEAREST)
    assert not nearest.any()
    (region,) = loco.load_spro_regions(out, _mask_path(df, "logical_anomalies", "001"), size=(12, 16))
    assert region.mask[:, 2].all() and region.mask.sum() == 12
    assert region.saturation_area == 6  # int(0.5 * 12)


def test_load_spro_regions_errors(prepared):
    out, _ = prepared
    with pytest.raises(DatasetError, match="ground_truth/logical_anomalies/042 does not exist"):
        loco.load_spro_regions(out, "ground_truth/logical_anomalies/042_mask.png")
    with pytest.raises(ValueError, match="size must be"):
        loco.load_spro_regions(out, "ground_truth/logical_anomalies/000_mask.png", size=(0, 3))
    two_ids = out / "ground_truth" / "logical_anomalies" / "000" / "002.png"
    _png(two_ids, np.pad(np.array([[255, 252]], np.uint8), ((0, H - 1), (0, W - 2))))
    with pytest.raises(DatasetError, match=r"002\.png has several defect ids \[252, 255\]"):
        loco.load_spro_regions(out, "ground_truth/logical_anomalies/000_mask.png")


def test_defects_config_is_checked(tmp_path):
    bad = dict(DEFECTS[0], saturation_threshold=1.5)  # relative thresholds are fractions
    (tmp_path / loco.DEFECTS_CONFIG).write_text(json.dumps([bad]))
    with pytest.raises(DatasetError, match=r"saturation_threshold 1\.5, expected in \(0, 1\]"):
        loco.read_defects_config(tmp_path)
    (tmp_path / loco.DEFECTS_CONFIG).write_text(json.dumps([DEFECTS[0], DEFECTS[0]]))
    with pytest.raises(DatasetError, match="pixel_value 255 is used by both"):
        loco.read_defects_config(tmp_path)


def test_perfect_maps_score_one_with_loaded_regions(prepared):
    # the pieces together: regions from the prepared folder, maps that mark exactly the regions
    out, df = prepared
    test = df[df["split"] == "test"]
    regions = [loco.load_spro_regions(out, m, size=(12, 16)) for m in test["mask_path"]]
    maps = [np.logical_or.reduce([r.mask for r in rs]).astype(float) if rs else np.zeros((12, 16))
            for rs in regions]
    assert auspro(maps, regions, 0.05) == pytest.approx(1.0)


# ------------------------------------------------------------------ published facts


def test_expected_counts_cover_every_category():
    assert set(loco.EXPECTED_COUNTS) == set(loco.CATEGORIES)
    keys = {f"{split}/good" for split in ("train", "validation", "test")} | {f"test/{t}" for t in loco.DEFECT_TYPES}
    for counts in loco.EXPECTED_COUNTS.values():
        assert set(counts) == keys
    tests = {c: sum(n for k, n in counts.items() if k.startswith("test/"))
             for c, counts in loco.EXPECTED_COUNTS.items()}
    # the paper's per-category test totals and its 1568 test images
    assert tests == {"breakfast_box": 275, "juice_bottle": 330, "pushpins": 310, "screw_bag": 341,
                     "splicing_connectors": 312}
    # good + logical test images: 1136 (the logical-only test set of LOCO-Annotations)
    assert sum(c["test/good"] + c["test/logical_anomalies"] for c in loco.EXPECTED_COUNTS.values()) == 1136


@pytest.mark.parametrize("size, resize", [([16, 24], "stretch"), (16, "keep_aspect")])
def test_evaluation_scores_spro_at_any_input_geometry(prepared, tmp_path, size, resize):
    """MVTec LOCO's evaluation with a non-square input or padded to keep the aspect: the regions are
    read at the maps' size (the images' own here), logical and structural scored apart."""
    from ad_models import runs
    out, _ = prepared
    model = tmp_path / "model"
    runs.train("mean_image", {"image_size": size, "resize": resize}, out, model, device="cpu", progress=False)
    result = runs.evaluate(model, out, tmp_path / "eval", device="cpu", batch_size=4, progress=False)
    for key in ("auspro_0.05", "auspro_0.3", "auspro_0.3_logical", "auspro_0.3_structural"):
        assert 0.0 <= result[key] <= 1.0, key
    assert {"image_auroc_logical", "image_auroc_structural"} <= set(result)
