"""The built-in synthetic dataset: procedurally generated, seeded, offline, a few seconds per category.

Categories:
- `fabric`: a denim-like 3/1 twill weave (indigo warp, off-white weft) with yarn irregularities.
- `granite`: polished speckled grey stone made of black, grey and white mineral grains.
- `circuit`: an aligned object like MVTec's: a green board with chips, capacitors, a crystal and a
  pin header at fixed places, with small placement, pose and lighting jitter.

Defects, each with an exact pixel mask: scratch (thin curved bright or dark line), hole (dark
ellipse with inner shading and a lit rim), stain (soft-edged semi-transparent blob), crack
(branching thin dark random walk): a pixel is in their mask iff the defect changed it; and, for
`circuit`, the logical defects missing_part (a component absent, its pads bare; mask = its
silhouette where it should be) and misplaced_part (a component shifted and turned; mask = its
silhouette at the old and the new place).

Every image has its own random generator seeded by (seed, category, split, defect type, index),
so the same seed gives byte-identical PNGs and changing one count does not change other images.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ad_models.data.layout import write_category

CATEGORIES: tuple[str, ...] = ("fabric", "granite", "circuit")
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "fabric": ("scratch", "hole", "stain", "crack"),
    "granite": ("scratch", "hole", "stain", "crack"),
    "circuit": ("scratch", "stain", "missing_part", "misplaced_part"),
}
# what a component-level ("logical") anomaly detector is for; the rest are structural defects
LOGICAL_DEFECT_TYPES: tuple[str, ...] = ("missing_part", "misplaced_part")
DATASET = "synthetic"
_SS = 4  # supersampling factor for drawn shapes and lines: anti-aliased edges at any size
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


# ----------------------------------------------------------------------------- noise and light

def _low_freq(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Smooth noise with about `cells` bumps per side, values roughly in [-1.5, 1.5]."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(grid, (s, s), interpolation=cv2.INTER_CUBIC)


def _blurred_noise(rng: np.random.Generator, s: int, sigma_x: float, sigma_y: float | None = None) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit standard deviation."""
    noise = rng.standard_normal((s, s), dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y or sigma_x)
    return noise / (noise.std() + 1e-6)


