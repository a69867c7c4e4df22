"""The report compares: a leaderboard over categories x methods, an accuracy-vs-cost chart, and the
whole page rendered by a real browser (headless Chromium) with every image loaded and no errors."""
from __future__ import annotations

import importlib.util
import re

import cv2
import pytest

from ad_models import deploy, runs
from ad_models.report import EvalEntry, build_report, leaderboard
from ad_models.report.browser import check_page, find_chromium

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_leaderboard_marks_each_categorys_best_and_averages_each_method():
    results = {
        "a/x": {"pfm": {"image_auroc": 0.9, "aupro": 0.7, "train_seconds": 30.0, "budget": "cpu", "device": "cpu"},
                "mean_image": {"image_auroc": 0.6, "aupro": 0.8, "train_seconds": 1.0, "budget": "cpu"}},
        "a/y": {"pfm": {"image_auroc": 0.8, "aupro": float("nan"), "train_seconds": 10.0,
                        "train_device": "cuda:0 (NVIDIA H200)", "device": "cpu"},
                "mean_image": {"image_auroc": 0.8, "aupro": 0.5, "train_seconds": 2.0}},
    }
    board = leaderboard(results)
    assert board["columns"] == ["image AUROC", "AUPRO@0.3", "training s"]  # only the figures some model has
    rows = {(r["category"], r["method"]): r for r in board["rows"]}
    best = {key: [c["best"] for c in r["cells"]] for key, r in rows.items()}
    # highest accuracy, lowest cost; a NaN never wins and shows as n/a
    assert best[("a/x", "pfm")] == [True, False, False] and best[("a/x", "mean_image")] == [False, True, True]
    assert best[("a/y", "pfm")] == [True, False, False] and best[("a/y", "mean_image")] == [True, False, True]
    assert rows[("a/y", "pfm")]["cells"][1]["text"] == "n/a"
    # the starred method: highest image AUROC, a tie broken by AUPRO
    assert [key for key, r in rows.items() if r["best"]] == [("a/x", "pfm"), ("a/y", "mean_image")]
    # where it was trained, not where it was evaluated; the category cell spans its rows
    assert rows[("a/y", "pfm")]["device"] == "cuda:0 (NVIDIA H200)" and rows[("a/x", "pfm")]["device"] == "cpu"
    assert [r["category_rows"] for r in board["rows"]] == [2, 0, 2, 0]
    means = {m["method"]: m["cells"] for m in board["means"]}
    assert means["pfm"] == ["0.850", "0.700", "20.0"]  # AUPRO: the mean over the category that has it
    assert means["mean_image"] == ["0.700", "0.650", "1.5"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two tiny synthetic categories, each with a PFM model and the mean-image baseline trained,
    evaluated and deployed: what the pipeline's report asset reads."""
    from ad_models.data.sources import prepare_category
    from ad_models.defects.bank import build_bank
    root = tmp_path_factory.mktemp("report")
    entries = []
    for category in ("fabric", "circuit"):
        dataset, bank = root / "datasets" / category, root / "defects" / category
        prepare_category("synthetic", category, dataset, n_train=10, n_test_good=4, n_test_defect=6, size=64, seed=0)
        build_bank(dataset, bank, {"image_size": 64, "min_holdout": 3, "defects_per_image": 2,
                                   "foreground": category == "circuit"}, progress=False)
        for method, config in (("pfm", {"image_size": 64, "epochs": 2, "batch_size": 4}),
                               ("mean_image", {"image_size": 64})):
            model, evaluation = root / "models" / method / category, root / "eval" / method / category
            runs.train(method, config, dataset, model, bank_dir=bank, device="cpu", progress=False, budget="tiny")
            runs.evaluate(model, dataset, evaluation, bank_dir=bank, device="cpu", batch_size=4, gallery_size=3,
                          progress=False)
            deploy.promote(model, root / "deployed" / method / category, bank, dataset, 0.01, device="cpu")
            entries.append(EvalEntry(f"synthetic/{category}", method, evaluation,
                                     root / "deployed" / method / category))
    return root, entries


def test_the_report_opens_with_a_leaderboard_and_a_cost_chart(evaluated):
    root, entries = evaluated
    metrics = build_report(entries, root / "reports")
    html = (root / "reports" / "report.html").read_text()
    board = html[html.index('id="leaderboard"'):html.index('id="cat-synthetic-fabric"')]
    # every model a row, with its budget and where it was trained, linked to its category's section
    assert board.count("<tr") == 1 + 4 + 2  # header, 4 models, 2 method means
    assert board.count(">tiny<") == 4 and board.count(">cpu<") == 4
    assert 'href="#cat-synthetic-circuit"' in board and "Accuracy against training and inference cost" in board
    assert board.count("&#9733;</span></td>") == 2  # one best method per category
    starred = re.findall(r'<td class="text">(\w+) <span class="star"', board)
    assert starred == [max(by_method, key=lambda m: (by_method[m]["image_auroc"], by_method[m]["aupro"]))
                       for by_method in metrics.values()]
    means = re.findall(r'<tr class="mean[^"]*"><td>mean of 2</td><td class="text">(\w+)</td>', board)
    assert means == ["pfm", "mean_image"]
    # the mean in the table is the mean of the categories' figures
    pfm_mean = sum(metrics[c]["pfm"]["image_auroc"] for c in metrics) / 2
    mean_row = board[board.index('<td class="text">pfm</td><td></td><td></td>'):]
    assert f"<td>{pfm_mean:.3f}</td>" in mean_row.split("</tr>")[0]


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(evaluated):
    """Headless Chromium opens the report file as a reader would: every figure decodes (the cost
    chart, ROC curves, learning curves, galleries), no console error, and a drawn page."""
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install adpipe[browser])")
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian package chromium)")
    root, entries = evaluated
    build_report(entries, root / "browser")
    shot = root / "browser" / "report.png"
    page = check_page(root / "browser" / "report.html", screenshot=shot)
    assert page.ok, (page.broken_images, page.console_errors, page.failed_requests)
    # the cost chart + per category: ROC + the PFM learning curve (the baseline has none) + 2 galleries
    assert page.images == 1 + 2 * (1 + 1 + 2) and page.title == "adpipe report"
    image = cv2.imread(str(shot))
    assert image.shape[1] == 1400 and image.shape[0] > 2000 and image.std() > 10


def test_a_broken_page_is_reported(tmp_path):
    """The browser check can fail: a missing image and a script error are named."""
    if importlib.util.find_spec("playwright") is None or find_chromium() is None:
        pytest.skip("needs playwright and Chromium (Debian package chromium)")
    page_file = tmp_path / "broken.html"
    page_file.write_text('<html><head><title>t</title></head><body><img alt="roc" src="missing.png">'
                         "<script>undefined_function()</script></body></html>")
    page = check_page(page_file)
    assert not page.ok and page.broken_images == ["roc"] and page.images == 1
    assert any("undefined_function" in e for e in page.console_errors)
    assert any("missing.png" in r for r in page.failed_requests)
