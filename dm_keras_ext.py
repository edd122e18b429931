"""Keras extensions: model factory, optimisers, robust loading and saving of model files.

Part of the reimplementation of Shen et al., "Deep Learning to Improve Breast Cancer Detection on
Screening Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427. Keras 2 API through tf-keras
(``import tf_keras as keras``).

The module holds two layers, each in its own sections (the ``# ----`` headings), in order:

1. **Model building**: "patch-net factory" (:func:`get_dl_model`, read from the table of
   backbones ``dm_resnet.BACKBONES``), "Keras 2.0.8 update rules" (:func:`create_optimizer`),
   "bias learning-rate multiplier", "rebuilding with new settings"
   (:func:`set_regularization`), "frozen BatchNormalization" (:func:`set_frozen_bn_mode`, and
   the compile of a training stage).
2. **Model files**: "loading and saving model files": the safety check of a file's layers
   (:func:`check_model_file_safe`), :func:`robust_load_model` (Keras 2.0.8 files), model
   roles, :func:`save_model_atomic` with :class:`ModelFileExtras` (input recipe, model info,
   options file: passed explicitly, never kept by path).

The training runs (metrics and callbacks, resumable runs with their CSV log and curves, the
staged training ``train_3stage`` / ``train_2stage`` and the 2017 calls ``do_3stage_training`` /
``do_2stage_training``) live in ``ddsm_train/training_runs.py``. Its public names (its
``__all__``: the 2017 ``do_3stage_training``, ``do_2stage_training``, ``DMAucModelCheckpoint``,
``DMMetrics``, ``DMFlush`` and ``flip_all_img`` among them) are re-exported here, loaded on first
use: ``from dm_keras_ext import do_3stage_training`` works as in 2017.
"""
from __future__ import annotations

import dataclasses as _dataclasses
import json as _json
import logging
import os as _os
import re
import sys
import types as _types
import warnings as _warnings
import zipfile as _zipfile

import h5py as _h5py
import numpy as np
import tensorflow as tf
import tf_keras as keras
from tf_keras.src.engine import base_layer_utils as _base_layer_utils

import dm_image as _dm_image
import dm_resnet as _dm_resnet
from dm_image import load_dat_ram  # noqa: F401  (2017 name, re-exported)
from dm_resnet import rebuild_model, walk_layer_configs  # rebuild_model: re-exported
from dm_resnet import (YAROSLAV_FILTERS, Yaroslav,  # noqa: F401  (re-exported: the table's home)
                       dm_resnet14_patch_net, get_preprocess_input)

logger = logging.getLogger(__name__)

#: The names of ``ddsm_train/training_runs.py`` that this module re-exports (2017 code imports
#: them from here). They are loaded on first use (``__getattr__`` at the end of the file), so
#: importing this module alone does not load the training layer (which imports this module).
_TRAINING_RUNS_NAMES = (
    "do_3stage_training", "do_2stage_training", "StagePlan", "StageData", "StageRun",
    "train_3stage", "train_2stage", "DMAucModelCheckpoint", "BestModelCheckpoint", "DMMetrics",
    "DMFlush", "NonFiniteTrainingError", "FiniteTrainingGuard", "flip_all_img",
    "predict_flip_mean", "ovr_auroc", "class_weight_dict", "save_model_distributed",
    "last_checkpoint_path", "training_log_path", "training_curves_path",
    "save_training_checkpoint", "read_training_state", "resolve_resume", "write_training_log",
    "plot_training_curves", "TRAINING_STATE_KEY", "KILL_AFTER_EPOCH_ENV",
)

__all__ = [
    "IMAGENET_WEIGHTS_ENV",
    "YAROSLAV_FILTERS",
    "Yaroslav",
    "dm_resnet14_patch_net",
    "imagenet_weights_path",
    "get_preprocess_input",
    "stage2_start_index",
    "get_dl_model",
    "OPTIMIZERS",
    "KERAS208_EPSILON",
    "Keras208RMSprop",
    "Keras208Adagrad",
    "Keras208Nadam",
    "create_optimizer",
    "robust_load_model",
    "check_model_file_safe",
    "UnsafeModelError",
    "UnknownLayerError",
    "SAFE_TF_FUNCTIONS",
    "model_config_code",
    "read_model_config",
    "check_model_config",
    "ModelRoleError",
    "model_role",
    "check_model_role",
    "check_top_layer_nb",
    "save_model_atomic",
    "check_written_model",
    "save_h5_named",
    "MODEL_INFO_ATTR",
    "ModelFileExtras",
    "read_model_info",
    "MODEL_RUN_ATTR",
    "read_model_run",
    "load_dat_ram",
    "is_bias_variable",
    "with_bias_multiplier",
    "rebuild_model",
    "set_regularization",
    "FROZEN_BN_MODES",
    "set_frozen_bn_mode",
] + list(_TRAINING_RUNS_NAMES)

# ---------------------------------------------------------------- patch-net factory
# The backbones (constructors, preprocessing, weight files, stage-2 and cut roles, heads) are
# one table, ``dm_resnet.BACKBONES``; the functions here read it.
#: Environment variable naming a local ImageNet weight file, or a folder holding the standard
#: Keras file names (e.g. ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``).
IMAGENET_WEIGHTS_ENV = "DM_IMAGENET_WEIGHTS"


def stage2_start_index(model: keras.Model, net: str) -> int | None:
    """Default ``top_layer_nb`` of patch training: index of the first layer trained in stage 2.

    Found by the role of ``net``'s table entry (``dm_resnet.BACKBONES``). None for backbones
    without pretrained weights (``yaroslav``, ``dm_resnet14``: only stage 1 runs, on all
    layers).

    Raises:
        ValueError: unknown ``net`` (the message lists the valid keys).
    """
    return _dm_resnet.get_backbone(net).stage2(model)


def imagenet_weights_path(net: str, weights_path: str | None = None) -> str:
    """Locate the local ImageNet 'notop' weight file of ``net``; never downloads.

    Looked up in order: ``weights_path`` (file, or folder holding the standard name), the
    ``DM_IMAGENET_WEIGHTS`` environment variable (same), ``$KERAS_HOME/models/`` or
    ``~/.keras/models/``. The standard name is the ``weights_file`` of ``net``'s table entry.

    Raises:
        FileNotFoundError: naming the file and the places searched.
        ValueError: unknown ``net``, or one without ImageNet weights.
    """
    spec = _dm_resnet.get_backbone(net)
    if spec.weights_file is None:
        raise ValueError(f"net {net!r} has no ImageNet weights")
    keras_home = _os.environ.get("KERAS_HOME", _os.path.join(_os.path.expanduser("~"),
                                                             ".keras"))
    places = [p for p in (weights_path, _os.environ.get(IMAGENET_WEIGHTS_ENV)) if p]
    places.append(_os.path.join(keras_home, "models"))
    for place in places:
        place = _os.fspath(place)
        cand = _os.path.join(place, spec.weights_file) if _os.path.isdir(place) else place
        if _os.path.isfile(cand):
            return cand
    how = (f", e.g. keras.applications.{spec.constructor.name}(weights='imagenet', "
           "include_top=False)" if isinstance(spec.constructor, _dm_resnet.KerasApplication)
           else "")
    raise FileNotFoundError(
        f"ImageNet weights for {net!r} not found: put {spec.weights_file} in "
        f"{_os.path.join(keras_home, 'models')} (the Keras cache; download it once on a "
        f"machine with network access{how}), or point {IMAGENET_WEIGHTS_ENV} or "
        f"weights_path at the file. Searched: {places}")


