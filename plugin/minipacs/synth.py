"""Realistic synthetic DICOM studies: demo data, test data and benchmark load.

    cd plugin   # or put plugin/ on PYTHONPATH
    python -m minipacs.synth OUT --patients 20                        # a folder of .dcm files
    python -m minipacs.synth --orthanc http://localhost:8042 --patients 20      # REST
    python -m minipacs.synth --store localhost:4242 --aec MINIPACS --patients 20  # C-STORE

Images are painted from small anatomical models rather than noise, so the archive, the renderer
and an anomaly model see what a PACS sees: CT chest in Hounsfield units (body, lungs with vessel
and airway trees, heart, great vessels, spine, ribs, table, nodules) changing smoothly along z;
MR head and abdomen in several weightings; CR/DX chest radiographs projected from the same chest
model; and a few anomalous instances, named in Image Comments (``ANOMALY_COMMENT``). Everything
derives from ``(seed, patient index)``: the same arguments give the same bytes, and any patient
can be made alone.

Tissues are painted as integer labels with Pillow's ImageDraw (C speed), then mapped per
modality through a lookup table; numpy adds the smooth fields, the reconstruction kernel and the
noise. Only numpy, pydicom and Pillow are used, so training and tests can import it anywhere.
"""

import argparse
import io
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from functools import cached_property, partial
from itertools import repeat
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (ComputedRadiographyImageStorage, CTImageStorage,
                         DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian,
                         MRImageStorage, SecondaryCaptureImageStorage, generate_uid)
from pydicom.valuerep import DSfloat

from .client import Orthanc
from .render import window_linear

ANOMALIES = ("burned_in_dialog", "photograph", "saturated_window", "corrupted_rows")
ANOMALY_COMMENT = "synthetic anomaly: "


# --- tissues ------------------------------------------------------------------------------------

class T:
    """Tissue labels of the painted label maps; each modality maps them to its values."""

    (AIR, LUNG, FAT, MUSCLE, HEART, BLOOD, VESSEL, WALL, CORTEX, MARROW, DISC, CARTILAGE, CSF,
     LIVER, SPLEEN, KIDNEY, BOWEL, FLUID, TABLE, SHELL, NODULE, GGO, GM, WM, EYE) = range(25)


# HU without and with iodinated contrast, the HU amplitude of the tissue's texture, then the
# relative MR signal in T1w, T2w and FLAIR. Flowing blood is a flow void on MR; cortical bone
# has no MR signal.
_TISSUE_VALUES = {
    T.AIR: (-1000, -1000, 0, 0, 0, 0), T.LUNG: (-860, -860, 30, .03, .05, .03),
    T.FAT: (-100, -100, 10, .95, .8, .55), T.MUSCLE: (50, 60, 8, .35, .22, .25),
    T.HEART: (40, 110, 5, .4, .3, .3), T.BLOOD: (42, 260, 3, .05, .05, .05),
    T.VESSEL: (40, 170, 3, .05, .05, .05), T.WALL: (20, 30, 5, .3, .3, .3),
    T.CORTEX: (1100, 1100, 120, .03, .03, .03), T.MARROW: (260, 260, 70, .8, .5, .4),
    T.DISC: (80, 80, 8, .3, .8, .35), T.CARTILAGE: (120, 120, 15, .3, .4, .3),
    T.CSF: (8, 8, 2, .12, 1.0, .04), T.LIVER: (60, 115, 6, .62, .28, .3),
    T.SPLEEN: (50, 125, 6, .45, .55, .4), T.KIDNEY: (35, 190, 6, .48, .62, .4),
    T.BOWEL: (25, 60, 15, .35, .55, .3), T.FLUID: (5, 5, 2, .1, .95, .05),
    T.TABLE: (-450, -450, 0, 0, 0, 0), T.SHELL: (250, 250, 0, 0, 0, 0),
    T.NODULE: (35, 70, 10, .4, .5, .4), T.GGO: (-550, -550, 40, .1, .2, .1),
    T.GM: (38, 38, 3, .42, .62, .55), T.WM: (28, 28, 3, .62, .42, .42), T.EYE: (10, 10, 2, .12, .95, .05),
}
CT_PLAIN, CT_CONTRAST, CT_TEXTURE, MR_T1, MR_T2, MR_FLAIR = (
    np.array([_TISSUE_VALUES[t][i] for t in range(len(_TISSUE_VALUES))], np.float32)
    for i in range(6))


# --- geometry and painting ------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A square image plane of ``size`` pixels ``spacing`` mm apart, centred on 0 of both axes."""

    size: int
    spacing: float

    def px(self, mm):
        return mm / self.spacing + (self.size - 1) / 2

    @property
    def origin(self) -> float:
        """The coordinate (mm) of the first pixel's centre."""
        return -(self.size - 1) / 2 * self.spacing

    def axis(self) -> np.ndarray:
        return (np.arange(self.size, dtype=np.float32) - (self.size - 1) / 2) * self.spacing


@dataclass(frozen=True)
class Ellipsoid:
    """An organ: centre, semi-axes ``a``, ``b`` in plane and ``c`` along z (``below`` under the
    centre when it differs), turned in plane by ``angle`` radians."""

    x: float
    y: float
    z: float
    a: float
    b: float
    c: float
    angle: float = 0.0
    below: float | None = None

    def scale(self, z, half=0.0):
        """In-plane scale of the widest cut within the slab z ± half (0 where it misses);
        vectorised over z for projections."""
        c = self.c if self.below is None else np.where(z >= self.z, self.c, self.below)
        d = np.maximum(np.abs(z - self.z) - half, 0.0) / c
        return np.sqrt(np.clip(1.0 - d * d, 0.0, None))

    def mirrored(self) -> "Ellipsoid":
        return replace(self, x=-self.x, angle=-self.angle)


_ANGLES = np.linspace(0, 2 * np.pi, 72, endpoint=False)


def ellipse_xy(cx, cy, a, b, angle=0.0):
    x, y = a * np.cos(_ANGLES), b * np.sin(_ANGLES)
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        x, y = x * c - y * s, x * s + y * c
    return cx + x, cy + y


def clamp_into(x, y, ellipse):
    """Pull points outside ``ellipse`` (cx, cy, a, b) onto its boundary, so one polygon paints
    a shape cut by the ellipse (an organ inside the rib cage)."""
    cx, cy, a, b = ellipse
    rho = np.maximum(np.hypot((x - cx) / a, (y - cy) / b), 1.0)
    return cx + (x - cx) / rho, cy + (y - cy) / rho


def polygon(draw, grid, x, y, fill):
    draw.polygon(np.column_stack((grid.px(x), grid.px(y))).ravel().tolist(), fill=fill)


def paint(draw, grid, organ, z, half, fill, grow=0.0, within=None):
    """Paint the cut of ``organ`` by the slab z ± half, widened by ``grow`` mm."""
    s = float(organ.scale(z, half))
    if s <= 0 or organ.a * s + grow <= 0:
        return
    x, y = ellipse_xy(organ.x, organ.y, organ.a * s + grow, organ.b * s + grow, organ.angle)
    if within is not None:
        x, y = clamp_into(x, y, within)
    polygon(draw, grid, x, y, fill)


@dataclass(frozen=True)
class Tubes:
    """Straight tube segments (vessels, airways): ends ``p0``, ``p1`` (n, 3) and radii (n,), mm."""

    p0: np.ndarray
    p1: np.ndarray
    r: np.ndarray

    @staticmethod
    def polyline(points, radii) -> "Tubes":
        p = np.asarray(points, float)
        return Tubes(p[:-1], p[1:], np.broadcast_to(np.asarray(radii, float), (len(p) - 1,)).copy())

    def __add__(self, other: "Tubes") -> "Tubes":
        return Tubes(*(np.concatenate(pair) for pair in
                       ((self.p0, other.p0), (self.p1, other.p1), (self.r, other.r))))

    def where(self, keep) -> "Tubes":
        return Tubes(self.p0[keep], self.p1[keep], self.r[keep])


def strokes(draw, x0, y0, x1, y1, width, fills):
    """Lines with round ends, in pixels (Pillow has no round caps): a tube seen from the side
    or end on."""
    for a, b, c, d, w, f in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist(),
                                width.tolist(), fills):
        h = max(w, 1.0) / 2
        draw.ellipse((a - h, b - h, a + h, b + h), fill=f)
        if abs(c - a) + abs(d - b) > h:
            draw.line((a, b, c, d), fill=f, width=max(1, round(w)))
            draw.ellipse((c - h, d - h, c + h, d + h), fill=f)


