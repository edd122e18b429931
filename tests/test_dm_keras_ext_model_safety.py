"""Loading a model file never runs code stored in it unless the caller trusts the file."""
import h5py
import numpy as np
import pytest

import dm_keras_ext as E


def _lambda_model_file(keras, folder, marker):
    """An .h5 whose Lambda layer touches ``marker`` whenever it is called (i.e. when built)."""
    source = f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]"
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="dense_a")(inp)
    inner = keras.Model(inp, keras.layers.Lambda(eval(source), name="sneaky")(hidden),
                        name="inner")
    outer_in = keras.Input((4,))
    out = keras.layers.Dense(2, activation="softmax", name="top")(inner(outer_in))
    path = folder / "stranger.h5"
    keras.Model(outer_in, out).save(path, save_format="h5")
    marker.unlink(missing_ok=True)   # building and saving called the lambda
    return path


def test_lambda_layer_is_refused_without_running_it(keras_session, tmp_path):
    marker = tmp_path / "code_ran"
    path = _lambda_model_file(keras_session, tmp_path, marker)
    with pytest.raises(E.UnsafeModelError) as info:
        E.robust_load_model(path)
    message = str(info.value)
    assert str(path) in message and "'sneaky'" in message and "Lambda" in message
    assert not marker.exists()
    # The same file loads, and its code runs, only when the caller says it trusts the file.
    model = E.robust_load_model(path, safe_mode=False)
    assert marker.exists()
    assert model.predict(np.ones((1, 4), np.float32), verbose=0).shape == (1, 2)


def test_code_check_reads_only_the_config(tmp_path):
    """A config-only file with a Lambda deep in a nested model is found by the JSON walk."""
    config = {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in"}},
        {"class_name": "Functional", "config": {"name": "nested", "layers": [
            {"class_name": "TimeDistributed", "config": {"name": "td", "layer": {
                "class_name": "Lambda", "config": {"name": "deep", "function_type": "lambda",
                                                   "function": ["AAAA", None, None]}}}}]}}]}}
    path = tmp_path / "deep.h5"
    with h5py.File(path, "w") as f:
        import json
        f.attrs["model_config"] = json.dumps(config).encode()
    with pytest.raises(E.UnsafeModelError, match="'deep'"):
        E.check_model_file_safe(path)


def test_not_a_model_file_names_the_file(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)   # HDF5 signature, then nothing valid
    with pytest.raises((OSError, ValueError), match="notes.h5"):
        E.robust_load_model(path)
    text = tmp_path / "readme.h5"
    text.write_text("not a model at all\n")
    with pytest.raises(OSError, match="readme.h5: neither an HDF5"):
        E.robust_load_model(text)


def _layer_list(config):
    """The layer configs of a model config (Keras 2.0.8 writes a Sequential's as a bare list)."""
    inner = config["config"]
    return inner if isinstance(inner, list) else inner["layers"]


@pytest.mark.real_data
def test_keras208_files_pass_the_safety_check(keras208_dir, tmp_path):
    """The 2017 files pass; each with its deepest last layer made a Lambda is refused."""
    import json

    paths = sorted(keras208_dir.glob("*.h5")) + sorted(keras208_dir.glob("train_steps/*.h5"))
    assert [p.relative_to(keras208_dir).as_posix() for p in paths] == [
        "tiny_image_fixed_patch_input.h5", "tiny_image_resnet_top.h5", "tiny_image_vgg_top.h5",
        "tiny_patch_vgg.h5", "train_steps/tiny_patch_vgg_nodrop.h5"]
    for path in paths:
        E.check_model_file_safe(path)
        with h5py.File(path, "r") as f:
            config = json.loads(f.attrs["model_config"])
        layers = _layer_list(config)
        nested = [c for c in layers if c["class_name"] in ("Model", "Functional", "Sequential")]
        target = (_layer_list(nested[0]) if nested else layers)[-1]
        target["class_name"] = "Lambda"
        target["config"].update(function_type="lambda", function=["AAAA", None, None])
        doctored = tmp_path / path.name
        with h5py.File(doctored, "w") as f:
            f.attrs["model_config"] = json.dumps(config).encode()
        with pytest.raises(E.UnsafeModelError, match=repr(target["config"]["name"])):
            E.check_model_file_safe(doctored)


def test_dm_enet_loads_in_safe_mode(keras_session, tmp_path):
    import dm_enet

    marker = tmp_path / "code_ran"
    path = _lambda_model_file(keras_session, tmp_path, marker)
    with pytest.raises(E.UnsafeModelError, match="'sneaky'"):
        dm_enet.DLRepr(path, layer_names=["top"])
    assert not marker.exists()
    rep = dm_enet.DLRepr(path, layer_names=["top"], safe_mode=False)
    assert marker.exists()                          # trusted: built, and its code ran
    assert rep.model.count_params() == (4 * 3 + 3) + (3 * 2 + 2)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(rep.get_feats(x), rep.model.predict(x, verbose=0), rtol=1e-6)
