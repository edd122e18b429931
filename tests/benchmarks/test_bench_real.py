"""Real films, side by side (``make bench-real``; not part of ``make test``).

On the development half of mini-MIAS (``../shared/data/mias_dev``: 81 patients, 162 MLO films,
26 malignant) with ``ddsm_train/configs/real_films_cpu.toml`` (5 patient folds), pooled over the
folds' out-of-fold test images, with patient-clustered bootstrap 95% intervals:

(a) heatmap maximum: each fold's patch classifier run over each of its test films (the
    pipeline's heatmap recipe), the film's score the highest malignant-class probability;
    no whole-image training;
(b) a plain tf.keras CNN (4 convolution blocks, class weights, flips) trained on each fold's
    training films alone for as long as our fold's two trainings took together (at most
    ``BENCH_REAL_CNN_SECONDS`` when set), its epoch chosen on the fold's validation films;
(c) the end-to-end whole-image classifier of the pipeline (the scores named in the summary);
and the patch classifiers on their test patches (lesion vs background). One table, with the time
of each. ``BENCH_REAL_OUT`` (default ``bench_out/real_films``) keeps the run, so a second
``make bench-real`` reuses the pipeline's finished folds.
"""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DEV = REPO.parent / "shared" / "data" / "mias_dev"
CONFIG = REPO / "ddsm_train" / "configs" / "real_films_cpu.toml"
OUT = Path(os.environ.get("BENCH_REAL_OUT", REPO / "bench_out" / "real_films"))

pytestmark = pytest.mark.skipif(not DEV.is_dir(), reason=f"{DEV} is absent")


def _pooled(y, s, groups, seed=12345, n_boot=2000):
    import eval_metrics as em

    res = em.evaluate_scores(np.asarray(y, int), np.asarray(s, float), n_boot=n_boot,
                             seed=seed, groups=np.asarray(groups))
    return res["auroc"], res["auroc_ci"]


def _test_films(fold: Path):
    """(stem, path, label) of the fold's test films."""
    films = []
    for label, cls in enumerate(("neg", "pos")):
        for path in sorted((fold / "data" / "whole_img" / "test" / cls).glob("*.png")):
            films.append((path.stem, path, label))
    return films


def _films(fold: Path, split: str, size):
    import cv2

    xs, ys = [], []
    for label, cls in enumerate(("neg", "pos")):
        for path in sorted((fold / "data" / "whole_img" / split / cls).glob("*.png")):
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            xs.append(cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA))
            ys.append(label)
    x = np.asarray(xs, np.float32)[..., None] / 255.0
    return x - x.mean(), np.asarray(ys)


def heatmap_max_baseline(fold: Path):
    """(a): the fold's patch classifier over its test films; score = max malignant prob."""
    import heatmap_score
    from pipeline_plan import PipelinePlan

    plan = PipelinePlan(fold / "config.toml", fold)
    plan.config["heatmaps"]["enabled"] = True
    args = list(plan.plan("heatmaps").steps[1].args)
    films = _test_films(fold)
    listing = OUT / "baselines" / f"{fold.name}_films.txt"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{stem}.png\n" for stem, _, _ in films))
    for flag in ("--png-dir", "--roi-mask-dir"):
        if flag in args:
            k = args.index(flag)
            del args[k:k + 2]
    args[args.index("--img-list") + 1] = str(listing)
    out = OUT / "baselines" / f"{fold.name}_heatmaps.npz"
    args[args.index("--out") + 1] = str(out)
    args[0] = str(fold / args[0]) if not Path(args[0]).is_absolute() else args[0]
    args[1] = str(fold / args[1]) if not Path(args[1]).is_absolute() else args[1]
    cwd = os.getcwd()
    os.chdir(fold)
    try:
        heatmap_score.main(args)
    finally:
        os.chdir(cwd)
    recs = heatmap_score.load_heatmaps(out)
    best = {Path(str(r["image"])).stem: float(np.asarray(r["heatmap"])[..., 1].max())
            for r in recs if r["heatmap"] is not None}
    return [(stem, best.get(stem, np.nan), label) for stem, _, label in films]


def plain_cnn_baseline(fold: Path, seconds: float, size, seed=12345):
    """(b): a plain CNN on the fold's whole training films for ``seconds`` of training."""
    import tf_keras as keras
    from sklearn.metrics import roc_auc_score

    keras.utils.set_random_seed(seed)
    xtr, ytr = _films(fold, "train", size)
    xva, yva = _films(fold, "val", size)
    inp = keras.Input(xtr.shape[1:])
    x = inp
    for width in (16, 32, 64, 128):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        x = keras.layers.MaxPooling2D(4 if width == 16 else 2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dropout(0.3)(x))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-3), "binary_crossentropy")
    pos = max(1, int(ytr.sum()))
    weights = {0: len(ytr) / (2.0 * (len(ytr) - pos)), 1: len(ytr) / (2.0 * pos)}
    rng = np.random.default_rng(seed)
    best, best_w, start = -1.0, model.get_weights(), time.monotonic()
    while time.monotonic() - start < seconds:
        flip = rng.random(len(xtr)) < 0.5
        xa = np.where(flip[:, None, None, None], xtr[:, :, ::-1], xtr)
        model.fit(xa, ytr, batch_size=8, epochs=1, class_weight=weights, verbose=0,
                  shuffle=True)
        auc = roc_auc_score(yva, model.predict(xva, verbose=0).ravel())
        if auc > best:
            best, best_w = auc, model.get_weights()
    model.set_weights(best_w)
    films = _test_films(fold)
    xte, _ = _films(fold, "test", size)
    scores = model.predict(xte, verbose=0).ravel()
    return [(stem, float(s), label) for (stem, _, label), s in zip(films, scores)]


