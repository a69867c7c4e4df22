"""params.yaml: the one configuration, read by Dagster (partitions, assets) and DVC (stage params).

Relative paths in it resolve against the folder that holds it, so the pipeline behaves the same
whatever the working directory (the UI, `adpipe`, `dvc repro`).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAMS_ENV = "ADPIPE_PARAMS"  # path of params.yaml; default: ./params.yaml
PATH_OPTIONS = ("source_dir", "raw_dir", "archive", "good_dir", "defective_dir", "mask_dir")
KNOWN_KEYS = {"seed", "device", "data_root", "datasets", "categories", "methods", "budget", "budgets",
              "method_config", "evaluation", "decision",
              "defect_bank", "ingest", "retraining", "execution"}
RETRAINING_DEFAULTS = {
    "cron": "0 2 * * *",  # the schedule that retrains models whose training images changed: nightly, 02:00
    "timezone": "UTC",
    "tolerance": 0.01,  # a candidate may score this much below the deployed model and still replace it
    "inbox_poll_seconds": 30,  # how often the sensor looks at the inboxes
}

PAPER_BUDGET = "paper"  # the methods' own defaults, which are their papers' settings: always defined

EXECUTORS = ("in_process", "multiprocess", "celery", "k8s")
K8S_KEYS = {"image", "namespace", "gpu_node_selector", "gpu_tolerations", "data_volume_claim"}
EXECUTION_DEFAULTS = {
    "executor": "in_process",  # of every run: UI, schedules, sensors, `adpipe` and so DVC stages
    "devices": "auto",  # accelerator indices the GPU steps share on a machine: "auto" = every CUDA device, or [0, 1]
    "max_concurrent": 0,  # multiprocess: steps at once (0: as many as the machine has cores)
    "gpu_slots": 0,  # GPU steps at once across all machines (the `gpu` pool); 0: this machine's device count
    "lock_dir": "",  # where the per-device locks live on each machine (default: <tmp>/adpipe-devices)
    "celery": {},  # celery: {broker: redis://host:6379/0, backend: redis://host:6379/1}
    "k8s": {},  # k8s: {image, namespace, gpu_node_selector, gpu_tolerations, data_volume_claim}
    "compile": False,  # torch.compile the networks for training: false, or a mode (COMPILE_MODES)
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or names something that does not exist."""


