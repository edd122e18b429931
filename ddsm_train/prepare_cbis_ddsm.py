"""Convert a TCIA CBIS-DDSM download (DICOM + the four description CSVs) to the sampler layout.

Data preparation for Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening
Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427. The output layout is the one described
in the README's "Data formats".

Input: ``CSV_DIR`` with the official ``{calc,mass}_case_description_{train,test}_set.csv`` and
``DICOM_ROOT``, the folder the CSV paths are relative to. A listed path that does not exist is
looked up under its first folder (``Calc-Training_P_00005_RIGHT_CC``...) recursively, so the
newer NBIA-downloader tree with renamed sub-folders works too.

Output in ``OUT_DIR``:

* ``full_img/{patient_id}_{side}_{view}.png``: 16-bit full mammograms (DICOM read by
  :func:`dm_image.read_image`: LUTs/windowing applied, MONOCHROME1 inverted, 0..65535). A view
  listed in several CSVs is written once.
* ``roi_mask/{Calc|Mass}-{Training|Test}_{patient_id}_{side}_{view}_{abn_num}.png``: 0/255
  masks as 1-bit PNGs (OpenCV reads them as uint8 0/255, 2.5x faster than 8-bit ones). The
  mask of a row is recognised by content among the files of its ``ROI mask file path`` and
  ``cropped image file path`` (the two are swapped in some rows): the one holding at most two
  values and having the full image's size.
* ``roi_mask_path.csv`` (``patient_id,side,view,abn_num,pathology,type``), one row per mask
  written; ``train_pat.txt`` / ``test_pat.txt`` (patients with a mask from the official
  training / test CSVs; 31 patients have lesions in both); ``pat_side_cancer.csv``
  (``patient_id,side,cancer``, cancer = a MALIGNANT lesion in that breast, for every breast
  with a full image written).
* with ``--whole-img-size H W``: ``whole_img/{train,test}/{neg,pos}/{patient_id}_{side}_{view}.png``
  (16-bit, bicubic), pos = the view has a MALIGNANT lesion. A view with lesions in both official
  splits goes to test only (no test image in train).
* ``prepare_summary.json``: the run's options and summary; ``prepare_problems.txt``: one line
  per missing or unreadable file.

Missing or unreadable files are logged, counted in the summary and skipped; the run goes on.

A rerun into the same ``OUT_DIR`` gives the tree a fresh run gives: the manifest
``.ddsm_outputs.json`` lists every file a run wrote, and the files an earlier run wrote that
this run does not (a view whose pathology changed from ``neg/`` to ``pos/``, an earlier
``--val-size`` split) are removed before the mean is computed; other files are never touched.
A file in ``OUT_DIR`` named like an output that no manifest names (a user's own) stops the run
before anything is written, unless ``--overwrite``, which replaces it.
``OUT_DIR`` must lie outside ``DICOM_ROOT``.

Example (from inside ``ddsm_train/``)::

    python prepare_cbis_ddsm.py ../shared/data/cbis_ddsm_csv /data/CBIS-DDSM /data/cbis_png \\
        --whole-img-size 1152 896 --workers 4
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import dm_image  # noqa: E402
import run_files  # noqa: E402
from common_flags import add_bool_flag  # noqa: E402
import common_flags as cf  # noqa: E402
from compute_mean import image_mean  # noqa: E402
from ddsm_names import SIDES, VIEWS, image_name, mask_name, split_image_stem  # noqa: E402
from script_utils import ROI_COLUMNS, InputFileError, parallel_map, \
    read_csv_table, run_defaults, safe_name_part  # noqa: E402

__all__ = ["CSV_NAMES", "ROI_COLUMNS", "read_description_csvs", "is_mask_for", "run",
           "get_args_parser", "main"]

logger = logging.getLogger(__name__)

CSV_NAMES = {("calc", "Training"): "calc_case_description_train_set.csv",
             ("calc", "Test"): "calc_case_description_test_set.csv",
             ("mass", "Training"): "mass_case_description_train_set.csv",
             ("mass", "Test"): "mass_case_description_test_set.csv"}
PATHOLOGIES = frozenset({"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"})
_NEEDED = {"patient_id": "patient_id", "left_or_right_breast": "side", "image_view": "view",
           "abnormality_id": "abn_num", "pathology": "pathology",
           "image_file_path": "image_path", "cropped_image_file_path": "crop_path",
           "roi_mask_file_path": "roi_path"}


# ------------------------------------------------------------------------- metadata
def _norm_col(name: str) -> str:
    """'breast density', 'breast_density ', 'ROI mask file path' -> snake case."""
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def read_description_csvs(csv_dir: str) -> Tuple[pd.DataFrame, List[str]]:
    """Read the official description CSVs into one table with clean values.

    Handles the quirks of the release: ``breast density`` vs ``breast_density``, path values
    ending in a newline, Windows separators, stray spaces.

    Args:
        csv_dir: folder holding some or all of :data:`CSV_NAMES`.

    Returns:
        (table, csv_files_read). Columns: ``patient_id, side, view, abn_num (int), pathology,
        type (calc|mass), split (Training|Test), image_path, crop_path, roi_path,
        breast_density``.

    Raises:
        FileNotFoundError: none of the four CSVs is in ``csv_dir``.
        ValueError: a CSV lacks a required column (named in the message).
    """
    frames, used = [], []
    for (kind, split), name in CSV_NAMES.items():
        path = Path(csv_dir) / name
        if not path.is_file():
            continue
        df = read_csv_table(path)
        df.columns = [c if c == "_line" else _norm_col(c) for c in df.columns]
        missing = [c for c in _NEEDED if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; columns are "
                             f"{[c for c in df.columns if c != '_line']}")
        out = df[list(_NEEDED)].rename(columns=_NEEDED)
        out["where"] = [f"{path}, {n}" for n in df["_line"]]
        for col in ("image_path", "crop_path", "roi_path"):
            out[col] = out[col].str.replace("\\", "/", regex=False).str.strip("/")
        out["breast_density"] = df.get("breast_density", pd.Series("", index=df.index))
        out["type"], out["split"] = kind, split
        out["pathology"] = out["pathology"].str.upper()
        out["side"] = out["side"].str.upper()
        out["view"] = out["view"].str.upper()
        _check_rows(out)
        frames.append(out)
        used.append(str(path))
    if not frames:
        raise FileNotFoundError(f"no CBIS-DDSM description CSV in {csv_dir}; expected "
                                f"{sorted(CSV_NAMES.values())}")
    table = pd.concat(frames, ignore_index=True)
    bad = ~table["abn_num"].str.fullmatch(r"\d+")
    if bad.any():
        logger.warning("%d rows with a non-integer abnormality id dropped: %s",
                       int(bad.sum()), "; ".join(table.loc[bad, "where"].head(5)))
    table = table[~bad].copy()
    table["abn_num"] = table["abn_num"].astype(int)
    return table, used


def _check_rows(table: pd.DataFrame) -> None:
    """Refuse a row whose pathology, side or view is unknown, or whose patient id cannot be
    part of a file name (a typo must not turn a malignant breast into ``neg``)."""
    for rec in table[["patient_id", "side", "view", "pathology", "where"]].to_dict("records"):
        safe_name_part(rec["patient_id"], "patient_id", rec["where"])
        for col, valid in (("pathology", PATHOLOGIES), ("side", SIDES), ("view", VIEWS)):
            if rec[col] not in valid:
                raise InputFileError(f"{rec['where']}: unknown {col} {rec[col]!r}; expected one "
                                     f"of {sorted(valid)}")


# ------------------------------------------------------------------------- files
def _candidates(root: Path, rel: str) -> List[Path]:
    """The listed file if present, else every ``.dcm`` under the path's first folder."""
    if not rel:
        return []
    path = root / rel
    if path.is_file():
        return [path]
    top = root / rel.split("/")[0]
    return sorted(top.rglob("*.dcm")) if top.is_dir() else []


