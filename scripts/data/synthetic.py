"""Deterministic synthetic H&E colon-gland tiles with gland masks: the bundle's demo data set.

The demo data lets the bundle train, validate and test with no download. Each tile imitates a low-magnification
H&E section of colon mucosa:

* stroma: pink (eosin) tissue with smooth multi-scale texture, wavy collagen-like fibres and loose pale areas,
  holding scattered hematoxylin nuclei (round lymphocytes, spindle fibroblasts, occasional inflammatory clusters);
* glands: irregular blobs (an ellipse whose radius carries random harmonics, some elongated, a few merged) with a
  pale lumen and an epithelial rim of light-purple cytoplasm, goblet-cell vacuoles and densely packed dark,
  elongated nuclei sitting near the basement membrane;
* per-image stain variation: the tile is composed as hematoxylin and eosin concentration maps and rendered with
  Beer-Lambert's law using per-image random stain vectors and intensities, then mildly blurred and noised.

The mask is 255 on glands (epithelial rim plus lumen) and 0 elsewhere. Every tile draws from its own random
generator seeded by ``(seed, split, index)``, so a seed always gives byte-identical files and the splits do not
depend on each other's sizes.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from scripts.errors import ConfigError

__all__ = [
    "GENERATOR_VERSION",
    "MIN_IMAGE_SIZE",
    "synthesize_tile",
    "generate_demo_dataset",
    "ensure_demo_dataset",
]

logger = logging.getLogger(__name__)

#: Bump whenever the generated pixels or the layout change, so that cached copies are regenerated.
GENERATOR_VERSION = 1
#: Smallest accepted tile side, in pixels (glands are up to ~120 pixels across).
MIN_IMAGE_SIZE = 64

DATALIST_NAME = "datalist.json"
MANIFEST_NAME = "manifest.json"

# (folder name, id mixed into the per-image seed, datalist key, whether masks are written)
_SPLITS: tuple[tuple[str, int, str, bool], ...] = (
    ("labeled", 0, "training", True),
    ("unlabeled", 1, "unlabeled", False),
    ("validation", 2, "validation", True),
    ("test", 3, "test", True),
)

# Reference optical-density stain vectors (R, G, B): a classic colour-deconvolution pair and a pair typical of
# stain-normalisation references. Each image mixes and perturbs them.
_H_REFS = (np.array([0.650, 0.704, 0.286]), np.array([0.563, 0.720, 0.406]))
_E_REFS = (np.array([0.072, 0.990, 0.105]), np.array([0.216, 0.801, 0.558]))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _interp_weights(n_out: int, n_in: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights of linear interpolation that upsamples ``n_in`` coarse samples by ``factor``."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) / factor + 0.5  # output pixel centres on the coarse grid
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    return lo, (pos - lo).astype(np.float32)


def _upsample(small: np.ndarray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """Separable linear upsampling of a coarse field to ``shape`` (gathers only, no BLAS)."""
    lo, fr = _interp_weights(shape[0], small.shape[0], factor)
    rows = small[lo] * (1.0 - fr)[:, None] + small[lo + 1] * fr[:, None]
    lo, fr = _interp_weights(shape[1], small.shape[1], factor)
    return rows[:, lo] * (1.0 - fr) + rows[:, lo + 1] * fr


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered white noise; large scales are made on a coarse grid."""
    h, w = shape
    factor = max(1, int(sigma // 2))
    if factor == 1:
        field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    else:
        small_shape = (h // factor + 3, w // factor + 3)
        small = ndimage.gaussian_filter(rng.standard_normal(small_shape, dtype=np.float32), sigma / factor,
                                        mode="wrap")
        field = _upsample(small, shape, factor)
    field = field - field.mean()
    return field / (field.std() + 1e-6)


def _stamp_ellipses(shape: tuple[int, int], cy: np.ndarray, cx: np.ndarray, a: np.ndarray, b: np.ndarray,
                    theta: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Draws anti-aliased filled ellipses (maximum where they overlap) in one vectorised pass.

    Args:
        shape: canvas (height, width).
        cy: centre rows (float, sub-pixel).
        cx: centre columns.
        a: semi-axis along ``theta``, in pixels.
        b: semi-axis across ``theta``, in pixels.
        theta: orientation of the ``a`` axis (radians, from the column axis towards the row axis).
        amp: peak value of each ellipse.

    Returns:
        float32 canvas of ``shape``.
    """
    h, w = shape
    if len(cy) == 0:
        return np.zeros(shape, np.float32)
    radius = int(np.ceil(max(float(a.max()), float(b.max())))) + 1
    pad_w = w + 2 * radius
    canvas_shape = (h + 2 * radius, pad_w)
    offs = np.arange(-radius, radius + 1, dtype=np.float32)
    iy = np.floor(cy).astype(np.int64)
    ix = np.floor(cx).astype(np.int64)
    dy = offs[None, :, None] - (cy - iy).astype(np.float32)[:, None, None]
    dx = offs[None, None, :] - (cx - ix).astype(np.float32)[:, None, None]
    cos = np.cos(theta).astype(np.float32)[:, None, None]
    sin = np.sin(theta).astype(np.float32)[:, None, None]
    a3 = a.astype(np.float32)[:, None, None]
    b3 = b.astype(np.float32)[:, None, None]
    u = (dx * cos + dy * sin) / a3
    v = (dy * cos - dx * sin) / b3
    # Near the edge, (1 - q^2) * b / 2 is about the distance to it in pixels (q: elliptic radius): a 1-pixel soft edge.
    val = np.clip((1.0 - (u * u + v * v)) * (0.5 * b3) + 0.5, 0.0, 1.0) * amp.astype(np.float32)[:, None, None]
    rows = iy[:, None, None] + radius + np.arange(-radius, radius + 1)[None, :, None]
    cols = ix[:, None, None] + radius + np.arange(-radius, radius + 1)[None, None, :]
    flat = np.broadcast_to(rows * pad_w + cols, val.shape)
    keep = val > 0
    canvas = np.zeros(canvas_shape, np.float32)
    np.maximum.at(canvas.reshape(-1), flat[keep], val[keep])
    return canvas[radius:radius + h, radius:radius + w]


def _sample_points(rng: np.random.Generator, candidates: np.ndarray, count: int,
                   width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws ``count`` sub-pixel positions inside the pixels whose flat indices are ``candidates``."""
    if count <= 0 or candidates.size == 0:
        return np.zeros(0), np.zeros(0)
    pick = candidates[rng.integers(0, candidates.size, count)]
    cy = pick // width + rng.uniform(0.0, 1.0, count)
    cx = pick % width + rng.uniform(0.0, 1.0, count)
    return cy, cx


def _tissue_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Boolean map of tissue; occasionally a wavy strip along one side is empty glass."""
    h, w = shape
    tissue = np.ones(shape, bool)
    if rng.random() < 0.1:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        side = rng.integers(0, 4)
        coord = (yy, h - 1 - yy, xx, w - 1 - xx)[side]
        depth = rng.uniform(0.08, 0.3) * (h if side < 2 else w)
        wobble = _smooth_noise(rng, shape, 12.0) * rng.uniform(3.0, 8.0)
        tissue = coord + wobble > depth
    return tissue


def _place_glands(rng: np.random.Generator, shape: tuple[int, int], tissue: np.ndarray,
                  lumen_noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Places irregular glands.

    Returns:
        ``(gland, lumen, d_out, rim_width)``: boolean gland and lumen maps (the epithelial rim is gland minus lumen),
        the distance from the gland outline inside glands, and the local rim thickness (0 outside glands).
    """
    h, w = shape
    if rng.random() < 0.15:
        target = rng.uniform(0.05, 0.2)  # a sparse tile
    else:
        target = rng.uniform(0.22, 0.5)
    area_goal = target * tissue.mean() * h * w
    size_scale = rng.uniform(0.8, 1.2)
    merge_prob = rng.uniform(0.0, 0.25)
    gap = rng.uniform(2.0, 6.0)
    rim_frac = rng.uniform(0.4, 0.65)

    gland = np.zeros(shape, bool)
    lumen_any = np.zeros(shape, bool)
    rim_any = np.zeros(shape, bool)
    d_out = np.zeros(shape, np.float32)
    rim_width = np.zeros(shape, np.float32)
    area = 0
    # Candidate glands, drawn up front: size, elongation, orientation, outline harmonics 2..6, centre, merging.
    n_try = 80
    radius = np.clip(size_scale * rng.lognormal(np.log(22.0), 0.35, n_try), 10.0, 55.0)
    aspect = np.clip(1.0 + rng.gamma(1.4, 0.35, n_try), 1.0, 3.2)
    angles = rng.uniform(0.0, np.pi, n_try)
    harms = rng.normal(0.0, 1.0, (n_try, 5)) * (0.16 / np.arange(2, 7))
    phases = rng.uniform(0.0, 2 * np.pi, (n_try, 5))
    centres = rng.uniform(-0.1, 1.1, (n_try, 2)) * (h, w)
    merges = rng.random(n_try) < merge_prob
    thick_jitter = rng.uniform(0.85, 1.15, n_try)
    for i in range(n_try):
        if area >= area_goal:
            break
        cy, cx = centres[i]
        iy, ix = min(max(int(cy), 0), h - 1), min(max(int(cx), 0), w - 1)
        merging = bool(merges[i])
        if not tissue[iy, ix] or (not merging and gland[max(iy - 6, 0):iy + 7, max(ix - 6, 0):ix + 7].any()):
            continue  # the centre is in (or too close to) another gland, or off the tissue
        harm, phase = harms[i], phases[i]
        reach = 1.0 + float(np.abs(harm).sum())  # the outline lies within reach * (ra, rb)
        ra, rb = radius[i] * np.sqrt(aspect[i]), radius[i] / np.sqrt(aspect[i])
        ca, sa = np.cos(angles[i]), np.sin(angles[i])
        ext_y = reach * np.hypot(ra * sa, rb * ca) * (1.0 + gap / rb) + 2  # half-extents of the rotated outline
        ext_x = reach * np.hypot(ra * ca, rb * sa) * (1.0 + gap / rb) + 2
        y0, y1 = max(0, int(cy - ext_y)), min(h, int(cy + ext_y) + 1)
        x0, x1 = max(0, int(cx - ext_x)), min(w, int(cx + ext_x) + 1)
        if y1 - y0 < 4 or x1 - x0 < 4:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
        u = (xx * np.float32(ca) + yy * np.float32(sa)) / np.float32(ra)
        v = (yy * np.float32(ca) - xx * np.float32(sa)) / np.float32(rb)
        rho = np.sqrt(u * u + v * v)
        existing = gland[y0:y1, x0:x1]
        if not merging and existing.any():
            # Shrink the candidate so that it keeps its gap to the nearest gland (small glands fill the gaps).
            scale = min(1.0, (float(rho[existing].min()) - reach * gap / rb) / reach)
            if scale * rb < 7.0:
                continue
            ra, rb, rho = ra * scale, rb * scale, rho / np.float32(scale)
        # Outline radius 1 + sum_k harm_k cos(k t + phase_k), with cos/sin(k t) from powers of exp(i t).
        unit = (u + 1j * v) / np.maximum(np.sqrt(u * u + v * v), np.float32(1e-6))
        power = unit * unit
        bound = np.ones_like(rho)
        for hk, pk in zip(harm, phase):
            bound += np.float32(hk) * (power.real * np.float32(np.cos(pk)) - power.imag * np.float32(np.sin(pk)))
            power = power * unit
        inside = rho <= bound
        if inside.sum() < 40:
            continue
        if not merging and (existing & (rho <= bound * (1.0 + gap / rb))).any():
            continue
        if (inside & ~tissue[y0:y1, x0:x1]).any():
            continue
        # Epithelial rim: a band of roughly constant thickness inside the outline (image borders do not count as
        # outline, so cut glands keep their rim only where the boundary really is).
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        inside = inside[r0:r1, c0:c1]
        y0, y1, x0, x1 = y0 + r0, y0 + r1, x0 + c0, x0 + c1
        dist = ndimage.distance_transform_edt(np.pad(inside, 1, mode="edge"))[1:-1, 1:-1].astype(np.float32)
        thickness = min(max(rim_frac * rb * thick_jitter[i], 5.0), 15.0)
        width = thickness * (1.0 + 0.25 * np.clip(lumen_noise[y0:y1, x0:x1], -1.2, 2.0))
        lumen = dist > width
        area += int((inside & ~gland[y0:y1, x0:x1]).sum())
        gland[y0:y1, x0:x1] |= inside
        lumen_any[y0:y1, x0:x1] |= lumen
        rim_any[y0:y1, x0:x1] |= inside & ~lumen
        np.maximum(d_out[y0:y1, x0:x1], dist * inside, out=d_out[y0:y1, x0:x1])
        rim_width[y0:y1, x0:x1][inside] = width[inside]
    return gland, lumen_any & ~rim_any, d_out, rim_width


def _phi(x: float) -> float:
    """Standard normal cumulative distribution function."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _stain_vectors(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-image hematoxylin and eosin optical-density unit vectors."""
    t_h, t_e = rng.uniform(0.0, 1.0), rng.uniform(0.4, 1.0)
    hem = (1 - t_h) * _H_REFS[0] + t_h * _H_REFS[1] + rng.normal(0.0, 0.05, 3)
    eos = (1 - t_e) * _E_REFS[0] + t_e * _E_REFS[1] + rng.normal(0.0, 0.04, 3)
    hem = np.clip(hem, 0.05, None)
    eos = np.clip(eos, 0.03, None)
    return (hem / np.linalg.norm(hem)).astype(np.float32), (eos / np.linalg.norm(eos)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# One tile
# ----------------------------------------------------------------------------------------------------------------


def synthesize_tile(rng: np.random.Generator, size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """Synthesises one H&E-like colon tile and its gland mask.

    Args:
        rng: the random generator to draw from; the output is a deterministic function of its state.
        size: tile (height, width) in pixels, each at least ``MIN_IMAGE_SIZE``. The scale is fixed (glands are
            roughly 20-110 pixels across), so larger tiles hold more glands.

    Returns:
        ``(image, mask)``: an ``H x W x 3`` uint8 RGB image and an ``H x W`` uint8 mask, 255 on glands (epithelial
        rim and lumen) and 0 elsewhere.
    """
    h, w = _check_size(size, "size")
    shape = (h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # --- layout --------------------------------------------------------------------------------------------------
    tissue = _tissue_map(rng, shape)
    lumen_noise = _smooth_noise(rng, shape, 3.0)
    gland, lumen, d_out, rim_width = _place_glands(rng, shape, tissue, lumen_noise)
    rim = gland & ~lumen
    # Relative depth in the rim: 0 at the basement membrane, 1 at the lumen.
    depth = np.clip(d_out / np.maximum(rim_width, 1e-3), 0.0, 1.0)
    # Blurred gland map: thresholds of it approximate distances outside glands (Phi(-d / 2) at distance d).
    near_gland = ndimage.gaussian_filter(gland.astype(np.float32), 2.0)
    stroma_ok = (near_gland < _phi(-2.5 / 2.0)) & tissue  # at least ~2.5 px away from any gland

    # --- textures ------------------------------------------------------------------------------------------------
    n_fine = _smooth_noise(rng, shape, 0.8)
    n_mid = _smooth_noise(rng, shape, 4.0)
    n_big = _smooth_noise(rng, shape, 16.0)
    n_loose = _smooth_noise(rng, shape, 8.0)
    fibre_angle = rng.uniform(0.0, np.pi)
    period = rng.uniform(4.0, 8.0)
    warp = _smooth_noise(rng, shape, 18.0) * rng.uniform(4.0, 9.0) + _smooth_noise(rng, shape, 6.0) * 1.2
    phase = (xx * np.cos(fibre_angle) + yy * np.sin(fibre_angle)) * (2 * np.pi / period) + warp
    fibres = 0.5 + 0.5 * np.sin(phase)
    for _ in range(int(rng.integers(2, 4))):  # thin bright strands: the 4th or 8th power of a wavy sine
        fibres = fibres * fibres
    fibres *= np.clip(0.6 * _smooth_noise(rng, shape, 14.0) + 0.5 * n_mid, 0.0, 1.0)  # broken, patchy strands
    loose = np.clip((n_loose - rng.uniform(1.0, 2.0)) * 1.5, 0.0, 1.0)  # pale oedematous patches

    # --- per-region stain concentrations (before nuclei) ---------------------------------------------------------
    e_stroma = rng.uniform(0.45, 0.75)
    stroma_e = e_stroma * (0.85 + 0.12 * n_big + 0.08 * n_mid + 0.35 * fibres) * (1.0 - 0.5 * loose)
    stroma_h = rng.uniform(0.03, 0.1) * (1.0 + 0.3 * n_mid)
    cyto_e = rng.uniform(0.14, 0.3) * (1.0 + 0.12 * n_mid)
    cyto_h = rng.uniform(0.3, 0.5) * (1.0 + 0.12 * n_mid) * (1.0 + 0.25 * (1.0 - depth))
    lumen_e = rng.uniform(0.02, 0.1) * np.clip(1.0 + 0.6 * n_mid, 0.0, None)
    lumen_h = rng.uniform(0.0, 0.04) * np.clip(1.0 + 0.6 * n_big, 0.0, None)

    soft = rng.uniform(0.5, 0.9)
    w_rim = ndimage.gaussian_filter(rim.astype(np.float32), soft)
    w_lumen = ndimage.gaussian_filter(lumen.astype(np.float32), soft)
    w_stroma = 1.0 - w_rim - w_lumen
    conc_e = w_stroma * stroma_e + w_rim * cyto_e + w_lumen * lumen_e
    conc_h = w_stroma * stroma_h + w_rim * cyto_h + w_lumen * lumen_h

    # A thin pale retraction gap around some glands (a common fixation artefact).
    if rng.random() < 0.5:
        gap_w = rng.uniform(1.0, 3.0)
        halo = ~gland & (near_gland > _phi(-gap_w / 2.0)) & (_smooth_noise(rng, shape, 5.0) > rng.uniform(-0.5, 0.8))
        halo = ndimage.gaussian_filter(halo.astype(np.float32), 0.6)
        conc_e = conc_e * (1.0 - 0.8 * halo)
        conc_h = conc_h * (1.0 - 0.8 * halo)

    # --- goblet-cell vacuoles in the epithelium ------------------------------------------------------------------
    rim_area = int(rim.sum())
    flat_mid_rim = np.flatnonzero(rim & (depth > 0.3) & (depth < 0.9))
    n_gob = int(rim_area * rng.uniform(0.0, 0.012))
    gy, gx = _sample_points(rng, flat_mid_rim, n_gob, w)
    g_r = rng.uniform(1.3, 2.6, gy.size)
    goblets = _stamp_ellipses(shape, gy, gx, g_r * rng.uniform(1.0, 1.4, gy.size), g_r,
                              rng.uniform(0, np.pi, gy.size), rng.uniform(0.6, 0.9, gy.size))
    conc_e = conc_e * (1.0 - goblets)
    conc_h = conc_h * (1.0 - 0.85 * goblets)

    # --- nuclei --------------------------------------------------------------------------------------------------
    # Epithelial nuclei: dense, elongated across the rim, close to the basement membrane.
    potential = ndimage.gaussian_filter(d_out, 1.0)  # grows inwards from the outline
    grad_y, grad_x = np.gradient(potential)
    basal = np.flatnonzero(rim & (d_out >= 1.5) & (d_out <= 6.0) & ((depth < rng.uniform(0.35, 0.6)) | (d_out < 3)))
    outline = int((rim & (d_out < 1.5)).sum())  # gland perimeter in pixels
    n_epi = int(outline * rng.uniform(0.4, 0.75)) if basal.size else 0
    ey, ex = _sample_points(rng, basal, n_epi, w)
    eyi, exi = ey.astype(np.int64).clip(0, h - 1), ex.astype(np.int64).clip(0, w - 1)
    e_theta = np.arctan2(grad_y[eyi, exi], grad_x[eyi, exi]) + rng.normal(0.0, 0.25, ey.size)
    # Long axis across the rim, but not reaching out of the gland.
    e_a = np.minimum(rng.uniform(2.6, 4.3, ey.size), d_out[eyi, exi] + 0.8)
    e_b = np.minimum(rng.uniform(1.2, 1.9, ey.size), e_a)
    e_amp = rng.uniform(0.75, 1.0, ey.size)

    # Stromal nuclei: round lymphocytes / plasma cells and spindle fibroblasts along the fibres.
    stroma_px = np.flatnonzero(stroma_ok)
    n_str = int(stroma_px.size * rng.uniform(0.002, 0.007))
    sy, sx = _sample_points(rng, stroma_px, n_str, w)
    spindle = rng.random(sy.size) < rng.uniform(0.25, 0.6)
    r_round = rng.uniform(1.5, 2.6, sy.size)
    s_a = np.where(spindle, rng.uniform(3.0, 5.5, sy.size), r_round * rng.uniform(1.0, 1.3, sy.size))
    s_b = np.where(spindle, rng.uniform(0.9, 1.4, sy.size), r_round)
    s_theta = np.where(spindle, fibre_angle + np.pi / 2 + rng.normal(0.0, 0.35, sy.size),
                       rng.uniform(0, np.pi, sy.size))
    s_amp = np.where(spindle, rng.uniform(0.6, 0.85, sy.size), rng.uniform(0.8, 1.05, sy.size))
    # Inflammatory clusters of small round cells.
    cy_list, cx_list = [], []
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.5 else 0):
        n_c = int(rng.integers(20, 90))
        spread = rng.uniform(8.0, 22.0)
        cy_list.append(rng.normal(rng.uniform(0, h), spread, n_c))
        cx_list.append(rng.normal(rng.uniform(0, w), spread, n_c))
    if cy_list:
        iy_c, ix_c = np.concatenate(cy_list), np.concatenate(cx_list)
        ok = (iy_c >= 0) & (iy_c < h) & (ix_c >= 0) & (ix_c < w)
        iy_c, ix_c = iy_c[ok], ix_c[ok]
        ok = stroma_ok[iy_c.astype(int), ix_c.astype(int)]
        iy_c, ix_c = iy_c[ok], ix_c[ok]
        r_c = rng.uniform(1.4, 2.2, iy_c.size)
        sy, sx = np.concatenate([sy, iy_c]), np.concatenate([sx, ix_c])
        s_a, s_b = np.concatenate([s_a, r_c]), np.concatenate([s_b, r_c])
        s_theta = np.concatenate([s_theta, np.zeros(iy_c.size)])
        s_amp = np.concatenate([s_amp, rng.uniform(0.85, 1.05, iy_c.size)])

    nuclei = np.maximum(_stamp_ellipses(shape, ey, ex, e_a, e_b, e_theta, e_amp),
                        _stamp_ellipses(shape, sy, sx, s_a, s_b, s_theta, s_amp))
    nuclei *= np.clip(1.0 + 0.15 * n_fine, 0.5, 1.3)  # chromatin texture
    h_nuc = rng.uniform(1.5, 2.1)
    conc_h = conc_h * (1.0 - nuclei) + nuclei * h_nuc
    conc_e = conc_e * (1.0 - 0.6 * nuclei) + nuclei * 0.12

    # --- render: stains, blur, noise -----------------------------------------------------------------------------
    tissue_soft = ndimage.gaussian_filter(tissue.astype(np.float32), 1.5) if not tissue.all() else np.float32(1.0)
    grain = 1.0 + 0.06 * n_fine
    conc_h = np.clip(conc_h * tissue_soft * grain, 0.0, None) * rng.uniform(0.75, 1.3)
    conc_e = np.clip(conc_e * tissue_soft * grain, 0.0, None) * rng.uniform(0.7, 1.35)
    blur = rng.uniform(0.4, 1.0)
    conc_h = ndimage.gaussian_filter(conc_h, blur)
    conc_e = ndimage.gaussian_filter(conc_e, blur)
    hem, eos = _stain_vectors(rng)
    glass = rng.uniform(0.0, 0.06, 3).astype(np.float32)
    od = conc_h[..., None] * hem + conc_e[..., None] * eos + glass
    rgb = 255.0 * np.exp(-od) + np.float32(rng.uniform(1.0, 3.5)) * rng.standard_normal((h, w, 3), dtype=np.float32)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    mask = np.where(gland, 255, 0).astype(np.uint8)
    return image, mask


# ----------------------------------------------------------------------------------------------------------------
# Data set on disk
# ----------------------------------------------------------------------------------------------------------------


def _check_size(size: Any, name: str) -> tuple[int, int]:
    """Validates a (height, width) pair of integers of at least ``MIN_IMAGE_SIZE`` each."""
    is_pair = isinstance(size, (tuple, list)) and len(size) == 2
    if not is_pair or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        raise ConfigError(f"{name} must be a (height, width) pair of integers, got {size!r}; "
                         f"pass e.g. {name}=(256, 256).")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ConfigError(f"{name} must be positive, got {size!r}; pass a (height, width) of at least "
                         f"{MIN_IMAGE_SIZE} pixels each, e.g. {name}=(256, 256).")
    if h < MIN_IMAGE_SIZE or w < MIN_IMAGE_SIZE:
        raise ConfigError(f"{name}={size!r} is too small for glands to fit; use at least {MIN_IMAGE_SIZE} pixels "
                         f"per side, e.g. {name}=(256, 256).")
    return h, w


def _parameters(seed: int, n_labeled: int, n_unlabeled: int, n_validation: int, n_test: int,
                image_size: Any) -> dict[str, Any]:
    """Validates the arguments and returns them as a JSON-ready dict."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0.")
    counts = {"n_labeled": n_labeled, "n_unlabeled": n_unlabeled, "n_validation": n_validation, "n_test": n_test}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer number of images, got {value!r}.")
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}; pass a non-negative number of images.")
    if n_labeled == 0:
        raise ConfigError("n_labeled must be >= 1, got 0; training needs at least one labeled image, "
                         "pass e.g. n_labeled=8.")
    h, w = _check_size(image_size, "image_size")
    return {"seed": int(seed), **{k: int(v) for k, v in counts.items()}, "image_size": [h, w]}


def _manifest(params: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for split, _, _, with_masks in _SPLITS:
        n = params[f"n_{split}"]
        files[split] = {"images": n, "masks": n if with_masks else 0}
    return {"generator_version": GENERATOR_VERSION, "parameters": params, "files": files}


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, manifest: dict[str, Any]) -> bool:
    """True when ``root`` holds a data set with exactly this manifest and all the files its datalist names."""
    if _read_json(root / MANIFEST_NAME) != manifest:
        return False
    datalist = _read_json(root / DATALIST_NAME)
    if not isinstance(datalist, dict):
        return False
    for _, _, key, _ in _SPLITS:
        for item in datalist.get(key, []):
            for rel in item.values():
                if not (root / rel).is_file():
                    return False
    return True


def _check_replaceable(root: Path) -> None:
    """Raises unless ``root`` is absent, an empty folder or a demo data set (which may then be replaced)."""
    if not root.exists() and not root.is_symlink():
        return
    if root.is_dir() and not root.is_symlink():
        if (root / MANIFEST_NAME).is_file() or not any(root.iterdir()):
            return
    raise ConfigError(f"{root} exists and is not a demo data set (no {MANIFEST_NAME}); refusing to overwrite "
                      f"it. Choose another folder for the demo data or remove this one.")


def _remove_stale(root: Path) -> None:
    """Deletes an outdated demo data set (or an empty folder) at ``root``; refuses anything else."""
    _check_replaceable(root)
    if root.exists():
        shutil.rmtree(root)


def _write(root: Path, params: dict[str, Any]) -> Path:
    """Generates the whole data set into a temporary sibling of ``root`` and moves it into place."""
    h, w = params["image_size"]
    _check_replaceable(root)  # fail before spending time on generation
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    manifest = _manifest(params)
    datalist: dict[str, list[dict[str, str]]] = {}
    try:
        for split, split_id, key, with_masks in _SPLITS:
            (tmp / split / "images").mkdir(parents=True)
            if with_masks:
                (tmp / split / "masks").mkdir(parents=True)
            entries = []
            for index in range(params[f"n_{split}"]):
                rng = np.random.default_rng([params["seed"], split_id, index])
                image, mask = synthesize_tile(rng, (h, w))
                name = f"demo_{index:04d}.png"
                entry = {"image": f"{split}/images/{name}"}
                Image.fromarray(image, mode="RGB").save(tmp / entry["image"], format="PNG", compress_level=1)
                if with_masks:
                    entry["label"] = f"{split}/masks/{name}"
                    Image.fromarray(mask, mode="L").save(tmp / entry["label"], format="PNG")
                entries.append(entry)
            datalist[key] = entries
        with open(tmp / DATALIST_NAME, "w", encoding="utf-8") as f:
            json.dump(datalist, f, indent=1)
            f.write("\n")
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        if _is_complete(root, manifest):  # another process finished the same data set meanwhile
            shutil.rmtree(tmp)
        else:
            _remove_stale(root)
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / DATALIST_NAME


def generate_demo_dataset(root: str | os.PathLike, seed: int = 0, n_labeled: int = 8, n_unlabeled: int = 72,
                          n_validation: int = 8, n_test: int = 8,
                          image_size: tuple[int, int] = (256, 256)) -> Path:
    """Writes the synthetic demo data set (PNG images and masks, ``datalist.json``, ``manifest.json``) to ``root``.

    Layout (paths in the datalist are relative to ``root``)::

        labeled/images/demo_0000.png     labeled/masks/demo_0000.png      -> "training"
        unlabeled/images/demo_0000.png   (no masks)                       -> "unlabeled"
        validation/images/...            validation/masks/...             -> "validation"
        test/images/...                  test/masks/...                   -> "test"

    The set is generated in a temporary sibling folder and renamed into place, so ``root`` never holds a partial
    set. An existing demo data set at ``root`` is replaced; any other non-empty folder is left alone and a
    ``ConfigError`` is raised.

    Args:
        root: folder to create.
        seed: non-negative seed; the same seed gives byte-identical files.
        n_labeled: number of labeled training images (image and mask), at least 1.
        n_unlabeled: number of unlabeled training images (image only).
        n_validation: number of validation images with masks.
        n_test: number of test images with masks.
        image_size: (height, width) of every image, at least ``MIN_IMAGE_SIZE`` each.

    Returns:
        Path of the written ``datalist.json``.

    Raises:
        ValueError: an argument is out of range.
        ConfigError: ``root`` exists and is not a demo data set.
    """
    params = _parameters(seed, n_labeled, n_unlabeled, n_validation, n_test, image_size)
    root = Path(root)
    h, w = params["image_size"]
    logger.info("Generating demo data set in %s (%d labeled, %d unlabeled, %d validation, %d test images of %dx%d, "
                "seed %d)", root, n_labeled, n_unlabeled, n_validation, n_test, h, w, seed)
    start = time.perf_counter()
    datalist = _write(root, params)
    total = n_labeled + n_unlabeled + n_validation + n_test
    logger.info("Demo data set ready: %d images in %.1f s (%s)", total, time.perf_counter() - start, datalist)
    return datalist


def ensure_demo_dataset(root: str | os.PathLike, seed: int = 0, n_labeled: int = 8, n_unlabeled: int = 72,
                        n_validation: int = 8, n_test: int = 8, image_size: tuple[int, int] = (256, 256)) -> Path:
    """Returns the demo data set's ``datalist.json``, generating the set only when needed.

    A copy at ``root`` is reused when its ``manifest.json`` matches these parameters and ``GENERATOR_VERSION`` and
    every file its datalist names exists; otherwise the set is (re)generated with :func:`generate_demo_dataset`.

    Args:
        root: folder of the demo data set; the other arguments are those of :func:`generate_demo_dataset`.

    Returns:
        Path of ``datalist.json`` under ``root``.

    Raises:
        ValueError: an argument is out of range.
        ConfigError: ``root`` exists and is not a demo data set.
    """
    params = _parameters(seed, n_labeled, n_unlabeled, n_validation, n_test, image_size)
    root = Path(root)
    if _is_complete(root, _manifest(params)):
        logger.debug("Reusing demo data set in %s", root)
        return root / DATALIST_NAME
    return generate_demo_dataset(root, seed, n_labeled, n_unlabeled, n_validation, n_test, image_size)
