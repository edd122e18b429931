"""image_clf_predict: class folders, lists, exam lists, flips, averaging, bad input, real data."""
import json
import pickle

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

import dm_image
import image_clf_predict as icp
from conftest import write_scoring_classes, write_spot_image

H, W = 32, 24
RESCALE = 255 / 65535
MEAN = 40.0


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return write_scoring_classes(tmp_path_factory.mktemp("cls"), 4, (H * 2, W * 2))


def _tiny_model(keras, channels=3, seed=0, fixed=True):
    keras.utils.set_random_seed(seed)
    shape = (H, W, channels) if fixed else (None, None, channels)
    inp = keras.Input(shape)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="out")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def trained_models(class_dir, tmp_path_factory):
    """Two small models: one trained a few steps on the synthetic set, one random."""
    import tf_keras as keras

    keras.backend.clear_session()
    out = tmp_path_factory.mktemp("models")
    files = sorted((class_dir / "neg").glob("*.png")) + sorted((class_dir / "pos").glob("p*.png"))
    X = np.stack([_reference_input(f, 3) for f in files])
    y = np.array([0] * 4 + [1] * 4)
    m1 = _tiny_model(keras, seed=1)
    m1.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    m1.fit(X, y, epochs=15, batch_size=8, verbose=0)
    m2 = _tiny_model(keras, seed=2, fixed=False)
    paths = [out / "m1.h5", out / "m2.h5"]
    m1.save(paths[0])
    m2.save(paths[1])
    m3 = _tiny_model(keras, channels=1, seed=3)
    m3.save(out / "gray.h5")
    return paths, out / "gray.h5"


def _reference_input(path, channels):
    img = dm_image.read_resize_img(path, target_size=(H, W), rescale_factor=RESCALE)
    return np.repeat((img - MEAN)[..., None], channels, axis=-1).astype("float32")


def _reference_pred(model, paths, flips):
    X = np.stack([_reference_input(p, model.input_shape[-1]) for p in paths])
    views = [X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1]] if flips else [X]
    return np.mean([model.predict(v, verbose=0) for v in views], axis=0)


BASE = ["--img-size", str(H), str(W), "--rescale-factor", str(RESCALE), "--featurewise-mean",
        str(MEAN), "--bootstrap", "200", "--batch-size", "3"]


