"""Which params.yaml a run reads (the torch device of GPU steps: pipelines/devices.py)."""
from __future__ import annotations

import dagster as dg

from pipelines.params import Params, load_params


class AdpipeResource(dg.ConfigurableResource):
    """The run's configuration: params.yaml."""

    params_file: str
    progress: bool = True  # tqdm bars in the run's stderr

    @property
    def params(self) -> Params:
        return load_params(self.params_file)
