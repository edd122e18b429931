"""Check a GPU machine before a long run: training speed per precision mode, input pipeline,
prediction speed, peak GPU memory, and mixed-precision numerics, in one table (``make
gpu-check``).

Two whole-image models are measured, built the way ``image_clf_train.py`` builds them (a patch
network converted by ``dm_resnet.add_top_layers``, random weights, nothing downloaded):

* ``resnet50``: the 2017 setting of ``train_image_clf_im1152.sh``: a ResNet50 patch net with
  the ``[512-512-1024]x2`` residual top (top depths 512 512, repetitions 2 2, bottleneck
  enlarge factor 2) at 1152x896, train batch 10 (``--batch-size 20 --train-bs-multiplier
  0.5``);
* ``demo``: the model of ``run_demo.sh``: a single-channel ``dm_resnet14`` patch net (16 initial
  filters) with one residual top block of depth 64 (enlarge factor 2) at 288x224, train batch
  16.

For each, the all-layer training step runs in float32, ``--mixed-precision float16``,
``--mixed-precision bfloat16`` and float32 with ``--jit`` (XLA), through the trainers' own
code: ``dm_multi_gpu.set_precision_policy`` / ``apply_precision_policy`` / ``make_parallel``
(a ``tf.distribute.MirroredStrategy`` over ``NUM_GPU_DEVICES`` GPUs, default all visible
ones), ``dm_keras_ext.set_regularization`` and the trainers' compile (``create_optimizer``
with the bias multiplier, categorical cross-entropy, ``jit_compile``), and ``Model.fit`` on
an in-memory batch. Steps per second exclude warm-up steps (graph tracing, autotuning); the
clock stops only after the last step's loss and optimizer step counter are fetched from the
device. Then:

* the data loader's augmented images per second: ``training_setup.build_data_iterators`` (the
  trainers' ``DMImageDataGenerator.flow_from_directory`` with the 2017 augmentation) over
  synthetic 16-bit PNGs in a temporary folder, read by ``NUM_CPU_CORES`` threads through the
  same ``OrderedEnqueuer`` that ``fit(workers=...)`` uses, against the images per second the
  fastest training mode consumes (the slower of the two limits training);
* prediction images per second (``image_clf_predict.predict_batch``) without and with the
  4-flip augmentation;
* peak GPU memory per mode (``tf.config.experimental.get_memory_info``).

Checks (the command exits with status 1 when one fails): every training loss is finite; the
class probabilities of each mixed-precision model are within ``MIXED_TOLERANCE`` (absolute) of
the float32 model's for the same weights and batch (inference mode; the random weights are
first made to behave like trained ones, see ``trained_like``); the prediction and loader
outputs are finite and of the right shape. ``--strict`` also fails when
mixed precision trains the ResNet50 model less than ``SPEEDUP_TARGET`` times faster than
float32 (otherwise that is a warning).

Without a visible GPU the same command runs at tiny sizes on the CPU in about a minute
(``--tiny`` is then the default): every path, except that ResNet50 is built and scored but not
trained (tracing its train step alone takes a minute on a small CPU). The normal test suite runs
it that way; its speed figures mean nothing there. Usage (from the repository root)::

    make gpu-check                                    # or:
    python ddsm_train/gpu_check.py [--tiny] [--models resnet50 demo] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import script_utils  # first: puts the root dm_* modules and this folder on sys.path

script_utils.import_tensorflow_quietly()   # TensorFlow's start-up lines hidden
import common_flags as cf  # noqa: E402

import numpy as np  # noqa: E402

if TYPE_CHECKING:  # annotations only; TensorFlow is imported where a model is used
    import tf_keras as keras

logger = logging.getLogger("gpu_check")

#: Largest absolute difference of a class probability between a mixed-precision model and the
#: float32 model with the same weights (inference mode, see :func:`trained_like`). float16
#: keeps 11 significant bits, bfloat16 only 8, so its bound is wider. Measured on ResNet50
#: [512-512-1024]x2 (384x288, CPU): 0.0014 (float16) and 0.015 (bfloat16).
MIXED_TOLERANCE = {"float16": 0.02, "bfloat16": 0.06}
#: Factor on the residual branches of the random networks (see :func:`trained_like`).
RESIDUAL_DAMPING = 0.2
#: Mixed precision should train the ResNet50 model at least this many times faster.
SPEEDUP_TARGET = 1.5
MODES = ("float32", "float16", "bfloat16", "jit")
RESCALE_16BIT = 0.003891


@dataclass(frozen=True)
class ModelSpec:
    """One whole-image model: patch net, its options, the top layers, size and train batch."""
    key: str
    title: str
    patch_net: str
    patch_kwargs: dict
    channels: int
    top_depths: tuple
    top_repetitions: tuple
    enlarge: int
    img_size: tuple
    batch: int
    featurewise_mean: float


def model_specs(tiny: bool) -> Dict[str, ModelSpec]:
    """The two models, at full size or (``tiny``) at CPU-test size."""
    demo_depth = 16 if tiny else 64
    return {
        "resnet50": ModelSpec(
            "resnet50", "ResNet50 [512-512-1024]x2", "resnet50", {}, 3, (512, 512), (2, 2), 2,
            (64, 64) if tiny else (1152, 896), 2 if tiny else 10, 52.16),
        "demo": ModelSpec(
            "demo", f"demo dm_resnet14 [{demo_depth}-{demo_depth}-{2 * demo_depth}]x1",
            "dm_resnet14",
            dict(nb_init_filter=4 if tiny else 16, init_filter_size=5, init_conv_stride=2),
            1, (demo_depth,), (1,), 2, (64, 64) if tiny else (288, 224), 4 if tiny else 16,
            45.0),
    }


#: Models whose training modes are skipped at tiny sizes: tracing ResNet50's train step alone
#: takes about a minute on a small CPU (building and prediction still run).
NO_TINY_TRAINING = ("resnet50",)


@dataclass
class Row:
    """One line of the result table."""
    model: str
    what: str
    batch: int = 0
    rate: Optional[float] = None      # steps/s (training) or images/s
    unit: str = ""
    images_per_s: Optional[float] = None
    ratio: Optional[float] = None
    peak_mib: Optional[float] = None
    note: str = ""
    ok: bool = True


@dataclass
class Report:
    """Rows, failed checks and warnings of one run; ``table`` is set at the end."""
    device: str
    table: str = ""
    rows: List[Row] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        logger.error("check failed: %s", message)


# --------------------------------------------------------------------------- devices
def _gpus():
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def _device_name(gpus) -> str:
    import tensorflow as tf

    if not gpus:
        return f"CPU only ({os.cpu_count()} cores), TensorFlow {tf.__version__}"
    names = []
    for gpu in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name",
                                                                               gpu.name))
        except (RuntimeError, ValueError):
            names.append(gpu.name)
    return f"{len(gpus)} x {names[0]}, TensorFlow {tf.__version__}"


def _reset_peak(gpus) -> None:
    if gpus:
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")


def _peak_mib(gpus) -> Optional[float]:
    if not gpus:
        return None
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20


# --------------------------------------------------------------------------- models
def build_base_model(spec: ModelSpec, train: bool = True) -> keras.Model:
    """The float32 whole-image model of ``spec`` (random weights); for training with the
    stage-2 weight decay of the 2017 scripts (``--weight-decay2 0.01``), set the way the
    trainer sets it."""
    import dm_keras_ext
    import dm_resnet

    shape = (None, None, spec.channels)
    patch, _, _ = dm_keras_ext.get_dl_model(spec.patch_net, nb_class=3, use_pretrained=False,
                                            input_shape=shape, **spec.patch_kwargs)
    model, _ = dm_resnet.add_top_layers(
        patch, spec.img_size, spec.patch_net, "resnet", list(spec.top_depths),
        list(spec.top_repetitions), nb_class=2, bottleneck_enlarge_factor=spec.enlarge,
        weight_decay=0.001)
    return dm_keras_ext.set_regularization(model, weight_decay=0.01, dropout=0.0) if train \
        else model


def _batch(spec: ModelSpec, n: int, seed: int = 0):
    """A centred-intensity image batch, one-hot labels of both classes, balanced weights."""
    rng = np.random.default_rng(seed)
    h, w = spec.img_size
    x = rng.normal(0.0, 30.0, (n, h, w, spec.channels)).astype(np.float32)
    y = np.zeros((n, 2), np.float32)
    y[np.arange(n), np.arange(n) % 2] = 1.0
    return x, y, np.ones(n, np.float32)


def _step_clock(warmup: int, timed: int):
    """A Keras callback timing the steps after ``warmup``; it takes the logs as tensors, so
    steps are not synchronised with the host except where the clock reads them."""
    import tf_keras as keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True
            self.t0 = self.t1 = None
            self.losses: List[float] = []

        def _sync(self, logs) -> None:
            self.losses.append(float(logs["loss"]))
            int(self.model.optimizer.iterations.numpy())  # the weight update has run too

        def on_train_batch_end(self, batch, logs=None):
            if batch == warmup - 1:
                self._sync(logs)
                self.t0 = time.perf_counter()
            elif batch == warmup + timed - 1:
                self._sync(logs)
                self.t1 = time.perf_counter()

    return StepClock()


def _mode_model(base, mode: str, weights):
    """The trainers' model for ``mode`` (``base`` with ``weights``, in the mode's precision
    policy) and that policy's ``--mixed-precision`` value."""
    import dm_multi_gpu

    precision = mode if mode in MIXED_TOLERANCE else None
    base.set_weights(weights)
    dm_multi_gpu.set_precision_policy(precision)
    model = dm_multi_gpu.apply_precision_policy(base, precision)
    return model, precision


