"""The report of a pipeline run: ``report.html`` (plain HTML, the pictures beside it) and
``summary.json`` in the run folder.

:func:`write_report` reads what the stages of ``run_pipeline.py`` wrote and shows: a red banner
listing the learning-health warnings (:func:`health_warnings`, also the ``warnings`` of
``summary.json``), the whole-image validation AUROC, the patch classifier's test accuracy next to
the majority-class share with its per-class recall, precision and one-vs-rest AUROC and its
confusion matrix (``models/patch_clf.h5.test.metrics.json``), the test metrics with their 95 % bootstrap intervals (``predictions/*/metrics.json``), the screening
evaluation of ``evaluate.py`` (``evaluation/metrics.json``: the operating points chosen on the
validation images applied to the test images, breast- and exam-level AUROC, pF1, calibration
and its reliability diagram), the ROC and PR curves, the heatmap overlays of the highest-scored positive and negative test images (lesion
outlines drawn from the ROI masks where the data has them), the training curves of both
classifiers (``models/*.curves.png``), the data counts per split and class, the time per stage,
the derived settings (``derived.json``) and the config; near the top, the exported model
(``export/``: a link to its model card, which is shown too, and whether ``model.onnx`` was
written, :func:`export_summary`). Images are linked by paths relative to
the run folder, so the folder can be moved or copied as a whole. Importing this module does not
import TensorFlow.
"""
from __future__ import annotations

import csv
import html
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)
import learning_health as lh  # noqa: E402
from dm_image import IMG_EXTENSIONS, atomic_write  # noqa: E402

__all__ = ["write_report", "count_images", "format_summary", "patch_test_summary",
           "health_warnings", "unfinished_stages", "export_summary"]

#: Files of a run (relative to its folder) that the learning-health checks read.
PATCH_TEST_METRICS = "models/patch_clf.h5.test.metrics.json"
TRAINING_LOGS = (("models/patch_clf.h5.log.csv", "val_accuracy"),
                 ("models/image_clf.h5.log.csv", "val_auc"))