def paint_tubes(draw, grid, tubes, z, half, fill, scale=1.0):
    """Paint the parts of ``tubes`` inside the slab z ± half, each slab widened by the tube's
    radius (partial volume); radii times ``scale`` (an airway's lumen inside its wall)."""
    r = tubes.r * scale
    z0 = tubes.p0[:, 2]
    dz = tubes.p1[:, 2] - z0
    flat = np.abs(dz) < 1e-6
    dz = np.where(flat, 1.0, dz)
    ta, tb = (z - half - r - z0) / dz, (z + half + r - z0) / dz
    t0 = np.where(flat, 0.0, np.maximum(np.minimum(ta, tb), 0.0))
    t1 = np.where(flat, np.where(np.abs(z - z0) <= half + r, 1.0, -1.0),
                  np.minimum(np.maximum(ta, tb), 1.0))
    keep = t0 <= t1
    if not keep.any():
        return
    d = tubes.p1[keep] - tubes.p0[keep]
    a = tubes.p0[keep] + t0[keep, None] * d
    b = tubes.p0[keep] + t1[keep, None] * d
    strokes(draw, grid.px(a[:, 0]), grid.px(a[:, 1]), grid.px(b[:, 0]), grid.px(b[:, 1]),
            2 * r[keep] / grid.spacing, repeat(fill))


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def grow_tree(rng, roots, inside: Callable, min_radius: float, limit: int) -> Tubes:
    """A branching tree from (point, direction, radius) roots, grown a generation at a time:
    each segment splits in two by Murray's law (r³ = r1³ + r2³), the thinner branch turning
    more; a branch stops at the organ boundary (``inside``, vectorised) or below
    ``min_radius``."""
    p, d, r = (np.array(v, float) for v in zip(*roots))
    segments, count = [], 0
    while len(r) and count < limit:
        d = unit(d + rng.normal(0, 0.12, d.shape))
        step = d * (7.0 * r ** 0.8 * rng.uniform(0.8, 1.25, len(r)))[:, None]
        full, half = inside(p + step), inside(p + step / 2)  # at the boundary, a shorter last step
        keep = full | half
        q = p + step * np.where(full, 1.0, 0.5)[:, None]
        p, q, d, r = p[keep], q[keep], d[keep], r[keep]
        segments.append((p, q, r))
        count += len(r)
        f = rng.uniform(0.2, 0.5, len(r))
        side = unit(np.cross(d, rng.normal(size=d.shape)))
        turns = np.concatenate([0.2 + 0.5 * f, -0.95 + 0.4 * f])[:, None]
        p = np.concatenate([q, q])
        d = np.concatenate([d, d]) * np.cos(turns) + np.concatenate([side, side]) * np.sin(turns)
        r = np.concatenate([r * (1 - f) ** (1 / 3), r * f ** (1 / 3)])
        p, d, r = p[r >= min_radius], d[r >= min_radius], r[r >= min_radius]
    p0, p1, radii = (np.concatenate(v)[:limit] for v in zip(*segments))
    return Tubes(p0, p1, radii)


def binomial(img: np.ndarray) -> np.ndarray:
    """3×3 binomial blur (σ ≈ 0.7 px), separable, borders repeated."""
    p = np.pad(img, 1, mode="edge")
    rows = p[:-2] + p[2:]
    rows += p[1:-1]
    rows += p[1:-1]
    out = rows[:, :-2] + rows[:, 2:]
    out += rows[:, 1:-1]
    out += rows[:, 1:-1]
    out *= 0.0625
    return out