def _dicom_shape(path: Path) -> Optional[Tuple[int, int]]:
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    except Exception:
        return None


def is_mask_for(arr: np.ndarray, full_shape: Sequence[int]) -> bool:
    """A ROI mask: the full image's (H, W) and at most two distinct values."""
    if arr.shape != tuple(full_shape):
        return False
    lo, hi = arr.min(), arr.max()
    return not np.any((arr != lo) & (arr != hi))


@dataclass
class _View:
    patient: str
    side: str
    view: str
    image_paths: List[str]
    rois: List[dict]
    split: str          # train | test (test if any row is from a test CSV)
    malignant: bool

    @property
    def name(self) -> str:
        """The image name ``{patient}_{side}_{view}``."""
        return image_name(self.patient, self.side, self.view)


@dataclass
class _Config:
    dicom_root: str
    out_dir: str
    whole_img_size: Optional[Tuple[int, int]]


def _read_full(view: _View, root: Path, res: dict) -> Optional[np.ndarray]:
    tried = False
    for rel in view.image_paths:
        cands = _candidates(root, rel)
        if len(cands) > 1:  # fallback search found several files: the full image is largest
            cands.sort(key=lambda p: -np.prod(_dicom_shape(p) or (0, 0)))
        for path in cands:
            tried = True
            try:
                return dm_image.read_image(path)
            except (OSError, ValueError) as err:
                res["messages"].append(f"unreadable full image {path}: {err}")
    res["problem"] = "full_image_unreadable" if tried else "full_image_missing"
    return None


