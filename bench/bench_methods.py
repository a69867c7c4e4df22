"""Methods side by side: metrics, training time and inference throughput on real code paths.

    python bench/bench_methods.py                                  # built-in categories, pfm/pefm/mean_image
    python bench/bench_methods.py --magnetic-tile ../shared/data/magnetic_tile --image-size 256
    python bench/bench_methods.py --methods pfm --epochs 5 20 50   # an epochs sweep
    python bench/bench_methods.py --methods pfm --categories fabric --train-good 200 --image-size 128 --epochs 30
                                                                   # a 200-image category at the cpu budget
    python bench/bench_methods.py --methods ndpnet pfm --method-config '{"ndpnet": {"phase1_epochs": 40}}'

Prepares each dataset and its synthetic defect bank under bench/results/ (not data/: benchmarks
never touch the pipeline's outputs), trains with ad_models.runs.train (bank held out), evaluates
with ad_models.runs.evaluate (thresholds set on the bank by the default decision policy), and prints one row per
(dataset/category, method, epochs) plus a JSON file with everything. `--epochs` sets the `epochs`
option of the methods that have one; `--method-config` sets anything else per method. Ends with the
HTML report over the last evaluation of each model (bench/results/report/report.html) and, where
Chromium and Playwright are installed, the page as a browser renders it (report.png) and what failed
to load on it.
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

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ad_models import metrics, runs  # noqa: E402
from ad_models.data.sources import mvtec_loco, prepare_category, synthetic  # noqa: E402
from ad_models.defects.bank import build_bank  # noqa: E402
from ad_models.methods import method_class  # noqa: E402
from ad_models.report import EvalEntry, build_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOGICAL_DEFECT_TYPES = set(synthetic.LOGICAL_DEFECT_TYPES) | set(mvtec_loco.VIEWS["logical"])


def family_breakdown(scores_csv: Path) -> dict[str, dict[str, float]]:
    """Image AUROC on logical and on structural defects apart (against all good images), for each
    score the evaluation wrote: the fused one and, for methods that fuse several (BVPN), each part.
    Empty when the test set has no logical defect types."""
    table = pd.read_csv(scores_csv)
    logical = table.defect_type.isin(LOGICAL_DEFECT_TYPES)
    if not logical.any():
        return {}
    good = table.label == 0
    columns = [c for c in table.columns if c == "score" or c.startswith("score_")]
    return {family: {c.removeprefix("score_"): metrics.image_auroc(table.label[good | pick], table[c][good | pick])
                     for c in columns}
            for family, pick in (("logical", logical), ("structural", (table.label == 1) & ~logical))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="*", default=["fabric", "granite", "circuit"],
                        help="built-in synthetic categories (none: skip)")
    parser.add_argument("--magnetic-tile", help="folder of the magnetic tile dataset (MT_* folders)")
    parser.add_argument("--limit-per-kind", type=int, default=None, help="magnetic tile subset size")
    parser.add_argument("--methods", nargs="+", default=["pfm", "pefm", "mean_image"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[10])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--method-config", type=json.loads, default={},
                        help='JSON {method: {option: value}} merged over the defaults')
    parser.add_argument("--bank-size", type=int, default=256, help="image size of the defect bank")
    parser.add_argument("--foreground", nargs="*", default=["circuit"], help="categories whose bank keeps "
                        "defects on the object")
    parser.add_argument("--train-good", type=int, default=100, help="good training images per built-in category "
                        "(the bank holds out its share of them)")
    parser.add_argument("--test-good", type=int, default=20, help="good test images per built-in category")
    parser.add_argument("--test-defect", type=int, default=32, help="defective test images per built-in category "
                        "(split evenly across its defect types)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in categories")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(RESULTS / "methods.json"))
    args = parser.parse_args()

    built_in = {"n_train": args.train_good, "n_test_good": args.test_good, "n_test_defect": args.test_defect,
                "seed": args.seed}
    datasets = [("synthetic", c, built_in) for c in args.categories]
    if args.magnetic_tile:
        datasets.append(("magnetic_tile", "tile", {"source_dir": args.magnetic_tile,
                                                   "limit_per_kind": args.limit_per_kind}))
    rows, entries = [], {}
    header = (f"{'dataset/category':24} {'method':10} {'ep':>4} {'img AUROC':>9} {'pix AUROC':>9} {'AUPRO':>7} "
              f"{'F1max':>6} {'F1@thr':>6} {'good ok':>7} {'train s':>8} {'eval s':>7} {'img/s':>7}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, image size {args.image_size}")
    print(header)
    for source, category, options in datasets:
        dataset_dir = RESULTS / "datasets" / source / category
        start = time.perf_counter()
        manifest = prepare_category(source, category, dataset_dir, **options)
        prep = time.perf_counter() - start
        bank_dir = RESULTS / "defects" / source / category
        build_bank(dataset_dir, bank_dir, {"image_size": args.bank_size,
                                           "foreground": category in args.foreground}, progress=False)
        print(f"# {source}/{category}: {runs.split_counts(manifest)} prepared in {prep:.1f} s", flush=True)
        for method in args.methods:
            has_epochs = "epochs" in method_class(method).Config.__dataclass_fields__
            for epochs in (args.epochs if has_epochs else [0]):
                config = {"image_size": args.image_size, **args.method_config.get(method, {})}
                if epochs:
                    config["epochs"] = epochs
                model_dir = RESULTS / "models" / method / source / category
                eval_dir = RESULTS / "eval" / method / source / category
                start = time.perf_counter()
                log = runs.train(method, config, dataset_dir, model_dir, bank_dir=bank_dir, device=args.device,
                                 progress=False)
                trained = time.perf_counter()
                result = runs.evaluate(model_dir, dataset_dir, eval_dir, bank_dir=bank_dir, device=args.device,
                                       progress=False)
                # wall times of the whole calls: loading, feature caching, bank scoring and writing included
                train_wall, eval_wall = trained - start, time.perf_counter() - trained
                row = {"dataset": f"{source}/{category}", "method": method, "epochs": epochs, **result,
                       "train_seconds": log["train_seconds"], "train_wall_seconds": train_wall,
                       "evaluate_wall_seconds": eval_wall,
                       "images_per_second": 1000.0 / result["inference_ms_per_image"]}
                rows.append(row)
                entries[(f"{source}/{category}", method)] = EvalEntry(f"{source}/{category}", method, eval_dir)
                print(f"{row['dataset']:24} {method:10} {epochs:>4} {row['image_auroc']:>9.4f} "
                      f"{row['pixel_auroc']:>9.4f} {row['aupro']:>7.4f} {row['f1_max']:>6.3f} "
                      f"{row.get('f1_at_threshold', float('nan')):>6.3f} "
                      f"{row.get('good_pass_rate_at_threshold', float('nan')):>7.3f} "
                      f"{train_wall:>8.1f} {eval_wall:>7.1f} {row['images_per_second']:>7.1f}", flush=True)
                breakdown = family_breakdown(eval_dir / "scores.csv")
                if breakdown:
                    row["image_auroc_by_family"] = breakdown
                    print("#   image AUROC, defect family x score: " + "; ".join(
                        f"{family}: " + ", ".join(f"{name} {v:.4f}" for name, v in by_score.items())
                        for family, by_score in breakdown.items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"# written {out}")
    report_dir = out.parent / "report"
    build_report(list(entries.values()), report_dir, title="adpipe benchmark")
    print(f"# report {report_dir / 'report.html'}; {browser_check(report_dir)}")


def browser_check(report_dir: Path) -> str:
    """The report rendered by headless Chromium: a screenshot beside it, and what did not load."""
    from ad_models.report.browser import check_page, find_chromium
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "no browser check: pip install adpipe[browser]"
    if find_chromium() is None:
        return "no browser check: Chromium is not installed"
    page = check_page(report_dir / "report.html", screenshot=report_dir / "report.png")
    problems = page.broken_images + page.console_errors + page.failed_requests
    return (f"rendered in Chromium: {page.images} images, "
            f"{'all loaded, no errors' if page.ok else 'PROBLEMS: ' + '; '.join(problems)}; "
            f"screenshot {report_dir / 'report.png'}")


if __name__ == "__main__":
    main()
