"""Evaluation metrics for binary cancer scores: AUROC, AUPRC, bootstrap intervals, curves.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427. The 2017 code printed one AUROC; this module adds
what a reader of a diagnostic-accuracy study expects next to it.

Definitions (all on binary labels 0/1 and real-valued scores, higher = more likely cancer):

- AUROC: area under the ROC curve, identical to ``sklearn.metrics.roc_auc_score`` (ties
  between scores count one half).
- AUPRC: trapezoidal area under the precision-recall curve,
  ``sklearn.metrics.auc(recall, precision)`` on ``precision_recall_curve`` (the curve starts at
  recall 0, precision 1). This is NOT average precision (a step-function sum), which is usually
  a little lower.
- Bootstrap: ``n_boot`` resamples of the (label, score) pairs with replacement, drawn with
  ``numpy.random.default_rng(seed)`` (``rng.integers(0, n, size=(chunk, n))`` chunk after chunk,
  so the draws do not depend on the chunk size); a resample holding only one class has no AUROC,
  is skipped and counted in ``n_skipped``. The interval is the percentile interval of the valid
  replicates (2.5th and 97.5th percentiles for 95 %). The replicate statistics are computed for
  all resamples of a chunk at once from resample counts (no Python loop per replicate) and equal
  scikit-learn's values on the resampled data.
- Sensitivity / specificity at a threshold: a score ``>= threshold`` is called positive.

What a screening study reports (:func:`evaluate_scores`, used by ``image_clf_predict.py`` and
``evaluate.py``; :func:`evaluate_binary` is its headline subset):

- Stratified, clustered bootstrap (:func:`iter_bootstrap_counts`): patients (clusters of cases;
  each case alone when patients are unknown) are drawn with replacement, the patients with a
  positive case and the others separately, so every resample keeps their numbers; every
  statistic of every resample comes from the resample counts at once. Percentile intervals.
  (:func:`bootstrap_replicates` / :func:`bootstrap_ci` are the plain case bootstrap.)
- Operating points: thresholds chosen on validation scores (:func:`choose_threshold`: Youden's
  J, a target sensitivity or specificity) and applied unchanged; sensitivity, specificity, PPV,
  NPV, F1 there (:func:`threshold_rates`); sensitivity at a fixed specificity and the reverse,
  read off the ROC curve (:func:`rate_at_fixed`).
- pF1 (:func:`probabilistic_f1`), the RSNA 2023 screening challenge's probabilistic F1.
- Calibration: ECE over equal-width bins, Brier score, reliability diagram; Platt or isotonic
  recalibration (:class:`Calibrator`).
- Comparison of two scores of the same cases: DeLong's test in the O(n log n) form of Sun & Xu
 (:func:`delong_auc_cov`), with Obuchowski's clustered variance when a patient has several
  cases (:func:`obuchowski_auc_cov`), and the paired bootstrap interval of the AUROC
  difference. A variance that is undefined or 0 gives no p-value (None), never p = 1.
- Multi-class (patch classifiers): confusion matrix, accuracy next to the majority-class
  share, and per class support, recall, precision and one-vs-rest AUROC with its bootstrap
  interval (:func:`confusion_report`).
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from ddsm_names import ImageName, parse_image_name
from dm_image import atomic_write

__all__ = [
    "DEFAULT_N_BOOT", "DEFAULT_SEED", "DEFAULT_THRESHOLD",
    "check_binary_inputs", "roc_auc", "pr_auc", "sensitivity_specificity",
    "iter_bootstrap_indices", "bootstrap_replicates", "bootstrap_ci", "format_ci",
    "evaluate_binary", "BINARY_KEYS",
    "plot_roc_pr", "write_json_atomic",
    "MIN_BOOTSTRAP_CASES", "DEFAULT_FIXED_RATES", "DEFAULT_N_BINS", "THRESHOLD_RULES",
    "CALIBRATION_METHODS", "midranks", "delong_auc_cov", "obuchowski_auc_cov", "delong_test",
    "probabilistic_f1",
    "threshold_rates", "choose_threshold", "rate_at_fixed", "expected_calibration_error",
    "reliability_table", "brier_score", "reliability_figure", "save_figure",
    "iter_bootstrap_counts", "bootstrap_method", "degenerate_reason", "evaluate_scores",
    "paired_auroc_difference", "Calibrator", "confusion_report", "class_rates",
    "write_confusion_report",
    "parse_cbis_name",
]

logger = logging.getLogger(__name__)

DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 12345
DEFAULT_THRESHOLD = 0.5
_CHUNK = 256

PathLike = Union[str, os.PathLike]


def check_binary_inputs(y_true: ArrayLike, y_score: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """Validate labels and scores.

    Args:
        y_true: sequence of n labels, each 0 or 1 (bool or integer-valued).
        y_score: sequence of n finite real scores.

    Returns:
        (int64 labels of shape (n,), float64 scores of shape (n,)).

    Raises:
        ValueError: shapes differ, labels are not 0/1, scores are not finite, or n == 0.
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"y_true and y_score should be 1-D of equal length, got shapes "
                         f"{y.shape} and {s.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(f"labels should be 0 or 1, got {np.unique(y[bad])[:5].tolist()}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores should be finite, got {int((~np.isfinite(s)).sum())} "
                         f"non-finite values")
    return y.astype(np.int64), s


def _need_both_classes(y: np.ndarray, what: str):
    if y.min() == y.max():
        raise ValueError(f"{what} needs both classes in y_true, got only label {int(y[0])}")


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``).

    Raises:
        ValueError: bad input or only one class present.
    """
    from sklearn.metrics import roc_auc_score

    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "AUROC")
    return float(roc_auc_score(y, s))


def pr_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Trapezoidal area under the precision-recall curve, ``auc(recall, precision)``.

    Raises:
        ValueError: bad input or no positive label.
    """
    from sklearn.metrics import auc, precision_recall_curve

    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "AUPRC")
    precision, recall, _ = precision_recall_curve(y, s)
    return float(auc(recall, precision))


def sensitivity_specificity(y_true: ArrayLike, y_score: ArrayLike,
                            threshold: float = DEFAULT_THRESHOLD) -> Dict:
    """Confusion counts, sensitivity and specificity with ``score >= threshold`` positive.

    Returns:
        dict with ``tp, fp, tn, fn`` (int) and ``sensitivity``, ``specificity`` (float; NaN
        when the class they divide by is absent).
    """
    y, s = check_binary_inputs(y_true, y_score)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    fp = int(np.sum(pred & (y == 0)))
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens, "specificity": spec}


