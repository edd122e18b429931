"""The sampler's pure functions: overlap tables, patch-centre drawing, hard negatives.

Used by ``sample_patches_combined.py`` (which keeps the orchestration: inputs, views, outputs,
the command line). Everything here works on arrays and returns arrays; nothing reads or writes
files. The rules are those of the 2017 sampler: an abnormal patch needs its overlap with the ROI
to exceed ``pos_cutoff`` of the ROI area or of the patch area (the cutoff relaxes by 0.05 after
1,000 failed draws); a background or hard-negative patch needs both fractions at or below
``neg_cutoff`` for every ROI; hard negatives are blob-detector centres, spread by k-means. An optional
:class:`PatchGuard` keeps the negatives to breast tissue and refuses constant patches.
"""
from __future__ import annotations

import inspect
import logging
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)
import dm_image  # noqa: E402

__all__ = [
    "BLOB_PARAMS", "MaskSat", "build_mask_sat", "window_sums", "abnormal_passes",
    "negative_passes", "draw_abnormal_centres", "draw_background_centres",
    "create_blob_detector", "detect_blob_centres", "select_hard_negatives", "extract_patch",
    "view_seed", "split_patients", "GUARD_REASONS", "PatchGuard", "breast_mask",
]

logger = logging.getLogger(__name__)

BLOB_PARAMS = dict(min_area=3, min_int=0.5, max_int=0.95, th_step=10)
_TRIES_BEFORE_RELAX = 1000
_RELAX_STEP = 0.05
_BATCH = 512


# ------------------------------------------------------------------------- overlap geometry
@dataclass(frozen=True)
class MaskSat:
    """Summed-area table of one binary mask, stored for the mask's bounding box only.

    Attributes:
        sat: int32 array (h + 1, w + 1), ``cv2.integral`` of the cropped 0/1 mask.
        y0, x0: top-left corner of the crop in the (padded) image coordinates.
        area: number of mask pixels (> 0).
        bbox: (x, y, w, h) of the mask's largest connected component (padded coordinates).
    """

    sat: np.ndarray
    y0: int
    x0: int
    area: int
    bbox: Tuple[int, int, int, int]


def build_mask_sat(mask: np.ndarray, margin: int = 0) -> Optional[MaskSat]:
    """Summed-area table of a binary mask, or None when the mask is empty.

    Args:
        mask: (H, W) array; pixels > 0 belong to the ROI.
        margin: the table's coordinates are those of ``mask`` with a zero margin of this many
            pixels on each side (``np.pad(mask, margin)``, without making that copy).

    Returns:
        MaskSat in those coordinates, or None for an all-zero mask.
    """
    mask = np.asarray(mask)
    # boundingRect of an 8-bit image is the box of its nonzero pixels: no binary copy needed
    nonzero = mask.view(np.uint8) if mask.dtype in (bool, np.uint8) else \
        (mask > 0).astype(np.uint8)
    x0, y0, w, h = cv2.boundingRect(nonzero)
    if w == 0 or h == 0:
        return None
    crop = (nonzero[y0:y0 + h, x0:x0 + w] > 0).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    bx, by, bw, bh = (int(v) for v in stats[big, :4])
    y0, x0 = int(y0) + margin, int(x0) + margin
    return MaskSat(sat=cv2.integral(crop), y0=y0, x0=x0, area=int(np.count_nonzero(crop)),
                   bbox=(bx + x0, by + y0, bw, bh))


