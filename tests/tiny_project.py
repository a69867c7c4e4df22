"""The tiny project the pipeline tests run: its params.yaml, new good images for its inbox, DVC calls."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "seed": 0,
    "data_root": "data",
    "datasets": {"synthetic": {"source": "synthetic",
                               "options": {"n_train": 10, "n_test_good": 4, "n_test_defect": 8, "size": 64}}},
    "categories": ["synthetic/fabric", "synthetic/circuit"],
    "methods": ["pfm", "mean_image"],
    "budget": "tiny",
    "budgets": {"tiny": {"pfm": {"epochs": 2, "image_size": 64, "batch_size": 4}, "mean_image": {"image_size": 64}}},
    "method_config": {"pfm": {}, "mean_image": {}},  # DVC's train stages depend on each method's entry, even empty
    "evaluation": {"batch_size": 4, "gallery_size": 3},
    "decision": {"policy": "false_alarm_rate"},  # DVC's evaluate and deploy stages depend on it
    "defect_bank": {"image_size": 64, "min_holdout": 2, "per_category": {"synthetic/circuit": {"foreground": True}}},
}


def new_good(folder: Path, category: str, n: int, inbox: Path, seed: int = 99) -> list[Path]:
    """`n` good images of a synthetic category the dataset does not have (another seed), copied into
    `inbox` with an old modification time (a finished copy)."""
    from ad_models.data.sources import prepare_category
    manifest = prepare_category("synthetic", category, folder, n_train=n, n_test_good=0, n_test_defect=0,
                                size=64, seed=seed)
    dropped = []
    for i, source in enumerate(manifest.path[manifest.split == "train"]):
        target = inbox / f"new_{i:03d}.png"
        shutil.copyfile(source, target)
        os.utime(target, (time.time() - 60, time.time() - 60))
        dropped.append(target)
    return dropped


def write_params(folder: Path, **changes) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in {**TINY, **changes}.items() if v is not None}))  # None: leave out
    return path


def dvc(repo, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def stale(repo) -> set[str]:
    """The stages `dvc status` finds changed, but the inboxes' (`ingest` always runs)."""
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    assert all(status[stage] == ["always changed"] for stage in status if stage.startswith("ingest@"))
    return {stage for stage in status if not stage.startswith("ingest@")}
