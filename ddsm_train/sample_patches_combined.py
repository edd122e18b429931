"""Sample training patches from full mammograms and their lesion (ROI) masks.

Stage 1 of Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening
Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427. From CBIS-DDSM-style data (as
``prepare_cbis_ddsm.py`` and ``make_synthetic_ddsm.py`` write it: full images
``{patient}_{side}_{view}.png``, masks
``{Calc|Mass}-{Training|Test}_{patient}_{side}_{view}_{abn}.png``, ``roi_mask_path.csv`` and a
patient list) it cuts square patches of three kinds per view:

* **abnormal**: centres drawn uniformly in the bounding box of the ROI's largest connected
  component until ``nb_abn`` patches overlap the ROI by more than ``pos_cutoff`` of the ROI area
  or of the patch area; after 1,000 consecutive failed draws the cutoff is lowered by 0.05 (the
  draw that reaches 1,000 is already judged with the lowered cutoff, as in 2017). Written to the
  folder of the lesion's type and pathology (MALIGNANT -> ``*_mal``; BENIGN and
  BENIGN_WITHOUT_CALLBACK -> ``*_ben``).
* **hard negatives**: centres of bright blob-like spots (OpenCV ``SimpleBlobDetector`` on the
  8-bit image, 2017 parameters) whose patch meets the negative rule; when more than ``nb_hns``
  qualify, they are clustered with k-means on their coordinates and the spot nearest each
  cluster centre is kept. Written to the background folder.
* **background**: centres drawn uniformly inside the (breast-cropped) image until the view has
  ``nb_bkg`` background-folder patches in all, the hard negatives included (as in 2017: with
  the defaults, 15 hard negatives and 15 random patches, fewer hard negatives being made up
  with random ones), each meeting the negative rule.

Negative rule: for every ROI of the view and for the union of its ROIs, the overlap is at most
``neg_cutoff`` of the ROI area and at most ``neg_cutoff`` of the patch area.

Breast-tissue guard (off by default, as in 2017): with ``--min-breast-fraction F`` a
background, hard-negative or lesion-free-view patch must also have at least F of its pixels in
the breast mask (the segmentation's largest bright object, holes filled; computed the same way
with ``--no-segment-breast``), and with ``--min-patch-std S`` a pixel standard deviation above S
in 8-bit levels (16-bit images: levels x 255/65535). Either flag also refuses constant patches,
lesion patches included (a refused lesion candidate counts as a failed draw). Refused random
candidates are redrawn; every refusal is counted by reason (``outside_breast``,
``near_constant``, ``constant``, ``constant_lesion``).

Each view is read and resized once (masks resized to the resized image's size with area
interpolation and thresholded at half coverage), cropped to the segmented breast, and given a
zero margin of ``patch_size // 2``. Overlaps come from summed-area tables of the binary masks
(O(1) per candidate, candidates drawn in vectorised batches), instead of the 2017 full-mask copy
and sum per candidate. Patches are 16-bit PNGs holding the resized image's intensities unchanged
(rounded and clipped to 0..65535; no per-patch normalisation, so a constant patch stays constant).

Speed: one process samples two views at a time on threads (OpenCV, NumPy and zlib release the
GIL) while a third thread encodes and writes the PNGs, so about two cores are busy;
``--workers N`` runs N such processes on batches of views. A process limited to one CPU (e.g.
under ``taskset -c 0``) samples one view after the other and writes its PNGs itself, without
threads. A view whose patch cannot be written counts as an error and its other
patches are removed, so the folders always match ``patches.csv``.

Outputs, in ``TRAIN_OUT`` or ``VAL_OUT`` (patient-level split stratified by "has a malignant
lesion"): one subfolder per class folder name; patch files
``{patient}_{side}_{view}_{kind}_{k:04d}.png`` with kind ``abn{abn_num}``, ``hns`` or ``bkg``;
``pat_lst.txt`` (the patients of that output); ``patches.csv`` (one row per patch: file, view,
kind, centre row/col in the resized full image, overlap fractions). ``TRAIN_OUT`` also gets
``sampling_summary.json`` (options and the run summary, with the guard's refusals per split
as ``rejected`` and per view as ``rejected_views``). Every file is written atomically.

Checks, so that a run never computes a wrong patch set quietly:

* Output folders that already hold patches (an image file in a class folder this run writes
  to, or a ``patches.csv``) are refused: a second run into them would mix two patient splits.
  ``--overwrite`` first removes what an earlier run of this tool wrote there, as its manifest
  ``.ddsm_outputs.json`` lists it (patches of any class set, ``patches.csv``, ``pat_lst.txt``,
  ``sampling_summary.json``, and its class folders once empty), so a rerun gives the tree a
  fresh run gives; patches no manifest names are never removed and stop the run. Before its
  first patch a run saves its manifest as in progress (``"complete": false``), naming the
  class folders it made: the patches a run stopped half-way (Ctrl-C, killed) left in those
  folders are removed by the next ``--overwrite`` like any earlier run's; other files there
  (not named like a patch) stay.
* Every value a path is built from (patient IDs of the list and the CSV, side, view,
  ``abn_num``, class folder names) must be a plain file-name part: a value such as ``../x`` is
  an error naming the file and line, raised before anything is written.
* A CSV row of a listed patient with an unknown pathology (MALIGNANT, BENIGN,
  BENIGN_WITHOUT_CALLBACK) or type (calc, mass), a non-integer ``abn_num``, an empty side or
  view, a pathology contradicting another row of the same mask, or a missing, unreadable, empty
  or wrongly sized mask makes its whole view skipped, with a warning naming the CSV file and
  line (sampling the view without that lesion would cut background patches from it); such views
  are counted as ``views_skipped_bad_roi``. An empty side or view skips every view of that
  patient it could belong to. Repeated rows are reported and counted once.
* A full image stored with another bit depth than most (an 8-bit image among 16-bit ones, or
  the reverse) gives patches on another intensity scale: each such view is reported and listed
  as ``mixed_bit_depth_views`` (one ``--rescale-factor`` cannot fit both).
* A run that samples no view at all is an error and writes no manifest.

Determinism: view ``img_id`` uses the generator ``numpy.random.default_rng([seed,
crc32(img_id)])``, so results do not depend on ``--workers`` or on the other views in the run.

Example (from inside ``ddsm_train/``)::

    python sample_patches_combined.py roi_mask_path.csv roi_mask full_img train_pat.txt \\
        patches/train patches/val --target-height 4096 --patch-size 256 --workers 4
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import dm_image  # noqa: E402
import run_files  # noqa: E402
import run_options  # noqa: E402
from ddsm_names import image_name, parse_mask_name, split_image_stem  # noqa: E402
from common_flags import add_bool_flag, add_optional_value_flag  # noqa: E402
import common_flags as cf  # noqa: E402
from patch_sampling import (BLOB_PARAMS, GUARD_REASONS, MaskSat, PatchGuard,  # noqa: E402,F401
                            _fractions, _to_uint16, abnormal_passes, breast_mask,
                            build_mask_sat, create_blob_detector,
                            detect_blob_centres, draw_abnormal_centres,
                            draw_background_centres, extract_patch, negative_passes,
                            select_hard_negatives, split_patients, view_seed, window_sums)
from script_utils import ROI_COLUMNS, InputFileError, get_random_seed, \
    parallel_map, read_csv_table, read_text_lines, safe_name_part  # noqa: E402

__all__ = [
    "CSV_COLUMNS", "PATHOLOGY_LABELS", "LESION_TYPES", "BLOB_PARAMS", "MaskSat",
    "build_mask_sat", "window_sums", "abnormal_passes", "negative_passes",
    "draw_abnormal_centres", "draw_background_centres", "create_blob_detector",
    "detect_blob_centres", "select_hard_negatives", "extract_patch", "view_seed",
    "split_patients", "run", "sample_patches", "options_class", "get_args_parser", "main",
]

logger = logging.getLogger(__name__)

CSV_COLUMNS = tuple(ROI_COLUMNS)   # the columns of roi_mask_path.csv
PATHOLOGY_LABELS = {"MALIGNANT": "pos", "BENIGN": "neg", "BENIGN_WITHOUT_CALLBACK": "neg"}
LESION_TYPES = ("calc", "mass")
VIEW_THREADS = 2  # views sampled at a time by one process (plus one PNG-writer thread)
#: Skip reasons of a view that has a bad ROI (a bad CSV row or a bad mask file).
BAD_ROI_REASONS = ("bad_roi_row", "mask_missing", "mask_unreadable", "mask_size_mismatch",
                   "empty_mask")
#: Files of an output folder that a run writes besides its class folders.
OUTPUT_FILES = ("patches.csv", "pat_lst.txt", "sampling_summary.json")
#: Patch kind -> the option naming its class folder.
_FOLDER_OPTIONS = {"bkg": "bkg_dir", "calc_pos": "calc_pos_dir", "calc_neg": "calc_neg_dir",
                   "mass_pos": "mass_pos_dir", "mass_neg": "mass_neg_dir"}
#: File names of patches (``{patient}_{side}_{view}_{kind}_{k:04d}.png``).
_PATCH_NAME = re.compile(r"^.+_(abn\d+(calc|mass)?|hns|bkg)_\d{4}\.png$")
_TOOL = "sample_patches_combined"


# ------------------------------------------------------------------------- per-view work
@dataclass
class _Roi:
    abn_num: int
    pathology: str
    type: str
    mask_path: Optional[str]
    where: str = ""     # "roi_mask_path.csv, line 12": for messages
    kind: str = ""      # patch kind in file names: abn{abn_num} (abn{abn_num}{type} if shared)


@dataclass
class _ViewTask:
    img_id: str
    patient: str
    img_path: str
    rois: List[_Roi]
    split: str
    out_dir: str


@dataclass
class _Settings:
    target_height: int
    target_width: Optional[int]
    segment_breast: bool
    patch_size: int
    nb_bkg: int
    nb_abn: int
    nb_hns: int
    pos_cutoff: float
    neg_cutoff: float
    seed: int
    folders: Dict[str, str] = field(default_factory=dict)  # bkg, calc_pos, ... -> folder name
    normal_views: int = 0  # background patches per view without a lesion (0: not sampled)
    min_breast_fraction: Optional[float] = None  # breast-tissue guard (None, None: off)
    min_patch_std: Optional[float] = None

    @property
    def guarded(self) -> bool:
        return self.min_breast_fraction is not None or self.min_patch_std is not None


class _SkipView(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _image_shape(path: str) -> Tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # not a PIL format (e.g. DICOM): decode it
        return tuple(dm_image.read_image(path).shape[:2])


def _load_view(task: _ViewTask, cfg: _Settings):
    """Read, resize and segment one view and its masks; raise _SkipView on bad input.

    Returns:
        (img, bbox, sats, stored, breast): the breast-cropped image as uint16, its box in the
        resized image, the summed-area tables of its ROIs (then of their union when there are
        several) in the coordinates of the image with its zero margin of ``patch_size // 2``,
        (dtype name, largest level) of the image as stored (before the uint16 conversion), and
        the table of its breast mask in those coordinates (None without
        ``min_breast_fraction``).
    """
    try:
        orig_shape = _image_shape(task.img_path)
        if cfg.target_width is None:  # integer levels as stored (the patches keep them)
            img = dm_image.read_resize_stored(task.img_path, target_height=cfg.target_height)
        else:
            img = dm_image.read_resize_stored(
                task.img_path, target_size=(cfg.target_height, cfg.target_width))
    except (OSError, ValueError, cv2.error) as err:
        raise _SkipView("unreadable_image",
                        f"{task.img_id}: cannot read {task.img_path}: {err}") from err
    stored = (str(img.dtype), float(img.max()) if img.size else 0.0)
    masks = []
    for roi in task.rois:
        name = f"{task.img_id} abn {roi.abn_num} ({roi.type}; {roi.where})"
        if roi.mask_path is None:
            raise _SkipView("mask_missing", f"{name}: no mask file in the ROI mask folder")
        try:
            mask = dm_image.read_image(roi.mask_path, gs_255=True)
        except (OSError, ValueError, cv2.error) as err:
            raise _SkipView("mask_unreadable",
                            f"{name}: cannot read {roi.mask_path}: {err}") from err
        if mask.shape != tuple(orig_shape):
            raise _SkipView("mask_size_mismatch", f"{name}: mask {roi.mask_path} is "
                            f"{mask.shape}, its image is {tuple(orig_shape)}")
        binary = cv2.compare(mask, 0, cv2.CMP_GT)  # 0/255
        if not cv2.countNonZero(binary):
            raise _SkipView("empty_mask", f"{name}: mask {roi.mask_path} is empty")
        binary = cv2.resize(binary, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
        masks.append(cv2.compare(binary, 128, cv2.CMP_GE))  # at least half covered
    bbox = (0, 0, img.shape[1], img.shape[0])
    breast = _view_breast_mask(task, cfg, img) if cfg.min_breast_fraction else None
    if cfg.segment_breast:
        try:
            img, bbox = dm_image.segment_breast(img)
        except (ValueError, cv2.error) as err:
            raise _SkipView("segmentation_failed", f"{task.img_id}: {err}") from err
        bx, by, bw, bh = (int(v) for v in bbox)
        bbox = (bx, by, bw, bh)
        masks = [m[by:by + bh, bx:bx + bw] for m in masks]
        breast = None if breast is None else breast[by:by + bh, bx:bx + bw]
    m = cfg.patch_size // 2
    sats = []
    for roi, mask in zip(task.rois, masks):
        sat = build_mask_sat(mask, margin=m)
        if sat is None:
            raise _SkipView("roi_outside_breast", f"{task.img_id} abn {roi.abn_num}: ROI "
                            "vanishes after resizing / breast cropping")
        sats.append(sat)
    if len(sats) > 1:  # union of the view's ROIs, for the negative rule
        union = masks[0].copy()
        for mask in masks[1:]:
            cv2.max(union, mask, dst=union)
        sats.append(build_mask_sat(union, margin=m))
    breast = None if breast is None else build_mask_sat(breast, margin=m)
    return _to_uint16(img), bbox, sats, stored, breast


def _view_breast_mask(task: _ViewTask, cfg: _Settings, img: np.ndarray) -> np.ndarray:
    """The breast mask of the resized view (for ``min_breast_fraction``); _SkipView if none
    is found."""
    try:
        return breast_mask(img)
    except (ValueError, cv2.error) as err:
        raise _SkipView("segmentation_failed", f"{task.img_id}: {err}") from err


_RESCALE_FOR = {"uint16": 255.0 / 65535.0, "uint8": 1.0}  # stored levels -> 0..255


def _make_guard(cfg: _Settings, res: dict, img: np.ndarray, breast) -> Optional[PatchGuard]:
    """The view's PatchGuard (its counts kept as ``res["rejected"]``), or None when off."""
    if not cfg.guarded:
        return None
    scale = _RESCALE_FOR.get(res["dtype"]) or 255.0 / max(float(res["img_max"] or 0), 1e-12)
    guard = PatchGuard(img, cfg.patch_size // 2, cfg.patch_size, breast,
                       cfg.min_breast_fraction or 0.0, cfg.min_patch_std or 0.0, scale)
    res["rejected"] = guard.rejected
    return guard


