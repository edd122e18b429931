"""patch_clf_train.py / image_clf_train.py, their flags (common_flags) and set-up
(training_setup), and the training shell scripts.

Tiny synthetic 16-bit class folders; tiny models; the companion page's fine-tuning command run
verbatim with paths and sizes substituted."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import split_dirs, tiny_vgg_patch_net, write_class_split

import image_clf_train
import patch_clf_train
import script_utils
import training_setup

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "ddsm_train"
SEED_PAGE = Path(__file__).resolve().parents[2] / "shared" / "seed_companion_page.txt"
IMG_HW = (64, 48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Whole images (neg/pos, 64x48) and patches (3 classes, 32x32) as 16-bit PNG folders."""
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(7)
    write_class_split(root / "img", ["neg", "pos"], {"train": 6, "val": 4, "test": 4}, IMG_HW, rng)
    write_class_split(root / "patch", ["background", "malignant", "benign"],
                      {"train": 4, "val": 2, "test": 2}, (32, 32), rng)
    return root


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny VGG-like patch classifier and a whole-image model converted from it (HDF5)."""
    import tf_keras as keras

    import dm_keras_ext
    import dm_resnet

    keras.backend.clear_session()
    folder = tmp_path_factory.mktemp("models")
    patch = tiny_vgg_patch_net(keras, name="tiny_patch")
    patch_file = folder / "patch.h5"
    dm_keras_ext.save_model_atomic(patch, patch_file)
    image, _ = dm_resnet.add_top_layers(patch, IMG_HW, "vgg16", "vgg", [8], [1], nb_class=2)
    image_file = folder / "image.h5"
    dm_keras_ext.save_model_atomic(image, image_file)
    keras.backend.clear_session()
    return {"patch": patch_file, "image": image_file}


# ------------------------------------------------------------------ flags
IMAGE_DEFAULTS = dict(
    patch_model_state=None, resume_from=None, img_size=[1152, 896], img_scale=None,
    rescale_factor=None, featurewise_center=True, featurewise_mean=52.16, equalize_hist=False,
    batch_size=64, train_bs_multiplier=0.5, augmentation=True, class_list=["neg", "pos"],
    patch_net="resnet50", block_type="resnet", top_depths=[512, 512], top_repetitions=[3, 3],
    bottleneck_enlarge_factor=4, add_heatmap=False, avg_pool_size=[7, 7], add_conv=True,
    add_shortcut=False, hm_strides=[1, 1], hm_pool_size=[5, 5], fc_init_units=64, fc_layers=2,
    top_layer_nb=None, nb_epoch=5, all_layer_epochs=20, load_val_ram=False,
    load_train_ram=False, img_cache_dir=None, weight_decay=1e-4, hidden_dropout=0.0,
    weight_decay2=1e-4,
    hidden_dropout2=0.0, optim="sgd", init_lr=0.01, lr_patience=10, es_patience=25,
    auto_batch_balance=True, pos_cls_weight=1.0, neg_cls_weight=1.0, all_layer_multiplier=0.1,
    best_model="./modelState/image_clf.h5", final_model="NOSAVE", kept_layer_idx=None,
    bias_multiplier=None, mixed_precision=None, jit=False, frozen_bn_mode="batch",
    auto_resume=True, tensorboard_dir=None, trust_model_file=False, overwrite=False)

PATCH_DEFAULTS = dict(
    img_size=[256, 256], img_scale=None, rescale_factor=None, featurewise_center=True,
    featurewise_mean=59.6, equalize_hist=True, batch_size=64, train_bs_multiplier=0.5,
    augmentation=False, class_list=["background", "malignant", "benign"], nb_epoch=5,
    top_layer_epochs=10, all_layer_epochs=20, load_val_ram=False, load_train_ram=False,
    img_cache_dir=None,
    net="resnet50", use_pretrained=True, top_layer_nb=None, nb_init_filter=32,
    init_filter_size=5, init_conv_stride=2, max_pooling_size=2, max_pooling_stride=2,
    weight_decay=1e-4, weight_decay2=1e-4, bias_multiplier=None, alpha=1e-4, l1_ratio=0.0,
    inp_dropout=0.0, hidden_dropout=0.0, hidden_dropout2=0.0, optim="sgd", init_lr=0.01,
    lr_patience=10, es_patience=25, resume_from=None, auto_batch_balance=False,
    pos_cls_weight=1.0, neg_cls_weight=1.0, top_layer_multiplier=0.1, all_layer_multiplier=0.01,
    best_model="./modelState/patch_clf.h5", final_model="NOSAVE", mixed_precision=None,
    jit=False, frozen_bn_mode="batch", auto_resume=True, tensorboard_dir=None,
    trust_model_file=False, overwrite=False)


@pytest.mark.parametrize("module, expected", [(image_clf_train, IMAGE_DEFAULTS),
                                              (patch_clf_train, PATCH_DEFAULTS)])
def test_parser_defaults_match_spec(module, expected):
    """The defaults of the flags listed above are pinned; a flag added since is off by default
    (None or False), so that a command line written before it trains as it did."""
    got = vars(module.get_args_parser().parse_args(["a", "b", "c"]))
    assert (got.pop("train_dir"), got.pop("val_dir"), got.pop("test_dir")) == ("a", "b", "c")
    assert {k: got.get(k, "MISSING") for k in expected} == expected
    assert {k: v for k, v in got.items() if k not in expected and v not in (None, False)} == {}


def test_flag_pairs_and_optional_values():
    parse = image_clf_train.get_args_parser().parse_args
    args = parse(["a", "b", "c", "--no-featurewise-center", "--equalize-hist", "--no-augmentation",
                  "--no-auto-batch-balance", "--add-heatmap", "--no-add-conv", "--rescale-factor",
                  "0.003891", "--img-scale", "4095", "--no-img-scale", "--resume-from", "m.h5",
                  "--no-patch-model-state", "--kept-layer-idx", "-5", "--bias-multiplier", "0.1",
                  "--optimizer", "Adam", "--mixed-precision", "bfloat16", "--jit"])
    assert (args.featurewise_center, args.equalize_hist, args.augmentation,
            args.auto_batch_balance, args.add_heatmap, args.add_conv) == \
        (False, True, False, False, True, False)
    assert (args.rescale_factor, args.img_scale, args.resume_from, args.patch_model_state) == \
        (0.003891, None, "m.h5", None)
    assert (args.kept_layer_idx, args.bias_multiplier, args.optim, args.mixed_precision,
            args.jit) == (-5, 0.1, "adam", "bfloat16", True)
    with pytest.raises(SystemExit):
        parse(["a", "b", "c", "--optimizer", "sgdx"])
    with pytest.raises(SystemExit):
        parse(["a", "b", "c", "--mixed-precision", "float64"])


def test_env_helpers(monkeypatch):
    for name in ("NUM_CPU_CORES", "NUM_GPU_DEVICES", "RANDOM_SEED"):
        monkeypatch.delenv(name, raising=False)
    assert training_setup.env_summary() == {"NUM_CPU_CORES": 4, "NUM_GPU_DEVICES": 1, "RANDOM_SEED": 12345}
    monkeypatch.setenv("NUM_GPU_DEVICES", "2")
    monkeypatch.setenv("RANDOM_SEED", "7")
    assert (script_utils.get_num_gpu_devices(), script_utils.get_random_seed()) == (2, 7)
    monkeypatch.setenv("NUM_CPU_CORES", "four")
    with pytest.raises(ValueError, match="NUM_CPU_CORES"):
        script_utils.get_num_cpu_cores()
    monkeypatch.setenv("NUM_GPU_DEVICES", "0")
    with pytest.raises(ValueError, match=">= 1"):
        script_utils.get_num_gpu_devices()


def test_run_rejects_unknown_options(data):
    with pytest.raises(ValueError, match="unknown options.*valid"):
        image_clf_train.run(*split_dirs(data, "img"), nb_epochs=3)


# ------------------------------------------------------------------ contradictory flags
def _expect_usage_error(module, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        module.main(argv + ["--best-model", str(tmp_path / "never.h5")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []          # stopped before any work


def test_contradictory_flags_stop_before_work(data, model_files, capsys, tmp_path,
                                              monkeypatch):
    monkeypatch.delenv("NUM_GPU_DEVICES", raising=False)
    img = split_dirs(data, "img")
    model = str(model_files["image"])
    _expect_usage_error(image_clf_train, img, "exactly one of --patch-model-state and "
                        "--resume-from is required, got neither", capsys, tmp_path)
    _expect_usage_error(image_clf_train, img + ["--resume-from", model, "--patch-model-state",
                                                str(model_files["patch"])],
                        "got both", capsys, tmp_path)
    _expect_usage_error(image_clf_train, img + ["--resume-from", model, "--class-list", "neg",
                                                "cancer"],
                        "does not match TRAIN_DIR", capsys, tmp_path)
    _expect_usage_error(image_clf_train, img + ["--resume-from", str(tmp_path / "no.h5")],
                        "model file not found", capsys, tmp_path)
    monkeypatch.setenv("NUM_GPU_DEVICES", "4")
    _expect_usage_error(image_clf_train, img + ["--resume-from", model, "--batch-size", "4"],
                        "train batch size (batch size x multiplier) 2 is below the number of "
                        "devices 4", capsys, tmp_path)
    _expect_usage_error(patch_clf_train, split_dirs(data, "patch") + ["--batch-size", "2"],
                        "below the number of devices 4", capsys, tmp_path)
    monkeypatch.delenv("NUM_GPU_DEVICES")
    with pytest.raises(ValueError, match="no subfolder"):
        patch_clf_train.run(*split_dirs(data, "patch"), class_list=["background", "calc_mal"],
                            best_model=str(tmp_path / "never.h5"))


# ------------------------------------------------------------------ end-to-end training
def _check_options_json(result, expected):
    saved = json.loads(Path(result["options_json"]).read_text())
    for key, value in expected.items():
        assert saved[key] == value, key
    assert saved["environment"]["RANDOM_SEED"] == 12345


def _test_set_predictions(model_file, folder, classes, img_size, mean, flips=False,
                          equalize=False, logits=False):
    """(probabilities, labels) of ``model_file`` on ``folder/CLASS/*.png``, computed here: each
    image resized, scaled by 0.003891 (``equalize``: then histogram-equalised), centred on
    ``mean``, 3 channels; ``flips``: the mean over the image and its left-right, up-down and
    both flips; ``logits``: the final softmax layer's inputs (NumPy) instead of its outputs."""
    import tf_keras as keras

    import dm_image
    import dm_keras_ext

    files = [(f, k) for k, cls in enumerate(classes) for f in sorted((folder / cls).glob("*.png"))]
    X = np.stack([dm_image.read_img_for_pred(f, equalize_hist=equalize, target_size=img_size,
                                             rescale_factor=0.003891)
                  for f, _ in files]) - np.float32(mean)
    views = [X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1]] if flips else [X]
    model = dm_keras_ext.robust_load_model(model_file)
    if logits:
        top = model.layers[-1]
        assert top.get_config()["activation"] == "softmax"
        kernel, bias = top.get_weights()
        features = keras.Model(model.inputs, model.layers[-2].output)
        out = [features.predict(v, verbose=0) @ kernel + bias for v in views]
    else:
        out = [model.predict(v, verbose=0) for v in views]
    return np.mean(out, 0), np.array([k for _, k in files])


def _test_auc(model_file, data, img_size, mean, flips=False):
    """Test-set AUROC (P(pos) ranked by scikit-learn) of a whole-image model."""
    from sklearn.metrics import roc_auc_score

    prob, y = _test_set_predictions(model_file, data / "img" / "test", ("neg", "pos"),
                                    img_size, mean, flips)
    return roc_auc_score(y, prob[:, 1])


def _record_calls(monkeypatch, name):
    """Wrap ``training_runs.<name>`` (the typed staged training) to record the options object
    each call gets as ``plan``."""
    import training_runs
    calls, original = [], getattr(training_runs, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs["plan"])
        return original(*args, **kwargs)
    monkeypatch.setattr(training_runs, name, wrapper)
    return calls


@pytest.mark.slow
def test_image_clf_train_end_to_end_from_patch_model(data, model_files, tmp_path,
                                                     keras_session, monkeypatch):
    best, final = tmp_path / "ms" / "best.h5", tmp_path / "ms" / "final.h5"
    calls = _record_calls(monkeypatch, "train_2stage")
    result = image_clf_train.main(split_dirs(data, "img") + ["--frozen-bn-mode", "moving",
        "--patch-model-state", str(model_files["patch"]), "--img-size", "64", "48",
        "--rescale-factor", "0.003891", "--featurewise-mean", "50", "--patch-net", "vgg16",
        "--block-type", "vgg", "--top-depths", "8", "--top-repetitions", "1",
        "--batch-size", "4", "--nb-epoch", "1", "--all-layer-epochs", "1", "--optimizer", "adam",
        "--init-learningrate", "0.001", "--load-val-ram", "--bias-multiplier", "0.1",
        "--img-cache-dir", str(tmp_path / "cache"),
        "--best-model", str(best), "--final-model", str(final)])
    n_images = sum(1 for p in (data / "img").rglob("*.png"))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == n_images  # train, val and test
    hist = result["history"]
    assert result["epochs"] == 2 and len(hist["val_auc"]) == 2 and len(hist["loss"]) == 2
    assert result["best_val_auc"] == pytest.approx(max(hist["val_auc"]))
    assert result["test_auc"] == pytest.approx(_test_auc(best, data, (64, 48), 50), abs=1e-6)
    assert result["test_auc_augmented"] == pytest.approx(
        _test_auc(best, data, (64, 48), 50, flips=True), abs=1e-6)
    assert best.is_file() and final.is_file()
    _check_options_json(result, {"img_size": [64, 48], "bias_multiplier": 0.1, "optim": "adam",
                                 "frozen_bn_mode": "moving"})
    assert [c.frozen_bn_mode for c in calls] == ["moving"]
    import dm_keras_ext
    reloaded = dm_keras_ext.robust_load_model(best)
    assert reloaded.input_shape == (None, 64, 48, 3) and reloaded.output_shape == (None, 2)


@pytest.mark.slow
def test_patch_clf_train_end_to_end_staged(data, model_files, tmp_path, keras_session,
                                           monkeypatch):
    import dm_keras_ext

    best = tmp_path / "patch_best.h5"
    calls = _record_calls(monkeypatch, "train_3stage")
    result = patch_clf_train.main(split_dirs(data, "patch") + [
        "--resume-from", str(model_files["patch"]), "--net", "vgg16", "--top-layer-nb", "3",
        "--img-size", "32", "32", "--rescale-factor", "0.003891", "--featurewise-mean", "50",
        "--batch-size", "6", "--nb-epoch", "1", "--top-layer-epochs", "1",
        "--all-layer-epochs", "0", "--optimizer", "adam", "--init-learningrate", "0.001",
        "--load-train-ram", "--auto-batch-balance", "--best-model", str(best)])
    assert [s.split(" (")[0] for s in result["stages"]] == ["stage 1", "stage 2"]
    assert len(result["history"]["val_accuracy"]) == 2
    z, y = _test_set_predictions(best, data / "patch" / "test",
                                 ("background", "malignant", "benign"), (32, 32), 50,
                                 equalize=True, logits=True)   # equalised: the patch default
    assert result["test_accuracy"] == pytest.approx(np.mean(z.argmax(1) == y))
    log_prob = z - np.logaddexp.reduce(z, axis=1, keepdims=True)   # exact, even when saturated
    assert result["test_loss"] == pytest.approx(-log_prob[np.arange(len(y)), y].mean(), rel=1e-4)
    _check_options_json(result, {"net": "vgg16", "top_layer_nb": 3, "auto_batch_balance": True,
                                 "frozen_bn_mode": "batch"})
    assert [c.frozen_bn_mode for c in calls] == ["batch"]
    assert dm_keras_ext.robust_load_model(best).output_shape == (None, 3)
    # the test confusion matrix and one-vs-rest AUROC, beside the model
    from sklearn.metrics import confusion_matrix, roc_auc_score
    rep = result["test_confusion"]
    assert rep["counts"] == confusion_matrix(y, z.argmax(1), labels=[0, 1, 2]).tolist()
    prob = np.exp(log_prob)
    for j, name in enumerate(("background", "malignant", "benign")):
        assert rep["auroc_ovr"][name] == pytest.approx(roc_auc_score(y == j, prob[:, j]),
                                                       abs=1e-6)
    for suffix in (".test.confusion.csv", ".test.confusion.png", ".test.metrics.json"):
        assert (tmp_path / f"patch_best.h5{suffix}").is_file()


@pytest.mark.slow
def test_patch_clf_train_last_epoch_model_and_test_flips(data, model_files, tmp_path,
                                                         keras_session):
    """--last-epoch-model keeps the last epoch's model although validation peaks elsewhere;
    --test-augment scores the test patches as the mean of their 4 flips."""
    import csv

    import dm_keras_ext

    best = tmp_path / "patch_last.h5"
    result = patch_clf_train.main(split_dirs(data, "patch") + [
        "--resume-from", str(model_files["patch"]), "--net", "vgg16", "--img-size", "32", "32",
        "--rescale-factor", "0.003891", "--featurewise-mean", "50", "--batch-size", "6",
        "--nb-epoch", "3", "--top-layer-epochs", "0", "--all-layer-epochs", "0",
        "--optimizer", "adam", "--init-learningrate", "0.01", "--auc-checkpoint",
        "--last-epoch-model", "--test-augment", "--best-model", str(best)])
    assert result["epochs"] == 3 and result["best_epoch"] == 3
    assert result["best_by"] == "last_epoch"
    kept = dm_keras_ext.robust_load_model(best).get_weights()
    last = dm_keras_ext.robust_load_model(str(best) + ".last.h5").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(kept, last))
    prob, y = _test_set_predictions(best, data / "patch" / "test",
                                    ("background", "malignant", "benign"), (32, 32), 50,
                                    flips=True, equalize=True)
    plain, _ = _test_set_predictions(best, data / "patch" / "test",
                                     ("background", "malignant", "benign"), (32, 32), 50,
                                     equalize=True)
    assert not np.allclose(prob, plain, atol=1e-4)     # the flips change the scores here
    with open(str(best) + ".test.predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    saved = np.array([[float(r[f"p_{c}"]) for c in ("background", "malignant", "benign")]
                      for r in rows])
    np.testing.assert_allclose(saved, prob, atol=1e-4)
    metrics = json.loads(Path(str(best) + ".test.metrics.json").read_text())
    assert metrics["scores"] == "flips"


@pytest.mark.slow
def test_seed_flag_is_the_runs_seed(data, model_files, tmp_path, keras_session, monkeypatch):
    """``--seed N`` trains the model RANDOM_SEED=N trains, is the same run for resuming, and
    another seed trains another model."""
    import tf_keras as keras

    def train(best, *extra):
        keras.backend.clear_session()
        return patch_clf_train.main(split_dirs(data, "patch") + [
            "--resume-from", str(model_files["patch"]), "--net", "vgg16", "--img-size", "32",
            "32", "--rescale-factor", "0.003891", "--batch-size", "6", "--nb-epoch", "1",
            "--top-layer-epochs", "0", "--all-layer-epochs", "0", "--hidden-dropout", "0.5",
            "--best-model", str(tmp_path / best), *extra])

    def weights(best):
        import dm_keras_ext
        return dm_keras_ext.robust_load_model(tmp_path / best).get_weights()

    monkeypatch.setenv("RANDOM_SEED", "7")
    train("env7.h5")
    monkeypatch.delenv("RANDOM_SEED")
    train("flag7.h5", "--seed", "7")
    train("flag8.h5", "--seed", "8")
    assert all(np.array_equal(a, b) for a, b in zip(weights("env7.h5"), weights("flag7.h5")))
    assert not all(np.array_equal(a, b) for a, b in zip(weights("env7.h5"), weights("flag8.h5")))
    saved = json.loads((tmp_path / "flag7.h5.options.json").read_text())
    assert (saved["seed"], saved["environment"]["RANDOM_SEED"]) == (7, 7)
    monkeypatch.setenv("RANDOM_SEED", "7")     # the same run, asked for the other way
    assert train("flag7.h5")["complete"] is True


# ------------------------------------------------------------------ shell scripts, README command
def _script_argv(name):
    """The argv the example script passes to python (bash expands it; python is stubbed)."""
    cmd = f'python() {{ printf "%s\\0" "$@"; }}; cd "{SCRIPTS_DIR}"; . ./{name}'
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\0")[:-1]


SCRIPTS = {"train_patch_clf_im4096_256_3Cls.sh": patch_clf_train,
           "train_image_clf_im1152.sh": image_clf_train,
           "train_image_clf_inbreast.sh": image_clf_train}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_shell_scripts_syntax_and_flags_accepted(name):
    subprocess.run(["bash", "-n", str(SCRIPTS_DIR / name)], check=True, timeout=30)
    argv = _script_argv(name)
    assert argv[0] == SCRIPTS[name].__name__ + ".py"
    args = SCRIPTS[name].get_args_parser().parse_args(argv[1:])   # SystemExit on a bad flag
    assert args.train_dir and args.test_dir
    if name == "train_image_clf_im1152.sh":
        assert args.bias_multiplier == 0.1 and args.patch_model_state is not None
        assert args.kept_layer_idx == -5


def _options(tokens):
    """``{flag: [values]}`` of a command's tokens, in order."""
    opts, flag = {}, None
    for tok in tokens:
        if tok.startswith("--"):
            flag = tok
            opts[flag] = []
        elif flag is not None:
            opts[flag].append(tok)
    return opts


def test_inbreast_script_is_the_companion_page_command():
    """The companion page's command, with the flags the 2017 script also passed."""
    if not SEED_PAGE.is_file():
        pytest.skip(f"{SEED_PAGE} is absent")
    text = SEED_PAGE.read_text()
    end = text.index("$TRAIN_DIR $VAL_DIR $TEST_DIR")
    block = text[text.index("python image_clf_train.py"):end]
    page = _options(block.replace("\\", " ").split()[2:])
    script = (SCRIPTS_DIR / "train_image_clf_inbreast.sh").read_text()
    sblock = script[script.index("image_clf_train.py"):script.index("$TRAIN_DIR $VAL_DIR")]
    ours = _options(sblock.replace("\\", " ").split()[1:])
    assert {f: v for f, v in ours.items() if f in page} == page
    assert [f for f in ours if f in page] == list(page)                  # same order
    assert {f: v for f, v in ours.items() if f not in page} == {
        "--patch-net": ["resnet50"], "--block-type": ["resnet"], "--top-depths": ["512", "512"],
        "--top-repetitions": ["2", "2"], "--bottleneck-enlarge-factor": ["2"],
        "--no-add-heatmap": [], "--avg-pool-size": ["7", "7"], "--add-conv": [],
        "--no-add-shortcut": [], "--hm-strides": ["1", "1"], "--hm-pool-size": ["5", "5"],
        "--fc-init-units": ["64"], "--fc-layers": ["2"], "--lr-patience": ["2"],
        "--pos-cls-weight": ["1.0"], "--neg-cls-weight": ["1.0"]}


def _readme_argv(model, data, best, img_size):
    """The companion page command with paths, image size and epochs substituted."""
    argv = _script_argv("train_image_clf_inbreast.sh")[1:]
    subs = {"ddsm_vgg16_s10_[512-512-1024]x2_hybrid.h5": str(model),
            "INbreast/transferred_inbreast_best_model.h5": str(best)}
    subs.update(zip(["INbreast/train", "INbreast/val", "INbreast/test"], split_dirs(data, "img")))
    argv = [subs.get(a, a) for a in argv]
    i = argv.index("--img-size")
    argv[i + 1:i + 3] = [str(v) for v in img_size]
    argv[argv.index("--all-layer-epochs") + 1] = "1"
    return argv


@pytest.mark.slow
def test_readme_finetuning_command_runs(data, model_files, tmp_path, keras_session,
                                        monkeypatch):
    monkeypatch.setenv("NUM_CPU_CORES", "4")
    best = tmp_path / "transferred_inbreast_best_model.h5"
    result = image_clf_train.main(_readme_argv(model_files["image"], data, best, IMG_HW))
    assert result["epochs"] == 1 and len(result["history"]["val_auc"]) == 1   # stage 1 skipped
    assert best.is_file()
    assert result["test_auc"] == pytest.approx(_test_auc(best, data, IMG_HW, 44.33), abs=1e-6)
    _check_options_json(result, {"nb_epoch": 0, "optim": "adam", "featurewise_mean": 44.33,
                                 "load_train_ram": True, "weight_decay2": 0.01})


@pytest.mark.slow
@pytest.mark.real_data
def test_readme_finetuning_command_on_keras208_model(data, keras208_dir, tmp_path,
                                                     keras_session, monkeypatch):
    model = keras208_dir / "tiny_image_vgg_top.h5"
    if not model.is_file():
        pytest.skip(f"{model} is absent")
    monkeypatch.setenv("NUM_CPU_CORES", "4")
    best = tmp_path / "best.h5"
    result = image_clf_train.main(_readme_argv(model, data, best, (96, 64)))
    assert result["epochs"] == 1
    assert result["test_auc"] == pytest.approx(_test_auc(best, data, (96, 64), 44.33), abs=1e-6)
    import dm_keras_ext
    assert dm_keras_ext.robust_load_model(best).output_shape == (None, 2)


# ------------------------------------------------------------------ run files
def test_outputs_that_overlap_inputs_stop_before_work(data, model_files, capsys, tmp_path,
                                                      monkeypatch):
    monkeypatch.delenv("NUM_GPU_DEVICES", raising=False)
    patch = tmp_path / "in" / "patch.h5"
    patch.parent.mkdir()
    patch.write_bytes(model_files["patch"].read_bytes())
    img = split_dirs(data, "img") + ["--img-size", "64", "48", "--rescale-factor", "0.003891"]
    for extra, message in [
            (["--patch-model-state", str(patch), "--best-model", str(patch)],
             "--best-model {0} is the input --patch-model-state {0}".format(patch)),
            (["--patch-model-state", str(patch), "--best-model", str(tmp_path / "b.h5"),
              "--final-model", str(tmp_path / "b.h5")], "are the same path"),
            (["--patch-model-state", str(patch), "--best-model",
              str(data / "img" / "train" / "neg" / "b.h5")],
             "inside the input folder TRAIN_DIR")]:
        with pytest.raises(SystemExit) as exc:
            image_clf_train.main(img + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in", "patch.h5"]
    assert patch.read_bytes() == model_files["patch"].read_bytes()


def test_second_run_into_a_locked_best_model_refuses(data, capsys, tmp_path, monkeypatch):
    import subprocess
    monkeypatch.delenv("NUM_GPU_DEVICES", raising=False)
    best = tmp_path / "best.h5"
    holder = subprocess.Popen(["sleep", "60"])
    try:
        Path(str(best) + ".lock").write_text(json.dumps(
            {"pid": holder.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(SystemExit) as exc:
            patch_clf_train.main(split_dirs(data, "patch") + [
                "--best-model", str(best), "--img-size", "32", "32", "--nb-epoch", "1",
                "--rescale-factor", "0.003891"])
        assert exc.value.code == 2
        assert f"(process {holder.pid}, lock file {best}.lock)" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.h5.lock"]


def test_stale_lock_and_leftovers_of_a_killed_run_are_cleared(data, capsys, tmp_path,
                                                              monkeypatch):
    """A killed run's lock (its process gone) is taken over, its temporary file removed, and
    the lock is released when the new run stops on an error."""
    import subprocess
    monkeypatch.delenv("NUM_GPU_DEVICES", raising=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    best = tmp_path / "best.h5"
    Path(str(best) + ".lock").write_text(json.dumps(
        {"pid": dead.pid, "host": __import__("socket").gethostname()}))
    leftover = tmp_path / f".best.h5.ddsm{dead.pid}.k2j4_x.tmp"
    leftover.write_bytes(b"half a model")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file")
    with pytest.raises(SystemExit) as exc:
        image_clf_train.main(split_dirs(data, "img") + [
            "--patch-model-state", str(bad), "--img-size", "64", "48",
            "--rescale-factor", "0.003891", "--best-model", str(best)])
    assert exc.value.code == 2 and "bad.h5" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]
