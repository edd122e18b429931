"""Evaluate prediction files as screening studies report them: levels, operating points,
calibration and model comparison.

Works on the scores of any model, not only this repository's (Shen et al., "Deep Learning to
Improve Breast Cancer Detection on Screening Mammography", Sci Rep 9, 12495 (2019);
arXiv:1708.09427). The metrics are those of ``eval_metrics.evaluate_scores``, which
``image_clf_predict.py`` uses too.

Prediction files (CSV; each ``--predictions`` file, or each ``--score-col`` of one file, is a
model):

* image level: ``image_predictions.csv`` of ``image_clf_predict.py``, or the mammography
  meta-repository's ``image_index,malignant_pred,malignant_label``; any CSV with an id column
  (``--id-col``, default ``image_index``), score column(s) (``--score-col``, default
  ``malignant_pred``) and a label column (``--label-col``, default the first of
  ``malignant_label``, ``label``, ``cancer``, ``malignant``). Rows without a score (unreadable
  images) are left out and counted.
* breast level: ``left_malignant,right_malignant`` per exam (``breast_predictions.csv``, or
  the meta-repository's output), in the order of its exam list (``--exam-list``, which gives
  the labels: ``cancer_label`` ``left_malignant`` / ``right_malignant``).

Levels: ``image``; ``breast``: the views of one breast combined by ``--breast-combine`` (mean,
as the meta-repository does, or max; a breast with a missing view uses the views it has);
``exam``: the higher of its two breast scores, positive when either breast is. Breasts and
exams come from the ``exam_index,view`` columns of our exam-list predictions, from
``--exam-list`` (image stems), or from CBIS-style names ``{patient}_{side}_{view}``; the
bootstrap then resamples patients (CBIS names) or exams (exam lists), so both breasts of a
woman move together.

Operating points: with ``--val-predictions`` (same layout, same models), thresholds are chosen
on validation per level and model (Youden's J, ``--target-sensitivity``,
``--target-specificity``) and applied unchanged to the test scores; without them the fixed
``--threshold`` is reported, named ``fixed_<threshold>``. Validation files must not share an
image or a patient with the test files. ``--calibrate platt|isotonic`` fits a recalibration
on the validation scores and applies it to the test scores, unless the map would reverse the
ranking (then it is refused, with a ``calibration_reverses_ranking`` warning).

An image given twice with different scores or labels is an error; the same row twice is
counted once (a ``repeated_rows`` warning).

Outputs in ``--out-dir``: ``metrics.json`` (``<level>`` -> ``<model>`` -> the
``evaluate_scores`` dict with ``n_unlabelled``; ``comparisons`` -> ``<level>`` -> AUROC
differences with paired bootstrap intervals and DeLong's test, with Obuchowski's clustered
variance when a patient has several cases; ``warnings``, a list of ``{"code", "level",
"model", "message"}``; ``settings``), ``roc_<level>[_<model>].png``,
``pr_...png``, ``reliability_...png``; with ``--calibrate``
``calibrated_<level>.csv`` and ``calibration_<level>.json``. A table goes to stdout.

Example::

    python evaluate.py --predictions predictions/image_predictions.csv \\
        --val-predictions val_predictions/image_predictions.csv --calibrate platt \\
        --out-dir evaluation
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import eval_metrics as em  # noqa: E402
import common_flags as cf  # noqa: E402
from ddsm_names import EXAM_SIDES, EXAM_VIEWS, exam_view_side, parse_image_name  # noqa: E402
from dm_image import atomic_write  # noqa: E402
import run_options  # noqa: E402
from script_utils import read_csv_table  # noqa: E402

__all__ = ["Cases", "LEVELS", "load_predictions", "merge_models", "level_tables",
           "choose_operating_points", "evaluate_tables", "format_table", "options_class",
           "run", "evaluate_predictions",
           "get_args_parser", "main"]

logger = logging.getLogger(__name__)

LEVELS = ("image", "breast", "exam")
_LABEL_COLUMNS = ("malignant_label", "label", "cancer", "malignant")
_COMBINE = {"mean": "mean", "max": "max"}

PathLike = Union[str, os.PathLike]


@dataclass
class Cases:
    """Scored cases of one or more models.

    ``table`` has ``case`` (id), ``label`` (float 0/1, NaN unknown), ``patient``, ``breast``
    and ``exam`` (group keys, None when unknown) and one float column per model (NaN: not
    scored); ``level`` is ``image`` or ``breast`` (what one row is); ``models`` names the
    score columns; ``notes`` says what was left out; ``warnings`` holds the same as entries
    of the ``warnings`` list of ``metrics.json``; ``patients_known`` is True when the patient
    ids are real ones (CBIS names, a ``patient_id`` column), not exam numbers of one file.
    """
    table: pd.DataFrame
    level: str
    models: List[str]
    notes: List[str] = field(default_factory=list)
    warnings: List[dict] = field(default_factory=list)
    patients_known: bool = False


def _warning(code: str, message: str, level: Optional[str] = None,
             model: Optional[str] = None) -> dict:
    """One entry of the ``warnings`` list of ``metrics.json``."""
    return {"code": code, "level": level, "model": model, "message": message}


# ------------------------------------------------------------------------------ reading
def _to_float(series: pd.Series, what: str, path: PathLike) -> np.ndarray:
    vals = pd.to_numeric(series.replace("", np.nan), errors="coerce")
    bad = vals.isna() & series.ne("") & series.notna()
    if bad.any():
        raise ValueError(f"{path}: {what} should be numbers, got {series[bad].iloc[0]!r}")
    return vals.to_numpy(dtype=float)


def _labels(series: pd.Series, path: PathLike, col: str) -> np.ndarray:
    y = _to_float(series, f"labels in column {col!r}", path)
    bad = np.isfinite(y) & ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"{path}: labels in column {col!r} should be 0 or 1, got "
                         f"{y[bad][0]:g}")
    return y


def _exam_label(exam: dict, side: str) -> float:
    raw = (exam.get("cancer_label") or {}).get(f"{side}_malignant")
    return np.nan if raw is None or str(raw).strip() == "" else float(raw)


def _stem(name: str) -> str:
    base = str(name).replace("\\", "/")
    return re.sub(r"\.(png|jpe?g|dcm|tiff?)$", "", base, flags=re.IGNORECASE)


def _breast_file(df: pd.DataFrame, path: PathLike, exams: Optional[list], name: str) -> Cases:
    if exams is None:
        raise ValueError(f"{path}: a breast-level file (left_malignant, right_malignant) needs "
                         f"--exam-list for its labels")
    if len(df) != len(exams):
        raise ValueError(f"{path}: {len(df)} rows but the exam list has {len(exams)} exams")
    rows = []
    for k, (exam, rec) in enumerate(zip(exams, df.to_dict("records"))):
        for side in EXAM_SIDES:
            rows.append({"case": f"exam{k}/{side}", "label": _exam_label(exam, side),
                         "patient": f"exam{k}", "breast": f"exam{k}/{side}",
                         "exam": f"exam{k}", name: rec[f"{side}_malignant"]})
    table = pd.DataFrame(rows)
    table[name] = _to_float(table[name].astype(str), "scores", path)
    return Cases(table, "breast", [name])


def load_predictions(path: PathLike, score_cols: Optional[Sequence[str]] = None,
                     label_col: Optional[str] = None, id_col: str = "image_index",
                     exam_list: Optional[PathLike] = None,
                     name: Optional[str] = None) -> Cases:
    """Read one prediction file (see the module docstring for the layouts).

    Args:
        path: the CSV.
        score_cols: score columns, one model each (default ``malignant_pred``).
        label_col: label column (default: the first of ``malignant_label``, ``label``,
            ``cancer``, ``malignant``; with an exam list, its labels when the file has none).
        id_col: the column naming each image.
        exam_list: meta-repository exam list (pickle or JSON) for breasts, exams and labels.
        name: model name of a single score column (default: the column's name, or for a
            breast-level file the file's stem).

    Raises:
        ValueError: missing columns, bad labels or scores, rows that do not match the exam
            list (messages name the file).
    """
    df = read_csv_table(path)
    exams = None
    if exam_list is not None:
        from image_clf_predict import load_exam_list

        exams = load_exam_list(exam_list)
    if {"left_malignant", "right_malignant"} <= set(df.columns):
        return _breast_file(df, path, exams, name or Path(path).stem)
    score_cols = list(score_cols or ["malignant_pred"])
    missing = [c for c in [id_col, *score_cols] if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (columns: "
                         f"{[c for c in df.columns if c != '_line']}); name them with "
                         f"--id-col / --score-col")
    names = [name] if name and len(score_cols) == 1 else score_cols
    table = pd.DataFrame({"case": df[id_col].astype(str)})
    for col, model in zip(score_cols, names):
        table[model] = _to_float(df[col], f"scores in column {col!r}", path)
    label_col = label_col or next((c for c in _LABEL_COLUMNS if c in df.columns), None)
    if label_col is not None and label_col not in df.columns:
        raise ValueError(f"{path}: no label column {label_col!r}")
    table["label"] = _labels(df[label_col], path, label_col) if label_col else np.nan
    table["patient"] = table["breast"] = table["exam"] = None
    known = False
    if {"exam_index", "view"} <= set(df.columns):
        ex = "exam" + df["exam_index"].astype(str)
        table["exam"] = table["patient"] = ex
        table["breast"] = ex + "/" + df["view"].str[0].map({"L": "left", "R": "right"})
    elif exams is not None:
        _from_exam_list(table, exams, path)
    else:
        parts = [parse_image_name(c) for c in table["case"]]
        if all(p is not None for p in parts) and parts:
            table["patient"] = table["exam"] = [p.patient for p in parts]
            table["breast"] = [f"{p.patient}_{p.side}" for p in parts]
            known = True
    if "patient_id" in df.columns:
        table["patient"] = df["patient_id"].astype(str)
        known = True
    cases = Cases(table, "image", list(names), patients_known=known)
    return _drop_unscored(_drop_repeats(cases, df["_line"], path), path)


def _drop_repeats(cases: Cases, lines: pd.Series, path: PathLike) -> Cases:
    """Keep one row of an image given twice with the same scores and label (a warning);
    refuse one given twice with different ones."""
    t = cases.table
    rep = t["case"].duplicated(keep=False)
    if not rep.any():
        return cases
    cols = ["label", *cases.models]
    for case, rows in t[rep].groupby("case", sort=False):
        vals = rows[cols].to_numpy(dtype=float)
        same = np.all((vals == vals[0]) | (np.isnan(vals) & np.isnan(vals[0])), axis=1)
        if not same.all():
            other = rows.index[int(np.argmin(same))]
            raise ValueError(f"{path}: image {case!r} is given twice with different scores "
                             f"or labels ({lines[rows.index[0]]} and {lines[other]})")
    first = t[rep].groupby("case", sort=False).head(1).index
    n = int(rep.sum() - len(first))
    msg = (f"{path}: {n} repeated row(s) of {len(first)} image(s) with the same scores left "
           f"out, each image counted once (e.g. {t.loc[first[0], 'case']!r})")
    cases.notes.append(msg)
    cases.warnings.append(_warning("repeated_rows", msg))
    logger.warning("%s", msg)
    cases.table = t[~rep | t.index.isin(first)].reset_index(drop=True)
    return cases


def _from_exam_list(table: pd.DataFrame, exams: list, path: PathLike) -> None:
    where = {}
    for k, exam in enumerate(exams):
        for view in EXAM_VIEWS:
            side = exam_view_side(view)
            for stem in exam.get(view, []):
                where[_stem(stem)] = (k, side, _exam_label(exam, side))
    keys = [where.get(_stem(c)) for c in table["case"]]
    unknown = [c for c, k in zip(table["case"], keys) if k is None]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} image(s) not in the exam list, e.g. "
                         f"{unknown[0]!r}")
    table["exam"] = table["patient"] = [f"exam{k[0]}" for k in keys]
    table["breast"] = [f"exam{k[0]}/{k[1]}" for k in keys]
    if not np.isfinite(table["label"]).any():
        table["label"] = [k[2] for k in keys]


def _drop_unscored(cases: Cases, path: PathLike) -> Cases:
    scored = np.isfinite(cases.table[cases.models].to_numpy(dtype=float)).any(axis=1)
    if not scored.all():
        cases.notes.append(f"{path}: {int((~scored).sum())} row(s) without a score left out")
        logger.warning("%s", cases.notes[-1])
        cases.table = cases.table[scored].reset_index(drop=True)
    if cases.table.empty:
        raise ValueError(f"{path}: no scored row")
    return cases


def merge_models(parts: Sequence[Cases]) -> Cases:
    """One :class:`Cases` of several files' models, joined on the case id (cases that some
    file lacks are left out, with a note); labels must agree where both files have one.

    Raises:
        ValueError: different levels, repeated model names, or conflicting labels.
    """
    out = parts[0]
    for other in parts[1:]:
        if other.level != out.level:
            raise ValueError(f"prediction files of different levels ({out.level}, "
                             f"{other.level}) cannot be compared")
        dup = set(out.models) & set(other.models)
        if dup:
            raise ValueError(f"model name(s) {sorted(dup)} given twice: name the models with "
                             f"--names")
        right = other.table[["case", "label", *other.models]].rename(columns={"label": "_lab"})
        table = out.table.merge(right, on="case", how="inner")
        both = np.isfinite(table["label"]) & np.isfinite(table["_lab"])
        if (table.loc[both, "label"] != table.loc[both, "_lab"]).any():
            case = table.loc[both & (table["label"] != table["_lab"]), "case"].iloc[0]
            raise ValueError(f"the prediction files disagree on the label of {case!r}")
        table["label"] = table["label"].fillna(table["_lab"])
        notes = out.notes + other.notes
        lost = max(len(out.table), len(other.table)) - len(table)
        if lost:
            notes.append(f"{lost} case(s) not in every prediction file left out")
        out = Cases(table.drop(columns="_lab"), out.level, out.models + other.models, notes,
                    out.warnings + other.warnings, out.patients_known)
    return out


def level_tables(cases: Cases, breast_combine: str = "mean") -> Dict[str, pd.DataFrame]:
    """The case tables of each level the cases allow (see the module docstring).

    Returns:
        ``{"image": ..., "breast": ..., "exam": ...}`` (only levels the groups allow), each
        with ``case``, ``label``, ``patient`` and one column per model.
    """
    if breast_combine not in _COMBINE:
        raise ValueError(f"breast_combine should be one of {sorted(_COMBINE)}, got "
                         f"{breast_combine!r}")
    t = cases.table
    out = {}
    if cases.level == "image":
        out["image"] = t[["case", "label", "patient", *cases.models]]
    if t["breast"].isna().any():
        return out
    breast = t if cases.level == "breast" else _combine(t, "breast", cases.models,
                                                        breast_combine)
    out["breast"] = breast[["case", "label", "patient", *cases.models]] \
        if cases.level == "breast" else breast
    out["exam"] = _combine(breast.assign(exam=breast["case"].map(
        dict(zip(t["breast"], t["exam"])))), "exam", cases.models, "max")
    return out


def _combine(t: pd.DataFrame, key: str, models: List[str], how: str) -> pd.DataFrame:
    agg = {m: how for m in models}
    agg.update(label=lambda v: v.max(skipna=True), patient="first")
    out = t.groupby(key, sort=False).agg(agg).reset_index().rename(columns={key: "case"})
    return out[["case", "label", "patient", *models]]


# ------------------------------------------------------------------------------ metrics
def _labelled(t: pd.DataFrame, model: str):
    y, s = t["label"].to_numpy(dtype=float), t[model].to_numpy(dtype=float)
    keep = np.isfinite(y) & np.isfinite(s)
    groups = t["patient"].to_numpy()[keep]
    return (y[keep].astype(int), s[keep],
            None if pd.isna(groups).any() or not len(groups) else groups.astype(str))


def choose_operating_points(val: pd.DataFrame, model: str, target_sensitivity: float,
                            target_specificity: float) -> Dict[str, float]:
    """Thresholds chosen on the validation table of one level (empty when it lacks a class):
    ``youden``, ``sensitivity_<target>``, ``specificity_<target>``."""
    y, s, _ = _labelled(val, model)
    if em.degenerate_reason(y, s):
        logger.warning("validation %s: %s; the fixed threshold is used", model,
                       em.degenerate_reason(y, s))
        return {}
    return {"youden": em.choose_threshold(y, s, "youden"),
            f"sensitivity_{target_sensitivity:g}": em.choose_threshold(
                y, s, "sensitivity", target_sensitivity),
            f"specificity_{target_specificity:g}": em.choose_threshold(
                y, s, "specificity", target_specificity)}


@dataclass
class _Run:
    """What every level and model of one evaluation shares."""
    out: Path
    calibrate: Optional[str]
    threshold: float
    targets: tuple
    bootstrap: int
    seed: int
    warnings: List[dict] = field(default_factory=list)


def evaluate_tables(tables: Dict[str, pd.DataFrame], models: List[str], out: Path,
                    val_tables: Optional[Dict[str, pd.DataFrame]] = None,
                    calibrate: Optional[str] = None, threshold: float = 0.5,
                    target_sensitivity: float = 0.9, target_specificity: float = 0.9,
                    bootstrap: int = 2000, seed: int = 12345) -> dict:
    """Metrics, comparisons, plots and calibration files of every level and model.

    Returns:
        The ``metrics.json`` content (without ``settings``), with ``warnings``: a list of
        ``{"code", "level", "model", "message"}`` (``calibration_reverses_ranking``: a
        recalibration map refused because it would reverse the ranking of the scores;
        ``unlabelled_cases``; ``delong_not_defined``: a comparison without a p-value).
    """
    ctx = _Run(out, calibrate, threshold, (target_sensitivity, target_specificity), bootstrap,
               seed)
    metrics, comparisons = {}, {}
    for level, t in tables.items():
        metrics[level], maps = {}, {}
        val = (val_tables or {}).get(level)
        for model in models:
            res = _evaluate_model(ctx, level, t, val, model, maps, len(models) == 1)
            if res is not None:
                metrics[level][model] = res
        if maps:
            files = _write_calibrated(t, maps, out, level)
            for model in maps:
                metrics[level][model]["calibration"]["calibrated"].update(files)
        comparisons[level] = _compare(t, models, bootstrap, seed)
        ctx.warnings += [_warning("delong_not_defined", f"{c['a']} - {c['b']}: DeLong's test "
                                  f"{c['delong_note']}", level)
                         for c in comparisons[level] if c.get("delong_note")]
    if len(models) > 1:
        metrics["comparisons"] = comparisons
    metrics["warnings"] = ctx.warnings
    return metrics


def _evaluate_model(ctx: _Run, level: str, t: pd.DataFrame, val: Optional[pd.DataFrame],
                    model: str, maps: dict, alone: bool) -> Optional[dict]:
    """The figures and plots of one model at one level (None without a labelled case); a
    fitted calibration map that is applied goes into ``maps``."""
    y, s, groups = _labelled(t, model)
    if not y.size:
        return None
    points = choose_operating_points(val, model, *ctx.targets) if val is not None else {}
    res = em.evaluate_scores(y, s, threshold=ctx.threshold, val_thresholds=points,
                             n_boot=ctx.bootstrap, seed=ctx.seed, groups=groups)
    _count_unlabelled(ctx, res, t, level, model)
    if val is not None and not points:
        res["notes"].append("validation scores lack a class at this level: fixed threshold")
    suffix = level if alone else f"{level}_{_safe(model)}"
    extra = None
    if ctx.calibrate and val is not None:
        cal = _calibrate(ctx, val, t, (level, model), res)
        if cal is not None:
            maps[model] = cal
            extra = {f"{ctx.calibrate} calibrated": cal.apply(s)}
    if res["auroc"] is not None:
        roc, pr = em.plot_roc_pr(y, s, ctx.out / f"roc_{suffix}.png",
                                 ctx.out / f"pr_{suffix}.png", title=f"{level} {model}",
                                 metrics=_marked_points(res))
        res.update(roc_png=str(roc), pr_png=str(pr))
    if "ece" in res["calibration"]:
        fig = em.reliability_figure(y, s, f"{level} {model}", extra=extra)
        res["reliability_png"] = str(em.save_figure(fig, ctx.out / f"reliability_{suffix}.png"))
    return res


def _count_unlabelled(ctx: _Run, res: dict, t: pd.DataFrame, level: str, model: str) -> None:
    """``n_unlabelled``: scored cases without a label, left out (a note and a warning)."""
    scored = np.isfinite(t[model].to_numpy(dtype=float))
    n = int((scored & ~np.isfinite(t["label"].to_numpy(dtype=float))).sum())
    res["n_unlabelled"] = n
    if n:
        msg = f"{n} scored case(s) without a label left out"
        res["notes"].append(msg)
        ctx.warnings.append(_warning("unlabelled_cases", msg, level, model))


def _marked_points(res: dict) -> dict:
    """``res`` with the operating points to mark on the curves: each validation-chosen one
    (labelled so), else the fixed threshold (labelled as not chosen on validation)."""
    points = []
    for name, p in res["operating_points"].items():
        if p["chosen_on"] == "validation":
            rule = "Youden" if name == "youden" else name.replace("_", " >= ")
            label = f"{rule}, threshold {p['threshold']:.2f} chosen on validation"
        else:
            label = f"fixed threshold {p['threshold']:.2f}, not chosen on validation"
        points.append({"label": label, **{k: p[k] for k in ("threshold", "sensitivity",
                                                              "specificity")}})
    return {**res, "points": points}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _compare(t: pd.DataFrame, models: List[str], bootstrap: int, seed: int) -> List[dict]:
    """The first model against each other one, on the cases all models scored."""
    rows = []
    if len(models) < 2:
        return rows
    sub = t[np.isfinite(t[models].to_numpy(dtype=float)).all(axis=1)]
    y, _, groups = _labelled(sub, models[0])
    reason = em.degenerate_reason(y, None)
    for other in models[1:]:
        row = {"a": models[0], "b": other, "n": int(y.size)}
        if reason:
            row["note"] = reason
        else:
            keep = np.isfinite(sub["label"].to_numpy(dtype=float))
            row.update(em.paired_auroc_difference(
                y, sub[models[0]].to_numpy(float)[keep], sub[other].to_numpy(float)[keep],
                n_boot=bootstrap, seed=seed, groups=groups))
        rows.append(row)
    return rows


def _calibrate(ctx: _Run, val: pd.DataFrame, t: pd.DataFrame, where: tuple,
               res: dict) -> Optional[em.Calibrator]:
    """Fit ``ctx.calibrate`` on the validation scores of the model at ``where`` (level,
    model); add the calibrated test scores' ECE and Brier score to ``res["calibration"]``;
    return the fitted map. None when the validation scores lack a class, or when the map
    would reverse the ranking: then it is not applied (``res["calibration"]["refused"]``, a
    note and a ``calibration_reverses_ranking`` warning)."""
    method, (level, model) = ctx.calibrate, where
    yv, sv, _ = _labelled(val, model)
    if em.degenerate_reason(yv, sv):
        res["notes"].append(f"no {method} calibration: validation {em.degenerate_reason(yv, sv)}")
        return None
    cal = em.Calibrator(method).fit(yv, sv)
    if cal.reverses_ranking():
        msg = (f"{method} calibration refused, not applied: the map fitted on validation "
               f"decreases (higher scores would get lower probabilities), so the validation "
               f"scores rank the cases the wrong way round")
        res["calibration"]["refused"] = {"method": method, "reason": msg, "map": cal.to_json()}
        res["notes"].append(msg)
        ctx.warnings.append(_warning("calibration_reverses_ranking", msg, level, model))
        logger.warning("%s %s: %s", level, model, msg)
        return None
    y, s, _ = _labelled(t, model)
    cs = cal.apply(s)
    res["calibration"]["calibrated"] = {"method": method,
                                        "ece": em.expected_calibration_error(y, cs),
                                        "brier": em.brier_score(y, cs)}
    return cal


def _write_calibrated(t: pd.DataFrame, maps: Dict[str, em.Calibrator], out: Path,
                      level: str) -> Dict[str, str]:
    """``calibrated_<level>.csv`` (case, label, ``<model>_calibrated``) and
    ``calibration_<level>.json`` (model -> fitted map)."""
    table = t[["case", "label"]].copy()
    for model, cal in maps.items():
        s = t[model].to_numpy(dtype=float)
        table[f"{model}_calibrated"] = np.where(np.isfinite(s), cal.apply(np.nan_to_num(s)),
                                                np.nan)
    csv = atomic_write(out / f"calibrated_{level}.csv",
                       lambda fh: table.to_csv(fh, index=False, float_format="%.6g"), text=True)
    js = em.write_json_atomic({m: c.to_json() for m, c in maps.items()},
                              out / f"calibration_{level}.json")
    return {"csv": str(csv), "map_json": str(js)}


# ------------------------------------------------------------------------------ summary
def _ci_text(ci) -> str:
    if not ci or ci[0] is None:
        return ""
    return f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"


def _num(value, ci=None) -> str:
    return "-" if value is None else f"{value:.3f}{_ci_text(ci)}"


def format_table(metrics: dict) -> str:
    """The short stdout table: per level and model the AUCs, pF1, calibration and each
    operating point, then the comparisons (95% intervals as ``[95% CI a, b]``, 3 decimals)
    and the warnings that concern no single level."""
    lines = []
    for level in LEVELS:
        for model, r in metrics.get(level, {}).items():
            lines += _model_lines(level, model, r)
    for level, rows in metrics.get("comparisons", {}).items():
        lines += [_comparison_line(level, c) for c in rows]
    lines += [f"warning: {w['message']}" for w in metrics.get("warnings", [])
              if w.get("level") is None]
    return "\n".join(lines)


def _model_lines(level: str, model: str, r: dict) -> List[str]:
    cal = r["calibration"]
    lines = [f"{level} {model}: n={r['n']} ({r['n_pos']} positive) AUROC "
             f"{_num(r['auroc'], r['auroc_ci'])}  AUPRC {_num(r['auprc'], r['auprc_ci'])}  "
             f"pF1 {_num(r['pf1'], r['pf1_ci'])}  ECE {_num(cal.get('ece'))}  Brier "
             f"{_num(cal.get('brier'))}"]
    if cal.get("calibrated"):
        c = cal["calibrated"]
        lines.append(f"  {c['method']} calibrated (map fitted on validation): ECE "
                     f"{_num(c.get('ece'))}  Brier {_num(c.get('brier'))}")
    for name, p in r["operating_points"].items():
        where = "chosen on validation" if p["chosen_on"] == "validation" else \
            "fixed, not chosen on validation"
        lines.append(f"  {name} threshold {p['threshold']:.4g} ({where}): sens "
                     f"{_num(p['sensitivity'], p.get('sensitivity_ci'))} spec "
                     f"{_num(p['specificity'], p.get('specificity_ci'))} PPV "
                     f"{_num(p['ppv'], p.get('ppv_ci'))} NPV "
                     f"{_num(p['npv'], p.get('npv_ci'))} F1 {_num(p['f1'], p.get('f1_ci'))}")
    for f, v in r["sensitivity_at_specificity"].items():
        w = r["specificity_at_sensitivity"][f]
        lines.append(f"  at specificity {f}: sens {_num(v['value'], v['ci'])}; at "
                     f"sensitivity {f}: spec {_num(w['value'], w['ci'])}")
    return lines + [f"  note: {n}" for n in r["notes"]]


def _comparison_line(level: str, c: dict) -> str:
    head = f"{level} {c['a']} - {c['b']}: "
    if "difference" not in c:
        return head + c["note"]
    clustered = c.get("variance_method", "").startswith("Obuchowski")
    test = "DeLong (Obuchowski clustered variance)" if clustered else "DeLong"
    if c.get("p_value") is None:
        stat = f"{test} {c.get('delong_note', 'not defined')}"
    else:
        stat = f"{test} z {c['z']:.2f} p {c['p_value']:.3g}"
    return head + f"AUROC difference {_num(c['difference'], c['difference_ci'])}, {stat}"


# ------------------------------------------------------------------------------ run
def _load_all(files, score_col, label_col, id_col, exam_list, names) -> Cases:
    parts = []
    if not names and len(files) > 1 and not (score_col and len(score_col) > 1):
        stems = [Path(f).stem for f in files]     # several files: one model each, named by
        names = stems if len(set(stems)) == len(stems) else [   # file, or by folder
            f"{Path(f).parent.name}/{Path(f).stem}" for f in files]
    for k, path in enumerate(files):
        one = names[k] if names and len(files) > 1 else (
            names[0] if names and not score_col or names and len(score_col) == 1 else None)
        parts.append(load_predictions(path, score_col, label_col, id_col, exam_list, one))
    if names and len(files) == 1 and score_col and len(score_col) > 1:
        if len(names) != len(score_col):
            raise ValueError(f"--names gives {len(names)} names for {len(score_col)} "
                             f"--score-col columns")
        parts[0].table = parts[0].table.rename(columns=dict(zip(score_col, names)))
        parts[0].models = list(names)
    return merge_models(parts)


def _check(opts) -> None:
    """Refuse option values that cannot be evaluated (messages name the flag)."""
    if not opts.predictions:
        raise ValueError("give at least one --predictions file")
    if opts.val_predictions and len(opts.val_predictions) != len(opts.predictions):
        raise ValueError(f"--val-predictions should give one file per --predictions file "
                         f"({len(opts.predictions)}), got {len(opts.val_predictions)}")
    if opts.names and len(opts.predictions) > 1 and len(opts.names) != len(opts.predictions):
        raise ValueError(f"--names gives {len(opts.names)} names for {len(opts.predictions)} "
                         f"files")
    if opts.calibrate is not None and not opts.val_predictions:
        raise ValueError(f"--calibrate {opts.calibrate} needs --val-predictions to fit on")
    if not 0 <= opts.threshold <= 1:
        raise ValueError(f"--threshold should be in [0, 1], got {opts.threshold}")
    if opts.bootstrap < 0:
        raise ValueError(f"--bootstrap should be >= 0, got {opts.bootstrap}")
    for flag, v in (("target-sensitivity", opts.target_sensitivity),
                    ("target-specificity", opts.target_specificity)):
        if not 0 < v <= 1:
            raise ValueError(f"--{flag} should be in (0, 1], got {v}")
    if opts.calibrate is not None and opts.calibrate not in em.CALIBRATION_METHODS:
        raise ValueError(f"--calibrate should be one of {em.CALIBRATION_METHODS}, got "
                         f"{opts.calibrate!r}")


def run(predictions: Sequence[PathLike], out_dir: Optional[PathLike] = None,
        **options) -> dict:
    """Evaluate prediction files and write ``metrics.json``, plots and calibration files.

    The keyword form kept for Python callers: it completes the options with the parser's
    defaults and calls :func:`evaluate_predictions`.

    Args:
        predictions: prediction CSV(s) of the test cases; each file is a model (or each
            ``score_col`` of a single file).
        out_dir: output folder (created; default: the ``--out-dir`` default).
        **options: the other command-line options by destination name (``val_predictions``,
            ``exam_list``, ``score_col``, ``threshold``, ``bootstrap``, ``quiet``...; see
            :func:`get_args_parser` and :func:`evaluate_predictions`); missing ones take the
            parser's defaults.

    Returns:
        dict: ``metrics`` (the ``metrics.json`` content), ``metrics_json``, ``table``.

    Raises:
        ValueError: an unknown option (naming the valid ones), bad option values or bad
            prediction files (nothing is written then).
    """
    if out_dir is not None:
        options["out_dir"] = out_dir
    resolved = script_utils.resolve_options(
        get_args_parser(), (), {**options, "predictions": [str(p) for p in predictions or []]})
    return evaluate_predictions(run_options.options_from(options_class(), resolved))


def evaluate_predictions(opts: run_options.RunOptions) -> dict:
    """Evaluate the prediction files of ``opts`` (an :func:`options_class` object) and write
    ``metrics.json``, plots and calibration files in ``opts.out_dir``.

    The fields (the flags of :func:`get_args_parser`): ``predictions``, the test prediction
    CSV(s), one model each (or each ``score_col`` of a single file); ``val_predictions``, the
    same models' validation predictions, one file per test file, on which operating points
    and calibration are fitted; ``exam_list`` / ``val_exam_list``, meta-repository exam lists
    of the test / validation files (breasts, exams and labels; the validation one defaults to
    ``exam_list``); ``score_col``, ``label_col``, ``id_col``, column names (see
    :func:`load_predictions`); ``names``, model names (one per file, or per ``score_col``);
    ``breast_combine``, ``mean`` or ``max`` of the views of a breast; ``threshold``, the fixed
    operating point used without validation predictions; ``target_sensitivity`` /
    ``target_specificity``, targets of the validation-chosen thresholds; ``calibrate``,
    ``platt`` or ``isotonic`` (needs ``val_predictions``) or None; ``bootstrap``, resamples
    (0: no intervals); ``seed``, the bootstrap seed; ``quiet``, do not print the table;
    ``out_dir``, the output folder (created).

    Returns:
        dict: ``metrics`` (the ``metrics.json`` content), ``metrics_json``, ``table``.

    Raises:
        ValueError: bad option values or prediction files, validation files that are the
            test files or share an image or a patient with them (nothing is written then).
    """
    _check(opts)
    cases, tables, val_tables, warnings = _load_levels(opts)
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_tables(tables, cases.models, out, val_tables, opts.calibrate,
                              opts.threshold, opts.target_sensitivity,
                              opts.target_specificity, opts.bootstrap, opts.seed)
    metrics["warnings"] = warnings + metrics["warnings"]
    _note_same_levels(metrics, tables)
    metrics["settings"] = _settings(opts, cases, tables)
    path = em.write_json_atomic(metrics, out / "metrics.json")
    table = format_table(metrics)
    if not opts.quiet:
        print(table)
    logger.info("metrics in %s", path)
    return {"metrics": em._json_clean(metrics), "metrics_json": str(path), "table": table}


def _load_levels(opts):
    """The test cases, their level tables, the validation level tables (None without
    ``val_predictions``) and the warnings of reading both."""
    cases = _load_all(opts.predictions, opts.score_col, opts.label_col, opts.id_col,
                      opts.exam_list, opts.names)
    tables = level_tables(cases, opts.breast_combine)
    val_tables, warnings = None, list(cases.warnings)
    if opts.val_predictions:
        _check_distinct_files(opts.predictions, opts.val_predictions)
        val = _load_all(opts.val_predictions, opts.score_col, opts.label_col, opts.id_col,
                        opts.val_exam_list or opts.exam_list, opts.names)
        if val.models != cases.models:
            raise ValueError(f"validation models {val.models} differ from test models "
                             f"{cases.models}")
        _check_disjoint(cases, val, opts.predictions[0], opts.val_predictions[0])
        val_tables = level_tables(val, opts.breast_combine)
        warnings += val.warnings
    if not any(np.isfinite(t["label"].to_numpy(dtype=float)).any() for t in tables.values()):
        raise ValueError(f"{opts.predictions[0]}: no labelled case (give --label-col or "
                         f"--exam-list)")
    return cases, tables, val_tables, warnings


def _check_distinct_files(test: Sequence[PathLike], val: Sequence[PathLike]) -> None:
    """Refuse a validation file that is one of the test files."""
    for v in val:
        for t in test:
            if os.path.exists(v) and os.path.exists(t) and os.path.samefile(v, t):
                raise ValueError(f"--val-predictions {v} is the test file {t}: thresholds and "
                                 f"calibration would be fitted on the test cases")


def _check_disjoint(test: Cases, val: Cases, test_path: PathLike, val_path: PathLike) -> None:
    """Refuse validation cases that share an image or a patient with the test cases (image
    ids of image-level files; patient ids where both files name real patients)."""
    what = []
    if test.level == val.level == "image":
        what.append(("image", test.table["case"], val.table["case"]))
    if test.patients_known and val.patients_known:
        what.append(("patient", test.table["patient"], val.table["patient"]))
    for kind, a, b in what:
        shared = sorted(set(a.dropna().astype(str)) & set(b.dropna().astype(str)))
        if shared:
            raise ValueError(f"--val-predictions {val_path} and --predictions {test_path} "
                             f"share {len(shared)} {kind}(s), e.g. {shared[0]!r}: validation "
                             f"cases must not be test cases")


def _note_same_levels(metrics: dict, tables: Dict[str, pd.DataFrame]) -> None:
    """A note at the breast level when every breast has one image (one view per breast, as
    in data of MLO films only), so that its figures repeat the image level's. A note, not a
    warning: the figures are right, only not a second opinion."""
    if "image" not in tables or "breast" not in tables or \
            len(tables["image"]) != len(tables["breast"]):
        return
    msg = "every breast has one image: the breast level repeats the image level"
    for res in metrics.get("breast", {}).values():
        res["notes"].append(msg)


def _settings(opts, cases: Cases, tables: Dict[str, pd.DataFrame]) -> dict:
    """The ``settings`` entry of ``metrics.json``."""
    return {
        "predictions": [str(p) for p in opts.predictions],
        "val_predictions": [str(p) for p in opts.val_predictions or []],
        "models": cases.models, "levels": list(tables), "breast_combine": opts.breast_combine,
        "exam_combine": "max", "threshold_rules": {
            "youden": "maximises sensitivity + specificity - 1 on validation",
            "sensitivity_<t>": "highest validation threshold with sensitivity >= t",
            "specificity_<t>": "lowest validation threshold with specificity >= t",
            "fixed_<t>": "the fixed --threshold, used without validation predictions"},
        "positive_if": "score >= threshold", "bootstrap": opts.bootstrap, "seed": opts.seed,
        "calibrate": opts.calibrate, "notes": cases.notes}


# ------------------------------------------------------------------------------ command line
def get_args_parser() -> argparse.ArgumentParser:
    """Parser of the command-line flags: the one declaration of each option (type, default,
    help) of :func:`run` and :func:`options_class`."""
    p = argparse.ArgumentParser(description="Evaluate prediction files: levels, operating "
                                            "points, calibration, model comparison.")
    p.add_argument("--predictions", nargs="+", required=True, metavar="CSV",
                   help="test prediction file(s), one model each (required, no default)")
    p.add_argument("--val-predictions", nargs="+", metavar="CSV",
                   help="validation predictions of the same models, one per test file: "
                        "thresholds and calibration are fitted on them (default: none; the "
                        "fixed --threshold is reported)")
    p.add_argument("--exam-list", help="meta-repository exam list (data.pkl or .json) of the "
                                       "test files: breasts, exams and labels (default: none)")
    p.add_argument("--val-exam-list", help="exam list of the validation files (default: "
                                           "--exam-list)")
    p.add_argument("--score-col", nargs="+", help="score column(s), one model each (default: "
                                                  "malignant_pred)")
    p.add_argument("--label-col", help="column holding each case's true label, 1 positive and 0 "
                                       "negative (default: malignant_label, label, cancer or "
                                       "malignant, whichever is present)")
    p.add_argument("--id-col", default="image_index",
                   help="column naming each image (default: %(default)s)")
    p.add_argument("--names", nargs="+", help="model names, one per file or --score-col "
                                              "(default: the column name for one file, the "
                                              "file stem or folder/stem for several)")
    p.add_argument("--breast-combine", choices=sorted(_COMBINE), default="mean",
                   help="how the views of a breast are combined (default: %(default)s)")
    p.add_argument("--threshold", type=cf.fraction, default=0.5,
                   help="fixed operating point (score >= threshold positive), reported "
                        "without --val-predictions (default: %(default)s)")
    for rate in ("sensitivity", "specificity"):
        p.add_argument(f"--target-{rate}", type=cf.fraction, default=0.9,
                       help=f"{rate} the validation-chosen threshold keeps "
                            "(default: %(default)s)")
    p.add_argument("--calibrate", choices=em.CALIBRATION_METHODS,
                   help="fit a recalibration on --val-predictions and write calibrated test "
                        "scores and the map (default: none)")
    cf.add_bootstrap_flags(p)
    p.add_argument("--quiet", action="store_true",
                   help="do not print the table (default: printed)")
    p.add_argument("--out-dir", default="./evaluation",
                   help="folder receiving metrics.json and the ROC, PR and reliability PNGs "
                        "(default: %(default)s)")
    return p


options_class = run_options.tool_options_class(get_args_parser, "EvaluateOptions")


main = script_utils.tool_main(get_args_parser, run)


if __name__ == "__main__":
    main()
