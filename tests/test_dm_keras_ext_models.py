"""dm_keras_ext model factory: patch nets, YaroslavNet, ImageNet weights, optimisers, and the
parameter counts of the 2017 patch and whole-image models (Keras 2.0.8 reference counts)."""
import numpy as np
import pytest

import dm_keras_ext as E
import dm_resnet as R


@pytest.fixture
def no_weight_env(monkeypatch, tmp_path):
    """An empty Keras cache and no DM_IMAGENET_WEIGHTS: nothing can be found or downloaded."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(E.IMAGENET_WEIGHTS_ENV, raising=False)
    return tmp_path / "keras_home"


def test_yaroslav_reference_count_and_roles(keras_session, no_weight_env):
    model, preprocess, top_nb = E.get_dl_model("yaroslav", nb_class=3, use_pretrained=True,
                                               weight_decay=0.01, hidden_dropout=0.3)
    assert model.count_params() == 5_903_331
    assert model.input_shape == (None, None, None, 1)
    assert preprocess is None and top_nb is None
    names = [lyr.name for lyr in model.layers]
    assert [n for n in names if n.endswith("pool") and n.startswith("block")] == [
        f"block{i}_pool" for i in range(1, 7)]
    assert names[-3:] == ["avg_pool", "top_dropout", "predictions"]
    assert model.get_layer("top_dropout").rate == pytest.approx(0.3)
    assert model.get_layer("predictions").kernel_regularizer.l2 == pytest.approx(0.01)
    assert R.find_cut_layer(model, "yaroslav").name == "block6_pool"
    assert model.get_layer("block6_conv2").filters == 512
    y = model.predict(np.zeros((1, 64, 64, 1), "float32"), verbose=0)
    np.testing.assert_allclose(y.sum(), 1, rtol=1e-5)


def test_yaroslav_whole_image_heatmap_fc(keras_session):
    patch = E.Yaroslav((None, None, 1), nb_class=3)
    model, top_nb = R.add_top_layers(patch, (576, 448), "yaroslav", add_heatmap=True,
                                     avg_pool_size=(3, 3), hm_pool_size=(2, 2), add_conv=False,
                                     add_shortcut=True, fc_init_units=16, fc_layers=2)
    assert model.input_shape == (None, 576, 448, 1)
    assert tuple(model.layers[2].input.shape) == (None, 9, 7, 512)
    assert top_nb == 6 and model.layers[top_nb].name == "fc_flatten"
    # heatmap 7x5 -> max pool 2 -> 3x2 x 3 classes
    assert model.get_layer("fc_flatten").output.shape[-1] == 18


def test_get_dl_model_rejects_unknown_net():
    with pytest.raises(ValueError, match="resnet50.*yaroslav|valid"):
        E.get_dl_model("alexnet")
    with pytest.raises(ValueError, match="vgg16"):
        E.stage2_start_index(None, "lenet")


def test_pretrained_weights_missing_gives_clear_error(keras_session, no_weight_env):
    with pytest.raises(FileNotFoundError) as err:
        E.get_dl_model("vgg16", use_pretrained=True, input_shape=(32, 32, 3))
    msg = str(err.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(no_weight_env / "models") in msg and E.IMAGENET_WEIGHTS_ENV in msg


def test_pretrained_weights_load_from_cache_and_env(keras_session, no_weight_env, tmp_path,
                                                    monkeypatch):
    keras = keras_session
    src = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    cache = no_weight_env / "models"
    cache.mkdir(parents=True)
    src.save_weights(str(cache / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"))
    model, preprocess, top_nb = E.get_dl_model("vgg16", nb_class=3, use_pretrained=True,
                                               input_shape=(32, 32, 3))
    for name in ("block1_conv1", "block5_conv3"):
        np.testing.assert_array_equal(model.get_layer(name).get_weights()[0],
                                      src.get_layer(name).get_weights()[0])
    assert top_nb == 15 and model.layers[top_nb].name == "block5_conv1"
    assert preprocess is keras.applications.vgg16.preprocess_input
    # an explicit file through the environment variable wins over the cache
    other = tmp_path / "elsewhere.h5"
    src.get_layer("block1_conv1").set_weights(
        [w + 1 for w in src.get_layer("block1_conv1").get_weights()])
    src.save_weights(str(other))
    monkeypatch.setenv(E.IMAGENET_WEIGHTS_ENV, str(other))
    assert E.imagenet_weights_path("vgg16") == str(other)
    model2, _, _ = E.get_dl_model("vgg16", use_pretrained=True, input_shape=(32, 32, 3))
    np.testing.assert_array_equal(model2.get_layer("block1_conv1").get_weights()[1],
                                  src.get_layer("block1_conv1").get_weights()[1])


@pytest.mark.parametrize("name,cls,extra", [
    ("sgd", "SGD", {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", "Keras208RMSprop", {"rho": 0.9, "epsilon": 1e-8}),
    ("adagrad", "Keras208Adagrad", {"epsilon": 1e-8}),
    ("adadelta", "Adadelta", {"rho": 0.95, "epsilon": 1e-8}),
    ("adamax", "Adamax", {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8}),
    ("adam", "Adam", {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "amsgrad": False}),
    ("nadam", "Keras208Nadam", {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8,
                                "schedule_decay": 0.004})])
def test_create_optimizer(name, cls, extra):
    """Keras 2.0.8's optimizers and defaults (epsilon 1e-8; the update rules are checked
    against NumPy and Keras 2.0.8's own steps in test_keras208_training.py)."""
    opt = E.create_optimizer(name, 0.003)
    assert type(opt).__name__ == cls
    cfg = opt.get_config()
    assert cfg["learning_rate"] == pytest.approx(0.003)
    for key, value in extra.items():
        assert cfg[key] == value
    assert E.create_optimizer(name, 0.003) is not opt


