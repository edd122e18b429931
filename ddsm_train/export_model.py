"""Export a trained whole-image model so that anyone can run it: ONNX, SavedModel, recipe, card.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427. A whole-image classifier (HDF5, including the
published Keras 2.0.8 files, loaded with ``dm_keras_ext.robust_load_model``) is written to
``--out DIR`` as:

* ``model.onnx``: the model converted with tf2onnx (input ``input``, float32
  ``(batch, height, width, channels)``; output ``probs``, ``(batch, nb_class)``), checked
  with onnxruntime against tf-keras on a random input (the largest absolute difference is
  logged and kept in the card; above ``ONNX_TOLERANCE`` the file is not written);
* ``saved_model/``: a TensorFlow SavedModel with the same ``serving_default`` signature;
* ``recipe.json``: how an image file becomes that input (``dm_image.InputRecipe``: size,
  resize method, pixel scale, histogram equalisation, channels, featurewise mean) and
  whether the 4 flips are averaged; ``score_exported.py`` scores images with it and
  onnxruntime, without TensorFlow;
* ``model_card.md`` and ``model_card.json``: what the model is, how it was trained (the
  options JSON ``MODEL.options.json`` beside the model), its data counts when the training
  folders are still there, the test metrics of ``--metrics`` (AUROC with its interval,
  operating points chosen on validation with test sensitivity and specificity, calibration,
  and their ``warnings``), the run that made the model when ``--run-info`` gives it (the
  pipeline's config, the training command, data counts per split and class, its
  learning-health warnings), the recipe, software versions, the SHA-256 of every file
  written, and its intended use and limits.

The recipe comes from the model file (the trainers store it); for a file without one (the
2017 files) the image flags state it, and a model whose recipe cannot be stated (no image
size, no pixel scale, or centring without a mean) is refused with one line naming what is
missing. When the converter cannot convert the model, the SavedModel, recipe and card are
still written and the card says why there is no ONNX file.

A recipe that does not centre but names a backbone's ImageNet preprocessing has that
preprocessing built into the exported graph (``preprocess_in_model`` in ``recipe.json``), so
the scorer needs no backbone code.

Example (from inside ``ddsm_train/``)::

    python export_model.py ddsm_resnet50.h5 --out exported --img-size 1152 896 \\
        --rescale-factor 0.003891 --featurewise-mean 52.16 --flips
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import script_utils  # first: puts the root dm_* modules on sys.path

import numpy as np  # noqa: E402

import dm_image  # noqa: E402
import run_files  # noqa: E402
from common_flags import add_bool_flag, add_image_flags, add_trust_flag  # noqa: E402
from script_utils import RECIPE_OPTIONS, apply_model_recipe  # noqa: E402

__all__ = ["ONNX_NAME", "SAVED_MODEL_NAME", "RECIPE_NAME", "CARD_MD", "CARD_JSON",
           "OUTPUT_NAMES", "ONNX_TOLERANCE", "RECIPE_FORMAT", "ExportError", "state_recipe",
           "convert_to_onnx", "summarize_metrics", "run", "export", "get_args_parser", "main"]

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
SAVED_MODEL_NAME = "saved_model"
RECIPE_NAME = "recipe.json"
CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"
#: The files this tool writes into ``--out`` (and the ``saved_model/`` folder).
OUTPUT_NAMES = (ONNX_NAME, RECIPE_NAME, CARD_MD, CARD_JSON)
#: Largest absolute difference between onnxruntime's and tf-keras's probabilities on the
#: check input for which ``model.onnx`` is written.
ONNX_TOLERANCE = 1e-4
#: ``format`` of ``recipe.json``.
RECIPE_FORMAT = "ddsm-exported-model"
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "probs"
RESIZE_METHOD = ("OpenCV cv2.resize INTER_CUBIC on the stored levels (uint16 or uint8), "
                 "to (height, width)")


class ExportError(ValueError):
    """A model that cannot be exported as asked (its recipe cannot be stated, its shape)."""


# ------------------------------------------------------------------------------ recipe
def _missing_settings(values: dict, fixed_size: Optional[Tuple[int, int]]) -> List[str]:
    """The flags a recipe without a model-file recipe still needs (empty: complete)."""
    missing = []
    if not values.get("img_size") and fixed_size is None:
        missing.append("--img-size HEIGHT WIDTH")
    if values.get("rescale_factor") is None and values.get("img_scale") is None:
        missing.append("--rescale-factor (0.003891 for 16-bit images, 1 for 8-bit) or "
                       "--img-scale")
    if values.get("featurewise_center") and values.get("featurewise_mean") is None:
        missing.append("--featurewise-mean (or --no-featurewise-center)")
    return missing


def state_recipe(model_file: str, values: dict, given: Optional[set], channels: int,
                 fixed_size: Optional[Tuple[int, int]] = None) -> dm_image.InputRecipe:
    """The input recipe of ``model_file``: its own, with the ``given`` image options put
    over it, or, for a file without one, the image options alone.

    Args:
        model_file: the model's HDF5 file.
        values: the image options (:data:`script_utils.RECIPE_OPTIONS`) by destination.
        given: the options set explicitly (None: those that differ from the parser's
            defaults).
        channels: the model's input channel count.
        fixed_size: the model's fixed input (height, width), or None.

    Raises:
        ExportError: the recipe cannot be stated (one line naming what is missing), or it
            contradicts the model's input shape.
    """
    prep, stored = apply_model_recipe({k: values.get(k) for k in RECIPE_OPTIONS}, model_file,
                                      given, defaults=_parser_defaults())
    missing = _missing_settings(prep, fixed_size)
    if missing:
        where = "its input recipe does not say and" if stored is not None else \
            "it holds no input recipe (a 2017 model?) and"
        raise ExportError(f"cannot state the input recipe of {model_file}: {where} no flag "
                          f"gives {'; '.join(missing)}")
    size = tuple(prep["img_size"]) if prep.get("img_size") else fixed_size
    if fixed_size is not None and tuple(size) != tuple(fixed_size):
        raise ExportError(f"{model_file} takes {fixed_size[0]}x{fixed_size[1]} images but the "
                          f"recipe's image size is {size[0]}x{size[1]}")
    preprocess = stored.preprocess if stored is not None else None
    return dm_image.InputRecipe.from_options({**prep, "img_size": size}, channels=channels,
                                             preprocess=preprocess)


def _parser_defaults() -> dict:
    return {a.dest: a.default for a in get_args_parser()._actions}


def recipe_record(recipe: dm_image.InputRecipe, flips: bool, nb_class: int,
                  preprocess_in_model: bool) -> dict:
    """The content of ``recipe.json``."""
    return {"format": RECIPE_FORMAT, "version": 1, "input_recipe": recipe.to_dict(),
            "img_size": list(recipe.img_size), "channels": recipe.channels,
            "resize": RESIZE_METHOD, "img_scale": recipe.img_scale,
            "rescale_factor": recipe.rescale_factor, "equalize_hist": recipe.equalize_hist,
            "featurewise_center": recipe.featurewise_center,
            "featurewise_mean": recipe.featurewise_mean, "preprocess": recipe.preprocess,
            "preprocess_in_model": preprocess_in_model, "flips": bool(flips),
            "nb_class": int(nb_class), "malignant_class": int(nb_class) - 1,
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "steps": ["read the file's levels (16-bit or 8-bit PNG, JPEG, DICOM)",
                      "resize: " + RESIZE_METHOD,
                      "float32; maximum mapped to img_scale when set, then x rescale_factor "
                      "when set", "histogram equalisation (OpenCV, 8-bit) when equalize_hist",
                      "copy the one channel to `channels`",
                      "subtract featurewise_mean when featurewise_center",
                      "with flips: average the probabilities of the image as is, flipped "
                      "left-right, up-down and both"]}


# ------------------------------------------------------------------------------ model
def _model_shape(model, model_file: str) -> Tuple[int, Optional[Tuple[int, int]], int]:
    """(channels, fixed (height, width) or None, nb_class) of a whole-image classifier.

    Raises:
        ExportError: not one (batch, height, width, 1 or 3) input and (batch, n) output.
    """
    shape, out = model.input_shape, model.output_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[-1] not in (1, 3):
        raise ExportError(f"{model_file}: a whole-image classifier takes one (batch, height, "
                          f"width, 1 or 3) input; this model's input shape is {shape}")
    if isinstance(out, list) or len(out) != 2:
        raise ExportError(f"{model_file}: a classifier outputs (batch, nb_class) "
                          f"probabilities; this model's output shape is {out}")
    fixed = (int(shape[1]), int(shape[2])) if None not in shape[1:3] else None
    return int(shape[-1]), fixed, int(out[-1])


def _serving_function(model, recipe: dm_image.InputRecipe, preprocess_in_model: bool):
    """A ``tf.function`` of the exported input: the model, after the backbone's
    preprocessing when that is built in."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *recipe.img_size, recipe.channels), tf.float32,
                         name=INPUT_NAME)
    fn = recipe.preprocess_function() if preprocess_in_model else None

    @tf.function(input_signature=[spec])
    def serve(x):
        if fn is not None:
            x = fn(x)
        return {OUTPUT_NAME: model(x, training=False)}

    return serve


