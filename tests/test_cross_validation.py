"""Cross-validation by patient (``ddsm_train/cross_validation.py``, ``[data] folds`` of
``run_pipeline.py``): stratified folds, each fold's data folder, pooling, and a 2-fold run of
the whole chain on a small synthetic set in the sampler layout."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cross_validation as cv

REPO = Path(__file__).resolve().parents[1]


def _labels(n_pos, n_neg):
    labels = {f"P_{k:05d}": 1 for k in range(n_pos)}
    labels.update({f"P_{k:05d}": 0 for k in range(n_pos, n_pos + n_neg)})
    return labels


def test_folds_partition_the_patients_and_share_the_positives():
    labels = _labels(26, 55)
    folds = cv.stratified_folds(labels, 5, seed=1)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted(labels) and len(flat) == len(set(flat))
    pos = [sum(labels[p] for p in f) for f in folds]
    assert max(pos) - min(pos) <= 1 and sum(pos) == 26
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert cv.stratified_folds(labels, 5, seed=1) == folds
    assert cv.stratified_folds(labels, 5, seed=2) != folds


def test_fold_plans_test_each_patient_once_and_validate_on_training_folds():
    labels = _labels(12, 30)
    plans = cv.plan_folds(labels, 3, 0.25, seed=3)
    tested = [p for plan in plans for p in plan.test]
    assert sorted(tested) == sorted(labels)
    for plan in plans:
        assert not set(plan.train) & set(plan.test)
        assert not set(plan.val) & (set(plan.test) | set(plan.train))
        assert set(plan.train) | set(plan.val) | set(plan.test) == set(labels)
        assert {labels[p] for p in plan.val} == {0, 1}
        assert {labels[p] for p in plan.train} == {0, 1}


@pytest.mark.parametrize("k,labels,match", [(1, _labels(5, 5), "at least 2"),
                                            (3, _labels(2, 9), "positive")])
def test_impossible_folds_are_refused(k, labels, match):
    with pytest.raises(ValueError, match=match):
        cv.stratified_folds(labels, k, seed=0)


def _layout(root: Path, n_pos=4, n_neg=6):
    """A sampler layout with one empty PNG per view (contents are not read here)."""
    for name in ("full_img", "roi_mask"):
        (root / name).mkdir(parents=True)
    (root / "roi_mask_path.csv").write_text("patient_id,side,view,abn_num,pathology,type\n")
    labels = _labels(n_pos, n_neg)
    for k, (patient, label) in enumerate(sorted(labels.items())):
        for side in ("LEFT", "RIGHT"):
            stem = f"{patient}_{side}_MLO"
            (root / "full_img" / f"{stem}.png").write_bytes(b"x")
            split = ("train", "val", "test")[k % 3]
            cls = "pos" if label and side == "LEFT" else "neg"
            folder = root / "whole_img" / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{stem}.png").write_bytes(b"x")
    return labels


def test_fold_data_links_each_whole_image_into_its_fold_split(tmp_path):
    labels = _layout(tmp_path / "src")
    assert cv.patient_labels(tmp_path / "src") == labels
    plan = cv.plan_folds(labels, 2, 0.3, seed=0)[0]
    dest = cv.write_fold_data(tmp_path / "src", tmp_path / "fold", plan)
    where = plan.split_of()
    images = sorted(p for p in (dest / "whole_img").rglob("*.png"))
    assert len(images) == 2 * len(labels)
    for img in images:
        split, cls = img.parent.parent.name, img.parent.name
        patient = img.stem.rsplit("_", 2)[0]
        assert where[patient] == split
        assert (cls == "pos") == (labels[patient] == 1 and "LEFT" in img.stem)
    for split in ("train", "val", "test"):
        assert (dest / f"{split}_pat.txt").read_text().split() == list(getattr(plan, split))
    assert len(list((dest / "full_img").iterdir())) == 2 * len(labels)


def test_fold_data_is_not_rewritten_when_unchanged(tmp_path):
    labels = _layout(tmp_path / "src")
    plan = cv.plan_folds(labels, 2, 0.3, seed=0)[0]
    dest = cv.write_fold_data_if_changed(tmp_path / "src", tmp_path / "fold", plan)
    before = (dest / "train_pat.txt").stat().st_mtime_ns
    cv.write_fold_data_if_changed(tmp_path / "src", tmp_path / "fold", plan)
    assert (dest / "train_pat.txt").stat().st_mtime_ns == before
    other = cv.plan_folds(labels, 2, 0.3, seed=0)[1]
    cv.write_fold_data_if_changed(tmp_path / "src", tmp_path / "fold", other)
    assert (dest / "test_pat.txt").read_text().split() == list(other.test)


def test_an_image_in_two_folders_is_refused(tmp_path):
    _layout(tmp_path / "src")
    first = next((tmp_path / "src" / "whole_img").rglob("*.png"))
    twin = tmp_path / "src" / "whole_img" / "extra" / "neg"
    twin.mkdir(parents=True)
    (twin / first.name).write_bytes(b"x")
    with pytest.raises(ValueError, match=first.stem):
        cv.patient_labels(tmp_path / "src")


def test_pooling_refuses_an_image_scored_by_two_folds(tmp_path):
    rows = "image_index,malignant_pred,malignant_label\nP_00001_LEFT_MLO,0.5,1\n"
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(rows)
    b.write_text(rows)
    with pytest.raises(ValueError, match="P_00001_LEFT_MLO.*fold 1"):
        cv.pool_image_predictions([a, b], tmp_path / "pooled.csv")


def test_folds_need_the_sampler_layout(tmp_path):
    from pipeline_config import ConfigError, load_config

    path = tmp_path / "cv.toml"
    path.write_text("[data]\nsource = \"synthetic\"\nfolds = 3\n")
    with pytest.raises(ConfigError, match="data.folds"):
        load_config(path)


CV_CONFIG = """
extends = "{demo}"
[data]
source = "sampler_layout"
dir = "{data}"
folds = 2
fold_val_size = 0.25
[patches]
nb_bkg = 6
nb_abn = 8
nb_hns = 2
[patch_train]
nb_epoch = 2
[image_train]
nb_epoch = 1
all_layer_epochs = 1
[predict]
bootstrap = 100
flips = false
[heatmaps]
enabled = false
[evaluate]
enabled = false
[export]
enabled = false
"""


@pytest.mark.slow
def test_two_folds_run_the_chain_and_pool_out_of_fold_predictions(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), RANDOM_SEED="5")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "ddsm_train" / "make_synthetic_ddsm.py"),
                    str(data), "--nb-patients", "24", "--img-height", "576", "--img-width",
                    "448", "--whole-img-size", "288", "224", "--lesion-contrast", "3"],
                   check=True, env=env, capture_output=True)
    config = tmp_path / "cv.toml"
    config.write_text(CV_CONFIG.format(demo=(REPO / "ddsm_train" / "configs" / "demo.toml")
                                       .as_posix(), data=data.as_posix()))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "ddsm_train" / "run_pipeline.py"),
                           str(config), "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == 2 and len(summary["per_fold"]) == 2
    with open(out / "pooled" / "image_predictions.csv", newline="") as fh:
        pooled = list(csv.DictReader(fh))
    whole = sorted(p.stem for p in (data / "whole_img").rglob("*.png"))
    assert sorted(r["image_index"].rsplit("/", 1)[-1].split(".")[0] for r in pooled) == whole
    assert {r["fold"] for r in pooled} == {"1", "2"}
    image = summary["pooled"]["levels"]["image"]
    assert image["n"] == len(whole) and 0 <= image["auroc"] <= 1
    assert len(image["auroc_ci"]) == 2
    patch = summary["pooled"]["patch"]["lesion_vs_background"]
    assert patch["n"] > 0 and patch["bootstrap"]
    # the folds' validation patches come from their validation patients only
    for k in (1, 2):
        val = set((out / f"fold_{k}" / "data" / "val_pat.txt").read_text().split())
        names = {p.name.split("_LEFT")[0].split("_RIGHT")[0]
                 for p in (out / f"fold_{k}" / "patches" / "val").rglob("*.png")}
        assert names and names <= val
    html = (out / "report.html").read_text()
    assert "fold_1/report.html" in html and "95% CI" in html
    # the pooled patch figures name their scores (the folds' test patches, without flips)
    assert summary["patch_scores"] == "no flips"
    assert "patches: lesion vs background (no flips)" in html
    again = subprocess.run([sys.executable, str(REPO / "ddsm_train" / "run_pipeline.py"),
                            str(config), "--out", str(out)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "1 stage(s) ran" in again.stdout, again.stdout[-2000:]  # the pooling
