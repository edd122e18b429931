"""Resuming interrupted training runs, the per-epoch CSV log and the training curves.

The trainers are run as subprocesses on tiny synthetic 16-bit images with a tiny patch network;
a run killed with SIGKILL right after the checkpoint of epoch k (``DM_KILL_AFTER_EPOCH``) and
started again with the same command must end exactly as the run that was never interrupted."""
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tf_keras as keras
from conftest import (class_shift_data, split_dirs, tiny_gap_net, tiny_vgg_patch_net,
                      write_class_split)

import dm_keras_ext as K
import training_runs

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "ddsm_train"
IMG_HW, PATCH_HW = (40, 32), (24, 24)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Image (neg/pos) and patch (3 classes) folders and a tiny VGG-like patch network."""
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(3)
    write_class_split(root / "img", ["neg", "pos"], {"train": 6, "val": 4, "test": 2}, IMG_HW,
                      rng, contrast=2500)   # faint lesions: the validation AUROC moves over epochs
    write_class_split(root / "patch", ["background", "malignant", "benign"],
                      {"train": 6, "val": 4, "test": 1}, PATCH_HW, rng)
    keras.backend.clear_session()
    K.save_model_atomic(tiny_vgg_patch_net(keras), root / "patch.h5", include_optimizer=False)
    keras.backend.clear_session()
    return root


def _start(script, argv, workers, kill_after=None):
    env = dict(os.environ, NUM_CPU_CORES=str(workers), RANDOM_SEED="7", CUDA_VISIBLE_DEVICES="",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
    env.pop(K.KILL_AFTER_EPOCH_ENV, None)
    if kill_after is not None:
        env[K.KILL_AFTER_EPOCH_ENV] = str(kill_after)
    return subprocess.Popen([sys.executable, str(SCRIPTS_DIR / script)] + argv, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, expect_rc=0):
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == expect_rc, out[-4000:]
    return out


def _model_weights(path):
    import h5py
    weights = {}
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(
            lambda name, obj: weights.__setitem__(name, obj[()])
            if isinstance(obj, h5py.Dataset) else None)
    return weights


def _max_weight_diff(a, b):
    wa, wb = _model_weights(a), _model_weights(b)
    assert wa.keys() == wb.keys() and wa
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def _log_rows(best):
    with open(K.training_log_path(best), newline="") as f:
        return list(csv.DictReader(f))


def _interrupted_vs_straight(script, argv, tmp_path, workers, kill_after):
    """Run ``argv`` straight through (``a``) and, in parallel, killed after epoch ``kill_after``
    then restarted (``b``). ``kill_after`` may be a sequence of epochs: run ``b`` is then killed
    after each of them in turn, each restart resuming the checkpoint of the kill before, and the
    last restart runs to the end. Returns the two best-model paths and the restarts' outputs
    (one string for a single kill, else a list)."""
    best_a, best_b = tmp_path / "a" / "best.h5", tmp_path / "b" / "best.h5"
    kills = [kill_after] if isinstance(kill_after, int) else list(kill_after)
    straight = _start(script, argv + ["--best-model", str(best_a)], workers)
    outputs = []
    for i, kill in enumerate(kills + [None]):
        proc = _start(script, argv + ["--best-model", str(best_b)], workers, kill)
        out = _finish(proc, expect_rc=0 if kill is None else -9)
        if i:
            assert f"RESUMING the unfinished run of {K.last_checkpoint_path(best_b)} after " \
                   f"epoch {kills[i - 1]}" in out, out[-4000:]
        if kill is not None:
            state = K.read_training_state(K.last_checkpoint_path(best_b))
            assert state["epoch"] == kill and not state["finished"]
            assert "killing this process after epoch" in out
        outputs.append(out)
    _finish(straight)
    return best_a, best_b, outputs[1] if len(kills) == 1 else outputs[1:]


def _compare_runs(best_a, best_b, epochs, metric, log_keys, label):
    """Assert that run ``b`` (interrupted) ended as run ``a`` (straight through): both finished
    after ``epochs`` epochs, the same best ``metric`` value and epoch, best-model and last-epoch
    weights within 1e-5, the same per-epoch log rows. Prints the figures on one line."""
    sa = K.read_training_state(K.last_checkpoint_path(best_a))
    sb = K.read_training_state(K.last_checkpoint_path(best_b))
    diffs = (_max_weight_diff(best_a, best_b),
             _max_weight_diff(K.last_checkpoint_path(best_a), K.last_checkpoint_path(best_b)))
    print(f"{label} resume: epochs {sa['epoch']}/{sb['epoch']}, best {metric} "
          f"{sa['best']['value']:.6f} (epoch {sa['best']['epoch']}) / {sb['best']['value']:.6f} "
          f"(epoch {sb['best']['epoch']}), max weight difference best {diffs[0]:.2e}, "
          f"last {diffs[1]:.2e}")
    assert sa["finished"] and sb["finished"]
    assert sa["epoch"] == sb["epoch"] == epochs
    assert sb["best"]["value"] == pytest.approx(sa["best"]["value"], abs=1e-12)
    assert sb["best"]["epoch"] == sa["best"]["epoch"]
    assert max(diffs) <= 1e-5
    rows_a, rows_b = _log_rows(best_a), _log_rows(best_b)
    assert [(r["epoch"], r["stage"]) for r in rows_b] == \
        [(r["epoch"], r["stage"]) for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for key in log_keys:
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-5, abs=1e-6), \
                (key, ra["epoch"])
    return sb


def _image_argv(root):
    return split_dirs(root, "img") + [
        "--patch-model-state", str(root / "patch.h5"), "--img-size", *map(str, IMG_HW),
        "--rescale-factor", "0.003891", "--featurewise-mean", "50", "--patch-net", "vgg16",
        "--block-type", "vgg", "--top-depths", "8", "--top-repetitions", "1",
        "--batch-size", "4", "--nb-epoch", "1", "--all-layer-epochs", "2", "--optimizer", "sgd",
        "--init-learningrate", "0.02", "--all-layer-multiplier", "1", "--hidden-dropout", "0.3",
        "--hidden-dropout2", "0.3", "--lr-patience", "1"]


@pytest.mark.slow
def test_image_clf_train_killed_and_resumed_ends_as_uninterrupted(setup, tmp_path):
    """2 stages (1 + 2 epochs), AUROC checkpoint, dropout 0.3, augmentation, 2 loader workers;
    killed after epoch 2, in the middle of stage 2 (optimizer state and counters restored)."""
    best_a, best_b, out = _interrupted_vs_straight("image_clf_train.py", _image_argv(setup),
                                                   tmp_path, workers=2, kill_after=2)
    assert "Training summary: 3 epochs, best validation AUROC" in out
    _compare_runs(best_a, best_b, 3, "val AUROC",
                  ("loss", "val_loss", "val_auc", "val_auc_0", "val_auc_1", "lr"),
                  "image_clf_train")
    assert [(r["epoch"], r["stage"]) for r in _log_rows(best_b)] == \
        [("1", "1"), ("2", "2"), ("3", "2")]
    # the dropout layers really were active (so the per-epoch seeding was exercised)
    rates = [layer.rate for layer in K.robust_load_model(best_a)._flatten_layers()
             if isinstance(layer, keras.layers.Dropout)]
    assert rates and all(r == pytest.approx(0.3) for r in rates)
    # the best model is a plain model file, the last-epoch checkpoint keeps the optimizer
    import h5py
    with h5py.File(best_a, "r") as f:
        assert "optimizer_weights" not in f
    with h5py.File(K.last_checkpoint_path(best_a), "r") as f:
        assert "optimizer_weights" in f
    png = cv2.imread(K.training_curves_path(best_b))
    assert png is not None and png.shape[0] >= 400 and png.shape[1] >= 400


@pytest.mark.slow
def test_patch_clf_train_killed_and_resumed_twice_ends_as_uninterrupted(setup, tmp_path):
    """3 stages (1 + 2 + 1 epochs, adam, dropout 0.3 from stage 2, augmentation, 2 loader
    workers). Killed after epoch 1, when stage 1 has just ended (stage 2 starts from the
    checkpoint's weights with a fresh optimizer), then again after epoch 2, in the middle of
    stage 2 (its adam moments and step count come from the checkpoint); the run that finishes
    must match one never interrupted."""
    # inputs of about unit scale, so that the tiny net learns within 4 epochs: the validation
    # accuracy peaks at epoch 2 and only ties it later, so a restart that forgot the best-so-far
    # would save another epoch as the best
    argv = split_dirs(setup, "patch") + [
        "--resume-from", str(setup / "patch.h5"), "--net", "vgg16", "--top-layer-nb", "3",
        "--img-size", *map(str, PATCH_HW), "--no-equalize-hist", "--rescale-factor",
        "0.0003891", "--featurewise-mean", "5", "--batch-size", "6", "--nb-epoch", "1",
        "--top-layer-epochs", "2", "--all-layer-epochs", "1", "--optimizer", "adam",
        "--init-learningrate", "0.03", "--top-layer-multiplier", "1",
        "--all-layer-multiplier", "1", "--hidden-dropout2", "0.3", "--augmentation"]
    best_a, best_b, (out1, out2) = _interrupted_vs_straight(
        "patch_clf_train.py", argv, tmp_path, workers=2, kill_after=(1, 2))
    # after the first kill: stage 1 is skipped, stage 2 restores the weights only
    assert "stage 1 (final dense layer): finished before the resume (1 epochs)" in out1
    assert "Restored weights of epoch 1" in out1
    # after the second: stage 2 continues with the optimizer state of epoch 2
    assert "stage 1 (final dense layer): finished before the resume (1 epochs)" in out2
    assert "Restored weights and optimizer state of epoch 2" in out2
    assert "(resumed after epoch 2)" in out2
    assert "4 epochs, kept epoch" in out2 and "(val_accuracy; its validation accuracy" in out2
    state = _compare_runs(best_a, best_b, 4, "val accuracy",
                          ("loss", "accuracy", "val_loss", "val_accuracy", "lr"),
                          "patch_clf_train")
    assert state["stage"] == 3
    rows = _log_rows(best_b)
    assert [(r["epoch"], r["stage"]) for r in rows] == \
        [("1", "1"), ("2", "2"), ("3", "2"), ("4", "3")]
    val_acc = [float(r["val_accuracy"]) for r in rows]
    assert state["best"]["value"] == pytest.approx(max(val_acc))
    assert state["best"]["epoch"] == int(np.argmax(val_acc)) + 1
    assert K.robust_load_model(best_b).output_shape == (None, 3)
    last = K.robust_load_model(K.last_checkpoint_path(best_b))   # dropout on in stages 2, 3
    assert [layer.rate for layer in last.layers if isinstance(layer, keras.layers.Dropout)] \
        == [pytest.approx(0.3)]


# ------------------------------------------------------------------ in-process checks
@pytest.mark.parametrize("optim, bias_multiplier", [("rmsprop", 0.5), ("adagrad", None),
                                                     ("nadam", 0.1), ("sgd", None)])
def test_checkpoint_restores_optimizer_state_exactly(tmp_path, keras_session, optim,
                                                     bias_multiplier):
    X, y = class_shift_data()
    keras.utils.set_random_seed(3)
    model = tiny_gap_net()
    K._compile(model, optim, 0.01, bias_multiplier, False, None, ["accuracy"])
    model.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "last.h5"
    K.save_training_checkpoint(model, path, {"version": 1, "epoch": 1})
    assert K.read_training_state(path)["epoch"] == 1
    other = tiny_gap_net()
    K._compile(other, optim, 0.01, bias_multiplier, False, None, ["accuracy"])
    training_runs._load_checkpoint_weights(other, path, with_optimizer=True)
    assert int(other.optimizer.iterations) == int(model.optimizer.iterations) == 3
    assert len(other.optimizer.variables) == len(model.optimizer.variables) > 1
    for a, b in zip(model.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    other.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_checkpoint_restores_mixed_precision_state_exactly(tmp_path, keras_session, precision):
    """``--mixed-precision``: the checkpoint also carries the dynamic loss scale (float16) and
    the float32 master weights, so a resumed run steps as the uninterrupted one."""
    import dm_multi_gpu

    X, y = class_shift_data()
    try:
        dm_multi_gpu.set_precision_policy(precision)
        keras.utils.set_random_seed(3)
        model = tiny_gap_net()
        K._compile(model, "adam", 0.01, None, False, None, ["accuracy"])
        assert (precision == "float16") == isinstance(
            model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        model.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        path = tmp_path / "last.h5"
        K.save_training_checkpoint(model, path, {"version": 1, "epoch": 1})
        other = tiny_gap_net()
        K._compile(other, "adam", 0.01, None, False, None, ["accuracy"])
        training_runs._load_checkpoint_weights(other, path, with_optimizer=True)
        assert len(other.optimizer.variables) == len(model.optimizer.variables) > 1
        for a, b in zip(model.optimizer.variables, other.optimizer.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        if precision == "float16":    # the dynamic loss scale and its step counter
            assert int(model.optimizer.dynamic_counter) == 3
            assert int(other.optimizer.dynamic_counter) == 3
            assert float(other.optimizer.loss_scale) == float(model.optimizer.loss_scale)
        assert all(w.dtype == np.float32 for w in other.get_weights())
        model.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        other.fit(X, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for a, b in zip(model.get_weights(), other.get_weights()):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    finally:
        dm_multi_gpu.set_precision_policy(None)


def test_training_log_rows_stages_lr_and_curves(tmp_path, keras_session):
    """At lr 1e-30 the val loss never improves: ReduceLROnPlateau halves the lr each epoch."""
    X, y = class_shift_data()
    best = tmp_path / "best.h5"
    started = time.monotonic()
    hists = K.do_3stage_training(
        tiny_gap_net(), None, (X, y), (X, y), None, str(best), None, top_layer_nb=2, nb_epoch=3,
        top_layer_epochs=2, all_layer_epochs=0, optim="sgd", init_lr=1e-30,
        top_layer_multiplier=1.0, es_patience=10, lr_patience=1, verbose=0, seed=5,
        checkpoint_path=K.last_checkpoint_path(best), log_csv=K.training_log_path(best),
        curves_png=K.training_curves_path(best), run_info={"options_hash": "x"})
    elapsed = time.monotonic() - started
    assert [len(h.epoch) for h in hists] == [3, 2]
    rows = _log_rows(best)
    assert list(rows[0])[:2] == ["epoch", "stage"] and list(rows[0])[-2:] == ["lr", "seconds"]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    assert [(int(r["epoch"]), int(r["stage"])) for r in rows] == \
        [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[:3] == pytest.approx([1e-30, 1e-30, 5e-31])    # halved after epoch 2
    assert lrs[3] == pytest.approx(1e-30)                       # stage 2: a fresh optimizer
    seconds = [float(r["seconds"]) for r in rows]             # each epoch's own duration
    assert min(seconds) > 0 and sum(seconds) <= elapsed, (seconds, elapsed)
    state = K.read_training_state(K.last_checkpoint_path(best))
    assert state["finished"] and state["epoch"] == 5 and state["stage"] == 2
    assert state["seed"] == 5
    assert state["plateau"]["wait"] == 0                        # reset by the halving below
    assert state["lr"] == pytest.approx(lrs[-1] / 2)            # lr for a next epoch
    png = cv2.imread(K.training_curves_path(best))
    assert png is not None and png.shape[:2] == (800, 800)
    assert K.read_training_state(best) is None                  # the best model: plain file
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_api_resume_skips_finished_stages_and_merges_histories(tmp_path, keras_session):
    """do_2stage_training interrupted in epoch 3, then resumed from its checkpoint."""
    X, y = class_shift_data(nb_class=2)
    best = tmp_path / "best.h5"
    files = dict(checkpoint_path=K.last_checkpoint_path(best), log_csv=K.training_log_path(best),
                 seed=3)

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    def train(**kwargs):
        return K.do_2stage_training(
            tiny_gap_net(2), None, (X, y), (X, y), None, str(best), None, top_layer_nb=4,
            nb_epoch=1, all_layer_epochs=3, optim="adam", init_lr=1e-3, verbose=0,
            **files, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        train(callbacks=[Crash()])
    state = K.read_training_state(K.last_checkpoint_path(best))
    assert (state["epoch"], state["stage"], state["stage_done"]) == (2, 2, False)
    hists = train(resume_state=state)
    assert [h.epoch for h in hists] == [[0], [1, 2, 3]]
    assert len(hists[1].history["val_auc"]) == 3
    assert [int(r["epoch"]) for r in _log_rows(best)] == [1, 2, 3, 4]
    assert K.read_training_state(K.last_checkpoint_path(best))["finished"]


def test_resolve_resume_decisions(tmp_path, keras_session, caplog):
    model = tiny_gap_net()
    model.compile("sgd", "categorical_crossentropy")
    ckpt = tmp_path / "best.h5.last.h5"
    run = {"options_hash": "h1", "training_hash": "t1", "options": {"nb_epoch": 2}}

    def write(finished=False, options_hash="h1", training_hash="t1", path=ckpt):
        K.save_training_checkpoint(model, path, {
            "version": 1, "finished": finished, "epoch": 2, "stage": 1,
            "run": {"options_hash": options_hash, "training_hash": training_hash,
                    "options": {"nb_epoch": 3}}})

    assert K.resolve_resume(str(ckpt), run) is None                        # no checkpoint
    write()
    assert K.resolve_resume(str(ckpt), run)["epoch"] == 2                  # same options
    assert K.resolve_resume(str(ckpt), run, auto_resume=False) is None     # --no-auto-resume
    write(finished=True)
    assert K.resolve_resume(str(ckpt), run) is None                        # finished run
    write(options_hash="h2")
    assert K.resolve_resume(str(ckpt), run) is None                        # other options
    assert "other options (['nb_epoch'])" in caplog.text
    other = tmp_path / "elsewhere.h5"
    write(options_hash="h9", training_hash="t9", path=other)               # --resume-from
    assert K.resolve_resume(str(ckpt), run, resume_from=str(other))["path"] == str(other)
    plain = tmp_path / "plain.h5"
    K.save_model_atomic(model, plain)
    assert K.resolve_resume(str(tmp_path / "none.h5"), run, resume_from=str(plain)) is None
