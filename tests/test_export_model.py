"""export_model and score_exported: the exported model scores as image_clf_predict does, the
scorer runs without TensorFlow, a model without a recipe is refused, a converter failure still
leaves the SavedModel and the card."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import dm_image
import export_model
import image_clf_predict as icp
import score_exported
from conftest import write_scoring_classes

H, W = 32, 24
RESCALE = 255 / 65535
MEAN = 40.0
RECIPE_FLAGS = ["--img-size", str(H), str(W), "--rescale-factor", str(RESCALE),
                "--featurewise-mean", str(MEAN)]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return write_scoring_classes(tmp_path_factory.mktemp("cls"), 3, (H * 2, W * 2))


def _tiny_model(keras, fixed=True, seed=1):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((H, W, 3) if fixed else (None, None, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="out")(x)
    model = keras.Model(inp, out)
    from conftest import randomise_bn
    randomise_bn(model)
    return model


def _save(model, path, recipe=None):
    import dm_keras_ext

    dm_keras_ext.save_model_atomic(model, str(path), include_optimizer=False, recipe=recipe)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny whole-image model carrying its input recipe, with an options file beside it."""
    import tf_keras as keras

    keras.backend.clear_session()
    folder = tmp_path_factory.mktemp("model")
    recipe = dm_image.InputRecipe(img_size=(H, W), channels=3, rescale_factor=RESCALE,
                                  featurewise_center=True, featurewise_mean=MEAN)
    path = _save(_tiny_model(keras), folder / "tiny.h5", recipe)
    (folder / "tiny.h5.options.json").write_text(json.dumps(
        {"net": "tiny", "train_dir": str(folder / "nowhere"), "class_list": ["neg", "pos"]}))
    return path


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "export"
    summary = export_model.main([str(model_file), "--out", str(out), "--flips"])
    return out, summary


def _predict(model, img_dir, out, *extra):
    icp.main(["--model", str(model), "--img-dir", str(img_dir), "--out-dir", str(out),
              "--bootstrap", "0", "--batch-size", "3", *extra])
    return pd.read_csv(out / "image_predictions.csv", keep_default_na=False)


def _score(export_dir, img_dir, out, *extra):
    score_exported.main([str(export_dir), "--img-dir", str(img_dir), "--out-dir", str(out),
                         *extra])
    return pd.read_csv(out / "image_predictions.csv", keep_default_na=False)


