"""Training core of dm_keras_ext: stages, regularisation switching, bias multiplier,
AUROC checkpointing, flips, metrics, early stopping, crash safety. Tiny models, numpy data."""
import numpy as np
import pytest
import tf_keras as keras
from sklearn.metrics import roc_auc_score
from conftest import class_shift_data, tiny_gap_net

import dm_keras_ext as K

pytestmark = pytest.mark.usefixtures("keras_session")


def _image_like_model():
    """Whole-image shape: input -> nested patch net (cut at gap) -> conv top -> GAP -> fc."""
    patch = tiny_gap_net()
    cut = keras.Model(patch.input, patch.get_layer("c2").output, name="patch_cut")
    inp = keras.Input((8, 8, 1), name="img")
    x = cut(inp)
    x = keras.layers.Conv2D(3, 1, name="top_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="top_gap")(x)
    x = keras.layers.Dropout(0.0, name="top_drop")(x)
    out = keras.layers.Dense(2, activation="softmax", name="top_fc")(x)
    return keras.Model(inp, out, name="image")


class _Recorder(keras.callbacks.Callback):
    """Records, at the start of each fit, what trains, the lr, the fc L2 and the dropout rate."""

    def __init__(self, fc="fc", drop="drop"):
        super().__init__()
        self.fc, self.drop, self.stages, self.epochs = fc, drop, [], []

    def on_train_begin(self, logs=None):
        fc = _find(self.model, self.fc)
        reg = fc.kernel_regularizer
        self.stages.append(dict(
            trainable=sorted({w.name.split("/")[0] for w in self.model.trainable_weights}),
            lr=float(keras.backend.get_value(self.model.optimizer.learning_rate)),
            l2=None if reg is None else float(reg.l2),
            drop=_find(self.model, self.drop).rate,
            reg_loss=float(sum(float(v) for v in self.model.losses))))

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def _find(model, name):
    for layer in model.layers:
        if layer.name == name:
            return layer
        if isinstance(layer, keras.Model):
            try:
                return layer.get_layer(name)
            except ValueError:
                pass
    raise KeyError(name)


# ------------------------------------------------------------------ bias multiplier
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_bias_multiplier_zero_keeps_biases_and_moves_kernels(optim):
    model = tiny_gap_net()
    model.get_layer("fc").bias.assign([0.1, -0.2, 0.3])
    before = {w.name: w.numpy().copy() for w in model.weights}
    opt = K.with_bias_multiplier(K.create_optimizer(optim, 0.05), 0.0)
    assert type(opt).__name__ == ("BiasMultiplierSGD" if optim == "sgd" else "BiasMultiplierAdam")
    model.compile(opt, "categorical_crossentropy")
    X, y = class_shift_data()
    model.fit(X, y, batch_size=8, epochs=1, verbose=0)
    for w in model.weights:
        moved = np.abs(w.numpy() - before[w.name]).max()
        if K.is_bias_variable(w):
            assert moved == 0.0, w.name
        else:
            assert moved > 1e-6, w.name


def test_bias_multiplier_scales_the_update_exactly():
    X, y = class_shift_data(8)
    deltas = {}
    for mult in (None, 0.25):
        keras.utils.set_random_seed(3)
        model = tiny_gap_net()
        start = [w.numpy().copy() for w in model.weights]
        model.compile(K.with_bias_multiplier(K.create_optimizer("sgd", 0.1), mult),
                      "categorical_crossentropy")
        model.train_on_batch(X, y)
        deltas[mult] = {w.name: w.numpy() - s for w, s in zip(model.weights, start)}
    for name, d in deltas[0.25].items():
        ref = deltas[None][name]
        factor = 0.25 if name.endswith("bias:0") else 1.0
        np.testing.assert_allclose(d, factor * ref, rtol=1e-4, atol=1e-7)
    assert np.abs(deltas[None]["fc/bias:0"]).max() > 1e-4


def test_bias_multiplier_optimizer_survives_save_and_load(tmp_path):
    model = tiny_gap_net()
    model.compile(K.with_bias_multiplier(K.create_optimizer("adam", 1e-3), 0.1),
                  "categorical_crossentropy")
    model.train_on_batch(*class_shift_data(6))
    path = tmp_path / "m.h5"
    K.save_model_atomic(model, path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer).__name__ == "BiasMultiplierAdam"
    assert loaded.optimizer.bias_multiplier == pytest.approx(0.1)
    with pytest.raises(ValueError, match="bias_multiplier"):
        K.with_bias_multiplier(K.create_optimizer("sgd", 0.1), -1.0)


# ------------------------------------------------------------------ regularisation switching
def test_set_regularization_really_changes_loss_and_dropout():
    model = tiny_gap_net(dropout=0.0)
    X, y = class_shift_data(8)
    assert model.losses == []
    new = K.set_regularization(model, weight_decay=0.1, dropout=0.5)
    assert new is not model
    for a, b in zip(model.get_weights(), new.get_weights()):
        np.testing.assert_array_equal(a, b)
    kernels = [new.get_layer(n).kernel.numpy() for n in ("c1", "c2", "fc")]
    expected = 0.1 * sum(float(np.sum(k.astype(np.float64) ** 2)) for k in kernels)
    assert float(sum(new.losses)) == pytest.approx(expected, rel=1e-5)
    for m in (model, new):
        m.compile("sgd", "categorical_crossentropy")
    diff = new.evaluate(X, y, verbose=0) - model.evaluate(X, y, verbose=0)
    assert diff == pytest.approx(expected, rel=1e-4)
    assert new.get_layer("drop").rate == 0.5
    out_train = new(X, training=True).numpy()
    np.testing.assert_allclose(new(X, training=False).numpy(), model.predict(X, verbose=0),
                               atol=1e-6)
    assert np.abs(out_train - new(X, training=False).numpy()).max() > 1e-4
    # only the named layers; unchanged settings give the same model back
    only_fc = K.set_regularization(model, weight_decay=0.1, layer_names={"fc"})
    assert only_fc.get_layer("c1").kernel_regularizer is None
    assert only_fc.get_layer("fc").kernel_regularizer.l2 == pytest.approx(0.1)
    assert K.set_regularization(only_fc, weight_decay=0.1, layer_names={"fc"}) is only_fc
    with pytest.raises(ValueError, match="dropout"):
        K.set_regularization(model, dropout=1.5)


# ------------------------------------------------------------------ staged training
def test_3stage_training_stage_semantics(tmp_path):
    model = tiny_gap_net(dropout=0.1, weight_decay=0.0)
    X, y = class_shift_data()
    rec = _Recorder()
    best = tmp_path / "best.h5"
    hists = K.do_3stage_training(
        model, model, (X, y), (X, y), None, str(best), None, top_layer_nb=2, nb_epoch=2,
        top_layer_epochs=2, all_layer_epochs=1, optim="sgd", init_lr=0.1,
        top_layer_multiplier=0.1, all_layer_multiplier=0.01, es_patience=10, lr_patience=10,
        auto_batch_balance=False, weight_decay2=0.05, hidden_dropout2=0.4, verbose=0,
        callbacks=[rec])
    assert [h.stage.split(" (")[0] for h in hists] == ["stage 1", "stage 2", "stage 3"]
    assert rec.epochs == [0, 1, 2, 3, 4]
    assert [h.epoch for h in hists] == [[0, 1], [2, 3], [4]]
    s1, s2, s3 = rec.stages
    assert s1["trainable"] == ["fc"]
    assert s2["trainable"] == ["c2", "fc"]
    assert s3["trainable"] == ["c1", "c2", "fc"]
    assert [s["lr"] for s in rec.stages] == pytest.approx([0.1, 0.01, 0.001])
    assert (s1["l2"], s1["drop"], s1["reg_loss"]) == (None, 0.1, 0.0)
    for s in (s2, s3):
        assert s["l2"] == pytest.approx(0.05) and s["drop"] == pytest.approx(0.4)
        assert s["reg_loss"] > 0
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(hists[0].history)
    reloaded = K.robust_load_model(best)
    assert reloaded.output_shape == (None, 3)
    best_acc = max(max(h.history["val_accuracy"]) for h in hists)
    reloaded.compile("sgd", "categorical_crossentropy", metrics=["accuracy"])
    assert reloaded.evaluate(X, y, verbose=0)[1] == pytest.approx(best_acc, abs=1e-6)


def test_3stage_without_pretrained_trains_all_layers_once(tmp_path):
    rec = _Recorder()
    X, y = class_shift_data()
    hists = K.do_3stage_training(
        tiny_gap_net(), None, (X, y), (X, y), None, str(tmp_path / "b.h5"), None,
        nb_epoch=1, top_layer_epochs=3, all_layer_epochs=3, use_pretrained=False, optim="adam",
        init_lr=1e-3, verbose=0, callbacks=[rec])
    assert len(hists) == 1 and rec.epochs == [0]
    assert rec.stages[0]["trainable"] == ["c1", "c2", "fc"]
    assert "lr" not in hists[0].history        # no plateau halving without sgd
    with pytest.raises(ValueError, match="top_layer_nb"):
        K.do_3stage_training(tiny_gap_net(), None, (X, y), (X, y), None, "x.h5", None,
                             nb_epoch=0, top_layer_epochs=1, verbose=0)


def test_2stage_training_semantics_and_auc_checkpoint(tmp_path):
    model = _image_like_model()
    X, y = class_shift_data(nb_class=2)
    rec = _Recorder(fc="top_fc", drop="top_drop")
    best = tmp_path / "img.h5"
    ckpt = K.DMAucModelCheckpoint(str(best), (X, y), batch_size=8)
    hists = K.do_2stage_training(
        model, model, (X, y), (X, y), None, str(best), None, top_layer_nb=None, nb_epoch=1,
        all_layer_epochs=2, optim="adam", init_lr=1e-2, all_layer_multiplier=0.1,
        auc_checkpointer=ckpt, weight_decay=0.01, hidden_dropout=0.2, weight_decay2=0.03,
        hidden_dropout2=0.3, verbose=0, callbacks=[rec])
    assert rec.epochs == [0, 1, 2]
    s1, s2 = rec.stages
    assert s1["trainable"] == ["top_conv", "top_fc"]          # nested patch net frozen
    assert s2["trainable"] == ["c1", "c2", "top_conv", "top_fc"]
    assert [s1["lr"], s2["lr"]] == pytest.approx([1e-2, 1e-3])
    assert (s1["l2"], s1["drop"]) == (pytest.approx(0.01), pytest.approx(0.2))
    assert (s2["l2"], s2["drop"]) == (pytest.approx(0.03), pytest.approx(0.3))
    trained = hists[-1].model
    assert trained.get_layer("patch_cut").get_layer("c1").kernel_regularizer.l2 == \
        pytest.approx(0.03)
    aucs = hists[0].history["val_auc"] + hists[1].history["val_auc"]
    assert len(aucs) == 3
    # the last epoch's validation AUROC is that of the trained model, ranked by scikit-learn
    assert aucs[-1] == pytest.approx(
        roc_auc_score(y[:, 1], trained.predict(X, verbose=0)[:, 1]), abs=1e-6)
    assert "val_auc_1" in hists[1].history
    assert ckpt.best_auc == pytest.approx(max(aucs))
    assert ckpt.best_epoch == int(np.argmax(aucs)) + 1
    reloaded = K.robust_load_model(best)
    assert K.DMAucModelCheckpoint.calc_test_auc((X, y), reloaded) == pytest.approx(max(aucs))


def test_2stage_nb_epoch_zero_skips_stage_1(tmp_path):
    rec = _Recorder(fc="top_fc", drop="top_drop")
    X, y = class_shift_data(nb_class=2)
    hists = K.do_2stage_training(
        _image_like_model(), None, (X, y), (X, y), None, str(tmp_path / "f.h5"), None,
        nb_epoch=0, all_layer_epochs=1, optim="sgd", init_lr=0.1, all_layer_multiplier=0.1,
        auto_batch_balance=False, pos_cls_weight=2.0, verbose=0, callbacks=[rec])
    assert len(hists) == 1 and rec.epochs == [0]
    assert rec.stages[0]["lr"] == pytest.approx(0.01)
    assert (tmp_path / "f.h5").is_file()


def test_early_stopping_ends_a_stage_and_numbering_continues(tmp_path):
    X, y = class_shift_data()
    rec = _Recorder()
    hists = K.do_3stage_training(
        tiny_gap_net(), None, (X, y), (X, y), None, str(tmp_path / "e.h5"), None,
        top_layer_nb=2, nb_epoch=8, top_layer_epochs=1, all_layer_epochs=0, optim="sgd",
        init_lr=1e-30, top_layer_multiplier=1.0, es_patience=1, lr_patience=5, verbose=0,
        callbacks=[rec])
    # weights cannot move at lr 1e-30: val loss never improves, stage 1 stops after 2 epochs
    assert [h.epoch for h in hists] == [[0, 1], [2]]
    assert rec.epochs == [0, 1, 2]


def test_interrupted_epoch_leaves_best_model_intact(tmp_path):
    X, y = class_shift_data()
    best = tmp_path / "best.h5"

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.params and self._epoch == 1:
                raise KeyboardInterrupt

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    with pytest.raises(KeyboardInterrupt):
        K.do_3stage_training(tiny_gap_net(), None, (X, y), (X, y), None, str(best), None,
                             nb_epoch=3, use_pretrained=False, optim="adam", init_lr=1e-3,
                             verbose=0, callbacks=[Crash()])
    assert best.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["best.h5"]     # no temporary left over
    assert K.robust_load_model(best).output_shape == (None, 3)


# ------------------------------------------------------------------ AUROC and flips
class _CountingModel:
    def __init__(self, model):
        self.model, self.calls = model, []

    def predict_on_batch(self, x):
        self.calls.append(x.shape)
        return self.model.predict_on_batch(x)


def _flip_sensitive_model(nb_class):
    inp = keras.Input((4, 6, 1))
    out = keras.layers.Dense(nb_class, activation="softmax")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.weights])
    return model


