"""Deployment: which trained model of a (method, category) is in use, and why.

Every model `runs.train` writes is a *candidate*. `promote` scores the candidate and the deployed
model on the same validation data (the synthetic defect bank and, when the user has them, labelled
validation images), and deploys the candidate only if it is not worse on any metric by more than a
tolerance. A rejected candidate is kept for inspection, never deployed. Every decision is logged.

Deployment folder (one per method, dataset and category, e.g. data/deployed/<method>/<dataset>/<category>):

    current/                   a full copy of the deployed model folder (config.json, weights.pt, ...)
    current/deployment.json    the decision that deployed it: candidate id, metrics, thresholds
    rejected/<candidate id>/   copies of rejected candidates, each with its decision.json
    history.json               every decision, oldest first (rewritten atomically)

A candidate id is a hash of the model's content (method, config, weight tensors), so re-offering the
model that is already deployed is recognised ("unchanged") and changes nothing but the history.

The thresholds a deployed model predicts with are set by the decision policy (`thresholds`; by
default on good images only), so deployment needs no real defect image.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ad_models import metrics
from ad_models.data.layout import read_manifest
from ad_models.data.loading import ImageDataset, image_shape
from ad_models.defects.bank import read_bank
from ad_models.io import atomic_dir, read_json, write_json
from ad_models.methods import load_method
from ad_models.thresholds import DecisionPolicy, ScoreSample, choose_thresholds

CURRENT = "current"
REJECTED = "rejected"
HISTORY = "history.json"
DEPLOYMENT = "deployment.json"  # in current/: the decision that deployed it
DECISION = "decision.json"  # in rejected/<id>/: the decision that rejected it

# the comparison sets validation_sets can return
BANK = "bank"  # synthetic defects on held-out good training images
LABELLED = "labelled_validation"  # the dataset's validation split when it has real defective images
VALIDATION_GOOD = "validation_good"  # the validation split when it is all good: thresholds only, no AUROC

COMPARED = ("image_auroc", "pixel_auroc")  # the metrics `decide` compares, higher is better
DECISIONS = ("first", "deployed", "rejected", "unchanged")


# ----------------------------------------------------------------------------- the comparison data

def validation_sets(bank_dir: str | os.PathLike | None, dataset_dir: str | os.PathLike | None,
                    image_size: int | tuple[int, int]) -> dict[str, ImageDataset]:
    """The named image sets a candidate and the deployed model are compared on.

    - "bank": the synthetic defect bank (`read_bank`), when `bank_dir` is given.
    - "labelled_validation": the dataset's validation rows, good and defective, when at least one
      of them is a real defect (label 1): the user's own labelled images outrank synthetic ones.
    - "validation_good": the validation rows when all are good: they have no AUROC, but their
      scores join the good-image threshold.
    """
    sets: dict[str, ImageDataset] = {}
    if bank_dir is not None:
        bank, _ = read_bank(bank_dir)
        sets[BANK] = ImageDataset(bank, image_size)
    if dataset_dir is not None:
        manifest = read_manifest(dataset_dir)
        valid = manifest[manifest.split == "validation"].reset_index(drop=True)
        if (valid.label == 1).any():
            sets[LABELLED] = ImageDataset(valid, image_size)
        elif len(valid):
            sets[VALIDATION_GOOD] = ImageDataset(valid, image_size)
    if not sets:
        raise ValueError(f"no validation data: no defect bank given and {dataset_dir} has no validation images "
                         f"(build the defect bank first)")
    return sets


def score_model(model_dir: str | os.PathLike, sets: dict[str, ImageDataset], device: str = "auto",
                batch_size: int = 8) -> dict[str, Any]:
    """`score_sets` for a saved model."""
    return score_sets(load_method(model_dir, device), sets, batch_size)


def score_sets(model, sets: dict[str, ImageDataset], batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Score a loaded model on each set of `validation_sets`.

    Returns {"metrics": {set: {n_good, n_defective, image_auroc?, pixel_auroc?}}, "sample": the
    scores and map values of all sets as one `thresholds.ScoreSample`}. AUROCs are present only where
    defined: image AUROC needs good and defective images, pixel AUROC defective images with masks
    (pixels of defective images without a mask are left out, not counted as good). A model whose
    scores or maps contain NaN gets NaN metrics (never an error): it is worse.
    """
    out: dict[str, Any] = {"metrics": {}}
    samples = []
    for name, data in sets.items():
        data = data.with_resize(model.config.resize)  # each model sees images as it was trained to
        pred = model.predict_dataset(data, batch_size, progress=progress, desc=f"{model.name}: {name}")
        labels, scores, maps, masks = pred["labels"], pred["scores"], pred["maps"], pred["masks"]
        good = labels == 0
        entry: dict[str, Any] = {"n_good": int(good.sum()), "n_defective": int((~good).sum())}
        if good.any() and (~good).any():
            entry["image_auroc"] = (metrics.image_auroc(labels, scores) if np.isfinite(scores).all()
                                    else float("nan"))
        known = good | np.array([bool(p) for p in data.mask_paths])  # images whose every pixel has a label
        if masks[known].any() and (~masks[known]).any():
            entry["pixel_auroc"] = (metrics.pixel_auroc(masks[known], maps[known]) if np.isfinite(maps[known]).all()
                                    else float("nan"))
        out["metrics"][name] = entry
        samples.append(ScoreSample.from_predictions(pred, known))
    out["sample"] = ScoreSample.concat(samples)
    return out


