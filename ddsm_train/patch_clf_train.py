"""Train a patch classifier in three stages (final dense layer, top layers, all layers).

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

Patches come from ``sample_patches_combined.py``: ``TRAIN_DIR``, ``VAL_DIR`` and ``TEST_DIR``
each hold one subfolder per class of ``--class-list``. With ImageNet weights (``--use-pretrained``,
read from the local Keras cache, never downloaded) or ``--resume-from`` three stages run: the
final dense layer (``--nb-epoch``), the layers from ``--top-layer-nb`` up
(``--top-layer-epochs``, lr x ``--top-layer-multiplier``), all layers (``--all-layer-epochs``,
lr x ``--all-layer-multiplier``); without them (a ``--net`` without ImageNet weights, such as
``yaroslav`` or ``dm_resnet14``, or ``--no-use-pretrained``) only stage 1 runs, on all layers.
The model with the best validation accuracy (``--auc-checkpoint``: the best mean one-vs-rest
validation AUROC; ``--last-epoch-model``: the last epoch's model, whatever the validation figures
say) is saved atomically to ``--best-model`` (options in ``<best-model>.options.json``); at the
end its test accuracy and loss are reported, and its test
confusion matrix (counts and row-normalised), accuracy next to the majority-class share and,
per class, support, recall, precision and one-vs-rest AUROC with its 95 % bootstrap interval are
written beside it (``<best-model>.test.confusion.csv`` / ``.png``,
``<best-model>.test.metrics.json``; with ``--test-augment`` each patch scored as the mean of
its 4 flips). Signs that the model learned nothing
(``learning_health``) are logged and printed as warnings and kept in that JSON.
"""
import argparse
import logging
import os

import script_utils  # first: puts the root dm_* modules and this folder on sys.path

script_utils.import_tensorflow_quietly()   # TensorFlow's start-up lines hidden

import common_flags as cf  # noqa: E402
import run_files  # noqa: E402
import run_options  # noqa: E402
import training_setup as ts  # noqa: E402

logger = logging.getLogger("patch_clf_train")

__all__ = ["get_args_parser", "options_class", "validate_options", "run", "main"]


def get_args_parser():
    """Command-line flags of the patch classifier trainer (the 2017 flags and short aliases)."""
    parser = argparse.ArgumentParser(description="Train a patch classifier (3 stages).")
    parser.add_argument("train_dir", help="train folder, one subfolder per class")
    parser.add_argument("val_dir", help="validation folder, which chooses the best model")
    parser.add_argument("test_dir", help="test folder, scored once at the end")
    cf.add_image_flags(parser, img_size=(256, 256), featurewise_mean=59.6, equalize_hist=True)
    cf.add_batch_flags(parser)
    cf.add_augmentation_flag(parser, False)
    cf.add_class_flags(parser, class_list=("background", "malignant", "benign"),
                       auto_batch_balance=False)
    cf.add_stage_flags(parser, nb_epoch=5, all_layer_epochs=20, all_layer_multiplier=0.01,
                       top_layer_epochs=10, top_layer_multiplier=0.1)
    cf.add_bool_flag(parser, "auc-checkpoint", False,
                     "keep the epoch with the best mean one-vs-rest validation AUROC as the "
                     "best model, instead of the best validation accuracy (which, on "
                     "imbalanced validation patches, rewards predicting the majority class)")
    cf.add_bool_flag(parser, "last-epoch-model", False,
                     "keep the last epoch's model as the best model (the validation figures "
                     "are still computed, logged and plotted) instead of the validation-chosen "
                     "epoch's: on a small validation set, whose figures vary more from epoch "
                     "to epoch than the model improves, their maximum picks noise")
    cf.add_bool_flag(parser, "test-augment", False,
                     "score each validation and test patch as the mean of its 4 flips (as "
                     "is, left-right, up-down, both): the validation AUROC of "
                     "--auc-checkpoint and the test figures, predictions and metrics files")
    cf.add_ram_flags(parser)
    n = parser.add_argument_group("network")
    n.add_argument("--net", dest="net", type=str, default="resnet50",
                   choices=cf.backbone_names(), metavar="NET",
                   help="backbone of the patch classifier: %(choices)s "
                        "(default: %(default)s)")
    cf.add_bool_flag(n, "use-pretrained", True, "start from local ImageNet weights")
    cf.add_optional_value_flag(n, "resume-from", str, None,
                               "patch model file to continue from, or a run's last-epoch "
                               "checkpoint (<best-model>.last.h5) to continue that run")
    for name, short, default in (("nb-init-filter", "-nif", 32), ("init-filter-size", "-ifs", 5),
                                 ("init-conv-stride", "-ics", 2),
                                 ("max-pooling-size", "-mps", 2),
                                 ("max-pooling-stride", "-mpr", 2)):
        n.add_argument(f"--{name}", short, dest=name.replace("-", "_"), type=cf.positive_int,
                       default=default,
                       help="stem of the dm_resnet14 builder; accepted and unused for the "
                            "ImageNet backbones, as in 2017 (default: %(default)s)")
    n.add_argument("--alpha", dest="alpha", type=cf.nonneg_float, default=1e-4,
                   help="elastic-net penalty, kept for the 2017 ResNet builder "
                        "(default: %(default)s)")
    n.add_argument("--l1-ratio", dest="l1_ratio", type=cf.fraction, default=0.0,
                   help="L1 share of the elastic-net penalty, kept for the 2017 ResNet "
                        "builder (default: %(default)s)")
    n.add_argument("--inp-dropout", "-id", dest="inp_dropout", type=cf.unit_interval, default=0.0,
                   help="input dropout of dm_resnet14 (default: %(default)s)")
    cf.add_training_flags(parser, best_model="./modelState/patch_clf.h5")
    return parser


