"""Deployment decisions (ad_models.deploy) and prediction with the deployed model (ad_models.predict).

The models are real and cheap: the `mean_image` baseline on a tiny synthetic `circuit` category
(an aligned object, where a mean image is a fair model). "Worse" candidates are real models too:
the same baseline trained on `fabric` (another category) is far worse on the circuit bank, and one
at 64 px is slightly worse than one at 32 px.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ad_models import deploy, runs
from ad_models.data.layout import DatasetError, read_manifest, write_manifest
from ad_models.deploy import decide, deployed_info, deployment_history, promote
from ad_models.predict import output_names, predict_images
from ad_models.thresholds import DecisionPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def circuit(tmp_path_factory):
    """A tiny circuit category (64 px, 6 validation good images), its bank, and three trained models:
    good (32 px), slightly_worse (64 px) and worse (trained on fabric)."""
    from ad_models.data.sources import prepare_category
    from ad_models.defects.bank import build_bank
    root = tmp_path_factory.mktemp("circuit")
    dataset, bank, fabric = root / "circuit", root / "bank", root / "fabric"
    prepare_category("synthetic", "circuit", dataset, n_train=12, n_validation=6, n_test_good=4,
                     n_test_defect=8, size=64, seed=0)
    prepare_category("synthetic", "fabric", fabric, n_train=4, n_test_good=0, n_test_defect=0, size=64, seed=0)
    build_bank(dataset, bank, {"image_size": 64, "min_holdout": 4, "defects_per_image": 2}, progress=False)
    models = root / "models"
    train = dict(device="cpu", progress=False)
    runs.train("mean_image", {"image_size": 32}, dataset, models / "good", bank_dir=bank, **train)
    runs.train("mean_image", {"image_size": 64}, dataset, models / "slightly_worse", bank_dir=bank, **train)
    runs.train("mean_image", {"image_size": 32}, fabric, models / "worse", **train)
    return {"dataset": dataset, "bank": bank, "root": root, **{m.name: m for m in models.iterdir()}}


def _promote(c, candidate: str, deploy_dir: Path, tolerance: float = 0.01, dataset=None) -> dict:
    return promote(c[candidate], deploy_dir, c["bank"], dataset or c["dataset"], tolerance, device="cpu")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- thresholds and decisions

def test_decide_compares_every_shared_metric_within_the_tolerance():
    deployed = {"bank": {"image_auroc": 0.905, "pixel_auroc": 0.90, "n_good": 4},
                "labelled_validation": {"image_auroc": 0.80}}
    assert decide({"bank": {"image_auroc": 0.5}}, None, 0.01)["decision"] == "first"

    ok = decide({"bank": {"image_auroc": 0.90, "pixel_auroc": 0.95}, "labelled_validation": {"image_auroc": 0.85}},
                deployed, 0.01)
    assert ok["decision"] == "deployed" and ok["accepted"] and len(ok["reasons"]) == 3

    worse = decide({"bank": {"image_auroc": 0.812, "pixel_auroc": 0.95}, "labelled_validation": {"image_auroc": 0.85}},
                   deployed, 0.01)
    assert worse["decision"] == "rejected" and not worse["accepted"]
    assert "bank image_auroc 0.812 < deployed 0.905 - 0.01" in worse["reasons"]

    # exactly at the tolerance is accepted despite float rounding (0.9 - 0.1 = 0.8000000000000002)
    assert decide({"bank": {"image_auroc": 0.8}}, {"bank": {"image_auroc": 0.9}}, 0.1)["accepted"]
    # a NaN candidate metric is worse than a number (None is how JSON stores NaN); a NaN deployed one never blocks
    for nan in (math.nan, None):
        assert decide({"bank": {"image_auroc": nan}}, {"bank": {"image_auroc": 0.5}}, 0.5)["decision"] == "rejected"
        assert decide({"bank": {"image_auroc": 0.1}}, {"bank": {"image_auroc": nan}}, 0.0)["accepted"]
    # metrics or sets present for one model only are not compared
    assert decide({"bank": {"image_auroc": 0.9}, "labelled_validation": {"image_auroc": 0.1}},
                  {"bank": {"image_auroc": 0.9, "pixel_auroc": 0.9}}, 0.0)["accepted"]
    with pytest.raises(ValueError, match="tolerance"):
        decide({}, {}, -0.1)


# ----------------------------------------------------------------------------- promotion

def test_first_promotion_deploys_a_copy_with_good_image_thresholds(circuit, tmp_path):
    before = _snapshot(circuit["good"])
    record = _promote(circuit, "good", tmp_path / "deployed")
    assert record["decision"] == "first" and record["accepted"] and record["previous_id"] is None
    assert record["candidate_id"] == deploy.candidate_id(circuit["good"]) and len(record["candidate_id"]) == 12
    assert set(record["candidate_metrics"]) == {"bank", "validation_good"}  # no defective validation image
    bank = record["candidate_metrics"]["bank"]
    assert bank["n_good"] == 4 and bank["n_defective"] == 8 and bank["image_auroc"] > 0.6 and bank["pixel_auroc"] > 0.9
    threshold = record["threshold"]
    assert threshold["n_good_images"] == 4 + 6  # bank + validation good
    assert threshold["policy"]["policy"] == "false_alarm_rate" and threshold["policy"]["max_false_alarm_rate"] == 0.02
    assert threshold["map_low"] < threshold["pixel"] and 0 <= threshold["bank_recall"] <= 1
    assert threshold["expected_false_alarm_rate"] == pytest.approx(0.02, abs=1e-6)

    current = tmp_path / "deployed" / "current"
    assert {"config.json", "weights.pt", "training_log.json", "deployment.json"} <= set(_snapshot(current))
    info = deployed_info(tmp_path / "deployed")
    assert info["candidate_id"] == record["candidate_id"] and info["deployed_at"] == record["decided_at"]
    assert info["threshold"]["image"] == pytest.approx(threshold["image"]) and info["model_dir"] == str(current)
    assert [h["decision"] for h in deployment_history(tmp_path / "deployed")] == ["first"]
    assert _snapshot(circuit["good"]) == before  # the candidate folder is never changed
    assert not (tmp_path / "deployed" / "rejected").exists()


def test_clearly_worse_candidate_is_rejected_and_kept(circuit, tmp_path):
    where = tmp_path / "deployed"
    first = _promote(circuit, "good", where)
    current = _snapshot(where / "current")
    record = _promote(circuit, "worse", where)
    assert record["decision"] == "rejected" and not record["accepted"]
    assert record["previous_id"] == first["candidate_id"]
    cand, dep = record["candidate_metrics"]["bank"], record["deployed_metrics"]["bank"]
    assert cand["pixel_auroc"] < dep["pixel_auroc"] - 0.3  # the fabric model cannot see circuit defects
    assert any(r.startswith("bank pixel_auroc") and " < deployed " in r for r in record["reasons"])

    assert _snapshot(where / "current") == current  # the deployed model is untouched
    kept = where / "rejected" / record["candidate_id"]
    assert (kept / "weights.pt").is_file() and deploy.candidate_id(kept) == record["candidate_id"]
    assert deploy.read_json(kept / "decision.json")["reasons"] == record["reasons"]
    history = deployment_history(where)
    assert [h["decision"] for h in history] == ["first", "rejected"]
    assert history[1]["reasons"] == record["reasons"] and history[1]["tolerance"] == 0.01
    assert history[1]["deployed_metrics"]["bank"]["image_auroc"] == pytest.approx(dep["image_auroc"])
    assert deployed_info(where)["candidate_id"] == first["candidate_id"]


def test_candidate_within_tolerance_is_deployed(circuit, tmp_path):
    where = tmp_path / "deployed"
    first = _promote(circuit, "good", where)
    strict = _promote(circuit, "slightly_worse", where, tolerance=0.01)
    cand, dep = strict["candidate_metrics"]["bank"], strict["deployed_metrics"]["bank"]
    gap = max(dep[m] - cand[m] for m in ("image_auroc", "pixel_auroc"))
    assert strict["decision"] == "rejected" and 0.01 < gap < 0.15  # a little worse: a matter of tolerance

    loose = _promote(circuit, "slightly_worse", where, tolerance=0.15)
    assert loose["decision"] == "deployed" and loose["accepted"] and loose["previous_id"] == first["candidate_id"]
    assert all(" >= deployed " in r for r in loose["reasons"])
    assert deployed_info(where)["candidate_id"] == loose["candidate_id"] != first["candidate_id"]
    assert deploy.read_json(where / "current" / "config.json")["config"]["image_size"] == 64
    assert [h["decision"] for h in deployment_history(where)] == ["first", "rejected", "deployed"]


def test_identical_candidate_is_unchanged(circuit, tmp_path):
    where = tmp_path / "deployed"
    _promote(circuit, "good", where)
    current = _snapshot(where / "current")
    # retrained from scratch into another folder: same content, so the same id
    again = tmp_path / "retrained"
    runs.train("mean_image", {"image_size": 32}, circuit["dataset"], again, bank_dir=circuit["bank"],
               device="cpu", progress=False)
    assert deploy.candidate_id(again) == deploy.candidate_id(circuit["good"])
    record = promote(again, where, circuit["bank"], circuit["dataset"], 0.01, device="cpu")
    assert record["decision"] == "unchanged" and record["candidate_metrics"] is None
    assert _snapshot(where / "current") == current and not (where / "rejected").exists()
    assert [h["decision"] for h in deployment_history(where)] == ["first", "unchanged"]


def test_a_new_decision_policy_resets_the_deployed_models_thresholds_without_a_new_model(circuit, tmp_path):
    where = tmp_path / "deployed"
    first = _promote(circuit, "good", where)["threshold"]
    strict = DecisionPolicy(max_false_alarm_rate=0.001)
    record = promote(circuit["good"], where, circuit["bank"], circuit["dataset"], 0.01, device="cpu", policy=strict)
    assert record["decision"] == "unchanged" and "the decision policy changed" in record["reasons"][-1]
    now = deployed_info(where)["threshold"]
    assert now["policy"]["max_false_alarm_rate"] == 0.001 and now["image"] > first["image"]
    assert now["expected_false_alarm_rate"] < first["expected_false_alarm_rate"]
    # the same policy again: nothing to redo
    again = promote(circuit["good"], where, circuit["bank"], circuit["dataset"], 0.01, device="cpu", policy=strict)
    assert again["threshold"] is None and deployed_info(where)["threshold"] == now
    fixed = DecisionPolicy(policy="fixed", image_threshold={"mean_image": 0.5}, pixel_threshold=0.25)
    promote(circuit["good"], where, circuit["bank"], circuit["dataset"], 0.01, device="cpu", policy=fixed)
    assert deployed_info(where)["threshold"]["image"] == 0.5 and deployed_info(where)["threshold"]["pixel"] == 0.25


def _with_labelled_validation(dataset: Path, out: Path) -> Path:
    """A copy of `dataset` whose defective test images are validation images (as a user's would be)."""
    shutil.copytree(dataset, out)
    manifest = read_manifest(out)
    manifest.loc[manifest.label == 1, "split"] = "validation"
    write_manifest(manifest, out)
    return out


def test_labelled_validation_images_are_compared_when_present(circuit, tmp_path):
    labelled = _with_labelled_validation(circuit["dataset"], tmp_path / "labelled")
    sets = deploy.validation_sets(circuit["bank"], labelled, 32)
    assert list(sets) == ["bank", "labelled_validation"] and len(sets["labelled_validation"]) == 6 + 8
    assert list(deploy.validation_sets(circuit["bank"], circuit["dataset"], 32)) == ["bank", "validation_good"]
    assert list(deploy.validation_sets(circuit["bank"], None, 32)) == ["bank"]

    where = tmp_path / "deployed"
    first = _promote(circuit, "good", where, dataset=labelled)
    valid = first["candidate_metrics"]["labelled_validation"]
    assert valid["n_good"] == 6 and valid["n_defective"] == 8 and 0 <= valid["image_auroc"] <= 1
    assert "pixel_auroc" in valid  # the test masks came along
    assert first["threshold"]["n_good_images"] == 4 + 6
    record = _promote(circuit, "worse", where, dataset=labelled)
    assert set(record["deployed_metrics"]) == {"bank", "labelled_validation"}
    assert any(r.startswith("labelled_validation image_auroc") for r in record["reasons"])

    # no validation images at all: the bank alone
    plain = promote(circuit["good"], tmp_path / "plain", circuit["bank"], None, 0.01, device="cpu")
    assert set(plain["candidate_metrics"]) == {"bank"} and plain["threshold"]["n_good_images"] == 4


def test_interrupted_copy_leaves_the_old_current(circuit, tmp_path, monkeypatch):
    where = tmp_path / "deployed"
    _promote(circuit, "good", where)
    current, history = _snapshot(where / "current"), deployment_history(where)
    copies = []

    def copy_then_crash(src, dst, *args, **kwargs):
        copies.append(src)
        if len(copies) == 2:
            raise OSError("disk full (simulated)")
        return real_copy(src, dst, *args, **kwargs)

    real_copy = shutil.copy2
    monkeypatch.setattr(deploy.shutil, "copy2", copy_then_crash)
    with pytest.raises(OSError, match="simulated"):
        _promote(circuit, "slightly_worse", where, tolerance=1.0)
    monkeypatch.undo()
    assert _snapshot(where / "current") == current and deployment_history(where) == history
    assert sorted(p.name for p in where.iterdir()) == ["current", "history.json"]  # no temporary left


def test_crash_between_the_renames_keeps_the_old_model_findable(circuit, tmp_path, monkeypatch):
    """atomic_dir moves current/ aside, then renames the new one in; a crash between the two leaves
    only the old folder, aside: it is still the deployed model, and the next promote puts it back."""
    import os
    where = tmp_path / "deployed"
    first = _promote(circuit, "good", where)
    real_replace = os.replace

    def crash_on_swap(src, dst):
        if Path(dst) == where / "current" and Path(src).name.endswith(".tmp"):
            raise KeyboardInterrupt("power cut (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap)
    with pytest.raises(KeyboardInterrupt):
        _promote(circuit, "slightly_worse", where, tolerance=1.0)
    monkeypatch.undo()
    assert not (where / "current").exists()
    info = deployed_info(where)
    assert info["candidate_id"] == first["candidate_id"] and Path(info["model_dir"]).name.startswith(".current.old-")

    record = _promote(circuit, "slightly_worse", where, tolerance=1.0)
    assert record["decision"] == "deployed" and record["previous_id"] == first["candidate_id"]
    assert deployed_info(where)["model_dir"] == str(where / "current")
    assert not list(where.glob(".current*"))


def test_crash_before_the_history_is_written_is_repaired(circuit, tmp_path, monkeypatch):
    """current/ is replaced before history.json is rewritten: a crash between the two loses the
    entry, and the next promote adds it back from current/deployment.json."""
    where = tmp_path / "deployed"
    _promote(circuit, "good", where)
    monkeypatch.setattr(deploy, "_append_history", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _promote(circuit, "slightly_worse", where, tolerance=1.0)
    monkeypatch.undo()
    assert [h["decision"] for h in deployment_history(where)] == ["first"]
    assert deployed_info(where)["candidate_id"] == deploy.candidate_id(circuit["slightly_worse"])
    record = _promote(circuit, "slightly_worse", where)
    assert record["decision"] == "unchanged"
    assert [h["decision"] for h in deployment_history(where)] == ["first", "deployed", "unchanged"]


# ----------------------------------------------------------------------------- prediction

def test_predict_passes_good_and_fails_a_defect(circuit, tmp_path):
    where = tmp_path / "deployed"
    _promote(circuit, "good", where)
    # an unseen good image. The threshold comes from 10 good images; a few unseen good ones still score
    # above it (measured: 4 % of 240 at 64 px, against 11 % for their plain 0.99 quantile)
    good = circuit["dataset"] / "test" / "good" / "002.png"
    image = cv2.imread(str(good))
    image[20:34, 24:38] = (255, 0, 255)  # a strong magenta blot
    defective = tmp_path / "new" / "blot.png"
    defective.parent.mkdir()
    cv2.imwrite(str(defective), cv2.resize(image, (96, 80), interpolation=cv2.INTER_LINEAR))  # not the model's size
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    table = predict_images(where, [good, defective], out, device="cpu", batch_size=1)
    assert list(table.columns) == ["image", "score", "threshold", "verdict", "map", "mask"]
    assert table.verdict.tolist() == ["pass", "fail"]
    assert table.score[0] <= table.threshold[0] < table.score[1]
    assert table.threshold[0] == pytest.approx(deployed_info(where)["threshold"]["image"])
    csv = pd.read_csv(out / "predictions.csv")
    assert csv.verdict.tolist() == ["pass", "fail"] and csv.image.tolist() == [str(good), str(defective)]
    blot_map, blot_mask = cv2.imread(str(out / "blot_map.png")), cv2.imread(str(out / "blot_mask.png"), 0)
    assert blot_map.shape == (80, 96, 3) and blot_mask.shape == (80, 96)
    assert blot_mask[25 * 80 // 64, 30 * 96 // 64] == 255 and set(np.unique(blot_mask)) <= {0, 255}
    assert blot_mask.mean() / 255 < 0.25  # the blot, not the whole image
    assert cv2.imread(str(out / "002_map.png")).shape == (64, 64, 3)
    assert (out / "notes.txt").read_text() == "mine"  # files this run does not write are left alone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries

    # a rejected copy (kept with its decision and thresholds) can be inspected the same way
    rejected = _promote(circuit, "worse", where)
    table = predict_images(where / "rejected" / rejected["candidate_id"], [defective], tmp_path / "out2", device="cpu")
    assert len(table) == 1


def test_predict_errors_name_the_file(circuit, tmp_path):
    where = tmp_path / "deployed"
    _promote(circuit, "good", where)
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predict_images(where, missing, tmp_path / "out", device="cpu")  # one path is fine too
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="broken.png"):
        predict_images(where, [broken], tmp_path / "out", device="cpu")
    with pytest.raises(ValueError, match="promote it first"):
        predict_images(circuit["good"], [broken], tmp_path / "out", device="cpu")
    with pytest.raises(FileNotFoundError, match="no deployed model"):
        predict_images(tmp_path / "empty", [broken], tmp_path / "out", device="cpu")


def test_output_names_disambiguate_shared_stems(tmp_path):
    paths = [tmp_path / "test" / "crack" / "000.png", tmp_path / "test" / "hole" / "000.png", tmp_path / "x" / "a.png"]
    assert output_names(paths) == ["test_crack_000", "test_hole_000", "a"]
    with pytest.raises(ValueError, match="same output files"):
        output_names([paths[0], paths[0]])
