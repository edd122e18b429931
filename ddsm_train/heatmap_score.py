"""Patch-class probability heatmaps of CC and MLO mammograms (2017 pickle or plain ``.npz``).

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427. The flags and defaults are those of the 2017
``heatmap_score.py`` (``--net vgg19``, ``--featurewise-mean 71.8`` used only with
``--featurewise-center``, no ``--img-scale``, no ``--img-height``, ``--batch-size 128``,
``--stride 8``, ``--pat-csv ./full_img/pat.csv``, ``--out ./output/prob_heatmap.pkl``). For every
(patient, side) of ``--pat-csv`` (columns ``patient_id,side,cancer``, or ``malignant`` for
``cancer``; optionally only the
patients of ``--pat-list``) and each of its views ``{patient}_{side}_{CC|MLO}.{ext}`` in
``IMG_FOLDER``, a heatmap of the patch classifier's class probabilities, in one of two modes:

* **sweep** (default): the patch classifier ``DL_STATE`` is swept over the image by
  ``dm_image.get_prob_heatmap``: image read at ``--img-height`` (aspect kept,
  ``--rescale-factor`` applied), breast segmented and cropped, zero margin of half a patch,
  ``--patch-size`` windows every ``--stride`` pixels centred on the image, each patch's max
  mapped to ``--img-scale``, optional equalisation, ``--featurewise-mean`` subtracted (or the
  backbone's ImageNet preprocessing with ``--no-featurewise-center``). Heatmap shape
  ``(nb_row, nb_col, nb_class)`` with ``nb = max(1, floor((L - patch) / stride + 0.99))``,
  ``L`` = segmented height (width) + 2 * (patch // 2). Without ``--img-height`` the image is
  swept at its stored size.
* **fprop** (``--fprop-mode``): one fully convolutional pass over the whole image resized to
  ``--img-size`` (image max mapped to ``--img-scale``, rescale, centring as above). A patch
  classifier is converted with ``dm_resnet.add_top_layers(..., return_heatmap=True)`` (cut
  by ``--net``, average pool ``--avg-pool-size`` at ``--hm-strides``, the patch classifier's
  dense applied at every location with softmax); a whole-image model with a heatmap head
  (``hm_avg_pool`` / ``hm_dense`` layers) gives the same heatmap from its own layers; a model
  whose output is already 4-D is used as is. Heatmap shape ``(rows, cols, nb_class)`` of that
  output (e.g. 36x28 feature map - 7 + 1 = 30x22 for VGG at 1152x896 with 7x7 pooling).

Output ``--out``: the 2017 list of ``{patient_id, side, cancer, cc, mlo}`` (``cc``/``mlo``:
float32 ``(rows, cols, nb_class)`` or None for a missing view), in the format its name ends in:

* ``.pkl`` (the 2017 default): that list pickled as 2017 wrote it (protocol 2, numpy arrays
  named by their numpy 1.x path), so 2017 downstream code reads it with ``pickle.load``;
* ``.npz`` (no pickle inside): ``patient_id``, ``side`` (unicode arrays), ``cancer`` (int64),
  ``cc_<i>`` / ``mlo_<i>`` for record ``i`` when present, ``meta`` (JSON string: mode,
  options, ``malignant_class``).

Both are written to a temporary file in the output folder, then renamed over ``--out``.
:func:`load_heatmaps` reads an ``.npz``; a pickle only with ``allow_pickle=True``, through an
unpickler limited to containers and numpy arrays.

``--png-dir``: each mammogram (grey) with the heatmap of class ``--malignant-class`` blended in
as an OpenCV JET colour map (blue 0 .. red 1), coloured inside the segmented breast only (sweep:
the heatmap stretched over the breast's bounding box; fprop: over the whole image), written as
``{patient}_{side}_{view}_heatmap.png``, at most ``--png-height`` pixels high. Which class is
drawn: ``--malignant-class``, default 1 = ``malignant`` of the 3-class
``background/malignant/benign`` patch set; for the 5-class set
(``background, calc_mal, calc_ben, mass_mal, mass_ben``) pick 1 (calcification) or 3 (mass).
With ``--all-images``/``--img-list`` an overlay is named after the image's path under
IMG_FOLDER; images differing only in extension (``a.png``, ``a.jpg``) keep it (``a__png``,
``a__jpg``). The folder's manifest ``.ddsm_outputs.json`` lists the overlays drawn: those an
earlier run drew that this one does not are removed, other files are kept, and an overlay of
this run's name that no manifest lists stops the run unless ``--overwrite``. ``--png-dir`` and
``--out`` must lie outside IMG_FOLDER.

Example (from inside ``ddsm_train/``)::

    python heatmap_score.py CBIS-DDSM/full_png patch_clf_vgg19.h5 --pat-csv test_pats.csv \\
        --img-height 4096 --img-scale 255 --featurewise-center --featurewise-mean 71.8 \\
        --net vgg19 --out heatmaps.npz --png-dir heatmap_png
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import script_utils  # first: puts the root dm_* modules on sys.path

script_utils.import_tensorflow_quietly()   # TensorFlow's start-up lines hidden

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import dm_image  # noqa: E402
from common_flags import (RECIPE_NOTE, add_bool_flag, add_image_flags,  # noqa: E402
                          add_model_reading_flags, backbone_names)
import common_flags as cf  # noqa: E402
import run_files  # noqa: E402
import run_options  # noqa: E402
from ddsm_names import VIEWS, image_name  # noqa: E402
from script_utils import check_unique  # noqa: E402
from script_utils import (RECIPE_OPTIONS, InputFileError, RestrictedUnpickler,  # noqa: E402
                          apply_model_recipe, read_csv_table, read_text_lines,
                          restricted_unpickle, safe_name_part)

__all__ = [
    "VIEWS", "HEATMAP_FORMAT", "read_patient_sides", "view_path", "get_preprocess",
    "build_fprop_model", "fprop_heatmap", "sweep_heatmap", "overlay_heatmap", "list_any_images",
    "save_heatmaps", "load_heatmaps", "HEATMAP_SUFFIXES", "run", "options_class",
    "score_heatmaps", "get_args_parser", "main",
    "DEFAULT_CLASS_NAMES", "class_name", "find_roi_mask",
]

if TYPE_CHECKING:  # annotations only; TensorFlow is imported where a model is used
    import tf_keras as keras

logger = logging.getLogger(__name__)

HEATMAP_FORMAT = "heatmap_score/1"
HEATMAP_SUFFIXES = (".pkl", ".npz")   # 2017 pickle, pickle-free archive
PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ inputs
def read_patient_sides(pat_csv: PathLike, pat_list: Optional[PathLike] = None) -> pd.DataFrame:
    """(patient, side) rows of ``pat_csv``, restricted to ``pat_list`` when given.

    Several rows of one (patient, side) are merged, ``cancer`` = their maximum; rows come sorted
    by patient, then side (the order of the 2017 output).

    Returns:
        DataFrame with columns ``patient_id`` (str), ``side`` (str), ``cancer`` (int).

    The label column is ``cancer`` or, when the file has none, ``malignant`` (read as
    ``cancer``).

    Raises:
        ValueError: a required column is missing (the message lists the columns found), or a
            row's patient id or side cannot be part of a file name, or its cancer is not 0/1
            (the message names the file and line).
    """
    df = read_csv_table(pat_csv)
    label = "malignant" if "cancer" not in df.columns and "malignant" in df.columns else \
        "cancer"
    missing = [c for c in ("patient_id", "side", label) if c not in df.columns]
    if missing:
        raise InputFileError(f"{pat_csv}: missing column(s) {missing} (the label column may "
                             f"also be called 'malignant'); columns are "
                             f"{[c for c in df.columns if c != '_line']}")
    df = df.rename(columns={label: "cancer"})
    for rec in df[["patient_id", "side", "cancer", "_line"]].to_dict("records"):
        where = f"{pat_csv}, {rec['_line']}"
        safe_name_part(rec["patient_id"], "patient_id", where)
        safe_name_part(rec["side"], "side", where)
        if rec["cancer"] not in ("0", "1"):
            raise ValueError(f"{where}: cancer should be 0 or 1, got {rec['cancer']!r}")
    df = df.astype({"cancer": int}).drop(columns="_line")
    if pat_list is not None:
        keep = {ln for _, ln in read_text_lines(pat_list)}
        unknown = keep - set(df["patient_id"])
        if unknown:
            logger.warning("%d patient(s) of %s are not in %s, e.g. %s", len(unknown), pat_list,
                           pat_csv, sorted(unknown)[:3])
        df = df[df["patient_id"].isin(keep)]
    df = df.groupby(["patient_id", "side"], sort=True, as_index=False)["cancer"].max()
    return df.astype({"cancer": int})


def list_any_images(img_folder: PathLike, img_list: Optional[PathLike] = None) -> List[Path]:
    """The images to score without a patient table: every image file under ``img_folder``
    (recursively, sorted), or the paths listed in ``img_list`` (one a line, relative paths
    taken from ``img_folder``).

    Raises:
        ValueError: no image found; FileNotFoundError: a listed file does not exist.
    """
    folder = Path(img_folder)
    if img_list is None:
        return [folder / rel for rel in dm_image.list_images(folder)]
    paths, where = [], []
    for line_no, entry in read_text_lines(img_list):
        path = Path(entry) if Path(entry).is_absolute() else folder / entry
        if not path.is_file():
            raise FileNotFoundError(f"{img_list}, line {line_no}: no such image file {path}")
        paths.append(path)
        where.append(f"line {line_no}")
    if not paths:
        raise ValueError(f"{img_list} lists no image")
    check_unique([os.path.realpath(p) for p in paths], "image", str(img_list), lines=where)
    return paths


def _picture_name(path: Path, img_folder: PathLike) -> str:
    """A flat, safe overlay file stem for an image: its path under ``img_folder`` with the
    folder separators turned into ``__`` (the file's own name for other paths)."""
    try:
        rel = path.resolve().relative_to(Path(img_folder).resolve())
    except ValueError:
        rel = Path(path.name)
    parts = [safe_name_part(p, "image path part") for p in rel.with_suffix("").parts]
    return "__".join(parts)


def picture_names(paths: Sequence[Path], img_folder: PathLike) -> List[str]:
    """:func:`_picture_name` of each image, made distinct: images whose names would collide
    (``a.png`` and ``a.jpg``) keep their extension in the name (``a__png``, ``a__jpg``)."""
    names = [_picture_name(Path(p), img_folder) for p in paths]
    counts = Counter(names)
    out = [f"{n}__{safe_name_part(Path(p).suffix.lstrip('.'), 'image extension')}"
           if counts[n] > 1 and Path(p).suffix else n for n, p in zip(names, paths)]
    check_unique(out, "overlay name", str(img_folder))
    return out


def view_path(img_folder: PathLike, patient_id: str, side: str, view: str,
              img_extension: str = "png") -> Optional[Path]:
    """``{img_folder}/{patient}_{side}_{view}.{ext}``, or None (warned) when missing."""
    path = Path(img_folder) / f"{image_name(patient_id, side, view)}.{img_extension.lstrip('.')}"
    if path.is_file():
        return path
    logger.warning("missing view: %s", path)
    return None


# ------------------------------------------------------------------------------ models
def get_preprocess(net: str) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The ImageNet ``preprocess_input`` of backbone ``net`` (None for yaroslav).

    Raises:
        ValueError: unknown ``net`` (the message lists the valid keys).
    """
    from dm_resnet import get_preprocess_input   # the one table of backbones

    return get_preprocess_input(net)


def build_fprop_model(model: keras.Model, net: str, img_size: Sequence[int],
                      avg_pool_size: Sequence[int], hm_strides: Sequence[int]) -> keras.Model:
    """A model from whole images to per-location class probabilities (batch, r, c, classes).

    ``model`` with a 4-D output is returned as is; a whole-image model with ``hm_avg_pool``
    and ``hm_dense`` layers gets a softmax dense with ``hm_dense``'s weights on
    ``hm_avg_pool``; any other model is taken as a patch classifier and converted with
    ``dm_resnet.add_top_layers(..., return_heatmap=True)``.
    """
    import tf_keras as keras
    from dm_resnet import add_top_layers

    if len(model.output_shape) == 4:
        return model
    names = {lyr.name for lyr in model.layers}
    if {"hm_avg_pool", "hm_dense"} <= names:
        dense = model.get_layer("hm_dense")
        out = keras.layers.Dense(dense.units, activation="softmax", name="hm_softmax")(
            model.get_layer("hm_avg_pool").output)
        hm = keras.Model(model.inputs, out, name="heatmap")
        hm.get_layer("hm_softmax").set_weights(dense.get_weights())
        return hm
    return add_top_layers(model, tuple(img_size), patch_net=net, add_heatmap=True,
                          avg_pool_size=tuple(avg_pool_size), return_heatmap=True,
                          hm_strides=tuple(hm_strides))


def _recipe(opts: dict, channels: int = 1) -> dm_image.InputRecipe:
    """The ``dm_image.InputRecipe`` of the options (``opts["preprocess"]``, a function, is
    passed separately to the recipe's steps)."""
    return dm_image.InputRecipe.from_options(
        {k: v for k, v in opts.items() if k not in ("img_height", "preprocess")},
        channels=channels)


def _prep_input(img: np.ndarray, channels: int, opts: dict) -> np.ndarray:
    """(H, W) float32 -> (H, W, channels): the recipe's equalisation, channel copy and
    centring (or ``opts["preprocess"]``)."""
    recipe = _recipe(opts, channels)
    return recipe.to_input(recipe.equalize(img), opts["preprocess"])


def fprop_heatmap(hm_model: keras.Model, paths: List[Path], opts: dict, batch_size: int
                  ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Heatmaps of ``paths`` in batches of one forward pass each.

    Returns:
        (list of float32 (rows, cols, nb_class), list of the (H, W) images as read).
    """
    channels = hm_model.input_shape[-1]
    heatmaps, images = [], []
    for start in range(0, len(paths), batch_size):
        recipe = _recipe(opts, channels)
        imgs = [recipe.scale(recipe.read_stored(p)) for p in paths[start:start + batch_size]]
        x = np.stack([_prep_input(i, channels, opts) for i in imgs])
        pred = np.asarray(hm_model.predict_on_batch(x), dtype=np.float32)
        heatmaps += list(pred)
        images += imgs
    return heatmaps, images


def sweep_heatmap(model: keras.Model, path: Path, opts: dict, batch_size: int,
                  with_mask: bool = True) -> tuple:
    """Sweep heatmap of one image via ``dm_image.get_prob_heatmap``.

    Returns:
        (float32 (nb_row, nb_col, nb_class), the (H, W) image read, breast box (x, y, w, h)
        and bool (H, W) breast mask when ``with_mask``, else None and None).
    """
    read, error = _read_view(path, opts, 1, False, with_mask)
    if error is not None:
        raise error
    img, bbox, mask = read
    return _view_heatmap(model, img, opts, batch_size, False, 1), img, bbox, mask


# ------------------------------------------------------------------------------ pictures
def overlay_heatmap(img: np.ndarray, heatmap: np.ndarray, malignant_class: int,
                    bbox: Optional[Sequence[int]] = None, mask: Optional[np.ndarray] = None,
                    max_height: int = 1024,
                    alpha: float = 0.45, label: str = "",
                    roi_mask: Optional[np.ndarray] = None,
                    colour_bar: bool = True) -> np.ndarray:
    """The image in grey with one heatmap class blended in as a JET colour map.

    A colour bar on the right gives the probability scale (0 blue .. 1 red); a lesion mask
    (``roi_mask``) is outlined in white.

    Args:
        img: (H, W) image, any intensity scale (shown scaled by its max).
        heatmap: (rows, cols, nb_class) probabilities in 0..1.
        malignant_class: class index drawn.
        bbox: (x, y, w, h) region of ``img`` the heatmap covers (None: the whole image).
        mask: optional bool (H, W); colour only where True (the segmented breast).
        max_height: output height limit (the image is shrunk, never enlarged).
        alpha: weight of the colour map.
        label: text drawn in the top-left corner.
        roi_mask: optional (H, W) lesion mask (non-zero inside), outlined.
        colour_bar: add the probability colour bar.

    Returns:
        uint8 (h, w, 3) BGR picture (``w`` includes the colour bar).
    """
    if not -heatmap.shape[-1] <= malignant_class < heatmap.shape[-1]:
        raise ValueError(f"malignant_class {malignant_class} out of range for a heatmap with "
                         f"{heatmap.shape[-1]} classes")
    f = min(1.0, max_height / img.shape[0])
    size = (max(1, int(round(img.shape[1] * f))), max(1, int(round(img.shape[0] * f))))
    grey = cv2.resize(img.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    g_max = float(grey.max())
    grey8 = np.clip(grey * (255.0 / g_max if g_max > 0 else 0), 0, 255).astype(np.uint8)
    pic = cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR)
    x, y, w, h = bbox if bbox is not None else (0, 0, img.shape[1], img.shape[0])
    x0, y0 = int(round(x * f)), int(round(y * f))
    x1, y1 = min(size[0], int(round((x + w) * f))), min(size[1], int(round((y + h) * f)))
    if x1 > x0 and y1 > y0:
        prob = np.clip(heatmap[..., malignant_class], 0, 1)
        prob = cv2.resize(prob.astype(np.float32), (x1 - x0, y1 - y0),
                          interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap(np.round(prob * 255).astype(np.uint8), cv2.COLORMAP_JET)
        region = pic[y0:y1, x0:x1]
        blend = cv2.addWeighted(colour, alpha, region, 1 - alpha, 0)
        if mask is not None:
            small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            blend = np.where(small[y0:y1, x0:x1, None] > 0, blend, region)
        pic[y0:y1, x0:x1] = blend
    scale = float(np.clip(size[0] / 900, 0.25, 1.5))
    if roi_mask is not None:
        small = cv2.resize((np.asarray(roi_mask) > 0).astype(np.uint8), size,
                           interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(pic, contours, -1, (255, 255, 255), max(1, int(2 * scale)))
    if label:
        cv2.putText(pic, label, (8, int(30 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
    if colour_bar:
        pic = np.concatenate([pic, _colour_bar(size[1], scale)], axis=1)
    return pic


def _colour_bar(height: int, scale: float) -> np.ndarray:
    """A JET colour bar (1 at the top, 0 at the bottom) with 0 / 0.5 / 1 ticks, BGR uint8."""
    width = max(30, int(round(70 * scale)))
    bar_w = max(8, width // 3)
    pad = max(6, int(round(12 * scale)))
    inner = max(1, height - 2 * pad)
    levels = np.linspace(255, 0, inner).round().astype(np.uint8)[:, None]
    out = np.zeros((height, width, 3), np.uint8)
    out[pad:pad + inner, 2:2 + bar_w] = cv2.applyColorMap(
        np.repeat(levels, bar_w, axis=1), cv2.COLORMAP_JET)
    font = max(0.25, 0.45 * scale)
    for value in (0.0, 0.5, 1.0):
        y = pad + int(round((1 - value) * (inner - 1)))
        cv2.putText(out, f"{value:g}", (bar_w + 5, min(height - 2, y + int(5 * scale) + 2)),
                    cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), 1, cv2.LINE_AA)
    return out


#: Patch class names of the 2017 sets, by class count (``--class-list`` overrides them).
DEFAULT_CLASS_NAMES = {3: ("background", "malignant", "benign"),
                       5: ("background", "calc_mal", "calc_ben", "mass_mal", "mass_ben"),
                       2: ("neg", "pos")}


def class_name(index: int, nb_class: int, class_list: Optional[Sequence[str]] = None) -> str:
    """The name of class ``index``: from ``class_list``, else the 2017 sets', else ``class k``."""
    names = list(class_list) if class_list else DEFAULT_CLASS_NAMES.get(nb_class)
    if names is not None and len(names) == nb_class:
        return str(names[index])
    return f"class {index % nb_class}"


def find_roi_mask(roi_mask_dir: Optional[PathLike], stem: str, shape: Sequence[int]
                  ) -> Optional[np.ndarray]:
    """The union of the lesion masks of image ``stem`` in ``roi_mask_dir``, at ``shape``.

    A mask belongs to the image when its file name holds the image's name as a whole part:
    ``Mass-Training_P_00001_LEFT_CC_1.png`` for ``P_00001_LEFT_CC``, or ``scan1_mask.png`` /
    ``scan1.png`` for ``scan1``. None when the folder has none (or is not given).
    """
    if roi_mask_dir is None:
        return None
    import re

    pattern = re.compile(rf"(^|[_-]){re.escape(stem)}([_.])")
    union = None
    for path in sorted(Path(roi_mask_dir).iterdir()):
        if not path.is_file() or not pattern.search(path.name):
            continue
        try:
            m = dm_image.read_resize_img(path, target_size=tuple(shape), gs_255=True) >= 128
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable ROI mask %s: %s", path, exc)
            continue
        union = m if union is None else union | m
    return union


def _write_png(pic: np.ndarray, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    dm_image.write_png(path, pic)


# ------------------------------------------------------------------------------ files
def _check_out(path: PathLike) -> Path:
    path = Path(path)
    if path.suffix not in HEATMAP_SUFFIXES:
        raise ValueError(f"heatmap output should end in .pkl (2017 pickle) or .npz (no pickle), "
                         f"got {path}")
    return path


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


class _Pickler2017(pickle._Pickler):
    """Protocol-2 pickler that names numpy's array rebuilder ``numpy.core.multiarray`` (numpy
    2 names it ``numpy._core.multiarray``, which numpy 1.x, the 2017 stack, cannot import)."""

    def save_global(self, obj, name=None):
        if obj is _NP_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _save_pickle(records: List[Dict], path: Path):
    """The 2017 ``.pkl``: a list of ``{patient_id, side, cancer, cc, mlo}`` dicts."""
    recs = [{"patient_id": str(r["patient_id"]), "side": str(r["side"]),
             "cancer": int(r["cancer"]),
             "cc": None if r.get("cc") is None else np.asarray(r["cc"], dtype=np.float32),
             "mlo": None if r.get("mlo") is None else np.asarray(r["mlo"], dtype=np.float32)}
            for r in records]
    dm_image.atomic_write(path, lambda f: _Pickler2017(f, protocol=2).dump(recs))


def save_heatmaps(records: List[Dict], path: PathLike, meta: Optional[dict] = None) -> Path:
    """Write heatmap records (2017 dict shape) to ``.pkl`` or ``.npz`` (module docstring).

    ``meta`` goes into an ``.npz`` only (the 2017 pickle holds the list alone).
    """
    path = _check_out(path)
    if records and "image" in records[0]:
        return _save_image_heatmaps(records, path, meta)
    if path.suffix == ".pkl":
        _save_pickle(records, path)
        return path
    arrays = {"patient_id": np.array([str(r["patient_id"]) for r in records], dtype=str),
              "side": np.array([str(r["side"]) for r in records], dtype=str),
              "cancer": np.array([int(r["cancer"]) for r in records], dtype=np.int64),
              "meta": np.array(json.dumps(dict(meta or {}, format=HEATMAP_FORMAT),
                                          default=str))}
    for i, rec in enumerate(records):
        for view in ("cc", "mlo"):
            if rec.get(view) is not None:
                arrays[f"{view}_{i}"] = np.asarray(rec[view], dtype=np.float32)
    dm_image.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def _save_image_heatmaps(records: List[Dict], path: Path, meta: Optional[dict]) -> Path:
    """Records ``{image, heatmap}`` of ``--all-images`` / ``--img-list`` runs: a pickled list
    of those dicts (``.pkl``) or ``image`` names with ``hm_<i>`` arrays (``.npz``)."""
    recs = [{"image": str(r["image"]),
             "heatmap": None if r["heatmap"] is None else np.asarray(r["heatmap"], np.float32)}
            for r in records]
    if path.suffix == ".pkl":
        dm_image.atomic_write(path, lambda f: _Pickler2017(f, protocol=2).dump(recs))
        return path
    arrays = {"image": np.array([r["image"] for r in recs], dtype=str),
              "meta": np.array(json.dumps(dict(meta or {}, format=HEATMAP_FORMAT),
                                          default=str))}
    arrays.update({f"hm_{i}": r["heatmap"] for i, r in enumerate(recs)
                   if r["heatmap"] is not None})
    dm_image.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


class _HeatmapUnpickler(RestrictedUnpickler):
    """Restricted unpickler that also rebuilds numpy arrays (for 2017 heatmap pickles)."""

    ALLOWED = RestrictedUnpickler.ALLOWED | {
        ("numpy", "ndarray"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct")}
    WHAT = "containers, numpy arrays and scalars are allowed in a heatmap pickle"


def _require_keys(path, archive, keys):
    missing = [k for k in keys if k not in archive.files]
    if missing:
        raise ValueError(f"{path} is not a heatmap_score file: it lacks {missing} (holds "
                         f"{sorted(archive.files)[:10]})")


def load_heatmaps(path: PathLike, allow_pickle: bool = False,
                  return_meta: bool = False) -> Union[List[dict], Tuple[List[dict], dict]]:
    """Read heatmaps written by :func:`save_heatmaps` (or a 2017 pickle with allow_pickle).

    Args:
        path: ``.npz`` file; or a ``.pkl`` of the 2017 code when ``allow_pickle`` (read by an
            unpickler limited to containers and numpy arrays; Python 2 strings as latin-1).
        allow_pickle: permit reading a pickle.
        return_meta: also return the ``meta`` dict (empty for a pickle).

    Returns:
        list of ``{patient_id, side, cancer, cc, mlo}`` (``cc``/``mlo`` float32 arrays or None);
        with ``return_meta`` a tuple (list, meta).
    """
    path = Path(path)
    if path.suffix != ".npz":
        if not allow_pickle:
            raise ValueError(f"{path} is not an .npz heatmap file; reading a 2017 pickle needs "
                             f"allow_pickle=True (--allow-pickle)")
        recs = restricted_unpickle(path, _HeatmapUnpickler)
        if recs and isinstance(recs[0], dict) and "image" in recs[0]:
            out = [{"image": r["image"], "heatmap": r["heatmap"]} for r in recs]
        else:
            out = [{"patient_id": r["patient_id"], "side": r["side"], "cancer": r["cancer"],
                    "cc": r.get("cc"), "mlo": r.get("mlo")} for r in recs]
        return (out, {}) if return_meta else out
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz heatmap file ({err})") from err
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a heatmap_score file (one array, not an .npz archive)")
    with z:
        _require_keys(path, z, ["meta"])
        try:
            meta = json.loads(str(z["meta"]))
        except ValueError as err:
            raise ValueError(f"{path}: not a heatmap_score file (its meta is not JSON: "
                             f"{err})") from err
        if not isinstance(meta, dict) or meta.get("format") != HEATMAP_FORMAT:
            raise ValueError(f"{path} is not a heatmap_score file (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None})")
        _require_keys(path, z, ["image"] if "image" in z.files
                      else ["patient_id", "side", "cancer"])
        if "image" in z.files:
            out = [{"image": str(name), "heatmap": z[f"hm_{i}"] if f"hm_{i}" in z.files
                    else None} for i, name in enumerate(z["image"])]
            return (out, meta) if return_meta else out
        out = [{"patient_id": str(pid), "side": str(side), "cancer": int(c),
                "cc": z[f"cc_{i}"] if f"cc_{i}" in z.files else None,
                "mlo": z[f"mlo_{i}"] if f"mlo_{i}" in z.files else None}
               for i, (pid, side, c) in enumerate(zip(z["patient_id"], z["side"], z["cancer"]))]
    return (out, meta) if return_meta else out


# ------------------------------------------------------------------------------ run
def _read_view(path, opts, channels, fprop, with_mask):
    """The CPU part of one view, run ahead on a loader thread: ``((image, bbox, mask), None)``
    or ``(None, error)``. ``image`` is what the model part takes (fprop: scaled to the
    recipe; sweep: rescaled, the sweep scales each patch), ``bbox``/``mask`` the breast for
    the picture (only ``with_mask``)."""
    try:
        if fprop:
            recipe = _recipe(opts, channels)
            img = recipe.scale(recipe.read_stored(path, scorable=True))
            mask = None
            if with_mask:   # for the picture only: colour the breast, not the background
                try:
                    mask = dm_image.segment_breast(img, crop=False)[0] > 0
                except ValueError:
                    pass
            return (img, None, mask), None
        recipe = dm_image.InputRecipe.from_options(
            {k: opts[k] for k in ("img_height", "rescale_factor")})
        img = recipe.rescale(recipe.read_stored(path, scorable=True))  # img_scale: per patch
        bbox = mask = None
        if with_mask:
            masked, bbox = dm_image.segment_breast(img, crop=False)
            mask = masked > 0
        return (img, bbox, mask), None
    except (OSError, ValueError, cv2.error) as exc:
        return None, exc


def _view_heatmap(model, img, opts, batch_size, fprop, channels):
    """The model part of one view: float32 (rows, cols, nb_class)."""
    if fprop:
        x = _prep_input(img, channels, opts)[None]
        return np.asarray(model.predict_on_batch(x), dtype=np.float32)[0]
    return dm_image.get_prob_heatmap(
        img, None, opts["img_scale"], opts["patch_size"], opts["stride"], model, batch_size,
        featurewise_center=opts["featurewise_center"],
        featurewise_mean=opts["featurewise_mean"], preprocess=opts["preprocess"],
        equalize_hist=opts["equalize_hist"])


def _score_views(model, views, opts, batch_size, fprop, png, summary, verbose):
    """Heatmaps of ``views`` (``(name, path)``, path None when missing), in order.

    While the model scores one view, the next ones are read, scaled and segmented on loader
    threads (``prefetch.prefetch_map``, a bounded read-ahead), so decoding does not wait for
    the model. A missing or unreadable view, or one that cannot give a heatmap (non-finite
    pixels, a constant image, one under ``dm_image.MIN_IMAGE_SIDE`` pixels a side), gets None,
    a warning, and is counted in
    ``summary``; with ``png["dir"]`` each heatmap's overlay is written.

    Returns:
        list of float32 heatmaps or None, one per view.
    """
    from prefetch import default_workers, prefetch_map

    channels = int(model.input_shape[-1])
    with_mask = bool(png["dir"])
    workers = default_workers()
    loaded = prefetch_map(
        lambda view: (None, None) if view[1] is None else
        _read_view(view[1], opts, channels, fprop, with_mask),
        views, ahead=2 * max(1, workers), workers=workers)
    out = []
    with dm_image.progress(len(views), "heatmaps", unit="img", verbose=verbose) as bar:
        for (name, path), (read, error) in zip(views, loaded):
            bar.update()
            out.append(None)
            if path is None:
                summary["missing"].append(name)
                continue
            if error is None:
                img, bbox, mask = read
                try:
                    heatmap = _view_heatmap(model, img, opts, batch_size, fprop, channels)
                except (OSError, ValueError) as exc:
                    error = exc
            if error is not None:
                logger.warning("no heatmap for %s: %s", path, error)
                summary["failed"].append((str(path), " ".join(str(error).split())))
                continue
            out[-1] = heatmap
            summary["n_heatmaps"] += 1
            if png["dir"]:
                _draw(png, name, heatmap, img, bbox, mask)
                summary["pngs"] += 1
    loaded.close()
    return out


def _draw(png, name, heatmap, img, bbox, mask):
    """Write the overlay ``{name}_heatmap.png`` of one image into ``png["dir"]``."""
    k = png["class"]
    title = class_name(k, heatmap.shape[-1], png.get("class_list"))
    label = f"{name}  P({title}) max {heatmap[..., k].max():.2f}"
    roi = find_roi_mask(png.get("roi_mask_dir"), name, img.shape[:2])
    pic = overlay_heatmap(img, heatmap, k, bbox, mask, png["height"], label=label, roi_mask=roi)
    path = Path(png["dir"]) / f"{name}_heatmap.png"
    _write_png(pic, path)
    png.setdefault("written", set()).add(path.name)


def _remove_stale_pictures(manifest: "run_files.OutputManifest", written: set) -> None:
    """Record the overlays this run drew in ``--png-dir``'s manifest and remove those an
    earlier run drew (its manifest) that this run did not, so the folder shows one run's
    pictures only; ``*_heatmap.png`` files no manifest names are kept."""
    for name in sorted(written):
        manifest.add(manifest.folder / name)
    for path in manifest.finish():
        logger.info("removed %s of an earlier run (this run does not draw it)", path)


@dataclass(frozen=True)
class _Inputs:
    """What a run scores: ``paths`` (``--all-images`` / ``--img-list``) or the (patient, side)
    rows ``recs`` of ``--pat-csv``; ``planned``: the overlay name of every view."""
    any_images: bool
    planned: List[str]
    paths: Optional[List[Path]] = None
    recs: Optional[pd.DataFrame] = None


def _claim_paths(opts: run_options.RunOptions, inputs: _Inputs
                 ) -> Optional[run_files.OutputManifest]:
    """Refuse outputs that overlap the inputs; returns the ``--png-dir`` manifest (or None)
    after refusing overlays of the same name that no manifest names (unless ``--overwrite``)."""
    run_files.check_run_paths(
        input_files={"DL_STATE": opts.dl_state,
                     "--pat-csv": None if inputs.any_images else opts.pat_csv,
                     "--pat-list": opts.pat_list, "--img-list": opts.img_list},
        input_dirs={"IMG_FOLDER": opts.img_folder, "--roi-mask-dir": opts.roi_mask_dir},
        output_files={"--out": opts.out}, output_dirs={"--png-dir": opts.png_dir})
    if not opts.png_dir:
        return None
    manifest = run_files.OutputManifest(opts.png_dir, "heatmap_score")
    manifest.check_foreign([Path(opts.png_dir, f"{n}_heatmap.png") for n in inputs.planned],
                           opts.overwrite)
    return manifest


def _check_numbers(values: dict, featurewise_mean: float) -> None:
    """Refuse non-finite or non-positive sizes, strides and scales before any work."""
    for name, value in values.items():
        if value is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if not np.isfinite(float(v)) or float(v) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} should be finite and > 0, "
                                 f"got {value}")
    if not np.isfinite(float(featurewise_mean)):
        raise ValueError(f"--featurewise-mean should be a finite number, got {featurewise_mean}")


def run(img_folder: PathLike, dl_state: PathLike, pat_csv: Optional[PathLike] = None,
        **options: Any) -> dict:
    """Compute heatmaps for every (patient, side) and write them (and optional PNGs).

    The keyword form for Python callers: the options are resolved against the parser and
    handed, as one :func:`options_class` object, to :func:`score_heatmaps`.

    Args:
        img_folder: IMG_FOLDER, the folder of the mammograms.
        dl_state: DL_STATE, the patch classifier (or whole-image heatmap model in fprop mode).
        pat_csv: ``--pat-csv``; None: the flag's default.
        **options: the other options by destination name (``--help``; e.g. ``out``,
            ``fprop_mode``, ``img_size``); missing ones take the parser's defaults. Two are
            not flags: ``custom_objects`` and ``given_options`` (see :func:`score_heatmaps`).

    Returns:
        The summary of :func:`score_heatmaps`.

    Raises:
        ValueError: an unknown option (the message lists the valid ones), and those of
            :func:`score_heatmaps`.
    """
    if pat_csv is not None:
        options["pat_csv"] = pat_csv
    return run_options.keyword_run(score_heatmaps, options_class(), get_args_parser(),
                                   (img_folder, dl_state), options)


def score_heatmaps(opts: run_options.RunOptions, *, custom_objects: Optional[dict] = None,
                   given_options: Optional[Sequence[str]] = None) -> dict:
    """Compute heatmaps for every (patient, side) (or image) and write them (and PNGs).

    Args:
        opts: an :func:`options_class` object (the fields are the flags: see the module
            docstring and ``--help``). ``dl_state`` is loaded with
            ``dm_keras_ext.robust_load_model`` (a file with code in it, such as a Lambda
            layer, is refused unless ``trust_model_file``). With ``all_images`` (every image
            under ``img_folder``) or ``img_list`` (one path per line), any images are scored,
            one record ``{image, heatmap}`` each, and ``pat_csv`` is not read. ``out`` and
            ``png_dir`` must not overlap the inputs; an overlay named like one of this run's
            that no manifest of ``png_dir`` names stops the run unless ``overwrite``.
        custom_objects: passed to the model loader.
        given_options: the options set explicitly (the command line's); the intensity options
            not among them (``img_scale``, ``rescale_factor``, ``equalize_hist``,
            ``featurewise_center``, ``featurewise_mean``, ``net`` when the recipe names a
            backbone, and in sweep mode ``patch_size`` from a square recipe size) come from
            ``dl_state``'s input recipe when it has one (``dm_image.InputRecipe``). None:
            those whose value differs from the parser's default count as given.

    Returns:
        Summary dict: ``out``, ``n_records``, ``n_heatmaps``, ``missing`` (paths),
        ``failed`` ((path, reason)), ``pngs``, ``elapsed_s``.

    Raises:
        ValueError: a bad option value, a bad row, or no heatmap at all (no image found or
            none readable); nothing is written then.
    """
    t0 = time.time()
    opts = _with_recipe(opts, given_options)
    _check_options(opts)
    inputs = _plan_inputs(opts)
    manifest = _claim_paths(opts, inputs)
    model = _load_model(opts, custom_objects)
    view_opts = _view_options(opts)
    logger.info("options: %s", json.dumps(dict(opts), default=str, sort_keys=True))
    summary = {"missing": [], "failed": [], "pngs": 0, "n_heatmaps": 0}
    if manifest is not None:
        manifest.begin([Path(opts.png_dir, f"{n}_heatmap.png") for n in inputs.planned])
    run_files.clean_leftovers(Path(opts.out).absolute().parent)
    png = {"dir": opts.png_dir, "class": opts.malignant_class, "height": opts.png_height,
           "class_list": opts.class_list, "roi_mask_dir": opts.roi_mask_dir}
    records = _score_records(model, inputs, view_opts, opts, png, summary)
    if summary["n_heatmaps"] == 0:
        raise ValueError(f"no heatmap computed: {len(summary['missing'])} view(s) missing and "
                         f"{len(summary['failed'])} unreadable under {opts.img_folder}"
                         + (f" (e.g. {summary['missing'][0]})" if summary["missing"] else "")
                         + (f" (e.g. {summary['failed'][0][0]}: {summary['failed'][0][1]})"
                            if summary["failed"] else "") + "; nothing written")
    meta = {"mode": "fprop" if opts.fprop_mode else "sweep", "dl_state": str(opts.dl_state),
            "malignant_class": opts.malignant_class, "nb_class": int(model.output_shape[-1]),
            "options": {k: v for k, v in view_opts.items() if k != "preprocess"}}
    summary["out"] = str(save_heatmaps(records, opts.out, meta))
    if opts.png_dir:
        _remove_stale_pictures(manifest, png.get("written", set()))
    summary["n_records"] = len(records)
    summary["elapsed_s"] = round(time.time() - t0, 2)
    logger.info("%d heatmaps for %d breasts in %.1f s -> %s; %d views missing, %d failed, "
                "%d PNGs", summary["n_heatmaps"], len(records), summary["elapsed_s"],
                summary["out"], len(summary["missing"]), len(summary["failed"]),
                summary["pngs"])
    return summary


#: The options a model file's input recipe may supply (see :func:`score_heatmaps`).
_RECIPE_KEYS = ("img_scale", "rescale_factor", "equalize_hist", "featurewise_center",
                "featurewise_mean", "net", "patch_size")


def _with_recipe(opts: run_options.RunOptions, given: Optional[Sequence[str]]
                 ) -> run_options.RunOptions:
    """``opts`` with the intensity options not in ``given`` taken from ``dl_state``'s input
    recipe (``script_utils.apply_model_recipe``; ``given`` None: those that differ from the
    parser's defaults count as given)."""
    names = dict(RECIPE_OPTIONS)
    del names["img_size"]   # a whole-image size is not a patch classifier's
    names["net"] = lambda r: r.preprocess
    if not opts.fprop_mode:
        names["patch_size"] = lambda r: r.img_size[0] if r.img_size and \
            r.img_size[0] == r.img_size[1] else None
    prep, _ = apply_model_recipe({k: opts[k] for k in _RECIPE_KEYS}, opts.dl_state,
                                 None if given is None else set(given), names,
                                 dict(options_class()()))
    return opts.replace(**{k: prep[k] for k in _RECIPE_KEYS})


def _check_options(opts: run_options.RunOptions) -> None:
    """Refuse a bad ``net``, ``out``, number, ``class_list`` or ``img_extension`` (a value
    that cannot end a file name, such as ``png/../x``) before anything is read."""
    get_preprocess(opts.net)   # validates net before anything is read
    _check_out(opts.out)
    _check_numbers({k: opts[k] for k in ("batch_size", "patch_size", "stride", "png_height",
                                         "img_height", "img_scale", "rescale_factor",
                                         "img_size", "avg_pool_size", "hm_strides")},
                   opts.featurewise_mean)
    if opts.class_list is not None:
        check_unique(list(opts.class_list), "class name", "--class-list")
    safe_name_part(str(opts.img_extension).lstrip("."), "--img-extension")


def _plan_inputs(opts: run_options.RunOptions) -> _Inputs:
    """The images (``--all-images`` / ``--img-list``) or the (patient, side) rows of
    ``--pat-csv`` to score, and the overlay name of each view."""
    if opts.all_images or opts.img_list is not None:
        paths = list_any_images(opts.img_folder, opts.img_list)
        return _Inputs(True, picture_names(paths, opts.img_folder), paths=paths)
    if not Path(opts.pat_csv).is_file():
        raise ValueError(f"--pat-csv {opts.pat_csv}: no such file; give --pat-csv FILE "
                         f"(columns patient_id,side,cancer or malignant), or score images "
                         f"without one with --all-images or --img-list FILE")
    recs = read_patient_sides(opts.pat_csv, opts.pat_list)
    planned = [image_name(r.patient_id, r.side, v) for r in recs.itertuples(index=False)
               for v in VIEWS]
    return _Inputs(False, planned, recs=recs)


def _load_model(opts: run_options.RunOptions, custom_objects: Optional[dict]) -> keras.Model:
    """``dl_state``, checked for its role (and converted in fprop mode), its class count
    checked against ``malignant_class`` and ``class_list``."""
    from dm_keras_ext import check_model_role, robust_load_model

    model = robust_load_model(opts.dl_state, custom_objects=custom_objects,
                              safe_mode=not opts.trust_model_file)
    check_model_role(model, opts.dl_state, ("patch", "heatmap", "whole-image+heatmap")
                     if opts.fprop_mode else ("patch",), "DL_STATE")
    if opts.fprop_mode:
        model = build_fprop_model(model, opts.net, opts.img_size, opts.avg_pool_size,
                                  opts.hm_strides)
    nb_class = int(model.output_shape[-1])
    if not -nb_class <= opts.malignant_class < nb_class:
        raise ValueError(f"malignant_class {opts.malignant_class} out of range for {nb_class} "
                         f"classes of {opts.dl_state}")
    if opts.class_list is not None and len(opts.class_list) != nb_class:
        raise ValueError(f"--class-list names {len(opts.class_list)} classes "
                         f"({list(opts.class_list)}) but {opts.dl_state} outputs {nb_class}")
    return model


def _view_options(opts: run_options.RunOptions) -> dict:
    """The reading and input options of :func:`fprop_heatmap` / :func:`sweep_heatmap`."""
    return dict(img_height=opts.img_height, img_size=tuple(opts.img_size),
                img_scale=opts.img_scale, rescale_factor=opts.rescale_factor,
                equalize_hist=opts.equalize_hist, featurewise_center=opts.featurewise_center,
                featurewise_mean=opts.featurewise_mean,
                preprocess=None if opts.featurewise_center else get_preprocess(opts.net),
                patch_size=opts.patch_size, stride=opts.stride)


def _score_records(model: keras.Model, inputs: _Inputs, view_opts: dict,
                   opts: run_options.RunOptions, png: dict, summary: dict) -> List[dict]:
    """The output records: ``{image, heatmap}`` per image, or ``{patient_id, side, cancer,
    cc, mlo}`` per (patient, side) (``None`` for a missing or failed view)."""
    def score(views):
        return _score_views(model, views, view_opts, opts.batch_size, opts.fprop_mode, png,
                            summary, opts.verbose)

    if inputs.any_images:
        heatmaps = score(list(zip(inputs.planned, inputs.paths)))
        return [{"image": str(p), "heatmap": h} for p, h in zip(inputs.paths, heatmaps)]
    rows = list(inputs.recs.itertuples(index=False))
    heatmaps = iter(score([(image_name(r.patient_id, r.side, v),
                            view_path(opts.img_folder, r.patient_id, r.side, v,
                                      opts.img_extension))
                           for r in rows for v in VIEWS]))
    return [{"patient_id": r.patient_id, "side": r.side, "cancer": int(r.cancer),
             **{v.lower(): next(heatmaps) for v in VIEWS}} for r in rows]


_INT_HELP = {
    "batch_size": "patches (sweep mode) or images (fprop mode) per forward pass",
    "patch_size": "side of the square patches the sweep cuts, in pixels" + RECIPE_NOTE
                  + " (when square)",
    "stride": "sweep mode: pixels between neighbouring patch centres",
    "malignant_class": "class index drawn in the overlay PNGs (negative counts from the end)",
    "avg_pool_size": "fprop mode: average pooling window (rows cols) over the feature map, "
                     "the patch size in feature-map cells",
    "hm_strides": "fprop mode: strides (rows cols) of that average pooling",
}

# ------------------------------------------------------------------------------ command line
def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the 2017 flags (and the new ones): the one declaration of each option's
    type, default and help (:func:`options_class` and :func:`run` take them from here)."""
    parser = argparse.ArgumentParser(description="Patch-class heatmaps of mammograms.")
    parser.add_argument("img_folder", metavar="IMG_FOLDER",
                        help="folder of the mammograms ({patient}_{side}_{view}.png)")
    parser.add_argument("dl_state", metavar="DL_STATE",
                        help="patch classifier (.h5; a whole-image heatmap model with "
                             "--fprop-mode)")
    parser.add_argument("--pat-csv", default="./full_img/pat.csv",
                        help="CSV of the breasts to score: patient_id,side,cancer (or "
                             "malignant for cancer); not read with --all-images or --img-list "
                             "(default: %(default)s)")
    parser.add_argument("--pat-list", default=None,
                        help="patient IDs, one a line (default: all of --pat-csv; "
                             "--no-pat-list sets that)")
    parser.add_argument("--no-pat-list", dest="pat_list", action="store_const", const=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default="./output/prob_heatmap.pkl",
                        help="output file: .pkl writes the 2017 pickle, .npz a pickle-free "
                             "archive (default: %(default)s)")
    parser.add_argument("--png-dir", default=None,
                        help="write overlay PNGs here (outside IMG_FOLDER); overlays an "
                             "earlier run drew there (listed in its .ddsm_outputs.json) that "
                             "this run does not draw are removed, other files are kept "
                             "(default: none)")
    run_files.add_overwrite_flag(parser, "--png-dir")
    parser.add_argument("--png-height", type=int, default=1024,
                        help="max height of the PNGs (default: %(default)s)")
    add_bool_flag(parser, "fprop-mode", False, "one fully convolutional pass")
    parser.add_argument("--img-height", "-ih", dest="img_height", type=int,
                        default=None,
                        help="sweep mode: resize to this height, aspect kept (default: "
                             "%(default)s = stored size; --no-img-height sets that)")
    parser.add_argument("--no-img-height", dest="img_height", action="store_const", const=None,
                        help=argparse.SUPPRESS)
    add_image_flags(parser, img_size=(1152, 896), featurewise_mean=71.8, equalize_hist=False,
                    featurewise_center=False, img_scale=None, rescale_factor=None,
                    from_recipe=("img_scale", "rescale_factor", "equalize_hist",
                                 "featurewise_center", "featurewise_mean"))
    parser.add_argument("--net", default="vgg19", choices=backbone_names(), metavar="NET",
                        help="backbone of the patch classifier, whose preprocess_input applies "
                             "without --featurewise-center (and whose cut point fprop mode "
                             "uses): %(choices)s" + RECIPE_NOTE + " (default: %(default)s)")
    for name, type_, default in (("batch_size", cf.positive_int, 128),
                                 ("patch_size", cf.positive_int, 256),
                                 ("stride", cf.positive_int, 8), ("malignant_class", int, 1)):
        parser.add_argument("--" + name.replace("_", "-"), type=type_, default=default,
                            help=_INT_HELP[name] + " (default: %(default)s)")
    for name, default in (("avg_pool_size", [7, 7]), ("hm_strides", [1, 1])):
        parser.add_argument("--" + name.replace("_", "-"), type=cf.positive_int, nargs=2,
                            default=default,
                            help=_INT_HELP[name] + " (default: %(default)s)")
    parser.add_argument("--img-extension", default="png",
                        help="extension of the {patient}_{side}_{view} files "
                             "(default: %(default)s)")
    anyimg = parser.add_argument_group("any images (instead of --pat-csv)")
    add_bool_flag(anyimg, "all-images", False,
                  "score every image file under IMG_FOLDER (recursively), one heatmap each")
    anyimg.add_argument("--img-list", default=None, metavar="FILE",
                        help="score the images listed in FILE, one path a line (relative "
                             "to IMG_FOLDER) (default: none)")
    pics = parser.add_argument_group("overlay pictures (with --png-dir)")
    pics.add_argument("--class-list", nargs="+", default=None, metavar="NAME",
                      action=script_utils.UniqueValuesAction,
                      help="names of the model's classes, for the pictures (default: the 2017 "
                           "3- or 5-class patch sets by class count)")
    pics.add_argument("--roi-mask-dir", default=None, metavar="DIR",
                      help="outline the lesion masks found here (file names holding the "
                           "image's name, e.g. Mass-Training_P_00001_LEFT_CC_1.png) "
                           "(default: none)")
    add_model_reading_flags(parser, True)
    return parser


options_class = run_options.tool_options_class(get_args_parser, "HeatmapOptions")


main = script_utils.tool_main(get_args_parser, run, pass_given=True)


if __name__ == "__main__":
    main()