options_class = run_options.tool_options_class(get_args_parser, "PatchTrainOptions")


def validate_options(opts, nb_devices=None):
    """Stop on contradictory options before any work (ValueError with one clear message)."""
    if opts["resume_from"] is not None and not os.path.isfile(opts["resume_from"]):
        raise ValueError(f"model file not found: {opts['resume_from']}")
    ts.check_class_dirs({"TRAIN_DIR": opts["train_dir"], "VAL_DIR": opts["val_dir"],
                         "TEST_DIR": opts["test_dir"]}, opts["class_list"])
    if nb_devices is None:
        nb_devices = script_utils.get_num_gpu_devices()
    train_bs = int(opts["batch_size"] * opts["train_bs_multiplier"])
    if train_bs < 1:
        raise ValueError(f"--batch-size {opts['batch_size']} x --train-bs-multiplier "
                         f"{opts['train_bs_multiplier']} gives a train batch of {train_bs}")
    ts.check_batch_vs_devices(train_bs, nb_devices, "train batch size (batch size x multiplier)")
    ts.check_batch_vs_devices(opts["batch_size"], nb_devices, "--batch-size")
    for name in ("nb_epoch", "top_layer_epochs", "all_layer_epochs"):
        if opts[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} should be >= 0, got {opts[name]}")
    stages = (("nb_epoch", "top_layer_epochs", "all_layer_epochs")
              if opts["use_pretrained"] and opts["resume_from"] is None else ("nb_epoch",))
    if not any(opts[name] for name in stages):
        raise ValueError("nothing to train: " + " and ".join(
            f"--{n.replace('_', '-')}" for n in stages) + " are all 0" * (len(stages) > 1)
            + " is 0" * (len(stages) == 1) + " (without --use-pretrained only the first "
            "stage runs)" * (len(stages) == 1))
    if not opts["init_lr"] > 0:
        raise ValueError(f"--init-learningrate should be > 0, got {opts['init_lr']}")



def _build_model(opts, nb_class):
    import dm_keras_ext

    model, preprocess, top_layer_nb = dm_keras_ext.get_dl_model(
        opts["net"], nb_class=nb_class,
        use_pretrained=opts["use_pretrained"] and opts["resume_from"] is None,
        resume_from=opts["resume_from"], top_layer_nb=opts["top_layer_nb"],
        safe_mode=not opts["trust_model_file"],
        weight_decay=opts["weight_decay"], hidden_dropout=opts["hidden_dropout"],
        nb_init_filter=opts["nb_init_filter"], init_filter_size=opts["init_filter_size"],
        init_conv_stride=opts["init_conv_stride"], max_pooling_size=opts["max_pooling_size"],
        max_pooling_stride=opts["max_pooling_stride"], inp_dropout=opts["inp_dropout"],
        alpha=opts["alpha"], l1_ratio=opts["l1_ratio"])
    if model.output_shape[-1] != nb_class:
        raise ValueError(f"the model has {model.output_shape[-1]} outputs but --class-list "
                         f"names {nb_class} classes {opts['class_list']}")
    dm_keras_ext.check_top_layer_nb(model, opts["top_layer_nb"])
    return model, preprocess, top_layer_nb


