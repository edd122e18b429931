"""ResNet builders, the table of backbones, the patch-to-whole-image converter ``add_top_layers``
and model rebuilding.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427. Residual blocks follow He et al. 2016 ("org",
post-activation: conv-BN-relu ... add then relu) and He et al. 2016b (pre-activation:
BN-relu-conv), arXiv:1512.03385 and arXiv:1603.05027.

Every builder takes a tensor and returns a tensor; every layer it creates is named from the
``name`` argument, so models can be cut, frozen or inspected by layer name. Keras 2 API via
tf-keras (``import tf_keras as keras``), channels-last tensors.

The table of backbones, :data:`BACKBONES`, holds one :class:`Backbone` record per patch
classifier backbone (constructor, preprocessing, ImageNet weight file, stage-2 and cut roles,
patch head); the model factory (``dm_keras_ext.get_dl_model``), ``add_top_layers``, the input
recipe and the scripts' ``--net``/``--patch-net`` choices read it, and
:func:`register_backbone` adds one.

Conventions kept from the 2017 code (so that parameter counts and saved models match):
- every Conv2D/Dense of the builders uses a bias, ``he_normal`` initialisation and an L2 kernel
  penalty ``weight_decay``; a Dropout layer follows each relu even at rate 0 (the rate is changed
  between training stages);
- the first block of every residual stage has a 1x1 convolution projection shortcut (``valid``
  padding, optional BN); later blocks use identity shortcuts;
- ``ResNetBuilder.build`` takes ``input_shape`` as ``(nb_channels, nb_rows, nb_cols)``, as the
  2017 (keras-resnet) builders did, and permutes it to channels-last.
"""
import copy
import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tf_keras as keras
from tf_keras import layers

if TYPE_CHECKING:  # annotations only
    import tensorflow as tf

logger = logging.getLogger(__name__)

__all__ = [
    "l1l2_penalty_reg",
    "conv_bn_relu",
    "bn_relu_conv",
    "shortcut",
    "basic_block",
    "basic_block_org",
    "bottleneck",
    "bottleneck_org",
    "residual_stage",
    "vgg_block",
    "BLOCK_FNS",
    "ResNetBuilder",
    "MultiViewResNetBuilder",
    "walk_layer_configs",
    "rebuild_model",
    "relax_input_shape",
    "relax_nested_input_configs",
    "find_cut_layer",
    "resolve_kept_layer_idx",
    "add_top_layers",
    "Backbone",
    "PatchHead",
    "PATCH_HEAD",
    "KerasApplication",
    "BACKBONES",
    "register_backbone",
    "get_backbone",
    "backbone_names",
    "get_preprocess_input",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "YAROSLAV_FILTERS",
    "Yaroslav",
    "dm_resnet14_patch_net",
    "CUT_LAYER_ROLES",
    "KERAS208_PATCH_HEADS",
]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _channel_axis() -> int:
    return -1 if keras.backend.image_data_format() == "channels_last" else 1


def _l2(weight_decay):
    return keras.regularizers.l2(weight_decay) if weight_decay else None


def _conv(filters, kernel_size, strides, weight_decay, name, padding="same"):
    return layers.Conv2D(filters, kernel_size, strides=strides, padding=padding,
                         kernel_initializer="he_normal", kernel_regularizer=_l2(weight_decay),
                         name=name)


def _bn(name):
    return layers.BatchNormalization(axis=_channel_axis(), name=name)


def l1l2_penalty_reg(alpha: float = 1.0, l1_ratio: float = 0.5) -> keras.regularizers.L1L2:
    """Elastic-net kernel penalty in the glmnet / scikit-learn convention.

    penalty(w) = alpha * (l1_ratio * |w|_1 + 0.5 * (1 - l1_ratio) * |w|_2^2).

    Note: the 2017 code returned ``l2(alpha)`` (no factor 0.5) for ``l1_ratio == 0``; here the
    formula above holds for every ``l1_ratio`` in [0, 1].

    Args:
        alpha: overall penalty strength, >= 0.
        l1_ratio: share of the L1 term in [0, 1]; 1 is the lasso, 0 ridge.

    Returns:
        A ``keras.regularizers.L1L2`` instance.
    """
    if alpha < 0:
        raise ValueError(f"alpha should be >= 0, got {alpha}")
    if not 0.0 <= l1_ratio <= 1.0:
        raise ValueError(f"l1_ratio should be in [0, 1], got {l1_ratio}")
    return keras.regularizers.L1L2(l1=alpha * l1_ratio, l2=0.5 * (1.0 - l1_ratio) * alpha)


# ----------------------------------------------------------------------------------------------
# Blocks: tensor in, tensor out
# ----------------------------------------------------------------------------------------------
def conv_bn_relu(x: "tf.Tensor", filters: int, kernel_size: Tuple[int, int],
                 strides: Tuple[int, int] = (1, 1), weight_decay: float = 1e-4,
                 dropout: float = 0.0, last: bool = False, name: str = "cbr") -> "tf.Tensor":
    """Conv -> BN -> relu -> dropout (``last=True``: conv -> BN only).

    Layers: ``{name}_conv``, ``{name}_bn``, ``{name}_relu``, ``{name}_drop``.
    """
    x = _conv(filters, kernel_size, strides, weight_decay, f"{name}_conv")(x)
    x = _bn(f"{name}_bn")(x)
    if last:
        return x
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    return layers.Dropout(dropout, name=f"{name}_drop")(x)


