"""DLRepr features and the MultiViewDLElasticNet classifier (save/load without pickle)."""
import zipfile

import numpy as np
import pytest

import dm_enet


def _tiny_model(keras):
    inp = keras.Input((16, 12, 1), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(x)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    d = keras.layers.Dense(5, activation="relu", name="fc")(g)
    out = keras.layers.Dense(2, activation="softmax", name="out")(d)
    return keras.Model(inp, out)


def test_dlrepr_named_and_indexed_layers(keras_session):
    keras = keras_session
    model = _tiny_model(keras)
    X = np.random.rand(7, 16, 12, 1).astype("float32")
    rep = dm_enet.DLRepr(model, layer_names=["conv2", "fc"])
    feats = rep.get_feats(X, batch_size=3)
    assert feats.shape == (7, 6 + 5) and rep.feature_dims == [6, 5]
    conv2 = keras.Model(model.input, model.get_layer("conv2").output).predict(X, verbose=0)
    fc = keras.Model(model.input, model.get_layer("fc").output).predict(X, verbose=0)
    np.testing.assert_allclose(feats[:, :6], conv2.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats[:, 6:], fc, rtol=1e-5, atol=1e-6)
    by_index = dm_enet.DLRepr(model, layer_indices=[-2]).get_feats(X)
    np.testing.assert_allclose(by_index, fc, rtol=1e-5, atol=1e-6)


def test_dlrepr_generator_and_sequence(keras_session):
    keras = keras_session
    model = _tiny_model(keras)
    X = np.random.rand(10, 16, 12, 1).astype("float32")
    y = np.arange(10) % 2
    rep = dm_enet.DLRepr(model, layer_names=["fc"])
    ref = rep.get_feats(X, batch_size=4)

    class Seq(keras.utils.Sequence):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return X[i * 4:(i + 1) * 4], y[i * 4:(i + 1) * 4]

    feats, labels = rep.get_feats(Seq(), return_labels=True)
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, y)

    class WrappingIter:  # 2017-style iterator: nb_sample, batch_size, endless
        nb_sample, batch_size = 10, 4

        def reset(self):
            self.i = 0

        def __iter__(self):
            return self

        def __next__(self):
            idx = np.arange(self.i, self.i + 4) % 10
            self.i += 4
            return X[idx], y[idx]

    np.testing.assert_allclose(rep.get_feats(WrappingIter()), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps is required"):
        rep.get_feats(iter([X]))


def test_dlrepr_bad_layers(keras_session):
    model = _tiny_model(keras_session)
    with pytest.raises(ValueError, match="valid names: .*conv1"):
        dm_enet.DLRepr(model, layer_names=["nope"])
    with pytest.raises(ValueError, match="out of range"):
        dm_enet.DLRepr(model, layer_indices=[42])
    with pytest.raises(ValueError, match="exactly one"):
        dm_enet.DLRepr(model)


@pytest.mark.parametrize("classifier", ["sgd", "logistic"])
def test_multiview_fit_save_load(keras_session, tmp_path, classifier):
    keras = keras_session
    model = _tiny_model(keras)
    rng = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    X_cc = rng.random((n, 16, 12, 1)).astype("float32") + y[:, None, None, None] * 0.8
    X_mlo = rng.random((n, 16, 12, 1)).astype("float32") + y[:, None, None, None] * 0.8
    enet = dm_enet.MultiViewDLElasticNet(model, layer_names=["conv1", "gap"],
                                         classifier=classifier, alpha=1e-3, l1_ratio=0.5)
    enet.fit(X_cc, X_mlo, y, batch_size=16)
    assert enet.clf.coef_.shape == (1, 2 * (4 + 6))
    prob = enet.predict_proba(X_cc, X_mlo)
    assert prob.shape == (n, 2)
    np.testing.assert_allclose(prob.sum(axis=1), 1, atol=1e-6)
    assert (prob.argmax(axis=1) == y).mean() >= 0.9   # bright = positive, easy to separate
    path = enet.save(tmp_path / "enet.npz")
    with zipfile.ZipFile(path) as zf:   # plain .npy arrays only
        assert sorted(zf.namelist()) == sorted(
            f"{k}.npy" for k in ("coef", "intercept", "classes", "scaler_mean",
                                 "scaler_scale", "config"))
    np.load(path, allow_pickle=False)["config"]   # loads without pickle
    loaded = dm_enet.MultiViewDLElasticNet.load(path, dl_model=model)
    np.testing.assert_allclose(loaded.predict_proba(X_cc, X_mlo), prob, rtol=1e-6, atol=1e-9)
    assert loaded.config["classifier"] == classifier
    feats_only = dm_enet.MultiViewDLElasticNet.load(path)
    feats = enet.get_features(X_cc, X_mlo)
    np.testing.assert_allclose(feats_only.predict_proba_features(feats), prob, atol=1e-9)


def test_multiview_bad_input(keras_session, tmp_path):
    model = _tiny_model(keras_session)
    with pytest.raises(ValueError, match="classifier should be one of"):
        dm_enet.MultiViewDLElasticNet(model, layer_names=["fc"], classifier="svm")
    enet = dm_enet.MultiViewDLElasticNet(model, layer_names=["fc"])
    X = np.zeros((4, 16, 12, 1), "float32")
    with pytest.raises(ValueError, match="same breasts"):
        enet.get_features(X, X[:3])
    with pytest.raises(ValueError, match="not fitted"):
        enet.save(tmp_path / "x.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, coef=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="not a MultiViewDLElasticNet file"):
        dm_enet.MultiViewDLElasticNet.load(bad)
