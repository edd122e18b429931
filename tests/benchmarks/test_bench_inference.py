"""Benchmark: whole-image inference speed (1152x896): scoring image files with and without
reading ahead (prefetch) against the model alone on arrays already in memory, with and without
flip augmentation; and the vectorised bootstrap against a scikit-learn loop, side by side in one
run.

Run with ``make bench``. The model is the paper's ResNet50 patch net (random weights,
``weights=None``) converted by ``add_top_layers`` to a 1152x896 whole-image classifier with a
[512-512-1024]x2 residual top. The files are the four real 3328x2560 16-bit mammograms of
../shared when present, else synthetic 16-bit PNGs of that size (``BENCH_INFER_IMAGES``, 4).
``image_clf_predict.score_items`` reads and resizes each file (serially, or on threads while the
model scores the previous batch) and scores it; the time ratios to the model alone on the same
images in the same round are the cost of reading, best of ``BENCH_INFER_ROUNDS`` (3)
interleaved rounds, in wall time and in CPU time of all threads (steadier on a shared machine) (on a CPU the model already keeps every core busy, so reading ahead cannot
hide much there; on a GPU it hides the decoding behind the model)."""
import os
import time

import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

import eval_metrics
from dm_keras_ext import get_dl_model
from dm_resnet import add_top_layers
from image_clf_predict import ImageItem, load_pred_image, predict_batch, score_items
from scoring_inputs import full_size_views

N_IMAGES = int(os.environ.get("BENCH_INFER_IMAGES", "4"))
ROUNDS = int(os.environ.get("BENCH_INFER_ROUNDS", "3"))
BATCH = 1
READ = dict(img_size=(1152, 896), img_scale=None, rescale_factor=0.003891,
            equalize_hist=False, featurewise_center=True, featurewise_mean=52.16,
            segment_breast=False)


def _in_memory(models, x, test_augment):
    """(wall s, CPU s of all threads) to score arrays already in memory, and the scores."""
    t0, c0 = time.perf_counter(), time.process_time()
    preds = [predict_batch(models, [3], x[i:i + BATCH], test_augment)
             for i in range(0, len(x), BATCH)]
    return (time.perf_counter() - t0, time.process_time() - c0), np.concatenate(preds)


def _from_files(models, items, test_augment, prefetch):
    t0, c0 = time.perf_counter(), time.process_time()
    probs, errors = score_items(items, models, [3], 2, BATCH, test_augment, READ,
                                prefetch=prefetch)
    assert not any(errors)
    return (time.perf_counter() - t0, time.process_time() - c0), probs


def test_bench_whole_image_inference_cpu(keras_session, tmp_path):
    patch, _, _ = get_dl_model("resnet50", nb_class=3, use_pretrained=False)
    model, _ = add_top_layers(patch, (1152, 896), patch_net="resnet50", block_type="resnet",
                              depths=[512, 512], repetitions=[2, 2],
                              bottleneck_enlarge_factor=2)
    files, kind = full_size_views(tmp_path, N_IMAGES)
    items = [ImageItem(str(k), f) for k, f in enumerate(files)]
    x = np.stack([load_pred_image(f, **READ) for f in files])
    models = [("resnet50_top", model)]
    for flips in (False, True):       # warm-up: graph tracing for both batch shapes
        predict_batch(models, [3], x[:BATCH], flips)
    times = {"memory": [], "serial": [], "prefetch": []}
    for _ in range(ROUNDS):
        runs = {"memory": _in_memory(models, x, False),
                "serial": _from_files(models, items, False, 0),
                "prefetch": _from_files(models, items, False, 2)}
        for name, (dt, _) in runs.items():
            times[name].append(dt)
        np.testing.assert_array_equal(runs["serial"][1], runs["prefetch"][1])
        np.testing.assert_allclose(runs["memory"][1], runs["prefetch"][1], atol=1e-6)
    (t_flips, _), p_flips = _in_memory(models, x, True)
    assert p_flips.shape == (N_IMAGES, 2)
    np.testing.assert_allclose(p_flips.sum(1), 1, atol=1e-5)
    t_mem = min(wall for wall, _ in times["memory"])
    ratios, text = {}, {}
    for name in ("serial", "prefetch"):
        walls = [t[0] / m[0] for t, m in zip(times[name], times["memory"])]
        cpus = [t[1] / m[1] for t, m in zip(times[name], times["memory"])]
        ratios[name] = (min(walls), min(cpus))
        text[name] = (f"x{min(walls):.2f} that time (per round "
                      f"{', '.join(f'x{v:.2f}' for v in walls)}), CPU time x{min(cpus):.2f}")
    print(f"\nResNet50 [512-512-1024]x2 whole-image model, 1152x896x3, {model.count_params():,} "
          f"params, CPU ({os.cpu_count()} cores), batch {BATCH}, {N_IMAGES} {kind} 16-bit "
          f"PNGs, best of {ROUNDS} interleaved rounds:\n"
          f"  model on arrays in memory: {N_IMAGES / t_mem:.3f} images/s "
          f"(4-flip augmentation: {N_IMAGES / t_flips:.3f} images/s, x{t_flips / t_mem:.2f} "
          f"the time)\n"
          f"  from files, read serially: {text['serial']}\n"
          f"  from files, with prefetch: {text['prefetch']}")
    assert min(ratios["prefetch"]) <= 1.25


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
