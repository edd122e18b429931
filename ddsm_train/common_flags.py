"""Command-line flag groups shared by the ``ddsm_train`` scripts, and environment helpers.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

Each flag is declared once here and added to a script's parser by one ``add_*_flags`` call.
Defaults that differ between scripts (image size, featurewise mean, ...) are arguments of those
calls, so every default still lives in exactly one place: the script's call for per-script values,
this module for the rest. The ``--x/--no-x`` pairs and the short aliases (``-bs``, ``-ilr``,
``-hd``, ...) of the 2017 scripts are kept, each an alias of its long flag; destination
names are the 2017 ones (``optim`` for ``--optimizer``, ``init_lr`` for ``--init-learningrate``)
so that ``run(**vars(args))`` passes them straight through.

Environment variables (read at run time, not at import):
    NUM_CPU_CORES: data loader workers (default 4).
    NUM_GPU_DEVICES: GPUs for data-parallel training (default 1).
    RANDOM_SEED: seed for shuffling, augmentation and weight initialisation (default 12345).
"""
import argparse
import json
import logging
import os
from pathlib import Path

from script_utils import _OPTIONS_RECORDS, options_json_path

__all__ = [
    "DEFAULT_NUM_CPU_CORES", "DEFAULT_NUM_GPU_DEVICES", "DEFAULT_RANDOM_SEED", "NOSAVE",
    "MIXED_PRECISION_CHOICES", "OPTIMIZER_CHOICES", "FROZEN_BN_MODES",
    "env_int", "get_num_cpu_cores", "get_num_gpu_devices", "get_random_seed",
    "add_bool_flag", "add_optional_value_flag",
    "add_image_flags", "add_batch_flags", "add_ram_flags", "add_augmentation_flag",
    "add_class_flags", "add_optimizer_flags", "add_stage_flags", "add_regularization_flags",
    "add_model_file_flags", "add_distributed_flags", "add_run_flags", "run_identity",
    "RUN_NEUTRAL_OPTIONS", "MODEL_SOURCE_OPTIONS", "run_file_kwargs", "begin_training_run",
    "add_progress_flag",
    "check_batch_vs_devices",
    "resolve_options", "check_class_dirs", "env_summary", "AUGMENTATION_2017",
    "build_data_iterators", "iterators_from_options",
    "RECIPE_OPTIONS", "apply_model_recipe", "training_recipe",
    "save_input_recipe",
]

logger = logging.getLogger(__name__)

DEFAULT_NUM_CPU_CORES = 4
DEFAULT_NUM_GPU_DEVICES = 1
DEFAULT_RANDOM_SEED = 12345
NOSAVE = "NOSAVE"
MIXED_PRECISION_CHOICES = ("float16", "bfloat16")
OPTIMIZER_CHOICES = ("sgd", "rmsprop", "adagrad", "adadelta", "adamax", "adam", "nadam")
#: ``--frozen-bn-mode``: what a BatchNormalization layer frozen in an early stage normalises
#: with while it trains around it. ``batch``: the batch's own statistics (Keras 2.0.8, 2017);
#: ``moving``: its stored moving statistics (tf-keras inference mode).
FROZEN_BN_MODES = ("batch", "moving")


