"""Ingesting new good images: checks, reasons, crash safety at every step, merging, data versions."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ad_models.data import ingest as ingest_module
from ad_models.data.ingest import (
    LEDGER_COLUMNS,
    STEPS,
    IngestRules,
    ingest,
    ingest_folders,
    ingested_images,
    merge_ingested,
    training_data_version,
)
from ad_models.data.layout import read_manifest, validate_manifest
from ad_models.data.sources import prepare_category

RULES = IngestRules(min_age_seconds=0)
TINY = dict(n_train=4, n_test_good=2, n_test_defect=2, size=64, seed=0)


def _encode(ext: str = ".png", size=(64, 64), channels: int = 3, seed: int = 0) -> bytes:
    """A random image (height, width) encoded as `ext`: distinct bytes for distinct seeds."""
    rng = np.random.default_rng(seed)
    shape = size if channels == 1 else (*size, channels)
    ok, buf = cv2.imencode(ext, rng.integers(0, 256, shape, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _drop(inbox: Path, files: dict[str, bytes]) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (inbox / name).write_bytes(data)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny prepared synthetic category, read-only for the tests that use it."""
    out = tmp_path_factory.mktemp("data") / "datasets" / "synthetic" / "fabric"
    prepare_category("synthetic", "fabric", out, **TINY)
    return out


@pytest.fixture
def folders(tmp_path):
    return ingest_folders(tmp_path / "data", "synthetic/fabric")


