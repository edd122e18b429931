"""One input recipe: every path from a stored image to model input gives the same arrays.

The reference here is a plain composition (OpenCV read and cubic resize in the stored dtype,
float32 scaling, ``hist_equalize``, channel copy, centring or the backbone's preprocess_input),
written without the library's own pipeline, so these tests check that the training generators,
``read_img_for_pred``, ``image_clf_predict.load_pred_image``, the heatmap sweep and
``heatmap_score``'s fprop input all still compute it.
"""
import json

import cv2
import numpy as np
import pytest

import dm_image
import heatmap_score as hs
import image_clf_predict as icp

SIZE = (32, 24)
RESCALE = 255 / 65535
MEAN = 41.5

# (img_scale, rescale_factor, equalize_hist, featurewise_center, preprocess, channels)
SETTINGS = [
    (None, RESCALE, False, True, None, 3),        # whole images, 2017 defaults
    (None, RESCALE, True, True, None, 1),
    (255.0, None, True, True, None, 3),           # patches
    (40000.0, RESCALE, False, False, "vgg16", 3),  # backbone preprocessing
    (None, RESCALE, False, False, None, 1),       # neither centring nor preprocessing
    (255.0, None, False, False, "resnet50", 3),
    (None, None, True, False, None, 3),           # 16-bit levels equalised by their max
]
IDS = [f"scale{s}-rescale{r is not None}-eq{e}-centre{c}-{p}-{ch}ch"
       for s, r, e, c, p, ch in SETTINGS]


def _preprocess_fn(name):
    if name is None:
        return None
    from dm_keras_ext import get_preprocess_input

    fn = get_preprocess_input(name)
    return lambda x: fn(np.array(x, dtype=np.float32, copy=True))


def _reference(path, size, img_scale, rescale, equalize, centre, preprocess, channels):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if size is not None and tuple(size) != img.shape:
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    img = img.astype(np.float32)
    if img_scale is not None:
        img *= np.float32(img_scale / float(img.max()))
    if rescale is not None:
        img *= np.float32(rescale)
    if equalize:
        img = dm_image.hist_equalize(img)
    x = np.repeat(img[..., None], channels, axis=-1)
    if centre:
        return x - np.float32(MEAN)
    return _preprocess_fn(preprocess)(x) if preprocess else x


@pytest.fixture(scope="module")
def img_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(3)
    img = rng.integers(1000, 30000, size=(50, 41)).astype(np.uint16)
    img[10:30, 8:20] = 61000
    (root / "cls").mkdir()
    assert cv2.imwrite(str(root / "cls" / "a.png"), img)
    return root


def _recipe(settings, **extra):
    img_scale, rescale, equalize, centre, preprocess, channels = settings
    return dm_image.InputRecipe(
        img_size=extra.pop("img_size", SIZE), channels=channels, img_scale=img_scale,
        rescale_factor=rescale, equalize_hist=equalize, featurewise_center=centre,
        featurewise_mean=MEAN, preprocess=preprocess, **extra)


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_five_paths_give_the_reference(img_dir, settings):
    img_scale, rescale, equalize, centre, preprocess, channels = settings
    path = img_dir / "cls" / "a.png"
    ref = _reference(path, SIZE, *settings)
    pre_fn = _preprocess_fn(preprocess)

    # 1. the recipe itself
    recipe = _recipe(settings)
    np.testing.assert_array_equal(recipe.read(path), ref)
    np.testing.assert_array_equal(recipe.batch([path, path]), np.stack([ref, ref]))

    # 2. read_img_for_pred (2017 signature; centring through its standardizer)
    std = (lambda x: x - np.float32(MEAN)) if centre else pre_fn
    got = dm_image.read_img_for_pred(path, equalize_hist=equalize,
                                     dup_3_channels=channels == 3, standardizer=std,
                                     target_size=SIZE, target_scale=img_scale,
                                     rescale_factor=rescale)
    np.testing.assert_array_equal(got, ref)

    # 3. the training generators: from disk, and from the RAM cache
    gen = dm_image.DMImageDataGenerator(featurewise_center=centre)
    gen.mean = MEAN if centre else None
    kw = dict(target_scale=img_scale, rescale_factor=rescale, equalize_hist=equalize,
              dup_3_channels=channels == 3, preprocess=None if centre else pre_fn)
    it = gen.flow_from_directory(img_dir, target_size=SIZE, class_mode=None, batch_size=1,
                                 shuffle=False, **kw)
    np.testing.assert_array_equal(it[0][0], ref)
    assert it.recipe.to_dict()["img_size"] == list(SIZE)
    X, _ = dm_image.load_dat_ram(it, verbose=False)
    ram = gen.flow(X, None, batch_size=1, shuffle=False, **kw)
    np.testing.assert_array_equal(ram[0][0], ref)

    # 4. image_clf_predict.load_pred_image (one channel, copied per model; or the recipe's)
    if preprocess is None:
        x1 = icp.load_pred_image(path, SIZE, img_scale, rescale, equalize, centre, MEAN)
        np.testing.assert_array_equal(np.repeat(x1, channels, axis=-1), ref)
    x = icp.load_pred_image(path, SIZE, img_scale, rescale, equalize, centre, MEAN,
                            channels=channels, preprocess=preprocess)
    np.testing.assert_array_equal(x, ref)

    # 5. heatmap_score fprop input
    opts = dict(img_size=SIZE, img_scale=img_scale, rescale_factor=rescale,
                equalize_hist=equalize, featurewise_center=centre, featurewise_mean=MEAN,
                preprocess=None if centre else pre_fn)
    model = _Recorder(channels, fprop=True)
    hs.fprop_heatmap(model, [path], opts, batch_size=1)
    np.testing.assert_array_equal(model.seen[0][0], ref)