# --------------------------------------------------------------------------- environment
def env_int(name, default, minimum=None):
    """Read an integer environment variable.

    Args:
        name: variable name, e.g. ``"NUM_CPU_CORES"``.
        default: value when the variable is unset or empty.
        minimum: smallest accepted value (inclusive), or None.

    Returns:
        int: the value.

    Raises:
        ValueError: the variable is not an integer or is below ``minimum``.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} should be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"environment variable {name} should be >= {minimum}, got {value}")
    return value


def get_num_cpu_cores():
    """``NUM_CPU_CORES`` (data loader workers), default 4."""
    return env_int("NUM_CPU_CORES", DEFAULT_NUM_CPU_CORES, minimum=1)


def get_num_gpu_devices():
    """``NUM_GPU_DEVICES`` (replicas for data-parallel training), default 1."""
    return env_int("NUM_GPU_DEVICES", DEFAULT_NUM_GPU_DEVICES, minimum=1)


def get_random_seed():
    """``RANDOM_SEED``, default 12345."""
    return env_int("RANDOM_SEED", DEFAULT_RANDOM_SEED)


# --------------------------------------------------------------------------- flag primitives
def _dest(name):
    return name.replace("-", "_")


def _names(long_name, short):
    """Option strings: ``--long_name`` and the 2017 short alias, when there is one."""
    return (f"--{long_name}",) + ((short,) if short else ())


def add_bool_flag(group, name, default, help_text="", dest=None):
    """Add a ``--name`` / ``--no-name`` pair (2017 style) to a parser or argument group.

    Args:
        group: an ``argparse.ArgumentParser`` or argument group.
        name: flag name without dashes, e.g. ``"equalize-hist"``.
        default: value when neither flag is given.
        help_text: help for ``--name``.
        dest: destination attribute, default ``name`` with ``_`` for ``-``.
    """
    dest = dest or _dest(name)
    group.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction,
                       default=default,
                       help=f"{help_text} (default: {'on' if default else 'off'})")


def add_optional_value_flag(group, name, type_, default=None, help_text="", dest=None, nargs=None,
                            short=None, no_short=None, metavar=None):
    """Add ``--name VALUE`` and ``--no-name`` (sets None), as the 2017 scripts did.

    Args:
        group: parser or argument group.
        name: flag name without dashes, e.g. ``"rescale-factor"``.
        type_: value type (float, int, str).
        default: value when neither flag is given.
        help_text: help for ``--name``.
        dest: destination attribute.
        nargs: argparse nargs for the value.
        short, no_short: 2017 short aliases of ``--name`` and ``--no-name`` (e.g. ``-ic``,
            ``-nic``), or None.
        metavar: argparse metavar of the value.
    """
    dest = dest or _dest(name)
    extra = {"metavar": metavar} if metavar else {}
    group.add_argument(*_names(name, short), dest=dest, type=type_, nargs=nargs,
                       help=f"{help_text} (default: {default}; --no-{name}"
                            f"{' or ' + no_short if no_short else ''} sets None)", **extra)
    group.add_argument(*_names(f"no-{name}", no_short), dest=dest, action="store_const",
                       const=None, help=argparse.SUPPRESS)
    group.set_defaults(**{dest: default})


# --------------------------------------------------------------------------- flag groups
def add_image_flags(parser, img_size, featurewise_mean, equalize_hist, featurewise_center=True,
                    img_scale=None, rescale_factor=None, centring=True):
    """Image reading and intensity flags (``centring`` False: without the centring flags).

    Args:
        parser: the script's parser.
        img_size: default ``[height, width]`` in pixels.
        featurewise_mean: default mean pixel intensity (0..255 scale, after rescale) subtracted
            when featurewise centring is on.
        equalize_hist: default for histogram equalisation.
        featurewise_center: default for featurewise centring.
        img_scale: default target scale (image max mapped to it), None for no scaling.
        rescale_factor: default intensity factor (255/65535 = 0.003891 for 16-bit PNG), None
            for no rescaling.
    """
    g = parser.add_argument_group("image")
    g.add_argument("--img-size", "-is", dest="img_size", nargs=2, type=int,
                   default=list(img_size), metavar=("HEIGHT", "WIDTH"),
                   help=f"image size (default: {list(img_size)})")
    add_optional_value_flag(g, "img-scale", float, img_scale,
                            "map each image's max intensity to this value", short="-ic",
                            no_short="-nic")
    add_optional_value_flag(g, "rescale-factor", float, rescale_factor,
                            "multiply intensities by this factor (0.003891 for 16-bit PNG)")
    if centring:
        add_bool_flag(g, "featurewise-center", featurewise_center, "subtract --featurewise-mean")
        g.add_argument("--featurewise-mean", dest="featurewise_mean", type=float,
                       default=featurewise_mean,
                       help=f"train-set mean intensity after rescale (default: "
                            f"{featurewise_mean})")
    add_bool_flag(g, "equalize-hist", equalize_hist, "histogram equalisation")


def add_batch_flags(parser, batch_size=64, train_bs_multiplier=0.5):
    """``--batch-size`` (evaluation batch) and ``--train-bs-multiplier`` (train batch = product)."""
    g = parser.add_argument_group("batch")
    g.add_argument("--batch-size", "-bs", dest="batch_size", type=int, default=batch_size,
                   help=f"evaluation batch size (default: {batch_size})")
    g.add_argument("--train-bs-multiplier", dest="train_bs_multiplier", type=float,
                   default=train_bs_multiplier,
                   help="train batch = batch size x this (default: %(default)s)")


def add_ram_flags(parser):
    """``--load-val-ram`` / ``--load-train-ram`` (off: read images from disk each epoch)."""
    g = parser.add_argument_group("memory")
    add_bool_flag(g, "load-val-ram", False, "load the validation set into memory")
    add_bool_flag(g, "load-train-ram", False, "load the train set into memory")
    g.add_argument("--img-cache-dir", dest="img_cache_dir", default=None, metavar="DIR",
                   help="keep every image, read and resized, as a .npy file in DIR: epochs "
                        "after the first and later runs skip the decoding (default: off)")


def add_augmentation_flag(parser, default):
    """``--augmentation``: the train-time augmentation of :data:`AUGMENTATION_2017`."""
    add_bool_flag(parser, "augmentation", default, "random augmentation of train images")


def add_class_flags(parser, class_list, auto_batch_balance):
    """Class list, auto batch balance and class weights."""
    g = parser.add_argument_group("classes")
    g.add_argument("--class-list", dest="class_list", nargs="+", type=str,
                   default=list(class_list),
                   help=f"class sub-folder names, in label order (default: {list(class_list)})")
    add_bool_flag(g, "auto-batch-balance", auto_batch_balance,
                  "sample weights giving each class in a batch equal total weight")
    g.add_argument("--pos-cls-weight", dest="pos_cls_weight", type=float, default=1.0,
                   help="weight of the non-first classes without auto batch balance "
                        "(default: %(default)s)")
    g.add_argument("--neg-cls-weight", dest="neg_cls_weight", type=float, default=1.0,
                   help="weight of the first class (default: %(default)s)")


def add_optimizer_flags(parser, optim="sgd", init_lr=0.01, lr_patience=10, es_patience=25):
    """``--optimizer``, ``--init-learningrate``, ``--lr-patience``, ``--es-patience``,
    ``--frozen-bn-mode``."""
    g = parser.add_argument_group("optimiser")
    g.add_argument("--optimizer", dest="optim", type=str.lower, default=optim,
                   choices=OPTIMIZER_CHOICES, help="(default: %(default)s)")
    g.add_argument("--init-learningrate", "-ilr", dest="init_lr", type=float, default=init_lr,
                   help="stage-1 learning rate (default: %(default)s)")
    g.add_argument("--lr-patience", "-lrp", dest="lr_patience", type=int, default=lr_patience,
                   help="epochs without val-loss improvement before the lr halves (sgd) "
                        "(default: %(default)s)")
    g.add_argument("--es-patience", "-esp", dest="es_patience", type=int, default=es_patience,
                   help="epochs without val-loss improvement before stopping "
                        "(default: %(default)s)")
    g.add_argument("--frozen-bn-mode", dest="frozen_bn_mode", default="batch",
                   choices=FROZEN_BN_MODES,
                   help="BatchNormalization layers frozen in an early stage normalise with the "
                        "batch's statistics (batch: as Keras 2.0.8 did in 2017) or with their "
                        "moving statistics (moving: tf-keras behaviour) (default: %(default)s)")


def add_stage_flags(parser, nb_epoch, all_layer_epochs, all_layer_multiplier,
                    top_layer_epochs=None, top_layer_multiplier=None):
    """Epochs and learning-rate multipliers per stage, and the stage boundary ``--top-layer-nb``.

    ``top_layer_epochs`` / ``top_layer_multiplier`` are only added when given (3-stage scripts).
    """
    g = parser.add_argument_group("stages")
    g.add_argument("--nb-epoch", "-ne", dest="nb_epoch", type=int, default=nb_epoch,
                   help="stage-1 epochs; 0 skips stage 1 (default: %(default)s)")
    if top_layer_epochs is not None:
        g.add_argument("--top-layer-epochs", dest="top_layer_epochs", type=int,
                       default=top_layer_epochs, help="stage-2 epochs (default: %(default)s)")
    g.add_argument("--all-layer-epochs", dest="all_layer_epochs", type=int,
                   default=all_layer_epochs, help="all-layer stage epochs (default: %(default)s)")
    if top_layer_multiplier is not None:
        g.add_argument("--top-layer-multiplier", dest="top_layer_multiplier", type=float,
                       default=top_layer_multiplier,
                       help="stage-2 lr = init lr x this (default: %(default)s)")
    g.add_argument("--all-layer-multiplier", dest="all_layer_multiplier", type=float,
                   default=all_layer_multiplier,
                   help="all-layer stage lr = init lr x this (default: %(default)s)")
    add_optional_value_flag(g, "top-layer-nb", int, None,
                            "index of the first layer trained in the top-layer stage "
                            "(None: resolved by role for the network)")


def add_regularization_flags(parser, weight_decay=1e-4, weight_decay2=1e-4, hidden_dropout=0.0,
                             hidden_dropout2=0.0, bias_multiplier=None):
    """Weight decay and dropout for the first and later stages, and the bias lr multiplier."""
    g = parser.add_argument_group("regularisation")
    g.add_argument("--weight-decay", "-wd", dest="weight_decay", type=float,
                   default=weight_decay,
                   help="L2 of Dense/Conv2D kernels, stage 1 (default: %(default)s)")
    g.add_argument("--weight-decay2", "-wd2", dest="weight_decay2", type=float,
                   default=weight_decay2, help="L2 in later stages (default: %(default)s)")
    g.add_argument("--hidden-dropout", "-hd", dest="hidden_dropout", type=float,
                   default=hidden_dropout, help="dropout rate, stage 1 (default: %(default)s)")
    g.add_argument("--hidden-dropout2", "-hd2", dest="hidden_dropout2", type=float,
                   default=hidden_dropout2,
                   help="dropout rate in later stages (default: %(default)s)")
    add_optional_value_flag(g, "bias-multiplier", float, bias_multiplier,
                            "learning-rate multiplier for bias terms")


def add_model_file_flags(parser, best_model):
    """``--best-model`` (best checkpoint) and ``--final-model`` (``NOSAVE``: do not save)."""
    g = parser.add_argument_group("model files")
    g.add_argument("--best-model", "-bm", dest="best_model", type=str, default=best_model,
                   help="where the best model is saved (default: %(default)s)")
    g.add_argument("--final-model", "-fm", dest="final_model", type=str, default=NOSAVE,
                   help=f"where the last model is saved; {NOSAVE} skips it (default: %(default)s)")


def add_trust_flag(parser):
    """``--trust-model-file``: allow model files whose layers carry Python code (off)."""
    add_bool_flag(parser, "trust-model-file", False,
                  "load model files even if they hold Python code (Lambda layers), which then "
                  "runs: only for files you trust")


def add_distributed_flags(parser):
    """Mixed precision and XLA compilation (both off by default)."""
    g = parser.add_argument_group("devices and precision")
    g.add_argument("--mixed-precision", dest="mixed_precision", default=None,
                   choices=MIXED_PRECISION_CHOICES,
                   help="compute in float16/bfloat16 with float32 weights and softmax "
                        "(default: off)")
    g.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_const",
                   const=None, help=argparse.SUPPRESS)
    add_bool_flag(g, "jit", False, "XLA-compile the train step")


def add_run_flags(parser):
    """``--auto-resume`` (continue an interrupted run) and ``--tensorboard-dir``."""
    g = parser.add_argument_group("resuming and logs")
    add_bool_flag(g, "auto-resume", True,
                  "continue the unfinished run of <best-model>.last.h5 when its options are "
                  "these")
    g.add_argument("--tensorboard-dir", dest="tensorboard_dir", default=None, metavar="DIR",
                   help="also write TensorBoard logs to DIR (default: off)")


#: Options that do not change what a training run computes: left out of its options hash, so
#: that changing them does not stop ``--auto-resume``.
RUN_NEUTRAL_OPTIONS = ("auto_resume", "tensorboard_dir", "final_model", "img_cache_dir",
                       "trust_model_file")
#: Options naming the model a run starts from and where it is saved (``--resume-from`` of a
#: checkpoint continues a run started from another source, possibly into another folder).
MODEL_SOURCE_OPTIONS = ("resume_from", "patch_model_state", "best_model")


def run_identity(opts, env):
    """Identity of a training run, stored in its checkpoint and compared on resuming.

    Returns:
        dict: ``options`` (the options that change the result, with ``RANDOM_SEED`` and
        ``NUM_GPU_DEVICES``), ``options_hash`` (SHA-256 of them), ``training_hash`` (the same
        without ``source_options``: :data:`MODEL_SOURCE_OPTIONS`) and ``seed``.
    """
    import hashlib

    options = {k: v for k, v in opts.items() if k not in RUN_NEUTRAL_OPTIONS}
    options.update(RANDOM_SEED=env["RANDOM_SEED"], NUM_GPU_DEVICES=env["NUM_GPU_DEVICES"])
    options = json.loads(json.dumps(options, sort_keys=True, default=str))

    def digest(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    training = {k: v for k, v in options.items() if k not in MODEL_SOURCE_OPTIONS}
    return {"options": options, "options_hash": digest(options),
            "training_hash": digest(training), "source_options": list(MODEL_SOURCE_OPTIONS),
            "seed": env["RANDOM_SEED"]}


def begin_training_run(opts, validate):
    """The start both trainers share, before any model is built.

    Makes the ``tf.distribute`` strategy of ``NUM_GPU_DEVICES`` (first: multi-worker set-up
    needs it), runs ``validate(opts, replicas)``, logs the options (saved as JSON with the
    run's first model), finds an unfinished run to resume (``--auto-resume``,
    ``--resume-from`` of a checkpoint), seeds every RNG with ``RANDOM_SEED`` and sets the
    ``--mixed-precision`` policy.

    Returns:
        ``(env, strategy, options_json_path, run_identity, resume)``.
    """
    import dm_keras_ext
    import dm_multi_gpu
    import tf_keras as keras
    from script_utils import log_and_save_options

    env = env_summary()
    strategy = dm_multi_gpu.get_strategy(env["NUM_GPU_DEVICES"])
    validate(opts, strategy.num_replicas_in_sync)
    json_path = log_and_save_options(opts, opts["best_model"], env)
    identity = run_identity(opts, env)
    resume = dm_keras_ext.resolve_resume(
        dm_keras_ext.last_checkpoint_path(opts["best_model"]), identity,
        auto_resume=opts["auto_resume"], resume_from=opts["resume_from"])
    keras.utils.set_random_seed(env["RANDOM_SEED"])
    dm_multi_gpu.set_precision_policy(opts["mixed_precision"])
    return env, strategy, json_path, identity, resume


def add_progress_flag(parser, default=True):
    """``--verbose`` / ``--no-verbose``: progress display (on by default)."""
    add_bool_flag(parser, "verbose", default, "progress display (a bar on a terminal, a log "
                  "line every tenth of the work otherwise)")


def run_file_kwargs(opts, env, identity, resume):
    """Keyword arguments of ``dm_keras_ext.do_2stage_training``/``do_3stage_training`` for the
    run's files beside ``--best-model``: ``.last.h5`` (checkpoint), ``.log.csv``,
    ``.curves.png``; the seed, the run's identity, the state to resume and, with
    ``--tensorboard-dir``, a TensorBoard callback."""
    import dm_keras_ext

    best = opts["best_model"]
    callbacks = []
    if opts.get("tensorboard_dir"):
        import tf_keras as keras

        callbacks.append(keras.callbacks.TensorBoard(log_dir=opts["tensorboard_dir"]))
        logger.info("TensorBoard logs: %s", opts["tensorboard_dir"])
    logger.info("Run files: %s (last epoch), %s, %s", dm_keras_ext.last_checkpoint_path(best),
                dm_keras_ext.training_log_path(best), dm_keras_ext.training_curves_path(best))
    return dict(seed=env["RANDOM_SEED"], checkpoint_path=dm_keras_ext.last_checkpoint_path(best),
                log_csv=dm_keras_ext.training_log_path(best),
                curves_png=dm_keras_ext.training_curves_path(best), resume_state=resume,
                run_info=identity, callbacks=callbacks)


# --------------------------------------------------------------------------- run helpers
def check_batch_vs_devices(batch_size, nb_devices, what="batch size"):
    """Raise ValueError when a global batch cannot give each replica at least one sample."""
    if batch_size < nb_devices:
        raise ValueError(f"{what} {batch_size} is below the number of devices {nb_devices} "
                         f"(NUM_GPU_DEVICES / workers); each device needs at least one sample")


def resolve_options(parser, positionals, options):
    """Complete ``options`` with the parser's defaults (the only place defaults live).

    Args:
        parser: the script's ``get_args_parser()``.
        positionals: positional argument values, in order (e.g. the three folders).
        options: keyword options given to ``run``.

    Returns:
        dict: every option of the parser.

    Raises:
        ValueError: an option the parser does not know, listing the valid ones.
    """
    resolved = vars(parser.parse_args([str(p) for p in positionals]))
    unknown = sorted(set(options) - set(resolved))
    if unknown:
        raise ValueError(f"unknown options {unknown}; valid: {sorted(resolved)}")
    resolved.update(options)
    return resolved


def env_summary():
    """Environment settings of a run: ``NUM_CPU_CORES``, ``NUM_GPU_DEVICES``, ``RANDOM_SEED``."""
    return {"NUM_CPU_CORES": get_num_cpu_cores(), "NUM_GPU_DEVICES": get_num_gpu_devices(),
            "RANDOM_SEED": get_random_seed()}


def check_class_dirs(dirs, class_list, need_two_classes=()):
    """Check that each folder exists and holds one subfolder per class of ``class_list``.

    A folder written by the patch sampler (with a ``patches.csv`` manifest) is also compared
    with its manifest: image files that the manifest does not list (left by another run, or
    copied in) are reported with a warning, since they would be trained on.

    Args:
        dirs: mapping of a label (e.g. ``"TRAIN_DIR"``) to a folder.
        class_list: class subfolder names.
        need_two_classes: labels of ``dirs`` whose images must cover at least two classes
            (a validation set scored by AUROC).

    Raises:
        ValueError: a folder is missing, lacks a class subfolder (the message lists what was
            found), or is in ``need_two_classes`` with images of fewer than two classes.
            Subfolders not in ``class_list`` are ignored with a warning.
    """
    if not class_list or len(set(class_list)) != len(class_list):
        raise ValueError(f"--class-list should name distinct classes, got {class_list}")
    for label, folder in dirs.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{label} {folder} is not a folder")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        missing = [c for c in class_list if c not in found]
        if missing:
            raise ValueError(f"--class-list {list(class_list)} does not match {label} {folder}: "
                             f"no subfolder {missing} (found {found})")
        extra = [c for c in found if c not in class_list]
        if extra:
            logger.warning("%s %s: subfolders %s are not in --class-list; ignored", label,
                           folder, extra)
        if label in need_two_classes:
            counts = {c: len(_class_images(folder / c)) for c in class_list}
            if sum(1 for n in counts.values() if n) < 2:
                raise ValueError(f"{label} {folder} has images of fewer than two classes "
                                 f"({counts}): its AUROC is undefined, so no best model could "
                                 f"be chosen")
        _check_manifest(label, folder, class_list)


def _class_images(folder):
    from dm_image import list_images

    try:
        return list_images(folder)
    except ValueError:
        return []


def _check_manifest(label, folder, class_list):
    """Warn about image files in ``folder``'s class subfolders that its ``patches.csv`` lacks."""
    manifest = Path(folder) / "patches.csv"
    if not manifest.is_file():
        return
    from script_utils import read_csv_table

    try:
        table = read_csv_table(manifest, required=("folder", "filename"))
    except (OSError, ValueError) as err:
        logger.warning("%s %s: cannot read its manifest (%s)", label, folder, err)
        return
    listed = {(f, n) for f, n in zip(table["folder"], table["filename"])}
    unlisted = [f"{c}/{name}" for c in class_list for name in _class_images(Path(folder) / c)
                if (c, name) not in listed]
    if unlisted:
        logger.warning("%s %s: %d image(s) not in its patches.csv manifest (e.g. %s): "
                       "another sampling run wrote into this folder, or files were copied in; "
                       "they are trained on as well", label, folder, len(unlisted),
                       unlisted[:3])


