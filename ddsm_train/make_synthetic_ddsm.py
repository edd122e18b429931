"""Seeded generator of a small synthetic CBIS-DDSM-style data set (mammogram phantoms).

Companion data for the end-to-end whole-mammogram classifier of Shen et al., "Deep Learning to
Improve Breast Cancer Detection on Screening Mammography" (Sci Rep 2019; arXiv 1708.09427). The
tests, benchmarks and the demo use it in place of CBIS-DDSM, in exactly the layouts the real tools
read (the CBIS-DDSM layouts described in the README's "Data formats")::

    OUT/full_img/{patient_id}_{LEFT|RIGHT}_{CC|MLO}.png        16-bit full mammograms
    OUT/roi_mask/{Calc|Mass}-Training_{patient_id}_{side}_{view}_{abn_num}.png   1-bit 0/255
    OUT/roi_mask_path.csv      patient_id,side,view,abn_num,pathology,type
    OUT/train_pat.txt, OUT/test_pat.txt                         one patient id per line
    OUT/pat_side_cancer.csv    patient_id,side,cancer
    OUT/whole_img/{train,val,test}/{neg,pos}/{patient_id}_{side}_{view}.png  16-bit, resized
    OUT/synthetic_ddsm.json    the resolved options, counts and val patients (paths relative)

Patient ids are ``P_00001``, ``P_00002``, ... Every patient has both sides and both views
(4 images).
Mask names use ``-Training`` for every patient (the sampler's layout), test patients included.

Pixel scale
    The phantoms are rendered as 12-bit intensities (0..4095) and stored in 16-bit PNG multiplied
    by 16, so full images hold multiples of 16 in 0..65520 (``MAX_STORED_VALUE``) and the standard
    16-bit flag ``--rescale-factor 0.003891`` (255/65535) maps them to 0..254.9, as for CBIS-DDSM
    PNGs. Whole images are resized from the 12-bit rendering with ``cv2.INTER_AREA`` and stored the
    same way. Masks are uint8 0/255 at the full image's size.

Geometry
    LEFT breasts have the chest wall on the left image edge, RIGHT breasts on the right edge (as
    in CBIS-DDSM). The breast is a half-ellipse/paraboloid attached to the chest wall on a dark
    noisy background, with tissue falling off towards a brighter skin line; MLO views add a
    bright pectoral-muscle wedge in the upper chest-wall corner. Parenchyma is 1/f^beta noise
    (FFT), plus a patient-specific amount of dense fibroglandular tissue (fatty to dense). A white
    burned-in label ("L CC", "R MLO", ...) sits in the top corner away from the chest wall,
    outside the breast.

Lesions and the cues that separate the classes
    About ``malignant_frac`` (default half) of the patients have one malignant lesion (sometimes
    two) in one breast; independently each breast has a benign lesion with probability
    ``benign_frac`` (default 0.4; 30 % of benign lesions are BENIGN_WITHOUT_CALLBACK), so "has a
    lesion" alone does not tell positives from negatives. Masses and calcifications are equally
    likely. Calcification ROI masks are the convex hull of the specks, dilated a little.
    Each lesion appears in both the CC and the MLO view of its breast, at consistent but not
    identical places, with the same shape rotated and rescaled a little. The cues:

    * mass, MALIGNANT: irregular core (radius modulated by harmonics 2..7) with 10..20 thin
      radiating spicules reaching 1.5-3 core radii from the centre; centrally peaked profile.
      The ROI mask is the core outline (spicules excluded), so its outline is irregular.
    * mass, BENIGN / BENIGN_WITHOUT_CALLBACK: round or oval (axis ratio 0.65..1), smooth edge,
      flat dome profile, no spicules.
    * calc, MALIGNANT: a tight cluster (radius 1.5-2.8 % of the image height) of 25..60 fine
      pleomorphic specks (ellipses of 1.2-2.6 px semi-axis at 1024 px height, axis ratio
      0.35..1, and short linear segments), which forms a bright granular patch.
    * calc, BENIGN: 3..8 larger round specks (radius 3-5.5 px at 1024 px height) scattered
      over a wider area (radius 3.5-6.5 %).

    Sizes and contrasts overlap between classes: mass radius 2.2-4.5 % of the image height for
    both (diameter 4.4-9 %); mass contrast 450-900 (malignant) vs 350-800 (benign) 12-bit units
    above the tissue; speck contrast 800-1500 vs 900-1600. Brightness or size alone therefore
    does not separate malignant from benign; shape (spiculation, irregularity) and cluster
    density (many fine specks close together, against a few coarse specks spread out) do; the
    calcification cluster extents differ by design (that is the "clustered vs scattered" cue).
    Lesions stay visible after the whole image is downscaled to about 288x224.
    ``lesion_contrast`` (default 1) scales every lesion's contrast, both classes alike, to make
    an easier or a harder set.

Splits
    Patients are split into train/test (``test_frac``, default 25 %) stratified by "has a
    malignant lesion"; the whole-image ``val`` folder holds a stratified ``val_frac`` share
    (default 20 %) of the train patients (still listed in ``train_pat.txt``; the patch sampler
    makes its own validation split). A whole-image view is ``pos`` iff it shows a malignant
    lesion. With fewer than 3 patients the ``val`` folders may be empty (a warning is logged).

Output folder
    A missing or empty ``out_dir`` is filled. A non-empty one is refused (``ValueError``) unless
    ``overwrite=True`` (``--overwrite``) and the folder holds this generator's marker (its
    manifest ``.ddsm_outputs.json``, naming every file it wrote): then the files the manifest
    names are removed before writing (and the folders above once empty); anything else in the
    folder is left alone. A folder without the marker (real prepared data) is never touched.

Same seed and options give byte-identical files, wherever they are written and whatever the
number of ``workers``: every patient and view has its own random stream. Speed: about 20 s of
CPU time for 40 patients at 1024x800 (160 images); tissue texture is rendered at half size.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import script_utils  # first: puts the root dm_* modules on sys.path

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402

import dm_image  # noqa: E402
import common_flags as cf  # noqa: E402
import run_files  # noqa: E402
import run_options  # noqa: E402
from ddsm_names import SIDES, VIEWS, image_name, mask_name  # noqa: E402

__all__ = [
    "MAX_12BIT",
    "STORE_FACTOR",
    "MAX_STORED_VALUE",
    "SIDES",
    "VIEWS",
    "ROI_CSV_HEADER",
    "run",
    "write_synthetic_ddsm",
    "options_class",
    "get_args_parser",
    "main",
]

logger = logging.getLogger(__name__)

MAX_12BIT = 4095
STORE_FACTOR = 16
MAX_STORED_VALUE = MAX_12BIT * STORE_FACTOR  # 65520
ROI_CSV_HEADER = tuple(script_utils.ROI_COLUMNS)   # the columns of roi_mask_path.csv
PAT_SIDE_HEADER = ("patient_id", "side", "cancer")
MIN_IMG_HEIGHT, MIN_IMG_WIDTH, MIN_WHOLE_SIZE = 128, 96, 16
_TOOL = "make_synthetic_ddsm"
_OUTPUT_DIRS = ("full_img", "roi_mask", "whole_img")
_OUTPUT_FILES = ("roi_mask_path.csv", "train_pat.txt", "test_pat.txt", "pat_side_cancer.csv",
                 "synthetic_ddsm.json")


# ----------------------------------------------------------------------------------------------
# Plan: patients, breasts, lesions (all randomness of a patient comes from its own stream)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Lesion:
    kind: str  # "mass" or "calc"
    pathology: str  # MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK
    u: float  # depth from the chest wall, fraction of the breast depth
    v: float  # position across the breast, fraction of the half-height (-1..1)
    size: float  # mass radius or calc cluster radius, fraction of the image height
    amp: float  # contrast in 12-bit units
    shape_seed: int

    @property
    def malignant(self) -> bool:
        return self.pathology == "MALIGNANT"


@dataclass
class _Breast:
    depth: float  # breast depth, fraction of the image width
    half_height: float  # fraction of the image height
    center: float  # vertical centre, fraction of the image height
    power: float  # profile exponent: 1 = paraboloid, 2 = ellipse
    lesions: list = field(default_factory=list)


@dataclass
class _Patient:
    patient_id: str
    fat: float  # 12-bit fat level
    dense_amp: float  # extra intensity of dense tissue
    density: float  # fraction of the breast that is dense (0.1 fatty .. 0.7 dense)
    texture: float  # amplitude of the 1/f texture
    beta: float  # power-law exponent of the texture
    breasts: dict = field(default_factory=dict)  # side -> _Breast

    @property
    def malignant(self) -> bool:
        return any(les.malignant for b in self.breasts.values() for les in b.lesions)


def _make_lesion(rng: np.random.Generator, kind: str, malignant: bool) -> _Lesion:
    if malignant:
        pathology = "MALIGNANT"
    else:
        pathology = "BENIGN_WITHOUT_CALLBACK" if rng.random() < 0.3 else "BENIGN"
    if kind == "mass":
        size = rng.uniform(0.022, 0.045)
        amp = rng.uniform(450, 900) if malignant else rng.uniform(350, 800)
    else:
        size = rng.uniform(0.015, 0.028) if malignant else rng.uniform(0.035, 0.065)
        amp = rng.uniform(800, 1500) if malignant else rng.uniform(900, 1600)
    return _Lesion(kind=kind, pathology=pathology, u=rng.uniform(0.2, 0.7),
                   v=rng.uniform(-0.55, 0.55), size=size, amp=amp,
                   shape_seed=int(rng.integers(2**31)))


def _plan_patient(index: int, seed: int, malignant_frac: float, benign_frac: float) -> _Patient:
    rng = np.random.default_rng([seed, index])
    pat = _Patient(patient_id=f"P_{index + 1:05d}", fat=rng.uniform(1050, 1400),
                   dense_amp=rng.uniform(550, 950), density=rng.uniform(0.1, 0.7),
                   texture=rng.uniform(120, 200), beta=rng.uniform(2.5, 3.0))
    for side in SIDES:
        pat.breasts[side] = _Breast(depth=rng.uniform(0.58, 0.76),
                                    half_height=rng.uniform(0.36, 0.44),
                                    center=rng.uniform(0.47, 0.53), power=rng.uniform(1.3, 2.2))
    if rng.random() < malignant_frac:
        side = SIDES[int(rng.integers(2))]
        for _ in range(2 if rng.random() < 0.15 else 1):
            kind = "mass" if rng.random() < 0.5 else "calc"
            pat.breasts[side].lesions.append(_make_lesion(rng, kind, True))
    for side in SIDES:
        if rng.random() < benign_frac:
            kind = "mass" if rng.random() < 0.5 else "calc"
            pat.breasts[side].lesions.append(_make_lesion(rng, kind, False))
    for breast in pat.breasts.values():  # keep two lesions of one breast apart
        for k, les in enumerate(breast.lesions):
            les.v = _apart(les, breast.lesions[:k]) if k else float(np.clip(les.v, -0.55, 0.55))
    return pat


def _apart(les: _Lesion, others: list) -> float:
    """Move ``les`` across the breast so that it does not overlap the earlier lesions."""
    for other in others:
        if abs(les.u - other.u) < 0.2 and abs(les.v - other.v) < 0.45:
            les.v = other.v - 0.5 if other.v > 0 else other.v + 0.5
    return float(np.clip(les.v, -0.6, 0.6))


def _stratified_split(ids: list, strata: list, frac: float, rng: np.random.Generator):
    """Split ``ids`` into (kept, taken) with about ``frac`` of each stratum taken."""
    taken = []
    for value in sorted(set(strata)):
        group = [i for i, s in zip(ids, strata) if s == value]
        group = [group[k] for k in rng.permutation(len(group))]
        n = int(round(frac * len(group)))
        if len(group) >= 2 and frac > 0:
            n = min(max(n, 1), len(group) - 1)
        taken += group[:n]
    if not taken and frac > 0 and len(ids) >= 2:
        taken = [ids[int(rng.integers(len(ids)))]]
    kept = [i for i in ids if i not in set(taken)]
    return kept, sorted(taken)


# ----------------------------------------------------------------------------------------------
# Rendering (canonical orientation: chest wall on the left edge; RIGHT views are mirrored)
# ----------------------------------------------------------------------------------------------
def _power_law_noise(shape: tuple, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std float32 noise with a 1/f^beta power spectrum, shape ``shape``.

    Complex white noise is drawn directly in the (half) frequency domain, shaped by
    ``|f|^(-beta/2)`` and transformed back with one inverse real FFT.
    """
    h, w = shape
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f2 = fy * fy + fx * fx
    f2[0, 0] = 1.0
    amp = f2 ** np.float32(-beta / 4.0)
    amp[0, 0] = 0.0
    spec = rng.standard_normal((h, 2 * (w // 2 + 1)), dtype=np.float32).view(np.complex64)
    spec *= amp
    out = scipy.fft.irfft2(spec, s=(h, w)).astype(np.float32, copy=False)
    out -= out.mean()
    return out / (out.std() + np.float32(1e-12))


def _view_geometry(breast: _Breast, view: str, h: int, w: int, rng: np.random.Generator) -> dict:
    """Breast geometry in pixels for one view; MLO is taller and lower, with a pectoral wedge."""
    geo = {"d": breast.depth * w, "a": breast.half_height * h, "cy": breast.center * h,
           "p": breast.power, "pw": 0.0, "ph": 0.0}
    if view == "MLO":
        geo["d"] *= rng.uniform(0.95, 1.05)
        geo["a"] *= rng.uniform(1.05, 1.12)
        geo["cy"] += 0.04 * h
        geo["pw"] = rng.uniform(0.25, 0.4) * w
        geo["ph"] = rng.uniform(0.4, 0.6) * h
    return geo


def _breast_fields(geo: dict, h: int, w: int):
    """Return (breast mask bool HxW, pectoral weight float32 HxW, distance to skin float32)."""
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    r = (x / geo["d"]) ** geo["p"] + ((y - geo["cy"]) / geo["a"]) ** 2
    inside = r < 1.0
    pect = np.zeros((h, w), np.float32)
    if geo["pw"] > 0:
        lin = 1.0 - (x / geo["pw"] + y / geo["ph"])
        inside |= lin > 0
        pect = np.clip(lin / 0.04, 0.0, 1.0) * (0.85 + 0.15 * np.clip(lin * 2.0, 0.0, 1.0))
    mask8 = inside.astype(np.uint8)
    dist = cv2.distanceTransform(mask8, cv2.DIST_L2, 3)
    return inside, pect.astype(np.float32), dist


def _dense_field(pat: _Patient, geo: dict, inside: np.ndarray, shape: tuple,
                 rng: np.random.Generator) -> np.ndarray:
    """Fibroglandular density in 0..1, float32 of ``shape`` (a reduced H, W): smooth blobs,
    more of them behind the nipple than near the skin, ``pat.density`` of the breast dense."""
    h, w = inside.shape
    f32, k = np.float32, 4
    sh, sw = max(h // k, 8), max(w // k, 8)
    low = _power_law_noise((sh, sw), 3.6, rng)
    y = (np.arange(sh, dtype=f32)[:, None] + f32(0.5)) * f32(h / sh)
    x = (np.arange(sw, dtype=f32)[None, :] + f32(0.5)) * f32(w / sw)
    prior = np.exp(-((x / f32(geo["d"]) - f32(0.4)) / f32(0.35)) ** 2
                   - (((y - f32(geo["cy"])) / f32(geo["a"])) / f32(0.75)) ** 2)
    fieldv = low + f32(1.5) * prior
    small_inside = cv2.resize(inside.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
    vals = fieldv[small_inside > 0]
    thr = np.quantile(vals, 1.0 - pat.density) if vals.size else 0.0
    dense = f32(1) / (f32(1) + np.exp((fieldv - f32(thr)) * f32(-1 / 0.3)))
    return cv2.resize(dense, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _render_anatomy(pat: _Patient, geo: dict, h: int, w: int, rng: np.random.Generator):
    """12-bit float32 image (H, W) of the breast on its background, and the breast mask.

    Tissue texture is computed at half resolution and upsampled; outlines, skin line and
    quantum noise at full resolution.
    """
    inside, pect, dist = _breast_fields(geo, h, w)
    s, f32 = h / 1024.0, np.float32
    half = (max(h // 2, 8), max(w // 2, 8))
    dense = _dense_field(pat, geo, inside, half, rng)
    tex = _power_law_noise(half, pat.beta, rng)
    ridges = np.exp(-(_power_law_noise(half, 3.0, rng) * f32(1 / 0.1)) ** 2)  # thin strands
    var = f32(pat.dense_amp) * dense + f32(pat.texture) * (f32(0.5) + dense) * tex
    var += f32(0.8 * pat.texture) * ridges * (f32(0.3) + dense)
    tissue = f32(pat.fat) + cv2.resize(var, (w, h), interpolation=cv2.INTER_LINEAR)
    if geo["pw"] > 0:
        muscle = cv2.resize(f32(0.3 * pat.texture) * tex, (w, h), interpolation=cv2.INTER_LINEAR)
        muscle += f32(pat.fat + rng.uniform(1000, 1350))
        tissue += (muscle - tissue) * pect
    bg = f32(rng.uniform(60, 140))
    thick = np.sqrt(np.minimum(dist * f32(1 / (0.06 * h)), f32(1)))
    tissue = thick * (tissue - bg)
    tissue[dist <= max(2.5 * s, 1.0)] += f32(rng.uniform(250, 400))  # skin line
    img = bg + tissue * inside
    img = cv2.GaussianBlur(img, (0, 0), max(0.6 * s, 0.3))
    img += rng.standard_normal((h, w), dtype=f32) * f32(10.0)
    return img, inside


def _lesion_center(les: _Lesion, geo: dict, view: str, rng: np.random.Generator):
    """Pixel centre (x, y) of a lesion; the MLO place is jittered and kept off the pectoral."""
    u, v = les.u, les.v
    if view == "MLO":
        u = float(np.clip(u + rng.normal(0, 0.03), 0.15, 0.75))
        v = float(np.clip(0.85 * v + rng.normal(0, 0.06), -0.65, 0.65))
    for _ in range(12):
        x = u * geo["d"]
        y = geo["cy"] + v * geo["a"] * np.sqrt(max(1.0 - u ** geo["p"], 0.0))
        if geo["pw"] == 0 or x / geo["pw"] + y / geo["ph"] > 1.15:
            break
        v = min(v + 0.1, 0.75)
        u = min(u + 0.03, 0.75)
    return float(x), float(y)


def _fx(v: float) -> int:
    """Pixel coordinate -> OpenCV fixed point with ``shift=4`` (1/16 pixel)."""
    return int(round(float(v) * 16))


def _local_grid(cx: float, cy: float, radius: float, h: int, w: int):
    """Box (y0, y1, x0, x1) around a centre, clipped to the image, and its dx, dy grids."""
    r = int(np.ceil(radius))
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, w)
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    return (y0, y1, x0, x1), dx, dy


def _render_mass(les: _Lesion, center, rot: float, scale: float, h: int, w: int):
    """Intensity patch and mask patch of a mass: (box, float32 intensity, bool mask)."""
    srng = np.random.default_rng(les.shape_seed)
    s = h / 1024.0
    r0 = les.size * h * scale
    box, dx, dy = _local_grid(center[0], center[1], 3.3 * r0 + 4, h, w)
    rho = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx) - rot
    if not les.malignant:
        q, ang = srng.uniform(0.65, 1.0), srng.uniform(0, np.pi)
        xr = rho * np.cos(theta - ang)
        yr = rho * np.sin(theta - ang)
        re = np.sqrt((xr / r0) ** 2 + (yr / (q * r0)) ** 2)
        prof = np.clip(1.0 - re ** 4, 0.0, 1.0) ** 0.5
        patch = cv2.GaussianBlur(prof.astype(np.float32), (0, 0), max(0.8 * s, 0.3))
        return box, les.amp * patch, re <= 1.05
    radius = np.full_like(theta, r0)
    for k in range(2, 8):
        phase = srng.uniform(0, 2 * np.pi)
        radius += r0 * srng.uniform(0.03, 0.13) / np.sqrt(k - 1) * np.cos(k * theta + phase)
    core = np.clip((radius - rho) / (0.4 * r0), 0.0, 1.0) ** 0.7
    spic = np.zeros_like(core)
    oy, ox = center[1] - box[0], center[0] - box[2]
    for _ in range(int(srng.integers(10, 21))):
        a = srng.uniform(0, 2 * np.pi) + rot
        length = r0 * srng.uniform(1.5, 3.0)
        p0 = (_fx(ox + 0.5 * r0 * np.cos(a)), _fx(oy + 0.5 * r0 * np.sin(a)))
        p1 = (_fx(ox + length * np.cos(a)), _fx(oy + length * np.sin(a)))
        cv2.line(spic, p0, p1, float(srng.uniform(0.45, 0.75)), max(1, int(round(2.2 * s))),
                 cv2.LINE_AA, shift=4)
    lesion = np.maximum(core, cv2.GaussianBlur(spic, (0, 0), max(0.8 * s, 0.3)))
    return box, les.amp * lesion, rho <= 1.1 * radius


def _render_calc(les: _Lesion, center, rot: float, scale: float, h: int, w: int):
    """Intensity patch and mask patch of a calcification cluster: (box, float32, bool mask)."""
    srng = np.random.default_rng(les.shape_seed)
    s = h / 1024.0
    rc = les.size * h * scale
    if les.malignant:
        n = int(srng.integers(25, 61))
        pos = srng.normal(0, 0.45 * rc, size=(n, 2)).clip(-rc, rc)
    else:
        n = int(srng.integers(3, 9))
        ang, rad = srng.uniform(0, 2 * np.pi, n), rc * np.sqrt(srng.uniform(0.05, 1, n))
        pos = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    c, sn = np.cos(rot), np.sin(rot)
    pos = pos @ np.array([[c, sn], [-sn, c]])
    margin = max(4.0, 6.0 * s)
    box, _, _ = _local_grid(center[0], center[1], rc + 2 * margin, h, w)
    patch = np.zeros((box[1] - box[0], box[3] - box[2]), np.float32)
    ctr = pos + np.array([center[0] - box[2], center[1] - box[0]])
    for (px, py) in ctr:
        val = float(srng.uniform(0.7, 1.1))
        pt = (_fx(px), _fx(py))
        if les.malignant and srng.random() < 0.3:
            a, ln = srng.uniform(0, np.pi), srng.uniform(3.0, 6.0) * s
            q = (_fx(px + ln * np.cos(a)), _fx(py + ln * np.sin(a)))
            cv2.line(patch, pt, q, val, max(1, int(round(1.6 * s))), cv2.LINE_AA, shift=4)
        elif les.malignant:
            ax = srng.uniform(1.2, 2.6) * s
            axes = (max(_fx(ax), 8), max(_fx(ax * srng.uniform(0.35, 1)), 8))
            cv2.ellipse(patch, pt, axes, srng.uniform(0, 180), 0, 360, val, -1, cv2.LINE_AA,
                        shift=4)
        else:
            rad = max(_fx(srng.uniform(3.0, 5.5) * s), 8)
            cv2.circle(patch, pt, rad, val, -1, cv2.LINE_AA, shift=4)
    patch = cv2.GaussianBlur(patch, (0, 0), max(0.5 * s, 0.3))
    mask = np.zeros(patch.shape, np.uint8)
    hull = cv2.convexHull(np.round(ctr).astype(np.int32).reshape(-1, 1, 2))
    cv2.fillConvexPoly(mask, hull, 1)
    k = int(2 * round(margin) + 1)
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return box, les.amp * patch, mask > 0


def _draw_label(img: np.ndarray, text: str, chest_left: bool) -> None:
    """Burn a white text label into the top corner away from the chest wall (in place)."""
    h, w = img.shape
    font, th = cv2.FONT_HERSHEY_SIMPLEX, max(1, int(round(h / 400)))
    fs = h / 1024.0 * 1.1
    (tw, tht), _ = cv2.getTextSize(text, font, fs, th)
    if tw > 0.28 * w:
        fs *= 0.28 * w / tw
        (tw, tht), _ = cv2.getTextSize(text, font, fs, th)
    m = max(int(0.03 * w), 2)
    x0 = w - m - tw if chest_left else m
    canvas = np.zeros((h, w), np.uint8)  # OpenCV 5 draws text on 8-bit images only
    cv2.putText(canvas, text, (x0, m + tht), font, fs, 255, th, cv2.LINE_8)
    img[canvas > 64] = MAX_12BIT - 95  # crisp white text (OpenCV 5 anti-aliases text anyway)


def _render_view(pat: _Patient, side: str, view: str, h: int, w: int, seed: int,
                 contrast: float = 1.0):
    """One view: 12-bit float32 image (H, W) and a list of (abn_num, lesion, bool mask)."""
    vrng = np.random.default_rng([seed, int(pat.patient_id[2:]), SIDES.index(side),
                                  VIEWS.index(view)])
    breast = pat.breasts[side]
    geo = _view_geometry(breast, view, h, w, vrng)
    img, _ = _render_anatomy(pat, geo, h, w, vrng)
    masks = []
    for abn, les in enumerate(breast.lesions, start=1):
        center = _lesion_center(les, geo, view, vrng)
        rot = 0.0 if view == "CC" else vrng.uniform(-0.5, 0.5)
        scale = 1.0 if view == "CC" else vrng.uniform(0.9, 1.1)
        render = _render_mass if les.kind == "mass" else _render_calc
        (y0, y1, x0, x1), patch, pmask = render(les, center, rot, scale, h, w)
        img[y0:y1, x0:x1] += np.float32(contrast) * patch
        full = np.zeros((h, w), bool)
        full[y0:y1, x0:x1] = pmask
        masks.append((abn, les, full))
    if side == "RIGHT":
        img = np.ascontiguousarray(img[:, ::-1])
        masks = [(a, les, np.ascontiguousarray(m[:, ::-1])) for a, les, m in masks]
    _draw_label(img, f"{side[0]} {view}", chest_left=(side == "LEFT"))
    return np.clip(img, 0, MAX_12BIT), masks


def _to_stored(img12: np.ndarray) -> np.ndarray:
    """12-bit float image -> uint16 in the stored scale (multiples of 16, max 65520)."""
    return (np.rint(np.clip(img12, 0, MAX_12BIT)).astype(np.uint16) * np.uint16(STORE_FACTOR))


def _imwrite(path: Path, img: np.ndarray, params=()) -> None:
    ok, buf = cv2.imencode(path.suffix or ".png", img, list(params))
    if not ok:
        raise OSError(f"could not encode an image for {path}")
    dm_image.atomic_write(path, lambda fh: fh.write(buf))


def _write_text(path: Path, text: str) -> None:
    dm_image.atomic_write(path, lambda fh: fh.write(text), text=True)


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------
def _check_args(out_dir: Path, whole_img_size: tuple, opts) -> None:
    """Refuse option values no data set can be made with (``whole_img_size``: the options'
    as integers), and an ``out_dir`` that is not empty (without ``overwrite``, or without this
    generator's marker)."""
    nb_patients, img_height, img_width = opts.nb_patients, opts.img_height, opts.img_width
    workers = opts.workers
    if not isinstance(nb_patients, (int, np.integer)) or nb_patients < 2:
        raise ValueError(f"nb_patients should be an integer >= 2, got {nb_patients!r}")
    if img_height < MIN_IMG_HEIGHT or img_width < MIN_IMG_WIDTH:
        raise ValueError(f"image size should be at least {MIN_IMG_HEIGHT}x{MIN_IMG_WIDTH} "
                         f"(height x width), got {img_height}x{img_width}")
    if len(whole_img_size) != 2 or not all(MIN_WHOLE_SIZE <= int(v) for v in whole_img_size):
        raise ValueError(f"whole_img_size should be (height, width), each >= {MIN_WHOLE_SIZE}, "
                         f"got {tuple(whole_img_size)}")
    if whole_img_size[0] > img_height or whole_img_size[1] > img_width:
        raise ValueError(f"whole_img_size {tuple(whole_img_size)} should not exceed the full "
                         f"image size ({img_height}, {img_width})")
    for name, val, lo, hi in (("test_frac", opts.test_frac, 0.0, 1.0),
                              ("val_frac", opts.val_frac, 0.0, 1.0)):
        if not lo < val < hi and not (name == "val_frac" and val == 0):
            raise ValueError(f"{name} should be in ({lo}, {hi}), got {val}")
    for name, val in (("malignant_frac", opts.malignant_frac),
                      ("benign_frac", opts.benign_frac)):
        if not 0.0 <= val <= 1.0:
            raise ValueError(f"{name} should be in [0, 1], got {val}")
    if not opts.lesion_contrast > 0:
        raise ValueError(f"lesion_contrast should be > 0, got {opts.lesion_contrast}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers should be an integer >= 1, got {workers!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not opts.overwrite:
        raise ValueError(f"out_dir {out_dir} is not empty; pass overwrite=True (--overwrite) to "
                         f"replace the generated files in it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _generated_here(out_dir):
        raise ValueError(f"--overwrite refuses out_dir {out_dir}: it holds no marker of this "
                         f"generator ({run_files.MANIFEST_NAME}), so it may hold real data; "
                         f"give an empty or new folder")


def _generated_here(out: Path) -> bool:
    """Whether ``out`` holds this generator's marker: its manifest (or, from versions before
    manifests, its ``synthetic_ddsm.json``)."""
    manifest = run_files.OutputManifest(out, _TOOL)
    if manifest.earlier_tool is not None:
        return manifest.earlier_tool == _TOOL
    return (out / "synthetic_ddsm.json").is_file()


def _prepare_out_dir(out: Path) -> dict:
    """Remove earlier outputs of this generator (the files its manifest names, and the
    folders it made once empty) and create the folders; return the paths."""
    manifest = run_files.OutputManifest(out, _TOOL)
    if manifest.earlier_tool is None and (out / "synthetic_ddsm.json").is_file():
        for name in _OUTPUT_DIRS:   # a folder this generator wrote before it kept manifests
            if (out / name).exists():
                shutil.rmtree(out / name)
        for name in _OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    manifest.remove_earlier()
    manifest.begin()
    run_files.clean_leftovers(*(p for p in out.rglob("*") if p.is_dir()))
    paths = {"out_dir": out, "full_img_dir": out / "full_img", "roi_mask_dir": out / "roi_mask",
             "roi_mask_csv": out / "roi_mask_path.csv", "train_pat": out / "train_pat.txt",
             "test_pat": out / "test_pat.txt", "pat_side_cancer_csv": out / "pat_side_cancer.csv",
             "whole_img_dir": out / "whole_img", "options_json": out / "synthetic_ddsm.json"}
    paths["full_img_dir"].mkdir(parents=True, exist_ok=True)
    paths["roi_mask_dir"].mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        for cls in ("neg", "pos"):
            (paths["whole_img_dir"] / split / cls).mkdir(parents=True, exist_ok=True)
    paths["_before"] = _files_under(out)
    return paths


def _files_under(out: Path) -> set:
    return {p for p in out.rglob("*") if p.is_file() and p.name != run_files.MANIFEST_NAME}


def _save_manifest(out: Path, before: set) -> None:
    """Name the files this run wrote (and the folders it makes) in ``out``'s manifest."""
    manifest = run_files.OutputManifest(out, _TOOL)
    for path in sorted(_files_under(out) - before):
        manifest.add(path)
    for name in _OUTPUT_DIRS:
        for folder in [out / name] + sorted(p for p in (out / name).rglob("*") if p.is_dir()):
            manifest.add_dir(folder)
    manifest.finish(remove_earlier=False)


def _write_patient(pat: _Patient, split: str, paths: dict, h: int, w: int, whole_hw, seed: int,
                   contrast: float):
    """Render and write the 4 views of a patient; return (roi rows, whole-image labels)."""
    rows, labels = [], []
    for side in SIDES:
        for view in VIEWS:
            img12, masks = _render_view(pat, side, view, h, w, seed, contrast)
            stem = image_name(pat.patient_id, side, view)
            _imwrite(paths["full_img_dir"] / f"{stem}.png", _to_stored(img12))
            for abn, les, mask in masks:
                kind = "mass" if les.kind == "mass" else "calc"
                _imwrite(paths["roi_mask_dir"] / mask_name(kind, "Training", stem, abn),
                         mask.astype(np.uint8) * np.uint8(255), (cv2.IMWRITE_PNG_BILEVEL, 1))
                rows.append((pat.patient_id, side, view, abn, les.pathology, les.kind))
            cls = "pos" if any(les.malignant for _, les, _ in masks) else "neg"
            small = cv2.resize(img12, (whole_hw[1], whole_hw[0]), interpolation=cv2.INTER_AREA)
            _imwrite(paths["whole_img_dir"] / split / cls / f"{stem}.png", _to_stored(small))
            labels.append(cls)
    return rows, labels


def _write_lists(paths: dict, patients: list, train_ids: list, test_ids: list, rows: list) -> None:
    _write_text(paths["train_pat"], "".join(f"{p}\n" for p in train_ids))
    _write_text(paths["test_pat"], "".join(f"{p}\n" for p in test_ids))
    _write_text(paths["roi_mask_csv"], script_utils.csv_text(ROI_CSV_HEADER, rows))
    cancer = [(pat.patient_id, side, int(any(les.malignant for les in pat.breasts[side].lesions)))
              for pat in patients for side in SIDES]
    _write_text(paths["pat_side_cancer_csv"], script_utils.csv_text(PAT_SIDE_HEADER, cancer))


def run(out_dir: Union[str, Path], **options) -> dict:
    """Write a synthetic CBIS-DDSM-style data set into ``out_dir`` (layouts in the module doc).

    Args:
        out_dir: output folder; must be missing or empty unless ``overwrite``.
        **options: any option of the command line by destination name (``nb_patients=...``,
            ``whole_img_size=(h, w)``; see :func:`get_args_parser`); the options not given
            take the parser's defaults.

    Returns:
        The dict of :func:`write_synthetic_ddsm`.

    Raises:
        ValueError: an option the parser does not know (naming the valid ones), and the
            errors of :func:`write_synthetic_ddsm`.
    """
    opts = run_options.options_from(options_class(), script_utils.resolve_options(
        get_args_parser(), (out_dir,), options))
    return write_synthetic_ddsm(opts)


@dataclass(frozen=True)
class _Plan:
    """The patients of a data set and their splits.

    Attributes:
        patients: every patient, in id order.
        train_ids, test_ids: the patient lists' split (stratified by malignancy).
        val_ids: the train patients of the whole-image ``val`` folders.
        split_of: patient id -> its whole-image split (``train``, ``val`` or ``test``).
    """

    patients: list
    train_ids: list
    test_ids: list
    val_ids: list
    split_of: dict


def _plan(opts) -> _Plan:
    """Draw the patients and their lesions, and split them (everything from ``opts.seed``)."""
    seed = opts.seed
    patients = [_plan_patient(i, seed, opts.malignant_frac, opts.benign_frac)
                for i in range(opts.nb_patients)]
    ids = [p.patient_id for p in patients]
    strata = [p.malignant for p in patients]
    split_rng = np.random.default_rng([seed, 2**31])
    train_ids, test_ids = _stratified_split(ids, strata, opts.test_frac, split_rng)
    train_strata = [strata[ids.index(i)] for i in train_ids]
    fit_ids, val_ids = _stratified_split(train_ids, train_strata, opts.val_frac, split_rng)
    if not val_ids:
        logger.warning("no patient left for the whole-image val split (nb_patients=%d)",
                       opts.nb_patients)
    split_of = {**{i: "train" for i in fit_ids}, **{i: "val" for i in val_ids},
                **{i: "test" for i in test_ids}}
    return _Plan(patients, train_ids, test_ids, val_ids, split_of)


def _write_patients(plan: _Plan, paths: dict, whole_hw: tuple, opts):
    """Render and write every patient's views on ``opts.workers`` threads; return (roi rows,
    {split: {neg, pos}} whole-image counts)."""
    rows, counts = [], {s: {"neg": 0, "pos": 0} for s in ("train", "val", "test")}

    def write(pat):
        return _write_patient(pat, plan.split_of[pat.patient_id], paths, opts.img_height,
                              opts.img_width, whole_hw, opts.seed, opts.lesion_contrast)

    with ThreadPoolExecutor(max_workers=opts.workers) as pool:
        results = list(pool.map(write, plan.patients))
    for pat, (prow, labels) in zip(plan.patients, results):
        rows += prow
        for cls in labels:
            counts[plan.split_of[pat.patient_id]][cls] += 1
        if opts.verbose:
            logger.info("%s: %d lesions, %s", pat.patient_id, len(prow), labels)
    return rows, counts


def write_synthetic_ddsm(opts: run_options.RunOptions) -> dict:
    """Write a synthetic CBIS-DDSM-style data set (layouts in the module doc).

    Args:
        opts: the options (an instance of :func:`options_class`): ``out_dir`` (missing or
            empty unless ``overwrite``), ``nb_patients`` (>= 2, 4 views each),
            ``img_height``/``img_width`` (full image size, >= 128 x 96), ``whole_img_size``
            ((height, width) of the whole-image class folders, each >= 16, not larger than the
            full image), ``seed`` (of every random choice: same seed and options give
            byte-identical files), ``test_frac`` (share of patients in the test split,
            stratified by malignancy), ``val_frac`` (share of the train patients in the
            whole-image ``val`` folders, 0 allowed), ``malignant_frac`` (probability that a
            patient has a malignant lesion), ``benign_frac`` (probability that a breast has a
            benign lesion), ``lesion_contrast`` (factor on the contrast of every lesion, both
            classes alike, > 0: above 1 an easier set, below 1 a harder one), ``overwrite``
            (replace this generator's earlier outputs in a non-empty ``out_dir``),
            ``workers`` (threads rendering and writing patients; the output does not depend
            on it), ``verbose`` (log one line per patient).

    Returns:
        dict with the paths written (``full_img_dir``, ``roi_mask_dir``, ``roi_mask_csv``,
        ``train_pat``, ``test_pat``, ``pat_side_cancer_csv``, ``whole_img_dir``,
        ``options_json``) as ``Path`` objects, the counts ``nb_patients``, ``nb_images``,
        ``nb_masks``, ``nb_malignant_patients``, ``nb_train_patients``, ``nb_val_patients``,
        ``nb_test_patients``, ``whole_img_counts`` ({split: {neg, pos}}) and ``seconds``.

    Raises:
        ValueError: bad sizes, fractions, patient count, or a non-empty ``out_dir`` without
            ``overwrite``.
    """
    t0 = time.perf_counter()
    out = Path(opts.out_dir)
    whole_hw = (int(opts.whole_img_size[0]), int(opts.whole_img_size[1]))
    _check_args(out, whole_hw, opts)
    options = dict(nb_patients=int(opts.nb_patients), img_height=int(opts.img_height),
                   img_width=int(opts.img_width), whole_img_size=list(whole_hw),
                   seed=int(opts.seed), test_frac=opts.test_frac, val_frac=opts.val_frac,
                   malignant_frac=opts.malignant_frac, benign_frac=opts.benign_frac,
                   lesion_contrast=opts.lesion_contrast)
    logger.info("synthetic CBIS-DDSM into %s, options: %s", out, options)
    plan = _plan(opts)
    paths = _prepare_out_dir(out)
    before = paths.pop("_before")
    rows, counts = _write_patients(plan, paths, whole_hw, opts)
    _write_lists(paths, plan.patients, plan.train_ids, plan.test_ids, rows)
    result = dict(paths, nb_patients=len(plan.patients), nb_images=4 * len(plan.patients),
                  nb_masks=len(rows),
                  nb_malignant_patients=int(sum(p.malignant for p in plan.patients)),
                  nb_train_patients=len(plan.train_ids), nb_val_patients=len(plan.val_ids),
                  nb_test_patients=len(plan.test_ids), whole_img_counts=counts)
    summary = {k: (v.relative_to(out).as_posix() if isinstance(v, Path) else v)
               for k, v in result.items() if k != "out_dir"}
    _write_text(paths["options_json"], json.dumps({"options": options, "result": summary,
                                                    "val_patients": plan.val_ids},
                                                   indent=2) + "\n")
    _save_manifest(out, before)
    result["seconds"] = time.perf_counter() - t0
    return result


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line flags: the one declaration of every option (type, default, help);
    :func:`options_class` and :func:`run` take their defaults from it."""
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write a seeded synthetic CBIS-DDSM-style data set (mammogram phantoms, ROI "
                    "masks, CSVs, patient lists and whole-image class folders).")
    parser.add_argument("out_dir", help="output folder (missing or empty unless --overwrite)")
    for name, typ, default, help_text in (
            ("nb_patients", cf.positive_int, 40, "patients (4 views each; at least 2)"),
            ("img_height", cf.positive_int, 1024, "mammogram height in pixels (at least 128)"),
            ("img_width", cf.positive_int, 800, "mammogram width in pixels (at least 96)"),
            ("seed", cf.nonneg_int, 12345, "random seed of the whole data set: the same seed "
                                           "and options give byte-identical files"),
            ("test_frac", cf.fraction, 0.25, "fraction of patients in the test set "
                                             "(stratified by malignancy)"),
            ("val_frac", cf.fraction, 0.2, "fraction of the training patients in "
                                           "whole_img/val (0 allowed)"),
            ("malignant_frac", cf.fraction, 0.5, "fraction of patients with a malignant "
                                                 "lesion"),
            ("benign_frac", cf.fraction, 0.4, "fraction of breasts with a benign lesion"),
            ("lesion_contrast", cf.finite_float, 1.0,
             "lesion brightness relative to the tissue texture, both classes alike (> 0; "
             "above 1 an easier set, below 1 a harder one)"),
            ("workers", cf.positive_int, 2, "threads rendering and writing patients in "
                                            "parallel (the output does not depend on it)")):
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=default,
                            help=help_text)
    parser.add_argument("--whole-img-size", type=cf.positive_int, nargs=2,
                        metavar=("HEIGHT", "WIDTH"), default=[288, 224],
                        help="size of the whole-image class folders' images (each at least "
                             "16, not larger than the mammograms)")
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="replace earlier outputs of this generator in OUT_DIR (default: "
                             "off)")
    parser.add_argument("--verbose", action="store_true", default=False,
                        help="log one line per patient (default: off)")
    return parser


options_class = run_options.tool_options_class(get_args_parser, "SyntheticDDSMOptions")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command line: parse ``argv``, run, print a two-line summary; bad input exits with 2."""
    parser = get_args_parser()
    args = script_utils.parse_command_line(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with script_utils.exit_on_interrupt(parser):
        try:
            res = run(**vars(args))
        except (ValueError, OSError) as err:
            script_utils.user_error_exit(parser, err)
    c = res["whole_img_counts"]
    print(f"wrote {res['nb_images']} images of {res['nb_patients']} patients "
          f"({res['nb_malignant_patients']} with cancer), {res['nb_masks']} ROI masks, "
          f"in {res['seconds']:.1f} s to {res['out_dir']}")
    print("whole images (neg/pos): " + ", ".join(f"{s} {c[s]['neg']}/{c[s]['pos']}" for s in c))
    return res


if __name__ == "__main__":
    main()