def get_dl_model(net, nb_class=3, use_pretrained=True, resume_from=None, top_layer_nb=None,
                 weight_decay=1e-4, hidden_dropout=0.0, nb_init_filter=32, init_filter_size=5,
                 init_conv_stride=2, max_pooling_size=2, max_pooling_stride=2, inp_dropout=0.0,
                 input_shape=None, weights_path=None, safe_mode=True, **kw):
    """Build (or resume) a patch classifier.

    Patch nets are the backbone of ``net``'s entry in ``dm_resnet.BACKBONES`` (the 2017 nets,
    EfficientNetV2-S/B0, ConvNeXt-Tiny, and any backbone registered with
    ``dm_resnet.register_backbone``) + global average pooling (``avg_pool``) +
    ``Dropout(hidden_dropout)`` (``top_dropout``) + ``Dense(nb_class, softmax, L2
    weight_decay)`` (``predictions``); ``yaroslav`` is :func:`Yaroslav`.

    Args:
        net: a key of ``dm_resnet.BACKBONES``: 'resnet50', 'vgg16', 'vgg19', 'xception',
            'inception', 'yaroslav', 'dm_resnet14' (small single-channel ResNet for CPU runs
            that honours nb_init_filter, init_filter_size, ...; see
            :func:`dm_resnet14_patch_net`), 'efficientnetv2s', 'efficientnetv2b0',
            'convnext_tiny'.
        use_pretrained: load ImageNet weights from a local file (:func:`imagenet_weights_path`;
            never downloads). Ignored for backbones without ImageNet weights.
        resume_from: HDF5 model file to load instead (:func:`robust_load_model`; with
            ``safe_mode`` False a file with Lambda layers is trusted and loaded).
        top_layer_nb: stage-2 start; default by role (:func:`stage2_start_index`).
        input_shape: ``(rows, cols, channels)``; default ``(None, None, 3)`` (yaroslav,
            dm_resnet14: 1).
        nb_init_filter, init_filter_size, init_conv_stride, max_pooling_size,
            max_pooling_stride, inp_dropout, **kw: accepted for command-line compatibility
            with the 2017 scripts; used by dm_resnet14 only (with ``alpha``, ``l1_ratio``).

    Returns:
        ``(model, preprocess_input, top_layer_nb)``; ``preprocess_input`` is the backbone's
        ImageNet preprocessing function (None for yaroslav and dm_resnet14).
    """
    spec = _dm_resnet.get_backbone(net)
    if resume_from is not None:
        model = robust_load_model(resume_from, safe_mode=safe_mode)
        check_model_role(model, resume_from, ("patch",), "--resume-from")
    else:
        path = (imagenet_weights_path(net, weights_path)
                if use_pretrained and spec.weights_file is not None else None)
        options = dict(nb_init_filter=nb_init_filter, init_filter_size=init_filter_size,
                       init_conv_stride=init_conv_stride, max_pooling_size=max_pooling_size,
                       max_pooling_stride=max_pooling_stride, inp_dropout=inp_dropout,
                       alpha=kw.pop("alpha", 1e-4), l1_ratio=kw.pop("l1_ratio", 0.0))
        if kw:
            logger.debug("get_dl_model ignores options %s for net %s", sorted(kw), net)
        model = spec.build_patch_net(input_shape, nb_class, hidden_dropout, weight_decay,
                                     weights_path=path,
                                     **(options if spec.patch_head is None else {}))
        if path is not None:
            logger.info("Loaded ImageNet weights for %s from %s", net, path)
    if top_layer_nb is None:
        try:
            top_layer_nb = spec.stage2(model)
        except ValueError as err:
            logger.warning("No default top_layer_nb for %s (%s); pass it explicitly", net, err)
    logger.info("Patch net %s: %d layers, %d parameters, top_layer_nb=%s", net,
                len(model.layers), model.count_params(), top_layer_nb)
    return model, spec.preprocess, top_layer_nb


# ---------------------------------------------------------------- Keras 2.0.8 update rules
# tf-keras's RMSprop and Adagrad put epsilon inside the square root (and Adagrad starts its
# accumulator at 0.1), and its Nadam uses another momentum schedule; the three classes below
# compute the Keras 2.0.8 rules instead. SGD (Nesterov), Adam, Adamax and Adadelta of tf-keras
# compute the same rules as Keras 2.0.8 once given its epsilon (1e-8) and rho (Adadelta 0.95).
#: Epsilon of every Keras 2.0.8 optimizer (``K.epsilon()``).
KERAS208_EPSILON = 1e-8


