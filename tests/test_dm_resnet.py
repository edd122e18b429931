"""dm_resnet: blocks, ResNet builders, elastic-net penalty and the patch-to-image converter."""
import inspect
import json

import numpy as np
import pytest

import dm_resnet as R
from conftest import KERAS208_TINY, tiny_patch_net

BLOCKS = sorted(R.BLOCK_FNS)


# ----------------------------------------------------------------------------------------------
# l1l2_penalty_reg
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,l1_ratio", [(1.0, 0.5), (0.3, 0.0), (2.0, 1.0), (1e-4, 0.25)])
def test_l1l2_penalty_matches_glmnet_formula(alpha, l1_ratio):
    w = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    reg = R.l1l2_penalty_reg(alpha, l1_ratio)
    expected = alpha * (l1_ratio * np.abs(w).sum() + 0.5 * (1 - l1_ratio) * (w ** 2).sum())
    assert float(reg(w)) == pytest.approx(expected, rel=1e-5)
    assert R.ResNetBuilder.l1l2_penalty_reg(alpha, l1_ratio).get_config() == reg.get_config()


@pytest.mark.parametrize("alpha,l1_ratio", [(-1.0, 0.5), (1.0, 1.5), (1.0, -0.1)])
def test_l1l2_penalty_rejects_bad_values(alpha, l1_ratio):
    with pytest.raises(ValueError):
        R.l1l2_penalty_reg(alpha, l1_ratio)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
def _expected_block_params(kind, c, f, e, with_bn):
    conv = lambda k, i, o: k * k * i * o + o  # noqa: E731
    bn = lambda n: 4 * n  # noqa: E731
    out = f * e if kind.startswith("bottleneck") else f
    if kind == "bottleneck_org":
        p = conv(1, c, f) + bn(f) + conv(3, f, f) + bn(f) + conv(1, f, out) + bn(out)
    elif kind == "bottleneck":
        p = bn(c) + conv(1, c, f) + bn(f) + conv(3, f, f) + bn(f) + conv(1, f, out)
    elif kind == "basic_org":
        p = conv(3, c, f) + bn(f) + conv(3, f, f) + bn(f)
    else:
        p = bn(c) + conv(3, c, f) + bn(f) + conv(3, f, f)
    return p + conv(1, c, out) + (bn(out) if with_bn else 0), out


@pytest.mark.parametrize("with_bn", [False, True])
@pytest.mark.parametrize("kind", BLOCKS)
def test_block_projection_shapes_params_names(keras_session, kind, with_bn):
    keras = keras_session
    inp = keras.Input((8, 6, 5))
    out = R.BLOCK_FNS[kind](inp, 4, init_strides=(2, 2), identity=False,
                            shortcut_with_bn=with_bn, enlarge_factor=3, name="blk")
    model = keras.Model(inp, out)
    params, chans = _expected_block_params(kind, 5, 4, 3, with_bn)
    assert model.output_shape == (None, 4, 3, chans)
    assert model.count_params() == params
    names = [lyr.name for lyr in model.layers[1:]]
    assert all(n.startswith("blk_") for n in names)
    assert ("blk_0_bn" in names) == with_bn
    assert "blk_0_conv" in names and "blk_add" in names
    # post-activation ("org") blocks end with relu (+dropout) after the add
    assert ("blk_out" in names) == kind.endswith("_org")
    y = model.predict(np.random.default_rng(0).normal(size=(2, 8, 6, 5)), verbose=0)
    if kind.endswith("_org"):
        assert y.min() >= 0
    else:
        assert y.min() < 0


@pytest.mark.parametrize("kind", BLOCKS)
def test_identity_block_keeps_shape_and_rejects_mismatch(keras_session, kind):
    keras = keras_session
    chans = 8 if kind.startswith("bottleneck") else 2
    inp = keras.Input((6, 6, chans))
    out = R.BLOCK_FNS[kind](inp, 2, identity=True, enlarge_factor=4, name="idb")
    assert tuple(out.shape) == (None, 6, 6, chans)
    with pytest.raises(ValueError, match="identity shortcut"):
        R.BLOCK_FNS[kind](keras.Input((6, 6, chans + 1)), 2, identity=True, enlarge_factor=4,
                          name="bad")


