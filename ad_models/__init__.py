"""adpipe's plain-PyTorch library: datasets, defect synthesis, backbones, methods, metrics, reports.

Never imports dagster: the Dagster code location in `pipelines/` calls into this package.
"""
__version__ = "0.1.0"