def window_sums(sat: MaskSat, cx: np.ndarray, cy: np.ndarray, patch_size: int) -> np.ndarray:
    """Number of mask pixels in the patch windows centred at (cx, cy); O(1) per window.

    The window of centre ``c`` spans ``[c - patch_size // 2, c - patch_size // 2 + patch_size)``
    on each axis (2017 convention for even sizes).

    Args:
        sat: the mask's table.
        cx, cy: int arrays of centre columns and rows (same coordinates as the mask).
        patch_size: side of the square patch in pixels.

    Returns:
        int64 array of intersection areas, shape of ``cx``.
    """
    h, w = sat.sat.shape[0] - 1, sat.sat.shape[1] - 1
    x1 = np.asarray(cx, dtype=np.int64) - patch_size // 2 - sat.x0
    y1 = np.asarray(cy, dtype=np.int64) - patch_size // 2 - sat.y0
    x2, y2 = np.clip(x1 + patch_size, 0, w), np.clip(y1 + patch_size, 0, h)
    x1, y1 = np.clip(x1, 0, w), np.clip(y1, 0, h)
    s = sat.sat  # int32 (counts <= the mask area); gathered, then summed in int64
    return (s[y2, x2].astype(np.int64) - s[y1, x2] - s[y2, x1]) + s[y1, x1]


def _fractions(sat: MaskSat, cx, cy, patch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    inter = window_sums(sat, cx, cy, patch_size).astype(np.float64)
    return inter / sat.area, inter / float(patch_size * patch_size)


def abnormal_passes(sat: MaskSat, cx: np.ndarray, cy: np.ndarray, patch_size: int, cutoff: float
                    ) -> np.ndarray:
    """Positive rule: overlap > ``cutoff`` of the ROI area OR of the patch area (bool array)."""
    roi_frac, patch_frac = _fractions(sat, cx, cy, patch_size)
    return (roi_frac > cutoff) | (patch_frac > cutoff)


def negative_passes(sats: Sequence[MaskSat], cx: np.ndarray, cy: np.ndarray, patch_size: int,
                    cutoff: float) -> np.ndarray:
    """Negative rule: for every table, overlap <= ``cutoff`` of its area AND of the patch area.

    Pass the table of every ROI of the view and the table of their union.
    """
    ok = np.ones(np.shape(cx), dtype=bool)
    for sat in sats:
        roi_frac, patch_frac = _fractions(sat, cx, cy, patch_size)
        ok &= (roi_frac <= cutoff) & (patch_frac <= cutoff)
    return ok


# ------------------------------------------------------------------------- centre drawing
def draw_abnormal_centres(rng: np.random.Generator, sat: MaskSat, patch_size: int, nb: int,
                          cutoff: float, accept: Optional[Callable[[int, int], bool]] = None
                          ) -> Tuple[np.ndarray, float, int]:
    """Draw ``nb`` patch centres around one ROI that meet the (relaxing) positive rule.

    Candidates are uniform integers in the bounding box of the ROI's largest component, drawn in
    batches; accepted in draw order exactly as one-at-a-time drawing would: after 999 consecutive
    failures the next draw is judged with ``cutoff - 0.05`` and the count restarts.

    Args:
        rng: numpy Generator.
        sat: the ROI's table (padded image coordinates).
        patch_size: patch side in pixels.
        nb: number of patches wanted.
        cutoff: initial positive cutoff in (0, 1].
        accept: optional ``accept(x, y) -> bool`` judging a centre that meets the rule (e.g.
            :meth:`PatchGuard.lesion_ok`); a refused centre counts as a failed draw.

    Returns:
        (centres, final_cutoff, nb_relaxations): centres is an int64 (n, 2) array of (x, y);
        n < nb only when the cutoff would drop to 0 or below.
    """
    bx, by, bw, bh = sat.bbox
    out: List[Tuple[int, int]] = []
    tries, relaxations, cur = 0, 0, float(cutoff)
    while len(out) < nb:
        cx = rng.integers(bx, bx + bw, size=_BATCH)
        cy = rng.integers(by, by + bh, size=_BATCH)
        roi_frac, patch_frac = _fractions(sat, cx, cy, patch_size)
        score = np.maximum(roi_frac, patch_frac)
        i = 0
        while i < _BATCH and len(out) < nb:
            relax_at = _TRIES_BEFORE_RELAX - 1 - tries  # offset of the draw judged after relaxing
            seg = score[i:i + max(relax_at, 0)] > cur
            if seg.any():
                j = int(np.argmax(seg))
                x, y = int(cx[i + j]), int(cy[i + j])
                if accept is None or accept(x, y):
                    out.append((x, y))
                    i, tries = i + j + 1, 0
                else:  # a failed draw: the count goes on
                    i, tries = i + j + 1, tries + j + 1
                continue
            if i + relax_at >= _BATCH:  # no relaxation inside this batch
                tries += _BATCH - i
                break
            relaxations += 1
            cur = float(cutoff) - _RELAX_STEP * relaxations
            if cur <= 1e-9:
                return np.asarray(out, dtype=np.int64).reshape(-1, 2), cur, relaxations
            i, tries = i + relax_at, -1  # that draw is judged next with the count reset to 0
    return np.asarray(out, dtype=np.int64).reshape(-1, 2), cur, relaxations


def draw_background_centres(rng: np.random.Generator, sats: Sequence[MaskSat],
                            region: Tuple[int, int, int, int], patch_size: int, nb: int,
                            cutoff: float, max_draws: int = 100_000,
                            guard: Optional["PatchGuard"] = None) -> np.ndarray:
    """Draw ``nb`` centres uniformly in ``region`` that meet the negative rule.

    Args:
        rng: numpy Generator.
        sats: tables of every ROI of the view and of their union (may be empty).
        region: (x0, y0, x1, y1), centres drawn in ``[x0, x1) x [y0, y1)``.
        patch_size: patch side in pixels.
        nb: number wanted.
        cutoff: negative cutoff.
        max_draws: give up after this many candidates (returns fewer centres).
        guard: optional :class:`PatchGuard`; the centres that meet the negative rule are then
            kept only when the guard keeps them (in draw order, the refused ones counted).

    Returns:
        int64 (n, 2) array of (x, y), n <= nb.
    """
    x0, y0, x1, y1 = region
    found: List[np.ndarray] = []
    have, drawn = 0, 0
    while have < nb and drawn < max_draws:
        cx = rng.integers(x0, x1, size=_BATCH)
        cy = rng.integers(y0, y1, size=_BATCH)
        drawn += _BATCH
        ok = np.flatnonzero(negative_passes(sats, cx, cy, patch_size, cutoff))
        ok = ok[:nb - have] if guard is None else ok[guard.keep(cx[ok], cy[ok], nb - have)]
        found.append(np.stack([cx[ok], cy[ok]], axis=1))
        have += ok.size
    return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), np.int64)


