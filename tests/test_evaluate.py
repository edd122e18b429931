"""evaluate.py and the screening metrics of eval_metrics, against independent computations."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score, precision_score, roc_auc_score

import eval_metrics as em
import evaluate
import image_clf_predict as icp


def _data(n=80, seed=0, ties=False, k=1):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    s = np.vstack([1 / (1 + np.exp(-(rng.normal(size=n) * (1 + j) + 1.5 * y - 1)))
                   for j in range(k)])
    if ties:
        s = np.round(s, 1)
    return y, (s[0] if k == 1 else s)


# ------------------------------------------------------------------ DeLong, pF1
def _delong_direct(y, scores):
    """DeLong's covariance from every positive-negative pair, O(n_pos * n_neg)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    aucs = psi.mean(axis=(1, 2))
    m, n = pos.shape[1], neg.shape[1]
    cov = np.array([[np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1) / m
                     + np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1) / n
                     for b in range(len(scores))] for a in range(len(scores))])
    return aucs, cov


@pytest.mark.parametrize("ties", [False, True])
def test_delong_fast_equals_direct_and_sklearn(ties):
    y, s = _data(n=90, seed=4, ties=ties, k=3)
    aucs, cov = em.delong_auc_cov(y, s)
    ref_aucs, ref_cov = _delong_direct(y, s)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-10, rtol=0)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, r) for r in s], atol=1e-12)
    np.testing.assert_allclose(em.midranks(s[0]), rankdata(s[0]))
    t = em.delong_test(y, s[0], s[1])
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert t["z"] == pytest.approx((ref_aucs[0] - ref_aucs[1]) / math.sqrt(var), abs=1e-9)
    assert t["p_value"] == pytest.approx(math.erfc(abs(t["z"]) / math.sqrt(2)))
    same = em.paired_auroc_difference(y, s[0], s[0], n_boot=50, seed=1)
    assert same["difference"] == 0 and same["difference_ci"] == [0, 0]
    assert same["p_value"] is None and "variance of the difference is 0" in same["delong_note"]


@pytest.mark.parametrize("case", ["one positive", "one negative", "constant", "identical"])
def test_delong_without_a_variance_gives_no_p_value(case):
    """An undefined or zero variance is "not defined" (null), never z 0 and p 1."""
    y, s = _data(n=40, seed=9, k=2)
    if case == "one positive":
        y = np.zeros(40, int)
        y[3] = 1
    elif case == "one negative":
        y = np.ones(40, int)
        y[3] = 0
    elif case == "constant":
        s = np.full_like(s, 0.4)
    else:
        s = np.vstack([s[0], s[0]])
    res = em.paired_auroc_difference(y, s[0], s[1], n_boot=0)
    assert res["p_value"] is None and res["z"] is None and res["se"] is None
    assert res["delong_note"].startswith("not defined")
    json.dumps(res, allow_nan=False)
    line = evaluate._comparison_line("image", {"a": "m1", "b": "m2", "difference_ci": None,
                                               **res})
    assert "DeLong not defined" in line and " p " not in line


def _obuchowski_by_formula(y, scores, groups):
    """Obuchowski (1997), every positive against every negative, cluster by cluster."""
    pos, neg = y == 1, y == 0
    big_m, big_n = pos.sum(), neg.sum()
    clusters = sorted(set(groups))
    i10 = sum(1 for c in clusters if np.any(pos & (groups == c)))
    i01 = sum(1 for c in clusters if np.any(neg & (groups == c)))
    a_dev, b_dev, aucs = [], [], []
    for s in scores:
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        theta = psi.mean()
        aucs.append(theta)
        v10_case, v01_case = psi.sum(axis=1) / big_n, psi.sum(axis=0) / big_m
        a_dev.append([v10_case[groups[pos] == c].sum() - np.sum(pos & (groups == c)) * theta
                      for c in clusters])
        b_dev.append([v01_case[groups[neg] == c].sum() - np.sum(neg & (groups == c)) * theta
                      for c in clusters])
    a_dev, b_dev = np.array(a_dev), np.array(b_dev)
    k, n_cl = len(scores), len(clusters)
    cov = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            s10 = i10 / ((i10 - 1) * big_m) * np.sum(a_dev[i] * a_dev[j])
            s01 = i01 / ((i01 - 1) * big_n) * np.sum(b_dev[i] * b_dev[j])
            s11_ij = n_cl / (n_cl - 1) * np.sum(a_dev[i] * b_dev[j])
            s11_ji = n_cl / (n_cl - 1) * np.sum(a_dev[j] * b_dev[i])
            cov[i, j] = s10 / big_m + s01 / big_n + (s11_ij + s11_ji) / (big_m * big_n)
    return np.array(aucs), cov


