"""The `report` asset: report.html, metrics.json (dvc metrics) and ROC CSVs (dvc plots)."""

import dagster as dg

from ad_models.report import EvalEntry, best_method, build_report
from pipelines.execution import CPU_STEP
from pipelines.metadata import markdown_table
from pipelines.params import Params
from pipelines.resources import AdpipeResource


def build(params: Params) -> dg.AssetsDefinition:
    @dg.asset(name="report", op_tags=CPU_STEP,
              group_name="reports", deps=["evaluation", "deployed_model"],
              description="The HTML report over every category and method in params.yaml, with the deployed "
                          "model of each and its history.")
    def report(context: dg.AssetExecutionContext, adpipe: AdpipeResource) -> dg.MaterializeResult:
        p = adpipe.params
        entries = [EvalEntry(c, m, p.eval_dir(m, c), p.deploy_dir(m, c)) for c in p.categories for m in p.methods]
        metrics = build_report(entries, p.report_dir)
        rows = [[c, m + (" (best)" if m == best_method(by_method) and len(by_method) > 1 else ""),
                 v.get("image_auroc"), v.get("pixel_auroc"), v.get("aupro")]
                for c, by_method in metrics.items() for m, v in by_method.items()]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(p.report_dir / "report.html")),
            "models": len(entries),
            "metrics": markdown_table(["category", "method", "image AUROC", "pixel AUROC", "AUPRO"], rows)})

    return report