def test_flip_all_img_order_and_shape():
    X = np.arange(2 * 3 * 4 * 1).reshape(2, 3, 4, 1)
    F = K.flip_all_img(X)
    assert F.shape == (8, 3, 4, 1)
    np.testing.assert_array_equal(F[:2], X)
    np.testing.assert_array_equal(F[2:4], X[:, :, ::-1])
    np.testing.assert_array_equal(F[4:6], X[:, ::-1])
    np.testing.assert_array_equal(F[6:], X[:, ::-1, ::-1])
    with pytest.raises(ValueError, match="shape"):
        K.flip_all_img(np.zeros((3, 4)))


def test_predict_flip_mean_is_the_float64_mean_of_the_four_flips():
    model = _flip_sensitive_model(3)
    X = np.random.default_rng(2).normal(size=(5, 4, 6, 1)).astype("float32")
    views = [X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1]]
    per_view = [model.predict_on_batch(v).astype(np.float64) for v in views]
    counting = _CountingModel(model)
    got = K.predict_flip_mean(counting, X, test_augment=True)
    assert got.dtype == np.float64 and got.shape == (5, 3)
    assert counting.calls == [(20, 4, 6, 1)]                      # one forward pass
    np.testing.assert_allclose(got, np.mean(per_view, axis=0), rtol=0, atol=1e-7)
    assert np.abs(got - per_view[0]).max() > 1e-3                 # the flips matter here
    np.testing.assert_array_equal(K.predict_flip_mean(model, X), per_view[0])