# ------------------------------------------------------------------------- breast-tissue guard
#: Why a :class:`PatchGuard` refuses a candidate: less than the asked fraction of the patch in
#: the breast; a pixel standard deviation at or below the threshold (but not 0); a constant
#: negative patch; a constant lesion patch.
GUARD_REASONS = ("outside_breast", "near_constant", "constant", "constant_lesion")


def breast_mask(img: np.ndarray) -> np.ndarray:
    """0/255 uint8 mask of the breast, as :func:`dm_image.segment_breast` finds it with its
    default thresholds (the largest bright object, holes filled), at ``img``'s size.

    Raises:
        ValueError: an all-black image or no object large enough to be a breast.
    """
    defaults = inspect.signature(dm_image.segment_breast).parameters
    mask, _ = dm_image._breast_mask(np.asarray(img), defaults["low_int_threshold"].default,
                                    defaults["min_breast_fraction"].default)
    return mask


@dataclass
class PatchGuard:
    """Keeps negative patches to breast tissue and refuses constant patches, counting why.

    A background, hard-negative or lesion-free-view candidate is kept when at least
    ``min_fraction`` of its pixels lie in the breast mask and the standard deviation of its
    pixels, in 8-bit levels (``levels * scale``), is above ``min_std``. A lesion candidate is
    refused only when it is constant. Every refusal is counted in ``rejected`` by reason
    (:data:`GUARD_REASONS`).

    Attributes:
        img: the image the patches are cut from (without its zero margin).
        margin: the zero margin of the centre coordinates (``patch_size // 2``).
        patch_size: side of the patches.
        breast: table of the breast mask in the centre coordinates; None: no fraction rule.
        min_fraction: least share of a patch's pixels in the breast mask.
        min_std: a patch whose pixel standard deviation (8-bit levels) is at most this is
            refused; 0 refuses constant patches only.
        scale: factor from the image's levels to 8-bit levels (255/65535 for 16-bit images).
    """

    img: np.ndarray
    margin: int
    patch_size: int
    breast: Optional[MaskSat] = None
    min_fraction: float = 0.0
    min_std: float = 0.0
    scale: float = 1.0
    rejected: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(GUARD_REASONS, 0))

    def _std(self, x: int, y: int) -> float:
        patch = extract_patch(self.img, int(x), int(y), self.patch_size, margin=self.margin)
        return float(np.std(patch, dtype=np.float64)) * self.scale  # 0.0 exactly if constant

    def breast_fractions(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Share of each patch's pixels in the breast mask (1 without a mask)."""
        if self.breast is None:
            return np.ones(np.shape(cx))
        return window_sums(self.breast, cx, cy, self.patch_size) / float(self.patch_size ** 2)

    def keep(self, cx: np.ndarray, cy: np.ndarray, limit: Optional[int] = None) -> np.ndarray:
        """Indices of the negative candidates kept, in order, at most ``limit`` of them; the
        candidates judged (up to the last one kept when the limit is reached) are counted."""
        fracs = self.breast_fractions(cx, cy)
        kept: List[int] = []
        for i in range(len(fracs)):
            if limit is not None and len(kept) >= limit:
                break
            if fracs[i] < self.min_fraction:
                self.rejected["outside_breast"] += 1
                continue
            std = self._std(cx[i], cy[i])
            if std <= self.min_std:
                self.rejected["constant" if std == 0 else "near_constant"] += 1
                continue
            kept.append(i)
        return np.asarray(kept, dtype=np.int64)

    def lesion_ok(self, x: int, y: int) -> bool:
        """False (and counted) for a constant lesion patch."""
        if self._std(x, y) == 0:
            self.rejected["constant_lesion"] += 1
            return False
        return True


# ------------------------------------------------------------------------- hard negatives
def create_blob_detector(patch_size: int = 256, min_area: int = BLOB_PARAMS["min_area"],
                         min_int: float = BLOB_PARAMS["min_int"],
                         max_int: float = BLOB_PARAMS["max_int"],
                         th_step: int = BLOB_PARAMS["th_step"]) -> "cv2.SimpleBlobDetector":
    """OpenCV SimpleBlobDetector with the 2017 settings (area 3..patch area, 50..95% of 255)."""
    params = cv2.SimpleBlobDetector_Params()
    params.filterByArea = True
    params.minArea = min_area
    params.maxArea = patch_size * patch_size
    params.filterByCircularity = False
    params.filterByColor = False
    params.filterByConvexity = False
    params.filterByInertia = False
    params.minThreshold = int(min_int * 255)
    params.maxThreshold = int(max_int * 255)
    params.thresholdStep = th_step
    return cv2.SimpleBlobDetector_create(params)


def detect_blob_centres(img: np.ndarray, patch_size: int = 256) -> np.ndarray:
    """Centres (x, y) of bright blobs in an image of any intensity scale.

    The image is brought to 8 bits as ``uint8(img / img.max() * 255)`` (2017) before detection.

    Args:
        img: (H, W) float or integer image, intensities >= 0.
        patch_size: bounds the blob area (at most one patch).

    Returns:
        int64 (n, 2) array of unique (x, y) key-point centres in ``img`` coordinates.
    """
    peak = float(img.max()) if img.size else 0.0
    if peak <= 0:
        return np.zeros((0, 2), np.int64)
    img8 = (np.asarray(img, np.float32) * np.float32(255.0 / peak)).astype(np.uint8)
    kpts = create_blob_detector(patch_size).detect(img8)
    pts = np.array([(int(k.pt[0]), int(k.pt[1])) for k in kpts], dtype=np.int64).reshape(-1, 2)
    _, first = np.unique(pts, axis=0, return_index=True)
    return pts[np.sort(first)]


def select_hard_negatives(centres: np.ndarray, nb: int, seed: int) -> np.ndarray:
    """Keep at most ``nb`` centres, spread over the image with k-means when there are more.

    K-means (k-means++ seeding from ``seed``, Lloyd iterations) on the (x, y) coordinates into
    ``nb`` clusters; from each cluster the member nearest its centre is kept, in input order.
    (``dm_image.kmeans``, a small NumPy k-means: fast for a few hundred points and safe in
    forked worker processes, where OpenMP-backed k-means can deadlock.)

    Args:
        centres: int (n, 2) array of (x, y).
        nb: number wanted.
        seed: k-means seed.

    Returns:
        int64 (min(n, nb), 2) array of (x, y).
    """
    centres = np.asarray(centres, np.int64).reshape(-1, 2)
    if nb <= 0:
        return centres[:0]
    if len(centres) <= nb:
        return centres
    pts = centres.astype(np.float64)
    labels, ctr = dm_image.kmeans(pts, nb, np.random.default_rng(seed))
    dist = ((pts - ctr[labels]) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(pts)), dist, labels))
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]]
    return centres[np.sort(first)]