def _dense_gradient(gradient):
    """Sparse (``IndexedSlices``) gradients as dense tensors; others unchanged."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


class _Keras208Optimizer(keras.optimizers.Optimizer):
    """Shared plumbing: learning-rate hyperparameter, slot creation, slot lookup, config."""

    _SLOTS = ()            # slot variable names, one variable of each per model variable
    _HYPER = ()            # float hyperparameters besides learning_rate, saved in the config

    def __init__(self, learning_rate, name, **kwargs):
        hyper = {key: float(kwargs.pop(key)) for key in self._HYPER}
        super().__init__(name=name, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        for key, value in hyper.items():
            setattr(self, key, value)

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._built = True
        self._slots = {slot: [self.add_variable_from_reference(var, slot) for var in var_list]
                       for slot in self._SLOTS}

    def _slot(self, slot, variable):
        return self._slots[slot][self._index_dict[self._var_key(variable)]]

    def get_config(self):
        config = super().get_config()
        config["learning_rate"] = self._serialize_hyperparameter(self._learning_rate)
        config.update({key: getattr(self, key) for key in self._HYPER})
        return config


@keras.saving.register_keras_serializable(package="dm_keras_ext")
class Keras208RMSprop(_Keras208Optimizer):
    """RMSprop as Keras 2.0.8: ``a = rho*a + (1-rho)*g^2; p -= lr*g / (sqrt(a) + epsilon)``.

    The accumulator starts at zero; epsilon is added outside the square root.

    Args:
        learning_rate: float, a schedule, or a callable (tf-keras semantics).
        rho: decay of the squared-gradient average.
        epsilon: fuzz factor added to the root.
        name: optimizer name.
        **kwargs: tf-keras optimizer options (``clipnorm``, ``jit_compile``, ...).
    """

    _SLOTS = ("a",)
    _HYPER = ("rho", "epsilon")

    def __init__(self, learning_rate=0.001, rho=0.9, epsilon=KERAS208_EPSILON,
                 name="Keras208RMSprop", **kwargs):
        super().__init__(learning_rate, name, rho=rho, epsilon=epsilon, **kwargs)

    def update_step(self, gradient, variable):
        g = _dense_gradient(gradient)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        rho = tf.cast(self.rho, dtype)
        a = self._slot("a", variable)
        a.assign(rho * a + (1.0 - rho) * tf.square(g))
        variable.assign_sub(lr * g / (tf.sqrt(a) + tf.cast(self.epsilon, dtype)))


@keras.saving.register_keras_serializable(package="dm_keras_ext")
class Keras208Adagrad(_Keras208Optimizer):
    """Adagrad as Keras 2.0.8: ``a = a + g^2; p -= lr*g / (sqrt(a) + epsilon)``, ``a`` from 0.

    Args:
        learning_rate: float, a schedule, or a callable (tf-keras semantics).
        epsilon: fuzz factor added to the root.
        name: optimizer name.
        **kwargs: tf-keras optimizer options (``clipnorm``, ``jit_compile``, ...).
    """

    _SLOTS = ("a",)
    _HYPER = ("epsilon",)

    def __init__(self, learning_rate=0.01, epsilon=KERAS208_EPSILON, name="Keras208Adagrad",
                 **kwargs):
        super().__init__(learning_rate, name, epsilon=epsilon, **kwargs)

    def update_step(self, gradient, variable):
        g = _dense_gradient(gradient)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        a = self._slot("a", variable)
        a.assign_add(tf.square(g))
        variable.assign_sub(lr * g / (tf.sqrt(a) + tf.cast(self.epsilon, dtype)))


#: Steps over which the Nadam momentum-schedule product is formed; by then it is below 1e-80,
#: far under float32's smallest value, so later steps see exactly the same (zero) product.
_NADAM_SCHEDULE_STEPS = 256


@keras.saving.register_keras_serializable(package="dm_keras_ext")
class Keras208Nadam(_Keras208Optimizer):
    """Nadam as Keras 2.0.8 (Dozat's momentum schedule with ``schedule_decay``).

    At step ``t`` (from 1), with ``c_t = beta_1 * (1 - 0.5 * 0.96**(t * schedule_decay))`` and
    the schedule product ``S_t = c_1 * ... * c_t``::

        g' = g / (1 - S_t)
        m = beta_1*m + (1-beta_1)*g;    m' = m / (1 - S_t * c_{t+1})
        v = beta_2*v + (1-beta_2)*g^2;  v' = v / (1 - beta_2**t)
        p -= lr * ((1 - c_t)*g' + c_{t+1}*m') / (sqrt(v') + epsilon)

    ``S_t`` is one scalar shared by all variables (Keras 2.0.8 kept it as a variable starting at
    1 and multiplied it by ``c_t`` once per step); here it is formed from the step count, which
    gives the same value and needs no extra state to save, restore or keep in sync across
    replicas.

    Args:
        learning_rate: float, a schedule, or a callable (tf-keras semantics).
        beta_1: first-moment decay.
        beta_2: second-moment decay.
        epsilon: fuzz factor added to the root.
        schedule_decay: decay of the momentum schedule.
        name: optimizer name.
        **kwargs: tf-keras optimizer options (``clipnorm``, ``jit_compile``, ...).
    """

    _SLOTS = ("m", "v")
    _HYPER = ("beta_1", "beta_2", "epsilon", "schedule_decay")

    def __init__(self, learning_rate=0.002, beta_1=0.9, beta_2=0.999, epsilon=KERAS208_EPSILON,
                 schedule_decay=0.004, name="Keras208Nadam", **kwargs):
        super().__init__(learning_rate, name, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         schedule_decay=schedule_decay, **kwargs)

    def _momentum_cache(self, step, dtype):
        """``c_step`` (``step`` a float tensor of any shape)."""
        beta_1 = tf.cast(self.beta_1, dtype)
        decay = tf.cast(0.96, dtype)
        return beta_1 * (1.0 - 0.5 * tf.pow(decay, step * tf.cast(self.schedule_decay, dtype)))

    def update_step(self, gradient, variable):
        g = _dense_gradient(gradient)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        # Fixed-size product (masked beyond t) so that the step also compiles under XLA.
        steps = tf.range(1, _NADAM_SCHEDULE_STEPS + 1, dtype=dtype)
        factors = tf.where(steps <= t, self._momentum_cache(steps, dtype),
                            tf.ones_like(steps))
        s_t = tf.reduce_prod(factors)
        c_t = self._momentum_cache(t, dtype)
        c_next = self._momentum_cache(t + 1.0, dtype)
        m = self._slot("m", variable)
        v = self._slot("v", variable)
        m.assign(beta_1 * m + (1.0 - beta_1) * g)
        v.assign(beta_2 * v + (1.0 - beta_2) * tf.square(g))
        g_hat = g / (1.0 - s_t)
        m_hat = m / (1.0 - s_t * c_next)
        v_hat = v / (1.0 - tf.pow(beta_2, t))
        m_bar = (1.0 - c_t) * g_hat + c_next * m_hat
        variable.assign_sub(lr * m_bar / (tf.sqrt(v_hat) + tf.cast(self.epsilon, dtype)))


#: Optimiser factories keyed by the ``--optimizer`` names, with Keras 2.0.8's update rules and
#: defaults (epsilon 1e-8, state from zero); sgd is Nesterov with momentum 0.9.
OPTIMIZERS = {
    "sgd": lambda lr: keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda lr: Keras208RMSprop(learning_rate=lr),
    "adagrad": lambda lr: Keras208Adagrad(learning_rate=lr),
    "adadelta": lambda lr: keras.optimizers.Adadelta(learning_rate=lr, rho=0.95,
                                                     epsilon=KERAS208_EPSILON),
    "adamax": lambda lr: keras.optimizers.Adamax(learning_rate=lr, beta_1=0.9, beta_2=0.999,
                                                 epsilon=KERAS208_EPSILON),
    "adam": lambda lr: keras.optimizers.Adam(learning_rate=lr, beta_1=0.9, beta_2=0.999,
                                             epsilon=KERAS208_EPSILON),
    "nadam": lambda lr: Keras208Nadam(learning_rate=lr),
}


def create_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    """A fresh optimiser ``name`` (a key of ``OPTIMIZERS``) with learning rate ``lr`` > 0.

    Every optimizer takes the steps Keras 2.0.8 took (epsilon 1e-8, state from zero, Nadam's
    ``schedule_decay`` momentum schedule); only ``lr`` is set, as the 2017 code did, except
    sgd's Nesterov momentum 0.9. The learning rate is a tf-keras hyperparameter variable, so
    ``ReduceLROnPlateau`` can change it.

    Args:
        name: one of ``OPTIMIZERS``.
        lr: learning rate > 0.

    Returns:
        A new, unbuilt tf-keras optimizer.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"learning rate should be > 0, got {lr}")
    return OPTIMIZERS[name](float(lr))


# ---------------------------------------------------------------- bias learning-rate multiplier
def is_bias_variable(variable: tf.Variable) -> bool:
    """True for bias terms (variables named ``.../bias``, replicas included)."""
    name = variable.name.split(":")[0]
    return re.search(r"(^|/)bias(_\d+)?(/replica_\d+)?$", name) is not None


class _BiasMultiplierMixin:
    """Optimizer mixin: the update applied to bias variables is scaled by ``bias_multiplier``.

    The base optimizer computes its update (momentum, Adam moments, ...) as usual; for a bias
    variable the change it made is then scaled. Every optimizer of :func:`create_optimizer`
    changes a variable by an amount proportional to the learning rate (its state does not
    depend on it), so this is exactly a per-variable learning rate of
    ``learning_rate * bias_multiplier``.
    """

    def __init__(self, *args, bias_multiplier=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_multiplier = float(bias_multiplier)

    def update_step(self, gradient, variable):
        if self.bias_multiplier == 1.0 or not is_bias_variable(variable):
            return super().update_step(gradient, variable)
        before = tf.identity(variable)
        super().update_step(gradient, variable)
        if self.bias_multiplier == 0.0:
            return variable.assign(before)
        mult = tf.cast(self.bias_multiplier, variable.dtype)
        return variable.assign(before + mult * (tf.identity(variable) - before))

    def get_config(self):
        config = super().get_config()
        config["bias_multiplier"] = self.bias_multiplier
        return config


_BIAS_MULT_CLASSES = {}


def _bias_multiplier_class(base):
    cls = _BIAS_MULT_CLASSES.get(base)
    if cls is None:
        name = f"BiasMultiplier{base.__name__}"
        cls = type(name, (_BiasMultiplierMixin, base),
                   {"__doc__": f"{base.__name__} with a learning-rate multiplier for biases."})
        cls = keras.saving.register_keras_serializable(package="dm_keras_ext", name=name)(cls)
        _BIAS_MULT_CLASSES[base] = cls
    return cls


for _base in (keras.optimizers.SGD, keras.optimizers.RMSprop, keras.optimizers.Adagrad,
              keras.optimizers.Adadelta, keras.optimizers.Adamax, keras.optimizers.Adam,
              keras.optimizers.Nadam, Keras208RMSprop, Keras208Adagrad, Keras208Nadam):
    _bias_multiplier_class(_base)   # registered at import so saved models load again
del _base


def with_bias_multiplier(optimizer: keras.optimizers.Optimizer,
                         bias_multiplier: float | None) -> keras.optimizers.Optimizer:
    """Return ``optimizer`` with bias learning rate x ``bias_multiplier`` (None/1: unchanged).

    Args:
        optimizer: a tf-keras (non-legacy) optimizer instance, not yet used.
        bias_multiplier: float >= 0 or None.

    Returns:
        An optimizer of the same kind and configuration whose bias updates are scaled.
    """
    if bias_multiplier is None or float(bias_multiplier) == 1.0:
        return optimizer
    if bias_multiplier < 0:
        raise ValueError(f"bias_multiplier should be >= 0, got {bias_multiplier}")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"bias_multiplier needs a tf-keras optimizer, got {type(optimizer)}")
    base = type(optimizer)
    if isinstance(optimizer, _BiasMultiplierMixin):
        base = base.__mro__[2]
    config = dict(optimizer.get_config(), bias_multiplier=float(bias_multiplier))
    return _bias_multiplier_class(base).from_config(config)


# ---------------------------------------------------------------- rebuilding with new settings
_REGULARIZED_CLASSES = ("Dense", "Conv2D")
_DROPOUT_CLASSES = ("Dropout",)


def _l2_config(weight_decay):
    if not weight_decay:
        return None
    return {"module": "keras.regularizers", "class_name": "L2",
            "config": {"l2": float(weight_decay)}, "registered_name": None}


def _same_l2(current, weight_decay):
    if current is None:
        return not weight_decay
    if not weight_decay or not isinstance(current, dict) or current.get("class_name") != "L2":
        return False
    return abs(float(current.get("config", {}).get("l2", -1)) - weight_decay) <= 1e-6 * weight_decay


def set_regularization(model, weight_decay=None, dropout=None, layer_names=None,
                       custom_objects=None):
    """Set the L2 of Dense/Conv2D kernels and the Dropout rates so that they take effect.

    Args:
        model: tf-keras model (nested models included in the search).
        weight_decay: L2 factor for kernels (0: no regulariser; None: leave unchanged).
        dropout: rate for Dropout layers (None: leave unchanged).
        layer_names: only layers with these names; None for all layers.
        custom_objects: passed to :func:`rebuild_model`.

    Returns:
        The model to train from now on (a rebuilt copy when anything changed).
    """
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout should be in [0, 1), got {dropout}")
    if weight_decay is not None and weight_decay < 0:
        raise ValueError(f"weight_decay should be >= 0, got {weight_decay}")

    def edit(class_name, cfg):
        if layer_names is not None and cfg.get("name") not in layer_names:
            return False
        if weight_decay is not None and class_name in _REGULARIZED_CLASSES:
            if not _same_l2(cfg.get("kernel_regularizer"), weight_decay):
                cfg["kernel_regularizer"] = _l2_config(weight_decay)
                return True
        if dropout is not None and class_name in _DROPOUT_CLASSES:
            if abs(float(cfg.get("rate", 0.0)) - dropout) > 1e-9:
                cfg["rate"] = float(dropout)
                return True
        return False

    return rebuild_model(model, lambda config: walk_layer_configs(config, edit),
                         custom_objects)


# ---------------------------------------------------------------- frozen BatchNormalization
#: Values of ``frozen_bn_mode``: ``"batch"``, a frozen BatchNormalization layer trains as in
#: Keras 2.0.8 (batch statistics, moving statistics updated, gamma/beta fixed); ``"moving"``,
#: as in tf-keras (it runs in inference mode with its moving statistics, which stay fixed).
FROZEN_BN_MODES = ("batch", "moving")

# Instance attributes that set_frozen_bn_mode("batch") puts on a BatchNormalization layer,
# shadowing the class methods of the same names; "moving" removes them.
_BN_OVERRIDES = ("_get_training_value", "add_update")


@tf.autograph.experimental.do_not_convert
def _bn_training_value_batch(layer, training=None):
    """The layer's training flag as given: a frozen layer is not forced into inference mode."""
    del layer
    if training is None:
        training = keras.backend.learning_phase()
    if isinstance(training, int):
        training = bool(training)
    return training


@tf.autograph.experimental.do_not_convert
def _bn_add_update_always(layer, updates):
    """``add_update`` that runs the moving-statistics updates of a non-trainable layer too."""
    del layer
    if _base_layer_utils.call_context().in_keras_graph:
        return   # functional-API construction: nothing to run
    for update in tf.nest.flatten(updates):
        if callable(update):
            update()


def _batch_norm_layers(model):
    """Every BatchNormalization layer of ``model``, nested models and wrappers included."""
    found, stack, seen = [], [model], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
        inner = getattr(layer, "layer", None)            # TimeDistributed and other wrappers
        if isinstance(inner, keras.layers.Layer):
            stack.append(inner)
    return found


def set_frozen_bn_mode(model: keras.Model, mode: str = "batch") -> int:
    """Choose how the frozen (``trainable=False``) BatchNormalization layers of ``model`` train.

    ``"batch"``: as Keras 2.0.8 did. In training (``fit``, ``train_on_batch``, a call with
    ``training=True``) a frozen BN layer normalises with the batch mean and biased batch
    variance, the gradient flows through those batch statistics, and its moving statistics move
    toward them (``moving = moving * momentum + batch * (1 - momentum)``); only gamma and beta
    stay fixed: they are not in ``model.trainable_weights``, so the optimizer neither keeps
    state for them nor updates them. Every BN layer, trainable or not, then also averages the
    biased batch variance (no n/(n-1) correction) into its moving variance, as Keras 2.0.8
    did. ``"moving"``: tf-keras's behaviour, a frozen BN layer runs in inference mode with its
    moving statistics, which do not change, and trainable BN layers average the corrected
    (unbiased) batch variance.

    Inference (``predict``, ``evaluate``, ``training=False``) is the same in both modes, and so
    is the training-mode output of a trainable BN layer. The mode belongs to the layer objects
    in memory: it applies whatever ``trainable`` is set to later, is not written to saved
    files (which keep tf-keras's usual config and trainable flags), and is lost when a model is
    rebuilt from its config or loaded, so set it again then (the staged training functions
    set it at each stage's compile). Set it before ``compile`` (compiling traces the train
    step anew).

    Args:
        model: a tf-keras model or layer; nested models and wrapped layers are included.
        mode: one of ``FROZEN_BN_MODES``.

    Returns:
        The number of BatchNormalization layers set.
    """
    _check_frozen_bn_mode(mode)
    layers = _batch_norm_layers(model)
    for layer in layers:
        if mode == "batch":
            layer._get_training_value = _types.MethodType(_bn_training_value_batch, layer)
            layer.add_update = _types.MethodType(_bn_add_update_always, layer)
        else:
            for attr in _BN_OVERRIDES:
                if attr in vars(layer):
                    delattr(layer, attr)
        # tf-keras's fused kernel leaves the n/(n-1) correction in the variance it averages
        # into moving_variance unless this flag is off; with it off the fused and the
        # non-fused (XLA) paths both average the biased batch variance.
        layer._bessels_correction_test_only = mode == "moving"
    return len(layers)


def _check_frozen_bn_mode(mode):
    if mode not in FROZEN_BN_MODES:
        raise ValueError(f"unknown frozen_bn_mode {mode!r}; valid: {list(FROZEN_BN_MODES)}")


def _compile(model, optim, lr, bias_multiplier, jit_compile, strategy, metrics,
             frozen_bn_mode="batch"):
    """Compile ``model`` for a training stage: a fresh optimizer, categorical cross-entropy.

    The frozen BatchNormalization layers are set to ``frozen_bn_mode`` first (see
    :func:`set_frozen_bn_mode`), so that the mode also holds for a model just rebuilt.
    """
    set_frozen_bn_mode(model, frozen_bn_mode)
    with (strategy or model.distribute_strategy).scope():
        opt = with_bias_multiplier(create_optimizer(optim, lr), bias_multiplier)
        model.compile(optimizer=opt, loss="categorical_crossentropy", metrics=list(metrics),
                      jit_compile=bool(jit_compile))



# ---------------------------------------------------------------- loading and saving model files
class UnsafeModelError(ValueError):
    """A model file names code (a Python function, a TensorFlow op) that loading would run.

    Raised before any layer is built; ``filename``, ``layer``, ``class_name`` and
    ``function`` name the file, the layer, its class and what it would call.
    """

    def __init__(self, filename, layer, class_name, function=None):
        what = f"calls {function}" if function else "holds code"
        super().__init__(
            f"refusing to load {filename}: layer {layer!r} ({class_name}) {what}, named in the "
            f"file and run when the model is built; load it only if you trust the file "
            f"(safe_mode=False, or --trust-model-file on the command line)")
        self.filename, self.layer, self.class_name = filename, layer, class_name
        self.function = function


class UnknownLayerError(ValueError):
    """A model file holds a layer class that neither tf-keras nor ``custom_objects`` defines."""

    def __init__(self, filename, layer, class_name):
        super().__init__(
            f"cannot load {filename}: layer {layer!r} is of class {class_name!r}, which is not a "
            f"tf-keras layer (a model with custom layers needs their classes in custom_objects)")
        self.filename, self.layer, self.class_name = filename, layer, class_name


#: Layer classes that call a function named in their config: Python code (``Lambda``), a
#: TensorFlow API function (``TFOpLambda``, ``SlicingOpLambda``: what ``x + y`` or ``x[:, 0]``
#: on a Keras tensor records), or a class or tensor method (``ClassMethod``,
#: ``InstanceMethod``, ``InstanceProperty``).
_CODE_LAYER_CLASSES = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda", "ClassMethod",
                                 "InstanceMethod", "InstanceProperty"})

