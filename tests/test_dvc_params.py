"""Which DVC train stages go stale when params.yaml changes: each depends on `budget`, its method's
entry in the chosen budget and its `method_config` entry, nothing else of the methods' settings.

What goes stale is decided by dvc.yaml, params.yaml and dvc.lock alone, so the stages' outputs here
are placeholders committed with `dvc commit`: seconds, where `dvc repro` would train for minutes
(the real pipeline under DVC is test_pipeline.py's test_dvc_repro_rebuilds_and_then_does_nothing).
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.tiny_project import ROOT, TINY, dvc, stale, write_params

CATEGORIES = ["synthetic/fabric", "synthetic/granite"]
METHODS = ["pfm", "mean_image"]
BUDGETS = {**TINY["budgets"], "other": TINY["budgets"]["tiny"]}  # same settings, another name
OWN = TINY["method_config"]  # an entry per method, even when empty


def train(method: str) -> set[str]:
    return {f"train@{method}-{category}" for category in CATEGORIES}


@pytest.fixture
def repo(tmp_path):
    """A git + DVC repository with the project's dvc.yaml, every stage committed as up to date."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "ad_models", repo / "ad_models", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo, categories=CATEGORIES, methods=METHODS, budgets=BUDGETS, method_config=OWN)
    data = repo / "data"
    folders = [f"{step}/{category}" for step in ("ingested", "datasets", "defects") for category in CATEGORIES]
    folders += [f"{step}/{method}/{category}" for step in ("models", "eval", "deployed")
                for method in METHODS for category in CATEGORIES]
    for folder in [*folders, "reports/roc"]:
        (data / folder).mkdir(parents=True)
        (data / folder / "placeholder").write_text(folder)
    for name in ("report.html", "metrics.json"):
        (data / "reports" / name).write_text("{}")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "commit", "-f", "-q")
    assert stale(repo) == set()
    return repo


def edit(repo, **changes) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    write_params(repo, **{**params, **changes})


def test_one_methods_settings_make_only_its_models_stale(repo):
    edit(repo, method_config={**OWN, "pfm": {"epochs": 3}})
    assert stale(repo) == train("pfm")
    # one category's options: DVC cannot address them apart from the method's, so all its categories
    edit(repo, method_config={**OWN, "pfm": {"per_category": {"synthetic/fabric": {"epochs": 4}}}})
    assert stale(repo) == train("pfm")
    edit(repo, method_config=OWN)
    assert stale(repo) == set()
    # the chosen budget's entry for one method
    edit(repo, budgets={**BUDGETS, "tiny": {**BUDGETS["tiny"], "mean_image": {"image_size": 32}}})
    assert stale(repo) == train("mean_image")
    # a budget not chosen trains nothing
    edit(repo, budgets={**BUDGETS, "other": {"pfm": {"epochs": 9}, "mean_image": {}}})
    assert stale(repo) == set()


def test_switching_the_budget_makes_every_model_stale(repo):
    # even to a budget with the same settings: each model records the budget it was trained with
    edit(repo, budget="other")
    assert stale(repo) == train("pfm") | train("mean_image")
    edit(repo, budget="paper", budgets={**BUDGETS, "paper": {"pfm": {}, "mean_image": {}}})
    assert stale(repo) == train("pfm") | train("mean_image")


def test_a_method_without_its_entries_is_named_by_dvc(repo):
    """DVC cannot depend on a key params.yaml lacks: the error names the entry to add."""
    edit(repo, method_config={"pfm": {}}, budgets={"tiny": {"pfm": TINY["budgets"]["tiny"]["pfm"]}})
    assert stale(repo) == train("mean_image")
    done = dvc(repo, "repro", "--dry", "train@mean_image-synthetic/fabric", check=False)
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "method_config.mean_image" in message and "budgets.tiny.mean_image" in message, message
    assert "missing from 'params.yaml'" in message, message


@pytest.mark.parametrize("budget", ["default", "paper"])
def test_the_repositorys_params_have_every_key_its_stages_depend_on(tmp_path, budget):
    """`dvc repro` on the repository's params.yaml, as it is and switched to the papers' budget (what
    a GPU wants), finds every key its stages depend on: DVC's own check, without running them."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if budget != "default":
        params["budget"] = budget
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    with Repo.init(tmp_path, no_scm=True) as dvc_repo:
        missing = {stage.name: sorted(set(dep.params) - set(dep.read_params()))
                   for stage in dvc_repo.index.stages for dep in stage.deps if isinstance(dep, ParamsDependency)}
    missing = {stage: keys for stage, keys in missing.items() if keys}
    assert not missing, f"params.yaml lacks keys these stages depend on (`{{}}`: a method's defaults): {missing}"
