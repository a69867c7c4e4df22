"""The `evaluation` asset: a trained model scored on its category's test set (data/eval/...)."""

import dagster as dg

from ad_models import runs
from pipelines.checks import check_evaluation, check_false_alarms, evaluation_check_specs
from pipelines.devices import Accelerator
from pipelines.execution import gpu_step_tags
from pipelines.metadata import floats, markdown_table, png_preview
from pipelines.params import Params
from pipelines.partitions import DATASET_OF_MODEL, model_partitions, split_model_key
from pipelines.resources import AdpipeResource

HEADLINE = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_at_threshold", "good_pass_rate_at_threshold",
            "expected_false_alarm_rate", "false_alarm_rate_bound", "bank_recall", "image_threshold", "pixel_threshold",
            "inference_ms_per_image"]


def build(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="evaluation", op_tags=gpu_step_tags(params),
              group_name="evaluation", partitions_def=model_partitions(params),
              deps=["model", dg.AssetDep("dataset", partition_mapping=DATASET_OF_MODEL),
                    dg.AssetDep("defect_bank", partition_mapping=DATASET_OF_MODEL)], pool="gpu",
              check_specs=evaluation_check_specs("evaluation"),
              description="Thresholds set by the decision policy on the defect bank, test-set metrics and "
                          "decisions at them, per-image scores, ROC curve and an anomaly-map gallery.")
    def evaluation(context: dg.AssetExecutionContext, adpipe: AdpipeResource,
                   accelerator: Accelerator) -> dg.MaterializeResult:
        p = adpipe.params
        category, method = split_model_key(context)
        folder = p.eval_dir(method, category)
        result = runs.evaluate(p.model_dir(method, category), p.dataset_dir(category), folder,
                               bank_dir=p.bank_dir(category), policy=p.decision_policy(category),
                               device=accelerator.torch_device, batch_size=int(p.evaluation.get("batch_size", 8)),
                               gallery_size=int(p.evaluation.get("gallery_size", 6)), progress=adpipe.progress)
        per_defect = result["image_auroc_per_defect_type"]
        by_part = result.get("image_auroc_per_defect_type_per_score_part", {})  # BVPN: structural, logical
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(folder)), **floats(result, HEADLINE),
                      **({"decision_policy": result["decision_policy"]} if "decision_policy" in result else {}),
                      "test_images": result["n_test"],
                      "per_defect_type": markdown_table(
                          ["defect type", "image AUROC"] + [f"{part} score alone" for part in by_part],
                          [[k, v] + [by_part[part][k] for part in by_part] for k, v in per_defect.items()]),
                      "gallery": png_preview(folder / "gallery.png")},
            check_results=[check_evaluation(result), check_false_alarms(result)])

    return evaluation