def test_residual_stage_strides_and_shortcuts(keras_session):
    keras = keras_session
    inp = keras.Input((16, 16, 8))
    out = R.residual_stage(inp, "bottleneck_org", 4, 3, shortcut_with_bn=True,
                           enlarge_factor=2, name="st")
    model = keras.Model(inp, out)
    assert model.output_shape == (None, 8, 8, 8)
    names = [lyr.name for lyr in model.layers]
    assert [n for n in names if n.endswith("_add")] == ["st_block1_add", "st_block2_add",
                                                        "st_block3_add"]
    assert [n for n in names if n.endswith("_0_conv")] == ["st_block1_0_conv"]
    assert model.get_layer("st_block1_1_conv").strides == (2, 2)
    assert model.get_layer("st_block2_1_conv").strides == (1, 1)
    first = keras.Model(inp, R.residual_stage(inp, "basic", 4, 1, is_first_layer=True, name="f"))
    assert first.output_shape == (None, 16, 16, 4)
    with pytest.raises(ValueError, match="valid"):
        R.residual_stage(inp, "nope", 4, 1)


def test_vgg_block(keras_session):
    keras = keras_session
    inp = keras.Input((10, 8, 3))
    model = keras.Model(inp, R.vgg_block(inp, 6, 2, name="v"))
    assert model.output_shape == (None, 5, 4, 6)
    assert model.count_params() == (27 * 6 + 6) + 24 + (54 * 6 + 6) + 24
    assert [lyr.name for lyr in model.layers[1:]] == [
        "v_1_conv", "v_1_bn", "v_1_relu", "v_1_drop",
        "v_2_conv", "v_2_bn", "v_2_relu", "v_2_drop", "v_pool"]


# ----------------------------------------------------------------------------------------------
# ResNetBuilder / MultiViewResNetBuilder
# ----------------------------------------------------------------------------------------------
EXPECTED_VARIANTS = {
    "resnet_18": ("basic", [2, 2, 2, 2]), "resnet_34": ("basic", [3, 4, 6, 3]),
    "resnet_38": ("bottleneck", [3, 6, 3]), "resnet_50": ("bottleneck", [3, 4, 6, 3]),
    "resnet_50_org": ("bottleneck_org", [3, 4, 6, 3]),
    "resnet_101": ("bottleneck", [3, 4, 23, 3]), "resnet_152": ("bottleneck", [3, 8, 36, 3]),
    "dm_resnet_14": ("bottleneck", [1, 1, 1, 1]), "dm_resnet_47rb5": ("bottleneck", [3] * 5),
    "dm_resnet_56rb6": ("bottleneck", [3] * 6), "dm_resnet_65rb7": ("bottleneck", [3] * 7),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED_VARIANTS))
def test_named_variant_passes_its_architecture(monkeypatch, variant):
    calls = []
    monkeypatch.setattr(R.ResNetBuilder, "build",
                        staticmethod(lambda *a, **k: calls.append((a, k)) or "model"))
    assert getattr(R.ResNetBuilder, f"build_{variant}")((1, 64, 48), 3, weight_decay=.5) \
        == "model"
    (shape, nb_out, block_fn, reps), kwargs = calls[0]
    block_key, expected_reps = EXPECTED_VARIANTS[variant]
    assert (shape, nb_out, block_fn, reps) == ((1, 64, 48), 3, R.BLOCK_FNS[block_key],
                                                expected_reps)
    assert kwargs == {"weight_decay": .5}
    depth = 1 + sum(expected_reps) * (3 if block_key.startswith("bottleneck") else 2) + 1
    if variant.startswith("dm_resnet"):
        assert str(depth) == variant.split("_")[2][:2]


