"""robust_load_model / save_model_atomic: Keras 2.0.8 files (../shared/fixtures/keras208) and
files written by this project in the same layout (NAME.h5, NAME_x/_y/_f.npy, expected.json)."""
import json
import os
import warnings

import h5py
import numpy as np
import pytest

import dm_keras_ext as E
import dm_resnet as R
from conftest import KERAS208_TINY, tiny_patch_net

KERAS208_NAMES = ["tiny_patch_vgg", "tiny_image_resnet_top", "tiny_image_vgg_top",
                  "tiny_image_fixed_patch_input"]


def check_model_files(folder, name):
    """Load ``folder/NAME.h5`` and compare with expected.json and the NAME_*.npy arrays."""
    import tf_keras as keras

    expected = json.loads((folder / "expected.json").read_text())[name]
    model = E.robust_load_model(folder / f"{name}.h5")
    assert model.count_params() == expected["params"]
    assert len(model.layers) == expected["layers"]
    x = np.load(folder / f"{name}_x.npy")
    assert list(x.shape[1:]) == expected["input_shape"]
    y = model.predict(x, verbose=0)
    np.testing.assert_allclose(y, np.load(folder / f"{name}_y.npy"), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.array(expected["output"]), atol=2e-6)
    feats = keras.Model(model.inputs, model.layers[-2].output).predict(x, verbose=0)
    np.testing.assert_allclose(feats, np.load(folder / f"{name}_f.npy"), rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.real_data
@pytest.mark.parametrize("name", KERAS208_NAMES)
def test_keras208_files_reproduce_outputs(keras_session, keras208_dir, name):
    check_model_files(keras208_dir, name)


@pytest.mark.real_data
@pytest.mark.parametrize("case", sorted(KERAS208_TINY))
def test_add_top_layers_rebuilds_the_2017_architecture(keras_session, keras208_dir, case):
    """Our converter, given the 2017 weights in order, reproduces the 2017 outputs."""
    kwargs, shape, _, _ = KERAS208_TINY[case]
    ours, _ = R.add_top_layers(tiny_patch_net(keras_session, shape), (96, 64), "tiny", **kwargs)
    name = f"tiny_image_{case}"
    ours.set_weights(E.robust_load_model(keras208_dir / f"{name}.h5").get_weights())
    np.testing.assert_allclose(ours.predict(np.load(keras208_dir / f"{name}_x.npy"), verbose=0),
                               np.load(keras208_dir / f"{name}_y.npy"), rtol=1e-5, atol=1e-6)


def _write_case(folder, name, model, reference, x, expected):
    """Write NAME_x/_y/_f.npy from ``reference`` (a model that can predict) and record counts."""
    import tf_keras as keras

    np.save(folder / f"{name}_x.npy", x)
    y = reference.predict(x, verbose=0)
    np.save(folder / f"{name}_y.npy", y)
    feats = keras.Model(reference.inputs, reference.layers[-2].output).predict(x, verbose=0)
    np.save(folder / f"{name}_f.npy", feats)
    expected[name] = {"input_shape": list(x.shape[1:]), "layers": len(model.layers),
                      "params": model.count_params(), "output": y.round(6).tolist()}


def _fix_nested_input(whole, size):
    """The 2017 layout: a copy of ``whole`` whose nested patch net has a fixed input size."""
    import tf_keras as keras

    config = whole.get_config()
    nested = next(c for c in config["layers"] if c["class_name"] in ("Functional", "Model"))
    for inner in nested["config"]["layers"]:
        if inner["class_name"] == "InputLayer":
            key = "batch_input_shape" if "batch_input_shape" in inner["config"] else "batch_shape"
            inner["config"][key] = [None, *size, inner["config"][key][-1]]
    fixed = keras.Model.from_config(config)
    fixed.set_weights(whole.get_weights())
    return fixed


@pytest.fixture(scope="module")
def selfmade_dir(tmp_path_factory):
    """Files this project writes, in the keras208 layout, including the fixed-input case."""
    import tf_keras as keras

    keras.backend.clear_session()
    folder = tmp_path_factory.mktemp("selfmade")
    rng = np.random.default_rng(0)
    expected = {}
    patch = tiny_patch_net(keras, (32, 32, 3))
    E.save_model_atomic(patch, folder / "tiny_patch_fixed.h5")
    _write_case(folder, "tiny_patch_fixed", patch, patch,
                rng.normal(size=(2, 32, 32, 3)).astype("float32"), expected)
    whole, _ = R.add_top_layers(patch, (96, 64), "tiny", depths=[16], repetitions=[1],
                                bottleneck_enlarge_factor=2)
    x = rng.normal(size=(2, 96, 64, 3)).astype("float32")
    E.save_model_atomic(whole, folder / "tiny_image_converted.h5")
    _write_case(folder, "tiny_image_converted", whole, whole, x, expected)
    fixed = _fix_nested_input(whole, (32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 ... legacy"
        fixed.save(str(folder / "tiny_image_fixed_patch_input.h5"), save_format="h5")
    _write_case(folder, "tiny_image_fixed_patch_input", fixed, whole, x, expected)
    (folder / "expected.json").write_text(json.dumps(expected))
    keras.backend.clear_session()
    return folder


@pytest.mark.parametrize("name", ["tiny_patch_fixed", "tiny_image_converted",
                                  "tiny_image_fixed_patch_input"])
def test_selfmade_files_reproduce_outputs(keras_session, selfmade_dir, name):
    model = check_model_files(selfmade_dir, name)
    if name != "tiny_patch_fixed":
        assert model.get_layer("patch_net").input_shape == (None, None, None, 3)


def test_plain_tf_keras_reads_our_files_but_not_the_fixed_layout(keras_session, selfmade_dir):
    keras = keras_session
    x = np.load(selfmade_dir / "tiny_image_converted_x.npy")
    plain = keras.models.load_model(str(selfmade_dir / "tiny_image_converted.h5"),
                                    compile=False)
    np.testing.assert_allclose(plain.predict(x, verbose=0),
                               np.load(selfmade_dir / "tiny_image_converted_y.npy"), rtol=1e-5)
    stuck = keras.models.load_model(str(selfmade_dir / "tiny_image_fixed_patch_input.h5"),
                                    compile=False)
    with pytest.raises(ValueError, match="incompatible"):
        stuck.predict(x, verbose=0)


def test_save_model_atomic_writes_readable_hdf5(keras_session, tmp_path):
    keras = keras_session
    model = tiny_patch_net(keras)
    model.compile(optimizer=E.create_optimizer("adam", 1e-3), loss="categorical_crossentropy")
    path = tmp_path / "sub" / "patch.h5"
    assert E.save_model_atomic(model, path) == str(path)
    assert os.listdir(path.parent) == ["patch.h5"]
    with h5py.File(path, "r") as f:
        assert "model_config" in f.attrs and "keras_version" in f.attrs
        assert "model_weights" in f and "training_config" in f.attrs
    E.save_model_atomic(model, path, include_optimizer=False)
    with h5py.File(path, "r") as f:
        assert "training_config" not in f.attrs
    x = np.random.default_rng(0).normal(size=(2, 40, 24, 3)).astype("float32")
    ref = model.predict(x, verbose=0)
    for loaded in (E.robust_load_model(path), keras.models.load_model(str(path), compile=False)):
        np.testing.assert_allclose(loaded.predict(x, verbose=0), ref, rtol=1e-6)


def test_save_model_atomic_crash_keeps_old_file(keras_session, tmp_path, monkeypatch):
    model = tiny_patch_net(keras_session)
    path = tmp_path / "best.h5"
    path.write_bytes(b"previous model")

    def crashing_save(filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        E.save_model_atomic(model, path)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["best.h5"]


def test_robust_load_model_errors(keras_session, tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        E.robust_load_model(missing)
    weights_only = tmp_path / "weights.h5"
    tiny_patch_net(keras_session).save_weights(str(weights_only))
    with pytest.raises(ValueError, match="model_config"):
        E.robust_load_model(weights_only)