def _abn_folder(cfg: _Settings, roi: _Roi) -> str:
    label = PATHOLOGY_LABELS[roi.pathology]
    return cfg.folders[f"{roi.type}_{label}"]


def _new_result(task: _ViewTask) -> dict:
    return {"img_id": task.img_id, "img_path": task.img_path, "split": task.split,
            "status": "ok", "message": "",
            "counts": {}, "rows": [], "warnings": [], "relaxations": 0,
            "abn_shortfall": 0, "hns_shortfall": 0, "bkg_shortfall": 0,
            "dtype": None, "img_max": None, "rejected": dict.fromkeys(GUARD_REASONS, 0)}


def _error_result(task: _ViewTask, err: BaseException) -> dict:
    """The result of a view that failed unexpectedly (its patches are not counted)."""
    logger.error("failed on %s: %s: %s", task.img_id, type(err).__name__, err,
                 exc_info=(type(err), err, err.__traceback__))
    res = _new_result(task)
    res.update(status="error", message=f"{task.img_id}: {type(err).__name__}: {err}")
    return res


def _sample_loaded(task: _ViewTask, cfg: _Settings, res: dict, img: np.ndarray, bbox,
                   neg_sats: List[MaskSat], write, breast: Optional[MaskSat] = None) -> None:
    """Draw the patches of a loaded view, hand each to ``write(path, array)``, fill ``res``
    (``breast``: its breast mask's table, for ``min_breast_fraction``)."""
    rng = np.random.default_rng(view_seed(cfg.seed, task.img_id))
    p, m = cfg.patch_size, cfg.patch_size // 2
    sats = neg_sats[:len(task.rois)]  # one per ROI; neg_sats may end with their union
    guard = _make_guard(cfg, res, img, breast)

    def emit(folder, kind, centres, tables):
        """Write the patches at ``centres``; the manifest gets their largest overlap fractions
        over ``tables`` (the ROI's own for abnormal patches, all of them for negatives)."""
        out = Path(task.out_dir) / folder
        cx, cy = centres[:, 0], centres[:, 1]
        fracs = [_fractions(sat, cx, cy, p) for sat in tables] or \
            [(np.zeros(len(centres)), np.zeros(len(centres)))]   # a lesion-free view
        roi_frac = np.max([f[0] for f in fracs], axis=0)
        patch_frac = np.max([f[1] for f in fracs], axis=0)
        for k, (x, y) in enumerate(centres.tolist()):
            name = f"{task.img_id}_{kind}_{k:04d}.png"
            write(out / name, extract_patch(img, x, y, p, margin=m))
            res["rows"].append({"folder": folder, "filename": name, "img_id": task.img_id,
                                "kind": kind, "row": y - m + bbox[1], "col": x - m + bbox[0],
                                "roi_frac": round(float(roi_frac[k]), 6),
                                "patch_frac": round(float(patch_frac[k]), 6)})
        res["counts"][folder] = res["counts"].get(folder, 0) + len(centres)

    if not task.rois:   # a lesion-free view (--normal-views): random background only
        region = (m, m, img.shape[1] + m, img.shape[0] + m)
        bkg = draw_background_centres(rng, [], region, p, cfg.normal_views, cfg.neg_cutoff,
                                      guard=guard)
        emit(cfg.folders["bkg"], "bkg", bkg, [])
        return
    for roi, sat in zip(task.rois, sats):
        centres, cut, relax = draw_abnormal_centres(rng, sat, p, cfg.nb_abn, cfg.pos_cutoff,
                                                    guard and guard.lesion_ok)
        res["relaxations"] += relax
        if len(centres) < cfg.nb_abn:
            res["abn_shortfall"] += cfg.nb_abn - len(centres)
            res["warnings"].append(f"{task.img_id} abn {roi.abn_num}: only {len(centres)} of "
                                   f"{cfg.nb_abn} abnormal patches (cutoff fell to 0)")
        emit(_abn_folder(cfg, roi), roi.kind or f"abn{roi.abn_num}", centres, [sat])
    nb_random = cfg.nb_bkg  # the hard negatives count towards nb_bkg (2017)
    if cfg.nb_hns > 0:
        blobs = detect_blob_centres(img, p) + m
        ok = negative_passes(neg_sats, blobs[:, 0], blobs[:, 1], p, cfg.neg_cutoff)
        if guard is not None:
            ok = np.flatnonzero(ok)
            ok = ok[guard.keep(blobs[ok, 0], blobs[ok, 1])]
        hns_seed = int(rng.integers(2 ** 31 - 1))
        hns = select_hard_negatives(blobs[ok], cfg.nb_hns, hns_seed)
        res["hns_shortfall"] = cfg.nb_hns - len(hns)
        emit(cfg.folders["bkg"], "hns", hns, neg_sats)
        nb_random -= len(hns)
    if nb_random > 0:
        region = (m, m, img.shape[1] + m, img.shape[0] + m)
        bkg = draw_background_centres(rng, neg_sats, region, p, nb_random, cfg.neg_cutoff,
                                      guard=guard)
        if len(bkg) < nb_random:
            res["bkg_shortfall"] = nb_random - len(bkg)
            res["warnings"].append(f"{task.img_id}: only {len(bkg)} of {nb_random} random "
                                   "background patches meet the negative rule"
                                   f"{' and the breast-tissue rule' if guard else ''}")
        emit(cfg.folders["bkg"], "bkg", bkg, neg_sats)