def cached(fold: Path, method: str, compute):
    """``compute()`` of a baseline on ``fold``, kept in ``OUT/baselines/<fold>_<method>.json``
    with the fold's trained models' fingerprints (a re-run reuses it while they are unchanged)."""
    state = json.loads((fold / "pipeline_state.json").read_text())["stages"]
    key = [state.get(s, {}).get("fingerprint") for s in ("patch_train", "image_train")]
    path = OUT / "baselines" / f"{fold.name}_{method}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return [tuple(r) for r in saved["rows"]], saved["seconds"]
    t0 = time.monotonic()
    rows = compute()
    seconds = time.monotonic() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "rows": rows, "seconds": seconds}))
    return rows, seconds


def cnn_budget(fold: Path) -> float:
    """Training seconds of baseline (b) on ``fold``: what our two trainings took on it, capped
    by ``BENCH_REAL_CNN_SECONDS`` when set (the fold's times grow on a busy machine)."""
    budget = _fold_seconds(fold, ("patch_train", "image_train"))
    cap = os.environ.get("BENCH_REAL_CNN_SECONDS")
    return min(budget, float(cap)) if cap else budget


def _fold_seconds(fold: Path, stages):
    state = json.loads((fold / "pipeline_state.json").read_text())["stages"]
    return sum(state.get(s, {}).get("seconds", 0.0) for s in stages)


def test_real_films_side_by_side():
    sys.path[:0] = [str(REPO), str(REPO / "ddsm_train")]
    from pipeline_config import load_config

    config = load_config(CONFIG)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "ddsm_train" / "run_pipeline.py"),
                           str(CONFIG), "--out", str(OUT)],
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0
    pipeline_wall = time.monotonic() - t0
    summary = json.loads((OUT / "summary.json").read_text())
    folds = sorted(OUT.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    ours_time = sum(_fold_seconds(f, ("sample_patches", "mean", "patch_train", "image_train",
                                      "predict", "predict_flips", "predict_val")) for f in folds)

    size = config["image_train"]["img_size"]
    rows = {}
    for name, method, compute in (
            ("(a) patch heatmap max", "heatmap_max", lambda f: heatmap_max_baseline(f)),
            ("(b) plain CNN, whole films", "plain_cnn",
             lambda f: plain_cnn_baseline(f, cnn_budget(f), size))):
        done = [cached(f, method, lambda f=f, c=compute: c(f)) for f in folds]
        rows[name] = ([r for recs, _ in done for r in recs], sum(t for _, t in done))

    print(f"\nReal films: {DEV} with {CONFIG.name}, {len(folds)} patient folds, pooled "
          f"out-of-fold test predictions; 95% CIs by patient-clustered bootstrap")
    print(f"{'method':44s} {'n':>4s} {'pos':>4s} {'AUROC':>6s}  {'95% CI':15s} {'time':>8s}")
    for name, (recs, secs) in rows.items():
        ok = [(st, s, y) for st, s, y in recs if np.isfinite(s)]
        auc, ci = _pooled([y for _, _, y in ok], [s for _, s, _ in ok],
                          [st.rsplit("_", 2)[0] for st, _, _ in ok])
        print(f"{name:44s} {len(ok):4d} {sum(y for *_, y in ok):4d} {auc:6.3f}  "
              f"[{ci[0]:.3f}, {ci[1]:.3f}] {secs:7.0f}s")
    image = summary["pooled"]["levels"]["image"]
    print(f"{'(c) end-to-end whole-image model (' + summary['scores'] + ')':44s} "
          f"{image['n']:4d} {image['n_pos']:4d} {image['auroc']:6.3f}  "
          f"[{image['auroc_ci'][0]:.3f}, {image['auroc_ci'][1]:.3f}] {ours_time:7.0f}s")
    for task, res in (summary["pooled"]["patch"] or {}).items():
        print(f"{'patches: ' + task.replace('_', ' '):44s} {res['n']:4d} {res['n_pos']:4d} "
              f"{res['auroc']:6.3f}  [{res['auroc_ci'][0]:.3f}, {res['auroc_ci'][1]:.3f}]")
    print(f"pipeline wall time {pipeline_wall:.0f}s (a run that found finished folds skips "
          f"them); warnings: {len(summary['warnings'])}")
    with open(OUT / "baselines" / "side_by_side.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "image_index", "score", "label"])
        for name, (recs, _) in rows.items():
            w.writerows([name, st, s, y] for st, s, y in recs)
