"""Learning-health warnings: the pure checks of ``learning_health``, the per-class patch figures
of ``eval_metrics.confusion_report``, the report's ``warnings`` (summary.json, banner, printed
summary), ``run_pipeline.py --strict`` and the trainers' own warnings.

The failing case is the one seen on real mammograms: a patch classifier that found none of 50
malignant test patches (confusion [[712, 1, 17], [39, 0, 11], [41, 1, 18]]), whose accuracy was
the background share, whose best validation epoch was the first, with whole-image AUROCs near 0.5.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

import eval_metrics as em
import learning_health as lh

CLASSES = ["background", "malignant", "benign"]
FAILED_COUNTS = [[712, 1, 17], [39, 0, 11], [41, 1, 18]]


def _codes(warnings):
    return sorted(w["code"] for w in warnings)


def _metrics_of_counts(counts, auroc=None, ci=None):
    """A patch test metrics dict (as ``confusion_report`` writes it) from a confusion matrix."""
    per_class = em.class_rates(counts, CLASSES)
    for name in CLASSES:
        per_class[name].update(auroc=auroc, auroc_ci=ci)
    cm = np.asarray(counts)
    return {"classes": CLASSES, "counts": counts, "accuracy": np.trace(cm) / cm.sum(),
            "per_class": per_class}


def _confident(n=300, seed=0, noise=0.15):
    """Labels and probabilities of a classifier that is right about 9 times in 10."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.7, 0.15, 0.15])
    probs = rng.dirichlet([1, 1, 1], n) * noise + np.eye(3)[labels] * (1 - noise)
    flip = rng.random(n) < 0.08
    probs[flip] = probs[flip][:, ::-1]
    return labels, probs


# --------------------------------------------------------------------------- per-class figures
def test_confusion_report_per_class_figures_match_sklearn():
    labels, probs = _confident()
    rep = em.confusion_report(labels, probs, CLASSES, n_boot=300, seed=1)
    pred = probs.argmax(1)
    recall = recall_score(labels, pred, average=None)
    precision = precision_score(labels, pred, average=None)
    for j, name in enumerate(CLASSES):
        c = rep["per_class"][name]
        assert c["support"] == int((labels == j).sum())
        assert c["predicted"] == int((pred == j).sum())
        assert c["recall"] == pytest.approx(recall[j])
        assert c["precision"] == pytest.approx(precision[j])
        assert c["auroc"] == pytest.approx(roc_auc_score(labels == j, probs[:, j]))
        assert c["auroc_ci"][0] <= c["auroc"] <= c["auroc_ci"][1]
        assert rep["auroc_ovr"][name] == c["auroc"]
    assert rep["majority_class"] == "background"
    assert rep["majority_share"] == pytest.approx((labels == 0).mean())
    assert rep["n"] == labels.size


def test_class_rates_leave_undefined_rates_empty():
    rates = em.class_rates(FAILED_COUNTS, CLASSES)
    assert rates["malignant"] == {"support": 50, "predicted": 2, "recall": 0.0,
                                  "precision": 0.0}
    assert rates["background"]["predicted"] == 792
    empty = em.class_rates([[5, 0], [0, 0]], ["a", "b"])
    assert empty["b"]["recall"] is None and empty["b"]["precision"] is None


def test_written_metrics_json_holds_the_per_class_figures(tmp_path):
    labels, probs = _confident(n=60)
    rep = em.write_confusion_report(labels, probs, CLASSES, tmp_path / "m.h5.test", n_boot=100)
    saved = json.loads((tmp_path / "m.h5.test.metrics.json").read_text())
    assert saved["per_class"]["malignant"]["support"] == rep["per_class"]["malignant"]["support"]
    assert len(saved["per_class"]["benign"]["auroc_ci"]) == 2
    assert saved["majority_share"] == pytest.approx(rep["majority_share"])


# --------------------------------------------------------------------------- the pure checks
def test_the_real_failure_raises_class_and_accuracy_warnings():
    warnings = lh.patch_test_warnings(_metrics_of_counts(FAILED_COUNTS), "m.json")
    assert _codes(warnings) == ["accuracy_not_above_majority", "class_not_predicted"]
    cls = next(w for w in warnings if w["code"] == "class_not_predicted")
    assert "'malignant'" in cls["message"] and "50" in cls["message"]
    assert all(w["source"] == "m.json" for w in warnings)


@pytest.mark.parametrize("predicted, fires", [(0, True), (2, True), (3, False), (45, False)])
def test_class_almost_never_predicted_is_below_five_percent_of_its_cases(predicted, fires):
    per_class = {"malignant": {"support": 50, "predicted": predicted},
                 "absent": {"support": 0, "predicted": 0}}
    warnings = lh.class_warnings(per_class, "m.json")
    assert _codes(warnings) == (["class_not_predicted"] if fires else [])
    if fires:
        assert ("never predicted" if predicted == 0 else "almost never") in \
            warnings[0]["message"]


@pytest.mark.parametrize("accuracy, fires", [(0.80, True), (0.88, True), (0.881, False)])
def test_accuracy_must_be_above_the_majority_share(accuracy, fires):
    warnings = lh.accuracy_warnings(accuracy, 0.88, "background", "m.json")
    assert _codes(warnings) == (["accuracy_not_above_majority"] if fires else [])


@pytest.mark.parametrize("auroc, ci, code", [
    (0.47, [0.42, 0.55], "auroc_ci_includes_chance"),
    (0.55, [0.50, 0.61], "auroc_ci_includes_chance"),
    (0.30, [0.22, 0.41], "auroc_below_chance"),
    (0.94, [0.90, 0.97], None),
    (0.60, [0.51, 0.70], None),
    (0.47, None, None),
    (0.47, [None, None], None),
])
def test_auroc_interval_containing_chance(auroc, ci, code):
    warnings = lh.auroc_warnings(auroc, ci, "whole-image test", "p.json")
    assert _codes(warnings) == ([code] if code else [])