def convert_to_onnx(serve) -> bytes:
    """The serialised ONNX model of ``serve`` (tf2onnx, opset :data:`ONNX_OPSET`).

    Raises:
        Exception: whatever tf2onnx raises for a graph it cannot convert (or ImportError).
    """
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                             opset=ONNX_OPSET)
    return proto.SerializeToString()


def _check_input(recipe: dm_image.InputRecipe, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(levels on the 0..255 scale, the exported input they give): a random check batch."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0, 255, (2, *recipe.img_size, recipe.channels)).astype(np.float32)
    x = recipe.normalize(raw.copy()) if recipe.featurewise_center else raw.copy()
    return raw, x.astype(np.float32)


def _keras_reference(model, recipe, raw, x, preprocess_in_model) -> np.ndarray:
    inp = recipe.normalize(raw.copy()) if preprocess_in_model else x
    return np.asarray(model.predict_on_batch(inp), dtype=np.float64)


def check_onnx(onnx_bytes: bytes, reference: np.ndarray, x: np.ndarray) -> float:
    """Largest absolute difference between onnxruntime's output for ``x`` and ``reference``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.max(np.abs(np.asarray(out, dtype=np.float64) - reference)))


def _onnx_export(serve, model, recipe, preprocess_in_model, converter=None
                 ) -> Tuple[Optional[bytes], dict]:
    """(ONNX bytes or None, what the card says about it); ``converter`` replaces
    :func:`convert_to_onnx`."""
    try:
        data = (converter or convert_to_onnx)(serve)
    except Exception as exc:  # tf2onnx raises many kinds for graphs it cannot convert
        reason = f"tf2onnx could not convert the model: {type(exc).__name__}: " \
                 f"{' '.join(str(exc).split())[:500]}"
        logger.warning("no %s: %s", ONNX_NAME, reason)
        return None, {"written": False, "reason": reason}
    raw, x = _check_input(recipe)
    ref = _keras_reference(model, recipe, raw, x, preprocess_in_model)
    try:
        diff = check_onnx(data, ref, x)
    except Exception as exc:  # onnxruntime refuses a model it cannot run
        reason = f"onnxruntime could not run the converted model: {type(exc).__name__}: {exc}"
        logger.warning("no %s: %s", ONNX_NAME, reason)
        return None, {"written": False, "reason": reason}
    info = {"opset": ONNX_OPSET, "check": {"input_shape": list(x.shape),
                                           "max_abs_diff_vs_keras": diff,
                                           "tolerance": ONNX_TOLERANCE}}
    logger.info("ONNX check on a random %s input: max |onnxruntime - tf-keras| = %.3g",
                list(x.shape), diff)
    if not diff <= ONNX_TOLERANCE:
        reason = (f"onnxruntime's probabilities differ from tf-keras's by {diff:.3g} (more "
                  f"than {ONNX_TOLERANCE:g}) on the check input")
        logger.warning("no %s: %s", ONNX_NAME, reason)
        return None, {**info, "written": False, "reason": reason}
    return data, {**info, "written": True}


def _save_saved_model(model, serve, target: Path) -> None:
    """Write the SavedModel into a temporary folder beside ``target``, then put it in place
    (an earlier one is replaced only once the new one is complete)."""
    import tensorflow as tf

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module = tf.Module()
    module.model, module.serve = model, serve
    try:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # no half-written folder left behind
        raise
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ card
def _read_json(path: Path, what: str) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(script_utils.read_text_file(path))
    except ValueError as err:
        raise ValueError(f"{what} {path}: not valid JSON ({err})") from None


def _ci(value) -> Optional[list]:
    return list(value) if isinstance(value, (list, tuple)) and len(value) == 2 else None


def _level_summary(res: dict) -> dict:
    """The card's part of one ``eval_metrics.evaluate_scores`` result."""
    points = {}
    for name, p in (res.get("operating_points") or {}).items():
        points[name] = {k: p.get(k) for k in ("threshold", "chosen_on", "sensitivity",
                                              "specificity")}
        points[name].update(sensitivity_ci=_ci(p.get("sensitivity_ci")),
                            specificity_ci=_ci(p.get("specificity_ci")))
    cal = res.get("calibration") or {}
    return {"n": res.get("n"), "n_pos": res.get("n_pos"), "n_neg": res.get("n_neg"),
            "auroc": res.get("auroc"), "auroc_ci": _ci(res.get("auroc_ci")),
            "auprc": res.get("auprc"), "auprc_ci": _ci(res.get("auprc_ci")),
            "operating_points": points,
            "calibration": {k: cal.get(k) for k in ("ece", "brier") if k in cal},
            "notes": list(res.get("notes") or [])}


def summarize_metrics(metrics: Any, source: str = "metrics") -> dict:
    """The metrics of a ``metrics.json`` of ``image_clf_predict.py`` (``level`` -> result) or
    ``evaluate.py`` (``level`` -> ``model`` -> result), keyed ``level`` or ``level/model``,
    and its ``warnings`` list.

    Raises:
        ValueError: not a JSON object holding at least one result with an ``auroc``.
    """
    if not isinstance(metrics, dict):
        raise ValueError(f"{source}: a metrics file should hold a JSON object")
    found = {}
    for level, value in metrics.items():
        if isinstance(value, dict) and "auroc" in value:
            found[level] = _level_summary(value)
        elif isinstance(value, dict) and level not in ("comparisons", "settings"):
            found.update({f"{level}/{name}": _level_summary(v) for name, v in value.items()
                          if isinstance(v, dict) and "auroc" in v})
    if not found:
        raise ValueError(f"{source}: no result with an AUROC (expected the metrics.json of "
                         f"image_clf_predict.py or evaluate.py)")
    warnings = metrics.get("warnings") or []
    return {"results": found, "warnings": [str(w) for w in warnings]
            if isinstance(warnings, list) else [str(warnings)]}


def read_run_info(path: str) -> dict:
    """The ``--run-info`` JSON object: what the card says about the run that made the model.

    Known keys (each optional): ``config_file`` and ``pipeline_config`` (the config's name and
    text), ``training_command`` (a list of strings), ``data_counts`` (name -> split -> class
    -> count) and ``warnings`` (a list of ``{code, message, source}`` objects or strings).

    Raises:
        FileNotFoundError: no such file; ValueError: not a JSON object, or ``warnings`` not a
            list.
    """
    info = _read_json(Path(path), "--run-info")
    if info is None:
        raise FileNotFoundError(f"--run-info file {path} not found")
    if not isinstance(info, dict):
        raise ValueError(f"--run-info {path}: should hold a JSON object")
    if not isinstance(info.get("warnings", []), list):
        raise ValueError(f"--run-info {path}: 'warnings' should be a list")
    return {**info, "file": Path(path).name, "sha256": sha256_of(Path(path))}


def _count_images(folder: str, classes: Sequence[str]) -> Optional[Dict[str, int]]:
    root = Path(folder)
    if not root.is_dir():
        return None
    return {c: len(dm_image.list_images(root / c)) for c in classes if (root / c).is_dir()}


def _training_record(model_file: str) -> Tuple[Optional[dict], dict]:
    """(the options JSON beside the model or None, image counts of its folders when known)."""
    options = _read_json(script_utils.options_json_path(model_file), "options file")
    if not isinstance(options, dict):
        return None, {}
    classes = options.get("class_list") or ["neg", "pos"]
    counts = {}
    for split in ("train_dir", "val_dir", "test_dir"):
        if isinstance(options.get(split), str):
            found = _count_images(options[split], classes)
            if found is not None:
                counts[split[:-4]] = found
    return options, counts


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name, module in (("numpy", "numpy"), ("opencv", "cv2"), ("tensorflow", "tensorflow"),
                         ("tf_keras", "tf_keras"), ("tf2onnx", "tf2onnx"), ("onnx", "onnx"),
                         ("onnxruntime", "onnxruntime")):
        try:
            out[name] = str(__import__(module).__version__)
        except Exception:  # not installed, or broken: the card says so
            out[name] = None
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(out: Path, written: Sequence[str]) -> Dict[str, str]:
    """SHA-256 of the files this export wrote (``written``: relative to ``out``; the files an
    earlier export left that this one does not write are removed at its end)."""
    return {rel: sha256_of(out / rel) for rel in sorted(written)}


INTENDED_USE = (
    "Research only: studying whole-image breast cancer classification on screening "
    "mammograms. Not a medical device and not validated for clinical use: it must not "
    "inform the care of any person.")
LIMITS = (
    "The model saw only the images of its training data (see 'Training'): for the published "
    "models and this project's defaults, CBIS-DDSM, scanned screen-film mammograms of a US "
    "population from the 1990s (lesions curated by radiologists, masses and calcifications "
    "over-represented relative to screening). Its scores on digital mammography, other "
    "vendors, other populations or screening prevalence are unknown until measured there. "
    "Scores are probabilities only if the test metrics show it calibrated; operating points "
    "should be chosen on validation data of the population of use.")


def build_card(info: dict) -> dict:
    """The ``model_card.json`` content (``info``: model, recipe, onnx, training, metrics,
    versions, files)."""
    return {"format": "ddsm-model-card", "version": 1, **info,
            "intended_use": INTENDED_USE, "limits": LIMITS}


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "" if not ci or None in ci else f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def _metrics_md(summary: Optional[dict]) -> List[str]:
    if not summary:
        return ["No test metrics were given (`--metrics`)."]
    lines = []
    for key, r in summary["results"].items():
        lines.append(f"- **{key}**: n={r['n']} ({r['n_pos']} positive), AUROC "
                     f"{_fmt(r['auroc'])}{_fmt_ci(r['auroc_ci'])}, AUPRC {_fmt(r['auprc'])}"
                     f"{_fmt_ci(r['auprc_ci'])}; ECE {_fmt(r['calibration'].get('ece'))}, "
                     f"Brier {_fmt(r['calibration'].get('brier'))}")
        for name, p in r["operating_points"].items():
            lines.append(f"  - operating point `{name}` (threshold {_fmt(p['threshold'], 4)}, "
                         f"chosen on {p['chosen_on']}): sensitivity {_fmt(p['sensitivity'])}"
                         f"{_fmt_ci(p['sensitivity_ci'])}, specificity "
                         f"{_fmt(p['specificity'])}{_fmt_ci(p['specificity_ci'])}")
    if summary["warnings"]:
        lines += ["", "Warnings about the training's health:"]
        lines += [f"- {w}" for w in summary["warnings"]]
    return lines


def _warning_text(w) -> str:
    if isinstance(w, dict):
        src = f" ({w['source']})" if w.get("source") else ""
        return f"`{w.get('code', 'warning')}`: {w.get('message', '')}{src}"
    return str(w)


def _run_md(run: Optional[dict]) -> List[str]:
    """The card's section on the run that made the model (``--run-info``)."""
    if not run:
        return []
    lines = ["", "## The run that made it", "", f"From `{run['file']}` (SHA-256 "
             f"`{run['sha256']}`)."]
    warnings = run.get("warnings") or []
    lines += ["", f"Learning-health warnings of the run: {len(warnings) or 'none'}", ""]
    lines += [f"- {_warning_text(w)}" for w in warnings]
    for name, splits in (run.get("data_counts") or {}).items():
        lines += ["", f"Data ({name}), images per split and class:", ""]
        lines += [f"- {split}: " + ", ".join(f"{c} {n}" for c, n in per.items())
                  + f" (total {sum(per.values())})" for split, per in splits.items()]
    if run.get("training_command"):
        lines += ["", "Training command:", "", "```",
                  " ".join(map(str, run["training_command"])), "```"]
    if run.get("pipeline_config"):
        lines += ["", f"Pipeline config `{run.get('config_file', '')}`:", "", "```toml",
                  run["pipeline_config"].rstrip("\n"), "```"]
    if run.get("resolved_config"):
        lines += ["", "The config as resolved (defaults and extended files included):", "",
                  "```json", json.dumps(run["resolved_config"], indent=1, sort_keys=True),
                  "```"]
    return lines


def card_markdown(card: dict) -> str:
    """``model_card.md``: the card for a reader."""
    m, rec, onnx = card["model"], card["recipe"], card["onnx"]
    train = card["training"]
    lines = [f"# Model card: {m['file']}", "",
             f"- Backbone / net: {m.get('net') or 'not recorded'}",
             f"- Input: {rec['img_size'][0]}x{rec['img_size'][1]}x{rec['channels']}, "
             f"classes: {rec['nb_class']} (malignant = class {rec['malignant_class']})",
             f"- Source model SHA-256: `{m['sha256']}`",
             "- ONNX: " + ("written, max |onnxruntime - tf-keras| = "
                           f"{onnx['check']['max_abs_diff_vs_keras']:.3g}" if onnx["written"]
                           else f"not written: {onnx['reason']}"),
             "", "## Intended use", "", card["intended_use"], "", "## Limits", "",
             card["limits"], "", "## Input recipe", "", "```json",
             json.dumps(rec, indent=1, sort_keys=True), "```", "", "## Training", ""]
    if train["options"] is None:
        lines.append("No options file was found beside the model (a 2017 model?).")
    else:
        lines += ["Options of the training run (`" + train["options_file"] + "`):", "",
                  "```json", json.dumps(train["options"], indent=1, sort_keys=True,
                                        default=str), "```"]
    if train["image_counts"]:
        lines += ["", "Images per class in the training folders (counted at export):", ""]
        lines += [f"- {split}: {counts}" for split, counts in train["image_counts"].items()]
    lines += ["", "## Test metrics", ""] + _metrics_md(card["metrics"])
    lines += _run_md(card.get("run"))
    lines += ["", "## Software", ""] + [f"- {k}: {v}" for k, v in card["versions"].items()]
    lines += ["", "## Files (SHA-256)", ""] + [f"- `{n}`: `{h}`"
                                               for n, h in card["files"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ run
def _claim(model_file: str, out: Path, metrics: Optional[str], overwrite: bool,
           run_info: Optional[str] = None) -> "run_files.OutputManifest":
    run_files.check_run_paths(input_files={"MODEL": model_file, "--metrics": metrics,
                                           "--run-info": run_info},
                              output_files={"--out " + n: out / n for n in OUTPUT_NAMES},
                              output_dirs={"--out": out})
    manifest = run_files.OutputManifest(out, "export_model")
    manifest.check_foreign([out / n for n in OUTPUT_NAMES], overwrite)
    saved = out / SAVED_MODEL_NAME
    if saved.exists() and not manifest.wrote_before(saved / "saved_model.pb") and not overwrite:
        raise FileExistsError(f"{saved} exists and was not written by this tool; move it away "
                              f"or pass --overwrite to replace it")
    return manifest


def _load(model_file: str, trust: bool):
    from dm_keras_ext import robust_load_model

    if not Path(model_file).is_file():
        raise FileNotFoundError(f"model file {model_file} not found")
    return robust_load_model(model_file, safe_mode=not trust)


def _write_text(path: Path, text: str, manifest) -> None:
    dm_image.atomic_write(path, lambda fh: fh.write(text), text=True)
    manifest.add(path)


def export(opts: dict, given: Optional[set] = None, *, converter=None) -> dict:
    """Export ``opts["model"]`` into ``opts["out_dir"]`` (see the module docstring).

    Args:
        opts: every option of :func:`get_args_parser` by destination.
        given: the options set explicitly (None: those that differ from the defaults).
        converter: ``serve -> ONNX bytes`` used instead of :func:`convert_to_onnx`.

    Returns:
        Summary: ``out_dir``, the paths written (``onnx`` None when not written),
        ``onnx_max_abs_diff``, ``onnx_reason`` and the recipe dict.

    Raises:
        ExportError: a recipe that cannot be stated, a model that is not a whole-image
            classifier; ValueError: a bad ``--metrics`` file; FileExistsError: files named
            like the outputs that this tool did not write, without ``overwrite``.
    """
    t0 = time.time()
    model_file, out = os.fspath(opts["model"]), Path(opts["out_dir"])
    manifest = _claim(model_file, out, opts.get("metrics"), opts["overwrite"],
                      opts.get("run_info"))
    run_info = read_run_info(opts["run_info"]) if opts.get("run_info") else None
    metrics = None
    if opts.get("metrics"):
        raw = _read_json(Path(opts["metrics"]), "--metrics")
        if raw is None:
            raise FileNotFoundError(f"--metrics file {opts['metrics']} not found")
        metrics = summarize_metrics(raw, opts["metrics"])
    script_utils.import_tensorflow_quietly()
    model = _load(model_file, opts["trust_model_file"])
    channels, fixed, nb_class = _model_shape(model, model_file)
    recipe = state_recipe(model_file, opts, given, channels, fixed)
    in_model = bool(recipe.preprocess and not recipe.featurewise_center
                    and recipe.preprocess_function() is not None)
    serve = _serving_function(model, recipe, in_model)
    manifest.begin([out / n for n in OUTPUT_NAMES])
    _save_saved_model(model, serve, out / SAVED_MODEL_NAME)
    onnx_bytes, onnx_info = _onnx_export(serve, model, recipe, in_model, converter)
    if onnx_bytes is not None:
        dm_image.atomic_write(out / ONNX_NAME, lambda fh: fh.write(onnx_bytes))
        manifest.add(out / ONNX_NAME)
    for p in sorted((out / SAVED_MODEL_NAME).rglob("*")):
        (manifest.add if p.is_file() else manifest.add_dir)(p)
    manifest.add_dir(out / SAVED_MODEL_NAME)
    record = recipe_record(recipe, opts["flips"], nb_class, in_model)
    _write_text(out / RECIPE_NAME, json.dumps(record, indent=1, sort_keys=True) + "\n",
                manifest)
    card = _write_card(model_file, model, record, onnx_info, {"metrics": metrics,
                                                              "run": run_info}, out, manifest)
    manifest.finish()
    logger.info("exported %s to %s in %.1f s (ONNX %s)", model_file, out, time.time() - t0,
                "written" if onnx_bytes is not None else "not written")
    return {"out_dir": str(out), "onnx": str(out / ONNX_NAME) if onnx_bytes else None,
            "saved_model": str(out / SAVED_MODEL_NAME), "recipe_json": str(out / RECIPE_NAME),
            "model_card_md": str(out / CARD_MD), "model_card_json": str(out / CARD_JSON),
            "onnx_max_abs_diff": onnx_info.get("check", {}).get("max_abs_diff_vs_keras"),
            "onnx_reason": onnx_info.get("reason"), "recipe": record, "card": card}


def _write_card(model_file, model, record, onnx_info, given, out, manifest) -> dict:
    """Write the card; ``given``: its ``metrics`` (:func:`summarize_metrics`) and ``run``
    (:func:`read_run_info`), each None when not given."""
    import dm_keras_ext

    options, counts = _training_record(model_file)
    info = dm_keras_ext.read_model_info(model_file) or {}
    net = info.get("net") or (options or {}).get("net") or getattr(model, "name", None)
    card = build_card({
        "model": {"file": Path(model_file).name, "sha256": sha256_of(Path(model_file)),
                  "net": net, "info": info, "params": int(model.count_params())},
        "recipe": record, "onnx": onnx_info,
        "training": {"options_file": script_utils.options_json_path(model_file).name,
                     "options": options, "image_counts": counts},
        "metrics": given["metrics"], "run": given["run"], "versions": _versions(),
        "files": _file_hashes(out, manifest.files),
        "files_note": f"SHA-256 of every file this export wrote but {CARD_MD} and "
                      f"{CARD_JSON} (and the folder manifest {run_files.MANIFEST_NAME})"})
    _write_text(out / CARD_JSON, json.dumps(card, indent=1, sort_keys=True, default=str) + "\n",
                manifest)
    _write_text(out / CARD_MD, card_markdown(card), manifest)
    return card


def run(model: str, out_dir: str, **options: Any) -> dict:
    """Export ``model`` into ``out_dir``: the keyword form for Python callers (the pipeline).

    Args:
        model: the whole-image model's HDF5 file.
        out_dir: ``--out``: the export folder.
        **options: the other options by destination name (``--help``): ``flips``,
            ``metrics``, ``overwrite``, ``trust_model_file`` and the image options
            (``img_size``, ``rescale_factor``, ...; those given override the model file's
            recipe, and state it for a file without one). One more that is not a flag:
            ``given_options`` (see :func:`export`).

    Returns:
        The summary of :func:`export`: ``onnx`` (``model.onnx`` or None), ``saved_model``,
        ``recipe_json``, ``model_card_md``, ``model_card_json``, ``onnx_max_abs_diff``,
        ``onnx_reason``, ``recipe``, ``card``.
    """
    given = options.pop("given_options", None)
    converter = options.pop("converter", None)
    opts = script_utils.resolve_options(get_args_parser(), (model,),
                                        {**options, "out_dir": out_dir})
    return export(opts, set(given) if given is not None else set(options), converter=converter)


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the command-line flags (the one place their defaults live)."""
    parser = argparse.ArgumentParser(description="Export a whole-image model to ONNX and a "
                                                 "SavedModel, with its recipe and model card.")
    parser.add_argument("model", metavar="MODEL.h5", help="the whole-image model file")
    parser.add_argument("--out", dest="out_dir", required=True, metavar="DIR",
                        help="export folder (required, no default)")
    add_bool_flag(parser, "flips", False, "the scorer averages each image's probabilities "
                                          "over its 4 flips (as --test-augment)")
    # the JSON files whose content the model card shows
    for flag, name, what in (
            ("--metrics", "metrics.json", "test metrics of image_clf_predict.py or evaluate.py"),
            ("--run-info", "run_info.json", "JSON object about the run that made the model "
                                            "(its config, training command, data counts, "
                                            "learning-health warnings)")):
        parser.add_argument(flag, default=None, metavar=name,
                            help=f"{what} to put in the model card (default: none)")
    add_image_flags(parser, img_size=(), featurewise_mean=None, equalize_hist=False,
                    featurewise_center=True, from_recipe=tuple(RECIPE_OPTIONS))
    add_trust_flag(parser)
    run_files.add_overwrite_flag(parser, "--out")
    return parser


main = script_utils.tool_main(get_args_parser, run, pass_given=True)


if __name__ == "__main__":
    main()
