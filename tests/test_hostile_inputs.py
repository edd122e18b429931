"""Hostile and careless inputs: a model file naming a TensorFlow op that writes or deletes
files, a model of the wrong role, flag values outside their range, Ctrl-C, inputs that give
nothing, files that are not what they claim. Each ends in one line naming the file or flag."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

import dm_keras_ext as E

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ model files calling TF ops
def _op_model(keras, path):
    """A tiny flat patch classifier whose first layer is the op layer ``x * 2`` (recorded by
    tf-keras as ``TFOpLambda`` calling ``tf.math.multiply``), saved as HDF5."""
    import tensorflow as tf

    inp = keras.Input((None, None, 3), name="x")
    doubled = tf.math.multiply(inp, 2.0)
    hidden = keras.layers.Conv2D(2, 3, padding="same", name="block5_conv1")(doubled)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(hidden)
    out = keras.layers.Dense(2, activation="softmax", name="predictions")(pooled)
    keras.Model(inp, out, name="patch").save(path, save_format="h5")
    return path


def _hostile(src, dest, function, target, kwargs):
    """``src`` with its op layer turned into a call of ``function`` on the constant ``target``
    (how a crafted file makes tf-keras call e.g. ``tf.io.write_file(target, ...)`` while it
    rebuilds the model)."""
    dest.write_bytes(src.read_bytes())
    with h5py.File(dest, "a") as f:
        config = json.loads(f.attrs["model_config"])
        layer = next(c for c in config["config"]["layers"] if c["class_name"] == "TFOpLambda")
        layer["config"]["function"] = function
        layer["inbound_nodes"] = [["_CONSTANT_VALUE", -1, str(target), kwargs]]
        f.attrs["model_config"] = json.dumps(config).encode()
    return dest


@pytest.fixture
def hostile_files(tmp_path, keras_session):
    base = _op_model(keras_session, tmp_path / "base.h5")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    written = tmp_path / "written_by_model.txt"
    writer = _hostile(base, tmp_path / "writer.h5", "io.write_file", written,
                      {"contents": "pwned"})
    remover = _hostile(base, tmp_path / "remover.h5", "io.gfile.remove", victim, {})
    return {"base": base, "writer": writer, "remover": remover, "victim": victim,
            "written": written}


def _nothing_happened(files):
    assert not files["written"].exists()
    assert files["victim"].read_text() == "precious\n"


def test_pure_op_layers_load_and_a_file_writing_op_is_refused(hostile_files):
    files = hostile_files
    model = E.robust_load_model(files["base"])   # tf.math.multiply: allowed tensor maths
    x = np.ones((1, 4, 4, 3), np.float32)
    assert model.predict(x, verbose=0).shape == (1, 2)
    for key, function in (("writer", "tf.io.write_file"), ("remover", "tf.io.gfile.remove")):
        with pytest.raises(E.UnsafeModelError) as info:
            E.robust_load_model(files[key])
        message = str(info.value)
        assert str(files[key]) in message and "'tf.math.multiply'" in message
        assert f"calls {function}," in message and "TFOpLambda" in message
        assert info.value.function == function
        _nothing_happened(files)


def test_hostile_op_runs_without_the_check(hostile_files):
    """What the check prevents: tf-keras alone writes and deletes the files while loading."""
    import tf_keras as keras

    files = hostile_files
    for key in ("writer", "remover"):
        with pytest.raises(Exception):  # noqa: B017  (whatever tf-keras fails with after the op ran)
            keras.models.load_model(files[key], compile=False)
    assert files["written"].read_text() == "pwned" and not files["victim"].exists()


def test_callable_references_anywhere_in_a_config_are_found():
    def layer(class_name, **cfg):
        return {"class_name": class_name, "config": {"name": cfg.pop("name", "l"), **cfg}}

    cases = {
        "slicing": layer("SlicingOpLambda", name="s", function="io.write_file"),
        "class method": layer("ClassMethod", name="c", cls_symbol="RaggedTensor",
                              method_name="from_row_lengths"),
        "custom class with a function": layer("MyLayer", name="m", function="os.system"),
        "keras module outside tf-keras": {"module": "subprocess", "class_name": "Popen",
                                          "config": {"name": "p"}},
        "lambda in a .keras archive": layer("Dense", name="d", activation={
            "class_name": "__lambda__", "config": {"code": "AAAA"}}),
    }
    for what, entry in cases.items():
        config = {"class_name": "Sequential", "config": {"name": "outer", "layers": [
            layer("InputLayer", name="in"),
            {"class_name": "Bidirectional", "config": {
                "name": "bi", "layer": layer("LSTM", name="fw"),
                "backward_layer": {"class_name": "Functional", "config": {
                    "name": "inner", "layers": [entry]}}}}]}}
        found = E.model_config_code(config)
        assert len(found) == 1, what
    allowed = {"class_name": "Functional", "config": {"name": "m", "layers": [
        layer("TFOpLambda", name="tf.__operators__.add", function="__operators__.add"),
        layer("TFOpLambda", name="tf.math.reduce_mean", function="math.reduce_mean")]}}
    assert E.model_config_code(allowed) == []


def test_keras_archive_config_is_checked(tmp_path, keras_session):
    import zipfile

    keras = keras_session
    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Dense(2, name="d")(inp)).save(tmp_path / "ok.keras")
    E.robust_load_model(tmp_path / "ok.keras")
    with zipfile.ZipFile(tmp_path / "ok.keras") as src, \
            zipfile.ZipFile(tmp_path / "bad.keras", "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                config = json.loads(data)
                config["config"]["layers"][1]["config"]["activation"] = {
                    "module": "os", "class_name": "function", "config": "system",
                    "registered_name": None}
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(E.UnsafeModelError, match=r"bad\.keras.*'d'.*calls os\.system"):
        E.robust_load_model(tmp_path / "bad.keras")


def test_unknown_layer_class_is_one_error_naming_file_and_class(hostile_files, tmp_path):
    path = tmp_path / "unknown.h5"
    path.write_bytes(hostile_files["base"].read_bytes())
    with h5py.File(path, "a") as f:
        config = json.loads(f.attrs["model_config"])
        config["config"]["layers"][2]["class_name"] = "FancyConv"
        f.attrs["model_config"] = json.dumps(config).encode()
    with pytest.raises(E.UnknownLayerError) as info:
        E.robust_load_model(path, safe_mode=False)
    assert str(path) in str(info.value) and "'FancyConv'" in str(info.value)
    assert "\n" not in str(info.value)


def _exit_line(main, argv, capsys, code=2):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == code, err
    lines = err.strip().splitlines()
    if lines[0].startswith("usage:"):   # argparse's usage block, then its one error line
        lines = lines[-1:]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _class_dirs(root, classes=("neg", "pos"), n=2, hw=(32, 24)):
    rng = np.random.default_rng(0)
    dirs = []
    for split in ("train", "val", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / split / cls / f"{cls}_{i}.png"),
                            rng.integers(1000, 60000, hw).astype(np.uint16))
        dirs.append(str(root / split))
    return dirs


def test_hostile_model_refused_by_every_script_that_loads_models(hostile_files, tmp_path,
                                                                 capsys):
    import heatmap_score
    import image_clf_predict
    import image_clf_train
    import patch_clf_train

    files = hostile_files
    dirs = _class_dirs(tmp_path / "img")
    for key in ("writer", "remover"):
        model = str(files[key])
        runs = [
            (image_clf_predict.main, ["--model", model, "--img-dir", dirs[2], "--out-dir",
                                      str(tmp_path / "pred")]),
            (heatmap_score.main, [str(Path(dirs[2]) / "pos"), model, "--all-images",
                                  "--out", str(tmp_path / "hm.npz")]),
            (patch_clf_train.main, dirs + ["--class-list", "neg", "pos", "--resume-from",
                                           model, "--img-size", "32", "24",
                                           "--rescale-factor", "0.003891",
                                           "--best-model", str(tmp_path / "p.h5")]),
            (image_clf_train.main, dirs + ["--patch-model-state", model, "--img-size", "32",
                                           "24", "--rescale-factor", "0.003891",
                                           "--best-model", str(tmp_path / "w.h5")]),
        ]
        for main, argv in runs:
            err = _exit_line(main, argv, capsys)
            assert model in err and "tf.io." in err and "--trust-model-file" in err, err
            _nothing_happened(files)


# ------------------------------------------------------------------ model roles
@pytest.fixture
def whole_image_model(tmp_path, keras_session):
    import dm_resnet

    keras = keras_session
    patch = keras.models.load_model(_op_model(keras, tmp_path / "patch.h5"), compile=False)
    whole, _ = dm_resnet.add_top_layers(patch, (32, 24), patch_net="vgg16", depths=(4,),
                                        repetitions=(1,), block_type="vgg")
    path = tmp_path / "whole.h5"
    whole.save(path, save_format="h5")
    return path


def test_model_roles(whole_image_model, tmp_path):
    patch = E.robust_load_model(tmp_path / "patch.h5")
    whole = E.robust_load_model(whole_image_model)
    assert (E.model_role(patch), E.model_role(whole)) == ("patch", "whole-image")
    E.check_model_role(patch, "patch.h5", ("patch",))
    with pytest.raises(E.ModelRoleError) as info:
        E.check_model_role(whole, whole_image_model, ("patch",), "--patch-model-state")
    message = str(info.value)
    assert message.startswith(f"--patch-model-state {whole_image_model}: expected a patch "
                              f"classifier")
    assert "found a whole-image classifier (32x24 input, network 'patch_net'" in message


@pytest.mark.real_data
def test_keras208_file_roles(keras208_dir):
    roles = {p.name: E.model_role(E.robust_load_model(p)) for p in keras208_dir.glob("*.h5")}
    assert roles == {"tiny_image_fixed_patch_input.h5": "whole-image",
                     "tiny_image_resnet_top.h5": "whole-image",
                     "tiny_image_vgg_top.h5": "whole-image", "tiny_patch_vgg.h5": "patch"}


def test_whole_image_model_refused_where_a_patch_classifier_is_expected(whole_image_model,
                                                                        tmp_path, capsys):
    import heatmap_score
    import image_clf_train

    dirs = _class_dirs(tmp_path / "img")
    model = str(whole_image_model)
    err = _exit_line(image_clf_train.main, dirs + ["--patch-model-state", model, "--img-size",
                                                   "32", "24", "--rescale-factor", "0.003891",
                                                   "--best-model", str(tmp_path / "w.h5")],
                     capsys)
    assert f"--patch-model-state {model}: expected a patch classifier" in err
    assert "found a whole-image classifier" in err
    err = _exit_line(heatmap_score.main, [str(Path(dirs[2]) / "pos"), model, "--all-images",
                                          "--out", str(tmp_path / "hm.npz")], capsys)
    assert f"DL_STATE {model}: expected a patch classifier" in err
    assert not (tmp_path / "hm.npz").exists() and not (tmp_path / "w.h5").exists()


# ------------------------------------------------------------------ flag ranges
SCRIPTS = ["compute_mean", "evaluate", "export_model", "gpu_check", "heatmap_score",
           "image_clf_predict", "image_clf_train", "make_synthetic_ddsm", "patch_clf_train",
           "prepare_cbis_ddsm", "run_pipeline", "sample_patches_combined", "score_exported"]


def _numeric_flags(parser):
    import argparse

    import common_flags

    floats = {float, common_flags.finite_float, common_flags.nonneg_float,
              common_flags.positive_float, common_flags.unit_interval, common_flags.fraction}
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._StoreConstAction):
            if action.type in floats:
                yield action.option_strings[0], "float", action.nargs
            elif action.type is int or getattr(action.type, "__name__", "").endswith("_int"):
                yield action.option_strings[0], "int", action.nargs


def test_every_script_is_listed():
    found = sorted(p.stem for p in (REPO / "ddsm_train").glob("*.py")
                   if re.search(r"^(def main\(|main = )", p.read_text(), re.M))
    assert found == SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_float_flag_of_every_script_refuses_nan_and_inf(script, capsys):
    """Walks the parser: a float flag added later gets the rule without declaring it."""
    module = __import__(script)
    flags = [(f, n) for f, kind, n in _numeric_flags(module.get_args_parser())
             if kind == "float"]
    for flag, nargs in flags:
        for bad in ("nan", "inf", "-inf"):
            argv = ([flag] + [bad] * nargs if isinstance(nargs, int) else [f"{flag}={bad}"])
            err = _exit_line(module.main, argv, capsys)
            assert f"argument {flag}" in err and "finite" in err, err
    int_flags = [(f, n) for f, kind, n in _numeric_flags(module.get_args_parser())
                 if kind == "int"]
    for flag, nargs in int_flags:
        values = ["1.5"] * (nargs if isinstance(nargs, int) else 1)
        err = _exit_line(module.main, [flag, *values], capsys)
        assert f"argument {flag}" in err and "not an integer: '1.5'" in err, err


@pytest.mark.parametrize("argv, flag, text", [
    (["--weight-decay", "-1"], "--weight-decay/-wd", "should be >= 0"),
    (["--weight-decay2", "-0.5"], "--weight-decay2/-wd2", "should be >= 0"),
    (["--featurewise-mean", "inf"], "--featurewise-mean", "should be a finite number"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout/-hd", "should be in [0, 1)"),
    (["--hidden-dropout2", "1"], "--hidden-dropout2/-hd2", "should be in [0, 1)"),
    (["--top-depths", "512", "0"], "--top-depths", "should be >= 1"),
    (["--train-bs-multiplier", "nan"], "--train-bs-multiplier", "should be a finite number"),
    (["--all-layer-multiplier", "nan"], "--all-layer-multiplier", "should be a finite number"),
    (["--init-learningrate", "0"], "--init-learningrate/-ilr", "should be > 0"),
    (["--nb-epoch", "-1"], "--nb-epoch/-ne", "should be >= 0"),
])
def test_training_flags_outside_their_range_name_the_flag(argv, flag, text, capsys):
    import image_clf_train

    err = _exit_line(image_clf_train.main, argv, capsys)
    assert f"argument {flag}: {text}" in err, err


@pytest.mark.parametrize("module, argv, flag", [
    ("sample_patches_combined", ["--seed", "-1"], "--seed"),
    ("prepare_cbis_ddsm", ["--seed", "-1"], "--seed"),
    ("image_clf_predict", ["--seed", "-1"], "--seed"),
    ("gpu_check", ["--steps", "0"], "--steps"),
    ("patch_clf_train", ["--inp-dropout", "2"], "--inp-dropout/-id"),
])
def test_other_flags_outside_their_range(module, argv, flag, capsys):
    err = _exit_line(__import__(module).main, argv, capsys)
    assert f"argument {flag}: should be" in err


def test_top_layer_nb_that_trains_nothing_is_refused(keras_session):
    keras = keras_session
    inp = keras.Input((4,))
    x = keras.layers.Dense(3, name="d")(inp)
    model = keras.Model(inp, keras.layers.Activation("softmax", name="act")(x))
    E.check_top_layer_nb(model, 1)   # layers 1.. hold the Dense
    with pytest.raises(ValueError, match=r"^--top-layer-nb 2: layers 2\.\.2 of the model hold "
                                         r"no trainable parameter"):
        E.check_top_layer_nb(model, 2)
    with pytest.raises(ValueError, match=r"^--top-layer-nb 9999 is beyond the model: it has 3 "
                                         r"layers"):
        E.check_top_layer_nb(model, 9999)


def test_top_layer_nb_checked_by_the_trainer_before_training(tmp_path, capsys, monkeypatch):
    import patch_clf_train
    import training_runs

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training_runs, "train_3stage", never)
    dirs = _class_dirs(tmp_path / "p", ("background", "malignant"), n=1)
    err = _exit_line(patch_clf_train.main, dirs + [
        "--class-list", "background", "malignant", "--net", "yaroslav", "--no-use-pretrained",
        "--img-size", "32", "24", "--top-layer-nb", "9999", "--nb-epoch", "1",
        "--rescale-factor", "0.003891", "--best-model", str(tmp_path / "p.h5")], capsys)
    assert "--top-layer-nb 9999 is beyond the model" in err


# ------------------------------------------------------------------ Ctrl-C
_POOL_SCRIPT = """
import argparse, os, sys, time
sys.path.insert(0, {ddsm!r})
import script_utils
from tests_interrupt_task import touch_and_sleep