def resized(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Float image resized by Pillow (antialiased down, bicubic up): smooth fields and large
    blurs without scipy."""
    method = Image.BICUBIC if rows >= img.shape[0] else Image.BILINEAR
    return np.asarray(Image.fromarray(img.astype(np.float32)).resize((cols, rows), method))


def smooth_field(volume: np.ndarray, frac: float, size: int) -> np.ndarray:
    """A smooth random field for one slice: a low-resolution noise volume interpolated along z
    at ``frac`` (0..1), then upsampled: it changes smoothly from slice to slice."""
    k = min(max(frac, 0.0), 1.0) * (len(volume) - 1)
    i = min(int(k), len(volume) - 2)
    layer = volume[i] * (i + 1 - k) + volume[i + 1] * (k - i)
    return resized(layer / layer.std(), size, size)


def smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def chord(u, centre, across, along):
    """Length of the line along one axis through an ellipse, at offset ``u`` on the other."""
    return 2 * along * np.sqrt(np.clip(1 - ((u - centre) / np.maximum(across, 1e-6)) ** 2, 0.0, None))


# --- the chest --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chest:
    """One patient's thorax, in mm: z = 0 at the lung bases and ``height`` at the apices; the rib
    cage's semi-axes at the base are ``width`` × ``depth``; x to the patient's left, y to the back
    (DICOM patient coordinates)."""

    height: float
    width: float
    depth: float
    wall: float  # chest-wall muscle
    fat: float  # subcutaneous fat
    back: float  # extra paraspinal muscle behind the cage
    contrast: bool
    spine_phase: float
    organs: tuple  # (Ellipsoid, tissue, grow mm), painted in order, cut by the rib cage
    ribs: np.ndarray  # per rib: height at the spine, descent per radian, cartilage and end angle
    central_airways: Tubes  # trachea and main bronchi
    great_vessels: Tubes
    esophagus: Tubes
    # What lives in the lungs is placed once the lungs exist (see make_chest).
    nodules: tuple = ()  # (Ellipsoid, tissue)
    arteries: Tubes | None = None
    veins: Tubes | None = None
    airways: Tubes | None = None  # bronchi, drawn as wall + lumen

    @property
    def spine_y(self) -> float:
        return 0.8 * self.depth

    @property
    def vertebra(self) -> float:
        return 0.14 * self.width


@dataclass(frozen=True)
class Section:
    """The chest's cross-section at height z (arrays when z is)."""

    A: object  # rib cage semi-axes and centre y
    B: object
    cy: object
    apex: object  # 1 → 0 as the lungs end, at the apices and below the bases
    shoulders: object  # 0 → 1 towards the shoulders
    medial: object  # half-width of the mediastinum, between the lungs


def chest_section(ch: Chest, z) -> Section:
    t = z / ch.height
    n = np.clip((t - 0.3) / 0.7, 0, 1) ** 2
    B = ch.depth * (1 - 0.2 * n)
    return Section(A=ch.width * (1 - 0.3 * n), B=B, cy=ch.depth - B,  # the back stays on the table
                   apex=np.sqrt(np.clip((1.02 - t) / 0.3, 0, 1) * np.clip((t + 0.03) / 0.08, 0, 1)),
                   shoulders=smoothstep((t - 0.88) / 0.25),
                   medial=ch.width * (0.1 + 0.12 * np.exp(-((t - 0.72) / 0.15) ** 2)))


def lung_ellipse(ch: Chest, s: Section, side: int):
    """The lung's own ellipse, cut by the rib cage and the mediastinum when painted."""
    return (side * 0.45 * s.A, s.cy + 0.05 * s.B, 0.75 * s.A * s.apex, 1.2 * s.B * s.apex)


def medial_border(s: Section, y):
    """Half-width of the mediastinum at y: widest mid-chest, narrow where the lungs nearly
    meet in front (anterior junction) and behind (beside the spine)."""
    return s.medial * (0.3 + 0.7 * np.exp(-((y - s.cy + 0.1 * s.B) / (0.55 * s.B)) ** 2))


def mediastinum_depth(s: Section, x):
    """Length along y of the mediastinum at x (the inverse of ``medial_border``): what a PA
    beam crosses between the lungs."""
    q = np.clip((np.abs(x) / s.medial - 0.3) / 0.7, 1e-6, 1.0)
    return np.where(np.abs(x) < 0.3 * s.medial, 4 * s.B, 1.1 * s.B * np.sqrt(-np.log(q)))


def in_lung(ch: Chest, p: np.ndarray, margin=3.0) -> np.ndarray:
    """Whether points (n, 3) lie in a lung, ``margin`` mm from its surface."""
    x, y, z = p.T
    s = chest_section(ch, z)
    lx, ly, la, lb = lung_ellipse(ch, s, np.where(x > 0, 1, -1))
    la, lb = np.maximum(la - margin, 1e-6), np.maximum(lb - margin, 1e-6)
    ok = ((np.abs(x) >= medial_border(s, y) + margin)
          & ((x / (s.A - margin)) ** 2 + ((y - s.cy) / (s.B - margin)) ** 2 <= 1)
          & (((x - lx) / la) ** 2 + ((y - ly) / lb) ** 2 <= 1))
    for organ, _, _ in ch.organs:
        k = organ.scale(z)
        ok &= (k == 0) | (((x - organ.x) / (organ.a * k + margin)) ** 2
                          + ((y - organ.y) / (organ.b * k + margin)) ** 2 >= 1)
    return ok


def make_chest(rng) -> Chest:
    """A plausible thorax: sizes vary by patient, positions are fractions of them."""
    H, W, D = rng.uniform(215, 275), rng.uniform(118, 150), rng.uniform(82, 108)
    heart = Ellipsoid(0.12 * W, -0.3 * D, 0.34 * H, 0.48 * W, 0.5 * D, 0.19 * H, -0.6)
    organs = (
        (Ellipsoid(-0.4 * W, -0.2 * D, -0.08 * H, 0.8 * W, 1.0 * D, rng.uniform(.27, .32) * H), T.LIVER, 0),
        (Ellipsoid(0.45 * W, -0.1 * D, -0.1 * H, 0.65 * W, 0.95 * D, rng.uniform(.22, .27) * H), T.SPLEEN, 0),
        (heart, T.FAT, 4.0),  # pericardial fat
        (heart, T.HEART, 0),
        (Ellipsoid(0.27 * W, -0.25 * D, 0.31 * H, 0.16 * W, 0.2 * D, 0.12 * H, -0.6), T.BLOOD, 0),  # LV
        (Ellipsoid(0.02 * W, -0.52 * D, 0.31 * H, 0.18 * W, 0.1 * D, 0.11 * H, -0.6), T.BLOOD, 0),  # RV
        (Ellipsoid(0.05 * W, -0.08 * D, 0.46 * H, 0.18 * W, 0.12 * D, 0.07 * H), T.BLOOD, 0),  # LA
        (Ellipsoid(-0.22 * W, -0.28 * D, 0.37 * H, 0.12 * W, 0.16 * D, 0.1 * H), T.BLOOD, 0),  # RA
    )
    ys, rv = 0.8 * D, 0.14 * W
    mediastinum_y = ys - rv
    hila = [np.array([side * 0.28 * W, 0.1 * D, 0.56 * H]) for side in (-1, 1)]
    carina = np.array([0.0, mediastinum_y - 28, 0.62 * H])
    aorta = Tubes.polyline([(0, -0.2 * D, 0.35 * H), (-0.1 * W, -0.35 * D, 0.55 * H),
                            (-0.08 * W, -0.3 * D, 0.72 * H), (0.05 * W, -0.05 * D, 0.78 * H),
                            (0.18 * W, ys - 0.4 * rv - 10, 0.72 * H), (0.18 * W, ys - 0.4 * rv, 0.6 * H),
                            (0.16 * W, ys - 0.5 * rv, -0.2 * H)], [14, 14, 13, 12, 12, 11])
    svc = Tubes.polyline([(-0.2 * W, -0.25 * D, 0.45 * H), (-0.2 * W, -0.2 * D, 1.3 * H)], 10)
    pulmonary = Tubes.polyline([(0.12 * W, -0.45 * D, 0.42 * H), (0.08 * W, -0.2 * D, 0.58 * H),
                                hila[0]], [13, 10]) + Tubes.polyline(
        [(0.08 * W, -0.2 * D, 0.58 * H), hila[1]], 10)
    heights = 1.08 * H - np.arange(12) * 0.095 * H
    no_cartilage = 9.0  # the floating ribs end free
    ribs = np.column_stack([heights, rng.uniform(0.13, 0.16, 12) * H,
                            np.r_[[2.35] * 7, [2.1] * 3, [no_cartilage] * 2],
                            np.r_[[2.8] * 7, [2.5] * 3, [1.6] * 2]])
    chest = Chest(H, W, D, wall=rng.uniform(10, 18), fat=rng.uniform(6, 30), back=rng.uniform(25, 40),
                  contrast=bool(rng.random() < 0.5), spine_phase=rng.uniform(0, 26), organs=organs, ribs=ribs,
                  central_airways=Tubes.polyline([(0, mediastinum_y - 28, 1.4 * H), carina], 9)
                  + Tubes.polyline([carina, hila[0]], 7) + Tubes.polyline([carina, hila[1]], 6),
                  great_vessels=aorta + svc + pulmonary,
                  esophagus=Tubes.polyline([(0.04 * W, mediastinum_y - 6, -0.2 * H),
                                            (0.02 * W, mediastinum_y - 8, 1.4 * H)], 7))
    inside = partial(in_lung, chest)
    skeleton, veins = [], []
    segmental = np.array([(0.5, -0.2, 0.9), (0.8, -0.6, 0.1), (0.8, 0.5, 0.2), (0.6, -0.5, -0.7),
                          (0.5, 0.6, -0.7)])  # lateral component, then y and z: up, front, back, down
    for side, hilum in zip((-1, 1), hila):
        directions = segmental * (side, 1, 1)
        skeleton.append(grow_tree(rng, [(hilum, d, 3.6) for d in directions], inside, 0.45, 4000))
        vein_root = hilum + (-side * 10, -8, -0.14 * H)
        veins.append(grow_tree(rng, [(vein_root, d, 3.4) for d in directions[1:]], inside, 0.45, 3000))
    skeleton = skeleton[0] + skeleton[1]
    # Arteries run beside their bronchus: the same tree, shifted sideways by about a diameter.
    direction = skeleton.p1 - skeleton.p0
    offset = np.cross(direction, (0.0, 0.0, 1.0)) + np.cross(direction, (1.0, 0.0, 0.0)) * 0.3
    offset *= (1.6 * skeleton.r / np.maximum(np.linalg.norm(offset, axis=1), 1e-6))[:, None]
    nodules = []
    candidates = rng.uniform((-W, -D, 0.1 * H), (W, D, 0.95 * H), (200, 3))
    for p in candidates[in_lung(chest, candidates, 8.0)][:rng.choice(4, p=(0.4, 0.3, 0.2, 0.1))]:
        r = rng.uniform(3, 12)
        solid = rng.random() < 0.7
        nodules.append((Ellipsoid(*p, r, r * rng.uniform(0.8, 1.2), r), T.NODULE if solid else T.GGO))
    return replace(chest, arteries=Tubes(skeleton.p0 + offset, skeleton.p1 + offset, skeleton.r),
                   veins=veins[0] + veins[1], airways=skeleton.where(skeleton.r >= 1.2),
                   nodules=tuple(nodules))


def draw_trunk(draw, grid, A, B, cy, wall, fat, back, cage, widen=0.0, cage_scale=1.0):
    """Skin-to-cage layers of a trunk lying on its back: subcutaneous fat, muscle (thicker at the
    back), and the cage filled with ``cage``."""
    flat = cy + B + wall + fat + back - 6
    for grow, fill, cut in ((wall + fat, T.FAT, flat), (wall, T.MUSCLE, flat - fat)):
        x, y = ellipse_xy(0, cy + back / 2, A + grow + widen, B + grow + back / 2)
        polygon(draw, grid, x, np.minimum(y, cut), fill)
    polygon(draw, grid, *ellipse_xy(0, cy, A * cage_scale, B * cage_scale), cage)


def draw_spine(draw, grid, ys, rv, disc: bool):
    """A vertebra seen axially (body, canal, arch, spinous and transverse processes), or the disc
    between two."""
    polygon(draw, grid, *ellipse_xy(0, ys, rv, 0.9 * rv), T.DISC if disc else T.CORTEX)
    if not disc:
        polygon(draw, grid, *ellipse_xy(0, ys, rv - 2, 0.9 * rv - 2), T.MARROW)
    canal = ys + rv + 9
    polygon(draw, grid, *ellipse_xy(0, canal, 12, 11), T.CORTEX)
    polygon(draw, grid, *ellipse_xy(0, canal, 7.5, 6.5), T.CSF)
    width = max(1, round(6 / grid.spacing))
    for x0, y0, x1, y1 in ((0, canal + 9, 0, canal + 32), (-8, canal - 2, -rv - 16, canal - 6),
                           (8, canal - 2, rv + 16, canal - 6)):
        draw.line((grid.px(x0), grid.px(y0), grid.px(x1), grid.px(y1)), fill=T.CORTEX, width=width)


def draw_ribs(draw, grid, ch: Chest, s: Section, z, half):
    """Each rib circles the cage, falling as it goes forward: a slab meets it along an arc."""
    a, b = s.A + 7, s.B + 4
    box = [grid.px(-a), grid.px(s.cy - b), grid.px(a), grid.px(s.cy + b)]
    inset = 2 / grid.spacing
    inner = [box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset]
    for height, descent, cartilage, end in ch.ribs:
        lo, hi = (height - z - half - 5) / descent, (height - z + half + 5) / descent
        for start, stop, fill in ((0.25, cartilage, T.CORTEX), (cartilage, end, T.CARTILAGE)):
            f0, f1 = max(lo, start), min(hi, stop)
            if f0 >= f1:
                continue
            for side in (-1, 1):  # Pillow's angles: degrees clockwise from +x, y down = back
                angles = sorted((90 - side * math.degrees(f0), 90 - side * math.degrees(f1)))
                draw.arc(box, *angles, fill=fill, width=max(1, round(7 / grid.spacing)))
                if fill == T.CORTEX:
                    draw.arc(inner, *angles, fill=T.MARROW, width=max(1, round(3 / grid.spacing)))


def chest_labels(ch: Chest, grid: Grid, z: float, half: float) -> np.ndarray:
    """Tissue labels of the axial slab z ± half, table to skin to vessels, in painting order."""
    img = Image.new("L", (grid.size, grid.size), T.AIR)
    draw = ImageDraw.Draw(img)
    s = chest_section(ch, z)
    A, B, cy, t = float(s.A), float(s.B), float(s.cy), z / ch.height
    table = ch.depth + ch.wall + ch.fat + ch.back - 5
    x = np.linspace(-260, 260, 27)
    draw.polygon(np.column_stack((grid.px(np.r_[x, x[::-1]]), grid.px(
        np.r_[table - x ** 2 / 2500, table + 30 - x[::-1] ** 2 / 3000]))).ravel().tolist(),
        fill=T.TABLE, outline=T.SHELL, width=max(1, round(2 / grid.spacing)))
    draw_trunk(draw, grid, A, B, cy, ch.wall, ch.fat, ch.back, T.FAT,
               widen=0.35 * ch.width * float(s.shoulders), cage_scale=max(float(s.apex), 0.45))
    cage = (0.0, cy, A - 1, B - 1)
    for side in (-1, 1):
        lx, ly, la, lb = (float(v) for v in lung_ellipse(ch, s, side))
        if la > 1:
            px, py = clamp_into(*ellipse_xy(lx, ly, la, lb), cage)
            polygon(draw, grid, side * np.maximum(side * px, medial_border(s, py)), py, T.LUNG)
    thin = min(half, 1.5)  # vessels and ribs as in a thin slice: a thick one would show trees
    paint_tubes(draw, grid, ch.arteries, z, thin, T.VESSEL)
    paint_tubes(draw, grid, ch.veins, z, thin, T.VESSEL)
    paint_tubes(draw, grid, ch.airways, z, thin, T.WALL)
    paint_tubes(draw, grid, ch.airways, z, thin, T.AIR, scale=0.6)
    for organ, fill in ch.nodules:
        paint(draw, grid, organ, z, half, fill)
    for organ, fill, grow in ch.organs:
        paint(draw, grid, organ, z, half, fill, grow, within=cage)
    paint_tubes(draw, grid, ch.great_vessels, z, half, T.BLOOD)
    paint_tubes(draw, grid, ch.esophagus, z, half, T.MUSCLE)
    paint_tubes(draw, grid, ch.central_airways, z, half, T.WALL)
    paint_tubes(draw, grid, ch.central_airways, z, half, T.AIR, scale=0.8)
    draw_spine(draw, grid, ch.spine_y, ch.vertebra, (z - ch.spine_phase) % 26 < 5)
    draw_ribs(draw, grid, ch, s, z, thin)
    if 0.3 < t < 1.0:  # sternum
        for a, b, fill in ((14, 6, T.CORTEX), (11, 3.5, T.MARROW)):
            polygon(draw, grid, *ellipse_xy(0, cy - B - 0.45 * ch.wall, a, b), fill)
    if 0.55 < t < 1.15:  # scapulae, behind the ribs
        for side in (-1, 1):
            draw.line((grid.px(side * 0.3 * A), grid.px(ch.depth + 0.6 * ch.wall),
                       grid.px(side * (A + 0.3 * ch.wall)), grid.px(ch.depth - 0.2 * B)),
                      fill=T.CORTEX, width=max(1, round(5 / grid.spacing)))
    return np.asarray(img)


# --- CT ---------------------------------------------------------------------------------------------

LUNG, MEDIASTINUM, BONE = (-600, 1500, "LUNG"), (40, 400, "MEDIASTINUM"), (400, 1800, "BONE")


@dataclass(frozen=True)
class Recon:
    """One reconstruction of a CT acquisition: kernel, noise, slice count and window presets
    (cycled over patients; an empty preset set means no window in the file)."""

    name: str
    kernel: str
    sharpness: float  # < 0: extra binomial passes; > 0: unsharp-mask gain
    noise: float  # HU standard deviation
    slice_fraction: float
    windows: tuple


RECONS = (
    Recon("Lung", "B70f", 1.2, 45.0, 1.0, ((LUNG,), (LUNG, MEDIASTINUM))),
    Recon("Mediastinum", "B31f", -1, 12.0, 0.5, ((MEDIASTINUM, LUNG, BONE), (MEDIASTINUM,), ())),
    Recon("Bone", "B60s", 0.8, 30.0, 0.5, ((), (BONE,))),
)


def apply_kernel(img: np.ndarray, sharpness: float) -> np.ndarray:
    """The scanner's blur, then a softer or sharper reconstruction kernel."""
    img = binomial(img)
    if sharpness < 0:
        for _ in range(round(-sharpness)):
            img = binomial(img)
    elif sharpness > 0:
        img = img + sharpness * (img - binomial(img))
    return img


def noise_banks(rng, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One acquisition's noise, without low frequencies as filtered back projection gives it, and
    a smooth tissue texture; twice the image size: each slice takes random crops."""
    white = rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
    texture = resized(rng.standard_normal((size // 4, size // 4), dtype=np.float32), 2 * size, 2 * size)
    return white - binomial(binomial(white)), texture / texture.std()


def kernel_noise(noise: np.ndarray, sharpness: float) -> np.ndarray:
    """The acquisition's noise as a reconstruction kernel shapes it, unit standard deviation."""
    shaped = apply_kernel(noise, sharpness)
    return shaped / shaped.std()


def ct_hu(ch: Chest, grid: Grid, z: float, half: float, recon: Recon, noise, texture, rng) -> np.ndarray:
    """One CT slice in HU: labels → HU, tissue texture, lung density rising towards the back
    (gravity), then the kernel and noise."""
    labels = chest_labels(ch, grid, z, half)
    n = grid.size
    (ny, nx), (ty, tx) = rng.integers(0, n, (2, 2))
    hu = (CT_CONTRAST if ch.contrast else CT_PLAIN)[labels]
    hu += CT_TEXTURE[labels] * texture[ty:ty + n, tx:tx + n]
    gradient = (grid.axis()[:, None] - ch.depth * 0.2) * (60 / ch.depth)
    hu += np.where(labels == T.LUNG, gradient, np.float32(0))
    hu = apply_kernel(hu, recon.sharpness)
    hu += recon.noise * noise[ny:ny + n, nx:nx + n]
    return hu


@dataclass(frozen=True)
class PixelFormat:
    """How values are stored: bits, sign, and the modality LUT that gives them back."""

    bits: int
    signed: bool
    slope: float = 1.0
    intercept: float = 0.0

    def store(self, values: np.ndarray) -> np.ndarray:
        top = 1 << (self.bits - 1 if self.signed else self.bits)
        lo, hi = (-top, top - 1) if self.signed else (0, top - 1)
        stored = np.rint((values - self.intercept) / self.slope)
        return np.clip(stored, lo, hi).astype("<i2" if self.signed else "<u2")


CT_FORMATS = (PixelFormat(12, False, 1, -1024), PixelFormat(16, True), PixelFormat(12, True),
              PixelFormat(16, False, 0.5, -1024))


# --- MR ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weighting:
    """An MR contrast: its tissue signal table and the acquisition attributes that produce it."""

    name: str
    lut: np.ndarray
    attrs: dict


HEAD_WEIGHTINGS = (
    Weighting("T1 SE", MR_T1, dict(ScanningSequence="SE", SequenceVariant="NONE", RepetitionTime=500,
                                   EchoTime=12, EchoTrainLength=1, FlipAngle=90, SequenceName="se2d1")),
    Weighting("T2 TSE", MR_T2, dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=4000,
                                    EchoTime=100, EchoTrainLength=16, FlipAngle=150,
                                    SequenceName="tse2d1_16")),
    Weighting("FLAIR", MR_FLAIR, dict(ScanningSequence=["SE", "IR"], SequenceVariant=["SK", "SP", "MP"],
                                      RepetitionTime=9000, EchoTime=120, InversionTime=2500,
                                      EchoTrainLength=16, FlipAngle=150, SequenceName="tir2d1_16")),
)
ABDOMEN_WEIGHTINGS = (
    Weighting("T1 GRE", MR_T1, dict(ScanningSequence="GR", SequenceVariant="SP", RepetitionTime=150,
                                    EchoTime=2.3, EchoTrainLength=1, FlipAngle=70, SequenceName="fl2d1")),
    Weighting("T2 HASTE", MR_T2, dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=1400,
                                      EchoTime=90, EchoTrainLength=128, FlipAngle=160, SequenceName="haste")),
)


