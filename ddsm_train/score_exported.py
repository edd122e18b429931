"""Score mammograms with an exported model (``export_model.py``): onnxruntime, no TensorFlow.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427. Needs NumPy, OpenCV and onnxruntime (pydicom for
DICOM files; pandas only for an image list with a header line); it never imports TensorFlow.
The images are read as ``image_clf_predict.py`` reads them (``image_inputs.load_pred_image``:
16-bit and 8-bit PNG, JPEG, DICOM; OpenCV cubic resize in the stored levels, pixel scale,
histogram equalisation, channel copies, featurewise mean) with the settings of the export's
``recipe.json``, and with its ``flips`` (or ``--flips`` / ``--no-flips``) each image's
probabilities are averaged over the image as is, flipped left-right, up-down and both, so the
scores equal the prediction tool's.

Inputs (exactly one kind, as ``image_clf_predict.py``): ``--img-dir`` with class subfolders
(``--class-list``; label 1 for the last) or without (unlabelled); ``--img-list``; or
``--exam-list data.pkl|data.json`` with ``--img-dir``.

Outputs in ``--out-dir`` (outside the input folders and the export folder):

* ``image_predictions.csv``: ``image_index,malignant_pred,malignant_label`` (the mammography
  meta-repository's form; the label is empty when unknown; an image that could not be read
  or scored has an empty score);
* ``breast_predictions.csv`` (exam lists): ``index,left_malignant,right_malignant``, the
  mean score of the scored views of each breast;
* ``score_summary.json``: counts, the images skipped and why, the recipe and flips used,
  start-up and per-image times.

Example (from inside ``ddsm_train/``)::

    python score_exported.py exported --img-dir test --out-dir exported_scores
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import script_utils  # first: puts the root dm_* modules on sys.path

import numpy as np  # noqa: E402

import common_flags as cf  # noqa: E402
import dm_image  # noqa: E402
import run_files  # noqa: E402
from common_flags import add_image_source_flags, add_progress_flag  # noqa: E402
from image_inputs import (IMAGE_EXTENSIONS, READ_ERRORS, ImageItem,  # noqa: E402
                          collect_items, describe_error, load_pred_image)

__all__ = ["OUTPUT_NAMES", "ExportedModel", "load_export", "score_batch", "score_images",
           "run", "get_args_parser", "main"]

logger = logging.getLogger(__name__)

RECIPE_FORMAT = "ddsm-exported-model"   # export_model.RECIPE_FORMAT (which imports more)
OUTPUT_NAMES = ("image_predictions.csv", "breast_predictions.csv", "score_summary.json")


class ExportedModel:
    """An export folder: its ``recipe.json`` and an onnxruntime session of ``model.onnx``.

    Raises:
        ValueError: the folder has no ``recipe.json`` of an export, or no ``model.onnx``.
    """

    def __init__(self, folder: os.PathLike | str):
        self.folder = Path(folder)
        self.recipe = _read_recipe(self.folder)
        self.onnx_path = self.folder / "model.onnx"
        if not self.onnx_path.is_file():
            raise ValueError(f"{self.folder} holds no model.onnx (the export could not "
                             f"convert the model; its model_card.md says why)")
        import onnxruntime as ort

        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(self.onnx_path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.nb_class = int(self.recipe["nb_class"])

    def read_options(self) -> dict:
        """The ``load_pred_image`` arguments of the recipe (the model input before it)."""
        r = self.recipe
        centre = bool(r["featurewise_center"])
        return dict(img_size=tuple(r["img_size"]), img_scale=r["img_scale"],
                    rescale_factor=r["rescale_factor"], equalize_hist=r["equalize_hist"],
                    featurewise_center=centre, featurewise_mean=r["featurewise_mean"],
                    channels=int(r["channels"]), preprocess=None)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float64 (n, nb_class) probabilities of a float32 (n, H, W, C) batch."""
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out[0], dtype=np.float64)


def _read_recipe(folder: Path) -> dict:
    path = folder / "recipe.json"
    if not folder.is_dir():
        raise ValueError(f"export folder {folder} not found")
    if not path.is_file():
        raise ValueError(f"{folder} holds no recipe.json: not a folder written by "
                         f"export_model.py")
    try:
        recipe = json.loads(script_utils.read_text_file(path))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise ValueError(f"{path}: not the recipe of an exported model (format "
                         f"{RECIPE_FORMAT!r} expected)")
    if recipe.get("preprocess") and not recipe.get("featurewise_center") \
            and not recipe.get("preprocess_in_model"):
        raise ValueError(f"{path}: the model needs backbone preprocessing "
                         f"{recipe['preprocess']!r} that the export does not hold")
    return recipe