@pytest.mark.slow
def test_class_folders_flips_and_averaging(class_dir, trained_models, tmp_path, keras_session):
    paths, _ = trained_models
    out = tmp_path / "out"
    summary = icp.main(["--model", *map(str, paths), "--img-dir", str(class_dir),
                        "--test-augment", "--out-dir", str(out), *BASE])
    df = pd.read_csv(out / "image_predictions.csv", keep_default_na=False)
    assert list(df.columns[:6]) == ["image_index", "malignant_pred", "malignant_label",
                                    "prob_neg", "prob_pos", "error"]
    assert len(df) == 9 and summary["n_scored"] == 8 and summary["n_errors"] == 1
    bad = df[df.image_index == "pos/broken.png"].iloc[0]
    assert bad.malignant_pred == "" and "broken.png" in bad.error and "decode" in bad.error
    good = df[df.error == ""]
    files = [class_dir / i for i in good.image_index]
    from dm_keras_ext import robust_load_model
    ref = np.mean([_reference_pred(robust_load_model(str(p)), files, True) for p in paths],
                  axis=0)
    np.testing.assert_allclose(good[["prob_neg", "prob_pos"]].astype(float), ref, atol=1e-5)
    y = good.malignant_label.astype(int).to_numpy()
    assert list(y) == [0] * 4 + [1] * 4
    s = good.malignant_pred.astype(float).to_numpy()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image"]["auroc"] == pytest.approx(roc_auc_score(y, s))
    p, r, _ = precision_recall_curve(y, s)
    assert metrics["image"]["auprc"] == pytest.approx(auc(r, p))
    assert metrics["image"]["bootstrap"]["n_boot"] == 200
    assert metrics["n_errors"] == 1
    for name in ("roc_image.png", "pr_image.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "options.json").read_text())["test_augment"] is True


def test_single_model_no_flips_and_image_list(class_dir, trained_models, tmp_path,
                                              keras_session):
    paths, _ = trained_models
    lst = tmp_path / "list.txt"
    lst.write_text("# images\nneg/n0.png,0\npos/p1.png,1\nmissing.png\n")
    summary = icp.main(["--model", str(paths[0]), "--img-list", str(lst), "--img-dir",
                        str(class_dir), "--out-dir", str(tmp_path / "o"), *BASE])
    df = pd.read_csv(tmp_path / "o" / "image_predictions.csv")
    ref = _reference_pred(keras_session.models.load_model(paths[0]),
                          [class_dir / "neg/n0.png", class_dir / "pos/p1.png"], False)
    np.testing.assert_allclose(df.prob_pos[:2], ref[:, 1], atol=1e-5)
    assert np.isnan(df.malignant_pred[2]) and "no such file" in df.error[2]
    assert df.malignant_label.tolist()[:2] == [0, 1] and np.isnan(df.malignant_label[2])
    assert summary["metrics"]["image"]["n"] == 2


def test_folder_without_classes(class_dir, trained_models, tmp_path, keras_session):
    paths, _ = trained_models
    summary = icp.run(model=[str(paths[1])], img_dir=str(class_dir / "neg"),
                      out_dir=str(tmp_path), img_size=(H, W), rescale_factor=RESCALE,
                      featurewise_mean=MEAN)
    df = pd.read_csv(tmp_path / "image_predictions.csv")
    assert df.image_index.tolist() == [f"n{k}.png" for k in range(4)]
    assert df.malignant_label.isna().all() and summary["metrics"] == {}
    assert not (tmp_path / "metrics.json").exists()


def test_channel_mismatch_explained_before_reading(class_dir, trained_models, tmp_path,
                                                   monkeypatch, keras_session, capsys):
    paths, gray = trained_models

    def no_read(*a, **k):
        raise AssertionError("an image was read before the model check")

    monkeypatch.setattr(dm_image, "read_image", no_read)
    monkeypatch.setattr(dm_image, "read_img_for_pred", no_read)
    with pytest.raises(ValueError, match="1-channel input but 3 channels.*YaroslavNet"):
        icp.run(**vars(icp.get_args_parser().parse_args(
            ["--model", str(gray), "--img-dir", str(class_dir), "--channels", "3",
             "--out-dir", str(tmp_path), *BASE])))
    # from the command line: one line naming the value, exit status 2, no traceback
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        icp.main(["--model", str(paths[0]), "--img-dir", str(class_dir), "--out-dir",
                  str(tmp_path), *BASE, "--img-size", "64", "48"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert f"takes {H}x{W} images but --img-size is 64 48" in err and str(paths[0]) in err
    assert not (tmp_path / "image_predictions.csv").exists()


def test_one_channel_model_scored(class_dir, trained_models, tmp_path, keras_session):
    _, gray = trained_models
    icp.main(["--model", str(gray), "--img-dir", str(class_dir / "pos"), "--out-dir",
              str(tmp_path), *BASE])
    df = pd.read_csv(tmp_path / "image_predictions.csv")
    files = [class_dir / "pos" / i for i in df.image_index[df.error.isna()]]
    ref = _reference_pred(keras_session.models.load_model(gray), files, False)
    np.testing.assert_allclose(df.prob_pos.dropna(), ref[:, 1], atol=1e-5)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_prefetched_scoring_matches_serial(class_dir, trained_models, keras_session, caplog,
                                           workers):
    """Reading ahead on threads gives the same scores, order, skips and messages as reading
    each batch before scoring it; an unreadable image in the middle is skipped and reported."""
    from dm_keras_ext import robust_load_model

    paths, _ = trained_models
    models = icp.load_models([str(paths[0])])
    files = [class_dir / "neg" / "n0.png", class_dir / "neg" / "n1.png",
             class_dir / "pos" / "broken.png", class_dir / "pos" / "p0.png",
             class_dir / "nowhere.png", class_dir / "pos" / "p1.png", class_dir / "neg" / "n2.png"]
    items = [icp.ImageItem(f.name, f) for f in files]
    read_opts = dict(img_size=(H, W), img_scale=None, rescale_factor=RESCALE,
                     equalize_hist=False, featurewise_center=True, featurewise_mean=MEAN,
                     segment_breast=False)
    runs = []
    for prefetch in (0, 2):
        caplog.clear()
        with caplog.at_level("WARNING", logger=icp.logger.name):
            probs, errors = icp.score_items(items, models, [3], 2, 3, False, read_opts,
                                            prefetch=prefetch, workers=workers)
        runs.append((probs, errors, [r.getMessage() for r in caplog.records
                                     if r.name == icp.logger.name]))
    (p0, e0, log0), (p1, e1, log1) = runs
    np.testing.assert_array_equal(p0, p1)   # bit for bit, NaN rows included
    assert e0 == e1, (e0, e1)
    assert log0 == log1, (log0, log1)
    assert [bool(e) for e in e1] == [False, False, True, False, True, False, False]
    assert "broken.png" in e1[2] and "decode" in e1[2] and "no such file" in e1[4]
    assert len(log1) == 2 and "broken.png" in log1[0] and "nowhere.png" in log1[1]
    good = [f for f, e in zip(files, e1) if not e]
    ref = _reference_pred(robust_load_model(str(paths[0])), good, False)
    np.testing.assert_allclose(p1[[i for i, e in enumerate(e1) if not e]], ref, atol=1e-5)


def test_prefetch_map_order_bound_and_errors():
    import threading
    import time as _time

    from prefetch import prefetch_map

    running, peak, lock = [0], [0], threading.Lock()

    def slow_square(k):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        _time.sleep(0.01 * (k % 3))
        with lock:
            running[0] -= 1
        if k == 7:
            raise ValueError("seven")
        return k * k

    consumed = []
    gen = prefetch_map(slow_square, iter(range(10)), ahead=3, workers=2)
    with pytest.raises(ValueError, match="seven"):
        for v in gen:
            consumed.append(v)
    assert consumed == [k * k for k in range(7)] and peak[0] <= 2
    assert list(prefetch_map(slow_square, range(5), ahead=0)) == [0, 1, 4, 9, 16]
    pulled = []
    lazy = prefetch_map(lambda k: k, (pulled.append(k) or k for k in range(100)), ahead=4,
                        workers=1)
    assert next(lazy) == 0 and len(pulled) <= 5
    lazy.close()


def _exams():
    return [
        {"horizontal_flip": "NO", "L-CC": ["neg/n0"], "R-CC": ["pos/p0"],
         "L-MLO": ["neg/n1"], "R-MLO": ["pos/p1", "pos/broken"],
         "cancer_label": {"left_malignant": 0, "right_malignant": 1, "benign": 0}},
        {"horizontal_flip": "YES", "L-CC": ["neg/n2"], "R-CC": ["neg/n3"], "L-MLO": [],
         "R-MLO": ["nowhere"], "cancer_label": {"left_malignant": 0, "right_malignant": 0}},
    ]


@pytest.mark.parametrize("fmt", ["pkl", "json"])
def test_exam_list(class_dir, trained_models, tmp_path, keras_session, fmt):
    paths, _ = trained_models
    src = tmp_path / f"data.{fmt}"
    if fmt == "pkl":
        src.write_bytes(pickle.dumps(_exams(), protocol=2))
    else:
        src.write_text(json.dumps(_exams()))
    summary = icp.main(["--model", str(paths[0]), "--exam-list", str(src), "--img-dir",
                        str(class_dir), "--out-dir", str(tmp_path / "o"), *BASE])
    img = pd.read_csv(tmp_path / "o" / "image_predictions.csv")
    assert len(img) == 8 and img.error.notna().sum() == 2
    assert img.view.tolist()[:5] == ["L-CC", "R-CC", "L-MLO", "R-MLO", "R-MLO"]
    br = pd.read_csv(tmp_path / "o" / "breast_predictions.csv")
    assert br.columns.tolist() == ["index", "left_malignant", "right_malignant"]
    pred = dict(zip(img.image_index, img.malignant_pred))
    assert br.left_malignant[0] == pytest.approx((pred["neg/n0"] + pred["neg/n1"]) / 2, 1e-5)
    assert br.right_malignant[0] == pytest.approx((pred["pos/p0"] + pred["pos/p1"]) / 2, 1e-5)
    assert br.right_malignant[1] == pytest.approx(pred["neg/n3"], 1e-5)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["breast"]["n"] == 4 and metrics["breast"]["n_pos"] == 1
    assert (tmp_path / "o" / "roc_breast.png").exists()
    assert summary["breast_csv"].endswith("breast_predictions.csv")


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_exam_list_refuses_arbitrary_classes(tmp_path):
    bad = tmp_path / "data.pkl"
    bad.write_bytes(pickle.dumps([{"L-CC": ["a"], "x": _Evil()}]))
    with pytest.raises(ValueError, match="data.pkl.*refusing to load (posix|os|nt).system"):
        icp.load_exam_list(bad)
    ok = tmp_path / "ok.pkl"
    from collections import OrderedDict
    ok.write_bytes(pickle.dumps([OrderedDict({"L-CC": ["a"], "n": np.int64(3)})]))
    assert icp.load_exam_list(ok)[0]["n"] == 3
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"L-CC": "a"}]))
    with pytest.raises(ValueError, match="exam 0 view L-CC should be a list"):
        icp.load_exam_list(wrong)


