"""The `model` asset: one method trained on one category (data/models/<method>/<dataset>/<category>)."""

import dagster as dg

from ad_models import runs
from ad_models.report import learning_curve_png
from pipelines.devices import Accelerator
from pipelines.execution import gpu_step_tags
from pipelines.metadata import markdown_table, png_markdown
from pipelines.params import Params
from pipelines.partitions import DATASET_OF_MODEL, model_partitions, split_model_key
from pipelines.resources import AdpipeResource


def loss_summary(losses: list[list[float]], columns: list[str] | None = None, rows: int = 8,
                 iterations_per_row: int | None = None) -> dg.MetadataValue:
    """A few evenly spaced rows of the loss curve (one column per term), first and last included.
    Rows are epochs, or, for methods that count iterations (SLSG), means over `iterations_per_row`."""
    step = max(1, (len(losses) - 1) // (rows - 1)) if len(losses) > 1 else 1
    picked = sorted(set(list(range(0, len(losses), step)) + [len(losses) - 1]))
    levels = len(losses[0]) if losses else 0
    columns = columns or [f"level {i + 1}" for i in range(levels)]
    unit, scale = ("iteration", iterations_per_row) if iterations_per_row else ("epoch", 1)
    return markdown_table([unit] + list(columns) + ["total"],
                          [[(e + 1) * scale] + list(losses[e]) + [sum(losses[e])] for e in picked])


def build(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="model", op_tags=gpu_step_tags(params),
              group_name="models", partitions_def=model_partitions(params),
              deps=[dg.AssetDep("dataset", partition_mapping=DATASET_OF_MODEL),
                    dg.AssetDep("defect_bank", partition_mapping=DATASET_OF_MODEL)], pool="gpu", kinds={"pytorch"},
              description="A trained model: weights, config (with weight provenance) and training log.")
    def model(context: dg.AssetExecutionContext, adpipe: AdpipeResource,
              accelerator: Accelerator) -> dg.MaterializeResult:
        p = adpipe.params
        category, method = split_model_key(context)
        folder = p.model_dir(method, category)
        context.log.info(f"training {method} on {category} (device {accelerator.torch_device}) into {folder}")
        log = runs.train(method, p.method_options(method, category), p.dataset_dir(category), folder,
                         bank_dir=p.bank_dir(category), device=accelerator.torch_device, progress=adpipe.progress,
                         budget=p.budget,
                         compile=p.execution["compile"] or None)
        metadata = {"path": dg.MetadataValue.path(str(folder)), "budget": p.budget,
                    "train_images": log["counts"]["train"],
                    "train_seconds": dg.MetadataValue.float(log["train_seconds"]),
                    "device": log.get("device", accelerator.torch_device),
                    "weights": dg.MetadataValue.json(log["provenance"])}
        if log.get("training_precision"):  # bf16 autocast or fp32: what the budget got on this machine
            metadata["training_precision"] = log["training_precision"]
        if log.get("loss_per_epoch"):
            metadata["final_loss"] = dg.MetadataValue.float(log["final_loss"])
            metadata["loss_curve"] = loss_summary(log["loss_per_epoch"], log.get("loss_columns"),
                                                  iterations_per_row=log.get("loss_every_iterations"))
        if log.get("checkpoint_selection"):
            metadata["checkpoint_selection"] = markdown_table(
                ["iteration" if log.get("loss_every_iterations") else "epoch", "bank image AUROC", "bank pixel AUROC"],
                [[s["epoch"], s["image_auroc"], s["pixel_auroc"]] for s in log["checkpoint_selection"]])
            metadata["selected_epoch"] = log["selected_epoch"]
        if log.get("loss_per_epoch") or log.get("checkpoint_selection"):
            metadata["learning_curve"] = png_markdown(
                learning_curve_png(runs.learning_curve(log), f"{method} on {category}"), "learning curve")
        return dg.MaterializeResult(metadata=metadata)

    return model