@dataclass(frozen=True)
class Params:
    file: Path
    seed: int
    device: str
    data_root: Path
    datasets: dict[str, dict[str, Any]]  # name -> {"source": ..., "options": {...}}
    categories: list[str]  # "<dataset>/<category>[.<view>]", the category partitions
    methods: list[str]  # the method partitions
    budget: str = PAPER_BUDGET  # the named budget whose method settings apply (`budgets`)
    budgets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # name -> method -> options
    method_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # the user's, over the budget's
    evaluation: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)  # DecisionPolicy options + per_category overrides
    defect_bank: dict[str, Any] = field(default_factory=dict)  # BankConfig options + per_category overrides
    ingest: dict[str, Any] = field(default_factory=dict)  # IngestRules options for new good images
    retraining: dict[str, Any] = field(default_factory=lambda: dict(RETRAINING_DEFAULTS))
    execution: dict[str, Any] = field(default_factory=lambda: dict(EXECUTION_DEFAULTS))

    # -- where things live under data/ ---------------------------------------------------------
    def dataset_dir(self, category: str) -> Path:
        return self.data_root / "datasets" / category

    def bank_dir(self, category: str) -> Path:
        return self.data_root / "defects" / category

    def bank_config(self, category: str) -> dict[str, Any]:
        """The defect bank's options for a category: the defaults, then its `per_category` entry."""
        options = {k: v for k, v in self.defect_bank.items() if k != "per_category"}
        options.update((self.defect_bank.get("per_category") or {}).get(category) or {})
        options.setdefault("seed", self.seed)
        return options

    def decision_policy(self, category: str):
        """How a category's models decide pass/fail (`thresholds.DecisionPolicy`): the `decision`
        options, then its `per_category` entry."""
        from ad_models.thresholds import DecisionPolicy
        options = {k: v for k, v in self.decision.items() if k != "per_category"}
        options.update((self.decision.get("per_category") or {}).get(category) or {})
        return DecisionPolicy.from_dict(options)

    def method_options(self, method: str, category: str) -> dict[str, Any]:
        """A method's config for a category, over its defaults (the paper's settings): the chosen
        budget's entry, then `method_config`'s; each followed by its `per_category` overrides for
        the category (e.g. SLSG's simulated-anomaly rules)."""
        options: dict[str, Any] = {}
        for layer in ((self.budgets.get(self.budget) or {}).get(method), self.method_config.get(method)):
            layer = dict(layer or {})
            per_category = (layer.pop("per_category", None) or {}).get(category) or {}
            options.update(layer)
            options.update(per_category)
        return options

    def model_dir(self, method: str, category: str) -> Path:
        """The latest trained model: a candidate for deployment."""
        return self.data_root / "models" / method / category

    def deploy_dir(self, method: str, category: str) -> Path:
        """The deployed model (current/), rejected candidates and the decision history."""
        return self.data_root / "deployed" / method / category

    def ingest_folders(self, category: str):
        """The inbox, rejected and store folders of new good images (data/incoming, data/ingested)."""
        from ad_models.data.ingest import ingest_folders
        return ingest_folders(self.data_root, category)

    def ingest_rules(self):
        from ad_models.data.ingest import IngestRules
        return IngestRules.from_dict(self.ingest)

    def eval_dir(self, method: str, category: str) -> Path:
        return self.data_root / "eval" / method / category

    @property
    def report_dir(self) -> Path:
        return self.data_root / "reports"

    def raw_dir(self, dataset: str) -> Path:
        """Where a dataset's archive and its extraction live: its `raw_dir` option, else data/raw/<dataset>."""
        _, options = self.dataset_source(dataset)
        return Path(options.get("raw_dir") or self.data_root / "raw" / dataset)

    def source_of(self, category: str) -> tuple[str, str, dict[str, Any]]:
        """(source module, category within it, options) for a "<dataset>/<category>" key."""
        dataset, name = category.split("/", 1)
        source, options = self.dataset_source(dataset)
        # "{category}" in a string option, e.g. a user folder per category: good_dir: lines/{category}/ok
        bare = name.partition(".")[0]
        options = {k: v.replace("{category}", bare) if isinstance(v, str) else v for k, v in options.items()}
        return source, name, options

    def dataset_source(self, dataset: str) -> tuple[str, dict[str, Any]]:
        """(source module, options) of a dataset, paths in the options resolved."""
        spec = self.datasets[dataset]
        options = dict(spec.get("options") or {})
        for key in PATH_OPTIONS:  # paths in options are relative to params.yaml too
            if options.get(key):
                options[key] = str(self._resolve(options[key]))
        return spec["source"], options

    def raw_datasets(self) -> list[str]:
        """Datasets read from a download, an archive or a folder (not generated): the raw partitions."""
        from ad_models.data.sources import has_raw
        return [name for name in self.datasets if has_raw(*self.dataset_source(name))]

    def _resolve(self, path: str | os.PathLike) -> Path:
        path = Path(os.path.expanduser(str(path)))
        return path if path.is_absolute() else (self.file.parent / path).resolve()