def test_patch_per_class_auroc_interval_is_checked():
    metrics = _metrics_of_counts([[90, 5, 5], [5, 90, 5], [5, 5, 90]], auroc=0.52,
                                 ci=[0.45, 0.6])
    assert _codes(lh.patch_test_warnings(metrics, "m.json")) == \
        ["auroc_ci_includes_chance"] * 3


def test_older_metrics_file_without_per_class_is_read_from_its_counts():
    metrics = {"classes": CLASSES, "counts": FAILED_COUNTS, "accuracy": 730 / 840,
               "auroc_ovr": {c: 0.6 for c in CLASSES}}
    assert _codes(lh.patch_test_warnings(metrics, "m.json")) == \
        ["accuracy_not_above_majority", "class_not_predicted"]


@pytest.mark.parametrize("values, best", [([0.88, 0.88, 0.88], 1), ([0.5, 0.7, 0.6], 2),
                                          ([float("nan"), 0.5, 0.4], 2), ([None, None], None)])
def test_best_epoch_is_the_first_of_equal_best_values(values, best):
    assert lh.best_epoch_of(values) == best


def test_best_epoch_first_fires_only_with_later_epochs():
    assert _codes(lh.best_epoch_warnings(1, 20, "val_accuracy", "log.csv")) == \
        ["best_epoch_first"]
    assert lh.best_epoch_warnings(1, 1, "val_accuracy", "log.csv") == []
    assert lh.best_epoch_warnings(7, 20, "val_accuracy", "log.csv") == []


def _write_log(path, column, values):
    lines = [f"epoch,stage,loss,{column},lr,seconds"]
    lines += [f"{i + 1},1,0.5,{v},0.001,3.0" for i, v in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_log_best_epoch_first(tmp_path):
    log = _write_log(tmp_path / "m.h5.log.csv", "val_accuracy", [0.869, 0.869, 0.85, 0.869])
    warnings = lh.training_log_warnings(log, "val_accuracy", "models/m.h5.log.csv")
    assert _codes(warnings) == ["best_epoch_first"]
    assert warnings[0]["source"] == "models/m.h5.log.csv"
    _write_log(log, "val_accuracy", [0.7, 0.8, 0.9])
    assert lh.training_log_warnings(log, "val_accuracy") == []
    assert lh.training_log_warnings(log, "val_auc") == []          # no such column
    assert lh.training_log_warnings(tmp_path / "none.csv", "val_auc") == []


def test_healthy_classifier_is_quiet():
    """A classifier right about 9 times in 10 on every class, test AUROC about 0.94: no
    warning."""
    labels, probs = _confident(n=400, seed=3)
    rep = em.confusion_report(labels, probs, CLASSES, n_boot=300)
    assert min(c["recall"] for c in rep["per_class"].values()) > 0.85
    assert lh.patch_test_warnings(rep, "m.json") == []
    assert lh.auroc_warnings(0.94, [0.90, 0.97], "whole-image test", "p.json") == []
    assert lh.class_warnings({"malignant": {"support": 50, "predicted": 45}}, "m") == []


def test_predictions_auroc_from_a_predictions_csv(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    scores = rng.random(80)
    path = tmp_path / "image_predictions.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_index", "malignant_pred", "malignant_label", "path"])
        for i, (y, s) in enumerate(zip(labels, scores)):
            w.writerow([i, s, y, f"img{i}.png"])
        w.writerow([80, 0.9, "", "unlabelled.png"])
    res = lh.predictions_auroc(path, 500, 1)
    assert res["n"] == 80 and res["n_pos"] == int(labels.sum())
    assert res["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert res["auroc_ci"][0] < 0.5 < res["auroc_ci"][1]
    assert lh.predictions_auroc(tmp_path / "missing.csv", 500, 1) is None


def test_warnings_of_an_evaluation_file_are_merged(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"image": {}, "warnings": [
        {"code": "calibration_reverses_ranking", "message": "the platt map reverses the "
         "ranking; not applied", "level": "image"}]}))
    found = lh.file_warnings(path, "evaluation/metrics.json")
    assert found == [{"code": "calibration_reverses_ranking",
                      "message": "the platt map reverses the ranking; not applied",
                      "source": "evaluation/metrics.json"}]
    path.write_text(json.dumps({"warnings": [{"message": "no code"}]}))
    assert _codes(lh.file_warnings(path)) == ["unreadable_warnings"]
    path.write_text(json.dumps({"warnings": "oops"}))
    assert _codes(lh.file_warnings(path)) == ["unreadable_warnings"]
    path.write_text("{not json")
    assert _codes(lh.file_warnings(path)) == ["unreadable_warnings"]
    path.write_text(json.dumps({"image": {}}))
    assert lh.file_warnings(path) == []
    assert lh.file_warnings(tmp_path / "missing.json") == []


def test_unique_and_formatted_warnings():
    w = lh.make_warning("best_epoch_first", "the best epoch was the first", "a.csv")
    assert lh.unique_warnings([w, dict(w), lh.make_warning("x", "y", "z")]) == \
        [w, lh.make_warning("x", "y", "z")]
    assert lh.format_warnings([w]) == \
        ["  WARNING [best_epoch_first] the best epoch was the first (a.csv)"]


def test_learning_health_does_not_import_tensorflow():
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path[:0] = [%r, %r]; import learning_health, report; "
            "print('tensorflow' in sys.modules)" % (str(repo), str(repo / "ddsm_train")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