def load_export(folder: os.PathLike | str) -> ExportedModel:
    """The :class:`ExportedModel` of an export folder."""
    return ExportedModel(folder)


def score_batch(model: ExportedModel, x: np.ndarray, flips: bool) -> np.ndarray:
    """Probabilities of a batch, averaged over the 4 flips (as is, left-right, up-down,
    both; one call of 4n images, as ``training_runs.predict_flip_mean``) with ``flips``."""
    if not flips:
        return model.predict(x)
    views = np.concatenate([x, x[:, :, ::-1], x[:, ::-1, :], x[:, ::-1, ::-1]], axis=0)
    pred = model.predict(views)
    return pred.reshape((4, len(x)) + pred.shape[1:]).mean(axis=0)


def _read(item: ImageItem, read_opts: dict) -> Tuple[Optional[np.ndarray], str]:
    try:
        return load_pred_image(item.path, **read_opts), ""
    except READ_ERRORS as exc:
        return None, describe_error(exc)


def score_images(model: ExportedModel, items: List[ImageItem], flips: bool, batch_size: int,
                 verbose: bool = False) -> Tuple[np.ndarray, List[str]]:
    """Score every item: (float64 (n, nb_class) with NaN rows for the images skipped, the
    reason for each skipped image or '')."""
    probs = np.full((len(items), model.nb_class), np.nan)
    errors = [""] * len(items)
    read_opts = model.read_options()
    bar = dm_image.progress(len(items), "scoring", unit="img", verbose=verbose)
    for start in range(0, len(items), batch_size):
        idx = range(start, min(start + batch_size, len(items)))
        good, xs = [], []
        for i in idx:
            x, errors[i] = _read(items[i], read_opts)
            if x is not None:
                good.append(i)
                xs.append(x)
        if good:
            probs[good] = score_batch(model, np.stack(xs), flips)
        for i in idx:
            if not errors[i] and not np.isfinite(probs[i]).all():
                errors[i], probs[i] = "the model's output is not finite", np.nan
            if errors[i]:
                logger.warning("skipping %s: %s", items[i].path, errors[i])
        bar.update(len(idx))
    bar.close()
    return probs, errors


# ------------------------------------------------------------------------------ outputs
def _fmt(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.8g}"


def _write(path: Path, text: str, manifest) -> str:
    dm_image.atomic_write(path, lambda fh: fh.write(text), text=True)
    manifest.add(path)
    return str(path)


def _breast_rows(exams: List[dict], items: List[ImageItem], scores: np.ndarray) -> List[list]:
    rows = []
    for k in range(len(exams)):
        row = [k]
        for side in ("L", "R"):
            vals = [s for it, s in zip(items, scores)
                    if it.exam == k and it.view.startswith(side) and np.isfinite(s)]
            row.append(_fmt(float(np.mean(vals))) if vals else "")
        rows.append(row)
    return rows


def write_tables(items, exams, scores, out: Path, manifest) -> dict:
    """``image_predictions.csv`` and, for exam lists, ``breast_predictions.csv``."""
    rows = [[it.image_index, _fmt(s), "" if it.label is None else int(it.label)]
            for it, s in zip(items, scores)]
    paths = {"image_csv": _write(out / "image_predictions.csv", script_utils.csv_text(
        ["image_index", "malignant_pred", "malignant_label"], rows), manifest)}
    if exams is not None:
        paths["breast_csv"] = _write(out / "breast_predictions.csv", script_utils.csv_text(
            ["index", "left_malignant", "right_malignant"],
            _breast_rows(exams, items, scores)), manifest)
    return paths


# ------------------------------------------------------------------------------ run
def _claim(export_dir, img_dir, img_list, exam_list, out_dir, overwrite):
    run_files.check_run_paths(
        input_files={"--img-list": img_list, "--exam-list": exam_list},
        input_dirs={"--img-dir": img_dir, "DIR": export_dir},
        output_dirs={"--out-dir": out_dir})
    manifest = run_files.OutputManifest(out_dir, "score_exported")
    manifest.check_foreign([Path(out_dir, n) for n in OUTPUT_NAMES], overwrite)
    return manifest


def _malignant_class(opts: dict, model: ExportedModel) -> int:
    k = model.recipe.get("malignant_class", -1) if opts["malignant_class"] is None \
        else opts["malignant_class"]
    if not -model.nb_class <= k < model.nb_class:
        raise ValueError(f"--malignant-class {k} out of range for {model.nb_class} classes")
    if len(opts["class_list"]) != model.nb_class:
        raise ValueError(f"--class-list names {len(opts['class_list'])} classes "
                         f"({list(opts['class_list'])}) but the model outputs "
                         f"{model.nb_class}: give the classes it was trained with, in order")
    return k


