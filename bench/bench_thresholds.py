"""Deployable thresholds: F1 at the threshold each decision policy sets without real defects, against F1-max.

    python bench/bench_thresholds.py                                   # pfm pefm slsg on the built-in categories
    python bench/bench_thresholds.py --categories --magnetic-tile ../shared/data/magnetic_tile
    python bench/bench_thresholds.py --methods ndpnet esad bvpn --reuse
    python bench/bench_thresholds.py --reuse --dump /tmp/scores   # each model's scores and maps, to study estimators
    python bench/bench_thresholds.py --reuse --study-variants '{"faint": {"masks": {"perlin": 1}, "blend": "beta",
        "beta_range": [0.5, 0.9]}}'                               # which artificial defects predict real ones

Prepares each category and its defect bank as bench_methods.py does (under bench/results/), trains each
method with params.yaml's settings for the category at its `budget` (`--budget` to choose another),
scores the validation data (bank + validation images) and the test set once, then sets thresholds by
each policy: false-alarm rates (`--rates`), F1 on the whole bank, and F1 on each bank variant alone
(which kind of artificial defect predicts the real-defect threshold best). Per policy it prints the
test set's decisions: F1 at the threshold against F1-max, the share of good test images passed, the
false-alarm rate expected against the one seen, and the bank's recall. The test set judges the
policies here and only here; the pipeline never sees it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ad_models import metrics, runs  # noqa: E402
from ad_models.data.layout import read_manifest  # noqa: E402
from ad_models.data.loading import ImageDataset  # noqa: E402
from ad_models.data.sources import prepare_category  # noqa: E402
from ad_models.defects.bank import build_bank, read_bank  # noqa: E402
from ad_models.deploy import validation_sets  # noqa: E402
from ad_models.methods import load_method  # noqa: E402
from ad_models.thresholds import DecisionPolicy, ScoreSample, choose_thresholds, decisions_on, fails  # noqa: E402
from pipelines.params import load_params  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def predictions(model, data: ImageDataset) -> dict:
    return model.predict_dataset(data, batch_size=8, progress=False)


def subset(pred: dict, keep: np.ndarray) -> dict:
    return {k: (v[keep] if isinstance(v, np.ndarray) else [x for x, k2 in zip(v, keep) if k2])
            for k, v in pred.items() if k in ("labels", "scores", "maps", "masks", "defect_types")}


def best_f1_passing(labels: np.ndarray, scores: np.ndarray, good_pass: float = 0.95) -> float:
    """The test set's best F1 over thresholds that pass at least `good_pass` of its good images: the
    yardstick for a policy bound to pass good parts (F1-max alone may fail most good images: with 32
    defective and 20 good test images, failing everything already scores F1 0.76)."""
    best = 0.0
    for threshold in np.r_[np.unique(scores), np.inf]:
        failed = fails(scores, threshold)
        if (~failed[labels == 0]).mean() >= good_pass:
            tp = int((failed & (labels == 1)).sum())
            best = max(best, 2 * tp / (failed.sum() + (labels == 1).sum()))
    return best


def dump_scores(path: Path, valid: dict[str, dict], tested: dict) -> None:
    arrays = {}
    for name, pred in {**valid, "test": tested}.items():
        arrays.update({f"{name}/labels": pred["labels"], f"{name}/scores": pred["scores"],
                       f"{name}/maps": pred["maps"].astype(np.float16), f"{name}/masks": pred["masks"],
                       f"{name}/defect_types": np.asarray(pred["defect_types"])})
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


def policies(rates: list[float], bank_types: list[str]) -> dict[str, tuple[DecisionPolicy, str | None]]:
    """name -> (policy, the bank variant it is set on alone, or None for all the validation data)."""
    out = {f"false_alarm_rate {r:g}": (DecisionPolicy(max_false_alarm_rate=r), None) for r in rates}
    out["bank_f1"] = (DecisionPolicy(policy="bank_f1"), None)
    out.update({f"bank_f1 {t.removeprefix('synthetic_')}": (DecisionPolicy(policy="bank_f1"), t) for t in bank_types})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="*", default=["fabric", "granite", "circuit"],
                        help="built-in synthetic categories (none: skip)")
    parser.add_argument("--magnetic-tile", help="folder of the magnetic tile dataset (MT_* folders)")
    parser.add_argument("--limit-per-kind", type=int, default=None, help="magnetic tile subset size")
    parser.add_argument("--methods", nargs="+", default=["pfm", "pefm", "slsg"])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="whose budget and method settings")
    parser.add_argument("--budget", help="a budget of params.yaml (default: its `budget`)")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--reuse", action="store_true", help="keep datasets, banks and models already made here")
    parser.add_argument("--study-variants", type=json.loads, default={},
                        help='JSON {name: DefectConfig dict}: candidate bank variants, in a second bank on the same '
                             'held-out images, each judged alone by its bank-F1 threshold (training never sees them)')
    parser.add_argument("--bank-config", type=json.loads, default={},
                        help='JSON options over params.yaml\'s defect_bank, e.g. {"min_holdout": 20}')
    parser.add_argument("--tag", default="", help="keeps banks and models of this run apart (with --bank-config)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dump", help="folder: save each model's validation and test scores and maps (.npz) there, "
                        "to study threshold estimators without rescoring")
    parser.add_argument("--out", default=str(RESULTS / "thresholds.json"))
    args = parser.parse_args()

    params = load_params(args.params)
    if args.budget:
        params = params.__class__(**{**params.__dict__, "budget": args.budget})
    datasets = [("synthetic", c, {}) for c in args.categories]
    if args.magnetic_tile:
        datasets.append(("magnetic_tile", "tile", {"source_dir": str(Path(args.magnetic_tile).absolute()),
                                                   "limit_per_kind": args.limit_per_kind}))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, budget {params.budget}")
    print(f"{'dataset/category':22} {'method':7} {'policy':26} {'F1@thr':>6} {'F1max':>6} {'gap':>6} {'F1@95':>6} "
          f"{'good ok':>7} {'FA exp':>6} {'FA seen':>7} {'bank rec':>8}")
    rows = []
    for source, category, options in datasets:
        key = f"{source}/{category}"
        dataset_dir = RESULTS / "datasets" / source / category
        if not (args.reuse and (dataset_dir / "manifest.csv").is_file()):
            # the dataset's options in params.yaml (the built-in categories' sizes, the tile's split)
            prepare_category(source, category, dataset_dir, **{**params.source_of(key)[2], **options})
        bank_dir = RESULTS / ("defects" + args.tag) / source / category
        bank_config = {**params.bank_config(key), **args.bank_config}
        if not (args.reuse and (bank_dir / "bank.json").is_file()):
            build_bank(dataset_dir, bank_dir, bank_config, progress=False)
        test = read_manifest(dataset_dir)
        test = test[test.split == "test"].reset_index(drop=True)
        for method in args.methods:
            model_dir = RESULTS / ("models_thresholds" + args.tag) / params.budget / method / source / category
            start = time.perf_counter()
            if not (args.reuse and (model_dir / "weights.pt").is_file()):
                runs.train(method, params.method_options(method, key), dataset_dir, model_dir, bank_dir=bank_dir,
                           device=args.device, progress=False, budget=params.budget)
            train_s = time.perf_counter() - start
            model = load_method(model_dir, args.device)
            size = model.config.image_size
            valid = {name: predictions(model, data) for name, data in
                     validation_sets(bank_dir, dataset_dir, size).items()}
            if args.study_variants:
                study_dir = RESULTS / ("defects_study" + args.tag) / source / category
                if not (args.reuse and (study_dir / "bank.json").is_file()):
                    build_bank(dataset_dir, study_dir, {**bank_config, "variants": args.study_variants}, progress=False)
                valid["study"] = predictions(model, ImageDataset(read_bank(study_dir)[0], size))
            tested = predictions(model, ImageDataset(test, size))
            if args.dump:
                dump_scores(Path(args.dump) / f"{source}_{category}_{method}.npz", valid, tested)
            f1_max = metrics.f1_max(tested["labels"], tested["scores"])
            f1_95 = best_f1_passing(tested["labels"], tested["scores"])
            bank_types = sorted({t for p in valid.values() for t in p["defect_types"] if t.startswith("synthetic_")})
            study_types = set(valid["study"]["defect_types"]) - {"good"} if "study" in valid else set()
            for name, (policy, variant) in policies(args.rates, bank_types).items():
                parts = []
                for set_name, pred in valid.items():
                    if (set_name == "study") != (variant in study_types):  # a study variant: its own bank only
                        continue
                    keep = np.array([t == "good" or variant is None or t == variant for t in pred["defect_types"]])
                    parts.append(ScoreSample.from_predictions(subset(pred, keep)))
                chosen = choose_thresholds(policy, ScoreSample.concat(parts), method)
                seen = decisions_on(tested["labels"], tested["scores"], tested["masks"], tested["maps"], chosen)
                row = {"dataset": key, "method": method, "policy": name, "f1_max": f1_max, "f1_95": f1_95,
                       "image_auroc": metrics.image_auroc(tested["labels"], tested["scores"]),
                       "train_seconds": train_s, **seen,
                       **{k: chosen.get(k) for k in ("bank_recall", "n_good_images", "n_defective")}}
                rows.append(row)
                print(f"{key:22} {method:7} {name:26} {row['f1_at_threshold']:6.3f} {f1_max:6.3f} "
                      f"{row['f1_at_threshold'] - f1_max:+6.3f} {f1_95:6.3f} {row['good_pass_rate_at_threshold']:7.3f} "
                      f"{row['expected_false_alarm_rate']:6.3f} {row['false_alarm_rate_at_threshold']:7.3f} "
                      f"{row['bank_recall'] if row['bank_recall'] is not None else float('nan'):8.3f}", flush=True)
    table = pd.DataFrame(rows)
    print("\n# per policy over all (dataset, method): mean F1 gap to F1-max, share of runs within 0.05 of it, "
          "share with >= 95 % of good test images passed, both; mean gap to F1@95 (the best F1 passing 95 %)")
    table["gap"] = table.f1_at_threshold - table.f1_max
    for name, group in table.groupby("policy", sort=False):
        within, passing = group.gap >= -0.05, group.good_pass_rate_at_threshold >= 0.95
        print(f"{name:26} gap {group.gap.mean():+.3f}  within {within.mean():.2f}  good>=95% {passing.mean():.2f}  "
              f"both {(within & passing).mean():.2f}  gap to F1@95 {(group.f1_at_threshold - group.f1_95).mean():+.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"# written {out}")


if __name__ == "__main__":
    main()
