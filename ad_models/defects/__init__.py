"""Artificial-defect synthesis: where a defect goes (masks), what it is made of (sources), how it
is put in (blends), and one configurable entry point.

    from ad_models.defects import DefectConfig, DefectSynthesizer
    synth = DefectSynthesizer(DefectConfig(masks={"perlin": 1.0}, source="procedural", blend="replace"))
    defective, masks = synth(images, generator)  # images [B, 3, H, W] in [0, 1]; CPU torch.Generator
    # defective: same shape/device/dtype; masks [B, 1, H, W] float32 in {0, 1}

Entry point (synthesis.py)
    DefectConfig            plain-data config; `from_dict` / `to_dict`; validated on construction
    DefectSynthesizer       config -> callable (images, generator) -> (defective, masks)
    DefectMixture           several configs, one drawn per image by weight; the same call

Masks (masks.py); batched ones return [n, H, W] float32 in {0, 1}
    perlin_mask, perlin_masks, perlin_noise   DRAEM's rotated, thresholded Perlin noise
    rectangle_mask, rectangle_masks           axis-aligned rectangles (CutPaste's area/aspect ranges)
    stroke_mask, stroke_masks                 free-form brush strokes (DeepFill v2's recipe)
    grid_masks, grid_cell_sizes               RIAD's n complementary inpainting masks on a grid of cells
    foreground_mask                           the object of an image on a plain background ([B, H, W] bool)
    fallback_masks, random_points             a small square / a random pixel inside a region

Sources (sources.py): `sample(n, H, W, generator, device) -> [n, 3, H, W]` in [0, 1]
    ProceduralSource        noise, stripes, blobs, gradients, cells, made in torch (works offline)
    FolderSource            the images of a folder (recursive; anything OpenCV reads)
    augment                 DRAEM's photometric augmentation: k distinct ops out of AUGMENTATIONS
    color_jitter            CutPaste's ColorJitter(0.1, 0.1, 0.1, 0.1)
    rearrange, grid_shuffle the images' own content out of place: grid shuffle, flip, another image
                            (source="rearranged", SLSG's scar anomalies)

Blends (blend.py): pixels outside the mask stay bit-identical
    blend_replace           x * (1 - M) + src * M (NDP-Net's Eq. 1)
    blend_beta              DRAEM: (1 - beta) * src + beta * x inside the mask
    cutpaste                CutPaste and CutPaste-scar on a batch; cutpaste_geometry and paste are its parts

Every random draw comes from the CPU torch.Generator the caller passes; the work runs on the
images' device. Same seed, same draws: identical tensors on the CPU, equal up to float rounding on
a GPU. This package imports nothing from ad_models.methods or pipelines.
"""
from __future__ import annotations

from ad_models.defects.blend import blend_beta, blend_replace, cutpaste, cutpaste_geometry, paste
from ad_models.defects.masks import (fallback_masks, foreground_mask, grid_cell_sizes, grid_masks, perlin_mask,
                                     perlin_masks, perlin_noise, random_points, rectangle_mask, rectangle_masks,
                                     stroke_mask, stroke_masks)
from ad_models.defects.sources import (AUGMENTATIONS, REARRANGEMENTS, FolderSource, ProceduralSource, augment,
                                      color_jitter, grid_shuffle, rearrange)
from ad_models.defects.synthesis import BLENDS, MASK_KINDS, DefectConfig, DefectMixture, DefectSynthesizer, make_source

__all__ = [
    "AUGMENTATIONS", "BLENDS", "MASK_KINDS", "REARRANGEMENTS", "DefectConfig", "DefectMixture",
    "DefectSynthesizer", "FolderSource", "ProceduralSource", "augment", "grid_shuffle", "rearrange", "blend_beta", "blend_replace", "color_jitter", "cutpaste",
    "cutpaste_geometry", "fallback_masks", "foreground_mask", "grid_cell_sizes", "grid_masks", "make_source",
    "paste", "perlin_mask", "perlin_masks", "perlin_noise", "random_points", "rectangle_mask",
    "rectangle_masks", "stroke_mask", "stroke_masks",
]
