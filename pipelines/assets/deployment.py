"""The `deployed_model` asset: the model in use per (method, category), data/deployed/<method>/<category>.

Each newly trained model is a candidate; it replaces the deployed one only if it is not worse on the
synthetic bank and labelled validation images (`retraining.tolerance` in params.yaml). The decision
is an asset check, so a rejected candidate shows in the UI (it is kept under rejected/).
"""

import dagster as dg

from ad_models.deploy import deployment_history, promote
from ad_models.thresholds import expectation
from pipelines.checks import check_deployment, comparison_rows, deployment_check_specs
from pipelines.devices import Accelerator
from pipelines.execution import gpu_step_tags
from pipelines.metadata import markdown_table
from pipelines.params import Params
from pipelines.partitions import DATASET_OF_MODEL, model_partitions, split_model_key
from pipelines.resources import AdpipeResource


def history_table(history: list[dict], rows: int = 10) -> dg.MetadataValue:
    """The latest decisions, newest first."""
    return markdown_table(["decided at", "candidate", "decision", "why"],
                          [[h["decided_at"][:19], h["candidate_id"], h["decision"], "; ".join(h.get("reasons") or [])]
                           for h in reversed(history[-rows:])])


def build(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="deployed_model", op_tags=gpu_step_tags(params),
              group_name="models", partitions_def=model_partitions(params), pool="gpu",
              deps=["model", dg.AssetDep("defect_bank", partition_mapping=DATASET_OF_MODEL),
                    dg.AssetDep("dataset", partition_mapping=DATASET_OF_MODEL)],
              check_specs=deployment_check_specs("deployed_model"), kinds={"pytorch"},
              description="The model `adpipe predict` uses: the newly trained one if it is not worse than the "
                          "deployed one on the synthetic bank and labelled validation images, else unchanged "
                          "(the candidate is kept under rejected/). Thresholds are set on good images.")
    def deployed_model(context: dg.AssetExecutionContext, adpipe: AdpipeResource,
                       accelerator: Accelerator) -> dg.MaterializeResult:
        p = adpipe.params
        category, method = split_model_key(context)
        folder = p.deploy_dir(method, category)
        record = promote(p.model_dir(method, category), folder, p.bank_dir(category), p.dataset_dir(category),
                         tolerance=float(p.retraining["tolerance"]), device=accelerator.torch_device,
                         policy=p.decision_policy(category),
                         batch_size=int(p.evaluation.get("batch_size", 8)))
        context.log.info(f"{method} on {category}: candidate {record['candidate_id']} {record['decision']}"
                         + (f" ({'; '.join(record['reasons'])})" if record.get("reasons") else ""))
        history = deployment_history(folder)
        deployed = next(h for h in reversed(history) if h["decision"] in ("first", "deployed"))
        metadata = {"path": dg.MetadataValue.path(str(folder / "current")), "decision": record["decision"],
                    "candidate": record["candidate_id"], "deployed": deployed["candidate_id"],
                    "deployed_since": deployed["decided_at"], "decisions": len(history),
                    "history": history_table(history)}
        threshold = deployed.get("threshold")
        if threshold:
            metadata.update(image_threshold=dg.MetadataValue.float(float(threshold["image"])),
                            pixel_threshold=dg.MetadataValue.float(float(threshold["pixel"])),
                            expected_false_alarm_rate=dg.MetadataValue.float(threshold["expected_false_alarm_rate"]),
                            what_to_expect=expectation(threshold))
            for key in ("false_alarm_rate_bound", "bank_recall"):  # absent without defects, or set by an older adpipe
                if key in threshold:
                    metadata[key] = dg.MetadataValue.float(threshold[key])
        if comparison_rows(record):
            metadata["comparison"] = markdown_table(["set", "metric", "candidate", "deployed"], comparison_rows(record))
        return dg.MaterializeResult(metadata=metadata, check_results=[check_deployment(record)])

    return deployed_model
