"""Score whole mammograms with trained whole-image models and evaluate the scores.

Inference and evaluation for Shen et al., "Deep Learning to Improve Breast Cancer Detection on
Screening Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427. One or several whole-image
models (HDF5, including the published Keras 2.0.8 files, loaded with
``dm_keras_ext.robust_load_model``) score each image; their class probabilities are averaged.
With ``--test-augment`` each model sees the image as is and flipped left-right, up-down and both
(``training_runs.flip_all_img``), in one batched call, and the 4 predictions are averaged, as
the 2017 evaluation did.

Inputs (exactly one kind):

* ``--img-dir DIR`` with one subfolder per class (``--class-list neg pos``): labelled images;
  ``malignant_label`` is 1 for the last class of ``--class-list`` and 0 for the others.
* ``--img-dir DIR`` without class subfolders: every image file in it (unlabelled).
* ``--img-list FILE``: one image path per line, optionally ``path,label`` (label 0/1); or a
  CSV whose header has an ``image`` or ``path`` column and optionally a label column
  (``malignant_label``, ``malignant``, ``label`` or ``cancer``). Relative paths are taken from
  ``--img-dir`` when given, else from the list's folder.
* ``--exam-list data.pkl|data.json --img-dir DIR``: the mammography meta-repository's exam
  list: a list of dicts with ``L-CC``, ``R-CC``, ``L-MLO``, ``R-MLO`` (lists of image file
  stems, found in ``DIR`` as ``stem.png`` / ``stem.dcm`` / ...), ``horizontal_flip`` (recorded,
  not applied: the models are scored as trained) and optionally ``cancer_label`` with
  ``left_malignant`` / ``right_malignant``. The pickle is read by a restricted unpickler that
  only builds builtins containers, ``collections`` containers and numpy scalars, and no more
  than the file holds; any other class (or a size request such as ``bytes(10**11)``) is an
  error naming the file, before anything is built. JSON with the same structure is read too.

Preprocessing per image (as in training): optional breast segmentation (largest bright object,
cropped, at the file's resolution), resize to ``--img-size`` (OpenCV cubic), ``--img-scale``,
``--rescale-factor``, optional histogram equalisation, ``--featurewise-mean`` subtracted, and
the single channel copied to the model's channel count (3 for ImageNet backbones, 1 for
YaroslavNet). Models are checked before any image is read: channel count (against
``--channels`` when given), fixed input size against ``--img-size``, and equal class counts.

Outputs in ``--out-dir``:

* ``image_predictions.csv``: ``image_index,malignant_pred,malignant_label,prob_<class>...,
  error,path`` (+ ``exam_index,view`` for exam lists); ``malignant_pred`` is the probability
  of class ``--malignant-class`` (default the last); an unreadable image has empty scores and
  the reason in ``error``; unknown labels are empty.
* ``breast_predictions.csv`` (exam lists): ``index,left_malignant,right_malignant``, the mean
  ``malignant_pred`` over the views of that breast that were scored (empty if none).
* with labels: ``metrics.json`` (AUROC, AUPRC = trapezoidal area under the PR curve, their
  seeded percentile bootstrap 95 % intervals over ``--bootstrap`` resamples, stratified by
  label and resampling patients when they are known (exams of exam lists, CBIS-style names
  ``{patient}_{side}_{view}``), sensitivity and specificity at ``--threshold`` with
  ``score >= threshold`` positive, and the rest of ``eval_metrics.evaluate_scores``: PPV, NPV,
  F1, sensitivity at fixed specificities and the reverse, pF1, ECE and Brier score; per level
  ``image`` and, for exam lists, ``breast``), ``roc_<level>.png``, ``pr_<level>.png``.
  ``evaluate.py`` computes the same metrics from these files, and more (operating points
  chosen on validation predictions, calibration, model comparison).
* ``options.json``: the resolved options.
* ``.ddsm_outputs.json``: the manifest of the files this run wrote. Files an earlier run
  wrote that this one does not are removed; other files (your own) are kept, and one named
  like an output stops the run unless ``--overwrite``. ``--out-dir`` must lie outside
  ``--img-dir``.

Example (from inside ``ddsm_train/``)::

    python image_clf_predict.py --model ddsm_resnet50.h5 ddsm_vgg16.h5 --img-dir test \\
        --img-size 1152 896 --rescale-factor 0.003891 --featurewise-mean 52.16 \\
        --test-augment --out-dir predictions
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import script_utils  # first: puts the root dm_* modules on sys.path

script_utils.import_tensorflow_quietly()   # TensorFlow's start-up lines hidden

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import dm_image  # noqa: E402
import eval_metrics  # noqa: E402
from ddsm_names import parse_image_name  # noqa: E402
from image_inputs import (IMAGE_EXTENSIONS, READ_ERRORS, VIEWS, ImageItem,  # noqa: E402
                          collect_class_folders, collect_exams, collect_folder, collect_items,
                          describe_error, load_exam_list, load_pred_image, read_image_list)
import run_files  # noqa: E402
import run_options  # noqa: E402
from common_flags import add_bool_flag, add_bootstrap_flags, add_image_flags, \
    add_image_source_flags, add_model_reading_flags, add_optional_value_flag  # noqa: E402
import common_flags as cf  # noqa: E402
from script_utils import check_unique  # noqa: E402
from script_utils import (RECIPE_OPTIONS, RestrictedUnpickler,  # noqa: E402
                          apply_model_recipe)

__all__ = [
    "IMAGE_EXTENSIONS", "VIEWS", "ImageItem", "RestrictedUnpickler", "load_exam_list",
    "collect_class_folders", "collect_folder", "read_image_list", "collect_exams",
    "load_models", "check_models", "load_pred_image", "predict_batch", "score_items",
    "image_table", "breast_table", "evaluate_level", "write_outputs", "run",
    "options_class", "predict_images", "get_args_parser", "main",
]

if TYPE_CHECKING:  # annotations only; TensorFlow is imported where a model is used
    import tf_keras as keras

logger = logging.getLogger(__name__)


PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------ models
def load_models(models: Sequence[Union[PathLike, keras.Model]],
                custom_objects: Optional[Dict[str, Any]] = None, safe_mode: bool = True
                ) -> List[Tuple[str, object]]:
    """Load models from HDF5 paths (``dm_keras_ext.robust_load_model``: a file with Lambda
    layers is refused unless ``safe_mode`` is False); Keras models pass through.
    Returns ``[(name, model), ...]``."""
    from dm_keras_ext import robust_load_model

    out = []
    for m in models:
        if isinstance(m, (str, os.PathLike)):
            if not Path(m).is_file():
                raise FileNotFoundError(f"model file {m} not found")
            logger.info("loading model %s", m)
            out.append((os.fspath(m), robust_load_model(os.fspath(m),
                                                        custom_objects=custom_objects,
                                                        safe_mode=safe_mode)))
        else:
            out.append((getattr(m, "name", "model"), m))
    return out


def check_models(models: List[Tuple[str, object]], img_size: Sequence[int],
                 channels: Optional[int] = None) -> Tuple[List[int], int]:
    """Check the models against the input flags before any image is read.

    Args:
        models: ``[(name, model)]``.
        img_size: (height, width) the images are resized to.
        channels: expected input channel count (None: take each model's own).

    Returns:
        (channel count per model, number of classes).

    Raises:
        ValueError: a model is not a channels-last image classifier, its channel count is
            not 1 or 3 or differs from ``channels``, its fixed input size differs from
            ``img_size``, or the models disagree on the number of classes.
    """
    chans, nb_classes = [], set()
    for name, model in models:
        shape = model.input_shape
        if isinstance(shape, list) or len(shape) != 4:
            raise ValueError(f"model {name} should take one (batch, height, width, channels) "
                             f"input, got input shape {shape}")
        c = shape[-1]
        if c not in (1, 3):
            raise ValueError(f"model {name} takes {c}-channel input; only 1 (e.g. YaroslavNet) "
                             f"or 3 (ImageNet backbones) channels are supported")
        if channels is not None and c != channels:
            raise ValueError(
                f"model {name} takes {c}-channel input but {channels} channels were asked for "
                f"(--channels {channels}); a 1-channel model such as YaroslavNet needs "
                f"--channels 1 (or leave --channels out to use each model's own count)")
        if shape[1] is not None and shape[2] is not None and \
                (shape[1], shape[2]) != tuple(img_size):
            raise ValueError(f"model {name} takes {shape[1]}x{shape[2]} images but --img-size "
                             f"is {img_size[0]} {img_size[1]}")
        out = model.output_shape
        if isinstance(out, list) or len(out) != 2:
            raise ValueError(f"model {name} should output (batch, nb_class) probabilities, got "
                             f"output shape {out}")
        chans.append(int(c))
        nb_classes.add(int(out[-1]))
    if len(nb_classes) != 1:
        raise ValueError(f"the models disagree on the number of classes: {sorted(nb_classes)}")
    return chans, nb_classes.pop()


# ------------------------------------------------------------------------------ scoring
def predict_batch(models: List[Tuple[str, object]], channels: List[int], x: np.ndarray,
                  test_augment: bool = False) -> np.ndarray:
    """Mean class probabilities of all models (and of the 4 flips with ``test_augment``).

    Args:
        models: ``[(name, model)]``.
        channels: input channels per model; a one-channel ``x`` is copied to that many.
        x: float32 (n, height, width, 1) preprocessed, or (n, height, width, C) already at
            the models' channel count.
        test_augment: average each model's predictions on the 4 flips
            (``training_runs.predict_flip_mean``).

    Returns:
        float64 (n, nb_class).
    """
    from training_runs import predict_flip_mean

    total = 0.0
    for (_, model), c in zip(models, channels):
        xm = np.repeat(x, c, axis=-1) if x.shape[-1] == 1 and c != 1 else x
        total = total + predict_flip_mean(model, xm, test_augment)
    return total / len(models)


def _load_or_reason(path: Path, read_opts: dict):
    """(image, '') or (None, reason) for an unreadable image; other errors propagate."""
    try:
        return load_pred_image(path, **read_opts), ""
    except READ_ERRORS as exc:
        return None, describe_error(exc)


#: The ``error`` of an image the model read but gave no finite score (NaN or infinite
#: probabilities: a model whose weights are not finite).
NO_FINITE_SCORE = "the model gave no finite score (NaN or infinite probabilities)"


def score_items(items: List[ImageItem], models: Sequence[Tuple[str, keras.Model]],
                channels: Sequence[int], nb_class: int, batch_size: int,
                test_augment: bool, read_opts: dict, verbose: bool = False,
                prefetch: int = 2, workers: Optional[int] = None
                ) -> Tuple[np.ndarray, List[str]]:
    """Score every item; unreadable images get NaN probabilities and a reason, images the
    model gives no finite score get :data:`NO_FINITE_SCORE`.

    While the models score one batch, the images of the next ``prefetch`` batches are read and
    resized on ``workers`` background threads (``prefetch.prefetch_map``), so on a GPU the
    decoding hides behind the models. Scores, their order and the skipped images are the same
    as with ``prefetch=0`` (read each batch, then score it).

    Args:
        prefetch: batches read ahead (0: none).
        workers: reading threads (default: ``prefetch.default_workers()``, 0 on a single CPU).

    Returns:
        (float64 (n, nb_class) probabilities with NaN rows for failures, list of n reasons,
        '' for images that were scored).
    """
    from prefetch import default_workers, prefetch_map

    probs = np.full((len(items), nb_class), np.nan)
    errors = [""] * len(items)
    workers = default_workers() if workers is None else workers
    loaded = prefetch_map(lambda item: _load_or_reason(item.path, read_opts), items,
                          ahead=prefetch * batch_size, workers=workers)
    bar = dm_image.progress(len(items), "scoring", unit="img", verbose=verbose)
    for start in range(0, len(items), batch_size):
        bar.update(min(batch_size, len(items) - start))
        good, xs = [], []
        for i in range(start, min(start + batch_size, len(items))):
            x, reason = next(loaded)
            if reason:
                errors[i] = reason
                logger.warning("skipping %s: %s", items[i].path, errors[i])
            else:
                xs.append(x)
                good.append(i)
        if good:
            probs[good] = predict_batch(models, channels, np.stack(xs), test_augment)
            for i in good:
                if not np.isfinite(probs[i]).all():
                    errors[i] = NO_FINITE_SCORE
    loaded.close()
    bar.close()
    return probs, errors


# ------------------------------------------------------------------------------ outputs
def _prob_names(class_list: Sequence[str], nb_class: int) -> List[str]:
    if len(class_list) == nb_class:
        return [f"prob_{c}" for c in class_list]
    return [f"prob_{k}" for k in range(nb_class)]


def image_table(items: List[ImageItem], probs: np.ndarray, errors: List[str],
                prob_names: List[str], malignant_class: int) -> pd.DataFrame:
    """The image-level table (see the module docstring for the columns)."""
    df = pd.DataFrame({
        "image_index": [it.image_index for it in items],
        "malignant_pred": probs[:, malignant_class] if len(items) else [],
        "malignant_label": pd.array([it.label for it in items], dtype="Int64"),
    })
    for k, name in enumerate(prob_names):
        df[name] = probs[:, k]
    df["error"] = errors
    df["path"] = [str(it.path) for it in items]
    if any(it.exam is not None for it in items):
        df["exam_index"] = [it.exam for it in items]
        df["view"] = [it.view for it in items]
    return df


def breast_table(exams: List[dict], images: pd.DataFrame) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Breast-level scores (mean over the scored views of each breast) and labels.

    Returns:
        (``index,left_malignant,right_malignant`` table, same shape table of labels with
        ``<NA>`` where unknown).
    """
    side = images["view"].str[0].map({"L": "left", "R": "right"})
    means = images.assign(side=side).groupby(["exam_index", "side"])["malignant_pred"].mean()
    rows, labels = [], []
    for k, exam in enumerate(exams):
        rows.append({"index": k, **{f"{s}_malignant": means.get((k, s), np.nan)
                                    for s in ("left", "right")}})
        lab = exam.get("cancer_label") or {}
        labels.append({f"{s}_malignant": lab.get(f"{s}_malignant") for s in ("left", "right")})
    return (pd.DataFrame(rows, columns=["index", "left_malignant", "right_malignant"]),
            pd.DataFrame(labels, columns=["left_malignant", "right_malignant"]))


def evaluate_level(y: np.ndarray, score: np.ndarray, out_dir: Path, level: str,
                   threshold: float, n_boot: int, seed: int,
                   groups: Optional[np.ndarray] = None) -> Optional[dict]:
    """Metrics of the labelled, scored entries, and the ROC/PR PNGs when both classes occur.

    Args:
        groups: patient (or exam) of each entry, for the clustered bootstrap (None: entries
            are resampled independently).

    Returns:
        The ``eval_metrics.evaluate_scores`` dict plus ``roc_png``/``pr_png`` paths, or None
        when no entry has both a label and a score.
    """
    y = pd.to_numeric(pd.Series(y), errors="coerce").astype("Float64").to_numpy(
        dtype=float, na_value=np.nan)
    score = np.asarray(score, dtype=float)
    keep = np.isfinite(y) & np.isfinite(score)
    if not keep.any():
        return None
    y, score = y[keep].astype(int), score[keep]
    groups = None if groups is None else np.asarray(groups)[keep]
    metrics = eval_metrics.evaluate_scores(y, score, threshold=threshold, n_boot=n_boot,
                                           seed=seed, groups=groups)
    if 0 < y.sum() < y.size:
        roc, pr = eval_metrics.plot_roc_pr(y, score, out_dir / f"roc_{level}.png",
                                           out_dir / f"pr_{level}.png", title=level,
                                           metrics=metrics)
        metrics.update(roc_png=str(roc), pr_png=str(pr))
    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    logger.info("%s level: n=%d AUROC %s (%s) AUPRC %s (%s) sens %s spec %s @ %.2f%s",
                level, metrics["n"], fmt(metrics["auroc"]),
                eval_metrics.format_ci(metrics["auroc_ci"]), fmt(metrics["auprc"]),
                eval_metrics.format_ci(metrics["auprc_ci"]),
                fmt(metrics["sensitivity"]) if metrics["n_pos"] else "n/a",
                fmt(metrics["specificity"]) if metrics["n_neg"] else "n/a", threshold,
                "".join(f"; {n}" for n in metrics["notes"]))
    return metrics


def _patients(images: pd.DataFrame) -> Optional[np.ndarray]:
    """The patient of each image for the clustered bootstrap: the exam of exam lists, the
    ``{patient}`` of CBIS-style names; None when not every image has one."""
    if "exam_index" in images.columns:
        return images["exam_index"].astype(str).to_numpy()
    parts = [parse_image_name(name) for name in images["image_index"]]
    if parts and all(p is not None for p in parts):
        return np.array([p.patient for p in parts])
    return None


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    return dm_image.atomic_write(path, lambda fh: df.to_csv(fh, index=False,
                                                            float_format="%.6g"), text=True)


def write_outputs(items: List[ImageItem], exams: Optional[List[dict]], probs: np.ndarray,
                  errors: List[str], out: Path, prob_names: List[str], malignant_class: int,
                  threshold: float, bootstrap: int, seed: int) -> dict:
    """Write the CSVs, and with labels the metrics JSON and curves; return the summary."""
    images = image_table(items, probs, errors, prob_names, malignant_class)
    summary = {"n_images": len(items), "n_scored": int(np.isfinite(probs[:, 0]).sum()),
               "image_csv": str(_write_csv(images, out / "image_predictions.csv")),
               "errors": [(it.image_index, e) for it, e in zip(items, errors) if e],
               "metrics": {}}
    summary["n_errors"] = len(summary["errors"])
    levels = {"image": (images["malignant_label"], images["malignant_pred"],
                        _patients(images))}
    if exams is not None:
        breasts, labels = breast_table(exams, images)
        summary["breast_csv"] = str(_write_csv(breasts, out / "breast_predictions.csv"))
        levels["breast"] = (labels[["left_malignant", "right_malignant"]].to_numpy().ravel(),
                            breasts[["left_malignant", "right_malignant"]].to_numpy().ravel(),
                            np.repeat(breasts["index"].astype(str).to_numpy(), 2))
    for level, (y, score, groups) in levels.items():
        res = evaluate_level(y, score, out, level, threshold, bootstrap, seed, groups)
        if res is not None:
            summary["metrics"][level] = res
    if summary["metrics"]:
        summary["metrics_json"] = str(eval_metrics.write_json_atomic(
            {**summary["metrics"], "n_images": summary["n_images"],
             "n_errors": summary["n_errors"], "errors": summary["errors"]},
            out / "metrics.json"))
    return summary


# ------------------------------------------------------------------------------ run
#: Every file name this script writes into ``--out-dir``.
OUTPUT_NAMES = ("image_predictions.csv", "breast_predictions.csv", "metrics.json",
                "options.json", "roc_image.png", "pr_image.png", "roc_breast.png",
                "pr_breast.png")


def _remove_stale_outputs(manifest: "run_files.OutputManifest", summary: dict) -> None:
    """Record what this run wrote in the folder's manifest and remove the files an earlier
    run's manifest names that this run did not write (a stale metrics.json or curve next to
    new predictions would describe other images); files no manifest names are kept."""
    written = {Path(v).name for k, v in summary.items()
               if isinstance(v, str) and k.endswith(("_csv", "_json"))}
    for level in summary.get("metrics", {}).values():
        written |= {Path(level[k]).name for k in ("roc_png", "pr_png") if level.get(k)}
    for name in sorted(written):
        manifest.add(manifest.folder / name)
    for path in manifest.finish():
        logger.info("removed %s of an earlier run (this run does not write it)", path)


def _claim_paths(model, img_dir, img_list, exam_list, out_dir, overwrite):
    """Refuse an ``--out-dir`` that overlaps an input, or that holds files named like this
    tool's outputs that no manifest names (unless ``overwrite``); returns the manifest."""
    models = [m for m in model if isinstance(m, (str, os.PathLike))]
    run_files.check_run_paths(
        input_files={**{f"--model #{i + 1}" if i else "--model": m for i, m in enumerate(models)},
                     "--img-list": img_list, "--exam-list": exam_list},
        input_dirs={"--img-dir": img_dir}, output_dirs={"--out-dir": out_dir})
    manifest = run_files.OutputManifest(out_dir, "image_clf_predict")
    manifest.check_foreign([Path(out_dir, n) for n in OUTPUT_NAMES], overwrite)
    return manifest


def _check_numbers(threshold, bootstrap, featurewise_mean, img_scale, rescale_factor) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold should be in [0, 1], got {threshold}")
    if bootstrap < 0:
        raise ValueError(f"--bootstrap should be >= 0, got {bootstrap}")
    if not np.isfinite(featurewise_mean):
        raise ValueError(f"--featurewise-mean should be a finite number, got {featurewise_mean}")
    for name, value in (("img-scale", img_scale), ("rescale-factor", rescale_factor)):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"--{name} should be finite and > 0, got {value}")