@dataclass(frozen=True)
class Head:
    """A head, in mm: z = 0 near the floor of the lateral ventricles; the skull's outer
    semi-axes at its widest. The cerebrum fills the skull above the tentorium; below it,
    ``parts`` (superellipsoids: temporal lobes, cerebellum, brainstem) and the face."""

    width: float
    length: float
    parts: tuple  # (Ellipsoid, superellipse exponent)
    face: Ellipsoid
    deep: tuple  # (Ellipsoid, tissue) painted after the gyri: nuclei, ventricles, orbits, sinuses

    z_range = (-45.0, 88.0)

    def scale(self, z: float) -> float:
        return math.sqrt(max(0.0, 1 - ((z - 15) / 80) ** 2)) if z > 15 else 1 - 0.25 * ((15 - z) / 75) ** 2


def make_head(rng) -> Head:
    W, L, v = rng.uniform(68, 78), rng.uniform(86, 98), rng.uniform(0.8, 1.6)  # v: ventricle size
    Wi, Li = W - 9.5, L - 9.5
    temporal = Ellipsoid(0.55 * Wi, -0.15 * Li, -18, 0.38 * Wi, 0.45 * Li, 18)
    cerebellum = Ellipsoid(0.28 * Wi, 0.55 * Li, -28, 0.36 * Wi, 0.36 * Li, 20)
    parts = [(o, 2.0) for organ in (temporal, cerebellum) for o in (organ, organ.mirrored())]
    parts.append((Ellipsoid(0, 0.18 * Li, -25, 12, 14, 35), 2.0))
    paired = (
        (Ellipsoid(0.11 * Wi, 0.08 * Li, 10, 0.1 * Wi, 0.15 * Li, 11), T.GM),  # thalamus
        (Ellipsoid(0.26 * Wi, -0.08 * Li, 10, 0.05 * Wi, 0.17 * Li, 12, 0.15), T.GM),  # putamen
        (Ellipsoid(0.15 * Wi, -0.25 * Li, 18, 0.05 * Wi, 0.08 * Li, 10), T.GM),  # caudate
        (Ellipsoid(0.1 * Wi, 0.0, 28, 0.06 * Wi * v, 0.4 * Li, 13, 0.1), T.CSF),  # lateral ventricle
        (Ellipsoid(0.1 * Wi, -0.32 * Li, 20, 0.07 * Wi * v, 0.13 * Li, 10, -0.4), T.CSF),  # frontal horn
        (Ellipsoid(0.16 * Wi, 0.45 * Li, 20, 0.045 * Wi * v, 0.15 * Li, 8, 0.3), T.CSF),  # occipital horn
        (Ellipsoid(0.33 * Wi, -0.7 * L, -30, 16, 22, 13), T.FAT),  # orbit
        (Ellipsoid(0.33 * Wi, -0.82 * L, -30, 12, 12, 12), T.EYE),
    )
    deep = [(o, fill) for organ, fill in paired for o in (organ, organ.mirrored())]
    deep += [(Ellipsoid(0, 0, 8, 2.5 * v, 0.14 * Li, 10), T.CSF),  # third ventricle
             (Ellipsoid(0, 0.33 * Li, -28, 6, 5, 7), T.CSF),  # fourth ventricle
             (Ellipsoid(0, -0.3 * Li, -32, 12, 10, 10), T.AIR),  # sphenoid sinus
             (Ellipsoid(0, -0.68 * L, -38, 9, 18, 14), T.AIR)]  # nasal cavity
    return Head(W, L, tuple(parts), Ellipsoid(0, -0.65 * L, -38, 0.72 * W, 0.42 * L, 26), tuple(deep))