def run(folder):
    script_utils.parallel_map(touch_and_sleep, [os.path.join(folder, f"m{{i}}") for i in
                              range(2)], 2, "waiting", verbose=False)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pool_script")
    parser.add_argument("folder")
    script_utils.cli_main(parser, run)
"""

_TASK_MODULE = """
import pathlib, time

def touch_and_sleep(path):
    pathlib.Path(path).touch()
    try:
        time.sleep(300)
    except KeyboardInterrupt:   # a worker that gets Ctrl-C itself (it should ignore it)
        pathlib.Path(path + ".interrupted").touch()
        raise
"""


def _interrupt_when(proc, ready, timeout=180):
    """Send Ctrl-C once ``ready()``; the limits are generous, as a busy machine may be slow to
    start a script, and far below the time an unstopped run would take."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not start in time"
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)   # as a terminal's Ctrl-C: the whole process group
    sent = time.time()
    out, err = proc.communicate(timeout=240)
    return out, err, time.time() - sent


def _start_pool_script(tmp_path, task_module):
    """Start the pool script in its own process group, its workers running ``task_module``."""
    (tmp_path / "tests_interrupt_task.py").write_text(task_module)
    script = tmp_path / "pool_script.py"
    script.write_text(_POOL_SCRIPT.format(ddsm=str(REPO / "ddsm_train")))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), DM_TRACEBACK="")
    return subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_ctrl_c_stops_workers_with_one_line_and_status_130(tmp_path):
    """Two worker processes are sleeping in their task when Ctrl-C reaches the process group:
    the workers print nothing, the pool stops and the script prints one line, status 130."""
    proc = _start_pool_script(tmp_path, _TASK_MODULE)
    _, err, after = _interrupt_when(proc, lambda: all((tmp_path / f"m{i}").exists()
                                                      for i in (0, 1)))
    assert proc.returncode == 130, err
    assert err.strip() == "pool_script: interrupted", err
    assert after < 60   # the workers sleeping 300 s were stopped, not waited for
    assert not list(tmp_path.glob("*.interrupted"))   # Ctrl-C was left to the parent


