"""Everything environment-specific: which params.yaml, which torch device."""
from __future__ import annotations

import dagster as dg

from pipelines.params import Params, load_params


class AdpipeResource(dg.ConfigurableResource):
    """The run's configuration: params.yaml, with an optional device override for this machine."""

    params_file: str
    device: str = ""  # "", "auto", "cpu", "cuda", "cuda:1"; "" means params.yaml's `device`
    progress: bool = True  # tqdm bars in the run's stderr

    @property
    def params(self) -> Params:
        return load_params(self.params_file)

    @property
    def torch_device(self) -> str:
        return self.device or self.params.device
