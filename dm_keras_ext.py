"""Keras extensions: model factory, optimisers, robust loading of 2017 models, training loops.

Part of the reimplementation of Shen et al., "Deep Learning to Improve Breast Cancer Detection on
Screening Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427. Keras 2 API through tf-keras
(``import tf_keras as keras``).

The module holds three layers, each in its own sections (the ``# ----`` headings), in order:

1. **Model building**: "patch-net factory" (:func:`get_dl_model`, read from the table of
   backbones ``dm_resnet.BACKBONES``), "Keras 2.0.8 update rules" (:func:`create_optimizer`),
   "bias learning-rate multiplier", "rebuilding with new settings"
   (:func:`set_regularization`), "frozen BatchNormalization" (:func:`set_frozen_bn_mode`).
2. **Model files**: "loading and saving model files": the safety check of a file's layers
   (:func:`check_model_file_safe`), :func:`robust_load_model` (Keras 2.0.8 files), model
   roles, :func:`save_model_atomic` with :class:`ModelFileExtras` (input recipe, model info,
   options file: passed explicitly, never kept by path).
3. **Training runs**: "metrics and callbacks" (best-model checkpoints, the non-finite guard),
   "resumable runs, logs and curves" (the last-epoch checkpoint, :func:`resolve_resume`, CSV
   log, curves), "staged training" (the stage runner) and "staged training (typed)":
   :func:`train_3stage` / :func:`train_2stage` take a :class:`StagePlan` (or a trainer's
   options object, whole), :class:`StageData` and :class:`StageRun`; the 2017 keyword calls
   :func:`do_3stage_training` / :func:`do_2stage_training` ("2017 staged-training calls") are
   thin wrappers over them.
"""
from __future__ import annotations

import copy
import dataclasses as _dataclasses
import json as _json
import logging
import os as _os
import re
import sys
import threading
import time
import types as _types
import warnings as _warnings
import zipfile as _zipfile

import h5py as _h5py
import numpy as np
import tensorflow as tf
import tf_keras as keras
from sklearn.metrics import roc_auc_score
from tf_keras.src.engine import base_layer_utils as _base_layer_utils

import dm_image as _dm_image
import dm_resnet as _dm_resnet
from dm_image import load_dat_ram  # noqa: F401  (2017 name, re-exported)
from dm_resnet import rebuild_model, walk_layer_configs  # rebuild_model: re-exported
from dm_resnet import (YAROSLAV_FILTERS, Yaroslav,  # noqa: F401  (re-exported: the table's home)
                       dm_resnet14_patch_net, get_preprocess_input)