def _assert_same_scores(ours, theirs):
    assert list(ours.columns) == ["image_index", "malignant_pred", "malignant_label"]
    theirs = theirs.set_index("image_index").loc[ours.image_index]
    assert list(ours.malignant_label.astype(str)) == list(theirs.malignant_label.astype(str))
    mine = pd.to_numeric(ours.malignant_pred, errors="coerce").to_numpy()
    ref = pd.to_numeric(theirs.malignant_pred, errors="coerce").to_numpy()
    assert np.array_equal(np.isnan(mine), np.isnan(ref))
    np.testing.assert_allclose(mine[~np.isnan(mine)], ref[~np.isnan(ref)], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ export
def test_export_writes_onnx_savedmodel_recipe_and_card(exported, model_file):
    out, summary = exported
    assert summary["onnx_max_abs_diff"] < 1e-5
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["img_size"] == [H, W] and recipe["channels"] == 3 and recipe["flips"] is True
    assert recipe["rescale_factor"] == pytest.approx(RESCALE)
    assert recipe["featurewise_mean"] == MEAN and recipe["equalize_hist"] is False
    assert "INTER_CUBIC" in recipe["resize"]
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["net"] == "tiny" and card["training"]["options"]["net"] == "tiny"
    assert "Research only" in card["intended_use"] and "CBIS-DDSM" in card["limits"]
    for name, digest in card["files"].items():   # every file of the folder but the cards
        assert export_model.sha256_of(out / name) == digest
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - set(card["files"]) == {"model_card.md", "model_card.json",
                                           ".ddsm_outputs.json"}
    assert card["versions"]["onnxruntime"] and card["versions"]["tf2onnx"]
    md = (out / "model_card.md").read_text()
    assert "Research only" in md and card["model"]["sha256"] in md


def test_savedmodel_gives_the_keras_probabilities(exported, model_file, keras_session):
    import tensorflow as tf
    from dm_keras_ext import robust_load_model

    out, _ = exported
    x = np.random.default_rng(0).normal(0, 50, (3, H, W, 3)).astype("float32")
    loaded = tf.saved_model.load(str(out / "saved_model"))
    probs = loaded.signatures["serving_default"](input=tf.constant(x))["probs"].numpy()
    np.testing.assert_allclose(probs, robust_load_model(str(model_file)).predict(x, verbose=0),
                               atol=1e-6)


# ------------------------------------------------------------------ same scores as prediction
@pytest.mark.parametrize("flips", [False, True])
def test_scores_equal_the_prediction_tool(exported, model_file, class_dir, tmp_path, flips):
    out, _ = exported
    ours = _score(out, class_dir, tmp_path / "ours", "--flips" if flips else "--no-flips")
    theirs = _predict(model_file, class_dir, tmp_path / "theirs",
                      *(["--test-augment"] if flips else []))
    _assert_same_scores(ours, theirs)
    assert ours.set_index("image_index").loc["pos/broken.png", "malignant_pred"] == ""
    summary = json.loads((tmp_path / "ours" / "score_summary.json").read_text())
    assert summary["flips"] is flips and summary["n_errors"] == 1
    assert "broken.png" in summary["errors"][0][0]


def test_the_recipe_flips_are_the_default(exported, model_file, class_dir, tmp_path):
    out, _ = exported
    ours = _score(out, class_dir, tmp_path / "ours")
    theirs = _predict(model_file, class_dir, tmp_path / "theirs", "--test-augment")
    _assert_same_scores(ours, theirs)


def _write_dicom(path, pixels):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality, (ds.Rows, ds.Columns) = "MG", pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_every_format_and_exam_lists_as_the_prediction_tool(exported, model_file, tmp_path):
    """16-bit and 8-bit PNG, JPEG, 12-bit DICOM; a non-finite TIFF skipped; breast table."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    img16 = rng.integers(1000, 60000, (70, 50)).astype(np.uint16)
    cv2.imwrite(str(folder / "1_L_CC.png"), img16)
    cv2.imwrite(str(folder / "1_R_CC.png"), (img16 // 257).astype(np.uint8))
    cv2.imwrite(str(folder / "1_L_MLO.jpg"), (img16 // 300).astype(np.uint8))
    _write_dicom(folder / "1_R_MLO.dcm", img16 // 16)
    nan = rng.uniform(0, 1, (40, 30)).astype(np.float32)
    nan[3, 4] = np.nan
    cv2.imwrite(str(folder / "2_L_CC.tiff"), nan)
    exams = [{"L-CC": ["1_L_CC"], "R-CC": ["1_R_CC"], "L-MLO": ["1_L_MLO"],
              "R-MLO": ["1_R_MLO"], "horizontal_flip": "NO",
              "cancer_label": {"left_malignant": 0, "right_malignant": 1}},
             {"L-CC": ["2_L_CC"], "R-CC": [], "L-MLO": [], "R-MLO": [], "horizontal_flip": "NO"}]
    exam_list = tmp_path / "exams.json"
    exam_list.write_text(json.dumps(exams))
    out, _ = exported
    score_exported.main([str(out), "--exam-list", str(exam_list), "--img-dir", str(folder),
                         "--out-dir", str(tmp_path / "ours")])
    icp.main(["--model", str(model_file), "--exam-list", str(exam_list), "--img-dir",
              str(folder), "--out-dir", str(tmp_path / "theirs"), "--bootstrap", "0",
              "--test-augment"])
    read = lambda p: pd.read_csv(p, keep_default_na=False)  # noqa: E731
    ours = read(tmp_path / "ours" / "image_predictions.csv")
    _assert_same_scores(ours, read(tmp_path / "theirs" / "image_predictions.csv"))
    assert ours.malignant_pred.iloc[-1] == "" and (ours.malignant_pred.iloc[:4] != "").all()
    b_ours = read(tmp_path / "ours" / "breast_predictions.csv")
    b_theirs = read(tmp_path / "theirs" / "breast_predictions.csv")
    assert list(b_ours.columns) == ["index", "left_malignant", "right_malignant"]
    np.testing.assert_allclose(b_ours.iloc[0, 1:].astype(float),
                               b_theirs.iloc[0, 1:].astype(float), atol=1e-5)
    assert b_ours.left_malignant.iloc[1] == "" and b_ours.right_malignant.iloc[1] == ""


def test_real_mammograms_as_the_prediction_tool(real_mammogram_dir, tmp_path, keras_session):
    keras = keras_session
    recipe = dm_image.InputRecipe(img_size=(288, 224), channels=3, rescale_factor=RESCALE,
                                  featurewise_center=True, featurewise_mean=52.16)
    model = _save(_tiny_model(keras, fixed=False, seed=4), tmp_path / "open.h5", recipe)
    out = tmp_path / "export"
    export_model.run(str(model), str(out))
    imgs = sorted(real_mammogram_dir.glob("*.png"))
    assert len(imgs) == 4
    for flips in (False, True):
        flag = "--flips" if flips else "--no-flips"
        ours = _score(out, real_mammogram_dir, tmp_path / f"ours{flips}", flag)
        theirs = _predict(model, real_mammogram_dir, tmp_path / f"theirs{flips}",
                          *(["--test-augment"] if flips else []))
        assert len(ours) == 4 and (ours.malignant_pred != "").all()
        _assert_same_scores(ours, theirs)


def test_backbone_preprocessing_is_built_into_the_export(tmp_path, class_dir, keras_session):
    """A recipe without centring that names a backbone's preprocessing (vgg16: BGR order,
    ImageNet means) scores as the prediction tool, which applies it in NumPy."""
    recipe = dm_image.InputRecipe(img_size=(H, W), channels=3, rescale_factor=RESCALE,
                                  featurewise_center=False, preprocess="vgg16")
    model = _save(_tiny_model(keras_session, seed=5), tmp_path / "vgg.h5", recipe)
    summary = export_model.run(str(model), str(tmp_path / "export"))
    assert summary["recipe"]["preprocess_in_model"] is True
    assert summary["onnx_max_abs_diff"] < 1e-5
    ours = _score(tmp_path / "export", class_dir, tmp_path / "ours", "--no-flips")
    _assert_same_scores(ours, _predict(model, class_dir, tmp_path / "theirs"))


def test_keras208_model_with_its_recipe_given_by_flags(keras208_dir, class_dir, tmp_path):
    """A 2017 Keras 2.0.8 file (96x64 input) holds no recipe: the flags state it; ONNX gives
    the 2017 outputs, and the scorer the prediction tool's scores."""
    model = keras208_dir / "tiny_image_vgg_top.h5"
    flags = ["--img-size", "96", "64", "--rescale-factor", str(RESCALE),
             "--featurewise-mean", "50"]
    out = tmp_path / "export"
    summary = export_model.main([str(model), "--out", str(out), *flags])
    assert summary["onnx_max_abs_diff"] < 1e-5
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["img_size"] == [96, 64] and recipe["featurewise_mean"] == 50.0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(keras208_dir / "tiny_image_vgg_top_x.npy").astype("float32")
    np.testing.assert_allclose(sess.run(None, {"input": x})[0],
                               np.load(keras208_dir / "tiny_image_vgg_top_y.npy"), atol=1e-5)
    ours = _score(out, class_dir, tmp_path / "ours", "--flips")
    theirs = _predict(model, class_dir, tmp_path / "theirs", "--test-augment", *flags)
    _assert_same_scores(ours, theirs)