def _resolve_recipe(models: Sequence, values: Mapping, given) -> dict:
    """The image options of :func:`predict_images` completed from the first model file's
    input recipe (``given`` None: those that differ from the parser's defaults count as
    given).

    Returns:
        The six image options, and ``channels``: extra :func:`load_pred_image` arguments
        (``channels`` and ``preprocess``) when the recipe asks for a backbone's
        preprocessing, which works on all channels, else ``{}`` (one channel, copied per
        model).
    """
    names = RECIPE_OPTIONS
    files = [m for m in models if isinstance(m, (str, os.PathLike)) and Path(m).is_file()]
    prep, recipe = apply_model_recipe({k: values[k] for k in names},
                                      files[0] if files else None,
                                      None if given is None else set(given),
                                      defaults=dict(options_class()()))
    for other in files[1:]:
        theirs = dm_image.InputRecipe.from_model_file(other)
        if recipe is not None and theirs is not None and theirs != recipe:
            logger.warning("models %s and %s were trained with different input recipes (%s); "
                           "all are scored with the first one's", files[0], other,
                           recipe.differences(theirs))
    prep["channels"] = {}
    if recipe is not None and recipe.preprocess and not prep["featurewise_center"]:
        prep["channels"] = dict(channels=recipe.channels, preprocess=recipe.preprocess)
    return prep


