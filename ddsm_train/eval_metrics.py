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
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np

from dm_image import atomic_write

__all__ = [
    "DEFAULT_N_BOOT", "DEFAULT_SEED", "DEFAULT_THRESHOLD",
    "check_binary_inputs", "roc_auc", "pr_auc", "sensitivity_specificity",
    "iter_bootstrap_indices", "bootstrap_replicates", "bootstrap_ci", "format_ci",
    "evaluate_binary",
    "plot_roc_pr", "write_json_atomic",
]

logger = logging.getLogger(__name__)

DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 12345
DEFAULT_THRESHOLD = 0.5
_CHUNK = 256

PathLike = Union[str, os.PathLike]


def check_binary_inputs(y_true, y_score) -> Tuple[np.ndarray, np.ndarray]:
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


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (equals ``sklearn.metrics.roc_auc_score``).

    Raises:
        ValueError: bad input or only one class present.
    """
    from sklearn.metrics import roc_auc_score

    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "AUROC")
    return float(roc_auc_score(y, s))


def pr_auc(y_true, y_score) -> float:
    """Trapezoidal area under the precision-recall curve, ``auc(recall, precision)``.

    Raises:
        ValueError: bad input or no positive label.
    """
    from sklearn.metrics import auc, precision_recall_curve

    y, s = check_binary_inputs(y_true, y_score)
    _need_both_classes(y, "AUPRC")
    precision, recall, _ = precision_recall_curve(y, s)
    return float(auc(recall, precision))


def sensitivity_specificity(y_true, y_score, threshold: float = DEFAULT_THRESHOLD) -> Dict:
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


def bootstrap_replicates(y_true, y_score, n_boot: int = DEFAULT_N_BOOT,
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


def format_ci(ci) -> str:
    """A confidence interval as printed everywhere: ``"95% CI 0.839-0.955"`` (3 decimals), or
    ``"95% CI n/a"`` when it is missing or not finite."""
    if ci is None or len(ci) != 2 or any(v is None or not np.isfinite(v) for v in ci):
        return "95% CI n/a"
    return f"95% CI {float(ci[0]):.3f}-{float(ci[1]):.3f}"


def bootstrap_ci(y_true, y_score, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                 level: float = 0.95) -> Dict:
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


def evaluate_binary(y_true, y_score, threshold: float = DEFAULT_THRESHOLD,
                    n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> Dict:
    """All metrics of one set of scores, as a JSON-ready dict.

    Keys: ``n, n_pos, n_neg, auroc, auprc, auroc_ci, auprc_ci, bootstrap`` (the
    :func:`bootstrap_ci` counts), ``threshold, sensitivity, specificity, tp, fp, tn, fn``.
    With a single class present the AUCs and intervals are NaN (and a warning is logged);
    ``n_boot=0`` skips the bootstrap.
    """
    y, s = check_binary_inputs(y_true, y_score)
    res = {"n": int(y.size), "n_pos": int(y.sum()), "n_neg": int(y.size - y.sum())}
    both = res["n_pos"] > 0 and res["n_neg"] > 0
    if both:
        res["auroc"], res["auprc"] = roc_auc(y, s), pr_auc(y, s)
    else:
        logger.warning("only one class among %d labels: AUROC/AUPRC undefined", y.size)
        res["auroc"] = res["auprc"] = math.nan
    if both and n_boot > 0:
        boot = bootstrap_ci(y, s, n_boot=n_boot, seed=seed)
        res["auroc_ci"], res["auprc_ci"] = boot.pop("auroc_ci"), boot.pop("auprc_ci")
        res["bootstrap"] = boot
    else:
        res["auroc_ci"] = res["auprc_ci"] = [math.nan, math.nan]
        res["bootstrap"] = {"n_boot": int(n_boot), "n_valid": 0, "n_skipped": 0,
                            "seed": int(seed), "level": 0.95}
    res["threshold"] = float(threshold)
    res.update(sensitivity_specificity(y, s, threshold))
    return res


def roc_pr_figures(y_true, y_score, title: str = "", metrics: Optional[Dict] = None):
    """The ROC and precision-recall curves as two matplotlib Figures (see :func:`plot_roc_pr`).

    Titles give the numbers of positives and negatives; with ``metrics`` (an
    :func:`evaluate_binary` result) the legend gives the AUCs with their intervals and a red
    dot marks the operating point at ``metrics["threshold"]``.
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
        if ci and all(np.isfinite(ci)):
            text += f" ({format_ci(ci)})"
        return text

    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    point = None
    if metrics.get("threshold") is not None and metrics.get("sensitivity") is not None:
        sens, spec = float(metrics["sensitivity"]), float(metrics["specificity"])
        pred_pos = s >= float(metrics["threshold"])
        prec = float(y[pred_pos].mean()) if pred_pos.any() else float("nan")
        point = {True: (1 - spec, sens), False: (sens, prec)}
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
        if point is not None and np.all(np.isfinite(point[diag])):
            px, py = point[diag]
            what = (f"sens {py:.2f}, spec {1 - px:.2f}" if diag
                    else f"recall {px:.2f}, precision {py:.2f}")
            ax.plot([px], [py], "o", color="red", ms=7,
                    label=f"threshold {float(metrics['threshold']):.2f}: {what}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlab, ylabel=ylab,
               title=f"{title} {'ROC' if diag else 'precision-recall'} "
                     f"({n_pos} positive / {n_neg} negative)".strip())
        if _label(name) or point is not None:
            ax.legend(loc="lower right" if diag else "lower left", fontsize="small")
        figures.append(fig)
    return figures[0], figures[1]


def plot_roc_pr(y_true, y_score, roc_path: PathLike, pr_path: PathLike,
                title: str = "", metrics: Optional[Dict] = None) -> Tuple[Path, Path]:
    """Write the ROC curve and the precision-recall curve as PNG files (matplotlib Agg).

    Args:
        y_true, y_score: labels 0/1 and scores (both classes needed).
        roc_path, pr_path: output PNG paths (folders created).
        title: prefix of the plot titles (which also give the numbers of positives and
            negatives).
        metrics: optional :func:`evaluate_binary` result; AUCs and intervals go in the legend,
            and its operating point at ``metrics["threshold"]`` is marked on both curves.

    Returns:
        (roc_path, pr_path) as Paths.
    """
    paths = []
    for path, fig in zip((roc_path, pr_path), roc_pr_figures(y_true, y_score, title, metrics)):
        path = Path(path)
        atomic_write(path, lambda fh, fig=fig, fmt=path.suffix[1:] or "png":
                     fig.savefig(fh, format=fmt))
        paths.append(path)
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


def write_json_atomic(obj, path: PathLike) -> Path:
    """Write ``obj`` as indented JSON (NaN/inf as null, numpy types converted) atomically."""
    text = json.dumps(_json_clean(obj), indent=2, sort_keys=True)
    return atomic_write(path, lambda fh: fh.write(text), text=True)
