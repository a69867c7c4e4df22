"""SLSG: industrial image anomaly detection by learning better feature embeddings and one-class
classification (arXiv 2305.00398; official code `areylng/SLSG`, read in full for
`docs/methods/slsg.md`, whose sections are cited below).

A segmentation network trained to tell normal images from simulated anomalies:

    frozen encoder -> e1..e3 -> spatial attention (LKA)  --------------------------+ skips
                   -> e4 (1/16) -> self-attentive graph module (dense + sparse) -> U-Net decoder -> 2-class logits
                                                              \\-> auxiliary head --/ (added to the output)
    anomaly map = softmax(logits)[anomaly]; image score = mean of the top-100 map values (at 256 px)

From the official code (Sec. 1-6): the encoder's odd ResNet-18 forward (layer1 on the raw conv1
output, no max-pool: e1..e4 at 1/2..1/16), the LKA blocks, the Grapher (fc1; a shared query/key
projection; dense softmax attention over all nodes without 1/sqrt(d) scaling; a sparse 9-NN graph
from the top 27 of cosine similarity + relative-position term, keeping every 3rd; max-relative
aggregation; the dense context conv; interleaved concat, grouped 1x1 conv, fc2, residual), the
auxiliary head, the decoder and its channel counts, batches of 4 normal + 4 anomalous images, the
loss 0.4 focal (gamma 4) + 0.6 L1 + 0.3 auxiliary L1, SGD lr 0.04 momentum 0.9 wd 3e-5 with one
cosine decay to 0 over 7001 iterations, and the top-100 image score.

Fixed here (Sec. 8), on purpose:
- The frozen encoder's batch norms stay in eval mode (`FeatureExtractor`): in the released code the
  whole model is in train mode, so the "frozen" encoder normalises with batch statistics and its
  running statistics drift toward the synthetic batches.
- The relative-position term (Sec. 2.2) was written for ViG's distance-based kNN and added unchanged
  to a similarity, so it penalises spatially near nodes. `position_term="favour_near"` (default)
  adds it with the sign that favours them, as ViG intended; "released" keeps the released sign,
  "none" drops it.
- The released dense value conv is a 3 x 3 conv applied to the nodes laid out as a (256, 1) column,
  i.e. a 1-D conv along raster order that mixes the end of one row with the start of the next;
  `value_conv="grid"` (default) applies it on the 2-D node grid, "raster" reproduces the release.
- Checkpoints are chosen on the synthetic validation bank (mean of image and pixel AUROC), never on
  the test set (the release saved one every 100 iterations named by its test AUROC).
- The released "custom" init is a no-op (Sec. 8.5), so PyTorch defaults are the real init; kept.

Inferred (the paper text was not available; each is a config option):
- Encoder (`encoder`): "auto" tries the paper's ImageNet ResNet-18 (`resnet18.tv_in1k`, a weights
  file or the hub) with its odd forward, then the offline `tf_efficientnet_lite0`, whose stages at
  1/2, 1/4, 1/8, 1/16 stand in for e1..e4 (and its 1/2 stage also for the skip s0). The choice is
  written into the saved config and the provenance; the encoder is part of the saved weights.
- Simulated anomalies (Sec. 3) through `ad_models.defects`, the per-category rules generalised into
  options: a "texture" kind (Perlin mask, lattice 2^0..2^3, threshold 0.5, a procedural texture or
  a folder such as DTD via `texture_source`, DRAEM's 3 photometric ops, beta U(`texture_beta`)) and
  a "scar" kind (Perlin mask, lattice 2^0..2^2, threshold 0.4, the image's own content out of place:
  `rearrange` = grid shuffle `shuffle_grid` / flip / another training image, beta U(`scar_beta`)),
  drawn with `scar_probability` (0.58, the release's for all categories but breakfast_box).
  `foreground` keeps them on the object (the release's juice_bottle rule); per-category values go
  in params.yaml `method_config: slsg: per_category: {<category>: {...}}`. The release's
  texture beta (0.75 w.p. 0.25, else U(0, 0.9)) is drawn as U(0, 0.9); its shared ColorJitter of
  brightness/saturation 0.1 is `color_jitter(0.1)` (which also moves contrast and hue by 0.1).
  Masks cover >= 49 px at 256 px (scaled).
- Generative pre-training (the abstract's first stage, missing from the release; off by default:
  `pretrain_iterations=0`): masked-patch inpainting. Square patches (`pretrain_patch` px at 256,
  a share `pretrain_mask_ratio` of them) of a good image are set to the dataset mean (zero after
  normalisation); the encoder plus a light U-Net decoder rebuild the image, with the loss on the
  hidden pixels only (MSE). Filling a hole from its surroundings needs both the normal patterns and
  where they belong, which is what the abstract says the stage teaches. The encoder's weights are
  trained (Adam `pretrain_lr`), its batch-norm statistics are not; the decoder is thrown away and
  the encoder frozen again for the main stage. There is no explicit hypersphere loss in the release
  either; the "one-class" part is the normal-vs-simulated segmentation.
- CPU budgets: `iterations` and `image_size` (params.yaml); the image score's top-k scales with the
  image area (100 at 256 x 256).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ad_models.backbones import FeatureExtractor, first_available_network
from ad_models.defects import DefectConfig, DefectMixture, color_jitter
from ad_models.data.loading import image_shape
from ad_models.methods.base import (AnomalyMethod, CheckpointSelection, TrainingImages, autocast,
                                    check_input_geometry, images_in_memory, input_side, model_input,
                                    optimizer_step, resolve_device, seed_everything, step_phase, top_k_at,
                                    top_k_mean, training_precision)

ENCODERS = {  # name -> backbone; "auto" tries the paper's ResNet-18 first, then the offline network
    "resnet18": {"name": "resnet18.tv_in1k", "out_indices": (0, 1, 2, 3, 4)},
    "efficientnet_lite0": {"name": "tf_efficientnet_lite0", "out_indices": (0, 1, 2, 3)},
}
POSITION_TERMS = ("favour_near", "released", "none")
VALUE_CONVS = ("grid", "raster")
LOSS_COLUMNS = ["focal", "l1", "aux_l1"]


@dataclass
class SLSGConfig:
    image_size: int | tuple[int, int] = 256  # or [height, width]
    resize: str = "stretch"  # or "keep_aspect", "tiles" (loading.RESIZE_POLICIES)
    encoder: Any = "auto"  # "auto", a name of ENCODERS, or a backbone dict
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 32)  # d1, d2, d3, d4 (Sec. 2.4)
    aux_width: int = 32  # the auxiliary head's features, fed into the decoder at 1/4 and 1/2
    graph_neighbours: int = 9
    graph_dilation: int = 3
    position_term: str = "favour_near"  # POSITION_TERMS; the release's sign is "released"
    value_conv: str = "grid"  # VALUE_CONVS; the release's is "raster"
    # training (Sec. 4-5)
    iterations: int = 7001
    batch_size: int = 4  # pairs: 4 normal + 4 with a simulated anomaly
    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 3e-5
    focal_gamma: float = 4.0
    w_focal: float = 0.4
    w_l1: float = 0.6
    w_aux: float = 0.3
    jitter: float = 0.1  # colour jitter shared by each normal / anomalous pair
    # simulated anomalies (Sec. 3), the per-category rules as options
    scar_probability: float = 0.58
    texture_source: str = "procedural"  # or a folder of texture images (DTD)
    texture_beta: tuple[float, float] = (0.0, 0.9)
    scar_beta: tuple[float, float] = (0.0, 0.25)
    rearrange: dict = field(default_factory=lambda: {"grid_shuffle": 1.0})
    shuffle_grid: tuple[int, int] = (4, 8)
    foreground: bool = False
    # generative pre-training of the encoder (inferred; 0 = off, as released)
    pretrain_iterations: int = 0
    pretrain_lr: float = 1e-4
    pretrain_patch: int = 32  # px at 256
    pretrain_mask_ratio: float = 0.5
    # scoring and selection
    score_top_k: int = 100  # at 256 x 256; scaled with the image area
    select_every: int = 500  # iterations between checkpoint evaluations on the bank
    amp: bool = True  # bf16 autocast on CUDA; on a CPU only with cpu_bf16_training
    # bf16 autocast for the training steps on a CPU with bf16 matrix units (Intel AMX; ignored
    # elsewhere), as PFM's option. Checkpoint selection and inference stay fp32.
    cpu_bf16_training: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("decoder_widths", "texture_beta", "scar_beta", "shuffle_grid"):
            setattr(self, name, tuple(getattr(self, name)))
        check_input_geometry(self, "slsg", 16, "the graph works at 1/16")
        if len(self.decoder_widths) != 4 or min(self.decoder_widths) < 1:
            raise ValueError(f"decoder_widths needs four positive widths (d1..d4), got {list(self.decoder_widths)}")
        if self.position_term not in POSITION_TERMS:
            raise ValueError(f"position_term must be one of {list(POSITION_TERMS)}, not {self.position_term!r}")
        if self.value_conv not in VALUE_CONVS:
            raise ValueError(f"value_conv must be one of {list(VALUE_CONVS)}, not {self.value_conv!r}")
        if not 0 <= self.scar_probability <= 1:
            raise ValueError(f"scar_probability must be in [0, 1], got {self.scar_probability}")
        if not 0 < self.pretrain_mask_ratio < 1:
            raise ValueError(f"pretrain_mask_ratio must be in (0, 1), got {self.pretrain_mask_ratio}")
        if min(self.iterations, self.batch_size, self.select_every, self.score_top_k, self.graph_neighbours,
               self.graph_dilation, self.pretrain_patch) < 1 or self.pretrain_iterations < 0:
            raise ValueError("iterations, batch_size, select_every, score_top_k, graph_neighbours, graph_dilation "
                             "and pretrain_patch must be at least 1, pretrain_iterations at least 0")
        if not (isinstance(self.encoder, dict) or self.encoder == "auto" or self.encoder in ENCODERS):
            raise ValueError(f"encoder must be 'auto', one of {sorted(ENCODERS)} or a backbone dict, "
                             f"not {self.encoder!r}")
        self.defect_kinds()  # a bad defect option fails now, naming itself

    def defect_kinds(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """The two kinds of simulated anomaly as `DefectMixture` input (Sec. 3)."""
        min_fraction = 49 / 256 ** 2
        common = {"masks": {"perlin": 1.0}, "blend": "beta", "p_defect": 1.0, "foreground": self.foreground,
                  "min_mask_fraction": min_fraction}
        texture = {**common, "source": self.texture_source, "beta_range": self.texture_beta, "augment_ops": 3,
                   "perlin_scale_exponents": (0, 4), "perlin_threshold": 0.5}
        scar = {**common, "source": "rearranged", "rearrange": self.rearrange, "shuffle_grid": self.shuffle_grid,
                "beta_range": self.scar_beta, "augment_ops": 0, "perlin_scale_exponents": (0, 3),
                "perlin_threshold": 0.4}
        return {"texture": (1 - self.scar_probability, DefectConfig.from_dict(texture).to_dict()),
                "scar": (self.scar_probability, DefectConfig.from_dict(scar).to_dict())}


# ----------------------------------------------------------------------------------- networks

def cbr(cin: int, cout: int) -> nn.Sequential:
    """CBR3 of Sec. 2: 3 x 3 conv (with bias, as released) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class Encoder(nn.Module):
    """The frozen encoder: (s0, e1, e2, e3, e4) at strides (2, 2, 4, 8, 16).

    For a ResNet, Sec. 1's forward: s0 = relu(bn1(conv1 x)), e1 = layer1(conv1 x) (no BN, no ReLU,
    no max-pool), e2..e4 = layer2..4. For other networks, their stages at 1/2..1/16 (s0 = e1)."""

    def __init__(self, features: FeatureExtractor):
        super().__init__()
        self.features = features
        body = features.body
        self.resnet = all(hasattr(body, n) for n in ("conv1", "bn1", "act1", "layer1", "layer4"))
        c = features.channels
        self.channels = [c[0], c[1], c[2], c[3], c[4]] if self.resnet else [c[0], c[0], c[1], c[2], c[3]]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.resnet:
            f = self.features(images)
            return [f[0], f[0], f[1], f[2], f[3]]
        body = self.features.body
        c1 = body.conv1((images - self.features.mean) / self.features.std)
        s0 = body.act1(body.bn1(c1))
        e1 = body.layer1(c1)
        e2 = body.layer2(e1)
        e3 = body.layer3(e2)
        return [s0, e1, e2, e3, body.layer4(e3)]