# (parameters, layers) of each named builder's model with nb_init_filter=2 and 3 classes, as
# the 2017 classmethods, one written out per name, built it.
VARIANT_SIZES = {
    "resnet_18": (11633, 85), "resnet_34": (22077, 157), "resnet_38": (7347, 168),
    "resnet_50": (26611, 221), "resnet_50_org": (26859, 221), "resnet_101": (49187, 442),
    "resnet_152": (68019, 663), "dm_resnet_14": (8875, 65), "dm_resnet_47rb5": (83547, 209),
    "dm_resnet_56rb6": (322907, 249), "dm_resnet_65rb7": (1268571, 289),
}


def _variant_param(variant):
    big = VARIANT_SIZES[variant][1] > 200
    return pytest.param(variant, marks=pytest.mark.slow) if big else variant


@pytest.mark.parametrize("variant", [_variant_param(v) for v in sorted(VARIANT_SIZES)])
def test_named_builder_builds_its_2017_model(keras_session, variant):
    """Each ``build_<name>`` gives the model of ``build`` with its block and repetitions: the
    same JSON config, and the parameter and layer counts of the 2017 builders."""
    kwargs = dict(nb_init_filter=2, weight_decay=1e-3)
    model = getattr(R.ResNetBuilder, f"build_{variant}")((1, None, None), 3, **kwargs)
    config, sizes = json.loads(model.to_json()), (model.count_params(), len(model.layers))
    keras_session.backend.clear_session()
    block_key, reps = EXPECTED_VARIANTS[variant]
    ref = R.ResNetBuilder.build((1, None, None), 3, R.BLOCK_FNS[block_key], reps, **kwargs)
    assert config == json.loads(ref.to_json())
    assert sizes == VARIANT_SIZES[variant]


def test_named_builders_keep_their_2017_names_and_signatures():
    """``ResNetBuilder.build_<name>(input_shape, num_outputs, **kwargs)`` for every name of
    ``RESNET_VARIANTS``, a classmethod that a subclass's ``build`` serves."""
    assert sorted(R.RESNET_VARIANTS) == sorted(EXPECTED_VARIANTS)
    for variant in EXPECTED_VARIANTS:
        name = f"build_{variant}"
        assert isinstance(vars(R.ResNetBuilder)[name], classmethod), name
        method = getattr(R.ResNetBuilder, name)
        assert method.__name__ == name and method.__doc__, name
        assert list(inspect.signature(method).parameters) == ["input_shape", "num_outputs",
                                                              "kwargs"], name
    calls = []

    class Recording(R.ResNetBuilder):
        @staticmethod
        def build(*args, **kwargs):
            calls.append(args[2:4])

    Recording.build_resnet_38((1, 8, 8), 2)
    assert calls == [(R.BLOCK_FNS["bottleneck"], [3, 6, 3])]


@pytest.mark.parametrize("variant", ["resnet_18", "dm_resnet_14", "org_1_2"])
def test_named_variants_build(keras_session, variant):
    if variant == "org_1_2":
        block_key, reps = "bottleneck_org", [1, 2]
        model = R.ResNetBuilder.build((1, 64, 48), 3, block_key, reps, nb_init_filter=2)
    else:
        block_key, reps = EXPECTED_VARIANTS[variant]
        model = getattr(R.ResNetBuilder, f"build_{variant}")((1, 64, 48), 3, nb_init_filter=2)
    names = [lyr.name for lyr in model.layers]
    adds = [n for n in names if n.endswith("_add")]
    assert len(adds) == sum(reps)
    assert f"stage{len(reps)}_block{reps[-1]}_add" in names
    convs_per_block = 3 if block_key.startswith("bottleneck") else 2
    nb_conv = sum(1 for lyr in model.layers if lyr.__class__.__name__ == "Conv2D")
    assert nb_conv == 1 + convs_per_block * sum(reps) + len(reps)
    assert ("stage1_block1_out" in names) == block_key.endswith("_org")
    enlarge = 4 if block_key.startswith("bottleneck") else 1
    assert model.get_layer("avg_pool").output.shape[-1] == 2 * 2 ** (len(reps) - 1) * enlarge
    assert model.output_shape == (None, 3)


