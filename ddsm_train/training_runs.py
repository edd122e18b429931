"""Training runs: the staged training of the patch and whole-image classifiers, and its files.

Part of the reimplementation of Shen et al. (2019; arXiv:1708.09427). The trainers
(``patch_clf_train.py``, ``image_clf_train.py``, through ``training_setup``) use this module;
the models it trains come from ``dm_keras_ext`` (model building, model files), which also
re-exports this module's public names for 2017 code (``from dm_keras_ext import
do_3stage_training`` works). Import it as ``training_runs`` with this folder on ``sys.path``
(as the scripts do), not as ``ddsm_train.training_runs``, so there is one module.

A **run** trains one model in **stages**: successive ``fit`` calls, each with its own trainable
layers and learning rate, a fresh optimizer and epochs numbered on from the stage before.
After every epoch the run writes its files beside the best model ``<best>``, so an interrupted
run can continue where it stopped. The sections of this file, in order:

1. **Metrics and callbacks**: :class:`DMMetrics` (batch sensitivity/specificity),
   :class:`DMFlush`, :class:`FiniteTrainingGuard` (stops at the first non-finite loss or
   weight, before anything of that epoch is saved), the best-model callbacks
   :class:`BestModelCheckpoint` (3-stage: best ``val_accuracy``) and
   :class:`DMAucModelCheckpoint` (2-stage: best mean one-vs-rest validation AUROC, also put
   into the epoch logs as ``val_auc``), both saving through :func:`save_model_distributed`
   (atomic, chief worker only); :func:`flip_all_img` and :func:`predict_flip_mean` (4-flip
   test-time averaging).
2. **Resumable runs, logs and curves**: the last-epoch checkpoint ``<best>.last.h5``
   (:func:`save_training_checkpoint`: the model, its optimizer state and the run's state as
   JSON, written atomically; :func:`read_training_state` reads it back), the decision to
   resume (:func:`resolve_resume`: an unfinished run with the same options continues), the CSV
   log ``<best>.log.csv`` (:func:`write_training_log`, one row per epoch) and the curves
   ``<best>.curves.png`` (:func:`plot_training_curves`), all recorded by a per-run recorder
   (``_RunRecorder``) that the last callback of each stage feeds.
3. **Staged training**: class weights, the choice of trainable layers and the stage runner
   ``_Stage`` (compiles, restores a resumed stage, attaches the callbacks, calls ``fit``).
4. **Staged training (typed)**: :func:`train_3stage` (patch classifier: final Dense layer,
   top layers, all layers) and :func:`train_2stage` (whole image: top layers, all layers).
   Each takes a :class:`StagePlan` (epochs, learning rates, regularisation per stage; a
   trainer's options object is taken whole), :class:`StageData` (train and validation data)
   and :class:`StageRun` (the run's files, seed, resume state, callbacks, strategy).
5. **2017 staged-training calls**: :func:`do_3stage_training` and :func:`do_2stage_training`,
   the keyword calls of the 2017 code, are thin wrappers over the typed functions.

A run as the trainers start it (``training_setup.run_trainer`` fills these from the options)::

    data = StageData(train, val, validation_steps=len(val), steps_per_epoch=len(train),
                     nb_class=2)
    run = StageRun("best.h5", checkpoint_path=last_checkpoint_path("best.h5"),
                   log_csv=training_log_path("best.h5"), seed=12345)
    histories = train_2stage(model, data, StagePlan(nb_epoch=2, all_layer_epochs=3), run)
"""
from __future__ import annotations

import dataclasses as _dataclasses
import json as _json
import logging
import os as _os
import sys
import threading
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras
from sklearn.metrics import roc_auc_score

import dm_image as _dm_image
from dm_keras_ext import (ModelFileExtras, _batch_norm_layers, _check_frozen_bn_mode, _compile,
                          check_written_model, save_h5_named, save_model_atomic,
                          set_regularization)

# The runs log under the name they had in dm_keras_ext, so log lines and logging settings stay.
logger = logging.getLogger("dm_keras_ext")

__all__ = [
    "do_3stage_training",
    "do_2stage_training",
    "StagePlan",
    "StageData",
    "StageRun",
    "train_3stage",
    "train_2stage",
    "DMAucModelCheckpoint",
    "BestModelCheckpoint",
    "DMMetrics",
    "DMFlush",
    "NonFiniteTrainingError",
    "FiniteTrainingGuard",
    "flip_all_img",
    "predict_flip_mean",
    "ovr_auroc",
    "class_weight_dict",
    "save_model_distributed",
    "last_checkpoint_path",
    "training_log_path",
    "training_curves_path",
    "save_training_checkpoint",
    "read_training_state",
    "resolve_resume",
    "write_training_log",
    "plot_training_curves",
    "TRAINING_STATE_KEY",
    "KILL_AFTER_EPOCH_ENV",
]

# ---------------------------------------------------------------- metrics and callbacks
@keras.saving.register_keras_serializable(package="dm_keras_ext")
def sensitivity(y_true, y_pred):
    """Batch sensitivity (recall of the positive = last class) for 2-class softmax or sigmoid."""
    yt = tf.cast(y_true[..., -1], tf.float32)
    yp = tf.round(tf.clip_by_value(tf.cast(y_pred[..., -1], tf.float32), 0.0, 1.0))
    return tf.reduce_sum(yt * yp) / (tf.reduce_sum(yt) + keras.backend.epsilon())


@keras.saving.register_keras_serializable(package="dm_keras_ext")
def specificity(y_true, y_pred):
    """Batch specificity (recall of the negative class) for 2-class softmax or sigmoid."""
    yt = 1.0 - tf.cast(y_true[..., -1], tf.float32)
    yp = 1.0 - tf.round(tf.clip_by_value(tf.cast(y_pred[..., -1], tf.float32), 0.0, 1.0))
    return tf.reduce_sum(yt * yp) / (tf.reduce_sum(yt) + keras.backend.epsilon())


class DMMetrics:
    """Sensitivity and specificity as Keras metric functions (positive class = last column).

    Use as ``model.compile(..., metrics=[DMMetrics.sensitivity, DMMetrics.specificity])``.
    Keras averages them over batches, so an epoch value approximates the dataset value.
    """
    sensitivity = staticmethod(sensitivity)
    specificity = staticmethod(specificity)


class DMFlush(keras.callbacks.Callback):
    """Flush stdout and stderr at the end of each epoch (logs piped to files stay current)."""

    def on_epoch_end(self, epoch, logs=None):
        sys.stdout.flush()
        sys.stderr.flush()


class _ReportEpoch(keras.callbacks.Callback):
    """Report each finished epoch (``n`` of the ``total`` planned, loss, validation loss,
    accuracy and AUROC) as a progress line (:func:`dm_image.report_progress`)."""

    def __init__(self, total):
        super().__init__()
        self.total = total

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}

        def value(key):
            v = logs.get(key)
            return float(v) if v is not None and np.ndim(v) == 0 else None

        _dm_image.report_progress("epoch", epoch + 1, self.total, loss=value("loss"),
                                  val_loss=value("val_loss"), val_acc=value("val_accuracy"),
                                  val_auroc=value("val_auc"))


class NonFiniteTrainingError(ValueError):
    """Training produced a non-finite loss or non-finite weights (it diverged)."""


def _first_non_finite(logs, keys):
    for key in keys:
        value = (logs or {}).get(key)
        if value is not None and np.ndim(value) == 0 and not np.isfinite(float(value)):
            return key, float(value)
    return None


class FiniteTrainingGuard(keras.callbacks.Callback):
    """Stop training at the first non-finite loss, before anything of that epoch is saved.

    Checked after every train batch (the running ``loss``) and at the end of every epoch
    (``loss``, ``val_loss`` and every weight of the model). Being the first callback of a
    stage, it raises :class:`NonFiniteTrainingError` before the best-model checkpointer and
    the last-epoch checkpoint see the epoch, so both keep the last finite epoch's model.

    Args:
        best_model: the best-model path, named in the message.
        checkpoint: the last-epoch checkpoint path, named in the message, or None.
    """

    def __init__(self, best_model=None, checkpoint=None):
        super().__init__()
        self.best_model, self.checkpoint = best_model, checkpoint
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        bad = _first_non_finite(logs, ("loss",))
        if bad is not None:
            self._stop(f"{bad[0]} {bad[1]} at batch {batch + 1} of epoch {self._epoch}")

    def on_epoch_end(self, epoch, logs=None):
        bad = _first_non_finite(logs, ("loss", "val_loss"))
        if bad is not None:
            self._stop(f"{bad[0]} {bad[1]} at the end of epoch {epoch + 1}")
        for w in self.model.weights:
            if w.dtype.is_floating and not np.all(np.isfinite(keras.backend.get_value(w))):
                self._stop(f"non-finite values in weight {w.name} after epoch {epoch + 1}")

    def _stop(self, what):
        kept = [p for p in (self.best_model, self.checkpoint) if p]
        raise NonFiniteTrainingError(
            f"training diverged: {what}; nothing of this epoch was saved"
            + (f" ({' and '.join(kept)} keep the last finite epoch, if any)" if kept else "")
            + "; lower --init-learningrate or check the input scale (--rescale-factor, "
              "--featurewise-mean)")


