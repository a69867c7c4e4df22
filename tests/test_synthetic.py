from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ad_models.data.layout import COLUMNS, read_manifest
from ad_models.data.sources import SOURCES, prepare_category, synthetic

TINY = dict(n_train=3, n_validation=1, n_test_good=2, n_test_defect=5, size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_categories_and_defect_types():
    assert synthetic.CATEGORIES == ("fabric", "granite", "circuit")
    assert synthetic.DEFECT_TYPES["fabric"] == synthetic.DEFECT_TYPES["granite"] == ("scratch", "hole", "stain", "crack")
    assert synthetic.DEFECT_TYPES["circuit"] == ("scratch", "stain", "missing_part", "misplaced_part")
    assert SOURCES["synthetic"] is synthetic


@pytest.mark.parametrize("category", synthetic.CATEGORIES)
def test_prepare_writes_a_valid_category(tmp_path, category):
    out = tmp_path / category
    df = prepare_category("synthetic", category, out, seed=0, **TINY)
    assert list(df.columns) == COLUMNS
    assert (out / "manifest.csv").is_file()
    assert df.equals(read_manifest(out))
    counts = df.groupby(["split", "defect_type"]).size().to_dict()
    types = synthetic.DEFECT_TYPES[category]
    # five defects over four types: 2, 1, 1, 1 in the category's order
    assert counts == {("train", "good"): 3, ("validation", "good"): 1, ("test", "good"): 2,
                      **{("test", t): n for t, n in zip(types, (2, 1, 1, 1))}}
    assert set(df["category"]) == {category} and set(df["dataset"]) == {"synthetic"}
    for row in df.itertuples():
        image = cv2.imread(row.path, cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        if row.label:
            mask = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
            assert 0.002 < (mask > 0).mean() < 0.08
        else:
            assert row.mask_path == ""
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    options = dict(n_train=2, n_test_good=1, n_test_defect=4, size=64)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.prepare("circuit", tmp_path / name, seed=seed, **options)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 2 + 1 + 4 + 4 + 1  # images, masks, manifest
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_counts_change_only_their_own_images(tmp_path):
    small = synthetic.prepare("granite", tmp_path / "small", n_train=2, n_test_good=1, n_test_defect=4, size=64)
    big = synthetic.prepare("granite", tmp_path / "big", n_train=4, n_test_good=1, n_test_defect=4, size=64)
    for rel in ("train/good/001.png", "test/good/000.png", "test/crack/000.png", "ground_truth/hole/000_mask.png"):
        assert (tmp_path / "small" / rel).read_bytes() == (tmp_path / "big" / rel).read_bytes()
    assert len(big) == len(small) + 2


def test_prepare_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "fabric"
    (out / "train" / "good").mkdir(parents=True)
    (out / "train" / "good" / "stale.png").write_bytes(b"old")
    synthetic.prepare("fabric", out, n_train=1, n_test_good=1, n_test_defect=1, size=32)
    assert not (out / "train" / "good" / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fabric"]


@pytest.mark.parametrize("category,defect_type", [(c, t) for c in synthetic.CATEGORIES for t in synthetic.DEFECT_TYPES[c]])
def test_defects_are_visible_and_their_masks_exact(category, defect_type):
    for seed in range(3):
        good, good_mask = synthetic.make_image(category, "good", 96, np.random.default_rng(seed))
        bad, mask = synthetic.make_image(category, defect_type, 96, np.random.default_rng(seed))
        assert good.shape == bad.shape == (96, 96, 3) and good.dtype == np.uint8 and not good_mask.any()
        diff = np.abs(bad.astype(int) - good.astype(int)).max(-1)
        assert diff[~mask].max() == 0, "the defect changed pixels outside its mask"
        assert 0.002 < mask.mean() < 0.07, f"defect area {mask.mean():.4f} of the image"
        assert diff[mask].mean() > 15, "the defect is too faint to see"
        assert (diff[mask] > 0).mean() > 0.7


@pytest.mark.parametrize("category", synthetic.CATEGORIES)
def test_good_images_vary_naturally(category):
    images = [synthetic.make_image(category, "good", 64, np.random.default_rng(i))[0].astype(float) for i in range(3)]
    assert all(im.std() > 10 for im in images), "a flat image"
    for a, b in ((0, 1), (1, 2)):
        assert np.abs(images[a] - images[b]).mean() > 2, "two good images are (nearly) the same"
    # global brightness varies a little between images, as under real lighting
    assert np.ptp([im.mean() for im in images]) > 0.5


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fabric, granite, circuit"):
        prepare_category("synthetic", "carpet", tmp_path / "x")
    with pytest.raises(ValueError, match="known sources: dagm, folder, magnetic_tile, mvtec_3d, mvtec_ad"):
        prepare_category("mvtec", "bottle", tmp_path / "x")
    with pytest.raises(ValueError, match="n_train"):
        synthetic.prepare("fabric", tmp_path / "x", n_train=0)
    with pytest.raises(ValueError, match="size"):
        synthetic.prepare("fabric", tmp_path / "x", size=8)
    with pytest.raises(TypeError):
        synthetic.prepare("fabric", tmp_path / "x", n_trian=3)
    with pytest.raises(ValueError, match="missing_part"):
        synthetic.make_image("fabric", "missing_part", 64, np.random.default_rng(0))
    assert not (tmp_path / "x").exists()