def test_builder_options(keras_session):
    model = R.ResNetBuilder.build((1, 32, 32), 1, "basic_org", [1, 1], nb_init_filter=4,
                                  init_filter_size=5, init_conv_stride=1, pool_size=0,
                                  weight_decay=0.01, alpha=0.5, l1_ratio=0.2,
                                  inp_dropout=0.1, hidden_dropout=0.2, shortcut_with_bn=True)
    assert model.input_shape == (None, 32, 32, 1)
    assert model.output_shape == (None, 1)
    dense = model.get_layer("predictions")
    assert dense.activation.__name__ == "sigmoid"
    assert dense.kernel_regularizer.l1 == pytest.approx(0.1)
    assert dense.kernel_regularizer.l2 == pytest.approx(0.5 * 0.8 * 0.5)
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (5, 5) and stem.strides == (1, 1) and stem.filters == 4
    assert stem.kernel_regularizer.l2 == pytest.approx(0.01)
    assert model.get_layer("input_drop").rate == pytest.approx(0.1)
    assert model.get_layer("stage1_block1_1_drop").rate == pytest.approx(0.2)
    assert "stem_pool" not in [lyr.name for lyr in model.layers]
    assert "stage2_block1_0_bn" in [lyr.name for lyr in model.layers]
    # stage 1 keeps the size (no stem pool, stride 1), stage 2 halves it
    assert model.get_layer("stage2_block1_out").output.shape[1:3] == (16, 16)
    with pytest.raises(ValueError, match="nb_channels"):
        R.ResNetBuilder.build((32, 32), 2, "basic", [1])
    with pytest.raises(ValueError, match="unknown ResNet variant"):
        R.ResNetBuilder.build_variant("resnet_9", (1, 32, 32), 2)


def test_multiview_two_towers_concatenated(keras_session):
    single = R.ResNetBuilder.build((1, 32, 32), 2, "bottleneck", [1, 1], nb_init_filter=4)
    multi = R.MultiViewResNetBuilder.build((1, 32, 32), 2, "bottleneck", [1, 1],
                                           nb_init_filter=4)
    assert multi.input_names == ["cc_input", "mlo_input"]
    assert multi.get_layer("merged_views").output.shape[-1] == 2 * 8 * 4
    dense_single = single.get_layer("predictions").count_params()
    tower = single.count_params() - dense_single
    assert multi.count_params() == 2 * tower + (2 * 32 * 2 + 2)
    rng = np.random.default_rng(0)
    cc, mlo = rng.normal(size=(2, 2, 32, 32, 1))
    y = multi.predict([cc, mlo], verbose=0)
    assert y.shape == (2, 2)
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)
    assert multi.get_layer("cc_stem_conv") is not multi.get_layer("mlo_stem_conv")


# ----------------------------------------------------------------------------------------------
# add_top_layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(KERAS208_TINY))
def test_tiny_conversions_match_keras208_counts(keras_session, case):
    kwargs, shape, params, nb_layers = KERAS208_TINY[case]
    patch = tiny_patch_net(keras_session, shape)
    model, top_nb = R.add_top_layers(patch, (96, 64), "tiny", **kwargs)
    assert model.count_params() == params
    assert len(model.layers) == nb_layers
    assert top_nb == 2
    assert [lyr.name for lyr in model.layers[:2]] == ["image_input", "patch_net"]
    assert model.input_shape == (None, 96, 64, 3)
    assert model.get_layer("patch_net").input_shape == (None, None, None, 3)


