"""Stretch vs keep_aspect on an elongated part: image AUROC, pixel AUROC and ms per image.

The part: a built-in synthetic category with every image and mask tiled `--tiles` times vertically
(a 1 : 3 part by default), so squashing it to a square shrinks its defects by that factor in height.
Each policy trains the same method (`--method`, default pfm) with the same settings; keep_aspect
is also run at an input of the part's own aspect ([tiles x size, size]: no padding at all).

    python bench/bench_resize.py --category fabric --size 64 --epochs 10

Figures are printed as a table; nothing is written outside a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from ad_models import runs
from ad_models.data.layout import read_manifest
from ad_models.data.sources import prepare_category
from ad_models.defects.bank import build_bank


def tall_category(out: Path, category: str, size: int, tiles: int, n_train: int, n_test: int) -> Path:
    prepare_category("synthetic", category, out, n_train=n_train, n_test_good=n_test, n_test_defect=n_test,
                     size=size, seed=0)
    manifest = read_manifest(out)
    for path in list(manifest.path) + [p for p in manifest.mask_path if p]:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), np.concatenate([image] * tiles, axis=0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="fabric")
    parser.add_argument("--method", default="pfm")
    parser.add_argument("--size", type=int, default=64, help="model input side (and the synthetic tile's size)")
    parser.add_argument("--tiles", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=30)
    parser.add_argument("--n-test", type=int, default=15, help="good and defective test images each")
    parser.add_argument("--method-config", type=json.loads, default={})
    args = parser.parse_args()
    torch.manual_seed(0)
    size, tall = args.size, [args.tiles * args.size, args.size]
    runs_to_do = [("stretch", size), ("keep_aspect", size), ("keep_aspect", tall)]
    print(f"{args.method} on synthetic/{args.category} tiled {args.tiles}x vertically "
          f"({args.tiles * args.size} x {args.size} px), {args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"{'resize':<12} {'image_size':<12} {'image AUROC':>11} {'pixel AUROC':>11} {'ms/image':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = tall_category(root / args.category, args.category, args.size, args.tiles, args.n_train, args.n_test)
        for resize, image_size in runs_to_do:
            tag = f"{resize}_{image_size if isinstance(image_size, int) else 'x'.join(map(str, image_size))}"
            bank = root / f"bank_{resize}"
            if not bank.exists():
                build_bank(dataset, bank, {"image_size": args.tiles * args.size, "resize": resize,
                                           "min_holdout": 4}, progress=False)
            config = {"epochs": args.epochs, **args.method_config, "image_size": image_size, "resize": resize}
            runs.train(args.method, config, dataset, root / f"model_{tag}", bank_dir=bank, device="cpu",
                       progress=False)
            result = runs.evaluate(root / f"model_{tag}", dataset, root / f"eval_{tag}", bank_dir=bank,
                                   device="cpu", progress=False)
            print(f"{resize:<12} {str(image_size):<12} {result['image_auroc']:>11.3f} "
                  f"{result['pixel_auroc']:>11.3f} {result['inference_ms_per_image']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