def bn_relu_conv(x: "tf.Tensor", filters: int, kernel_size: Tuple[int, int],
                 strides: Tuple[int, int] = (1, 1), weight_decay: float = 1e-4,
                 dropout: float = 0.0, name: str = "brc") -> "tf.Tensor":
    """BN -> relu -> dropout -> conv (pre-activation unit, arXiv:1603.05027)."""
    x = _bn(f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Dropout(dropout, name=f"{name}_drop")(x)
    return _conv(filters, kernel_size, strides, weight_decay, f"{name}_conv")(x)


def shortcut(x: "tf.Tensor", residual: "tf.Tensor", identity: bool = True,
             strides: Tuple[int, int] = (1, 1), with_bn: bool = False, org: bool = False,
             weight_decay: float = 1e-4, dropout: float = 0.0, name: str = "shortcut"
             ) -> "tf.Tensor":
    """Add a shortcut from ``x`` to ``residual``.

    Args:
        x: block input, 4-D channels-last.
        residual: output of the residual branch.
        identity: True: ``x`` is added as is (shapes must match); False: 1x1 conv projection
            (``{name}_0_conv``, ``valid`` padding, stride ``strides``) to the residual's
            channels, followed by BN (``{name}_0_bn``) when ``with_bn``.
        org: post-activation ("org") block: relu (``{name}_out``) and dropout after the add.

    Returns:
        The summed (and for ``org`` activated) tensor, ``{name}_add``.
    """
    short = x
    if not identity:
        short = _conv(residual.shape[_channel_axis()], (1, 1), strides, weight_decay,
                      f"{name}_0_conv", padding="valid")(x)
        if with_bn:
            short = _bn(f"{name}_0_bn")(short)
    elif tuple(x.shape[1:]) != tuple(residual.shape[1:]):
        raise ValueError(f"identity shortcut {name!r} needs equal shapes, got input "
                         f"{tuple(x.shape)} and residual {tuple(residual.shape)}")
    out = layers.Add(name=f"{name}_add")([short, residual])
    if org:
        out = layers.Activation("relu", name=f"{name}_out")(out)
        out = layers.Dropout(dropout, name=f"{name}_out_drop")(out)
    return out


def basic_block(x: "tf.Tensor", nb_filters: int, init_strides: Tuple[int, int] = (1, 1),
                identity: bool = True, shortcut_with_bn: bool = False,
                enlarge_factor: Optional[int] = None, weight_decay: float = 1e-4,
                dropout: float = 0.0, name: str = "basic") -> "tf.Tensor":
    """Pre-activation basic block: two 3x3 BN-relu-conv units plus a shortcut."""
    y = bn_relu_conv(x, nb_filters, (3, 3), init_strides, weight_decay, dropout, f"{name}_1")
    y = bn_relu_conv(y, nb_filters, (3, 3), (1, 1), weight_decay, dropout, f"{name}_2")
    return shortcut(x, y, identity, init_strides, shortcut_with_bn, False, weight_decay,
                    dropout, name)


def basic_block_org(x: "tf.Tensor", nb_filters: int, init_strides: Tuple[int, int] = (1, 1),
                    identity: bool = True, shortcut_with_bn: bool = False,
                    enlarge_factor: Optional[int] = None, weight_decay: float = 1e-4,
                    dropout: float = 0.0, name: str = "basic") -> "tf.Tensor":
    """Post-activation basic block: conv-BN-relu, conv-BN, add, relu."""
    y = conv_bn_relu(x, nb_filters, (3, 3), init_strides, weight_decay, dropout,
                     name=f"{name}_1")
    y = conv_bn_relu(y, nb_filters, (3, 3), (1, 1), weight_decay, dropout, last=True,
                     name=f"{name}_2")
    return shortcut(x, y, identity, init_strides, shortcut_with_bn, True, weight_decay,
                    dropout, name)


def bottleneck(x: "tf.Tensor", nb_filters: int, init_strides: Tuple[int, int] = (1, 1),
               identity: bool = True, shortcut_with_bn: bool = False,
               enlarge_factor: Optional[int] = 4, weight_decay: float = 1e-4, dropout: float = 0.0,
               name: str = "bottleneck") -> "tf.Tensor":
    """Pre-activation bottleneck: 1x1, 3x3, 1x1 (x ``enlarge_factor``) BN-relu-conv units."""
    y = bn_relu_conv(x, nb_filters, (1, 1), init_strides, weight_decay, dropout, f"{name}_1")
    y = bn_relu_conv(y, nb_filters, (3, 3), (1, 1), weight_decay, dropout, f"{name}_2")
    y = bn_relu_conv(y, nb_filters * enlarge_factor, (1, 1), (1, 1), weight_decay, dropout,
                     f"{name}_3")
    return shortcut(x, y, identity, init_strides, shortcut_with_bn, False, weight_decay,
                    dropout, name)


def bottleneck_org(x: "tf.Tensor", nb_filters: int, init_strides: Tuple[int, int] = (1, 1),
                   identity: bool = True, shortcut_with_bn: bool = False,
                   enlarge_factor: Optional[int] = 4, weight_decay: float = 1e-4,
                   dropout: float = 0.0, name: str = "bottleneck") -> "tf.Tensor":
    """Post-activation ("org") bottleneck, as in the ResNet paper and the 2017 top layers.

    1x1 conv (stride ``init_strides``)-BN-relu, 3x3 conv-BN-relu, 1x1 conv
    (``nb_filters * enlarge_factor``)-BN, add the shortcut, relu.
    """
    y = conv_bn_relu(x, nb_filters, (1, 1), init_strides, weight_decay, dropout,
                     name=f"{name}_1")
    y = conv_bn_relu(y, nb_filters, (3, 3), (1, 1), weight_decay, dropout, name=f"{name}_2")
    y = conv_bn_relu(y, nb_filters * enlarge_factor, (1, 1), (1, 1), weight_decay, dropout,
                     last=True, name=f"{name}_3")
    return shortcut(x, y, identity, init_strides, shortcut_with_bn, True, weight_decay,
                    dropout, name)


BLOCK_FNS = {
    "basic": basic_block,
    "basic_org": basic_block_org,
    "bottleneck": bottleneck,
    "bottleneck_org": bottleneck_org,
}


def _resolve_block_fn(block_fn) -> Callable:
    if callable(block_fn):
        return block_fn
    if block_fn not in BLOCK_FNS:
        raise ValueError(f"unknown block_fn {block_fn!r}; valid: {sorted(BLOCK_FNS)}")
    return BLOCK_FNS[block_fn]


def residual_stage(x: "tf.Tensor", block_fn: Union[str, Callable], nb_filters: int,
                   repetitions: int, is_first_layer: bool = False, shortcut_with_bn: bool = False,
                   enlarge_factor: Optional[int] = 4, weight_decay: float = 1e-4,
                   dropout: float = 0.0, name: str = "stage") -> "tf.Tensor":
    """``repetitions`` residual blocks; the first has a projection shortcut and, unless
    ``is_first_layer``, stride 2. Blocks are named ``{name}_block{i}`` (i from 1)."""
    block_fn = _resolve_block_fn(block_fn)
    for i in range(repetitions):
        strides = (2, 2) if i == 0 and not is_first_layer else (1, 1)
        x = block_fn(x, nb_filters, init_strides=strides, identity=(i > 0),
                     shortcut_with_bn=shortcut_with_bn, enlarge_factor=enlarge_factor,
                     weight_decay=weight_decay, dropout=dropout, name=f"{name}_block{i + 1}")
    return x


def vgg_block(x: "tf.Tensor", nb_filters: int, repetitions: int, dropout: float = 0.0,
              weight_decay: float = 1e-4, name: str = "vgg") -> "tf.Tensor":
    """``repetitions`` x (3x3 conv + BN + relu + dropout), then 2x2 max pool (``{name}_pool``)."""
    for i in range(repetitions):
        x = conv_bn_relu(x, nb_filters, (3, 3), (1, 1), weight_decay, dropout,
                         name=f"{name}_{i + 1}")
    return layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"{name}_pool")(x)


# ----------------------------------------------------------------------------------------------
# ResNet builders (architecture as data)
# ----------------------------------------------------------------------------------------------
# name -> (block function key, repetitions per stage). dm_resnet_* are the small DM-challenge
# variants: depth = stem conv + 3 convs per bottleneck + the dense layer (14 = 1 + 4*3 + 1,
# 47 = 1 + 5*3*3 + 1 with 5 stages of 3 blocks, 56 = 6 stages, 65 = 7 stages).
RESNET_VARIANTS = {
    "resnet_18": ("basic", [2, 2, 2, 2]),
    "resnet_34": ("basic", [3, 4, 6, 3]),
    "resnet_38": ("bottleneck", [3, 6, 3]),
    "resnet_50": ("bottleneck", [3, 4, 6, 3]),
    "resnet_50_org": ("bottleneck_org", [3, 4, 6, 3]),
    "resnet_101": ("bottleneck", [3, 4, 23, 3]),
    "resnet_152": ("bottleneck", [3, 8, 36, 3]),
    "dm_resnet_14": ("bottleneck", [1, 1, 1, 1]),
    "dm_resnet_47rb5": ("bottleneck", [3] * 5),
    "dm_resnet_56rb6": ("bottleneck", [3] * 6),
    "dm_resnet_65rb7": ("bottleneck", [3] * 7),
}
__all__.append("RESNET_VARIANTS")


@dataclasses.dataclass(frozen=True)
class _Tower:
    """The convolutional part of a :class:`ResNetBuilder` network, as the arguments of
    :meth:`ResNetBuilder.build` name it: ``block_fn`` (a function or a key of ``BLOCK_FNS``)
    and ``repetitions`` (blocks per stage; filters double per stage from ``nb_init_filter``);
    the stem conv (``init_filter_size``, ``init_conv_stride``) and its max pool
    (``pool_size`` 0/None: no pool, ``pool_stride``); the L2 ``weight_decay`` of the convs;
    the ``inp_dropout`` and ``hidden_dropout`` rates; BN on projection shortcuts
    (``shortcut_with_bn``) and the bottleneck output factor (``bottleneck_enlarge_factor``)."""
    block_fn: Union[str, Callable]
    repetitions: Sequence[int]
    nb_init_filter: int = 64
    init_filter_size: int = 7
    init_conv_stride: int = 2
    pool_size: int = 3
    pool_stride: int = 2
    weight_decay: float = 1e-4
    inp_dropout: float = 0.0
    hidden_dropout: float = 0.0
    shortcut_with_bn: bool = False
    bottleneck_enlarge_factor: int = 4