_PID_TASK_MODULE = """
import os, pathlib, time

def touch_and_sleep(path):
    pathlib.Path(path).write_text(str(os.getpid()))
    try:
        for _ in range(3000):
            time.sleep(0.1)
    except KeyboardInterrupt:   # a worker that gets Ctrl-C itself (it should ignore it)
        pathlib.Path(path + ".interrupted").touch()
        raise
"""


def test_pool_workers_ignore_ctrl_c_reaching_them_first(tmp_path):
    """Ctrl-C reaches the process group in no set order: the workers get it first here, then
    the script. The workers ignore it (no traceback, nothing written by them); the script
    stops the pool with one line and status 130."""
    proc = _start_pool_script(tmp_path, _PID_TASK_MODULE)
    started = [tmp_path / f"m{i}" for i in (0, 1)]

    def workers_ready():
        return all(p.exists() and p.read_text() for p in started)

    deadline = time.time() + 180
    while not workers_ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not start in time"
        time.sleep(0.05)
    for path in started:
        os.kill(int(path.read_text()), signal.SIGINT)
    time.sleep(2)
    assert not list(tmp_path.glob("*.interrupted")), "a worker took Ctrl-C itself"
    assert proc.poll() is None      # the workers go on: the pool waits for them
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert err.strip() == "pool_script: interrupted", err
    assert not list(tmp_path.glob("*.interrupted"))