class _PatchTrainer(ts.TrainerSpec):
    """What the patch trainer adds to ``training_setup.run_trainer``."""

    stages, unit = "train_3stage", "patches"

    validate_options = staticmethod(validate_options)

    def build(self, opts, nb_class):
        model, preprocess, top_layer_nb = _build_model(opts, nb_class)
        return model, top_layer_nb, (opts.net if preprocess and not opts.featurewise_center
                                     else None)

    def checkpointer(self, opts, val, extras):
        import training_runs

        if opts.auc_checkpoint:
            return training_runs.DMAucModelCheckpoint(opts.best_model, val, extras=extras,
                                                      test_augment=opts.test_augment,
                                                      keep_last=opts.last_epoch_model)
        if opts.last_epoch_model:
            return training_runs.BestModelCheckpoint(opts.best_model, extras=extras,
                                                     keep_last=True)
        return None             # train_3stage keeps the best validation accuracy

    def plan(self, opts, top_layer_nb):
        import dm_resnet

        staged = opts.resume_from is not None or (
            opts.use_pretrained and dm_resnet.get_backbone(opts.net).weights_file is not None)
        return opts.replace(top_layer_nb=top_layer_nb, use_pretrained=staged)

    def model_info(self, opts):
        return {"net": opts.net}          # read by image_clf_train.py

    def report(self, opts, json_path, hists, context):
        return _report(opts, json_path, hists, context["test"], context["is_chief"])


@run_files.releases_locks
def run(train_dir, val_dir, test_dir, **options):
    """Train a patch classifier and report its test accuracy.

    Args:
        train_dir, val_dir, test_dir: folders with one subfolder per class of ``class_list``.
        **options: the command-line options by destination name (see ``get_args_parser``);
            missing ones take the parser's defaults.

    Returns:
        dict: ``best_model``, ``options_json``, ``best_val_accuracy``, ``best_epoch``,
        ``epochs``, ``stages``, ``history`` (merged per-epoch logs), ``test_loss``,
        ``test_accuracy``, ``test_confusion`` (``eval_metrics.confusion_report`` with the
        paths of its files), ``warnings`` (``learning_health`` records: best epoch the first,
        a class never or almost never predicted, test accuracy not above the majority-class
        share, a one-vs-rest test AUROC interval containing 0.5); or, when the same run is already finished at ``best_model``, the
        summary of ``training_setup.finished_run_result`` (``complete`` True), nothing
        touched.
    """
    opts = run_options.options_from(options_class(), script_utils.resolve_options(
        get_args_parser(), (train_dir, val_dir, test_dir), options))
    return ts.run_trainer(opts, _PatchTrainer())


def _report(opts, json_path, hists, test, is_chief=True):
    import numpy as np

    import dm_keras_ext

    history = ts.merge_history(hists)
    val_acc = history.get("val_accuracy", [])
    chosen = history.get("val_auc", []) if opts.get("auc_checkpoint") else val_acc
    peak = int(np.nanargmax(chosen)) if chosen and not np.all(np.isnan(chosen)) else None
    # the kept model: the last epoch's with --last-epoch-model, else the validation peak's
    best = len(val_acc) - 1 if opts.get("last_epoch_model") and val_acc else peak
    result = dict(best_model=opts["best_model"], options_json=str(json_path),
                  epochs=len(history.get("loss", [])), stages=[h.stage for h in hists],
                  history=history,
                  best_val_accuracy=val_acc[best] if best is not None and val_acc else None,
                  best_epoch=best + 1 if best is not None else None,
                  best_by=("last_epoch" if opts.get("last_epoch_model") else
                           "val_auc" if opts.get("auc_checkpoint") else "val_accuracy"),
                  test_loss=None, test_accuracy=None)
    # a validation figure that never improved on the first epoch is a warning whichever
    # epoch's model is kept
    result["warnings"] = ts.best_epoch_warnings(
        opts, peak + 1 if peak is not None else None, result["epochs"],
        "val_auc" if opts.get("auc_checkpoint") else "val_accuracy")
    if not is_chief:
        logger.info("Multi-worker run: the chief worker reports the test result")
        return result
    if not val_acc:
        raise ValueError(f"no epoch produced a validation accuracy, so no model was saved to "
                         f"{opts['best_model']} (any file there is from an earlier run)")
    best = dm_keras_ext.robust_load_model(opts["best_model"])
    best.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"])
    loss, acc = best.evaluate(test, verbose=0)
    result.update(test_loss=float(loss), test_accuracy=float(acc))
    result["test_confusion"] = _test_confusion(best, test, opts, result["warnings"])
    logger.info("Training summary: stages %s, %d epochs, kept epoch %d (%s; its validation "
                "accuracy %.4f), model %s", result["stages"], result["epochs"],
                result["best_epoch"], result["best_by"], result["best_val_accuracy"],
                result["best_model"])
    logger.info("Test accuracy %.4f, loss %.4f (%d patches)", acc, loss, test.nb_sample)
    ts.log_warnings(result["warnings"])
    return result