#: Config keys that name something to call; any layer carrying one is treated as calling code,
#: whatever its class.
_CALLABLE_KEYS = ("function", "function_type", "cls_symbol", "method_name", "attr_name")

#: Classes of the nested entries that hold Python code in a ``.keras`` archive's config.
_CODE_ENTRY_CLASSES = frozenset({"__lambda__", "__python_function__"})

#: TensorFlow functions an op layer (``TFOpLambda``/``SlicingOpLambda``) may call in safe mode:
#: pure tensor maths with no side effect (no file, no I/O, no Python callback), as recorded by
#: arithmetic, slicing and the common math calls on Keras tensors. Names as stored in the
#: config (``tf.`` prefix dropped). The 2017 Keras 2.0.8 files and the models this project
#: builds hold no op layer at all.
SAFE_TF_FUNCTIONS = frozenset(
    [f"__operators__.{op}" for op in ("add", "getitem", "eq", "ne")]
    + [f"math.{op}" for op in (
        "add", "add_n", "subtract", "multiply", "divide", "truediv", "floordiv", "negative",
        "abs", "sign", "square", "sqrt", "rsqrt", "exp", "log", "log1p", "pow", "maximum",
        "minimum", "sigmoid", "tanh", "softplus", "reciprocal", "greater", "greater_equal",
        "less", "less_equal", "equal", "not_equal", "logical_and", "logical_or", "logical_not",
        "reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod",
        "reduce_logsumexp", "argmax", "argmin", "l2_normalize")]
    + [f"nn.{op}" for op in ("relu", "relu6", "elu", "selu", "gelu", "leaky_relu", "softmax",
                             "log_softmax", "sigmoid", "silu", "bias_add", "l2_normalize")]
    + ["concat", "stack", "unstack", "reshape", "transpose", "expand_dims", "squeeze", "tile",
       "cast", "identity", "clip_by_value", "where", "gather", "split", "pad", "shape",
       "zeros_like", "ones_like", "reverse", "stop_gradient", "linalg.matmul", "einsum",
       "image.resize"])