def head_labels(hd: Head, grid: Grid, z: float, half: float, gyri: np.ndarray) -> np.ndarray:
    """Scalp, skull (tables and diploe), face, CSF, then the brain: grey matter along the surface
    and along sulci (the zero crossings of the smooth field ``gyri``, CSF at their core), white
    matter inside; nuclei and ventricles on top."""
    img = Image.new("L", (grid.size, grid.size), T.AIR)
    draw = ImageDraw.Draw(img)
    s = hd.scale(z)
    a, b = hd.width * s, hd.length * s
    for grow, fill in ((0, T.FAT), (-4, T.CORTEX), (-5.5, T.MARROW), (-7, T.CORTEX), (-8.5, T.CSF)):
        polygon(draw, grid, *ellipse_xy(0, 0, a + grow, b + grow), fill)
    for grow, fill in ((2.0, T.CORTEX), (0.0, T.MUSCLE)):
        paint(draw, grid, hd.face, z, half, fill, grow, within=(0, 0, a - 3, b - 3))
    labels = np.array(img)
    u = grid.axis()
    X, Y = u[None, :], u[:, None]
    rho = np.full(labels.shape, np.inf, np.float32)  # 0 at a part's centre, 1 on its surface
    k = math.sqrt(max(0.0, 1 - ((min(z, 5.0) - 5) / 20) ** 2))  # the cerebrum ends on the tentorium
    if k > 0:  # two hemispheres: the inside of the skull, split by the falx
        ai, bi = (a - 9.5) * k, (b - 9.5) * k
        rho = np.maximum(np.hypot(X / ai, Y / bi), 1 - (np.abs(X) - 1) / ai)
    for organ, p in hd.parts:
        f = float(organ.scale(z, half))
        if f > 0:
            rho = np.minimum(rho, ((np.abs(X - organ.x) / (organ.a * f)) ** p
                                   + (np.abs(Y - organ.y) / (organ.b * f)) ** p) ** (1 / p))
    brain = (rho < 1) & (labels == T.CSF)
    depth, g = 1 - rho, np.abs(gyri)
    labels[brain] = T.WM
    labels[brain & (((g < 0.45) & (depth < 0.4)) | (depth < 0.07))] = T.GM
    labels[brain & (g < 0.09) & (depth < 0.34)] = T.CSF
    img = Image.fromarray(labels)
    draw = ImageDraw.Draw(img)
    for organ, fill in hd.deep:
        paint(draw, grid, organ, z, half, fill)
    return np.asarray(img)


@dataclass(frozen=True)
class Abdomen:
    """An upper abdomen, in mm: z = 0 below the kidneys, the diaphragm near 200."""

    width: float
    depth: float
    fat: float
    organs: tuple  # (Ellipsoid, tissue, grow)
    vessels: Tubes

    z_range = (20.0, 210.0)
    lung_base = 185.0


def make_abdomen(rng) -> Abdomen:
    W, D = rng.uniform(135, 165), rng.uniform(95, 120)
    ys, rv = 0.75 * D, 0.15 * W
    kidney = Ellipsoid(0.42 * W, 0.48 * D, rng.uniform(50, 70), 0.17 * W, 0.3 * D, 55, -0.45)
    organs = [
        (Ellipsoid(-0.35 * W, -0.1 * D, 150, 0.62 * W, 0.85 * D, 70, below=90), T.LIVER, 0),
        (Ellipsoid(-0.3 * W, -0.55 * D, 100, 14, 22, 28), T.FLUID, 0),  # gallbladder
        (Ellipsoid(0.55 * W, 0.3 * D, 145, 0.24 * W, 0.38 * D, 40, 0.5), T.SPLEEN, 0),
        (Ellipsoid(0.3 * W, -0.35 * D, 160, 0.32 * W, 0.3 * D, 45), T.FLUID, 0),  # stomach
        (Ellipsoid(0.3 * W, -0.55 * D, 190, 0.2 * W, 0.12 * D, 14), T.AIR, 0),  # its air cap
    ]
    organs += [(o, fill, grow) for o in (kidney, kidney.mirrored())
               for fill, grow in ((T.FAT, 8), (T.KIDNEY, 0), (T.FAT, -0.55 * kidney.a))]  # perirenal fat
    organs += [(Ellipsoid(side * (rv + 16), ys - 5, 0, 16, 18, 110), T.MUSCLE, 0) for side in (-1, 1)]
    for _ in range(24):  # bowel loops, fluid-filled
        centre, r = rng.uniform((-0.75 * W, -0.85 * D, 0), (0.75 * W, 0.3 * D, 150)), rng.uniform(12, 24)
        loop = Ellipsoid(*centre, r, r, r)
        organs += [(loop, T.BOWEL, 0), (loop, T.FLUID, -4)]
    vessels = (Tubes.polyline([(0.1 * W, ys - rv - 12, -50), (0.08 * W, ys - rv - 14, 260)], 11)
               + Tubes.polyline([(-0.18 * W, ys - rv - 10, -50), (-0.2 * W, ys - rv - 14, 260)], 12))
    return Abdomen(W, D, rng.uniform(15, 45), tuple(organs), vessels)


def abdomen_labels(ab: Abdomen, grid: Grid, z: float, half: float) -> np.ndarray:
    img = Image.new("L", (grid.size, grid.size), T.AIR)
    draw = ImageDraw.Draw(img)
    draw_trunk(draw, grid, ab.width, ab.depth, 0.0, 14, ab.fat, 30,
               T.LUNG if z > ab.lung_base else T.BOWEL)  # mesentery and collapsed bowel
    cage = (0.0, 0.0, ab.width - 1, ab.depth - 1)
    for organ, fill, grow in ab.organs:
        paint(draw, grid, organ, z, half, fill, grow, within=cage)
    paint_tubes(draw, grid, ab.vessels, z, half, T.BLOOD)
    draw_spine(draw, grid, 0.75 * ab.depth, 0.15 * ab.width, (z - 7) % 30 < 6)
    return np.asarray(img)


def mr_slice(labels, weighting: Weighting, gain: float, bias: np.ndarray, rng) -> np.ndarray:
    """Relative signal → scanner units, coil shading, a little blur, Rician noise (magnitude of
    a complex signal with Gaussian noise in both channels)."""
    signal = binomial(weighting.lut[labels] * (gain * bias))
    sigma = 0.025 * gain
    noise = rng.standard_normal((2, *labels.shape), dtype=np.float32) * sigma
    return np.hypot(signal + noise[0], noise[1])


# --- radiographs ------------------------------------------------------------------------------------

def chest_projection(ch: Chest, grid: Grid, lateral: bool) -> np.ndarray:
    """Water-equivalent path length (mm) through the chest for a PA or a left-lateral view: the
    chords of the model's ellipses for each row, with ribs, clavicles and lung vessels stroked
    on top."""
    z = 0.45 * ch.height - grid.axis()[:, None]  # rows run from the head down
    u = grid.axis()[None, :]  # columns: x (to the patient's left) or y (to the back)
    s = chest_section(ch, z)
    a_body = s.A + ch.wall + ch.fat + 0.35 * ch.width * s.shoulders
    b_body = s.B + ch.wall + ch.fat + ch.back / 2
    y_body = s.cy + ch.back / 2
    torso = 1 - smoothstep((z - 1.15 * ch.height) / 25)
    if lateral:
        body = chord(u, y_body, b_body, a_body) * torso + chord(u, 0.1 * ch.depth, 55, 60) * (1 - torso)
        lungs = 0
        for side in (-1, 1):
            lx, ly, la, lb = lung_ellipse(ch, s, side)
            cage_half = s.A * np.sqrt(np.clip(1 - ((u - s.cy) / s.B) ** 2, 0, None))
            lung_half = la * np.sqrt(np.clip(1 - ((u - ly) / np.maximum(lb, 1e-3)) ** 2, 0, None))
            lungs = lungs + np.clip(np.minimum(cage_half, abs(lx) + lung_half)
                                    - np.maximum(medial_border(s, u), abs(lx) - lung_half), 0, None)
        organs = sum(chord(u, o.y, o.b * o.scale(z), o.a * o.scale(z)) for o, fill, grow in ch.organs
                     if fill != T.BLOOD)
        spine = chord(u, ch.spine_y, ch.vertebra, ch.vertebra)
    else:
        body = chord(u, 0, a_body, b_body) * torso + chord(u, 0, 60, 55) * (1 - torso)
        lungs = 0
        for side in (-1, 1):
            lx, ly, la, lb = lung_ellipse(ch, s, side)
            lungs = lungs + np.minimum(chord(u, 0, s.A, s.B), chord(u, lx, la, lb)) * (side * u > 0)
        lungs = np.clip(lungs - mediastinum_depth(s, u), 0, None)
        organs = sum(chord(u, o.x, o.a * o.scale(z), o.b * o.scale(z)) for o, fill, grow in ch.organs
                     if fill != T.BLOOD)
        spine = chord(u, 0, ch.vertebra, ch.vertebra)
    disc = (z - ch.spine_phase) % 26 < 5
    path = body - 0.85 * np.clip(lungs - organs, 0, None) + 0.5 * spine * np.where(disc, 0.6, 1.0)
    return path + projected_strokes(ch, grid, lateral)