@pytest.mark.parametrize("nb_class", [2, 3])
def test_calc_test_auc_matches_sklearn_with_and_without_flips(nb_class):
    model = _flip_sensitive_model(nb_class)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(10, 4, 6, 1)).astype("float32")
    labels = np.arange(10) % nb_class
    y = keras.utils.to_categorical(labels, nb_class)
    pred = model.predict(X, verbose=0)
    flips = [X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1]]
    pred_aug = np.mean([model.predict(f, verbose=0) for f in flips], axis=0)
    if nb_class == 2:
        ref, ref_aug = roc_auc_score(labels, pred[:, 1]), roc_auc_score(labels, pred_aug[:, 1])
    else:
        ref = roc_auc_score(labels, pred, multi_class="ovr", average="macro")
        ref_aug = roc_auc_score(labels, pred_aug, multi_class="ovr", average="macro")
    assert abs(ref - ref_aug) > 1e-3            # the flips matter for this model
    calc = K.DMAucModelCheckpoint.calc_test_auc
    assert calc((X, y), model) == pytest.approx(ref, abs=1e-9)
    counting = _CountingModel(model)
    auc, y_true, y_pred = calc((X, labels), counting, batch_size=5, return_y_res=True,
                               test_augment=True)
    assert auc == pytest.approx(ref_aug, abs=1e-9)
    np.testing.assert_allclose(y_pred, pred_aug, atol=1e-6)
    assert counting.calls == [(20, 4, 6, 1), (20, 4, 6, 1)]      # 4 flips in one pass
    # the same through an iterator yielding (x, y, w) batches, limited to 6 samples
    seq = [(X[i:i + 4], y[i:i + 4], np.ones(4)) for i in range(0, 10, 4)]
    auc6 = calc(seq_iter(seq), model, test_samples=6)
    ref6 = K.ovr_auroc(labels[:6], pred[:6])[0]
    assert auc6 == pytest.approx(ref6, abs=1e-9)


