"""The HTML report: one self-contained file (figures inlined) from the evaluation folders.

It opens with a leaderboard (categories x methods, the best of each category marked, means per
method, what budget and device produced each row) and an accuracy-vs-cost chart, then one section
per category: metrics, ROC curves, deployed models and their history, learning curves, galleries.

Also writes what DVC reads: `metrics.json` ({category: {method: metrics}}) for `dvc metrics`, and
one ROC CSV per (method, category) under `roc/` for `dvc plots`.
"""
from __future__ import annotations

import base64
import datetime as dt
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ad_models.io import atomic_path, read_json, write_json, write_text  # noqa: E402
from ad_models.runs import LEARNING_CURVE  # noqa: E402

TABLE_COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO@0.3"),
                 ("f1_max", "F1-max"), ("train_seconds", "training s"), ("inference_ms_per_image", "ms / image")]
# shown only for categories whose evaluation has them (MVTec LOCO: sPRO; the test set's decisions at the
# thresholds the decision policy set without it, what the policy expected, and the bank's recall)
OPTIONAL_COLUMNS = [("auspro_0.05", "sPRO@0.05"), ("auspro_0.3", "sPRO@0.3"),
                    ("f1_at_threshold", "F1 @ threshold"), ("good_pass_rate_at_threshold", "good passed"),
                    ("expected_false_alarm_rate", "false alarms expected"),
                    ("false_alarm_rate_at_threshold", "false alarms seen"), ("bank_recall", "bank recall")]
LABEL_COLUMNS = [("budget", "budget")]  # what produced a row: text, not a DVC metric
# the leaderboard: accuracy (higher is better) and cost (lower is better), one row per model
LEADERBOARD_ACCURACY = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO@0.3"),
                        ("f1_at_threshold", "F1 @ threshold"), ("good_pass_rate_at_threshold", "good passed")]
LEADERBOARD_COST = [("train_seconds", "training s"), ("inference_ms_per_image", "ms / image")]
DVC_METRICS = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "train_seconds", "inference_ms_per_image"]


@dataclass
class EvalEntry:
    category: str  # "<dataset>/<category>"
    method: str
    folder: Path
    deploy_dir: Path | None = None  # its deployment folder (ad_models.deploy), when there is one


def _deployment(entry: EvalEntry) -> dict | None:
    """Which model is deployed and the decisions that led there, newest first."""
    from ad_models.deploy import deployed_info, deployment_history
    history = deployment_history(entry.deploy_dir) if entry.deploy_dir else []
    if not history:
        return None
    deployed = next((h for h in reversed(history) if h["decision"] in ("first", "deployed")), None)
    info = deployed_info(entry.deploy_dir)  # its thresholds now: a new policy re-sets them in place
    threshold = (info or {}).get("threshold") or {}
    return {"method": entry.method, "deployed": deployed["candidate_id"] if deployed else "none",
            "since": deployed["decided_at"][:16].replace("T", " ") if deployed else "",
            "thresholds": [_fmt(threshold.get(k)) for k in ("image", "pixel", "expected_false_alarm_rate",
                                                             "false_alarm_rate_bound", "bank_recall")],
            "history": [{"at": h["decided_at"][:16].replace("T", " "), "id": h["candidate_id"],
                         "decision": h["decision"], "why": "; ".join(h.get("reasons") or [])}
                        for h in reversed(history)]}


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _roc_figure(curves: dict[str, pd.DataFrame], title: str) -> str:
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=110)
    for method, roc in curves.items():
        ax.plot(roc.fpr, roc.tpr, label=method, lw=1.6)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return _png_data_uri(buffer.getvalue())


