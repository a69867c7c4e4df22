"""The resize policies on elongated and large parts: image AUROC, pixel AUROC and ms per image.

The part: a built-in synthetic category with every image and mask tiled `--tiles` times vertically
(a 1 : 3 part by default), so squashing it to a square shrinks its defects by that factor in height;
with `--magnetic-tile`, also that real dataset (images of 114-617 px a side, thin cracks).
Each policy trains the same method (`--method`, default pfm) with the same settings: stretch and
keep_aspect at `--size`, keep_aspect at the part's own aspect ([tiles x size, size]: no padding at
all; synthetic only), and tiles of `--size` at the images' own resolution.

    python bench/bench_resize.py --category fabric --size 64 --epochs 10
    python bench/bench_resize.py --size 128 --magnetic-tile ../shared/data/magnetic_tile --limit-per-kind 60
    python bench/bench_resize.py --size 128 --runs tiles@128 stretch@256   # tiles against stretch at equal pixels

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


def tall_category(out: Path, category: str, size: int, tiles: int, n_train: int, n_test: int,
                  seed: int = 0) -> Path:
    prepare_category("synthetic", category, out, n_train=n_train, n_test_good=n_test, n_test_defect=n_test,
                     size=size, seed=seed)
    manifest = read_manifest(out)
    for path in list(manifest.path) + [p for p in manifest.mask_path if p]:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), np.concatenate([image] * tiles, axis=0))
    return out


def parse_run(text: str) -> tuple[str, int | list[int]]:
    """"tiles@128" -> ("tiles", 128); "keep_aspect@384x128" -> ("keep_aspect", [384, 128])."""
    policy, _, size = text.partition("@")
    sides = [int(side) for side in size.split("x")] if size else []
    if len(sides) not in (1, 2):
        raise SystemExit(f"--runs {text!r}: expected POLICY@SIZE or POLICY@HEIGHTxWIDTH, e.g. stretch@256")
    return policy, sides[0] if len(sides) == 1 else sides


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
    parser.add_argument("--seed", type=int, default=None,
                        help="another draw: the synthetic part's images and the method's seed (default: 0 and "
                             "the method's own)")
    parser.add_argument("--magnetic-tile", help="folder of the magnetic tile dataset (MT_* folders)")
    parser.add_argument("--limit-per-kind", type=int, default=None, help="magnetic tile subset size")
    parser.add_argument("--bank-size", type=int, default=256, help="bank image size for magnetic tile "
                        "(stretch, keep_aspect; tiles keeps the images' own size)")
    parser.add_argument("--runs", nargs="*", metavar="POLICY@SIZE",
                        help="which runs, e.g. stretch@256 tiles@128 keep_aspect@384x128 (default: stretch, "
                             "keep_aspect and tiles at --size, and keep_aspect at the part's own aspect)")
    args = parser.parse_args()
    torch.manual_seed(0)
    size, tall = args.size, [args.tiles * args.size, args.size]
    chosen = [parse_run(run) for run in args.runs or []]
    print(f"{args.method}, {args.epochs} epochs, {torch.get_num_threads()} threads; synthetic/{args.category} "
          f"tiled {args.tiles}x vertically ({args.tiles * args.size} x {args.size} px)")
    print(f"{'dataset':<20} {'resize':<12} {'image_size':<12} {'image AUROC':>11} {'pixel AUROC':>11} {'ms/image':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datasets = [(f"synthetic/{args.category}", args.tiles * args.size,
                     chosen or [("stretch", size), ("keep_aspect", size), ("keep_aspect", tall), ("tiles", size)],
                     tall_category(root / args.category, args.category, args.size, args.tiles, args.n_train,
                                   args.n_test, args.seed or 0))]
        if args.magnetic_tile:
            tile_dir = root / "magnetic_tile"
            prepare_category("magnetic_tile", "tile", tile_dir, source_dir=args.magnetic_tile,
                             limit_per_kind=args.limit_per_kind)
            datasets.append(("magnetic_tile/tile", args.bank_size,
                             chosen or [("stretch", size), ("keep_aspect", size), ("tiles", size)], tile_dir))
        for name, bank_size, runs_to_do, dataset in datasets:
            for resize, image_size in runs_to_do:
                tag = f"{dataset.name}_{resize}_{'x'.join(map(str, image_size)) if isinstance(image_size, list) else image_size}"
                bank = root / f"bank_{dataset.name}_{resize}"
                if not bank.exists():
                    build_bank(dataset, bank, {"image_size": bank_size, "resize": resize, "min_holdout": 4},
                               progress=False)
                config = {"epochs": args.epochs, **({} if args.seed is None else {"seed": args.seed}),
                          **args.method_config, "image_size": image_size, "resize": resize}
                runs.train(args.method, config, dataset, root / f"model_{tag}", bank_dir=bank, device="cpu",
                           progress=False)
                result = runs.evaluate(root / f"model_{tag}", dataset, root / f"eval_{tag}", bank_dir=bank,
                                       device="cpu", progress=False)
                print(f"{name:<20} {resize:<12} {str(image_size):<12} {result['image_auroc']:>11.3f} "
                      f"{result['pixel_auroc']:>11.3f} {result['inference_ms_per_image']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
