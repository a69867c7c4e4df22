from __future__ import annotations

import hashlib
import random
import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from ad_models.data.layout import validate_manifest
from ad_models.data.sources import magnetic_tile as mt
from ad_models.data.sources import prepare_category

EMPTY_UNEVEN = "exp3_num_45042"  # one of the four MT_Uneven images whose mask is empty


@pytest.fixture
def source(shared_data) -> Path:
    return shared_data / "magnetic_tile"


def _names(source: Path, kind: str) -> list[str]:
    return sorted(p.name for p in (source / f"MT_{kind}" / "Imgs").glob("*.jpg"))


def _small_copy(source: Path, dest: Path, per_kind: int = 2) -> Path:
    """A few real images of every kind in the published layout, with an empty Uneven mask among them."""
    free = _names(source, "Free")
    test = [n for n in free if mt.is_test_good(n, 0.2)][:2]
    picks = {"Free": [n for n in free if n not in test][:2] + test}
    picks.update({kind: _names(source, kind)[:per_kind] for kind in mt.DEFECT_KINDS})
    picks["Uneven"] = picks["Uneven"][:1] + [f"{EMPTY_UNEVEN}.jpg"]
    for kind, names in picks.items():
        folder = dest / f"MT_{kind}" / "Imgs"
        folder.mkdir(parents=True)
        for name in names:
            for ext in (".jpg", ".png"):
                shutil.copyfile(source / f"MT_{kind}" / "Imgs" / Path(name).with_suffix(ext).name, folder / Path(name).with_suffix(ext).name)
    (dest / "README.md").write_text("Magnetic tile defect datasets\n")
    return dest


def test_restructures_the_real_data_with_a_limit(source, tmp_path):
    out = tmp_path / "tile"
    df = prepare_category("magnetic_tile", "tile", out, source_dir=source, limit_per_kind=3)
    validate_manifest(df)
    counts = df.groupby(["split", "defect_type"]).size().to_dict()
    assert counts == {("train", "good"): 3, ("test", "good"): 3,
                      **{("test", k.lower()): 3 for k in mt.DEFECT_KINDS}}
    assert (df["label"] == (df["defect_type"] != "good")).all()
    free = _names(source, "Free")
    train_names = [n for n in free if not mt.is_test_good(n, 0.2)][:3]
    test_names = [n for n in free if mt.is_test_good(n, 0.2)][:3]
    assert [Path(p).name for p in df.loc[df["split"] == "train", "path"]] == train_names
    assert [Path(p).name for p in df.loc[(df["split"] == "test") & (df["label"] == 0), "path"]] == test_names
    for row in df.itertuples():
        kind = "Free" if row.label == 0 else row.defect_type.capitalize()
        original = source / f"MT_{kind}" / "Imgs" / Path(row.path).name
        assert Path(row.path).read_bytes() == original.read_bytes()  # copied, never re-encoded
        if row.label:
            assert Path(row.mask_path).name == f"{Path(row.path).stem}_mask.png"
            mask = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
            assert set(np.unique(mask)) <= {0, 255}
            published = cv2.imread(str(original.with_suffix(".png")), cv2.IMREAD_GRAYSCALE)
            assert ((mask > 0) == (published > 127)).all()
    assert [Path(p).name for p in df.loc[df["defect_type"] == "crack", "path"]] == _names(source, "Crack")[:3]


def test_free_split_is_a_stable_hash_of_the_name(source):
    names = _names(source, "Free")
    assignment = {n: mt.is_test_good(n, 0.2) for n in names}
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert {n: mt.is_test_good(n, 0.2) for n in shuffled} == assignment
    assert 0.15 < np.mean(list(assignment.values())) < 0.25
    smaller = {n for n in names if mt.is_test_good(n, 0.1)}
    assert smaller < {n for n, t in assignment.items() if t}  # a smaller fraction is a subset


