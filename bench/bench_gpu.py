"""Training and inference speed per method on one device, and where a training step's time goes.

    python bench/bench_gpu.py                                   # every method, params.yaml's cpu budget, CPU or GPU
    python bench/bench_gpu.py --budget paper --image-size 256   # the papers' settings (on a GPU)
    python bench/bench_gpu.py --methods esad --profile          # + a torch.profiler trace per method

For each method it trains on a built-in category (`--train-images` good images; no bank, so no
checkpoint scoring) with the budget's settings, each training loop cut to a few units (epochs or
iterations), then once more with each loop doubled: the differences (the fastest of `--repeats`
runs of each length) give the loop's speed without the fixed start-up (feature caching, reference choice, coreset), which is reported apart. Printed
per method:

- training speed per loop: images/s for epoch loops, iterations/s (and images/s) otherwise;
- the budget's full training time at these speeds (start-up + every loop at its full length), and
  the sum over a 15-category benchmark such as MVTec AD (the matrix of categories x methods);
- one training step broken down (data and defect synthesis, forward, backward, optimizer, logging)
  from a run with the device synchronised at each part (`base.clock_steps`), the rest being start-up;
- inference ms/image at batch 8 (after warm-up, synchronised) and peak device memory (CUDA), or the
  process's peak resident memory on the CPU.

Runs on the CPU too, where the breakdown shows the host's share on any machine. `--profile` writes
a Chrome trace (chrome://tracing, Perfetto) of one more short run per method, its steps marked
"train/<part>".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from ad_models.data.layout import read_manifest  # noqa: E402
from ad_models.data.loading import ImageDataset  # noqa: E402
from ad_models.data.sources import prepare_category  # noqa: E402
from ad_models.methods import create_method  # noqa: E402
from ad_models.methods.base import STEP_PHASES, clock_steps, resolve_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "gpu"
CATEGORIES_PER_BENCHMARK = 15  # MVTec AD

# Each method's training loops: (config key, units per measurement run, what a unit is, the config
# key of its batch size). "epochs" units pass every training image once; "iterations" units are
# single optimizer steps. Units are large enough for the doubled run to stand out of the timing noise.
LOOPS = {
    "pfm": [("epochs", 2, "epochs", "batch_size")],
    "pefm": [("epochs", 2, "epochs", "batch_size")],
    "esad": [("epochs", 1, "epochs", "batch_size")],
    "ndpnet": [("phase1_epochs", 1, "epochs", "batch_size"), ("phase2_epochs", 1, "epochs", "batch_size")],
    "slsg": [("iterations", 40, "iterations", "batch_size")],
    "bvpn": [("distill_iterations", 200, "iterations", "distill_batch_size"),
             ("iterations", 100, "iterations", "batch_size")],
}


def budget_config(method: str, budget: str, image_size: int | None) -> dict:
    """The method's options under params.yaml's named budget ("paper": its defaults)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    budgets = params.get("budgets") or {}
    if budget != "paper" and budget not in budgets:
        raise SystemExit(f"params.yaml defines no budget {budget!r}; defined: {sorted(budgets) + ['paper']}")
    config = {k: v for k, v in ((budgets.get(budget) or {}).get(method) or {}).items() if k != "per_category"}
    if image_size:
        config["image_size"] = image_size
    return config


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_once(method: str, config: dict, train: ImageDataset, device: torch.device, clocked: bool = False,
               trace: Path | None = None, compile: str | None = None) -> dict:
    model = create_method(method, config)
    if compile:
        model.compile_networks(compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profiler = None
    if trace is not None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
    try:
        if clocked:
            with clock_steps() as clock:
                log = model.fit(train, None, device=str(device), progress=False)
            log["phase_seconds"] = dict(clock.seconds)
        else:
            log = model.fit(train, None, device=str(device), progress=False)
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
            profiler.export_chrome_trace(str(trace))
    synchronize(device)
    log["model"] = model
    return log


@torch.no_grad()
def inference_ms(model, device: torch.device, batch: int = 8, repeats: int = 10) -> float:
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(3):  # warm-up: cudnn's kernel choice, lazy initialisation
        model.predict(images)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.predict(images)
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / (repeats * batch)


def bench_method(method: str, args, train: ImageDataset, device: torch.device) -> dict:
    base = budget_config(method, args.budget, args.image_size)
    full = dataclasses.asdict(create_method(method, base).config)  # the budget's loop lengths
    loops = LOOPS[method]
    short = {key: units for key, units, _, _ in loops}
    # the clocked run comes first: it also takes the process's one-time costs (library loading,
    # kernel choice) that would otherwise count as start-up of the timed runs
    clocked = train_once(method, {**base, **short}, train, device, clocked=True, compile=args.compile)
    if args.profile:
        train_once(method, {**base, **short}, train, device, trace=RESULTS / f"trace_{method}_{device.type}.json",
                   compile=args.compile)
    first = train_once(method, {**base, **short}, train, device, compile=args.compile)
    first_seconds = min([first["train_seconds"]] + [  # the fastest of the repeats: timing noise only adds
        train_once(method, {**base, **short}, train, device, compile=args.compile)["train_seconds"]
        for _ in range(args.repeats - 1)])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"method": method, "budget": args.budget, "compile": args.compile,
           "image_size": first["model"].config.image_size,
           "batch_size": full["batch_size"], "train_images": len(train),
           "loops": {}, "inference_ms_per_image": inference_ms(first["model"], device)}
    loop_seconds = 0.0
    for key, units, kind, batch_key in loops:
        doubled = min(train_once(method, {**base, **short, key: 2 * units}, train, device,
                                 compile=args.compile)["train_seconds"] for _ in range(args.repeats))
        per_unit = (doubled - first_seconds) / units
        batch = full[batch_key]
        loop = {"seconds_per_unit": per_unit, "unit": kind, "full_units": full[key]}
        if per_unit <= 0:  # the extra units cost less than the timing noise: no speed to report
            loop["seconds_per_unit"] = 0.0
        elif kind == "epochs":
            loop["images_per_second"] = len(train) / per_unit
        else:
            loop["iterations_per_second"] = 1 / per_unit
            loop["images_per_second"] = batch / per_unit
        row["loops"][key] = loop
        loop_seconds += per_unit * units
    row["startup_seconds"] = max(first_seconds - loop_seconds, 0.0)
    row["full_budget_seconds"] = row["startup_seconds"] + sum(
        loop["seconds_per_unit"] * loop["full_units"] for loop in row["loops"].values())
    phases = clocked["phase_seconds"]
    other = max(clocked["train_seconds"] - sum(phases.values()), 0.0)
    total = sum(phases.values()) + other  # more than the wall time where parts ran side by side (PFM's levels)
    row["step_breakdown"] = {**{p: phases[p] / total for p in STEP_PHASES if p != "select"},
                             "start-up and other": other / total}
    row["peak_device_gb"] = peak
    row["peak_process_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def describe(row: dict) -> str:
    speeds = []
    for key, loop in row["loops"].items():
        if not loop["seconds_per_unit"]:
            speeds.append(f"{key} below timing noise (raise its units in LOOPS)")
        elif loop["unit"] == "epochs":
            speeds.append(f"{key} {loop['images_per_second']:.1f} img/s")
        else:
            speeds.append(f"{key} {loop['iterations_per_second']:.1f} it/s ({loop['images_per_second']:.0f} img/s)")
    breakdown = " ".join(f"{k} {v:.0%}" for k, v in row["step_breakdown"].items())
    memory = (f"peak device {row['peak_device_gb']:.2f} GB" if row["peak_device_gb"] is not None
              else f"process peak RSS {row['peak_process_rss_gb']:.2f} GB")
    return (f"{row['method']:7s} {', '.join(speeds)}; start-up {row['startup_seconds']:.1f} s; "
            f"full budget {row['full_budget_seconds'] / 60:.1f} min; inference {row['inference_ms_per_image']:.2f} "
            f"ms/image; {memory}\n         step: {breakdown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    parser.add_argument("--budget", default="cpu", help="a budget of params.yaml, or paper (the methods' defaults)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the budget's")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--category", default="fabric", help="built-in synthetic category")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler trace per method")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each length; the fastest counts")
    parser.add_argument("--compile", default=None, help="torch.compile mode: default, reduce-overhead, max-autotune")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/gpu/<device>_<budget>.json)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = RESULTS / "datasets" / f"{args.category}_{args.train_images}"
    if not (data / "manifest.csv").is_file():
        prepare_category("synthetic", args.category, data, n_train=args.train_images, n_test_good=1, n_test_defect=1,
                         size=256, seed=0)
    rows_manifest = read_manifest(data)
    train = ImageDataset(rows_manifest[rows_manifest.split == "train"], 256)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.budget}, "
          f"{len(train)} training images ({args.category})", flush=True)
    rows = []
    for method in args.methods:
        row = bench_method(method, args, train, device)
        rows.append(row)
        print(describe(row), flush=True)
    matrix = CATEGORIES_PER_BENCHMARK * sum(r["full_budget_seconds"] for r in rows) / 3600
    print(f"# full budget, {CATEGORIES_PER_BENCHMARK} categories x {len(rows)} methods at these speeds: "
          f"{matrix:.1f} device-hours", flush=True)
    out = Path(args.out or RESULTS / f"{device.type}_{args.budget}.json")
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "budget": args.budget,
                               "matrix_hours": matrix, "rows": rows}, indent=2))
    print(f"# written {out}")


if __name__ == "__main__":
    main()
