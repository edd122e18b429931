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


# --------------------------------------------------------------------------- the run's report
def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    em.write_json_atomic(obj, path)


def _write_predictions(path, labels, scores):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_index", "malignant_pred", "malignant_label", "path"])
        w.writerows([i, s, y, f"img{i}.png"] for i, (y, s) in enumerate(zip(labels, scores)))


def _make_run(out, healthy):
    """A run folder with what the trainers and the prediction stages write."""
    rng = np.random.default_rng(5)
    (out / "models").mkdir(parents=True)
    if healthy:
        labels, probs = _confident(n=400, seed=3)
        patch = em.confusion_report(labels, probs, CLASSES, n_boot=200)
    else:
        patch = _metrics_of_counts(FAILED_COUNTS, auroc=0.6, ci=[0.55, 0.66])
    _write_json(out / "models" / "patch_clf.h5.test.metrics.json", patch)
    _write_log(out / "models" / "patch_clf.h5.log.csv", "val_accuracy",
               [0.7, 0.8, 0.9] if healthy else [0.869, 0.869, 0.86])
    _write_log(out / "models" / "image_clf.h5.log.csv", "val_auc",
               [0.7, 0.85, 0.8] if healthy else [0.49, 0.42, 0.45])
    auroc, ci = (0.94, [0.90, 0.97]) if healthy else (0.47, [0.36, 0.58])
    _write_json(out / "predictions" / "no_flips" / "metrics.json",
                {"image": {"n": 100, "n_pos": 50, "auroc": auroc, "auroc_ci": ci}})
    y = rng.integers(0, 2, 100)
    _write_predictions(out / "predictions" / "val_no_flips" / "image_predictions.csv", y,
                       y * 0.6 + rng.random(100) * 0.4 if healthy else rng.random(100))
    if not healthy:
        _write_json(out / "evaluation" / "metrics.json", {"warnings": [
            {"code": "calibration_reverses_ranking",
             "message": "the platt map fitted on validation reverses the ranking <sic>; "
                        "not applied"}]})


def _report(tmp_path, healthy):
    import report

    out = tmp_path / "run"
    _make_run(out, healthy)
    config_path = tmp_path / "c.toml"
    config_path.write_text("[run]\nseed = 1\n")
    report.write_report(out, config_path, {"run": {"seed": 1}, "predict": {"bootstrap": 300}},
                        {"stages": {}}, tmp_path / "no_images")
    summary = json.loads((out / "summary.json").read_text())
    return summary, (out / "report.html").read_text(), report.format_summary(summary)


def test_report_lists_the_warnings_of_a_run_that_learned_nothing(tmp_path):
    summary, page, printed = _report(tmp_path, healthy=False)
    found = {(w["code"], w["source"]) for w in summary["warnings"]}
    assert found == {
        ("class_not_predicted", "models/patch_clf.h5.test.metrics.json"),
        ("accuracy_not_above_majority", "models/patch_clf.h5.test.metrics.json"),
        ("best_epoch_first", "models/patch_clf.h5.log.csv"),
        ("best_epoch_first", "models/image_clf.h5.log.csv"),
        ("auroc_ci_includes_chance", "predictions/no_flips/metrics.json"),
        ("auroc_ci_includes_chance", "predictions/val_no_flips/image_predictions.csv"),
        ("calibration_reverses_ranking", "evaluation/metrics.json")}
    # the banner comes first, lists every warning, escaped
    banner = page.index('<div class="warnings"')
    assert banner < page.index("<h2>Test metrics")
    assert "7 warning(s)" in page[banner:]
    for w in summary["warnings"]:
        assert f"<code>{w['code']}</code>" in page
    assert "reverses the ranking &lt;sic&gt;" in page
    # the printed summary lists them too
    for w in summary["warnings"]:
        assert f"WARNING [{w['code']}] {w['message']} ({w['source']})" in printed
    assert "7 warning(s)" in printed


def test_report_names_the_patch_scores_the_metrics_file_gives(tmp_path):
    """A metrics file of flip-averaged test patches says so; the report and summary repeat it."""
    out = tmp_path / "run"
    _make_run(out, healthy=True)
    path = out / "models" / "patch_clf.h5.test.metrics.json"
    _write_json(path, dict(json.loads(path.read_text()), scores="flips"))
    import report

    config_path = tmp_path / "c.toml"
    config_path.write_text("[run]\nseed = 1\n")
    report.write_report(out, config_path, {"run": {"seed": 1}, "predict": {"bootstrap": 300}},
                        {"stages": {}}, tmp_path / "no_images")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patch_test"]["scores"] == "flips"
    page = (out / "report.html").read_text()
    assert "<h2>Patch classifier (test patches, with flips)</h2>" in page
    assert "on 400 test patches, with flips (always" in report.format_summary(summary)