def _model_is_finite(model, logs=None):
    """False when ``logs`` hold a non-finite loss or ``model`` a non-finite weight."""
    if _first_non_finite(logs, ("loss", "val_loss")) is not None:
        return False
    return all(np.all(np.isfinite(keras.backend.get_value(w))) for w in model.weights
               if w.dtype.is_floating)


def _save_as_chief(model, filepath, save):
    """``save(model, path)`` at ``filepath`` on the chief; other workers save to a temp folder.

    In a multi-worker run every worker must take part in saving; only the chief writes
    ``filepath``, the others write to a temporary folder that is removed.
    """
    if getattr(model.distribute_strategy.extended, "should_checkpoint", True):
        return save(model, filepath)
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix="dm_worker_save_")
    try:
        save(model, f"{folder}/model.h5")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return None


def save_model_distributed(model: keras.Model, filepath, include_optimizer: bool = False,
                           extras: "ModelFileExtras | None" = None) -> None:
    """Save through ``save_model_atomic`` (temporary file + os.replace), chief worker only.

    By default the file is a plain model without optimizer state (about half the size); the
    last-epoch checkpoint of a run (:func:`save_training_checkpoint`) is the file that keeps
    the optimizer state for resuming. ``extras`` (:class:`ModelFileExtras`) says what goes
    into and beside the file; other workers write no sidecar.
    """
    def save(m, p):
        own = extras if p == filepath or extras is None else extras.without_sidecar()
        return save_model_atomic(m, p, include_optimizer=include_optimizer, extras=own)

    _save_as_chief(model, filepath, save)


class BestModelCheckpoint(keras.callbacks.Callback):
    """Save the model atomically whenever ``monitor`` improves (kept across several fits).

    Args:
        filepath: HDF5 (``.h5``) or Keras file for the best model.
        monitor: log key, e.g. ``"val_accuracy"`` or ``"val_loss"``.
        mode: ``"max"`` or ``"min"``.
        extras: what each save writes into and beside the file (:class:`ModelFileExtras`).
        keep_last: save every epoch whose loss and weights are finite, whatever ``monitor``
            says: the last epoch's model is kept (``monitor`` is still logged).
    """

    def __init__(self, filepath, monitor="val_accuracy", mode="max", extras=None,
                 keep_last=False):
        super().__init__()
        self.extras = extras
        if mode not in ("max", "min"):
            raise ValueError(f"mode should be one of ['max', 'min'], got {mode!r}")
        self.filepath, self.monitor, self.mode = str(filepath), monitor, mode
        self.keep_last = keep_last
        self.best = -np.inf if mode == "max" else np.inf
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            logger.warning("BestModelCheckpoint: %s not in logs %s", self.monitor,
                           sorted(logs or {}))
            return
        better = self.keep_last or (value > self.best if self.mode == "max"
                                    else value < self.best)
        if better and not _model_is_finite(self.model, logs):
            logger.error("epoch %d: non-finite loss or weights; %s is not saved", epoch + 1,
                         self.filepath)
            return
        if better:
            logger.info("epoch %d: %s %s %.5f, saving %s", epoch + 1, self.monitor,
                        "is" if self.keep_last else f"improved from {self.best:.5f} to",
                        value, self.filepath)
            self.best, self.best_epoch = float(value), epoch + 1
            save_model_distributed(self.model, self.filepath, extras=self.extras)

    def on_train_end(self, logs=None):
        logger.info("best %s %.5f at epoch %s (%s)", self.monitor, self.best, self.best_epoch,
                    self.filepath)

    def get_state(self):
        """What a resumed run needs: the monitored quantity, its best value and epoch."""
        return {"monitor": self.monitor, "value": float(self.best), "epoch": self.best_epoch}

    def set_state(self, state):
        """Restore :meth:`get_state` (the best so far of an interrupted run)."""
        self.best, self.best_epoch = float(state["value"]), state["epoch"]


def flip_all_img(X: np.ndarray) -> np.ndarray:
    """The 4 flips of a batch stacked along the batch axis.

    Args:
        X: array (N, H, W, C) (or (N, H, W)).

    Returns:
        array (4N, H, W, C): as is, left-right, up-down, both; block k is ``[k*N:(k+1)*N]``.
    """
    X = np.asarray(X)
    if X.ndim < 3:
        raise ValueError(f"flip_all_img expects (N, H, W[, C]) images, got shape {X.shape}")
    return np.concatenate([X, X[:, :, ::-1], X[:, ::-1, :], X[:, ::-1, ::-1]], axis=0)


def ovr_auroc(y_true, y_pred):
    """One-vs-rest AUROC per class and their mean.

    Args:
        y_true: one-hot (N, C) or integer labels (N,).
        y_pred: scores (N, C); (N, 1) is read as the positive-class probability.

    Returns:
        (mean AUROC over classes where it is defined, list of per-class AUROCs, NaN if undefined).
    """
    y_pred = np.asarray(y_pred, dtype=np.float64)
    y_true = np.asarray(y_true)
    labels = y_true.argmax(axis=-1) if y_true.ndim > 1 and y_true.shape[-1] > 1 else \
        y_true.reshape(len(y_true)).astype(int)
    if y_pred.ndim == 1 or y_pred.shape[-1] == 1:
        scores = {1: y_pred.reshape(len(y_pred))}
    else:
        scores = {c: y_pred[:, c] for c in range(y_pred.shape[1])}
    per_class = []
    for c, s in scores.items():
        pos = labels == c
        per_class.append(float(roc_auc_score(pos, s)) if 0 < pos.sum() < len(pos) else np.nan)
    valid = [a for a in per_class if not np.isnan(a)]
    return (float(np.mean(valid)) if valid else np.nan), per_class


def _iter_test_batches(test_set, batch_size, test_samples):
    """Yield (x, y) batches from (X, y) arrays, a Sequence or a ``next()`` iterator."""
    if isinstance(test_set, (tuple, list)):
        X, y = test_set[0], test_set[1]
        n = len(X) if test_samples is None else min(int(test_samples), len(X))
        bs = batch_size or 32
        for start in range(0, n, bs):
            yield X[start:min(start + bs, n)], y[start:min(start + bs, n)]
        return
    total = test_samples
    if total is None:
        total = getattr(test_set, "nb_sample", None) or getattr(test_set, "n", None)
    if hasattr(test_set, "__getitem__") and hasattr(test_set, "__len__"):
        seen = 0
        for i in range(len(test_set)):
            batch = test_set[i]
            x, y = batch[0], batch[1]
            if total is not None:
                x, y = x[:total - seen], y[:total - seen]
            seen += len(x)
            yield x, y
            if total is not None and seen >= total:
                return
        return
    if total is None:
        raise ValueError("test_samples is needed for an iterator without nb_sample")
    if hasattr(test_set, "reset"):
        test_set.reset()
    seen = 0
    while seen < total:
        batch = next(test_set)
        x, y = batch[0][:total - seen], batch[1][:total - seen]
        seen += len(x)
        yield x, y


def predict_flip_mean(model, x, test_augment=False):
    """Class probabilities of ``model`` for the batch ``x``, optionally averaged over flips.

    Args:
        model: tf-keras model.
        x: model input batch (N, H, W, C).
        test_augment: predict on the 4 flips of :func:`flip_all_img` in one forward pass of
            4N images and average the 4 predictions of each image.

    Returns:
        float64 array (N, nb_class).
    """
    x = np.asarray(x)
    if not test_augment:
        return np.asarray(model.predict_on_batch(x), dtype=np.float64)
    pred = np.asarray(model.predict_on_batch(flip_all_img(x)), dtype=np.float64)
    return pred.reshape((4, len(x)) + pred.shape[1:]).mean(axis=0)