def projected_strokes(ch: Chest, grid: Grid, lateral: bool) -> np.ndarray:
    """Extra path length of thin structures, stroked along their projection: lung vessels,
    the aorta, ribs, clavicles, humeral heads, and the trachea's air (negative)."""
    img = Image.new("F", (grid.size, grid.size), 0.0)
    draw = ImageDraw.Draw(img)
    col = 1 if lateral else 0

    def row(z):
        return grid.px(0.45 * ch.height - z)

    knob = ch.great_vessels.where(slice(1, 5))  # the aortic arch; the rest hides in the mediastinum
    for tubes, gain in ((ch.arteries + ch.veins, 2.0), (knob, 0.4), (ch.central_airways, -1.2)):
        big = tubes.where(tubes.r >= 0.9)
        strokes(draw, grid.px(big.p0[:, col]), row(big.p0[:, 2]), grid.px(big.p1[:, col]),
                row(big.p1[:, 2]), 2 * big.r / grid.spacing, (gain * 2 * big.r).tolist())
    phi = np.linspace(0.25, 2.8, 24)
    for height, descent, cartilage, end in ch.ribs:
        f = phi[phi <= end]
        z = height - descent * f
        s = chest_section(ch, z)
        for side in (-1, 1) if not lateral else (1,):
            u = s.cy + (s.B + 4) * np.cos(f) if lateral else side * (s.A + 7) * np.sin(f)
            line = np.column_stack((grid.px(u[f <= cartilage]), row(z[f <= cartilage]))).ravel().tolist()
            for fill, width in ((9.0, 10), (5.0, 6)):  # cortex seen edge-on is denser than the middle
                draw.line(line, fill=fill, width=max(1, round(width / grid.spacing)))
    H, W = ch.height, ch.width
    for side in () if lateral else (-1, 1):  # clavicles and humeral heads
        draw.line((grid.px(side * 15), row(1.03 * H), grid.px(side * 1.25 * W), row(1.12 * H)),
                  fill=14.0, width=max(1, round(13 / grid.spacing)))
        cx, r = side * (1.35 * W + ch.wall), 24
        draw.ellipse((grid.px(cx - r), row(1.1 * H + r), grid.px(cx + r), row(1.1 * H - r)), fill=30.0)
    return np.asarray(img)


