"""Benchmark: whole-image inference speed (1152x896) with and without flip augmentation, and
the vectorised bootstrap against a scikit-learn loop, side by side in one run.

Run with ``make bench``. The model is the paper's ResNet50 patch net (random weights,
``weights=None``) converted by ``add_top_layers`` to a 1152x896 whole-image classifier with a
[512-512-1024]x2 residual top; images are preprocessed arrays (reading not timed)."""
import os
import time

import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

import eval_metrics
from dm_keras_ext import get_dl_model
from dm_resnet import add_top_layers
from image_clf_predict import predict_batch

N_IMAGES = int(os.environ.get("BENCH_INFER_IMAGES", "2"))
BATCH = 1


def _images_per_s(models, x, test_augment):
    predict_batch(models, [3], x[:BATCH], test_augment)      # warm-up (graph tracing)
    t0 = time.perf_counter()
    preds = [predict_batch(models, [3], x[i:i + BATCH], test_augment)
             for i in range(0, len(x), BATCH)]
    dt = time.perf_counter() - t0
    return len(x) / dt, np.concatenate(preds)


def test_bench_whole_image_inference_cpu(keras_session):
    patch, _, _ = get_dl_model("resnet50", nb_class=3, use_pretrained=False)
    model, _ = add_top_layers(patch, (1152, 896), patch_net="resnet50", block_type="resnet",
                              depths=[512, 512], repetitions=[2, 2],
                              bottleneck_enlarge_factor=2)
    x = np.random.default_rng(0).normal(0, 30, (N_IMAGES, 1152, 896, 1)).astype("float32")
    models = [("resnet50_top", model)]
    ips_plain, p_plain = _images_per_s(models, x, False)
    ips_flip, p_flip = _images_per_s(models, x, True)
    assert p_plain.shape == p_flip.shape == (N_IMAGES, 2)
    np.testing.assert_allclose(p_flip.sum(1), 1, atol=1e-5)
    print(f"\nResNet50 [512-512-1024]x2 whole-image model, 1152x896x3, {model.count_params():,} "
          f"params, CPU ({os.cpu_count()} cores), batch {BATCH}, {N_IMAGES} images: "
          f"{ips_plain:.3f} images/s plain, {ips_flip:.3f} images/s with 4-flip "
          f"augmentation (x{ips_plain / ips_flip:.2f} slower)")


def test_bench_bootstrap_vectorised_vs_loop():
    rng = np.random.default_rng(0)
    n, n_boot = 1000, 2000
    y = (rng.random(n) < 0.2).astype(int)
    s = rng.normal(size=n) + y
    t0 = time.perf_counter()
    reps = eval_metrics.bootstrap_replicates(y, s, n_boot=n_boot, seed=1)
    t_vec = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = []
    for idx in eval_metrics.iter_bootstrap_indices(n, n_boot, 1):
        for row in idx:
            p, r, _ = precision_recall_curve(y[row], s[row])
            loop.append((roc_auc_score(y[row], s[row]), auc(r, p)))
    t_loop = time.perf_counter() - t0
    np.testing.assert_allclose(np.c_[reps["auroc"], reps["auprc"]], loop, atol=1e-12)
    print(f"\nbootstrap AUROC+AUPRC, n={n}, {n_boot} resamples: vectorised {t_vec:.2f} s, "
          f"scikit-learn loop {t_loop:.2f} s, speed-up x{t_loop / t_vec:.1f}")