def iter_bootstrap_indices(n: int, n_boot: int, seed: int,
                           chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    """Resample indices, ``chunk`` replicates at a time.

    Yields:
        int64 arrays of shape (b, n), b <= chunk, rows = resamples of ``range(n)``; all chunks
        together hold ``n_boot`` rows, the same for any ``chunk``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot should be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _curve_stats(counts: np.ndarray, y_sorted: np.ndarray, ends: np.ndarray):
    """AUROC and AUPRC per row of resample counts (columns in descending-score order).

    Args:
        counts: float64 (b, n), how often each sample is drawn, columns sorted by score desc.
        y_sorted: int64 (n,), labels in that order.
        ends: int64 (k,), index of the last column of each group of tied scores.

    Returns:
        (auroc (b,), auprc (b,), valid (b,) bool); invalid rows (one class only) hold NaN.
    """
    tps = np.cumsum(counts * y_sorted, axis=1)[:, ends]
    fps = np.cumsum(counts * (1 - y_sorted), axis=1)[:, ends]
    pos, neg = tps[:, -1:], fps[:, -1:]
    valid = (pos[:, 0] > 0) & (neg[:, 0] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tps / pos
        fpr = fps / neg
        ps = tps + fps
        precision = np.where(ps > 0, tps / np.where(ps > 0, ps, 1), 1.0)
    zeros = np.zeros((counts.shape[0], 1))
    ones = np.ones((counts.shape[0], 1))
    tpr = np.hstack([zeros, tpr])
    fpr = np.hstack([zeros, fpr])
    recall = tpr
    precision = np.hstack([ones, precision])
    auroc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]), axis=1) / 2
    auprc = np.sum(np.diff(recall, axis=1) * (precision[:, 1:] + precision[:, :-1]), axis=1) / 2
    auroc[~valid] = np.nan
    auprc[~valid] = np.nan
    return auroc, auprc, valid


def bootstrap_replicates(y_true: ArrayLike, y_score: ArrayLike, n_boot: int = DEFAULT_N_BOOT,
                         seed: int = DEFAULT_SEED) -> Dict[str, np.ndarray]:
    """AUROC and AUPRC of each bootstrap resample (see the module docstring).

    Returns:
        dict with ``auroc`` and ``auprc`` (float64 (n_boot,), NaN for skipped resamples) and
        ``valid`` (bool (n_boot,)).
    """
    y, s = check_binary_inputs(y_true, y_score)
    n = y.size
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), n - 1]
    rank_of = np.empty(n, dtype=np.int64)
    rank_of[order] = np.arange(n)
    out = {"auroc": [], "auprc": [], "valid": []}
    for idx in iter_bootstrap_indices(n, n_boot, seed):
        b = idx.shape[0]
        flat = (rank_of[idx] + np.arange(b)[:, None] * n).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        auroc, auprc, valid = _curve_stats(counts, y_sorted, ends)
        out["auroc"].append(auroc)
        out["auprc"].append(auprc)
        out["valid"].append(valid)
    return {k: np.concatenate(v) for k, v in out.items()}


def format_ci(ci: Optional[Sequence[float]]) -> str:
    """A confidence interval as printed everywhere: ``"95% CI 0.839-0.955"`` (3 decimals), or
    ``"95% CI n/a"`` when it is missing or not finite."""
    if ci is None or len(ci) != 2 or any(v is None or not np.isfinite(v) for v in ci):
        return "95% CI n/a"
    return f"95% CI {float(ci[0]):.3f}-{float(ci[1]):.3f}"


def bootstrap_ci(y_true: ArrayLike, y_score: ArrayLike, n_boot: int = DEFAULT_N_BOOT,
                 seed: int = DEFAULT_SEED, level: float = 0.95) -> Dict:
    """Percentile bootstrap intervals of AUROC and AUPRC.

    Args:
        y_true: n labels 0/1.
        y_score: n scores.
        n_boot: number of resamples (2,000 by default).
        seed: seed of ``numpy.random.default_rng``.
        level: coverage of the interval, in (0, 1).

    Returns:
        dict with ``auroc_ci`` and ``auprc_ci`` (``[low, high]``, or ``[nan, nan]`` when no
        resample had both classes), ``n_boot``, ``n_valid``, ``n_skipped``, ``seed``, ``level``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level should be in (0, 1), got {level}")
    reps = bootstrap_replicates(y_true, y_score, n_boot=n_boot, seed=seed)
    valid = reps["valid"]
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    res = {"n_boot": int(n_boot), "n_valid": int(valid.sum()),
           "n_skipped": int((~valid).sum()), "seed": int(seed), "level": float(level)}
    for key in ("auroc", "auprc"):
        vals = reps[key][valid]
        res[f"{key}_ci"] = (np.percentile(vals, q).tolist() if vals.size
                            else [math.nan, math.nan])
    if res["n_skipped"]:
        logger.warning("bootstrap: %d of %d resamples had one class only and were skipped",
                       res["n_skipped"], n_boot)
    return res


#: The keys of :func:`evaluate_binary`, the headline figures of :func:`evaluate_scores`.
BINARY_KEYS = ("n", "n_pos", "n_neg", "auroc", "auprc", "auroc_ci", "auprc_ci", "bootstrap",
               "threshold", "sensitivity", "specificity", "tp", "fp", "tn", "fn")


def evaluate_binary(y_true: ArrayLike, y_score: ArrayLike, threshold: float = DEFAULT_THRESHOLD,
                    n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> Dict:
    """The headline metrics of one set of scores, as a JSON-ready dict: the ``BINARY_KEYS``
    of :func:`evaluate_scores` (same computation, same stratified bootstrap).

    Keys: ``n, n_pos, n_neg, auroc, auprc, auroc_ci, auprc_ci, bootstrap`` (its settings and
    counts), ``threshold, sensitivity, specificity, tp, fp, tn, fn``. With a single class
    present the AUCs and intervals are None (and a warning is logged); ``n_boot=0`` skips the
    bootstrap.
    """
    res = evaluate_scores(y_true, y_score, threshold=threshold, fixed=(), n_boot=n_boot,
                          seed=seed)
    return {k: res[k] for k in BINARY_KEYS}


#: (marker, colour) of the operating points marked on the curves, in order.
_POINT_STYLES = (("o", "red"), ("s", "darkorange"), ("^", "purple"), ("D", "green"),
                 ("v", "brown"), ("P", "black"))


def _marked_points(y: np.ndarray, s: np.ndarray, metrics: Dict) -> List[tuple]:
    """(legend label, {True: (1 - spec, sens), False: (recall, precision)}) of each operating
    point to mark: ``metrics["points"]`` (dicts with ``label``, ``threshold``, ``sensitivity``,
    ``specificity``) when given, else the one at ``metrics["threshold"]``."""
    points = metrics.get("points")
    if points is None:
        points = [{"label": f"threshold {float(metrics['threshold']):.2f}", **metrics}] \
            if metrics.get("threshold") is not None else []
    marked = []
    for p in points:
        if p.get("sensitivity") is None or p.get("specificity") is None:
            continue
        sens, spec = float(p["sensitivity"]), float(p["specificity"])
        pred_pos = s >= float(p["threshold"])
        prec = float(y[pred_pos].mean()) if pred_pos.any() else float("nan")
        marked.append((p["label"], {True: (1 - spec, sens), False: (sens, prec)}))
    return marked


def roc_pr_figures(y_true: ArrayLike, y_score: ArrayLike, title: str = "",
                   metrics: Optional[Dict] = None) -> Tuple[Any, Any]:
    """The ROC and precision-recall curves as two matplotlib Figures (see :func:`plot_roc_pr`).

    Titles give the numbers of positives and negatives; with ``metrics`` (an
    :func:`evaluate_binary` result) the legend gives the AUCs with their intervals and a red
    dot marks the operating point at ``metrics["threshold"]``; a list ``metrics["points"]``
    (dicts with ``label``, ``threshold``, ``sensitivity``, ``specificity``) marks those points
    instead, each with its label in the legend.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "ROC/PR curves")
    metrics = metrics or {}
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)

    def _label(name):
        val, ci = metrics.get(name), metrics.get(f"{name}_ci")
        if val is None:
            return None
        text = f"{name.upper()} {val:.3f}"
        if ci and all(v is not None and np.isfinite(v) for v in ci):
            text += f" ({format_ci(ci)})"
        return text

    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    points = _marked_points(y, s, metrics)
    figures = []
    for xs, ys, xlab, ylab, name, diag in (
            (fpr, tpr, "1 - specificity", "sensitivity", "auroc", True),
            (recall, precision, "recall", "precision", "auprc", False)):
        fig = Figure(figsize=(5, 5), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(xs, ys, lw=2, label=_label(name))
        if diag:
            ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        else:
            ax.axhline(y.mean(), ls="--", color="grey", lw=1)
        for (label, xy), (marker, color) in zip(points, _POINT_STYLES):
            px, py = xy[diag]
            if np.isfinite(px) and np.isfinite(py):
                what = (f"sens {py:.2f}, spec {1 - px:.2f}" if diag
                        else f"recall {px:.2f}, precision {py:.2f}")
                ax.plot([px], [py], marker, color=color, ms=7, label=f"{label}: {what}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlab, ylabel=ylab,
               title=f"{title} {'ROC' if diag else 'precision-recall'} "
                     f"({n_pos} positive / {n_neg} negative)".strip())
        if _label(name) or points:
            ax.legend(loc="lower right" if diag else "lower left", fontsize="small")
        figures.append(fig)
    return figures[0], figures[1]


def plot_roc_pr(y_true: ArrayLike, y_score: ArrayLike, roc_path: PathLike, pr_path: PathLike,
                title: str = "", metrics: Optional[Dict] = None) -> Tuple[Path, Path]:
    """Write the ROC curve and the precision-recall curve as PNG files (matplotlib Agg).

    Args:
        y_true, y_score: labels 0/1 and scores (both classes needed).
        roc_path, pr_path: output PNG paths (folders created).
        title: prefix of the plot titles (which also give the numbers of positives and
            negatives).
        metrics: optional :func:`evaluate_binary` result; AUCs and intervals go in the legend,
            and its operating point at ``metrics["threshold"]`` (or each of
            ``metrics["points"]``, see :func:`roc_pr_figures`) is marked on both curves.

    Returns:
        (roc_path, pr_path) as Paths.
    """
    paths = [save_figure(fig, path) for path, fig in
             zip((roc_path, pr_path), roc_pr_figures(y_true, y_score, title, metrics))]
    return paths[0], paths[1]


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf as null, numpy types converted) atomically."""
    text = json.dumps(_json_clean(obj), indent=2, sort_keys=True)
    return atomic_write(path, lambda fh: fh.write(text), text=True)


# ------------------------------------------------------------------ screening-study metrics
#: Fewer labelled cases than this get point estimates but no bootstrap interval.
MIN_BOOTSTRAP_CASES = 8
#: Specificities / sensitivities at which the test ROC curve is read (with intervals).
DEFAULT_FIXED_RATES = (0.80, 0.90, 0.95)
#: Equal-width bins of [0, 1] for the expected calibration error and the reliability diagram.
DEFAULT_N_BINS = 10


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their mean rank, in O(n log n).

    Args:
        x: float (n,) values.

    Returns:
        float64 (n,) ranks; equals ``scipy.stats.rankdata(x)``.
    """
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs) != 0) + 1]
    ends = np.r_[starts[1:], xs.size]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    out = np.empty(x.size)
    out[order] = ranks_sorted
    return out


def _structural_components(y: np.ndarray, s: np.ndarray):
    """AUROCs and structural components of k score rows (see :func:`delong_auc_cov`):
    ``v10`` (k, n_pos), each positive's fraction of negatives ranked below it, and ``v01``
    (k, n_neg), each negative's fraction of positives ranked above it (ties count one half)."""
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.vstack([midranks(r) for r in pos])
    ty = np.vstack([midranks(r) for r in neg])
    tz = np.vstack([midranks(r) for r in np.hstack([pos, neg])])
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    return aucs, (tz[:, :m] - tx) / n, 1.0 - (tz[:, m:] - ty) / m


def _score_rows(y_true: ArrayLike, scores: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    y, _ = check_binary_inputs(y_true, s[0])
    _need_both_classes(y, "DeLong's test")
    return y, s


def delong_auc_cov(y_true: ArrayLike, scores: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score columns on the same cases and DeLong's covariance matrix of them.

    The fast form of Sun & Xu (IEEE Signal Process. Lett. 21:1389, 2014): the structural
    components (each positive's fraction of negatives ranked below it, each negative's fraction
    of positives ranked above it, ties counting one half) come from three mid-rankings per
    column, O(n log n), instead of comparing every positive with every negative.

    Args:
        y_true: n labels 0/1 (both classes present).
        scores: (n,) or (k, n) scores, higher = more likely positive.

    Returns:
        (float64 (k,) AUROCs, float64 (k, k) covariance
        ``cov(V10) / n_pos + cov(V01) / n_neg``, sample covariances with ddof 1; NaN with a
        single positive or a single negative case).
    """
    y, s = _score_rows(y_true, scores)
    aucs, v10, v01 = _structural_components(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = _sample_cov(v10) / v10.shape[1] + _sample_cov(v01) / v01.shape[1]
    return aucs, cov


def _sample_cov(v: np.ndarray) -> np.ndarray:
    """Covariance (ddof 1) of the rows of ``v`` (k, n); NaN when n < 2."""
    if v.shape[1] < 2:
        return np.full((v.shape[0], v.shape[0]), np.nan)
    d = v - v.mean(axis=1, keepdims=True)
    return d @ d.T / (v.shape[1] - 1)


def obuchowski_auc_cov(y_true: ArrayLike, scores: ArrayLike, groups: ArrayLike
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """AUROCs of k score columns and their covariance for clustered cases (several cases per
    patient), by Obuchowski's method (Biometrics 53:567, 1997), patients as clusters.

    With I clusters, M positive and N negative cases, cluster i holding m_i positives and n_i
    negatives, V10_i the sum of its positives' structural components and V01_i that of its
    negatives' (see :func:`delong_auc_cov`), and I10 / I01 the clusters holding a positive /
    a negative case::

        S10 = I10 / ((I10 - 1) M) * sum_i (V10_i - m_i A)(V10_i - m_i A)'
        S01 = I01 / ((I01 - 1) N) * sum_i (V01_i - n_i A)(V01_i - n_i A)'
        S11 = I / (I - 1) * sum_i (V10_i - m_i A)(V01_i - n_i A)'
        cov = S10 / M + S01 / N + (S11 + S11') / (M N)

    With one case per cluster this is DeLong's covariance.

    Args:
        y_true: n labels 0/1 (both classes present).
        scores: (n,) or (k, n) scores.
        groups: n cluster (patient) ids.

    Returns:
        (float64 (k,) AUROCs, float64 (k, k) covariance; NaN with fewer than two clusters
        holding a positive or a negative case).
    """
    y, s = _score_rows(y_true, scores)
    aucs, v10, v01 = _structural_components(y, s)
    _, cl = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_cl = int(cl.max()) + 1
    out = []
    for lab, v in ((1, v10), (0, v01)):
        where = cl[y == lab]
        count = np.bincount(where, minlength=n_cl)
        sums = np.vstack([np.bincount(where, weights=r, minlength=n_cl) for r in v])
        out.append((sums - count * aucs[:, None], int((count > 0).sum()), int(count.sum())))
    (a, i10, m), (b, i01, n) = out
    with np.errstate(divide="ignore", invalid="ignore"):
        s10 = i10 / ((i10 - 1) * m) * (a @ a.T) if i10 > 1 else np.nan * (a @ a.T)
        s01 = i01 / ((i01 - 1) * n) * (b @ b.T) if i01 > 1 else np.nan * (b @ b.T)
        s11 = n_cl / (n_cl - 1) * (a @ b.T)
    return aucs, s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def _has_clusters(groups: Optional[ArrayLike]) -> bool:
    """Whether some cluster (patient) holds more than one case."""
    if groups is None:
        return False
    g = np.asarray(groups).astype(str)
    return np.unique(g).size < g.size


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike,
                groups: Optional[ArrayLike] = None) -> Dict:
    """DeLong's test of equal AUROC for two scores of the same cases (two-sided).

    With ``groups`` (patient ids) in which some patient has several cases, the variance is
    Obuchowski's clustered one (:func:`obuchowski_auc_cov`); otherwise DeLong's.

    Returns:
        dict with ``auroc_a``, ``auroc_b``, ``difference`` (a - b), ``variance_method``
        (which variance was used), its standard error ``se``, ``z`` and ``p_value`` (normal
        approximation). When the variance of the difference is undefined (a single positive
        or negative case or cluster) or 0 (e.g. identical scores, constant scores), ``se``,
        ``z`` and ``p_value`` are None and ``delong_note`` says why: the test says nothing
        there, which is not p = 1.
    """
    pair = np.vstack([score_a, score_b])
    if _has_clusters(groups):
        aucs, cov = obuchowski_auc_cov(y_true, pair, groups)
        n_cl = int(np.unique(np.asarray(groups).astype(str)).size)
        method = f"Obuchowski (1997) clustered variance, {n_cl} patients as clusters"
    else:
        aucs, cov = delong_auc_cov(y_true, pair)
        method = "DeLong variance, cases independent"
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    res = {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": diff,
           "variance_method": method, "se": None, "z": None, "p_value": None}
    if not math.isfinite(var):
        res["delong_note"] = ("not defined: the variance needs at least two positive and two "
                              "negative cases (patients when clustered)")
    elif var <= 1e-12 * max(float(cov[0, 0] + cov[1, 1]), 1e-300):
        res["delong_note"] = ("not defined: the variance of the difference is 0 (the two "
                              "scores rank the cases alike, or both are constant)")
    else:
        se = math.sqrt(var)
        res.update(se=se, z=diff / se, p_value=math.erfc(abs(diff / se) / math.sqrt(2)))
    return res


def probabilistic_f1(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Probabilistic F1 (RSNA 2023 screening mammography challenge).

    With scores in [0, 1]: pTP = sum of the positives' scores, pFP = sum of the negatives'
    scores, precision = pTP / (pTP + pFP), recall = pTP / n_pos, pF1 = 2 P R / (P + R)
    (0 when pTP is 0).

    Raises:
        ValueError: bad input, scores outside [0, 1], or no positive case.
    """
    y, s = check_binary_inputs(y_true, y_score)
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"pF1 needs scores in [0, 1], got {s.min():.4g}..{s.max():.4g}")
    if not y.any():
        raise ValueError("pF1 needs at least one positive case")
    ptp, pfp = float(s[y == 1].sum()), float(s[y == 0].sum())
    if ptp == 0:
        return 0.0
    precision, recall = ptp / (ptp + pfp), ptp / y.sum()
    return 2 * precision * recall / (precision + recall)


def threshold_rates(y_true: ArrayLike, y_score: ArrayLike, threshold: float) -> Dict:
    """Confusion counts and rates with ``score >= threshold`` positive.

    Returns:
        dict with ``tp, fp, tn, fn`` and ``sensitivity``, ``specificity``, ``ppv`` (precision),
        ``npv``, ``f1`` (NaN where the denominator is 0).
    """
    res = sensitivity_specificity(y_true, y_score, threshold)
    tp, fp, tn, fn = res["tp"], res["fp"], res["tn"], res["fn"]
    res["ppv"] = tp / (tp + fp) if tp + fp else math.nan
    res["npv"] = tn / (tn + fn) if tn + fn else math.nan
    res["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return res


#: Rules that choose a threshold on validation data (see :func:`choose_threshold`).
THRESHOLD_RULES = ("youden", "sensitivity", "specificity")


def choose_threshold(y_true: ArrayLike, y_score: ArrayLike, rule: str,
                     target: Optional[float] = None) -> float:
    """A threshold chosen on (validation) scores; ``score >= threshold`` is positive.

    Rules: ``youden``: maximises sensitivity + specificity - 1 (Youden's J; the highest such
    threshold); ``sensitivity``: the highest threshold whose sensitivity is >= ``target``
    (so the best specificity that keeps it); ``specificity``: the lowest threshold whose
    specificity is >= ``target`` (so the best sensitivity that keeps it; above the highest
    score when only calling nothing positive reaches it).

    Raises:
        ValueError: unknown rule, target outside (0, 1], bad input or one class only.
    """
    from sklearn.metrics import roc_curve

    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule should be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule != "youden" and not (target is not None and 0 < target <= 1):
        raise ValueError(f"target {rule} should be in (0, 1], got {target}")
    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "choosing a threshold")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    thr = thr.copy()
    thr[0] = np.nextafter(s.max(), np.inf)   # sklearn's first threshold is inf: nothing positive
    if rule == "youden":
        j = tpr - fpr
        return float(thr[int(np.argmax(j))])
    if rule == "sensitivity":
        return float(thr[int(np.flatnonzero(tpr >= target - 1e-12)[0])])
    return float(thr[int(np.flatnonzero(fpr <= 1 - target + 1e-12)[-1])])


def rate_at_fixed(y_true: ArrayLike, y_score: ArrayLike, fixed: float, at: str) -> float:
    """Sensitivity at a fixed specificity (``at="specificity"``), or specificity at a fixed
    sensitivity (``at="sensitivity"``), read off the ROC curve: the best one reached at any
    threshold that keeps the fixed rate >= ``fixed`` (the curve's corner points; no
    interpolation)."""
    from sklearn.metrics import roc_curve

    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "reading the ROC curve")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    if at == "specificity":
        return float(tpr[fpr <= 1 - fixed + 1e-12].max())
    if at == "sensitivity":
        return float((1 - fpr[tpr >= fixed - 1e-12]).max())
    raise ValueError(f"at should be 'sensitivity' or 'specificity', got {at!r}")


def expected_calibration_error(y_true: ArrayLike, y_score: ArrayLike, n_bins: int = DEFAULT_N_BINS
                               ) -> float:
    """Expected calibration error over ``n_bins`` equal-width bins of [0, 1].

    ECE = sum over bins of (cases in bin / n) * |fraction positive - mean score|; bin k holds
    scores in [k/n_bins, (k+1)/n_bins), the last bin also 1.0.

    Raises:
        ValueError: bad input or scores outside [0, 1].
    """
    y, s = check_binary_inputs(y_true, y_score)
    if s.min() < 0 or s.max() > 1:
        raise ValueError(f"calibration needs scores in [0, 1], got {s.min():.4g}..{s.max():.4g}")
    table = reliability_table(y, s, n_bins)
    used = table["count"] > 0
    gap = np.abs(table["frac_pos"][used] - table["mean_score"][used])
    return float(np.sum(table["count"][used] / y.size * gap))


def reliability_table(y_true: ArrayLike, y_score: ArrayLike, n_bins: int = DEFAULT_N_BINS
                      ) -> Dict[str, np.ndarray]:
    """Per equal-width bin of [0, 1]: ``lower``, ``upper``, ``count``, ``mean_score`` and
    ``frac_pos`` (fraction of positives; NaN for empty bins)."""
    y, s = check_binary_inputs(y_true, y_score)
    if n_bins < 1:
        raise ValueError(f"n_bins should be >= 1, got {n_bins}")
    k = np.clip(np.floor(s * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(k, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(k, weights=s, minlength=n_bins) / count
        frac_pos = np.bincount(k, weights=y, minlength=n_bins) / count
    edges = np.linspace(0, 1, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "mean_score": mean_score,
            "frac_pos": frac_pos}


def brier_score(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Mean squared difference of score and label (``sklearn.metrics.brier_score_loss``)."""
    from sklearn.metrics import brier_score_loss

    y, s = check_binary_inputs(y_true, y_score)
    return float(brier_score_loss(y, s))


def reliability_figure(y_true: ArrayLike, y_score: ArrayLike, title: str = "",
                       n_bins: int = DEFAULT_N_BINS, extra: Optional[Dict[str, np.ndarray]] = None
                       ) -> Any:
    """Reliability diagram as a matplotlib Figure: fraction of positives against mean score
    per bin (the diagonal is perfect calibration), with the bins' case counts below.
    ``extra`` maps a label to other scores of the same cases (e.g. calibrated ones)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 6), dpi=100)
    ax, axh = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for label, s in {"scores": y_score, **(extra or {})}.items():
        t = reliability_table(y_true, s, n_bins)
        ok = t["count"] > 0
        ece = expected_calibration_error(y_true, s, n_bins)
        ax.plot(t["mean_score"][ok], t["frac_pos"][ok], "o-",
                label=f"{label} (ECE {ece:.3f}, Brier {brier_score(y_true, s):.3f})")
        axh.bar((t["lower"] + t["upper"]) / 2, t["count"], width=0.9 / n_bins, alpha=0.5)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive",
           title=f"{title} reliability ({n_bins} equal-width bins)".strip())
    ax.legend(loc="upper left", fontsize="small")
    axh.set(xlabel="mean score in bin", ylabel="cases")
    return fig


def save_figure(fig: Any, path: PathLike) -> Path:
    """Write a matplotlib Figure atomically (format from the suffix, PNG by default), cropped
    to what it draws, so that a wide legend or title is not cut off at the figure's edge."""
    path = Path(path)
    return atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix[1:] or "png",
                                                     bbox_inches="tight"))


def iter_bootstrap_counts(y_true: ArrayLike, n_boot: int, seed: int,
                          groups: Optional[ArrayLike] = None, stratify: bool = True,
                          chunk: int = _CHUNK) -> Iterator[np.ndarray]:
    """Bootstrap resamples as counts: how often each case is drawn, ``chunk`` resamples at a time.

    Clusters (``groups``, e.g. patient ids: both breasts and all views of a woman move
    together; None: each case is its own cluster) are drawn with replacement; with
    ``stratify`` the clusters holding a positive case and the others are drawn separately,
    each as many times as there are of them, so every resample keeps the numbers of positive
    and negative clusters (without clusters: of positive and negative cases). Draws come from
    ``numpy.random.default_rng(seed)`` and do not depend on ``chunk``.

    Yields:
        float64 (b, n) counts, b <= chunk; all chunks together hold ``n_boot`` rows.
    """
    y = np.asarray(y_true).astype(np.int64)
    if n_boot < 1:
        raise ValueError(f"n_boot should be >= 1, got {n_boot}")
    if groups is None:
        cluster_of = np.arange(y.size)
    else:
        _, cluster_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_cl = int(cluster_of.max()) + 1
    cl_label = np.zeros(n_cl, dtype=np.int64)
    np.maximum.at(cl_label, cluster_of, y)
    strata = ([np.flatnonzero(cl_label == v) for v in (0, 1)] if stratify
              else [np.arange(n_cl)])
    strata = [st for st in strata if st.size]
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        cl_counts = np.zeros((b, n_cl))
        rows = np.arange(b)[:, None] * n_cl
        u = rng.random((b, sum(st.size for st in strata)))   # one row per resample
        start = 0
        for st in strata:
            k = np.minimum((u[:, start:start + st.size] * st.size).astype(np.int64), st.size - 1)
            picks = st[k]
            start += st.size
            cl_counts += np.bincount((picks + rows).ravel(), minlength=b * n_cl).reshape(b, n_cl)
        yield cl_counts[:, cluster_of]
        done += b


def _replicate_metrics(counts: np.ndarray, y: np.ndarray, s: np.ndarray,
                       thresholds: Dict[str, float], fixed: Sequence[float],
                       want_pf1: bool) -> Dict[str, np.ndarray]:
    """Every bootstrapped statistic for each row of resample counts (columns = cases), at once.

    Returns:
        dict of float64 (b,) arrays (NaN where undefined): ``auroc``, ``auprc``, ``pf1``,
        ``<name>/<rate>`` for each threshold, ``sens_at_spec/<f>``, ``spec_at_sens/<f>``.
    """
    order = np.argsort(-s, kind="mergesort")
    ys, ss, c = y[order], s[order], counts[:, order]
    ends = np.r_[np.flatnonzero(np.diff(ss) != 0), ss.size - 1]
    out = {}
    out["auroc"], out["auprc"], valid = _curve_stats(c, ys, ends)
    ctp, cfp = np.cumsum(c * ys, axis=1), np.cumsum(c * (1 - ys), axis=1)
    pos, neg = ctp[:, -1], cfp[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, t in thresholds.items():
            k = int(np.sum(ss >= t))      # the first k sorted cases are called positive
            tp = ctp[:, k - 1] if k else np.zeros_like(pos)
            fp = cfp[:, k - 1] if k else np.zeros_like(neg)
            fn, tn = pos - tp, neg - fp
            for rate, num, den in (("sensitivity", tp, pos), ("specificity", tn, neg),
                                   ("ppv", tp, tp + fp), ("npv", tn, tn + fn),
                                   ("f1", 2 * tp, 2 * tp + fp + fn)):
                out[f"{name}/{rate}"] = np.where(den > 0, num / np.where(den > 0, den, 1),
                                                 np.nan)
        tpr = np.hstack([np.zeros((c.shape[0], 1)), ctp[:, ends] / pos[:, None]])
        fpr = np.hstack([np.zeros((c.shape[0], 1)), cfp[:, ends] / neg[:, None]])
        for f in fixed:
            out[f"sens_at_spec/{f:g}"] = np.where(fpr <= 1 - f + 1e-12, tpr, -np.inf).max(axis=1)
            out[f"spec_at_sens/{f:g}"] = np.where(tpr >= f - 1e-12, 1 - fpr, -np.inf).max(axis=1)
        if want_pf1:
            ptp, pfp = (c * (ys * ss)).sum(axis=1), (c * ((1 - ys) * ss)).sum(axis=1)
            prec, rec = ptp / (ptp + pfp), ptp / pos
            out["pf1"] = np.where(ptp > 0, 2 * prec * rec / (prec + rec), 0.0)
    for key in out:
        out[key] = np.where(valid, out[key], np.nan)
    return out


def bootstrap_method(groups: Optional[ArrayLike] = None, stratify: bool = True) -> str:
    """One-line description of the bootstrap of :func:`iter_bootstrap_counts`."""
    parts = ["percentile bootstrap"]
    if stratify:
        parts.append("stratified by label")
    parts.append("resampling patients (clusters of cases)" if groups is not None
                 else "resampling cases")
    return ", ".join(parts)


def _ci(values: np.ndarray, level: float) -> Optional[list]:
    vals = values[np.isfinite(values)]
    if not vals.size:
        return None
    return np.percentile(vals, [100 * (1 - level) / 2, 100 * (1 + level) / 2]).tolist()


def degenerate_reason(y_true: ArrayLike, y_score: ArrayLike) -> Optional[str]:
    """Why the labelled scores cannot be evaluated (one class only, no case), else None."""
    y = np.asarray(y_true)
    if y.size == 0:
        return "no labelled case"
    if y.min() == y.max():
        return (f"only one class among the {y.size} cases (all label {int(y[0])}): AUROC, "
                f"AUPRC, sensitivity/specificity pairs and intervals are undefined")
    return None


def evaluate_scores(y_true: ArrayLike, y_score: ArrayLike, threshold: float = DEFAULT_THRESHOLD,
                    val_thresholds: Optional[Dict[str, float]] = None,
                    fixed: Sequence[float] = DEFAULT_FIXED_RATES, n_boot: int = DEFAULT_N_BOOT,
                    seed: int = DEFAULT_SEED, groups: Optional[ArrayLike] = None,
                    level: float = 0.95, n_bins: int = DEFAULT_N_BINS) -> Dict:
    """The full evaluation of one score column: the metrics a screening study reports.

    Args:
        y_true: n labels 0/1.
        y_score: n scores (probabilities for pF1 and calibration).
        threshold: the fixed operating point (``fixed_<threshold>``), used when no
            validation thresholds are given.
        val_thresholds: operating points chosen on validation data, name -> threshold
            (:func:`choose_threshold`), applied unchanged to these scores.
        fixed: specificities at which sensitivity is read off the ROC curve, and
            sensitivities at which specificity is.
        n_boot: bootstrap resamples (0: no intervals).
        seed: bootstrap seed.
        groups: n patient ids for the clustered bootstrap (None: cases are independent).
        level: coverage of the intervals.
        n_bins: bins of the expected calibration error.

    Returns:
        JSON-ready dict: the keys of :func:`evaluate_binary` (``n, n_pos, n_neg, auroc,
        auprc, auroc_ci, auprc_ci, bootstrap, threshold, sensitivity, specificity, tp, fp,
        tn, fn`` at ``threshold``) and ``operating_points`` (name -> ``threshold``,
        ``chosen_on``, rates with ``<rate>_ci``), ``sensitivity_at_specificity`` /
        ``specificity_at_sensitivity`` (``"0.9"`` -> ``{value, ci}``), ``pf1`` /
        ``pf1_ci``, ``calibration`` (``ece``, ``brier``, ``binning``) and ``notes`` (why
        something is missing: one class, fewer than ``MIN_BOOTSTRAP_CASES`` cases, constant
        scores, scores outside [0, 1]). Undefined values are None, never NaN.
    """
    y, s = check_binary_inputs(y_true, y_score)
    res = {"n": int(y.size), "n_pos": int(y.sum()), "n_neg": int(y.size - y.sum()),
           "notes": []}
    res.update(threshold=float(threshold), **sensitivity_specificity(y, s, threshold))
    unit = s.min() >= 0 and s.max() <= 1
    res["calibration"] = {"binning": f"{n_bins} equal-width bins of [0, 1]; ECE weights each "
                                     f"bin by its share of cases"}
    if unit:
        res["calibration"].update(ece=expected_calibration_error(y, s, n_bins),
                                  brier=brier_score(y, s))
    else:
        res["notes"].append("scores outside [0, 1] are not probabilities: no pF1, ECE or "
                            "Brier score")
    boot = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
            "method": bootstrap_method(groups), "n_valid": 0, "n_skipped": 0}
    res["bootstrap"] = boot
    if groups is not None:
        boot["n_clusters"] = int(np.unique(np.asarray(groups).astype(str)).size)
    reason = degenerate_reason(y, s)
    keys = ("auroc", "auprc", "pf1")
    for key in keys:
        res[key], res[f"{key}_ci"] = None, None
    res["operating_points"], res["sensitivity_at_specificity"] = {}, {}
    res["specificity_at_sensitivity"] = {}
    if reason:
        res["notes"].append(reason)
        logger.warning("%s", reason)
        return _finish(res)
    res["auroc"], res["auprc"] = roc_auc(y, s), pr_auc(y, s)
    if unit:
        res["pf1"] = probabilistic_f1(y, s)
    points = dict(val_thresholds or {}) or {f"fixed_{threshold:g}": float(threshold)}
    for name, t in points.items():
        rates = threshold_rates(y, s, t)
        rates["threshold"] = float(t)
        rates["chosen_on"] = "fixed" if name.startswith("fixed_") else "validation"
        res["operating_points"][name] = rates
    for f in fixed:
        res["sensitivity_at_specificity"][f"{f:g}"] = {
            "value": rate_at_fixed(y, s, f, "specificity"), "ci": None}
        res["specificity_at_sensitivity"][f"{f:g}"] = {
            "value": rate_at_fixed(y, s, f, "sensitivity"), "ci": None}
    if n_boot <= 0:
        res["notes"].append("no bootstrap asked for (0 resamples): no intervals")
    elif y.size < MIN_BOOTSTRAP_CASES:
        res["notes"].append(f"only {y.size} cases (< {MIN_BOOTSTRAP_CASES}): no bootstrap "
                            f"intervals")
    elif s.min() == s.max():
        res["notes"].append(f"all {y.size} scores are equal ({s[0]:g}): they do not rank the "
                            f"cases (AUROC 0.5), no bootstrap intervals")
    else:
        _add_intervals(res, y, s, points, fixed, groups, unit)
    return _finish(res)


def _add_intervals(res: Dict, y: np.ndarray, s: np.ndarray, points: Dict[str, float],
                   fixed: Sequence[float], groups, unit: bool) -> None:
    """Fill the ``*_ci`` entries of an :func:`evaluate_scores` result from its bootstrap."""
    boot, level = res["bootstrap"], res["bootstrap"]["level"]
    reps = {}
    for counts in iter_bootstrap_counts(y, boot["n_boot"], boot["seed"], groups=groups):
        for k, v in _replicate_metrics(counts, y, s, points, fixed, unit).items():
            reps.setdefault(k, []).append(v)
    reps = {k: np.concatenate(v) for k, v in reps.items()}
    valid = np.isfinite(reps["auroc"])
    boot.update(n_valid=int(valid.sum()), n_skipped=int((~valid).sum()))
    for key in ("auroc", "auprc", "pf1"):
        if key in reps:
            res[f"{key}_ci"] = _ci(reps[key], level)
    for name, rates in res["operating_points"].items():
        for rate in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            rates[f"{rate}_ci"] = _ci(reps[f"{name}/{rate}"], level)
    for f in fixed:
        res["sensitivity_at_specificity"][f"{f:g}"]["ci"] = _ci(reps[f"sens_at_spec/{f:g}"],
                                                                level)
        res["specificity_at_sensitivity"][f"{f:g}"]["ci"] = _ci(reps[f"spec_at_sens/{f:g}"],
                                                                level)


def _finish(res: Dict) -> Dict:
    """Intervals missing as ``[None, None]`` for the keys of :func:`evaluate_binary`."""
    for key in ("auroc_ci", "auprc_ci"):
        if res.get(key) is None:
            res[key] = [None, None]
    return _json_clean(res)


def paired_auroc_difference(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike,
                            n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                            groups: Optional[ArrayLike] = None, level: float = 0.95) -> Dict:
    """AUROC of a minus AUROC of b on the same cases: paired bootstrap interval (both scores
    of a case move together, see :func:`iter_bootstrap_counts`) and DeLong's test (with
    Obuchowski's clustered variance when a patient of ``groups`` has several cases).

    Returns:
        dict of :func:`delong_test` plus ``difference_ci`` (None with fewer than
        ``MIN_BOOTSTRAP_CASES`` cases or ``n_boot`` 0) and ``bootstrap`` (its settings).
    """
    y, sa = check_binary_inputs(y_true, score_a)
    _, sb = check_binary_inputs(y_true, score_b)
    res = delong_test(y, sa, sb, groups=groups)
    res["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "level": float(level),
                        "method": bootstrap_method(groups) + ", paired"}
    res["difference_ci"] = None
    if n_boot > 0 and y.size >= MIN_BOOTSTRAP_CASES:
        diffs = []
        for counts in iter_bootstrap_counts(y, n_boot, seed, groups=groups):
            a = _replicate_metrics(counts, y, sa, {}, (), False)["auroc"]
            b = _replicate_metrics(counts, y, sb, {}, (), False)["auroc"]
            diffs.append(a - b)
        res["difference_ci"] = _ci(np.concatenate(diffs), level)
    return _json_clean(res)


# ------------------------------------------------------------------ recalibration
CALIBRATION_METHODS = ("platt", "isotonic")


class Calibrator:
    """A map from scores to calibrated probabilities, fitted on validation scores.

    ``platt``: logistic regression of the label on the logit of the score (scores clipped
    to [1e-6, 1 - 1e-6]; on the raw score when scores are not all in [0, 1]), unpenalised;
    ``isotonic``: the non-decreasing step function of ``sklearn.isotonic.IsotonicRegression``
    (clipped outside the fitted range), linear between its breakpoints.
    """

    def __init__(self, method: str):
        if method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method should be one of {CALIBRATION_METHODS}, "
                             f"got {method!r}")
        self.method = method
        self.params: Dict = {}

    def _feature(self, s: np.ndarray) -> np.ndarray:
        if self.params.get("input") == "logit":
            p = np.clip(s, 1e-6, 1 - 1e-6)
            return np.log(p / (1 - p))
        return s

    def fit(self, y_true: ArrayLike, y_score: ArrayLike) -> "Calibrator":
        """Fit on labelled (validation) scores; both classes needed."""
        y, s = check_binary_inputs(y_true, y_score)
        _need_both_classes(y, f"{self.method} calibration")
        if self.method == "platt":
            from sklearn.linear_model import LogisticRegression

            self.params = {"input": "logit" if s.min() >= 0 and s.max() <= 1 else "score"}
            lr = LogisticRegression(C=np.inf).fit(self._feature(s)[:, None], y)
            self.params.update(coef=float(lr.coef_[0, 0]), intercept=float(lr.intercept_[0]))
        else:
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
            self.params = {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
        self.params["n_fit"], self.params["n_pos_fit"] = int(y.size), int(y.sum())
        return self

    def apply(self, y_score: ArrayLike) -> np.ndarray:
        """Calibrated probabilities of ``y_score`` (float64, same shape)."""
        s = np.asarray(y_score, dtype=np.float64)
        if self.method == "platt":
            z = self.params["coef"] * self._feature(s) + self.params["intercept"]
            return 1.0 / (1.0 + np.exp(-z))
        return np.interp(s, self.params["x"], self.params["y"])

    def reverses_ranking(self) -> bool:
        """Whether the fitted map is decreasing somewhere (a negative Platt slope, an isotonic
        map with a falling step): applied, it would turn a higher score into a lower
        probability."""
        if self.method == "platt":
            return self.params["coef"] < 0
        return bool(np.any(np.diff(self.params["y"]) < 0))

    def to_json(self) -> Dict:
        """``{"method": ..., **params}``: platt ``input, coef, intercept`` (p = 1 / (1 +
        exp(-(coef * x + intercept)))); isotonic breakpoints ``x``, ``y``."""
        return {"method": self.method, **self.params}


# ------------------------------------------------------------------ multi-class (patches)
def confusion_report(labels: ArrayLike, probs: ArrayLike, class_names: Sequence[str],
                     n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> Dict:
    """Confusion matrix and per-class figures of a multi-class classifier.

    Args:
        labels: n true class indices.
        probs: (n, k) class probabilities; the predicted class is the argmax.
        class_names: k names.
        n_boot: bootstrap resamples of the one-vs-rest AUROC intervals (0: none).
        seed: their seed.

    Returns:
        dict with ``classes``, ``n``, ``counts`` (k x k, rows = true class, columns =
        predicted), ``row_normalised`` (each row divided by its total; None for an absent
        class), ``accuracy``, ``majority_class`` and ``majority_share`` (the accuracy of always
        answering the most frequent true class), ``auroc_ovr`` (class -> AUROC of its
        probability against all other classes; None when the class is absent or alone) and
        ``per_class`` (class -> :func:`class_rates` plus ``auroc`` and its 95 % percentile
        bootstrap interval ``auroc_ci``, resampling cases, None with fewer than
        ``MIN_BOOTSTRAP_CASES`` cases).
    """
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if probs.ndim != 2 or probs.shape != (labels.size, k):
        raise ValueError(f"probs should be ({labels.size}, {k}), got {probs.shape}")
    cm = confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(k)))
    rows = cm.sum(axis=1, keepdims=True)
    norm = [(r / t).tolist() if t[0] else None for r, t in zip(cm, rows)]
    per_class = class_rates(cm, class_names)
    for j, name in enumerate(class_names):
        yj = (labels == j).astype(int)
        defined = 0 < yj.sum() < yj.size
        per_class[name]["auroc"] = roc_auc(yj, probs[:, j]) if defined else None
        per_class[name]["auroc_ci"] = (_ovr_auroc_ci(yj, probs[:, j], n_boot, seed)
                                       if defined else None)
    support = cm.sum(axis=1)
    return {"classes": list(class_names), "n": int(cm.sum()), "counts": cm.tolist(),
            "row_normalised": norm, "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
            "majority_class": class_names[int(support.argmax())] if k else None,
            "majority_share": float(support.max() / max(cm.sum(), 1)) if k else None,
            "auroc_ovr": {name: per_class[name]["auroc"] for name in class_names},
            "per_class": per_class}


def class_rates(counts: ArrayLike, class_names: Sequence[str]) -> Dict[str, Dict]:
    """Per class of a confusion matrix (rows true, columns predicted): ``support`` (its true
    cases), ``predicted`` (cases predicted as it), ``recall`` and ``precision`` (None when
    undefined: no true case, or never predicted)."""
    cm = np.asarray(counts, dtype=np.int64).reshape(len(class_names), len(class_names))
    out = {}
    for j, name in enumerate(class_names):
        support, predicted, hit = int(cm[j].sum()), int(cm[:, j].sum()), int(cm[j, j])
        out[name] = {"support": support, "predicted": predicted,
                     "recall": hit / support if support else None,
                     "precision": hit / predicted if predicted else None}
    return out


def _ovr_auroc_ci(y: np.ndarray, score: np.ndarray, n_boot: int, seed: int) -> Optional[list]:
    """95 % bootstrap interval of one class's one-vs-rest AUROC (None when not computed)."""
    if n_boot <= 0 or y.size < MIN_BOOTSTRAP_CASES:
        return None
    ci = bootstrap_ci(y, score, n_boot=n_boot, seed=seed)["auroc_ci"]
    return None if any(not np.isfinite(v) for v in ci) else [float(v) for v in ci]


def write_confusion_report(labels: ArrayLike, probs: ArrayLike, class_names: Sequence[str],
                           prefix: PathLike, n_boot: int = DEFAULT_N_BOOT,
                           seed: int = DEFAULT_SEED) -> Dict:
    """Write ``<prefix>.confusion.csv`` (counts, then row-normalised rows),
    ``<prefix>.confusion.png`` (both matrices) and ``<prefix>.metrics.json`` (the
    :func:`confusion_report`); return the report with the three paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rep = confusion_report(labels, probs, class_names, n_boot=n_boot, seed=seed)
    prefix = str(prefix)
    lines = ["matrix,true_class," + ",".join(f"pred_{c}" for c in class_names)]
    for kind, mat in (("counts", rep["counts"]), ("row_normalised", rep["row_normalised"])):
        for name, row in zip(class_names, mat):
            vals = row if row is not None else [math.nan] * len(class_names)
            lines.append(f"{kind},{name}," + ",".join(f"{v:.6g}" for v in vals))
    csv_path = atomic_write(prefix + ".confusion.csv", lambda fh: fh.write("\n".join(lines)
                                                                           + "\n"), text=True)
    fig = Figure(figsize=(10, 4.5), dpi=100)
    counts = np.asarray(rep["counts"], dtype=float)
    normed = np.array([r if r is not None else [np.nan] * len(class_names)
                       for r in rep["row_normalised"]], dtype=float)
    for ax, mat, title, fmt in zip(fig.subplots(1, 2), (counts, normed),
                                   ("counts", "row-normalised"), ("{:.0f}", "{:.2f}")):
        ax.imshow(mat, cmap="Blues", vmin=0)
        top = np.nanmax(mat) if np.isfinite(mat).any() else 0
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, fmt.format(v) if np.isfinite(v) else "-", ha="center", va="center",
                    color="white" if np.isfinite(v) and v > top / 2 else "black")
        ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)),
               xticklabels=class_names, yticklabels=class_names, xlabel="predicted",
               ylabel="true", title=f"test confusion matrix ({title})")
    fig.tight_layout()
    png_path = save_figure(fig, prefix + ".confusion.png")
    rep.update(confusion_csv=str(csv_path), confusion_png=str(png_path))
    rep["metrics_json"] = str(write_json_atomic(rep, prefix + ".metrics.json"))
    return rep


# ------------------------------------------------------------------ case names
def parse_cbis_name(name: str) -> Optional[ImageName]:
    """``(patient, side, view)`` of a CBIS-style image name ``{patient}_{side}_{view}``
    (``pos/P_00003_RIGHT_CC.png`` -> ``("P_00003", "RIGHT", "CC")``; folders and the
    extension are ignored, side and view upper-cased), or None when the name has another form:
    :func:`ddsm_names.parse_image_name`.
    """
    return parse_image_name(name)