def _lighting(rng: np.random.Generator, s: int, strength: float) -> np.ndarray:
    """A multiplicative illumination field: global gain, a linear gradient and a soft blotch."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
    gx, gy = rng.normal(0, strength, 2)
    field = rng.normal(1.0, strength) + gx * x + gy * y + 0.3 * strength * _low_freq(rng, s, 3)
    return field[..., None]


# ----------------------------------------------------------------------------- textures

def _fabric(rng: np.random.Generator, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    period = s / 32 * rng.uniform(0.97, 1.03)
    theta = float(np.deg2rad(rng.normal(0, 1.0)))
    wobble = 0.2 * period  # threads are never perfectly straight
    xs = x * float(np.cos(theta)) + y * float(np.sin(theta)) + wobble * _low_freq(rng, s, 4)
    ys = -x * float(np.sin(theta)) + y * float(np.cos(theta)) + wobble * _low_freq(rng, s, 4)
    u, v = xs / period + rng.uniform(0, 4), ys / period + rng.uniform(0, 4)
    i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - i, v - j
    warp_on_top = (i - j) % 4 != 0  # 3/1 twill: each warp floats over three wefts -> diagonal ribs

    n = 4096
    warp_gain, weft_gain = rng.normal(1, 0.07, n).astype(np.float32), rng.normal(1, 0.05, n).astype(np.float32)
    streaks = 1 + 0.10 * _blurred_noise(rng, s, 0.5 * period, s / 10)  # denim's vertical slubs
    warp = (0.45 + 0.55 * np.sqrt(np.sin(np.pi * fu))) * (0.88 + 0.12 * np.sin(np.pi * fv))
    warp = warp * warp_gain[i % n] * streaks * (1 + 0.10 * _blurred_noise(rng, s, 0.6, 2.5))
    weft = (0.45 + 0.55 * np.sqrt(np.sin(np.pi * fv))) * (0.88 + 0.12 * np.sin(np.pi * fu))
    weft = weft * weft_gain[j % n] * (1 + 0.08 * _blurred_noise(rng, s, 2.5, 0.6))

    indigo = (np.array([0.17, 0.27, 0.50]) * rng.normal(1, 0.03, 3)).astype(np.float32)
    ecru = (np.array([0.82, 0.79, 0.72]) * rng.normal(1, 0.02, 3)).astype(np.float32)
    image = np.where(warp_on_top[..., None], warp[..., None] * indigo, weft[..., None] * ecru)
    return image.astype(np.float32)


def _granite(rng: np.random.Generator, s: int) -> np.ndarray:
    k = s / 256
    grey = np.array([0.16, 0.50, 0.65, 0.84], dtype=np.float32)  # mica, feldspar, feldspar, quartz
    bias = np.array([-0.45, 0.05, 0.15, 0.0]) + rng.normal(0, 0.05, 4)
    fields = np.stack([
        _blurred_noise(rng, s, 1.6 * k) + 0.6 * _blurred_noise(rng, s, 4.0 * k) + b for b in bias
    ])
    mineral = fields.argmax(0)  # the strongest field wins: a mosaic of grains with crisp borders
    image = grey[mineral] + 0.035 * _blurred_noise(rng, s, 0.7 * k)
    image *= 1 + 0.06 * _low_freq(rng, s, 5)
    image = cv2.GaussianBlur(image, (0, 0), 0.45 * k + 0.05)
    tint = np.array([1.0, 0.99, 0.97], dtype=np.float32) * rng.normal(1, 0.01, 3).astype(np.float32)
    return (image[..., None] * tint).astype(np.float32)


# ----------------------------------------------------------------------------- the circuit board

_BOARD_SIZE = (0.78, 0.62)  # fractions of the image side
_BACKGROUND = (196, 194, 186)
_GREEN, _TRACE, _SILK = (24, 98, 54), (44, 128, 72), (228, 230, 222)
_TIN, _GOLD, _BLACK = (196, 196, 188), (208, 170, 70), (26, 26, 29)
# name: kind, centre x, y relative to the board centre, width, height (fractions of the image side)
_PARTS = {
    "U1": ("qfp", -0.15, -0.06, 0.18, 0.18),
    "U2": ("soic", 0.17, -0.17, 0.13, 0.11),
    "C1": ("electrolytic", 0.15, 0.05, 0.12, 0.12),
    "C2": ("electrolytic", 0.29, 0.06, 0.085, 0.085),
    "Y1": ("crystal", -0.15, 0.13, 0.13, 0.05),
    "J1": ("header", 0.0, 0.235, 0.40, 0.07),
}
_DECOR = [  # small resistors and ceramic capacitors: texture for the board, never a defect
    ("resistor", 0.02, -0.16, 0.05, 0.025, 90), ("resistor", 0.02, -0.02, 0.05, 0.025, 90),
    ("ceramic", 0.30, -0.06, 0.05, 0.025, 0), ("ceramic", 0.30, 0.16, 0.05, 0.025, 0),
    ("resistor", 0.07, 0.14, 0.05, 0.025, 0),
]
_TRACES = [
    [(-0.06, -0.10), (0.02, -0.10), (0.02, -0.19), (0.09, -0.19)],
    [(-0.06, -0.02), (0.02, -0.02), (0.06, 0.02), (0.09, 0.02)],
    [(-0.06, 0.0), (-0.02, 0.04), (0.04, 0.04), (0.04, 0.14)],
    [(-0.22, 0.03), (-0.22, 0.13)],
    [(-0.08, 0.13), (-0.04, 0.13), (-0.04, 0.20)],
    [(0.23, -0.17), (0.30, -0.17), (0.30, -0.08)],
    [(0.15, -0.12), (0.15, -0.03)],
    [(0.29, 0.11), (0.29, 0.17), (0.12, 0.17), (0.12, 0.20)],
    [(-0.30, -0.20), (-0.30, 0.20), (-0.16, 0.20)],
    [(-0.15, -0.16), (-0.15, -0.24), (0.32, -0.24)],
]
_VIAS = [(0.09, -0.19), (0.09, 0.02), (-0.30, -0.20), (0.32, -0.24), (0.04, 0.14), (0.30, -0.08)]


def _rect(cx: float, cy: float, w: float, h: float) -> np.ndarray:
    return np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                     [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]])


def _rounded_rect(w: float, h: float, r: float, n: int = 8) -> np.ndarray:
    t = np.linspace(0, np.pi / 2, n)
    corners = [(w / 2 - r, h / 2 - r), (-w / 2 + r, h / 2 - r), (-w / 2 + r, -h / 2 + r), (w / 2 - r, -h / 2 + r)]
    arcs = [np.c_[cx + r * np.cos(t + q * np.pi / 2), cy + r * np.sin(t + q * np.pi / 2)] for q, (cx, cy) in enumerate(corners)]
    return np.concatenate(arcs)


def _arc_band(r0: float, r1: float, a0: float, a1: float, n: int = 16) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.concatenate([np.c_[r1 * np.cos(t), r1 * np.sin(t)], np.c_[r0 * np.cos(t[::-1]), r0 * np.sin(t[::-1])]])


def _part_shapes(kind: str, w: float, h: float) -> tuple[list, list]:
    """(pads, body) as lists of shapes (kind, geometry, colour, *size): ("poly", points, colour),
    ("circle", centre, colour, radius), ("line", points, colour, thickness), in the part's own
    frame and units of the image side."""
    pads, body = [], []
    if kind in ("qfp", "soic"):
        sides = 4 if kind == "qfp" else 2
        bw, bh = (0.76 * w, 0.76 * h) if kind == "qfp" else (w, 0.58 * h)
        n = 5 if kind == "qfp" else 4
        pin_len = (h - bh) / 2
        pitch = (bw if kind == "soic" else bw * 0.9) / n
        for side in range(sides):
            for k in range(n):
                off = (k - (n - 1) / 2) * pitch
                # soic pins on the top and bottom edges; qfp pins on all four edges
                if side in (0, 1):
                    y = (bh / 2 + pin_len / 2) * (1 if side == 0 else -1)
                    pads.append(("poly", _rect(off, y, pitch * 0.7, pin_len * 1.3), _TIN))
                    body.append(("poly", _rect(off, y, pitch * 0.42, pin_len), (168, 168, 164)))
                else:
                    x = (bw / 2 + pin_len / 2) * (1 if side == 2 else -1)
                    pads.append(("poly", _rect(x, off, pin_len * 1.3, pitch * 0.7), _TIN))
                    body.append(("poly", _rect(x, off, pin_len, pitch * 0.42), (168, 168, 164)))
        body.append(("poly", _rect(0, 0, bw, bh), _BLACK))
        body.append(("circle", (-bw * 0.34, -bh * 0.3), (70, 70, 74), 0.06 * min(bw, bh)))
        body.append(("poly", _rect(0.05 * bw, 0.02 * bh, 0.5 * bw, 0.06 * bh), (78, 78, 80)))
        body.append(("poly", _rect(0.05 * bw, 0.16 * bh, 0.36 * bw, 0.05 * bh), (70, 70, 72)))
    elif kind == "electrolytic":
        r = w / 2
        pads += [("poly", _rect(side * 0.62 * w, 0, 0.3 * w, 0.26 * w), _TIN) for side in (-1, 1)]
        body.append(("poly", _rect(0, 0, w * 1.02, h * 1.02), (40, 40, 44)))  # the square plastic base
        body.append(("circle", (0, 0), (36, 46, 104), r * 0.96))
        body.append(("poly", _arc_band(0.8 * r, 0.96 * r, 2.2, 4.1), (176, 180, 206)))  # polarity stripe
        body.append(("circle", (0, 0), (184, 184, 190), r * 0.78))
        body.append(("line", np.array([[-0.5 * r, 0], [0.5 * r, 0]]), (128, 128, 134), 0.06 * r))
        body.append(("line", np.array([[0, -0.5 * r], [0, 0.5 * r]]), (128, 128, 134), 0.06 * r))
        body.append(("circle", (-0.3 * r, -0.35 * r), (214, 214, 220), 0.12 * r))  # specular glint
    elif kind == "crystal":
        pads += [("poly", _rect(side * 0.42 * w, 0, 0.24 * w, 1.3 * h), _TIN) for side in (-1, 1)]
        body.append(("poly", _rounded_rect(w, h, 0.45 * h), (200, 200, 206)))
        body.append(("poly", _rounded_rect(0.86 * w, 0.7 * h, 0.34 * h), (172, 172, 178)))
    elif kind == "header":
        n = 8
        pitch = w / n
        for k in range(n):
            x = (k - (n - 1) / 2) * pitch
            pads += [("circle", (x, 0), _GOLD, 0.36 * pitch), ("circle", (x, 0), (30, 30, 30), 0.18 * pitch)]
            body.append(("poly", _rect(x, 0, 0.42 * pitch, 0.42 * pitch), (214, 178, 72)))
            body.append(("poly", _rect(x, 0, 0.2 * pitch, 0.2 * pitch), (150, 118, 44)))
        body.insert(0, ("poly", _rect(0, 0, w, h), (34, 34, 37)))
    elif kind in ("resistor", "ceramic"):
        pads += [("poly", _rect(side * 0.42 * w, 0, 0.3 * w, 1.2 * h), _TIN) for side in (-1, 1)]
        body.append(("poly", _rect(0, 0, w * 0.9, h), (150, 150, 146)))
        colour = _BLACK if kind == "resistor" else (176, 146, 98)
        body.append(("poly", _rect(0, 0, w * 0.6, h), colour))
    else:
        raise ValueError(f"unknown part kind {kind!r}")
    return pads, body


def _place(shapes: list, centre: np.ndarray, angle_deg: float, scale: float) -> list:
    """Shapes from a part's frame (units of the image side) into pixels."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return [
        (kind, centre + np.asarray(geometry) @ rot.T * scale, shape_colour, *(t * scale for t in size))
        for kind, geometry, shape_colour, *size in shapes
    ]