@pytest.mark.real_data
@pytest.mark.slow
def test_real_mammograms_with_keras208_model(real_mammogram_dir, keras208_dir, tmp_path,
                                             keras_session):
    labels = pd.read_csv(real_mammogram_dir / "labels.csv")
    exams = []
    for pat, grp in labels.groupby("patient"):
        lab = dict(zip(grp.side, grp.malignant))
        exams.append({"horizontal_flip": "NO", "L-CC": [f"{pat}_L_CC"], "R-CC": [f"{pat}_R_CC"],
                      "L-MLO": [], "R-MLO": [],
                      "cancer_label": {"left_malignant": int(lab["LEFT"]),
                                       "right_malignant": int(lab["RIGHT"])}})
    src = tmp_path / "exams.json"
    src.write_text(json.dumps(exams))
    model = keras208_dir / "tiny_image_vgg_top.h5"
    out = tmp_path / "o"
    summary = icp.main(["--model", str(model), "--exam-list", str(src), "--img-dir",
                        str(real_mammogram_dir), "--img-size", "96", "64", "--rescale-factor",
                        "0.003891", "--featurewise-mean", "52.16", "--test-augment",
                        "--bootstrap", "100", "--out-dir", str(out)])
    img = pd.read_csv(out / "image_predictions.csv")
    assert img.image_index.tolist() == ["1_L_CC", "1_R_CC", "2_L_CC", "2_R_CC"]
    assert img.error.isna().all() and img.malignant_label.tolist() == [0, 1, 0, 0]
    from dm_keras_ext import robust_load_model
    m = robust_load_model(str(model))
    X = np.stack([np.repeat(dm_image.read_resize_img(
        real_mammogram_dir / f"{s}.png", target_size=(96, 64),
        rescale_factor=0.003891)[..., None] - np.float32(52.16), 3, axis=-1)
        for s in img.image_index])
    ref = np.mean([m.predict(v, verbose=0) for v in
                   (X, X[:, :, ::-1], X[:, ::-1], X[:, ::-1, ::-1])], axis=0)
    np.testing.assert_allclose(img[["prob_neg", "prob_pos"]], ref, atol=1e-5)
    br = pd.read_csv(out / "breast_predictions.csv")
    assert br["index"].tolist() == [0, 1]
    np.testing.assert_allclose(br.right_malignant, img.malignant_pred[[1, 3]], atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"image", "breast"} and metrics["image"]["n_pos"] == 1
    for name in ("roc_image.png", "pr_image.png", "roc_breast.png", "pr_breast.png"):
        assert (out / name).stat().st_size > 1000
    assert summary["n_errors"] == 0
    # breast segmentation: cropping changes the input, so the scores change
    seg = icp.run(model=[str(model)], img_list=str(real_mammogram_dir / "labels.csv"),
                  out_dir=str(tmp_path / "seg"), img_size=(96, 64), rescale_factor=0.003891,
                  segment_breast=True, bootstrap=0)
    seg_df = pd.read_csv(tmp_path / "seg" / "image_predictions.csv")
    assert seg["n_scored"] == 4
    assert not np.allclose(seg_df.prob_pos, img.prob_pos, atol=1e-6)


