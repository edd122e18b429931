"""A run's summary (printed, ``summary.json``) and ``report.html`` name the scores each figure
comes from, and the headline test AUROC is of the scores the evaluation (operating points,
breast/exam levels, calibration) reads: with flips when ``predict.flips``."""
import json

import numpy as np
import pandas as pd
import pytest


def _predictions(path, seed, first=0, n_pat=20):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(first, first + n_pat):
        for side in ("LEFT", "RIGHT"):
            y = int((p + len(side)) % 3 == 0)
            for view in ("CC", "MLO"):
                rows.append({"image_index": f"P_{p:05d}_{side}_{view}.png",
                             "malignant_pred": 1 / (1 + np.exp(-(rng.normal() + 2 * y - 1))),
                             "malignant_label": y})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


def _run_folder(tmp_path, flips: bool):
    """A run folder with both test score sets (their AUROCs told apart: 0.61 without flips,
    0.83 with) and evaluate's results on those that ``predict.flips`` selects."""
    import evaluate

    out = tmp_path / "run"
    kind = "flips" if flips else "no_flips"
    for k, auroc in (("no_flips", 0.61), ("flips", 0.83)):
        (out / "predictions" / k).mkdir(parents=True)
        (out / "predictions" / k / "metrics.json").write_text(json.dumps(
            {"image": {"n": 80, "n_pos": 27, "auroc": auroc, "auroc_ci": [auroc - 0.1,
                                                                           auroc + 0.1]}}))
    _predictions(out / "predictions" / kind / "image_predictions.csv", 1)
    _predictions(out / "predictions" / f"val_{kind}" / "image_predictions.csv", 2, first=100)
    evaluate.main(["--predictions", str(out / "predictions" / kind / "image_predictions.csv"),
                   "--val-predictions",
                   str(out / "predictions" / f"val_{kind}" / "image_predictions.csv"),
                   "--bootstrap", "0", "--quiet", "--out-dir", str(out / "evaluation")])
    return out


def _write(tmp_path, flips: bool):
    import report

    out = _run_folder(tmp_path, flips)
    config_path = tmp_path / "c.toml"
    config_path.write_text("[run]\nseed = 1\n")
    config = {"run": {"seed": 1}, "predict": {"bootstrap": 50, "flips": flips}}
    report.write_report(out, config_path, config, {"stages": {}}, tmp_path / "no_images")
    summary = json.loads((out / "summary.json").read_text())
    return summary, (out / "report.html").read_text(), report.format_summary(summary)


@pytest.mark.parametrize("flips", [True, False])
def test_headline_auroc_and_operating_points_use_the_same_scores(tmp_path, flips):
    summary, page, printed = _write(tmp_path, flips)
    used, other = ("with flips", "without flips") if flips else ("without flips", "with flips")
    head, rest = (0.83, 0.61) if flips else (0.61, 0.83)
    assert summary["scores"] == used and summary["evaluation"]["scores"] == used
    assert summary["test_auroc"] == head
    assert summary["test_auroc_no_flips"] == 0.61 and summary["test_auroc_flips"] == 0.83
    assert summary["val_scores"] == used
    lines = printed.splitlines()
    assert any(ln.startswith(f"  whole-image test AUROC, {used} (80 images, 27 positive): "
                             f"{head:.3f}") for ln in lines), printed
    assert f"  whole-image test AUROC, {other}: {rest:.3f}" in printed
    assert f"  whole-image validation AUROC, {used} (80 images)" in printed
    assert f"), on test, {used}: sensitivity" in printed
    assert f"breast-level AUROC, {used} (" in printed
    assert f"calibration (test images, {used}): ECE" in printed
    assert f"Of the test scores {used}." in page
    assert "<p>Validation images (80, " in page and f" positive), {used}: AUROC" in page


def test_report_shows_the_curves_marking_the_points_chosen_on_validation(tmp_path):
    _, page, _ = _write(tmp_path, True)
    assert 'src="evaluation/roc_image.png"' in page
    assert "ROC curve, with flips (marked: operating points chosen on validation)" in page
    assert "predictions/flips/roc_image.png" not in page