# ------------------------------------------------------------------------- patches and files
def extract_patch(img: np.ndarray, x: int, y: int, patch_size: int,
                  margin: int = 0) -> np.ndarray:
    """Square window of ``patch_size`` whose centre is (x, y), zeros outside the image.

    Args:
        img: (H, W) image.
        x, y: centre column and row in the coordinates of ``img`` padded with ``margin``
            zeros on each side (the window spans ``[c - patch_size // 2, ... + patch_size)``).
        patch_size: side of the window.
        margin: that zero margin (the padded copy is never made).

    Returns:
        (patch_size, patch_size) array of ``img``'s dtype: a view of ``img`` when the window
        lies inside it, else a zero-filled copy.
    """
    x1, y1 = x - patch_size // 2 - margin, y - patch_size // 2 - margin
    x2, y2 = x1 + patch_size, y1 + patch_size
    height, width = img.shape[:2]
    if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:
        return img[y1:y2, x1:x2]
    out = np.zeros((patch_size, patch_size) + img.shape[2:], img.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if sx1 < sx2 and sy1 < sy2:
        out[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[sy1:sy2, sx1:sx2]
    return out


def _to_uint16(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:
        return img
    if img.dtype == np.uint8:  # exact (np.rint would go through float16)
        return img.astype(np.uint16)
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)


def view_seed(seed: int, img_id: str) -> np.random.SeedSequence:
    """Seed of one view: from the run seed and the CRC-32 of its ``img_id``."""
    return np.random.SeedSequence([int(seed), zlib.crc32(img_id.encode("utf-8"))])


def split_patients(patients: Sequence[str], malignant: Sequence[int], val_size: float,
                   seed: int) -> Tuple[List[str], List[str]]:
    """Patient-level train/val split stratified by "has a malignant lesion" (2017 rule).

    Uses ``sklearn.model_selection.train_test_split(..., stratify=malignant,
    random_state=seed)``; falls back to an unstratified split (with a warning) when a class is
    too small to stratify. ``val_size`` 0 puts every patient in train.

    Returns:
        (train_patients, val_patients), each sorted.
    """
    patients = list(patients)
    if val_size <= 0 or len(patients) < 2:
        return sorted(patients), []
    from sklearn.model_selection import train_test_split  # ~2 s to import: only when needed

    try:
        tr, va = train_test_split(patients, test_size=val_size, random_state=seed,
                                  stratify=list(malignant))
    except ValueError as err:
        logger.warning("stratified split impossible (%s); splitting without stratification", err)
        try:
            tr, va = train_test_split(patients, test_size=val_size, random_state=seed)
        except ValueError:
            return sorted(patients), []
    return sorted(tr), sorted(va)
