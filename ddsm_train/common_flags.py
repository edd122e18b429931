"""Command-line flag groups shared by the ``ddsm_train`` scripts.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

Each flag is declared once here and added to a script's parser by one ``add_*_flags`` call.
Defaults that differ between scripts (image size, featurewise mean, ...) are arguments of those
calls, so every default still lives in exactly one place: the script's call for per-script values,
this module for the rest. The ``--x/--no-x`` pairs and the short aliases (``-bs``, ``-ilr``,
``-hd``, ...) of the 2017 scripts are kept, each an alias of its long flag; destination
names are the 2017 ones (``optim`` for ``--optimizer``, ``init_lr`` for ``--init-learningrate``)
so that ``run(**vars(args))`` passes them straight through.

What the trainers do with these options lives in ``training_setup``; the environment variables
of a run and a model file's input recipe in ``script_utils``.
"""
import argparse
import math

import script_utils

__all__ = [
    "finite_float", "nonneg_float", "positive_float", "unit_interval", "fraction",
    "nonneg_int", "positive_int", "use_checked_numbers",
    "NOSAVE", "MIXED_PRECISION_CHOICES", "OPTIMIZER_CHOICES", "FROZEN_BN_MODES", "RECIPE_NOTE",
    "add_bool_flag", "add_optional_value_flag",
    "add_image_flags", "add_batch_flags", "add_ram_flags", "add_augmentation_flag",
    "add_class_flags", "add_optimizer_flags", "add_stage_flags", "add_regularization_flags",
    "add_model_file_flags", "add_distributed_flags", "add_run_flags", "add_training_flags",
    "add_trust_flag", "add_progress_flag", "add_model_reading_flags",
    "add_image_source_flags", "add_bootstrap_flags",
]

NOSAVE = "NOSAVE"
MIXED_PRECISION_CHOICES = ("float16", "bfloat16")
OPTIMIZER_CHOICES = ("sgd", "rmsprop", "adagrad", "adadelta", "adamax", "adam", "nadam")
#: ``--frozen-bn-mode``: what a BatchNormalization layer frozen in an early stage normalises
#: with while it trains around it. ``batch``: the batch's own statistics (Keras 2.0.8, 2017);
#: ``moving``: its stored moving statistics (tf-keras inference mode).
FROZEN_BN_MODES = ("batch", "moving")


# --------------------------------------------------------------------------- value types
# argparse types of the numeric flags: a value outside the flag's meaningful range stops the
# script with one line ``PROG: error: argument --FLAG: ...`` (exit status 2) naming the flag.
def _float_value(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"should be a finite number, got {text!r}")
    return value