# ------------------------------------------------------------------ refusals and failures
def test_a_model_without_recipe_is_refused_naming_what_is_missing(tmp_path, keras_session,
                                                                   capsys):
    model = tmp_path / "bare.h5"
    _tiny_model(keras_session, fixed=False).save(model)     # no recipe
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as exc:
        export_model.main([str(model), "--out", str(out), "--rescale-factor", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "holds no input recipe" in err[0] and str(model) in err[0]
    assert "--img-size" in err[0] and "--featurewise-mean" in err[0]
    assert "--rescale-factor" not in err[0]
    assert not out.exists()
    with pytest.raises(export_model.ExportError, match="--rescale-factor"):
        export_model.run(str(model), str(out), img_size=[H, W], featurewise_center=False)
    assert not out.exists()
    summary = export_model.run(str(model), str(out), img_size=[H, W], img_scale=255.0,
                               featurewise_center=False)   # stated: exported
    assert summary["recipe"]["img_scale"] == 255.0 and summary["onnx"]


def test_converter_failure_keeps_savedmodel_and_card(model_file, tmp_path, monkeypatch,
                                                     class_dir):
    out = tmp_path / "export"
    export_model.run(str(model_file), str(out))
    assert (out / "model.onnx").is_file()

    def fail(serve):
        raise RuntimeError("unsupported op FancyOp")

    monkeypatch.setattr(export_model, "convert_to_onnx", fail)
    summary = export_model.run(str(model_file), str(out))
    assert summary["onnx"] is None and "unsupported op FancyOp" in summary["onnx_reason"]
    assert not (out / "model.onnx").exists()           # the earlier run's file is gone
    assert (out / "saved_model" / "saved_model.pb").is_file() and (out / "recipe.json").is_file()
    card = json.loads((out / "model_card.json").read_text())
    assert card["onnx"]["written"] is False and "FancyOp" in card["onnx"]["reason"]
    assert "model.onnx" not in card["files"]
    assert "not written" in (out / "model_card.md").read_text()
    with pytest.raises(ValueError, match="no model.onnx"):
        score_exported.run(str(out), img_dir=str(class_dir), out_dir=str(tmp_path / "s"))


def test_card_carries_the_test_metrics_and_warnings(model_file, tmp_path):
    import eval_metrics

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(40)].astype(int)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    res = eval_metrics.evaluate_scores(y, s, n_boot=50, seed=1,
                                       val_thresholds={"youden": 0.5, "sens_0.9": 0.3})
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"image": {"model_a": res}, "settings": {},
                                   "warnings": ["validation loss rose for 5 epochs"]},
                                  default=float))
    out = tmp_path / "export"
    export_model.run(str(model_file), str(out), metrics=str(metrics))
    card = json.loads((out / "model_card.json").read_text())
    got = card["metrics"]["results"]["image/model_a"]
    assert got["auroc"] == pytest.approx(res["auroc"]) and len(got["auroc_ci"]) == 2
    point = got["operating_points"]["youden"]
    assert point["chosen_on"] == "validation" and len(point["sensitivity_ci"]) == 2
    assert "ece" in got["calibration"]
    assert card["metrics"]["warnings"] == ["validation loss rose for 5 epochs"]
    md = (out / "model_card.md").read_text()
    assert "validation loss rose for 5 epochs" in md and "youden" in md and "95% CI" in md
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n": 3}))
    with pytest.raises(ValueError, match="no result with an AUROC"):
        export_model.run(str(model_file), str(tmp_path / "e2"), metrics=str(bad))
    assert not (tmp_path / "e2").exists()


