"""AUROC / AUPRC / bootstrap / threshold metrics against scikit-learn references."""
import json

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

import eval_metrics as em


def _data(n=60, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = rng.normal(size=n) + 1.2 * y
    if ties:
        s = np.round(s, 0)  # many tied scores
    return y, s


def _sk_pr(y, s):
    p, r, _ = precision_recall_curve(y, s)
    return auc(r, p)


@pytest.mark.parametrize("ties", [False, True])
def test_point_estimates_match_sklearn(ties):
    y, s = _data(ties=ties)
    assert em.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert em.pr_auc(y, s) == pytest.approx(_sk_pr(y, s), abs=1e-12)
    # trapezoidal AUPRC is not average precision
    assert abs(em.pr_auc(y, s) - average_precision_score(y, s)) > 1e-4


def test_known_values():
    y = [0, 0, 1, 1]
    s = [0.1, 0.4, 0.35, 0.8]
    assert em.roc_auc(y, s) == pytest.approx(0.75)
    # PR points (r, p): (0,1) (0.5,1) (0.5,0.5) (1,0.6667) -> 0.5 + 0.5*(0.5+2/3)/2
    assert em.pr_auc(y, s) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)


@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_replicates_equal_sklearn_on_resamples(ties):
    y, s = _data(n=40, seed=3, ties=ties)
    reps = em.bootstrap_replicates(y, s, n_boot=150, seed=7)
    ref_roc, ref_pr, ref_valid = [], [], []
    for idx in em.iter_bootstrap_indices(y.size, 150, 7, chunk=64):
        for row in idx:
            yb, sb = y[row], s[row]
            ok = 0 < yb.sum() < yb.size
            ref_valid.append(ok)
            ref_roc.append(roc_auc_score(yb, sb) if ok else np.nan)
            ref_pr.append(_sk_pr(yb, sb) if ok else np.nan)
    np.testing.assert_array_equal(reps["valid"], ref_valid)
    np.testing.assert_allclose(reps["auroc"], ref_roc, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(reps["auprc"], ref_pr, atol=1e-12, equal_nan=True)


def test_indices_do_not_depend_on_chunk():
    a = np.vstack(list(em.iter_bootstrap_indices(10, 100, 5, chunk=7)))
    b = np.vstack(list(em.iter_bootstrap_indices(10, 100, 5, chunk=256)))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (100, 10)


def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    y, s = _data(n=200, seed=1)
    ci1 = em.bootstrap_ci(y, s, n_boot=2000, seed=11)
    ci2 = em.bootstrap_ci(y, s, n_boot=2000, seed=11)
    ci3 = em.bootstrap_ci(y, s, n_boot=2000, seed=12)
    assert ci1 == ci2
    assert ci1["auroc_ci"] != ci3["auroc_ci"]
    lo, hi = ci1["auroc_ci"]
    assert lo < em.roc_auc(y, s) < hi
    lo, hi = ci1["auprc_ci"]
    assert lo < em.pr_auc(y, s) < hi
    assert ci1["n_valid"] == 2000 and ci1["n_skipped"] == 0
    reps = em.bootstrap_replicates(y, s, n_boot=2000, seed=11)
    np.testing.assert_allclose(ci1["auroc_ci"], np.percentile(reps["auroc"], [2.5, 97.5]))


def test_degenerate_resamples_skipped_and_counted():
    y = np.array([0] * 9 + [1])
    s = np.linspace(0, 1, 10)
    res = em.bootstrap_ci(y, s, n_boot=500, seed=0)
    # P(no positive in a resample of 10) = 0.9**10 ~ 0.35
    assert 120 < res["n_skipped"] < 230
    assert res["n_valid"] + res["n_skipped"] == 500
    reps = em.bootstrap_replicates(y, s, n_boot=500, seed=0)
    assert np.isnan(reps["auroc"][~reps["valid"]]).all()
    assert np.isfinite(reps["auroc"][reps["valid"]]).all()


def test_sensitivity_specificity():
    y = [1, 1, 1, 0, 0, 0, 0]
    s = [0.9, 0.5, 0.2, 0.5, 0.1, 0.0, 0.3]
    r = em.sensitivity_specificity(y, s, threshold=0.5)
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (2, 1, 3, 1)
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["specificity"] == pytest.approx(3 / 4)


def test_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        em.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        em.roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="both classes"):
        em.pr_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        em.roc_auc([0, 1], [0.1, np.nan])


def test_evaluate_and_plot(tmp_path):
    y, s = _data(n=50)
    res = em.evaluate_binary(y, s, threshold=0.5, n_boot=200, seed=1)
    assert res["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert res["n_pos"] + res["n_neg"] == 50
    roc, pr = em.plot_roc_pr(y, s, tmp_path / "roc.png", tmp_path / "pr.png", metrics=res)
    assert roc.read_bytes()[:4] == b"\x89PNG" and pr.stat().st_size > 1000
    path = em.write_json_atomic(em.evaluate_binary([1, 1], [0.2, 0.3], n_boot=10),
                                tmp_path / "m.json")
    loaded = json.loads(path.read_text())
    assert loaded["auroc"] is None and loaded["sensitivity"] == 0.0


def test_curves_show_counts_and_the_operating_point():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.4, 0.9])
    res = em.evaluate_binary(y, s, threshold=0.5, n_boot=0)
    roc, pr = em.roc_pr_figures(y, s, title="image", metrics=res)
    assert roc.axes[0].get_title() == "image ROC (3 positive / 4 negative)"
    dots = [ln for ln in roc.axes[0].get_lines() if ln.get_marker() == "o"]
    # at 0.5: tp 2 of 3 (sensitivity 2/3), fp 1 of 4 (specificity 3/4)
    assert len(dots) == 1
    np.testing.assert_allclose([dots[0].get_xdata()[0], dots[0].get_ydata()[0]], [1 / 4, 2 / 3])
    pr_dot = [ln for ln in pr.axes[0].get_lines() if ln.get_marker() == "o"][0]
    np.testing.assert_allclose([pr_dot.get_xdata()[0], pr_dot.get_ydata()[0]], [2 / 3, 2 / 3])
    assert "threshold 0.50" in pr_dot.get_label()


def test_curves_mark_each_given_point_with_its_label():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.4, 0.9])
    res = em.evaluate_binary(y, s, threshold=0.5, n_boot=0)
    points = [{"label": "Youden, threshold 0.35 chosen on validation", "threshold": 0.35,
               "sensitivity": 1.0, "specificity": 0.75},
              {"label": "sensitivity >= 0.9, threshold 0.8 chosen on validation",
               "threshold": 0.8, "sensitivity": 1 / 3, "specificity": 1.0}]
    roc, pr = em.roc_pr_figures(y, s, title="image", metrics={**res, "points": points})
    dots = [ln for ln in roc.axes[0].get_lines() if ln.get_marker() in ("o", "s")]
    assert [d.get_label().split(":")[0] for d in dots] == [p["label"] for p in points]
    np.testing.assert_allclose([(d.get_xdata()[0], d.get_ydata()[0]) for d in dots],
                               [(0.25, 1.0), (0.0, 1 / 3)])
    pr_dots = [ln for ln in pr.axes[0].get_lines() if ln.get_marker() in ("o", "s")]
    np.testing.assert_allclose([(d.get_xdata()[0], d.get_ydata()[0]) for d in pr_dots],
                               [(1.0, 3 / 4), (1 / 3, 1.0)])     # precision from the data
