"""The trainers refuse to compute wrongly: nothing to train, a validation or test set of one
class, a model file with code; a run that fails before its first model leaves an earlier run's
model and options file untouched; patch folders are checked against their manifest."""
import logging

import cv2
import numpy as np
import pytest

import image_clf_train
import patch_clf_train


def _images(root, classes, n=3, hw=(32, 24)):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(folder / f"{cls}_{i}.png"),
                            rng.integers(1000, 60000, hw).astype(np.uint16))
    return [str(root / s) for s in ("train", "val", "test")]


@pytest.fixture
def whole(tmp_path, keras_session):
    keras = keras_session
    dirs = _images(tmp_path / "img", ["neg", "pos"])
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(name="block5_pool")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    patch = tmp_path / "patch.h5"
    keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x)).save(patch)
    best = tmp_path / "out" / "best.h5"
    best.parent.mkdir()
    best.write_bytes(b"the model of an earlier run")
    (tmp_path / "out" / "best.h5.options.json").write_text('{"earlier": true}\n')
    common = dirs + ["--patch-model-state", str(patch), "--patch-net", "vgg16",
                     "--img-size", "32", "24",
                     "--top-depths", "8", "--top-repetitions", "1", "--batch-size", "4",
                     "--no-augmentation", "--rescale-factor", "0.003891", "--overwrite",
                     "--best-model", str(best)]
    return tmp_path, best, common


def _untouched(best):
    assert best.read_bytes() == b"the model of an earlier run"
    assert (best.parent / "best.h5.options.json").read_text() == '{"earlier": true}\n'


def _exit2(main, argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err


def test_zero_epochs_is_an_error_and_the_old_model_is_not_reported(whole, capsys):
    _, best, common = whole
    err = _exit2(image_clf_train.main, common + ["--nb-epoch", "0", "--all-layer-epochs", "0"],
                 capsys)
    assert "nothing to train" in err
    _untouched(best)


def test_one_class_validation_set_is_refused_before_training(whole, capsys):
    tmp_path, best, common = whole
    for f in (tmp_path / "img" / "val" / "pos").iterdir():
        f.unlink()
    err = _exit2(image_clf_train.main, common + ["--nb-epoch", "1"], capsys)
    assert "VAL_DIR" in err and "fewer than two classes" in err and "'pos': 0" in err
    _untouched(best)


def test_a_run_failing_before_its_first_model_leaves_the_earlier_files(whole, monkeypatch):
    _, best, common = whole
    import training_runs

    def crash(*args, **kwargs):
        raise RuntimeError("killed during the first epoch")

    monkeypatch.setattr(training_runs, "train_2stage", crash)
    with pytest.raises(RuntimeError, match="killed"):
        image_clf_train.main(common + ["--nb-epoch", "1", "--no-auto-resume"])
    _untouched(best)


def test_model_file_with_code_is_refused_unless_trusted(whole, keras_session, capsys):
    tmp_path, best, common = whole
    keras = keras_session
    inp = keras.Input((None, None, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="doubling")(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)
    x = keras.layers.MaxPooling2D(name="block5_pool")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    sneaky = tmp_path / "sneaky.h5"
    keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x)).save(
        sneaky, save_format="h5")
    argv = [a if not a.endswith("patch.h5") else str(sneaky) for a in common]
    err = _exit2(image_clf_train.main, argv + ["--nb-epoch", "1"], capsys)
    assert "sneaky.h5" in err and "'doubling'" in err and "--trust-model-file" in err
    err = _exit2(patch_clf_train.main,
                 [str(tmp_path / "img" / s) for s in ("train", "val", "test")]
                 + ["--class-list", "neg", "pos", "--resume-from", str(sneaky),
                    "--img-size", "32", "24", "--rescale-factor", "0.003891",
                    "--nb-epoch", "1"], capsys)
    assert "'doubling'" in err
    _untouched(best)


def test_patch_trainer_nothing_to_train(tmp_path, capsys):
    dirs = _images(tmp_path / "p", ["background", "malignant", "benign"], n=1)
    err = _exit2(patch_clf_train.main, dirs + ["--net", "dm_resnet14", "--no-use-pretrained",
                                               "--nb-epoch", "0", "--top-layer-epochs", "3"],
                 capsys)
    assert "nothing to train: --nb-epoch is 0" in err


