"""Data assets: `raw_dataset` (a download or the user's archive/folder, verified and extracted under
data/raw/<dataset>), `ingested_goods` (new good images taken from a category's inbox,
data/incoming -> data/ingested) and `dataset` (one category, restructured to MVTec layout +
manifest under data/datasets/, with the ingested images in its training set)."""

import dagster as dg

from ad_models.data.ingest import (INGESTED_PREFIX, ensure_store, ingest, ingested_images, store_version,
                                  training_data_version)
from ad_models.data.layout import read_inputs_record
from ad_models.data.preview import sample_grid
from ad_models.data.sources import fetch_raw, prepare_category, raw_archive
from pipelines.checks import check_counts, check_dataset, check_inbox, dataset_check_specs, inbox_check_specs
from pipelines.execution import CPU_STEP
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

    @dg.asset(name="raw_dataset", op_tags=CPU_STEP,
              group_name="data", partitions_def=raw_partitions(params), kinds={"file"},
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


def build_ingested(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="ingested_goods", op_tags=CPU_STEP,
              group_name="data", partitions_def=category_partitions(params), kinds={"file"},
              check_specs=inbox_check_specs("ingested_goods"),
              description="New good images dropped into data/incoming/<dataset>/<category>/good/: each is checked "
                          "(decodes, channels, size, not a duplicate) and added to data/ingested/<dataset>/<category> "
                          "or moved to rejected/ beside the inbox with its reason. The inbox sensor runs it.")
    def ingested_goods(context: dg.AssetExecutionContext, adpipe: AdpipeResource) -> dg.MaterializeResult:
        p = adpipe.params
        category = context.partition_key
        inbox, rejected, store = p.ingest_folders(category)
        ensure_store(store)
        if not (p.dataset_dir(category) / "manifest.csv").is_file():
            # new images are checked against the prepared category (channels, duplicates): wait for it
            context.log.warning(f"{category} is not prepared yet: new files stay in {inbox} until it is")
            return dg.MaterializeResult(metadata={"inbox": dg.MetadataValue.path(str(inbox)), "added": 0,
                                                  "note": "dataset not prepared yet; files left in the inbox"},
                                        data_version=dg.DataVersion(store_version(store)),
                                        check_results=[check_inbox([], rejected)])
        result = ingest(inbox, store, rejected, p.dataset_dir(category), p.ingest_rules())
        context.log.info(f"{category}: {len(result.added)} added, {len(result.rejected)} rejected, "
                         f"{len(result.completed)} completed from an interrupted run, {len(result.skipped)} too new")
        total = len(ingested_images(store))
        metadata = {"inbox": dg.MetadataValue.path(str(inbox)), "store": dg.MetadataValue.path(str(store)),
                    "added": len(result.added), "rejected": len(result.rejected),
                    "completed_after_interruption": len(result.completed), "left_for_later": len(result.skipped),
                    "ingested_total": total}
        if result.added:
            metadata["added_files"] = markdown_table(["file", "stored as"], [list(a) for a in result.added[:50]])
        if result.rejected:
            metadata["rejected_files"] = markdown_table(["file", "reason"], [list(r) for r in result.rejected[:50]])
            metadata["rejected_folder"] = dg.MetadataValue.path(str(rejected))
        # the store's content is the data version: unchanged when nothing was added
        return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(store_version(store)),
                                    check_results=[check_inbox(result.rejected, rejected)])

    return ingested_goods


def build(params: Params) -> dg.AssetsDefinition:
    deps = [dg.AssetDep("ingested_goods")]
    if params.raw_datasets():
        deps.append(dg.AssetDep("raw_dataset", partition_mapping=raw_of_category(params)))

    @dg.asset(name="dataset", op_tags=CPU_STEP,
              group_name="data", partitions_def=category_partitions(params), deps=deps,
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
        manifest = prepare_category(source, name, folder, ingested_dir=p.ingest_folders(category).store, **options)
        ingested = manifest.path.str.contains(f"/train/good/{INGESTED_PREFIX}", regex=False)
        table = manifest.groupby(["split", "defect_type"], sort=False).size().reset_index(name="images")
        _, size = _folder_summary(folder)
        version = training_data_version(folder)  # changes exactly when the training images change
        inputs = read_inputs_record(folder)  # the user's own files, which no published checksum pins
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={"path": dg.MetadataValue.path(str(folder)), "images": len(manifest),
                      **({"inputs_sha256": inputs["sha256"][:16], "inputs_files": inputs["files"]} if inputs else {}),
                      "training_data_version": version[:16],
                      "train_good": int((manifest.split == "train").sum()),
                      "train_good_ingested": int(ingested.sum()),
                      "validation_good": int((manifest.split == "validation").sum()),
                      "test_good": int(((manifest.split == "test") & (manifest.label == 0)).sum()),
                      "test_defective": int((manifest.label == 1).sum()),
                      "megabytes": dg.MetadataValue.float(size / 2**20),
                      "composition": markdown_table(["split", "defect type", "images"], table.values.tolist()),
                      "samples": image_preview(sample_grid(manifest), "samples")},
            # the published counts are the source's: the ingested images come on top of them
            check_results=[check_dataset(folder), check_counts(source, name, manifest[~ingested])])

    return dataset