class DMAucModelCheckpoint(keras.callbacks.Callback):
    """Validation AUROC (one-vs-rest per class, and mean) each epoch; best model saved atomically.

    Adds ``val_auc`` (mean) and ``val_auc_<c>`` to the epoch logs (so they enter the History),
    keeps the best across several fits (stages) and logs a summary at the end of each fit.

    Args:
        filepath: where the best model is written (atomic replace).
        test_data: ``(X, y)`` arrays (X (N, H, W, C) preprocessed like training input, y one-hot
            (N, C) or labels (N,)) or an iterator yielding ``(x, y[, w])`` batches.
        batch_size: images per forward pass for arrays (default 32).
        test_samples: number of samples to evaluate (default: all).
        test_augment: average the predictions on the 4 flips.
        extras: what each save writes into and beside the file (:class:`ModelFileExtras`).
        keep_last: save every epoch whose loss and weights are finite, whatever its AUROC:
            the last epoch's model is kept (the AUROC is still computed and logged).
    """

    def __init__(self, filepath, test_data, batch_size=None, test_samples=None,
                 test_augment=False, extras=None, keep_last=False):
        super().__init__()
        self.extras, self.keep_last = extras, keep_last
        self.filepath = str(filepath)
        self.test_data = test_data
        self.batch_size, self.test_samples, self.test_augment = batch_size, test_samples, \
            test_augment
        self.best_auc, self.best_epoch = -np.inf, None
        self.best_all_auc = None
        self.auc_history = []     # per epoch: (epoch, mean AUROC, per-class AUROCs)

    def on_epoch_end(self, epoch, logs=None):
        auc, y_true, y_pred = self.calc_test_auc(
            self.test_data, self.model, batch_size=self.batch_size,
            test_samples=self.test_samples, return_y_res=True, test_augment=self.test_augment)
        _, per_class = ovr_auroc(y_true, y_pred)
        self.auc_history.append((epoch + 1, auc, per_class))
        if logs is not None:
            logs["val_auc"] = auc
            for c, a in enumerate(per_class):
                logs[f"val_auc_{c}"] = a
        logger.info("epoch %d: validation AUROC %.4f (per class %s)", epoch + 1, auc,
                    ", ".join(f"{a:.4f}" for a in per_class))
        better = self.keep_last or (not np.isnan(auc) and auc > self.best_auc)
        if better and not _model_is_finite(self.model, logs):
            logger.error("epoch %d: non-finite loss or weights; %s is not saved", epoch + 1,
                         self.filepath)
            return
        if better:
            logger.info("epoch %d: AUROC %s %.4f, saving %s", epoch + 1,
                        "is" if self.keep_last else f"improved from {self.best_auc:.4f} to",
                        auc, self.filepath)
            self.best_auc, self.best_epoch, self.best_all_auc = auc, epoch + 1, per_class
            save_model_distributed(self.model, self.filepath, extras=self.extras)

    def on_train_end(self, logs=None):
        logger.info("best validation AUROC %.4f at epoch %s (per class %s), model %s",
                    self.best_auc, self.best_epoch, self.best_all_auc, self.filepath)

    def get_state(self):
        """What a resumed run needs: the best mean AUROC, its epoch and per-class values."""
        return {"monitor": "val_auc", "value": float(self.best_auc), "epoch": self.best_epoch,
                "per_class": self.best_all_auc,
                "history": [[e, a, list(p)] for e, a, p in self.auc_history]}

    def set_state(self, state):
        """Restore :meth:`get_state` (the best so far of an interrupted run)."""
        self.best_auc, self.best_epoch = float(state["value"]), state["epoch"]
        self.best_all_auc = state.get("per_class")
        self.auc_history = [(e, a, p) for e, a, p in state.get("history", [])]

    @staticmethod
    def calc_test_auc(test_set, model, batch_size=None, test_samples=None, return_y_res=False,
                      test_augment=False):
        """Mean one-vs-rest AUROC of ``model`` on ``test_set``.

        Args:
            test_set: ``(X, y)`` arrays or an iterator of ``(x, y[, w])`` batches.
            model: tf-keras model with softmax (or single sigmoid) output.
            batch_size: images per forward pass for arrays (default 32; with ``test_augment``
                each pass holds 4x as many images).
            test_samples: evaluate only the first N samples.
            return_y_res: also return the labels and predictions.
            test_augment: mean of the predictions on the 4 flips (as is, left-right, up-down,
                both), computed in one batched forward pass per batch.

        Returns:
            float mean AUROC, or ``(auc, y_true, y_pred)`` with ``return_y_res``.
        """
        ys, preds = [], []
        for x, y in _iter_test_batches(test_set, batch_size, test_samples):
            if len(x) == 0:
                continue
            preds.append(predict_flip_mean(model, x, test_augment))
            ys.append(np.asarray(y))
        if not ys:
            raise ValueError("calc_test_auc: the test set yielded no samples")
        y_true, y_pred = np.concatenate(ys), np.concatenate(preds)
        auc, _ = ovr_auroc(y_true, y_pred)
        return (auc, y_true, y_pred) if return_y_res else auc


# ---------------------------------------------------------------- resumable runs, logs and curves
#: Name of the HDF5 dataset of a last-epoch checkpoint that holds its training state (JSON).
TRAINING_STATE_KEY = "dm_training_state"
_STATE_VERSION = 1
#: Test hook: with this environment variable set to N, a training process kills itself
#: (SIGKILL, as a crash or an out-of-memory kill would) right after the checkpoint of epoch N.
KILL_AFTER_EPOCH_ENV = "DM_KILL_AFTER_EPOCH"


def last_checkpoint_path(best_model) -> str:
    """``<best_model>.last.h5``: the run's last finished epoch, kept for resuming."""
    return str(best_model) + ".last.h5"


def training_log_path(best_model) -> str:
    """``<best_model>.log.csv``: one row per finished epoch."""
    return str(best_model) + ".log.csv"


def training_curves_path(best_model) -> str:
    """``<best_model>.curves.png``: loss, validation accuracy/AUROC and lr by epoch."""
    return str(best_model) + ".curves.png"


def save_training_checkpoint(model, path, state):
    """Write ``model`` with its optimizer state and the JSON ``state`` as one HDF5 file.

    The file is written atomically (:func:`dm_image.atomic_write`), weights and state together,
    so a kill at any moment leaves either the previous checkpoint or this one, never weights of
    one epoch with the state of another. It is also a regular Keras model file
    (:func:`robust_load_model` loads it); :func:`read_training_state` reads the state.
    """
    scale = _dynamic_loss_scale(getattr(model, "optimizer", None))
    if scale is not None:   # not among the optimizer's saved variables
        state = dict(state, loss_scale={"scale": float(scale[0].numpy()),
                                        "counter": int(scale[1].numpy())})
    text = _json.dumps(state)

    def save(m, dest):
        import h5py

        def write(tmp):
            save_h5_named(m, tmp, dest, include_optimizer=True)
            with h5py.File(tmp, "a") as f:
                f.create_dataset(TRAINING_STATE_KEY, data=text,
                                 dtype=h5py.string_dtype("utf-8"))
            check_written_model(tmp, dest)
        return _dm_image.atomic_write(_os.path.abspath(_os.fspath(dest)), write, to_path=True,
                                      durable=True)

    return _save_as_chief(model, path, save)


def read_training_state(path) -> dict:
    """The training state of a last-epoch checkpoint, or None for a plain model file.

    Raises:
        OSError: the file cannot be read as HDF5.
        ValueError: the state is unreadable or of an unknown version.
    """
    import h5py

    path = _os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            if TRAINING_STATE_KEY not in f:
                return None
            raw = f[TRAINING_STATE_KEY][()]
    except OSError as err:
        raise OSError(f"{path}: cannot be read as an HDF5 model file ({err})") from None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        state = _json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: unreadable training state ({err})") from None
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise ValueError(f"{path}: training state of an unknown version "
                         f"{state.get('version') if isinstance(state, dict) else state!r}")
    state["path"] = path
    return state


def _options_diff(old, new, ignore=()):
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [k for k in keys if old.get(k) != new.get(k)]