def test_create_optimizer_bad_input():
    with pytest.raises(ValueError, match="adadelta.*sgd"):
        E.create_optimizer("adamw", 0.01)
    with pytest.raises(ValueError, match="learning rate"):
        E.create_optimizer("sgd", 0)


@pytest.mark.slow
def test_resnet50_reference_counts(keras_session, no_weight_env):
    model, preprocess, top_nb = E.get_dl_model("resnet50", nb_class=3, use_pretrained=False)
    assert model.count_params() == 23_593_859
    assert model.layers[top_nb].name == "conv5_block2_out"
    assert R.find_cut_layer(model, "resnet50").name == "conv5_block3_out"
    whole, top = R.add_top_layers(model, (288, 224), "resnet50", block_type="resnet",
                                  depths=[512, 512], repetitions=[2, 2],
                                  bottleneck_enlarge_factor=2, nb_class=2)
    assert whole.count_params() == 40_942_466
    assert top == 2
    assert tuple(whole.layers[2].input.shape) == (None, 9, 7, 2048)
    assert whole.get_layer("top2_block2_out").output.shape[1:] == (3, 2, 1024)


@pytest.mark.slow
def test_vgg16_reference_counts(keras_session, no_weight_env):
    model, _, top_nb = E.get_dl_model("vgg16", nb_class=3, use_pretrained=False)
    assert model.count_params() == 14_716_227
    assert top_nb == 15 and model.layers[top_nb].name == "block5_conv1"
    vgg_top, top = R.add_top_layers(model, (288, 224), "vgg16", block_type="vgg",
                                    depths=[512], repetitions=[1], nb_class=2)
    assert vgg_top.count_params() == 17_077_570 and top == 2
    assert vgg_top.get_layer("top1_pool").output.shape[1:] == (4, 3, 512)
    hybrid, _ = R.add_top_layers(model, (288, 224), "vgg16", block_type="resnet",
                                 depths=[512, 512], repetitions=[2, 2],
                                 bottleneck_enlarge_factor=2, nb_class=2)
    assert hybrid.count_params() == 29_710_146


@pytest.mark.slow
def test_vgg19_xception_inception_roles(keras_session, no_weight_env):
    keras = keras_session
    model, _, top_nb = E.get_dl_model("vgg19", use_pretrained=False, input_shape=(64, 64, 3))
    assert top_nb == 17 and model.layers[top_nb].name == "block5_conv1"
    assert R.find_cut_layer(model, "vgg19").name == "block5_pool"
    keras.backend.clear_session()
    model, _, top_nb = E.get_dl_model("xception", use_pretrained=False)
    assert top_nb == 126 and model.layers[top_nb].name == "block14_sepconv1"
    assert R.find_cut_layer(model, "xception").name == "block14_sepconv2_act"
    keras.backend.clear_session()
    model, _, top_nb = E.get_dl_model("inception", use_pretrained=False)
    assert model.layers[top_nb - 1].name == "mixed6"
    assert all("mixed6" != lyr.name for lyr in model.layers[top_nb:])
    # weight-equivalent to the 2017 index 194: nothing between it and ours has weights
    assert top_nb > 194 and not any(model.layers[i].weights for i in range(194, top_nb))
    assert R.find_cut_layer(model, "inception").name == "mixed10"


def _first_conv(model):
    import tf_keras as keras
    return next(lyr for lyr in model.layers if isinstance(lyr, keras.layers.Conv2D))


@pytest.mark.parametrize("nb_filter,size,stride", [(8, 5, 2), (16, 3, 1)])
def test_dm_resnet14_small_net_honours_2017_flags(keras_session, no_weight_env, nb_filter, size,
                                                  stride):
    model, preprocess, top_nb = E.get_dl_model(
        "dm_resnet14", nb_class=3, use_pretrained=True, nb_init_filter=nb_filter,
        init_filter_size=size, init_conv_stride=stride, weight_decay=1e-4, alpha=1e-4,
        l1_ratio=0.0)
    assert model.input_shape == (None, None, None, 1)      # greyscale, like YaroslavNet
    assert preprocess is None and top_nb is None            # no pretrained weights: stage 1 only
    stem = _first_conv(model)
    assert stem.filters == nb_filter and stem.kernel_size == (size, size)
    assert stem.strides == (stride, stride)
    ref = R.ResNetBuilder.build_dm_resnet_14((1, None, None), 3, nb_init_filter=nb_filter,
                                             init_filter_size=size, init_conv_stride=stride,
                                             pool_size=2, pool_stride=2)
    assert model.count_params() == ref.count_params()
    cut = R.find_cut_layer(model, "dm_resnet14")
    assert cut.output.shape[-1] == nb_filter * 8 * 4          # 4 stages, bottleneck x4
    x = np.zeros((2, 64, 64, 1), "float32")
    assert model.predict(x, verbose=0).shape == (2, 3)
    whole, top = R.add_top_layers(model, (128, 96), "dm_resnet14", depths=[16],
                                  repetitions=[1], bottleneck_enlarge_factor=2)
    assert whole.input_shape == (None, 128, 96, 1) and whole.output_shape == (None, 2)
    assert top == 2


def test_dm_resnet14_param_count_grows_with_filters(keras_session):
    small = E.dm_resnet14_patch_net(nb_class=3, nb_init_filter=8).count_params()
    big = E.dm_resnet14_patch_net(nb_class=3, nb_init_filter=16).count_params()
    assert big > 3 * small                               # conv weights scale ~ filters^2
    assert E.dm_resnet14_patch_net(nb_class=3, nb_init_filter=16).count_params() == 507_395