@pytest.mark.parametrize("ties", [False, True])
def test_clustered_variance_is_obuchowskis_and_delongs_with_one_case_per_patient(ties):
    y, s = _data(n=90, seed=10, ties=ties, k=2)
    groups = np.repeat([f"P{i}" for i in range(30)], 3)
    aucs, cov = em.obuchowski_auc_cov(y, s, groups)
    ref_aucs, ref_cov = _obuchowski_by_formula(y, s, groups)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12, rtol=0)
    d_aucs, d_cov = em.delong_auc_cov(y, s)
    single = np.array([f"case{i}" for i in range(90)])
    np.testing.assert_allclose(em.obuchowski_auc_cov(y, s, single)[1], d_cov, atol=1e-12,
                               rtol=0)
    np.testing.assert_allclose(_obuchowski_by_formula(y, s, single)[1], d_cov, atol=1e-12,
                               rtol=0)
    clustered = em.delong_test(y, s[0], s[1], groups=groups)
    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    assert clustered["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert clustered["variance_method"].startswith("Obuchowski (1997) clustered variance, 30 ")
    plain = em.delong_test(y, s[0], s[1], groups=single)
    assert plain["variance_method"].startswith("DeLong")
    d_var = d_cov[0, 0] + d_cov[1, 1] - 2 * d_cov[0, 1]
    assert plain["se"] == pytest.approx(math.sqrt(d_var), rel=1e-9)
    assert abs(clustered["se"] - plain["se"]) > 1e-4


def test_pf1_against_its_definition():
    y, s = _data(n=50, seed=2)
    ptp = sum(si for yi, si in zip(y, s) if yi == 1)
    pfp = sum(si for yi, si in zip(y, s) if yi == 0)
    p, r = ptp / (ptp + pfp), ptp / sum(y)
    assert em.probabilistic_f1(y, s) == pytest.approx(2 * p * r / (p + r), abs=1e-12)
    # binary scores: pF1 is the ordinary F1
    hard = (s > 0.5).astype(float)
    assert em.probabilistic_f1(y, hard) == pytest.approx(f1_score(y, hard), abs=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        em.probabilistic_f1(y, s * 3)


# ------------------------------------------------------------------ thresholds and rates
def _brute(y, s):
    """(threshold, sensitivity, specificity) at every distinct score, and above the top."""
    out = []
    for t in np.r_[np.unique(s), np.inf]:
        pred = s >= t
        out.append((t, pred[y == 1].mean(), 1 - pred[y == 0].mean()))
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_thresholds_chosen_and_rates_read_off_the_roc(ties):
    y, s = _data(n=70, seed=5, ties=ties)
    rows = _brute(y, s)
    j = max(se + sp for _, se, sp in rows)
    assert em.choose_threshold(y, s, "youden") == max(t for t, se, sp in rows if se + sp == j)
    assert em.choose_threshold(y, s, "sensitivity", 0.9) == max(
        t for t, se, _ in rows if se >= 0.9)
    assert em.choose_threshold(y, s, "specificity", 0.9) == min(
        t for t, _, sp in rows if sp >= 0.9)
    for f in (0.8, 0.9, 0.95):
        assert em.rate_at_fixed(y, s, f, "specificity") == max(
            se for _, se, sp in rows if sp >= f)
        assert em.rate_at_fixed(y, s, f, "sensitivity") == max(
            sp for _, se, sp in rows if se >= f)
    r = em.threshold_rates(y, s, 0.4)
    pred = (s >= 0.4).astype(int)
    assert r["ppv"] == pytest.approx(precision_score(y, pred))
    assert r["f1"] == pytest.approx(f1_score(y, pred))
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert r["npv"] == pytest.approx(tn / (tn + fn))
    with pytest.raises(ValueError, match="rule should be one of"):
        em.choose_threshold(y, s, "best")


def test_calibration_measures_and_recalibration():
    y, s = _data(n=120, seed=6)
    bins = np.minimum((s * 10).astype(int), 9)
    ece = sum(np.sum(bins == b) / y.size * abs(y[bins == b].mean() - s[bins == b].mean())
              for b in range(10) if np.any(bins == b))
    assert em.expected_calibration_error(y, s) == pytest.approx(ece, abs=1e-12)
    assert em.brier_score(y, s) == pytest.approx(np.mean((s - y) ** 2), abs=1e-12)
    platt = em.Calibrator("platt").fit(y, s)
    z = np.log(s / (1 - s))[:, None]
    ref = LogisticRegression(C=np.inf).fit(z, y)
    assert platt.params["coef"] == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    np.testing.assert_allclose(platt.apply(s), ref.predict_proba(z)[:, 1], atol=1e-5)
    iso = em.Calibrator("isotonic").fit(y, s)
    grid = np.linspace(s.min(), s.max(), 50)
    ref_iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    np.testing.assert_allclose(iso.apply(grid), ref_iso.predict(grid), atol=1e-12)
    assert set(iso.to_json()) >= {"method", "x", "y"}


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_counts_stratified_clustered_and_replicates_match_sklearn():
    y, s = _data(n=60, seed=7)
    groups = np.repeat(np.arange(30), 2)
    y = np.repeat(y[::2], 2) * np.tile([1, 0], 30)     # a woman: one breast at most positive
    a = np.vstack(list(em.iter_bootstrap_counts(y, 100, 3, groups=groups, chunk=7)))
    b = np.vstack(list(em.iter_bootstrap_counts(y, 100, 3, groups=groups)))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, ::2], a[:, 1::2])            # patients move together
    n_pos_patients = y[::2].sum()
    np.testing.assert_array_equal(a[:, ::2] @ y[::2], n_pos_patients)  # stratified
    plain = np.vstack(list(em.iter_bootstrap_counts(y, 100, 3)))
    np.testing.assert_array_equal(plain @ y, y.sum())
    thr = {"t": 0.4}
    reps = em._replicate_metrics(plain[:20], y, s, thr, (0.9,), True)
    for k, c in enumerate(plain[:20].astype(int)):
        yb, sb = np.repeat(y, c), np.repeat(s, c)
        assert reps["auroc"][k] == pytest.approx(roc_auc_score(yb, sb), abs=1e-12)
        r = em.threshold_rates(yb, sb, 0.4)
        assert reps["t/sensitivity"][k] == pytest.approx(r["sensitivity"])
        assert reps["t/ppv"][k] == pytest.approx(r["ppv"])
        assert reps["sens_at_spec/0.9"][k] == pytest.approx(em.rate_at_fixed(yb, sb, 0.9,
                                                                            "specificity"))
        assert reps["pf1"][k] == pytest.approx(em.probabilistic_f1(yb, sb))