def test_card_carries_the_run_that_made_the_model(model_file, tmp_path):
    """``--run-info``: the run's learning-health warnings, data counts, training command and
    config go into both cards; a file that is not a JSON object is refused before anything
    is written."""
    info = {"config_file": "small.toml", "pipeline_config": "[predict]\nflips = true\n",
            "training_command": ["image_clf_train", "--nb-epoch", "1"],
            "data_counts": {"whole images": {"train": {"neg": 7, "pos": 5}}},
            "warnings": [{"code": "best_epoch_first", "message": "the best epoch is the first",
                          "source": "models/image_clf.h5.log.csv"}]}
    path = tmp_path / "run_info.json"
    path.write_text(json.dumps(info))
    out = tmp_path / "export"
    export_model.main([str(model_file), "--out", str(out), "--run-info", str(path)])
    card = json.loads((out / "model_card.json").read_text())
    assert card["run"]["warnings"] == info["warnings"]
    assert card["run"]["sha256"] == export_model.sha256_of(path)
    md = (out / "model_card.md").read_text()
    for text in ("`best_epoch_first`: the best epoch is the first (models/image_clf.h5.log.csv)",
                 "- train: neg 7, pos 5 (total 12)", "image_clf_train --nb-epoch 1",
                 "flips = true", "Learning-health warnings of the run: 1"):
        assert text in md, text
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="--run-info .*bad.json: should hold a JSON object"):
        export_model.run(str(model_file), str(tmp_path / "e2"), run_info=str(bad))
    assert not (tmp_path / "e2").exists()