def seq_iter(batches):
    class It:
        nb_sample = sum(len(b[0]) for b in batches)

        def __init__(self):
            self.i = 0

        def reset(self):
            self.i = 0

        def __next__(self):
            b = batches[self.i % len(batches)]
            self.i += 1
            return b
    return It()


def test_dm_auc_checkpoint_keeps_the_best_model(tmp_path):
    model = _flip_sensitive_model(2)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(12, 4, 6, 1)).astype("float32")
    p1 = model.predict(X, verbose=0)[:, 1]
    labels = (p1 > np.median(p1)).astype(int)        # perfect AUROC for these weights
    path = tmp_path / "best.h5"
    ckpt = K.DMAucModelCheckpoint(str(path), (X, labels))
    ckpt.set_model(model)
    good = model.get_weights()
    logs = {}
    ckpt.on_epoch_end(0, logs)
    assert logs["val_auc"] == pytest.approx(1.0) and ckpt.best_epoch == 1
    model.set_weights([-w for w in good])            # reversed scores: AUROC 0
    logs = {}
    ckpt.on_epoch_end(1, logs)
    assert logs["val_auc"] == pytest.approx(0.0)
    assert ckpt.best_epoch == 1 and ckpt.best_auc == pytest.approx(1.0)
    assert [h[0] for h in ckpt.auc_history] == [1, 2]
    reloaded = K.robust_load_model(path)
    np.testing.assert_allclose(reloaded.predict(X, verbose=0)[:, 1], p1, atol=1e-6)