@pytest.mark.parametrize("block_type,block_fn", [("resnet", b) for b in BLOCKS] +
                         [("vgg", "bottleneck_org")])
def test_conv_top_every_block(keras_session, block_type, block_fn):
    patch = tiny_patch_net(keras_session)
    model, top_nb = R.add_top_layers(patch, (64, 64), "tiny", block_type=block_type,
                                     depths=[8, 4], repetitions=[2, 1], block_fn=block_fn,
                                     nb_class=3, bottleneck_enlarge_factor=2, dropout=0.25,
                                     weight_decay=0.01, shortcut_with_bn=False)
    assert top_nb == 2
    assert model.output_shape == (None, 3)
    names = [lyr.name for lyr in model.layers]
    # 64 -> 16 after the patch net; each top stage halves the size
    if block_type == "resnet":
        last = "top2_block1_out" if block_fn.endswith("_org") else "top2_block1_add"
        assert model.get_layer(last).output.shape[1:3] == (4, 4)
        width = 4 * (2 if block_fn.startswith("bottleneck") else 1)
        assert model.get_layer(last).output.shape[-1] == width
        assert "top1_block1_0_conv" in names and "top1_block1_0_bn" not in names
        assert "top1_block2_0_conv" not in names
    else:
        assert model.get_layer("top2_pool").output.shape[1:] == (4, 4, 4)
        assert "top1_2_conv" in names and "top2_2_conv" not in names
    assert model.get_layer("top_dropout").rate == pytest.approx(0.25)
    pred = model.get_layer("predictions")
    assert pred.kernel_regularizer.l2 == pytest.approx(0.01)
    y = model.predict(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), verbose=0)
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)


