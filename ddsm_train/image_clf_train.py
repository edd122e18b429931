"""Train a whole-mammogram classifier (two stages), or fine-tune one on new data.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

Either ``--patch-model-state`` (a patch classifier, converted by ``dm_resnet.add_top_layers``)
or ``--resume-from`` (a whole-image model, Keras 2.0.8 files included) is required. Stage 1
trains the new top with the patch network frozen (``--nb-epoch``, 0 skips it), stage 2 all
layers at ``--init-learningrate x --all-layer-multiplier``. The model with the best mean
validation AUROC is saved to ``--best-model`` (atomically: an interrupted run keeps the last
best model, and ``--resume-from`` restarts from it); the resolved options go to
``<best-model>.options.json``. At the end the best model's test AUROC is reported, without and
with flip augmentation, and the first with its 95 % bootstrap interval; a best epoch that is the
first, or an interval containing 0.5, is logged and printed as a warning (``learning_health``). Example (the companion page's fine-tuning command)::

    python image_clf_train.py --no-patch-model-state --resume-from model.h5 \\
        --img-size 1152 896 --no-img-scale --rescale-factor 0.003891 --featurewise-center \\
        --featurewise-mean 44.33 --no-equalize-hist --batch-size 4 --train-bs-multiplier 0.5 \\
        --augmentation --class-list neg pos --nb-epoch 0 --all-layer-epochs 50 \\
        --load-val-ram --load-train-ram --optimizer adam --weight-decay 0.001 \\
        --hidden-dropout 0.0 --weight-decay2 0.01 --hidden-dropout2 0.0 \\
        --init-learningrate 0.0001 --all-layer-multiplier 0.01 --es-patience 10 \\
        --auto-batch-balance --best-model best.h5 --final-model NOSAVE TRAIN VAL TEST
"""
import argparse
import logging
import math
import os

import script_utils  # first: puts the root dm_* modules and this folder on sys.path

script_utils.import_tensorflow_quietly()   # TensorFlow's start-up lines hidden

import common_flags as cf  # noqa: E402
import run_files  # noqa: E402
import run_options  # noqa: E402
import training_setup as ts  # noqa: E402

logger = logging.getLogger("image_clf_train")

__all__ = ["get_args_parser", "options_class", "validate_options", "patch_model_settings",
           "run", "main"]