class ResNetBuilder:
    """Builds ResNet-like classifiers (keras-resnet style, as in the 2017 code).

    ``input_shape`` is ``(nb_channels, nb_rows, nb_cols)``; rows/cols may be None.
    ``build_<name>(input_shape, num_outputs, **kwargs)`` (``build_resnet_50``, ...) builds each
    name of ``RESNET_VARIANTS``.
    """

    @staticmethod
    def l1l2_penalty_reg(alpha: float = 1.0, l1_ratio: float = 0.5) -> keras.regularizers.L1L2:
        """See :func:`l1l2_penalty_reg`."""
        return l1l2_penalty_reg(alpha, l1_ratio)

    @staticmethod
    def _shared_conv_layers(input_shape, tower: _Tower, prefix=""):
        """Input -> dropout -> stem conv-BN-relu -> max pool -> residual stages -> GAP.

        ``tower`` holds the architecture (:class:`_Tower`); layer names start with ``prefix``.
        Returns ``(input_tensor, pooled_features)``.
        """
        if len(input_shape) != 3:
            raise ValueError("input_shape should be (nb_channels, nb_rows, nb_cols), "
                             f"got {input_shape}")
        if not tower.repetitions:
            raise ValueError(f"repetitions should be a non-empty list, got {tower.repetitions}")
        block_fn = _resolve_block_fn(tower.block_fn)
        chans, rows, cols = input_shape
        shape = (rows, cols, chans) if _channel_axis() == -1 else (chans, rows, cols)
        inp = keras.Input(shape=shape, name=f"{prefix}input")
        x = layers.Dropout(tower.inp_dropout, name=f"{prefix}input_drop")(inp)
        x = conv_bn_relu(x, tower.nb_init_filter, (tower.init_filter_size,) * 2,
                         (tower.init_conv_stride,) * 2, tower.weight_decay, tower.hidden_dropout,
                         name=f"{prefix}stem")
        if tower.pool_size:
            x = layers.MaxPooling2D((tower.pool_size,) * 2, strides=(tower.pool_stride,) * 2,
                                    padding="same", name=f"{prefix}stem_pool")(x)
        filters = tower.nb_init_filter
        for i, reps in enumerate(tower.repetitions):
            x = residual_stage(x, block_fn, filters, reps, is_first_layer=(i == 0),
                               shortcut_with_bn=tower.shortcut_with_bn,
                               enlarge_factor=tower.bottleneck_enlarge_factor,
                               weight_decay=tower.weight_decay, dropout=tower.hidden_dropout,
                               name=f"{prefix}stage{i + 1}")
            filters *= 2
        return inp, layers.GlobalAveragePooling2D(name=f"{prefix}avg_pool")(x)

    @staticmethod
    def _classifier(features, num_outputs, alpha, l1_ratio):
        activation = "softmax" if num_outputs > 1 else "sigmoid"
        return layers.Dense(num_outputs, activation=activation, kernel_initializer="he_normal",
                            kernel_regularizer=l1l2_penalty_reg(alpha, l1_ratio),
                            name="predictions")(features)

    @classmethod
    def build(cls, input_shape: Sequence[Optional[int]], num_outputs: int,
              block_fn: Union[str, Callable], repetitions: Sequence[int], nb_init_filter: int = 64,
              init_filter_size: int = 7, init_conv_stride: int = 2, pool_size: int = 3,
              pool_stride: int = 2, weight_decay: float = 1e-4, alpha: float = 1.0,
              l1_ratio: float = 0.5, inp_dropout: float = 0.0, hidden_dropout: float = 0.0,
              shortcut_with_bn: bool = False, bottleneck_enlarge_factor: int = 4) -> keras.Model:
        """Build a single-input ResNet classifier (:class:`MultiViewResNetBuilder`: the
        two-view one).

        Args:
            input_shape: ``(nb_channels, nb_rows, nb_cols)`` (2017 convention).
            num_outputs: classes; 1 gives a sigmoid output, more a softmax.
            block_fn: block function or a key of ``BLOCK_FNS``.
            repetitions: blocks per stage; filters double (and size halves) per stage.
            alpha, l1_ratio: elastic-net penalty of the final dense (:func:`l1l2_penalty_reg`).
            Other args: stem conv/pool geometry, L2 of convs, dropout rates, shortcut BN.

        Returns:
            A ``keras.Model`` mapping images to class probabilities ``(batch, num_outputs)``.
        """
        tower = _Tower(
            block_fn, repetitions, nb_init_filter, init_filter_size, init_conv_stride, pool_size,
            pool_stride, weight_decay, inp_dropout, hidden_dropout, shortcut_with_bn,
            bottleneck_enlarge_factor)
        return cls._assemble(input_shape, tower, num_outputs, alpha, l1_ratio)

    @classmethod
    def _assemble(cls, input_shape, tower: _Tower, num_outputs, alpha, l1_ratio):
        """The model of :meth:`build`: one ``tower`` and the classifier."""
        inp, feats = cls._shared_conv_layers(input_shape, tower)
        out = cls._classifier(feats, num_outputs, alpha, l1_ratio)
        return keras.Model(inp, out, name="resnet")

    @classmethod
    def build_variant(cls, variant: str, input_shape: Sequence[Optional[int]], num_outputs: int,
                      **kwargs: Any) -> keras.Model:
        """Build a named variant of ``RESNET_VARIANTS`` (e.g. ``"resnet_50"``)."""
        if variant not in RESNET_VARIANTS:
            raise ValueError(f"unknown ResNet variant {variant!r}; "
                             f"valid: {sorted(RESNET_VARIANTS)}")
        block_key, reps = RESNET_VARIANTS[variant]
        return cls.build(input_shape, num_outputs, BLOCK_FNS[block_key], list(reps), **kwargs)


def _variant_builder(variant: str) -> classmethod:
    """The classmethod ``build_<variant>(input_shape, num_outputs, **kwargs)``: the 2017 name
    of ``cls.build_variant(variant, ...)``."""
    def build_named(cls, input_shape: Sequence[Optional[int]], num_outputs: int, **kwargs: Any
                    ) -> keras.Model:
        return cls.build_variant(variant, input_shape, num_outputs, **kwargs)

    block_key, reps = RESNET_VARIANTS[variant]
    build_named.__name__ = f"build_{variant}"
    build_named.__qualname__ = f"ResNetBuilder.build_{variant}"
    build_named.__doc__ = (f"Build {variant}: {block_key} blocks, {list(reps)} per stage "
                           f"(keyword arguments: those of :meth:`ResNetBuilder.build`).")
    return classmethod(build_named)


# ResNetBuilder.build_resnet_18, ..., build_dm_resnet_65rb7: one per name of RESNET_VARIANTS.
for _variant in RESNET_VARIANTS:
    setattr(ResNetBuilder, f"build_{_variant}", _variant_builder(_variant))
del _variant


class MultiViewResNetBuilder(ResNetBuilder):
    """Two views (CC and MLO) through two towers of the same architecture (separate weights);
    their pooled features are concatenated and fed to one classifier. Inputs are named
    ``cc_input`` and ``mlo_input``; tower layers are prefixed ``cc_`` / ``mlo_``. :meth:`build`
    takes the arguments of :meth:`ResNetBuilder.build`; ``input_shape`` is one view's."""

    @classmethod
    def _assemble(cls, input_shape, tower: _Tower, num_outputs, alpha, l1_ratio):
        towers = [cls._shared_conv_layers(input_shape, tower, prefix=f"{view}_")
                  for view in ("cc", "mlo")]
        merged = layers.Concatenate(name="merged_views")([t[1] for t in towers])
        out = cls._classifier(merged, num_outputs, alpha, l1_ratio)
        return keras.Model([t[0] for t in towers], out, name="multiview_resnet")


# ----------------------------------------------------------------------------------------------
# Rebuilding a model from its (edited) config
# ----------------------------------------------------------------------------------------------
def walk_layer_configs(model_config: dict, edit: Callable[[str, dict], bool], nested: bool = True
                       ) -> bool:
    """Apply ``edit(class_name, layer_config)`` to every layer config of a model config.

    Args:
        model_config: the ``config`` dict of a functional or Sequential model (its ``layers``).
        edit: edits one layer config dict in place; returns True when it changed something.
        nested: also walk the layers of nested models.

    Returns:
        True when any call of ``edit`` changed something.
    """
    changed = False
    for entry in model_config.get("layers", []):
        cfg = entry.get("config", {})
        changed = bool(edit(entry.get("class_name"), cfg)) or changed
        if nested and isinstance(cfg, dict) and "layers" in cfg:
            changed = walk_layer_configs(cfg, edit) or changed
    return changed


