"""Image inputs of the scoring tools, without TensorFlow: which images to score, and each
image read as model input.

Shared by ``image_clf_predict.py`` (which scores with tf-keras models) and
``score_exported.py`` (which scores an exported ONNX model with onnxruntime and must not load
TensorFlow): class folders, plain folders, image lists and the mammography meta-repository's
exam lists become :class:`ImageItem` rows, and :func:`load_pred_image` reads one image through
``dm_image.InputRecipe`` exactly as training did. Importing this module imports NumPy, OpenCV
and the project's ``dm_image``, ``ddsm_names`` and ``script_utils`` (none of which imports
TensorFlow); pandas is imported only to read an image list with a header line.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import dm_image  # noqa: E402
from ddsm_names import EXAM_VIEWS, exam_view_side  # noqa: E402
from script_utils import (check_unique, read_csv_table, read_text_lines,  # noqa: E402
                          restricted_unpickle)

__all__ = ["IMAGE_EXTENSIONS", "VIEWS", "READ_ERRORS", "ImageItem", "collect_class_folders",
           "collect_folder", "read_image_list", "load_exam_list", "collect_exams",
           "collect_items", "load_pred_image", "describe_error"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = tuple("." + ext for ext in dm_image.IMG_EXTENSIONS)
VIEWS = EXAM_VIEWS   # the view keys of an exam list
_LABEL_COLUMNS = ("malignant_label", "malignant", "label", "cancer")
_PATH_COLUMNS = ("image", "path", "image_path", "filename")
READ_ERRORS = (OSError, ValueError, cv2.error)

@dataclass
class ImageItem:
    """One image to score: ``image_index`` (CSV key), file path, label (0/1 or None), and for
    exam lists the exam index and view (``L-CC`` ...)."""
    image_index: str
    path: Path
    label: Optional[int] = None
    exam: Optional[int] = None
    view: Optional[str] = None


# ------------------------------------------------------------------------------ inputs
def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def collect_class_folders(img_dir: PathLike, class_list: Sequence[str]) -> List[ImageItem]:
    """Images of ``img_dir/<class>/``; label 1 for the last class, else 0.

    Raises:
        ValueError: a class folder is missing (the message lists the folders found).
    """
    img_dir = Path(img_dir)
    missing = [c for c in class_list if not (img_dir / c).is_dir()]
    if missing:
        found = sorted(p.name for p in img_dir.iterdir() if p.is_dir())
        raise ValueError(f"class folder(s) {missing} not found in {img_dir}; found {found}")
    items = []
    for k, cls in enumerate(class_list):
        label = int(k == len(class_list) - 1)
        items += [ImageItem(f"{cls}/{p.name}", p, label) for p in _image_files(img_dir / cls)]
    beside = _image_files(img_dir)
    if beside:
        logger.warning("%d image(s) lie beside the class folders of %s and are not scored "
                       "(e.g. %s): move them into a class folder %s", len(beside), img_dir,
                       beside[0].name, list(class_list))
    return items


def collect_folder(img_dir: PathLike) -> List[ImageItem]:
    """Every image file of ``img_dir`` (by extension, sorted), unlabelled."""
    return [ImageItem(p.name, p) for p in _image_files(Path(img_dir))]


def _parse_label(value, where: str) -> Optional[int]:
    text = str(value).strip()
    if text == "" or text.lower() == "nan":
        return None
    try:
        num = float(text)
    except ValueError:
        num = None
    if num not in (0.0, 1.0):
        raise ValueError(f"{where}: label should be 0 or 1, got {text!r}")
    return int(num)


def read_image_list(img_list: PathLike, img_dir: Optional[PathLike] = None) -> List[ImageItem]:
    """Read an image list file (see the module docstring for the two accepted layouts)."""
    img_list = Path(img_list)
    base = Path(img_dir) if img_dir is not None else img_list.parent
    lines = [(i, ln) for i, ln in read_text_lines(img_list) if not ln.startswith("#")]
    if not lines:
        raise ValueError(f"image list {img_list} holds no image")
    header = [f.strip().lower() for f in lines[0][1].split(",")]
    items = []
    if any(h in _PATH_COLUMNS for h in header):
        table = read_csv_table(img_list, comment="#")
        table.columns = [c if c == "_line" else c.lower() for c in table.columns]
        path_col = next(c for c in _PATH_COLUMNS if c in table.columns)
        label_col = next((c for c in _LABEL_COLUMNS if c in table.columns), None)
        for rec in table.to_dict("records"):
            label = (_parse_label(rec[label_col], f"{img_list} {rec['_line']}")
                     if label_col else None)
            items.append(ImageItem(rec[path_col], base / rec[path_col], label))
        return _unique_items(items, list(table["_line"]), img_list)
    where = []
    for lineno, line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) > 2:
            raise ValueError(f"{img_list} line {lineno}: expected 'path' or 'path,label', "
                             f"got {line!r}")
        label = _parse_label(fields[1], f"{img_list} line {lineno}") if len(fields) == 2 \
            else None
        items.append(ImageItem(fields[0], base / fields[0], label))
        where.append(f"line {lineno}")
    return _unique_items(items, where, img_list)


def _unique_items(items: List[ImageItem], where: List[str], img_list) -> List[ImageItem]:
    """Refuse a list naming one image twice (after resolving links): it would be counted
    twice in the metrics."""
    check_unique([os.path.realpath(it.path) for it in items], "image", str(img_list),
                 lines=where)
    return items


def _validate_exams(exams, source) -> List[dict]:
    if not isinstance(exams, list):
        raise ValueError(f"{source}: an exam list should be a list of dicts, got "
                         f"{type(exams).__name__}")
    for k, exam in enumerate(exams):
        if not isinstance(exam, dict):
            raise ValueError(f"{source}: exam {k} should be a dict, got {type(exam).__name__}")
        for view in VIEWS:
            stems = exam.get(view, [])
            if not isinstance(stems, (list, tuple)) or \
                    not all(isinstance(s, str) for s in stems):
                raise ValueError(f"{source}: exam {k} view {view} should be a list of image "
                                 f"file stems, got {stems!r}")
        if not any(exam.get(v) for v in VIEWS):
            logger.warning("%s: exam %d has no image in %s", source, k, VIEWS)
        label = exam.get("cancer_label")
        if label is not None and not isinstance(label, dict):
            raise ValueError(f"{source}: exam {k} cancer_label should be a dict, got {label!r}")
    return exams


def load_exam_list(path: PathLike) -> List[dict]:
    """Read an exam list from a pickle (restricted, see :class:`RestrictedUnpickler`; Python 2
    pickles are decoded as latin-1) or from JSON (``.json``), and check its structure.

    Raises:
        ValueError: the pickle references a class outside the allowed set, asks for memory the
            file does not hold, or the structure is not a list of exam dicts with lists of
            stems (the message names the file).
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            exams = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno} column {err.colno}: not valid JSON "
                             f"({err.msg})") from err
    else:
        exams = restricted_unpickle(path)
    return _validate_exams(exams, path)