def _test_confusion(model, test, opts, warnings):
    """Confusion matrix and per-class figures (support, recall, precision, one-vs-rest AUROC
    with its bootstrap interval) of ``model`` on the test patches, written beside the model:
    ``<best-model>.test.confusion.csv`` / ``.png`` and ``<best-model>.test.metrics.json``
    (``eval_metrics.write_confusion_report``). The learning-health warnings of the test
    figures are appended to ``warnings``, which the metrics JSON then holds as ``warnings``."""
    import numpy as np

    import eval_metrics
    import learning_health
    import training_runs

    labels, probs = [], []
    for k in range(len(test)):
        x, y = test[k][:2]
        probs.append(training_runs.predict_flip_mean(model, x, test_augment=True)
                     if opts.get("test_augment") else model.predict(x, verbose=0))
        labels.append(np.asarray(y).argmax(axis=-1) if np.ndim(y) == 2 else np.asarray(y))
    labels, probs = np.concatenate(labels), np.concatenate(probs)
    rep = eval_metrics.write_confusion_report(labels, probs, opts["class_list"],
                                              f"{opts['best_model']}.test",
                                              seed=ts.run_seed(opts))
    rep["predictions_csv"] = str(_write_test_predictions(test, labels, probs, opts))
    rep["scores"] = "flips" if opts.get("test_augment") else "no flips"
    warnings += learning_health.patch_test_warnings(rep, rep["metrics_json"])
    rep["warnings"] = list(warnings)
    eval_metrics.write_json_atomic(rep, rep["metrics_json"])
    logger.info("Test confusion matrix (rows true %s): %s; accuracy %.4f (majority class "
                "share %.4f); in %s", opts["class_list"], rep["counts"], rep["accuracy"],
                rep["majority_share"], rep["confusion_png"])
    for name, c in rep["per_class"].items():
        logger.info("  %s: %d patches, predicted %d, recall %s, precision %s, one-vs-rest "
                    "AUROC %s (%s)", name, c["support"], c["predicted"], _fmt(c["recall"]),
                    _fmt(c["precision"]), _fmt(c["auroc"]), eval_metrics.format_ci(c["auroc_ci"]))
    return rep


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def _write_test_predictions(test, labels, probs, opts):
    """``<best-model>.test.predictions.csv``: one row per test patch with its file
    (``image_index``, relative to the test folder), ``patient_id`` (the name's part before
    ``_LEFT_`` / ``_RIGHT_``), true class, each class's probability (``p_<class>``) and the
    lesion score ``lesion_pred`` = 1 - P(first class, the background) with ``lesion_label``
    (1 for every other class): what cross-validation pools into a patch-level AUROC."""
    import csv
    import re

    from dm_image import atomic_write

    names = list(getattr(test, "filenames", []))
    if len(names) != len(labels):     # an iterator without file names (in memory)
        names = [f"patch{k}" for k in range(len(labels))]
    classes = list(opts["class_list"])
    columns = (["image_index", "patient_id", "label", "class"] + [f"p_{c}" for c in classes]
               + ["lesion_pred", "lesion_label"])

    def write(fh):
        out = csv.writer(fh)
        out.writerow(columns)
        for name, y, p in zip(names, labels, probs):
            stem = os.path.splitext(name.replace(os.sep, "/"))[0]
            patient = re.split(r"_(?:LEFT|RIGHT)_", os.path.basename(stem), maxsplit=1)[0]
            out.writerow([stem, patient, int(y), classes[int(y)], *(f"{v:.6g}" for v in p),
                          f"{1.0 - float(p[0]):.6g}", int(int(y) != 0)])

    return atomic_write(f"{opts['best_model']}.test.predictions.csv", write, text=True)


def main(argv=None):
    """Parse ``argv``, check the options, train and report; returns ``run``'s result."""
    result = script_utils.checked_main(get_args_parser(), validate_options, run, argv)
    if result.get("complete"):
        print(f"the run of {result['best_model']} is complete (best validation accuracy "
              f"{result['best_value']:.4f} at epoch {result['best_epoch']}); nothing to do")
        return result
    if result["test_accuracy"] is not None:
        print(f"best validation accuracy {result['best_val_accuracy']:.4f}; test accuracy "
              f"{result['test_accuracy']:.4f}, loss {result['test_loss']:.4f}")
    ts.print_warnings(result["warnings"])
    return result


if __name__ == "__main__":
    main()
