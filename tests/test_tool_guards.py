"""Guards of the command-line tools that stop a run computing garbage: a diverging run, images
whose levels do not fit the rescale factor, a patch net that contradicts the patch model file,
a finished run started again; and what a user meets on the way: the help of every flag, a
Python without the project's packages, TensorFlow's start-up lines, the heatmap shell scripts,
confidence intervals."""
import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras
from conftest import split_dirs, tiny_vgg_patch_net, write_class_split

import dm_image
import dm_keras_ext as K
import patch_clf_train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16-bit patch folders (3 classes, 24x24) and a tiny VGG-like patch model file."""
    root = tmp_path_factory.mktemp("guards")
    rng = np.random.default_rng(5)
    write_class_split(root / "patch", ["background", "malignant", "benign"],
                      {"train": 4, "val": 2, "test": 2}, (24, 24), rng)
    keras.backend.clear_session()
    K.save_model_atomic(tiny_vgg_patch_net(keras), root / "patch.h5", include_optimizer=False)
    keras.backend.clear_session()
    return root


def _patch_argv(root, best, *extra):
    return split_dirs(root, "patch") + [
        "--resume-from", str(root / "patch.h5"), "--net", "vgg16", "--top-layer-nb", "3",
        "--img-size", "24", "24", "--rescale-factor", "0.003891", "--featurewise-mean", "50",
        "--batch-size", "4", "--nb-epoch", "1", "--top-layer-epochs", "1",
        "--all-layer-epochs", "0", "--optimizer", "sgd", "--init-learningrate", "0.001",
        "--best-model", str(best), *extra]


def _weights(path):
    model = K.robust_load_model(path)
    return [np.asarray(w) for w in model.get_weights()]


def _exit_code(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


# ------------------------------------------------------------------ a diverging run
@pytest.mark.slow
def test_diverging_run_stops_nonzero_and_keeps_the_last_finite_model(data, tmp_path,
                                                                      keras_session, capsys):
    best = tmp_path / "best.h5"
    # stage 2 at 0.001 x 1e30: the first step of epoch 2 sends the weights to inf
    code, err = _exit_code(patch_clf_train.main,
                           _patch_argv(data, best, "--top-layer-multiplier", "1e30"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "training diverged" in err and "epoch 2" in err and len(err.strip().splitlines()) == 1
    state = K.read_training_state(K.last_checkpoint_path(best))
    assert state["epoch"] == 1 and not state["finished"]
    assert state["best"]["epoch"] == 1
    best_w, last_w = _weights(best), _weights(K.last_checkpoint_path(best))
    assert all(np.isfinite(w).all() for w in best_w)
    assert all(np.array_equal(a, b) for a, b in zip(best_w, last_w))


def test_checkpointers_never_save_a_non_finite_model(tmp_path, keras_session):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    path = tmp_path / "best.h5"
    ckpt = K.BestModelCheckpoint(path, monitor="val_accuracy")
    ckpt.set_model(model)
    ckpt.on_epoch_end(0, {"val_accuracy": 0.9, "loss": float("nan")})
    assert not path.exists() and ckpt.best_epoch is None
    w = model.get_weights()
    w[0][0, 0] = np.inf
    model.set_weights(w)
    ckpt.on_epoch_end(1, {"val_accuracy": 0.9, "loss": 0.5})
    assert not path.exists() and ckpt.best_epoch is None


def test_auc_checkpointer_never_saves_a_non_finite_model(tmp_path, keras_session):
    """A finite AUROC from a model that is not finite: a batch-norm variance of inf gives
    constant, finite scores; a NaN loss leaves the weights finite. Neither is saved."""
    inp = keras.Input((2,))
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(bn(inp)))
    x = np.random.default_rng(0).normal(size=(8, 2)).astype("float32")
    y = np.eye(2)[[0, 1] * 4]
    path = tmp_path / "best.h5"
    ckpt = K.DMAucModelCheckpoint(path, (x, y), batch_size=4)
    ckpt.set_model(model)
    ckpt.on_epoch_end(0, {"loss": float("nan")})
    assert not path.exists() and ckpt.best_epoch is None
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, beta, mean, np.full_like(var, np.inf)])
    logs = {"loss": 0.5}
    ckpt.on_epoch_end(1, logs)
    assert np.isfinite(logs["val_auc"])
    assert not path.exists() and ckpt.best_epoch is None
    bn.set_weights([gamma, beta, mean, var])
    ckpt.on_epoch_end(2, {"loss": 0.5})
    assert path.exists() and ckpt.best_epoch == 3


# ------------------------------------------------------------------ levels against the scale
def _without(argv, flag, nargs=1):
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + nargs:]


def test_compute_mean_refuses_16bit_levels_without_the_factor(data, capsys):
    import compute_mean

    folder = str(data / "patch" / "train")
    code, err = _exit_code(compute_mean.main, [folder, "--img-size", "24", "24"], capsys)
    assert code == 2 and "--rescale-factor 0.003891" in err and folder in err
    assert len(err.strip().splitlines()) == 1
    result = compute_mean.main([folder, "--img-size", "24", "24", "--rescale-factor", "0.003891"])
    assert 30 < result["mean"] < 80 and not result["scale_mismatch"]


def test_compute_mean_refuses_8bit_levels_under_the_16bit_factor(tmp_path, capsys):
    import compute_mean
    from conftest import imwrite

    for i in range(3):   # two levels each (a constant image gives no mean): 38+i and 40+i
        img = np.full((16, 12), 38 + i, np.uint8)
        img[8:] += 2
        imwrite(tmp_path / "train" / f"{i}.png", img)
    code, err = _exit_code(compute_mean.main, [str(tmp_path / "train"), "--img-size", "16", "12",
                                               "--rescale-factor", "0.003891"], capsys)
    assert code == 2 and "8-bit levels (up to 42)" in err and "--no-rescale-factor" in err
    assert compute_mean.main([str(tmp_path / "train"), "--img-size", "16", "12"])["mean"] == \
        pytest.approx(40.0)


def test_trainers_refuse_16bit_levels_without_the_factor_before_any_model(data, tmp_path,
                                                                        capsys):
    import image_clf_train

    best = tmp_path / "best.h5"
    argv = _without(_patch_argv(data, best), "--rescale-factor")
    code, err = _exit_code(patch_clf_train.main, argv, capsys)
    assert code == 2 and "no rescale factor: give --rescale-factor 0.003891" in err
    assert not best.exists()
    rng = np.random.default_rng(1)
    write_class_split(tmp_path / "img", ["neg", "pos"], {"train": 2, "val": 2, "test": 2},
                      (32, 24), rng)
    code, err = _exit_code(image_clf_train.main, split_dirs(tmp_path, "img") + [
        "--patch-model-state", str(data / "patch.h5"), "--patch-net", "vgg16",
        "--img-size", "32", "24", "--batch-size", "4", "--best-model", str(best)], capsys)
    assert code == 2 and "--rescale-factor 0.003891" in err and not best.exists()


# ------------------------------------------------------------------ a finished run started again
def _run_files(best):
    files = [best, K.last_checkpoint_path(best), K.training_log_path(best),
             K.training_curves_path(best), str(best) + ".options.json"]
    return {str(f): (os.stat(f).st_mtime_ns, open(f, "rb").read()) for f in files}


@pytest.mark.slow
def test_finished_run_is_not_touched_and_another_command_needs_overwrite(data, tmp_path,
                                                                         keras_session, capsys):
    best = tmp_path / "best.h5"
    argv = _patch_argv(data, best, "--top-layer-epochs", "0")
    first = patch_clf_train.main(argv)
    assert not first.get("complete")
    assert K.read_model_info(best) == {"net": "vgg16"}   # image_clf_train.py reads it
    before = _run_files(best)
    again = patch_clf_train.main(argv)
    assert again["complete"] and again["best_epoch"] == first["best_epoch"]
    assert again["best_value"] == pytest.approx(first["best_val_accuracy"])
    assert "is complete" in capsys.readouterr().out
    assert _run_files(best) == before
    other = argv[:-2] + ["--init-learningrate", "0.002"] + argv[-2:]
    code, err = _exit_code(patch_clf_train.main, other, capsys)
    assert code == 2 and "--overwrite" in err and "init_lr" in err
    assert _run_files(best) == before
    result = patch_clf_train.main(other + ["--overwrite"])
    assert not result.get("complete")
    state = K.read_training_state(K.last_checkpoint_path(best))
    assert state["finished"] and state["run"]["options"]["init_lr"] == 0.002


def test_a_model_file_without_its_run_is_not_replaced(data, tmp_path, capsys):
    best = tmp_path / "best.h5"
    best.write_bytes(b"someone's model")
    code, err = _exit_code(patch_clf_train.main, _patch_argv(data, best), capsys)
    assert code == 2 and "unknown origin" in err and "--overwrite" in err
    assert best.read_bytes() == b"someone's model"


def test_a_run_killed_before_its_first_checkpoint_starts_again(data, tmp_path, keras_session,
                                                               capsys, monkeypatch):
    """The best model is saved before the epoch's checkpoint: a run stopped between the two
    knows that model as its own (the run identity stored in it) and the same command runs."""
    import training_runs
    best = tmp_path / "best.h5"
    argv = _patch_argv(data, best)

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the checkpoint")
    for run_argv in (argv[:-2] + ["--init-learningrate", "0.002"] + argv[-2:], argv):
        with monkeypatch.context() as m:
            m.setattr(training_runs, "save_training_checkpoint", killed)
            with pytest.raises(RuntimeError, match="killed"):
                patch_clf_train.main(run_argv)
        assert best.is_file() and not os.path.exists(K.last_checkpoint_path(best))
        if run_argv is not argv:      # another command's model: still refused, kept
            before = best.read_bytes()
            code, err = _exit_code(patch_clf_train.main, argv, capsys)
            assert code == 2 and "unknown origin" in err
            assert best.read_bytes() == before
            best.unlink()
    result = patch_clf_train.main(argv)
    assert not result.get("complete")
    assert K.read_training_state(K.last_checkpoint_path(best))["finished"]
    assert patch_clf_train.main(argv)["complete"]


# ------------------------------------------------------------------ the patch net of the file
class _Built(Exception):
    pass


def _stage1_trainable(monkeypatch, argv):
    """Parameters image_clf_train.py would train in stage 1 for ``argv`` (no training)."""
    import image_clf_train
    import training_runs

    seen = {}

    def capture(model, data, plan, run):
        seen["n"] = sum(layer.count_params() for layer in model.layers[plan.top_layer_nb:])
        raise _Built()

    monkeypatch.setattr(training_runs, "train_2stage", capture)
    with pytest.raises(_Built):
        image_clf_train.main(argv)
    return seen["n"]


def test_image_trainer_takes_net_and_scale_of_the_patch_model_file(data, tmp_path,
                                                                   keras_session, monkeypatch,
                                                                   capsys):
    import image_clf_train

    rng = np.random.default_rng(2)
    write_class_split(tmp_path / "img", ["neg", "pos"], {"train": 2, "val": 2, "test": 2},
                      (32, 24), rng)
    patch = tmp_path / "patch_vgg16.h5"
    K.save_model_atomic(K.robust_load_model(data / "patch.h5"), patch,
                        recipe=dm_image.InputRecipe(
                            img_size=(24, 24), channels=3, rescale_factor=255 / 65535,
                            featurewise_center=True, featurewise_mean=50.0),
                        extras=K.ModelFileExtras(info={"net": "vgg16"}))
    assert K.read_model_info(patch) == {"net": "vgg16"}
    base = split_dirs(tmp_path, "img") + [
        "--img-size", "32", "24", "--batch-size", "4", "--top-depths", "8",
        "--top-repetitions", "1", "--best-model", str(tmp_path / "best.h5")]
    # the 2017 way: a file without net, all flags given
    plain = _stage1_trainable(monkeypatch, base + [
        "--patch-model-state", str(data / "patch.h5"), "--patch-net", "vgg16",
        "--rescale-factor", "0.003891"])
    # without --patch-net such a file is cut as a resnet50, which this net is not
    code, err = _exit_code(image_clf_train.main, base + [
        "--patch-model-state", str(data / "patch.h5"), "--rescale-factor", "0.003891"], capsys)
    assert code == 2 and "cut layer of patch net 'resnet50'" in err
    # no --patch-net, no --rescale-factor: both from the file
    assert _stage1_trainable(monkeypatch, base + ["--patch-model-state", str(patch)]) == plain
    code, err = _exit_code(image_clf_train.main, base + [
        "--patch-model-state", str(patch), "--patch-net", "resnet50"], capsys)
    assert code == 2 and "--patch-net resnet50" in err and "vgg16" in err


# ------------------------------------------------------------------ help texts
SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "ddsm_train"
_DEFAULT_PART = re.compile(r"\(default:[^()]*(\([^()]*\)[^()]*)*\)")


def _script_parsers():
    for path in sorted(SCRIPTS_DIR.glob("*.py")):
        if "def get_args_parser" in path.read_text():
            yield path.stem, importlib.import_module(path.stem).get_args_parser()


def _help_text(parser, action):
    text = action.help or ""
    try:
        return text % {**vars(action), "default": action.default, "prog": parser.prog}
    except (KeyError, TypeError, ValueError):
        return text


def test_every_flag_says_what_it_does():
    short = []
    for name, parser in _script_parsers():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            what = _DEFAULT_PART.sub("", _help_text(parser, action)).strip()
            if len(what) < 20:
                short.append(f"{name} {'/'.join(action.option_strings) or action.dest}: "
                             f"{action.help!r}")
    assert not short, "help that does not say what the flag does:\n" + "\n".join(short)


@pytest.mark.parametrize("script, recipe_flags", [
    ("image_clf_predict", ("--img-size", "--img-scale", "--rescale-factor", "--equalize-hist",
                           "--featurewise-center", "--featurewise-mean")),
    ("heatmap_score", ("--img-scale", "--rescale-factor", "--equalize-hist",
                       "--featurewise-center", "--featurewise-mean", "--net", "--patch-size"))])
def test_input_recipe_flags_say_the_model_file_comes_first(script, recipe_flags):
    parser = importlib.import_module(script).get_args_parser()
    helps = {s: _help_text(parser, a) for a in parser._actions for s in a.option_strings}
    assert [f for f in recipe_flags if "input recipe supplies it" not in helps[f]] == []


# ------------------------------------------------------------------ the environment
def test_a_python_without_the_packages_says_how_to_run_the_script(tmp_path):
    # -S: no site-packages, as a system Python without the project's packages
    out = subprocess.run([sys.executable, "-S", str(SCRIPTS_DIR / "compute_mean.py"),
                          str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "make venv" in out.stderr and ".venv/bin/python ddsm_train/compute_mean.py" in \
        out.stderr and "numpy" in out.stderr


@pytest.mark.parametrize("given, expected", [(None, "3"), ("1", "1")])
def test_tensorflow_start_up_lines_are_hidden_unless_asked_for(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if given is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = given
    code = (f"import sys; sys.path.insert(0, {str(SCRIPTS_DIR)!r}); import script_utils, os; "
            f"print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.stdout.strip() == expected, out.stderr


@pytest.mark.parametrize("script", ["fprop_heatmap_all.sh", "score_heatmap_all.sh"])
def test_heatmap_scripts_create_no_folder_before_failing(script, tmp_path):
    import shutil

    shutil.copy(SCRIPTS_DIR / script, tmp_path / script)
    stub = tmp_path / "python_stub"   # fails as heatmap_score.py does on a missing input
    stub.write_text("#!/bin/sh\necho 'heatmap_score.py: error: input file not found' >&2\n"
                    "exit 2\n")
    stub.chmod(0o755)
    out = subprocess.run(["bash", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                          "PYTHON": str(stub)})
    assert out.returncode == 2 and "input file not found" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([script, "python_stub"])


def test_confidence_intervals_print_with_3_decimals():
    import eval_metrics

    assert eval_metrics.format_ci([0.83912, 0.95549]) == "95% CI 0.839-0.955"
    assert eval_metrics.format_ci([float("nan"), float("nan")]) == "95% CI n/a"
    assert eval_metrics.format_ci(None) == "95% CI n/a"


@pytest.mark.slow
@pytest.mark.parametrize("given", [None, "0"])
def test_tensorflow_info_lines_of_a_script_are_hidden_unless_asked_for(given):
    """TensorFlow prints info lines before its log level applies; a script hides them."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if given is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = given
    out = subprocess.run([sys.executable, str(SCRIPTS_DIR / "heatmap_score.py"), "--help"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "--pat-csv" in out.stdout
    shown = [line for line in out.stderr.splitlines() if line.startswith(("I0000", "W0000"))]
    assert bool(shown) == (given is not None), out.stderr