def _resolve_stem(img_dir: Path, stem: str) -> Path:
    direct = img_dir / stem
    if direct.suffix.lower() in IMAGE_EXTENSIONS and direct.is_file():
        return direct
    for ext in IMAGE_EXTENSIONS:
        cand = img_dir / (stem + ext)
        if cand.is_file():
            return cand
    return img_dir / (stem + ".png")   # missing: reported as unreadable in the CSV


def collect_exams(exams: List[dict], img_dir: PathLike) -> List[ImageItem]:
    """One :class:`ImageItem` per image stem of every exam (views in ``VIEWS`` order); label
    from ``cancer_label[left_malignant|right_malignant]`` when present."""
    img_dir = Path(img_dir)
    items = []
    for k, exam in enumerate(exams):
        labels = exam.get("cancer_label") or {}
        for view in VIEWS:
            side = exam_view_side(view)
            raw = labels.get(f"{side}_malignant")
            label = _parse_label(raw, f"exam {k} {side}_malignant") if raw is not None else None
            for stem in exam.get(view, []):
                items.append(ImageItem(stem, _resolve_stem(img_dir, stem), label, k, view))
    return items


def _segmented_stored(path: Path, img_size) -> np.ndarray:
    """The breast cropped from the full-resolution file, resized, in the stored dtype."""
    img = dm_image.read_image(path)
    problem = dm_image.image_content_problem(img)
    if problem is not None:
        raise dm_image.ImageReadError(path, problem)
    img, _ = dm_image.segment_breast(img)
    return cv2.resize(img, dsize=(int(img_size[1]), int(img_size[0])),
                      interpolation=cv2.INTER_CUBIC)