def resolve_resume(checkpoint, run_info, auto_resume=True, resume_from=None):
    """Decide whether a training run continues an interrupted one; return its state or None.

    Args:
        checkpoint: this run's last-epoch checkpoint (:func:`last_checkpoint_path`).
        run_info: this run's identity: ``options_hash`` (all options that change the result),
            ``training_hash`` (the same without the options ``source_options`` that name the
            model to start from and the output files) and ``options``.
        auto_resume: continue ``checkpoint`` when it holds an unfinished run with the same
            ``options_hash``; False starts over (the checkpoint is replaced after epoch 1).
        resume_from: a model file given by the user; when it is an unfinished last-epoch
            checkpoint, its run continues (a warning names options that differ).

    Returns:
        The state to continue from (:func:`read_training_state`), or None for a new run.
    """
    if resume_from is not None:
        state = read_training_state(resume_from)
        if state is not None and not state.get("finished"):
            old = state.get("run", {})
            if old.get("training_hash") != run_info.get("training_hash"):
                logger.warning("Resuming %s with other options than its run: %s", resume_from,
                               _options_diff(old.get("options", {}),
                                             run_info.get("options", {}),
                                             run_info.get("source_options", ())) or "(unknown)")
            logger.info("RESUMING the run of %s after epoch %d (stage %d)", resume_from,
                        state["epoch"], state["stage"])
            return state
        if state is not None:
            logger.info("%s is the checkpoint of a finished run: starting a new run from its "
                        "weights", resume_from)
    if not _os.path.isfile(checkpoint):
        return None
    try:
        state = read_training_state(checkpoint)
    except (OSError, ValueError) as err:
        logger.warning("Ignoring the checkpoint %s (%s); starting a new run", checkpoint, err)
        return None
    if state is None:
        return None
    if state.get("finished"):
        logger.info("%s holds a finished run; starting a new run", checkpoint)
        return None
    if not auto_resume:
        logger.info("Unfinished run in %s (epoch %d) not resumed (--no-auto-resume); starting "
                    "over", checkpoint, state["epoch"])
        return None
    if state.get("run", {}).get("options_hash") != run_info.get("options_hash"):
        logger.warning("%s holds an unfinished run with other options (%s); starting a new run, "
                       "which replaces it", checkpoint,
                       _options_diff(state.get("run", {}).get("options", {}),
                                     run_info.get("options", {})) or "(unknown)")
        return None
    logger.info("RESUMING the unfinished run of %s after epoch %d (stage %d); "
                "--no-auto-resume starts over", checkpoint, state["epoch"], state["stage"])
    return state


def _dynamic_loss_scale(optimizer):
    """(current loss scale, steps since it last changed) variables of a ``mixed_float16``
    optimizer with dynamic loss scaling; None for any other optimizer."""
    if not isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer) \
            or not optimizer.dynamic:
        return None
    # tf-keras exposes the counter variable but the scale only as a tensor
    return optimizer._loss_scale.current_loss_scale, optimizer.dynamic_counter


def _load_checkpoint_weights(model, path, with_optimizer):
    """Load a checkpoint's weights into ``model`` (compiled) and, optionally, its optimizer
    (with ``mixed_float16``, also the dynamic loss scale)."""
    model.load_weights(path)
    if not with_optimizer:
        return
    import h5py
    from tf_keras.src.saving.legacy import hdf5_format

    with h5py.File(path, "r") as f:
        if "optimizer_weights" not in f:
            raise ValueError(f"{path} holds no optimizer state")
        values = [np.asarray(v) for v in hdf5_format.load_optimizer_weights_from_hdf5_group(f)]
    opt = model.optimizer
    inner = getattr(opt, "inner_optimizer", opt)   # the loss-scale wrapper saves the inner's
    with model.distribute_strategy.scope():
        inner.build(model.trainable_variables)
    if len(values) != len(inner.variables):
        raise ValueError(f"{path}: {len(values)} optimizer variables for an optimizer with "
                         f"{len(inner.variables)}; was it written by another configuration?")
    inner.set_weights(values)
    scale, saved = _dynamic_loss_scale(opt), (read_training_state(path) or {}).get("loss_scale")
    if scale is not None and saved:
        scale[0].assign(float(saved["scale"]))
        scale[1].assign(int(saved["counter"]))


def _random_layers(model):
    """Layers drawing random numbers in training (dropout, noise) with a non-zero rate."""
    from tf_keras.src.engine.base_layer import BaseRandomLayer

    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, BaseRandomLayer) and getattr(layer, "rate", 1) != 0]


class _EpochSequence(keras.utils.Sequence):
    """A train Sequence whose epoch is the training epoch.

    The stage sets the epoch before each ``fit``; ``fit`` then advances it once per epoch from
    its own thread. The extra end-of-pass calls of tf-keras's loader threads are ignored, so
    with the project's iterators (which draw batch ``i`` of epoch ``e`` from (seed, e, i)) the
    data of an epoch depend only on the seed and the epoch number, however many epochs ran in
    this process and however many loader workers there are.
    """

    def __init__(self, sequence):
        super().__init__()
        self.sequence, self.epoch = sequence, 0
        self._thread = threading.get_ident()

    def __len__(self):
        return len(self.sequence)

    def __getitem__(self, i):
        return self.sequence[i]

    def set_epoch(self, epoch):
        self._thread, self.epoch = threading.get_ident(), int(epoch)
        setter = getattr(self.sequence, "set_epoch", None)
        if setter is not None:
            setter(self.epoch)

    def on_epoch_end(self):
        if threading.get_ident() != self._thread:
            return
        if hasattr(self.sequence, "set_epoch"):
            self.set_epoch(self.epoch + 1)
        else:
            self.epoch += 1
            self.sequence.on_epoch_end()


class _EpochSeed(keras.callbacks.Callback):
    """At each epoch's start, seed Python, NumPy and TensorFlow with ``seed + epoch``.

    A model with dropout or noise layers gets a freshly traced train step each epoch, so
    that its random draws also restart from ``seed + epoch``: an epoch is the same whether
    the run went through or was resumed just before it.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed, self._retrace = int(seed), False

    def on_train_begin(self, logs=None):
        self._retrace = bool(_random_layers(self.model))

    def on_epoch_begin(self, epoch, logs=None):
        keras.utils.set_random_seed(self.seed + int(epoch))
        if self._retrace:
            self.model.train_function = self.model.make_train_function(force=True)


class _ResumableCounters:
    """Callback mixin: counters saved in a run's last-epoch checkpoint (:meth:`get_state`) and
    restored, after the callback's own reset, when the run resumes (``initial_state``)."""

    _STATE = ()   # (attribute, type) pairs

    def __init__(self, initial_state=None, **kwargs):
        super().__init__(**kwargs)
        self._initial_state = initial_state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._initial_state:
            for name, kind in self._STATE:
                if name in self._initial_state:
                    setattr(self, name, kind(self._initial_state[name]))
            self._initial_state = None

    def get_state(self):
        return {name: kind(getattr(self, name)) for name, kind in self._STATE}