def _train_rate(model, spec: ModelSpec, mode: str, batch: int, warmup: int, timed: int,
                gpu_count: int, strategy_devices):
    """(steps/s, losses) of the all-layer training step of ``model`` in ``mode``."""
    import tensorflow as tf

    import dm_keras_ext
    import dm_multi_gpu
    import training_runs

    strategy = dm_multi_gpu.get_strategy(gpu_count, strategy_devices)
    model, _ = dm_multi_gpu.make_parallel(model, gpu_count, strategy_devices)
    training_runs._set_trainable(model, lambda i, layer: True)
    # the trainers' compile: stage-2 lr of train_image_clf_im1152.sh, bias lr x 0.1
    dm_keras_ext._compile(model, optim="adam", lr=1e-4 * 0.01, bias_multiplier=0.1,
                          jit_compile=mode == "jit", strategy=strategy, metrics=("accuracy",))
    x, y, w = _batch(spec, batch, seed=1)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(
        batch, drop_remainder=True).repeat().prefetch(2)
    clock = _step_clock(warmup, timed)
    model.fit(data, epochs=1, steps_per_epoch=warmup + timed, callbacks=[clock], verbose=0)
    rate = timed / (clock.t1 - clock.t0)
    return rate, clock.losses


def trained_like(model: keras.Model, x: np.ndarray, damping: float = RESIDUAL_DAMPING) -> None:
    """Give a randomly initialised model the numerical behaviour of a trained one, in place.

    A deep residual network with random weights and batch normalisation is chaotic: any
    rounding error grows from block to block (in a random ResNet50, bfloat16 rounding alone
    moves the class probabilities by ~0.3), so comparing mixed precision with float32 would
    measure the chaos, not the arithmetic. Trained networks are not chaotic. Here each residual
    branch is damped (the ``gamma``/``beta`` of the BatchNormalization that feeds an ``Add`` as
    its last input, the residual branch in both ``keras.applications`` and ``dm_resnet``, are
    multiplied by ``damping``), then every BatchNormalization's moving statistics are set to the
    batch statistics of ``x``, so activations in inference mode are normalised as in a trained
    network instead of growing from the initial mean 0 / variance 1.
    """
    import tf_keras as keras

    damped = set()
    for layer in model.submodules:
        if not isinstance(layer, keras.layers.Add):
            continue
        for node in layer._inbound_nodes:
            last = node.inbound_layers
            last = last[-1] if isinstance(last, (list, tuple)) else last
            if isinstance(last, keras.layers.BatchNormalization) and id(last) not in damped:
                damped.add(id(last))
                last.gamma.assign(last.gamma * damping)
                last.beta.assign(last.beta * damping)
    bns = [m for m in model.submodules if isinstance(m, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0  # the moving statistics become those of this batch
        model(x, training=True)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    logger.info("%d residual branches damped, %d BatchNormalization layers calibrated",
                len(damped), len(bns))


def _probabilities(model, x, exact: bool = False) -> np.ndarray:
    """Class probabilities in inference mode, float64; ``exact``: without TensorFloat-32 (which
    float32 convolutions use by default on recent NVIDIA GPUs), for the float32 reference."""
    import tensorflow as tf

    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        if exact:
            tf.config.experimental.enable_tensor_float_32_execution(False)
        return np.asarray(model(x, training=False), np.float64)
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(tf32)


def check_training(spec: ModelSpec, base: keras.Model, report: Report, gpus: list,
                   gpu_count: int, modes: Sequence[str], warmup: int, timed: int,
                   strategy_devices: Optional[Sequence[str]]) -> Dict[str, float]:
    """Train ``spec`` in each mode; add rows and check results; return images/s per mode."""
    import tf_keras as keras

    import dm_multi_gpu

    batch = int(math.ceil(spec.batch / gpu_count) * gpu_count)  # a multiple of the replicas
    x_check = _batch(spec, min(spec.batch, 4), seed=2)[0]
    trained_like(base, x_check)
    weights = base.get_weights()
    reference = _probabilities(base, x_check, exact=True)
    rates: Dict[str, float] = {}
    for mode in modes:
        _reset_peak(gpus)
        note, t_mode = "", time.perf_counter()
        try:
            model, precision = _mode_model(base, mode, weights)
            if precision is not None:
                diff = float(np.max(np.abs(_probabilities(model, x_check) - reference)))
                tol = MIXED_TOLERANCE[precision]
                note = f"max|p - p32| {diff:.4f} (<= {tol})"
                if not diff <= tol:
                    report.fail(f"{spec.key} {mode}: probabilities differ from float32 by "
                                f"{diff:.4f} > {tol}")
            # without GPUs only float32 runs under the one-CPU MirroredStrategy (each mode's
            # distributed train step costs seconds of tracing on a CPU)
            devices = strategy_devices if mode == "float32" else None
            rate, losses = _train_rate(model, spec, mode, batch, warmup, timed, gpu_count,
                                       devices)
        except Exception as err:  # noqa: BLE001 - reported as a failed check, others go on
            logger.exception("%s %s failed", spec.key, mode)
            report.fail(f"{spec.key} {mode}: {type(err).__name__}: {err}")
            report.rows.append(Row(spec.title, f"train {mode}", batch, note="failed",
                                   ok=False))
            continue
        finally:
            dm_multi_gpu.set_precision_policy(None)
            model = None
            gc.collect()
        logger.info("%s %s: %.1f s in all", spec.key, mode, time.perf_counter() - t_mode)
        finite = all(math.isfinite(v) for v in losses)
        if not finite:
            report.fail(f"{spec.key} {mode}: training loss not finite: {losses}")
        note = f"loss {losses[-1]:.3f}" + ("" if finite else " NOT FINITE") + \
            (f"; {note}" if note else "")
        rates[mode] = rate * batch
        report.rows.append(Row(spec.title, f"train {mode}", batch, rate, "steps/s",
                               rate * batch, peak_mib=_peak_mib(gpus), note=note, ok=finite))
    base.set_weights(weights)
    keras.backend.clear_session()
    for row in report.rows:
        if row.model == spec.title and row.what.startswith("train ") and \
                rates.get("float32") and row.images_per_s:
            row.ratio = row.images_per_s / rates["float32"]
    return rates


# --------------------------------------------------------------------------- input pipeline
def write_synthetic_pngs(root: Path, spec: ModelSpec, nb: int, seed: int = 0) -> Path:
    """``nb`` 16-bit PNG mammogram-like images of ``spec.img_size`` in ``root/{neg,pos}``."""
    import dm_image

    rng = np.random.default_rng(seed)
    h, w = spec.img_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    breast = np.clip(1.2 - np.hypot(yy / h - 0.5, xx / w) * 1.1, 0, 1)
    for k in range(nb):
        cls = ("neg", "pos")[k % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        img = breast * 40000 + rng.normal(0, 1500, (h, w)).astype(np.float32) * (breast > 0)
        dm_image.write_png(root / cls / f"img_{k:04d}.png",
                           np.clip(img, 0, 65535).astype(np.uint16))
    return root


def loader_rate(spec: ModelSpec, folder: Path, workers: int, warmup: int, timed: int
                ) -> Tuple[float, bool]:
    """Augmented images/s of the trainers' train iterator read by ``workers`` threads."""
    import tf_keras as keras

    import training_setup

    options = dict(train_dir=folder, val_dir=folder, test_dir=folder, img_size=spec.img_size,
                   img_scale=None, rescale_factor=RESCALE_16BIT, featurewise_center=True,
                   featurewise_mean=spec.featurewise_mean, equalize_hist=False,
                   augmentation=True, class_list=["neg", "pos"], auto_batch_balance=True,
                   batch_size=spec.batch, load_train_ram=False, load_val_ram=False)
    train, _, _ = training_setup.build_data_iterators(
        options, train_batch_size=spec.batch, dup_3_channels=spec.channels == 3,
        preprocess=None, seed=12345)
    enqueuer = keras.utils.OrderedEnqueuer(train, use_multiprocessing=False, shuffle=True)
    enqueuer.start(workers=workers, max_queue_size=10)
    try:
        batches = enqueuer.get()
        for _ in range(warmup):
            next(batches)
        t0 = time.perf_counter()
        shapes_ok = True
        for _ in range(timed):
            x, y, w = next(batches)
            shapes_ok &= (x.shape == (spec.batch, *spec.img_size, spec.channels)
                          and bool(np.isfinite(x).all()) and y.shape == (spec.batch, 2))
        dt = time.perf_counter() - t0
    finally:
        enqueuer.stop()
    return timed * spec.batch / dt, shapes_ok


def check_loader(spec: ModelSpec, report: Report, workers: int, train_rates: Dict[str, float],
                 tmp: Path, warmup: int, timed: int, nb_images: int) -> None:
    folder = write_synthetic_pngs(tmp / f"{spec.key}_images", spec, nb_images)
    rate, ok = loader_rate(spec, folder, workers, warmup, timed)
    if not ok:
        report.fail(f"{spec.key} loader: batches of wrong shape or with non-finite values")
    note = ""
    if train_rates:
        fastest = max(train_rates, key=train_rates.get)
        need = train_rates[fastest]
        slower = "loader" if rate < need else "training step"
        note = (f"vs {need:.1f} img/s consumed by train {fastest}: {slower} is slower"
                + (" (GPU waits on input)" if rate < need else ""))
        if rate < need:
            report.warnings.append(
                f"{spec.title}: the loader ({rate:.1f} img/s with NUM_CPU_CORES={workers}) is "
                f"slower than training {fastest} ({need:.1f} img/s): raise NUM_CPU_CORES, or use "
                "--load-train-ram / --img-cache-dir")
    report.rows.append(Row(spec.title, f"loader, {workers} workers", spec.batch, rate,
                           "img/s", rate, note=note, ok=ok))


# --------------------------------------------------------------------------- prediction
def check_prediction(spec: ModelSpec, base: keras.Model, report: Report, gpus: list, warmup: int,
                     timed: int) -> None:
    from image_clf_predict import predict_batch

    x = _batch(spec, spec.batch, seed=3)[0][..., :1]
    models = [(spec.key, base)]
    for flips in (False, True):
        _reset_peak(gpus)
        for _ in range(warmup):
            predict_batch(models, [spec.channels], x, flips)
        t0 = time.perf_counter()
        for _ in range(timed):
            p = predict_batch(models, [spec.channels], x, flips)  # returns host arrays
        dt = time.perf_counter() - t0
        ok = p.shape == (len(x), 2) and bool(np.isfinite(p).all()) and \
            bool(np.allclose(p.sum(axis=1), 1.0, atol=1e-4))
        if not ok:
            report.fail(f"{spec.key} prediction (flips {flips}): bad probabilities")
        rate = timed * len(x) / dt
        report.rows.append(Row(spec.title, "predict" + (" 4 flips" if flips else ""),
                               len(x), rate, "img/s", rate, peak_mib=_peak_mib(gpus), ok=ok))


# --------------------------------------------------------------------------- report
#: Under the heading of the table of a machine without a GPU.
NO_GPU_NOTE = ("no GPU on this machine: the speed columns (rate, img/s, x float32) and peak "
               "GPU MiB mean nothing here; only the ok column (numerics, pipeline) does")


def format_table(report: Report, gpu_count: int, workers: int, strategy: str = "",
                 has_gpu: bool = True) -> str:
    """The result table, then warnings, failures and the verdict, as printed by ``main``;
    without a GPU (``has_gpu`` False) a note says that its speed columns mean nothing."""
    head = (f"gpu-check on {report.device}; NUM_GPU_DEVICES={gpu_count}"
            f"{f' ({strategy})' if strategy else ''}, NUM_CPU_CORES={workers}")
    if not has_gpu:
        head += f"\nNOTE: {NO_GPU_NOTE}"
    cols = ("model", "what", "batch", "rate", "img/s", "x float32", "peak GPU MiB", "ok",
            "notes")
    lines = []
    for r in report.rows:
        lines.append((r.model, r.what, str(r.batch),
                      "-" if r.rate is None else f"{r.rate:.3g} {r.unit}",
                      "-" if r.images_per_s is None else f"{r.images_per_s:.3g}",
                      "-" if r.ratio is None else f"{r.ratio:.2f}x",
                      "-" if r.peak_mib is None else f"{r.peak_mib:,.0f}",
                      "ok" if r.ok else "FAIL", r.note))
    widths = [max(len(c), *(len(ln[i]) for ln in lines)) if lines else len(c)
              for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(wd) for v, wd in zip(vals, widths)).rstrip()  # noqa
    out = [head, fmt(cols), fmt(["-" * wd for wd in widths])] + [fmt(ln) for ln in lines]
    for msg in report.warnings:
        out.append(f"WARNING: {msg}")
    for msg in report.failures:
        out.append(f"FAILED: {msg}")
    out.append(f"{len(report.failures)} check(s) failed" if report.failures
               else "all checks passed")
    return "\n".join(out)


def _speed_targets(report: Report, spec: ModelSpec, rates: Dict[str, float], strict: bool,
                   tiny: bool) -> None:
    if tiny or "float32" not in rates:
        return
    for mode in ("float16", "bfloat16"):
        if mode in rates and rates[mode] < SPEEDUP_TARGET * rates["float32"]:
            msg = (f"{spec.title} {mode}: {rates[mode] / rates['float32']:.2f}x float32, "
                   f"below the {SPEEDUP_TARGET}x target")
            (report.fail if strict else report.warnings.append)(msg)


# --------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="tiny", action="store_true", default=None,
                      help="tiny sizes on any device (default when no GPU is visible)")
    size.add_argument("--full", dest="tiny", action="store_false",
                      help="full sizes even without a GPU (slow on a CPU; default: full "
                           "sizes only when a GPU is visible)")
    parser.add_argument("--models", nargs="+", choices=("resnet50", "demo"),
                        default=["resnet50", "demo"],
                        help="networks whose training steps are timed: ResNet50 and the "
                             "demo's small ResNet (default: %(default)s)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="precision and compilation modes timed for each network "
                             "(default: %(default)s)")
    parser.add_argument("--warmup-steps", type=cf.nonneg_int, default=None,
                        help="untimed steps per mode (default: 5 on a GPU, 1 tiny)")
    parser.add_argument("--steps", type=cf.positive_int, default=None,
                        help="timed steps per mode (default: 20 on a GPU, 2 tiny)")
    parser.add_argument("--strict", action="store_true",
                        help=f"fail when mixed precision is below {SPEEDUP_TARGET}x float32 "
                             f"(default: report it only)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="also write the results as JSON (default: table only)")
    return parser


def run(tiny: Optional[bool] = None, models: Sequence[str] = ("resnet50", "demo"),
        modes: Sequence[str] = MODES,
        warmup_steps: Optional[int] = None, steps: Optional[int] = None, strict: bool = False,
        json_out: Optional[str] = None) -> Report:
    """Run the checks and return the report (see the module docstring)."""
    import tensorflow as tf

    gpus = _gpus()
    if tiny is None:
        tiny = not gpus
    if tiny and not gpus:  # XLA's CPU compiler at its lowest optimisation compiles ~3x faster
        os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    for gpu in gpus:  # peak memory then counts what the models need, not a preallocation
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    gpu_count = script_utils.env_int("NUM_GPU_DEVICES", max(len(gpus), 1), minimum=1)
    # without GPUs a one-device MirroredStrategy on the CPU still runs the distributed path
    strategy_devices = None if gpus else ("/cpu:0",)
    workers = script_utils.get_num_cpu_cores()
    import dm_multi_gpu

    strategy = dm_multi_gpu.get_strategy(gpu_count, strategy_devices)
    strategy_text = f"{type(strategy).__name__}, {strategy.num_replicas_in_sync} replica(s)"
    warmup = warmup_steps if warmup_steps is not None else (1 if tiny else 5)
    timed = steps if steps is not None else (2 if tiny else 20)
    report = Report(_device_name(gpus) + (" (tiny sizes)" if tiny else ""))
    specs = model_specs(tiny)
    import tf_keras as keras

    keras.utils.set_random_seed(script_utils.get_random_seed())
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for key in models:
            spec = specs[key]
            train = not (tiny and key in NO_TINY_TRAINING)
            logger.info("building %s at %dx%d", spec.title, *spec.img_size)
            base = build_base_model(spec, train=train and bool(modes))
            rates: Dict[str, float] = {}
            if train:
                rates = check_training(spec, base, report, gpus, gpu_count, modes, warmup,
                                       timed, strategy_devices)
                _speed_targets(report, spec, rates, strict, tiny)
            else:
                report.rows.append(Row(spec.title, "train (all modes)", spec.batch,
                                       note="skipped at tiny sizes"))
            check_loader(spec, report, workers, rates, Path(tmp), 1, 2 if tiny else 8,
                         2 * spec.batch if tiny else 4 * spec.batch)
            check_prediction(spec, base, report, gpus, 1, 2 if tiny else 5)
            del base
            keras.backend.clear_session()
            gc.collect()
    if json_out:
        record = {"device": report.device, "tiny": tiny, "gpu_count": gpu_count,
                  "workers": workers, "rows": [r.__dict__ for r in report.rows],
                  "failures": report.failures, "warnings": report.warnings}
        from dm_image import atomic_write

        atomic_write(json_out, lambda fh: json.dump(record, fh, indent=1), text=True)
    report.table = format_table(report, gpu_count, workers, strategy_text, bool(gpus))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_args_parser()
    args = script_utils.parse_command_line(parser, argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    with script_utils.exit_on_interrupt(parser):
        try:
            report = run(**vars(args))
        except OSError as err:   # e.g. an unwritable --json file
            script_utils.user_error_exit(parser, err)
    print(report.table)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