def test_degenerate_cases_give_messages_not_nan():
    one = em.evaluate_scores([1] * 10, np.linspace(0, 1, 10), n_boot=50)
    assert one["auroc"] is None and "only one class" in one["notes"][0]
    few = em.evaluate_scores([0, 1, 0, 1, 1], [0.1, 0.8, 0.3, 0.6, 0.2], n_boot=50)
    assert few["auroc"] == pytest.approx(roc_auc_score([0, 1, 0, 1, 1],
                                                       [0.1, 0.8, 0.3, 0.6, 0.2]))
    assert few["auroc_ci"] == [None, None] and "only 5 cases (< 8)" in few["notes"][0]
    flat = em.evaluate_scores([0, 1] * 6, [0.3] * 12, n_boot=50)
    assert flat["auroc"] == 0.5 and "all 12 scores are equal" in flat["notes"][0]
    for res in (one, few, flat):
        json.dumps(res, allow_nan=False)
    y, s = _data(n=40, seed=8)
    full = em.evaluate_scores(y, s, n_boot=200, seed=3)
    json.dumps(full, allow_nan=False)
    assert full["bootstrap"]["method"].startswith("percentile bootstrap, stratified by label")
    lo, hi = full["auroc_ci"]
    assert lo < full["auroc"] < hi
    assert list(full["operating_points"]) == ["fixed_0.5"]