def _find_mask(roi: dict, root: Path, shape, res: dict) -> Tuple[Optional[np.ndarray], str]:
    """Return (mask array, status) with status ok|swapped|missing|unidentified."""
    listed = _candidates(root, roi["roi_path"])
    crop = _candidates(root, roi["crop_path"])
    seen, found_any = set(), False
    for path in listed + crop:
        if path in seen:
            continue
        seen.add(path)
        found_any = True
        hdr = _dicom_shape(path)
        if hdr is not None and hdr != tuple(shape):
            continue
        try:
            arr = dm_image.read_image(path)
        except (OSError, ValueError) as err:
            res["messages"].append(f"unreadable ROI file {path}: {err}")
            continue
        if is_mask_for(arr, shape):
            swapped = path not in listed
            return arr, "swapped" if swapped else "ok"
    return None, "unidentified" if found_any else "missing"


def _process_view(args) -> dict:
    view, cfg = args
    root, out = Path(cfg.dicom_root), Path(cfg.out_dir)
    img_id = view.name
    res = {"img_id": img_id, "full": False, "rois": [], "counts": {}, "messages": [],
           "problem": None, "whole": None}

    def count(key, n=1):
        res["counts"][key] = res["counts"].get(key, 0) + n

    img = _read_full(view, root, res)
    if img is None:
        count(res["problem"])
        count("masks_skipped_no_full_image", len(view.rois))
        res["messages"].append(f"{img_id}: {res['problem'].replace('_', ' ')} "
                               f"({view.image_paths[0]})")
        return res
    dm_image.write_png(out / _full_rel(view), img.astype(np.uint16))
    res["full"] = True
    for roi in view.rois:
        name = _mask_rel(view, roi).name
        arr, status = _find_mask(roi, root, img.shape, res)
        if arr is None:
            count(f"mask_{status}")
            res["messages"].append(f"{name}: mask {status} ({roi['roi_path']})")
            continue
        if arr.max() == arr.min():
            count("mask_empty")
            res["messages"].append(f"{name}: mask is empty")
            continue
        count("masks_written")
        if status == "swapped":
            count("swapped_paths")
        dm_image.write_png(out / "roi_mask" / name,
                           np.where(arr == arr.max(), 255, 0).astype(np.uint8), bilevel=True)
        res["rois"].append({"patient_id": view.patient, "side": view.side, "view": view.view,
                            "abn_num": roi["abn_num"], "pathology": roi["pathology"],
                            "type": roi["type"], "split": roi["split"]})
    if cfg.whole_img_size is not None:
        h, w = cfg.whole_img_size
        small = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
        label = "pos" if view.malignant else "neg"
        dm_image.write_png(out / _whole_rel(view), small)
        res["whole"] = (view.split, label)
    return res


def _full_rel(view: _View) -> Path:
    return Path("full_img", f"{view.name}.png")


def _mask_rel(view: _View, roi: dict) -> Path:
    return Path("roi_mask", mask_name(roi["type"], roi["split"], view.name, roi["abn_num"]))


def _whole_rel(view: _View) -> Path:
    return Path("whole_img", view.split, "pos" if view.malignant else "neg",
                f"{view.name}.png")


