"""Signs that a trained model learned nothing useful, as warning records.

A report of a model that learned nothing can look polished: a patch classifier that always
answers "background" has a test accuracy equal to the background share, and an AUROC of 0.47
prints like any other number. The functions here turn such signs into warnings, each a dict
``{"code", "message", "source"}`` (``source``: the file the figures come from). The trainers
log them at the end of a run, ``report.py`` lists them in ``summary.json`` and at the top of
``report.html``, and ``run_pipeline.py --strict`` fails a run that raised any.

Codes:

- ``class_not_predicted``: a class of the test patches predicted for fewer than
  :data:`RARE_PREDICTION_SHARE` (5 %) as many patches as it has (50 malignant test patches
  need at least 3 predicted malignant; a class with recall 0.9 is always far above).
- ``accuracy_not_above_majority``: the test accuracy is not above the share of the most
  frequent class (what always answering that class scores).
- ``auroc_ci_includes_chance``: the 95 % interval of an AUROC (a patch class against the rest
  on the test patches; whole images on the test or validation set) contains 0.5, so the data do
  not show that the model ranks better than chance; ``auroc_below_chance`` when the whole
  interval is below 0.5.
- ``best_epoch_first``: a training of more than one epoch whose best validation epoch (the
  first of equal best values) is the first, so that no later epoch improved on it.
- other codes found in the ``warnings`` list of a file (:func:`file_warnings`), e.g.
  ``calibration_reverses_ranking`` of ``evaluate.py``.

Pure functions of figures and files; importing this module does not import TensorFlow.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

__all__ = ["RARE_PREDICTION_SHARE", "CHANCE_AUROC", "make_warning", "class_warnings",
           "accuracy_warnings", "auroc_warnings", "patch_test_warnings", "patch_per_class",
           "majority_share", "best_epoch_of",
           "best_epoch_warnings", "read_training_log", "training_log_warnings",
           "auroc_with_ci", "predictions_auroc", "file_warnings", "unique_warnings",
           "format_warnings"]

#: A class predicted for fewer test patches than this share of its own count is "almost never"
#: predicted.
RARE_PREDICTION_SHARE = 0.05
#: The AUROC of a score that does not rank the cases at all.
CHANCE_AUROC = 0.5

PathLike = Union[str, Path]


def make_warning(code: str, message: str, source: PathLike) -> Dict[str, str]:
    """One warning record."""
    return {"code": str(code), "message": str(message), "source": str(source)}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def class_warnings(per_class: Dict[str, dict], source: PathLike) -> List[dict]:
    """``class_not_predicted`` for each class with test cases that the model predicted for
    fewer than :data:`RARE_PREDICTION_SHARE` as many cases as it has.

    Args:
        per_class: class -> ``support`` (true cases) and ``predicted`` (cases predicted as it),
            as in ``eval_metrics.class_rates``.
        source: the file the figures come from.
    """
    out = []
    for name, rec in per_class.items():
        support, predicted = rec.get("support") or 0, rec.get("predicted") or 0
        if support <= 0 or predicted >= RARE_PREDICTION_SHARE * support:
            continue
        how = "never" if predicted == 0 else f"almost never ({predicted} times)"
        out.append(make_warning(
            "class_not_predicted",
            f"class {name!r} is {how} predicted on the test set although {support} cases are "
            f"of that class (fewer than {RARE_PREDICTION_SHARE:.0%} as many predictions as "
            f"cases): the classifier does not recognise it", source))
    return out


def accuracy_warnings(accuracy: Optional[float], majority_share: Optional[float],
                      majority_class: Optional[str], source: PathLike) -> List[dict]:
    """``accuracy_not_above_majority`` when ``accuracy`` <= ``majority_share``."""
    if not (_finite(accuracy) and _finite(majority_share)) or accuracy > majority_share:
        return []
    return [make_warning(
        "accuracy_not_above_majority",
        f"test accuracy {accuracy:.3f} is not above the share of the most frequent class "
        f"{majority_class!r} ({majority_share:.3f}), what always answering that class scores",
        source)]


def auroc_warnings(auroc: Optional[float], ci: Optional[Sequence], what: str,
                   source: PathLike) -> List[dict]:
    """``auroc_ci_includes_chance`` when the interval ``ci`` of ``what``'s AUROC contains 0.5,
    ``auroc_below_chance`` when it lies below 0.5 (the ranking is reversed); nothing when the
    AUROC or its interval is missing."""
    if not _finite(auroc) or not ci or len(ci) != 2 or not all(_finite(v) for v in ci):
        return []
    low, high = float(ci[0]), float(ci[1])
    figure = f"{what} AUROC {auroc:.3f} (95% CI {low:.3f}-{high:.3f})"
    if high < CHANCE_AUROC:
        return [make_warning("auroc_below_chance", f"{figure}: below 0.5, the scores rank "
                                                   f"the cases the wrong way round", source)]
    if low > CHANCE_AUROC:
        return []
    return [make_warning("auroc_ci_includes_chance", f"{figure}: the interval includes 0.5, "
                                                     f"so it is not shown to rank better than "
                                                     f"chance", source)]


def patch_test_warnings(metrics: dict, source: PathLike) -> List[dict]:
    """The warnings of a patch classifier's test metrics (``<best-model>.test.metrics.json``,
    ``eval_metrics.confusion_report``): classes not predicted, accuracy not above the majority
    share, per-class one-vs-rest AUROC intervals containing 0.5. A file without ``per_class``
    (written before it existed) is read from its ``counts`` and ``auroc_ovr``."""
    per_class = patch_per_class(metrics)
    out = class_warnings(per_class, source)
    out += accuracy_warnings(metrics.get("accuracy"), *majority_share(per_class), source)
    for name, rec in per_class.items():
        out += auroc_warnings(rec.get("auroc"), rec.get("auroc_ci"),
                              f"patch class {name!r} (one vs rest, test)", source)
    return out


def patch_per_class(metrics: dict) -> Dict[str, dict]:
    """The ``per_class`` figures of a patch test metrics file in the order of its ``classes``
    (derived from its ``counts`` and ``auroc_ovr`` when the file lacks them)."""
    given = metrics.get("per_class")
    if given:       # in the order of ``classes`` (a JSON file may hold its keys sorted)
        order = [c for c in metrics.get("classes") or [] if c in given]
        return {c: given[c] for c in order + sorted(set(given) - set(order))}
    import eval_metrics

    classes, counts = metrics.get("classes") or [], metrics.get("counts")
    if not classes or not counts:
        return {}
    per_class = eval_metrics.class_rates(counts, classes)
    for name in classes:
        per_class[name].update(auroc=(metrics.get("auroc_ovr") or {}).get(name), auroc_ci=None)
    return per_class


def majority_share(per_class: Dict[str, dict]):
    """(share, name) of the class with the most true cases (the accuracy of always answering
    it), or (None, None)."""
    total = sum(rec.get("support") or 0 for rec in per_class.values())
    if not total:
        return None, None
    name = max(per_class, key=lambda c: per_class[c].get("support") or 0)
    return per_class[name]["support"] / total, name


def best_epoch_of(values: Sequence[Optional[float]]) -> Optional[int]:
    """1-based epoch of the highest finite value (the first of equal ones), or None."""
    best, epoch = None, None
    for i, v in enumerate(values):
        if _finite(v) and (best is None or v > best):
            best, epoch = v, i + 1
    return epoch


def best_epoch_warnings(best_epoch: Optional[int], epochs: int, monitor: str,
                        source: PathLike) -> List[dict]:
    """``best_epoch_first`` when a training of more than one epoch had its best ``monitor``
    at epoch 1."""
    if best_epoch != 1 or epochs < 2:
        return []
    return [make_warning(
        "best_epoch_first",
        f"the best validation {monitor} of {epochs} epochs was at the first epoch: no later "
        f"epoch improved on it, so the saved model has barely trained", source)]


def read_training_log(path: PathLike) -> Dict[str, List[Optional[float]]]:
    """The columns of a trainer's ``<best-model>.log.csv`` as floats (None where empty or not
    a number)."""
    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return None

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {key: [number(r.get(key)) for r in rows] for key in (rows[0] if rows else {})}


def training_log_warnings(path: PathLike, monitor: str,
                          source: Optional[PathLike] = None) -> List[dict]:
    """:func:`best_epoch_warnings` of the ``monitor`` column of a training log (nothing when
    the file or the column is missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    values = read_training_log(path).get(monitor)
    if not values:
        return []
    return best_epoch_warnings(best_epoch_of(values), len(values), monitor,
                               source if source is not None else path)


def auroc_with_ci(labels: Sequence[int], scores: Sequence[float], n_boot: int,
                  seed: int) -> Dict:
    """``n``, ``n_pos``, ``auroc`` and its 95 % percentile bootstrap interval ``auroc_ci``
    (``eval_metrics.bootstrap_ci``; None with one class only, fewer than
    ``eval_metrics.MIN_BOOTSTRAP_CASES`` cases or ``n_boot`` 0)."""
    import numpy as np

    import eval_metrics

    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    res = {"n": int(y.size), "n_pos": int(y.sum()), "auroc": None, "auroc_ci": None}
    if not 0 < y.sum() < y.size:
        return res
    res["auroc"] = eval_metrics.roc_auc(y, s)
    if n_boot > 0 and y.size >= eval_metrics.MIN_BOOTSTRAP_CASES:
        ci = eval_metrics.bootstrap_ci(y, s, n_boot=n_boot, seed=seed)["auroc_ci"]
        res["auroc_ci"] = [float(v) for v in ci] if all(np.isfinite(ci)) else None
    return res


def predictions_auroc(path: PathLike, n_boot: int, seed: int) -> Optional[Dict]:
    """:func:`auroc_with_ci` of an ``image_predictions.csv`` of ``image_clf_predict.py``
    (its labelled rows: ``malignant_label`` 0/1 and ``malignant_pred``), or None when the
    file is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    labels, scores = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("malignant_label") in ("0", "1") and row.get("malignant_pred"):
                labels.append(int(row["malignant_label"]))
                scores.append(float(row["malignant_pred"]))
    return auroc_with_ci(labels, scores, n_boot, seed)


def file_warnings(path: PathLike, source: Optional[PathLike] = None) -> List[dict]:
    """The records of the top-level ``warnings`` list of a JSON file (such as
    ``evaluation/metrics.json``), as warning records; ``source`` defaults to the record's own
    or the file. A missing file gives none; an unreadable file or a malformed list gives one
    ``unreadable_warnings`` warning saying so, since warnings may be lost."""
    path = Path(path)
    source = str(source if source is not None else path)
    if not path.is_file():
        return []
    try:
        found = json.loads(path.read_text(encoding="utf-8")).get("warnings", [])
    except (OSError, ValueError, AttributeError) as err:
        return [make_warning("unreadable_warnings", f"cannot read the warnings of {path}: "
                                                    f"{err}", source)]
    if not isinstance(found, list):
        return [make_warning("unreadable_warnings", f"'warnings' of {path} is not a list: "
                                                    f"{found!r:.200}", source)]
    out = []
    for rec in found:
        if isinstance(rec, dict) and rec.get("code") and rec.get("message"):
            out.append(make_warning(rec["code"], rec["message"], rec.get("source") or source))
        else:
            out.append(make_warning("unreadable_warnings", f"a warning record of {path} has "
                                                           f"no code or message: {rec!r:.200}",
                                    source))
    return out


def unique_warnings(warnings: Iterable[dict]) -> List[dict]:
    """``warnings`` in order, each (code, message, source) once."""
    seen, out = set(), []
    for w in warnings:
        key = (w["code"], w["message"], w["source"])
        if key not in seen:
            seen.add(key)
            out.append(w)
    return out


def format_warnings(warnings: Sequence[dict], indent: str = "  ") -> List[str]:
    """Printed lines of warning records: ``WARNING [code] message (source)``."""
    return [f"{indent}WARNING [{w['code']}] {w['message']} ({w['source']})" for w in warnings]