class _Recorder:
    """A stand-in model that records its inputs and returns zeros."""

    def __init__(self, channels, fprop=False):
        self.input_shape = (None, None, None, channels)
        self.fprop, self.seen = fprop, []

    def predict_on_batch(self, x):
        self.seen.append(np.array(x))
        return np.zeros((len(x), 2, 2, 3), np.float32)

    def predict(self, x, batch_size=None, verbose=0):
        self.seen.append(np.array(x))
        return np.zeros((len(x), 3), np.float32)


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_sweep_patches_give_the_reference(settings):
    """The heatmap sweep: per-patch scaling and equalisation, channel copy, centring."""
    img_scale, rescale, equalize, centre, preprocess, channels = settings
    rng = np.random.default_rng(5)
    img = np.zeros((70, 60), np.float32)
    cv2.ellipse(img, (0, 35), (50, 30), 0, -90, 90, 20000, -1)
    img += (img > 0) * rng.integers(0, 9000, img.shape).astype(np.float32)
    if rescale is not None:
        img *= np.float32(rescale)
    pre_fn = _preprocess_fn(preprocess)
    model = _Recorder(channels)
    dm_image.get_prob_heatmap(img, None, img_scale, 16, 6, model, 7,
                              featurewise_center=centre, featurewise_mean=MEAN,
                              preprocess=pre_fn, equalize_hist=equalize)
    seg, _ = dm_image.segment_breast(img)
    patches, _, _ = dm_image.sweep_img_patches(dm_image.add_img_margins(seg, 8), 16, 6,
                                               img_scale, equalize)
    ref = np.repeat(patches[..., None], channels, axis=-1)
    ref = ref - np.float32(MEAN) if centre else (pre_fn(ref) if pre_fn else ref)
    np.testing.assert_array_equal(np.concatenate(model.seen), ref)


def test_recipe_dict_round_trip_and_validation(tmp_path):
    recipe = dm_image.InputRecipe(img_size=(64, 48), channels=3, rescale_factor=RESCALE,
                                  featurewise_center=False, preprocess="vgg16")
    data = recipe.to_dict()
    assert data["version"] == dm_image.InputRecipe.VERSION
    assert dm_image.InputRecipe.from_dict(json.loads(json.dumps(data))) == recipe
    assert dm_image.InputRecipe.from_json(recipe.to_json()) == recipe
    assert recipe.replace(channels=1).channels == 1
    with pytest.raises(ValueError, match="channels"):
        dm_image.InputRecipe(img_size=(8, 8), channels=2)
    with pytest.raises(ValueError, match="img_size"):
        dm_image.InputRecipe(img_size=(8, 8), img_height=8)
    with pytest.raises(ValueError, match="version"):
        dm_image.InputRecipe.from_dict(dict(data, version=99))
    with pytest.raises(ValueError, match="unknown"):
        dm_image.InputRecipe.from_dict(dict(data, colour="red"))