def test_seed_does_not_change_the_real_test_set(source, tmp_path):
    a = mt.prepare("tile", tmp_path / "a", source_dir=source, limit_per_kind=2, seed=0)
    b = mt.prepare("tile", tmp_path / "b", source_dir=source, limit_per_kind=2, seed=7)
    assert [Path(p).name for p in a["path"]] == [Path(p).name for p in b["path"]]


def test_empty_uneven_mask_stays_defective_and_nested_folder_is_found(source, tmp_path):
    _small_copy(source, tmp_path / "download" / "Magnetic-tile-defect-datasets.-master")
    df = mt.prepare("tile", tmp_path / "tile", source_dir=tmp_path / "download")  # MT_* one level down
    row = df[df["path"].str.endswith(f"{EMPTY_UNEVEN}.jpg")].iloc[0]
    assert row["label"] == 1 and row["defect_type"] == "uneven" and row["split"] == "test"
    mask = cv2.imread(row["mask_path"], cv2.IMREAD_UNCHANGED)
    assert row["mask_path"].endswith(f"ground_truth/uneven/{EMPTY_UNEVEN}_mask.png")
    assert mask is not None and not mask.any()
    assert (df["split"] == "test").sum() == 2 + 2 * len(mt.DEFECT_KINDS)


def test_download_extract_and_restructure(source, tmp_path, http_server):
    staging = _small_copy(source, tmp_path / "staging" / "Magnetic-tile-defect-datasets.-master")
    archive = http_server.root / "master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(staging.parent.rglob("*")):
            zf.write(p, p.relative_to(staging.parent).as_posix())
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    raw = tmp_path / "raw"
    options = dict(url=f"{http_server.url}/master.zip", sha256=sha, raw_dir=raw, progress=False)
    df = prepare_category("magnetic_tile", "tile", tmp_path / "tile", **options)
    assert len(df) == 4 + 2 * len(mt.DEFECT_KINDS)
    assert (raw / mt.ARCHIVE_NAME).read_bytes() == archive.read_bytes()
    # extracted once beside the archive, for every later category and run
    assert sorted(p.name for p in raw.iterdir()) == ["Magnetic-tile-defect-datasets.-master", mt.ARCHIVE_NAME]

    archive.unlink()  # the verified extraction is reused without asking the server again
    again = prepare_category("magnetic_tile", "tile", tmp_path / "tile", **options)
    assert again.equals(df) and http_server.requests == ["/master.zip"]

    (raw / mt.ARCHIVE_NAME).unlink()  # the user's own copy of the archive works the same
    mine = tmp_path / "my_copy.zip"
    with zipfile.ZipFile(mine, "w") as zf:
        for p in sorted(staging.parent.rglob("*")):
            zf.write(p, p.relative_to(staging.parent).as_posix())
    from_archive = prepare_category("magnetic_tile", "tile", tmp_path / "tile2", archive=mine,
                                    raw_dir=tmp_path / "raw2", progress=False)
    assert len(from_archive) == len(df) and http_server.requests == ["/master.zip"]


def test_incomplete_source_and_bad_options(source, tmp_path):
    (tmp_path / "src" / "MT_Free" / "Imgs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="MT_Blowhole/Imgs.*MT_Uneven/Imgs"):
        mt.prepare("tile", tmp_path / "tile", source_dir=tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="no MT_Free"):
        mt.prepare("tile", tmp_path / "tile", source_dir=tmp_path / "src" / "MT_Free")
    with pytest.raises(ValueError, match="tile"):
        mt.prepare("bottle", tmp_path / "tile", source_dir=source)
    with pytest.raises(ValueError, match="test_good_fraction"):
        mt.prepare("tile", tmp_path / "tile", source_dir=source, test_good_fraction=1.5)
    with pytest.raises(ValueError, match="limit_per_kind"):
        mt.prepare("tile", tmp_path / "tile", source_dir=source, limit_per_kind=0)
    assert not (tmp_path / "tile").exists()
