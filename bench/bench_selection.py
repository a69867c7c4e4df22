"""Does checkpoint selection on the synthetic bank track real defects? Learning curves, bank vs test.

    python bench/bench_selection.py --methods esad --categories fabric --magnetic-tile ../shared/data/magnetic_tile
    python bench/bench_selection.py --methods ndpnet slsg --image-size 128 --test-subset 20 40
    python bench/bench_selection.py --methods esad --method-config '{"esad": {"epochs": 30, "select_every": 3}}'

Trains each method with ad_models.runs.train (bank held out, checkpoints scored on it every
`select_every`) and, at every scored checkpoint, also scores the test set: the test set judges the
selection rule here and only here, the pipeline never sees it. Prints per checkpoint the bank score
and the test image / pixel AUROC, then per run the Spearman rank correlation between bank score and
test AUROC, and the gap between the best checkpoint's test AUROC and the selected one's.
`--test-subset G D` scores a seeded subset of G good and D defective test images (stratified by
defect type) to keep each checkpoint cheap. Writes everything to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from ad_models import metrics, runs  # noqa: E402
from ad_models.data.layout import read_manifest  # noqa: E402
from ad_models.data.loading import ImageDataset  # noqa: E402
from ad_models.data.sources import prepare_category  # noqa: E402
from ad_models.defects.bank import build_bank  # noqa: E402
from ad_models.methods import load_method  # noqa: E402
from ad_models.methods.base import probe_checkpoints  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SELECT_EVERY = {"esad": 1, "ndpnet": 2, "slsg": 50, "bvpn": 100}  # dense enough for a curve


def test_subset(dataset_dir: Path, good: int | None, defective: int | None, seed: int = 0) -> pd.DataFrame:
    """The test rows, or a seeded subset: `good` good images and `defective` defective ones spread
    evenly over the defect types."""
    test = read_manifest(dataset_dir)
    test = test[test.split == "test"]
    if good is None:
        return test.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    picked = [test[test.label == 0].sample(min(good, int((test.label == 0).sum())), random_state=rng)]
    kinds = sorted(set(test.defect_type[test.label == 1]))
    for i, kind in enumerate(kinds):
        rows = test[test.defect_type == kind]
        share = defective // len(kinds) + (i < defective % len(kinds))
        picked.append(rows.sample(min(share, len(rows)), random_state=rng))
    return pd.concat(picked).reset_index(drop=True)


def test_probe(rows: pd.DataFrame, size: int, label: str):
    def probe(model) -> dict[str, float]:
        pred = model.predict_dataset(ImageDataset(rows, size), progress=False)
        out = {"test_image_auroc": metrics.image_auroc(pred["labels"], pred["scores"]),
               "test_pixel_auroc": metrics.pixel_auroc(pred["masks"], pred["maps"])}
        print(f"#   {label}: checkpoint scored, test image / pixel AUROC {out['test_image_auroc']:.4f} / "
              f"{out['test_pixel_auroc']:.4f}", flush=True)
        return out
    return probe


def judge(history: list[dict], selected: int) -> dict[str, float]:
    """Rank correlation of bank score and test AUROC over the checkpoints, and how far the selected
    checkpoint's test AUROC falls below the best checkpoint's."""
    bank = [h["selection_score"] for h in history]
    out: dict[str, float] = {}
    chosen = next(h for h in history if h["epoch"] == selected)
    for key in ("test_image_auroc", "test_pixel_auroc"):
        values = [h[key] for h in history]
        out[f"spearman_{key}"] = float(spearmanr(bank, values).statistic) if len(set(bank)) > 1 else float("nan")
        out[f"gap_{key}"] = max(values) - chosen[key]
        out[f"selected_{key}"] = chosen[key]
        out[f"first_{key}"], out[f"last_{key}"] = values[0], values[-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["esad"])
    parser.add_argument("--categories", nargs="*", default=["fabric", "granite", "circuit"],
                        help="built-in synthetic categories (none: skip)")
    parser.add_argument("--magnetic-tile", help="folder of the magnetic tile dataset (MT_* folders)")
    parser.add_argument("--limit-per-kind", type=int, default=None, help="magnetic tile subset size")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--method-config", type=json.loads, default={},
                        help='JSON {method: {option: value}} merged over the defaults')
    parser.add_argument("--bank-size", type=int, default=256, help="image size of the defect bank")
    parser.add_argument("--test-subset", nargs=2, type=int, metavar=("GOOD", "DEFECTIVE"),
                        help="score a seeded subset of the test set at each checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in categories")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(RESULTS / "selection.json"))
    args = parser.parse_args()

    datasets = [("synthetic", c, {"seed": args.seed}) for c in args.categories]
    if args.magnetic_tile:
        datasets.append(("magnetic_tile", "tile", {"source_dir": args.magnetic_tile,
                                                   "limit_per_kind": args.limit_per_kind}))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, image size {args.image_size}", flush=True)
    runs_out = []
    for source, category, options in datasets:
        dataset_dir = RESULTS / "datasets" / source / category
        manifest = prepare_category(source, category, dataset_dir, **options)
        bank_dir = RESULTS / "defects" / source / category
        build_bank(dataset_dir, bank_dir, {"image_size": args.bank_size, "foreground": category == "circuit"},
                   progress=False)
        rows = test_subset(dataset_dir, *(args.test_subset or (None, None)))
        print(f"# {source}/{category}: {runs.split_counts(manifest)}, {len(rows)} test images scored per checkpoint",
              flush=True)
        for method in args.methods:
            every = {"select_every": DEFAULT_SELECT_EVERY[method]} if method in DEFAULT_SELECT_EVERY else {}
            config = {"image_size": args.image_size, **every, **args.method_config.get(method, {})}
            model_dir = RESULTS / "models_selection" / Path(args.out).stem / method / source / category
            with probe_checkpoints(test_probe(rows, args.image_size, f"{source}/{category} {method}")):
                log = runs.train(method, config, dataset_dir, model_dir, bank_dir=bank_dir, device=args.device,
                                 progress=False)
            history = log.get("checkpoint_selection", [])
            if not history:  # a baseline, or selection off: the final model's test figures only
                final = test_probe(rows, args.image_size, f"{source}/{category} {method}")(load_method(model_dir))
                runs_out.append({"dataset": f"{source}/{category}", "method": method, "config": config,
                                 "history": [], "train_seconds": log["train_seconds"],
                                 **{f"last_{k}": v for k, v in final.items()}})
                continue
            print(f"{source}/{category} {method}: {'step':>6} {'bank img':>8} {'bank pix':>8} {'bank':>6} "
                  f"{'test img':>8} {'test pix':>8}")
            for h in history:
                mark = " <- selected" if h["epoch"] == log["selected_epoch"] else ""
                print(f"{'':>{len(source + category + method) + 3}} {h['epoch']:>6} {h['image_auroc']:>8.4f} "
                      f"{h['pixel_auroc']:>8.4f} {h['selection_score']:>6.4f} {h['test_image_auroc']:>8.4f} "
                      f"{h['test_pixel_auroc']:>8.4f}{mark}", flush=True)
            verdict = judge(history, log["selected_epoch"])
            print(f"#   spearman(bank, test image/pixel AUROC) {verdict['spearman_test_image_auroc']:+.3f} / "
                  f"{verdict['spearman_test_pixel_auroc']:+.3f}; gap to the best checkpoint "
                  f"{verdict['gap_test_image_auroc']:.4f} / {verdict['gap_test_pixel_auroc']:.4f}; "
                  f"train {log['train_seconds']:.0f} s", flush=True)
            runs_out.append({"dataset": f"{source}/{category}", "method": method, "config": config,
                             "history": history, "selected": log["selected_epoch"],
                             "train_seconds": log["train_seconds"], **verdict})
    if sum(bool(r["history"]) for r in runs_out) > 1:
        gaps = [r["gap_test_image_auroc"] for r in runs_out if r["history"]]
        rhos = [r["spearman_test_image_auroc"] for r in runs_out if r["history"]]
        print(f"# all runs: image AUROC gap mean {np.mean(gaps):.4f}, max {np.max(gaps):.4f}; "
              f"spearman mean {np.nanmean(rhos):+.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs_out, indent=2, default=str))
    print(f"# written {out}")


if __name__ == "__main__":
    main()
