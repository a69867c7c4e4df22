"""Time and memory of the pixel metrics on N random maps with blob defects.

    python bench/bench_metrics.py [--n 1000] [--size 256] [--sklearn]

Each metric runs in a forked child process, so its peak RSS (ru_maxrss, which
includes the shared input arrays) is its own and not the maximum of everything
run so far. tracemalloc's peak is the extra memory numpy allocated during the call.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ad_models.metrics import aupro, pixel_auroc  # noqa: E402


def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half the images get 1-3 smooth blob defects; maps are noise plus a defect bump."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        if i % 2:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(size / 32, size / 6, 2)
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        noise = rng.random((size, size), dtype=np.float32)
        maps[i] = noise + ndimage.gaussian_filter(masks[i].astype(np.float32), 2)
    return masks, maps


def _measure(fn, args, queue) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # ru_maxrss is in KiB on Linux
    queue.put((value, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, traced_peak / 2**20))


def measure(fn, *args) -> tuple[float, float, float, float]:
    """(value, seconds, peak RSS MB, traced peak MB) of fn(*args) in a forked child."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure, args=(fn, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def sklearn_pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # imported by main(), outside the timing

    return roc_auc_score(masks.ravel(), maps.ravel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sklearn", action="store_true", help="also time sklearn's roc_auc_score")
    args = parser.parse_args()

    start = time.perf_counter()
    masks, maps = make_data(args.n, args.size)
    print(
        f"data: {args.n} x {args.size}x{args.size} = {maps.size / 1e6:.1f}M pixels, "
        f"{masks.mean():.2%} defective, built in {time.perf_counter() - start:.1f} s, "
        f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )

    metrics = {"pixel_auroc": pixel_auroc, "aupro": aupro}
    if args.sklearn:
        import sklearn.metrics  # noqa: F401

        metrics["sklearn roc_auc_score"] = sklearn_pixel_auroc
    print(f"{'metric':<22}{'N':>6}{'size':>6}{'value':>10}{'seconds':>9}{'peak RSS MB':>13}{'traced MB':>11}")
    for name, fn in metrics.items():
        value, seconds, rss, traced = measure(fn, masks, maps)
        print(f"{name:<22}{args.n:>6}{args.size:>6}{value:>10.5f}{seconds:>9.2f}{rss:>13.0f}{traced:>11.0f}")


if __name__ == "__main__":
    main()
