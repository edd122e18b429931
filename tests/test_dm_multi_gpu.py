"""dm_multi_gpu: strategies, make_parallel, mixed precision; distributed runs on CPU
(two logical CPU devices; two local worker processes on loopback) in subprocesses."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tf_keras as keras

import dm_multi_gpu as mg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TINY = """
import numpy as np
import tf_keras as keras

def build():
    inp = keras.Input((6,))
    x = keras.layers.Dense(5, activation="relu", name="h")(inp)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="fc")(x))

def init(model):
    rng = np.random.default_rng(2)
    model.set_weights([rng.normal(size=w.shape).astype("float32") * .3
                       for w in model.get_weights()])

rng = np.random.default_rng(0)
X = rng.normal(size=(32, 6)).astype("float32")
y = keras.utils.to_categorical(rng.integers(0, 3, 32), 3)
"""


def _run_py(code, tmp_path, env_extra=None, timeout=240):
    script = tmp_path / "script.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, str(script)], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_get_strategy_single_device_and_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    import tensorflow as tf
    assert mg.get_strategy(None) is tf.distribute.get_strategy()
    assert mg.get_strategy(1).num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="GPU"):
        mg.get_strategy(2)                       # CPU-only test machine
    with pytest.raises(ValueError, match=">= 1"):
        mg.get_strategy(0)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        mg.tf_config_workers()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert mg.tf_config_workers() == 2


def test_make_parallel_on_one_device_returns_the_model(keras_session):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    parallel, original = mg.make_parallel(model, 1)
    assert parallel is model and original is model


@pytest.mark.parametrize("precision, compute", [("float16", "float16"),
                                                ("bfloat16", "bfloat16")])
def test_mixed_precision_keeps_float32_softmax(keras_session, precision, compute):
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    feat = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    inner = keras.Model(inp, feat, name="inner")
    inp2 = keras.Input((8, 8, 1))
    model = keras.Model(inp2, keras.layers.Dense(2, activation="softmax", name="fc")(inner(inp2)))
    X = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype("float32")
    ref = model.predict(X, verbose=0)
    try:
        mixed = mg.apply_precision_policy(model, precision)
        assert mixed.get_layer("fc").dtype_policy.name == "float32"
        assert mixed.get_layer("inner").get_layer("c1").compute_dtype == compute
        assert mixed.get_layer("inner").get_layer("c1").kernel.dtype == "float32"
        assert mixed.outputs[0].dtype == "float32"
        pred = mixed.predict(X, verbose=0)
        assert pred.dtype == np.float32
        np.testing.assert_allclose(pred, ref, atol=3e-2)
        np.testing.assert_allclose(pred.sum(axis=1), 1.0, atol=1e-5)
        mixed.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
        is_lso = isinstance(mixed.optimizer, keras.mixed_precision.LossScaleOptimizer)
        assert is_lso == (precision == "float16")
    finally:
        mg.set_precision_policy(None)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert mg.apply_precision_policy(model, None) is model
    with pytest.raises(ValueError, match="bfloat16"):
        mg.set_precision_policy("int8")


@pytest.mark.slow
def test_mirrored_two_logical_cpus_trains_like_one_device(tmp_path):
    """Global batch 8 split over 2 replicas == batch 8 on one device; training loops accept it."""
    code = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    """) + _TINY + textwrap.dedent("""
    import dm_multi_gpu as mg, dm_keras_ext as K
    single = build(); init(single); w0 = single.get_weights()
    par, org = mg.make_parallel(single, 2, devices=["/cpu:0", "/cpu:1"])
    for m in (single, par):
        m.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
        m.fit(X, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), par.get_weights()))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), w0))
    strategy = par.distribute_strategy
    with strategy.scope():
        model = build(); init(model)
    b0 = model.get_layer("fc").bias.numpy().copy(); k0 = model.get_layer("fc").kernel.numpy().copy()
    hists = K.do_3stage_training(model, model, (X, y), (X, y), None, "best.h5", None,
                                 nb_epoch=1, use_pretrained=False, optim="sgd", init_lr=0.1,
                                 bias_multiplier=0.0, strategy=strategy, verbose=0)
    trained = hists[-1].model
    json.dump(dict(replicas=strategy.num_replicas_in_sync, diff=diff, moved=moved,
                   bias_moved=float(np.abs(trained.get_layer("fc").bias.numpy() - b0).max()),
                   kernel_moved=float(np.abs(trained.get_layer("fc").kernel.numpy() - k0).max()),
                   saved=K.robust_load_model("best.h5").count_params()),
              open("result.json", "w"))
    """)
    _wait(_run_py(code, tmp_path))
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["replicas"] == 2
    assert res["moved"] > 1e-2
    assert res["diff"] < 1e-5
    assert res["bias_moved"] == 0.0 and res["kernel_moved"] > 1e-4
    assert res["saved"] == 6 * 5 + 5 + 5 * 3 + 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_two_local_processes_agree(tmp_path):
    """Two workers on loopback (TF_CONFIG) train one model: identical weights on both,
    equal to one device with the same global batch."""
    code = textwrap.dedent("""
    import json, os, sys
    import dm_multi_gpu as mg
    strategy = mg.get_strategy()                    # before any other TensorFlow work
    """) + _TINY + textwrap.dedent("""
    with strategy.scope():
        model = build()
    init(model)
    model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    hist = model.fit(X, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    ref = build(); init(ref)
    ref.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    ref.fit(X, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(f"w{task}.npz", *model.get_weights())
    np.savez(f"ref{task}.npz", *ref.get_weights())
    json.dump(dict(replicas=strategy.num_replicas_in_sync, loss=hist.history["loss"]),
              open(f"r{task}.json", "w"))
    """)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    procs = [_run_py(code, tmp_path, {"TF_CONFIG": json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})}) for i in range(2)]
    try:
        for p in procs:
            _wait(p)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    r0, r1 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2))
    assert r0["replicas"] == r1["replicas"] == 2
    assert len(r0["loss"]) == 2
    w0, w1, ref = (np.load(tmp_path / f) for f in ("w0.npz", "w1.npz", "ref0.npz"))
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k])
        np.testing.assert_allclose(w0[k], ref[k], atol=1e-5)
