"""The methods, one file each, and the registry that names them.

`create_method("pfm", {"epochs": 10})` builds an untrained method from plain config data;
`load_method(folder)` restores a saved one, whichever method it is.
"""
from __future__ import annotations

from pathlib import Path

from ad_models.io import read_json
from ad_models.methods.base import AnomalyMethod
from ad_models.methods.baseline import MeanImage
from ad_models.methods.bvpn import BVPN
from ad_models.methods.esad import ESAD
from ad_models.methods.ndpnet import NDPNet
from ad_models.methods.pefm import PEFM
from ad_models.methods.pfm import PFM
from ad_models.methods.slsg import SLSG

METHODS: dict[str, type[AnomalyMethod]] = {cls.name: cls for cls in (PFM, PEFM, NDPNet, ESAD, SLSG, BVPN, MeanImage)}


def method_class(name: str) -> type[AnomalyMethod]:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def create_method(name: str, config: dict | None = None) -> AnomalyMethod:
    return method_class(name)(config)


def load_method(folder: str | Path, device: str = "auto") -> AnomalyMethod:
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no saved model here (train it first)")
    return method_class(read_json(config_file)["method"]).load(folder, device)


__all__ = ["METHODS", "AnomalyMethod", "create_method", "load_method", "method_class"]