class SpatialAttention(nn.Module):
    """Sec. 2.1: x + proj(relu(x * pw(dw_dilated(dw(x)))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.dw_dilated = nn.Conv2d(channels, channels, 3, padding=3, dilation=3, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.relu(x * self.pw(self.dw_dilated(self.dw(x)))))


def sincos_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """MAE's 2-D sin-cos embedding [H * W, dim]: the first half of dims encodes the row, the second
    half the column (each half: sin then cos of position x 10000^(-k / (dim / 4)))."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")

    def encode(pos):
        angles = pos.flatten()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([encode(rows), encode(cols)], 1).float()


def relative_positions(height: int, width: int, dim: int) -> torch.Tensor:
    """2 P P^T / dim [N, N]: 1 on the diagonal, larger for nearer nodes (ViG's relative position)."""
    p = sincos_positions(height, width, dim)
    return 2 * p @ p.T / dim


class Grapher(nn.Module):
    """Sec. 2.2: the self-attentive graph module on the deepest features (nodes = positions)."""

    def __init__(self, channels: int, neighbours: int, dilation: int, position_term: str, value_conv: str):
        super().__init__()
        c = channels
        self.neighbours, self.dilation = neighbours, dilation
        self.position_sign = {"favour_near": 1.0, "released": -1.0, "none": 0.0}[position_term]
        self.value_conv = value_conv
        self.fc1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.query_key = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.BatchNorm2d(c // 2))
        self.value = nn.Conv2d(c, c, 3, padding=1)
        self.context = nn.Conv2d(c, c, 1)
        for conv in (self.value, self.context):  # the release's only effective custom init
            nn.init.normal_(conv.weight, std=0.02)
        groups = 4 if (2 * c) % 4 == 0 else 1
        self.mix = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 1, groups=groups), nn.BatchNorm2d(2 * c), nn.GELU())
        nn.init.kaiming_normal_(self.mix[0].weight)
        nn.init.zeros_(self.mix[0].bias)
        self.fc2 = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    def positions(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        if (height, width) not in self._positions:
            self._positions[(height, width)] = relative_positions(height, width, self.fc1[0].out_channels)
        return self._positions[(height, width)].to(device)

    def neighbour_index(self, queries: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[B, N, k]: per node, every `dilation`-th of its top k * dilation by cosine similarity plus
        the signed relative-position term."""
        unit = F.normalize(queries.float(), dim=-1)
        similarity = unit @ unit.transpose(1, 2)
        if self.position_sign:
            similarity = similarity + self.position_sign * self.positions(height, width, queries.device)
        top = min(self.neighbours * self.dilation, similarity.shape[-1])
        return similarity.topk(top, dim=-1).indices[..., ::self.dilation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.fc1(x)
        nodes = h.flatten(2).transpose(1, 2)  # [B, N, C]
        queries = self.query_key(h).flatten(2).transpose(1, 2)  # shared query and key projection
        attention = torch.softmax((queries @ queries.transpose(1, 2)).float(), dim=-1).to(nodes.dtype)
        index = self.neighbour_index(queries, height, width)  # [B, N, k]
        neighbours = torch.gather(nodes[:, None].expand(-1, index.shape[1], -1, -1), 2,
                                  index[..., None].expand(-1, -1, -1, c))  # [B, N, k, C]
        relative = (neighbours - nodes[:, :, None]).amax(2)  # max-relative aggregation
        if self.value_conv == "grid":
            values = self.value(h).flatten(2)
        else:  # the release: nodes as a (N, 1) column, so the kernel only runs along raster order
            values = self.value(h.flatten(2)[..., None])[..., 0]
        context = (attention @ values.transpose(1, 2)).transpose(1, 2).reshape(b, c, height, width)
        dense = h + self.context(context)
        relative = relative.transpose(1, 2).reshape(b, c, height, width)
        interleaved = torch.stack([dense, relative], 2).reshape(b, 2 * c, height, width)
        return self.fc2(self.mix(interleaved)) + x


class SLSGNetwork(nn.Module):
    """Encoder (frozen), attention on e1..e3, Grapher on e4, auxiliary head and decoder (Sec. 2)."""

    def __init__(self, cfg: SLSGConfig, features: FeatureExtractor):
        super().__init__()
        self.encoder = Encoder(features)
        cs, c1, c2, c3, c4 = self.encoder.channels
        w1, w2, w3, w4 = cfg.decoder_widths
        a = cfg.aux_width
        self.attend = nn.ModuleList([SpatialAttention(c1), SpatialAttention(c2), SpatialAttention(c3)])
        self.graph = Grapher(c4, cfg.graph_neighbours, cfg.graph_dilation, cfg.position_term, cfg.value_conv)
        self.aux_features = nn.Sequential(cbr(c4, w1), cbr(w1, a))
        self.aux_out = nn.Sequential(cbr(a, a), nn.Conv2d(a, 2, 3, padding=1))
        self.up1, self.dec1 = cbr(c4, w1), nn.Sequential(cbr(w1 + c3, w1), cbr(w1, w1))
        self.up2, self.dec2 = cbr(w1, w2), nn.Sequential(cbr(w2 + c2 + a, w2), cbr(w2, w2))
        self.up3, self.dec3 = cbr(w2, w3), nn.Sequential(cbr(w3 + c1 + a, w3), cbr(w3, w3))
        self.dec4, self.dec4_skip = cbr(w3, w4), cbr(w4 + cs, w3)
        self.head = nn.Sequential(cbr(w3, w4), cbr(w4, 16), nn.Conv2d(16, 2, 3, padding=1))

    def train(self, mode: bool = True) -> "SLSGNetwork":
        super().train(mode)
        self.encoder.features.eval()  # frozen: its BN statistics never drift (the release's do)
        return self

    def decode(self, feats: list[torch.Tensor], size) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features -> (output logits, auxiliary logits), both [B, 2, *size]."""
        s0, e1, e2, e3, e4 = feats
        a1, a2, a3 = (att(e) for att, e in zip(self.attend, (e1, e2, e3)))
        g = self.graph(e4)
        u = self.aux_features(g)
        aux = upsample(self.aux_out(u), size)
        d1 = self.dec1(torch.cat([self.up1(upsample(g, a3.shape[-2:])), a3], 1))
        u4 = upsample(u, a2.shape[-2:])
        d2 = self.dec2(torch.cat([self.up2(upsample(d1, a2.shape[-2:])), a2, u4], 1))
        u8 = upsample(u4, a1.shape[-2:])
        d3 = self.dec3(torch.cat([self.up3(upsample(d2, a1.shape[-2:])), a1, u8], 1))
        d4 = self.dec4_skip(torch.cat([self.dec4(d3), upsample(s0, d3.shape[-2:])], 1))
        seg = self.head(upsample(d4, size))
        return seg + aux, aux

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            feats = self.encoder(images)
        return self.decode(feats, images.shape[-2:])


class PretrainDecoder(nn.Module):
    """The generative pre-training's light U-Net decoder: e4 -> image, with skips from e3..e1."""

    def __init__(self, channels: list[int], width: int = 64):
        super().__init__()
        _, c1, c2, c3, c4 = channels
        self.blocks = nn.ModuleList([cbr(c4 + c3, width), cbr(width + c2, width // 2), cbr(width // 2 + c1, width // 4)])
        self.out = nn.Conv2d(width // 4, 3, 3, padding=1)

    def forward(self, feats: list[torch.Tensor], size) -> torch.Tensor:
        x = feats[4]
        for block, skip in zip(self.blocks, (feats[3], feats[2], feats[1])):
            x = block(torch.cat([upsample(x, skip.shape[-2:]), skip], 1))
        return torch.sigmoid(upsample(self.out(x), size))


# ------------------------------------------------------------------------------------- losses

def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sec. 4's focal loss on 2-class probabilities [B, 2, H, W]; target [B, 1, H, W] in {0, 1}:
    one-hot clamped to [1e-5, 1 - 1e-5], p_t = sum onehot * p + 1e-5, mean of -(1 - p_t)^gamma log p_t."""
    onehot = torch.cat([1 - target, target], 1).clamp(1e-5, 1 - 1e-5)
    pt = (onehot * probs).sum(1) + 1e-5
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def patch_masks(n: int, shape: tuple[int, int], patch: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 1, height, width], 1 = hidden: a random share `ratio` of the patch x patch squares."""
    rows, cols = shape
    hidden = (torch.rand((n, 1, max(1, rows // patch), max(1, cols // patch)), generator=generator) < ratio).float()
    return F.interpolate(hidden, size=(rows, cols), mode="nearest")


# ------------------------------------------------------------------------------------- method

class SLSG(AnomalyMethod):
    name = "slsg"
    Config = SLSGConfig

    def __init__(self, config: SLSGConfig | dict | None = None, pretrained_backbones: bool = True):
        super().__init__(config, pretrained_backbones)
        resolved, features, self.provenance = first_available_network(
            self.config.encoder, ENCODERS, "encoder", pretrained_backbones)
        self.config = dataclasses.replace(self.config, encoder=resolved)  # `load` rebuilds the same one
        with torch.random.fork_rng(devices=[]):  # same seed, same initial networks
            torch.manual_seed(self.config.seed)
            self.net = SLSGNetwork(self.config, features)
        self.net.eval()

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return model_input(images, self.config.image_size, self.device)

    # -- training -----------------------------------------------------------------------------
    def pretrain(self, images: TrainingImages, generator: torch.Generator, progress: bool) -> list[float]:
        """The generative pre-training stage (module docstring): masked-patch inpainting that trains
        the encoder's weights (not its BN statistics); returns the loss per iteration."""
        cfg = self.config
        encoder = self.net.encoder
        decoder = PretrainDecoder(encoder.channels).to(self.device)
        encoder.requires_grad_(True)
        optimizer = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=cfg.pretrain_lr)
        patch = max(1, round(cfg.pretrain_patch * input_side(cfg.image_size) / 256))
        mean = encoder.features.mean  # hidden pixels -> the ImageNet mean: zero after normalisation
        losses = []
        decoder.train()
        try:
            for _ in tqdm(range(cfg.pretrain_iterations), desc="slsg: pre-train", disable=not progress, leave=False):
                with step_phase("data"):
                    idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
                    x = self._resize(images.batch(idx))
                    hidden = patch_masks(len(x), image_shape(cfg.image_size), patch, cfg.pretrain_mask_ratio,
                                         generator).to(self.device, non_blocking=True)
                with step_phase("forward"):
                    with autocast(self.device, cfg.amp):
                        rebuilt = decoder(encoder(x * (1 - hidden) + mean * hidden), x.shape[-2:]).float()
                    loss = ((rebuilt - x) ** 2 * hidden).sum() / (hidden.sum() * 3).clamp(min=1)
                optimizer_step(optimizer, loss)
                losses.append(loss.detach())
        finally:
            encoder.requires_grad_(False)
        return torch.stack(losses).tolist() if losses else []  # one sync, not one per iteration

    def fit(self, train: Dataset, valid: Dataset | None = None, device: str = "auto",
            progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        self.to(resolve_device(device))
        generator = seed_everything(cfg.seed)
        start = time.perf_counter()
        images = TrainingImages(images_in_memory(train, self._resize), self.device)
        pretrain_losses = self.pretrain(images, generator, progress) if cfg.pretrain_iterations else []
        anomalies = DefectMixture(cfg.defect_kinds())
        trained = [m for name, m in self.net.named_children() if name != "encoder"]
        optimizer = torch.optim.SGD([p for m in trained for p in m.parameters()], lr=cfg.lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # one cosine decay lr -> 0 over the run (the release's CosineAnnealingWarmRestarts, T_0 = iterations)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / cfg.iterations)))
        selection = CheckpointSelection(self, valid, trained, 2 * cfg.batch_size)
        history: list[list[float]] = []
        running = torch.zeros(len(LOSS_COLUMNS), device=self.device)  # summed on the device: no sync per step
        loss_weights = torch.tensor([cfg.w_focal, cfg.w_l1, cfg.w_aux], device=self.device)
        every = max(1, min(cfg.select_every, cfg.iterations))
        self.net.train()
        bar = tqdm(range(cfg.iterations), desc="slsg: train", disable=not progress, leave=False)
        for step in bar:
            with step_phase("data"):
                idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
                normal = color_jitter(self._resize(images.batch(idx)), generator, cfg.jitter)
                anomalous, masks = anomalies(normal, generator)
                x = torch.cat([normal, anomalous])
                target = torch.cat([torch.zeros_like(masks), masks]).to(self.device)
            with step_phase("forward"):
                with autocast(self.device, cfg.amp, cpu=cfg.cpu_bf16_training):
                    out, aux = self.net(self._resize(x))
                probs, aux_probs = torch.softmax(out.float(), 1), torch.softmax(aux.float(), 1)
                losses = torch.stack([focal_loss(probs, target, cfg.focal_gamma),
                                      (probs[:, 1:] - target).abs().mean(), (aux_probs[:, 1:] - target).abs().mean()])
                weighted = losses * loss_weights
            optimizer_step(optimizer, weighted.sum(), schedule)
            running += weighted.detach()
            if (step + 1) % every == 0 or step + 1 == cfg.iterations:
                with step_phase("log"):
                    steps = (step % every) + 1
                    history.append((running / steps).tolist())
                    running.zero_()
                    bar.set_postfix(loss=f"{sum(history[-1]):.4f}")
                selection.consider(step + 1)
                self.net.train()
        selection.restore()
        self.net.eval()
        return {"iterations": cfg.iterations, "train_images": len(images),
                "train_seconds": time.perf_counter() - start, "device": str(self.device),
                "loss_columns": LOSS_COLUMNS, "loss_per_epoch": history, "final_loss": sum(history[-1]),
                "loss_every_iterations": every, "pretrain_losses": pretrain_losses,
                "training_precision": training_precision(self.device, cfg.amp, cfg.cpu_bf16_training),
                **selection.summary(cfg.iterations)}

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        self.net.eval()
        height, width = images.shape[-2:]
        with autocast(self.device, cfg.amp):
            out, _ = self.net(self._resize(images))
        maps = torch.softmax(out.float(), 1)[:, 1]
        scores = top_k_mean(maps, top_k_at(cfg.score_top_k, cfg.image_size), valid)
        if maps.shape[-2:] != (height, width):
            maps = F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        return scores, maps