def load_pred_image(path: PathLike, img_size: Sequence[int], img_scale: Optional[float] = None,
                    rescale_factor: Optional[float] = None, equalize_hist: bool = False,
                    featurewise_center: bool = True, featurewise_mean: float = 52.16,
                    segment_breast: bool = False, channels: int = 1,
                    preprocess: Optional[str] = None,
                    scale_problems: Optional[list] = None) -> np.ndarray:
    """One image as model input through ``dm_image.InputRecipe``: float32 (H, W, channels).

    Read and resize to ``img_size``, ``img_scale`` / ``rescale_factor``, optional histogram
    equalisation, ``channels`` copies of the single channel, then ``featurewise_mean``
    subtracted when ``featurewise_center``, else the ImageNet preprocessing of backbone
    ``preprocess`` when given. With ``segment_breast`` the breast is cropped from the
    full-resolution image before resizing (:func:`_segmented_stored`). With one channel and
    centring (the default) the result is copied to each model's channel count by
    :func:`predict_batch`, which gives the same input as reading at that count. An image whose
    levels do not fit ``rescale_factor`` (an 8-bit file among 16-bit ones, or the reverse:
    ``dm_image.intensity_scale_problem``) is scored as read, with a warning naming it, and
    ``(path, reason)`` is appended to ``scale_problems`` when given.

    Raises:
        dm_image.ImageReadError, ValueError: unreadable image, an image that cannot give a
            score (non-finite pixels, constant, smaller than ``dm_image.MIN_IMAGE_SIDE``) or
            failed segmentation.
    """
    recipe = dm_image.InputRecipe.from_options(dict(
        img_size=img_size, img_scale=img_scale, rescale_factor=rescale_factor,
        equalize_hist=equalize_hist, featurewise_center=featurewise_center,
        featurewise_mean=featurewise_mean), channels=channels, preprocess=preprocess)
    stored = _segmented_stored(Path(path), recipe.img_size) if segment_breast else \
        recipe.read_stored(path, scorable=True)
    problem = dm_image.intensity_scale_problem(float(stored.max()) if stored.size else 0.0,
                                               rescale_factor, img_scale)
    if problem is not None:
        logger.warning("image %s: %s", path, problem)
        if scale_problems is not None:
            scale_problems.append((str(path), problem))
    return recipe.to_input(recipe.intensities(stored)).astype(np.float32, copy=False)


def describe_error(exc: Exception) -> str:
    """One-line reason for the CSV (``ImageReadError``'s message holds file and reason)."""
    if isinstance(exc, dm_image.ImageReadError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    return f"{type(exc).__name__}: {' '.join(text.split())}"



def collect_items(img_dir, img_list, exam_list, class_list):
    if sum(x is not None for x in (img_list, exam_list)) > 1:
        raise ValueError("give at most one of img_list and exam_list")
    if exam_list is not None:
        if img_dir is None:
            raise ValueError("exam_list needs img_dir (the folder of the images)")
        exams = load_exam_list(exam_list)
        return collect_exams(exams, img_dir), exams
    if img_list is not None:
        return read_image_list(img_list, img_dir), None
    if img_dir is None:
        raise ValueError("give img_dir, img_list or exam_list")
    if not Path(img_dir).is_dir():
        raise ValueError(f"image folder {img_dir} not found")
    if any((Path(img_dir) / c).is_dir() for c in class_list):
        return collect_class_folders(img_dir, class_list), None
    return collect_folder(img_dir), None
