"""Throughput of DefectSynthesizer: images/s per blend mode and mask kind, procedural source.

    python bench/bench_defects.py [--size 256] [--batch 8] [--seconds 3] [--devices cpu cuda]

Every image gets a defect (p_defect = 1), so the figures are the full cost of synthesis. Each
configuration is warmed up, then run for about `--seconds`; CUDA timings synchronise the device.
Prints a table and writes bench/results/defects.json.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ad_models.defects import DefectConfig, DefectSynthesizer  # noqa: E402
from ad_models.io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS = {  # name -> DefectConfig values
    "replace/perlin": {"blend": "replace", "masks": {"perlin": 1.0}},
    "replace/rectangle": {"blend": "replace", "masks": {"rectangle": 1.0}},
    "replace/stroke": {"blend": "replace", "masks": {"stroke": 1.0}},
    "beta/perlin": {"blend": "beta", "masks": {"perlin": 1.0}},
    "beta/rectangle": {"blend": "beta", "masks": {"rectangle": 1.0}},
    "beta/stroke": {"blend": "beta", "masks": {"stroke": 1.0}},
    "cutpaste": {"blend": "cutpaste", "source": "self"},
    "cutpaste_scar": {"blend": "cutpaste_scar", "source": "self"},
    "replace/perlin+foreground": {"blend": "replace", "masks": {"perlin": 1.0}, "foreground": True},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(synth: DefectSynthesizer, images: torch.Tensor, seconds: float) -> tuple[float, float, int]:
    """(images/s, mean mask coverage, batches timed)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up: allocator, kernels, caches
        synth(images, generator)
    sync(images.device)
    batches, coverage, start = 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds or batches < 3:
        _, masks = synth(images, generator)
        coverage += float(masks.mean())
        batches += 1
    sync(images.device)
    elapsed = time.perf_counter() - start
    return batches * len(images) / elapsed, coverage / batches, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per configuration and device")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--out", default=str(RESULTS / "defects.json"))
    args = parser.parse_args()

    # smooth random images: a stand-in for real ones (synthesis cost does not depend on content)
    coarse = torch.rand((args.batch, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    images = torch.nn.functional.interpolate(coarse, size=(args.size, args.size), mode="bilinear",
                                             align_corners=False)
    info = {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "size": args.size, "batch": args.batch, "source": "procedural"}
    print(f"# {info['processor']}, torch {info['torch']}, {info['threads']} threads, "
          f"{args.size}x{args.size}, batch {args.batch}, procedural source, p_defect 1")
    print(f"{'configuration':28} {'device':7} {'img/s':>8} {'ms/batch':>9} {'mask %':>7}")
    rows = []
    for device_name in args.devices:
        device = torch.device(device_name)
        batch = images.to(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
        for name, values in CONFIGS.items():
            synth = DefectSynthesizer(DefectConfig.from_dict({**values, "p_defect": 1.0}))
            rate, coverage, batches = throughput(synth, batch, args.seconds)
            rows.append({"configuration": name, "device": device_name, "images_per_s": rate,
                         "ms_per_batch": 1000 * args.batch / rate, "mask_fraction": coverage,
                         "batches": batches, "config": synth.config.to_dict()})
            print(f"{name:28} {device_name:7} {rate:8.1f} {1000 * args.batch / rate:9.1f} {100 * coverage:7.2f}",
                  flush=True)
    write_json(args.out, {"info": info, "rows": rows})
    print(f"# written to {args.out}")


if __name__ == "__main__":
    main()
