"""What the two trainers (``patch_clf_train.py``, ``image_clf_train.py``) share before and
around training.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

Before any model is built: the class folders and the batch size are checked
(:func:`check_class_dirs`, :func:`check_batch_vs_devices`), then :func:`begin_training_run`
makes the ``tf.distribute`` strategy, logs the options, finds an unfinished run to resume by the
run's identity (:func:`run_identity`), seeds every RNG and sets the precision policy. Around
training: the data iterators of the options (:func:`iterators_from_options`, with the 2017
augmentation :data:`AUGMENTATION_2017`), the input recipe stored in every model file the run
writes (:func:`training_recipe`, :func:`model_file_extras`) and the run's files beside
``--best-model`` (:func:`run_file_kwargs`). The run itself, the same for both trainers
(checks, model, recipe, data, stages, final save), is :func:`run_trainer`; a trainer gives
what differs as a :class:`TrainerSpec` (its checks, model, stage plan, report). At the end a
trainer reports its ``learning_health`` warnings (:func:`best_epoch_warnings`,
:func:`log_warnings`, :func:`print_warnings`).

Importing this module does not import TensorFlow; the functions that need it import it.
"""
import json
import logging
import os
from pathlib import Path

from common_flags import NOSAVE
from script_utils import check_input_levels, get_num_cpu_cores, get_num_gpu_devices, \
    get_random_seed, log_options, options_json_path, options_sidecar, read_csv_table

__all__ = [
    "check_batch_vs_devices", "env_summary", "check_class_dirs",
    "RUN_NEUTRAL_OPTIONS", "MODEL_SOURCE_OPTIONS", "run_identity", "RunComplete",
    "check_earlier_run", "begin_training_run", "finished_run_result",
    "run_file_kwargs",
    "AUGMENTATION_2017", "build_data_iterators", "iterators_from_options",
    "training_recipe", "model_file_extras",
    "TrainerSpec", "run_trainer", "merge_history", "stage_run",
    "run_seed", "best_epoch_warnings", "log_warnings", "print_warnings",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- checks
def check_batch_vs_devices(batch_size, nb_devices, what="batch size"):
    """Raise ValueError when a global batch cannot give each replica at least one sample."""
    if batch_size < nb_devices:
        raise ValueError(f"{what} {batch_size} is below the number of devices {nb_devices} "
                         f"(NUM_GPU_DEVICES / workers); each device needs at least one sample")


def env_summary(seed=None):
    """Environment settings of a run: ``NUM_CPU_CORES``, ``NUM_GPU_DEVICES``, ``RANDOM_SEED``
    (``seed``, the ``--seed`` of the run, when given; else the environment variable)."""
    return {"NUM_CPU_CORES": get_num_cpu_cores(), "NUM_GPU_DEVICES": get_num_gpu_devices(),
            "RANDOM_SEED": get_random_seed() if seed is None else int(seed)}


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
            found), holds empty (zero-byte) image files (named, with their count), or is in
            ``need_two_classes`` with images of fewer than two classes.
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
        warn_images_beside(folder, class_list, label)
        _refuse_empty_images(label, folder, class_list)
        if label in need_two_classes:
            counts = {c: len(_class_images(folder / c)) for c in class_list}
            if sum(1 for n in counts.values() if n) < 2:
                raise ValueError(f"{label} {folder} has images of fewer than two classes "
                                 f"({counts}): its AUROC is undefined, so no best model could "
                                 f"be chosen")
        _check_manifest(label, folder, class_list)


def _refuse_empty_images(label, folder, class_list) -> None:
    """Refuse a set whose class folders hold zero-byte image files (a killed copy or a full
    disk): read as images they would feed the training garbage, found only as a diverged
    loss much later."""
    from dm_image import IMG_EXTENSIONS

    empty = []
    for cls in class_list:
        with os.scandir(Path(folder) / cls) as entries:
            empty += sorted(e.path for e in entries
                            if e.name.rsplit(".", 1)[-1].lower() in IMG_EXTENSIONS
                            and e.is_file() and e.stat().st_size == 0)
    if empty:
        raise ValueError(f"{label} {folder}: {len(empty)} empty (zero-byte) image file(s), e.g. "
                         f"{empty[0]}; remove them or write them again")