EVALUATION_METRICS = "evaluation/metrics.json"
#: The folder of the pipeline's ``export`` stage (``export_model.py``), relative to the run.
EXPORT_DIR = "export"
_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 520px; max-height: 520px; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; max-width: 520px; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.muted { color: #777; }
.warnings { background: #fdecea; border: 2px solid #c62828; color: #7f1d1d; padding: .6em 1em;
            margin: 1em 0; }
.warnings h2 { border: none; color: #c62828; margin: .2em 0; }
.warnings code { color: #7f1d1d; }
"""


def count_images(folder: Union[str, Path]) -> Dict[str, Dict[str, int]]:
    """Image files per split and class: ``{split: {class: n}}`` for ``folder/split/class/``."""
    folder, counts = Path(folder), {}
    if not folder.is_dir():
        return counts
    for split in ("train", "val", "test"):
        if not (folder / split).is_dir():
            continue
        counts[split] = {
            cls.name: sum(1 for f in cls.rglob("*")
                          if f.suffix.lower().lstrip(".") in IMG_EXTENSIONS)
            for cls in sorted((folder / split).iterdir()) if cls.is_dir()}
    return counts


def unfinished_stages(state: dict) -> Dict[str, str]:
    """``{stage: status}`` of the stages (the report aside) whose results are not current:
    "failed", "running" (interrupted) or "stale" (it reads one of those, or its settings
    changed); what the run folder holds of them is from an earlier run, or missing."""
    return {name: rec.get("status", "") for name, rec in state.get("stages", {}).items()
            if name != "report" and rec.get("status") not in ("done", "not used")}


def _unfinished_text(unfinished: Dict[str, str]) -> str:
    words = {"running": "interrupted"}
    by_status: Dict[str, List[str]] = {}
    for name, status in unfinished.items():
        by_status.setdefault(words.get(status, status), []).append(name)
    return "; ".join(f"{', '.join(names)} {status}" for status, names in by_status.items())


#: How the summary and the report name the two sets of test scores.
SCORES_TEXT = {"flips": "with flips", "no_flips": "without flips"}


def scores_kind(config: dict) -> str:
    """``flips`` or ``no_flips``: the test scores that ``evaluate`` reads (flips when
    ``predict.flips``), and so those of the summary's headline figures."""
    return "flips" if (config.get("predict") or {}).get("flips") else "no_flips"


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text()).get("image", {}) if path.is_file() else {}


def _fmt(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci and None not in ci:
        text += f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    return text


def _img(out: Path, rel: str, caption: str) -> str:
    if not (out / rel).is_file():
        return ""
    src = html.escape(Path(rel).as_posix(), quote=True)
    return (f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(caption, quote=True)}">'
            f'</a><figcaption>{html.escape(caption)}</figcaption></figure>')


def _table(header: List[str], rows: List[List[str]], left: int = 1) -> str:
    def cells(tag, values):
        return "".join(f'<{tag}{" class=l" if i < left else ""}>{html.escape(str(v))}</{tag}>'
                       for i, v in enumerate(values))
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _counts_table(counts: Dict[str, Dict[str, int]]) -> str:
    classes = sorted({c for per in counts.values() for c in per})
    if not classes:
        return '<p class="muted">none</p>'
    rows = [[split] + [per.get(c, 0) for c in classes] + [sum(per.values())]
            for split, per in counts.items()]
    return _table(["split"] + classes + ["total"], rows)


def _heatmap_figures(out: Path, predictions: Path) -> str:
    """The overlays of ``heatmaps/images.txt``, with each image's score and label."""
    listing = out / "heatmaps" / "images.txt"
    if not listing.is_file():
        return '<p class="muted">no heatmaps in this run</p>'
    scores = {}
    if predictions.is_file():
        with open(predictions, newline="") as fh:
            for row in csv.DictReader(fh):
                scores[Path(row["path"]).stem] = (row["malignant_pred"], row["malignant_label"])
    parts = []
    for line in listing.read_text().splitlines():
        stem = Path(line.strip()).stem
        if not stem:
            continue
        pngs = sorted((out / "heatmaps").glob(f"*{stem}_heatmap.png"))
        score, label = scores.get(stem, ("", ""))
        kind = {"1": "highest-scored positive", "0": "highest-scored negative"}.get(label, "")
        cap = f"{stem}: {kind} test image, score {float(score):.3f}" if score else stem
        parts += [_img(out, p.relative_to(out).as_posix(), cap) for p in pngs]
    return "".join(parts) or '<p class="muted">no overlay was drawn</p>'


def patch_test_summary(out: Union[str, Path]) -> Optional[dict]:
    """The patch classifier's test figures of a run (``models/patch_clf.h5.test.metrics.json``
    of ``patch_clf_train.py``), or None when the run has no such file.

    Returns:
        ``source`` (the file, relative to the run folder), ``n``, ``accuracy``,
        ``majority_class``, ``majority_share``, ``classes``, ``counts`` (rows true, columns
        predicted) and ``per_class`` (class -> ``support``, ``predicted``, ``recall``,
        ``precision``, ``auroc``, ``auroc_ci``), ``scores`` (``"flips"``: each patch scored as
        the mean of its 4 flips, ``"no flips"``, or None for a file that does not say).
    """
    path = Path(out) / PATCH_TEST_METRICS
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    per_class = lh.patch_per_class(metrics)
    share, name = lh.majority_share(per_class)
    return {"source": PATCH_TEST_METRICS, "n": sum(c["support"] for c in per_class.values()),
            "accuracy": metrics.get("accuracy"), "majority_class": name,
            "majority_share": share, "classes": list(per_class), "counts": metrics.get("counts"),
            "per_class": per_class, "scores": metrics.get("scores")}


def health_warnings(out: Union[str, Path], config: dict, patch: Optional[dict]) -> List[dict]:
    """The learning-health warnings of a run (``learning_health``): the patch classifier's
    test figures (``patch``, :func:`patch_test_summary`), a best epoch that is the first in
    either training log, whole-image test AUROC intervals (``predictions/*/metrics.json``)
    and the validation one (from ``predictions/val_*/image_predictions.csv``) containing 0.5,
    and the ``warnings`` of ``evaluation/metrics.json``. Sources are relative to ``out``."""
    out = Path(out)
    found = lh.patch_test_warnings(patch, patch["source"]) if patch else []
    for log, monitor in TRAINING_LOGS:
        found += lh.training_log_warnings(out / log, monitor, log)
    for kind, what in (("no_flips", "without flips"), ("flips", "with flips")):
        rel = f"predictions/{kind}/metrics.json"
        m = _metrics(out / rel)
        found += lh.auroc_warnings(m.get("auroc"), m.get("auroc_ci"),
                                   f"whole-image test ({what})", rel)
    val = _val_auroc(out, config)
    if val:
        found += lh.auroc_warnings(val["auroc"], val["auroc_ci"], "whole-image validation",
                                   val["source"])
    found += lh.file_warnings(out / EVALUATION_METRICS, EVALUATION_METRICS)
    return lh.unique_warnings(found)


def _val_auroc(out: Path, config: dict) -> Optional[dict]:
    """AUROC and its bootstrap interval of the run's validation predictions, or None."""
    kind = "flips" if (out / "predictions" / "val_flips").is_dir() else "no_flips"
    rel = f"predictions/val_{kind}/image_predictions.csv"
    n_boot = (config.get("predict") or {}).get("bootstrap", 2000)
    seed = (config.get("run") or {}).get("seed", 12345)
    val = lh.predictions_auroc(out / rel, int(n_boot), int(seed))
    return dict(val, source=rel, scores=SCORES_TEXT[kind]) if val else None


def export_summary(out: Union[str, Path]) -> Optional[dict]:
    """Where the run's exported model is (``export/``, written by ``export_model.py``), or
    None when the run has no model card.

    Returns:
        Absolute paths: ``dir``, ``model_card_md``, ``model_card_json``, ``recipe_json``,
        ``saved_model``, ``onnx`` (None when it was not written, ``onnx_reason`` saying why),
        and ``onnx_max_abs_diff`` (onnxruntime against tf-keras on the check input).
    """
    folder = (Path(out) / EXPORT_DIR).resolve()
    card_path = folder / "model_card.json"
    if not card_path.is_file():
        return None
    onnx = json.loads(card_path.read_text(encoding="utf-8")).get("onnx") or {}
    return {"dir": str(folder), "model_card_md": str(folder / "model_card.md"),
            "model_card_json": str(card_path), "recipe_json": str(folder / "recipe.json"),
            "saved_model": str(folder / "saved_model"),
            "onnx": str(folder / "model.onnx") if onnx.get("written") else None,
            "onnx_reason": onnx.get("reason"),
            "onnx_max_abs_diff": (onnx.get("check") or {}).get("max_abs_diff_vs_keras")}


def _export_section(out: Path, export: Optional[dict]) -> str:
    """The exported model: links to its card and folder, the ONNX file or why there is none,
    and the card itself."""
    head = '<h2 id="export">Exported model</h2>'
    if export is None:
        return head + ('<p class="muted">no exported model in this run (export.enabled = '
                       'false, or the export stage has not run)</p>')
    card = f"{EXPORT_DIR}/model_card.md"
    onnx = ("<code>model.onnx</code> written (max |onnxruntime - tf-keras| = "
            f"{export['onnx_max_abs_diff']:.3g})" if export["onnx"] else
            f"<b>no <code>model.onnx</code></b>: {html.escape(str(export['onnx_reason']))}; "
            "the SavedModel, recipe and card are there")
    text = (out / card).read_text(encoding="utf-8") if (out / card).is_file() else ""
    return "\n".join([
        head, f'<p><a id="model-card" href="{card}">Model card</a> '
              f'(<a href="{EXPORT_DIR}/model_card.json">JSON</a>) of the whole-image model '
              f'in <a href="{EXPORT_DIR}/">{EXPORT_DIR}/</a>: {onnx}; '
              f'<code>saved_model/</code>, <code>recipe.json</code> (score images with '
              f'<code>score_exported.py {EXPORT_DIR}</code>, no TensorFlow needed).</p>',
        f"<details><summary>The model card</summary><pre>{html.escape(text)}</pre></details>"])


def _warnings_banner(warnings: List[dict]) -> str:
    """The red box at the top of the report listing each learning-health warning."""
    if not warnings:
        return ""
    items = "".join(f"<li><code>{html.escape(w['code'])}</code>: {html.escape(w['message'])} "
                    f'<span class="muted">({html.escape(w["source"])})</span></li>'
                    for w in warnings)
    return (f'<div class="warnings" id="warnings"><h2>{len(warnings)} warning(s): the '
            f"model may not have learned</h2><ul>{items}</ul></div>")


def _patch_section(patch: Optional[dict]) -> str:
    """Per-class test figures and confusion matrix of the patch classifier."""
    scores = _patch_scores(patch or {})
    head = f"<h2>Patch classifier (test patches{', ' + scores if scores else ''})</h2>"
    if not patch:
        return head + '<p class="muted">no patch test metrics in this run</p>'
    rows = [[name, c["support"], c["predicted"], _fmt(c["recall"]), _fmt(c["precision"]),
             _fmt(c["auroc"], c["auroc_ci"])] for name, c in patch["per_class"].items()]
    counts = [[name] + list(row) for name, row in zip(patch["classes"], patch["counts"] or [])]
    return "\n".join([
        head, f"<p>{html.escape(_patch_accuracy_text(patch))}</p>",
        _table(["class", "test patches", "predicted as it", "recall", "precision",
                "AUROC, one vs rest"], rows),
        "<h3>Confusion matrix (rows: true class, columns: predicted)</h3>",
        _table(["true \\ predicted"] + patch["classes"], counts) if counts else "",
        f'<p class="muted">From {html.escape(patch["source"])}; intervals: 95% percentile '
        "bootstrap of the patches.</p>"])


_PATCH_SCORES = {"flips": "with flips", "no flips": "without flips"}


def _patch_scores(patch: dict) -> str:
    """``"with flips"``, ``"without flips"``, or ``""`` for a metrics file that does not say:
    which scores the patch test figures come from."""
    return _PATCH_SCORES.get(patch.get("scores") or "", "")


def _patch_accuracy_text(patch: dict) -> str:
    scores = _patch_scores(patch)
    return (f"accuracy {_fmt(patch['accuracy'])} on {patch['n']} test patches"
            f"{', ' + scores if scores else ''} (always "
            f"answering the most frequent class, {patch['majority_class']!r}, scores "
            f"{_fmt(patch['majority_share'])})")


_LEVEL_UNITS = {"image": "images", "breast": "breasts", "exam": "exams"}


def _rule_text(name: str, point: dict) -> str:
    """What an operating point of ``evaluate.py`` is, in words."""
    kind, _, target = name.partition("_")
    if point.get("chosen_on") != "validation":
        return f"fixed threshold {point['threshold']:g} (not chosen on validation)"
    if kind == "youden":
        return "Youden index, chosen on validation"
    return f"{kind} >= {target} on validation"


def _point_rank(item) -> tuple:
    """Youden's point first, then the target-sensitivity and target-specificity ones."""
    order = ("youden", "sensitivity", "specificity", "fixed")
    kind = item[0].partition("_")[0]
    return (order.index(kind) if kind in order else len(order), item[0])


def evaluation_summary(path: Union[str, Path]) -> Optional[dict]:
    """The figures of ``evaluate.py``'s ``metrics.json`` that a run's summary shows.

    Args:
        path: ``evaluation/metrics.json`` of a run.

    Returns:
        None when the file is missing; else ``levels`` (level -> ``n``, ``n_pos``, ``auroc``,
        ``auroc_ci``, ``auprc``, ``auprc_ci``, ``pf1``, ``pf1_ci``, ``ece``, ``brier``,
        ``calibrated``, ``reliability_png``), ``operating_points`` (level -> name ->
        ``threshold``, ``chosen_on``, ``rule``, the rates and their intervals),
        ``threshold_chosen_on`` (``validation`` or ``fixed``), ``bootstrap`` (the method of the
        image-level intervals) and ``operating_point`` (the image-level Youden point, or the
        fixed one without validation predictions). Image paths are relative to the run folder.
    """
    path = Path(path)
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    run_dir = path.parent.parent
    levels, points = {}, {}
    for level in ("image", "breast", "exam"):
        per_model = metrics.get(level) or {}
        if not per_model:
            continue
        res = next(iter(per_model.values()))     # the pipeline evaluates one model
        cal = res.get("calibration", {})
        png = res.get("reliability_png")
        if png and Path(png).is_absolute() and Path(png).is_relative_to(run_dir.resolve()):
            png = Path(png).relative_to(run_dir.resolve()).as_posix()
        levels[level] = {k: res.get(k) for k in ("n", "n_pos", "auroc", "auroc_ci", "auprc",
                                                 "auprc_ci", "pf1", "pf1_ci")}
        levels[level].update(ece=cal.get("ece"), brier=cal.get("brier"),
                             calibrated=cal.get("calibrated"), reliability_png=png,
                             bootstrap=res.get("bootstrap", {}).get("method"))
        points[level] = {name: {"rule": _rule_text(name, p), **{
            k: p.get(k) for k in ("threshold", "chosen_on", "sensitivity", "sensitivity_ci",
                                  "specificity", "specificity_ci", "ppv", "ppv_ci", "npv",
                                  "npv_ci", "f1", "f1_ci")}}
            for name, p in sorted(res.get("operating_points", {}).items(), key=_point_rank)}
    image = points.get("image", {})
    main = image.get("youden") or next(iter(image.values()), None)
    chosen = "validation" if any(p["chosen_on"] == "validation" for p in image.values()) \
        else "fixed"
    return {"levels": levels, "operating_points": points, "threshold_chosen_on": chosen,
            "operating_point": main,
            "val_predictions": metrics.get("settings", {}).get("val_predictions", [])}


def _curves(out: Path, kind: str, ev: Optional[dict]) -> List[str]:
    """The test ROC and PR curves of the scores ``kind``: ``evaluate``'s (marking the operating
    points it reports) when it ran, else the prediction stage's (marking the fixed 0.5)."""
    scores = SCORES_TEXT[kind]
    if ev is not None and (out / "evaluation" / "roc_image.png").is_file():
        marked = ("operating points chosen on validation" if ev["threshold_chosen_on"]
                  == "validation" else "the fixed threshold 0.5, not chosen on validation")
        folder = "evaluation"
    else:
        marked, folder = "the fixed threshold 0.5, not chosen on validation", \
            f"predictions/{kind}"
    return [_img(out, f"{folder}/roc_image.png", f"ROC curve, {scores} (marked: {marked})"),
            _img(out, f"{folder}/pr_image.png",
                 f"precision-recall curve, {scores} (marked: {marked})")]


def _evaluation_section(out: Path, ev: Optional[dict]) -> str:
    """The report's part on ``evaluate.py``'s results (operating points, levels, calibration)."""
    head = "<h2>Screening evaluation (operating points, levels, calibration)</h2>"
    if ev is not None and ev.get("scores"):
        head += f"<p>Of the test scores {html.escape(ev['scores'])}.</p>"
    if ev is None:
        return head + '<p class="muted">no evaluation in this run (evaluate.enabled = false)</p>'
    if ev["threshold_chosen_on"] == "validation":
        intro = ("Thresholds chosen on the validation images' scores (the Youden index; the "
                 "highest threshold keeping the target sensitivity; the lowest keeping the "
                 "target specificity), applied unchanged to the test images; a score at or "
                 "above the threshold is positive.")
    else:
        intro = ("No validation images: the fixed threshold 0.5 is reported, not one chosen on "
                 "validation.")
    level_rows = [[level, f"{m['n']} {_LEVEL_UNITS[level]}", m["n_pos"],
                   _fmt(m["auroc"], m["auroc_ci"]), _fmt(m["auprc"], m["auprc_ci"]),
                   _fmt(m["pf1"], m["pf1_ci"]), _fmt(m["ece"]), _fmt(m["brier"])]
                  for level, m in ev["levels"].items()]
    point_rows = [[level, p["rule"], f"{p['threshold']:.4f}",
                   _fmt(p["sensitivity"], p["sensitivity_ci"]),
                   _fmt(p["specificity"], p["specificity_ci"]),
                   _fmt(p["ppv"]), _fmt(p["npv"]), _fmt(p["f1"])]
                  for level, per in ev["operating_points"].items() for p in per.values()]
    cal_rows = [[level, m["calibrated"]["method"], _fmt(m["ece"]), _fmt(m["calibrated"]["ece"]),
                 _fmt(m["brier"]), _fmt(m["calibrated"]["brier"])]
                for level, m in ev["levels"].items() if m.get("calibrated")]
    image = ev["levels"].get("image", {})
    parts = [head, f"<p>{html.escape(intro)} Intervals: 95% bootstrap, "
                   f"{html.escape(str(image.get('bootstrap') or 'n/a'))}.</p>",
             "<h3>Operating points on the test set</h3>",
             _table(["level", "threshold rule", "threshold", "sensitivity", "specificity", "PPV",
                     "NPV", "F1"], point_rows, left=2) if point_rows
             else '<p class="muted">none (the test cases lack a class)</p>',
             "<h3>Levels</h3>",
             _table(["level", "cases", "positive", "AUROC", "AUPRC", "pF1", "ECE", "Brier"],
                    level_rows),
             '<p class="muted">Breasts: the mean of their views; exams: the higher of the two '
             "breasts. pF1: probabilistic F1 of the scores. ECE: expected calibration error "
             "(10 equal-width bins); Brier: mean squared error of the scores.</p>"]
    if cal_rows:
        parts += ["<h3>Recalibrated on validation</h3>",
                  _table(["level", "method", "ECE before", "ECE after", "Brier before",
                          "Brier after"], cal_rows)]
    if image.get("reliability_png"):
        parts.append(_img(out, image["reliability_png"],
                          "reliability diagram of the test images' scores (image level)"))
    return "\n".join(parts)


def write_report(out: Union[str, Path], config_path: Union[str, Path], config: dict,
                 state: dict, whole_img_dir: Union[str, Path],
                 stage_order: Sequence[str] = ()) -> Path:
    """Write ``report.html`` and ``summary.json`` into the run folder ``out``.

    Args:
        out: the run folder.
        config_path: the run's TOML config (shown as written).
        config: the config as the pipeline resolved it.
        state: the pipeline state (``pipeline_state.json``): stage status, times and logs.
        whole_img_dir: the whole-image folder (``train/val/test`` with class subfolders).
        stage_order: the stages in the order they run (the tables follow it).

    Returns:
        The path of ``report.html``.
    """
    out = Path(out)
    stages = state.get("stages", {})
    rank = {name: i for i, name in enumerate(stage_order)}
    stages = dict(sorted(stages.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    plain = _metrics(out / "predictions" / "no_flips" / "metrics.json")
    flips = _metrics(out / "predictions" / "flips" / "metrics.json")
    kind = scores_kind(config)
    head = flips if kind == "flips" else plain
    evaluation = evaluation_summary(out / "evaluation" / "metrics.json")
    if evaluation is not None:
        evaluation["scores"] = SCORES_TEXT[kind]
    derived_path = out / "derived.json"
    derived = json.loads(derived_path.read_text()) if derived_path.is_file() else {}
    times = {k: v.get("seconds") for k, v in stages.items()
             if v.get("status") == "done" and v.get("seconds") is not None and k != "report"}
    patch = patch_test_summary(out)
    val = _val_auroc(out, config)
    warnings = health_warnings(out, config, patch)
    unfinished = unfinished_stages({"stages": stages})
    export = export_summary(out)
    summary = {
        "unfinished_stages": unfinished,
        "out_dir": str(out.resolve()), "report": str((out / "report.html").resolve()),
        "warnings": warnings,
        "patch_test_accuracy": (patch or {}).get("accuracy"),
        "patch_majority_share": (patch or {}).get("majority_share"), "patch_test": patch,
        "val_auroc": (val or {}).get("auroc"), "val_auroc_ci": (val or {}).get("auroc_ci"),
        "n_val_images": (val or {}).get("n"), "val_scores": (val or {}).get("scores"),
        # the headline figures: the scores evaluate reads (its operating points, levels and
        # calibration are of the same scores)
        "scores": SCORES_TEXT[kind],
        "test_auroc": head.get("auroc"), "test_auroc_ci": head.get("auroc_ci"),
        "test_auprc": head.get("auprc"), "test_auprc_ci": head.get("auprc_ci"),
        "test_auroc_no_flips": plain.get("auroc"),
        "test_auroc_no_flips_ci": plain.get("auroc_ci"),
        "test_auprc_no_flips": plain.get("auprc"),
        "test_auprc_no_flips_ci": plain.get("auprc_ci"),
        "test_auroc_flips": flips.get("auroc"), "test_auroc_flips_ci": flips.get("auroc_ci"),
        "test_auprc_flips": flips.get("auprc"), "test_auprc_flips_ci": flips.get("auprc_ci"),
        "n_test_images": (head or plain).get("n"), "n_test_pos": (head or plain).get("n_pos"),
        "operating_point": (evaluation or {}).get("operating_point"),
        "evaluation": evaluation,
        "stage_seconds": times, "total_seconds": round(sum(times.values()), 1),
        "derived": derived, "export": export,
    }
    metric_rows = []
    for name, m in (("without flips", plain), ("with flips (mean of 4)", flips)):
        if m:
            metric_rows.append([name, m.get("n"), m.get("n_pos"),
                                _fmt(m.get("auroc"), m.get("auroc_ci")),
                                _fmt(m.get("auprc"), m.get("auprc_ci")),
                                _fmt(m.get("sensitivity")), _fmt(m.get("specificity")),
                                _fmt(m.get("threshold"))])
    stage_rows = [[name, rec.get("status", ""), "" if rec.get("seconds") is None
                   else f"{rec['seconds']:.1f}", rec.get("finished", ""), rec.get("log", "")]
                  for name, rec in stages.items() if name != "report"]
    sections = [
        f"<h1>Run report: {html.escape(out.resolve().name)}</h1>",
        _warnings_banner(warnings),
        f'<p class="muted">{html.escape(str(out.resolve()))}; config '
        f'{html.escape(str(config_path))}; written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>',
        (f'<p style="border: 2px solid #c00; padding: .5em"><b>This run did not finish: '
         f'{html.escape(_unfinished_text(unfinished))}.</b> What this page shows of these '
         f'stages is from an earlier run, or missing; run the pipeline again.</p>'
         if unfinished else ""),
        _export_section(out, export),
        "<h2>Test metrics (whole images)</h2>",
        _table(["prediction", "images", "positive", "AUROC", "AUPRC", "sensitivity",
                "specificity", "fixed threshold"], metric_rows) if metric_rows
        else '<p class="muted">no metrics (no labelled test images)</p>',
        (f"<p>Validation images ({val['n']}, {val['n_pos']} positive), {val['scores']}: AUROC "
         f"{_fmt(val['auroc'], val['auroc_ci'])}</p>" if val else ""),
        *_curves(out, kind, evaluation),
        _patch_section(patch),
        _evaluation_section(out, evaluation),
        "<h2>Heatmaps</h2><p>Probability of the malignant patch class over the test images "
        "the whole-image classifier scored highest; lesion outlines from the ROI masks where "
        "the data has them.</p>",
        _heatmap_figures(out, out / "predictions" / kind / "image_predictions.csv"),
        "<h2>Training curves</h2>",
        _img(out, "models/patch_clf.h5.curves.png", "patch classifier")
        + _img(out, "models/image_clf.h5.curves.png", "whole-image classifier")
        or '<p class="muted">none</p>',
        "<h2>Data</h2><h3>Whole images</h3>", _counts_table(count_images(whole_img_dir)),
        "<h3>Patches</h3>", _counts_table(count_images(out / "patches")),
        "<h2>Stages</h2>",
        _table(["stage", "status", "seconds (last run)", "finished", "log"], stage_rows),
        f"<p>Total: {summary['total_seconds']:.0f} s.</p>",
        "<h2>Derived settings</h2>",
        _table(["setting", "value"], [[k, v] for k, v in sorted(derived.items())]),
        "<h2>Config</h2>",
        f"<pre>{html.escape(Path(config_path).read_text(encoding='utf-8'))}</pre>",
        "<h3>Resolved</h3>",
        f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>",
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Run report: {html.escape(out.resolve().name)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(s for s in sections if s)
            + "\n</body></html>\n")
    summary_text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "summary.json", lambda fh: fh.write(summary_text), text=True)
    return atomic_write(out / "report.html", lambda fh: fh.write(page), text=True)


def format_summary(s: dict) -> str:
    """A few printed lines of a run's ``summary.json``, its warnings last."""
    times = ", ".join(f"{k} {v:.0f}s" for k, v in s.get("stage_seconds", {}).items())
    lines = ["Run summary"]
    if s.get("unfinished_stages"):
        lines.append(f"  NOT FINISHED: {_unfinished_text(s['unfinished_stages'])} (their results "
                     f"are from an earlier run, or missing)")
    lines += _patch_lines(s.get("patch_test"))
    scores = s.get("scores", "without flips")     # summaries before "scores" held these
    other = "without flips" if scores == "with flips" else "with flips"
    lines += [
        f"  whole-image test AUROC, {scores} ({s.get('n_test_images')} images, "
        f"{s.get('n_test_pos')} positive): {_fmt(s.get('test_auroc'), s.get('test_auroc_ci'))}",
    ]
    key = "test_auroc_flips" if other == "with flips" else "test_auroc_no_flips"
    if s.get(key) is not None:
        lines.append(f"  whole-image test AUROC, {other}: {_fmt(s[key], s.get(key + '_ci'))}")
    if s.get("val_auroc") is not None:
        lines.append(f"  whole-image validation AUROC, {s.get('val_scores') or scores} "
                     f"({s.get('n_val_images')} images): "
                     f"{_fmt(s['val_auroc'], s.get('val_auroc_ci'))}")
    lines += [
        *_evaluation_lines(s.get("evaluation")),
        f"  time per stage (last run): {times}",
        f"  total time: {s.get('total_seconds', 0):.0f}s",
        *_export_lines(s.get("export")),
    ]
    warnings = s.get("warnings") or []
    if warnings:
        lines.append(f"{len(warnings)} warning(s): the model may not have learned")
        lines += lh.format_warnings(warnings)
    return "\n".join(lines)


def _export_lines(export: Optional[dict]) -> List[str]:
    """Where the model card is, and whether the ONNX file was written."""
    if not export:
        return []
    onnx = "with model.onnx" if export.get("onnx") else \
        f"no model.onnx: {export.get('onnx_reason')}"
    return [f"  exported model ({onnx}); model card: {export['model_card_md']}"]


def _patch_lines(patch: Optional[dict]) -> List[str]:
    """The printed lines of the patch classifier's test figures (:func:`patch_test_summary`)."""
    if not patch:
        return []
    lines = [f"  patch classifier test {_patch_accuracy_text(patch)}"]
    for name, c in patch["per_class"].items():
        lines.append(f"    {name}: {c['support']} patches, predicted {c['predicted']}, recall "
                     f"{_fmt(c['recall'])}, precision {_fmt(c['precision'])}, AUROC one vs "
                     f"rest {_fmt(c['auroc'], c['auroc_ci'])}")
    return lines


def _evaluation_lines(ev: Optional[dict]) -> List[str]:
    """The printed lines of the screening evaluation (see :func:`evaluation_summary`)."""
    if not ev:
        return []
    lines = []
    scores = f", {ev['scores']}" if ev.get("scores") else ""
    for name, p in ev["operating_points"].get("image", {}).items():
        rates = (f"sensitivity {_fmt(p['sensitivity'], p['sensitivity_ci'])}, specificity "
                 f"{_fmt(p['specificity'], p['specificity_ci'])}")
        if name == "youden":
            lines.append(f"  operating point chosen on validation (Youden index, threshold "
                         f"{p['threshold']:.3f}), on test{scores}: {rates}")
        elif p["chosen_on"] == "validation":
            lines.append(f"  threshold keeping {name.replace('_', ' >= ')} on validation "
                         f"({p['threshold']:.3f}), on test{scores}: {rates}")
        else:
            lines.append(f"  fixed threshold {p['threshold']:g} (no validation images, not "
                         f"chosen on validation), on test{scores}: {rates}")
    levels = ev["levels"]
    more = [f"{level}-level AUROC{scores} ({levels[level]['n']} {_LEVEL_UNITS[level]}): "
            f"{_fmt(levels[level]['auroc'], levels[level]['auroc_ci'])}"
            for level in ("breast", "exam") if level in levels]
    if more:
        lines.append("  " + "; ".join(more))
    image = levels.get("image")
    if image:
        cal = image.get("calibrated")
        after = (f" ({cal['method']} on validation: ECE {_fmt(cal['ece'])}, Brier "
                 f"{_fmt(cal['brier'])})" if cal else "")
        lines.append(f"  calibration (test images{scores}): ECE {_fmt(image['ece'])}, Brier "
                     f"{_fmt(image['brier'])}{after}; pF1 {_fmt(image['pf1'], image['pf1_ci'])}")
    return lines