def test_patch_folder_files_outside_the_manifest_are_reported(tmp_path, caplog):
    import training_setup

    _images(tmp_path / "p", ["background", "malignant"], n=2)
    train = tmp_path / "p" / "train"
    (train / "patches.csv").write_text(
        "folder,filename,img_id,kind,row,col,roi_frac,patch_frac\n"
        "background,background_0.png,v,bkg,0,0,0,0\nbackground,background_1.png,v,bkg,0,0,0,0\n"
        "malignant,malignant_0.png,v,abn,0,0,1,1\n")
    with caplog.at_level(logging.WARNING):
        training_setup.check_class_dirs({"TRAIN_DIR": train}, ["background", "malignant"])
    warned = [r.getMessage() for r in caplog.records if "manifest" in r.getMessage()]
    assert len(warned) == 1 and "1 image(s)" in warned[0] and "malignant_1.png" in warned[0]


# ------------------------------------------------------------------ a full disk
def _full_disk_at_fsync(monkeypatch):
    import errno

    import dm_image

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dm_image.os, "fsync", fsync)


def test_a_full_disk_leaves_the_earlier_model_byte_for_byte(whole, monkeypatch, capsys):
    """The disk reports it is full only when the new model reaches it: the run stops and the
    earlier model and options file stay as they were."""
    tmp_path, best, common = whole
    _full_disk_at_fsync(monkeypatch)
    with pytest.raises((SystemExit, OSError)) as info:
        image_clf_train.main(common + ["--nb-epoch", "1", "--all-layer-epochs", "0"])
    assert getattr(info.value, "code", 1) != 0
    assert "No space left" in str(info.value) + capsys.readouterr().err
    _untouched(best)
    assert sorted(p.name for p in best.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("writer", ["model", "checkpoint"])
@pytest.mark.parametrize("failure", ["raises", "cut_short", "at_fsync", "hdf5_error"])
def test_a_failed_model_write_keeps_the_earlier_file(tmp_path, keras_session, monkeypatch,
                                                     writer, failure):
    """A write that a full disk stops midway (an error, a file cut short without one, an
    error when flushed) never replaces the earlier file."""
    import errno
    import shutil

    import dm_keras_ext
    import training_runs
    keras = keras_session
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    path = tmp_path / "best.h5"
    path.write_bytes(b"the earlier model")
    real_save = keras.Model.save

    def save_cut_short(self, filepath, *args, **kwargs):
        real_save(self, tmp_path / "whole.h5", *args, **kwargs)
        with open(tmp_path / "whole.h5", "rb") as src, open(filepath, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.truncate(1000)
        if failure == "raises":
            raise OSError(errno.ENOSPC, "No space left on device")
        if failure == "hdf5_error":     # how h5py reports a full disk when closing the file
            raise RuntimeError("Can't destroy cache (slist already enabled?)")

    if failure == "at_fsync":
        _full_disk_at_fsync(monkeypatch)
    else:
        monkeypatch.setattr(keras.Model, "save", save_cut_short)
    with pytest.raises(OSError) as info:
        if writer == "model":
            dm_keras_ext.save_model_atomic(model, path)
        else:
            training_runs.save_training_checkpoint(model, path, {"epoch": 1})
    if failure == "hdf5_error":
        assert f"writing {path} failed in HDF5 (Can't destroy cache" in str(info.value)
    assert path.read_bytes() == b"the earlier model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_from_a_whole_image_model_with_code_is_refused_unless_trusted(whole,
                                                                             keras_session,
                                                                             capsys):
    """--resume-from of a whole-image model file with a Lambda layer: refused, its code not
    run (the layer would touch a marker file when the model is rebuilt)."""
    tmp_path, best, common = whole
    keras = keras_session
    marker = tmp_path / "code_ran"
    source = f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]"
    inp = keras.Input((32, 24, 3))
    x = keras.layers.Lambda(eval(source), name="sneaky")(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    resumed = tmp_path / "whole_with_code.h5"
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x)).save(
        resumed, save_format="h5")
    marker.unlink()
    at = common.index("--patch-model-state")
    argv = common[:at] + ["--resume-from", str(resumed)] + common[at + 4:]
    err = _exit2(image_clf_train.main, argv + ["--nb-epoch", "1"], capsys)
    assert "whole_with_code.h5" in err and "'sneaky'" in err and "--trust-model-file" in err
    assert not marker.exists()
    _untouched(best)