# ----------------------------------------------------------------------------- the decision

def _number(value) -> float:
    """A metric as a float; None (how JSON stores NaN) is NaN."""
    return float("nan") if value is None else float(value)


def decide(candidate: dict[str, dict[str, Any]], deployed: dict[str, dict[str, Any]] | None,
           tolerance: float) -> dict[str, Any]:
    """Whether to deploy a candidate, given both models' metrics on the same sets
    ({set: {"image_auroc": ..., "pixel_auroc": ...}}).

    Accepted ("deployed") if, for every metric present for both, candidate >= deployed - tolerance;
    "first" (accepted) when nothing is deployed. A NaN candidate metric where the deployed model has
    a number is worse; a NaN deployed metric never blocks. Returns {"decision", "accepted", "reasons"},
    one readable reason per metric compared.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if deployed is None:
        return {"decision": "first", "accepted": True, "reasons": ["no model deployed yet"]}
    reasons, worse = [], False
    for name in sorted(set(candidate) & set(deployed)):
        for metric in COMPARED:
            if metric not in candidate[name] or metric not in deployed[name]:
                continue
            new, old = _number(candidate[name][metric]), _number(deployed[name][metric])
            label = f"{name} {metric}"
            if math.isnan(old):
                reasons.append(f"{label}: deployed model's is undefined (NaN), candidate {new:.3f}: not compared")
            elif math.isnan(new):
                worse = True
                reasons.append(f"{label}: candidate's is undefined (NaN), deployed {old:.3f}")
            elif new >= old - tolerance - 1e-12:  # 1e-12: float rounding must not reject an equal score
                reasons.append(f"{label} {new:.3f} >= deployed {old:.3f} - {tolerance:g}")
            else:
                worse = True
                reasons.append(f"{label} {new:.3f} < deployed {old:.3f} - {tolerance:g}")
    if not reasons:
        reasons.append("no metric defined for both models: nothing to compare")
    return {"decision": "rejected" if worse else "deployed", "accepted": not worse, "reasons": reasons}


# ----------------------------------------------------------------------------- identity and folders

def _hash_value(h, value) -> None:
    """Feed a saved state (dicts, lists, tensors, numbers, strings) into `h`, independent of file
    layout: torch.save's bytes depend on the file name it wrote to, so the file cannot be hashed."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)};".encode())
        for key in sorted(value, key=str):
            h.update(f"{key!s};".encode())
            _hash_value(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"list {len(value)};".encode())
        for item in value:
            _hash_value(h, item)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def candidate_id(model_dir: str | os.PathLike) -> str:
    """First 12 hex digits of a sha256 over the model's method, config and weights (their values,
    not the files' bytes): the same model gives the same id wherever and whenever it was saved."""
    model_dir = Path(model_dir)
    for name in ("config.json", "weights.pt"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: {model_dir} is not a saved model (train it first)")
    saved = read_json(model_dir / "config.json")
    h = hashlib.sha256(json.dumps({"method": saved.get("method"), "config": saved.get("config")},
                                  sort_keys=True).encode())
    _hash_value(h, torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True))
    return h.hexdigest()[:12]