def test_report_shows_patch_figures_per_class_from_the_metrics_file(tmp_path):
    summary, page, printed = _report(tmp_path, healthy=False)
    patch = summary["patch_test"]
    assert summary["patch_test_accuracy"] == pytest.approx(730 / 840)
    assert summary["patch_majority_share"] == pytest.approx(730 / 840)
    assert patch["majority_class"] == "background" and patch["n"] == 840
    assert patch["per_class"]["malignant"] == {"support": 50, "predicted": 2, "recall": 0.0,
                                               "precision": 0.0, "auroc": 0.6,
                                               "auroc_ci": [0.55, 0.66]}
    assert "<h2>Patch classifier (test patches)</h2>" in page
    assert "<td class=l>malignant</td><td>50</td><td>2</td><td>0.000</td><td>0.000</td>" \
        in page
    assert "scores 0.869" in page
    # the file holds its per-class keys sorted; rows and columns follow the class list
    assert patch["classes"] == CLASSES
    assert "<tr><td class=l>malignant</td><td>39</td><td>0</td><td>11</td></tr>" in page
    assert printed.index("    background:") < printed.index("    malignant:") < \
        printed.index("    benign:")
    assert ("patch classifier test accuracy 0.869 on 840 test patches (always answering the "
            "most frequent class, 'background', scores 0.869)") in printed
    assert ("    malignant: 50 patches, predicted 2, recall 0.000, precision 0.000, AUROC one "
            "vs rest 0.600 (95% CI 0.550-0.660)") in printed
    assert summary["val_auroc"] is not None and summary["n_val_images"] == 100
    assert "whole-image validation AUROC, without flips (100 images)" in printed


def test_report_of_a_healthy_run_has_no_warning(tmp_path):
    summary, page, printed = _report(tmp_path, healthy=True)
    assert summary["warnings"] == []
    assert 'class="warnings"' not in page and "WARNING" not in printed
    assert summary["patch_test_accuracy"] > summary["patch_majority_share"]


def test_report_without_patch_metrics_skips_the_patch_figures(tmp_path):
    import report

    out = tmp_path / "run"
    out.mkdir()
    config_path = tmp_path / "c.toml"
    config_path.write_text("")
    report.write_report(out, config_path, {}, {"stages": {}}, tmp_path / "none")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patch_test"] is None and summary["warnings"] == []
    assert "no patch test metrics in this run" in (out / "report.html").read_text()
    assert "patch classifier" not in report.format_summary(summary)


# --------------------------------------------------------------------------- run_pipeline --strict
class _FakePipeline:
    """Stands in for ``run_pipeline.Pipeline``: its run folder holds a summary.json already."""

    def __init__(self, config, out, **_):
        self.out = Path(out)

    def run(self, from_stage=None, only=None):
        return {"report": "ran"}


@pytest.mark.parametrize("strict", [False, True])
def test_strict_exits_with_status_3_when_the_run_raised_warnings(tmp_path, monkeypatch, capsys,
                                                                 strict):
    import run_pipeline

    monkeypatch.setattr(run_pipeline, "Pipeline", _FakePipeline)
    warning = lh.make_warning("best_epoch_first", "the best epoch was the first", "log.csv")
    _write_json(tmp_path / "run" / "summary.json", {"warnings": [warning]})
    (tmp_path / "c.toml").write_text("[run]\nseed = 1\n")
    argv = [str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")] + (
        ["--strict"] if strict else [])
    if strict:
        with pytest.raises(SystemExit) as exc:
            run_pipeline.main(argv)
        assert exc.value.code == run_pipeline.STRICT_EXIT == 3
    else:
        assert run_pipeline.main(argv) == {"report": "ran"}
    printed = capsys.readouterr()
    assert "WARNING [best_epoch_first] the best epoch was the first (log.csv)" in printed.out
    assert ("--strict: the run raised 1 warning(s)" in printed.err) == strict


def test_strict_run_without_warnings_exits_0(tmp_path, monkeypatch, capsys):
    import run_pipeline

    monkeypatch.setattr(run_pipeline, "Pipeline", _FakePipeline)
    _write_json(tmp_path / "run" / "summary.json", {"warnings": []})
    (tmp_path / "c.toml").write_text("[run]\nseed = 1\n")
    assert run_pipeline.main([str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"),
                              "--strict"]) == {"report": "ran"}
    assert "WARNING" not in capsys.readouterr().out


# --------------------------------------------------------------------------- the trainers
class _FakeModel:
    """Answers the class probabilities stored in every pixel of its input."""

    def predict(self, x, verbose=0):
        return np.asarray(x)[:, 0, 0, :]

    predict_on_batch = predict

    def compile(self, **_):
        pass

    def evaluate(self, test, verbose=0):
        labels, probs = test.labels, test.probs
        return 0.5, float((probs.argmax(1) == labels).mean())