_SAFE_MODULE = re.compile(r"(builtins|keras|tf_keras)(\.[A-Za-z_][\w.]*)?\Z")

#: Keys whose values are layer configs (wrappers, recurrent cells); ``layers`` lists them.
_LAYER_KEYS = frozenset({"layer", "forward_layer", "backward_layer", "cell"})
_LAYER_LIST_KEYS = frozenset({"layers", "cells"})
_MODEL_CLASSES = frozenset({"Model", "Functional", "Sequential"})


def _called_function(class_name, cfg):
    """What a layer config says to call, for a message, e.g. ``tf.io.write_file``."""
    function = cfg.get("function")
    if class_name in ("TFOpLambda", "SlicingOpLambda") and isinstance(function, str):
        return f"tf.{function}"
    if "cls_symbol" in cfg:
        return f"tf.{cfg.get('cls_symbol')}.{cfg.get('method_name')}"
    if "attr_name" in cfg:
        return f"the tensor attribute {cfg.get('attr_name')!r}"
    if isinstance(function, str):
        module = cfg.get("module")
        return f"{module}.{function}" if isinstance(module, str) else function
    if isinstance(function, dict) and function.get("class_name") in _CODE_ENTRY_CLASSES:
        return "Python code (a lambda)"
    if cfg.get("function_type") == "lambda" or isinstance(function, (list, tuple)):
        return "Python bytecode (a lambda)"
    return "a function named in the file"