def _current_dir(deploy_dir: Path) -> Path | None:
    """The complete deployed model folder: current/, or, after a crash in the middle of replacing
    it, the old version `atomic_dir` had moved aside (.current.old-<pid>)."""
    if (deploy_dir / CURRENT / DEPLOYMENT).is_file():
        return deploy_dir / CURRENT
    aside = sorted(deploy_dir.glob(f".{CURRENT}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in aside if (p / DEPLOYMENT).is_file()), None)


def _restore_current(deploy_dir: Path) -> None:
    """Put back a deployed folder that a crash left moved aside (see `_current_dir`)."""
    found = _current_dir(deploy_dir)
    if found is not None and found.name != CURRENT:
        shutil.rmtree(deploy_dir / CURRENT, ignore_errors=True)  # an incomplete current/, if any
        os.replace(found, deploy_dir / CURRENT)


def deployed_info(deploy_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The decision record of the deployed model (current/deployment.json) plus "model_dir", the
    folder to load it from; None when nothing is deployed."""
    folder = _current_dir(Path(deploy_dir))
    if folder is None:
        return None
    return {**read_json(folder / DEPLOYMENT), "model_dir": str(folder)}


def deployment_history(deploy_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every decision taken for this deployment folder, oldest first (empty when none)."""
    path = Path(deploy_dir) / HISTORY
    return read_json(path) if path.is_file() else []


def _append_history(deploy_dir: Path, record: dict[str, Any]) -> None:
    write_json(deploy_dir / HISTORY, deployment_history(deploy_dir) + [record])


def _repair_history(deploy_dir: Path) -> None:
    """current/ is replaced before the history is written; if a crash fell between the two, the
    deployed model's record is missing from the history: add it back."""
    info = deployed_info(deploy_dir)
    if info is None:
        return
    info.pop("model_dir")
    info.pop("deployed_at", None)
    seen = {(r.get("candidate_id"), r.get("decided_at")) for r in deployment_history(deploy_dir)}
    if (info["candidate_id"], info["decided_at"]) not in seen:
        _append_history(deploy_dir, info)


def _copy_model(source: Path, dest: Path) -> None:
    """Copy every file of a model folder into `dest` (an empty folder), except decision records."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and rel.as_posix() not in (DEPLOYMENT, DECISION):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- promotion

def promote(candidate_dir: str | os.PathLike, deploy_dir: str | os.PathLike,
            bank_dir: str | os.PathLike | None, dataset_dir: str | os.PathLike | None,
            tolerance: float = 0.01, device: str = "auto", policy: DecisionPolicy | None = None,
            batch_size: int = 8) -> dict[str, Any]:
    """Offer the trained model in `candidate_dir` for deployment; return the decision record.

    Scores the candidate and the deployed model on the same current `validation_sets`, `decide`s,
    then either replaces current/ with a copy of the candidate (whole, via a temporary folder and a
    rename: a crash leaves the old or the new current/, never half of one) or copies the candidate
    into rejected/<id>/; and appends the record to history.json. The candidate folder itself is
    never changed. Re-offering the deployed model records "unchanged" and changes nothing else.

    The record: candidate_id, candidate_dir, method, decision (first/deployed/rejected/unchanged),
    accepted, reasons, tolerance, decided_at (UTC), previous_id (the model deployed before),
    candidate_metrics and deployed_metrics ({set: {...}}, see `score_model`) and threshold (the
    candidate's thresholds under `policy`, default `DecisionPolicy()`: see `thresholds.choose_thresholds`).
    """
    candidate_dir, deploy_dir = Path(candidate_dir).absolute(), Path(deploy_dir)
    cid = candidate_id(candidate_dir)
    if deploy_dir.is_dir():
        _restore_current(deploy_dir)
        _repair_history(deploy_dir)
    deployed = deployed_info(deploy_dir)
    saved = read_json(candidate_dir / "config.json")
    record: dict[str, Any] = {
        "candidate_id": cid, "candidate_dir": str(candidate_dir), "method": saved["method"], "tolerance": tolerance,
        "previous_id": deployed["candidate_id"] if deployed else None}

    policy = policy or DecisionPolicy()
    if deployed is not None and deployed["candidate_id"] == cid:
        reasons, threshold = [f"candidate {cid} is the deployed model"], None
        if (deployed.get("threshold") or {}).get("policy") != asdict(policy):
            # a new decision policy applies to the deployed model at once, without retraining it
            sets = validation_sets(bank_dir, dataset_dir, image_shape(saved["config"]["image_size"]))
            sample = score_model(deployed["model_dir"], sets, device, batch_size)["sample"]
            if sample.finite():
                threshold = choose_thresholds(policy, sample, saved["method"])
                info_file = Path(deployed["model_dir"]) / DEPLOYMENT
                write_json(info_file, {**read_json(info_file), "threshold": threshold})
                reasons.append(f"the decision policy changed: thresholds set again ({policy.describe()})")
        record.update(decision="unchanged", accepted=True, decided_at=_now(), reasons=reasons,
                      candidate_metrics=None, deployed_metrics=None, threshold=threshold)
        _append_history(deploy_dir, record)
        return record

    # both models see the sets at the candidate's input size, so pixel metrics are on one grid
    sets = validation_sets(bank_dir, dataset_dir, image_shape(saved["config"]["image_size"]))
    if not any(s.labels and len(set(s.labels)) == 2 for s in sets.values()):
        raise ValueError(f"the validation data ({', '.join(sets)}) has no defective image: models cannot be "
                         f"compared (build the defect bank)")
    scored = score_model(candidate_dir, sets, device, batch_size)
    old = score_model(deployed["model_dir"], sets, device, batch_size)["metrics"] if deployed else None
    verdict = decide(scored["metrics"], old, tolerance)
    threshold = None
    if scored["sample"].finite():
        threshold = choose_thresholds(policy, scored["sample"], saved["method"])
    elif verdict["accepted"]:  # whatever the metrics say, a model without a threshold cannot predict
        verdict = {"decision": "rejected", "accepted": False,
                   "reasons": verdict["reasons"] + ["candidate's good-image scores or maps contain NaN or inf"]}
    record.update(verdict, decided_at=_now(), candidate_metrics=scored["metrics"], deployed_metrics=old,
                  threshold=threshold)

    if record["accepted"]:
        with atomic_dir(deploy_dir / CURRENT) as tmp:
            _copy_model(candidate_dir, tmp)
            write_json(tmp / DEPLOYMENT, {**record, "deployed_at": record["decided_at"]})
    else:
        with atomic_dir(deploy_dir / REJECTED / cid) as tmp:
            _copy_model(candidate_dir, tmp)
            write_json(tmp / DECISION, record)
    _append_history(deploy_dir, record)
    return record