def get_args_parser():
    """Command-line flags of the whole-image trainer (the 2017 flags and short aliases)."""
    parser = argparse.ArgumentParser(
        description="Train a whole-image classifier from a patch classifier, or fine-tune one.")
    parser.add_argument("train_dir", help="train folder, one subfolder per class")
    parser.add_argument("val_dir", help="validation folder, which chooses the best model")
    parser.add_argument("test_dir", help="test folder, scored once at the end")
    g = parser.add_argument_group("model source (exactly one)")
    cf.add_optional_value_flag(g, "patch-model-state", str, None,
                               "patch classifier file converted into a whole-image model")
    cf.add_optional_value_flag(g, "resume-from", str, None,
                               "whole-image model file to fine-tune, or a run's last-epoch "
                               "checkpoint (<best-model>.last.h5) to continue that run")
    cf.add_image_flags(parser, img_size=(1152, 896), featurewise_mean=52.16,
                       equalize_hist=False)
    cf.add_batch_flags(parser)
    cf.add_augmentation_flag(parser, True)
    cf.add_class_flags(parser, class_list=("neg", "pos"), auto_batch_balance=True)
    t = parser.add_argument_group("top layers (patch-to-whole-image conversion)")
    t.add_argument("--patch-net", dest="patch_net", type=str, default="resnet50",
                   choices=cf.backbone_names(), metavar="NET",
                   help="backbone of the patch classifier, which sets the cut point "
                        "(%(choices)s); a --patch-model-state written by patch_clf_train.py "
                        "says it itself (then this flag may only repeat it) "
                        "(default: %(default)s)")
    t.add_argument("--block-type", dest="block_type", type=str, default="resnet",
                   choices=("resnet", "vgg"),
                   help="top blocks: residual bottleneck stages or VGG-like conv stacks "
                        "(default: %(default)s)")
    t.add_argument("--top-depths", dest="top_depths", nargs="+", type=cf.positive_int,
                   default=[512, 512],
                   help="filters per top block (default: %(default)s)")
    t.add_argument("--top-repetitions", dest="top_repetitions", nargs="+", type=cf.positive_int,
                   default=[3, 3], help="repetitions per top block (default: %(default)s)")
    t.add_argument("--bottleneck-enlarge-factor", dest="bottleneck_enlarge_factor",
                   type=cf.positive_int,
                   default=4, help="resnet top blocks: output channels = depth x this "
                                   "(default: %(default)s)")
    cf.add_bool_flag(t, "add-heatmap", False, "heatmap head on the patch net")
    t.add_argument("--avg-pool-size", dest="avg_pool_size", nargs=2, type=cf.positive_int,
                   default=[7, 7], help="heatmap average pool (default: %(default)s)")
    cf.add_bool_flag(t, "add-conv", True, "convolutional top blocks (else FC layers)")
    cf.add_bool_flag(t, "add-shortcut", False, "dense shortcut from the flattened input")
    t.add_argument("--hm-strides", dest="hm_strides", nargs=2, type=cf.positive_int, default=[1, 1],
                   help="strides of the heatmap average pool (--add-heatmap) "
                        "(default: %(default)s)")
    t.add_argument("--hm-pool-size", dest="hm_pool_size", nargs=2, type=cf.positive_int, default=[5, 5],
                   help="max pooling window over the heatmap (--add-heatmap) "
                        "(default: %(default)s)")
    t.add_argument("--fc-init-units", dest="fc_init_units", type=cf.positive_int, default=64,
                   help="units of the first dense layer without --add-conv, halving in each "
                        "next one (default: %(default)s)")
    t.add_argument("--fc-layers", dest="fc_layers", type=cf.nonneg_int, default=2,
                   help="dense layers of the top without --add-conv (default: %(default)s)")
    cf.add_optional_value_flag(t, "kept-layer-idx", int, None,
                               "explicit cut index into the patch net's layers, as in 2017; "
                               "negative counts from the end of the 2017 layer list of "
                               "--patch-net, so -5 is the final ReLU (2048 channels) of a "
                               "ResNet50 patch net, a 2017 file or one of ours, although our "
                               "ResNet50 head lacks the 2017 7x7 average pooling layer; "
                               "None: the cut is found by role for --patch-net")
    cf.add_stage_flags(parser, nb_epoch=5, all_layer_epochs=20, all_layer_multiplier=0.1)
    cf.add_ram_flags(parser)
    cf.add_training_flags(parser, best_model="./modelState/image_clf.h5")
    return parser


options_class = run_options.tool_options_class(get_args_parser, "ImageTrainOptions")


def validate_options(opts, nb_devices=None):
    """Stop on contradictory options before any work (ValueError with one clear message)."""
    if (opts["patch_model_state"] is None) == (opts["resume_from"] is None):
        raise ValueError("exactly one of --patch-model-state and --resume-from is required, got "
                         f"{'neither' if opts['patch_model_state'] is None else 'both'}")
    source = opts["patch_model_state"] or opts["resume_from"]
    if not os.path.isfile(source):
        raise ValueError(f"model file not found: {source}")
    ts.check_class_dirs({"TRAIN_DIR": opts["train_dir"], "VAL_DIR": opts["val_dir"],
                         "TEST_DIR": opts["test_dir"]}, opts["class_list"],
                        need_two_classes=("VAL_DIR", "TEST_DIR"))
    _check_common(opts, nb_devices)
    if opts["nb_epoch"] == 0 and opts["all_layer_epochs"] == 0:
        raise ValueError("nothing to train: --nb-epoch and --all-layer-epochs are both 0 (to "
                         "score an existing model, use image_clf_predict.py)")
    if opts["block_type"] == "resnet" and len(opts["top_depths"]) != len(
            opts["top_repetitions"]):
        raise ValueError(f"--top-depths {opts['top_depths']} and --top-repetitions "
                         f"{opts['top_repetitions']} should have the same length")


#: Options of the whole-image run taken from the input recipe of ``--patch-model-state`` when
#: not given: the intensity scale the patch net was trained on (not the image size, nor the
#: mean, which are those of whole images).
PATCH_RECIPE_OPTIONS = {"img_scale": "img_scale", "rescale_factor": "rescale_factor",
                        "equalize_hist": "equalize_hist",
                        "featurewise_center": "featurewise_center"}