#: Train-time augmentation of ``--augmentation``: random horizontal and vertical flips,
#: rotation up to 25 degrees, shear up to 0.2 radians, zoom 0.8-1.2 drawn per axis, channel
#: shift up to 20 intensity levels, nearest fill (the 2017 settings, Keras 2.0 units).
AUGMENTATION_2017 = dict(horizontal_flip=True, vertical_flip=True, rotation_range=25.0,
                         shear_range=0.2, zoom_range=(0.8, 1.2), channel_shift_range=20.0,
                         fill_mode="nearest")


def build_data_iterators(train_dir, val_dir, test_dir, *, img_size, img_scale, rescale_factor,
                         featurewise_center, featurewise_mean, equalize_hist, augmentation,
                         class_list, auto_batch_balance, batch_size, train_batch_size,
                         load_train_ram, load_val_ram, dup_3_channels, preprocess, seed,
                         cache_dir=None):
    """Train, validation and test iterators over class folders (``dm_image`` generators).

    Per image: read and resize to ``img_size``, ``img_scale``/``rescale_factor`` (0..255
    scale), optional histogram equalisation, channel copy when ``dup_3_channels``, augmentation
    (train only), featurewise centring with ``featurewise_mean``, then ``preprocess`` on the
    batch. The train iterator shuffles (``seed``) and, with ``auto_batch_balance``, yields
    sample weights; validation and test keep file order. ``load_*_ram`` caches a set in memory
    (``load_dat_ram``) and iterates over the cache; ``cache_dir`` keeps the resized images as
    ``.npy`` files there (``dm_image.cached_read``), for every set.

    Returns:
        (train, val, test) tf-keras Sequences yielding ``(x, y[, w])``; x float32
        (B, H, W, C), y one-hot.
    """
    from dm_image import DMImageDataGenerator, load_dat_ram

    read = dict(target_scale=img_scale, rescale_factor=rescale_factor,
                equalize_hist=equalize_hist, dup_3_channels=dup_3_channels,
                preprocess=preprocess)

    def make(imgen, folder, bs, shuffle, balance, in_ram):
        it = imgen.flow_from_directory(folder, target_size=tuple(img_size), classes=class_list,
                                       class_mode="categorical", batch_size=bs,
                                       shuffle=shuffle, seed=seed,
                                       auto_batch_balance=balance, cache_dir=cache_dir,
                                       **read)
        if not in_ram:
            return it
        X, y = load_dat_ram(it)
        logger.info("Loaded %d images of %s into RAM (%.1f MB)", len(X), folder, X.nbytes / 1e6)
        return imgen.flow(X, y, batch_size=bs, shuffle=shuffle, seed=seed,
                          auto_batch_balance=balance, **read)

    train_imgen = DMImageDataGenerator(featurewise_center=featurewise_center,
                                       **(AUGMENTATION_2017 if augmentation else {}))
    eval_imgen = DMImageDataGenerator(featurewise_center=featurewise_center)
    if featurewise_center:
        train_imgen.mean = eval_imgen.mean = featurewise_mean
    train = make(train_imgen, train_dir, train_batch_size, True, auto_batch_balance,
                 load_train_ram)
    val = make(eval_imgen, val_dir, batch_size, False, False, load_val_ram)
    test = make(eval_imgen, test_dir, batch_size, False, False, False)
    return train, val, test


