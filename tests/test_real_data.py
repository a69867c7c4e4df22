"""Real industrial data: PFM must beat the trivial baseline on the magnetic tile dataset."""
import pytest

from ad_models import runs
from ad_models.data.sources import prepare_category


@pytest.mark.slow
def test_pfm_beats_the_mean_image_baseline_on_magnetic_tile(shared_data, tmp_path):
    dataset = tmp_path / "tile"
    manifest = prepare_category("magnetic_tile", "tile", dataset, source_dir=shared_data / "magnetic_tile",
                                limit_per_kind=100)
    assert (manifest.label == 1).sum() >= 300
    results = {}
    for method, config in (("pfm", {"image_size": 128, "epochs": 20}), ("mean_image", {"image_size": 128})):
        runs.train(method, config, dataset, tmp_path / "models" / method, device="cpu", progress=False)
        results[method] = runs.evaluate(tmp_path / "models" / method, dataset, tmp_path / "eval" / method,
                                        device="cpu", progress=False)
    pfm, baseline = results["pfm"], results["mean_image"]
    print({m: {k: round(r[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")} for m, r in results.items()})
    assert pfm["image_auroc"] > baseline["image_auroc"] + 0.05
    assert pfm["aupro"] > baseline["aupro"] + 0.2
    assert pfm["image_auroc"] > 0.75