def _patch_net_of(model_file):
    """The ``--net`` a patch model file was trained with, or None when the file does not say.

    Read from the file (``dm_keras_ext.read_model_info``), else from the options JSON the
    patch trainer wrote beside it.
    """
    import json

    import dm_keras_ext

    info = dm_keras_ext.read_model_info(model_file) or {}
    if info.get("net"):
        return str(info["net"])
    sidecar = script_utils.options_json_path(model_file)
    try:
        net = json.loads(script_utils.read_text_file(sidecar)).get("net")
    except (OSError, ValueError, AttributeError):
        return None
    return str(net) if net else None


def patch_model_settings(opts, given):
    """``opts`` completed from the ``--patch-model-state`` file: its net (which sets the cut
    point, found by role) and the intensity scale of its input recipe
    (:data:`PATCH_RECIPE_OPTIONS`), for the options not in ``given``. A file that does not say
    (a 2017 model) leaves the flags as they are.

    Raises:
        ValueError: a given ``--patch-net`` contradicts the net the file was trained with.
    """
    source = opts["patch_model_state"]
    if source is None or not os.path.isfile(source):
        return opts
    net = _patch_net_of(source)
    if net is not None:
        if "patch_net" in given and opts["patch_net"] != net:
            raise ValueError(f"--patch-net {opts['patch_net']} contradicts --patch-model-state "
                             f"{source}, a {net} patch classifier; leave --patch-net out or "
                             f"give --patch-net {net}")
        if opts["patch_net"] != net:
            logger.info("--patch-net %s, as --patch-model-state %s says", net, source)
        opts = dict(opts, patch_net=net)
    opts, _ = script_utils.apply_model_recipe(opts, source, given, names=PATCH_RECIPE_OPTIONS)
    return opts


def _check_common(opts, nb_devices):
    if nb_devices is None:
        nb_devices = script_utils.get_num_gpu_devices()
    train_bs = int(opts["batch_size"] * opts["train_bs_multiplier"])
    if opts["batch_size"] < 1 or train_bs < 1:
        raise ValueError(f"--batch-size {opts['batch_size']} x --train-bs-multiplier "
                         f"{opts['train_bs_multiplier']} gives a train batch of {train_bs}")
    ts.check_batch_vs_devices(train_bs, nb_devices, "train batch size (batch size x multiplier)")
    ts.check_batch_vs_devices(opts["batch_size"], nb_devices, "--batch-size")
    for name in ("nb_epoch", "all_layer_epochs"):
        if opts[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} should be >= 0, got {opts[name]}")
    if not opts["init_lr"] > 0:
        raise ValueError(f"--init-learningrate should be > 0, got {opts['init_lr']}")


def _build_model(opts, nb_class):
    import dm_keras_ext
    import dm_resnet

    if opts["resume_from"] is not None:
        model = dm_keras_ext.robust_load_model(opts["resume_from"],
                                               safe_mode=not opts["trust_model_file"])
        top_layer_nb = opts["top_layer_nb"]
        logger.info("Resumed whole-image model %s (%d layers)", opts["resume_from"],
                    len(model.layers))
    else:
        patch = dm_keras_ext.robust_load_model(opts["patch_model_state"],
                                               safe_mode=not opts["trust_model_file"])
        dm_keras_ext.check_model_role(patch, opts["patch_model_state"], ("patch",),
                                      "--patch-model-state")
        _check_patch_fits(patch, opts)
        model, top_layer_nb = dm_resnet.add_top_layers(
            patch, tuple(opts["img_size"]), opts["patch_net"], opts["block_type"],
            opts["top_depths"], opts["top_repetitions"], nb_class=nb_class,
            bottleneck_enlarge_factor=opts["bottleneck_enlarge_factor"],
            dropout=opts["hidden_dropout"], weight_decay=opts["weight_decay"],
            add_heatmap=opts["add_heatmap"], avg_pool_size=tuple(opts["avg_pool_size"]),
            add_conv=opts["add_conv"], add_shortcut=opts["add_shortcut"],
            hm_strides=tuple(opts["hm_strides"]), hm_pool_size=tuple(opts["hm_pool_size"]),
            fc_init_units=opts["fc_init_units"], fc_layers=opts["fc_layers"],
            kept_layer_idx=opts["kept_layer_idx"])
        if opts["top_layer_nb"] is not None:
            top_layer_nb = opts["top_layer_nb"]
    _check_model(model, opts, nb_class)
    dm_keras_ext.check_top_layer_nb(model, opts["top_layer_nb"])
    return model, top_layer_nb


