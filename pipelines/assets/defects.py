"""The `defect_bank` asset: the synthetic validation bank of one category (data/defects/<category>):
held-out good training images and artificial defects on them, for calibration and model selection."""

import cv2
import dagster as dg
import numpy as np

from ad_models.defects.bank import bank_info, bank_preview, build_bank
from pipelines.execution import CPU_STEP
from pipelines.metadata import image_preview, markdown_table
from pipelines.params import Params
from pipelines.partitions import category_partitions
from pipelines.resources import AdpipeResource


def build(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="defect_bank", op_tags=CPU_STEP,
              group_name="data", partitions_def=category_partitions(params), deps=["dataset"],
              kinds={"pytorch"},
              description="Held-out good training images plus seeded artificial defects with masks: every "
                          "method's thresholds and checkpoints are chosen here, never on the test set.")
    def defect_bank(context: dg.AssetExecutionContext, adpipe: AdpipeResource) -> dg.MaterializeResult:
        p = adpipe.params
        category = context.partition_key
        folder = p.bank_dir(category)
        options = p.bank_config(category)
        context.log.info(f"building the defect bank of {category} into {folder} ({options})")
        manifest = build_bank(p.dataset_dir(category), folder, options, progress=adpipe.progress)
        counts = bank_info(folder)["counts"]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(folder)),
            "held_out_good": counts["held_out_good"],
            "train_remaining": counts["train_remaining"],
            "defective": counts["defective"],
            "per_variant": markdown_table(["defect variant", "images"], [[k, v] for k, v in counts["per_variant"].items()]),
            "mask_coverage_mean": dg.MetadataValue.float(_mask_coverage(manifest)),
            "preview": image_preview(bank_preview(manifest), "defect bank: image | mask | overlay")})

    return defect_bank


def _mask_coverage(manifest) -> float:
    """Mean share of pixels a synthetic defect covers: a quick sanity figure for the UI."""
    masks = [cv2.imread(m, cv2.IMREAD_GRAYSCALE) for m in manifest.mask_path if m]
    return float(np.mean([(m > 127).mean() for m in masks])) if masks else 0.0