def rebuild_model(model: keras.Model, edit_config: Optional[Callable[[dict], bool]] = None,
                  custom_objects: Optional[Dict[str, object]] = None,
                  strategy: Optional["tf.distribute.Strategy"] = None, force: bool = False
                  ) -> keras.Model:
    """Rebuild ``model`` from its config, edited by ``edit_config``, and copy its weights.

    A built tf-keras layer ignores later changes of its input size, regulariser, dropout rate or
    dtype policy; a model rebuilt from the edited config has them. Layer names, trainable flags
    and weights are kept; every registered custom class (and ``custom_objects``) deserialises.

    Args:
        model: a functional or Sequential tf-keras model (nested models allowed).
        edit_config: ``fn(config) -> bool`` editing a deep copy of ``model.get_config()`` in
            place and returning True when it changed something (:func:`walk_layer_configs`
            edits layer by layer); None rebuilds the config as it is.
        custom_objects: extra classes needed to deserialise the config.
        strategy: ``tf.distribute.Strategy`` whose scope holds the new variables (default: the
            model's own).
        force: rebuild even when ``edit_config`` changed nothing.

    Returns:
        The rebuilt model, or ``model`` itself when nothing changed (and not ``force``).
    """
    config = copy.deepcopy(model.get_config())
    changed = True if edit_config is None else bool(edit_config(config))
    if not changed and not force:
        return model
    objects = dict(keras.utils.get_custom_objects())
    objects.update(custom_objects or {})
    with (strategy or model.distribute_strategy).scope():
        new_model = type(model).from_config(config, custom_objects=objects)
        new_model.set_weights(model.get_weights())
    return new_model


def relax_input_shape(model: keras.Model, custom_objects: Optional[Dict[str, object]] = None,
                      nested: bool = False) -> keras.Model:
    """Return ``model`` with the spatial size of its inputs opened to None (same weights).

    A fully convolutional network saved with a fixed input size (e.g. 256x256 patches) cannot
    be called on a larger image in tf-keras; the rebuilt copy can (with the inputs of the
    models nested in it opened too). The model is returned unchanged when its spatial
    dimensions are already None.

    Args:
        model: tf-keras model.
        custom_objects: extra classes needed to deserialise its config.
        nested: open the inputs of the models nested in ``model`` instead of its own (a
            whole-image model holding a fixed-size patch network).
    """
    if nested:
        if not isinstance(model, keras.Model) or isinstance(model, keras.Sequential):
            return model
        new = rebuild_model(model, relax_nested_input_configs, custom_objects)
    else:
        shapes = [tuple(s) for s in _as_list(model.input_shape)]
        if all(all(d is None for d in _spatial(s)) for s in shapes):
            return model
        new = rebuild_model(model, lambda config: walk_layer_configs(
            config, _relax_input_layer, nested=True), custom_objects)
    if new is not model:
        logger.info("Opened the spatial input size of %s in %r",
                    "nested models" if nested else "the input", model.name)
    return new


def relax_nested_input_configs(model_config: dict) -> bool:
    """Open the spatial input size of every model nested one level in ``model_config``, and
    of the models nested in those (ConvNeXt's stem is a Sequential inside the backbone)."""
    changed = False
    for entry in model_config.get("layers", []):
        if entry.get("class_name") in ("Functional", "Model"):
            changed = walk_layer_configs(entry["config"], _relax_input_layer,
                                         nested=True) or changed
    return changed


def _as_list(shape_or_list):
    return shape_or_list if isinstance(shape_or_list, list) else [shape_or_list]


def _spatial(shape):
    return shape[1:-1] if _channel_axis() == -1 else shape[2:]


def _relax_input_layer(class_name, cfg) -> bool:
    """Open the spatial size of an ``InputLayer`` config (4-D inputs); True when it changed."""
    if class_name != "InputLayer":
        return False
    key = "batch_input_shape" if "batch_input_shape" in cfg else "batch_shape"
    shape = list(cfg.get(key) or [])
    if len(shape) != 4:
        return False
    spatial = slice(1, 3) if _channel_axis() == -1 else slice(2, 4)
    if all(d is None for d in shape[spatial]):
        return False
    shape[spatial] = [None, None]
    cfg[key] = shape
    return True


# ----------------------------------------------------------------------------------------------
# Backbones of the patch classifier: one table
# ----------------------------------------------------------------------------------------------
def _last_4d_activation(model):
    """The last Activation/ReLU layer with a 4-D output (ResNet's final block ReLU)."""
    for layer in reversed(model.layers):
        if isinstance(layer, (layers.Activation, layers.ReLU)) and len(layer.output.shape) == 4:
            return layer
    return None


def _last_4d_layer(model):
    """The last layer with a 4-D output: the backbone's last feature map before the head."""
    for layer in reversed(model.layers):
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
            return layer
    return None


def _index_of(name):
    """Stage-2 role: the layer called ``name``."""
    def role(model):
        return [layer.name for layer in model.layers].index(name)
    return role


def _after(name):
    """Stage-2 role: the layer after the one called ``name``."""
    def role(model):
        return [layer.name for layer in model.layers].index(name) + 1
    return role


def _no_stage2(model):
    """Stage-2 role of a backbone without pretrained weights: none (stage 1 trains all)."""
    return None


def _as_layers(obj):
    return obj if isinstance(obj, (list, tuple)) else [obj]


def _resnet50_stage2(model):
    """The ReLU after the second-to-last residual add (``conv5_block2_out`` in tf-keras,
    ``activation_46`` = index 162 in Keras 2.0.8): the last residual block and head train."""
    adds = [i for i, lyr in enumerate(model.layers) if isinstance(lyr, keras.layers.Add)]
    if len(adds) < 2:
        raise ValueError(f"model {model.name!r} has no residual Add layers")
    target = model.layers[adds[-2]]
    for i in range(adds[-2] + 1, len(model.layers)):
        inbound = model.layers[i]._inbound_nodes
        if inbound and any(target in _as_layers(node.inbound_layers) for node in inbound):
            return i
    raise ValueError(f"no layer follows {target.name!r} in model {model.name!r}")


def _last_block_start(block_pattern: str) -> Callable[["keras.Model"], int]:
    """Stage-2 role: the first layer of the backbone's last block.

    Args:
        block_pattern: regular expression matched at the start of layer names; its first group
            names the block (``block6o`` of ``block6o_expand_conv``).
    """
    pattern = re.compile(block_pattern)

    def role(model):
        blocks = [(i, m.group(1)) for i, lyr in enumerate(model.layers)
                  if (m := pattern.match(lyr.name))]
        if not blocks:
            raise ValueError(f"model {model.name!r} has no layer named like {block_pattern!r}")
        return next(i for i, block in blocks if block == blocks[-1][1])
    return role


def _scale_to_unit_range(x):
    """0..255 -> -1..1 as EfficientNetV2-S/M/L's own ``Rescaling(1/128, offset=-1)`` layer."""
    return np.asarray(x, dtype=np.float32) * np.float32(1 / 128) - np.float32(1)


#: ImageNet RGB channel means and standard deviations on the 0..1 scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_standardize(x):
    """0..255 RGB -> (x / 255 - mean) / std per channel, as the ``Normalization`` layer that
    EfficientNetV2-B0..B3 and ConvNeXt put at their bottom."""
    x = np.asarray(x, dtype=np.float32)
    mean = np.float32(255) * np.asarray(IMAGENET_MEAN, np.float32)
    std = np.float32(255) * np.asarray(IMAGENET_STD, np.float32)
    return (x - mean) / std


