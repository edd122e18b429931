"""Cross-validation by patient for ``run_pipeline.py`` (``[data] folds = K``).

A small real data set's test split is too small to say anything: ten lesions and four malignant
films give a 95% interval of AUROC 0.4 wide or more. With ``folds = K`` (K >= 2) in a pipeline
config whose data is in the sampler's layout (``data.source = "sampler_layout"``), the patients
are split into K folds stratified by label (a patient is positive when any of their whole images
is in a ``pos`` folder), and the whole chain runs once per fold into ``OUT/fold_k/``:

* fold k's test patients are the patients of fold k;
* its validation patients (``data.fold_val_size`` of the others, stratified by label) come from
  the training folds, and serve both the patch classifier's validation patches and the
  whole-image validation split;
* its training patients are the rest.

Each fold's data folder ``OUT/fold_k/data`` is the sampler layout made of links to the original
files (``full_img``, ``roi_mask``, ``whole_img/{train,val,test}/{neg,pos}``) with the fold's
patient lists; its config ``OUT/fold_k/config.toml`` extends the given one. When every fold has
run, the out-of-fold test predictions are pooled (``OUT/pooled/``): whole images
(``image_predictions.csv`` of each fold, the scores named in ``scores``), evaluated by
``evaluate.py`` at image and breast level with patient-clustered bootstrap intervals, and patches
(each fold's patch classifier on its own test patches; lesion against background, the score
``1 - P(background)``), with the per-fold figures beside them in ``OUT/summary.json`` and
``OUT/report.html``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ddsm_names import parse_image_name
from dm_image import IMG_EXTENSIONS, atomic_write

logger = logging.getLogger(__name__)

__all__ = ["FoldPlan", "patient_labels", "stratified_folds", "plan_folds", "write_fold_data",
           "write_fold_config", "pool_image_predictions", "pool_patch_predictions"]

SPLITS = ("train", "val", "test")
CLASS_DIRS = ("neg", "pos")
#: the files of the sampler layout each fold's data folder links to
_LAYOUT_FILES = ("roi_mask_path.csv",)
_LAYOUT_DIRS = ("full_img", "roi_mask")


@dataclass(frozen=True)
class FoldPlan:
    """The patients of one fold: ``index`` (0-based), ``train``, ``val`` and ``test`` ids."""
    index: int
    train: Tuple[str, ...]
    val: Tuple[str, ...]
    test: Tuple[str, ...]

    def split_of(self) -> Dict[str, str]:
        """patient -> ``"train"`` / ``"val"`` / ``"test"``."""
        return {p: s for s in SPLITS for p in getattr(self, s)}


def _whole_images(data_dir: Path) -> Dict[str, Tuple[Path, int]]:
    """image stem -> (file, label 0/1) of every whole image under ``whole_img/*/{neg,pos}/``."""
    found: Dict[str, Tuple[Path, int]] = {}
    root = data_dir / "whole_img"
    for split in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
        for label, name in enumerate(CLASS_DIRS):
            folder = split / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower().lstrip(".") not in IMG_EXTENSIONS or not path.is_file():
                    continue
                if path.stem in found:
                    raise ValueError(f"{path}: image {path.stem} is also {found[path.stem][0]}; "
                                     f"each whole image must be in one split and class folder")
                found[path.stem] = (path, label)
    if not found:
        raise ValueError(f"{root}: no whole image in whole_img/<split>/neg|pos/")
    return found


def patient_labels(data_dir: Path) -> Dict[str, int]:
    """patient -> 1 when any of their whole images is in a ``pos`` folder, else 0.

    Raises:
        ValueError: no whole image, an image name that is not ``{patient}_{side}_{view}``, or
            the same image in two folders.
    """
    labels: Dict[str, int] = {}
    for stem, (path, label) in _whole_images(Path(data_dir)).items():
        name = parse_image_name(stem)
        if name is None:
            raise ValueError(f"{path}: a whole image's name should be "
                             f"{{patient}}_{{LEFT|RIGHT}}_{{CC|MLO}}, got {stem!r}")
        labels[name.patient] = max(labels.get(name.patient, 0), label)
    return labels


def _deal(ids: Sequence[str], k: int, rng: np.random.Generator) -> List[List[str]]:
    order = [ids[i] for i in rng.permutation(len(ids))]
    return [order[j::k] for j in range(k)]


def stratified_folds(labels: Dict[str, int], k: int, seed: int) -> List[List[str]]:
    """Split the patients into ``k`` folds, each with its share of positive patients.

    Positives and negatives are shuffled (``seed``) and dealt round the folds separately, the
    negatives starting where the positives stopped so the folds' sizes differ by at most one.

    Raises:
        ValueError: ``k`` < 2, or fewer positive (or negative) patients than folds.
    """
    if k < 2:
        raise ValueError(f"folds should be at least 2, got {k}")
    pos = sorted(p for p, y in labels.items() if y)
    neg = sorted(p for p, y in labels.items() if not y)
    if len(pos) < k or len(neg) < k:
        raise ValueError(f"{k} folds need at least {k} positive and {k} negative patients, "
                         f"got {len(pos)} positive and {len(neg)} negative")
    rng = np.random.default_rng(seed)
    folds_pos, folds_neg = _deal(pos, k, rng), _deal(neg, k, rng)
    shift = len(pos) % k       # fill the folds the positives left short first
    folds_neg = folds_neg[-shift:] + folds_neg[:-shift] if shift else folds_neg
    return [sorted(a + b) for a, b in zip(folds_pos, folds_neg)]


def plan_folds(labels: Dict[str, int], k: int, val_size: float, seed: int) -> List[FoldPlan]:
    """The K folds: fold i tests on fold i's patients; ``val_size`` of the others (stratified,
    at least one positive and one negative) validate; the rest train.

    Raises:
        ValueError: see :func:`stratified_folds`; ``val_size`` outside (0, 1).
    """
    if not 0 < val_size < 1:
        raise ValueError(f"data.fold_val_size should be in (0, 1), got {val_size}")
    folds = stratified_folds(labels, k, seed)
    plans = []
    for i, test in enumerate(folds):
        rest = [p for j, fold in enumerate(folds) if j != i for p in fold]
        rng = np.random.default_rng([seed, i])
        val = []
        for y in (1, 0):
            group = sorted(p for p in rest if labels[p] == y)
            n = min(len(group) - 1, max(1, round(val_size * len(group))))
            val += [group[j] for j in rng.permutation(len(group))[:n]]
        train = sorted(set(rest) - set(val))
        plans.append(FoldPlan(i, tuple(train), tuple(sorted(val)), tuple(test)))
    return plans


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dest)
    except OSError:     # a file system without links: a copy
        shutil.copy2(src, dest)


def write_fold_data(src: Path, dest: Path, plan: FoldPlan) -> Path:
    """Write fold ``plan``'s sampler layout in ``dest`` (links to the files of ``src``).

    ``dest`` is made afresh: ``{train,val,test}_pat.txt`` from the plan, links to
    ``roi_mask_path.csv`` and to each file of ``full_img`` and ``roi_mask``, and each whole
    image linked into ``whole_img/<its split in this fold>/<neg|pos>/``.

    Returns:
        ``dest``.
    """
    src, dest = Path(src).resolve(), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in _LAYOUT_FILES:
        _link(src / name, dest / name)
    for name in _LAYOUT_DIRS:
        for path in sorted((src / name).iterdir()):
            if path.is_file():
                _link(path, dest / name / path.name)
    for split in SPLITS:
        text = "".join(p + "\n" for p in getattr(plan, split))
        atomic_write(dest / f"{split}_pat.txt", lambda fh, t=text: fh.write(t), text=True)
    where = plan.split_of()
    for stem, (path, label) in _whole_images(src).items():
        split = where.get(parse_image_name(stem).patient)
        if split is not None:
            _link(path, dest / "whole_img" / split / CLASS_DIRS[label] / path.name)
    return dest


def fold_config_text(config_path: Path) -> str:
    """The text of a fold's ``config.toml`` (see :func:`write_fold_config`)."""
    return (f"# fold of {Path(config_path).name}: written by run_pipeline.py, not to be edited\n"
            f"extends = {json.dumps(str(Path(config_path).resolve()))}\n\n"
            f"[data]\ndir = \"data\"\nfolds = 1\n\n[export]\nenabled = false\n")


def write_fold_config(config_path: Path, fold_dir: Path) -> Path:
    """``fold_dir/config.toml``: extends ``config_path``, with ``data.dir`` the fold's data
    folder, ``data.folds = 1`` (one chain) and no export (a fold's model is one of K, measured
    on its fold; train on all patients for a model to hand on)."""
    text = fold_config_text(config_path)
    path = Path(fold_dir) / "config.toml"
    atomic_write(path, lambda fh: fh.write(text), text=True)
    return path


def _read_rows(path: Path) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: List[dict], columns: Sequence[str]) -> Path:
    def write(fh):
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write, text=True)


def pool_image_predictions(files: Sequence[Path], out: Path) -> Path:
    """Concatenate the folds' ``image_predictions.csv`` (test images) into ``out`` with a
    ``fold`` column (1-based).

    Raises:
        ValueError: an image scored by two folds (the folds' test patients overlap).
    """
    rows, seen = [], {}
    for k, path in enumerate(files, 1):
        for row in _read_rows(path):
            key = row["image_index"]
            if key in seen:
                raise ValueError(f"{path}: image {key} is also a test image of fold {seen[key]}")
            seen[key] = k
            rows.append({**row, "fold": k})
    columns = list(_read_rows(files[0])[0].keys()) + ["fold"] if rows else ["fold"]
    return _write_rows(out, rows, columns)


def pool_patch_predictions(files: Sequence[Path], out: Path) -> Path:
    """Concatenate the folds' patch test predictions into ``out`` with a ``fold`` column."""
    rows = []
    for k, path in enumerate(files, 1):
        rows += [{**row, "fold": k} for row in _read_rows(path)]
    columns = list(_read_rows(files[0])[0].keys()) + ["fold"] if rows else ["fold"]
    return _write_rows(out, rows, columns)


def _fold_stamp(src: Path, plan: FoldPlan) -> dict:
    listing = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    return {"source": str(src), "train": plan.train, "val": plan.val, "test": plan.test,
            "files": listing}


def fold_data_is_current(src: Path, dest: Path, plan: FoldPlan) -> bool:
    """Whether ``dest`` already holds the fold data of this plan of the files in ``src``."""
    stamp = Path(dest) / ".fold.json"
    want = _fold_stamp(Path(src).resolve(), plan)
    return stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(want))


def write_fold_data_if_changed(src: Path, dest: Path, plan: FoldPlan) -> Path:
    """:func:`write_fold_data` unless ``dest`` already holds this plan of these files (so a
    re-run keeps the fold's data fingerprint and skips its finished stages)."""
    src, dest = Path(src).resolve(), Path(dest)
    if fold_data_is_current(src, dest, plan):
        return dest
    want = _fold_stamp(src, plan)
    write_fold_data(src, dest, plan)
    text = json.dumps(want, indent=1) + "\n"
    atomic_write(dest / ".fold.json", lambda fh: fh.write(text), text=True)
    return dest


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _patch_pooled(rows: List[dict], n_boot: int, seed: int) -> Dict[str, dict]:
    """Pooled patch AUROCs (patient-clustered bootstrap CIs): lesion vs background, and each
    other class against the rest."""
    import eval_metrics as em

    groups = np.asarray([r["patient_id"] for r in rows])
    label = np.asarray([int(r["label"]) for r in rows])
    tasks = {"lesion_vs_background": (label != 0, [float(r["lesion_pred"]) for r in rows])}
    for name in [k[2:] for k in rows[0] if k.startswith("p_")][1:]:
        k = [c[2:] for c in rows[0] if c.startswith("p_")].index(name)
        tasks[f"{name}_vs_rest"] = (label == k, [float(r[f"p_{name}"]) for r in rows])
    out = {}
    for task, (y, s) in tasks.items():
        res = em.evaluate_scores(y.astype(int), np.asarray(s), n_boot=n_boot, seed=seed,
                                 groups=groups)
        out[task] = {k: res.get(k) for k in ("n", "n_pos", "n_neg", "auroc", "auroc_ci")}
        out[task]["bootstrap"] = res.get("bootstrap", {}).get("method")
    return out


def _fold_figures(fold: Path, scores: str) -> dict:
    """One fold's test figures, read from the files its tools wrote."""
    import report

    patch = _json(fold / "models" / "patch_clf.h5.test.metrics.json") or {}
    ev = report.evaluation_summary(fold / "evaluation" / "metrics.json") or {}
    pred = _json(fold / "predictions" / scores / "metrics.json") or {}
    image = ev.get("levels", {}).get("image") or {}
    return {"fold": fold.name, "report": f"{fold.name}/report.html",
            "patch_auroc_ovr": patch.get("auroc_ovr"),
            "patch_counts": patch.get("counts"), "patch_scores": patch.get("scores"),
            "image_auroc": image.get("auroc", pred.get("auroc")),
            "image_auroc_ci": image.get("auroc_ci", pred.get("auroc_ci")),
            "n_images": image.get("n", pred.get("n")), "n_pos": image.get("n_pos"),
            "warnings": (_json(fold / "summary.json") or {}).get("warnings", [])}


def _ci_includes_half(ci) -> bool:
    return bool(ci) and None not in ci and ci[0] <= 0.5 <= ci[1]


def pool_folds(out: Path, fold_dirs: Sequence[Path], config: dict, config_path: Path,
               tool) -> dict:
    """Pool the folds' test predictions, evaluate them, write ``summary.json`` and
    ``report.html`` in ``out``; returns the summary.

    Args:
        out: the cross-validation run folder.
        fold_dirs: each fold's run folder, in order.
        config: the loaded config; config_path: its file.
        tool: ``tool(script, args, log)`` runs a project tool in ``out``.
    """
    import eval_metrics as em

    out = Path(out)
    scores = "flips" if config["predict"]["flips"] else "no_flips"
    n_boot, seed = config["predict"]["bootstrap"], config["run"]["seed"]
    pooled = out / "pooled"
    if pooled.exists():
        shutil.rmtree(pooled)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    files = [f / "predictions" / scores / "image_predictions.csv" for f in fold_dirs]
    pool_image_predictions(files, pooled / "image_predictions.csv")
    tool("evaluate", ["--predictions", "pooled/image_predictions.csv", "--bootstrap",
                      str(n_boot), "--seed", str(seed), "--breast-combine",
                      config["evaluate"]["breast_combine"], "--quiet",
                      "--out-dir", "pooled/evaluation"], out / "logs" / "pooled_evaluate.log")
    import report

    ev = report.evaluation_summary(pooled / "evaluation" / "metrics.json") or {}
    patch_files = [f / "models" / "patch_clf.h5.test.predictions.csv" for f in fold_dirs]
    patch = None
    if all(p.is_file() for p in patch_files):
        pool_patch_predictions(patch_files, pooled / "patch_predictions.csv")
        patch = _patch_pooled(_read_rows(pooled / "patch_predictions.csv"), n_boot, seed)
    per_fold = [_fold_figures(f, scores) for f in fold_dirs]
    patch_scores = {f.pop("patch_scores") for f in per_fold}
    summary = {"config": str(config_path), "folds": len(fold_dirs), "scores": scores.replace(
               "_", " "), "patch_scores": (patch_scores.pop() if len(patch_scores) == 1
                                           else "mixed"),
               "pooled": {"levels": ev.get("levels", {}), "patch": patch},
               "per_fold": per_fold, "warnings": _pooled_warnings(ev, patch, per_fold),
               "bootstrap": n_boot}
    em.write_json_atomic(summary, out / "summary.json")
    text = cv_report_html(summary)
    atomic_write(out / "report.html", lambda fh: fh.write(text), text=True)
    return summary


def _pooled_warnings(ev: dict, patch: dict, per_fold: List[dict]) -> List[dict]:
    warnings = []
    for level, res in (ev.get("levels") or {}).items():
        if _ci_includes_half(res.get("auroc_ci")):
            warnings.append({"code": "auroc_ci_includes_chance", "source": f"pooled {level}",
                             "message": f"pooled {level}-level test AUROC "
                                        f"{_ci_text(res['auroc'], res['auroc_ci'])} includes "
                                        f"0.5: the model is not shown to beat chance"})
    for task, res in (patch or {}).items():
        if _ci_includes_half(res.get("auroc_ci")):
            warnings.append({"code": "auroc_ci_includes_chance", "source": f"pooled patch {task}",
                             "message": f"pooled patch {task} AUROC "
                                        f"{_ci_text(res['auroc'], res['auroc_ci'])} includes "
                                        f"0.5"})
    for fold in per_fold:
        for w in fold["warnings"]:
            warnings.append({**w, "source": f"{fold['fold']}: {w.get('source', '')}".rstrip()})
    return warnings


def _ci_text(value, ci) -> str:
    if value is None:
        return "n/a"
    if not ci or None in ci:
        return f"{value:.3f}"
    return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def cv_report_html(summary: dict) -> str:
    """The cross-validation run's ``report.html``: warnings, pooled figures, per-fold figures
    with links to each fold's own report."""
    from html import escape

    rows = []
    for task, res in (summary["pooled"].get("patch") or {}).items():
        rows.append((f"patches: {task.replace('_', ' ')}{_patch_scores(summary)}", res))
    levels = summary["pooled"]["levels"]
    for level, res in levels.items():
        same = level == "breast" and res.get("n") == (levels.get("image") or {}).get("n")
        rows.append((f"{level}s: malignant vs not ({summary['scores']})"
                     + (": one image per breast, the image level again" if same else ""), res))
    pooled = "".join(
        f"<tr><td>{escape(name)}</td><td>{res.get('n')}</td><td>{res.get('n_pos')}</td>"
        f"<td>{escape(_ci_text(res.get('auroc'), res.get('auroc_ci')))}</td>"
        f"<td>{escape(str(res.get('bootstrap') or ''))}</td></tr>" for name, res in rows)
    folds = "".join(
        f"<tr><td><a href=\"{escape(f['report'])}\">{escape(f['fold'])}</a></td>"
        f"<td>{escape(_ovr_text(f['patch_auroc_ovr']))}</td><td>{f['n_images']}</td>"
        f"<td>{escape(_ci_text(f['image_auroc'], f['image_auroc_ci']))}</td>"
        f"<td>{len(f['warnings'])}</td></tr>" for f in summary["per_fold"])
    warn = "".join(f"<li>{escape(w.get('source', ''))}: {escape(w['message'])}</li>"
                   for w in summary["warnings"])
    banner = (f'<div class="warnings" id="warnings"><strong>{len(summary["warnings"])} '
              f'warning(s)</strong><ul>{warn}</ul></div>' if warn
              else '<p class="ok" id="warnings">No learning-health warning.</p>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Cross-validation report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:.2em .6em}}
.warnings{{background:#fde8e8;border:2px solid #c00;padding:.5em 1em}}.ok{{color:#060}}</style>
</head><body>
<h1>Cross-validation by patient: {summary['folds']} folds</h1>
{banner}
<p>Config: {escape(summary['config'])}. Each fold's test patients were seen by no model of
that fold; the figures below pool the folds' out-of-fold test predictions. Intervals are 95%
bootstrap confidence intervals ({summary['bootstrap']} resamples) over patients.</p>
<h2>Pooled out-of-fold test figures</h2>
<table id="pooled"><tr><th>what</th><th>n</th><th>positives</th><th>AUROC</th>
<th>bootstrap</th></tr>{pooled}</table>
<h2>Per fold</h2>
<table id="folds"><tr><th>fold (report)</th><th>patch test AUROC, one class vs rest</th>
<th>test images</th><th>image test AUROC ({escape(summary['scores'])})</th>
<th>warnings</th></tr>{folds}</table>
</body></html>
"""


def _ovr_text(ovr) -> str:
    if not ovr:
        return "n/a"
    return ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in ovr.items())


def _patch_scores(summary: dict) -> str:
    """Which scores the pooled patch figures come from: ``" (flips)"``, ``" (no flips)"``,
    ``" (mixed)"`` (folds differ), or nothing for folds whose files do not say."""
    scores = summary.get("patch_scores")
    return f" ({scores})" if scores else ""


def format_cv_summary(summary: dict) -> str:
    """The printed summary of a cross-validation run: pooled figures, per-fold figures and
    the warnings."""
    lines = [f"Cross-validation by patient, {summary['folds']} folds: pooled out-of-fold test "
             f"figures (95% CIs: bootstrap over patients)"]
    for task, res in (summary["pooled"].get("patch") or {}).items():
        lines.append(f"  patches, {task.replace('_', ' ')}{_patch_scores(summary)}: AUROC "
                     f"{_ci_text(res.get('auroc'), res.get('auroc_ci'))} "
                     f"({res.get('n_pos')} of {res.get('n')} positive)")
    for level, res in summary["pooled"]["levels"].items():
        lines.append(f"  {level}s, malignant vs not ({summary['scores']}): AUROC "
                     f"{_ci_text(res.get('auroc'), res.get('auroc_ci'))} "
                     f"({res.get('n_pos')} of {res.get('n')} positive)")
    for fold in summary["per_fold"]:
        lines.append(f"  {fold['fold']}: patch AUROC {_ovr_text(fold['patch_auroc_ovr'])}; "
                     f"image AUROC {_ci_text(fold['image_auroc'], fold['image_auroc_ci'])}")
    lines += [f"  WARNING [{w['code']}] {w['message']} ({w.get('source', '')})"
              for w in summary["warnings"]]
    return "\n".join(lines)
