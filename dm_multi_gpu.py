"""Data-parallel training on several GPUs or machines through ``tf.distribute``.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

The 2017 code sliced each batch across GPUs by hand (``make_parallel``). Here the same name
returns a model built under a ``tf.distribute`` strategy: ``MirroredStrategy`` for several GPUs of
one machine, ``MultiWorkerMirroredStrategy`` for several machines described by ``TF_CONFIG``.
Keras then splits every global batch across the replicas and sums their gradients, so the model
trains as on one device with the same global batch (models with BatchNormalization compute batch
statistics per replica, as usual in data-parallel training).

Typical use::

    strategy = get_strategy(gpu_count)          # first TF call of the program for multi-worker
    with strategy.scope():
        model = build_model(...)                # or: model, _ = make_parallel(model, gpu_count)
    model.compile(...)                          # compile/fit use the model's strategy
"""
import functools
import json
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras as keras

from dm_resnet import rebuild_model

logger = logging.getLogger(__name__)

__all__ = ["PRECISION_POLICIES", "tf_config_workers", "get_strategy", "make_parallel",
           "set_precision_policy", "apply_precision_policy"]

PRECISION_POLICIES = {None: "float32", "float32": "float32", "float16": "mixed_float16",
                      "bfloat16": "mixed_bfloat16"}


def tf_config_workers() -> int:
    """Number of tasks (chief + workers) in the ``TF_CONFIG`` cluster; 0 when unset.

    Raises:
        ValueError: ``TF_CONFIG`` is not valid JSON with a ``cluster`` entry.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return 0
    try:
        cluster = json.loads(raw)["cluster"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"TF_CONFIG should be JSON with a 'cluster' entry, got {raw!r}") from None
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


@functools.lru_cache(maxsize=None)
def _create_strategy(kind, devices):
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.MirroredStrategy(devices=list(devices))


def get_strategy(gpu_count: Optional[int] = None, devices: Optional[Sequence[str]] = None
                 ) -> tf.distribute.Strategy:
    """The distribution strategy for this process.

    A ``TF_CONFIG`` cluster of more than one task gives ``MultiWorkerMirroredStrategy`` (each
    worker uses its visible GPUs; create it before any other TensorFlow work). Otherwise
    ``devices`` (e.g. ``["/cpu:0", "/cpu:1"]``) or ``gpu_count`` > 1 give ``MirroredStrategy``
    over those devices / the first ``gpu_count`` GPUs; else the default (one-device) strategy.
    Strategies are created once per configuration and reused.

    Args:
        gpu_count: number of GPUs (``NUM_GPU_DEVICES``); None or 1 for one device.
        devices: explicit device names, overriding ``gpu_count``.

    Returns:
        ``tf.distribute.Strategy``.

    Raises:
        ValueError: ``gpu_count`` exceeds the visible GPUs, or is < 1.
    """
    if tf_config_workers() > 1:
        strategy = _create_strategy("multi_worker", None)
    elif devices:
        strategy = _create_strategy("mirrored", tuple(devices))
    else:
        gpu_count = 1 if gpu_count is None else int(gpu_count)
        if gpu_count < 1:
            raise ValueError(f"gpu_count should be >= 1, got {gpu_count}")
        if gpu_count == 1:
            return tf.distribute.get_strategy()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) < gpu_count:
            raise ValueError(f"NUM_GPU_DEVICES/gpu_count is {gpu_count} but only {len(gpus)} "
                             f"GPU(s) are visible: {[d.name for d in gpus]}")
        strategy = _create_strategy("mirrored", tuple(d.name for d in gpus[:gpu_count]))
    logger.info("Using %s with %d replicas", type(strategy).__name__,
                strategy.num_replicas_in_sync)
    return strategy


def make_parallel(model: keras.Model, gpu_count: int, devices: Optional[Sequence[str]] = None
                  ) -> Tuple[keras.Model, keras.Model]:
    """Data-parallel version of ``model`` over ``gpu_count`` devices (2017 name).

    Args:
        model: a tf-keras model (built under any strategy).
        gpu_count: number of GPUs; 1 returns the model itself.
        devices: explicit devices for ``MirroredStrategy`` (tests use logical CPUs).

    Returns:
        ``(parallel_model, original_model)``: with ``tf.distribute`` both are the same model
        object built under the strategy (its weights are mirrored, so saving it saves the plain
        model); the pair is kept for 2017 callers.
    """
    strategy = get_strategy(gpu_count, devices)
    if model.distribute_strategy is strategy or strategy is tf.distribute.get_strategy():
        return model, model
    parallel = rebuild_model(model, strategy=strategy)
    return parallel, parallel


def set_precision_policy(mixed_precision: Optional[str] = None) -> str:
    """Set the global Keras dtype policy for ``--mixed-precision`` (None: float32).

    Returns:
        str: the policy name set.
    """
    if mixed_precision not in PRECISION_POLICIES:
        raise ValueError(f"mixed_precision should be one of {list(PRECISION_POLICIES)}, "
                         f"got {mixed_precision!r}")
    name = PRECISION_POLICIES[mixed_precision]
    keras.mixed_precision.set_global_policy(name)
    return name


def _set_layer_dtypes(config, policy, output_names):
    for entry in config.get("layers", []):
        cfg = entry.get("config", {})
        if entry.get("class_name") != "InputLayer" and "dtype" in cfg:
            cfg["dtype"] = "float32" if cfg.get("name") in output_names else policy
        if "layers" in cfg:
            _set_layer_dtypes(cfg, policy, ())


def apply_precision_policy(model: keras.Model, mixed_precision: Optional[str] = None,
                           custom_objects: Optional[Dict[str, object]] = None) -> keras.Model:
    """Rebuild ``model`` so every layer computes in the ``--mixed-precision`` policy.

    Output layers (the final softmax) stay float32, as do all variables, so probabilities and
    the loss are float32. Works on models loaded from files, whose layers carry explicit float32
    dtypes. Also sets the global policy (``mixed_float16`` makes ``compile`` add loss scaling).

    Args:
        model: tf-keras model.
        mixed_precision: None, ``"float16"`` or ``"bfloat16"``.
        custom_objects: classes needed to deserialise the config.

    Returns:
        The model to use (``model`` itself for None).
    """
    policy = set_precision_policy(mixed_precision)
    if policy == "float32":
        return model
    output_names = {layer.name for layer in model.layers[-1:]}
    if not isinstance(model, keras.Sequential):
        output_names = {t._keras_history.layer.name for t in model.outputs}

    def edit(config: dict) -> bool:
        _set_layer_dtypes(config, policy, output_names)
        return True

    new_model = rebuild_model(model, edit, custom_objects)
    logger.info("Mixed precision %s: output layers %s kept float32", policy, sorted(output_names))
    return new_model