def warn_images_beside(folder, class_list, label) -> int:
    """Warn (count and an example) about image files directly in ``folder``, beside its class
    subfolders: they belong to no class and are left out. Returns their count."""
    from dm_image import IMG_EXTENSIONS

    beside = sorted(p.name for p in Path(folder).iterdir() if p.is_file()
                    and p.suffix.lower().lstrip(".") in IMG_EXTENSIONS)
    if beside:
        logger.warning("%s %s: %d image(s) lie beside the class folders %s and are left out "
                       "(e.g. %s); move them into a class folder", label, folder, len(beside),
                       list(class_list), beside[0])
    return len(beside)


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


# --------------------------------------------------------------------------- the run
#: Options that do not change what a training run computes: left out of its options hash, so
#: that changing them does not stop ``--auto-resume``.
RUN_NEUTRAL_OPTIONS = ("auto_resume", "tensorboard_dir", "final_model", "img_cache_dir",
                       "trust_model_file", "overwrite")
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

    # ``--seed`` counts through its value, RANDOM_SEED: ``--seed 7`` and RANDOM_SEED=7 are one run
    options = {k: v for k, v in opts.items() if k not in RUN_NEUTRAL_OPTIONS + ("seed",)}
    options.update(RANDOM_SEED=env["RANDOM_SEED"], NUM_GPU_DEVICES=env["NUM_GPU_DEVICES"])
    options = json.loads(json.dumps(options, sort_keys=True, default=str))

    def digest(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    training = {k: v for k, v in options.items() if k not in MODEL_SOURCE_OPTIONS}
    return {"options": options, "options_hash": digest(options),
            "training_hash": digest(training), "source_options": list(MODEL_SOURCE_OPTIONS),
            "seed": env["RANDOM_SEED"]}


class RunComplete(Exception):
    """The run asked for is already finished at ``--best-model``; ``state`` is its checkpoint's
    training state (``training_runs.read_training_state``)."""

    def __init__(self, state):
        super().__init__(f"the run of {state.get('best_model')} is complete")
        self.state = state


def check_earlier_run(opts, identity):
    """What to do with the files an earlier run left at ``--best-model``.

    The run's last-epoch checkpoint (``<best-model>.last.h5``) tells whose files they are:
    a finished run with this run's identity means there is nothing to do
    (:class:`RunComplete`, unless ``--overwrite``); an unfinished one of this run is resumed
    or restarted as ``--auto-resume`` says. A best model that stores this run's identity
    (the run was stopped before its first checkpoint) is this run's: it starts again. Any other model file at ``--best-model`` (another
    command's run, or a file without a checkpoint) is refused unless ``--overwrite``, so that a
    second command cannot silently replace a first one's model.

    Raises:
        RunComplete: the same run is finished and its best model is there.
        ValueError: ``--best-model`` holds another run's model and ``--overwrite`` is off.
    """
    import training_runs

    best = opts["best_model"]
    checkpoint = training_runs.last_checkpoint_path(best)
    state = None
    if Path(checkpoint).is_file():
        try:
            state = training_runs.read_training_state(checkpoint)
        except (OSError, ValueError) as err:
            logger.warning("cannot read the checkpoint %s (%s)", checkpoint, err)
    same = state is not None and state.get("run", {}).get("options_hash") == \
        identity["options_hash"]
    if same and state.get("finished") and Path(best).is_file() and not opts.get("overwrite"):
        raise RunComplete(state)
    if same or not Path(best).is_file() or opts.get("overwrite") or _own_model(best, identity):
        return
    resume_from = opts.get("resume_from")
    if resume_from and Path(resume_from).is_file():   # continuing a run into this model
        try:
            source = training_runs.read_training_state(resume_from)
        except (OSError, ValueError):
            source = None
        if source is not None and not source.get("finished") and source.get("best_model") \
                and Path(source["best_model"]).resolve() == Path(best).resolve():
            return
    if state is None:
        whose = "a model file of unknown origin (no checkpoint of its run beside it)"
    else:
        old = state.get("run", {}).get("options", {})
        diff = sorted(k for k in set(old) | set(identity["options"])
                      if old.get(k) != identity["options"].get(k))
        whose = f"the model of another run (options that differ: {diff or 'unknown'})"
    raise ValueError(f"--best-model {best} holds {whose}; pass --overwrite to replace it, or "
                     f"choose another --best-model")


def _own_model(best, identity) -> bool:
    """Whether the model file ``best`` was written by this run (its stored run identity): a
    run killed after saving its best model but before its checkpoint starts again there."""
    import dm_keras_ext

    run = dm_keras_ext.read_model_run(best) or {}
    if run.get("options_hash") != identity["options_hash"]:
        return False
    logger.info("--best-model %s was written by this run before it was stopped (no checkpoint "
                "of it yet): starting the run again", best)
    return True


def finished_run_result(opts, state, json_path):
    """The summary of a finished run from its checkpoint's state (nothing is recomputed).

    Returns:
        dict: ``complete`` (True), ``best_model``, ``options_json``, ``epochs``, ``history``
        (merged per-epoch logs), ``best_value`` and ``best_epoch`` (of the run's monitored
        quantity ``monitor``).
    """
    history = {}
    for row in state.get("rows", []):
        for key, value in row.get("logs", {}).items():
            history.setdefault(key, []).append(float(value))
    best = state.get("best") or {}
    logger.info("The run of %s is complete (epoch %d, best %s %s at epoch %s): nothing to do; "
                "--overwrite trains again", opts["best_model"], state.get("epoch", 0),
                best.get("monitor"), best.get("value"), best.get("epoch"))
    return dict(complete=True, best_model=opts["best_model"], options_json=str(json_path),
                epochs=int(state.get("epoch", 0)), history=history,
                monitor=best.get("monitor"), best_value=best.get("value"),
                best_epoch=best.get("epoch"))


def begin_training_run(opts, validate):
    """The start both trainers share, before any model is built.

    Makes the ``tf.distribute`` strategy of ``NUM_GPU_DEVICES`` (first: multi-worker set-up
    needs it), runs ``validate(opts, replicas)``, logs the options (saved as JSON with the
    run's first model), finds an unfinished run to resume (``--auto-resume``,
    ``--resume-from`` of a checkpoint), seeds every RNG with ``RANDOM_SEED`` and sets the
    ``--mixed-precision`` policy. Files of an earlier run at ``--best-model`` are checked
    first (:func:`check_earlier_run`): the same finished run raises :class:`RunComplete`,
    another run's model is refused unless ``--overwrite``.

    Returns:
        ``(env, strategy, options_record, run_identity, resume)``; the options record
        (``script_utils.log_options``) is written as ``<best-model>.options.json`` with the
        run's first model (:func:`model_file_extras`).
    """
    import dm_multi_gpu
    import tf_keras as keras
    import training_runs

    env = env_summary(opts.get("seed"))
    strategy = dm_multi_gpu.get_strategy(env["NUM_GPU_DEVICES"])
    validate(opts, strategy.num_replicas_in_sync)
    _check_tensorboard_dir(opts.get("tensorboard_dir"))
    claim_run_files(opts)
    identity = run_identity(opts, env)
    check_earlier_run(opts, identity)
    record = log_options(opts, env)
    resume = training_runs.resolve_resume(
        training_runs.last_checkpoint_path(opts["best_model"]), identity,
        auto_resume=opts["auto_resume"], resume_from=opts["resume_from"])
    keras.utils.set_random_seed(env["RANDOM_SEED"])
    dm_multi_gpu.set_precision_policy(opts["mixed_precision"])
    return env, strategy, record, identity, resume


def _check_tensorboard_dir(folder):
    """``--tensorboard-dir`` must be a folder or a path where one can be made."""
    if folder and os.path.lexists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--tensorboard-dir {folder} is not a folder (a file is there)")


def _is_chief() -> bool:
    """Whether this process is the one that writes the model files of a multi-worker run."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return True
    try:
        config = json.loads(raw)
        task, cluster = config.get("task", {}), config.get("cluster", {})
    except (ValueError, AttributeError):
        return True
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def claim_run_files(opts):
    """Check a training run's paths and take its lock, before anything is written.

    Refuses (``run_files.check_run_paths``) a ``--best-model``, ``--final-model``, checkpoint or
    ``--tensorboard-dir``/``--img-cache-dir`` that is an input model file or lies in a data
    folder, and two outputs at one path; the checkpoint ``<best>.last.h5`` may be the
    ``--resume-from`` file (a resumed run replaces it). Then holds ``<best_model>.lock``
    (``run_files.RunLock``, released when the trainer's ``run`` ends) and removes leftovers of
    killed writes beside the model files.
    """
    import run_files
    from training_runs import last_checkpoint_path

    best = opts["best_model"]
    final = opts.get("final_model")
    final = None if final in (None, "", NOSAVE) else final
    run_files.check_run_paths(
        input_files={"--patch-model-state": opts.get("patch_model_state"),
                     "--resume-from": opts.get("resume_from")},
        input_dirs={"TRAIN_DIR": opts.get("train_dir"), "VAL_DIR": opts.get("val_dir"),
                    "TEST_DIR": opts.get("test_dir")},
        output_files={"--best-model": best, "--final-model": final,
                      "the checkpoint": last_checkpoint_path(best)},
        output_dirs={"--tensorboard-dir": opts.get("tensorboard_dir"),
                     "--img-cache-dir": opts.get("img_cache_dir")},
        may_replace=[("the checkpoint", "--resume-from")])
    if _is_chief():
        run_files.RunLock(best, "--best-model").acquire()
    run_files.clean_leftovers(*{str(Path(p).absolute().parent) for p in (best, final) if p})


def run_file_kwargs(opts, env, identity, resume):
    """Keyword arguments of ``training_runs.do_2stage_training``/``do_3stage_training`` for the
    run's files beside ``--best-model``: ``.last.h5`` (checkpoint), ``.log.csv``,
    ``.curves.png``; the seed, the run's identity, the state to resume and, with
    ``--tensorboard-dir``, a TensorBoard callback."""
    import training_runs

    best = opts["best_model"]
    callbacks = []
    if opts.get("tensorboard_dir"):
        import tf_keras as keras

        callbacks.append(keras.callbacks.TensorBoard(log_dir=opts["tensorboard_dir"]))
        logger.info("TensorBoard logs: %s", opts["tensorboard_dir"])
    logger.info("Run files: %s (last epoch), %s, %s", training_runs.last_checkpoint_path(best),
                training_runs.training_log_path(best), training_runs.training_curves_path(best))
    return dict(seed=env["RANDOM_SEED"], checkpoint_path=training_runs.last_checkpoint_path(best),
                log_csv=training_runs.training_log_path(best),
                curves_png=training_runs.training_curves_path(best), resume_state=resume,
                run_info=identity, callbacks=callbacks)


# --------------------------------------------------------------------------- data
#: Train-time augmentation of ``--augmentation``: random horizontal and vertical flips,
#: rotation up to 25 degrees, shear up to 0.2 radians, zoom 0.8-1.2 drawn per axis, channel
#: shift up to 20 intensity levels, nearest fill (the 2017 settings, Keras 2.0 units).
AUGMENTATION_2017 = dict(horizontal_flip=True, vertical_flip=True, rotation_range=25.0,
                         shear_range=0.2, zoom_range=(0.8, 1.2), channel_shift_range=20.0,
                         fill_mode="nearest")


def build_data_iterators(opts, *, train_batch_size, dup_3_channels, preprocess, seed):
    """Train, validation and test iterators over class folders (``dm_image`` generators).

    Args:
        opts: the options (a mapping or a trainer's options object): ``train_dir``,
            ``val_dir``, ``test_dir``, ``img_size``, ``img_scale``, ``rescale_factor``,
            ``featurewise_center``, ``featurewise_mean``, ``equalize_hist``,
            ``augmentation``, ``class_list``, ``auto_batch_balance``, ``batch_size``,
            ``load_train_ram``, ``load_val_ram`` and, optional, ``img_cache_dir``.
        train_batch_size: the train batch.
        dup_3_channels: copy the grey channel to 3 channels.
        preprocess: function applied to each batch (a backbone's ``preprocess_input``), or
            None.
        seed: the train iterator's shuffling seed.

    Per image: read and resize to ``img_size``, ``img_scale``/``rescale_factor`` (0..255
    scale), optional histogram equalisation, channel copy when ``dup_3_channels``, augmentation
    (train only), featurewise centring with ``featurewise_mean``, then ``preprocess`` on the
    batch. The train iterator shuffles (``seed``) and, with ``auto_batch_balance``, yields
    sample weights; validation and test keep file order. ``load_*_ram`` caches a set in memory
    (``load_dat_ram``) and iterates over the cache; ``img_cache_dir`` keeps the resized images
    as ``.npy`` files there (``dm_image.cached_read``), for every set.

    Returns:
        (train, val, test) tf-keras Sequences yielding ``(x, y[, w])``; x float32
        (B, H, W, C), y one-hot.
    """
    from dm_image import DMImageDataGenerator, load_dat_ram

    cache_dir = opts.get("img_cache_dir")
    read = dict(target_scale=opts["img_scale"], rescale_factor=opts["rescale_factor"],
                equalize_hist=opts["equalize_hist"], dup_3_channels=dup_3_channels,
                preprocess=preprocess)

    def make(imgen, folder, bs, shuffle, balance, in_ram):
        it = imgen.flow_from_directory(folder, target_size=tuple(opts["img_size"]),
                                       classes=opts["class_list"], class_mode="categorical",
                                       batch_size=bs, shuffle=shuffle, seed=seed,
                                       auto_batch_balance=balance, cache_dir=cache_dir,
                                       **read)
        if not in_ram:
            return it
        X, y = load_dat_ram(it)
        logger.info("Loaded %d images of %s into RAM (%.1f MB)", len(X), folder, X.nbytes / 1e6)
        return imgen.flow(X, y, batch_size=bs, shuffle=shuffle, seed=seed,
                          auto_batch_balance=balance, **read)

    center = opts["featurewise_center"]
    train_imgen = DMImageDataGenerator(featurewise_center=center,
                                       **(AUGMENTATION_2017 if opts["augmentation"] else {}))
    eval_imgen = DMImageDataGenerator(featurewise_center=center)
    if center:
        train_imgen.mean = eval_imgen.mean = opts["featurewise_mean"]
    train = make(train_imgen, opts["train_dir"], train_batch_size, True,
                 opts["auto_batch_balance"], opts["load_train_ram"])
    val = make(eval_imgen, opts["val_dir"], opts["batch_size"], False, False,
               opts["load_val_ram"])
    test = make(eval_imgen, opts["test_dir"], opts["batch_size"], False, False, False)
    return train, val, test


def iterators_from_options(opts, channels, preprocess, seed):
    """:func:`build_data_iterators` from a training script's options.

    Returns:
        (train, val, test, train_batch_size); the train batch is ``--batch-size`` x
        ``--train-bs-multiplier``.
    """
    train_bs = int(opts["batch_size"] * opts["train_bs_multiplier"])
    train, val, test = build_data_iterators(opts, train_batch_size=train_bs,
                                            dup_3_channels=channels == 3,
                                            preprocess=preprocess, seed=seed)
    return train, val, test, train_bs


# --------------------------------------------------------------------------- input recipes
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

    return InputRecipe.from_options(opts, channels=int(channels), preprocess=preprocess)


def model_file_extras(opts, record, recipe, info=None, identity=None):
    """What the run's model files carry (``dm_keras_ext.ModelFileExtras``): ``recipe`` (an
    ``dm_image.InputRecipe``, also added to the options ``record`` under ``input_recipe``),
    ``info`` (what the model is, e.g. ``{"net": ...}``), the run's ``options_hash`` of
    ``identity`` (:func:`run_identity`) and, with the first best model, the options JSON
    ``<best-model>.options.json`` of ``record``."""
    import dm_keras_ext

    logger.info("input recipe: %s", recipe.to_json())
    record["input_recipe"] = recipe.to_dict()
    run = {"options_hash": identity["options_hash"]} if identity else None
    return dm_keras_ext.ModelFileExtras(recipe=recipe, info=info, run=run,
                                        sidecar=options_sidecar(opts["best_model"], record))


# --------------------------------------------------------------------------- the run skeleton
class TrainerSpec:
    """What one trainer adds to the run skeleton of :func:`run_trainer`.

    A trainer module subclasses it (or passes an instance with these methods):
    ``validate(opts, nb_devices)`` checks the options (by default the trainer's
    ``validate_options(opts, nb_devices)``, then the training images' levels against the
    scale); ``build(opts, nb_class)`` returns
    ``(model, top_layer_nb, preprocess_net)`` (the backbone whose ``preprocess_input`` the
    iterators apply, or None); ``plan(opts, top_layer_nb)`` the options passed whole to the
    staged training; ``checkpointer(opts, val, extras)`` its best-model callback (saving with ``extras``) (None: the staged
    training's own); ``report(opts, json_path, hists, context)`` the run's result.

    Attributes:
        stages: the name of the ``training_runs`` staged training (``"train_3stage"`` or
            ``"train_2stage"``), looked up when the run starts.
        unit: what one sample is (``"patches"``, ``"images"``), for the log.
    """

    stages = "train_3stage"
    unit = "samples"

    def validate(self, opts, nb_devices=None):
        """:meth:`validate_options`, then the levels of the training images against the
        scale, which the model files' recipes may have set
        (``script_utils.check_input_levels``)."""
        self.validate_options(opts, nb_devices)
        check_input_levels([opts["train_dir"]], opts["rescale_factor"], opts["img_scale"])

    def validate_options(self, opts, nb_devices=None):
        """The trainer module's own check of the options (its ``validate_options``)."""
        raise NotImplementedError

    def build(self, opts, nb_class):
        raise NotImplementedError

    def plan(self, opts, top_layer_nb):
        return opts.replace(top_layer_nb=top_layer_nb)

    def checkpointer(self, opts, val, extras):
        return None

    def model_info(self, opts):
        """What the run's model files say about the model beside the weights (or None)."""
        return None

    def report(self, opts, json_path, hists, context):
        raise NotImplementedError


def run_trainer(opts, spec):
    """The run both trainers share: checks, model, input recipe, data, stages, final save.

    :func:`begin_training_run` (a finished identical run returns
    :func:`finished_run_result`), ``spec.build``, the precision policy and device copies, the
    input recipe stored in the run's model files, the iterators, the staged training of
    ``spec.stages`` with ``spec.plan`` (the options passed whole), the ``--final-model`` save,
    then ``spec.report`` with ``context`` = ``dict(test=..., checkpointer=..., is_chief=...)``.
    """
    try:
        env, strategy, record, identity, resume = begin_training_run(opts, spec.validate)
    except RunComplete as done:
        return finished_run_result(opts, done.state, options_json_path(opts["best_model"]))
    import dm_multi_gpu
    import training_runs
    from dm_resnet import get_preprocess_input

    nb_class = len(opts["class_list"])
    model, top_layer_nb, preprocess_net = spec.build(opts, nb_class)
    model = dm_multi_gpu.apply_precision_policy(model, opts["mixed_precision"])
    model, _ = dm_multi_gpu.make_parallel(model, env["NUM_GPU_DEVICES"])
    channels = model.input_shape[-1]
    extras = model_file_extras(opts, record, training_recipe(opts, channels, preprocess_net),
                               spec.model_info(opts), identity)
    train, val, test, train_bs = iterators_from_options(
        opts, channels, get_preprocess_input(preprocess_net) if preprocess_net else None,
        env["RANDOM_SEED"])
    logger.info("train %d, val %d, test %d %s; train batch %d, eval batch %d", train.nb_sample,
                val.nb_sample, test.nb_sample, spec.unit, train_bs, opts["batch_size"])
    checkpointer = spec.checkpointer(opts, val, extras)
    run = stage_run(opts, env, identity, resume)
    run.strategy, run.checkpointer, run.extras = strategy, checkpointer, extras
    data = training_runs.StageData(train, val, len(val), len(train), nb_class,
                                   env["NUM_CPU_CORES"])
    hists = getattr(training_runs, spec.stages)(model, data=data,
                                                 plan=spec.plan(opts, top_layer_nb), run=run)
    if opts["final_model"] and opts["final_model"] != NOSAVE:
        training_runs.save_model_distributed(hists[-1].model if hists else model,
                                             opts["final_model"],
                                             extras=extras.without_sidecar())
    context = dict(test=test, checkpointer=checkpointer,
                   is_chief=getattr(strategy.extended, "should_checkpoint", True))
    return spec.report(opts, options_json_path(opts["best_model"]), hists, context)


def merge_history(hists):
    """The per-epoch logs of the stages' Histories, joined in order (floats)."""
    merged = {}
    for h in hists:
        for key, values in h.history.items():
            merged.setdefault(key, []).extend(float(v) for v in values)
    return merged


def stage_run(opts, env, identity, resume):
    """The ``training_runs.StageRun`` of a trainer's options: the run's files beside
    ``--best-model`` (``.last.h5`` checkpoint, ``.log.csv``, ``.curves.png``), the seed, the
    run's identity, the state to resume and, with ``--tensorboard-dir``, a TensorBoard
    callback."""
    import training_runs

    return training_runs.StageRun(opts["best_model"], **run_file_kwargs(opts, env, identity,
                                                                        resume))


# --------------------------------------------------------------------------- learning health
def run_seed(opts):
    """The run's seed: ``--seed`` when given, else ``RANDOM_SEED``."""
    seed = opts.get("seed")
    return int(seed) if seed is not None else get_random_seed()


def best_epoch_warnings(opts, best_epoch, epochs, monitor):
    """``learning_health.best_epoch_warnings`` of a run, its source the run's training log
    ``<best-model>.log.csv``."""
    import learning_health
    import training_runs

    return learning_health.best_epoch_warnings(
        best_epoch, epochs, monitor, training_runs.training_log_path(opts["best_model"]))


def log_warnings(warnings):
    """Log each learning-health warning of a run (``learning_health`` records)."""
    for w in warnings:
        logger.warning("%s: %s (%s)", w["code"], w["message"], w["source"])


def print_warnings(warnings):
    """Print a run's learning-health warnings under a heading (nothing when there are none)."""
    import learning_health

    if warnings:
        print(f"{len(warnings)} warning(s) about what the model learned:")
        print("\n".join(learning_health.format_warnings(warnings)))