def _run(folders, dataset, rules=RULES, on_step=None):
    return ingest(folders.inbox, folders.store, folders.rejected, dataset, rules, on_step=on_step)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by path relative to it."""
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _reason(folders, name: str) -> str:
    text = (folders.rejected / f"{name}.reason.txt").read_text()
    assert text.endswith("\n") and text.count("\n") == 1, text  # one line
    return text.strip()


# ----------------------------------------------------------------------------- the folders and the rules

def test_ingest_folders_follow_the_design(tmp_path):
    f = ingest_folders(tmp_path, "synthetic/fabric")
    assert f.inbox == tmp_path / "incoming" / "synthetic" / "fabric" / "good"
    assert f.rejected == tmp_path / "incoming" / "synthetic" / "fabric" / "rejected"
    assert f.store == tmp_path / "ingested" / "synthetic" / "fabric"
    for bad in ("fabric", "a/b/c", "../fabric", "synthetic/"):
        with pytest.raises(ValueError, match="<dataset>/<category>"):
            ingest_folders(tmp_path, bad)


def test_rules_from_dict_validates():
    rules = IngestRules.from_dict({"extensions": ["PNG", ".jpg"], "min_side": 16, "channels": 1})
    assert rules.extensions == (".jpg", ".png") and rules.min_side == 16 and rules.channels == 1
    assert IngestRules.from_dict(None) == IngestRules()
    assert IngestRules().min_age_seconds == 2.0 and IngestRules().max_side == 8192
    with pytest.raises(ValueError, match="'min_size'"):
        IngestRules.from_dict({"min_size": 16})
    for bad in ({"channels": 4}, {"channels": True}, {"channels": "3"}, {"min_side": 0}, {"min_side": 64, "max_side": 32},
                {"extensions": ["gif"]}, {"extensions": "png"}, {"min_age_seconds": -1}):
        with pytest.raises(ValueError):
            IngestRules.from_dict(bad)


# ----------------------------------------------------------------------------- adding and rejecting

def test_valid_files_are_added(folders, dataset):
    files = {"b.png": _encode(seed=1), "a.JPG": _encode(".jpg", seed=2), "c.bmp": _encode(".bmp", size=(40, 80), seed=3)}
    _drop(folders.inbox, files)
    result = _run(folders, dataset)

    assert [name for name, _ in result.added] == ["a.JPG", "b.png", "c.bmp"]  # sorted by name
    assert result.rejected == [] and result.completed == [] and result.skipped == []
    assert list(folders.inbox.iterdir()) == []
    for name, stored in result.added:
        assert stored == _sha(files[name])[:16] + Path(name).suffix.lower()
        assert (folders.store / "good" / stored).read_bytes() == files[name]  # the original bytes
    ledger = pd.read_csv(folders.store / "ledger.csv")
    assert list(ledger.columns) == LEDGER_COLUMNS
    images = ingested_images(folders.store)
    assert images["original_name"].tolist() == ["a.JPG", "b.png", "c.bmp"]
    assert images["sha256"].tolist() == [_sha(files[n]) for n in images["original_name"]]
    assert images["bytes"].tolist() == [len(files[n]) for n in images["original_name"]]
    row = images.set_index("original_name").loc["c.bmp"]
    assert (row["width"], row["height"], row["channels"]) == (80, 40, 3)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in images["path"])
    assert pd.Timestamp(images["ingested_at"].iloc[0]).tzinfo is not None  # UTC ISO
    assert sorted(p.name for p in folders.store.rglob("*")) == sorted(["good", "ledger.csv"] + [s for _, s in result.added])


def test_each_rejection_names_its_reason(folders, dataset):
    train_image = read_manifest(dataset).query("split == 'train'")["path"].iloc[0]
    ok = _encode(seed=10)
    files = {
        "broken.png": b"this is not a png",
        "truncated.png": _encode(seed=11)[:60],
        "gray.png": _encode(channels=1, seed=12),
        "small.png": _encode(size=(20, 48), seed=13),
        "notes.txt": b"hello",
        "empty.png": b"",
        "copy_of_train.png": Path(train_image).read_bytes(),
        "first.png": ok,
        "second.png": ok,  # the same content as first.png, in the same batch
    }
    _drop(folders.inbox, files)
    result = _run(folders, dataset)

    assert result.added == [("first.png", _sha(ok)[:16] + ".png")]
    reasons = dict(result.rejected)
    assert sorted(reasons) == sorted(set(files) - {"first.png"})
    assert list(folders.inbox.iterdir()) == []
    for name in reasons:  # moved whole, with the reason beside it
        assert (folders.rejected / name).read_bytes() == files[name]
        assert _reason(folders, name) == reasons[name]
    assert "does not decode" in reasons["broken.png"] and "does not decode" in reasons["truncated.png"]
    assert reasons["gray.png"] == "has 1 channel, the training images have 3"
    assert "20" in reasons["small.png"] and "48x20" in reasons["small.png"] and "32 to 8192" in reasons["small.png"]
    assert "too small" in reasons["small.png"]
    assert "'.txt'" in reasons["notes.txt"] and ".png" in reasons["notes.txt"]
    assert "empty" in reasons["empty.png"]
    assert reasons["copy_of_train.png"] == "duplicate of the dataset image train/good/000.png"
    assert reasons["second.png"] == f"duplicate of first.png, already ingested as good/{_sha(ok)[:16]}.png"
    assert len(ingested_images(folders.store)) == 1


def test_too_large_and_explicit_channels(folders, dataset):
    _drop(folders.inbox, {"big.png": _encode(size=(64, 100), channels=1, seed=1), "gray.png": _encode(channels=1, seed=2),
                          "color.png": _encode(size=(40, 40), seed=3)})
    result = _run(folders, dataset, IngestRules(min_age_seconds=0, max_side=80, channels=1))
    reasons = dict(result.rejected)
    assert reasons["big.png"] == "too large: 100x64 pixels (width x height); each side must be 32 to 80 pixels"
    assert reasons["color.png"] == "has 3 channels, the ingest rules require 1"
    assert [name for name, _ in result.added] == ["gray.png"]
    assert ingested_images(folders.store)["channels"].tolist() == [1]


def test_duplicate_of_an_earlier_ingestion(folders, dataset):
    data = _encode(seed=5)
    _drop(folders.inbox, {"monday.png": data})
    assert [n for n, _ in _run(folders, dataset).added] == ["monday.png"]
    _drop(folders.inbox, {"tuesday.png": data})
    result = _run(folders, dataset)
    assert result.added == [] and result.completed == []
    assert result.rejected == [("tuesday.png", f"duplicate of monday.png, already ingested as good/{_sha(data)[:16]}.png")]
    assert len(ingested_images(folders.store)) == 1


def test_rejected_name_clash_gets_a_suffix(folders, dataset):
    _drop(folders.inbox, {"x.png": b"first"})
    _run(folders, dataset)
    _drop(folders.inbox, {"x.png": b"second"})
    _run(folders, dataset)
    _drop(folders.inbox, {"x.png": b"third"})
    _run(folders, dataset)
    assert _files(folders.rejected) == {
        "x.png": b"first", "x.png.reason.txt": (folders.rejected / "x.png.reason.txt").read_bytes(),
        "x_1.png": b"second", "x_1.png.reason.txt": (folders.rejected / "x_1.png.reason.txt").read_bytes(),
        "x_2.png": b"third", "x_2.png.reason.txt": (folders.rejected / "x_2.png.reason.txt").read_bytes()}
    assert "does not decode" in _reason(folders, "x_2.png")


def test_young_files_wait_and_temporary_names_are_left_alone(folders, dataset):
    files = {"new.png": _encode(seed=1), ".hidden.png": _encode(seed=2), "copying.png.part": b"..",
             "upload.tmp": b"..", "download.png.crdownload": b".."}
    _drop(folders.inbox, files)
    (folders.inbox / "subfolder").mkdir()
    result = _run(folders, dataset, IngestRules(min_age_seconds=3600))
    assert result.skipped == ["new.png"] and result.added == [] and result.rejected == []
    assert _files(folders.inbox) == files
    assert not folders.rejected.exists() and not folders.store.exists()

    old = time.time() - 7200
    os.utime(folders.inbox / "new.png", (old, old))
    result = _run(folders, dataset, IngestRules(min_age_seconds=3600))
    assert [n for n, _ in result.added] == ["new.png"] and result.skipped == []
    assert _files(folders.inbox) == {k: v for k, v in files.items() if k != "new.png"}
    assert (folders.inbox / "subfolder").is_dir()


def test_empty_or_missing_inbox_reads_nothing(folders, tmp_path):
    missing_dataset = tmp_path / "not_prepared"  # not read while there is nothing to ingest
    assert _run(folders, missing_dataset) == ingest_module.IngestResult()
    folders.inbox.mkdir(parents=True)
    assert _run(folders, missing_dataset) == ingest_module.IngestResult()
    _drop(folders.inbox, {"a.png": _encode()})
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        _run(folders, missing_dataset)
    assert (folders.inbox / "a.png").is_file()


# ----------------------------------------------------------------------------- crash safety

class Crash(Exception):
    pass


def _batch(dataset: Path) -> dict[str, bytes]:
    """Valid and invalid files, including a copy of an earlier file of the batch."""
    return {
        "a.png": _encode(seed=21),
        "b.png": _encode(seed=21),  # duplicate of a.png
        "c.png": b"garbage",
        "d.png": _encode(channels=1, seed=22),
        "e.jpg": _encode(".jpg", seed=23),
        "f.png": _encode(size=(16, 16), seed=24),
        "g.png": Path(dataset / "test" / "good" / "000.png").read_bytes(),
    }


def _state(folders) -> dict:
    ledger = ingested_images(folders.store).drop(columns=["ingested_at", "path"])
    return {"inbox": _files(folders.inbox), "rejected": _files(folders.rejected),
            "store": _files(folders.store / "good"), "ledger": ledger.to_dict("records")}


def _assert_nothing_lost(folders, files: dict[str, bytes]) -> None:
    """Each file is whole in the inbox, or fully added (stored + ledger row), or rejected with a reason."""
    ledger = ingested_images(folders.store).set_index("original_name")
    rejected = _files(folders.rejected)
    for name, data in files.items():
        in_inbox = (folders.inbox / name).is_file() and (folders.inbox / name).read_bytes() == data
        added = (name in ledger.index and ledger.loc[name, "sha256"] == _sha(data)
                 and Path(ledger.loc[name, "path"]).read_bytes() == data)
        stem, suffix = Path(name).stem, Path(name).suffix
        in_rejected = any(rejected.get(r) == data and f"{r}.reason.txt" in rejected
                          for r in [name] + [f"{stem}_{n}{suffix}" for n in range(1, 4)])
        assert in_inbox or added or in_rejected, (name, in_inbox, added, in_rejected)


def test_a_crash_at_any_step_loses_nothing_and_a_rerun_finishes_the_job(tmp_path, dataset):
    files = _batch(dataset)
    clean = ingest_folders(tmp_path / "clean", "synthetic/fabric")
    _drop(clean.inbox, files)
    steps = []
    expected = _run(clean, dataset, on_step=lambda step, name: steps.append((step, name)))
    assert {step for step, _ in steps} == set(STEPS)
    assert [n for n, _ in expected.added] == ["a.png", "e.jpg"]
    assert [n for n, _ in expected.rejected] == ["b.png", "c.png", "d.png", "f.png", "g.png"]
    final = _state(clean)
    assert final["inbox"] == {}

    for i, crash_at in enumerate(steps):
        folders = ingest_folders(tmp_path / str(i), "synthetic/fabric")
        _drop(folders.inbox, files)

        def on_step(step, name):
            if (step, name) == crash_at:
                raise Crash(crash_at)

        with pytest.raises(Crash):
            _run(folders, dataset, on_step=on_step)
        _assert_nothing_lost(folders, files)

        rerun = _run(folders, dataset)
        assert _state(folders) == final, crash_at  # nothing duplicated, nothing lost, same reasons
        step, name = crash_at
        assert rerun.completed == ([name] if step == "ledger" else []), crash_at
        done_before = {n for s, n in steps[:i + 1] if s in ("removed", "moved")}
        assert {n for n, _ in rerun.added + rerun.rejected} | set(rerun.completed) == set(files) - done_before


def test_a_stored_image_without_ledger_row_is_reused(folders, dataset):
    data = _encode(seed=30)
    _drop(folders.inbox, {"a.png": data})
    stray = folders.store / "good" / (_sha(data)[:16] + ".png")
    stray.parent.mkdir(parents=True)
    stray.write_bytes(data[:10])  # e.g. left by an older, non-atomic tool: overwritten
    result = _run(folders, dataset)
    assert result.added == [("a.png", stray.name)] and stray.read_bytes() == data
    assert _files(folders.store / "good") == {stray.name: data}


def test_completed_file_is_stored_again_when_its_image_went_missing(folders, dataset):
    data = _encode(seed=31)
    _drop(folders.inbox, {"a.png": data})

    def crash(step, name):
        if step == "ledger":
            raise Crash

    with pytest.raises(Crash):
        _run(folders, dataset, on_step=crash)
    stored = folders.store / "good" / (_sha(data)[:16] + ".png")
    stored.unlink()
    result = _run(folders, dataset)
    assert result.completed == ["a.png"] and stored.read_bytes() == data


# ----------------------------------------------------------------------------- versions and merging

def test_training_data_version_follows_the_train_images(tmp_path):
    out = tmp_path / "fabric"
    prepare_category("synthetic", "fabric", out, **TINY)
    v0 = training_data_version(out)
    assert len(v0) == 64 and v0 == training_data_version(out)

    test_image = out / "test" / "good" / "000.png"
    test_image.write_bytes(_encode(seed=40))
    assert training_data_version(out) == v0  # only the test set changed

    train_image = out / "train" / "good" / "001.png"
    original = train_image.read_bytes()
    train_image.write_bytes(_encode(seed=41))
    assert training_data_version(out) != v0
    train_image.write_bytes(original)
    assert training_data_version(out) == v0

    moved = tmp_path / "elsewhere" / "fabric"
    shutil.copytree(out, moved)
    assert training_data_version(moved) == v0  # relative paths: the folder's place does not count


def _ingest_two(tmp_path, dataset_dir) -> tuple:
    folders = ingest_folders(tmp_path / "data", "synthetic/fabric")
    files = {"new1.png": _encode(seed=50), "new2.jpg": _encode(".jpg", seed=51)}
    _drop(folders.inbox, files)
    result = _run(folders, dataset_dir)
    assert len(result.added) == 2
    return folders, files, result


def test_prepare_category_merges_ingested_images(tmp_path):
    out = tmp_path / "data" / "datasets" / "synthetic" / "fabric"
    plain = prepare_category("synthetic", "fabric", out, **TINY)
    v0 = training_data_version(out)
    folders, files, result = _ingest_two(tmp_path, out)

    merged = prepare_category("synthetic", "fabric", out, ingested_dir=folders.store, **TINY)
    assert not out.with_name("fabric.staging").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["fabric"]  # no temporary folder left
    validate_manifest(read_manifest(out))
    assert len(merged) == len(plain) + 2
    new = merged[merged["path"].str.contains("/ingested_")]
    assert new["split"].tolist() == ["train"] * 2 and new["label"].tolist() == [0, 0]
    assert new["defect_type"].tolist() == ["good"] * 2 and new["mask_path"].tolist() == ["", ""]
    assert set(new["category"]) == {"fabric"} and set(new["dataset"]) == {"synthetic"}
    by_name = dict(result.added)
    for name, data in files.items():
        image = out / "train" / "good" / f"ingested_{by_name[name]}"
        assert image.read_bytes() == data and image.as_posix() in set(new["path"])
    # the source's own images are as before, in the same order
    pd.testing.assert_frame_equal(merged[~merged.index.isin(new.index)].reset_index(drop=True), plain)
    assert training_data_version(out) != v0

    again = prepare_category("synthetic", "fabric", out, ingested_dir=folders.store, **TINY)
    pd.testing.assert_frame_equal(again, merged)  # preparing again gives the same folder


def test_prepare_category_without_ingested_images_is_unchanged(tmp_path, monkeypatch):
    import ad_models.data.sources as sources

    def no_merge(*args, **kwargs):
        raise AssertionError("merge_ingested must not be called")

    monkeypatch.setattr(sources, "merge_ingested", no_merge)
    reference = prepare_category("synthetic", "fabric", tmp_path / "a", **TINY)
    empty_store = tmp_path / "ingested" / "synthetic" / "fabric"
    for i, ingested_dir in enumerate([None, empty_store]):
        out = tmp_path / f"b{i}"
        df = prepare_category("synthetic", "fabric", out, ingested_dir=ingested_dir, **TINY)
        relocated = {c: df[c].str.replace(out.as_posix(), (tmp_path / "a").as_posix()) for c in ("path", "mask_path")}
        pd.testing.assert_frame_equal(df.assign(**relocated), reference)
        assert not out.with_name(out.name + ".staging").exists()


@pytest.mark.parametrize("where", ["copyfile", "validate_manifest"])
def test_a_crash_inside_the_merge_keeps_the_previous_dataset(tmp_path, monkeypatch, where):
    out = tmp_path / "data" / "datasets" / "synthetic" / "fabric"
    prepare_category("synthetic", "fabric", out, **TINY)
    folders, _, _ = _ingest_two(tmp_path, out)
    before = _files(out)

    def boom(*args, **kwargs):
        raise Crash(where)

    if where == "copyfile":
        monkeypatch.setattr(ingest_module.shutil, "copyfile", boom)
    else:
        monkeypatch.setattr(ingest_module, "validate_manifest", boom)
    with pytest.raises(Crash):
        prepare_category("synthetic", "fabric", out, ingested_dir=folders.store, **TINY)
    assert _files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["fabric"]  # staging and temporary folders gone


def test_merge_ingested_refuses_a_name_clash(tmp_path):
    staging = tmp_path / "fabric.staging"
    prepare_category("synthetic", "fabric", staging, **TINY)
    folders, _, result = _ingest_two(tmp_path, staging)
    shutil.copyfile(staging / "train" / "good" / "000.png", staging / "train" / "good" / f"ingested_{result.added[0][1]}")
    with pytest.raises(ValueError, match="already exists"):
        merge_ingested(staging, folders.store, tmp_path / "fabric")
    assert not (tmp_path / "fabric").exists()


def test_waiting_files_are_what_the_next_ingest_takes_and_the_store_can_exist_empty(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert ingest_module.waiting_files(tmp_path / "missing") == []
    for name in ("b.png", "a.png", ".hidden.png", "c.png.part"):
        (inbox / name).write_bytes(b"x")
    young = inbox / "d.png"
    young.write_bytes(b"x")
    old = time.time() - 60
    for name in ("a.png", "b.png", ".hidden.png", "c.png.part"):
        os.utime(inbox / name, (old, old))
    rules = ingest_module.IngestRules(min_age_seconds=30)
    assert [p.name for p in ingest_module.waiting_files(inbox, rules)] == ["a.png", "b.png"]
    store = ingest_module.ensure_store(tmp_path / "store")
    assert (store / "good").is_dir() and ingest_module.ingested_images(store).empty
    assert list(ingest_module.ingested_images(store).columns)[:len(ingest_module.LEDGER_COLUMNS)] == ingest_module.LEDGER_COLUMNS