def test_recipe_from_model_file(tmp_path):
    import h5py

    recipe = dm_image.InputRecipe(img_size=(64, 48), channels=1, rescale_factor=RESCALE,
                                  featurewise_mean=44.33)
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs[dm_image.RECIPE_ATTR] = recipe.to_json()
    assert dm_image.InputRecipe.from_model_file(path) == recipe
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.attrs["keras_version"] = "2.0.8"
    assert dm_image.InputRecipe.from_model_file(tmp_path / "plain.h5") is None


def test_model_file_attributes_read_as_text_or_bytes(tmp_path):
    """The recipe and the model info read the same stored as bytes or as text; a file that
    is not HDF5, or lacks the attribute, has none; an unreadable one names the file."""
    import h5py

    import dm_keras_ext as K

    recipe = dm_image.InputRecipe(img_size=(64, 48), channels=1, rescale_factor=RESCALE)
    good, bad, other = tmp_path / "good.h5", tmp_path / "bad.h5", tmp_path / "other.h5"
    with h5py.File(good, "w") as f:
        f.attrs[dm_image.RECIPE_ATTR] = recipe.to_json().encode()
        f.attrs[K.MODEL_INFO_ATTR] = np.bytes_(b'{"net": "toy"}')
        f.attrs["note"] = "text"
    assert dm_image.InputRecipe.from_model_file(good) == recipe
    assert K.read_model_info(good) == {"net": "toy"}
    assert dm_image.read_file_attr(good, "note") == "text"
    assert dm_image.read_file_attr(good, "absent") is None
    other.write_text("not an HDF5 file")
    assert dm_image.read_file_attr(other, "note") is None
    assert dm_image.InputRecipe.from_model_file(other) is None
    assert K.read_model_info(other) is None
    with h5py.File(bad, "w") as f:
        f.attrs[dm_image.RECIPE_ATTR] = "{not json"
        f.attrs[K.MODEL_INFO_ATTR] = "[1, 2]"
    with pytest.raises(ValueError, match="bad.h5: unreadable input recipe"):
        dm_image.InputRecipe.from_model_file(bad)
    with pytest.raises(ValueError, match="bad.h5: unreadable dm_model_info attribute"):
        K.read_model_info(bad)


def test_import_stays_free_of_tensorflow():
    import subprocess
    import sys

    code = ("import sys, dm_image; r = dm_image.InputRecipe(img_size=(4, 4), preprocess='vgg16');"
            "assert 'tensorflow' not in sys.modules and 'tf_keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(dm_image.Path(
        dm_image.__file__).parent))