def run(model: Union[PathLike, keras.Model, Sequence], **options: Any) -> dict:
    """Score images with the averaged models and write the tables, metrics and curves.

    The keyword form for Python callers: the options are resolved against the parser and
    handed, as one :func:`options_class` object, to :func:`predict_images`.

    Args:
        model: ``--model``: HDF5 path(s) (or tf-keras models) of whole-image classifiers;
            their predictions are averaged.
        **options: the other options by destination name (``--help``; e.g. ``img_dir``,
            ``out_dir``, ``img_size``); missing ones take the parser's defaults. Two are not
            flags: ``custom_objects`` and ``given_options`` (see :func:`predict_images`).

    Returns:
        The summary of :func:`predict_images`.

    Raises:
        ValueError: an unknown option (the message lists the valid ones), and those of
            :func:`predict_images`.
    """
    # --model is the value given (model objects or paths), not parsed
    return run_options.keyword_run(predict_images, options_class(), get_args_parser(), (),
                                   {**options, "model": model})


def predict_images(opts: run_options.RunOptions, *, custom_objects: Optional[dict] = None,
                   given_options: Optional[Sequence[str]] = None) -> dict:
    """Score images with the averaged models and write the tables, metrics and curves.

    Args:
        opts: an :func:`options_class` object; its fields are the flags (see ``--help``):
            ``model``: HDF5 paths (or tf-keras models) of whole-image classifiers, averaged;
            ``img_dir``, ``img_list``, ``exam_list``: the images (see the module docstring);
            ``out_dir``: output folder (created); ``class_list``: class sub-folder names in
            label order, also naming the ``prob_`` columns; ``malignant_class``: index of the
            class whose probability is ``malignant_pred``; ``img_size``: (height, width) the
            images are resized to; ``img_scale``, ``rescale_factor``,
            ``featurewise_center``, ``featurewise_mean``, ``equalize_hist``: the training
            preprocessing (rescale 0.003891 for 16-bit input; mean on 0..255 scale);
            ``segment_breast``: crop each image to the segmented breast before resizing;
            ``test_augment``: average over the 4 flips; ``channels``: expected model input
            channels (None: each model's own); ``batch_size``: images per prediction call
            (x4 with ``test_augment``); ``threshold``: operating point for
            sensitivity/specificity; ``bootstrap``: bootstrap resamples for the intervals
            (0: none); ``seed``: bootstrap seed; ``verbose``: progress bar;
            ``trust_model_file``: load model files with Lambda layers (their code runs);
            ``overwrite``: replace files in ``out_dir`` named like this tool's outputs that
            no manifest names (without it they stop the run).
        custom_objects: passed to the model loader.
        given_options: the options set explicitly (the command line's, see
            ``common_flags.given_options``); the image options (``img_size``, ``img_scale``,
            ``rescale_factor``, ``equalize_hist``, ``featurewise_center``,
            ``featurewise_mean``) not among them come from the first model file's input
            recipe when it has one (``dm_image.InputRecipe``; a recipe that does not centre
            also brings its backbone preprocessing). None: those whose value differs from
            the parser's default count as given.

    Returns:
        Summary dict: counts, output paths, metrics per level and the list of failures.

    Raises:
        ValueError: bad option values, models whose class count differs from ``class_list``,
            or no image could be scored (nothing is written then); an ``out_dir`` that
            overlaps an input (``run_files.RunPathError``). The output folder holds this
            run's files only: files an earlier run wrote (its manifest) that this one does
            not write (e.g. metrics of a labelled set) are removed; other files are kept.
        FileExistsError: a file named like an output that no manifest names, without
            ``overwrite``.
    """
    t0 = time.time()
    model = opts.model
    if isinstance(model, (str, os.PathLike)) or hasattr(model, "layers"):
        opts = opts.replace(model=[model])
    _check_options(opts)
    prep = _resolve_recipe(opts.model, opts, given_options)
    opts = opts.replace(**{k: prep[k] for k in RECIPE_OPTIONS})
    manifest = _claim_paths(opts.model, opts.img_dir, opts.img_list, opts.exam_list,
                            opts.out_dir, opts.overwrite)
    items, exams = collect_items(opts.img_dir, opts.img_list, opts.exam_list, opts.class_list)
    if not items:
        raise ValueError(f"no image found (img_dir={opts.img_dir}, img_list={opts.img_list}, "
                         f"exam_list={opts.exam_list}; extensions {IMAGE_EXTENSIONS})")
    models, chans, nb_class = _load_checked_models(opts, custom_objects)
    out = Path(opts.out_dir)
    options = {**dict(opts), "model": [name for name, _ in models]}
    logger.info("options: %s", json.dumps(options, default=str, sort_keys=True))
    logger.info("scoring %d images with %d model(s), channels %s, %d classes, flips %s",
                len(items), len(models), chans, nb_class, opts.test_augment)
    read_opts = dict(img_size=tuple(opts.img_size), img_scale=opts.img_scale,
                     rescale_factor=opts.rescale_factor, equalize_hist=opts.equalize_hist,
                     featurewise_center=opts.featurewise_center,
                     featurewise_mean=opts.featurewise_mean, segment_breast=opts.segment_breast,
                     scale_problems=[], **prep["channels"])
    probs, errors = score_items(items, models, chans, nb_class, opts.batch_size,
                                opts.test_augment, read_opts, opts.verbose)
    if not np.isfinite(probs).all(axis=1).any():
        raise ValueError(f"none of the {len(items)} images could be scored (e.g. "
                         f"{items[0].path}: {errors[0]}); nothing written")
    out.mkdir(parents=True, exist_ok=True)
    manifest.begin([out / n for n in OUTPUT_NAMES])
    summary = write_outputs(items, exams, probs, errors, out,
                            _prob_names(opts.class_list, nb_class), opts.malignant_class,
                            opts.threshold, opts.bootstrap, opts.seed)
    summary["options_json"] = str(eval_metrics.write_json_atomic(options, out / "options.json"))
    summary["scale_mismatch"] = read_opts["scale_problems"]
    _remove_stale_outputs(manifest, summary)
    if summary["n_errors"]:
        logger.warning("%d of %d images could not be scored and are left out of the metrics "
                       "(reasons in the error column of %s)", summary["n_errors"], len(items),
                       out / "image_predictions.csv")
    summary["elapsed_s"] = round(time.time() - t0, 2)
    logger.info("scored %d of %d images in %.1f s (%d unreadable); outputs in %s",
                summary["n_scored"], len(items), summary["elapsed_s"], summary["n_errors"], out)
    return summary