def _paint(canvas: np.ndarray, shapes: list, colour=None) -> None:
    """Fill shapes in pixel coordinates; `colour` overrides theirs (to draw masks)."""
    for kind, geometry, shape_colour, *size in shapes:
        c = shape_colour if colour is None else colour
        pts = np.round(geometry).astype(np.int32)
        if kind == "poly":
            cv2.fillPoly(canvas, [pts], c)
        elif kind == "circle":
            cv2.circle(canvas, (int(pts[0]), int(pts[1])), max(1, int(round(size[0]))), c, -1)
        else:
            cv2.polylines(canvas, [pts], False, c, max(1, int(round(size[0]))))


def _circuit_scene(rng: np.random.Generator, s: int) -> dict:
    """All random draws of a good board: its pose, the parts' placement jitter, surface texture."""
    parts = {
        name: dict(kind=kind, offset=np.array([x, y]) + rng.normal(0, 0.003, 2), size=(w, h), angle=rng.normal(0, 1.0))
        for name, (kind, x, y, w, h) in _PARTS.items()
    }
    return dict(
        centre=0.5 + rng.normal(0, 0.008, 2), angle=rng.normal(0, 1.2), parts=parts,
        decor_jitter=rng.normal(0, 0.002, (len(_DECOR), 2)), texture=_low_freq(rng, s, 8),
    )