def _int_value(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def finite_float(text: str) -> float:
    """A finite float (``nan`` and ``inf`` are refused): the type of every float flag."""
    return _float_value(text)


def _ranged(name: str, kind: type, in_range, rule: str, doc: str):
    """The flag type ``name``: a ``kind`` (a finite float, or an integer) for which
    ``in_range(value)`` holds, else the error ``should be RULE, got 'TEXT'``."""
    read = _float_value if kind is float else _int_value

    def check(text):
        value = read(text)
        if not in_range(value):
            raise argparse.ArgumentTypeError(f"should be {rule}, got {text!r}")
        return value

    check.__name__ = check.__qualname__ = name
    check.__doc__ = doc
    check.__annotations__ = {"text": str, "return": kind}
    return check


nonneg_float = _ranged("nonneg_float", float, lambda v: v >= 0, ">= 0",
                       "A finite float >= 0 (weight decays, class weights, ...).")
positive_float = _ranged("positive_float", float, lambda v: v > 0, "> 0",
                         "A finite float > 0 (learning rates and their multipliers, scale "
                         "factors, ...).")
unit_interval = _ranged("unit_interval", float, lambda v: 0 <= v < 1, "in [0, 1)",
                        "A float in [0, 1) (dropout rates: 1 would drop every unit).")
fraction = _ranged("fraction", float, lambda v: 0 <= v <= 1, "in [0, 1]",
                   "A float in [0, 1] (shares of a set, ratios).")
nonneg_int = _ranged("nonneg_int", int, lambda v: v >= 0, ">= 0",
                     "An integer >= 0 (epochs, seeds, patience, counts that may be zero).")
positive_int = _ranged("positive_int", int, lambda v: v >= 1, ">= 1",
                       "An integer >= 1 (sizes, batch sizes, widths, worker counts).")


def use_checked_numbers(parser):
    """Make every plain ``type=float`` flag of ``parser`` (argument groups included) refuse
    non-finite values (:func:`finite_float`), and every ``type=int`` flag name itself in its
    error. The scripts' ``main()`` applies this to their parser, so a new float flag gets the
    rule without declaring it; flags with a range use the types above."""
    parser.register("type", float, finite_float)
    parser.register("type", int, _int_value)
    return parser


# --------------------------------------------------------------------------- flag primitives
def _dest(name):
    return name.replace("-", "_")


def _names(long_name, short):
    """Option strings: ``--long_name`` and the 2017 short alias, when there is one."""
    return (f"--{long_name}",) + ((short,) if short else ())


def backbone_names():
    """The ``--net`` / ``--patch-net`` choices: the names in the table of backbones,
    ``dm_resnet.BACKBONES`` (one entry per backbone; imports tf-keras)."""
    import dm_resnet

    return dm_resnet.backbone_names()


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
#: Said in the help of a flag whose value a model file's input recipe supplies when not given.
RECIPE_NOTE = "; when not given, the model file's input recipe supplies it"


def add_image_flags(parser, img_size, featurewise_mean, equalize_hist, featurewise_center=True,
                    img_scale=None, rescale_factor=None, centring=True, from_recipe=()):
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
        from_recipe: destinations (``"img_size"``, ``"rescale_factor"``, ...) whose value a
            model file's input recipe supplies when the flag is not given (prediction,
            heatmaps): their help says so.
    """
    def note(dest):
        return RECIPE_NOTE if dest in from_recipe else ""

    g = parser.add_argument_group("image")
    g.add_argument("--img-size", "-is", dest="img_size", nargs=2, type=positive_int,
                   default=list(img_size), metavar=("HEIGHT", "WIDTH"),
                   help=f"height and width the images are resized to, in pixels"
                        f"{note('img_size')} (default: {list(img_size)})")
    add_optional_value_flag(g, "img-scale", positive_float, img_scale,
                            "map each image's max intensity to this value" + note("img_scale"),
                            short="-ic", no_short="-nic")
    add_optional_value_flag(g, "rescale-factor", positive_float, rescale_factor,
                            "multiply intensities by this factor (0.003891 for 16-bit PNG)"
                            + note("rescale_factor"))
    if centring:
        add_bool_flag(g, "featurewise-center", featurewise_center,
                      "subtract --featurewise-mean" + note("featurewise_center"))
        g.add_argument("--featurewise-mean", dest="featurewise_mean", type=finite_float,
                       default=featurewise_mean,
                       help=f"train-set mean intensity after rescale{note('featurewise_mean')}"
                            f" (default: {featurewise_mean})")
    add_bool_flag(g, "equalize-hist", equalize_hist,
                  "histogram equalisation" + note("equalize_hist"))


def add_batch_flags(parser, batch_size=64, train_bs_multiplier=0.5):
    """``--batch-size`` (evaluation batch) and ``--train-bs-multiplier`` (train batch = product)."""
    g = parser.add_argument_group("batch")
    g.add_argument("--batch-size", "-bs", dest="batch_size", type=positive_int,
                   default=batch_size,
                   help=f"evaluation batch size (default: {batch_size})")
    g.add_argument("--train-bs-multiplier", dest="train_bs_multiplier", type=positive_float,
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
    """``--augmentation``: the train-time augmentation of
    :data:`training_setup.AUGMENTATION_2017`."""
    add_bool_flag(parser, "augmentation", default, "random augmentation of train images")


def add_class_flags(parser, class_list, auto_batch_balance):
    """Class list, auto batch balance and class weights."""
    g = parser.add_argument_group("classes")
    g.add_argument("--class-list", dest="class_list", nargs="+", type=str,
                   default=list(class_list), action=script_utils.UniqueValuesAction,
                   help=f"class sub-folder names, in label order (default: {list(class_list)})")
    add_bool_flag(g, "auto-batch-balance", auto_batch_balance,
                  "sample weights giving each class in a batch equal total weight")
    g.add_argument("--pos-cls-weight", dest="pos_cls_weight", type=nonneg_float, default=1.0,
                   help="weight of the non-first classes without auto batch balance "
                        "(default: %(default)s)")
    g.add_argument("--neg-cls-weight", dest="neg_cls_weight", type=nonneg_float, default=1.0,
                   help="weight of the first class (default: %(default)s)")


def add_optimizer_flags(parser, optim="sgd", init_lr=0.01, lr_patience=10, es_patience=25):
    """``--optimizer``, ``--init-learningrate``, ``--lr-patience``, ``--es-patience``,
    ``--frozen-bn-mode``."""
    g = parser.add_argument_group("optimiser")
    g.add_argument("--optimizer", dest="optim", type=str.lower, default=optim,
                   choices=OPTIMIZER_CHOICES,
                   help="optimiser of every stage, with the Keras 2.0.8 update rules "
                        "(default: %(default)s)")
    g.add_argument("--init-learningrate", "-ilr", dest="init_lr", type=positive_float,
                   default=init_lr,
                   help="stage-1 learning rate (default: %(default)s)")
    g.add_argument("--lr-patience", "-lrp", dest="lr_patience", type=nonneg_int,
                   default=lr_patience,
                   help="epochs without val-loss improvement before the lr halves (sgd) "
                        "(default: %(default)s)")
    g.add_argument("--es-patience", "-esp", dest="es_patience", type=nonneg_int,
                   default=es_patience,
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
    g.add_argument("--nb-epoch", "-ne", dest="nb_epoch", type=nonneg_int, default=nb_epoch,
                   help="stage-1 epochs; 0 skips stage 1 (default: %(default)s)")
    if top_layer_epochs is not None:
        g.add_argument("--top-layer-epochs", dest="top_layer_epochs", type=nonneg_int,
                       default=top_layer_epochs,
                       help="stage-2 epochs, training the layers from --top-layer-nb up "
                            "(default: %(default)s)")
    g.add_argument("--all-layer-epochs", dest="all_layer_epochs", type=nonneg_int,
                   default=all_layer_epochs, help="all-layer stage epochs (default: %(default)s)")
    if top_layer_multiplier is not None:
        g.add_argument("--top-layer-multiplier", dest="top_layer_multiplier", type=positive_float,
                       default=top_layer_multiplier,
                       help="stage-2 lr = init lr x this (default: %(default)s)")
    g.add_argument("--all-layer-multiplier", dest="all_layer_multiplier", type=positive_float,
                   default=all_layer_multiplier,
                   help="all-layer stage lr = init lr x this (default: %(default)s)")
    add_optional_value_flag(g, "top-layer-nb", nonneg_int, None,
                            "index of the first layer trained in the top-layer stage "
                            "(None: resolved by role for the network)")


def add_regularization_flags(parser, weight_decay=1e-4, weight_decay2=1e-4, hidden_dropout=0.0,
                             hidden_dropout2=0.0, bias_multiplier=None):
    """Weight decay and dropout for the first and later stages, and the bias lr multiplier."""
    g = parser.add_argument_group("regularisation")
    g.add_argument("--weight-decay", "-wd", dest="weight_decay", type=nonneg_float,
                   default=weight_decay,
                   help="L2 of Dense/Conv2D kernels, stage 1 (default: %(default)s)")
    g.add_argument("--weight-decay2", "-wd2", dest="weight_decay2", type=nonneg_float,
                   default=weight_decay2,
                   help="L2 of Dense/Conv2D kernels in the later stages (default: %(default)s)")
    g.add_argument("--hidden-dropout", "-hd", dest="hidden_dropout", type=unit_interval,
                   default=hidden_dropout, help="dropout rate, stage 1 (default: %(default)s)")
    g.add_argument("--hidden-dropout2", "-hd2", dest="hidden_dropout2", type=unit_interval,
                   default=hidden_dropout2,
                   help="dropout rate in later stages (default: %(default)s)")
    add_optional_value_flag(g, "bias-multiplier", nonneg_float, bias_multiplier,
                            "learning-rate multiplier for bias terms")


def add_model_file_flags(parser, best_model):
    """``--best-model`` (best checkpoint) and ``--final-model`` (``NOSAVE``: do not save)."""
    g = parser.add_argument_group("model files")
    g.add_argument("--best-model", "-bm", dest="best_model", type=str, default=best_model,
                   help="where the best model is saved (default: %(default)s)")
    g.add_argument("--final-model", "-fm", dest="final_model", type=str, default=NOSAVE,
                   help=f"where the last model is saved; {NOSAVE} skips it (default: %(default)s)")


def add_trust_flag(parser):
    """``--trust-model-file``: allow model files whose layers call code named in the file
    (off)."""
    add_bool_flag(parser, "trust-model-file", False,
                  "load model files even if their layers call code named in the file (Lambda "
                  "layers, TensorFlow functions other than tensor maths), which then runs: only "
                  "for files you trust")


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
    """``--auto-resume`` (continue an interrupted run), ``--seed``, ``--tensorboard-dir`` and
    ``--overwrite`` (replace another run's files at ``--best-model``)."""
    g = parser.add_argument_group("resuming and logs")
    add_bool_flag(g, "auto-resume", True,
                  "continue the unfinished run of <best-model>.last.h5 when its options are "
                  "these")
    g.add_argument("--seed", type=nonneg_int, default=None, metavar="N",
                   help="seed of the run's random draws (initial weights, shuffling, "
                        "augmentation, dropout): the same seed and options train the same "
                        "model on the same device (default: the RANDOM_SEED environment "
                        "variable, else 12345)")
    g.add_argument("--tensorboard-dir", dest="tensorboard_dir", default=None, metavar="DIR",
                   help="also write TensorBoard logs to DIR (default: off)")
    add_bool_flag(g, "overwrite", False,
                  "replace the model files of another run at --best-model (refused without "
                  "it); the same command again, once its run is finished, does nothing "
                  "unless this is given, then it trains again")


def add_progress_flag(parser, default=True):
    """``--verbose`` / ``--no-verbose``: progress display (on by default)."""
    add_bool_flag(parser, "verbose", default, "progress display (a bar on a terminal, a log "
                  "line every tenth of the work otherwise)")


def add_training_flags(parser, best_model):
    """The flag groups both trainers end with: regularisation, optimiser, model files (the
    default ``--best-model`` is ``best_model``), devices and precision, resuming and logs, and
    ``--trust-model-file``."""
    add_regularization_flags(parser)
    add_optimizer_flags(parser)
    add_model_file_flags(parser, best_model=best_model)
    add_distributed_flags(parser)
    add_run_flags(parser)
    add_trust_flag(parser)


def add_model_reading_flags(parser, verbose=True):
    """The flags of every script that reads trained models (prediction, heatmaps):
    ``--trust-model-file`` and ``--verbose`` (default ``verbose``)."""
    add_trust_flag(parser)
    add_progress_flag(parser, verbose)


def add_image_source_flags(parser, malignant_class, malignant_default):
    """The ``input (one of them)`` group of the tools that score whole images: ``--img-dir``,
    ``--img-list``, ``--exam-list``, ``--class-list`` and ``--malignant-class`` (default
    ``malignant_class``, which its help calls ``malignant_default``). Returns the group."""
    src = parser.add_argument_group("input (one of them)")
    for flag, what in (("--img-dir", "class-folder tree, folder of images, or the image folder "
                                     "of --exam-list / relative --img-list paths"),
                       ("--img-list", "file with one image path (and label) per line"),
                       ("--exam-list", "exam list, data.pkl or .json (meta-repository form)")):
        src.add_argument(flag, help=f"{what} (default: none)")
    src.add_argument("--class-list", nargs="+", default=["neg", "pos"],
                     action=script_utils.UniqueValuesAction,
                     help="class folders in label order (default: %(default)s)")
    src.add_argument("--malignant-class", type=int, default=malignant_class,
                     help=f"class index reported as malignant_pred (default: "
                          f"{malignant_default})")
    return src


def add_bootstrap_flags(group):
    """``--bootstrap`` (resamples of the 95 % intervals, 0 for none) and ``--seed`` (their
    seed), to a parser or argument group."""
    group.add_argument("--bootstrap", type=nonneg_int, default=2000,
                       help="bootstrap resamples for 95%% intervals, 0 for none "
                            "(default: %(default)s)")
    group.add_argument("--seed", type=nonneg_int, default=12345,
                       help="seed of the bootstrap resampling of the confidence intervals "
                            "(default: %(default)s)")