def test_scorer_output_guards(exported, class_dir, tmp_path):
    out, _ = exported
    for bad in (class_dir / "scores", out / "scores", class_dir):
        with pytest.raises(ValueError, match="inside the input folder"):
            score_exported.run(str(out), img_dir=str(class_dir), out_dir=str(bad))
        assert not (class_dir / "scores").exists() and not (out / "scores").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "image_predictions.csv").write_text("my own file\n")
    with pytest.raises(FileExistsError, match="image_predictions.csv"):
        score_exported.run(str(out), img_dir=str(class_dir), out_dir=str(mine))
    assert (mine / "image_predictions.csv").read_text() == "my own file\n"


_NO_TF_SCRIPT = """
import importlib.abc, os, runpy, sys
BLOCKED = {"tensorflow", "tf_keras", "keras", "h5py", "pandas", "scipy", "sklearn",
           "matplotlib", "tf2onnx"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))   # as `python SCRIPT`
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LOADED", loaded)
"""


def test_the_scorer_runs_without_tensorflow(exported, class_dir, tmp_path):
    """As a script, in a fresh process where TensorFlow, pandas, h5py ... cannot be imported;
    none is in sys.modules at the end."""
    out, _ = exported
    script = tmp_path / "no_tf.py"
    script.write_text(_NO_TF_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), str(REPO / "ddsm_train" /
                                                         "score_exported.py"),
                          str(out), "--img-dir", str(class_dir), "--out-dir",
                          str(tmp_path / "scores")], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED []" in res.stdout, res.stdout
    table = pd.read_csv(tmp_path / "scores" / "image_predictions.csv")
    assert len(table) == 7 and table.malignant_pred.notna().sum() == 6


def test_a_non_finite_model_output_is_reported_and_skipped(class_dir):
    class NaNFirst:
        nb_class = 2

        def read_options(self):
            return dict(img_size=(H, W), rescale_factor=RESCALE, featurewise_mean=MEAN,
                        channels=3)

        def predict(self, x):
            out = np.full((len(x), 2), 0.5)
            out[0] = np.nan
            return out

    from image_inputs import collect_class_folders

    items = collect_class_folders(class_dir, ["neg", "pos"])
    probs, errors = score_exported.score_images(NaNFirst(), items, False, 3)
    assert errors[0] == "the model's output is not finite" and np.isnan(probs[0]).all()
    assert errors[1] == "" and probs[1, 1] == 0.5


def test_a_failed_savedmodel_write_leaves_the_earlier_export(model_file, tmp_path,
                                                             monkeypatch):
    import tensorflow as tf

    out = tmp_path / "export"
    export_model.run(str(model_file), str(out))
    before = (out / "saved_model" / "saved_model.pb").read_bytes()

    def broken_save(obj, path, signatures=None):
        Path(path).mkdir()
        (Path(path) / "saved_model.pb").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        export_model.run(str(model_file), str(out))
    assert (out / "saved_model" / "saved_model.pb").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".saved_model")) == []