#: The tables a run writes into ``OUT_DIR`` (``val_pat.txt`` only with a validation set).
_TABLES = ("roi_mask_path.csv", "train_pat.txt", "test_pat.txt", "val_pat.txt",
           "pat_side_cancer.csv", "prepare_summary.json", "prepare_problems.txt")


def _written_files(results: List[dict], views: List[_View], val: bool) -> List[Path]:
    """The files (relative to ``OUT_DIR``) the converted views and the tables make."""
    files = [Path(t) for t in _TABLES if val or t != "val_pat.txt"]
    for res, view in zip(results, views):
        if res["full"]:
            files.append(_full_rel(view))
            files += [_mask_rel(view, roi) for roi in res["rois"]]
            if res["whole"]:
                files.append(_whole_rel(view))
    return files


# ------------------------------------------------------------------------- run
def _build_views(table: pd.DataFrame) -> List[_View]:
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for rec in table.to_dict("records"):
        groups.setdefault((rec["patient_id"], rec["side"], rec["view"]), []).append(rec)
    views = []
    for (pat, side, view), recs in sorted(groups.items()):
        recs.sort(key=lambda r: (r["abn_num"], r["type"]))
        views.append(_View(pat, side, view, list(dict.fromkeys(r["image_path"] for r in recs)),
                           recs, "test" if any(r["split"] == "Test" for r in recs) else "train",
                           any(r["pathology"] == "MALIGNANT" for r in recs)))
    return views


def _write_text(path: Path, text: str) -> None:
    dm_image.atomic_write(path, lambda fh: fh.write(text), text=True)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    dm_image.atomic_write(path, lambda fh: df.to_csv(fh, index=False), text=True)


def _write_tables(results: List[dict], table: pd.DataFrame, out: Path,
                  val_patients: Sequence[str] = ()) -> dict:
    rows = [r for res in results for r in res["rois"]]
    roi_df = pd.DataFrame(rows, columns=ROI_COLUMNS + ["split"]).sort_values(
        ["patient_id", "side", "view", "abn_num"])
    _write_csv(roi_df[ROI_COLUMNS], out / "roi_mask_path.csv")
    lists = {}
    val = set(val_patients)
    for split, fname in (("Training", "train_pat.txt"), ("Test", "test_pat.txt")):
        pats = sorted(set(roi_df.loc[roi_df["split"] == split, "patient_id"]) - val)
        _write_text(out / fname, "".join(p + "\n" for p in pats))
        lists[split] = set(pats)
    if val:
        _write_text(out / "val_pat.txt", "".join(p + "\n" for p in sorted(val)))
    written = {tuple(split_image_stem(r["img_id"])[:2]) for r in results if r["full"]}
    mal = table.assign(c=(table["pathology"] == "MALIGNANT").astype(int)).groupby(
        ["patient_id", "side"])["c"].max()
    psc = [(p, s, int(mal.get((p, s), 0))) for p, s in sorted(written)]
    _write_csv(pd.DataFrame(psc, columns=["patient_id", "side", "cancer"]),
               out / "pat_side_cancer.csv")
    return {"train_patients": len(lists["Training"]), "test_patients": len(lists["Test"]),
            "val_patients": len(val),
            "patients_in_both_splits": len(lists["Training"] & lists["Test"])}


def _assign_val(views: List[_View], val_size: Optional[float], seed: int) -> List[str]:
    """Move a patient-level, cancer-stratified ``val_size`` fraction of the training patients
    (those with no test view) to the ``val`` split; returns the validation patients."""
    if not val_size:
        return []
    from patch_sampling import split_patients

    test_pats = {v.patient for v in views if v.split == "test"}
    malignant: Dict[str, bool] = {}
    for v in views:
        if v.patient not in test_pats:
            malignant[v.patient] = malignant.get(v.patient, False) or v.malignant
    pats = sorted(malignant)
    _, val = split_patients(pats, [int(malignant[p]) for p in pats], val_size, seed)
    chosen = set(val)
    for v in views:
        if v.patient in chosen:
            v.split = "val"
    logger.info("%d of %d training patients moved to val (seed %d)", len(val), len(pats), seed)
    return val


