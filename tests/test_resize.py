"""Input geometry: `image_size` as [height, width] and the `resize` policy (stretch, keep_aspect, tiles)."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from ad_models import runs
from ad_models.data.layout import read_manifest
from ad_models.data.loading import (TILE_OVERLAP, ImageDataset, content_box, content_mask, cut_tile, fit_image,
                                    image_shape, read_rgb, resize_rgb, restore_map, stitch_tiles, tile_grid)
from ad_models.data.sources import prepare_category
from ad_models.defects.bank import build_bank, read_bank
from ad_models.deploy import promote
from ad_models.methods import create_method, load_method
from ad_models.methods.base import top_k_mean
from ad_models.methods.esad import ESADConfig
from ad_models.methods.ndpnet import NDPNetConfig
from ad_models.predict import predict_images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_size_is_an_int_or_a_height_width_pair():
    assert image_shape(64) == (64, 64)
    assert image_shape([48, 32]) == (48, 32)
    for wrong in ([0, 32], [32], [16, 16, 16], "64", 2.5, True):
        with pytest.raises(ValueError, match="height, width"):
            image_shape(wrong)


def test_a_side_that_is_not_the_methods_multiple_names_method_option_and_nearest_sizes():
    with pytest.raises(ValueError, match=r"esad: image_size \[64, 40\] must be a multiple of 16.*"
                                         r"width 40: nearest valid 32 or 48"):
        ESADConfig(image_size=[64, 40])
    with pytest.raises(ValueError, match=r"ndpnet: image_size 100 must be a multiple of 64.*height 100.*"
                                         r"width 100: nearest valid 64 or 128"):
        NDPNetConfig(image_size=100)
    with pytest.raises(ValueError, match=r"pfm: image_size \[100, 64\] must be a multiple of 16 .*stride"):
        create_method("pfm", {"image_size": [100, 64]})
    with pytest.raises(ValueError, match="mean_image: resize must be one of"):
        create_method("mean_image", {"resize": "crop"})


@pytest.mark.parametrize("name, size", [("mean_image", [24, 8]), ("pfm", [48, 16]), ("esad", [32, 16]),
                                        ("slsg", [32, 16]), ("bvpn", [64, 32]), ("ndpnet", [128, 64])])
def test_every_method_takes_a_pair_and_returns_maps_at_the_input_size(name, size):
    method = create_method(name, {"image_size": size, **({"logical": False} if name == "bvpn" else {})})
    assert method.config.image_size == tuple(size)
    images = torch.rand(2, 3, *size)
    scores, maps = method.predict(images)
    assert scores.shape == (2,) and maps.shape == (2, *size)


def test_a_pair_survives_the_config_json_round_trip_and_an_int_stays_an_int(tmp_path):
    for size in ([24, 8], 16):
        method = create_method("mean_image", {"image_size": size, "resize": "keep_aspect"})
        loaded = load_method(method.save(tmp_path / str(size)), "cpu")
        assert loaded.config.image_size == (tuple(size) if isinstance(size, list) else size)
        assert loaded.config.resize == "keep_aspect"


def test_keep_aspect_keeps_the_aspect_and_fills_the_rest_with_a_reflected_border():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 255, (30, 90, 3), dtype=np.uint8)  # 1 : 3
    fitted, box = fit_image(wide, 32, "keep_aspect")
    top, left, h, w = box
    assert fitted.shape == (32, 32, 3) and (left, w) == (0, 32) and h == 11 and top == (32 - h) // 2
    assert np.array_equal(fitted[top:top + h], resize_rgb(wide, (h, w)))
    assert np.array_equal(fitted[top - 1], fitted[top]) and np.array_equal(fitted[top + h], fitted[top + h - 1])
    valid = content_mask(torch.tensor([box]), 32)[0]
    assert int(valid.sum()) == h * w and valid[top:top + h].all()

    stretched, full = fit_image(wide, [16, 48], "stretch")
    assert full == (0, 0, 16, 48) and np.array_equal(stretched, resize_rgb(wide, [16, 48]))
    assert content_box(30, 90, [10, 30], "keep_aspect") == (0, 0, 10, 30)  # same aspect: no padding


def test_maps_come_back_at_the_original_size_without_the_padding():
    amap = np.zeros((32, 32), np.float32)
    amap[:8] = 5.0  # padding above the content
    box = content_box(30, 90, 32, "keep_aspect")
    restored = restore_map(amap, box, 30, 90)
    assert restored.shape == (30, 90) and restored.max() == 0.0
    assert np.array_equal(restore_map(amap, (0, 0, 32, 32), 32, 32), amap)


def test_image_scores_ignore_padding():
    maps = torch.zeros(2, 8, 8)
    maps[:, 0, 0] = 9.0  # a high value in the padding
    maps[:, 4, 4] = 1.0
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, 2:6] = True
    assert top_k_mean(maps, 1).tolist() == [9.0, 9.0]
    assert top_k_mean(maps, 1, valid).tolist() == [1.0, 1.0]
    assert top_k_mean(maps, 100, valid).tolist() == pytest.approx([1 / 32, 1 / 32])  # k capped at the content
    method = create_method("mean_image", {"image_size": [8, 8]})
    images = torch.zeros(1, 3, 8, 8)
    images[..., 0, 0] = 1.0
    assert method.predict(images)[0].item() > 1.0
    assert method.predict(images, valid[:1])[0].item() == 0.0


@pytest.fixture
def tall_category(tmp_path):
    """The synthetic fabric category with every image and mask tiled three times vertically (96 x 32):
    an elongated part."""
    dataset = tmp_path / "fabric_tall"
    prepare_category("synthetic", "fabric", dataset, n_train=8, n_test_good=3, n_test_defect=3, size=32, seed=0)
    manifest = read_manifest(dataset)
    for path in list(manifest.path) + [p for p in manifest.mask_path if p]:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), np.concatenate([image] * 3, axis=0))
    return dataset


def test_stretch_reads_images_exactly_as_before(tall_category):
    rows = read_manifest(tall_category)
    item = ImageDataset(rows, 32)[0]
    expected = resize_rgb(read_rgb(rows.path[0]), 32)
    assert torch.equal(item["image"], torch.from_numpy(expected).permute(2, 0, 1).float().div_(255.0))
    assert item["box"].tolist() == [0, 0, 32, 32]
    method = create_method("mean_image", {"image_size": 32})
    method.fit(ImageDataset(rows[rows.split == "train"], 32))
    test = ImageDataset(rows[rows.split == "test"].reset_index(drop=True), 32)
    pred = method.predict_dataset(test, progress=False)
    scores, maps = method.predict(torch.stack([test[i]["image"] for i in range(len(test))]))
    assert np.array_equal(pred["scores"], scores.numpy()) and np.array_equal(pred["maps"], maps.numpy())


@pytest.mark.parametrize("resize", ["stretch", "keep_aspect", "tiles"])
def test_a_tall_part_trains_evaluates_and_predicts_under_each_policy(tall_category, tmp_path, resize):
    bank = tmp_path / "bank"
    build_bank(tall_category, bank, {"image_size": 96 if resize != "tiles" else 48, "min_holdout": 2,
                                     "defects_per_image": 1, "resize": resize}, progress=False)
    bank_rows, _ = read_bank(bank)
    bank_image = read_rgb(bank_rows.path[0])
    assert bank_image.shape[:2] == ((96, 96) if resize == "stretch" else (96, 32))  # tiles: the image's own size

    config = {"image_size": 32, "epochs": 1, "batch_size": 4, "resize": resize}
    runs.train("pfm", config, tall_category, tmp_path / "model", bank_dir=bank, device="cpu", progress=False)
    model = load_method(tmp_path / "model", "cpu")
    assert model.config.resize == resize
    result = runs.evaluate(tmp_path / "model", tall_category, tmp_path / "eval", bank_dir=bank, device="cpu",
                           progress=False)
    assert np.isfinite([result["image_auroc"], result["pixel_auroc"]]).all()

    test_rows = read_manifest(tall_category).query("split == 'test'").reset_index(drop=True)
    pred = model.predict_dataset(model.image_dataset(test_rows), progress=False)
    frame = (96, 32) if resize == "tiles" else (32, 32)  # tiles: every pixel at its own resolution
    assert pred["maps"].shape == pred["masks"].shape == (len(test_rows), *frame)

    promote(tmp_path / "model", tmp_path / "deployed", bank, tall_category, device="cpu")
    table = predict_images(tmp_path / "deployed", list(test_rows.path[:2]), tmp_path / "out", device="cpu")
    for name in table["mask"]:
        assert cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_GRAYSCALE).shape == (96, 32)
    # the scores predict writes are the ones the model gives the same images in evaluation
    np.testing.assert_allclose(table["score"], pred["scores"][:2], rtol=1e-5)
    if resize == "keep_aspect":  # the part fills the input's height, the rest is padding
        assert model.image_dataset(test_rows)[0]["box"].tolist() == [0, 10, 32, 11]


def test_evaluation_compares_maps_in_one_frame_under_both_policies(tall_category):
    rows = read_manifest(tall_category).query("split == 'test'").reset_index(drop=True)
    stretch = ImageDataset(rows, [48, 16])
    kept = stretch.with_resize("keep_aspect")
    assert kept.resize == "keep_aspect" and stretch.resize == "stretch"
    assert torch.equal(stretch[3]["mask"], kept[3]["mask"])
    assert kept[3]["box"].tolist() == [0, 0, 48, 16]  # the pair fits the part: no padding at all
    assert pd.Series(rows.label).sum() == 3


def test_tiles_cover_the_image_with_overlap_and_stitch_back_exactly():
    boxes = tile_grid(96, 40, 32)
    starts = sorted({top for top, _, _, _ in boxes})
    assert starts[0] == 0 and starts[-1] + 32 == 96 and sorted({left for _, left, _, _ in boxes}) == [0, 8]
    assert all(b - a <= 32 * (1 - TILE_OVERLAP) for a, b in zip(starts, starts[1:]))  # neighbours overlap
    # a map cut into the tiles and stitched back is the map itself (means of equal values in overlaps)
    full = np.random.default_rng(0).random((96, 40)).astype(np.float32)
    tiles = np.stack([full[t:t + h, l:l + w] for t, l, h, w in boxes])
    assert np.array_equal(stitch_tiles(tiles, boxes, 96, 40), full)
    # an image smaller than a tile: one tile, the rest a reflected border that is cut off again
    assert tile_grid(20, 50, 32) == [(0, 0, 20, 32), (0, 18, 20, 32)]
    small = np.arange(20 * 50 * 3, dtype=np.uint8).reshape(20, 50, 3)
    tile, box = cut_tile(small, (0, 0, 20, 32), 32)
    assert tile.shape == (32, 32, 3) and box == (0, 0, 20, 32) and np.array_equal(tile[:20], small[:, :32])
    maps = np.stack([np.full((32, 32), 1.0), np.full((32, 32), 3.0)])
    stitched = stitch_tiles(maps, tile_grid(20, 50, 32), 20, 50)
    assert stitched.shape == (20, 50) and stitched[0, 0] == 1 and stitched[0, 49] == 3 and stitched[0, 25] == 2


def test_tile_items_carry_their_part_of_the_mask(tall_category):
    rows = read_manifest(tall_category).query("split == 'test'").reset_index(drop=True)
    data = ImageDataset(rows, 32, "tiles")
    assert len(data) == len(rows) * 4  # 96 px high: 4 overlapping tiles of 32; 32 wide: 1
    defective = next(i for i, row in rows.iterrows() if row.label == 1)
    image = read_rgb(rows.path[defective])
    items = [data[k] for k, (i, _) in enumerate(data.tiles) if i == defective]
    for item, (top, left, h, w) in zip(items, tile_grid(96, 32, 32)):
        expected = torch.from_numpy(image[top:top + h, left:left + w]).permute(2, 0, 1).float() / 255
        assert torch.equal(item["image"], expected) and item["label"] == int(item["mask"].any())
    assert any(item["label"] == 1 for item in items)
    assert data.with_resize("stretch").tiles is None and len(ImageDataset(rows, 32).with_resize("tiles")) == len(data)


def test_tiles_compare_images_of_other_sizes_in_the_median_frame(tall_category):
    rows = read_manifest(tall_category).query("split == 'test'").reset_index(drop=True)
    defective = int(rows.index[rows.label == 1][0])
    for path in (rows.path[defective], rows.mask_path[defective]):  # one part 2/3 as high
        cv2.imwrite(str(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:64])
    method = create_method("mean_image", {"image_size": 32, "resize": "tiles"})
    method.fit(ImageDataset(read_manifest(tall_category).query("split == 'train'"), 32, "tiles"))
    data = method.image_dataset(rows)
    assert data.frame == (96, 32) and len(data) == (len(rows) - 1) * 4 + 3
    pred = method.predict_dataset(data, progress=False)
    assert pred["maps"].shape == pred["masks"].shape == (len(rows), 96, 32)
    # the short part's mask stretched to the frame, its map likewise
    assert pred["masks"][defective].any() and pred["labels"][defective] == 1
    short = read_rgb(rows.path[defective])
    short_map = method.predict_images([short])[1][0]
    assert short_map.shape == (64, 32) and pred["scores"][defective] == pytest.approx(highest_tile_score(method, short))


def highest_tile_score(method, image: np.ndarray) -> float:
    """The image score under `tiles`, the slow way: the method's own score of each tile, the largest."""
    boxes = tile_grid(*image.shape[:2], method.config.image_size)
    assert all(h == w == method.config.image_size for _, _, h, w in boxes)  # whole tiles: no padding to mask
    tiles = torch.stack([torch.from_numpy(image[t:t + h, l:l + w]).permute(2, 0, 1) for t, l, h, w in boxes])
    return float(method.predict(tiles.float() / 255)[0].max())


def test_tiles_score_an_image_by_its_highest_tile_score_with_the_methods_own_top_k(tall_category):
    """PFM's score_top_k holds under tiles: the image score is the top-k mean of its worst tile,
    not the maximum of the stitched map."""
    train = read_manifest(tall_category).query("split == 'train'")
    method = create_method("pfm", {"image_size": 32, "resize": "tiles", "epochs": 1, "batch_size": 4,
                                   "score_top_k": 1024})  # 16 of a 32 x 32 tile's pixels
    method.fit(ImageDataset(train, 32, "tiles"), device="cpu", progress=False)
    image = read_rgb(read_manifest(tall_category).query("split == 'test' and label == 1").path.iloc[0])
    scores, maps = method.predict_images([image])
    assert maps[0].shape == image.shape[:2] == (96, 32)
    assert scores[0] == pytest.approx(highest_tile_score(method, image), rel=1e-5)
    assert scores[0] < maps[0].max() - 1e-6  # a mean of 16 values, below the largest