def _check_patch_fits(patch, opts):
    """The patches the patch classifier was trained on (its fixed input, else the square size
    of its input recipe) must fit in the whole image of ``--img-size``."""
    import dm_image

    size = tuple(patch.input_shape[1:3])
    if None in size:
        recipe = dm_image.InputRecipe.from_model_file(opts["patch_model_state"])
        size = tuple(recipe.img_size) if recipe is not None and recipe.img_size else ()
    if size and any(p > i for p, i in zip(size, opts["img_size"])):
        raise ValueError(f"--img-size {opts['img_size'][0]} {opts['img_size'][1]} is smaller than "
                         f"the {size[0]}x{size[1]} patches of --patch-model-state "
                         f"{opts['patch_model_state']}")


def _check_model(model, opts, nb_class):
    in_hw = tuple(model.input_shape[1:3])
    if None not in in_hw and in_hw != tuple(opts["img_size"]):
        raise ValueError(f"the model takes {in_hw[0]}x{in_hw[1]} images but --img-size is "
                         f"{opts['img_size'][0]} {opts['img_size'][1]}")
    if model.output_shape[-1] != nb_class:
        raise ValueError(f"the model has {model.output_shape[-1]} outputs but --class-list "
                         f"names {nb_class} classes {opts['class_list']}")


def _preprocess_fn(opts, channels):
    if opts["featurewise_center"] or channels != 3:
        return None
    from dm_resnet import get_preprocess_input

    return get_preprocess_input(opts["patch_net"])


class _ImageTrainer(ts.TrainerSpec):
    """What the whole-image trainer adds to ``training_setup.run_trainer``."""

    stages, unit = "train_2stage", "images"

    validate_options = staticmethod(validate_options)

    def build(self, opts, nb_class):
        model, top_layer_nb = _build_model(opts, nb_class)
        channels = model.input_shape[-1]
        return model, top_layer_nb, (opts.patch_net if _preprocess_fn(opts, channels)
                                     else None)

    def checkpointer(self, opts, val, extras):
        import training_runs

        return training_runs.DMAucModelCheckpoint(opts.best_model, val, extras=extras)

    def report(self, opts, json_path, hists, context):
        return _report(opts, json_path, hists, context["checkpointer"], context["test"],
                       context["is_chief"])


@run_files.releases_locks
def run(train_dir, val_dir, test_dir, **options):
    """Train (or fine-tune) a whole-image classifier and report its test AUROC.

    Args:
        train_dir, val_dir, test_dir: folders with one subfolder per class of ``class_list``.
        **options: the command-line options by destination name (see ``get_args_parser``);
            missing ones take the parser's defaults. With ``resume_from``, the image
            options not given (``given_options`` when passed, as the command line does,
            else the keywords passed) come from that file's input recipe when it has one;
            with ``patch_model_state``, ``patch_net`` and the intensity scale not given come
            from the patch model file when it carries them (:func:`patch_model_settings`).

    Returns:
        dict: ``best_model``, ``options_json``, ``best_val_auc``, ``best_epoch``, ``test_auc``,
        ``test_auc_augmented``, ``test_auroc_ci`` (class -> ``n``, ``n_pos``, ``auroc``,
        ``auroc_ci``: the positive class, or each class with more than two), ``epochs`` (run),
        ``history`` (merged per-epoch logs), ``warnings`` (``learning_health`` records: best
        epoch the first, a test AUROC interval containing 0.5); or,
        when the same run is already finished at ``best_model``, the summary of
        ``training_setup.finished_run_result`` (``complete`` True), nothing touched.
    """
    given = options.pop("given_options", None)
    opts = script_utils.resolve_options(get_args_parser(), (train_dir, val_dir, test_dir), options)
    given = set(options) if given is None else set(given)
    opts, _ = script_utils.apply_model_recipe(opts, opts["resume_from"], given)
    opts = run_options.options_from(options_class(), patch_model_settings(opts, given))
    return ts.run_trainer(opts, _ImageTrainer())


