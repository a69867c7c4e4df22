"""Time and peak memory of restructuring one typical category of each public source.

    python bench/bench_restructure.py [--scale 1.0] [--sources mvtec_ad,visa,...] [--workdir DIR]

For each source a synthetic raw tree with the published layout is built, scaled to the real
image counts of one category (times --scale) and the real image sizes and formats; the content is
smooth noise, so file sizes are of the real order (the real data are not needed). `prepare` then
runs on it (from `source_dir`: archive download and extraction are download.py's and not timed) in
a fresh spawned process: its resident memory is sampled every 5 ms during `prepare` (peak and
before; ru_maxrss is recorded too but also counts import-time peaks). The raw files were just written,
so they are read from the page cache: the figures are restructuring cost, not disk speed.

Prints a table and writes bench/results/restructure.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ad_models.data.sources import dagm, mvtec_3d, mvtec_ad, mvtec_loco, visa  # noqa: E402
from ad_models.io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "restructure.json"
VARIANTS = 4  # distinct encoded images per kind; files reuse them (content does not change the work)


# ----------------------------------------------------------------------------- synthetic content

def _encoded_images(size: tuple[int, int], ext: str, gray: bool = False, seed: int = 0) -> list[bytes]:
    """A few encoded images of `size` (h, w): smooth noise plus grain, like a textured photo."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(VARIANTS):
        channels = 1 if gray else 3
        low = rng.uniform(60, 200, (h // 32 + 1, w // 32 + 1, channels)).astype(np.float32)
        base = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)
        image = np.clip(base + rng.normal(0, 6, (h, w, channels)), 0, 255).astype(np.uint8)
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext.lower() in (".jpg", ".jpeg") else []
        ok, data = cv2.imencode(ext.lower(), image.squeeze(), params)
        assert ok
        out.append(data.tobytes())
    return out


def _encoded_masks(size: tuple[int, int], value: int = 255, seed: int = 1) -> list[bytes]:
    """A few single-channel PNG masks with one elliptic defect, pixels 0 or `value`."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(VARIANTS):
        mask = np.zeros((h, w), np.uint8)
        center = (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4)))
        cv2.ellipse(mask, center, (w // 12, h // 20), float(rng.uniform(0, 180)), 0, 360, value, -1)
        out.append(cv2.imencode(".png", mask)[1].tobytes())
    return out


def _write(path: Path, variants: list[bytes], i: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = variants[i % len(variants)]
    path.write_bytes(data)
    return len(data)


def _n(count: int, scale: float) -> int:
    return max(1, round(count * scale))


# ----------------------------------------------------------------------------- raw trees

def build_mvtec_ad(root: Path, scale: float) -> dict:
    category, size = "hazelnut", (1024, 1024)
    images, masks = _encoded_images(size, ".png"), _encoded_masks(size)
    nbytes = 0
    for key, count in mvtec_ad.EXPECTED_COUNTS[category].items():
        split, defect = key.split("/")
        for i in range(_n(count, scale)):
            nbytes += _write(root / category / split / defect / f"{i:03d}.png", images, i)
            if defect != "good":
                nbytes += _write(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", masks, i)
    return dict(category=category, image_size=size, format="png", bytes=nbytes)


def build_mvtec_loco(root: Path, scale: float) -> dict:
    """breakfast_box at 1600x1280: per-region ground-truth folders and defects_config.json."""
    category, size = "breakfast_box", (1280, 1600)
    images, regions = _encoded_images(size, ".png"), _encoded_masks(size, value=1)
    nbytes = 0
    folder = root / "mvtec_loco_anomaly_detection" / category
    folder.mkdir(parents=True, exist_ok=True)
    (folder / mvtec_loco.DEFECTS_CONFIG).write_text(json.dumps([
        {"defect_name": "any", "pixel_value": 1, "saturation_threshold": 1.0, "relative_saturation": True}]))
    for key, count in mvtec_loco.EXPECTED_COUNTS[category].items():
        split, defect = key.split("/")
        for i in range(_n(count, scale)):
            nbytes += _write(folder / split / defect / f"{i:03d}.png", images, i)
            if split == "test" and defect != "good":
                nbytes += _write(folder / "ground_truth" / defect / f"{i:03d}" / "000.png", regions, i)
    return dict(category=category, image_size=size, format="png", bytes=nbytes)


def build_mvtec_3d(root: Path, scale: float) -> dict:
    category, size = "peach", (800, 800)
    images, masks = _encoded_images(size, ".png"), _encoded_masks(size)
    empty = _encoded_masks(size, value=0)
    xyz = cv2.imencode(".tiff", np.zeros((8, 8, 3), np.float32))[1].tobytes()  # never opened by prepare
    counts = dict(mvtec_3d.EXPECTED_COUNTS[category])
    defective = counts.pop("test/*")
    types = mvtec_3d.DEFECT_TYPES[category]
    counts.update({f"test/{t}": defective // len(types) + (k < defective % len(types)) for k, t in enumerate(types)})
    nbytes = 0
    for key, count in counts.items():
        split, defect = key.split("/")
        for i in range(_n(count, scale)):
            folder = root / category / split / defect
            nbytes += _write(folder / "rgb" / f"{i:03d}.png", images, i)
            _write(folder / "xyz" / f"{i:03d}.tiff", [xyz], i)
            if split == "test":
                nbytes += _write(folder / "gt" / f"{i:03d}.png", masks if defect != "good" else empty, i)
    return dict(category=category, image_size=size, format="png", bytes=nbytes)


def build_visa(root: Path, scale: float) -> dict:
    category, size = "candle", (1000, 1500)
    images, masks = _encoded_images(size, ".jpg"), _encoded_masks(size, value=1)
    counts = visa.EXPECTED_COUNTS[category]
    rows, nbytes = ["object,split,label,image,mask"], 0
    normal = [("train", i) for i in range(_n(counts["train/good"], scale))]
    normal += [("test", len(normal) + i) for i in range(_n(counts["test/good"], scale))]
    for split, i in normal:
        rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
        nbytes += _write(root / rel, images, i)
        rows.append(f"{category},{split},normal,{rel},")
    for i in range(_n(counts["test/anomaly"], scale)):
        rel, mask = f"{category}/Data/Images/Anomaly/{i:03d}.JPG", f"{category}/Data/Masks/Anomaly/{i:03d}.png"
        nbytes += _write(root / rel, images, i) + _write(root / mask, masks, i)
        rows.append(f"{category},test,anomaly,{rel},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return dict(category=category, image_size=size, format="jpg", bytes=nbytes)


def build_dagm(root: Path, scale: float) -> dict:
    category, size = "Class7", (512, 512)
    images, masks = _encoded_images(size, ".png", gray=True), _encoded_masks(size)
    counts = dagm.EXPECTED_COUNTS[category]
    n_good, n_bad = _n(counts["train/good"], scale), _n(counts[f"test/{dagm.DEFECT_TYPE}"], scale)
    nbytes = 0
    for split in ("Train", "Test"):  # both splits hold n_good defect-free and n_bad defective images
        lines = [category[len("Class"):]]
        for i in range(1, n_good + n_bad + 1):
            name = f"{i:04d}.PNG"
            nbytes += _write(root / category / split / name, images, i)
            if i <= n_good:
                lines.append(f"{i}\t0\t{name}\t0\t0")
            else:
                nbytes += _write(root / category / split / "Label" / f"{i:04d}_label.PNG", masks, i)
                lines.append(f"{i}\t1\t{name}\t0\t{i:04d}_label.PNG")
        (root / category / split / "Label").mkdir(parents=True, exist_ok=True)
        (root / category / split / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return dict(category=category, image_size=size, format="png (gray)", bytes=nbytes)


def build_folder(root: Path, scale: float) -> dict:
    """A user's folders: 1000 good 1024x1024 JPGs (one in 20 a WebP, converted), 100 defective
    JPGs in two subfolders with PNG masks in a parallel tree."""
    size = (1024, 1024)
    jpg, webp, masks = _encoded_images(size, ".jpg"), _encoded_images(size, ".webp"), _encoded_masks(size)
    nbytes = 0
    for i in range(_n(1000, scale)):
        nbytes += _write(root / "good" / (f"{i:04d}.webp" if i % 20 == 0 else f"{i:04d}.jpg"),
                         webp if i % 20 == 0 else jpg, i)
    for i in range(_n(100, scale)):
        kind = ("scratch", "dent")[i % 2]
        nbytes += _write(root / "defective" / kind / f"{i:04d}.jpg", jpg, i)
        nbytes += _write(root / "masks" / kind / f"{i:04d}_mask.png", masks, i)
    return dict(category="parts", image_size=size, format="jpg (+5% webp)", bytes=nbytes)


SOURCES = {
    "mvtec_ad": (build_mvtec_ad, lambda raw: dict(source_dir=raw)),
    "mvtec_loco": (build_mvtec_loco, lambda raw: dict(source_dir=raw)),
    "mvtec_3d": (build_mvtec_3d, lambda raw: dict(source_dir=raw)),
    "visa": (build_visa, lambda raw: dict(source_dir=raw)),
    "dagm": (build_dagm, lambda raw: dict(source_dir=raw)),
    "folder": (build_folder, lambda raw: dict(good_dir=raw / "good", defective_dir=raw / "defective",
                                              mask_dir=raw / "masks")),
}


# ----------------------------------------------------------------------------- measuring

def _current_rss_mb() -> float:
    """Resident memory now (Linux /proc), else the peak so far (ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _prepare_in_child(source: str, category: str, out: str, options: dict, queue) -> None:
    module = importlib.import_module(f"ad_models.data.sources.{source}")
    from ad_models.data.layout import validate_manifest

    before = _current_rss_mb()
    peak, done = [before], threading.Event()

    def sample() -> None:  # ru_maxrss also counts import-time peaks; this sees prepare alone
        while not done.wait(0.005):
            peak[0] = max(peak[0], _current_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    df = module.prepare(category, Path(out), progress=False, **options)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    start = time.perf_counter()
    validate_manifest(df)  # the same check prepare ends with: how much of its time is decoding everything
    validate_seconds = time.perf_counter() - start
    queue.put(dict(seconds=round(seconds, 3), validate_seconds=round(validate_seconds, 3), images=len(df),
                   masks=int((df["mask_path"] != "").sum()), rss_before_mb=round(before, 1),
                   rss_peak_mb=round(max(peak[0], _current_rss_mb()), 1),
                   ru_maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)))


def measure(source: str, category: str, out: Path, options: dict) -> dict:
    """prepare() in a fresh spawned process: its time and its own peak RSS."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_prepare_in_child, args=(source, category, str(out), options, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"prepare of {source} failed in the child process (exit code {child.exitcode})")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real image counts")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated subset of " + ",".join(SOURCES))
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the raw trees (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the raw trees and outputs")
    args = parser.parse_args()
    sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown or not 0 < args.scale <= 1:
        parser.error(f"unknown sources {unknown}" if unknown else "--scale must be in (0, 1]")

    workdir = Path(tempfile.mkdtemp(prefix="bench-restructure-", dir=args.workdir))
    rows = []
    try:
        for source in sources:
            build, options = SOURCES[source]
            raw, out = workdir / source / "raw", workdir / source / "out"
            start = time.perf_counter()
            info = build(raw, args.scale)
            build_seconds = time.perf_counter() - start
            result = measure(source, info["category"], out / info["category"], options(raw))
            rows.append(dict(source=source, **info, **result, build_seconds=round(build_seconds, 2)))
            row = rows[-1]
            print(f"{source:9s} {row['category']:9s} {row['images']:5d} images {row['bytes'] / 2**20:6.0f} MB "
                  f"{row['seconds']:7.2f} s (validation {row['validate_seconds']:5.2f} s) "
                  f"{row['images'] / row['seconds']:5.0f} img/s {row['bytes'] / 2**20 / row['seconds']:5.0f} MB/s  "
                  f"RSS {row['rss_before_mb']:4.0f} -> peak {row['rss_peak_mb']:4.0f} MB", flush=True)
            if not args.keep:
                shutil.rmtree(workdir / source, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report = dict(scale=args.scale, cpu_count=os.cpu_count(), python=platform.python_version(),
                  platform=platform.platform(), opencv=cv2.__version__, rows=rows)
    write_json(RESULTS, report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