logger = logging.getLogger(__name__)

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
    "MODEL_INFO_ATTR",
    "ModelFileExtras",
    "read_model_info",
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
    "load_dat_ram",
    "ovr_auroc",
    "is_bias_variable",
    "with_bias_multiplier",
    "rebuild_model",
    "set_regularization",
    "class_weight_dict",
    "save_model_distributed",
    "FROZEN_BN_MODES",
    "set_frozen_bn_mode",
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
    """

    recipe: object = None
    info: "dict | None" = None
    sidecar: "tuple | None" = None

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
    import h5py

    try:
        with h5py.File(_os.fspath(filepath), "r") as fh:
            raw = fh.attrs.get(MODEL_INFO_ATTR)
    except OSError:
        return None
    if raw is None:
        return None
    try:
        info = _json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ValueError(f"{filepath}: unreadable {MODEL_INFO_ATTR} attribute {raw!r}")
    return info


def save_model_atomic(model: keras.Model, filepath, include_optimizer: bool = True,
                      recipe=None, extras: "ModelFileExtras | None" = None) -> str:
    """Save ``model`` as HDF5 at ``filepath`` atomically, with what ``extras`` adds.

    Written through :func:`dm_image.atomic_write` (an exclusively created temporary file in the
    same folder, renamed over ``filepath``), so a crash or a full disk never leaves a
    half-written model and an older file survives.
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

    def save(tmp):
        with _warnings.catch_warnings():
            _warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
            model.save(tmp, overwrite=True, include_optimizer=include_optimizer,
                       save_format="h5")
        if recipe_json is not None or info_json is not None:
            import h5py

            with h5py.File(tmp, "a") as fh:
                if recipe_json is not None:
                    fh.attrs[_dm_image.RECIPE_ATTR] = recipe_json
                if info_json is not None:
                    fh.attrs[MODEL_INFO_ATTR] = info_json

    path = _dm_image.atomic_write(path, save, to_path=True)
    logger.info("Saved model to %s", path)
    sidecar, extras.sidecar = extras.sidecar, None
    if sidecar is not None:
        text = sidecar[1]()
        _dm_image.atomic_write(_os.fspath(sidecar[0]), lambda fh: fh.write(text), text=True)
    return str(path)


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
    """

    def __init__(self, filepath, monitor="val_accuracy", mode="max", extras=None):
        super().__init__()
        self.extras = extras
        if mode not in ("max", "min"):
            raise ValueError(f"mode should be one of ['max', 'min'], got {mode!r}")
        self.filepath, self.monitor, self.mode = str(filepath), monitor, mode
        self.best = -np.inf if mode == "max" else np.inf
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            logger.warning("BestModelCheckpoint: %s not in logs %s", self.monitor,
                           sorted(logs or {}))
            return
        better = value > self.best if self.mode == "max" else value < self.best
        if better and not _model_is_finite(self.model, logs):
            logger.error("epoch %d: non-finite loss or weights; %s is not saved", epoch + 1,
                         self.filepath)
            return
        if better:
            logger.info("epoch %d: %s improved from %.5f to %.5f, saving %s", epoch + 1,
                        self.monitor, self.best, value, self.filepath)
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
    """

    def __init__(self, filepath, test_data, batch_size=None, test_samples=None,
                 test_augment=False, extras=None):
        super().__init__()
        self.extras = extras
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
        if not np.isnan(auc) and auc > self.best_auc and not _model_is_finite(self.model, logs):
            logger.error("epoch %d: non-finite loss or weights; %s is not saved", epoch + 1,
                         self.filepath)
            return
        if not np.isnan(auc) and auc > self.best_auc:
            logger.info("epoch %d: AUROC improved from %.4f to %.4f, saving %s", epoch + 1,
                        self.best_auc, auc, self.filepath)
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
            with _warnings.catch_warnings():
                _warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy",
                                         category=UserWarning)
                m.save(tmp, overwrite=True, include_optimizer=True, save_format="h5")
            with h5py.File(tmp, "a") as f:
                f.create_dataset(TRAINING_STATE_KEY, data=text,
                                 dtype=h5py.string_dtype("utf-8"))
        return _dm_image.atomic_write(_os.path.abspath(_os.fspath(dest)), write, to_path=True)

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
                                       to_path=True)
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
        checkpointer: the best-model callback (2-stage: a :class:`DMAucModelCheckpoint` on
            the validation data when None; 3-stage: best ``val_accuracy``).
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
    ckpt = BestModelCheckpoint(run.best_model, monitor="val_accuracy", mode="max",
                               extras=run.extras)
    stages = [1] if not use_pretrained else [n for n, e in (
        (1, plan.nb_epoch), (2, plan.top_layer_epochs), (3, plan.all_layer_epochs)) if e > 0]
    rec = run.recorder([n for n in stages if n != 1 or plan.nb_epoch > 0],
                       {"use_pretrained": bool(use_pretrained), "top_layer_nb": top_layer_nb})
    stage = _Stage(data, ckpt, plan, run, rec)
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
        seed: with a seed, each epoch starts by seeding Python, NumPy and TensorFlow with
            ``seed + epoch`` (and retraces the train step of a model with dropout), so that an
            epoch's randomness depends only on (seed, epoch): a resumed run ends as an
            uninterrupted one would. None: no reseeding.
        checkpoint_path: after each epoch the model, its optimizer state and the run's state
            (stage, epoch, lr, early-stopping and plateau counters, best so far, ``seed``,
            ``run_info``, the epochs' logs) are written atomically to this HDF5 file (see
            :func:`save_training_checkpoint`); the last epoch marks it finished. None: off.
        log_csv: the per-epoch CSV log (:func:`write_training_log`), rewritten each epoch.
        curves_png: the training curves (:func:`plot_training_curves`) written at the end.
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
