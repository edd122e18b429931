"""Integration test of `make demo`: ddsm_train/run_demo.sh end to end at a small size.

Runs the real command-line tools in order (synthetic data, patch sampling, patch training,
whole-image training, prediction with and without flips, heatmap overlay, summary) through the
demo script with DEMO_* size variables, and checks that every stage wrote what it promises.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL_ENV = {   # same pixel scale as the default demo (288x224, 64-px patches), fewer of all
    "DEMO_PATIENTS": "40", "DEMO_FULL_HEIGHT": "576", "DEMO_FULL_WIDTH": "448",
    "DEMO_IMG_HEIGHT": "288", "DEMO_IMG_WIDTH": "224", "DEMO_PATCH_SIZE": "64",
    "DEMO_LESION_CONTRAST": "3.0", "DEMO_NB_BKG": "8", "DEMO_NB_ABN": "12", "DEMO_NB_HNS": "2",
    "DEMO_NB_INIT_FILTER": "16", "DEMO_PATCH_EPOCHS": "3", "DEMO_TOP_EPOCHS": "1",
    "DEMO_ALL_EPOCHS": "3", "DEMO_BOOTSTRAP": "200", "RANDOM_SEED": "12345",
    "NUM_CPU_CORES": "2",
}

SUMMARY_KEYS = {"patch_test_accuracy", "test_auroc", "test_auroc_ci", "test_auroc_flips",
                "test_auroc_flips_ci", "n_test_images", "stage_seconds", "total_seconds",
                "roc_png", "heatmap_pngs", "files", "file_list", "out_dir"}
STAGES = ["1_synthetic_data", "2_sample_patches", "3_patch_train", "4_image_train",
          "5_predict", "6_predict_flips", "7_heatmap", "8_predict_val", "9_evaluate"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ, **SMALL_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", str(Path(repo_root) / "ddsm_train" / "run_demo.sh"),
                           str(out)], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return out, proc.stdout


def _pngs(folder):
    return sorted(Path(folder).glob("*.png"))


@pytest.mark.slow
def test_demo_data_and_patches(demo_run):
    out, _ = demo_run
    data = out / "data"
    for name in ("roi_mask_path.csv", "train_pat.txt", "test_pat.txt", "pat_side_cancer.csv"):
        assert (data / name).is_file(), name
    assert len(_pngs(data / "full_img")) == 4 * int(SMALL_ENV["DEMO_PATIENTS"])
    for split in ("train", "val", "test"):
        for cls in ("neg", "pos"):
            assert _pngs(data / "whole_img" / split / cls), (split, cls)
    for split in ("train", "val", "test"):
        for cls in ("background", "malignant", "benign"):
            assert _pngs(out / "patches" / split / cls), (split, cls)
    assert not (out / "patches" / "test_unused").exists()


@pytest.mark.slow
def test_demo_models_predictions_and_heatmap(demo_run):
    import cv2

    out, _ = demo_run
    assert (out / "models" / "patch_clf.h5").stat().st_size > 10_000
    assert (out / "models" / "image_clf.h5").stat().st_size > 10_000
    n_test = sum(len(_pngs(out / "data" / "whole_img" / "test" / c)) for c in ("neg", "pos"))
    for kind in ("no_flips", "flips"):
        pred = out / "predictions" / kind
        rows = (pred / "image_predictions.csv").read_text().strip().splitlines()
        assert len(rows) == n_test + 1
        metrics = json.loads((pred / "metrics.json").read_text())["image"]
        assert metrics["n"] == n_test
        assert metrics["auroc_ci"][0] <= metrics["auroc"] <= metrics["auroc_ci"][1]
        roc = cv2.imread(str(pred / "roc_image.png"))
        assert roc is not None and roc.shape[0] > 100
    overlays = sorted((out / "heatmaps").glob("*_heatmap.png"))
    assert len(overlays) == 2            # CC and MLO of one positive test breast
    pic = cv2.imread(str(overlays[0]))
    assert pic is not None and pic.ndim == 3
    assert (out / "heatmaps" / "prob_heatmap.npz").is_file()


@pytest.mark.slow
def test_demo_summary(demo_run):
    out, stdout = demo_run
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert list(summary["stage_seconds"]) == STAGES
    assert all(v > 0 for v in summary["stage_seconds"].values())
    # the patch classifier's test accuracy, recomputed here from its file and the test patches
    import numpy as np

    import dm_image
    import dm_keras_ext

    patch_file = out / "models" / "patch_clf.h5"
    recipe = dm_image.InputRecipe.from_model_file(patch_file)
    patches = [(f, k) for k, cls in enumerate(("background", "malignant", "benign"))
               for f in _pngs(out / "patches" / "test" / cls)]
    prob = dm_keras_ext.robust_load_model(patch_file).predict(
        recipe.batch([f for f, _ in patches]), verbose=0)
    accuracy = np.mean(prob.argmax(1) == [k for _, k in patches])
    assert summary["patch_test_accuracy"] == pytest.approx(accuracy, abs=5e-5)  # 4 decimals
    assert summary["test_auroc_flips"] > 0.5          # a small run, but it must learn
    lo, hi = summary["test_auroc_flips_ci"]
    assert lo <= summary["test_auroc_flips"] <= hi
    # the operating point chosen on the validation images (Youden's J), applied to the test
    import pandas as pd

    import eval_metrics
    val = pd.read_csv(out / "predictions" / "val_flips" / "image_predictions.csv").dropna(
        subset=["malignant_pred"])
    point = summary["operating_point"]
    assert point["threshold"] == pytest.approx(eval_metrics.choose_threshold(
        val.malignant_label, val.malignant_pred, "youden"), abs=1e-6)   # CSV: 6 digits
    assert "operating point chosen on validation (Youden index" in stdout
    assert Path(summary["out_dir"]) == out.resolve()
    assert stdout.strip().splitlines()[-1] == (f"Results are in {out.resolve()} "
                                               "(summary.json; files.txt lists every file)")
    listed = (out / "files.txt").read_text().splitlines()
    assert "models/image_clf.h5" in listed and "predictions/flips/metrics.json" in listed
    assert len(listed) == sum(1 for p in out.rglob("*") if p.is_file()) - 2


def test_demo_refuses_non_empty_out_dir(tmp_path, repo_root):
    (tmp_path / "old.txt").write_text("x")
    proc = subprocess.run(["bash", str(Path(repo_root) / "ddsm_train" / "run_demo.sh"),
                           str(tmp_path)], cwd=repo_root, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "not empty" in proc.stderr


def test_demo_summary_requires_folder(tmp_path):
    import demo_summary

    with pytest.raises(FileNotFoundError, match="does not exist"):
        demo_summary.run(str(tmp_path / "missing"))