def _board_to_pixels(scene: dict, offset: np.ndarray, scale: float) -> np.ndarray:
    a = np.deg2rad(scene["angle"])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return (scene["centre"] + rot @ np.asarray(offset)) * scale


def _part_pixels(scene: dict, part: dict, scale: float) -> tuple[list, list]:
    pads, body = _part_shapes(part["kind"], *part["size"])
    angle = scene["angle"] + part["angle"]
    centre = _board_to_pixels(scene, part["offset"], scale)
    pads_px = _place(pads, _board_to_pixels(scene, part.get("pad_offset", part["offset"]), scale),
                     scene["angle"] + part.get("pad_angle", part["angle"]), scale)
    return pads_px, _place(body, centre, angle, scale)


def _render_circuit(scene: dict, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw the board supersampled; returns (float RGB image, board mask)."""
    P = s * _SS
    canvas = np.empty((P, P, 3), np.uint8)
    canvas[:] = _BACKGROUND
    board_centre = _board_to_pixels(scene, (0, 0), P)
    board = _place([("poly", _rounded_rect(*_BOARD_SIZE, 0.025), _GREEN)], board_centre, scene["angle"], P)
    shadow = np.zeros((s, s), np.float32)
    _paint(shadow, _place(board, np.array([0.012, 0.016]) * s, 0, 1 / _SS), 1.0)
    _paint(canvas, board)
    for trace in _TRACES:
        pts = np.array([_board_to_pixels(scene, p, P) for p in trace])
        _paint(canvas, [("line", pts, _TRACE, 0.011 * P)])
    for via in _VIAS:
        c = _board_to_pixels(scene, via, P)
        _paint(canvas, [("circle", c, _GOLD, 0.011 * P), ("circle", c, (20, 40, 26), 0.005 * P)])
    for sx in (-1, 1):
        for sy in (-1, 1):
            c = _board_to_pixels(scene, (sx * 0.34, sy * 0.255), P)
            _paint(canvas, [("circle", c, _GOLD, 0.024 * P), ("circle", c, _BACKGROUND, 0.014 * P)])
    for name, part in scene["parts"].items():
        w, h = part["size"]
        nominal = _PARTS[name]
        box = _rect(0, 0, w + 0.02, h + 0.02)
        outline = _place([("line", np.vstack([box, box[:1]]), _SILK, 0.004)],
                         _board_to_pixels(scene, nominal[1:3], P), scene["angle"], P)
        _paint(canvas, outline)
        corner = _board_to_pixels(scene, (nominal[1] - w / 2 - 0.01, nominal[2] - h / 2 - 0.02), P)
        cv2.putText(canvas, name, tuple(int(v) for v in corner), cv2.FONT_HERSHEY_SIMPLEX, 0.0011 * P,
                    _SILK, max(1, int(0.0035 * P)), cv2.LINE_8)
    for (kind, x, y, w, h, angle), jitter in zip(_DECOR, scene["decor_jitter"]):
        pads, body = _part_shapes(kind, w, h)
        centre = _board_to_pixels(scene, np.array([x, y]) + jitter, P)
        _paint(canvas, _place(pads + body, centre, scene["angle"] + angle, P))
    placed = [(_part_pixels(scene, part, P), part.get("missing", False)) for part in scene["parts"].values()]
    for (pads, _), _ in placed:
        _paint(canvas, pads)  # the pads stay on the board even when their part is missing
    for (_, body), missing in placed:
        if not missing:
            _paint(canvas, body)

    image = cv2.resize(canvas, (s, s), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    board_mask = np.zeros((s, s), np.uint8)
    _paint(board_mask, _place(board, np.zeros(2), 0, 1 / _SS), 1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), 0.012 * s + 0.3) * (1 - board_mask)
    image *= (1 - 0.35 * shadow)[..., None] * (1 + 0.025 * scene["texture"])[..., None]
    return image, board_mask.astype(bool)


def _footprint(scene: dict, part: dict, s: int, with_pads: bool = False) -> np.ndarray:
    """Pixels touched by a part's body (and pads), drawn supersampled: any coverage counts."""
    canvas = np.zeros((s * _SS, s * _SS), np.uint8)
    pads_px, body_px = _part_pixels(scene, part, s * _SS)
    _paint(canvas, (pads_px if with_pads else []) + body_px, 255)
    return cv2.resize(canvas, (s, s), interpolation=cv2.INTER_AREA) > 0


def _missing_part(scene: dict, s: int, rng: np.random.Generator) -> np.ndarray:
    name = list(_PARTS)[rng.integers(len(_PARTS))]
    part = scene["parts"][name]
    mask = _footprint(scene, part, s)
    part["missing"] = True
    return mask


def _misplaced_part(scene: dict, s: int, rng: np.random.Generator) -> np.ndarray:
    name = list(_PARTS)[rng.integers(len(_PARTS))]
    part = scene["parts"][name]
    old = _footprint(scene, part, s)
    others = np.zeros((s, s), bool)
    for other_name, other in scene["parts"].items():
        if other_name != name:
            others |= _footprint(scene, other, s, with_pads=True)
    board = np.zeros((s, s), np.uint8)
    _paint(board, _place([("poly", _rounded_rect(_BOARD_SIZE[0] - 0.02, _BOARD_SIZE[1] - 0.02, 0.02), 1)],
                         _board_to_pixels(scene, (0, 0), s), scene["angle"], s), 1)
    off_board = board == 0
    # the part slid and turned while soldering: search a spot on the board, preferring free ones
    best = (np.inf, part["offset"], part["angle"] + rng.choice([-1, 1]) * rng.uniform(10, 20))
    moved = dict(part, pad_offset=part["offset"], pad_angle=part["angle"])
    for _ in range(40):
        step = rng.uniform(0.5, 1.0) * min(part["size"]) + 0.02
        direction = rng.uniform(0, 2 * np.pi)
        moved["offset"] = part["offset"] + step * np.array([np.cos(direction), np.sin(direction)])
        moved["angle"] = part["angle"] + rng.choice([-1, 1]) * rng.uniform(10, 35) * min(1.0, 0.12 / max(part["size"]))
        new = _footprint(scene, moved, s)
        if (new & off_board).any():
            continue
        clash = (new & others).sum()
        if clash < best[0]:
            best = (clash, moved["offset"], moved["angle"])
        if clash == 0:
            break
    part.update(pad_offset=part["offset"], pad_angle=part["angle"], offset=best[1], angle=best[2])
    return old | _footprint(scene, part, s)


# ----------------------------------------------------------------------------- surface defects

def _finish(alpha: np.ndarray, floor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    # rescale so that the faintest fringe is exactly zero: every changed pixel is in the mask
    alpha = np.clip((alpha - floor) / (1 - floor), 0, 1).astype(np.float32)
    return alpha, alpha > 0


def _draw_paths(s: int, paths: list[np.ndarray], widths: list[np.ndarray], strengths: list[np.ndarray]) -> np.ndarray:
    """Coverage in [0, 1] of polylines (pixel coordinates) drawn supersampled, per-segment width."""
    canvas = np.zeros((s * _SS, s * _SS), np.float32)
    for path, width, strength in zip(paths, widths, strengths):
        pts = np.round((path + 0.5) * _SS - 0.5).astype(np.int32)
        for k in range(len(pts) - 1):
            cv2.line(canvas, tuple(map(int, pts[k])), tuple(map(int, pts[k + 1])), float(strength[k]),
                     max(1, int(round(width[k] * _SS))), cv2.LINE_8)
    return cv2.resize(canvas, (s, s), interpolation=cv2.INTER_AREA)


def _blend(image: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    a = alpha[..., None]
    return image * (1 - a) + np.asarray(colour, np.float32) * a


def _scratch(image: np.ndarray, centre: np.ndarray, rng: np.random.Generator, bright: bool,
             thickness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    s = image.shape[0]
    n = 48
    length = rng.uniform(0.2, 0.4) * s
    t = np.linspace(0, 1, n)
    bend = rng.uniform(-0.9, 0.9) * (t - 0.5) + 0.08 * np.sin(rng.uniform(2, 6) * t + rng.uniform(0, 6))
    heading = rng.uniform(0, 2 * np.pi) + bend
    steps = np.c_[np.cos(heading), np.sin(heading)] * length / (n - 1)
    path = np.cumsum(steps, 0)
    path += centre - path.mean(0)
    width = np.full(n, max(0.8, rng.uniform(1.8, 3.0) * thickness * s / 256))
    strength = np.sin(np.pi * np.clip(t * 1.15 - 0.075, 0.02, 0.98)) ** 0.4 * rng.uniform(0.8, 0.97)
    alpha, mask = _finish(_draw_paths(s, [path], [width], [strength]))
    colour = (0.97, 0.96, 0.92) if bright else (0.05, 0.05, 0.06)
    return _blend(image, alpha, colour), mask


def _random_walk(start: np.ndarray, heading: float, length: float, step: float, rng: np.random.Generator) -> np.ndarray:
    n = max(3, int(length / step))
    kernel = np.exp(-0.5 * (np.arange(-8, 9) / 3.0) ** 2)
    meander = np.convolve(rng.standard_normal(n + 16), kernel / kernel.sum() * 3.0, "valid")[:n]
    angles = heading + 0.35 * meander + rng.normal(0, 0.35, n)  # smooth meander plus jagged steps
    return start + np.cumsum(np.c_[np.cos(angles), np.sin(angles)] * step, 0)


def _crack(image: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = image.shape[0]
    step = max(0.75, s / 256)
    length = rng.uniform(0.25, 0.45) * s
    heading = rng.uniform(0, 2 * np.pi)
    main = _random_walk(centre, heading, length, step, rng)
    main += centre - main.mean(0)
    w0 = max(0.8, rng.uniform(1.8, 2.8) * s / 256)
    paths, widths = [main], [np.linspace(w0, 0.45 * w0, len(main))]
    for _ in range(rng.integers(2, 5)):  # branches split off and thin out faster
        k = rng.integers(len(main) // 5, 4 * len(main) // 5)
        turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        branch = _random_walk(main[k], heading + turn, rng.uniform(0.25, 0.55) * length, step, rng)
        branch = np.vstack([main[k], branch])
        paths.append(branch)
        widths.append(np.linspace(widths[0][k] * 0.8, 0.35 * w0, len(branch)))
    strengths = [np.full(len(p), 1.0) for p in paths]
    alpha, mask = _finish(_draw_paths(s, paths, [np.maximum(w, 0.6) for w in widths], strengths))
    return _blend(image, alpha * rng.uniform(0.75, 0.9), (0.03, 0.03, 0.03)), mask


def _hole(image: np.ndarray, centre: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = image.shape[0]
    a = rng.uniform(0.025, 0.055) * s
    b = a * rng.uniform(0.65, 1.0)
    theta = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
    r = np.sqrt(u ** 2 + v ** 2)
    towards_light = (dx * -0.7071 + dy * -0.7071) / (np.hypot(dx, dy) + 1e-6)  # light from the top left
    rim_width = 0.3
    edge = 1.0 / b  # one pixel, in units of the normalised radius
    inside = np.clip((1 + edge - r) / (2 * edge), 0, 1)
    depth = 0.12 + 0.22 * r ** 2 - 0.1 * towards_light * r ** 3  # dark floor; the wall facing the light is lit
    floor = image * np.clip(depth, 0.04, 1)[..., None]
    out = image * (1 - inside[..., None]) + floor * inside[..., None]
    ring = np.where((r > 1) & (r < 1 + rim_width), np.sin(np.pi * (r - 1) / rim_width), 0) * 0.45 * towards_light
    ring = ring[..., None]
    out = np.where(ring > 0, out + (1 - out) * ring, out * (1 + ring))  # raised rim: lit side bright, far side shadowed
    mask = (inside > 0) | (r < 1 + rim_width)
    return out, mask


def _stain(image: np.ndarray, centre: np.ndarray, rng: np.random.Generator,
           palette: list) -> tuple[np.ndarray, np.ndarray]:
    s = image.shape[0]
    radius = rng.uniform(0.045, 0.1) * s
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    squash = rng.uniform(0.6, 1.0)
    dx, dy = x - centre[0], y - centre[1]
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / (radius * squash)
    field = 1 - np.sqrt(u ** 2 + v ** 2) + 0.3 * _blurred_noise(rng, s, radius / 3)  # irregular outline
    alpha = np.clip(field / 0.5, 0, 1) ** 1.5  # soft edge
    alpha *= 1 + 0.15 * _blurred_noise(rng, s, radius / 6)
    alpha = np.clip(alpha * rng.uniform(0.6, 0.85), 0, 1)
    alpha, mask = _finish(alpha, 0.04)
    colour = np.asarray(palette[rng.integers(len(palette))], np.float32)
    # part absorbs light (darker), part tints: how oil, rust and dirt look on a surface
    out = _blend(image, alpha * 0.7, colour) * (1 - 0.25 * alpha)[..., None]
    return out, mask


_STAIN_COLOURS = {
    "fabric": [(0.30, 0.20, 0.10), (0.55, 0.32, 0.12), (0.10, 0.10, 0.08), (0.55, 0.50, 0.20)],
    "granite": [(0.55, 0.30, 0.10), (0.35, 0.22, 0.10), (0.15, 0.12, 0.10), (0.60, 0.55, 0.25)],
    "circuit": [(0.78, 0.62, 0.18), (0.58, 0.32, 0.10), (0.88, 0.85, 0.74)],  # flux, rust, residue
}


def _random_pixel(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(region)
    k = rng.integers(len(ys))
    return np.array([xs[k], ys[k]], dtype=np.float64)


# ----------------------------------------------------------------------------- one image

def make_image(category: str, defect_type: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image (size x size x 3 uint8 RGB) and its defect mask (bool, all False when good).

    The good scene is drawn from `rng` before the defect, so the same seed with defect_type
    "good" gives the same image without the defect.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; known: {', '.join(CATEGORIES)}")
    if defect_type != "good" and defect_type not in DEFECT_TYPES[category]:
        known = ", ".join(("good",) + DEFECT_TYPES[category])
        raise ValueError(f"unknown defect type {defect_type!r} for {category}; known: {known}")
    s = size
    if category == "circuit":
        scene = _circuit_scene(rng, s)
        lighting = _lighting(rng, s, 0.03)
    else:
        image = _fabric(rng, s) if category == "fabric" else _granite(rng, s)
        lighting = _lighting(rng, s, 0.05)
    noise = 0.008 * rng.standard_normal((s, s, 3), dtype=np.float32)

    mask = np.zeros((s, s), bool)
    if category == "circuit":
        if defect_type == "missing_part":
            mask = _missing_part(scene, s, rng)
        elif defect_type == "misplaced_part":
            mask = _misplaced_part(scene, s, rng)
        image, region = _render_circuit(scene, s)
        region = cv2.erode(region.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, s // 16)) > 0
    else:
        margin = int(0.2 * s)
        region = np.zeros((s, s), bool)
        region[margin:s - margin, margin:s - margin] = True

    if defect_type in ("scratch", "hole", "stain", "crack"):
        centre = _random_pixel(region, rng)
        if defect_type == "scratch":
            bright = category == "circuit" or rng.random() < (0.75 if category == "fabric" else 0.5)
            thickness = 1.3 if category == "granite" else 1.0  # the busy speckle hides thin lines
            image, mask = _scratch(image, centre, rng, bright, thickness)
        elif defect_type == "hole":
            image, mask = _hole(image, centre, rng)
        elif defect_type == "stain":
            image, mask = _stain(image, centre, rng, _STAIN_COLOURS[category])
        else:
            image, mask = _crack(image, centre, rng)

    image = image * lighting + noise
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), mask


# ----------------------------------------------------------------------------- the dataset

def _counts(n: int, k: int) -> list[int]:
    return [n // k + (1 if t < n % k else 0) for t in range(k)]


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def prepare(
    category: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 100,
    n_validation: int = 0,
    n_test_good: int = 20,
    n_test_defect: int = 32,
    size: int = 256,
) -> pd.DataFrame:
    """Generate one category in MVTec layout into `out_dir` (the category folder, replaced whole)
    and return its manifest. Test defects are split evenly across the category's defect types."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; known: {', '.join(CATEGORIES)}")
    seed = _check_count("seed", seed)
    n_train = _check_count("n_train", n_train, 1)
    n_validation, n_test_good = _check_count("n_validation", n_validation), _check_count("n_test_good", n_test_good)
    n_test_defect = _check_count("n_test_defect", n_test_defect)
    size = _check_count("size", size, 32)
    cat = CATEGORIES.index(category)
    types = DEFECT_TYPES[category]

    jobs = [("train", "good", 0, i) for i in range(n_train)]
    jobs += [("validation", "good", 0, i) for i in range(n_validation)]
    jobs += [("test", "good", 0, i) for i in range(n_test_good)]
    for t, (defect_type, n) in enumerate(zip(types, _counts(n_test_defect, len(types)))):
        jobs += [("test", defect_type, t + 1, i) for i in range(n)]

    def write(tmp: Path, job: tuple[str, str, int, int]) -> None:
        split, defect_type, t, i = job
        rng = np.random.default_rng([seed, cat, _SPLIT_CODES[split], t, i])
        image, mask = make_image(category, defect_type, size, rng)
        cv2.imwrite(str(tmp / split / defect_type / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if defect_type != "good":
            cv2.imwrite(str(tmp / "ground_truth" / defect_type / f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)

    def fill(tmp: Path) -> None:
        for split, defect_type, _, _ in jobs:
            (tmp / split / defect_type).mkdir(parents=True, exist_ok=True)
            if defect_type != "good":
                (tmp / "ground_truth" / defect_type).mkdir(parents=True, exist_ok=True)
        # each image has its own generator, so threads change the speed, never the pixels
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(functools.partial(write, tmp), jobs))

    return write_category(out_dir, category, DATASET, fill)