@dataclasses.dataclass(frozen=True)
class KerasApplication:
    """Constructor of a backbone entry: ``keras.applications.<name>`` without its top.

    Called as ``KerasApplication("ResNet50")(input_shape, weights_path=None)``; returns the
    backbone (its last feature map as output) with the weights of ``weights_path`` when given.

    Attributes:
        name: the constructor's name in ``keras.applications`` (``"ResNet50"``).
        builtin_preprocessing: the application has rescaling/normalisation layers at its bottom
            (EfficientNetV2, ConvNeXt). They are left out (``include_preprocessing=False``): the
            input recipe is the one place that scales the input, and the backbone entry's
            ``preprocess`` computes what they did. The ImageNet weight file, saved with those
            layers, is loaded into a copy that has them and copied over layer by layer.
        build_size: for an input of open size, build at ``build_size`` x ``build_size``, then
            open the input (:func:`relax_input_shape`). ConvNeXt needs it: its stem and
            downsampling layers are nested Sequential models, which built on an open input
            record an undefined channel count, and a model rebuilt from such a config fails.
    """
    name: str
    builtin_preprocessing: bool = False
    build_size: Optional[int] = None

    def __call__(self, input_shape, weights_path=None) -> "keras.Model":
        shape = tuple(input_shape)
        reopen = self.build_size is not None and all(d is None for d in _spatial((None,) + shape))
        if reopen:
            shape = ((self.build_size, self.build_size, shape[-1]) if _channel_axis() == -1
                     else (shape[0], self.build_size, self.build_size))
        base = self._build(shape, weights_path)
        return relax_input_shape(base) if reopen else base

    def _build(self, shape, weights_path):
        build = getattr(keras.applications, self.name)
        kwargs = {"include_preprocessing": False} if self.builtin_preprocessing else {}
        base = build(include_top=False, weights=None, input_shape=shape, **kwargs)
        if weights_path is None:
            return base
        if not self.builtin_preprocessing:
            base.load_weights(weights_path)
            return base
        full = build(include_top=False, weights=None, input_shape=shape)
        full.load_weights(weights_path)
        scaling = (layers.Rescaling, layers.Normalization)
        src = [lyr for lyr in full.layers if lyr.weights and not isinstance(lyr, scaling)]
        dst = [lyr for lyr in base.layers if lyr.weights]
        if [[w.shape for w in lyr.weights] for lyr in src] != \
                [[w.shape for w in lyr.weights] for lyr in dst]:
            raise ValueError(f"{weights_path}: its layers do not match {self.name} without its "
                             "preprocessing layers")
        for source, target in zip(src, dst):
            target.set_weights(source.get_weights())
        return base


def _patch_head(x, nb_class, hidden_dropout, weight_decay):
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(hidden_dropout, name="top_dropout")(x)
    return layers.Dense(nb_class, activation="softmax", kernel_regularizer=_l2(weight_decay),
                        name="predictions")(x)


@dataclasses.dataclass(frozen=True)
class PatchHead:
    """The layers a patch classifier has after its backbone's last feature map.

    Attributes:
        layers: ``(name, class name)`` of each layer, in order.
        build: ``build(x, nb_class, hidden_dropout, weight_decay)`` adds them to the 4-D tensor
            ``x`` and returns the ``(batch, nb_class)`` softmax output.
    """
    layers: Tuple[Tuple[str, str], ...]
    build: Optional[Callable] = None


#: Our patch head: global average pooling, dropout, softmax dense (L2 ``weight_decay``).
PATCH_HEAD = PatchHead((("avg_pool", "GlobalAveragePooling2D"), ("top_dropout", "Dropout"),
                        ("predictions", "Dense")), _patch_head)


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Everything the project knows about one backbone of the patch classifier.

    One entry of :data:`BACKBONES` (added with :func:`register_backbone`) is all a backbone
    needs: ``--net``/``--patch-net`` accept its name, ``dm_keras_ext.get_dl_model`` builds it,
    patch training finds its stage-2 layer, ``add_top_layers`` cuts it, and the input recipe
    applies its preprocessing.

    Attributes:
        name: the key (``--net`` / ``--patch-net`` value).
        constructor: builds the backbone. With a ``patch_head``: ``constructor(input_shape)``
            returns a model whose output is its last feature map (4-D), and, for a backbone
            with a ``weights_file``, ``constructor(input_shape, weights_path=path)`` loads
            ImageNet weights from ``path``. With ``patch_head=None`` the constructor builds the
            whole patch classifier: ``constructor(input_shape, nb_class=, weight_decay=,
            hidden_dropout=, **builder options)``.
        preprocess: ``fn(x) -> x`` mapping images on the 0..255 scale (``(..., 3)`` RGB,
            float32) to what the backbone's ImageNet weights expect; applied by the input
            recipe instead of featurewise centring (``--no-featurewise-center``). None: none.
        weights_file: file name of its ImageNet "notop" weights in the Keras cache
            (``~/.keras/models/``); None: no pretrained weights (patch training then runs
            stage 1 only, on all layers).
        stage2: ``fn(model) -> index`` of the first layer trained in stage 2 of patch training
            (found by role, e.g. the start of the last block), or None.
        cut_layer: name of the layer whose feature map a whole-image model keeps
            (``add_top_layers``), tried first.
        cut_fallback: ``fn(model) -> layer`` finding that layer by structure when no layer has
            that name (Keras 2.0.8 files have auto-named layers).
        patch_head: the head ``constructor``'s backbone gets (:data:`PATCH_HEAD`), or None.
        head_2017: layer classes after the backbone in the 2017 (Keras 2.0.8) patch classifier
            files of this backbone, so that a 2017 ``--kept-layer-idx`` counts right; None: no
            2017 files.
        feature_layer: classes the backbone's last layer can have in our patch nets (for
            recognising them against a 2017 head).
        channels: input channels when ``input_shape`` is not given.
        model_name: name of the patch classifier model (default ``{name}_patch``).
        custom_objects: layer classes its saved models need, registered with Keras.
    """
    name: str
    constructor: Callable[..., "keras.Model"]
    preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None
    weights_file: Optional[str] = None
    stage2: Callable[["keras.Model"], Optional[int]] = _no_stage2
    cut_layer: Optional[str] = None
    cut_fallback: Callable[["keras.Model"], object] = _last_4d_layer
    patch_head: Optional[PatchHead] = PATCH_HEAD
    head_2017: Optional[Tuple[str, ...]] = None
    feature_layer: Tuple[type, ...] = (layers.Layer,)
    channels: int = 3
    model_name: Optional[str] = None
    custom_objects: Mapping[str, type] = dataclasses.field(default_factory=dict)

    def build_patch_net(self, input_shape: Optional[Sequence[Optional[int]]] = None,
                        nb_class: int = 3, hidden_dropout: float = 0.0, weight_decay: float = 0.0,
                        weights_path: Optional[str] = None, **options: Any) -> "keras.Model":
        """The patch classifier: backbone + :attr:`patch_head`.

        Args:
            input_shape: ``(rows, cols, channels)``; default ``(None, None, channels)``.
            nb_class: number of patch classes.
            hidden_dropout: rate of the head's dropout.
            weight_decay: L2 of the head's dense layer.
            weights_path: ImageNet weight file to load (None: random initialisation).
            **options: builder options, for a constructor without ``patch_head`` only.

        Returns:
            ``keras.Model`` ``(batch, rows, cols, channels)`` -> ``(batch, nb_class)`` softmax.
        """
        shape = (None, None, self.channels) if input_shape is None else tuple(input_shape)
        if self.patch_head is None:
            return self.constructor(shape, nb_class=nb_class, weight_decay=weight_decay,
                                    hidden_dropout=hidden_dropout, **options)
        if options:
            logger.debug("backbone %s ignores options %s", self.name, sorted(options))
        base = (self.constructor(shape) if weights_path is None
                else self.constructor(shape, weights_path=weights_path))
        out = self.patch_head.build(base.output, nb_class, hidden_dropout, weight_decay)
        return keras.Model(base.inputs, out, name=self.model_name or f"{self.name}_patch")


#: The table of backbones, by ``--net`` name (see :class:`Backbone`, :func:`register_backbone`).
BACKBONES: Dict[str, Backbone] = {}


def register_backbone(backbone: Backbone, replace: bool = False) -> Backbone:
    """Add ``backbone`` to :data:`BACKBONES`, and its ``custom_objects`` to Keras's registry.

    Args:
        backbone: the entry.
        replace: allow replacing an entry of the same name.

    Returns:
        ``backbone``.

    Raises:
        ValueError: the name is taken (and not ``replace``) or the entry is malformed.
    """
    if not isinstance(backbone, Backbone):
        raise ValueError(f"register_backbone expects a Backbone, got {type(backbone).__name__}")
    if not backbone.name or not isinstance(backbone.name, str):
        raise ValueError(f"backbone name should be a non-empty string, got {backbone.name!r}")
    if backbone.name in BACKBONES and not replace:
        raise ValueError(f"backbone {backbone.name!r} is already registered; pass replace=True "
                         "to replace it")
    if not callable(backbone.constructor):
        raise ValueError(f"backbone {backbone.name!r}: constructor should be callable, got "
                         f"{backbone.constructor!r}")
    keras.utils.get_custom_objects().update(backbone.custom_objects)
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    """The entry of backbone ``name``.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid keys).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown net {name!r}; valid: {sorted(BACKBONES)}")
    return BACKBONES[name]