def _walk_layer_entries(entry, visit, layer_name="?", is_layer=True):
    """Call ``visit(entry, layer_name, is_layer)`` on every dict of a model config.

    ``layer_name`` is the name of the innermost layer holding the entry; ``is_layer`` tells
    whether the entry itself is a layer (the model, an item of a ``layers`` list, the layer of
    a wrapper such as ``TimeDistributed``/``Bidirectional``, a recurrent cell), nested models
    included (a Keras 2.0.8 ``Sequential`` stores its layers as a bare list in ``config``).
    """
    if isinstance(entry, list):
        for item in entry:
            _walk_layer_entries(item, visit, layer_name, is_layer)
        return
    if not isinstance(entry, dict):
        return
    class_name = entry.get("class_name")
    cfg = entry.get("config")
    if is_layer and isinstance(class_name, str) and isinstance(cfg, dict):
        layer_name = str(cfg.get("name", layer_name))
    visit(entry, layer_name, is_layer and isinstance(class_name, str))
    for key, value in entry.items():
        if not isinstance(value, (dict, list)):
            continue
        child_is_layer = (key in _LAYER_KEYS or key in _LAYER_LIST_KEYS
                          or (key == "config" and isinstance(value, list)
                              and class_name in _MODEL_CLASSES))
        if key in _LAYER_LIST_KEYS and not isinstance(value, list):
            child_is_layer = False
        _walk_layer_entries(value, visit, layer_name, child_is_layer)


def model_config_code(config: dict) -> list:
    """Every place in a model config that names code to run when the model is built.

    Reads the JSON structure only. A layer counts when its class calls a function
    (``Lambda``, ``TFOpLambda``, ``SlicingOpLambda``, ``ClassMethod``, ...) or its config
    carries a callable reference of any kind (``function``, ``function_type``, ``cls_symbol``,
    ``attr_name``, ...), except op layers calling the pure tensor maths of
    :data:`SAFE_TF_FUNCTIONS`; an entry whose ``module`` is outside tf-keras (which a
    ``.keras`` archive would import) or that holds a Python lambda counts too. Nested models,
    wrappers and recurrent cells are searched.

    Args:
        config: a parsed model config (``{"class_name": ..., "config": ...}``).

    Returns:
        list of ``(layer name, class name, function)`` triples, empty for a safe config.
    """
    found = []

    def visit(entry, layer_name, is_layer):
        class_name = entry.get("class_name")
        cfg = entry.get("config")
        if not isinstance(class_name, str):
            return
        module = entry.get("module")
        if isinstance(module, str) and not _SAFE_MODULE.match(module):
            target = cfg if isinstance(cfg, str) else class_name
            found.append((layer_name, class_name, f"{module}.{target}"))
            return
        if class_name in _CODE_ENTRY_CLASSES:
            found.append((layer_name, class_name, "Python code (a lambda)"))
            return
        if not isinstance(cfg, dict):
            return
        if class_name in _CODE_LAYER_CLASSES or any(k in cfg for k in _CALLABLE_KEYS):
            if (class_name in ("TFOpLambda", "SlicingOpLambda")
                    and cfg.get("function") in SAFE_TF_FUNCTIONS
                    and not any(k in cfg for k in _CALLABLE_KEYS if k != "function")):
                return
            found.append((layer_name, class_name, _called_function(class_name, cfg)))

    _walk_layer_entries(config, visit)
    return found


def _is_known_layer_class(class_name, custom_objects):
    from tf_keras.src.layers import serialization as _layer_serialization

    if custom_objects and class_name in custom_objects:
        return True
    if keras.saving.get_registered_object(class_name) is not None:
        return True
    _layer_serialization.populate_deserializable_objects()
    return class_name in _layer_serialization.LOCAL.ALL_OBJECTS


def unknown_layer_classes(config: dict, custom_objects: dict | None = None) -> list:
    """``(layer name, class name)`` of every layer in a model config whose class is unknown
    (neither a tf-keras layer nor registered nor in ``custom_objects``)."""
    found = []

    def visit(entry, layer_name, is_layer):
        name = entry.get("registered_name") or entry.get("class_name")
        if is_layer and isinstance(name, str) and not _is_known_layer_class(name,
                                                                            custom_objects):
            found.append((layer_name, name))

    _walk_layer_entries(config, visit)
    return found


def _parse_model_config(path, raw, what):
    if raw is None:
        return None
    try:
        return _json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: its {what} is not valid JSON ({err})") from err


def _h5_model_config(path):
    """The parsed ``model_config`` attribute of an HDF5 model file, or None when it has none."""
    try:
        with _h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as err:
        raise OSError(f"cannot read model file {path}: not a readable HDF5 file ({err})") from err
    return _parse_model_config(path, raw, "model_config")


def _archive_model_config(path):
    """The parsed ``config.json`` of a ``.keras`` archive."""
    try:
        with _zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ValueError(f"{path}: a zip file without config.json, not a .keras model")
            raw = archive.read("config.json")
    except _zipfile.BadZipFile as err:
        raise OSError(f"cannot read model file {path}: not a readable .keras archive "
                      f"({err})") from err
    return _parse_model_config(path, raw, "config.json")


def read_model_config(filepath) -> dict | None:
    """The model config stored in an HDF5 model file (``model_config`` attribute) or a
    ``.keras`` archive (``config.json``), parsed, without building anything; None when an
    HDF5 file has none (a weights-only file)."""
    path = _os.fspath(filepath)
    if _h5py.is_hdf5(path):
        return _h5_model_config(path)
    if _zipfile.is_zipfile(path):
        return _archive_model_config(path)
    raise OSError(f"cannot read model file {path}: neither an HDF5 (.h5) model nor a .keras "
                  f"archive")


def check_model_config(path, config: dict, custom_objects: dict | None = None,
                       safe_mode: bool = True) -> None:
    """Check a model file's parsed config before anything is built.

    Raises:
        UnsafeModelError: ``safe_mode`` and a layer names code to run
            (:func:`model_config_code`); names the file, the layer and the function.
        UnknownLayerError: a layer class tf-keras does not know; names the file and the class.
    """
    if config is None:
        return
    if safe_mode:
        for layer, class_name, function in model_config_code(config):
            raise UnsafeModelError(path, layer, class_name, function)
    for layer, class_name in unknown_layer_classes(config, custom_objects):
        raise UnknownLayerError(path, layer, class_name)


def check_model_file_safe(filepath, custom_objects: dict | None = None) -> None:
    """Raise :class:`UnsafeModelError` when a model file names code that loading would run.

    Reads only the file's JSON configuration (HDF5 ``model_config`` or the ``config.json`` of
    a ``.keras`` archive); no layer is built, nothing is executed. Files written by Keras 2.0.8
    for the 2017 models and by this project pass. An unknown layer class raises
    :class:`UnknownLayerError`.
    """
    path = _os.fspath(filepath)
    check_model_config(path, read_model_config(path), custom_objects)