def _exit2(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        icp.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err


def test_bad_values_and_mismatched_models_are_refused(class_dir, trained_models, tmp_path,
                                                      capsys, keras_session):
    paths, _ = trained_models
    common = ["--model", str(paths[0]), "--img-dir", str(class_dir / "neg"), "--out-dir",
              str(tmp_path / "out"), *BASE]
    for flags, expected in ((["--threshold", "1.5"], "--threshold should be in [0, 1]"),
                            (["--threshold", "nan"],
                             "argument --threshold: should be a finite number, got 'nan'"),
                            (["--bootstrap", "-1"], "argument --bootstrap: should be >= 0"),
                            (["--featurewise-mean", "nan"],
                             "argument --featurewise-mean: should be a finite number"),
                            (["--rescale-factor", "inf"],
                             "argument --rescale-factor: should be a finite number"),
                            (["--class-list", "neg", "benign", "malignant"],
                             "names 3 classes (['neg', 'benign', 'malignant']) but the "
                             "model(s) output 2")):
        assert expected in _exit2(common + flags, capsys)
    assert not (tmp_path / "out").exists()


def test_out_dir_holds_one_run_and_mixed_depth_is_reported(class_dir, trained_models, tmp_path,
                                                           keras_session, caplog):
    import logging

    paths, _ = trained_models
    out = tmp_path / "out"
    icp.main(["--model", str(paths[0]), "--img-dir", str(class_dir), "--out-dir", str(out),
              *BASE])
    assert (out / "metrics.json").is_file() and (out / "roc_image.png").is_file()
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for f in sorted((class_dir / "neg").glob("*.png"))[:2]:
        (unlabelled / f.name).write_bytes(f.read_bytes())
    cv2.imwrite(str(unlabelled / "eight_bit.png"),
                np.linspace(100, 180, H * W).reshape(H, W).astype(np.uint8))
    with caplog.at_level(logging.WARNING):
        summary = icp.main(["--model", str(paths[0]), "--img-dir", str(unlabelled),
                            "--out-dir", str(out), *BASE])
    # no labels: no metrics or curves, and none of the first run's are left behind
    assert sorted(p.name for p in out.iterdir()) == [".ddsm_outputs.json",
                                                     "image_predictions.csv", "options.json"]
    assert [p.rsplit("/", 1)[-1] for p, _ in summary["scale_mismatch"]] == ["eight_bit.png"]
    assert any("eight_bit.png" in r.getMessage() and "8-bit image" in r.getMessage()
               for r in caplog.records)


def test_lambda_model_cannot_run_code_through_prediction(class_dir, tmp_path, keras_session,
                                                          capsys):
    keras = keras_session
    marker = tmp_path / "code_ran"
    source = f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]"
    inp = keras.Input((H, W, 3))
    x = keras.layers.Lambda(eval(source), name="sneaky")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x)).save(
        tmp_path / "lambda.h5", save_format="h5")
    marker.unlink(missing_ok=True)
    argv = ["--model", str(tmp_path / "lambda.h5"), "--img-dir", str(class_dir),
            "--out-dir", str(tmp_path / "out"), *BASE]
    assert "'sneaky'" in _exit2(argv, capsys) and not marker.exists()
    assert icp.main(argv + ["--trust-model-file"])["n_scored"] == 8 and marker.exists()