def iterators_from_options(opts, channels, preprocess, seed):
    """:func:`build_data_iterators` from a training script's options (``vars(args)``).

    Returns:
        (train, val, test, train_batch_size); the train batch is ``--batch-size`` x
        ``--train-bs-multiplier``.
    """
    train_bs = int(opts["batch_size"] * opts["train_bs_multiplier"])
    train, val, test = build_data_iterators(
        opts["train_dir"], opts["val_dir"], opts["test_dir"], img_size=opts["img_size"],
        img_scale=opts["img_scale"], rescale_factor=opts["rescale_factor"],
        featurewise_center=opts["featurewise_center"],
        featurewise_mean=opts["featurewise_mean"], equalize_hist=opts["equalize_hist"],
        augmentation=opts["augmentation"], class_list=opts["class_list"],
        auto_batch_balance=opts["auto_batch_balance"], batch_size=opts["batch_size"],
        train_batch_size=train_bs, load_train_ram=opts["load_train_ram"],
        load_val_ram=opts["load_val_ram"], cache_dir=opts["img_cache_dir"],
        dup_3_channels=channels == 3, preprocess=preprocess, seed=seed)
    return train, val, test, train_bs


# --------------------------------------------------------------------------- input recipes
#: Script options stored in a model's input recipe (``dm_image.InputRecipe``), option name ->
#: recipe field.
RECIPE_OPTIONS = {"img_size": "img_size", "img_scale": "img_scale",
                  "rescale_factor": "rescale_factor", "equalize_hist": "equalize_hist",
                  "featurewise_center": "featurewise_center",
                  "featurewise_mean": "featurewise_mean"}