@pytest.mark.parametrize("kind", ["auc", "accuracy"])
def test_checkpoints_keep_last_save_every_epoch(tmp_path, kind):
    """keep_last: a worse second epoch still replaces the file (the monitor is still logged)."""
    model = _flip_sensitive_model(2)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(12, 4, 6, 1)).astype("float32")
    p1 = model.predict(X, verbose=0)[:, 1]
    labels = (p1 > np.median(p1)).astype(int)
    path = tmp_path / "kept.h5"
    ckpt = (K.DMAucModelCheckpoint(str(path), (X, labels), keep_last=True) if kind == "auc"
            else K.BestModelCheckpoint(str(path), keep_last=True))
    ckpt.set_model(model)
    good = model.get_weights()
    ckpt.on_epoch_end(0, {"val_accuracy": 0.9, "loss": 0.1})
    model.set_weights([-w for w in good])
    logs = {"val_accuracy": 0.1, "loss": 0.2}
    ckpt.on_epoch_end(1, logs)
    assert ckpt.best_epoch == 2
    if kind == "auc":
        assert logs["val_auc"] == pytest.approx(0.0)
    reloaded = K.robust_load_model(path)
    np.testing.assert_allclose(reloaded.predict(X, verbose=0), model.predict(X, verbose=0),
                               atol=1e-6)


def test_dm_metrics_sensitivity_specificity():
    y_true = np.eye(2)[[1, 1, 1, 0, 0]].astype("float32")
    y_pred = np.array([[.2, .8], [.6, .4], [.1, .9], [.7, .3], [.3, .7]], "float32")
    assert float(K.DMMetrics.sensitivity(y_true, y_pred)) == pytest.approx(2 / 3, rel=1e-5)
    assert float(K.DMMetrics.specificity(y_true, y_pred)) == pytest.approx(1 / 2, rel=1e-5)


def test_class_weight_dict():
    assert K.class_weight_dict(3, pos_cls_weight=2.0, neg_cls_weight=0.5) == \
        {0: 0.5, 1: 2.0, 2: 2.0}
    with pytest.raises(ValueError):
        K.class_weight_dict(1)