def test_heatmap_model_gives_patch_probabilities(keras_session):
    patch = tiny_patch_net(keras_session)
    hm = R.add_top_layers(patch, (32, 32), "tiny", avg_pool_size=(8, 8), return_heatmap=True)
    assert hm.output_shape == (None, 1, 1, 3)
    x = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(hm.predict(x, verbose=0)[:, 0, 0, :],
                               patch.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    big = R.add_top_layers(patch, (64, 48), "tiny", avg_pool_size=(8, 8), hm_strides=(2, 1),
                           return_heatmap=True)
    assert big.output_shape == (None, 5, 5, 3)
    y = big.predict(np.random.default_rng(1).normal(size=(2, 64, 48, 3)), verbose=0)
    assert (y >= 0).all()
    np.testing.assert_allclose(y.sum(-1), 1, rtol=1e-5)


def test_heatmap_fc_shortcut_top(keras_session):
    patch = tiny_patch_net(keras_session)
    model, top_nb = R.add_top_layers(patch, (96, 64), "tiny", add_heatmap=True,
                                     avg_pool_size=(4, 4), hm_pool_size=(3, 3), add_conv=False,
                                     add_shortcut=True, fc_init_units=16, fc_layers=2)
    names = [lyr.name for lyr in model.layers]
    assert names[:top_nb] == ["image_input", "patch_net", "hm_avg_pool", "hm_dropout",
                              "hm_dense", "hm_max_pool"]
    hm_dense = model.get_layer("hm_dense")
    assert hm_dense.activation.__name__ == "relu"
    for a, b in zip(hm_dense.get_weights(), patch.get_layer("predictions").get_weights()):
        np.testing.assert_array_equal(a, b)
    # 96x64 -> 24x16 -> avg 4 -> 21x13 -> max 3 -> 7x4 x 3 classes = 84 flattened
    assert model.get_layer("fc_flatten").output.shape[-1] == 84
    assert model.get_layer("fc1").units == 16 and model.get_layer("fc2").units == 8
    assert model.get_layer("fc_shortcut_logits").input.shape[-1] == 84
    expected = (16 * 3 + 3) + (84 * 16 + 16 + 64) + (16 * 8 + 8 + 32) + (8 * 2 + 2) + (84 * 2 + 2)
    assert model.count_params() - model.get_layer("patch_net").count_params() == expected
    y = model.predict(np.random.default_rng(0).normal(size=(2, 96, 64, 3)), verbose=0)
    np.testing.assert_allclose(y.sum(1), 1, rtol=1e-5)


def test_fc_top_without_shortcut(keras_session):
    patch = tiny_patch_net(keras_session)
    model, top_nb = R.add_top_layers(patch, (32, 32), "tiny", add_conv=False, fc_init_units=10,
                                     fc_layers=3, nb_class=4)
    names = [lyr.name for lyr in model.layers]
    assert top_nb == 2 and "fc_shortcut_logits" not in names
    assert [model.get_layer(f"fc{i}").units for i in (1, 2, 3)] == [10, 5, 2]
    assert model.get_layer("predictions").activation.__name__ == "softmax"
    assert model.output_shape == (None, 4)


def test_cut_point_override_and_single_channel(keras_session):
    patch = tiny_patch_net(keras_session, (None, None, 1))
    # a backbone name without a 2017 layer list: the index counts in the model's own list
    model, _ = R.add_top_layers(patch, (32, 32), "tiny", block_type="vgg", depths=[4],
                                repetitions=[1], kept_layer_idx=-8)
    assert model.input_shape == (None, 32, 32, 1)
    nested = model.get_layer("patch_net")
    assert nested.layers[-1].name == "block1_pool" and nested.output_shape[-1] == 8
    # "yaroslav": read in the 2017 YaroslavNet list, whose head has no dropout, so the same
    # index lands one layer earlier in ours
    assert R.find_cut_layer(patch, "yaroslav", kept_layer_idx=-8).name == "block1_relu"
    assert R.find_cut_layer(patch, "vgg16").name == "block2_pool"  # no block5_pool: last 4-D


def test_fixed_input_patch_net_is_opened(keras_session):
    keras = keras_session
    fixed = tiny_patch_net(keras, (32, 32, 3))
    opened = tiny_patch_net(keras, (None, None, 3))
    opened.set_weights(fixed.get_weights())
    kw = dict(block_type="resnet", depths=[8], repetitions=[1], bottleneck_enlarge_factor=2)
    m1, _ = R.add_top_layers(fixed, (96, 64), "tiny", **kw)
    m2, _ = R.add_top_layers(opened, (96, 64), "tiny", **kw)
    m2.set_weights(m1.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 96, 64, 3))
    np.testing.assert_allclose(m1.predict(x, verbose=0), m2.predict(x, verbose=0), rtol=1e-6)


def test_add_top_layers_bad_input(keras_session):
    keras = keras_session
    patch = tiny_patch_net(keras)
    with pytest.raises(ValueError, match="valid"):
        R.add_top_layers(patch, (64, 64), "tiny", block_type="inception")
    with pytest.raises(ValueError, match="same length"):
        R.add_top_layers(patch, (64, 64), "tiny", depths=[8, 8], repetitions=[1])
    with pytest.raises(ValueError, match="image_size"):
        R.add_top_layers(patch, (64,), "tiny")
    with pytest.raises(ValueError, match="avg_pool_size"):
        R.add_top_layers(patch, (16, 16), "tiny", add_heatmap=True, avg_pool_size=(7, 7))
    with pytest.raises(ValueError, match="out of range"):
        R.add_top_layers(patch, (64, 64), "tiny", kept_layer_idx=-50)
    dense_only = keras.Model(*(lambda i: (i, keras.layers.Dense(2)(i)))(keras.Input((5,))))
    with pytest.raises(ValueError, match="could not find the cut layer"):
        R.add_top_layers(dense_only, (64, 64), "mystery_net")
    no_dense = keras.Model(patch.input, patch.get_layer("top_dropout").output)
    with pytest.raises(ValueError, match="Dense"):
        R.add_top_layers(no_dense, (64, 64), "tiny", add_heatmap=True, avg_pool_size=(2, 2))