def _as_option(value):
    """A recipe value in the form the scripts hold it (lists for sizes, floats)."""
    return list(value) if isinstance(value, tuple) else value


def apply_model_recipe(values, model_file, given, names=None, defaults=None):
    """Fill the preprocessing options the user did not give from a model file's input recipe.

    A model written by the trainers carries its ``dm_image.InputRecipe`` (HDF5 attribute);
    every option of ``names`` the user did not give takes the recipe's value (logged, listing
    them), and a given value that contradicts the recipe is kept with one warning naming both.
    A file without a recipe (a 2017 file, or one saved by other code) changes nothing: the
    flags and their 2017 defaults apply.

    Args:
        values: option name -> value (e.g. ``vars(args)``); not modified.
        model_file: path of the model file (anything else, e.g. a model object, has no recipe).
        given: names the user set explicitly; None: those whose value differs from
            ``defaults`` (a Python call).
        names: option name -> recipe field (default :data:`RECIPE_OPTIONS`); a field may be
            a function ``recipe -> value or None`` (None: the recipe does not say).
        defaults: option defaults, used when ``given`` is None.

    Returns:
        (new values dict, the recipe or None).
    """
    import dm_image

    values = dict(values)
    if not isinstance(model_file, (str, os.PathLike)) or not os.path.isfile(model_file):
        return values, None
    recipe = dm_image.InputRecipe.from_model_file(model_file)
    if recipe is None:
        logger.info("%s holds no input recipe; preprocessing comes from the flags", model_file)
        return values, None
    names = RECIPE_OPTIONS if names is None else names
    if given is None:
        given = {k for k in names if k in values and (defaults or {}).get(k) != values[k]}
    taken = []
    for name, field in names.items():
        stored = field(recipe) if callable(field) else getattr(recipe, field)
        if stored is None and (callable(field) or name == "featurewise_mean"):
            continue   # the recipe does not say
        stored = _as_option(stored)
        if name not in given:
            if values.get(name) != stored:
                taken.append(f"{name}={stored!r}")
            values[name] = stored
        elif not _same_value(values.get(name), stored):
            logger.warning("--%s %s contradicts the input recipe of %s (%s); using %s",
                           name.replace("_", "-"), _as_option(values.get(name)), model_file,
                           stored, _as_option(values.get(name)))
    if taken:
        logger.info("taken from the input recipe of %s: %s", model_file, ", ".join(taken))
    return values, recipe