def _check_options(opts: run_options.RunOptions) -> None:
    """Refuse bad option values before any model or image is read."""
    if not opts.model:
        raise ValueError("at least one model is required")
    if opts.batch_size < 1:
        raise ValueError(f"batch_size should be >= 1, got {opts.batch_size}")
    if len(opts.img_size) != 2 or min(opts.img_size) < 1:
        raise ValueError(f"img_size should be (height, width), got {opts.img_size}")
    if opts.channels is not None and opts.channels not in (1, 3):
        raise ValueError(f"channels should be 1 or 3, got {opts.channels}")
    _check_numbers(opts.threshold, opts.bootstrap, opts.featurewise_mean, opts.img_scale,
                   opts.rescale_factor)
    check_unique(list(opts.class_list), "class name", "--class-list")


def _load_checked_models(opts: run_options.RunOptions, custom_objects: Optional[dict]
                         ) -> Tuple[List[Tuple[str, object]], List[int], int]:
    """The models of ``opts.model`` (:func:`load_models`), checked (:func:`check_models`)
    and against ``malignant_class`` and ``class_list``; returns (models, channels per
    model, number of classes)."""
    models = load_models(opts.model, custom_objects, safe_mode=not opts.trust_model_file)
    chans, nb_class = check_models(models, opts.img_size, opts.channels)
    if not -nb_class <= opts.malignant_class < nb_class:
        raise ValueError(f"malignant_class {opts.malignant_class} out of range for {nb_class} "
                         f"classes")
    if len(opts.class_list) != nb_class:
        raise ValueError(f"--class-list names {len(opts.class_list)} classes "
                         f"({list(opts.class_list)}) but the model(s) output {nb_class}: give "
                         f"the classes the model was trained with, in its label order")
    return models, chans, nb_class