def robust_load_model(filepath, custom_objects: dict | None = None,
                      safe_mode: bool = True) -> keras.Model:
    """Load an HDF5 model written by Keras 2.0.x (2017) or by this project (not compiled).

    Whole-image models whose nested patch network was saved with a fixed input size (which
    tf-keras refuses to apply to a larger image) are rebuilt with the nested networks' inputs
    opened to ``(None, None, C)`` and the same weights. When tf-keras cannot rebuild a file at
    all, the model is re-created from the file's ``model_config`` and its weights loaded by
    topology. Optimiser state is not restored; compile the model before training.

    Loading never runs code named in the file unless ``safe_mode`` is False: the whole config
    (nested models and wrappers included) is read first, and a layer that calls a function
    named in the file (``Lambda``, ``TFOpLambda`` such as ``tf.io.write_file``, ...; pure
    tensor maths of :data:`SAFE_TF_FUNCTIONS` excepted) is refused with
    :class:`UnsafeModelError` naming the file, the layer and the function, before anything is
    built. A layer class tf-keras does not know gives :class:`UnknownLayerError`.

    Args:
        filepath: ``.h5`` model file (or a ``.keras`` archive).
        custom_objects: extra classes needed to deserialise the file.
        safe_mode: refuse layers that call code (default). Pass False only for a file you
            trust: its Lambda and op layers then run as stored.
    """
    from tf_keras.src.saving import serialization_lib as _serialization_lib

    path = _os.fspath(filepath)
    if not _os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    is_h5 = _h5py.is_hdf5(path)
    if not is_h5 and not _zipfile.is_zipfile(path):
        raise OSError(f"cannot read model file {path}: neither an HDF5 (.h5) model nor a .keras "
                      f"archive")
    if not is_h5:
        check_model_config(path, _archive_model_config(path), custom_objects, safe_mode)
        with _serialization_lib.SafeModeScope(bool(safe_mode)):
            model = keras.models.load_model(path, custom_objects=custom_objects, compile=False,
                                            safe_mode=bool(safe_mode))
        return _dm_resnet.relax_input_shape(model, custom_objects, nested=True)
    try:
        handle = _h5py.File(path, "r")
    except OSError as err:
        raise OSError(f"cannot read model file {path}: not a readable HDF5 file ({err})") from err
    with handle, _serialization_lib.SafeModeScope(bool(safe_mode)):
        # The config checked is the one built: tf-keras reads the same open file.
        config = _parse_model_config(path, handle.attrs.get("model_config"), "model_config")
        check_model_config(path, config, custom_objects, safe_mode)
        try:
            model = keras.models.load_model(handle, custom_objects=custom_objects,
                                            compile=False, safe_mode=bool(safe_mode))
        except OSError as err:
            raise OSError(f"cannot read model file {path}: {err}") from err
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            logger.warning("tf-keras could not load %s (%s); rebuilding from its config", path,
                           str(err).splitlines()[0] if str(err) else type(err).__name__)
            return _load_from_h5_config(path, custom_objects, config, handle)
        return _dm_resnet.relax_input_shape(model, custom_objects, nested=True)


def _load_from_h5_config(path, custom_objects, config, handle):
    if config is None:
        raise ValueError(f"{path} holds no model_config (a weights-only file?)")
    _dm_resnet.relax_nested_input_configs(config["config"])
    model = keras.models.model_from_config(config, custom_objects=custom_objects)
    model.load_weights(path)
    return model


class ModelRoleError(ValueError):
    """A model file holds a model of another role than the one expected (a whole-image
    classifier where a patch classifier is needed, ...); names the file, expected and found."""


#: Layers of the heatmap head a whole-image model carries when built with ``add_heatmap``.
HEATMAP_HEAD_LAYERS = frozenset({"hm_avg_pool", "hm_dense"})


def model_role(model: keras.Model) -> str:
    """The role of a model, from its architecture: ``"patch"``, ``"whole-image"`` or
    ``"heatmap"``.

    A model with a 4-D output (per-location class probabilities) is a heatmap model. A model
    that applies a nested network (a layer that is itself a model) and puts layers on top of
    it is a whole-image classifier: :func:`dm_resnet.add_top_layers` and the 2017 scripts
    build every whole-image model that way. Any other model (a flat network with a class
    output, as every patch net of :func:`get_dl_model`) counts as a patch classifier.
    """
    if len(model.output_shape) == 4:
        return "heatmap"
    if any(isinstance(layer, keras.Model) for layer in model.layers):
        return "whole-image"
    return "patch"


def _describe_role(model, role):
    shape = "x".join("?" if d is None else str(d) for d in model.input_shape[1:3])
    if role == "whole-image":
        nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
        return (f"a whole-image classifier ({shape} input, network {nested[0]!r} nested in it, "
                f"{model.output_shape[-1]} outputs)")
    if role == "heatmap":
        return f"a heatmap model (4-D output {tuple(model.output_shape)})"
    return f"a patch classifier ({shape} input, {model.output_shape[-1]} outputs)"


def check_model_role(model: keras.Model, filepath, expected: tuple,
                     flag: str | None = None) -> None:
    """Refuse a loaded model whose role (:func:`model_role`) is not among ``expected``.

    Args:
        model: the loaded model.
        filepath: its file, for the message.
        expected: accepted roles, e.g. ``("patch",)``; ``"whole-image+heatmap"`` accepts a
            whole-image model carrying a heatmap head (:data:`HEATMAP_HEAD_LAYERS`).
        flag: the option or argument that named the file (e.g. ``"--patch-model-state"``).

    Raises:
        ModelRoleError: naming the file, what was expected and what was found.
    """
    role = model_role(model)
    if role in expected:
        return role
    if role == "whole-image" and "whole-image+heatmap" in expected and \
            HEATMAP_HEAD_LAYERS <= {layer.name for layer in model.layers}:
        return role
    wanted = {"patch": "a patch classifier (a network ending in a softmax over the patch "
                       "classes, no nested network)",
              "whole-image": "a whole-image classifier",
              "heatmap": "a heatmap model",
              "whole-image+heatmap": "a whole-image model with a heatmap head (hm_avg_pool, "
                                     "hm_dense)"}
    where = f"{flag} {_os.fspath(filepath)}" if flag else _os.fspath(filepath)
    raise ModelRoleError(f"{where}: expected {' or '.join(wanted[r] for r in expected)}, found "
                         f"{_describe_role(model, role)}")


def check_top_layer_nb(model: keras.Model, top_layer_nb: int | None,
                       flag: str = "--top-layer-nb") -> None:
    """Refuse a first-trained-layer index that leaves nothing to train.

    Args:
        model: the built model.
        top_layer_nb: index of the first layer a stage trains, or None (nothing to check).
        flag: the option that set it, for the message.

    Raises:
        ValueError: ``top_layer_nb`` is negative, beyond the model's layers, or the layers
            from it on hold no trainable parameter; names the flag.
    """
    if top_layer_nb is None:
        return
    count = len(model.layers)
    if not 0 <= top_layer_nb < count:
        raise ValueError(f"{flag} {top_layer_nb} is beyond the model: it has {count} layers "
                         f"(0..{count - 1})")
    params = sum(int(np.prod(w.shape)) for layer in model.layers[top_layer_nb:]
                 for w in layer.trainable_weights)
    if params == 0:
        raise ValueError(f"{flag} {top_layer_nb}: layers {top_layer_nb}..{count - 1} of the "
                         f"model hold no trainable parameter, so that stage would train nothing")