def test_confusion_report_matches_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    probs = rng.dirichlet([1, 1, 1], 40) + np.eye(3)[labels] * 0.5
    rep = em.write_confusion_report(labels, probs, ["bkg", "mal", "ben"], tmp_path / "m.h5.test")
    cm = confusion_matrix(labels, probs.argmax(1))
    assert rep["counts"] == cm.tolist()
    np.testing.assert_allclose(rep["row_normalised"], cm / cm.sum(1, keepdims=True))
    assert rep["auroc_ovr"]["mal"] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1]))
    text = (tmp_path / "m.h5.test.confusion.csv").read_text().splitlines()
    assert text[0] == "matrix,true_class,pred_bkg,pred_mal,pred_ben" and len(text) == 7
    assert (tmp_path / "m.h5.test.confusion.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ command line
def _cbis_csv(path, seed, n_pat=24, first=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(first, first + n_pat):
        bad = rng.choice(["LEFT", "RIGHT"]) if p % 3 == 0 else None
        for side in ("LEFT", "RIGHT"):
            y = int(side == bad)
            for view in ("CC", "MLO"):
                if (p + len(side) + len(view)) % 11 == 0:
                    continue                         # a breast with a missing view
                rows.append({"image_index": f"P_{p:05d}_{side}_{view}.png",
                             "malignant_pred": 1 / (1 + np.exp(-(rng.normal() + 2 * y - 1))),
                             "other": rng.random(), "malignant_label": y})
    pd.DataFrame(rows).to_csv(path, index=False)
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_cli_levels_validation_thresholds_calibration_and_comparison(tmp_path, capsys):
    test = _cbis_csv(tmp_path / "test.csv", 1)
    val = _cbis_csv(tmp_path / "val.csv", 2, first=100)
    res = evaluate.main(["--predictions", str(tmp_path / "test.csv"), "--val-predictions",
                         str(tmp_path / "val.csv"), "--score-col", "malignant_pred", "other",
                         "--calibrate", "platt", "--bootstrap", "200", "--out-dir",
                         str(tmp_path / "ev")])
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res["metrics"]["image"]["other"]["auroc"] == m["image"]["other"]["auroc"]
    pid = test.image_index.str[:7]
    breast = test.assign(b=pid + test.image_index.str.split("_").str[2]).groupby("b").agg(
        s=("malignant_pred", "mean"), y=("malignant_label", "max"), p=("image_index", "first"))
    exam = breast.assign(p=breast.p.str[:7]).groupby("p").agg(s=("s", "max"), y=("y", "max"))
    assert m["breast"]["malignant_pred"]["auroc"] == pytest.approx(roc_auc_score(breast.y,
                                                                                 breast.s))
    assert m["exam"]["malignant_pred"]["auroc"] == pytest.approx(roc_auc_score(exam.y, exam.s))
    assert m["breast"]["malignant_pred"]["bootstrap"]["n_clusters"] == 24
    vb = val.assign(b=val.image_index.str[:7] + val.image_index.str.split("_").str[2]).groupby(
        "b").agg(s=("malignant_pred", "mean"), y=("malignant_label", "max"))
    point = m["breast"]["malignant_pred"]["operating_points"]["sensitivity_0.9"]
    assert point["threshold"] == em.choose_threshold(vb.y, vb.s, "sensitivity", 0.9)
    assert point["chosen_on"] == "validation"
    assert point["sensitivity"] == pytest.approx(np.mean(breast.s[breast.y == 1]
                                                         >= point["threshold"]))
    cal = json.loads((tmp_path / "ev" / "calibration_image.json").read_text())
    fitted = em.Calibrator("platt").fit(val.malignant_label, val.malignant_pred)
    assert cal["malignant_pred"]["coef"] == pytest.approx(fitted.params["coef"])
    calibrated = pd.read_csv(tmp_path / "ev" / "calibrated_image.csv")
    np.testing.assert_allclose(calibrated.malignant_pred_calibrated,
                               fitted.apply(test.malignant_pred), rtol=1e-5)
    comp = m["comparisons"]["image"][0]
    assert comp["variance_method"].startswith("Obuchowski (1997) clustered variance, 24 ")
    assert m["comparisons"]["exam"][0]["variance_method"].startswith("DeLong")
    assert m["warnings"] == [] and m["image"]["other"]["n_unlabelled"] == 0
    assert comp["difference"] == pytest.approx(
        roc_auc_score(test.malignant_label, test.malignant_pred)
        - roc_auc_score(test.malignant_label, test.other))
    out = capsys.readouterr().out
    assert "sensitivity_0.9 threshold" in out and "(chosen on validation)" in out
    assert "DeLong (Obuchowski clustered variance) z" in out
    platt = m["image"]["malignant_pred"]["calibration"]["calibrated"]
    assert f"platt calibrated (map fitted on validation): ECE {platt['ece']:.3f}  Brier " \
           f"{platt['brier']:.3f}" in out
    assert (tmp_path / "ev" / "reliability_exam_other.png").is_file()


def _exams(n=12):
    exams = []
    for k in range(n):
        lab = {"left_malignant": int(k % 4 == 0), "right_malignant": int(k % 5 == 1)}
        exams.append({"horizontal_flip": "NO", "L-CC": [f"e{k}_lcc"], "R-CC": [f"e{k}_rcc"],
                      "L-MLO": [f"e{k}_lmlo"] if k % 6 else [], "R-MLO": [f"e{k}_rmlo"],
                      "cancer_label": lab})
    return exams


@pytest.mark.slow
def test_same_auroc_as_prediction_for_our_and_the_meta_repository_files(tmp_path):
    exams = _exams()
    (tmp_path / "exams.json").write_text(json.dumps(exams))
    items = icp.collect_exams(exams, tmp_path)
    rng = np.random.default_rng(0)
    p1 = np.clip(rng.random(len(items)) * 0.6 + 0.4 * np.array([it.label for it in items]), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    out = tmp_path / "pred"
    out.mkdir()
    icp.write_outputs(items, exams, probs, [""] * len(items), out, ["prob_neg", "prob_pos"], -1,
                      0.5, 300, 12345)
    ref = json.loads((out / "metrics.json").read_text())
    ours = evaluate.run([str(out / "image_predictions.csv")], str(tmp_path / "a"),
                        bootstrap=300, quiet=True)["metrics"]
    assert ours["image"]["malignant_pred"]["auroc"] == ref["image"]["auroc"]
    assert ours["image"]["malignant_pred"]["auroc_ci"] == ref["image"]["auroc_ci"]
    assert ours["breast"]["malignant_pred"]["auroc"] == pytest.approx(ref["breast"]["auroc"])
    # the meta-repository's files: breast level with its exam list, image level by stems
    img = pd.read_csv(out / "image_predictions.csv")
    img[["image_index", "malignant_pred", "malignant_label"]].to_csv(tmp_path / "meta_img.csv",
                                                                     index=False)
    br = pd.read_csv(out / "breast_predictions.csv")
    br.assign(left_benign=0.1, right_benign=0.2)[
        ["left_benign", "right_benign", "left_malignant", "right_malignant"]].to_csv(
        tmp_path / "meta_breast.csv", index=False)
    meta = evaluate.main(["--predictions", str(tmp_path / "meta_breast.csv"), "--exam-list",
                          str(tmp_path / "exams.json"), "--bootstrap", "300", "--out-dir",
                          str(tmp_path / "b"), "--quiet"])["metrics"]
    assert meta["breast"]["meta_breast"]["auroc"] == pytest.approx(ref["breast"]["auroc"])
    assert meta["breast"]["meta_breast"]["auroc_ci"] == pytest.approx(ref["breast"]["auroc_ci"])
    by_stem = evaluate.run([str(tmp_path / "meta_img.csv")], str(tmp_path / "c"),
                           exam_list=str(tmp_path / "exams.json"), bootstrap=0,
                           quiet=True)["metrics"]
    assert by_stem["breast"]["malignant_pred"]["auroc"] == pytest.approx(ref["breast"]["auroc"])


def _exit2(argv, capsys):
    with pytest.raises(SystemExit) as err:
        evaluate.main(argv)
    assert err.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    _cbis_csv(tmp_path / "t.csv", 3)
    base = ["--predictions", str(tmp_path / "t.csv"), "--out-dir", str(tmp_path / "o")]
    assert "--calibrate platt needs --val-predictions" in _exit2(base + ["--calibrate",
                                                                        "platt"], capsys)
    pd.DataFrame({"left_malignant": [0.1], "right_malignant": [0.2]}).to_csv(
        tmp_path / "b.csv", index=False)
    assert "needs --exam-list" in _exit2(["--predictions", str(tmp_path / "b.csv")], capsys)
    pd.DataFrame({"image_index": ["a", "b"], "malignant_pred": [0.1, 0.2],
                  "malignant_label": [0, 2]}).to_csv(tmp_path / "l.csv", index=False)
    assert "l.csv: labels in column 'malignant_label' should be 0 or 1, got 2" in _exit2(
        ["--predictions", str(tmp_path / "l.csv")], capsys)
    assert not (tmp_path / "o").exists()


def test_run_options_are_the_parsers_and_unknown_keywords_are_refused(tmp_path, monkeypatch):
    _cbis_csv(tmp_path / "t.csv", 3)
    with pytest.raises(ValueError, match=r"unknown options \['bootstraps'\]; valid: .*'bootstrap'"):
        evaluate.run([tmp_path / "t.csv"], tmp_path / "o", bootstraps=10)
    assert not (tmp_path / "o").exists()
    seen = []
    monkeypatch.setattr(evaluate, "evaluate_predictions", seen.append)
    evaluate.run([tmp_path / "t.csv"])
    evaluate.run([str(tmp_path / "t.csv")], str(tmp_path / "o"), seed=3, names=["m"])
    cls = evaluate.options_class()
    assert cls is evaluate.options_class() and type(seen[0]) is cls
    args = evaluate.get_args_parser().parse_args(["--predictions", str(tmp_path / "t.csv")])
    assert seen[0] == cls(**vars(args))
    assert (seen[0].out_dir, seen[0].bootstrap, seen[0].threshold) == ("./evaluation", 2000, 0.5)
    assert seen[1] == seen[0].replace(out_dir=str(tmp_path / "o"), seed=3, names=["m"])


def test_python_keywords_give_the_command_lines_metrics(tmp_path):
    _cbis_csv(tmp_path / "t.csv", 3)
    py = evaluate.run([tmp_path / "t.csv"], out_dir=tmp_path / "a", threshold=0.3,
                      bootstrap=20, seed=7, breast_combine="max", quiet=True)
    cli = evaluate.main(["--predictions", str(tmp_path / "t.csv"), "--out-dir",
                         str(tmp_path / "a"), "--threshold", "0.3", "--bootstrap", "20",
                         "--seed", "7", "--breast-combine", "max", "--quiet"])
    assert py["metrics"] == cli["metrics"] and py["table"] == cli["table"]
    assert py["metrics"]["breast"]["malignant_pred"]["operating_points"]["fixed_0.3"][
        "threshold"] == 0.3


# ------------------------------------------------------------------ inputs that could mislead
def _quick(tmp_path, files, *more, out="ev"):
    argv = ["--predictions", *map(str, files), "--bootstrap", "0", "--quiet",
            "--out-dir", str(tmp_path / out), *map(str, more)]
    return evaluate.main(argv)


def test_a_repeated_row_counts_once_and_leaves_other_models_alone(tmp_path):
    test = _cbis_csv(tmp_path / "a.csv", 4)
    twice = pd.concat([test, test.iloc[[5, 9]]])
    twice.to_csv(tmp_path / "twice.csv", index=False)
    twice.to_csv(tmp_path / "b.csv", index=False)
    ref = _quick(tmp_path, [tmp_path / "a.csv"], out="ref")["metrics"]
    res = _quick(tmp_path, [tmp_path / "twice.csv"], out="t")
    m = res["metrics"]
    assert m["image"]["malignant_pred"]["n"] == len(test)
    assert m["image"]["malignant_pred"]["auroc"] == ref["image"]["malignant_pred"]["auroc"]
    assert m["breast"]["malignant_pred"] == {**ref["breast"]["malignant_pred"],
                                            "roc_png": m["breast"]["malignant_pred"]["roc_png"],
                                            "pr_png": m["breast"]["malignant_pred"]["pr_png"],
                                            "reliability_png": m["breast"]["malignant_pred"][
                                                "reliability_png"]}
    (w,) = m["warnings"]
    assert w["code"] == "repeated_rows" and "2 repeated row(s) of 2 image(s)" in w["message"]
    assert f"warning: {w['message']}" in res["table"]
    # a second model's file with the repeat: the first model's figures do not change
    both = _quick(tmp_path, [tmp_path / "a.csv", tmp_path / "b.csv"], "--names", "a", "b",
                  out="both")["metrics"]
    for level in ("image", "breast", "exam"):
        assert both[level]["a"]["n"] == ref[level]["malignant_pred"]["n"]
        assert both[level]["a"]["auroc"] == ref[level]["malignant_pred"]["auroc"]
    # the same scores twice: no DeLong p-value, said in the warnings
    undefined = {w["level"] for w in both["warnings"] if w["code"] == "delong_not_defined"}
    assert undefined == {"image", "breast", "exam"}
    assert both["comparisons"]["image"][0]["p_value"] is None


def test_an_image_with_two_different_scores_is_refused_naming_both_lines(tmp_path, capsys):
    test = _cbis_csv(tmp_path / "a.csv", 4)
    bad = pd.concat([test, test.iloc[[5]].assign(malignant_pred=0.123)])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    err = _exit2(["--predictions", str(tmp_path / "bad.csv"), "--out-dir",
                  str(tmp_path / "o")], capsys)
    name = test.image_index[5]
    assert (f"bad.csv: image {name!r} is given twice with different scores or labels "
            f"(line 7 and line {len(test) + 2})") in err
    assert not (tmp_path / "o").exists()


def test_validation_that_is_or_shares_the_test_cases_is_refused(tmp_path, capsys):
    test = _cbis_csv(tmp_path / "t.csv", 5, n_pat=12)
    _cbis_csv(tmp_path / "v.csv", 6, n_pat=12, first=100)
    base = ["--predictions", str(tmp_path / "t.csv"), "--out-dir", str(tmp_path / "o"),
            "--bootstrap", "0", "--quiet"]
    err = _exit2(base + ["--val-predictions", str(tmp_path / "t.csv")], capsys)
    assert f"--val-predictions {tmp_path / 't.csv'} is the test file" in err
    val = pd.read_csv(tmp_path / "v.csv")
    val.loc[0, "image_index"] = test.image_index[3]
    val.to_csv(tmp_path / "v1.csv", index=False)
    err = _exit2(base + ["--val-predictions", str(tmp_path / "v1.csv")], capsys)
    assert f"share 1 image(s), e.g. {test.image_index[3]!r}" in err
    # a test patient's image under another name: a shared patient
    pat = test.image_index[0][:7]
    val.loc[0, "image_index"] = f"val/{test.image_index[0]}"
    val.to_csv(tmp_path / "v2.csv", index=False)
    err = _exit2(base + ["--val-predictions", str(tmp_path / "v2.csv")], capsys)
    assert f"share 1 patient(s), e.g. {pat!r}" in err
    assert not (tmp_path / "o").exists()
    evaluate.main(base + ["--val-predictions", str(tmp_path / "v.csv")])


def test_rows_without_a_label_are_counted_and_reported(tmp_path):
    test = _cbis_csv(tmp_path / "a.csv", 4).astype({"malignant_label": object})
    test.loc[[0, 1, 2], "malignant_label"] = ""
    test.to_csv(tmp_path / "u.csv", index=False)
    res = evaluate.main(["--predictions", str(tmp_path / "u.csv"), "--bootstrap", "0",
                         "--out-dir", str(tmp_path / "o"), "--quiet"])
    m = res["metrics"]["image"]["malignant_pred"]
    assert m["n_unlabelled"] == 3 and m["n"] == len(test) - 3
    assert "  note: 3 scored case(s) without a label left out" in res["table"]
    codes = [(w["code"], w["level"]) for w in res["metrics"]["warnings"]]
    assert ("unlabelled_cases", "image") in codes


def test_a_breast_level_that_repeats_the_image_level_says_so(tmp_path):
    test = _cbis_csv(tmp_path / "a.csv", 4)
    one = test[test.image_index.str.endswith("_CC.png")]
    one.to_csv(tmp_path / "cc.csv", index=False)
    res = _quick(tmp_path, [tmp_path / "cc.csv"])
    msg = "every breast has one image: the breast level repeats the image level"
    assert msg in res["metrics"]["breast"]["malignant_pred"]["notes"]
    assert msg not in res["metrics"]["image"]["malignant_pred"]["notes"]
    assert not res["metrics"]["warnings"]     # a note: the figures are right
    two = _quick(tmp_path, [tmp_path / "a.csv"], out="two")["metrics"]
    assert msg not in two["breast"]["malignant_pred"]["notes"] and not two["warnings"]


def test_a_calibration_that_reverses_the_ranking_is_refused(tmp_path, capsys):
    _cbis_csv(tmp_path / "t.csv", 7)
    val = _cbis_csv(tmp_path / "v.csv", 8, first=100)
    val.assign(malignant_label=1 - val.malignant_label).to_csv(tmp_path / "v.csv", index=False)
    res = _quick(tmp_path, [tmp_path / "t.csv"], "--val-predictions", tmp_path / "v.csv",
                 "--calibrate", "platt")
    m = res["metrics"]
    refused = [w for w in m["warnings"] if w["code"] == "calibration_reverses_ranking"]
    assert {(w["level"], w["model"]) for w in refused} >= {
        (level, "malignant_pred") for level in ("image", "breast")}
    assert set(refused[0]) == {"code", "level", "model", "message"}
    cal = m["image"]["malignant_pred"]["calibration"]
    assert "calibrated" not in cal and cal["refused"]["map"]["coef"] < 0
    assert not list((tmp_path / "ev").glob("calibrat*"))
    assert "note: platt calibration refused, not applied" in res["table"]
    assert "platt calibrated" not in res["table"]
    iso = em.Calibrator("isotonic")
    iso.params = {"x": [0.1, 0.5, 0.9], "y": [0.2, 0.6, 0.3]}
    assert iso.reverses_ranking()
    iso.params["y"] = [0.2, 0.2, 0.7]
    assert not iso.reverses_ranking()


def test_curves_mark_the_operating_points_chosen_on_validation(tmp_path, monkeypatch):
    """With validation predictions the ROC/PR curves mark the thresholds chosen there (each
    labelled so), not the fixed 0.5; without, the fixed one, labelled as not chosen."""
    marked = {}

    def capture(y, s, roc_path, pr_path, title="", metrics=None):
        marked[Path(roc_path).name] = metrics["points"]
        return Path(roc_path), Path(pr_path)

    monkeypatch.setattr(evaluate.em, "plot_roc_pr", capture)
    _cbis_csv(tmp_path / "test.csv", 1)
    _cbis_csv(tmp_path / "val.csv", 2, first=100)
    res = _quick(tmp_path, [tmp_path / "test.csv"], "--val-predictions", tmp_path / "val.csv")
    chosen = res["metrics"]["image"]["malignant_pred"]["operating_points"]
    points = marked["roc_image.png"]
    assert [p["threshold"] for p in points] == [p["threshold"] for p in chosen.values()]
    assert len(points) == 3 and 0.5 not in [p["threshold"] for p in points]
    assert points[0]["label"] == (f"Youden, threshold {chosen['youden']['threshold']:.2f} "
                                  "chosen on validation")
    assert all("chosen on validation" in p["label"] for p in points)
    marked.clear()
    _quick(tmp_path, [tmp_path / "test.csv"], out="ev_fixed")
    assert [p["label"] for p in marked["roc_image.png"]] == [
        "fixed threshold 0.50, not chosen on validation"]


def test_printed_table_names_its_intervals_95_percent_ci():
    assert evaluate._num(0.81234, [0.7, 0.9]) == "0.812 [95% CI 0.700, 0.900]"
    assert evaluate._num(0.5) == "0.500"
