"""The method contract, and the few pieces every method shares.

A method is a class with a config dataclass and this surface (scikit-learn in spirit):

    method = Method(config)
    log = method.fit(train_dataset, valid_dataset=None, device="cpu", progress=True)
    scores, maps = method.predict(images, valid=None)  # images [B, 3, H, W] in [0, 1]
    method.save(folder); Method.load(folder)

`predict` returns image scores [B] and anomaly maps [B, H, W] at the input resolution; larger
means more anomalous. `valid` [B, H, W] bool, when given, marks the image's own pixels (not the
padding of the `keep_aspect` resize policy): image scores are taken over them only.

Every config has `image_size` (an int for a square, or [height, width]) and `resize` (one of
`loading.RESIZE_POLICIES`), checked by `check_input_geometry` with the multiple the method's
networks need. `save` writes `config.json` (the method's config, the weights' sources,
library versions) and `weights.pt`; `load` needs nothing else, on any machine.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import dataclasses
import json
import logging
import platform
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ad_models import metrics
from ad_models.data.loading import (RESIZE_POLICIES, ImageDataset, content_mask, cut_tile, fit_image, image_shape,
                                    restore_map, stitch_tiles, tile_grid)
from ad_models.io import atomic_path, read_json, write_json


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' (or None) picks CUDA when there is one; anything else is taken as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    """What a model ran on, for reports that compare runs across machines: "cpu" or "cuda:0 (NVIDIA H200)"."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@functools.cache  # asked at every training step; the answer never changes
def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), where bf16 beats fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def autocast_dtype(device: torch.device, enabled: bool, cpu: bool = False) -> torch.dtype | None:
    """bf16 on CUDA when asked (`enabled`); on a CPU only when `cpu` is asked too and the CPU has
    bf16 matrix units: elsewhere fp32 is both faster and exact there. None: no autocast."""
    if enabled and (device.type == "cuda" or (cpu and device.type == "cpu" and cpu_has_bf16_matrix_units())):
        return torch.bfloat16
    return None


def training_precision(device: torch.device, enabled: bool, cpu: bool = False) -> str:
    """What training steps under `autocast(device, enabled, cpu)` compute in, for logs and metadata."""
    return "bfloat16" if autocast_dtype(device, enabled, cpu) else "float32"


def autocast(device: torch.device, enabled: bool, cpu: bool = False) -> contextlib.AbstractContextManager:
    """The autocast `autocast_dtype` chooses, or a no-op. No cache of cast weights on a CPU: the cache
    empties only when the last of all threads' autocast regions ends, so with PFM's levels training
    side by side a step could reuse bf16 copies of weights from before the last update (a run then
    differed from its repeat)."""
    dtype = autocast_dtype(device, enabled, cpu)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=device.type != "cpu")


def check_input_geometry(config, method: str, multiple: int = 1, why: str = "") -> None:
    """Check a config's `image_size` (int, or [height, width]: stored as a tuple, since JSON gives
    lists) and `resize`; ValueError naming the method, the option and the nearest valid sizes when
    a side is not a multiple of `multiple` (what the method's networks need, `why`)."""
    rows, cols = image_shape(config.image_size)
    if isinstance(config.image_size, (list, tuple)):
        config.image_size = (rows, cols)
    if config.resize not in RESIZE_POLICIES:
        raise ValueError(f"{method}: resize must be one of {list(RESIZE_POLICIES)}, got {config.resize!r}")
    wrong = [(name, side) for name, side in (("height", rows), ("width", cols)) if side % multiple]
    if wrong:
        def nearest(side: int) -> str:
            below, above = side // multiple * multiple, (side // multiple + 1) * multiple
            return f"{below} or {above}" if below else f"{above}"
        sides = "; ".join(f"{name} {side}: nearest valid {nearest(side)}" for name, side in wrong)
        given = list(config.image_size) if isinstance(config.image_size, tuple) else config.image_size
        raise ValueError(f"{method}: image_size {given} must be a multiple of {multiple} in height and width "
                         f"({why}); {sides}")