def run(csv_dir: str, dicom_root: str, out_dir: str,
        whole_img_size: Optional[Sequence[int]] = None, workers: int = 1,
        verbose: bool = True, val_size: Optional[float] = None,
        seed: int = 12345, overwrite: bool = False) -> dict:
    """Write full images, ROI masks, tables and patient lists from a CBIS-DDSM download.

    Args:
        csv_dir: folder with the official description CSVs.
        dicom_root: folder the CSV file paths are relative to.
        out_dir: output folder (created; files an earlier run wrote are replaced or removed).
        whole_img_size: optional (height, width) of the whole-image ``neg|pos`` folders.
        workers: views converted in parallel by this many processes.
        verbose: show a progress bar.
        val_size: fraction of the training patients moved to a validation set (patient-level,
            stratified by "has a malignant lesion", seeded by ``seed``): their whole images go
            to ``whole_img/val`` and they are listed in ``val_pat.txt`` instead of
            ``train_pat.txt``, so no patient is in two sets. None or 0: no validation set.
        seed: random seed of that split.
        overwrite: replace files in ``out_dir`` named like this run's outputs that no manifest
            names (without it such a file stops the run before anything is written).

    Returns:
        Summary dict: ``views_total``, ``full_images_written``, ``masks_written``,
        ``swapped_paths``, problem counts (``full_image_missing``, ``full_image_unreadable``,
        ``mask_missing``, ``mask_unidentified``, ``mask_empty``,
        ``masks_skipped_no_full_image``), patient counts, ``whole_images`` and ``elapsed_s``.

    Raises:
        FileNotFoundError: no CSV in ``csv_dir`` or ``dicom_root`` is not a folder.
        ValueError: bad ``whole_img_size`` / ``workers``, a CSV without a needed column, or
            no full-mammogram DICOM found for any view (nothing converted).
        FileExistsError: a file named like an output that no manifest names, without
            ``overwrite``.
    """
    t0 = time.time()
    if whole_img_size is not None:
        if len(whole_img_size) != 2 or min(int(v) for v in whole_img_size) <= 0:
            raise ValueError(f"whole_img_size should be (height, width) > 0, "
                             f"got {whole_img_size!r}")
        whole_img_size = (int(whole_img_size[0]), int(whole_img_size[1]))
    if workers < 1:
        raise ValueError(f"workers should be >= 1, got {workers}")
    if val_size is not None and not 0.0 <= val_size < 1.0:
        raise ValueError(f"val_size should be in [0, 1), got {val_size}")
    if not os.path.isdir(dicom_root):
        raise FileNotFoundError(f"no such folder: {dicom_root}")
    table, used = read_description_csvs(csv_dir)
    run_files.check_run_paths(
        input_files={f"CSV_DIR's {name}": Path(csv_dir, name) for name in CSV_NAMES.values()},
        input_dirs={"DICOM_ROOT": dicom_root}, output_dirs={"OUT_DIR": out_dir})
    out = Path(out_dir)
    manifest = run_files.OutputManifest(out, "prepare_cbis_ddsm")
    views = _build_views(table)
    val_patients = _assign_val(views, val_size, seed)
    planned = ([out / _full_rel(v) for v in views]
               + [out / _mask_rel(v, r) for v in views for r in v.rois]
               + ([out / _whole_rel(v) for v in views] if whole_img_size else [])
               + [out / t for t in _TABLES if val_patients or t != "val_pat.txt"])
    manifest.check_foreign(planned, overwrite)   # a user's file of an output's name: refused
    folders = [Path("full_img"), Path("roi_mask")]
    if whole_img_size is not None:
        folders.append(Path("whole_img"))
        for split in ("train", "val", "test") if val_size else ("train", "test"):
            folders += [Path("whole_img", split)] + [Path("whole_img", split, label)
                                                     for label in ("neg", "pos")]
    for sub in folders:
        (out / sub).mkdir(parents=True, exist_ok=True)
        manifest.add_dir(out / sub)
    run_files.clean_leftovers(*(out / sub for sub in folders))
    options = {k: v for k, v in locals().items() if k in inspect.signature(run).parameters}
    logger.info("options: %s; CSVs: %s", options, used)
    manifest.begin(planned)
    cfg = _Config(str(dicom_root), str(out_dir), whole_img_size)
    results = parallel_map(_process_view, [(v, cfg) for v in views], workers, "converting",
                           verbose, chunksize=4)
    for rel in _written_files(results, views, bool(val_patients)):
        manifest.add(out / rel)
    manifest.remove_earlier()   # e.g. a view now in pos/, or an earlier val split: before the mean
    summary = _summarise(results, views, table)
    summary.update(_write_tables(results, table, out, val_patients))
    if whole_img_size is not None and sum(summary["whole_images"]["train"].values()):
        summary["whole_img_train_mean"] = round(float(image_mean(
            out / "whole_img" / "train", whole_img_size, rescale_factor=255 / 65535,
            workers=workers)["mean"]), 4)
        logger.info("mean intensity of whole_img/train at rescale factor 255/65535 "
                    "(--featurewise-mean): %.4f", summary["whole_img_train_mean"])
    summary["problems"] = _report_problems(results, out)
    if views and summary["full_images_written"] == 0:
        raise ValueError(f"no full-mammogram DICOM of the {len(views)} views was found or "
                         f"readable under {dicom_root}: nothing converted (problems listed in "
                         f"{out / 'prepare_problems.txt'})")
    summary["elapsed_s"] = round(time.time() - t0, 3)
    _write_text(out / "prepare_summary.json",
                json.dumps({"options": options, "summary": summary}, indent=1, default=str))
    manifest.finish()
    logger.info("summary: %s", summary)
    return summary