_SLOW_READS = """
import runpy, sys, time
from pathlib import Path
sys.path[:0] = [{ddsm!r}, {root!r}]
import dm_image

original = dm_image.read_resize_stored

def slow(path, **kwargs):   # each image takes 2 s: the run lasts ~80 s
    Path({marker!r}).touch()
    time.sleep(2)
    return original(path, **kwargs)

dm_image.read_resize_stored = slow
sys.argv = ["compute_mean.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_ctrl_c_in_a_real_script_stops_its_thread_pool(tmp_path):
    """compute_mean over 40 images read at 2 s each on a thread, Ctrl-C after the first: one
    line, status 130, and the images not yet started are dropped rather than read to the end."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((8, 8), 100 + i, np.uint8))
    marker = tmp_path / "reading"
    driver = tmp_path / "driver.py"
    driver.write_text(_SLOW_READS.format(ddsm=str(REPO / "ddsm_train"), root=str(REPO),
                                         marker=str(marker),
                                         script=str(REPO / "ddsm_train" / "compute_mean.py")))
    env = dict(os.environ, DM_TRACEBACK="")
    proc = subprocess.Popen([sys.executable, str(driver), str(folder), "--img-size", "8", "8",
                             "--workers", "1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err, after = _interrupt_when(proc, marker.exists)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "compute_mean.py: interrupted", err
    assert "Traceback" not in err and "mean" not in out
    assert after < 30   # not the ~78 s the remaining reads would take


# ------------------------------------------------------------------ nothing produced, bad files
def test_sampler_with_every_patch_count_zero_exits_non_zero(tmp_path, capsys):
    import sample_patches_combined as spc

    for name in ("roi.csv", "pats.txt"):
        (tmp_path / name).write_text("x\n")
    err = _exit_line(spc.main, [str(tmp_path / "roi.csv"), str(tmp_path),
                                str(tmp_path / "pats.txt"), str(tmp_path), str(tmp_path / "tr"),
                                str(tmp_path / "va"), "--nb-bkg", "0", "--nb-abn", "0"], capsys)
    assert "every patch count is 0" in err
    assert not (tmp_path / "tr").exists()


def test_tensorboard_dir_that_is_a_file_is_one_line(tmp_path):
    import training_setup

    (tmp_path / "tb").write_text("a file\n")
    with pytest.raises(ValueError, match=r"^--tensorboard-dir .*tb is not a folder"):
        training_setup._check_tensorboard_dir(str(tmp_path / "tb"))
    training_setup._check_tensorboard_dir(str(tmp_path / "new"))   # to be made: fine


def test_make_synthetic_on_an_unwritable_target_is_one_line(tmp_path, capsys):
    """An OSError while writing (here: the target's parent is a file; a read-only folder
    where the user is not root) is one line naming the path, not a traceback."""
    import make_synthetic_ddsm

    small = ["--nb-patients", "2", "--img-height", "128", "--img-width", "96",
             "--whole-img-size", "32", "24", "--workers", "1"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x\n")
    err = _exit_line(make_synthetic_ddsm.main, [str(blocker / "data")] + small, capsys)
    assert "error:" in err and str(blocker) in err
    if os.geteuid() != 0:   # root writes into read-only folders
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
        try:
            err = _exit_line(make_synthetic_ddsm.main, [str(target / "data")] + small, capsys)
        finally:
            target.chmod(0o700)
        assert str(target) in err and "Permission denied" in err


def test_foreign_npz_names_the_file_and_missing_keys(tmp_path):
    import heatmap_score

    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(ValueError) as info:
        heatmap_score.load_heatmaps(path)
    assert str(info.value).startswith(f"{path} is not a heatmap_score file: it lacks ['meta']")
    np.savez(path, meta=np.array(json.dumps({"format": heatmap_score.HEATMAP_FORMAT})))
    with pytest.raises(ValueError, match=r"lacks \['patient_id', 'side', 'cancer'\]"):
        heatmap_score.load_heatmaps(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="other.npz: not a readable .npz heatmap file"):
        heatmap_score.load_heatmaps(path)


def test_malformed_exam_list_json_names_file_and_line(tmp_path):
    import image_clf_predict

    path = tmp_path / "exams.json"
    path.write_text('[\n  {"L-CC": ["a"]},\n  {"R-CC": ["b"],,}\n]\n')
    with pytest.raises(ValueError, match=r"exams\.json: line 3 column \d+: not valid JSON"):
        image_clf_predict.load_exam_list(path)


def test_prepare_with_no_dicom_found_exits_non_zero(tmp_path, capsys):
    import shutil

    import prepare_cbis_ddsm
    from test_prepare_cbis_ddsm import _handwritten

    csv_dir, root = _handwritten(tmp_path)
    shutil.rmtree(root)
    root.mkdir()
    err = _exit_line(prepare_cbis_ddsm.main, [str(csv_dir), str(root), str(tmp_path / "out"),
                                              "--no-verbose"], capsys)
    assert f"no full-mammogram DICOM of the 2 views was found or readable under {root}" in err


def test_img_size_below_the_patch_size_is_refused(tmp_path, keras_session, capsys):
    import image_clf_train

    keras = keras_session
    inp = keras.Input((48, 48, 3))
    x = keras.layers.Conv2D(2, 3, padding="same", name="block5_conv1")(inp)
    x = keras.layers.MaxPooling2D(name="block5_pool")(x)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    patch = tmp_path / "patch48.h5"
    keras.Model(inp, out).save(patch, save_format="h5")
    dirs = _class_dirs(tmp_path / "img")
    err = _exit_line(image_clf_train.main, dirs + [
        "--patch-model-state", str(patch), "--patch-net", "vgg16", "--img-size", "32", "24",
        "--rescale-factor", "0.003891", "--best-model", str(tmp_path / "w.h5")], capsys)
    assert err.endswith(f"--img-size 32 24 is smaller than the 48x48 patches of "
                        f"--patch-model-state {patch}")


# ------------------------------------------------------------------ bad input named as such
def test_an_empty_image_among_the_training_patches_is_named_before_training(tmp_path, capsys,
                                                                            monkeypatch):
    import patch_clf_train
    import training_runs

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training_runs, "train_3stage", never)
    dirs = _class_dirs(tmp_path / "p", ("background", "malignant"), n=2)
    empty = Path(dirs[0]) / "malignant" / "malignant_9.png"
    empty.write_bytes(b"")
    err = _exit_line(patch_clf_train.main, dirs + [
        "--class-list", "background", "malignant", "--net", "yaroslav", "--no-use-pretrained",
        "--img-size", "32", "24", "--nb-epoch", "1", "--rescale-factor", "0.003891",
        "--best-model", str(tmp_path / "p.h5")], capsys)
    assert "TRAIN_DIR" in err and "1 empty (zero-byte) image file(s)" in err
    assert str(empty) in err
    assert not (tmp_path / "p.h5").exists()


def test_a_patch_larger_than_the_resized_images_is_refused(tmp_path, capsys):
    import sample_patches_combined

    err = _exit_line(sample_patches_combined.main, [
        str(tmp_path / "roi.csv"), str(tmp_path / "roi"), str(tmp_path / "pat.txt"),
        str(tmp_path / "full"), str(tmp_path / "tr"), str(tmp_path / "va"),
        "--patch-size", "400", "--target-height", "144"], capsys)
    assert err.endswith("--patch-size 400 is larger than the resized images (--target-height "
                        "144): every patch would be mostly padding; give a smaller patch or a "
                        "larger target size")
    assert not (tmp_path / "tr").exists()


@pytest.mark.parametrize("name, value, text", [
    ("RANDOM_SEED", "-1", "should be >= 0, got -1"),
    ("RANDOM_SEED", str(2 ** 32), f"should be <= {2 ** 32 - 1}"),
    ("NUM_CPU_CORES", "0", "should be >= 1, got 0"),
    ("NUM_CPU_CORES", "four", "should be an integer, got 'four'")])
def test_a_bad_environment_variable_is_one_line_naming_it(tmp_path, capsys, monkeypatch, name,
                                                          value, text):
    import sample_patches_combined

    monkeypatch.setenv(name, value)
    err = _exit_line(sample_patches_combined.main, [
        str(tmp_path / "roi.csv"), str(tmp_path / "roi"), str(tmp_path / "pat.txt"),
        str(tmp_path / "full"), str(tmp_path / "tr"), str(tmp_path / "va")], capsys)
    assert f"environment variable {name} {text}" in err


def test_a_model_with_nan_weights_says_it_gave_no_finite_score(whole_image_model, tmp_path,
                                                               keras_session, capsys):
    import image_clf_predict

    model = keras_session.models.load_model(whole_image_model, compile=False)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    nan_model = tmp_path / "nan.h5"
    model.save(nan_model, save_format="h5")
    dirs = _class_dirs(tmp_path / "img")
    err = _exit_line(image_clf_predict.main, [
        "--model", str(nan_model), "--img-dir", dirs[2], "--img-size", "32", "24",
        "--rescale-factor", "0.003891", "--out-dir", str(tmp_path / "pred")], capsys)
    assert "none of the 4 images could be scored" in err
    assert "the model gave no finite score" in err
    assert not (tmp_path / "pred").exists()


def test_an_image_extension_that_leaves_the_folder_is_named(tmp_path, capsys):
    import heatmap_score

    err = _exit_line(heatmap_score.main, [
        str(tmp_path), str(tmp_path / "model.h5"), "--pat-csv", str(tmp_path / "pat.csv"),
        "--img-extension", "png/../../x", "--out", str(tmp_path / "hm.npz")], capsys)
    assert "--img-extension 'png/../../x' cannot be part of a file name" in err