def _report(opts, json_path, hists, ckpt, test, is_chief=True):
    import dm_keras_ext
    import training_runs

    result = dict(best_model=opts["best_model"], options_json=str(json_path),
                  best_val_auc=float(ckpt.best_auc), best_epoch=ckpt.best_epoch,
                  epochs=sum(len(h.epoch) for h in hists), history=ts.merge_history(hists),
                  test_auc=None, test_auc_augmented=None, test_auroc_ci={})
    result["warnings"] = ts.best_epoch_warnings(opts, ckpt.best_epoch, result["epochs"],
                                                "val_auc")
    if not is_chief:
        logger.info("Multi-worker run: the chief worker reports the test result")
        return result
    if ckpt.best_epoch is None:
        raise ValueError(f"no epoch produced a validation AUROC, so no model was saved to "
                         f"{opts['best_model']} (any file there is from an earlier run)")
    best = dm_keras_ext.robust_load_model(opts["best_model"])
    calc = training_runs.DMAucModelCheckpoint.calc_test_auc
    auc, y_true, y_pred = calc(test, best, return_y_res=True)
    result["test_auc"] = float(auc)
    result["test_auc_augmented"] = float(calc(test, best, test_augment=True))
    result["test_auroc_ci"] = _test_auroc_health(opts, y_true, y_pred, result["warnings"])
    logger.info("Training summary: %d epochs, best validation AUROC %.4f at epoch %d, "
                "model %s", result["epochs"], result["best_val_auc"], result["best_epoch"],
                result["best_model"])
    logger.info("Test AUROC %.4f, with flip augmentation %.4f (%d images)",
                result["test_auc"], result["test_auc_augmented"], test.nb_sample)
    ts.log_warnings(result["warnings"])
    return result


def _test_auroc_health(opts, y_true, y_pred, warnings):
    """The test AUROC with its 95 % bootstrap interval of the last class (two classes) or of
    each class against the rest (more), as ``{class: {n, n_pos, auroc, auroc_ci}}``; a
    ``learning_health`` warning is appended to ``warnings`` for each interval containing 0.5."""
    import numpy as np

    import eval_metrics
    import learning_health

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred, dtype=np.float64)
    labels = y_true.argmax(axis=-1) if y_true.ndim == 2 else y_true.astype(int).ravel()
    k = len(opts["class_list"])
    scores = y_pred if y_pred.ndim == 2 and y_pred.shape[1] == k else \
        np.column_stack([1 - y_pred.ravel(), y_pred.ravel()])
    out = {}
    for c in (range(k) if k > 2 else [k - 1]):
        name = opts["class_list"][c]
        out[name] = learning_health.auroc_with_ci(labels == c, scores[:, c],
                                                  eval_metrics.DEFAULT_N_BOOT, ts.run_seed(opts))
        logger.info("Test AUROC of %r against the rest: %s (%s)", name, _fmt(out[name]["auroc"]),
                    eval_metrics.format_ci(out[name]["auroc_ci"]))
        warnings += learning_health.auroc_warnings(
            out[name]["auroc"], out[name]["auroc_ci"], f"whole-image test ({name!r} vs rest)",
            opts["best_model"])
    return out


def main(argv=None):
    """Parse ``argv``, check the options, train and report; returns ``run``'s result."""
    result = script_utils.checked_main(get_args_parser(), validate_options, run, argv,
                                       pass_given=True)
    if result.get("complete"):
        print(f"the run of {result['best_model']} is complete (best validation AUROC "
              f"{result['best_value']:.4f} at epoch {result['best_epoch']}); nothing to do")
        return result
    print(f"best validation AUROC {result['best_val_auc']:.4f}; test AUROC "
          f"{_fmt(result['test_auc'])}, with flips {_fmt(result['test_auc_augmented'])}")
    ts.print_warnings(result["warnings"])
    return result


def _fmt(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


if __name__ == "__main__":
    main()
