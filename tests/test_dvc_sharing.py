"""DVC as a team uses it, on a real (tiny) run of the pipeline in a temporary git repository: data,
models and reports shared through a remote, and experiments over params compared side by side."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from tests.tiny_project import BIN, ROOT, stale, write_params

# one worker builds the trained repository once for both tests (`--dist loadgroup`)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_sharing")]

CATEGORY, METHOD = "synthetic/granite", "mean_image"
GIT_USER = {"GIT_AUTHOR_NAME": "adpipe", "GIT_AUTHOR_EMAIL": "adpipe@127.0.0.1",
            "GIT_COMMITTER_NAME": "adpipe", "GIT_COMMITTER_EMAIL": "adpipe@127.0.0.1"}


def run(cwd: Path, *args: str, **env: str) -> str:
    env = {**os.environ, **GIT_USER, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}: " + done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A git repository with the project's pipeline, `dvc repro`'d and committed as README says
    (params.yaml, dvc.lock, the report's metrics.json)."""
    repo = tmp_path_factory.mktemp("team") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "ad_models", repo / "ad_models", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo, categories=[CATEGORY], methods=[METHOD])
    run(repo, "git", "init", "-q")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    run(repo, "dvc", "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "a trained pipeline")
    # of what the run wrote, git holds the lock and the metrics (uncached); the rest goes through the remote
    assert run(repo, "git", "ls-files", "data", "dvc.lock").split() == ["data/reports/metrics.json", "dvc.lock"]
    return repo


def predict(repo: Path, out: Path) -> list[dict]:
    images = sorted(str(p.relative_to(repo)) for p in (repo / "data/datasets" / CATEGORY / "test").glob("*/00[01].png"))
    assert len(images) >= 4
    run(repo, "adpipe", "predict", "--category", CATEGORY, "--out", str(out), *images)
    return list(csv.DictReader((out / "predictions.csv").open()))


def test_a_clone_pulls_what_was_run_and_predicts_the_same(trained, tmp_path):
    remote = tmp_path / "remote"
    run(trained, "dvc", "remote", "add", "-d", "team", str(remote))
    run(trained, "git", "commit", "-q", "-m", "the team's remote", ".dvc/config")
    pushed = run(trained, "dvc", "push")
    assert "files pushed" in pushed and any(remote.rglob("*"))

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(trained), str(clone))
    assert not (clone / "data" / "models").exists()  # nothing but the lock and metrics came through git
    run(clone, "dvc", "pull")
    assert stale(clone) == set()  # every stage up to date: exactly what was run, nothing to rebuild
    for folder in ("datasets", "defects", "models", "eval", "deployed"):
        assert any((clone / "data" / folder).rglob("*.*")), folder
    assert (clone / "data" / "reports" / "report.html").is_file()

    here, there = predict(trained, tmp_path / "here"), predict(clone, tmp_path / "there")
    assert [(r["image"], r["score"], r["threshold"], r["verdict"]) for r in here] == \
        [(r["image"], r["score"], r["threshold"], r["verdict"]) for r in there]
    for row in here:
        assert (tmp_path / "here" / row["map"]).read_bytes() == (tmp_path / "there" / row["map"]).read_bytes()


def test_queued_experiments_are_listed_with_their_metrics_and_curves(trained):
    for name, size in (("small", 32), ("mid", 48)):  # `++`: set the option, whether params.yaml has it or not
        run(trained, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"++method_config.{METHOD}.image_size={size}")
    # DAGSTER_HOME by absolute path: the queue's runs (in temporary copies) join the repository's run history
    home = trained / ".dagster_home"
    runs_before = len(dg.DagsterInstance.from_config(str(home)).fetch_materializations(
        dg.AssetKey("model"), limit=10).records)
    run(trained, "dvc", "exp", "run", "--run-all", "-j", "1", DAGSTER_HOME=str(home))

    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(run(trained, "dvc", "exp", "show", "--csv")))}
    assert {"small", "mid"} <= set(rows)
    headline = [f"{CATEGORY}.{METHOD}.{m}" for m in ("image_auroc", "pixel_auroc", "aupro", "f1_at_threshold",
                                                      "train_seconds")]
    for name in ("small", "mid"):
        assert rows[name]["State"] == "Success"
        assert rows[name][f"method_config.{METHOD}.image_size"] == {"small": "32", "mid": "48"}[name]
        assert all(0.0 <= float(rows[name][column]) for column in headline), rows[name]
    pixel_auroc = f"{CATEGORY}.{METHOD}.pixel_auroc"
    assert rows["small"][pixel_auroc] != rows["mid"][pixel_auroc]  # other settings, other results

    plots = json.loads(run(trained, "dvc", "plots", "diff", "small", "mid", "--json"))["data"]
    roc = plots[f"data/reports/roc/{METHOD}__{CATEGORY.replace('/', '__')}.csv"][0]
    assert set(roc["revisions"]) == {"small", "mid"}
    assert {point["rev"] for point in roc["content"]["data"]["values"]} == {"small", "mid"}

    assert len(dg.DagsterInstance.from_config(str(home)).fetch_materializations(
        dg.AssetKey("model"), limit=10).records) == runs_before + 2