# ------------------------------------------------------------------ hostile input
def _copy_class_dir(src, dst):
    for f in sorted(src.rglob("*.png")):
        (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        (dst / f.relative_to(src)).write_bytes(f.read_bytes())


def test_out_dir_overlapping_the_inputs_is_refused(class_dir, trained_models, tmp_path, capsys):
    paths, _ = trained_models
    common = ["--model", str(paths[0]), "--img-dir", str(class_dir), *BASE]
    err = _exit2(common + ["--out-dir", str(class_dir / "pos" / "out")], capsys)
    assert "--out-dir" in err and "inside the input folder --img-dir" in err
    link = tmp_path / "link"
    link.symlink_to(class_dir / "neg")
    assert "inside the input folder --img-dir" in _exit2(common + ["--out-dir", str(link)],
                                                         capsys)
    assert not (class_dir / "pos" / "out").exists()
    assert sorted(p.name for p in (class_dir / "neg").iterdir()) == [f"n{k}.png" for k in range(4)]


def test_users_files_are_kept_or_refused(class_dir, trained_models, tmp_path, capsys):
    paths, _ = trained_models
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("my own metrics")
    common = ["--model", str(paths[0]), "--img-dir", str(class_dir), "--out-dir", str(out),
              *BASE]
    err = _exit2(common, capsys)
    assert "metrics.json exists and was not written by this tool" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    # unlabelled images: metrics.json would not be written, yet it is named like an output:
    # with --overwrite the run goes on and never deletes it
    folder = tmp_path / "unlabelled"
    _copy_class_dir(class_dir / "neg", folder)
    icp.main(["--model", str(paths[0]), "--img-dir", str(folder), "--out-dir", str(out),
              "--overwrite", *BASE])
    assert (out / "metrics.json").read_text() == "my own metrics"
    assert (out / "image_predictions.csv").is_file()


def test_images_that_cannot_give_a_score_go_to_the_error_column(class_dir, trained_models,
                                                                  tmp_path, caplog):
    import logging

    paths, _ = trained_models
    folder = tmp_path / "imgs"
    _copy_class_dir(class_dir, folder)
    (folder / "pos" / "broken.png").unlink()
    nan = np.random.RandomState(0).rand(H * 2, W * 2).astype(np.float32)
    nan[5, 5] = np.nan
    assert cv2.imwrite(str(folder / "pos" / "nan.tif"), nan)
    cv2.imwrite(str(folder / "neg" / "flat.png"), np.full((H * 2, W * 2), 9000, np.uint16))
    cv2.imwrite(str(folder / "pos" / "dot.png"), np.full((1, 1), 9000, np.uint16))
    write_spot_image(folder / "beside.png", (H * 2, W * 2), False, 0)
    clean = icp.main(["--model", str(paths[0]), "--img-dir", str(class_dir), "--out-dir",
                      str(tmp_path / "clean"), *BASE])
    with caplog.at_level(logging.WARNING):
        summary = icp.main(["--model", str(paths[0]), "--img-dir", str(folder), "--out-dir",
                            str(tmp_path / "out"), *BASE])
    df = pd.read_csv(tmp_path / "out" / "image_predictions.csv", keep_default_na=False)
    errors = dict(zip(df.image_index, df.error))
    assert "not finite" in errors["pos/nan.tif"] and "constant" in errors["neg/flat.png"]
    assert "1x1 image" in errors["pos/dot.png"]
    assert summary["n_errors"] == 3 and summary["n_scored"] == 8
    # the metrics are those of the 8 good images, as in the clean run
    assert summary["metrics"]["image"]["auroc"] == clean["metrics"]["image"]["auroc"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("3 of 11 images could not be scored" in m for m in msgs)
    assert any("1 image(s) lie beside the class folders" in m and "beside.png" in m
               for m in msgs)


def test_duplicate_list_entries_and_class_names_are_errors(class_dir, trained_models,
                                                           tmp_path, capsys):
    paths, _ = trained_models
    listing = tmp_path / "list.txt"
    listing.write_text("neg/n0.png,0\npos/p1.png,1\n./neg/n0.png,0\n")
    err = _exit2(["--model", str(paths[0]), "--img-list", str(listing), "--img-dir",
                  str(class_dir), "--out-dir", str(tmp_path / "o"), *BASE], capsys)
    assert f"{listing}: image" in err and "given twice (line 1 and line 3)" in err
    err = _exit2(["--model", str(paths[0]), "--img-dir", str(class_dir), "--class-list", "neg",
                  "neg", "--out-dir", str(tmp_path / "o"), *BASE], capsys)
    assert "--class-list: value 'neg' given twice" in err
    with pytest.raises(ValueError, match="class name 'neg' given twice"):
        icp.run([str(paths[0])], img_dir=str(class_dir), class_list=("neg", "neg"),
                out_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_run_refuses_an_unknown_option_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"unknown options \['img_dirr'\]; valid: .*'img_dir'"):
        icp.run([str(tmp_path / "m.h5")], img_dirr=str(tmp_path), out_dir=str(tmp_path / "o"))
    assert list(tmp_path.iterdir()) == []


def test_run_hands_one_options_object_with_the_parsers_defaults(monkeypatch):
    import dataclasses

    import run_options

    cls = icp.options_class()
    assert cls is icp.options_class() and cls.__name__ == "PredictOptions"
    seen = []
    monkeypatch.setattr(icp, "predict_images", lambda opts, **extra: seen.append((opts, extra)))
    icp.run(["a.h5", "b.h5"])
    parsed = vars(icp.get_args_parser().parse_args(["--model", "a.h5", "b.h5"]))
    assert seen[0] == (run_options.options_from(cls, parsed), {})
    assert dataclasses.asdict(seen[0][0]) == parsed   # every flag, with the parser's default
    model = object()   # a model object is handed on as is
    icp.run(model=model, img_dir="imgs", test_augment=True, given_options=[])
    opts, extra = seen[1]
    assert opts.model is model and opts.img_dir == "imgs" and opts.test_augment
    assert opts.class_list == ["neg", "pos"] and extra == {"given_options": []}


def test_flags_shared_with_evaluate_and_score_exported_keep_each_tools_defaults():
    """The input group (also score_exported.py's) and ``--bootstrap`` / ``--seed`` (also
    evaluate.py's) are declared once; each tool keeps its own defaults and help."""
    import evaluate
    import score_exported

    def parsed(module, argv):
        parser = module.get_args_parser()
        return vars(parser.parse_args(argv)), {a.dest: a.help for a in parser._actions}

    pred, pred_help = parsed(icp, ["--model", "m.h5"])
    assert (pred["malignant_class"], pred["class_list"]) == (-1, ["neg", "pos"])
    assert pred_help["malignant_class"].endswith("(default: last)")
    exported, exported_help = parsed(score_exported, ["DIR", "--out-dir", "o"])
    assert (exported["malignant_class"], exported["class_list"]) == (None, ["neg", "pos"])
    assert exported_help["malignant_class"].endswith("(default: the recipe's, the last)")
    ev, ev_help = parsed(evaluate, ["--predictions", "p.csv"])
    for opts, helps in ((pred, pred_help), (ev, ev_help)):
        assert (opts["bootstrap"], opts["seed"]) == (2000, 12345)
        assert "0 for none" in helps["bootstrap"] and "bootstrap" in helps["seed"]
    assert (ev["target_sensitivity"], ev["target_specificity"]) == (0.9, 0.9)
    assert ev_help["target_specificity"].startswith("specificity the validation-chosen")