class _ResumableEarlyStopping(_ResumableCounters, keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters can be saved and restored across processes."""

    _STATE = (("wait", int), ("best", float), ("best_epoch", int))


class _ResumablePlateau(_ResumableCounters, keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose counters can be saved and restored across processes."""

    _STATE = (("wait", int), ("best", float), ("cooldown_counter", int))


def _lr_value(model):
    return float(keras.backend.get_value(model.optimizer.learning_rate))


def _csv_number(value):
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return format(float(value), ".8g")


def write_training_log(rows: list, path) -> None:
    """Write the per-epoch rows of a run as CSV (atomically: the whole file each time).

    Columns: ``epoch`` (1-based, continuing across stages), ``stage`` (1, 2, 3: the stage's
    number in its training function), the Keras logs of the epoch (``loss``, ``accuracy``,
    ``val_loss``, ``val_accuracy``, ``val_auc`` and ``val_auc_<class>`` where AUROC is
    computed, other metrics), ``lr`` (the learning rate the epoch trained with) and
    ``seconds`` (its wall time).
    """
    keys = []
    for row in rows:
        keys += [k for k in row["logs"] if k != "lr" and k not in keys]
    header = ["epoch", "stage"] + keys + ["lr", "seconds"]
    lines = [",".join(header)]
    for row in rows:
        values = [row["epoch"], row["stage"]] + [row["logs"].get(k) for k in keys] + \
            [row["lr"], row["seconds"]]
        lines.append(",".join(_csv_number(v) for v in values))
    text = "\n".join(lines) + "\n"
    return _dm_image.atomic_write(path, lambda f: f.write(text), text=True)


def plot_training_curves(rows: list, path) -> None:
    """Plot a run's loss, validation accuracy/AUROC and learning rate by epoch into a PNG.

    Stage boundaries are dashed vertical lines. Drawn with matplotlib's Agg canvas (no display
    needed, the global backend untouched) and written through :func:`dm_image.atomic_write`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_val, ax_lr = fig.subplots(3, 1, sharex=True)
    epochs = [r["epoch"] for r in rows]

    def series(key):
        return [r["logs"].get(key, np.nan) for r in rows]

    for ax, keys, title in ((ax_loss, ("loss", "val_loss"), "loss"),
                            (ax_val, ("accuracy", "val_accuracy", "val_auc"),
                             "accuracy / AUROC")):
        for key in keys:
            if any(key in r["logs"] for r in rows):
                ax.plot(epochs, series(key), marker="o", markersize=3, label=key)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize="small")
    ax_lr.plot(epochs, [r["lr"] for r in rows], drawstyle="steps-mid", marker="o",
               markersize=3)
    if rows and min(r["lr"] for r in rows) > 0:
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    for prev, row in zip(rows, rows[1:]):
        if row["stage"] != prev["stage"]:
            for ax in (ax_loss, ax_val, ax_lr):
                ax.axvline(row["epoch"] - 0.5, color="gray", linestyle="--", linewidth=1)
    for i, row in enumerate(rows[:1] + [b for a, b in zip(rows, rows[1:])
                                        if a["stage"] != b["stage"]]):
        ax_loss.annotate(f"stage {row['stage']}", (row["epoch"] - (0.5 if i else 0.0), 1.0),
                         xycoords=("data", "axes fraction"), fontsize="small",
                         va="bottom")
    from matplotlib.ticker import MaxNLocator
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png")
    return _dm_image.atomic_write(path, write)


class _RunRecorder:
    """Per-epoch records of a staged run: CSV log, last-epoch checkpoint, curves, resuming.

    Args:
        plan: the numbers of the stages this run trains (epochs > 0), in order.
        plan_info: settings the stages depend on (stored in the checkpoint).
        checkpoint, log_csv, curves_png: files to write (None: not written).
        seed: base seed of the epochs (None: no reseeding).
        run_info: the run's identity (options hash, options), stored in the checkpoint.
        resume: a state of :func:`read_training_state` to continue from, or None.
    """

    def __init__(self, plan, plan_info, checkpoint=None, log_csv=None, curves_png=None,
                 seed=None, run_info=None, resume=None):
        self.plan, self.plan_info = list(plan), dict(plan_info)
        self.checkpoint, self.log_csv, self.curves_png = checkpoint, log_csv, curves_png
        self.seed, self.run_info, self.resume = seed, dict(run_info or {}), resume
        self.rows = [dict(r) for r in resume["rows"]] if resume else []
        self.weights_pending = resume is not None
        if resume and log_csv:
            write_training_log(self.rows, log_csv)      # drops rows after the checkpoint

    def stage_mode(self, number):
        """``"skip"`` (trained before the resume), ``"resume"`` (continue it) or ``"run"``."""
        if self.resume is None:
            return "run"
        done = self.resume["stage"]
        if number < done or (number == done and self.resume["stage_done"]):
            return "skip"
        return "resume" if number == done else "run"

    def past_history(self, number, name, model):
        """A History of the epochs of stage ``number`` recorded before the resume."""
        hist = keras.callbacks.History()
        hist.set_model(model)
        hist.stage, hist.epoch, hist.history = name, [], {}
        for row in self.rows:
            if row["stage"] == number:
                hist.epoch.append(row["epoch"] - 1)
                for key, value in row["logs"].items():
                    hist.history.setdefault(key, []).append(value)
        return hist

    def last_epoch_of(self, number):
        return max((r["epoch"] for r in self.rows if r["stage"] == number), default=0)

    def restore(self, model, checkpointer, with_optimizer):
        """Load the checkpoint's weights (and optimizer state) and the best-so-far.

        A run resumed with another best-model path gets a copy of the run's best model there.
        """
        path = self.resume["path"]
        _load_checkpoint_weights(model, path, with_optimizer)
        if hasattr(checkpointer, "set_state") and self.resume.get("best"):
            checkpointer.set_state(self.resume["best"])
            old, new = self.resume.get("best_model"), getattr(checkpointer, "filepath", None)
            if old and new and not _os.path.isfile(new) and _os.path.isfile(old):
                import shutil
                _dm_image.atomic_write(new, lambda tmp: shutil.copyfile(old, tmp),
                                       to_path=True, durable=True)
                logger.info("Copied the run's best model %s to %s", old, new)
        self.weights_pending = False
        logger.info("Restored weights%s of epoch %d from %s", " and optimizer state"
                    if with_optimizer else "", self.resume["epoch"], path)

    def record(self, model, row, state):
        self.rows.append(row)
        if self.checkpoint:
            state = dict(state, version=_STATE_VERSION, seed=self.seed, run=self.run_info,
                         plan=self.plan_info, rows=self.rows)
            save_training_checkpoint(model, self.checkpoint, state)
        if self.log_csv:
            write_training_log(self.rows, self.log_csv)
        kill_after = _os.environ.get(KILL_AFTER_EPOCH_ENV, "").strip()
        if kill_after and int(kill_after) == row["epoch"]:
            import signal
            logger.warning("%s=%s: killing this process after epoch %d", KILL_AFTER_EPOCH_ENV,
                           kill_after, row["epoch"])
            _os.kill(_os.getpid(), signal.SIGKILL)

    def finish(self, model, checkpointer):
        if self.weights_pending and self.resume is not None:   # nothing left to train
            self.restore(model, checkpointer, with_optimizer=False)
        if self.curves_png and self.rows:
            plot_training_curves(self.rows, self.curves_png)
            logger.info("Training curves: %s", self.curves_png)


class _RecordEpoch(keras.callbacks.Callback):
    """Last callback of a stage: the epoch's CSV row and the last-epoch checkpoint."""

    def __init__(self, recorder, number, name, start, end, early_stopping, plateau,
                 checkpointer):
        super().__init__()
        self.recorder, self.number, self.name, self.start, self.end = recorder, number, name, \
            start, end
        self.early_stopping, self.plateau, self.checkpointer = early_stopping, plateau, \
            checkpointer
        self._t0, self._lr = None, None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0, self._lr = time.time(), _lr_value(self.model)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        row = {"epoch": epoch + 1, "stage": self.number, "logs": logs, "lr": self._lr,
               "seconds": round(time.time() - self._t0, 3)}
        stage_done = bool(self.model.stop_training) or epoch + 1 >= self.end
        state = {"stage": self.number, "stage_name": self.name, "stage_done": stage_done,
                 "best_model": getattr(self.checkpointer, "filepath", None),
                 "stage_start_epoch": self.start, "epoch": epoch + 1,
                 "finished": stage_done and self.number == (self.recorder.plan or
                                                             [self.number])[-1],
                 "lr": _lr_value(self.model),
                 "early_stopping": self.early_stopping.get_state(),
                 "plateau": self.plateau.get_state() if self.plateau is not None else None,
                 "best": self.checkpointer.get_state()
                 if hasattr(self.checkpointer, "get_state") else None}
        self.recorder.record(self.model, row, state)


# ---------------------------------------------------------------- staged training
def class_weight_dict(nb_class: int, pos_cls_weight: float = 1.0,
                      neg_cls_weight: float = 1.0) -> dict:
    """Class weights ``{0: neg_cls_weight, 1..nb_class-1: pos_cls_weight}``."""
    if nb_class < 2:
        raise ValueError(f"nb_class should be >= 2, got {nb_class}")
    return {0: float(neg_cls_weight), **{c: float(pos_cls_weight) for c in range(1, nb_class)}}


def _final_dense(model):
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise ValueError(f"model {model.name!r} has no top-level Dense layer")
    return dense[-1]


def _dropout_before(model, layer):
    """The Dropout between ``layer`` and the previous layer with weights, if any."""
    idx = model.layers.index(layer)
    for prev in reversed(model.layers[:idx]):
        if isinstance(prev, keras.layers.Dropout):
            return prev
        if prev.weights:
            return None
    return None


def _default_top_layer_nb(model):
    """First top-level layer after the last nested model (the converted patch network)."""
    nested = [i for i, layer in enumerate(model.layers) if isinstance(layer, keras.Model)]
    if not nested:
        raise ValueError("top_layer_nb is needed: the model has no nested patch network to "
                         "freeze")
    return nested[-1] + 1


def _set_trainable(model, trainable_fn):
    """Set ``trainable`` of each top-level layer (a nested model passes it to its layers)."""
    for i, layer in enumerate(model.layers):
        layer.trainable = bool(trainable_fn(i, layer))


class _Stage:
    """Runs successive ``fit`` calls with continuing epoch numbers and shared callbacks.

    With a recorder (``_RunRecorder``) each epoch is logged and checkpointed, and a resumed
    run skips the stages finished before, continues the interrupted one and restores weights,
    optimizer state, learning rate and the early-stopping and plateau counters.
    """

    def __init__(self, data, checkpointer, plan, run, recorder=None):
        self.extra_callbacks = list(run.callbacks or [])
        self.train, self.val = data.train, data.validation
        if isinstance(data.train, keras.utils.Sequence):
            self.train = _EpochSequence(data.train)
        self.val_steps = None if isinstance(data.validation, (tuple, list)) else \
            data.validation_steps
        self.steps, self.checkpointer = data.steps_per_epoch, checkpointer
        self.class_weight = None if plan.auto_batch_balance else class_weight_dict(
            data.nb_class, plan.pos_cls_weight, plan.neg_cls_weight)
        self.plan, self.run_setup = plan, run
        self.nb_worker, self.verbose = data.nb_worker, run.verbose
        self.recorder = recorder or _RunRecorder([], {})
        self.epochs_done, self.histories = 0, []
        self.total_epochs = None        # the epochs of all stages, for progress lines

    def run(self, model, name, epochs, lr, number=1):
        """Compile ``model`` (frozen BN layers in the plan's ``frozen_bn_mode``) and fit it for
        ``epochs`` at learning rate ``lr``.

        ``number`` is the stage's number in its training function (1, 2, 3).
        """
        plan = self.plan
        optim, frozen_bn_mode = plan.optim, plan.frozen_bn_mode
        if epochs <= 0:
            logger.info("%s: skipped (0 epochs)", name)
            return
        rec = self.recorder
        mode = rec.stage_mode(number)
        if mode == "skip":
            hist = rec.past_history(number, name, model)
            self.histories.append(hist)
            self.epochs_done = max(self.epochs_done, rec.last_epoch_of(number))
            logger.info("%s: finished before the resume (%d epochs)", name, len(hist.epoch))
            return
        _compile(model, optim, lr, plan.bias_multiplier, plan.jit, self.run_setup.strategy,
                 ("accuracy",), frozen_bn_mode)
        start = initial = self.epochs_done
        es_state = plateau_state = past = None
        if mode == "resume":
            past = rec.past_history(number, name, model)     # the epochs before the resume
            state = rec.resume
            start, initial = int(state["stage_start_epoch"]), int(state["epoch"])
            rec.restore(model, self.checkpointer, with_optimizer=True)
            keras.backend.set_value(model.optimizer.learning_rate, state["lr"])
            es_state, plateau_state = state["early_stopping"], state["plateau"]
        elif rec.weights_pending:        # the stage before was finished at the checkpoint
            rec.restore(model, self.checkpointer, with_optimizer=False)
        nb_trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        nb_frozen_bn = sum(not layer.trainable for layer in _batch_norm_layers(model))
        logger.info("%s: epochs %d-%d%s, optimizer %s, lr %.3g, %d trainable parameters, "
                    "%d frozen BatchNormalization layers (frozen_bn_mode %s)", name,
                    start + 1, start + epochs,
                    f" (resumed after epoch {initial})" if mode == "resume" else "", optim,
                    _lr_value(model), nb_trainable, nb_frozen_bn, frozen_bn_mode)
        callbacks = [FiniteTrainingGuard(getattr(self.checkpointer, "filepath", None),
                                         rec.checkpoint)]
        callbacks += [_EpochSeed(rec.seed)] if rec.seed is not None else []
        early = _ResumableEarlyStopping(es_state, monitor="val_loss", patience=plan.es_patience,
                                        verbose=1)
        callbacks.append(early)
        plateau = None
        if optim == "sgd":
            plateau = _ResumablePlateau(plateau_state, monitor="val_loss", factor=0.5,
                                        patience=plan.lr_patience, verbose=1)
            callbacks.append(plateau)
        callbacks += [self.checkpointer, DMFlush()] + self.extra_callbacks
        if _os.environ.get(_dm_image.PROGRESS_ENV) == "1":
            callbacks.append(_ReportEpoch(self.total_epochs))
        callbacks.append(_RecordEpoch(rec, number, name, start, start + epochs, early, plateau,
                                      self.checkpointer))
        if isinstance(self.train, (tuple, list)):   # (X, y[, sample_weight]) arrays
            data = dict(x=self.train[0], y=self.train[1], steps_per_epoch=None,
                        sample_weight=self.train[2] if len(self.train) > 2 else None)
        else:
            data = dict(x=self.train, steps_per_epoch=self.steps)
            if isinstance(self.train, _EpochSequence):
                self.train.set_epoch(initial)
        hist = model.fit(**data,
                         epochs=start + epochs, initial_epoch=initial,
                         class_weight=self.class_weight, validation_data=self.val,
                         validation_steps=self.val_steps, callbacks=callbacks,
                         workers=self.nb_worker, use_multiprocessing=False,
                         verbose=self.verbose)
        hist.stage = name
        self.epochs_done = initial + len(hist.history.get("loss", []))
        if past is not None:                # prepend the epochs run before the resume
            for key, values in past.history.items():
                hist.history[key] = values + list(hist.history.get(key, []))
            hist.epoch = past.epoch + list(hist.epoch)
        self.histories.append(hist)



# ---------------------------------------------------------------- staged training (typed)
@_dataclasses.dataclass
class StagePlan:
    """What the staged training does: epochs, learning rates and regularisation per stage.

    The field names are the trainers' option names (destinations of their flags), so a
    trainer's options object is passed whole: :meth:`of` takes the fields it has and leaves
    the others at these defaults (those of ``do_3stage_training``).

    Attributes:
        nb_epoch, top_layer_epochs, all_layer_epochs: epochs of stage 1, 2 (3-stage only) and
            the all-layer stage; 0 skips a stage.
        top_layer_nb: first layer index trained in the top-layer stage (None: found by role
            or, in 2-stage training, the layer after the last nested model).
        use_pretrained: 3-stage: False runs stage 1 only, on all layers.
        optim, init_lr, top_layer_multiplier, all_layer_multiplier: optimiser and learning
            rates (stage lr = ``init_lr`` x the stage's multiplier).
        es_patience, lr_patience: early stopping and (sgd) lr halving on val loss.
        auto_batch_balance, pos_cls_weight, neg_cls_weight: class weights when the batches
            are not balanced.
        weight_decay, hidden_dropout: 2-stage, stage 1; ``weight_decay2``,
            ``hidden_dropout2``: the later stages.
        bias_multiplier: bias learning-rate multiplier (None: as the other weights).
        jit: XLA-compile the train step.
        frozen_bn_mode: ``"batch"`` or ``"moving"`` (see :func:`set_frozen_bn_mode`).
        net: backbone name (logged only).
    """

    nb_epoch: int = 10
    top_layer_epochs: int = 0
    all_layer_epochs: int = 0
    top_layer_nb: "int | None" = None
    use_pretrained: bool = True
    optim: str = "sgd"
    init_lr: float = .01
    top_layer_multiplier: float = .01
    all_layer_multiplier: float = .0001
    es_patience: int = 5
    lr_patience: int = 2
    auto_batch_balance: bool = True
    pos_cls_weight: float = 1.
    neg_cls_weight: float = 1.
    weight_decay: float = .0001
    hidden_dropout: float = .0
    weight_decay2: float = .01
    hidden_dropout2: float = .0
    bias_multiplier: "float | None" = None
    jit: bool = False
    frozen_bn_mode: str = "batch"
    net: "str | None" = None

    @classmethod
    def of(cls, options: object) -> "StagePlan":
        """The plan of ``options``: a StagePlan, or any object (a trainer's options) whose
        attributes of the same names are taken; the others keep their defaults."""
        if isinstance(options, cls):
            return options
        names = [f.name for f in _dataclasses.fields(cls)]
        return cls(**{n: getattr(options, n) for n in names if hasattr(options, n)})


@_dataclasses.dataclass
class StageData:
    """The data of a staged training.

    Attributes:
        train: iterator/Sequence/tf.data yielding ``(x, y)`` or ``(x, y, w)`` (y one-hot), or
            ``(X, y[, w])`` arrays.
        validation: ``(X, y)`` arrays or an iterator like ``train``.
        validation_steps: batches per validation pass of an iterator.
        steps_per_epoch: train batches per epoch (None: the whole ``train``).
        nb_class: number of classes (class weights).
        nb_worker: data-loading workers of ``fit``.
    """

    train: object
    validation: object
    validation_steps: "int | None" = None
    steps_per_epoch: "int | None" = None
    nb_class: int = 3
    nb_worker: int = 1


@_dataclasses.dataclass
class StageRun:
    """Where a staged training writes, and what it runs in.

    Attributes:
        best_model: the best model file.
        checkpoint_path: after each epoch the model, its optimizer state and the run's state
            (stage, epoch, lr, early-stopping and plateau counters, best so far, ``seed``,
            ``run_info``, the epochs' logs) are written atomically to this HDF5 file (see
            :func:`save_training_checkpoint`); the last epoch marks it finished. None: off.
        log_csv: the per-epoch CSV log (:func:`write_training_log`), rewritten each epoch.
        curves_png: the training curves (:func:`plot_training_curves`) written at the end.
        seed: with a seed, each epoch starts by seeding Python, NumPy and TensorFlow with
            ``seed + epoch`` (and retraces the train step of a model with dropout), so that an
            epoch's randomness depends only on (seed, epoch). None: no reseeding.
        resume_state: a state of :func:`read_training_state` (see :func:`resolve_resume`):
            stages finished before it are skipped, the interrupted one continues from its
            weights, optimizer state, lr and counters; its ``plan`` settings override
            ``use_pretrained`` and ``top_layer_nb``.
        run_info: the run's identity (options hash, options), stored in the checkpoint.
        callbacks: extra Keras callbacks of every stage.
        checkpointer: the best-model callback (when None, 2-stage: a
            :class:`DMAucModelCheckpoint` on the validation data; 3-stage: best
            ``val_accuracy``).
        strategy: the ``tf.distribute`` strategy the model was built in (default: the
            model's).
        custom_objects: classes needed to rebuild the model from its config.
        verbose: Keras fit verbosity.
        extras: what the best-model saves write into and beside the file
            (:class:`ModelFileExtras`).
    """

    best_model: str
    checkpoint_path: "str | None" = None
    log_csv: "str | None" = None
    curves_png: "str | None" = None
    seed: "int | None" = None
    resume_state: "dict | None" = None
    run_info: "dict | None" = None
    callbacks: list = _dataclasses.field(default_factory=list)
    checkpointer: object = None
    strategy: object = None
    custom_objects: "dict | None" = None
    verbose: int = 2
    extras: "ModelFileExtras | None" = None

    def recorder(self, stages: list, plan_info: dict) -> "_RunRecorder":
        """The per-epoch recorder of ``stages`` (the numbers of the stages that train)."""
        return _RunRecorder(stages, plan_info, self.checkpoint_path, self.log_csv,
                            self.curves_png, self.seed, self.run_info, self.resume_state)


def train_3stage(model: keras.Model, data: StageData, plan: object,
                 run: StageRun) -> list:
    """Three-stage patch classifier training (the typed form of :func:`do_3stage_training`).

    Args:
        model: patch classifier (softmax output, ``data.nb_class`` units).
        data: the train and validation data.
        plan: a :class:`StagePlan`, or a trainer's options (taken whole, see
            :meth:`StagePlan.of`).
        run: the run's files, callbacks and strategy.

    Returns:
        list of ``keras.callbacks.History``, one per stage run (``.stage`` names it;
        ``.model`` is the model trained in that stage).
    """
    plan = StagePlan.of(plan)
    use_pretrained, top_layer_nb = plan.use_pretrained, plan.top_layer_nb
    if run.resume_state is not None:
        use_pretrained, top_layer_nb = _resume_plan(
            run.resume_state, {"use_pretrained": bool(use_pretrained),
                               "top_layer_nb": top_layer_nb})
    if use_pretrained and plan.top_layer_epochs > 0 and top_layer_nb is None:
        raise ValueError("top_layer_nb is needed for stage 2 (top_layer_epochs > 0)")
    _check_frozen_bn_mode(plan.frozen_bn_mode)
    ckpt = run.checkpointer or BestModelCheckpoint(run.best_model, monitor="val_accuracy",
                                                   mode="max", extras=run.extras)
    stages = [1] if not use_pretrained else [n for n, e in (
        (1, plan.nb_epoch), (2, plan.top_layer_epochs), (3, plan.all_layer_epochs)) if e > 0]
    rec = run.recorder([n for n in stages if n != 1 or plan.nb_epoch > 0],
                       {"use_pretrained": bool(use_pretrained), "top_layer_nb": top_layer_nb})
    stage = _Stage(data, ckpt, plan, run, rec)
    stage.total_epochs = plan.nb_epoch + (plan.top_layer_epochs + plan.all_layer_epochs
                                          if use_pretrained else 0)
    if not use_pretrained:
        _set_trainable(model, lambda i, layer: True)
        stage.run(model, "stage 1 (all layers, no pretrained weights)", plan.nb_epoch,
                  lr=plan.init_lr, number=1)
        rec.finish(model, ckpt)
        return stage.histories
    logger.info("3-stage training of %s", plan.net or model.name)
    dense = _final_dense(model)
    _set_trainable(model, lambda i, layer: layer is dense)
    stage.run(model, "stage 1 (final dense layer)", plan.nb_epoch, lr=plan.init_lr, number=1)
    if plan.top_layer_epochs > 0 or plan.all_layer_epochs > 0:
        dropout = _dropout_before(model, dense)
        names = {dense.name} | ({dropout.name} if dropout is not None else set())
        model = set_regularization(model, plan.weight_decay2, plan.hidden_dropout2, names,
                                   run.custom_objects)
    if plan.top_layer_epochs > 0:
        _set_trainable(model, lambda i, layer: i >= top_layer_nb)
        stage.run(model, f"stage 2 (layers {top_layer_nb}+)", plan.top_layer_epochs,
                  lr=plan.init_lr * plan.top_layer_multiplier, number=2)
    _set_trainable(model, lambda i, layer: True)
    stage.run(model, "stage 3 (all layers)", plan.all_layer_epochs,
              lr=plan.init_lr * plan.all_layer_multiplier, number=3)
    rec.finish(model, ckpt)
    return stage.histories


def train_2stage(model: keras.Model, data: StageData, plan: object,
                 run: StageRun) -> list:
    """Two-stage whole-image training (the typed form of :func:`do_2stage_training`).

    Args: as :func:`train_3stage`; the best model by mean one-vs-rest validation AUROC is
        saved by ``run.checkpointer`` (a :class:`DMAucModelCheckpoint` on
        ``data.validation`` when None).

    Returns:
        list of ``keras.callbacks.History``, one per stage run (``.model``: the trained model).
    """
    plan = StagePlan.of(plan)
    _check_frozen_bn_mode(plan.frozen_bn_mode)
    top_layer_nb = plan.top_layer_nb
    if plan.nb_epoch > 0 and top_layer_nb is None:
        top_layer_nb = _default_top_layer_nb(model)
    if run.resume_state is not None:
        top_layer_nb, = _resume_plan(run.resume_state, {"top_layer_nb": top_layer_nb})
    checkpointer = run.checkpointer
    if checkpointer is None:
        checkpointer = DMAucModelCheckpoint(run.best_model, data.validation,
                                            extras=run.extras)
    rec = run.recorder([n for n, e in ((1, plan.nb_epoch), (2, plan.all_layer_epochs))
                        if e > 0], {"top_layer_nb": top_layer_nb})
    stage = _Stage(data, checkpointer, plan, run, rec)
    stage.total_epochs = plan.nb_epoch + plan.all_layer_epochs
    if plan.nb_epoch > 0:
        model = set_regularization(model, plan.weight_decay, plan.hidden_dropout,
                                   custom_objects=run.custom_objects)
        _set_trainable(model, lambda i, layer: i >= top_layer_nb)
        stage.run(model, f"stage 1 (layers {top_layer_nb}+)", plan.nb_epoch, lr=plan.init_lr,
                  number=1)
    if plan.all_layer_epochs > 0:
        model = set_regularization(model, plan.weight_decay2, plan.hidden_dropout2,
                                   custom_objects=run.custom_objects)
        _set_trainable(model, lambda i, layer: True)
        stage.run(model, "stage 2 (all layers)", plan.all_layer_epochs,
                  lr=plan.init_lr * plan.all_layer_multiplier, number=2)
    rec.finish(model, checkpointer)
    return stage.histories


def _resume_plan(state, plan_info):
    """The stage settings of a resumed run (its checkpoint's), logging any change."""
    saved = state.get("plan", {})
    values = []
    for key, value in plan_info.items():
        old = saved.get(key, value)
        if old != value:
            logger.warning("resumed run: %s is %r in its checkpoint (%r now); using %r", key,
                           old, value, old)
        values.append(old)
    return values


# ---------------------------------------------------------------- 2017 staged-training calls
_RUN_KEYS = ("checkpoint_path", "log_csv", "curves_png", "seed", "resume_state", "run_info",
             "strategy", "custom_objects", "verbose")


def _split_2017_call(local_vars, data_keys=("nb_class", "nb_worker")):
    """(StageData, StagePlan, StageRun) of a 2017 keyword call's arguments."""
    v = dict(local_vars)
    data = StageData(v["train_generator"], v["validation_set"], v["validation_steps"],
                     v["steps_per_epoch"], **{k: v[k] for k in data_keys})
    names = {f.name for f in _dataclasses.fields(StagePlan)}
    v["jit"] = v["jit_compile"]
    plan = StagePlan(**{k: v[k] for k in names if k in v})
    run = StageRun(v["best_model_out"], callbacks=list(v["callbacks"] or []),
                   checkpointer=v.get("auc_checkpointer"), **{k: v[k] for k in _RUN_KEYS})
    return data, plan, run


def do_3stage_training(model, org_model, train_generator, validation_set, validation_steps,
                       best_model_out, steps_per_epoch, top_layer_nb=None, net=None, nb_epoch=10,
                       top_layer_epochs=0, all_layer_epochs=0, use_pretrained=True, optim="sgd",
                       init_lr=.01, top_layer_multiplier=.01, all_layer_multiplier=.0001,
                       es_patience=5, lr_patience=2, auto_batch_balance=True, nb_class=3,
                       pos_cls_weight=1., neg_cls_weight=1., nb_worker=1, weight_decay2=.01,
                       hidden_dropout2=.0, bias_multiplier=None, strategy=None,
                       jit_compile=False, verbose=2, custom_objects=None, callbacks=None,
                       frozen_bn_mode="batch", seed=None, checkpoint_path=None, log_csv=None,
                       curves_png=None, resume_state=None, run_info=None):
    """Three-stage patch classifier training (the 2017 keyword call of :func:`train_3stage`).

    Stage 1: only the final Dense layer trains (all layers when ``use_pretrained`` is False, and
    then only this stage runs) for ``nb_epoch`` at ``init_lr``. Stage 2: layers from
    ``top_layer_nb`` on train for ``top_layer_epochs`` at ``init_lr * top_layer_multiplier``,
    with the final Dense kernel L2 set to ``weight_decay2`` and the Dropout before it to
    ``hidden_dropout2``. Stage 3: all layers for ``all_layer_epochs`` at
    ``init_lr * all_layer_multiplier``. Frozen layers include BatchNormalization layers: with
    ``frozen_bn_mode="batch"`` (the default, as Keras 2.0.8 trained) they normalise with batch
    statistics in training and update their moving statistics, only gamma and beta staying
    fixed; with ``"moving"`` (tf-keras) they run in inference mode with fixed moving
    statistics (see :func:`set_frozen_bn_mode`). Each stage compiles a fresh optimizer with
    Keras 2.0.8's update rule (:func:`create_optimizer`). Epochs are numbered continuously;
    each stage stops early after ``es_patience`` epochs without val-loss improvement; with sgd
    the lr halves after ``lr_patience`` such epochs; the best model by ``val_accuracy`` is
    saved atomically to ``best_model_out``.

    Args:
        model: compiled-or-not patch classifier (softmax output, ``nb_class`` units).
        org_model: ignored (kept for 2017 callers; with tf.distribute the trained model is the
            saved model).
        train_generator: iterator/Sequence/tf.data yielding ``(x, y)`` or ``(x, y, w)``, y
            one-hot.
        validation_set: ``(X, y)`` arrays or an iterator like ``train_generator``.
        validation_steps: batches per validation pass for an iterator.
        best_model_out: best model file.
        steps_per_epoch: train batches per epoch.
        top_layer_nb: first layer index trained in stage 2 (required when stage 2 runs).
        net: backbone name (logged only).
        bias_multiplier: bias learning-rate multiplier (None: same as the other weights).
        strategy: a ``tf.distribute`` strategy the model was built in (default: the model's).
        jit_compile: XLA-compile the train step.
        verbose: Keras fit verbosity.
        custom_objects: classes needed to rebuild the model from its config.
        callbacks: extra Keras callbacks for every stage.
        frozen_bn_mode: ``"batch"`` or ``"moving"``, how frozen BatchNormalization layers
            train (see :func:`set_frozen_bn_mode`).
        seed, checkpoint_path, log_csv, curves_png: the per-epoch reseeding (a resumed run
            ends as an uninterrupted one would), the checkpoint, the CSV log and the curves of
            the run: see :class:`StageRun`.
        resume_state: a state of :func:`read_training_state` (see :func:`resolve_resume`):
            stages finished before it are skipped, the interrupted one continues from its
            weights, optimizer state, lr and counters; its ``plan`` settings override
            ``use_pretrained`` and ``top_layer_nb``.
        run_info: the run's identity (options hash, options), stored in the checkpoint.
        (other arguments: see the command-line flags of ``patch_clf_train.py``.)

    Returns:
        list of ``keras.callbacks.History``, one per stage run (``.stage`` names it;
        ``.model`` is the model trained in that stage).
    """
    return train_3stage(model, *_split_2017_call(locals()))


def do_2stage_training(model, org_model, train_generator, validation_set, validation_steps,
                       best_model_out, steps_per_epoch, top_layer_nb=None, nb_epoch=10,
                       all_layer_epochs=0, optim="sgd", init_lr=.01, all_layer_multiplier=.1,
                       es_patience=5, lr_patience=2, auto_batch_balance=True, nb_class=2,
                       pos_cls_weight=1., neg_cls_weight=1., nb_worker=1, auc_checkpointer=None,
                       weight_decay=.0001, hidden_dropout=.0, weight_decay2=.0001,
                       hidden_dropout2=.0, bias_multiplier=None, strategy=None,
                       jit_compile=False, verbose=2, custom_objects=None, callbacks=None,
                       frozen_bn_mode="batch", seed=None, checkpoint_path=None, log_csv=None,
                       curves_png=None, resume_state=None, run_info=None):
    """Two-stage whole-image training (the 2017 keyword call of :func:`train_2stage`).

    Stage 1 (``nb_epoch`` epochs, 0 skips it): layers before ``top_layer_nb`` (the converted
    patch network) are frozen, lr ``init_lr``, every Dense/Conv2D kernel L2 = ``weight_decay``
    and every Dropout rate = ``hidden_dropout``. The frozen BatchNormalization layers (those of
    the nested patch network included) train as ``frozen_bn_mode`` says: ``"batch"`` (default,
    Keras 2.0.8) normalises with batch statistics and updates their moving statistics, gamma
    and beta fixed; ``"moving"`` (tf-keras) uses the fixed moving statistics (see
    :func:`set_frozen_bn_mode`). Stage 2 (``all_layer_epochs``): all layers at
    ``init_lr * all_layer_multiplier`` with ``weight_decay2`` / ``hidden_dropout2``. Epochs are
    numbered continuously; early stopping on val loss; with sgd the lr halves on a val-loss
    plateau; the best model by mean one-vs-rest validation AUROC is saved by
    ``auc_checkpointer`` (a :class:`DMAucModelCheckpoint` on ``validation_set`` when None).

    Args: as :func:`do_3stage_training` (``resume_state``'s plan overrides ``top_layer_nb``);
        ``top_layer_nb`` defaults to the layer after the last nested model (the converted
        patch network).

    Returns:
        list of ``keras.callbacks.History``, one per stage run (``.model``: the trained model).
    """
    return train_2stage(model, *_split_2017_call(locals()))
