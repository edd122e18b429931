"""The table of backbones (``dm_resnet.BACKBONES``): every use reads it, a toy backbone needs one
entry, the EfficientNetV2 and ConvNeXt entries work end to end, and the root modules import
without a circle."""
import ast
import subprocess
import sys

import numpy as np
import pytest

import dm_keras_ext as E
import dm_resnet as R

ROOT_MODULES = ["dm_image", "dm_keras_ext", "dm_resnet", "dm_multi_gpu", "dm_enet"]
BACKBONES_2017 = {"resnet50", "vgg16", "vgg19", "xception", "inception", "yaroslav"}


# ------------------------------------------------------------------ no import circle
def _imported_root_modules(path):
    """Root modules imported anywhere in the file at ``path`` (module level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & set(ROOT_MODULES)


def test_root_modules_import_each_other_without_a_circle(repo_root):
    graph = {m: _imported_root_modules(repo_root / f"{m}.py") - {m} for m in ROOT_MODULES}
    assert "dm_keras_ext" not in graph["dm_image"]
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, "import circle: " + " -> ".join(visiting + [module])
        if module in done:
            return
        visiting.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in ROOT_MODULES:
        visit(module)


@pytest.mark.slow
def test_each_root_module_imports_alone_and_dm_image_stays_below(repo_root, tmp_path):
    """Each root module imports first in a fresh interpreter (the five run side by side);
    dm_image, even when it applies a backbone's preprocessing, does not load dm_keras_ext."""
    code = ("import sys, numpy as np, dm_image\n"
            "r = dm_image.InputRecipe(channels=3, preprocess='efficientnetv2s')\n"
            "y = r.normalize(np.full((1, 2, 2, 3), 128, np.float32))\n"
            "assert float(abs(y).max()) == 0.0, y\n"
            "assert 'dm_keras_ext' not in sys.modules, 'dm_image loaded dm_keras_ext'\n"
            "print('ok')")
    env = {"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    codes = [code] + [f"import {module}; print('ok')" for module in ROOT_MODULES[1:]]
    procs = [subprocess.Popen([sys.executable, "-c", c], cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in codes]
    for module, proc in zip(ROOT_MODULES, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.strip() == "ok", f"{module}: {err}"


# ------------------------------------------------------------------ one table, read everywhere
def test_old_tables_are_views_of_the_one_table():
    assert set(R.KERAS208_PATCH_HEADS) == BACKBONES_2017
    assert R.KERAS208_PATCH_HEADS["resnet50"] == ("AveragePooling2D", "GlobalAveragePooling2D",
                                                  "Dropout", "Dense")
    assert R.CUT_LAYER_ROLES["vgg16"] == ("block5_pool", R._last_4d_layer)
    assert R.CUT_LAYER_ROLES["efficientnetv2b0"][0] == "top_activation"
    assert set(R.CUT_LAYER_ROLES) == set(R.BACKBONES)
    assert E.get_preprocess_input is R.get_preprocess_input and E.Yaroslav is R.Yaroslav
    assert R.get_preprocess_input("convnext_tiny") is R.BACKBONES["convnext_tiny"].preprocess


def test_flag_choices_are_the_table(repo_root):
    import heatmap_score
    import image_clf_train
    import patch_clf_train

    names = R.backbone_names()
    assert {"efficientnetv2s", "efficientnetv2b0", "convnext_tiny"} | BACKBONES_2017 <= set(names)
    for parser, flag in ((patch_clf_train.get_args_parser(), "--net"),
                         (image_clf_train.get_args_parser(), "--patch-net"),
                         (heatmap_score.get_args_parser(), "--net")):
        assert list(parser._option_string_actions[flag].choices) == names


def test_register_backbone_guards():
    with pytest.raises(ValueError, match="already registered"):
        R.register_backbone(R.Backbone("vgg16", R.KerasApplication("VGG16")))
    with pytest.raises(ValueError, match="expects a Backbone"):
        R.register_backbone({"name": "toy"})
    with pytest.raises(ValueError, match="constructor should be callable"):
        R.register_backbone(R.Backbone("toy", "ResNet50"))
    with pytest.raises(ValueError, match="unknown net 'alexnet'.*convnext_tiny"):
        R.get_backbone("alexnet")
    assert "toy" not in R.BACKBONES


@pytest.mark.parametrize("net,expected", [
    ("efficientnetv2s", [-1.0, 0.0, 127 / 128]),                       # Rescaling(1/128, -1)
    ("efficientnetv2b0", [(v - 255 * m) / (255 * s) for v, m, s in
                          zip((0, 128, 255), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]),
])
def test_new_backbones_preprocessing_values(net, expected):
    """The recipe's normalise step of a new backbone, on a pixel (0, 128, 255) in RGB."""
    import dm_image

    recipe = dm_image.InputRecipe(channels=3, preprocess=net)
    x = np.array([[[0, 128, 255]]], np.float32)
    got = recipe.normalize(x.copy())
    np.testing.assert_allclose(got[0, 0], expected, rtol=1e-6)
    assert got.dtype == np.float32


def test_new_backbones_missing_weights_message(keras_session, monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(E.IMAGENET_WEIGHTS_ENV, raising=False)
    for net, file_name, ctor in (("convnext_tiny", "convnext_tiny_notop.h5", "ConvNeXtTiny"),
                                 ("efficientnetv2s", "efficientnetv2-s_notop.h5",
                                  "EfficientNetV2S")):
        with pytest.raises(FileNotFoundError) as err:
            E.get_dl_model(net, use_pretrained=True, input_shape=(64, 64, 3))
        msg = str(err.value)
        assert file_name in msg and str(tmp_path / "keras_home" / "models") in msg
        assert f"keras.applications.{ctor}(weights='imagenet'" in msg


# ------------------------------------------------------------------ a toy backbone: one entry
def _toy_features(input_shape):
    import tf_keras as keras

    inp = keras.Input(shape=input_shape, name="toy_input")
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu",
                            name="toy_conv1")(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu",
                            name="toy_conv2")(x)
    return keras.Model(inp, x, name="toy")


@pytest.fixture
def toy_backbone():
    entry = R.register_backbone(R.Backbone("toy", _toy_features, channels=1,
                                           cut_layer="toy_conv2"))
    yield entry
    del R.BACKBONES["toy"]


def test_toy_backbone_is_one_table_entry(keras_session, toy_backbone, tmp_path):
    import heatmap_score
    import patch_clf_train

    keras = keras_session
    patch, preprocess, top_nb = E.get_dl_model("toy", nb_class=3, hidden_dropout=0.2)
    assert preprocess is None and top_nb is None
    assert patch.input_shape == (None, None, None, 1) and patch.name == "toy_patch"
    assert patch.count_params() == (9 * 1 * 4 + 4) + (9 * 4 * 8 + 8) + (8 * 3 + 3)
    assert [lyr.name for lyr in patch.layers[-3:]] == ["avg_pool", "top_dropout", "predictions"]
    # one training step
    rng = np.random.RandomState(0)
    x, y = rng.rand(4, 32, 32, 1).astype("float32"), np.eye(3)[[0, 1, 2, 0]]
    patch.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    before = patch.get_layer("toy_conv1").get_weights()[0].copy()
    assert np.isfinite(patch.train_on_batch(x, y))
    assert not np.array_equal(before, patch.get_layer("toy_conv1").get_weights()[0])
    # conversion to a whole-image model, cut by the entry's role, and prediction
    assert R.find_cut_layer(patch, "toy").name == "toy_conv2"
    whole, top = R.add_top_layers(patch, (32, 24), "toy", depths=[4], repetitions=[1],
                                  bottleneck_enlarge_factor=1)
    assert top == 2 and whole.get_layer("patch_net").output_shape == (None, None, None, 8)
    assert whole.predict(rng.rand(2, 32, 24, 1).astype("float32"), verbose=0).shape == (2, 2)
    hm = heatmap_score.build_fprop_model(patch, "toy", (32, 24), (2, 2), (1, 1))
    assert hm.predict(np.zeros((1, 32, 24, 1), "float32"), verbose=0).shape == (1, 7, 5, 3)
    # the command line accepts it, from the same table
    assert patch_clf_train.get_args_parser().parse_args(
        ["tr", "va", "te", "--net", "toy"]).net == "toy"


# ------------------------------------------------------------------ today's backbones
# (net, tf_keras.applications constructor, stage-2 layer, cut layer (None: the last 4-D layer),
#  feature channels)
NEW_NETS = {
    "efficientnetv2b0": ("EfficientNetV2B0", "block6h_expand_conv", "top_activation", 1280,
                         5_923_155),
    "convnext_tiny": ("ConvNeXtTiny", "convnext_tiny_stage_3_block_2_depthwise_conv", None, 768,
                      27_822_435),
}


@pytest.fixture(scope="module", params=sorted(NEW_NETS))
def new_backbone(request):
    """(net, our patch net, the application built independently with its top for 3 classes and
    its own preprocessing layers), built once per backbone."""
    import tf_keras as keras

    keras.backend.clear_session()
    net = request.param
    ours, preprocess, top_nb = E.get_dl_model(net, nb_class=3, use_pretrained=False)
    ref = getattr(keras.applications, NEW_NETS[net][0])(include_top=True, weights=None, classes=3,
                                                        input_shape=(64, 64, 3))
    yield net, ours, preprocess, top_nb, ref
    keras.backend.clear_session()


def _preprocessing_layers(model):
    import tf_keras as keras

    return [lyr for lyr in model.layers
            if isinstance(lyr, (keras.layers.Rescaling, keras.layers.Normalization))]


@pytest.mark.slow
def test_new_backbone_counts_roles_and_preprocessing(new_backbone):
    _check_counts_roles_and_preprocessing(*new_backbone, NEW_NETS[new_backbone[0]])


#: EfficientNetV2-S: built and checked like the others (its training path is B0's).
V2S = ("EfficientNetV2S", "block6o_expand_conv", "top_activation", 1280, 20_335_203)


@pytest.mark.slow
def test_efficientnetv2s_counts_roles_and_preprocessing(keras_session):
    import tf_keras as keras

    ours, preprocess, top_nb = E.get_dl_model("efficientnetv2s", nb_class=3,
                                              use_pretrained=False)
    ref = keras.applications.EfficientNetV2S(include_top=True, weights=None, classes=3,
                                             input_shape=(64, 64, 3))
    _check_counts_roles_and_preprocessing("efficientnetv2s", ours, preprocess, top_nb, ref, V2S)


def _check_counts_roles_and_preprocessing(net, ours, preprocess, top_nb, ref, facts):
    _, stage2, cut, channels, count = facts
    pre = _preprocessing_layers(ref)
    assert pre and not _preprocessing_layers(ours)          # preprocessing is the recipe's
    assert ours.count_params() == ref.count_params() - sum(p.count_params() for p in pre)
    assert ours.count_params() == count
    assert ours.layers[top_nb].name == stage2
    layer = R.find_cut_layer(ours, net)
    assert layer is ours.layers[-4] and layer.output.shape[-1] == channels
    assert cut is None or layer.name == cut
    # the entry's preprocessing computes what the application's own layers did
    import tf_keras as keras

    x = np.random.RandomState(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    own = keras.Model(ref.input, pre[-1].output)
    np.testing.assert_allclose(preprocess(x.copy()), own.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.slow
def test_new_backbone_trains_converts_and_gives_fprop_heatmap(new_backbone, tmp_path):
    import heatmap_score
    import tf_keras as keras

    net, ours, preprocess, _, _ = new_backbone
    rng = np.random.RandomState(0)
    model = ours
    model.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
    dense = model.get_layer("predictions").get_weights()[0].copy()
    x = preprocess(rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32"))
    assert np.isfinite(model.train_on_batch(x, np.eye(3)[[0, 1]]))
    assert not np.array_equal(dense, model.get_layer("predictions").get_weights()[0])
    # whole-image model of 128x96 images
    whole, top = R.add_top_layers(ours, (128, 96), net, depths=[16], repetitions=[1],
                                  bottleneck_enlarge_factor=2)
    assert top == 2 and whole.input_shape == (None, 128, 96, 3)
    images = preprocess(rng.uniform(0, 255, (1, 128, 96, 3)).astype("float32"))
    scores = whole.predict(images, verbose=0)
    assert scores.shape == (1, 2)
    E.save_model_atomic(whole, tmp_path / "whole.h5", include_optimizer=False)   # files load
    np.testing.assert_allclose(E.robust_load_model(tmp_path / "whole.h5").predict(
        images, verbose=0), scores, rtol=1e-5, atol=1e-6)
    # fprop heatmap: the patch classifier's dense on every 2x2 window of the 4x3 feature map
    hm = heatmap_score.build_fprop_model(ours, net, (128, 96), (2, 2), (1, 1))
    got = hm.predict(images, verbose=0)
    feat = keras.Model(ours.input, R.find_cut_layer(ours, net).output).predict(images,
                                                                              verbose=0)[0]
    assert feat.shape == (4, 3, NEW_NETS[net][3])                # 128x96 / 32
    pooled = (feat[:-1, :-1] + feat[1:, :-1] + feat[:-1, 1:] + feat[1:, 1:]) / 4
    kernel, bias = ours.get_layer("predictions").get_weights()
    logits = pooled @ kernel + bias
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got[0], want / want.sum(-1, keepdims=True), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_efficientnet_imagenet_weights_from_cache(keras_session, monkeypatch, tmp_path):
    """ImageNet weights (a file saved with the application's own preprocessing layers) load
    into our backbone, which has none: features of ``preprocess(x)`` equal the file's model's
    on ``x``."""
    keras = keras_session
    src = keras.applications.EfficientNetV2B0(include_top=False, weights=None,
                                              input_shape=(64, 64, 3))
    cache = tmp_path / "keras_home" / "models"
    cache.mkdir(parents=True)
    src.save_weights(str(cache / "efficientnetv2-b0_notop.h5"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(E.IMAGENET_WEIGHTS_ENV, raising=False)
    model, preprocess, _ = E.get_dl_model("efficientnetv2b0", use_pretrained=True,
                                          input_shape=(64, 64, 3))
    x = np.random.RandomState(2).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    feat = keras.Model(model.input, R.find_cut_layer(model, "efficientnetv2b0").output)
    np.testing.assert_allclose(feat.predict(preprocess(x.copy()), verbose=0),
                               src.predict(x, verbose=0), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_toy_backbone_through_the_trainers(keras_session, toy_backbone, tmp_path):
    """The one entry is all the command-line trainers need: patch training (``--net toy``),
    conversion and whole-image training (``--patch-net toy``), test scoring."""
    from conftest import split_dirs, write_class_split

    import image_clf_train
    import patch_clf_train

    rng = np.random.default_rng(3)
    write_class_split(tmp_path / "patch", ["background", "malignant", "benign"],
                      {"train": 3, "val": 2, "test": 2}, (32, 32), rng)
    write_class_split(tmp_path / "img", ["neg", "pos"], {"train": 3, "val": 2, "test": 2},
                      (64, 48), rng)
    common = ["--rescale-factor", "0.003891", "--featurewise-mean", "50", "--batch-size", "2",
              "--nb-epoch", "1", "--final-model", "NOSAVE"]
    patch = patch_clf_train.main(split_dirs(tmp_path, "patch") + common + [
        "--net", "toy", "--img-size", "32", "32", "--no-equalize-hist",
        "--best-model", str(tmp_path / "patch.h5")])
    assert patch["stages"] == ["stage 1 (all layers, no pretrained weights)"]
    image = image_clf_train.main(split_dirs(tmp_path, "img") + common + [
        "--patch-model-state", str(tmp_path / "patch.h5"), "--patch-net", "toy",
        "--img-size", "64", "48", "--block-type", "vgg", "--top-depths", "8",
        "--top-repetitions", "1", "--all-layer-epochs", "0",
        "--best-model", str(tmp_path / "image.h5")])
    import dm_keras_ext

    whole = dm_keras_ext.robust_load_model(tmp_path / "image.h5")
    assert whole.get_layer("patch_net").layers[-1].name == "toy_conv2"
    assert whole.input_shape == (None, 64, 48, 1) and image["epochs"] == 1