@_dataclasses.dataclass
class ModelFileExtras:
    """What a training run writes into and beside each model file it saves.

    Passed explicitly to :func:`save_model_atomic` / :func:`save_model_distributed` and held
    by the checkpoint callbacks (their ``extras``); nothing is kept by file path.

    Attributes:
        recipe: the :class:`dm_image.InputRecipe`, stored as JSON in the HDF5 root attribute
            ``dm_image.RECIPE_ATTR`` (readable with h5py alone,
            ``dm_image.InputRecipe.from_model_file``).
        info: what the model is (a JSON-serialisable dict, e.g. ``{"net": "vgg16"}`` for a
            patch classifier), stored in the attribute :data:`MODEL_INFO_ATTR`.
        sidecar: ``(path, make_text)``: a text file written right after the NEXT save only
            (then cleared): the trainers' ``<best-model>.options.json``, so that an options
            file is written only once the run has produced a model and a run that fails
            before its first model leaves an earlier run's files as they were.
        run: the identity of the training run that wrote the file (``{"options_hash": ...}``),
            stored in the attribute :data:`MODEL_RUN_ATTR`: a run killed after saving its best
            model but before its checkpoint knows that model as its own when started again.
    """

    recipe: object = None
    info: "dict | None" = None
    sidecar: "tuple | None" = None
    run: "dict | None" = None

    def without_sidecar(self) -> "ModelFileExtras":
        """A copy that writes no sidecar (e.g. for ``--final-model``)."""
        return _dataclasses.replace(self, sidecar=None)


#: HDF5 root attribute of a model file holding what the model is (JSON), e.g. ``{"net":
#: "vgg16"}`` for a patch classifier: the backbone its whole-image conversion cuts by role.
MODEL_INFO_ATTR = "dm_model_info"


def read_model_info(filepath) -> dict | None:
    """The :data:`MODEL_INFO_ATTR` dict of a model file, or None (a 2017 file, or one saved
    by other code).

    Raises:
        ValueError: the attribute is not a JSON object (the message names the file).
    """
    raw = _dm_image.read_file_attr(filepath, MODEL_INFO_ATTR)
    if raw is None:
        return None
    try:
        info = _json.loads(raw)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ValueError(f"{filepath}: unreadable {MODEL_INFO_ATTR} attribute {raw!r}")
    return info


#: HDF5 root attribute of a trainer's model file: the identity of the run that wrote it (JSON).
MODEL_RUN_ATTR = "dm_training_run"


def read_model_run(filepath) -> dict | None:
    """The :data:`MODEL_RUN_ATTR` dict of a model file, or None (none, or unreadable)."""
    import h5py

    try:
        with h5py.File(_os.fspath(filepath), "r") as fh:
            raw = fh.attrs.get(MODEL_RUN_ATTR)
        run = None if raw is None else _json.loads(raw.decode() if isinstance(raw, bytes)
                                                   else str(raw))
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def save_h5_named(model: keras.Model, tmp, path, include_optimizer: bool) -> None:
    """``model.save(tmp)`` as HDF5; an HDF5 library failure while writing (h5py raises
    ``RuntimeError`` when a full disk stops it closing the file) becomes an ``OSError`` naming
    ``path``, so that a script ends with one line rather than a traceback.

    Raises:
        OSError: the write failed (the earlier file at ``path`` is kept by the caller).
    """
    try:
        with _warnings.catch_warnings():
            _warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
            model.save(tmp, overwrite=True, include_optimizer=include_optimizer,
                       save_format="h5")
    except NotImplementedError:
        raise
    except RuntimeError as err:
        folder = _os.path.dirname(_os.path.abspath(_os.fspath(path)))
        try:
            stat = _os.statvfs(folder)
            full = stat.f_bavail * stat.f_frsize < 16 * 2 ** 20
        except OSError:
            full = False
        raise OSError(f"writing {path} failed in HDF5 ({err})"
                      f"{'; the disk is full' if full else ''}; the earlier file is kept"
                      ) from err


def check_written_model(tmp, path) -> None:
    """Refuse a just written HDF5 model file that does not read back whole (a write that a
    full disk cut short without an error), before it replaces the older file at ``path``.

    Raises:
        OSError: the file does not open, or lacks its model configuration or weights.
    """
    import h5py

    try:
        with h5py.File(_os.fspath(tmp), "r") as fh:
            whole = "model_config" in fh.attrs and "model_weights" in fh
    except (OSError, RuntimeError, ValueError) as err:
        whole, reason = False, f"{type(err).__name__}: {err}"
    else:
        reason = "no model configuration or weights"
    if not whole:
        raise OSError(f"writing {path} failed: the new file does not read back ({reason}; is "
                      f"the disk full?); the earlier file is kept")


def save_model_atomic(model: keras.Model, filepath, include_optimizer: bool = True,
                      recipe=None, extras: "ModelFileExtras | None" = None) -> str:
    """Save ``model`` as HDF5 at ``filepath`` atomically, with what ``extras`` adds.

    Written through :func:`dm_image.atomic_write` (an exclusively created temporary file in the
    same folder, flushed to the disk, read back (:func:`check_written_model`) and renamed over
    ``filepath``), so a crash or a full disk never leaves a half-written model and an older
    file survives byte for byte.
    The result loads with :func:`robust_load_model` and with ``tf_keras.models.load_model``.
    ``recipe`` (a :class:`dm_image.InputRecipe`; default: ``extras.recipe``) is stored as JSON
    in the HDF5 root attribute ``dm_image.RECIPE_ATTR``; ``extras.info`` in
    :data:`MODEL_INFO_ATTR`; ``extras.sidecar`` is written right after (and then cleared).
    """
    path = _os.path.abspath(_os.fspath(filepath))
    extras = extras or ModelFileExtras()
    recipe = recipe if recipe is not None else extras.recipe
    recipe_json = recipe.to_json() if recipe is not None else None
    info_json = _json.dumps(dict(extras.info), sort_keys=True) if extras.info else None
    attrs = {k: v for k, v in ((_dm_image.RECIPE_ATTR, recipe_json), (MODEL_INFO_ATTR, info_json),
                               (MODEL_RUN_ATTR, _json.dumps(extras.run, sort_keys=True)
                                if extras.run else None)) if v is not None}

    def save(tmp):
        save_h5_named(model, tmp, path, include_optimizer)
        if attrs:
            import h5py

            with h5py.File(tmp, "a") as fh:
                fh.attrs.update(attrs)
        check_written_model(tmp, path)

    path = _dm_image.atomic_write(path, save, to_path=True, durable=True)
    logger.info("Saved model to %s", path)
    sidecar, extras.sidecar = extras.sidecar, None
    if sidecar is not None:
        text = sidecar[1]()
        _dm_image.atomic_write(_os.fspath(sidecar[0]), lambda fh: fh.write(text), text=True)
    return str(path)


# ---------------------------------------------------------------- training runs (re-exported)


def _training_runs():
    """The ``training_runs`` module, imported as the scripts import it: by its plain name with
    the ``ddsm_train`` folder on ``sys.path`` (added when missing), so there is one module."""
    if "training_runs" not in sys.modules:
        folder = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "ddsm_train")
        if folder not in sys.path:
            sys.path.insert(0, folder)
    import training_runs
    return training_runs


def __getattr__(name):
    if name in _TRAINING_RUNS_NAMES:
        return getattr(_training_runs(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TRAINING_RUNS_NAMES))