def score(opts: dict) -> dict:
    """Score the images of ``opts`` with the export ``opts["export_dir"]`` and write the
    tables (see the module docstring).

    Returns:
        Summary: counts, output paths, ``errors`` (``(image_index, reason)``), ``flips``,
        ``startup_s`` (loading the model) and ``per_image_s``.

    Raises:
        ValueError: not an export folder, bad options, an output folder that overlaps an input
            (``run_files.RunPathError``), no image could be scored (nothing written then).
        FileExistsError: files named like the outputs that this tool did not write, without
            ``overwrite``.
    """
    t0 = time.time()
    if opts["batch_size"] < 1:
        raise ValueError(f"--batch-size should be >= 1, got {opts['batch_size']}")
    out = Path(opts["out_dir"])
    manifest = _claim(opts["export_dir"], opts["img_dir"], opts["img_list"], opts["exam_list"],
                      out, opts["overwrite"])
    items, exams = collect_items(opts["img_dir"], opts["img_list"], opts["exam_list"],
                                 opts["class_list"])
    if not items:
        raise ValueError(f"no image found (img_dir={opts['img_dir']}, img_list="
                         f"{opts['img_list']}, exam_list={opts['exam_list']}; extensions "
                         f"{IMAGE_EXTENSIONS})")
    model = load_export(opts["export_dir"])
    k = _malignant_class(opts, model)
    flips = bool(model.recipe.get("flips")) if opts["flips"] is None else opts["flips"]
    startup = time.time() - t0
    t1 = time.time()
    probs, errors = score_images(model, items, flips, opts["batch_size"], opts["verbose"])
    if not np.isfinite(probs).all(axis=1).any():
        raise ValueError(f"none of the {len(items)} images could be scored (e.g. "
                         f"{items[0].path}: {errors[0]}); nothing written")
    per_image = (time.time() - t1) / len(items)
    out.mkdir(parents=True, exist_ok=True)
    manifest.begin([out / n for n in OUTPUT_NAMES])
    summary = {"n_images": len(items), "n_scored": int(np.isfinite(probs[:, 0]).sum()),
               "errors": [(it.image_index, e) for it, e in zip(items, errors) if e],
               "flips": flips, "export_dir": str(opts["export_dir"]),
               "recipe": model.recipe, "startup_s": round(startup, 3),
               "per_image_s": round(per_image, 4)}
    summary["n_errors"] = len(summary["errors"])
    summary.update(write_tables(items, exams, probs[:, k], out, manifest))
    summary["summary_json"] = _write(out / "score_summary.json",
                                     json.dumps(summary, indent=1, default=str) + "\n",
                                     manifest)
    manifest.finish()
    logger.info("scored %d of %d images (%d skipped) in %.1f s; outputs in %s",
                summary["n_scored"], len(items), summary["n_errors"], time.time() - t0, out)
    return summary


def run(export_dir: os.PathLike | str, **options: Any) -> dict:
    """Score images with an exported model: the keyword form for Python callers.

    Args:
        export_dir: the folder ``export_model.py`` wrote.
        **options: the other options by destination name (``--help``: ``img_dir``,
            ``img_list``, ``exam_list``, ``out_dir``, ``flips``, ...).

    Returns:
        The summary of :func:`score`.
    """
    return score(script_utils.resolve_options(get_args_parser(), (export_dir,), options))


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the command-line flags (the one place their defaults live)."""
    parser = argparse.ArgumentParser(description="Score mammograms with an exported model "
                                                 "(onnxruntime, no TensorFlow).")
    parser.add_argument("export_dir", metavar="DIR", help="folder written by export_model.py")
    add_image_source_flags(parser, None, "the recipe's, the last")
    g = parser.add_argument_group("scoring")
    g.add_argument("--flips", action=argparse.BooleanOptionalAction, default=None,
                   help="average over the 4 flips (default: as the export's recipe.json says)")
    g.add_argument("--batch-size", type=cf.positive_int, default=4,
                   help="images per onnxruntime call (x4 with flips) (default: %(default)s)")
    add_progress_flag(g, False)
    parser.add_argument("--out-dir", required=True,
                        help="output folder, outside the input folders and DIR (required, no "
                             "default)")
    run_files.add_overwrite_flag(parser, "--out-dir")
    return parser


main = script_utils.tool_main(get_args_parser, run)


if __name__ == "__main__":
    main()