def learning_curve_png(curve: pd.DataFrame, title: str) -> bytes:
    """A model's training at a glance (a `runs.learning_curve` table): the loss (left axis) and, at
    each checkpoint scored on the synthetic bank, its image / pixel AUROC (right axis), the kept
    checkpoint marked. A bank score that falls while the loss falls is over-training; one still
    rising at the end is under-training."""
    fig, ax = plt.subplots(figsize=(3.8, 2.6), dpi=110)
    unit = curve["unit"].iloc[0] if len(curve) else "epoch"
    loss = curve.dropna(subset=["loss"])
    if len(loss):
        ax.plot(loss.step, loss.loss, color="0.45", lw=1.2, label="loss")
        if (loss.loss > 0).all():
            ax.set_yscale("log")
    ax.set(xlabel=unit, ylabel="training loss", title=title)
    scored = curve.dropna(subset=["bank_image_auroc"])
    if len(scored):
        bank = ax.twinx()
        bank.plot(scored.step, scored.bank_image_auroc, "o-", ms=3, lw=1.2, color="tab:blue", label="bank image AUROC")
        bank.plot(scored.step, scored.bank_pixel_auroc, "s-", ms=3, lw=1.2, color="tab:orange",
                  label="bank pixel AUROC")
        for step in scored.step[scored.selected]:
            bank.axvline(step, color="tab:green", lw=1, ls="--", label="kept")
        bank.set(ylabel="bank AUROC", ylim=(min(0.5, float(scored[["bank_image_auroc", "bank_pixel_auroc"]].min().min())), 1.0))
        bank.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _number(value) -> float | None:
    """A metric as a float, None when it is missing or NaN (no masks: no pixel AUROC)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def best_method(by_method: dict[str, dict]) -> str | None:
    """The method to deploy on a category by its test metrics: highest image AUROC, then AUPRO."""
    ranked = [(_number(m.get("image_auroc")), _number(m.get("aupro")) or 0.0, method)
              for method, m in by_method.items() if _number(m.get("image_auroc")) is not None]
    return max(ranked)[2] if ranked else None


def leaderboard(results: dict[str, dict[str, dict]]) -> dict:
    """The report's first table from {category: {method: evaluation metrics}}: one row per model with
    its accuracy and cost, the best value of each column within a category marked, the category's
    best method starred, and per method the mean over the categories that have the figure."""
    columns = [c for c in LEADERBOARD_ACCURACY + LEADERBOARD_COST
               if any(_number(m.get(c[0])) is not None for by_method in results.values() for m in by_method.values())]
    lower_is_better = {key for key, _ in LEADERBOARD_COST}
    rows = []
    for category, by_method in results.items():
        best = {}
        for key, _ in columns:
            values = [v for v in (_number(m.get(key)) for m in by_method.values()) if v is not None]
            if len(values) > 1:
                best[key] = min(values) if key in lower_is_better else max(values)
        starred = best_method(by_method) if len(by_method) > 1 else None
        for i, (method, m) in enumerate(by_method.items()):
            rows.append({"category": category, "category_rows": len(by_method) if i == 0 else 0,
                         "anchor": _anchor(category), "method": method, "best": method == starred,
                         "budget": m.get("budget") or "", "device": m.get("train_device") or m.get("device") or "",
                         "cells": [{"text": _fmt(_number(m.get(key))),
                                    "best": key in best and _number(m.get(key)) == best[key]} for key, _ in columns]})
    means = []
    for method in dict.fromkeys(method for by_method in results.values() for method in by_method):
        cells = []
        for key, _ in columns:
            values = [v for v in (_number(by_method[method].get(key)) for by_method in results.values()
                                  if method in by_method) if v is not None]
            cells.append(_fmt(sum(values) / len(values)) if values else "n/a")
        means.append({"method": method, "categories": sum(method in b for b in results.values()), "cells": cells})
    return {"columns": [label for _, label in columns], "rows": rows, "means": means}


def cost_figure(results: dict[str, dict[str, dict]]) -> str | None:
    """Accuracy against cost, one point per model (colour: method): AUPRO and image AUROC against
    training seconds and inference ms per image, costs on a log scale. None without costs."""
    axes_spec = [(y, x) for y in ("aupro", "image_auroc") for x in ("train_seconds", "inference_ms_per_image")]
    labels = dict(LEADERBOARD_ACCURACY + LEADERBOARD_COST)
    points = [(method, m) for by_method in results.values() for method, m in by_method.items()]
    if not any(_number(m.get(x)) for _, m in points for _, x in axes_spec):
        return None
    methods = list(dict.fromkeys(method for method, _ in points))
    colours = {method: plt.get_cmap("tab10")(i % 10) for i, method in enumerate(methods)}
    fig, axes = plt.subplots(2, 2, figsize=(7.2, 5.6), dpi=110, sharey="row")
    for ax, (y, x) in zip(axes.flat, axes_spec):
        for method in methods:
            xy = [(_number(m.get(x)), _number(m.get(y))) for name, m in points if name == method]
            xy = [(a, b) for a, b in xy if a and b is not None]
            if xy:
                ax.scatter(*zip(*xy), s=28, color=colours[method], label=method, alpha=0.85, edgecolors="none")
        if ax.has_data():
            ax.set_xscale("log")
        ax.set(xlabel=labels[x], ylabel=labels[y] if ax in axes[:, 0] else None)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle("Accuracy against cost (one point per model; up and left is better)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return _png_data_uri(buffer.getvalue())


def _anchor(category: str) -> str:
    return "cat-" + "".join(c if c.isalnum() else "-" for c in category)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) <= 1.0 else f"{value:.1f}"
    return str(value)


def build_report(entries: list[EvalEntry], out_dir: str | os.PathLike, title: str = "adpipe report") -> dict:
    """Write report.html, metrics.json and roc/*.csv into `out_dir`; returns the metrics dict."""
    out_dir = Path(out_dir)
    missing = [str(e.folder) for e in entries if not (e.folder / "metrics.json").is_file()]
    if missing:
        raise FileNotFoundError(f"evaluations missing (run the evaluation first): {', '.join(missing)}")
    all_metrics: dict[str, dict[str, dict]] = {}
    categories = []
    results_by_category: dict[str, dict[str, dict]] = {}
    for entry in entries:
        results_by_category.setdefault(entry.category, {})[entry.method] = read_json(entry.folder / "metrics.json")
    for category, results in results_by_category.items():
        rows, curves, galleries, learning = [], {}, [], []
        columns = [c for c in LABEL_COLUMNS if any(m.get(c[0]) for m in results.values())]
        columns += TABLE_COLUMNS + [c for c in OPTIONAL_COLUMNS if any(c[0] in m for m in results.values())]
        for entry in (e for e in entries if e.category == category):
            m = results[entry.method]
            all_metrics.setdefault(category, {})[entry.method] = {
                k: m.get(k) for k in DVC_METRICS + [k for k, _ in OPTIONAL_COLUMNS] if k in m}
            rows.append({"method": entry.method, "cells": [_fmt(m.get(k)) for k, _ in columns],
                         "per_defect": m.get("image_auroc_per_defect_type", {})})
            curves[entry.method] = pd.read_csv(entry.folder / "roc.csv")
            galleries.append({"method": entry.method,
                              "uri": _png_data_uri((entry.folder / "gallery.png").read_bytes())})
            # none in evaluations from before learning curves; empty for methods that do not train (mean_image)
            curve = pd.read_csv(entry.folder / LEARNING_CURVE) if (entry.folder / LEARNING_CURVE).is_file() else None
            if curve is not None and not curve.empty:
                learning.append({"method": entry.method,
                                 "uri": _png_data_uri(learning_curve_png(curve, f"{entry.method}: training"))})
        deployments = [d for d in (_deployment(e) for e in entries if e.category == category) if d]
        policy = next((m["decision_policy"] for m in results.values() if m.get("decision_policy")), None)
        categories.append({"name": category, "anchor": _anchor(category), "policy": policy,
                           "columns": [label for _, label in columns], "rows": rows, "roc": _roc_figure(curves, category),
                           "galleries": galleries, "defect_types": sorted({d for r in rows for d in r["per_defect"]}),
                           "deployments": deployments, "learning_curves": learning})

    env = jinja2.Environment(loader=jinja2.PackageLoader("ad_models.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    html = env.get_template("report.html").render(
        title=title, generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        categories=categories, fmt=_fmt, leaderboard=leaderboard(results_by_category),
        cost_chart=cost_figure(results_by_category))

    write_text(out_dir / "report.html", html)
    write_json(out_dir / "metrics.json", all_metrics)
    roc_dir = out_dir / "roc"
    roc_dir.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        name = f"{entry.method}__{entry.category.replace('/', '__')}.csv"
        roc = pd.read_csv(entry.folder / "roc.csv").assign(method=entry.method, category=entry.category)
        with atomic_path(roc_dir / name) as tmp:
            roc.to_csv(tmp, index=False, lineterminator="\n")
    return all_metrics
