"""The `dataset` asset: one category, restructured to MVTec layout + manifest under data/datasets/."""

import dagster as dg

from ad_models.data.sources import prepare_category
from pipelines.checks import check_dataset, dataset_check_specs
from pipelines.metadata import markdown_table
from pipelines.params import Params
from pipelines.partitions import category_partitions
from pipelines.resources import AdpipeResource


def build(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="dataset", group_name="data", partitions_def=category_partitions(params),
              check_specs=dataset_check_specs("dataset"), kinds={"pandas"},
              description="A dataset category in MVTec layout with its manifest (data/datasets/<dataset>/<category>).")
    def dataset(context: dg.AssetExecutionContext, adpipe: AdpipeResource) -> dg.MaterializeResult:
        p = adpipe.params
        category = context.partition_key
        source, name, options = p.source_of(category)
        options.setdefault("seed", p.seed)
        if source != "synthetic":
            options.setdefault("raw_dir", str(p.raw_dir / category.split("/")[0]))
        folder = p.dataset_dir(category)
        context.log.info(f"preparing {category} from source {source!r} into {folder}")
        manifest = prepare_category(source, name, folder, **options)
        table = manifest.groupby(["split", "defect_type"]).size().reset_index(name="images")
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(folder)), "images": len(manifest),
                      "train_good": int((manifest.split == "train").sum()),
                      "test_good": int(((manifest.split == "test") & (manifest.label == 0)).sum()),
                      "test_defective": int((manifest.label == 1).sum()),
                      "composition": markdown_table(["split", "defect type", "images"], table.values.tolist())},
            check_results=[check_dataset(folder)])

    return dataset