# ------------------------------------------------------------------------------ command line
def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the command-line flags: the one declaration of each option's type, default
    and help (:func:`options_class` and :func:`run` take them from here)."""
    parser = argparse.ArgumentParser(description="Score whole mammograms with trained models.")
    parser.add_argument("--model", nargs="+", required=True, metavar="MODEL.h5",
                        help="whole-image model file(s); predictions are averaged (required, "
                             "no default)")
    add_model_reading_flags(parser, True)
    add_image_source_flags(parser, -1, "last")
    add_image_flags(parser, img_size=(1152, 896), featurewise_mean=52.16, equalize_hist=False,
                    featurewise_center=True, img_scale=None, rescale_factor=None,
                    from_recipe=tuple(RECIPE_OPTIONS))
    g = parser.add_argument_group("inference")
    add_bool_flag(g, "segment-breast", False, "crop to the segmented breast")
    add_bool_flag(g, "test-augment", False, "average over 4 flips")
    add_optional_value_flag(g, "channels", cf.positive_int, None,
                            "expected model input channels, 1 or 3 (default: the model's)")
    g.add_argument("--batch-size", type=cf.positive_int, default=4,
                   help="images per prediction call (default: %(default)s)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--threshold", type=float, default=0.5,
                    help="score >= threshold is positive (default: %(default)s)")
    add_bootstrap_flags(ev)
    parser.add_argument("--out-dir", default="./predictions",
                        help="output folder, outside the input folders; files an earlier run "
                             "wrote there (listed in its .ddsm_outputs.json) that this run does "
                             "not write are removed, other files are kept (default: "
                             "%(default)s)")
    run_files.add_overwrite_flag(parser, "--out-dir")
    return parser


options_class = run_options.tool_options_class(get_args_parser, "PredictOptions")


main = script_utils.tool_main(get_args_parser, run, pass_given=True)


if __name__ == "__main__":
    main()