def _summarise(results: List[dict], views: List[_View], table: pd.DataFrame) -> dict:
    keys = ("masks_written", "swapped_paths", "full_image_missing", "full_image_unreadable",
            "mask_missing", "mask_unidentified", "mask_empty", "masks_skipped_no_full_image")
    summary = {"csv_rows": len(table), "views_total": len(views),
               "full_images_written": sum(r["full"] for r in results)}
    summary.update({k: sum(r["counts"].get(k, 0) for r in results) for k in keys})
    whole = {s: {"neg": 0, "pos": 0} for s in sorted({v.split for v in views} | {"train", "test"})}
    for r in results:
        if r["whole"]:
            whole[r["whole"][0]][r["whole"][1]] += 1
    summary["whole_images"] = whole
    split_sets = table.groupby(["patient_id", "side", "view"])["split"].nunique()
    summary["views_in_both_splits"] = int((split_sets > 1).sum())
    return summary


def _report_problems(results: List[dict], out: Path, nb_logged: int = 10) -> int:
    """Log the first problems and write them all to ``prepare_problems.txt``; return count."""
    msgs = [m for r in results for m in r["messages"]]
    for msg in msgs[:nb_logged]:
        logger.warning(msg)
    _write_text(out / "prepare_problems.txt", "".join(m + "\n" for m in msgs))
    if len(msgs) > nb_logged:
        logger.warning("%d problems in all, listed in %s", len(msgs),
                       out / "prepare_problems.txt")
    return len(msgs)


# ------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    """Parser; defaults are those of :func:`run`."""
    d = run_defaults(run)
    parser = argparse.ArgumentParser(description="Convert CBIS-DDSM DICOM to the PNG layout.")
    for name, help_text in (("csv_dir", "folder with the official CBIS-DDSM description CSVs"),
                            ("dicom_root", "folder the CSVs' DICOM file paths are relative to"),
                            ("out_dir", "output folder (created)")):
        parser.add_argument(name, metavar=name.upper(), help=help_text)
    parser.add_argument("--whole-img-size", type=cf.positive_int, nargs=2, metavar=("H", "W"),
                        default=d["whole_img_size"],
                        help="also write whole_img/{train,test}/{neg,pos} at this size "
                             "(default: not written)")
    parser.add_argument("--val-size", type=float, default=d["val_size"],
                        help="fraction of the training patients moved to whole_img/val and "
                             "val_pat.txt (patient-level, stratified by cancer; default: none)")
    parser.add_argument("--seed", type=cf.nonneg_int, default=d["seed"],
                        help="random seed of the --val-size split (default: %(default)s)")
    parser.add_argument("--workers", type=cf.positive_int, default=d["workers"],
                        help="processes converting views in parallel (default: %(default)s)")
    add_bool_flag(parser, "verbose", d["verbose"], "show a progress bar of the conversion")
    run_files.add_overwrite_flag(parser, "OUT_DIR")
    return parser


main = script_utils.tool_main(get_args_parser, run)


if __name__ == "__main__":
    main()