def input_side(size) -> float:
    """The side of the square with as many pixels as `size` (an int, or [height, width]): what
    settings given "at 256 px" scale with."""
    rows, cols = image_shape(size)
    return rows if rows == cols else (rows * cols) ** 0.5


def top_k_at(k_at_256: int, size) -> int:
    """A count of map pixels given at 256 x 256 (an image score's top k), scaled with the image area."""
    return max(1, round(k_at_256 * (input_side(size) / 256) ** 2))


def top_k_mean(maps: torch.Tensor, k: int = 1, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Image scores [B]: the mean of each map's k largest values (k = 1: its maximum), over the
    `valid` pixels only when given (resized to the map's grid), so padding never scores."""
    flat = maps.flatten(1)
    if valid is not None:
        if valid.shape[-2:] != maps.shape[-2:]:
            valid = F.interpolate(valid[:, None].float(), size=maps.shape[-2:], mode="nearest")[:, 0] > 0.5
        valid = valid.to(maps.device).flatten(1)
        flat = flat.masked_fill(~valid, float("-inf"))
        k = min(k, int(valid.sum(1).min()))
    return flat.topk(max(1, min(k, flat.shape[1])), dim=1).values.mean(1)


def model_input(images: torch.Tensor, size, device: torch.device) -> torch.Tensor:
    """Images as a network takes them: float on `device`, at `size` (int: square, or [height,
    width]; antialiased bilinear, so a downscale does not alias), channels-last on CUDA, where
    convolutions run fastest on NHWC."""
    images = images.to(device).float()
    shape = image_shape(size)
    if images.shape[-2:] != shape:
        images = F.interpolate(images, size=shape, mode="bilinear", align_corners=False, antialias=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def image_batches(dataset: Dataset, batch_size: int, *, shuffle: bool = False,
                  generator: torch.Generator | None = None, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, drop_last=False)


def config_from_dict(config_cls: type, values: dict[str, Any] | None):
    """Build a config dataclass from plain data, rejecting unknown keys with the valid ones listed."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_cls.__name__}: unknown option(s) {unknown}; valid options: {sorted(known)}")
    return config_cls(**values)


def config_to_dict(config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def library_versions() -> dict[str, str]:
    import timm

    import ad_models
    return {"adpipe": ad_models.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


class AnomalyMethod:
    """Base class: holds the config, the shared save/load and the dataset-level prediction loop.

    Subclasses set `name` and `Config`, build their networks in `__init__`, and implement
    `fit` and `predict`. Everything a subclass must persist beyond its config lives in `self.net`
    (an nn.Module) or in `extra_state()` / `load_extra_state()`.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    compiled: bool = False  # compile_networks ran: torch.compile'd networks train on the caller's thread only

    def __init__(self, config=None, pretrained_backbones: bool = True):
        # pretrained_backbones=False: `load` restores every weight from the checkpoint, so no
        # hub or wheel lookup is needed on the machine that loads a model
        if config is None or isinstance(config, dict):
            config = config_from_dict(self.Config, config)
        self.config = config
        self.device = torch.device("cpu")
        self.net: nn.Module = nn.Module()
        self.provenance: dict[str, Any] = {}  # where pretrained weights came from, filled by subclasses
        self.budget: str | None = None  # the named budget (params.yaml) the config came from, if any

    # -- the contract --------------------------------------------------------------------------
    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def predict_parts(self, images: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """`predict` plus the named image scores a method fuses into its score (BVPN: structural,
        logical), so evaluations can say which part found what; none by default."""
        scores, maps = self.predict(images, valid)
        return scores, maps, {}

    def image_dataset(self, manifest) -> ImageDataset:
        """The rows of `manifest` as this model sees them: its `image_size` and `resize` policy."""
        return ImageDataset(manifest, self.config.image_size, self.config.resize)

    # -- persistence ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "weights.pt") as tmp:
            torch.save({"net": self.net.state_dict(), "extra": self.extra_state()}, tmp)
        write_json(folder / "config.json", {"method": self.name, "config": config_to_dict(self.config),
                                            "budget": self.budget, "provenance": self.provenance,
                                            "versions": library_versions()})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto") -> "AnomalyMethod":
        folder = Path(folder)
        saved = read_json(folder / "config.json")
        if saved.get("method") != cls.name:
            raise ValueError(f"{folder}: holds a {saved.get('method')!r} model, not {cls.name!r}")
        method = cls(saved["config"], pretrained_backbones=False)
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        method.net.load_state_dict(state["net"])
        method.load_extra_state(state["extra"])
        method.provenance = saved.get("provenance", {})
        method.budget = saved.get("budget")
        method.to(resolve_device(device))
        return method

    def compile_networks(self, mode: str = "default") -> None:
        """torch.compile every network of `self.net` in place (`nn.Module.compile`: the weights and
        their names stay as they are, so saving and loading do not change). Opt-in: compiling costs
        seconds to minutes up front and pays off in long GPU runs; "reduce-overhead" also captures
        CUDA graphs where shapes are static. Results equal eager ones up to float rounding."""
        for child in self.net.children():
            for module in (child.values() if isinstance(child, nn.ModuleDict)
                           else child if isinstance(child, nn.ModuleList) else [child]):
                module.compile(mode=mode)
        self.compiled = True

    def to(self, device: torch.device) -> "AnomalyMethod":
        self.device = device
        self.net.to(device)
        if device.type == "cuda":  # convolutions run fastest on NHWC tensor cores (inputs: model_input)
            self.net.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # static shapes: the fastest kernels, picked once
        return self

    # -- shared loops --------------------------------------------------------------------------
    @torch.no_grad()
    def predict_images(self, images: list[np.ndarray], batch_size: int = 8) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores [N] and anomaly maps at each image's own size, from uint8 RGB images of any
        size, under the model's `resize` policy: the one path from a picture to a decision
        (`adpipe predict`, and evaluation under `tiles`). Under `tiles`, each image's tiles are
        predicted in batches, their maps stitched (`loading.stitch_tiles`) and the image score is
        the largest of the tiles' own scores: a defect anywhere fails the part, and each tile is
        scored as the method scores an image (its `score_top_k`, BVPN's fused score)."""
        size, resize = self.config.image_size, self.config.resize
        if resize == "tiles":
            scores, maps = [], []
            for image in images:
                boxes = tile_grid(*image.shape[:2], size)
                tile_scores, tile_maps = [], []
                for start in range(0, len(boxes), batch_size):
                    cut = [cut_tile(image, box, size) for box in boxes[start:start + batch_size]]
                    batch_scores, batch_maps = self._predict_fitted(cut, size)
                    tile_scores.append(batch_scores)
                    tile_maps.append(batch_maps)
                scores.append(float(np.concatenate(tile_scores).max()))
                maps.append(stitch_tiles(np.concatenate(tile_maps), boxes, *image.shape[:2]))
            return np.asarray(scores, np.float32), maps
        scores, maps = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            fitted = [fit_image(image, size, resize) for image in batch]
            batch_scores, batch_maps = self._predict_fitted(fitted, size)
            scores.append(batch_scores)
            maps += [restore_map(amap, box, *image.shape[:2]) for amap, (_, box), image in zip(batch_maps, fitted, batch)]
        return np.concatenate(scores), maps

    def _predict_fitted(self, fitted: list[tuple[np.ndarray, tuple]], size) -> tuple[np.ndarray, np.ndarray]:
        """`predict` on model inputs (`fit_image` / `cut_tile` pairs), padding ignored."""
        inputs = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image, _ in fitted]).float().div_(255)
        boxes = torch.tensor([box for _, box in fitted])
        padded = bool((boxes != torch.tensor([0, 0, *image_shape(size)])).any())
        scores, maps = self.predict(inputs, content_mask(boxes, size) if padded else None)
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()

    def _predict_full_images(self, dataset: ImageDataset, batch_size: int, progress: bool, desc: str) -> dict[str, Any]:
        """`predict_dataset` for models that tile: whole images, maps and masks in the dataset's
        `frame` (the images' own size; a map of an image of another size is resized to it)."""
        out: dict[str, list] = {"scores": [], "maps": [], "labels": [], "masks": [], "paths": [], "defect_types": []}
        rows, cols = dataset.frame
        seconds = 0.0
        for i in tqdm(range(len(dataset.paths)), desc=desc, disable=not progress, leave=False):
            item = dataset.full_image(i)
            start = time.perf_counter()
            scores, maps = self.predict_images([item["image"]], batch_size)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            out["scores"].append(scores)
            out["maps"].append(maps[0] if maps[0].shape == (rows, cols)
                               else cv2.resize(maps[0], (cols, rows), interpolation=cv2.INTER_LINEAR))
            for key in ("label", "mask", "path", "defect_type"):
                out[key + "s"].append(item[key])
        empty = len(dataset.paths) == 0
        return {"scores": np.zeros(0, np.float32) if empty else np.concatenate(out["scores"]),
                "maps": np.zeros((0, rows, cols), np.float32) if empty else np.stack(out["maps"]),
                "labels": np.asarray(out["labels"], dtype=np.int64),
                "masks": np.zeros((0, rows, cols), bool) if empty else np.stack(out["masks"]),
                "paths": out["paths"], "defect_types": out["defect_types"], "score_parts": {},
                "seconds_per_image": seconds / max(len(dataset.paths), 1)}

    @torch.no_grad()
    def predict_dataset(self, dataset: Dataset, batch_size: int = 8, progress: bool = True,
                        desc: str = "predict") -> dict[str, Any]:
        """Scores and maps for a whole dataset, with labels, masks, timing and the method's score
        parts (`predict_parts`), as numpy arrays. Maps come back in the masks' frame: padding
        (`keep_aspect`) is cut off and the content resized to it (`loading.restore_map`); under
        `tiles`, whole images at their own size (`predict_images`)."""
        if getattr(dataset, "tiles", None) is not None:
            return self._predict_full_images(dataset, batch_size, progress, desc)
        out: dict[str, list] = {"scores": [], "maps": [], "labels": [], "masks": [], "paths": [],
                                "defect_types": []}
        parts: dict[str, list] = {}
        seconds = 0.0
        for batch in tqdm(image_batches(dataset, batch_size), desc=desc, disable=not progress, leave=False):
            start = time.perf_counter()
            images, boxes = batch["image"], batch["box"]
            size = tuple(images.shape[-2:])
            padded = bool((boxes != torch.tensor([0, 0, *size])).any())
            valid = content_mask(boxes, size) if padded else None
            scores, maps, named = self.predict_parts(images, valid)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if padded:  # back to the image's own geometry, in the frame its mask was loaded in
                maps = torch.from_numpy(np.stack([restore_map(m, box, *batch["mask"].shape[-2:])
                                                  for m, box in zip(maps.float().cpu().numpy(), boxes)]))
            seconds += time.perf_counter() - start
            for name, values in named.items():
                parts.setdefault(name, []).append(values.float().cpu().numpy())
            out["scores"].append(scores.float().cpu().numpy())
            out["maps"].append(maps.float().cpu().numpy().astype(np.float32))
            out["labels"].append(np.asarray(batch["label"]))
            out["masks"].append(batch["mask"][:, 0].numpy() > 0.5)
            out["paths"] += list(batch["path"])
            out["defect_types"] += list(batch["defect_type"])
        result = {k: (np.concatenate(v) if k in ("scores", "maps", "labels", "masks") else v)
                  for k, v in out.items()}
        result["score_parts"] = {name: np.concatenate(v) for name, v in parts.items()}
        result["seconds_per_image"] = seconds / max(len(dataset), 1)
        return result

    def validation_score(self, valid: Dataset, batch_size: int = 8) -> dict[str, float]:
        """What checkpoint selection maximises: the mean of image and pixel AUROC on validation
        data with defects (the synthetic bank), never the test set."""
        pred = self.predict_dataset(valid, batch_size=batch_size, progress=False)
        image = metrics.image_auroc(pred["labels"], pred["scores"])
        pixel = metrics.pixel_auroc(pred["masks"], pred["maps"])
        return {"image_auroc": image, "pixel_auroc": pixel, "selection_score": (image + pixel) / 2}


def can_select_on(valid: Dataset | None) -> bool:
    """Validation data that can rank checkpoints: good and defective images (the synthetic bank)."""
    return valid is not None and len(set(getattr(valid, "labels", []))) == 2


# Benchmarks only: a callable(method) -> {name: value} run at every checkpoint scoring, its figures
# recorded beside the bank score (the test AUROC, to judge the selection rule). Never set by the pipeline.
_checkpoint_probe: contextvars.ContextVar = contextvars.ContextVar("checkpoint_probe", default=None)


@contextlib.contextmanager
def probe_checkpoints(probe) -> Iterator[None]:
    """Within the block, every `CheckpointSelection.consider` also records `probe(method)`: how a
    benchmark sees whether the bank's choice of checkpoint tracks real defects."""
    token = _checkpoint_probe.set(probe)
    try:
        yield
    finally:
        _checkpoint_probe.reset(token)


class CheckpointSelection:
    """Keeps the best state of `modules` on validation data with defects (the synthetic bank):

        selection = CheckpointSelection(method, valid, [method.net.decoder])
        ... every few epochs: selection.consider(epoch)
        selection.restore(); log.update(selection.summary(last_epoch))

    Does nothing when `valid` cannot rank checkpoints (no defective images), so a run without a
    bank keeps its last state. Never the test set."""

    def __init__(self, method: AnomalyMethod, valid: Dataset | None, modules: list[nn.Module],
                 batch_size: int = 8):
        self.method, self.valid, self.modules, self.batch_size = method, valid, modules, batch_size
        self.enabled = can_select_on(valid)
        self.history: list[dict[str, float]] = []
        self._best: tuple[float, list[dict] | None] = (-1.0, None)

    def consider(self, epoch: int) -> None:
        if not self.enabled:
            return
        with step_phase("select"):
            score = self.method.validation_score(self.valid, self.batch_size)
        probe = _checkpoint_probe.get()
        self.history.append({"epoch": epoch, **score, **(probe(self.method) if probe else {})})
        if score["selection_score"] > self._best[0]:
            self._best = (score["selection_score"], [copy.deepcopy(m.state_dict()) for m in self.modules])

    def restore(self) -> None:
        if self._best[1] is not None:
            for module, state in zip(self.modules, self._best[1]):
                module.load_state_dict(state)

    def summary(self, last_epoch: int) -> dict[str, Any]:
        chosen = max(self.history, key=lambda s: s["selection_score"]) if self.history else None
        return {"checkpoint_selection": self.history, "selected_epoch": chosen["epoch"] if chosen else last_epoch}


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, schedule=None) -> None:
    """One training update: gradients of `loss`, the optimizer's step, then the lr schedule's;
    marked as the step's "backward" and "optimizer" parts."""
    with step_phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with step_phase("optimizer"):
        optimizer.step()
        if schedule is not None:
            schedule.step()


T = TypeVar("T")


def side_by_side(tasks: list[Callable[[], T]], device: torch.device) -> list[T]:
    """Independent pieces of training (networks that share nothing: no weights, no random draws), run
    side by side on a CPU's cores, each with an equal share of torch's threads: small layers use one
    core each far better than all cores together (PFM's projectors: 1.4 instead of 2.0 s per epoch
    on 2 cores). Results equal running each task alone with its share of threads. On a GPU or with
    one thread the tasks run one after the other, in the caller's thread."""
    threads = torch.get_num_threads()
    workers = min(len(tasks), threads)
    if device.type != "cpu" or workers < 2:
        return [task() for task in tasks]
    share = threads // workers

    def run(task: Callable[[], T], context: contextvars.Context) -> T:
        torch.set_num_threads(share)  # this thread's intra-op pool
        return context.run(task)  # the caller's context: its step clock sees every part

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="side_by_side") as pool:
            futures = [pool.submit(run, task, contextvars.copy_context()) for task in tasks]
            return [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)


def images_in_memory(dataset: Dataset, resize) -> torch.Tensor:
    """Every image of `dataset`, passed through `resize`, as one uint8 CPU tensor [N, 3, H, W]:
    decoded once for all epochs, 4x smaller than float."""
    return torch.stack([(resize(dataset[i]["image"][None])[0] * 255).round().to(torch.uint8).cpu()
                        for i in range(len(dataset))])


DEVICE_SHARE = 0.25  # training images stay on a GPU when they take at most this share of its free memory


class TrainingImages:
    """uint8 training images [N, 3, H, W] (`images_in_memory`) that steps cut batches from: on the
    GPU when they fit in `DEVICE_SHARE` of its free memory (no copy per step), else in pinned host
    memory (asynchronous copies); on the CPU as they are. `batch(idx)` is float in [0, 1] on the
    device, the same values wherever the images live."""

    def __init__(self, data: torch.Tensor, device: torch.device):
        self.data = data
        self.device = device
        self.residence = "cpu"
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.data.nbytes <= DEVICE_SHARE * free:
                self.data, self.residence = self.data.to(device), "device"
            else:
                self.data, self.residence = self.data.pin_memory(), "pinned host memory"
                logging.getLogger(__name__).warning(
                    "training images (%.1f GB) exceed %d %% of the GPU's free memory: kept in pinned host "
                    "memory and copied per step", self.data.nbytes / 2**30, 100 * DEVICE_SHARE)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.data[idx.to(self.data.device)].to(self.device, non_blocking=True).float().div_(255)


# -- where a training step's time goes (bench/bench_gpu.py) ------------------------------------
STEP_PHASES = ("data", "forward", "backward", "optimizer", "log", "select")
_step_clock: contextvars.ContextVar = contextvars.ContextVar("step_clock", default=None)


class StepClock:
    """Wall seconds per part of the training steps (`STEP_PHASES`). The device is synchronised at
    every boundary, so GPU work is counted in the part that queued it: only for benchmarks, training
    itself never waits for it. Parts that run side by side (`side_by_side`) each add their own time,
    so the parts may sum to more than the wall time."""

    def __init__(self):
        self.seconds = dict.fromkeys(STEP_PHASES, 0.0)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:  # parts of tasks running side by side end at the same time
            self.seconds[name] += seconds


@contextlib.contextmanager
def clock_steps() -> Iterator[StepClock]:
    """Within the block, every `step_phase` adds its wall time to the yielded clock."""
    clock = StepClock()
    token = _step_clock.set(clock)
    try:
        yield clock
    finally:
        _step_clock.reset(token)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):  # the step may run on any of them (cuda:N)
            torch.cuda.synchronize(index)


@contextlib.contextmanager
def step_phase(name: str) -> Iterator[None]:
    """Marks a part of a training step: a `torch.profiler` range ("train/<name>") always, and the
    wall time on the `clock_steps` clock when one runs."""
    clock = _step_clock.get()
    with torch.profiler.record_function(f"train/{name}"):
        if clock is None:
            yield
            return
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()
            clock.add(name, time.perf_counter() - start)


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    result = {"seconds": 0.0}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
