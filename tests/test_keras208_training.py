"""Training steps as Keras 2.0.8 took them: the optimizers' update rules (against NumPy and
against the steps Keras 2.0.8 itself recorded), frozen BatchNormalization with batch statistics
(frozen_bn_mode), and both under the bias multiplier, tf.distribute, mixed precision and XLA."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import dm_keras_ext as E

pytestmark = pytest.mark.usefixtures("keras_session")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-8


# ------------------------------------------------------------------ NumPy update rules
def _np_step(name, state, p, g, lr, t):
    """One Keras 2.0.8 step of optimizer ``name`` on array ``p`` (float64), written out."""
    if name == "sgd":
        v = 0.9 * state.get("m", 0.0) - lr * g
        state["m"] = v
        return p + 0.9 * v - lr * g
    if name == "rmsprop":
        a = 0.9 * state.get("a", 0.0) + 0.1 * g ** 2
        state["a"] = a
        return p - lr * g / (np.sqrt(a) + EPS)
    if name == "adagrad":
        a = state.get("a", 0.0) + g ** 2
        state["a"] = a
        return p - lr * g / (np.sqrt(a) + EPS)
    if name == "adadelta":
        a = 0.95 * state.get("a", 0.0) + 0.05 * g ** 2
        d = state.get("d", 0.0)
        u = g * np.sqrt(d + EPS) / np.sqrt(a + EPS)
        state["a"], state["d"] = a, 0.95 * d + 0.05 * u ** 2
        return p - lr * u
    if name == "adam":
        lr_t = lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        m = 0.9 * state.get("m", 0.0) + 0.1 * g
        v = 0.999 * state.get("v", 0.0) + 0.001 * g ** 2
        state["m"], state["v"] = m, v
        return p - lr_t * m / (np.sqrt(v) + EPS)
    if name == "adamax":
        m = 0.9 * state.get("m", 0.0) + 0.1 * g
        u = np.maximum(0.999 * state.get("u", 0.0), np.abs(g))
        state["m"], state["u"] = m, u
        return p - lr / (1 - 0.9 ** t) * m / (u + EPS)
    if name == "nadam":
        # The shared schedule product lives in state["S"] (the caller keeps one per step).
        c_t = 0.9 * (1 - 0.5 * 0.96 ** (t * 0.004))
        c_t1 = 0.9 * (1 - 0.5 * 0.96 ** ((t + 1) * 0.004))
        s_new, s_next = state["S"] * c_t, state["S"] * c_t * c_t1
        g_p = g / (1 - s_new)
        m = 0.9 * state.get("m", 0.0) + 0.1 * g
        v = 0.999 * state.get("v", 0.0) + 0.001 * g ** 2
        state["m"], state["v"] = m, v
        m_p, v_p = m / (1 - s_next), v / (1 - 0.999 ** t)
        return p - lr * ((1 - c_t) * g_p + c_t1 * m_p) / (np.sqrt(v_p) + EPS)
    raise KeyError(name)


def _lr(name):
    return 1.0 if name == "adadelta" else 0.01


def _dense_problem():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 4))
    y = rng.normal(size=(6, 3))
    w0, b0 = rng.normal(size=(4, 3)) * 0.5, rng.normal(size=3) * 0.1
    return x, y, w0, b0


@pytest.mark.parametrize("name", sorted(E.OPTIMIZERS))
@pytest.mark.parametrize("bias_multiplier", [None, 0.25])
def test_update_rules_match_numpy(name, bias_multiplier):
    """6 steps on a Dense layer (MSE, analytic NumPy gradients); the lr halves after step 3 as
    ReduceLROnPlateau sets it; with a bias multiplier the bias steps with lr * multiplier."""
    x, y, w0, b0 = _dense_problem()
    lr = _lr(name)
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    layer.set_weights([w0.astype("float32"), b0.astype("float32")])
    opt = E.with_bias_multiplier(E.create_optimizer(name, lr), bias_multiplier)
    xt, yt = tf.constant(x, tf.float32), tf.constant(y, tf.float32)
    w, b = w0.copy(), b0.copy()
    st_w, st_b = {}, {}
    schedule = 1.0
    mult = 1.0 if bias_multiplier is None else bias_multiplier
    for t in range(1, 7):
        if t == 4:
            keras.backend.set_value(opt.lr, lr / 2)
        lr_t = lr if t < 4 else lr / 2
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(xt) - yt))
        grads = tape.gradient(loss, layer.trainable_variables)
        opt.apply_gradients(zip(grads, layer.trainable_variables))
        r = x @ w + b - y
        gw, gb = 2.0 * x.T @ r / r.size, 2.0 * r.sum(0) / r.size
        st_w["S"] = st_b["S"] = schedule
        w = _np_step(name, st_w, w, gw, lr_t, t)
        b = _np_step(name, st_b, b, gb, lr_t * mult, t)
        schedule *= 0.9 * (1 - 0.5 * 0.96 ** (t * 0.004))
        ours_w, ours_b = (v.numpy().astype(np.float64) for v in layer.trainable_variables)
        for ours, ref, start in ((ours_w, w, w0), (ours_b, b, b0)):
            # float32 weights of size ~0.5 round at ~3e-8: 1e-4 of adadelta's tiny first step
            rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref - start)
            assert rel < 1e-4, (name, t, rel)
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert int(opt.iterations.numpy()) == 6


def test_nadam_schedule_product_after_many_steps():
    """The schedule product from the step count equals Keras 2.0.8's running product, also long
    after it has underflowed."""
    x, y, w0, b0 = _dense_problem()
    for start in (40, 300):
        layer = keras.layers.Dense(3)
        layer.build((None, 4))
        layer.set_weights([w0.astype("float32"), b0.astype("float32")])
        opt = E.create_optimizer("nadam", 0.01)
        opt.build(layer.trainable_variables)
        opt.iterations.assign(start - 1)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(tf.constant(x, tf.float32)) - y))
        opt.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables),
                                layer.trainable_variables))
        schedule = 1.0
        for k in range(1, start):
            schedule *= 0.9 * (1 - 0.5 * 0.96 ** (k * 0.004))
        r = x @ w0 + b0 - y
        ref = _np_step("nadam", {"S": schedule}, w0, 2.0 * x.T @ r / r.size, 0.01, start)
        np.testing.assert_allclose(layer.kernel.numpy(), ref, rtol=0, atol=2e-6)


def test_sparse_gradients_are_densified():
    emb = keras.layers.Embedding(5, 2)
    emb.build((None,))
    for name in ("rmsprop", "adagrad", "nadam"):
        opt = E.create_optimizer(name, 0.1)
        before = emb.embeddings.numpy().copy()
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb(tf.constant([1, 3])))
        grads = tape.gradient(loss, emb.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply_gradients(zip(grads, emb.trainable_variables))
        moved = np.abs(emb.embeddings.numpy() - before).max(axis=1)
        assert (moved[[1, 3]] > 0.05).all() and (moved[[0, 2, 4]] == 0).all(), name


# ------------------------------------------------------------------ config, saving
@pytest.mark.parametrize("name", sorted(E.OPTIMIZERS))
def test_optimizer_config_round_trip(name):
    for mult in (None, 0.5):
        opt = E.with_bias_multiplier(E.create_optimizer(name, 0.003), mult)
        cfg = opt.get_config()
        again = type(opt).from_config(dict(cfg))
        assert again.get_config() == cfg
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert type(restored) is type(opt) and restored.get_config() == cfg


def _conv_bn_model(nb_class=3):
    inp = keras.Input((6, 6, 2), name="inp")
    x = keras.layers.Conv2D(4, 3, name="c")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(nb_class, activation="softmax", name="fc")(x),
                       name="conv_bn")


def _init_conv_bn(model, seed=3):
    rng = np.random.default_rng(seed)
    bn = model.get_layer("bn")
    model.set_weights([rng.normal(size=w.shape).astype("float32") * 0.5
                       for w in model.get_weights()])
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=bn.moving_variance.shape))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=bn.gamma.shape))


def _conv_bn_data(n=8, nb_class=3, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 6, 6, 2)) * 2 + 0.5).astype("float32")
    return x, keras.utils.to_categorical(np.arange(n) % nb_class, nb_class)


@pytest.mark.parametrize("name", ["rmsprop", "nadam", "adam"])
def test_model_with_optimizer_state_saves_and_reloads(tmp_path, name):
    model = _conv_bn_model()
    _init_conv_bn(model)
    model.compile(E.with_bias_multiplier(E.create_optimizer(name, 1e-3), 0.5),
                  "categorical_crossentropy")
    x, y = _conv_bn_data()
    for _ in range(2):
        model.train_on_batch(x, y)
    path = E.save_model_atomic(model, tmp_path / "m.h5", include_optimizer=True)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    ours, theirs = model.optimizer.variables(), loaded.optimizer.variables()
    nb_slots = 1 if name == "rmsprop" else 2
    assert len(ours) == len(theirs) == 1 + nb_slots * len(model.trainable_weights)
    assert [v.name.split("/")[-2:] for v in ours] == [v.name.split("/")[-2:] for v in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    loaded.train_on_batch(x, y)            # continues training from the restored state
    assert int(loaded.optimizer.iterations.numpy()) == 3


# ------------------------------------------------------------------ Keras 2.0.8's own steps
_CASES_DIR = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "keras208", "train_steps")
_CASES_JSON = os.path.join(_CASES_DIR, "cases.json")
_CASES = {}
if os.path.isfile(_CASES_JSON):
    with open(_CASES_JSON) as _f:
        _CASES = json.load(_f)["cases"]
# Conv biases that feed a BatchNormalization layer: their gradient is zero in exact arithmetic
# (BN subtracts the batch mean), so adaptive optimizers move them by about +-lr at the sign of
# float round-off; they are left out of the comparison (Keras 2.0.8 itself is not repeatable
# there).
_PRE_BN_BIASES = {"block1_conv1:1": "batch_normalization_1",
                  "block2_conv1:1": "batch_normalization_2"}


def _weights_by_key(model):
    return {f"{layer.name}:{i}": w for layer in model.layers
            for i, w in enumerate(layer.get_weights())}


@pytest.mark.real_data
@pytest.mark.parametrize("case", sorted(_CASES) or ["sgd_all"])
def test_three_steps_match_keras208(keras208_dir, case):
    """3 train_on_batch steps from Keras 2.0.8's initial weights land where Keras 2.0.8 landed:
    ||ours - k208|| / ||k208 - init|| below 6x Keras 2.0.8's own run-to-run spread (1e-5 where
    it repeats exactly), BatchNormalization moving statistics included."""
    folder = keras208_dir / "train_steps"
    spec = json.loads((folder / "cases.json").read_text())["cases"][case]
    model = E.robust_load_model(folder / "tiny_patch_vgg_nodrop.h5")
    for key, bn in _PRE_BN_BIASES.items():
        conv = model.get_layer(key.split(":")[0])
        assert model.get_layer(bn).input is conv.output
    init = dict(np.load(folder / "init.npz"))
    ref = dict(np.load(folder / f"{case}.npz"))
    start = _weights_by_key(model)
    assert set(start) == set(init) == set(ref)
    for key in init:
        np.testing.assert_array_equal(start[key], init[key])
    if spec["frozen_but_last"]:
        for layer in model.layers[:-1]:
            layer.trainable = False
    E.set_frozen_bn_mode(model, "batch")
    model.compile(E.create_optimizer(spec["optimizer"], spec["learning_rate"]),
                  "categorical_crossentropy")
    x, y = np.load(folder / "x.npy"), np.load(folder / "y.npy")
    losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
    np.testing.assert_allclose(losses, spec["losses"], rtol=0, atol=2e-5)
    ours = _weights_by_key(model)
    keys = [k for k in ref if k not in _PRE_BN_BIASES]
    diff = np.sqrt(sum(np.sum((ours[k].astype(np.float64) - ref[k]) ** 2) for k in keys))
    update = np.sqrt(sum(np.sum((ref[k].astype(np.float64) - init[k]) ** 2) for k in keys))
    assert diff / update < max(6 * spec["run_to_run"], 1e-5), diff / update
    if spec["frozen_but_last"]:
        for key in ref:
            if not key.startswith("dense_1:") and key.split(":")[1] in "01":
                np.testing.assert_array_equal(ours[key], init[key])   # kernels, gamma, beta
        assert [w.name.split("/")[0] for w in model.trainable_weights] == ["dense_1"] * 2


# ------------------------------------------------------------------ frozen BatchNormalization
def _bn_input(model, x):
    return keras.Model(model.input, model.get_layer("c").output).predict(x, verbose=0)


@pytest.mark.parametrize("jit", [False, True])
def test_frozen_bn_batch_mode_trains_as_keras208(jit):
    model = _conv_bn_model()
    _init_conv_bn(model)
    bn = model.get_layer("bn")
    x, y = _conv_bn_data()
    h = _bn_input(model, x).astype(np.float64)
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))       # biased variance
    gamma, beta, mm0, mv0 = (w.astype(np.float64) for w in bn.get_weights())
    pred0 = model.predict(x, verbose=0)
    for name in ("c", "bn"):
        model.get_layer(name).trainable = False
    assert E.set_frozen_bn_mode(model, "batch") == 1
    assert [w.name.split("/")[0] for w in model.trainable_weights] == ["fc", "fc"]
    model.compile(E.create_optimizer("adam", 1e-2), "categorical_crossentropy",
                  jit_compile=jit)
    model.train_on_batch(x, y)
    assert len(model.optimizer.variables()) == 1 + 2 * 2     # no slots for gamma / beta
    np.testing.assert_allclose(bn.moving_mean.numpy(), mm0 * 0.99 + mean * 0.01,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), mv0 * 0.99 + var * 0.01,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bn.gamma.numpy(), gamma.astype("float32"))
    np.testing.assert_array_equal(bn.beta.numpy(), beta.astype("float32"))
    # a training-mode forward normalises with the batch statistics ...
    to_bn = keras.Model(model.input, bn.output)
    expected = gamma * (h - mean) / np.sqrt(var + bn.epsilon) + beta
    np.testing.assert_allclose(to_bn(x, training=True).numpy(), expected, rtol=1e-4, atol=1e-4)
    # ... inference with the moving ones, as in "moving" mode
    mm1, mv1 = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    np.testing.assert_allclose(to_bn(x, training=False).numpy(),
                               gamma * (h - mm1) / np.sqrt(mv1 + bn.epsilon) + beta,
                               rtol=1e-4, atol=1e-4)
    pred_batch = model.predict(x, verbose=0)
    E.set_frozen_bn_mode(model, "moving")
    np.testing.assert_array_equal(model.predict(x, verbose=0), pred_batch)
    assert not np.allclose(pred0, pred_batch)                        # fc and moving stats moved


def test_frozen_bn_moving_mode_keeps_moving_statistics():
    model = _conv_bn_model()
    _init_conv_bn(model)
    bn = model.get_layer("bn")
    x, y = _conv_bn_data()
    before = [w.copy() for w in bn.get_weights()]
    bn.trainable = False
    E.set_frozen_bn_mode(model, "moving")
    model.compile(E.create_optimizer("sgd", 0.1), "categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for a, b in zip(bn.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    gamma, beta, mm, mv = before
    h = _bn_input(model, x)
    np.testing.assert_allclose(keras.Model(model.input, bn.output)(x, training=True).numpy(),
                               gamma * (h - mm) / np.sqrt(mv + bn.epsilon) + beta,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch.*moving"):
        E.set_frozen_bn_mode(model, "frozen")


def test_frozen_bn_gradient_flows_through_batch_statistics():
    """Mode "batch": the gradient reaching the conv below a frozen BN layer is that of the
    batch-statistics normalisation (written here with tf.nn.moments), not of the moving one."""
    model = _conv_bn_model()
    _init_conv_bn(model)
    bn, conv = model.get_layer("bn"), model.get_layer("c")
    bn.trainable = False
    x, _ = _conv_bn_data()
    weights = tf.constant(np.random.default_rng(1).normal(size=(8, 4, 4, 4)), tf.float32)
    to_bn = keras.Model(model.input, bn.output)
    grads = {}
    for mode in ("batch", "moving"):
        E.set_frozen_bn_mode(model, mode)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(to_bn(x, training=True) * weights)
        grads[mode] = tape.gradient(loss, conv.kernel).numpy()
    with tf.GradientTape() as tape:
        h = tf.nn.conv2d(x, conv.kernel, 1, "VALID") + conv.bias
        mean, var = tf.nn.moments(h, axes=[0, 1, 2])
        out = bn.gamma * (h - mean) / tf.sqrt(var + bn.epsilon) + bn.beta
        loss = tf.reduce_sum(out * weights)
    expected = tape.gradient(loss, conv.kernel).numpy()
    np.testing.assert_allclose(grads["batch"], expected, rtol=1e-3, atol=1e-4)
    assert np.abs(grads["moving"] - expected).max() > 0.1 * np.abs(expected).max()


def test_frozen_bn_mode_leaves_saved_files_unchanged(tmp_path):
    x, y = _conv_bn_data()
    configs = {}
    for mode in ("batch", None):
        model = _conv_bn_model()
        _init_conv_bn(model)
        model.get_layer("bn").trainable = False
        if mode:
            E.set_frozen_bn_mode(model, mode)
        model.compile(E.create_optimizer("sgd", 0.01), "categorical_crossentropy")
        model.train_on_batch(x, y)
        path = E.save_model_atomic(model, tmp_path / f"{mode}.h5")
        configs[mode] = model.get_config()
        for loaded in (keras.models.load_model(path), E.robust_load_model(path)):
            assert loaded.get_layer("bn").trainable is False
            assert "_get_training_value" not in vars(loaded.get_layer("bn"))
            np.testing.assert_allclose(loaded.predict(x, verbose=0),
                                       model.predict(x, verbose=0), rtol=1e-6, atol=1e-6)
    assert configs["batch"] == configs[None]


@pytest.mark.real_data
def test_frozen_nested_patch_net_bn_updates_in_batch_mode(keras208_dir):
    """Whole-image model of Keras 2.0.8 with its patch network frozen (stage 1 of whole-image
    training): one step updates the nested BN moving statistics from the batch statistics of
    that layer's input; gamma/beta and the "moving" mode leave them alone."""
    path = keras208_dir / "tiny_image_resnet_top.h5"
    x = np.load(keras208_dir / "tiny_image_resnet_top_x.npy")
    y = np.array([[1.0, 0.0], [0.0, 1.0]], dtype="float32")[: len(x)]
    for mode in ("batch", "moving"):
        keras.backend.clear_session()
        model = E.robust_load_model(path)
        nested = next(layer for layer in model.layers if isinstance(layer, keras.Model))
        bn = next(layer for layer in nested.layers
                  if isinstance(layer, keras.layers.BatchNormalization))
        h = keras.Model(nested.input, bn.input).predict(x, verbose=0).astype(np.float64)
        before = [w.astype(np.float64) for w in bn.get_weights()]
        nested.trainable = False
        E.set_frozen_bn_mode(model, mode)
        model.compile(E.create_optimizer("sgd", 0.01), "categorical_crossentropy")
        model.train_on_batch(x, y)
        gamma, beta, mm, mv = bn.get_weights()
        np.testing.assert_array_equal(gamma, before[0].astype("float32"))
        np.testing.assert_array_equal(beta, before[1].astype("float32"))
        if mode == "batch":
            mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
            np.testing.assert_allclose(mm, before[2] * 0.99 + mean * 0.01, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(mv, before[3] * 0.99 + var * 0.01, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(mm, before[2].astype("float32"))
            np.testing.assert_array_equal(mv, before[3].astype("float32"))
        nested_ids = {id(w) for w in nested.weights}
        assert model.trainable_weights
        assert not any(id(w) in nested_ids for w in model.trainable_weights)


# ------------------------------------------------------------------ staged training
class _BnWatch(keras.callbacks.Callback):
    """Records the moving mean of every BN layer at the start and end of each fit."""

    def __init__(self):
        super().__init__()
        self.begin, self.end = [], []

    def _means(self):
        return {layer.name: layer.moving_mean.numpy().copy()
                for layer in E._batch_norm_layers(self.model)}

    def on_train_begin(self, logs=None):
        self.begin.append(self._means())

    def on_train_end(self, logs=None):
        self.end.append(self._means())


def _moved(watch, stage, name):
    return float(np.abs(watch.end[stage][name] - watch.begin[stage][name]).max())


def _patch_bn_model():
    inp = keras.Input((6, 6, 2), name="inp")
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.Conv2D(4, 1, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.0, name="drop")(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(x),
                       name="patch")


@pytest.mark.parametrize("mode", ["batch", "moving"])
def test_3stage_training_passes_frozen_bn_mode(tmp_path, mode):
    """Stage 1 (only fc) and stage 2 (c2 on, after the model was rebuilt for the new L2):
    the frozen bn1 moves in "batch" mode only; in stage 3 it trains and moves in both."""
    x, y = _conv_bn_data(n=12)
    watch = _BnWatch()
    E.do_3stage_training(_patch_bn_model(), None, (x, y), (x, y), None, str(tmp_path / "b.h5"),
                         None, top_layer_nb=4, nb_epoch=1, top_layer_epochs=1,
                         all_layer_epochs=1, optim="adam", init_lr=1e-2, verbose=0,
                         callbacks=[watch], frozen_bn_mode=mode)
    for stage in (0, 1):
        assert (_moved(watch, stage, "bn1") > 1e-4) == (mode == "batch"), stage
    assert _moved(watch, 2, "bn1") > 1e-4
    with pytest.raises(ValueError, match="frozen_bn_mode"):
        E.do_3stage_training(_patch_bn_model(), None, (x, y), (x, y), None, "x.h5", None,
                             nb_epoch=1, verbose=0, frozen_bn_mode="inference")


@pytest.mark.parametrize("mode", ["batch", "moving"])
def test_2stage_training_passes_frozen_bn_mode(tmp_path, mode):
    x, y = _conv_bn_data(n=12, nb_class=2)
    patch = _patch_bn_model()
    cut = keras.Model(patch.input, patch.get_layer("act").output, name="patch_cut")
    inp = keras.Input((6, 6, 2), name="img")
    z = keras.layers.Conv2D(3, 1, name="top_conv")(cut(inp))
    z = keras.layers.GlobalAveragePooling2D(name="top_gap")(z)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="top_fc")(z))
    watch = _BnWatch()
    hists = E.do_2stage_training(model, None, (x, y), (x, y), None, str(tmp_path / "i.h5"), None,
                                 nb_epoch=1, all_layer_epochs=0, optim="sgd", init_lr=1e-2,
                                 weight_decay=0.001, verbose=0, callbacks=[watch],
                                 frozen_bn_mode=mode)
    assert hists[0].model.get_layer("patch_cut").trainable is False
    assert (_moved(watch, 0, "bn1") > 1e-4) == (mode == "batch")