def _check_retraining(path: Path, retraining: dict[str, Any]) -> None:
    if "good_quantile" in retraining:
        raise ParamsError(f"{path}: retraining.good_quantile is now decision.max_false_alarm_rate "
                          f"(1 - good_quantile: 0.99 -> 0.01), which evaluation and the report use too")
    unknown = sorted(set(retraining) - set(RETRAINING_DEFAULTS))
    if unknown:
        raise ParamsError(f"{path}: retraining: unknown keys {unknown}; known: {sorted(RETRAINING_DEFAULTS)}")
    from dagster._utils.schedules import is_valid_cron_string  # dagster's own check of the schedule
    if not isinstance(retraining["cron"], str) or not is_valid_cron_string(retraining["cron"]):
        raise ParamsError(f"{path}: retraining.cron: {retraining['cron']!r} is not a cron string such as '0 2 * * *'")
    for key, low, high in (("tolerance", 0, 1), ("inbox_poll_seconds", 1, 86400)):
        value = retraining[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ParamsError(f"{path}: retraining.{key} must be a number in [{low}, {high}], got {value!r}")


def _check_execution(path: Path, execution: dict[str, Any]) -> None:
    unknown = sorted(set(execution) - set(EXECUTION_DEFAULTS))
    if unknown:
        raise ParamsError(f"{path}: execution: unknown keys {unknown}; known: {sorted(EXECUTION_DEFAULTS)}")
    if execution["executor"] not in EXECUTORS:
        raise ParamsError(f"{path}: execution.executor must be one of {list(EXECUTORS)}, not {execution['executor']!r}")
    devices = execution["devices"]
    indices = isinstance(devices, list) and devices and len(set(devices)) == len(devices) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    if devices != "auto" and not indices:
        raise ParamsError(f"{path}: execution.devices must be 'auto' or a list of distinct device indices such as "
                          f"[0, 1], not {devices!r}")
    for key in ("max_concurrent", "gpu_slots"):
        if not isinstance(execution[key], int) or isinstance(execution[key], bool) or execution[key] < 0:
            raise ParamsError(f"{path}: execution.{key} must be an integer >= 0, not {execution[key]!r}")
    if execution["compile"] is not False and execution["compile"] not in COMPILE_MODES:
        raise ParamsError(f"{path}: execution.compile must be false or one of {list(COMPILE_MODES)}, "
                          f"not {execution['compile']!r}")
    celery = execution["celery"]
    if not isinstance(celery, dict) or set(celery) - {"broker", "backend"}:
        raise ParamsError(f"{path}: execution.celery takes `broker` and `backend` URLs, got {celery!r}")
    if execution["executor"] == "celery" and not celery.get("broker"):
        raise ParamsError(f"{path}: execution.executor is celery: set execution.celery.broker (e.g. redis://host:6379/0)")
    k8s = execution["k8s"]
    if not isinstance(k8s, dict) or set(k8s) - K8S_KEYS:
        raise ParamsError(f"{path}: execution.k8s takes {sorted(K8S_KEYS)}, got {k8s!r}")
    if execution["executor"] == "k8s" and not k8s.get("image"):
        raise ParamsError(f"{path}: execution.executor is k8s: set execution.k8s.image (the code location's image)")


def _check_budgets(path: Path, budget: Any, budgets: Any) -> None:
    from ad_models.methods import METHODS
    if not isinstance(budgets, dict) or not all(isinstance(b, dict) for b in budgets.values()):
        raise ParamsError(f"{path}: budgets must map a name to {{method: options}}, got {budgets!r}")
    for name, entries in budgets.items():
        unknown = sorted(set(entries) - set(METHODS))
        if unknown:
            raise ParamsError(f"{path}: budgets.{name}: unknown methods {unknown} (known: {sorted(METHODS)})")
    names = sorted(set(budgets) | {PAPER_BUDGET})
    if budget not in names:
        raise ParamsError(f"{path}: budget {budget!r} is not defined; defined: {names} "
                          f"({PAPER_BUDGET!r}: every method's own defaults, its paper's settings)")


def load_params(path: str | os.PathLike | None = None) -> Params:
    path = Path(path or os.environ.get(PARAMS_ENV) or "params.yaml").absolute()
    if not path.is_file():
        raise ParamsError(f"{path}: no params file (run from the repository root, or set {PARAMS_ENV})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ParamsError(f"{path}: unknown keys {unknown}; known keys: {sorted(KNOWN_KEYS)}")

    from ad_models.data.sources import SOURCES, check_category
    from ad_models.methods import METHODS

    datasets = raw.get("datasets") or {}
    for name, spec in datasets.items():
        if not isinstance(spec, dict) or spec.get("source") not in SOURCES:
            raise ParamsError(f"{path}: datasets.{name}.source must be one of {sorted(SOURCES)}")
    categories = list(raw.get("categories") or [])

    def category_problem(key) -> str | None:
        dataset, _, name = str(key).partition("/")
        if dataset not in datasets or not name:
            return f"{key!r} (want '<dataset>/<category>[.<view>]' with <dataset> in {sorted(datasets)})"
        try:
            check_category(datasets[dataset]["source"], name)
        except ValueError as e:
            return f"{key!r}: {e}"
        return None

    problems = [p for p in map(category_problem, categories) if p]
    methods = list(raw.get("methods") or [])
    problems += [f"method {m!r} (known: {sorted(METHODS)})" for m in methods if m not in METHODS]
    if not categories or not methods:
        problems.append("at least one category and one method are needed")
    if len(set(categories)) != len(categories) or len(set(methods)) != len(methods):
        problems.append("categories and methods must not repeat")
    if problems:
        raise ParamsError(f"{path}: " + "; ".join(problems))

    params = Params(file=path, seed=int(raw.get("seed", 0)), device=str(raw.get("device", "auto")),
                    data_root=Path(), datasets=datasets, categories=categories, methods=methods,
                    budget=str(raw.get("budget", PAPER_BUDGET)), budgets=raw.get("budgets") or {},
                    method_config=raw.get("method_config") or {}, evaluation=raw.get("evaluation") or {},
                    decision=raw.get("decision") or {},
                    defect_bank=raw.get("defect_bank") or {}, ingest=raw.get("ingest") or {},
                    retraining={**RETRAINING_DEFAULTS, **(raw.get("retraining") or {})},
                    execution={**EXECUTION_DEFAULTS, **(raw.get("execution") or {})})
    _check_budgets(path, params.budget, params.budgets)
    _check_retraining(path, params.retraining)
    _check_execution(path, params.execution)
    try:
        params.ingest_rules()
    except ValueError as e:
        raise ParamsError(f"{path}: ingest: {e}") from e
    from ad_models.defects.bank import BankConfig
    from ad_models.methods.base import config_from_dict
    sections = {"defect_bank": params.defect_bank, "decision": params.decision,
                **{f"budgets.{b}.{m}": options
                   for b, entries in params.budgets.items() for m, options in entries.items()},
                **{f"method_config.{m}": options for m, options in params.method_config.items()}}
    for where, section in sections.items():
        # a category left out of this run may keep its entry; a misspelt one would silently do nothing
        wrong = [p for p in map(category_problem, (section or {}).get("per_category") or {}) if p]
        if wrong:
            raise ParamsError(f"{path}: {where}.per_category: " + "; ".join(wrong))
    for category in categories:  # a typo in the bank's or a method's options fails here, not mid-run
        try:
            BankConfig.from_dict(params.bank_config(category))
        except (TypeError, ValueError) as e:
            raise ParamsError(f"{path}: defect_bank for {category}: {e}") from e
        try:
            params.decision_policy(category)
        except (TypeError, ValueError) as e:
            raise ParamsError(f"{path}: decision for {category}: {e}") from e
        others = sorted(set(params.budgets) - {params.budget})
        for method, budget in itertools.product(methods, [params.budget, *others]):
            try:  # every budget, so switching to another one cannot fail mid-run either
                config_from_dict(METHODS[method].Config,
                                 dataclasses.replace(params, budget=budget).method_options(method, category))
            except (TypeError, ValueError) as e:
                raise ParamsError(f"{path}: {method} for {category} with budget {budget!r} "
                                  f"(budgets.{budget}.{method}, then method_config.{method}): {e}") from e
    return Params(**{**params.__dict__, "data_root": params._resolve(raw.get("data_root", "data"))})