class _FakeTest:
    """A test Sequence of (x, one-hot y) batches whose images carry the model's answer."""

    def __init__(self, labels, probs, batch=32):
        self.labels, self.probs, self.batch = labels, probs, batch
        self.nb_sample = labels.size

    def __len__(self):
        return -(-self.labels.size // self.batch)

    def __getitem__(self, k):
        sl = slice(k * self.batch, (k + 1) * self.batch)
        x = np.repeat(np.repeat(self.probs[sl][:, None, None, :], 2, axis=1), 2, axis=2)
        return x, np.eye(self.probs.shape[1])[self.labels[sl]]


class _Hist:
    def __init__(self, history, stage=1):
        self.history, self.stage = history, stage
        self.epoch = list(range(len(next(iter(history.values())))))


def _failing_patch_model(n=840):
    """Labels and probabilities giving FAILED_COUNTS."""
    labels, preds = [], []
    for true, row in enumerate(FAILED_COUNTS):
        for pred, count in enumerate(row):
            labels += [true] * count
            preds += [pred] * count
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], len(labels)) * 0.2 + np.eye(3)[preds] * 0.8
    return np.asarray(labels), probs


@pytest.mark.parametrize("healthy", [False, True])
def test_patch_trainer_reports_and_saves_its_warnings(tmp_path, monkeypatch, healthy):
    import dm_keras_ext
    import patch_clf_train

    monkeypatch.setattr(dm_keras_ext, "robust_load_model", lambda path: _FakeModel())
    labels, probs = _confident(n=400, seed=3) if healthy else _failing_patch_model()
    best = str(tmp_path / "patch.h5")
    opts = {"best_model": best, "class_list": CLASSES, "seed": 3}
    hist = _Hist({"loss": [1.0, 0.9, 0.8],
                  "val_accuracy": [0.7, 0.8, 0.9] if healthy else [0.869, 0.869, 0.86]})
    result = patch_clf_train._report(opts, tmp_path / "o.json", [hist],
                                     _FakeTest(labels, probs))
    saved = json.loads(Path(best + ".test.metrics.json").read_text())
    if healthy:
        assert result["warnings"] == [] and saved["warnings"] == []
        return
    assert _codes(result["warnings"]) == ["accuracy_not_above_majority",
                                          "auroc_ci_includes_chance", "best_epoch_first",
                                          "class_not_predicted"]
    assert "'malignant'" in next(w["message"] for w in result["warnings"]
                                 if w["code"] == "auroc_ci_includes_chance")
    assert saved["warnings"] == result["warnings"]
    assert saved["counts"] == FAILED_COUNTS
    assert saved["per_class"]["malignant"]["predicted"] == 2
    assert {w["source"] for w in result["warnings"]} == {best + ".test.metrics.json",
                                                         best + ".log.csv"}


def test_patch_trainer_last_epoch_model_still_warns_of_a_first_epoch_peak(tmp_path,
                                                                          monkeypatch):
    """--last-epoch-model keeps the last epoch; a validation figure that peaked at the first
    epoch is still reported (the kept model is not evidence of learning)."""
    import dm_keras_ext
    import patch_clf_train

    monkeypatch.setattr(dm_keras_ext, "robust_load_model", lambda path: _FakeModel())
    labels, probs = _confident(n=400, seed=3)
    opts = {"best_model": str(tmp_path / "patch.h5"), "class_list": CLASSES, "seed": 3,
            "last_epoch_model": True}
    hist = _Hist({"loss": [1.0, 0.9, 0.8], "val_accuracy": [0.9, 0.8, 0.7]})
    result = patch_clf_train._report(opts, tmp_path / "o.json", [hist],
                                     _FakeTest(labels, probs))
    assert (result["best_epoch"], result["best_by"]) == (3, "last_epoch")
    assert result["best_val_accuracy"] == pytest.approx(0.7)
    assert _codes(result["warnings"]) == ["best_epoch_first"]


@pytest.mark.parametrize("healthy", [False, True])
def test_image_trainer_reports_its_warnings(tmp_path, monkeypatch, healthy):
    import dm_keras_ext
    import image_clf_train

    monkeypatch.setattr(dm_keras_ext, "robust_load_model", lambda path: _FakeModel())
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 120)
    pos = labels * 0.4 + rng.random(120) * 0.6 if healthy else rng.random(120)
    probs = np.column_stack([1 - pos, pos])
    ckpt = type("Ckpt", (), {"best_auc": 0.8, "best_epoch": 3 if healthy else 1})()
    opts = {"best_model": str(tmp_path / "image.h5"), "class_list": ["neg", "pos"],
            "seed": 2}
    result = image_clf_train._report(opts, tmp_path / "o.json",
                                     [_Hist({"loss": [1, 0.9, 0.8], "val_auc": [.6, .7, .8]})],
                                     ckpt, _FakeTest(labels, probs))
    ci = result["test_auroc_ci"]["pos"]
    assert ci["auroc"] == pytest.approx(roc_auc_score(labels, pos))
    assert ci["auroc_ci"][0] < ci["auroc"] <= ci["auroc_ci"][1]
    assert _codes(result["warnings"]) == \
        ([] if healthy else ["auroc_ci_includes_chance", "best_epoch_first"])