# ------------------------------------------------------------------ precision, distribution
# mixed_float16 for every optimizer; an XLA-compiled train step for the optimizers written
# here (tf-keras's own ones are XLA-tested upstream, and adam under XLA in the frozen-BN test).
@pytest.mark.parametrize("name,variant", [(n, "mixed_float16") for n in sorted(E.OPTIMIZERS)]
                         + [(n, "jit") for n in ("adagrad", "nadam", "rmsprop")])
def test_mixed_float16_and_jit_take_a_finite_step(name, variant):
    """mixed_float16 (LossScaleOptimizer around ours, float32 variables) or float32 with
    ``jit_compile=True``; frozen BN in "batch" mode, bias multiplier on."""
    x, y = _conv_bn_data()
    keras.mixed_precision.set_global_policy("mixed_float16" if variant != "jit" else "float32")
    try:
        model = _conv_bn_model()
        _init_conv_bn(model)
        model.get_layer("bn").trainable = False
        E.set_frozen_bn_mode(model, "batch")
        start = [w.copy() for w in model.get_weights()]
        model.compile(E.with_bias_multiplier(E.create_optimizer(name, _lr(name) / 10), 0.5),
                      "categorical_crossentropy", jit_compile=variant == "jit")
        if variant != "jit":
            assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
        loss = model.train_on_batch(x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(loss)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    moved = [float(np.abs(a - b).max()) for a, b in zip(model.get_weights(), start)]
    assert max(moved) > 1e-4, (name, variant)


@pytest.mark.slow
def test_optimizers_and_frozen_bn_under_mirrored_strategy(tmp_path):
    """Two logical CPU devices, bias multiplier on: every optimizer takes a finite step with a
    frozen BN layer in "batch" mode, which updates its moving statistics (from per-replica
    batch statistics, as BN does under tf.distribute); the optimizers written here take the
    same steps as on one device with the same global batch (model without BN)."""
    code = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_keras as keras
    import dm_keras_ext as E

    def build(bn):
        inp = keras.Input((5,))
        x = keras.layers.Dense(4, name="h")(inp)
        if bn:
            x = keras.layers.BatchNormalization(name="bn")(x)
        return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(x))

    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 5)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 3, 3)
    w_bn = [rng.normal(size=s).astype("float32") * 0.5
            for s in [(5, 4), (4,), (4,), (4,), (4,), (4,), (4, 3), (3,)]]
    w_bn[5] = np.abs(w_bn[5]) + 0.5
    w_plain = w_bn[:2] + w_bn[6:]
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for name in sorted(E.OPTIMIZERS):
        res = {}
        runs = [("bn", mirrored, True)]
        if name in ("adagrad", "nadam", "rmsprop"):
            runs += [("one", tf.distribute.get_strategy(), False), ("two", mirrored, False)]
        for label, strategy, bn in runs:
            with strategy.scope():
                model = build(bn)
                model.set_weights(w_bn if bn else w_plain)
                if bn:
                    for layer in ("h", "bn"):
                        model.get_layer(layer).trainable = False
                E.set_frozen_bn_mode(model, "batch")
                model.compile(E.with_bias_multiplier(
                    E.create_optimizer(name, 1.0 if name == "adadelta" else 0.01), 0.5),
                    "categorical_crossentropy")
            hist = model.fit(X, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
            res[label] = dict(loss=hist.history["loss"], w=model.get_weights(),
                              mm=model.get_layer("bn").moving_mean.numpy() if bn else None)
        out[name] = dict(
            replicas=mirrored.num_replicas_in_sync, loss=res["bn"]["loss"],
            fc_moved=max(float(np.abs(a - b).max()) for a, b in zip(res["bn"]["w"][6:], w_bn[6:])),
            mm_moved=float(np.abs(res["bn"]["mm"] - w_bn[3]).max()))
        if "one" in res:
            out[name].update(
                loss=res["bn"]["loss"] + res["two"]["loss"],
                diff=max(float(np.abs(a - b).max())
                         for a, b in zip(res["one"]["w"], res["two"]["w"])),
                moved=max(float(np.abs(a - b).max()) for a, b in zip(res["two"]["w"], w_plain)))
    json.dump(out, open("result.json", "w"))
    """)
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    script = tmp_path / "script.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert sorted(res) == sorted(E.OPTIMIZERS)
    for name, r in res.items():
        assert r["replicas"] == 2
        assert all(np.isfinite(r["loss"])), name
        assert r["fc_moved"] > 1e-3 and r["mm_moved"] > 1e-4, name
        if name in ("adagrad", "nadam", "rmsprop"):
            assert r["moved"] > 1e-3 and r["diff"] < 1e-5, (name, r)
