"""Train a method on a prepared category, and evaluate a saved model on its test set.

These are the library calls behind the pipeline's `model` and `evaluation` assets and the
benchmarks: each reads a category folder (MVTec layout + manifest.csv) and writes one folder,
atomically, so an interrupted run leaves the previous complete version.

Model folder:      config.json, weights.pt, training_log.json
Evaluation folder: calibration.json (the decision policy, the thresholds it set on the defect bank and
                   validation images, and what they promise: `thresholds.choose_thresholds`),
                   metrics.json (with the test set's decisions at those thresholds), scores.csv (one row per test image; a column per score part for
                   methods that fuse several, e.g. BVPN's score_structural, score_logical), roc.csv (image-level ROC),
                   gallery.png (test images, anomaly maps, ground truth, the defect masks the model
                   draws at its pixel threshold), learning_curve.csv (the model's
                   training loss and bank scores per epoch or iteration, copied from its training log)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from ad_models import metrics
from ad_models.data.ingest import training_data_version
from ad_models.data.layout import read_manifest
from ad_models.data.sources import mvtec_loco
from ad_models.defects.bank import read_bank
from ad_models.deploy import score_sets, validation_sets
from ad_models.io import atomic_dir, read_json, write_json
from ad_models.methods import create_method, load_method
from ad_models.methods.base import describe_device
from ad_models.thresholds import DecisionPolicy, choose_thresholds, decisions_on

CALIBRATION = "calibration.json"
LEARNING_CURVE = "learning_curve.csv"  # in the evaluation folder: the model's training, for the report


def split_counts(manifest: pd.DataFrame) -> dict[str, int]:
    counts = {"train": int((manifest.split == "train").sum()),
              "validation": int((manifest.split == "validation").sum())}
    test = manifest[manifest.split == "test"]
    counts["test_good"] = int((test.label == 0).sum())
    counts["test_defective"] = int((test.label == 1).sum())
    return counts


def train(method: str, config: dict | None, dataset_dir: str | os.PathLike, out_dir: str | os.PathLike,
          *, bank_dir: str | os.PathLike | None = None, device: str = "auto", progress: bool = True,
          budget: str | None = None, compile: str | None = None) -> dict[str, Any]:
    """Fit `method` on train/good of `dataset_dir`; save model + training log into `out_dir`.
    `budget` names the settings `config` came from (params.yaml's budgets); it is recorded.
    `compile`: a torch.compile mode for the networks ("default", "reduce-overhead", ...), None: eager.

    With a defect bank (`bank_dir`), its held-out images are left out of training and the bank (plus
    any validation/good images) is the validation data a method may select checkpoints on.
    Thresholds are set later, by `evaluate` and deployment, so a new decision policy needs no retraining.
    """
    manifest = read_manifest(dataset_dir)
    model = create_method(method, config)
    model.budget = budget
    if compile:
        model.compile_networks(compile)
    train_rows = manifest[manifest.split == "train"]
    valid_rows = manifest[manifest.split == "validation"]
    held_out: list[str] = []
    if bank_dir is not None:
        bank, held_out = read_bank(bank_dir)
        root = Path(dataset_dir).absolute()
        excluded = {(root / p).as_posix() for p in held_out}
        train_rows = train_rows[~train_rows.path.isin(excluded)]
        valid_rows = pd.concat([bank, valid_rows], ignore_index=True)
    valid_set = model.image_dataset(valid_rows) if len(valid_rows) else None
    log = model.fit(model.image_dataset(train_rows), valid_set, device=device, progress=progress)
    counts = split_counts(manifest)
    counts.update(train=len(train_rows), held_out_for_bank=len(held_out))
    log.update(method=method, budget=budget, compile=compile, device=describe_device(model.device),
               dataset_dir=str(dataset_dir), counts=counts,
               provenance=model.provenance, training_data_version=training_data_version(dataset_dir))
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
        write_json(tmp / "training_log.json", log)
    return log


def why_retrain(model_dir: str | os.PathLike, data_version: str) -> str | None:
    """Why the model in `model_dir` should be trained again for a category whose training images
    now have `data_version` (`ingest.training_data_version`), or None when it is up to date."""
    log_file = Path(model_dir) / "training_log.json"
    if not log_file.is_file():
        return "no trained model yet"
    trained_on = read_json(log_file).get("training_data_version")
    if trained_on is None:
        return "its training images were not recorded"
    if trained_on != data_version:
        return f"the training images changed (version {trained_on[:12]} -> {data_version[:12]})"
    return None


def learning_curve(log: dict[str, Any]) -> pd.DataFrame:
    """A training log as one table over training steps: `step` (epochs, or iterations for methods
    that count them), the total training `loss` and, at the checkpoints scored on the bank, the
    bank's image / pixel AUROC and `selected` for the kept one. NaN where a row has no such figure.

    Loss rows are epochs, or means over `loss_every_iterations` iterations; NDP-Net scores its
    checkpoints in phase-2 epochs, which come after `phase1_epochs` in its loss rows."""
    every = log.get("loss_every_iterations") or 1
    rows, checkpoints = log.get("loss_per_epoch") or [], log.get("checkpoint_selection") or []
    losses = pd.DataFrame({"step": pd.Series([(i + 1) * every for i in range(len(rows))], dtype="int64"),
                           "loss": pd.Series([float(sum(row)) for row in rows], dtype="float64")})
    offset = log.get("phase1_epochs", 0) if "phase2_epochs" in log else 0
    scored = pd.DataFrame({  # typed columns: a log without checkpoints must still merge
        "step": pd.Series([s["epoch"] + offset for s in checkpoints], dtype="int64"),
        "bank_image_auroc": pd.Series([s["image_auroc"] for s in checkpoints], dtype="float64"),
        "bank_pixel_auroc": pd.Series([s["pixel_auroc"] for s in checkpoints], dtype="float64"),
        "selected": pd.Series([s["epoch"] == log.get("selected_epoch") for s in checkpoints], dtype="boolean")})
    curve = losses.merge(scored, on="step", how="outer").sort_values("step", ignore_index=True)
    curve["selected"] = curve["selected"].fillna(False).astype(bool)
    curve.insert(1, "unit", "iteration" if log.get("loss_every_iterations") else "epoch")
    return curve


def colourise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """An anomaly map as RGB uint8 (JET colour map): lo and below blue, hi and above red."""
    scaled = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    return cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]


def gallery_image(images: list[np.ndarray], maps: np.ndarray, masks: np.ndarray, titles: list[str],
                  lo: float, hi: float, tile: int = 128, pixel_threshold: float | None = None) -> np.ndarray:
    """RGB grid: one column per image; rows = image, map overlaid on image, ground-truth mask and,
    with a `pixel_threshold`, the defect mask a deployed model draws (map >= threshold)."""
    def grey(mask: np.ndarray) -> np.ndarray:
        resized = cv2.resize(mask.astype(np.uint8) * 255, (tile, tile), interpolation=cv2.INTER_NEAREST)
        return np.repeat(resized[..., None], 3, 2)

    columns = []
    for image, amap, mask, title in zip(images, maps, masks, titles):
        image = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
        heat = cv2.resize(colourise(amap, lo, hi), (tile, tile), interpolation=cv2.INTER_LINEAR)
        overlay = (0.5 * image + 0.5 * heat).astype(np.uint8)
        rows = [image, overlay, grey(mask)] + ([grey(amap >= pixel_threshold)] if pixel_threshold is not None else [])
        column = np.concatenate(rows, 0)
        cv2.putText(column, title[:18], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
        columns.append(np.pad(column, ((0, 0), (1, 1), (0, 0)), constant_values=255))
    return np.concatenate(columns, 1)


def _gallery_indices(labels: np.ndarray, scores: np.ndarray, defect_types: list[str], n: int) -> list[int]:
    """Per defect type its highest-scoring image, then the highest-scoring good image, up to n."""
    chosen = []
    for defect in dict.fromkeys(d for d, y in zip(defect_types, labels) if y == 1):
        idx = [i for i, d in enumerate(defect_types) if d == defect]
        chosen.append(max(idx, key=lambda i: scores[i]))
    good = [i for i in np.argsort(-scores) if labels[i] == 0]
    return (chosen[: max(n - 1, 1)] + good[:1])[:n]


def _loco_metrics(dataset_dir, test_rows: pd.DataFrame, pred: dict) -> dict[str, Any]:
    """MVTec LOCO's own evaluation: AU-sPRO at FPR 0.05 and 0.3 and image AUROC, logical and
    structural apart (their mean is the headline figure, as in the official script). The regions
    are read at the maps' size, whatever the model's `image_size` and `resize` policy."""
    map_size = tuple(int(s) for s in pred["maps"].shape[-2:])
    regions = [mvtec_loco.load_spro_regions(dataset_dir, m, size=map_size) for m in test_rows.mask_path]
    auspros = metrics.loco_auspros(pred["maps"], regions, pred["defect_types"], fpr_limits=(0.05, 0.3))
    aurocs = metrics.loco_image_aurocs(pred["labels"], pred["scores"], pred["defect_types"])
    out: dict[str, Any] = {f"auspro_{limit:g}": auspros["mean"][limit] for limit in (0.05, 0.3)}
    for kind in ("logical", "structural"):
        out[f"image_auroc_{kind}"] = aurocs[kind]
        out.update({f"auspro_{limit:g}_{kind}": auspros[kind][limit] for limit in (0.05, 0.3)})
    return out


def per_defect_type(labels: np.ndarray, scores: np.ndarray, defect_types: list[str]) -> dict[str, float]:
    """Image AUROC of each defect type against the good images."""
    out = {}
    for defect in sorted(set(defect_types) - {"good"}):
        keep = np.array([d in (defect, "good") for d in defect_types])
        out[defect] = metrics.evaluate(labels[keep], scores[keep])["image_auroc"]
    return out


def evaluate(model_dir: str | os.PathLike, dataset_dir: str | os.PathLike, out_dir: str | os.PathLike,
             *, bank_dir: str | os.PathLike | None = None, policy: DecisionPolicy | None = None,
             device: str = "auto", batch_size: int = 8, gallery_size: int = 6,
             progress: bool = True) -> dict[str, Any]:
    """Score the test split with the saved model; write metrics, scores, ROC and a gallery.

    With validation data (the defect bank `bank_dir`, the dataset's validation images) the model's
    thresholds are set there by `policy` (default `DecisionPolicy()`), exactly as deployment sets
    them, and the test set is decided at them: what the line would see."""
    model = load_method(model_dir, device)
    manifest = read_manifest(dataset_dir)
    test_rows = manifest[manifest.split == "test"].reset_index(drop=True)
    if test_rows.empty:
        raise ValueError(f"{dataset_dir}: the test split is empty; nothing to evaluate")
    size = model.config.image_size
    pred = model.predict_dataset(model.image_dataset(test_rows), batch_size, progress, desc=f"{model.name}: test")
    labels, scores = pred["labels"], pred["scores"]
    result: dict[str, Any] = metrics.evaluate(labels, scores, pred["masks"], pred["maps"])
    per_defect = per_defect_type(labels, scores, pred["defect_types"])
    parts = pred["score_parts"]
    if parts:  # which fused score found what (BVPN: structural, logical)
        result["image_auroc_per_score_part"] = {name: metrics.evaluate(labels, v)["image_auroc"]
                                              for name, v in parts.items()}
        result["image_auroc_per_defect_type_per_score_part"] = {
            name: per_defect_type(labels, v, pred["defect_types"]) for name, v in parts.items()}
    if (Path(dataset_dir) / mvtec_loco.DEFECTS_CONFIG).is_file():
        result.update(_loco_metrics(dataset_dir, test_rows, pred))
    calibration = None
    if bank_dir is not None or (manifest.split == "validation").any():
        scored = score_sets(model, validation_sets(bank_dir, dataset_dir, size), batch_size, progress)
        calibration = choose_thresholds(policy or DecisionPolicy(), scored["sample"], model.name)
        calibration["validation_sets"] = scored["metrics"]
        result.update(decisions_on(labels, scores, pred["masks"], pred["maps"], calibration))
        result.update({k: calibration[k] for k in ("bank_recall", "bank_image_auroc", "bank_pixel_auroc")
                       if k in calibration})
        result["decision_policy"] = calibration["policy_text"]
    training_log = read_json(Path(model_dir) / "training_log.json")
    result.update(
        method=model.name, budget=model.budget, image_size=size, n_test=int(len(labels)),
        n_good=int((labels == 0).sum()), n_defective=int((labels == 1).sum()), image_auroc_per_defect_type=per_defect,
        train_seconds=float(training_log.get("train_seconds", float("nan"))), train_device=training_log.get("device"),
        inference_ms_per_image=1000 * pred["seconds_per_image"], device=describe_device(model.device))

    maps = pred["maps"]
    lo, hi = float(maps.min()), float(np.quantile(maps[:, ::4, ::4], 0.999))
    picks = _gallery_indices(labels, scores, pred["defect_types"], gallery_size)
    images = [cv2.cvtColor(cv2.imread(test_rows.path[i]), cv2.COLOR_BGR2RGB) for i in picks]
    titles = [f"{pred['defect_types'][i]} {scores[i]:.3g}" for i in picks]
    gallery = gallery_image(images, maps[picks], pred["masks"][picks], titles, lo, hi,
                            pixel_threshold=calibration["pixel"] if calibration else None)

    fpr, tpr = metrics.roc_points(labels, scores)
    root = Path(dataset_dir).absolute()
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", result)
        if calibration is not None:
            write_json(tmp / CALIBRATION, calibration)
        pd.DataFrame({"path": [Path(p).relative_to(root).as_posix() for p in pred["paths"]],
                      "defect_type": pred["defect_types"], "label": labels, "score": scores,
                      **{f"score_{name}": v for name, v in parts.items()}}
                     ).to_csv(tmp / "scores.csv", index=False, lineterminator="\n")
        pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(tmp / "roc.csv", index=False, lineterminator="\n")
        learning_curve(training_log).to_csv(tmp / LEARNING_CURVE, index=False, lineterminator="\n")
        cv2.imwrite(str(tmp / "gallery.png"), gallery[..., ::-1])
    return result