def backbone_names() -> List[str]:
    """The names in :data:`BACKBONES`, in the order they were registered."""
    return list(BACKBONES)


def get_preprocess_input(net: str) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The ImageNet ``preprocess_input`` function of backbone ``net`` (None when it has none).

    None for ``yaroslav`` and ``dm_resnet14`` (trained from scratch on featurewise-centred
    images). Used when ``--no-featurewise-center`` asks for the backbone's own preprocessing.

    Raises:
        ValueError: unknown ``net`` (the message lists the valid keys).
    """
    return get_backbone(net).preprocess


#: YaroslavNet: filters of its six blocks, each two 3x3 conv-BN-relu then a 2x2 max pool
#: (the DREAM 2016 DM challenge winning patch classifier; 5,903,331 parameters for 3 classes).
YAROSLAV_FILTERS = (32, 64, 128, 256, 256, 512)


def _yaroslav_features(input_shape):
    """YaroslavNet without its head: blocks ``block1``..``block6`` up to ``block6_pool``."""
    inp = keras.Input(shape=tuple(input_shape), name="input")
    x = inp
    for i, filters in enumerate(YAROSLAV_FILTERS, start=1):
        for j in (1, 2):
            x = layers.Conv2D(filters, (3, 3), padding="same", name=f"block{i}_conv{j}")(x)
            x = layers.BatchNormalization(name=f"block{i}_bn{j}")(x)
            x = layers.Activation("relu", name=f"block{i}_relu{j}")(x)
        x = layers.MaxPooling2D((2, 2), strides=(2, 2), name=f"block{i}_pool")(x)
    return keras.Model(inp, x, name="yaroslav_features")


def Yaroslav(input_shape: Optional[Sequence[Optional[int]]] = None,  # noqa: N802
             nb_class: int = 5, hidden_dropout: float = 0.0, weight_decay: float = 0.0
             ) -> keras.Model:
    """YaroslavNet patch classifier for single-channel (greyscale) patches.

    Blocks ``block1``..``block6`` of two 3x3 conv (``block{i}_conv{j}``) - BN - relu and a 2x2
    max pool (``block{i}_pool``; the last is ``block6_pool``), then global average pooling
    (``avg_pool``), dropout (``top_dropout``) and ``Dense(nb_class, softmax)``
    (``predictions``, L2 ``weight_decay``).

    Args:
        input_shape: ``(rows, cols, 1)``; default ``(None, None, 1)``. Pixels on the centred
            0..255 scale used by the training scripts.
        nb_class: number of patch classes.
    """
    return get_backbone("yaroslav").build_patch_net(input_shape, nb_class, hidden_dropout,
                                                    weight_decay)


def dm_resnet14_patch_net(input_shape: Optional[Sequence[Optional[int]]] = None, nb_class: int = 3,
                          nb_init_filter: int = 32, init_filter_size: int = 5,
                          init_conv_stride: int = 2, max_pooling_size: int = 2,
                          max_pooling_stride: int = 2, weight_decay: float = 1e-4,
                          hidden_dropout: float = 0.0, inp_dropout: float = 0.0,
                          alpha: float = 1e-4, l1_ratio: float = 0.0) -> keras.Model:
    """Small single-channel ResNet patch classifier (``--net dm_resnet14``), for CPU runs.

    :meth:`ResNetBuilder.build_dm_resnet_14`: stem conv (``nb_init_filter`` filters
    of ``init_filter_size`` at stride ``init_conv_stride``) - BN - relu, max pool
    (``max_pooling_size`` / ``max_pooling_stride``; 0 turns it off), four bottleneck stages of
    one block each (filters ``nb_init_filter`` x 1, 2, 4, 8, output x 4 channels), global
    average pooling and a softmax Dense (``predictions``, elastic-net penalty ``alpha``,
    ``l1_ratio``). These are the 2017 ``--nb-init-filter``/``--init-filter-size``/... flags.
    No pretrained weights: patch training runs stage 1 only, on all layers.

    Args:
        input_shape: ``(rows, cols, 1)``; default ``(None, None, 1)``. Pixels on the centred
            0..255 scale used by the training scripts.
        nb_class: number of patch classes.

    Returns:
        ``keras.Model`` ``(batch, rows, cols, 1)`` float32 -> ``(batch, nb_class)`` softmax.
    """
    rows, cols, chans = (None, None, 1) if input_shape is None else tuple(input_shape)
    model = ResNetBuilder.build_dm_resnet_14(
        (chans, rows, cols), nb_class, nb_init_filter=nb_init_filter,
        init_filter_size=init_filter_size, init_conv_stride=init_conv_stride,
        pool_size=max_pooling_size, pool_stride=max_pooling_stride, weight_decay=weight_decay,
        alpha=alpha, l1_ratio=l1_ratio, inp_dropout=inp_dropout, hidden_dropout=hidden_dropout)
    model._name = "dm_resnet14"
    return model


def _convnext_custom_objects():
    from tf_keras.src.applications import convnext

    return {"LayerScale": convnext.LayerScale, "StochasticDepth": convnext.StochasticDepth}


# The 2017 backbones and today's. Stage-2 roles (first layer trained in stage 2 of patch
# training), by role, not index: ResNet50: the last residual block (_resnet50_stage2);
# VGG16/19: block5_conv1 (2017 indices 15/17); Xception: block14_sepconv1 (2017 index 126: the
# exit-flow block 14 after the last residual add); InceptionV3: the first layer after
# ``mixed6`` (2017 index 194 fell among mixed6's final activations, so the trainable weights
# were those of mixed7..mixed10 and the head); EfficientNetV2 and ConvNeXt: the last block of
# their last stage (as ResNet50). Cut roles: the last feature map before the head.
_APP_HEAD_2017 = ("GlobalAveragePooling2D", "Dropout", "Dense")
for _backbone in (
    Backbone("resnet50", KerasApplication("ResNet50"),
             keras.applications.resnet50.preprocess_input,
             "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", _resnet50_stage2,
             "conv5_block3_out", _last_4d_activation,
             head_2017=("AveragePooling2D",) + _APP_HEAD_2017,
             feature_layer=(layers.Activation, layers.ReLU)),
    Backbone("vgg16", KerasApplication("VGG16"), keras.applications.vgg16.preprocess_input,
             "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", _index_of("block5_conv1"),
             "block5_pool", _last_4d_layer, head_2017=_APP_HEAD_2017),
    Backbone("vgg19", KerasApplication("VGG19"), keras.applications.vgg19.preprocess_input,
             "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", _index_of("block5_conv1"),
             "block5_pool", _last_4d_layer, head_2017=_APP_HEAD_2017),
    Backbone("xception", KerasApplication("Xception"),
             keras.applications.xception.preprocess_input,
             "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
             _index_of("block14_sepconv1"), "block14_sepconv2_act", _last_4d_activation,
             head_2017=_APP_HEAD_2017),
    Backbone("inception", KerasApplication("InceptionV3"),
             keras.applications.inception_v3.preprocess_input,
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", _after("mixed6"),
             "mixed10", _last_4d_layer, head_2017=_APP_HEAD_2017),
    Backbone("yaroslav", _yaroslav_features, cut_layer="block6_pool",
             head_2017=("GlobalAveragePooling2D", "Dense"),
             feature_layer=(layers.MaxPooling2D,), channels=1, model_name="yaroslav"),
    Backbone("dm_resnet14", dm_resnet14_patch_net, patch_head=None, channels=1),
    Backbone("efficientnetv2s", KerasApplication("EfficientNetV2S", builtin_preprocessing=True),
             _scale_to_unit_range, "efficientnetv2-s_notop.h5",
             _last_block_start(r"(block\d+[a-z]+)_"), "top_activation", _last_4d_activation),
    Backbone("efficientnetv2b0",
             KerasApplication("EfficientNetV2B0", builtin_preprocessing=True),
             _imagenet_standardize, "efficientnetv2-b0_notop.h5",
             _last_block_start(r"(block\d+[a-z]+)_"), "top_activation", _last_4d_activation),
    Backbone("convnext_tiny",
             KerasApplication("ConvNeXtTiny", builtin_preprocessing=True, build_size=64),
             _imagenet_standardize, "convnext_tiny_notop.h5",
             _last_block_start(r"\w*?(stage_\d+_block_\d+)_"), None, _last_4d_layer,
             custom_objects=_convnext_custom_objects()),
):
    register_backbone(_backbone)
del _backbone


class _BackboneView(Mapping):
    """A read-only view of one fact of every backbone in :data:`BACKBONES` (the entries that
    have it), kept for code that reads the dicts these facts were once kept in."""

    def __init__(self, fact):
        self._fact = fact

    def _items(self):
        return {name: v for name, b in BACKBONES.items() if (v := self._fact(b)) is not None}

    def __getitem__(self, name):
        return self._items()[name]

    def __iter__(self):
        return iter(self._items())

    def __len__(self):
        return len(self._items())

    def __repr__(self):
        return repr(self._items())


#: Cut role of each backbone: ``(layer name, structural fallback)`` (a view of :data:`BACKBONES`).
CUT_LAYER_ROLES = _BackboneView(lambda b: (b.cut_layer, b.cut_fallback))

#: The layers that followed the backbone in a patch classifier of the 2017 code (Keras 2.0.8,
#: ``--hidden-dropout`` > 0 as in its training script), by class (a view of :data:`BACKBONES`).
#: Keras 2.0.8's ResNet50 ended with a 7x7 ``AveragePooling2D`` (``avg_pool``) before the
#: global pooling; YaroslavNet had no dropout. A negative ``kept_layer_idx`` counts from the end
#: of such a layer list.
KERAS208_PATCH_HEADS = _BackboneView(lambda b: b.head_2017)

# Our patch head (``Backbone.build_patch_net``): layer names and classes after the backbone.
_OUR_PATCH_HEAD = PATCH_HEAD.layers


# ----------------------------------------------------------------------------------------------
# Patch net -> whole-image net
# ----------------------------------------------------------------------------------------------
def resolve_kept_layer_idx(model: keras.Model, patch_net: str, kept_layer_idx: Optional[int]
                           ) -> int:
    """Index into ``model.layers`` of the layer a 2017 ``--kept-layer-idx`` names.

    A non-negative index, and any index into a model whose head is shaped as the 2017 patch
    classifiers of ``patch_net`` (a Keras 2.0.8 file, say), index ``model.layers`` directly. A
    negative index into a patch net built by this project (``get_dl_model``: global pooling
    ``avg_pool``, dropout ``top_dropout``, dense ``predictions``) is read against the 2017 layer
    list of ``patch_net`` (:data:`KERAS208_PATCH_HEADS`), whose backbone ends the same way but
    whose head may hold other layers: ``-5`` on a ResNet50 is its final ReLU (2048 channels)
    either way, although our ResNet50 head lacks the 2017 7x7 ``AveragePooling2D``.

    Raises:
        ValueError: the index names a layer of the 2017 head that our model does not have.
    """
    idx = int(kept_layer_idx)
    backbone = BACKBONES.get(patch_net)
    head17 = backbone.head_2017 if backbone is not None else None
    if idx >= 0 or head17 is None or backbone.patch_head is None:
        return idx
    ours = backbone.patch_head.layers
    if len(model.layers) <= len(ours):
        return idx
    tail = model.layers[-len(ours):]
    if [(lyr.name, type(lyr).__name__) for lyr in tail] != [tuple(x) for x in ours]:
        return idx                                    # not our head: its own list, as in 2017
    feature = model.layers[-len(ours) - 1]
    if not isinstance(feature, backbone.feature_layer):
        return idx
    if -idx > len(head17):                            # a backbone layer: same from its end
        return idx + len(head17) - len(ours)
    role = head17[idx]
    matches = [i for i in range(-len(ours), 0) if type(model.layers[i]).__name__ == role]
    if not matches:
        raise ValueError(f"kept_layer_idx {idx} names the {role} of the 2017 {patch_net} patch "
                         f"classifier's head, which model {model.name!r} does not have")
    return matches[0]


def find_cut_layer(model: keras.Model, patch_net: str = "resnet50",
                   kept_layer_idx: Optional[int] = None) -> keras.layers.Layer:
    """The last layer of ``model`` kept when it becomes the bottom of a whole-image network.

    Args:
        model: patch classifier (backbone, global pooling, dropout, dense).
        patch_net: backbone key of :data:`BACKBONES` (its cut role); other names use the last
            4-D layer.
        kept_layer_idx: explicit index, overriding the role, as the 2017 ``--kept-layer-idx``
            (see :func:`resolve_kept_layer_idx`: -5 is the final ReLU of a ResNet50 patch net,
            ours or a 2017 file).

    Returns:
        The keras layer whose (4-D) output feeds the new top.
    """
    if kept_layer_idx is not None:
        idx = resolve_kept_layer_idx(model, patch_net, kept_layer_idx)
        try:
            layer = model.layers[idx]
        except IndexError:
            raise ValueError(f"kept_layer_idx {kept_layer_idx} is out of range for a model "
                             f"with {len(model.layers)} layers") from None
        if idx != int(kept_layer_idx):
            logger.info("kept_layer_idx %s on %s patch net %r (2017 layer list) -> layer %d "
                        "%r", kept_layer_idx, patch_net, model.name, idx, layer.name)
    else:
        backbone = BACKBONES.get(patch_net)
        name, fallback = ((backbone.cut_layer, backbone.cut_fallback) if backbone is not None
                          else (None, _last_4d_layer))
        names = {lyr.name for lyr in model.layers}
        layer = model.get_layer(name) if name in names else fallback(model)
        if layer is None:
            raise ValueError(f"could not find the cut layer of patch net {patch_net!r} "
                             f"(layer {name!r} or a 4-D feature map) in model {model.name!r}")
    if len(layer.output.shape) != 4:
        raise ValueError(f"cut layer {layer.name!r} has output shape {layer.output.shape}; "
                         "a 4-D feature map is needed")
    return layer


def _heatmap_head(x, clf_layer, avg_pool_size, hm_strides, dropout, weight_decay,
                  return_heatmap):
    """Average pool -> (dropout) -> per-location dense initialised from the patch classifier.

    The dense is relu for the top path (2017 behaviour) and softmax for ``return_heatmap``
    (per-location class probabilities).
    """
    if not isinstance(clf_layer, layers.Dense):
        raise ValueError("the heatmap needs the patch classifier's last layer to be a Dense, "
                         f"got {type(clf_layer).__name__} {clf_layer.name!r}")
    fmap = tuple(x.shape[1:3])
    if any(d is not None and d < p for d, p in zip(fmap, avg_pool_size)):
        raise ValueError(f"avg_pool_size {tuple(avg_pool_size)} is larger than the patch "
                         f"net's feature map {fmap}; use a larger image_size")
    x = layers.AveragePooling2D(tuple(avg_pool_size), strides=tuple(hm_strides),
                                name="hm_avg_pool")(x)
    if not return_heatmap:
        x = layers.Dropout(dropout, name="hm_dropout")(x)
    dense = layers.Dense(clf_layer.units, activation="softmax" if return_heatmap else "relu",
                         kernel_regularizer=_l2(weight_decay), name="hm_dense")
    x = dense(x)
    dense.set_weights(clf_layer.get_weights())
    return x


def _residual_top(x, depths, repetitions, dropout, weight_decay, block_fn, shortcut_with_bn,
                  enlarge):
    for i, (depth, reps) in enumerate(zip(depths, repetitions)):
        x = residual_stage(x, block_fn, depth, reps, is_first_layer=False,
                           shortcut_with_bn=shortcut_with_bn, enlarge_factor=enlarge,
                           weight_decay=weight_decay, dropout=dropout, name=f"top{i + 1}")
    x = layers.GlobalAveragePooling2D(name="top_avg_pool")(x)
    return layers.Dropout(dropout, name="top_dropout")(x)


def _vgg_top(x, depths, repetitions, dropout, weight_decay, **_unused):
    for i, (depth, reps) in enumerate(zip(depths, repetitions)):
        x = vgg_block(x, depth, reps, dropout, weight_decay, name=f"top{i + 1}")
    x = layers.GlobalAveragePooling2D(name="top_avg_pool")(x)
    return layers.Dropout(dropout, name="top_dropout")(x)


def _fc_top(x, fc_init_units, fc_layers, dropout, weight_decay):
    flat = layers.Flatten(name="fc_flatten")(x)
    x = layers.Dropout(dropout, name="fc_dropout")(flat)
    units = fc_init_units
    for i in range(fc_layers):
        x = layers.Dense(units, kernel_initializer="he_normal",
                         kernel_regularizer=_l2(weight_decay), name=f"fc{i + 1}")(x)
        x = _bn(f"fc{i + 1}_bn")(x)
        x = layers.Activation("relu", name=f"fc{i + 1}_relu")(x)
        x = layers.Dropout(dropout, name=f"fc{i + 1}_drop")(x)
        units = max(units // 2, 1)
    return x, flat


def _check_top_args(image_size, block_type, depths, repetitions, nb_class, add_conv):
    if len(image_size) != 2 or any(int(s) <= 0 for s in image_size):
        raise ValueError(f"image_size should be (height, width) > 0, got {image_size}")
    if add_conv and block_type not in _TOP_BLOCKS:
        raise ValueError(f"unknown block_type {block_type!r}; valid: {sorted(_TOP_BLOCKS)}")
    if len(depths) != len(repetitions):
        raise ValueError(f"depths {list(depths)} and repetitions {list(repetitions)} "
                         "should have the same length")
    if nb_class < 1:
        raise ValueError(f"nb_class should be >= 1, got {nb_class}")


# block_type -> builder of the convolutional top (both end in GAP + dropout).
_TOP_BLOCKS = {"resnet": _residual_top, "vgg": _vgg_top}


def add_top_layers(model: keras.Model, image_size: Tuple[int, int], patch_net: str = "resnet50",
                   block_type: str = "resnet", depths: Sequence[int] = (512, 512),
                   repetitions: Sequence[int] = (1, 1),
                   block_fn: Union[str, Callable] = bottleneck_org, nb_class: int = 2,
                   shortcut_with_bn: bool = True, bottleneck_enlarge_factor: int = 4,
                   dropout: float = 0.0, weight_decay: float = 1e-4, add_heatmap: bool = False,
                   avg_pool_size: Tuple[int, int] = (7, 7), return_heatmap: bool = False,
                   add_conv: bool = True, add_shortcut: bool = False,
                   hm_strides: Tuple[int, int] = (1, 1), hm_pool_size: Tuple[int, int] = (5, 5),
                   fc_init_units: int = 64, fc_layers: int = 2, kept_layer_idx: Optional[int] = None
                   ) -> Union[Tuple[keras.Model, int], keras.Model]:
    """Convert a patch classifier into a whole-image classifier (Shen et al. 2019, Fig. 1).

    The patch net, cut at its last convolutional feature map (:func:`find_cut_layer`), is
    applied to a new ``(height, width, channels)`` input as one nested model named
    ``patch_net`` (its input is opened to any size; the nested net shares its layers and
    weights with ``model`` unless opening the input required a copy). On top of it:

    - ``add_heatmap``: ``hm_avg_pool`` (``avg_pool_size`` at ``hm_strides``), dropout,
      ``hm_dense`` = the patch classifier's final dense applied at every location (weights
      copied) with relu, then ``hm_max_pool`` (``hm_pool_size``); these layers count as part of
      the converted patch net (frozen in stage 1);
    - ``add_conv`` and ``block_type='resnet'``: per depth a residual stage of ``block_fn``
      blocks (first block stride 2 with 1x1 conv projection shortcut, BN if
      ``shortcut_with_bn``; bottleneck output ``depth * bottleneck_enlarge_factor``);
      ``'vgg'``: per depth ``repetitions`` x (3x3 conv-BN-relu-dropout) then 2x2 max pool;
      both end in global average pooling, dropout and ``Dense(nb_class, softmax)``;
    - ``add_conv=False``: flatten, dropout, ``fc_layers`` x (Dense-BN-relu-dropout) with
      units halving from ``fc_init_units``, then ``Dense(nb_class)`` + softmax;
      ``add_shortcut`` adds a second ``Dense(nb_class)`` from the flattened input, summed
      before the softmax.

    Args:
        model: patch classifier; its last layer must be the Dense classifier for heatmaps.
        image_size: (height, width) of the whole images, e.g. (1152, 896).
        patch_net: backbone key of :data:`BACKBONES` for the cut point ('resnet50', 'vgg16',
            'convnext_tiny', ...; other names: the last 4-D layer).
        kept_layer_idx: explicit cut index (e.g. -5), overrides the role; a negative index
            counts in the 2017 layer list of ``patch_net`` (:func:`resolve_kept_layer_idx`).
        return_heatmap: return only a model mapping images to per-location class
            probabilities ``(batch, rows, cols, patch_classes)`` (softmax of the patch dense).
        Other args: as named; ``weight_decay`` is the L2 of every new Conv2D/Dense.

    Returns:
        ``(model, top_layer_nb)`` where ``model.layers[:top_layer_nb]`` are the input, the
        nested patch net and the heatmap head; or only the heatmap model when
        ``return_heatmap``.
    """
    _check_top_args(image_size, block_type, depths, repetitions, nb_class, add_conv)
    cut = find_cut_layer(model, patch_net, kept_layer_idx)
    channels = model.input_shape[_channel_axis()]
    shape = ((int(image_size[0]), int(image_size[1]), channels) if _channel_axis() == -1
             else (channels, int(image_size[0]), int(image_size[1])))
    image_input = keras.Input(shape=shape, name="image_input")
    base = keras.Model(model.inputs, cut.output, name="patch_net")
    base = relax_input_shape(base)
    x = base(image_input)
    bottom_names = {"image_input", "patch_net"}
    if add_heatmap or return_heatmap:
        x = _heatmap_head(x, model.layers[-1], avg_pool_size, hm_strides, dropout,
                          weight_decay, return_heatmap)
        if return_heatmap:
            return keras.Model(image_input, x, name="heatmap")
        x = layers.MaxPooling2D(tuple(hm_pool_size), name="hm_max_pool")(x)
        bottom_names |= {"hm_avg_pool", "hm_dropout", "hm_dense", "hm_max_pool"}
    top = _Top(block_type, depths, repetitions, block_fn, shortcut_with_bn,
               bottleneck_enlarge_factor, add_conv, add_shortcut, fc_init_units, fc_layers)
    out = _add_classifier(x, top, nb_class, dropout, weight_decay)
    whole = keras.Model(image_input, out, name="whole_image")
    idx = [i for i, lyr in enumerate(whole.layers) if lyr.name in bottom_names]
    top_layer_nb = max(idx) + 1
    if top_layer_nb != len(idx):
        raise RuntimeError("new top layers are interleaved with the patch net in model.layers")
    return whole, top_layer_nb


@dataclasses.dataclass(frozen=True)
class _Top:
    """The layers :func:`add_top_layers` puts on the patch net, as its arguments name them:
    with ``add_conv`` a convolutional top of ``block_type`` (``depths``, ``repetitions``,
    ``block_fn``, ``shortcut_with_bn``, ``enlarge`` = ``bottleneck_enlarge_factor``), else a
    fully connected one (``fc_layers`` from ``fc_init_units`` units, ``add_shortcut``)."""
    block_type: str
    depths: Sequence[int]
    repetitions: Sequence[int]
    block_fn: Union[str, Callable]
    shortcut_with_bn: bool
    enlarge: int
    add_conv: bool
    add_shortcut: bool
    fc_init_units: int
    fc_layers: int


def _add_classifier(x, top: _Top, nb_class, dropout, weight_decay):
    dense_kw = dict(kernel_initializer="he_normal", kernel_regularizer=_l2(weight_decay))
    if top.add_conv:
        x = _TOP_BLOCKS[top.block_type](x, top.depths, top.repetitions, dropout, weight_decay,
                                        block_fn=top.block_fn,
                                        shortcut_with_bn=top.shortcut_with_bn,
                                        enlarge=top.enlarge)
        return layers.Dense(nb_class, activation="softmax", name="predictions", **dense_kw)(x)
    x, flat = _fc_top(x, top.fc_init_units, top.fc_layers, dropout, weight_decay)
    if not top.add_shortcut:
        return layers.Dense(nb_class, activation="softmax", name="predictions", **dense_kw)(x)
    logits = layers.Dense(nb_class, name="fc_logits", **dense_kw)(x)
    short = layers.Dense(nb_class, name="fc_shortcut_logits", **dense_kw)(flat)
    summed = layers.Add(name="fc_logits_sum")([logits, short])
    return layers.Activation("softmax", name="predictions")(summed)
