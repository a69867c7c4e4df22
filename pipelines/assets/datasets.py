"""Data assets: `raw_dataset` (a download or the user's archive/folder, verified and extracted under
data/raw/<dataset>) and `dataset` (one category, restructured to MVTec layout + manifest under
data/datasets/)."""

import dagster as dg

from ad_models.data.preview import sample_grid
from ad_models.data.sources import fetch_raw, prepare_category, raw_archive
from pipelines.checks import check_counts, check_dataset, dataset_check_specs
from pipelines.metadata import image_preview, markdown_table
from pipelines.params import Params
from pipelines.partitions import category_partitions, raw_of_category, raw_partitions
from pipelines.resources import AdpipeResource


def _folder_summary(folder) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def build_raw(params: Params) -> dg.AssetsDefinition | None:
    if not params.raw_datasets():
        return None

    @dg.asset(name="raw_dataset", group_name="data", partitions_def=raw_partitions(params), kinds={"file"},
              description="A dataset as published: downloaded (resumable, checksum-verified) or taken from the "
                          "user's archive or folder, and extracted safely (data/raw/<dataset>).")
    def raw_dataset(context: dg.AssetExecutionContext, adpipe: AdpipeResource) -> dg.MaterializeResult:
        p = adpipe.params
        dataset = context.partition_key
        source, options = p.dataset_source(dataset)
        raw_dir = p.raw_dir(dataset)
        context.log.info(f"fetching {dataset} (source {source!r}) into {raw_dir}")
        folder = fetch_raw(source, raw_dir, options, progress=adpipe.progress)
        files, size = _folder_summary(folder)
        archive = raw_archive(source, options)
        top = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        metadata = {"path": dg.MetadataValue.path(str(folder)), "files": files,
                    "gigabytes": dg.MetadataValue.float(size / 2**30),
                    "top_level": dg.MetadataValue.md("\n".join(f"- `{name}`" for name in top[:30]))}
        if options.get("source_dir"):
            metadata["origin"] = f"user folder {options['source_dir']}"
        elif archive is not None:
            metadata["origin"] = options.get("archive") or archive.url
            metadata["verified_checksum"] = (f"sha256 {archive.sha256}" if archive.sha256 else
                                             f"md5 {archive.md5}" if archive.md5 else "none published")
        return dg.MaterializeResult(metadata=metadata)

    return raw_dataset


def build(params: Params) -> dg.AssetsDefinition:
    deps = []
    if params.raw_datasets():
        deps = [dg.AssetDep("raw_dataset", partition_mapping=raw_of_category(params))]

    @dg.asset(name="dataset", group_name="data", partitions_def=category_partitions(params), deps=deps,
              check_specs=dataset_check_specs("dataset"), kinds={"pandas"},
              description="A dataset category in MVTec layout with its manifest (data/datasets/<dataset>/<category>).")
    def dataset(context: dg.AssetExecutionContext, adpipe: AdpipeResource) -> dg.MaterializeResult:
        p = adpipe.params
        category = context.partition_key
        source, name, options = p.source_of(category)
        options.setdefault("seed", p.seed)
        if source != "synthetic":
            options["raw_dir"] = str(p.raw_dir(category.split("/", 1)[0]))
            options.setdefault("progress", adpipe.progress)
        folder = p.dataset_dir(category)
        context.log.info(f"preparing {category} from source {source!r} into {folder}")
        manifest = prepare_category(source, name, folder, **options)
        table = manifest.groupby(["split", "defect_type"], sort=False).size().reset_index(name="images")
        _, size = _folder_summary(folder)
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(folder)), "images": len(manifest),
                      "train_good": int((manifest.split == "train").sum()),
                      "validation_good": int((manifest.split == "validation").sum()),
                      "test_good": int(((manifest.split == "test") & (manifest.label == 0)).sum()),
                      "test_defective": int((manifest.label == 1).sum()),
                      "megabytes": dg.MetadataValue.float(size / 2**20),
                      "composition": markdown_table(["split", "defect type", "images"], table.values.tolist()),
                      "samples": image_preview(sample_grid(manifest), "samples")},
            check_results=[check_dataset(folder), check_counts(source, name, manifest)])

    return dataset