def _process_view(task: _ViewTask, cfg: _Settings, writer) -> Tuple[dict, list]:
    """Load and sample one view, its PNGs queued on ``writer``: (result, [(path, future)])."""
    res, jobs = _new_result(task), []

    def write(path, arr):
        jobs.append((path, writer.submit(dm_image.write_png, path, arr)))
    try:
        img, bbox, sats, (res["dtype"], res["img_max"]), breast = _load_view(task, cfg)
        _sample_loaded(task, cfg, res, img, bbox, sats, write=write, breast=breast)
    except _SkipView as skip:
        res.update(status=skip.reason, message=str(skip))
    except Exception as err:  # noqa: BLE001 - reported in the summary, the run goes on
        res = _error_result(task, err)
    return res, jobs


class _InlineWriter:
    """``submit`` runs the call at once and returns its finished future (one-CPU processes)."""

    @staticmethod
    def submit(fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - handled by _finish_view like a thread's
            future.set_exception(err)
        return future


def _cpus_available() -> int:
    """CPUs this process may run on (its affinity, e.g. under ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _iter_views(tasks: Sequence[_ViewTask], cfg: _Settings, threads: Optional[int] = None):
    """Sample views, yielding one result dict per view, in order, once its files are written.

    ``threads`` views (default ``VIEW_THREADS``) are read, segmented and sampled at a time on
    threads (OpenCV, NumPy and zlib release the GIL), one more waits queued, and a writer
    thread encodes and writes the PNG patches. A process limited to one CPU (or
    ``threads=1``) does all of it in order in its own thread, without threads that would only
    compete for that CPU. Any failure (bad input, a failed write, an unexpected error) becomes
    that view's skip or error result, and the others go on.
    """
    if threads is None:
        threads = VIEW_THREADS if _cpus_available() > 1 else 1
    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # these threads are the parallelism; OpenCV's own pool would compete
    try:
        if threads <= 1:
            for task in tasks:
                res, jobs = _process_view(task, cfg, _InlineWriter)
                yield _finish_view(task, res, jobs)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="view") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
            pending, queue = collections.deque(), iter(tasks)
            for task in itertools.islice(queue, threads + 1):
                pending.append((task, pool.submit(_process_view, task, cfg, writer)))
            while pending:
                task, future = pending.popleft()
                res, jobs = future.result()
                for nxt in itertools.islice(queue, 1):
                    pending.append((nxt, pool.submit(_process_view, nxt, cfg, writer)))
                yield _finish_view(task, res, jobs)
    finally:
        cv2.setNumThreads(opencv_threads)


def _finish_view(task: _ViewTask, res: dict, jobs) -> dict:
    """Wait for a view's file writes. A failed write makes the view an error; the patches of a
    view that ends in error are removed, so the folders hold exactly the manifest's files."""
    errors = [err for err in (job.exception() for _, job in jobs) if err is not None]
    if errors and res["status"] == "ok":
        res = _error_result(task, errors[0])
    if res["status"] != "ok":
        for path, _ in jobs:
            Path(path).unlink(missing_ok=True)
    return res


def _sample_batch(args) -> List[dict]:
    """Worker entry point: ``_iter_views`` over a batch of views."""
    tasks, cfg = args
    return list(_iter_views(tasks, cfg))


def _sample_all(tasks: List[_ViewTask], cfg: _Settings, workers: int, verbose: bool):
    """Results of all views, in order: in this process, or in batches over worker processes."""
    if workers == 1 or len(tasks) <= 1:
        results = []
        with dm_image.progress(len(tasks), "sampling", unit="view", verbose=verbose) as bar:
            for res in _iter_views(tasks, cfg):
                results.append(res)
                bar.update()
        return results
    size = max(1, min(8, len(tasks) // (2 * workers)))  # balance vs. overlap inside a batch
    batches = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    done = parallel_map(_sample_batch, [(b, cfg) for b in batches], workers, "sampling",
                        verbose, sizes=[len(b) for b in batches])
    return [res for batch in done for res in batch]


# ------------------------------------------------------------------------- inputs
@dataclass
class _RoiTable:
    """What ``roi_mask_path.csv`` says about the listed patients.

    Attributes:
        views: (patient, side, view) -> its valid ROIs, repeated rows dropped.
        bad: (patient, side, view) -> why the view cannot be sampled (one message per bad row);
            side and/or view None: every view of that patient with the given parts.
        known: every patient ID of the CSV.
        malignant: patients with a MALIGNANT row.
        bad_rows: number of bad rows of listed patients.
        duplicate_rows: number of repeated rows dropped.
    """

    views: Dict[Tuple[str, str, str], List[_Roi]] = field(default_factory=dict)
    bad: Dict[Tuple[str, Optional[str], Optional[str]], List[str]] = field(default_factory=dict)
    known: set = field(default_factory=set)
    malignant: set = field(default_factory=set)
    bad_rows: int = 0
    duplicate_rows: int = 0


def _read_roi_table(path: str, patients) -> _RoiTable:
    """Read and check ``roi_mask_path.csv`` (see the module docstring, "Checks").

    Args:
        path: the CSV file.
        patients: the listed patient IDs; rows of other patients are only checked for values
            that cannot be part of a file name.

    Raises:
        InputFileError: unreadable file, missing columns, or a value (patient_id, side, view,
            abn_num) that cannot be part of a file name, naming the file and line.
    """
    df = read_csv_table(path, required=CSV_COLUMNS)
    patients = set(patients)
    table = _RoiTable()
    first: Dict[tuple, str] = {}        # a row's values -> where they were first seen
    mask_rows: Dict[tuple, Tuple[str, str]] = {}  # (pat, side, view, type, abn) -> first row's
    #                                               (pathology, where)
    repeats: Dict[str, List[str]] = {}  # where a row was first seen -> lines repeating it
    for rec in df[list(CSV_COLUMNS) + ["_line"]].to_dict("records"):
        where = f"{path}, {rec['_line']}"
        pat = safe_name_part(rec["patient_id"], "patient_id", where)
        side, view, abn = rec["side"], rec["view"], rec["abn_num"]
        for what, value in (("side", side), ("view", view), ("abn_num", abn)):
            if value:  # an empty one is a bad row (below), not a path problem
                safe_name_part(value, what, where)
        pathology, typ = rec["pathology"].upper(), rec["type"].lower()
        table.known.add(pat)
        if pathology == "MALIGNANT":
            table.malignant.add(pat)
        if pat not in patients:
            continue
        problems = []
        if not side or not view:
            problems.append(f"empty {'side' if not side else 'view'} (the lesion's view is "
                            f"unknown)")
        if pathology not in PATHOLOGY_LABELS:
            problems.append(f"unknown pathology {rec['pathology']!r} (expected "
                            f"{', '.join(PATHOLOGY_LABELS)})")
        if typ not in LESION_TYPES:
            problems.append(f"unknown type {rec['type']!r} (expected "
                            f"{' or '.join(LESION_TYPES)})")
        if not re.fullmatch(r"\d+", abn):
            problems.append(f"abn_num {abn!r} is not a non-negative integer")
        key = (pat, side or None, view or None)
        if problems:
            table.bad.setdefault(key, []).append(f"{where}: {'; '.join(problems)}")
            table.bad_rows += 1
            continue
        values = (pat, side, view, int(abn), pathology, typ)
        if values in first:
            repeats.setdefault(first[values], []).append(rec["_line"])
            table.duplicate_rows += 1
            continue
        first[values] = where
        mask_key = (pat, side, view, typ, int(abn))
        if mask_key in mask_rows:
            other_pathology, other = mask_rows[mask_key]
            table.bad.setdefault(key, []).append(
                f"{where}: pathology {pathology} contradicts {other} ({other_pathology}) for the "
                f"same {typ} abn {int(abn)}")
            table.bad_rows += 1
            continue
        mask_rows[mask_key] = (pathology, where)
        table.views.setdefault(key, []).append(_Roi(int(abn), pathology, typ, None, where))
    for where, lines in repeats.items():
        logger.warning("%s: repeated by %s (the same lesion); counted once", where,
                       ", ".join(lines))
    return table


def _read_patient_list(path: str) -> List[str]:
    """Patient IDs of a list file, one a line (repeats dropped); an ID that cannot be part of a
    file name is an error naming the file and line."""
    pats = [safe_name_part(text, "patient id", f"{path}, line {n}")
            for n, text in read_text_lines(path)]
    return list(dict.fromkeys(pats))


def _index_masks(roi_mask_dir: str) -> Dict[Tuple[str, str, int], str]:
    """(type, img_id, abn_num) -> mask path, for the ``{Type}-{split}_{img_id}_{abn}.png`` files
    of the folder (a name that is not a plain file-name part is ignored with a warning)."""
    index = {}
    for name in sorted(os.listdir(roi_mask_dir)):
        hit = parse_mask_name(name)
        if not hit:
            continue
        try:
            if safe_name_part(name, "mask file name", roi_mask_dir) != name:
                raise InputFileError(f"{roi_mask_dir}: mask file name {name!r} has surrounding "
                                     "spaces")
        except InputFileError as err:
            logger.warning("%s; file ignored", err)
            continue
        key = (hit.type.lower(), hit.image, hit.abn_num)
        index.setdefault(key, os.path.join(roi_mask_dir, name))
    return index


# ------------------------------------------------------------------------- run
def _check_options(opts) -> None:
    """Refuse option values no run can use, before anything is read or written (the parser's
    types check the command line; Python callers of :func:`run` get the same errors here)."""
    patch_size, nb_bkg, nb_abn = opts.patch_size, opts.nb_bkg, opts.nb_abn
    if patch_size < 2:
        raise ValueError(f"patch_size should be >= 2, got {patch_size}")
    for name in ("nb_bkg", "nb_abn", "nb_hns"):
        if opts[name] < 0:
            raise ValueError(f"{name} should be >= 0, got {opts[name]}")
    if nb_bkg == 0 and nb_abn == 0:   # hard negatives count towards nb_bkg
        raise ValueError("--nb-bkg 0 and --nb-abn 0: every patch count is 0, nothing would be "
                         "sampled")
    for name in ("pos_cutoff", "neg_cutoff"):
        if not 0 < opts[name] <= 1:
            raise ValueError(f"{name} should be in (0, 1], got {opts[name]}")
    if not 0 <= opts.val_size < 1:
        raise ValueError(f"val_size should be in [0, 1), got {opts.val_size}")
    height, width = opts.target_height, opts.target_width
    if height <= 0 or (width is not None and width <= 0):
        raise ValueError(f"target size should be positive, got {height}x{width}")
    if patch_size > min(height, width or height):
        raise ValueError(f"--patch-size {patch_size} is larger than the resized images "
                         f"(--target-height {height}"
                         f"{f', --target-width {width}' if width else ''}): every patch would "
                         f"be mostly padding; give a smaller patch or a larger target size")
    if opts.workers < 1:
        raise ValueError(f"workers should be >= 1, got {opts.workers}")
    for name in _FOLDER_OPTIONS.values():
        safe_name_part(opts[name], "class folder name --" + name.replace("_", "-"))
    if os.path.realpath(opts.train_out) == os.path.realpath(opts.val_out):
        raise ValueError(f"TRAIN_OUT and VAL_OUT are the same folder ({opts.train_out}): the "
                         "two splits' patches and manifests would mix; name two folders")


def _check_inputs(opts) -> None:
    """:func:`_check_options`, then the input files and folders must exist."""
    _check_options(opts)
    if opts.normal_views < 0:
        raise ValueError(f"normal_views should be >= 0, got {opts.normal_views}")
    if opts.min_breast_fraction is not None and not 0 <= opts.min_breast_fraction <= 1:
        raise ValueError(f"min_breast_fraction should be in [0, 1], got "
                         f"{opts.min_breast_fraction}")
    if opts.min_patch_std is not None and not opts.min_patch_std >= 0:
        raise ValueError(f"min_patch_std should be >= 0, got {opts.min_patch_std}")
    for path in (opts.roi_mask_csv, opts.patient_list):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
    for path in (opts.roi_mask_dir, opts.full_img_dir):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such folder: {path}")


def _settings(opts) -> _Settings:
    """The per-view sampling settings of the options (what the worker processes get)."""
    folders = {key: opts[name] for key, name in _FOLDER_OPTIONS.items()}
    return _Settings(opts.target_height, opts.target_width, opts.segment_breast,
                     opts.patch_size, opts.nb_bkg, opts.nb_abn, opts.nb_hns, opts.pos_cutoff,
                     opts.neg_cutoff, opts.seed, folders, opts.normal_views,
                     opts.min_breast_fraction, opts.min_patch_std)


def _skip_result(img_id: str, split: str, reason: str, message: str) -> dict:
    """The result of a view skipped before sampling."""
    task = _ViewTask(img_id, "", "", [], split, "")
    res = _new_result(task)
    res.update(status=reason, message=message)
    return res


def _build_views(table: _RoiTable, pat_split: Dict[str, str], full_img_dir: str,
                 mask_index, roi_mask_dir: str, out_dirs: Dict[str, str]):
    """The views of the split patients, in (patient, side, view) order.

    Returns:
        (entries, tasks): ``entries`` holds, per view, its ``_ViewTask`` (to sample) or the
        result of a view skipped now (a bad CSV row, a missing mask or full image); ``tasks``
        the views to sample.
    """
    wild = {k: v for k, v in table.bad.items() if None in k}
    keys = set(table.views) | {k for k in table.bad if None not in k}
    for (pat, side, view), msgs in wild.items():
        if not any(k[0] == pat and side in (None, k[1]) and view in (None, k[2]) for k in keys):
            for msg in msgs:
                logger.warning("%s; no view of patient %s can be sampled with it", msg, pat)
    entries, tasks = [], []
    for pat, side, view in sorted(k for k in keys if k[0] in pat_split):
        img_id, split = image_name(pat, side, view), pat_split[pat]
        problems = list(table.bad.get((pat, side, view), []))
        for (w_pat, w_side, w_view), msgs in wild.items():
            if w_pat == pat and w_side in (None, side) and w_view in (None, view):
                problems += msgs
        if problems:
            entries.append(_skip_result(img_id, split, "bad_roi_row", f"{img_id}: bad ROI "
                                        f"row(s), the view is skipped: {' | '.join(problems)}"))
            continue
        rois = sorted(table.views[(pat, side, view)], key=lambda r: (r.abn_num, r.type))
        shared = collections.Counter(r.abn_num for r in rois)
        for roi in rois:  # a calc and a mass may share an abn_num: their file names may not
            roi.mask_path = mask_index.get((roi.type, img_id, roi.abn_num))
            roi.kind = f"abn{roi.abn_num}" + (roi.type if shared[roi.abn_num] > 1 else "")
        missing = [f"{img_id} abn {r.abn_num} ({r.type}; {r.where}): no mask "
                   f"{r.type.capitalize()}-*_{img_id}_{r.abn_num}.png in {roi_mask_dir}"
                   for r in rois if r.mask_path is None]
        img_path = os.path.join(full_img_dir, img_id + ".png")
        if missing:
            entries.append(_skip_result(img_id, split, "mask_missing", "; ".join(missing)))
        elif not os.path.isfile(img_path):
            entries.append(_skip_result(img_id, split, "image_missing",
                                        f"{img_id}: no full image {img_path}"))
        else:
            task = _ViewTask(img_id, pat, img_path, rois, split, out_dirs[split])
            entries.append(task)
            tasks.append(task)
    return entries, tasks


def _normal_view_tasks(table: _RoiTable, pat_split: Dict[str, str], full_img_dir: str,
                       out_dirs: Dict[str, str]) -> List[_ViewTask]:
    """The lesion-free views of the split patients: full images ``{patient}_{side}_{view}.png``
    with no row in ``roi_mask_path.csv`` (nor a bad row that could be theirs), sorted."""
    tasks = []
    for name in sorted(os.listdir(full_img_dir)):
        stem, ext = os.path.splitext(name)
        parts = split_image_stem(stem)
        if ext.lower() != ".png" or parts is None or parts.patient not in pat_split:
            continue
        pat, side, view = parts
        if (pat, side, view) in table.views or any(
                b[0] == pat and b[1] in (None, side) and b[2] in (None, view)
                for b in table.bad):
            continue
        split = pat_split[pat]
        tasks.append(_ViewTask(stem, pat, os.path.join(full_img_dir, name), [], split,
                               out_dirs[split]))
    return tasks


def _earlier_patches(out: str, class_names: Sequence[str]) -> Optional[str]:
    """What in ``out`` shows an earlier run's patches (a manifest, image files), or None."""
    if os.path.lexists(os.path.join(out, "patches.csv")):
        return os.path.join(out, "patches.csv")
    for name in class_names:
        folder = os.path.join(out, name)
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as it:
            n = sum(1 for e in it if e.is_file()
                    and e.name.rsplit(".", 1)[-1].lower() in dm_image.IMG_EXTENSIONS)
        if n:
            return f"{n} image file(s) in {folder}"
    return None


def _prepare_outputs(out_dirs: Dict[str, str], class_names: Sequence[str],
                     overwrite: bool) -> Dict[str, "run_files.OutputManifest"]:
    """Refuse output folders that hold an earlier run's patches; with ``overwrite`` remove the
    files an earlier run of this tool wrote there (its manifest: patch files of any class set,
    ``OUTPUT_FILES``, and its class folders once empty), nothing else. The patches of a run
    that was stopped half-way count as its files when they lie in a class folder that run made
    (its manifest, saved before the first patch, names those folders). Patches that no manifest
    names (copied by hand) stop the run either way. Returns the manifest of each output
    folder."""
    manifests = {split: run_files.OutputManifest(out, _TOOL) for split, out in out_dirs.items()}
    found = [held for held in (_earlier_patches(out, class_names) for out in out_dirs.values())
             if held]
    if found and not overwrite:
        killed = any(m.earlier_owned_dirs for m in manifests.values())
        raise ValueError(
            f"output folder(s) already hold patches: {'; '.join(found)}"
            f"{' (of a run that was stopped before its end)' if killed else ''}. Sampling into "
            "them again would mix two runs (and their patient splits); pass --overwrite to "
            "replace them (removes only the files an earlier run of this tool wrote, as listed "
            f"in its {run_files.MANIFEST_NAME}), or name new folders")
    if overwrite:
        for m in manifests.values():
            m.adopt_interrupted(lambda name: bool(_PATCH_NAME.match(name)))
        removed = sum(len(m.remove_earlier()) for m in manifests.values())
        if removed:
            logger.warning("--overwrite: removed %d file(s) an earlier run wrote", removed)
    left = [held for held in (_earlier_patches(out, class_names) for out in out_dirs.values())
            if held]
    if left:
        raise ValueError(f"output folder(s) hold patches that no manifest of this tool names "
                         f"({'; '.join(left)}): they were not written by an earlier run of it; "
                         f"move them away or name new folders")
    for out in out_dirs.values():
        run_files.clean_leftovers(out, *(os.path.join(out, n) for n in class_names))
    return manifests


def _begin_manifests(manifests, created: Sequence[str]) -> None:
    """Before the first patch: save each output folder's manifest as in progress, naming the
    class folders this run made (and those a stopped earlier run made that are still there),
    so that a run killed half-way leaves its patches known to the next run's --overwrite."""
    made = {os.path.abspath(f) for f in created}
    for manifest in manifests.values():
        owned = [p for p in (manifest.folder / d for d in manifest.earlier_owned_dirs)
                 if p.is_dir()]
        owned += [Path(f) for f in made
                  if os.path.dirname(f) == os.path.abspath(manifest.folder)]
        manifest.begin([manifest.folder / name for name in OUTPUT_FILES], owned_dirs=owned)


def _abandon_manifests(manifests) -> None:
    """A run that wrote nothing: put back the earlier manifest, or remove the one begun."""
    for manifest in manifests.values():
        if manifest.earlier_tool is None:
            manifest.path.unlink(missing_ok=True)
        else:
            manifest.finish(remove_earlier=False)


def _make_folders(out_dirs: Dict[str, str], class_names: Sequence[str]) -> List[str]:
    """Create the output and class folders; return those created (in creation order)."""
    created = []
    for out in out_dirs.values():
        for folder in [out] + [os.path.join(out, n) for n in class_names]:
            if not os.path.isdir(folder):
                os.makedirs(folder)
                created.append(folder)
    return created


def run(roi_mask_csv: str, roi_mask_dir: str, patient_list: str, full_img_dir: str,
        train_out: str, val_out: str, **options) -> dict:
    """Sample abnormal, hard-negative and background patches for the patients of a list.

    The 2017 call: the six positionals, then any option of the command line by destination
    name (``target_height=...``, ``seed=...``; see :func:`get_args_parser`); the options not
    given take the parser's defaults. The work is :func:`sample_patches`.

    Args:
        roi_mask_csv: ``roi_mask_path.csv`` (columns ``patient_id,side,view,abn_num,pathology,
            type``; one row per lesion).
        roi_mask_dir: folder of ``{Calc|Mass}-{split}_{patient}_{side}_{view}_{abn}.png`` masks
            (8-bit, non-zero = lesion, the full image's size).
        patient_list: text file, one patient ID per line.
        full_img_dir: folder of ``{patient}_{side}_{view}.png`` full images (16-bit or 8-bit).
        train_out, val_out: output folders (created; two different folders).
        **options: the other options by destination name.

    Returns:
        The summary dict of :func:`sample_patches`.

    Raises:
        ValueError: an option the parser does not know (naming the valid ones), and the
            errors of :func:`sample_patches`.
        FileNotFoundError: an input file or folder does not exist.
    """
    opts = run_options.options_from(options_class(), script_utils.resolve_options(
        get_args_parser(), (roi_mask_csv, roi_mask_dir, patient_list, full_img_dir, train_out,
                            val_out), options))
    return sample_patches(opts)


@dataclass(frozen=True)
class _PatientSplit:
    """The listed patients and the patient-level split of a run.

    Attributes:
        listed: patient IDs of the list file, in order, repeats dropped.
        table: what ``roi_mask_path.csv`` says about them.
        not_in_csv: listed patients without a row in the CSV.
        train, val: the patients of each output.
    """

    listed: List[str]
    table: _RoiTable
    not_in_csv: List[str]
    train: List[str]
    val: List[str]


def _split_patients(opts) -> _PatientSplit:
    """Read the patient list and ``roi_mask_path.csv`` and split the patients (stratified by
    "has a malignant lesion"; with ``normal_views`` the patients absent from the CSV are split
    on their own, so that the lesion patients' split stays)."""
    listed = _read_patient_list(opts.patient_list)
    table = _read_roi_table(opts.roi_mask_csv, listed)
    not_in_csv = [p for p in listed if p not in table.known]
    if not_in_csv:  # one line, not one per patient (lists often hold lesion-free patients)
        shown = ", ".join(not_in_csv[:5]) + (", ..." if len(not_in_csv) > 5 else "")
        if opts.normal_views:
            logger.info("%d patient(s) of %s are not in %s (no ROI rows): their views give "
                        "%d background patches each (--normal-views): %s", len(not_in_csv),
                        opts.patient_list, opts.roi_mask_csv, opts.normal_views, shown)
        else:
            logger.warning("%d patient(s) of %s are not in %s (no ROI rows) and are skipped "
                           "(--normal-views N samples N background patches per view of "
                           "theirs): %s (all listed in sampling_summary.json)", len(not_in_csv),
                           opts.patient_list, opts.roi_mask_csv, shown)
    pats = [p for p in listed if p in table.known]
    train_pats, val_pats = split_patients(pats, [int(p in table.malignant) for p in pats],
                                          opts.val_size, opts.seed)
    if opts.normal_views and not_in_csv:
        normal_train, normal_val = split_patients(not_in_csv, [0] * len(not_in_csv),
                                                  opts.val_size, opts.seed)
        train_pats, val_pats = sorted(train_pats + normal_train), sorted(val_pats + normal_val)
    return _PatientSplit(listed, table, not_in_csv, train_pats, val_pats)


def _view_entries(opts, split: _PatientSplit, out_dirs: Dict[str, str]):
    """(entries, tasks) of ``_build_views`` for the split patients, their lesion-free views
    (``normal_views``) appended."""
    pat_split = {**{p: "train" for p in split.train}, **{p: "val" for p in split.val}}
    entries, tasks = _build_views(split.table, pat_split, opts.full_img_dir,
                                  _index_masks(opts.roi_mask_dir), opts.roi_mask_dir, out_dirs)
    if opts.normal_views:
        normal = _normal_view_tasks(split.table, pat_split, opts.full_img_dir, out_dirs)
        entries, tasks = entries + normal, tasks + normal
    return entries, tasks


def _nothing_sampled(opts, split: _PatientSplit, summary: dict, manifests,
                     created: Sequence[str]) -> ValueError:
    """Undo the start of a run that sampled no view (its manifests and the empty folders it
    made) and return the error that says why."""
    _abandon_manifests(manifests)
    for folder in reversed(created):  # the empty folders this run made (no patch in them)
        try:
            os.rmdir(folder)
        except OSError:
            pass
    return ValueError(
        f"no view was sampled: {len(split.listed)} patient(s) in {opts.patient_list} "
        f"({len(split.not_in_csv)} not in {opts.roi_mask_csv}), {summary['images_total']} "
        f"view(s), {summary['images_skipped']} skipped {summary['skipped'] or ''}; no manifest "
        "written (see the warnings above)")


def sample_patches(opts: run_options.RunOptions) -> dict:
    """Sample the patches of a run (see the module docstring for the kinds and the checks).

    Args:
        opts: the options (an instance of :func:`options_class`; their meaning is the help of
            their flags). ``seed`` None takes ``RANDOM_SEED`` from the environment, else 12345;
            it seeds the patient split and every view's draws. Several class folder options
            may name the same folder (e.g. a 3-class background/malignant/benign set).
            ``workers`` does not change the results.

    Returns:
        Summary dict: ``images_total``, ``images_read``, ``images_skipped``, ``skipped``
        (reason -> count), ``skipped_images`` (img_id -> message), ``views_skipped_bad_roi``,
        ``patients`` (train/val counts, ``not_in_csv`` list), ``patches`` (split -> folder ->
        count), ``patches_total``, shortfalls, ``cutoff_relaxations``, ``bad_rows``,
        ``duplicate_rows``, ``bit_depths`` (stored dtype -> sampled views), ``bit_depth`` (the
        most common), ``mixed_bit_depth_views``, ``normal_views`` (lesion-free views sampled),
        ``rejected`` (split -> reason -> candidates the breast-tissue guard refused; zeros
        without it), ``rejected_views`` (img_id -> reason -> count, views with a refusal),
        ``elapsed_s``.

    Raises:
        ValueError: bad option values; a CSV without the required columns, undecodable or
            with a value that cannot be part of a file name (InputFileError, naming the file
            and line); output folders holding an earlier run's patches without ``overwrite``;
            no view sampled (nothing is written then).
        FileNotFoundError: an input file or folder does not exist.
    """
    t0 = time.time()
    opts = opts.replace(seed=get_random_seed() if opts.seed is None else int(opts.seed))
    _check_inputs(opts)
    cfg = _settings(opts)
    options = dict(opts)
    logger.info("sampling options: %s", json.dumps(options, default=str))

    # read and check every input before anything is written
    split = _split_patients(opts)
    out_dirs = {"train": opts.train_out, "val": opts.val_out}
    entries, tasks = _view_entries(opts, split, out_dirs)
    class_names = sorted(set(cfg.folders.values()))
    run_files.check_run_paths(
        input_files={"ROI_MASK_CSV": opts.roi_mask_csv, "PATIENT_LIST": opts.patient_list},
        input_dirs={"ROI_MASK_DIR": opts.roi_mask_dir, "FULL_IMG_DIR": opts.full_img_dir},
        output_dirs={"TRAIN_OUT": opts.train_out, "VAL_OUT": opts.val_out})
    manifests = _prepare_outputs(out_dirs, class_names, opts.overwrite)

    created = _make_folders(out_dirs, class_names)
    _begin_manifests(manifests, created)
    sampled = iter(_sample_all(tasks, cfg, opts.workers, opts.verbose))
    results = [next(sampled) if isinstance(e, _ViewTask) else e for e in entries]
    summary = _summarise(results, cfg.folders, split.train, split.val, split.not_in_csv,
                         split.table)
    normal_ids = {t.img_id for t in tasks if not t.rois}
    summary["normal_views"] = sum(r["status"] == "ok" and r["img_id"] in normal_ids
                                  for r in results)
    summary["elapsed_s"] = round(time.time() - t0, 3)
    _report_views(results, summary)
    if summary["images_read"] == 0:
        raise _nothing_sampled(opts, split, summary, manifests, created)
    _write_outputs(results, out_dirs, {"train": split.train, "val": split.val}, summary,
                   options)
    _save_manifests(manifests, results, class_names)
    _log_summary(summary, out_dirs, cfg.guarded)
    return summary


def _bit_depths(results) -> Tuple[Dict[str, int], Optional[str], List[str]]:
    """(stored dtype -> sampled views, the most common dtype (the first seen on a tie), the
    sampled views stored with another dtype)."""
    ok = [r for r in results if r["status"] == "ok" and r["dtype"]]
    counts = collections.Counter(r["dtype"] for r in ok)  # in the order first seen
    if not counts:
        return {}, None, []
    main = max(counts, key=counts.get)
    return dict(counts), main, [r["img_id"] for r in ok if r["dtype"] != main]


def _summarise(results, folders, train_pats, val_pats, not_in_csv, table: _RoiTable) -> dict:
    names = sorted(set(folders.values()))
    patches = {s: {f: 0 for f in names} for s in ("train", "val")}
    skipped: Dict[str, int] = {}
    skipped_images = {}
    for r in results:
        for folder, n in r["counts"].items():
            patches[r["split"]][folder] += n
        if r["status"] != "ok":
            skipped[r["status"]] = skipped.get(r["status"], 0) + 1
            skipped_images[r["img_id"]] = r["message"]
    read = sum(r["status"] == "ok" for r in results)
    depths, main, mixed = _bit_depths(results)
    return {
        "images_total": len(results), "images_read": read,
        "images_skipped": len(results) - read, "skipped": skipped,
        "skipped_images": skipped_images,
        "views_skipped_bad_roi": sum(r["status"] in BAD_ROI_REASONS for r in results),
        "patients": {"train": len(train_pats), "val": len(val_pats),
                     "not_in_csv": list(not_in_csv)},
        "patches": patches,
        "patches_total": sum(sum(v.values()) for v in patches.values()),
        "abn_shortfall": sum(r["abn_shortfall"] for r in results),
        "hns_shortfall": sum(r["hns_shortfall"] for r in results),
        "bkg_shortfall": sum(r["bkg_shortfall"] for r in results),
        "cutoff_relaxations": sum(r["relaxations"] for r in results),
        "bad_rows": table.bad_rows,
        "duplicate_rows": table.duplicate_rows,
        "bit_depths": depths, "bit_depth": main, "mixed_bit_depth_views": mixed,
        **_rejection_counts(results),
    }


def _rejection_counts(results) -> dict:
    """``rejected`` (split -> reason -> candidates the breast-tissue guard refused) and
    ``rejected_views`` (img_id -> reason -> count, for the views with a refusal)."""
    rejected = {s: dict.fromkeys(GUARD_REASONS, 0) for s in ("train", "val")}
    views = {}
    for r in results:
        for reason, n in r["rejected"].items():
            rejected[r["split"]][reason] += n
        if any(r["rejected"].values()):
            views[r["img_id"]] = dict(r["rejected"])
    return {"rejected": rejected, "rejected_views": views}


_MANIFEST_COLS = ["folder", "filename", "img_id", "kind", "row", "col", "roi_frac",
                  "patch_frac"]


def _report_views(results, summary: dict) -> None:
    """Log each view's warnings and skip, then the views stored with another bit depth."""
    for r in results:
        for msg in r["warnings"]:
            logger.warning(msg)
        if r["status"] != "ok":
            logger.warning("skipped %s (%s)", r["message"], r["status"])
    mixed = set(summary["mixed_bit_depth_views"])
    if not mixed:
        return
    main, depths = summary["bit_depth"], summary["bit_depths"]
    factor = _RESCALE_FOR.get(main)
    for r in results:
        if r["img_id"] in mixed:
            why = dm_image.intensity_scale_problem(r["img_max"], factor) if factor else None
            logger.warning("%s (%s): the full image is stored as %s while %d of the %d sampled "
                           "views are %s: its patches hold levels on another scale%s",
                           r["img_id"], r["img_path"], r["dtype"], depths[main],
                           summary["images_read"], main,
                           f" ({why}, a factor meant for {main})" if why else "")
    logger.warning("%d sampled view(s) are not stored as %s like the other %d (%s; listed as "
                   "mixed_bit_depth_views in sampling_summary.json): a single --rescale-factor "
                   "will not fit those patches; convert those images to the same bit depth, or "
                   "sample them into other folders", len(mixed), main, depths[main],
                   ", ".join(f"{d}: {n}" for d, n in depths.items()))


def _write_outputs(results, out_dirs, split_pats, summary, options) -> None:
    """Write each output's ``patches.csv`` and ``pat_lst.txt`` and the summary, atomically."""
    import pandas as pd

    for split, out in out_dirs.items():
        rows = [row for r in results if r["split"] == split for row in r["rows"]]
        manifest = pd.DataFrame(rows, columns=_MANIFEST_COLS)
        dm_image.atomic_write(Path(out, "patches.csv"),
                              lambda fh, df=manifest: df.to_csv(fh, index=False), text=True)
        text = "".join(p + "\n" for p in split_pats[split])
        dm_image.atomic_write(Path(out, "pat_lst.txt"), lambda fh, t=text: fh.write(t),
                              text=True)
    dm_image.atomic_write(
        Path(out_dirs["train"], "sampling_summary.json"),
        lambda fh: json.dump({"options": options, "summary": summary}, fh, indent=1,
                             default=str), text=True)


def _save_manifests(manifests, results, class_names) -> None:
    """Name each output folder's patches, files and class folders in its manifest."""
    for split, manifest in manifests.items():
        for r in results:
            if r["split"] == split:
                for row in r["rows"]:
                    manifest.add(manifest.folder / row["folder"] / row["filename"])
        for name in OUTPUT_FILES:
            if (manifest.folder / name).is_file():
                manifest.add(manifest.folder / name)
        for name in class_names:
            manifest.add_dir(manifest.folder / name)
        manifest.finish()


def _log_summary(summary: dict, out_dirs: Dict[str, str], guarded: bool = False) -> None:
    logger.info("images read: %d of %d; skipped: %d %s", summary["images_read"],
                summary["images_total"], summary["images_skipped"], summary["skipped"] or "")
    if summary["views_skipped_bad_roi"]:
        logger.warning("%d view(s) skipped for a bad ROI row or mask (their lesions would "
                       "otherwise be cut as background)", summary["views_skipped_bad_roi"])
    for split, counts in summary["patches"].items():
        logger.info("%s patches in %s: %s", split, out_dirs[split], counts)
    logger.info("patients: %d train, %d val, %d not in the CSV; abnormal shortfall %d, "
                "background shortfall %d, cutoff relaxations %d, %.1f s",
                summary["patients"]["train"], summary["patients"]["val"],
                len(summary["patients"]["not_in_csv"]), summary["abn_shortfall"],
                summary["bkg_shortfall"], summary["cutoff_relaxations"], summary["elapsed_s"])
    if guarded:
        logger.info("candidates refused by the breast-tissue guard: train %s, val %s; %d view(s) "
                    "with a refusal (rejected_views in sampling_summary.json)",
                    summary["rejected"]["train"], summary["rejected"]["val"],
                    len(summary["rejected_views"]))


# ------------------------------------------------------------------------- command line
_HELP = {
    "roi_mask_csv": "roi_mask_path.csv: one row per lesion (patient_id, side, view, abn_num, "
                    "pathology, type)",
    "roi_mask_dir": "folder of the ROI masks {Calc|Mass}-{split}_{patient}_{side}_{view}_{abn}"
                    ".png",
    "patient_list": "text file of the patients to sample, one patient ID per line",
    "full_img_dir": "folder of the full images {patient}_{side}_{view}.png",
    "train_out": "output folder of the training patches (class subfolders, patches.csv)",
    "val_out": "output folder of the validation patches (another folder than TRAIN_OUT)",
    "target_height": "height the full images are resized to, in pixels",
    "patch_size": "side of the square patches, in pixels of the resized image",
    "nb_bkg": "background-folder patches per view, the hard negatives included",
    "nb_abn": "abnormal patches per lesion",
    "nb_hns": "hard-negative patches per view, at most",
    "pos_cutoff": "an abnormal patch overlaps its lesion by more than this fraction of the "
                  "lesion or of the patch (lowered by 0.05 after 1,000 failed draws)",
    "neg_cutoff": "a background patch overlaps each lesion by at most this fraction of the "
                  "lesion and of the patch",
    "val_size": "fraction of the patients whose patches go to VAL_OUT (0: none)",
    "bkg_dir": "class folder of the background and hard-negative patches",
    "calc_pos_dir": "class folder of the malignant calcification patches",
    "calc_neg_dir": "class folder of the benign calcification patches",
    "mass_pos_dir": "class folder of the malignant mass patches",
    "mass_neg_dir": "class folder of the benign mass patches",
}


def get_args_parser() -> argparse.ArgumentParser:
    """Parser with the 2017 flags: the one declaration of every option (type, default, help);
    :func:`options_class` and :func:`run` take their defaults from it."""
    parser = argparse.ArgumentParser(description="Sample patches from mammograms and ROI masks.")
    for name in ("roi_mask_csv", "roi_mask_dir", "patient_list", "full_img_dir", "train_out",
                 "val_out"):
        parser.add_argument(name, metavar=name.upper(), help=_HELP[name])
    dflt = " (default: %(default)s)"
    parser.add_argument("--target-height", type=cf.positive_int, default=4096,
                        help=_HELP["target_height"] + dflt)
    add_optional_value_flag(parser, "target-width", cf.positive_int, default=None,
                            help_text="fixed width of the resized images; not set: keep the "
                                      "aspect ratio")
    add_bool_flag(parser, "segment-breast", True, "crop each image and its masks to the "
                  "segmented breast first")
    for name, type_, default in (("patch_size", cf.positive_int, 256),
                                 ("nb_bkg", cf.nonneg_int, 30), ("nb_abn", cf.nonneg_int, 30),
                                 ("nb_hns", cf.nonneg_int, 15)):
        parser.add_argument("--" + name.replace("_", "-"), type=type_, default=default,
                            help=_HELP[name] + dflt)
    for name, default in (("pos_cutoff", 0.75), ("neg_cutoff", 0.35), ("val_size", 0.1)):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=default,
                            help=_HELP[name] + dflt)
    for name, default in (("bkg_dir", "background"), ("calc_pos_dir", "calc_mal"),
                          ("calc_neg_dir", "calc_ben"), ("mass_pos_dir", "mass_mal"),
                          ("mass_neg_dir", "mass_ben")):
        parser.add_argument("--" + name.replace("_", "-"), default=default,
                            help=_HELP[name] + dflt)
    add_bool_flag(parser, "verbose", True, "show a progress bar of the sampling")
    parser.add_argument("--workers", type=cf.positive_int, default=1,
                        help="worker processes, each sampling two views at a time on "
                        "threads; the results do not depend on it (default: %(default)s)")
    parser.add_argument("--seed", type=cf.nonneg_int, default=None,
                        help="seed of the patient split and of every view's draws "
                             "(default: RANDOM_SEED or 12345)")
    parser.add_argument("--overwrite", action="store_true", default=False,
                        help="replace an earlier run's patches in TRAIN_OUT and VAL_OUT: the "
                             "files its manifest (.ddsm_outputs.json) lists are removed first, "
                             "nothing else (default: off; refused when they hold patches)")
    parser.add_argument("--normal-views", type=cf.nonneg_int, default=0, metavar="N",
                        help="cut N background patches from each lesion-free view of the "
                             "listed patients (a full image without a row in ROI_MASK_CSV, "
                             "patients absent from it included, split on their own); 0: such "
                             "views are skipped, as in 2017 (default: %(default)s)")
    guard = "; either flag also refuses every constant patch, lesion patches included, " \
        "and counts the refusals (sampling_summary.json: rejected, rejected_views)"
    parser.add_argument("--min-breast-fraction", type=cf.fraction, default=None, metavar="F",
                        help="keep a background, hard-negative or lesion-free-view patch only "
                             "when at least F of its pixels lie in the segmented breast "
                             "(refused candidates are redrawn)" + guard +
                             " (default: off, as in 2017)")
    parser.add_argument("--min-patch-std", type=cf.nonneg_float, default=None, metavar="S",
                        help="keep such a patch only when the standard deviation of its pixels "
                             "is above S, in 8-bit levels (16-bit images: levels x 255/65535)"
                             + guard + " (default: off, as in 2017)")
    return parser


options_class = run_options.tool_options_class(get_args_parser, "SamplingOptions")


main = script_utils.tool_main(get_args_parser, run)


if __name__ == "__main__":
    main()