def _same_value(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(
            1.0, abs(float(b)))
    return a == b


def training_recipe(opts, channels, preprocess=None):
    """The ``dm_image.InputRecipe`` of a training script's options (``vars(args)``).

    Args:
        opts: the options (``img_size``, ``img_scale``, ``rescale_factor``,
            ``equalize_hist``, ``featurewise_center``, ``featurewise_mean``).
        channels: the model's input channels (1 or 3).
        preprocess: the backbone whose ``preprocess_input`` the iterators apply (when not
            centring), or None.
    """
    from dm_image import InputRecipe

    return InputRecipe(img_size=tuple(opts["img_size"]), channels=int(channels),
                       img_scale=opts["img_scale"], rescale_factor=opts["rescale_factor"],
                       equalize_hist=opts["equalize_hist"],
                       featurewise_center=opts["featurewise_center"],
                       featurewise_mean=opts["featurewise_mean"], preprocess=preprocess)


def save_input_recipe(recipe, best_model, *model_files):
    """Store ``recipe`` in the models a training run writes and in its options JSON.

    Every file later saved at ``best_model`` or one of ``model_files`` (``NOSAVE`` skipped)
    carries it as an HDF5 attribute (``dm_keras_ext.register_input_recipe``), and the options
    JSON of :func:`log_and_save_options` gets it under ``input_recipe``.

    Returns:
        Path of the options JSON, or None when no options were logged for ``best_model``.
    """
    import dm_keras_ext

    for path in (best_model,) + model_files:
        if path and path != NOSAVE:
            dm_keras_ext.register_input_recipe(path, recipe)
    json_path = options_json_path(best_model)
    logger.info("input recipe: %s", recipe.to_json())
    record = _OPTIONS_RECORDS.get(str(json_path))
    if record is None:
        return None
    record["input_recipe"] = recipe.to_dict()
    return json_path