# ------------------------------------------------------------------ models carry their recipe
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny whole-image model trained by image_clf_train with --rescale-factor and a mean."""
    import tf_keras as keras

    import dm_keras_ext
    import image_clf_train

    root = tmp_path_factory.mktemp("recipe_train")
    rng = np.random.default_rng(7)
    for split, n in {"train": 4, "val": 3, "test": 3}.items():
        for ci, cls in enumerate(["neg", "pos"]):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.normal(13000, 2500, (64, 48))
                if ci:
                    img[20:28, 10:18] += 30000
                cv2.imwrite(str(root / split / cls / f"{i}.png"),
                            img.clip(0, 65535).astype(np.uint16))
    keras.backend.clear_session()
    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="block1_conv1")(inp)
    x = keras.layers.MaxPooling2D(name="block1_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    dm_keras_ext.save_model_atomic(keras.Model(inp, out), root / "patch.h5")
    best = root / "best.h5"
    image_clf_train.main([str(root / s) for s in ("train", "val", "test")] + [
        "--patch-model-state", str(root / "patch.h5"), "--img-size", "64", "48",
        "--rescale-factor", "0.003891", "--featurewise-mean", "50", "--patch-net", "vgg16",
        "--block-type", "vgg", "--top-depths", "4", "--top-repetitions", "1",
        "--batch-size", "4", "--nb-epoch", "0", "--all-layer-epochs", "1",
        "--no-augmentation", "--best-model", str(best)])
    keras.backend.clear_session()
    return root, best


def test_trained_model_carries_its_recipe(trained):
    root, best = trained
    recipe = dm_image.InputRecipe.from_model_file(best)
    assert recipe == dm_image.InputRecipe(img_size=(64, 48), channels=3,
                                          rescale_factor=0.003891, featurewise_center=True,
                                          featurewise_mean=50.0)
    options = json.loads((root / "best.h5.options.json").read_text())
    assert dm_image.InputRecipe.from_dict(options["input_recipe"]) == recipe


def test_predict_with_only_model_and_img_dir(trained, tmp_path, caplog):
    root, best = trained
    short, full, wrong = tmp_path / "short", tmp_path / "full", tmp_path / "wrong"
    common = ["--model", str(best), "--img-dir", str(root / "test"), "--bootstrap", "0"]
    with caplog.at_level("INFO"):
        icp.main(common + ["--out-dir", str(short)])
    assert "taken from the input recipe" in caplog.text and "rescale_factor=0.003891" in \
        caplog.text
    icp.main(common + ["--out-dir", str(full), "--img-size", "64", "48", "--rescale-factor",
                       "0.003891", "--featurewise-mean", "50"])
    a = pd_read(short / "image_predictions.csv")
    b = pd_read(full / "image_predictions.csv")
    np.testing.assert_array_equal(a["malignant_pred"], b["malignant_pred"])
    assert a["malignant_pred"].nunique() > 1
    caplog.clear()
    with caplog.at_level("WARNING"):
        icp.main(common + ["--out-dir", str(wrong), "--rescale-factor", "1.0"])
    warned = [r.getMessage() for r in caplog.records if "contradicts" in r.getMessage()]
    assert len(warned) == 1 and "--rescale-factor 1.0" in warned[0] and "0.003891" in warned[0]


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_resume_from_takes_the_recipe(trained):
    import image_clf_train
    import script_utils

    _, best = trained
    opts = script_utils.resolve_options(image_clf_train.get_args_parser(), ("a", "b", "c"),
                                        {"resume_from": str(best), "featurewise_mean": 44.33})
    got, recipe = script_utils.apply_model_recipe(opts, str(best),
                                                  {"resume_from", "featurewise_mean"})
    assert recipe == dm_image.InputRecipe(img_size=(64, 48), channels=3,
                                          rescale_factor=0.003891, featurewise_center=True,
                                          featurewise_mean=50.0)   # the file's, not the flags'
    assert got["img_size"] == [64, 48] and got["rescale_factor"] == 0.003891
    assert got["featurewise_mean"] == 44.33          # given: kept (and warned)


def test_2017_file_keeps_the_defaults(keras208_dir):
    import script_utils

    files = sorted(keras208_dir.glob("*.h5"))
    assert files
    values = {"img_size": [1152, 896], "rescale_factor": None, "featurewise_mean": 52.16}
    for f in files:
        assert dm_image.InputRecipe.from_model_file(f) is None
        assert script_utils.apply_model_recipe(values, str(f), set()) == (values, None)


def _recipe_file(path, **fields):
    """An HDF5 file holding only an input recipe (all that the recipe code reads)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs[dm_image.RECIPE_ATTR] = dm_image.InputRecipe(**fields).to_json()
    return str(path)


def test_python_heatmap_call_takes_what_it_left_at_the_parsers_default(tmp_path):
    model = _recipe_file(tmp_path / "m.h5", img_size=(64, 64), channels=3,
                         rescale_factor=RESCALE, featurewise_center=True, featurewise_mean=44.33)
    cls = hs.options_class()
    got = hs._with_recipe(cls(img_folder="i", dl_state=model), None)
    assert (got.patch_size, got.rescale_factor, got.featurewise_center,
            got.featurewise_mean) == (64, RESCALE, True, 44.33)
    got = hs._with_recipe(cls(img_folder="i", dl_state=model, patch_size=128,
                              featurewise_mean=71.8), None)
    assert got.patch_size == 128 and got.featurewise_mean == 44.33   # 71.8 is the default


def test_python_predict_call_with_the_default_size_as_tuple_or_list(tmp_path):
    model = _recipe_file(tmp_path / "m.h5", img_size=(64, 48), channels=3,
                         rescale_factor=RESCALE, featurewise_mean=44.33)
    for size in ((1152, 896), [1152, 896]):   # the default, however written: not given
        prep = icp._resolve_recipe([model], icp.options_class()(img_size=size), None)
        assert prep["img_size"] == [64, 48] and prep["featurewise_mean"] == 44.33
    prep = icp._resolve_recipe([model], icp.options_class()(img_size=(96, 64)), None)
    assert list(prep["img_size"]) == [96, 64] and prep["rescale_factor"] == RESCALE