def radiograph(ch: Chest, grid: Grid, lateral: bool, rng) -> tuple[np.ndarray, tuple[float, float]]:
    """Processed log-exposure (higher = more attenuation), 0..4095, and a window for the exposed
    field: the path length becomes quantum-noisy exposure, then the equalisation and edge
    enhancement of CR/DX processing, lead collimation at the borders and a side marker."""
    p = 0.021 * chest_projection(ch, grid, lateral)
    p += rng.standard_normal(p.shape, dtype=np.float32) * (0.006 * np.exp(p / 2))
    p = p - 0.3 * resized(resized(p, 24, 24), *p.shape) + 0.7 * (p - binomial(binomial(p)))
    lo, hi = np.percentile(p[::4, ::4], (1, 99.5))
    v = (p - lo) * (3400 / (hi - lo)) + 300
    margin = rng.integers(grid.size // 40, grid.size // 14, 4)
    p2, p98 = np.percentile(v[margin[0]:-margin[1]:4, margin[2]:-margin[3]:4], (2, 98))
    v[:margin[0]], v[-margin[1]:], v[:, :margin[2]], v[:, -margin[3]:] = 4095, 4095, 4095, 4095
    marker = Image.new("L", (grid.size, grid.size), 0)
    font = ImageFont.load_default(size=grid.size // 20)
    ImageDraw.Draw(marker).text((margin[2] + grid.size // 30, margin[0] + grid.size // 30),
                                "L" if lateral else "R", fill=255, font=font)
    v[np.asarray(marker) > 128] = 4000
    return np.clip(v, 0, 4095), (round((p2 + p98) / 2), round(p98 - p2))


# --- anomalies --------------------------------------------------------------------------------------

def _font(size: int):
    return ImageFont.load_default(size=max(8, size))


def burned_in_dialog(gray: np.ndarray, rng) -> np.ndarray:
    """RGB screen capture of a displayed slice with an application error dialog on top."""
    img = Image.fromarray(gray).convert("RGB")
    draw = ImageDraw.Draw(img)
    h, w = gray.shape
    bw, bh = int(w * rng.uniform(0.55, 0.75)), int(h * rng.uniform(0.24, 0.32))
    x0, y0 = int(rng.uniform(0.05, 0.95) * (w - bw)), int(rng.uniform(0.1, 0.9) * (h - bh))
    bar, text = bh // 6, bh // 9
    draw.rectangle((x0 + 4, y0 + 4, x0 + bw + 4, y0 + bh + 4), fill=(20, 20, 20))  # shadow
    draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=(236, 233, 216), outline=(0, 0, 0))
    draw.rectangle((x0, y0, x0 + bw, y0 + bar), fill=(10, 36, 106))
    draw.text((x0 + bar // 3, y0 + bar // 5), "Viewer - Error", fill="white", font=_font(text))
    icon, ix, iy = bar * 1.2, x0 + bar // 2, y0 + 1.5 * bar
    draw.ellipse((ix, iy, ix + icon, iy + icon), fill=(200, 0, 0))
    draw.text((ix + icon / 2, iy + icon / 2), "X", fill="white", font=_font(int(icon * 0.7)), anchor="mm")
    message = rng.choice(["Unhandled exception in ReconServer:", "Access violation at 0x004F3A2C",
                          "Failed to load volume: out of memory"])
    for i, line in enumerate((message, "Series could not be displayed.", "Contact your administrator.")):
        draw.text((x0 + bar + icon, y0 + 1.5 * bar + i * text * 1.4), line, fill="black", font=_font(text))
    bx, by = x0 + bw // 2 - bar, y0 + bh - 1.5 * bar
    draw.rectangle((bx, by, bx + 2 * bar, by + bar), fill=(212, 208, 200), outline=(0, 0, 0))
    draw.text((bx + bar, by + bar / 2), "OK", fill="black", font=_font(text), anchor="mm")
    return np.asarray(img)


def photograph(rng, width=640, height=480) -> np.ndarray:
    """A procedurally drawn landscape (sky, sun, mountain ranges fading with distance, meadow,
    trees): an ordinary photo filed as DICOM, nothing like a medical image."""
    yy = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    top, horizon = np.array([40, 90, 170], np.float32), np.array([200, 220, 235], np.float32)
    sky = top + (horizon - top) * yy ** 0.7
    xx = np.arange(width, dtype=np.float32)[None, :, None]
    sun_x, sun_y = rng.uniform(0.15, 0.85) * width, rng.uniform(0.1, 0.35) * height
    glow = np.exp(-((xx - sun_x) ** 2 + (yy * height - sun_y) ** 2) / (2 * (0.08 * width) ** 2))
    img = Image.fromarray(np.clip(sky + 90 * glow, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((sun_x - 18, sun_y - 18, sun_x + 18, sun_y + 18), fill=(255, 248, 220))
    x = np.arange(width + 1, dtype=float)
    for depth in range(4):
        base = height * (0.42 + 0.1 * depth)
        ridge = base - sum(height * 0.12 / (k + 1) * (1 - depth * 0.2) * np.sin(
            x / width * 2 * np.pi * (k + 1.3) + rng.uniform(0, 6.3)) for k in range(5))
        colour = (30, 110, 50) if depth == 3 else (110 - 20 * depth, 125 - 15 * depth, 150 - 25 * depth)
        draw.polygon(list(zip(x, ridge)) + [(width, height), (0, height)], fill=colour)
    for _ in range(rng.integers(6, 14)):  # trees
        tx, ty, th = rng.uniform(0, width), rng.uniform(0.8, 1.0) * height, rng.uniform(40, 110)
        draw.rectangle((tx - 3, ty - th * 0.2, tx + 3, ty), fill=(70, 45, 25))
        draw.polygon([(tx, ty - th), (tx - th * 0.25, ty - th * 0.15), (tx + th * 0.25, ty - th * 0.15)],
                     fill=(20, int(rng.uniform(60, 90)), 30))
    pixels = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def corrupt_rows(stored: np.ndarray, rng) -> np.ndarray:
    """A band of garbage rows and the rest of the image shifted sideways, as a broken transfer
    leaves it; the pixel data keeps its length."""
    out = stored.copy()
    rows = stored.shape[0]
    start = int(rng.integers(rows // 5, rows // 2))
    band = int(rng.integers(rows // 30 + 1, rows // 8 + 2))
    info = np.iinfo(stored.dtype)
    out[start:start + band] = rng.integers(info.min, info.max, (band, stored.shape[1]), endpoint=True)
    shift = int(rng.integers(stored.shape[1] // 8, stored.shape[1] // 2))
    out[start + band:] = np.roll(stored[start + band:], shift, axis=1)
    return out


# --- DICOM --------------------------------------------------------------------------------------------

def ds_values(*values):
    """Decimal strings of at most 16 characters."""
    out = [DSfloat(float(v), auto_format=True) for v in values]
    return out[0] if len(out) == 1 else out


def pixel_module(stored: np.ndarray, bits: int, photometric="MONOCHROME2") -> dict:
    rgb = stored.ndim == 3
    attrs = dict(Rows=stored.shape[0], Columns=stored.shape[1], SamplesPerPixel=3 if rgb else 1,
                 PhotometricInterpretation="RGB" if rgb else photometric,
                 BitsAllocated=8 if bits <= 8 else 16, BitsStored=bits, HighBit=bits - 1,
                 PixelRepresentation=int(stored.dtype.kind == "i"), PixelData=stored.tobytes())
    if rgb:
        attrs["PlanarConfiguration"] = 0
    return attrs


def voi_module(windows) -> dict:
    """Window Center/Width: nothing, one window, or several (the first is the default)."""
    if not windows:
        return {}
    centers, widths, names = zip(*windows)
    return dict(WindowCenter=ds_values(*centers), WindowWidth=ds_values(*widths),
                WindowCenterWidthExplanation=list(names) if len(names) > 1 else names[0])


def code_sequence(value: str, meaning: str) -> Sequence:
    """A one-item sequence holding a SNOMED CT code."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return Sequence([item])


def dataset(sop_class: str, sop_uid: str, *modules: dict) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    for module in modules:
        for keyword, value in module.items():
            setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset) -> bytes:
    """The Part 10 file, Explicit VR Little Endian."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def relative_path(ds: Dataset) -> str:
    series = f"{int(ds.SeriesNumber):03d}-{ds.Modality}"
    return f"{ds.PatientID}/{ds.StudyID}/{series}/{int(ds.InstanceNumber):05d}.dcm"


def anomaly_of(ds: Dataset) -> str | None:
    """The anomaly an instance was made with, or None."""
    comment = str(ds.get("ImageComments", ""))
    return comment[len(ANOMALY_COMMENT):] if comment.startswith(ANOMALY_COMMENT) else None


FAMILY = ("Ashdown", "Brennan", "Castell", "Dunmore", "Ellery", "Fairweather", "Garrow", "Hollis",
          "Ingram", "Jessop", "Kettering", "Lindqvist", "Marlow", "Norcott", "Okafor", "Pennick",
          "Quarles", "Rowntree", "Sandoval", "Thackeray", "Umber", "Varga", "Whitcombe", "Yardley")
GIVEN = {"F": ("Alice", "Beatrix", "Chiara", "Dana", "Edith", "Freya", "Greta", "Hana", "Iris", "June"),
         "M": ("Anton", "Bruno", "Cyril", "Dmitri", "Elliot", "Felix", "Gideon", "Hugo", "Ivo", "Jonas")}


class Patient:
    """One synthetic patient's context: its random stream, UIDs, identity and study numbering."""

    def __init__(self, seed: int, index: int, size: int, slices: int, anomaly: str | None):
        self.seed, self.index, self.size, self.slices, self.anomaly = seed, index, size, slices, anomaly
        self.rng = np.random.default_rng([seed, index])
        sex = "F" if self.rng.random() < 0.5 else "M"
        self.birth = date(1935, 1, 1) + timedelta(days=int(self.rng.integers(0, 70 * 365)))
        self.first_visit = date(2016, 1, 1) + timedelta(days=int(self.rng.integers(0, 8 * 365)))
        self.attrs = dict(PatientName=f"{self.rng.choice(FAMILY)}^{self.rng.choice(GIVEN[sex])}",
                          PatientID=f"SYN{seed:03d}-{index:05d}", PatientBirthDate=f"{self.birth:%Y%m%d}",
                          PatientSex=sex)

    @cached_property
    def chest(self) -> Chest:
        """The thorax that the patient's CT and radiographs both show."""
        return make_chest(self.rng)

    def uid(self, *parts) -> str:
        """A UID from a hash of the seed, the patient and ``parts``: unique and reproducible."""
        return generate_uid(entropy_srcs=["minipacs.synth", *map(str, (self.seed, self.index, *parts))])

    def study(self, number: int, description: str, days: int) -> dict:
        day = self.first_visit + timedelta(days=days)
        age = (day - self.birth).days // 365
        return dict(StudyInstanceUID=self.uid("study", number), StudyDate=f"{day:%Y%m%d}",
                    StudyTime=f"{8 + number % 9:02d}{int(self.rng.integers(0, 60)):02d}00",
                    StudyID=f"S{number}", AccessionNumber=f"A{self.seed:03d}{self.index:05d}{number}",
                    ReferringPhysicianName="Referrer^Synthetic", StudyDescription=description,
                    PatientAge=f"{age:03d}Y", **self.attrs)

    def series(self, study: dict, number: int, modality: str, description: str, **extra) -> dict:
        return dict(SeriesInstanceUID=self.uid(study["StudyID"], "series", number), SeriesNumber=number,
                    Modality=modality, SeriesDescription=description, SeriesDate=study["StudyDate"],
                    SeriesTime=study["StudyTime"], Manufacturer="minipacs",
                    ManufacturerModelName=f"synthetic {modality}", InstitutionName="Synthetic Hospital",
                    StationName=f"SYN{modality}1", SoftwareVersions="minipacs.synth 1", **extra)

    def instance(self, study: dict, series: dict, number: int) -> dict:
        """Instance Number and content time: a second apart, after the series started."""
        start = datetime.strptime(study["StudyDate"] + series["SeriesTime"], "%Y%m%d%H%M%S")
        content = start + timedelta(seconds=number)
        return dict(InstanceNumber=number, ContentDate=f"{content:%Y%m%d}", ContentTime=f"{content:%H%M%S}")


def plane_module(grid: Grid, z: float, thickness: float, row=(1, 0, 0), col=(0, 1, 0)) -> dict:
    o = grid.origin
    return dict(PixelSpacing=ds_values(grid.spacing, grid.spacing),
                ImageOrientationPatient=ds_values(*row, *col),
                ImagePositionPatient=ds_values(o, o, z), SliceThickness=ds_values(thickness),
                SliceLocation=ds_values(z))


def positions(lo: float, hi: float, count: int) -> np.ndarray:
    """Slice positions from the top down, as scanners number them."""
    return np.linspace(hi, lo, count) if count > 1 else np.array([(lo + hi) / 2])


def ct_study(pt: Patient, number: int) -> Iterator[Dataset]:
    """A chest CT acquisition reconstructed three ways (lung, mediastinum and bone kernels), plus
    the patient's anomaly, if any: a slice replaced by a broken one, or a screen capture or a
    photograph as an extra series."""
    rng, ch = pt.rng, pt.chest
    study = pt.study(number, "CT Chest" + (" with contrast" if ch.contrast else ""), 0)
    fov = float(np.clip(round(2.25 * (ch.width + ch.wall + ch.fat), -1), 300, 500))
    grid = Grid(pt.size, fov / pt.size)
    frame = dict(FrameOfReferenceUID=pt.uid(study["StudyID"], "frame"), PositionReferenceIndicator="")
    offset = -float(rng.uniform(100, 400))  # the table's position, not the lungs, defines z
    lo, hi = -0.06 * ch.height, 1.04 * ch.height
    sample = None
    raw_noise, texture = noise_banks(rng, pt.size)
    for k, recon in enumerate(RECONS):
        windows = recon.windows[pt.index % len(recon.windows)]
        fmt = CT_FORMATS[(pt.index + k) % len(CT_FORMATS)]
        zs = positions(lo, hi, max(2, round(pt.slices * recon.slice_fraction)))
        thickness = float(round((hi - lo) / (len(zs) - 1), 2))
        series = pt.series(study, k + 1, "CT", f"{recon.name} {thickness:g}mm {recon.kernel}",
                           BodyPartExamined="CHEST", PatientPosition="HFS", **frame)
        acquisition = dict(ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], KVP=ds_values(120),
                           AcquisitionNumber=1, ConvolutionKernel=recon.kernel,
                           ReconstructionDiameter=ds_values(fov), DataCollectionDiameter=ds_values(500),
                           GantryDetectorTilt=ds_values(0), TableHeight=ds_values(160),
                           RotationDirection="CW", XRayTubeCurrent=int(rng.integers(80, 350)),
                           ExposureTime=500, FilterType="BODY",
                           RescaleIntercept=ds_values(fmt.intercept), RescaleSlope=ds_values(fmt.slope),
                           RescaleType="HU")
        noise = kernel_noise(raw_noise, recon.sharpness)
        broken = len(zs) // 2 if k == 0 and pt.anomaly in ("saturated_window", "corrupted_rows") else -1
        for i, z in enumerate(zs):
            hu = ct_hu(ch, grid, z, thickness / 2, recon, noise, texture, rng)
            stored, voi, comment = fmt.store(hu), voi_module(windows), {}
            if i == broken:
                comment = dict(ImageComments=ANOMALY_COMMENT + pt.anomaly)
                if pt.anomaly == "corrupted_rows":
                    stored = corrupt_rows(stored, rng)
                else:
                    wrong = (rng.choice([-1500.0, 3500.0]), float(rng.choice([1, 10, 40])), "WRONG")
                    voi = voi_module([wrong])
            if k == 1 and i == len(zs) // 2:
                sample = hu
            yield dataset(CTImageStorage, pt.uid(series["SeriesInstanceUID"], i),
                          study, series, acquisition, plane_module(grid, z + offset, thickness),
                          pt.instance(study, series, i + 1), voi, comment, pixel_module(stored, fmt.bits))
    if pt.anomaly == "burned_in_dialog":
        yield secondary_capture(pt, study, burned_in_dialog(window_linear(sample, 40, 400), rng), "OT",
                                "Screen capture", "WSD")
    elif pt.anomaly == "photograph":
        yield secondary_capture(pt, study, photograph(rng), "XC", "Photo", "DI")


def secondary_capture(pt: Patient, study: dict, rgb: np.ndarray, modality: str, description: str,
                      conversion: str) -> Dataset:
    series = pt.series(study, 90, modality, description, BodyPartExamined="CHEST")
    anomaly = dict(ImageComments=ANOMALY_COMMENT + pt.anomaly, ConversionType=conversion,
                   BurnedInAnnotation="YES" if conversion == "WSD" else "NO", PatientOrientation="")
    return dataset(SecondaryCaptureImageStorage, pt.uid(series["SeriesInstanceUID"], 0), study, series,
                   pt.instance(study, series, 1), anomaly, pixel_module(rgb, 8))


def mr_study(pt: Patient, number: int, region: str) -> Iterator[Dataset]:
    """A head (T1, T2, FLAIR) or upper-abdomen (T1, T2) MR, half the CT matrix, unsigned 12- or
    16-bit, with or without a window."""
    rng = pt.rng
    head = region == "HEAD"
    anatomy = make_head(rng) if head else make_abdomen(rng)
    size = max(64, pt.size // 2)
    fov = 240.0 if head else float(round(2.3 * (anatomy.width + 14 + anatomy.fat), -1))
    grid = Grid(size, fov / size)
    lo, hi = anatomy.z_range
    zs = positions(lo, hi, max(2, pt.slices // 2))
    thickness = 5.0
    study = pt.study(number, f"MR {region.title()}", int(rng.integers(20, 400)))
    frame = dict(FrameOfReferenceUID=pt.uid(study["StudyID"], "frame"), PositionReferenceIndicator="")
    gyri = rng.standard_normal((24, 36, 36), dtype=np.float32)
    for k, weighting in enumerate(HEAD_WEIGHTINGS if head else ABDOMEN_WEIGHTINGS):
        bits = (12, 16)[(pt.index + k) % 2]
        gain = (1 << bits) * rng.uniform(0.25, 0.45) if bits == 12 else rng.uniform(2000, 20000)
        bias = 1 + 0.12 * resized(rng.standard_normal((3, 3), dtype=np.float32), size, size)
        windows = [] if (pt.index + k) % 3 == 0 else [(0.45 * gain, 0.9 * gain, "DEFAULT")]
        series = pt.series(study, k + 1, "MR", f"{weighting.name} axial", BodyPartExamined=region,
                           PatientPosition="HFS", **frame)
        acquisition = dict(ImageType=["ORIGINAL", "PRIMARY", "OTHER"], ScanOptions="",
                           MRAcquisitionType="2D", MagneticFieldStrength=ds_values(1.5),
                           ImagingFrequency=ds_values(63.87), ImagedNucleus="1H",
                           SpacingBetweenSlices=ds_values(abs(zs[0] - zs[-1]) / max(1, len(zs) - 1)),
                           AcquisitionNumber=1, **weighting.attrs)
        for i, z in enumerate(zs):
            frac = (z - lo) / (hi - lo)
            if head:
                labels = head_labels(anatomy, grid, z, thickness / 2, smooth_field(gyri, frac, size))
            else:
                labels = abdomen_labels(anatomy, grid, z, thickness / 2)
            values = mr_slice(labels, weighting, gain, bias, rng)
            yield dataset(MRImageStorage, pt.uid(series["SeriesInstanceUID"], i), study, series,
                          acquisition, plane_module(grid, z, thickness), pt.instance(study, series, i + 1),
                          voi_module(windows), pixel_module(PixelFormat(bits, False).store(values), bits))


def radiograph_study(pt: Patient, number: int, modality: str) -> Iterator[Dataset]:
    """CR (PA and lateral, MONOCHROME1, the lateral without a window) or DX (PA, MONOCHROME2, for
    presentation) chest radiographs, projected from the patient's chest model."""
    rng, ch = pt.rng, pt.chest
    size = 2 * pt.size
    grid = Grid(size, 430.0 / size)
    study = pt.study(number, f"{modality} Chest", int(rng.integers(-300, 300)))
    views = (("PA", False), ("LL", True)) if modality == "CR" else (("PA", False),)
    photometric = "MONOCHROME1" if modality == "CR" else "MONOCHROME2"
    for k, (view, lateral) in enumerate(views):
        v, (center, width) = radiograph(ch, grid, lateral, rng)
        if photometric == "MONOCHROME1":  # stored high where exposure is high: lungs
            v, center = 4095 - v, 4095 - center
        windows = [] if lateral else [(center, width, "DEFAULT")]
        series = pt.series(study, k + 1, modality, f"Chest {view}", BodyPartExamined="CHEST",
                           ViewPosition=view)
        image = dict(ImageType=["ORIGINAL", "PRIMARY"], ImageLaterality="U",
                     PatientOrientation=["P", "F"] if lateral else ["L", "F"],
                     ImagerPixelSpacing=ds_values(grid.spacing, grid.spacing),
                     KVP=ds_values(120 if lateral else 110), ExposureTime=int(rng.integers(5, 20)))
        if modality == "DX":
            image.update(PresentationIntentType="FOR PRESENTATION",
                         PixelIntensityRelationship="LOG", PixelIntensityRelationshipSign=-1,
                         RescaleIntercept=ds_values(0), RescaleSlope=ds_values(1), RescaleType="US",
                         PresentationLUTShape="IDENTITY", LossyImageCompression="00",
                         BurnedInAnnotation="NO", DetectorType="SCINTILLATOR",
                         PixelSpacing=ds_values(grid.spacing, grid.spacing),
                         PositionerType="COLUMN", AcquisitionContextSequence=Sequence(),
                         AnatomicRegionSequence=code_sequence("51185008", "Chest"),
                         ViewCodeSequence=code_sequence("399348003", "postero-anterior"))
        sop_class = (ComputedRadiographyImageStorage if modality == "CR"
                     else DigitalXRayImageStorageForPresentation)
        yield dataset(sop_class, pt.uid(series["SeriesInstanceUID"], 0), study, series,
                      pt.instance(study, series, 1), image, voi_module(windows),
                      pixel_module(PixelFormat(12, False).store(v), 12, photometric))


EXTRA_STUDIES = (partial(mr_study, region="HEAD"), partial(radiograph_study, modality="CR"),
                 partial(radiograph_study, modality="DX"), partial(mr_study, region="ABDOMEN"))


def anomaly_for(index: int, rate: float) -> str | None:
    """Spread anomalies evenly: a fraction ``rate`` of patients, cycling through the kinds."""
    before, after = math.floor(index * rate), math.floor((index + 1) * rate)
    return ANOMALIES[before % len(ANOMALIES)] if after > before else None


def patient_instances(seed: int, index: int, size: int = 512, slices: int = 40,
                      anomalies: float = 0.5) -> Iterator[Dataset]:
    """One patient: a chest CT and two more studies (MR head, CR, DX or MR abdomen, in turn)."""
    pt = Patient(seed, index, size, slices, anomaly_for(index, anomalies))
    yield from ct_study(pt, 1)
    for n, k in enumerate((index, index + 1), start=2):
        yield from EXTRA_STUDIES[k % len(EXTRA_STUDIES)](pt, n)


def generate(patients: int = 10, seed: int = 0, *, size: int = 512, slices: int = 40,
             anomalies: float = 0.5, first: int = 0) -> Iterator[Dataset]:
    """Datasets of patients ``first`` .. ``first + patients - 1`` (each independent of the
    others). ``size``: CT matrix (MR half, radiographs double); ``slices``: slices of the lung
    series (the other CT series and MR have half); ``anomalies``: fraction of patients with one
    anomalous instance (see ``ANOMALIES``)."""
    for index in range(first, first + patients):
        yield from patient_instances(seed, index, size, slices, anomalies)


# --- CLI ----------------------------------------------------------------------------------------------

def write_folder(out: Path) -> Callable[[list[Dataset]], None]:
    def send(batch):
        for ds in batch:
            path = out / relative_path(ds)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(ds))
    return send


def post_to_orthanc(url: str, user: str | None, password: str | None) -> Callable[[list[Dataset]], None]:
    orthanc = Orthanc(url, user, password)

    def send(batch):
        for ds in batch:
            orthanc.request("/instances", encode(ds))
    return send


def c_store(address: str, aec: str, aet: str) -> Callable[[list[Dataset]], None]:
    """Send each batch in one association with DCMTK's storescu, from a temporary folder."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--store wants HOST:PORT, not {address!r}")

    def send(batch):
        with tempfile.TemporaryDirectory(prefix="minipacs-synth-") as tmp:
            write_folder(Path(tmp))(batch)
            files = sorted(str(p) for p in Path(tmp).rglob("*.dcm"))
            done = subprocess.run(["storescu", "--required", "-aet", aet, "-aec", aec, host, port, *files],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
    return send


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipacs.synth", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:6]))
    parser.add_argument("out", nargs="?", type=Path, help="folder for PatientID/Study/Series/NNNNN.dcm")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--first", type=int, default=0,
                        help="index of the first patient (patients are independent: split big runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="CT matrix; MR is half, radiographs double")
    parser.add_argument("--slices", type=int, default=40,
                        help="slices of the lung CT series; the other CT series and MR have half")
    parser.add_argument("--anomalies", type=float, default=0.5,
                        help="fraction of patients with one anomalous instance (0 for none)")
    destination = parser.add_mutually_exclusive_group()
    destination.add_argument("--orthanc", metavar="URL", help="POST each instance to Orthanc's REST API")
    destination.add_argument("--store", metavar="HOST:PORT", help="C-STORE each patient with storescu")
    parser.add_argument("--aec", default="MINIPACS", help="called AE title for --store")
    parser.add_argument("--aet", default="SYNTH", help="calling AE title for --store")
    parser.add_argument("--user", default=os.environ.get("MINIPACS_USER"), help="for --orthanc")
    parser.add_argument("--password", default=os.environ.get("MINIPACS_PASSWORD"), help="for --orthanc")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.orthanc is None and args.store is None):
        parser.error("give one destination: an output folder, --orthanc URL or --store HOST:PORT")
    if args.orthanc:
        send, where = post_to_orthanc(args.orthanc, args.user, args.password), args.orthanc
    elif args.store:
        send, where = c_store(args.store, args.aec, args.aet), f"{args.aec}@{args.store}"
    else:
        send, where = write_folder(args.out), str(args.out)
    start, count = time.perf_counter(), 0
    try:
        for index in range(args.first, args.first + args.patients):
            batch = list(patient_instances(args.seed, index, args.size, args.slices, args.anomalies))
            send(batch)
            count += len(batch)
    except (urllib.error.URLError, RuntimeError, OSError) as exc:
        print(f"minipacs synth: stopped after {count} instances: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"minipacs synth: {count} instances of {args.patients} patients to {where} in {seconds:.1f} s "
          f"({count / seconds:.0f}/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
