"""heatmap_score: sweep and fprop modes, .npz and 2017 .pkl output, 2017 pickles read safely,
overlay PNGs."""
import logging
import math
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import imwrite

import dm_image
import heatmap_score as hs

P = 16          # patch size of the tiny patch classifier
STRIDE = 4
HEIGHT = 96     # --img-height of the synthetic sweep


def _nb(extent, patch, stride):
    """2017 sweep count: round((L - patch) / stride + 0.49), Python 2 rounding, at least 1."""
    return max(1, int(math.floor((extent - patch) / stride + 0.49 + 0.5)))


def _mammogram(path, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((192, 144), np.uint16)
    cv2.ellipse(img, (0, 96), (100, 80), 0, -90, 90, 30000, -1)
    img = (img + (img > 0) * rng.integers(0, 20000, img.shape)).astype(np.uint16)
    img[5:12, 120:135] = 65535    # burned-in marker, excluded by segmentation
    imwrite(path, img)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("hm")
    for k, name in enumerate(["P_1_LEFT_CC", "P_1_LEFT_MLO", "P_1_RIGHT_CC", "P_2_LEFT_CC",
                              "P_2_LEFT_MLO"]):
        _mammogram(root / "img" / f"{name}.png", k)
    (root / "pats.csv").write_text("patient_id,side,cancer\nP_1,LEFT,0\nP_1,RIGHT,1\n"
                                   "P_2,LEFT,1\nP_2,LEFT,0\n")
    import tf_keras as keras
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2, name="last_pool")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inp, out)
    model.save(root / "patch.h5")
    return root, model


def test_sweep_mode_shapes_values_and_missing_views(synth, tmp_path, caplog, keras_session):
    root, model = synth
    with caplog.at_level(logging.WARNING):
        args = hs.get_args_parser().parse_args([
            str(root / "img"), str(root / "patch.h5"), "--pat-csv", str(root / "pats.csv"),
            "--img-height", str(HEIGHT), "--patch-size", str(P), "--stride", str(STRIDE),
            "--batch-size", "64", "--img-scale", "255", "--featurewise-center",
            "--featurewise-mean", "71.8", "--out", str(tmp_path / "hm.npz"),
            "--png-dir", str(tmp_path / "png")])
        summary = hs.run(**vars(args))   # main() would reset logging handlers
    assert "P_1_RIGHT_MLO.png" in caplog.text
    recs = hs.load_heatmaps(tmp_path / "hm.npz")
    assert [(r["patient_id"], r["side"], r["cancer"]) for r in recs] == [
        ("P_1", "LEFT", 0), ("P_1", "RIGHT", 1), ("P_2", "LEFT", 1)]
    assert recs[1]["mlo"] is None
    assert recs[1]["cc"].dtype == np.float32 and recs[1]["cc"].shape[-1] == 3
    assert summary["missing"] == ["P_1_RIGHT_MLO"] and summary["n_heatmaps"] == 5
    # expected shape from the sweep formula on the segmented, margin-padded image
    img = dm_image.read_resize_img(root / "img" / "P_1_LEFT_CC.png", target_height=HEIGHT)
    crop, _ = dm_image.segment_breast(img)
    padded = np.pad(crop, P // 2)
    nb_row, nb_col = _nb(padded.shape[0], P, STRIDE), _nb(padded.shape[1], P, STRIDE)
    hm = recs[0]["cc"]
    assert hm.shape == (nb_row, nb_col, 3) and hm.dtype == np.float32
    np.testing.assert_allclose(hm.sum(-1), 1, atol=1e-5)
    # the value at (r, c) is the classifier on the patch at the centred sweep position
    y_gap = (padded.shape[0] - P - (nb_row - 1) * STRIDE) // 2
    x_gap = (padded.shape[1] - P - (nb_col - 1) * STRIDE) // 2
    for r, c in [(0, 0), (nb_row // 2, nb_col // 3), (nb_row - 1, nb_col - 1)]:
        patch = padded[y_gap + r * STRIDE:y_gap + r * STRIDE + P,
                       x_gap + c * STRIDE:x_gap + c * STRIDE + P].astype(np.float64)
        patch = patch * (255.0 / patch.max() if patch.max() else 1.0)   # --img-scale 255
        x = np.repeat(patch[None, ..., None], 3, -1).astype("float32") - np.float32(71.8)
        np.testing.assert_allclose(hm[r, c], model.predict(x, verbose=0)[0], atol=1e-5)
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir() if p.suffix == ".png")
    assert len(pngs) == 5 and "P_1_LEFT_CC_heatmap.png" in pngs
    pic = cv2.imread(str(tmp_path / "png" / "P_1_LEFT_CC_heatmap.png"))
    assert pic.shape[0] == HEIGHT and pic.shape[1] - img.shape[1] >= 30   # + colour bar
    assert (pic[:, :img.shape[1], 0] != pic[:, :img.shape[1], 2]).any()   # coloured, not grey


def test_fprop_mode_and_pat_list(synth, tmp_path, keras_session):
    root, _ = synth
    (tmp_path / "pats.txt").write_text("P_2\n")
    summary = hs.run(str(root / "img"), str(root / "patch.h5"), str(root / "pats.csv"),
                     pat_list=str(tmp_path / "pats.txt"), out=str(tmp_path / "f.npz"),
                     fprop_mode=True, img_size=(64, 48), avg_pool_size=(4, 4),
                     hm_strides=(1, 1), net="yaroslav", featurewise_center=True,
                     featurewise_mean=71.8,
                     png_dir=str(tmp_path / "png"))
    recs, meta = hs.load_heatmaps(tmp_path / "f.npz", return_meta=True)
    assert [r["patient_id"] for r in recs] == ["P_2"] and meta["mode"] == "fprop"
    # feature map 64/4 x 48/4 = 16 x 12, 4x4 average pool at stride 1 -> 13 x 9
    assert recs[0]["cc"].shape == (13, 9, 3) and recs[0]["mlo"].shape == (13, 9, 3)
    np.testing.assert_allclose(recs[0]["cc"].sum(-1), 1, atol=1e-5)
    assert summary["pngs"] == 2
    assert cv2.imread(str(tmp_path / "png" / "P_2_LEFT_MLO_heatmap.png")).shape[:2] == (64, 78)


def test_npz_is_plain_and_old_pickles_need_the_flag(tmp_path):
    recs = [{"patient_id": "P_9", "side": "RIGHT", "cancer": 1,
             "cc": np.random.rand(4, 3, 3).astype("float32"), "mlo": None}]
    path = hs.save_heatmaps(recs, tmp_path / "h.npz", {"mode": "sweep"})
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["cancer", "cc_0", "meta", "patient_id", "side"]
    back = hs.load_heatmaps(path)
    np.testing.assert_array_equal(back[0]["cc"], recs[0]["cc"])
    assert back[0]["mlo"] is None and back[0]["patient_id"] == "P_9"
    old = tmp_path / "old.pkl"
    old.write_bytes(pickle.dumps(recs, protocol=2))
    with pytest.raises(ValueError, match="allow_pickle"):
        hs.load_heatmaps(old)
    loaded = hs.load_heatmaps(old, allow_pickle=True)
    np.testing.assert_array_equal(loaded[0]["cc"], recs[0]["cc"])

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("true",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([{"patient_id": Evil()}]))
    with pytest.raises(ValueError, match="evil.pkl.*refusing to load posix.system"):
        hs.load_heatmaps(evil, allow_pickle=True)
    with pytest.raises(ValueError, match=r"\.npz"):
        hs.save_heatmaps(recs, tmp_path / "h.h5")


def test_bad_input(synth, tmp_path, keras_session):
    root, _ = synth
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("patient,side\nP_1,LEFT\n")
    with pytest.raises(ValueError,
                       match=r"bad.csv: missing column\(s\) \['patient_id', 'cancer'\]"):
        hs.read_patient_sides(bad_csv)
    # ids from a CSV never leave the output folder; a typo in cancer is named with its line
    evil = tmp_path / "evil.csv"
    evil.write_text("patient_id,side,cancer\nP_1,LEFT,1\n../../x,LEFT,1\n")
    with pytest.raises(ValueError, match="evil.csv, line 3: patient_id '../../x' cannot be"):
        hs.read_patient_sides(evil)
    typo = tmp_path / "typo.csv"
    typo.write_bytes(b"\xef\xbb\xbfpatient_id,side,cancer\r\nP_1,LEFT,yes\r\n")
    with pytest.raises(ValueError, match="typo.csv, line 2: cancer should be 0 or 1"):
        hs.read_patient_sides(typo)
    # run() checks its numbers itself (the command line refuses them while parsing)
    for flag, value in (("--stride", 0), ("--featurewise-mean", float("nan")),
                        ("--batch-size", -2), ("--img-scale", float("inf"))):
        with pytest.raises(ValueError, match=f"{flag}.*finite"):
            hs.run(str(root / "img"), str(root / "patch.h5"), str(root / "pats.csv"),
                   out=str(tmp_path / "x.npz"), **{flag[2:].replace("-", "_"): value})
    with pytest.raises(ValueError, match="unknown net 'vgg99'; valid: .*vgg19"):
        hs.run(str(root / "img"), str(root / "patch.h5"), str(root / "pats.csv"),
               net="vgg99", out=str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="malignant_class 5 out of range for 3"):
        hs.run(str(root / "img"), str(root / "patch.h5"), str(root / "pats.csv"),
               malignant_class=5, out=str(tmp_path / "x.npz"))
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.real_data
@pytest.mark.slow
def test_real_mammogram_overlay(real_mammogram_dir, keras208_dir, tmp_path, keras_session):
    (tmp_path / "pats.csv").write_text("patient_id,side,cancer\n1,R,1\n")
    height, patch, stride = 256, 32, 8
    summary = hs.main([str(real_mammogram_dir), str(keras208_dir / "tiny_patch_vgg.h5"),
                       "--pat-csv", str(tmp_path / "pats.csv"), "--img-height", str(height),
                       "--patch-size", str(patch), "--stride", str(stride),
                       "--out", str(tmp_path / "real.npz"), "--png-dir", str(tmp_path / "png"),
                       "--png-height", "256"])
    assert summary["missing"] == ["1_R_MLO"]
    img = dm_image.read_resize_img(real_mammogram_dir / "1_R_CC.png", target_height=height)
    crop, (x, y, w, h) = dm_image.segment_breast(img)
    assert y > 0 or x > 0      # the "R CC" label is outside the breast box
    hm = hs.load_heatmaps(tmp_path / "real.npz")[0]["cc"]
    assert hm.shape == (_nb(h + 2 * (patch // 2), patch, stride),
                        _nb(w + 2 * (patch // 2), patch, stride), 3)
    pic = cv2.imread(str(tmp_path / "png" / "1_R_CC_heatmap.png"))
    assert pic.shape[:2] == (256, int(256 / 3328 * 2560) + 30)
    # coloured inside the breast box only
    inside = pic[y + h // 2, x + w // 2]
    assert len(set(inside.tolist())) > 1
    assert len(set(pic[2, 2].tolist())) == 1


def test_no_image_found_exits_non_zero_and_writes_nothing(synth, tmp_path, capsys,
                                                          keras_session):
    root, _ = synth
    (tmp_path / "pats.csv").write_text("patient_id,side,cancer\nP_9,LEFT,0\n")
    with pytest.raises(SystemExit) as info:
        hs.main([str(root / "img"), str(root / "patch.h5"), "--pat-csv",
                 str(tmp_path / "pats.csv"), "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "no heatmap computed" in err and "P_9_LEFT_CC" in err
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("fprop", [False, True])
def test_any_images_folder_or_list(synth, tmp_path, keras_session, fprop):
    """--all-images scores every image under the folder (subfolders too); --img-list the
    listed ones; one record and one overlay per image, names kept inside --png-dir."""
    root, model = synth
    folder = tmp_path / "hospital"
    _mammogram(folder / "a" / "scan 1.png", 7)
    _mammogram(folder / "b.png", 8)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    mode = ["--fprop-mode", "--img-size", "96", "64", "--avg-pool-size", "2", "2"] if fprop \
        else ["--img-height", str(HEIGHT), "--patch-size", str(P), "--stride", str(STRIDE)]
    common = [str(folder), str(root / "patch.h5"), "--net", "vgg16", *mode,
              "--featurewise-center", "--png-dir", str(tmp_path / "png")]
    summary = hs.main(common + ["--all-images", "--out", str(tmp_path / "all.npz")])
    recs = hs.load_heatmaps(tmp_path / "all.npz")
    assert [r["image"].rsplit("hospital/", 1)[1] for r in recs] == \
        ["b.png", "broken.png", "a/scan 1.png"]   # a folder's files, then its subfolders
    assert recs[1]["heatmap"] is None and summary["failed"][0][0].endswith("broken.png")
    assert recs[2]["heatmap"].ndim == 3 and recs[2]["heatmap"].shape[-1] == 3
    np.testing.assert_allclose(recs[2]["heatmap"].sum(-1), 1, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == \
        ["a__scan 1_heatmap.png", "b_heatmap.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("b.png\n\n")
    hs.main(common + ["--img-list", str(listing), "--out", str(tmp_path / "one.pkl")])
    with open(tmp_path / "one.pkl", "rb") as fh:
        one = pickle.load(fh)
    assert [r["image"] for r in one] == [str(folder / "b.png")]
    np.testing.assert_allclose(one[0]["heatmap"], recs[0]["heatmap"], rtol=1e-6)


def test_lambda_model_needs_trust(synth, tmp_path, keras_session):
    root, _ = synth
    import tf_keras as keras

    inp = keras.Input((None, None, 3))
    x = keras.layers.Lambda(lambda t: t * 1.0, name="scale")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x)).save(
        tmp_path / "lambda.h5", save_format="h5")
    args = [str(root / "img"), str(tmp_path / "lambda.h5"), "--pat-csv", str(root / "pats.csv"),
            "--img-height", str(HEIGHT), "--patch-size", str(P), "--stride", "32",
            "--out", str(tmp_path / "x.npz")]
    with pytest.raises(ValueError, match="lambda.h5.*'scale'"):
        hs.run(**vars(hs.get_args_parser().parse_args(args)))
    assert hs.main(args + ["--trust-model-file"])["n_heatmaps"] == 5


def test_overlay_colour_bar_roi_outline_and_class_name(tmp_path):
    img = np.full((100, 80), 1000.0, np.float32)
    heatmap = np.zeros((10, 8, 3), np.float32)
    heatmap[..., 1] = 0.9
    heatmap[..., 0] = 0.1
    roi = np.zeros((100, 80), np.uint8)
    roi[40:60, 30:50] = 1
    pic = hs.overlay_heatmap(img, heatmap, 1, max_height=100, roi_mask=roi)
    assert pic.shape[:2] == (100, 110)
    bar = pic[:, 80:]
    top, bottom = bar[14, 5].astype(int), bar[85, 5].astype(int)
    assert top[2] > top[0] and bottom[0] > bottom[2]            # red at 1, blue at 0 (BGR)
    assert (pic[40, 30:50] == 255).all(axis=-1).any()             # the lesion outline, white
    assert not (pic[10, 10] == 255).all()
    plain = hs.overlay_heatmap(img, heatmap, 1, max_height=100, colour_bar=False)
    assert plain.shape[:2] == (100, 80)
    assert hs.class_name(1, 3) == "malignant" and hs.class_name(3, 5) == "mass_mal"
    assert hs.class_name(1, 2, ["benign", "cancer"]) == "cancer"
    assert hs.class_name(2, 4) == "class 2"
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "Mass-Training_P_1_LEFT_CC_1.png"), roi * 255)
    cv2.imwrite(str(masks / "Calc-Training_P_11_LEFT_CC_1.png"), np.full_like(roi, 255))
    found = hs.find_roi_mask(masks, "P_1_LEFT_CC", (50, 40))
    assert found.shape == (50, 40) and abs(int(found.sum()) - 10 * 10) <= 10
    assert hs.find_roi_mask(masks, "P_2_LEFT_CC", (50, 40)) is None


def test_png_dir_holds_one_run(synth, tmp_path, keras_session):
    root, _ = synth
    pngs = tmp_path / "png"
    pngs.mkdir()
    (pngs / "P_9_LEFT_CC_heatmap.png").write_bytes(b"an earlier run's picture")
    (pngs / ".ddsm_outputs.json").write_text('{"tool": "heatmap_score", "files": '
                                             '["P_9_LEFT_CC_heatmap.png"], "dirs": []}')
    (pngs / "P_8_LEFT_CC_heatmap.png").write_bytes(b"a user's own picture")
    (pngs / "notes.txt").write_text("not ours")
    (tmp_path / "one.csv").write_text("patient_id,side,cancer\nP_1,RIGHT,1\n")
    hs.main([str(root / "img"), str(root / "patch.h5"), "--pat-csv", str(tmp_path / "one.csv"),
             "--img-height", str(HEIGHT), "--patch-size", str(P), "--stride", "16",
             "--featurewise-center", "--out", str(tmp_path / "h.npz"), "--png-dir", str(pngs)])
    assert sorted(p.name for p in pngs.iterdir()) == [
        ".ddsm_outputs.json", "P_1_RIGHT_CC_heatmap.png", "P_8_LEFT_CC_heatmap.png", "notes.txt"]
    assert (pngs / "P_8_LEFT_CC_heatmap.png").read_bytes() == b"a user's own picture"


# ------------------------------------------------------------------ hostile input
def test_same_stem_images_get_distinct_overlays(synth, tmp_path, keras_session):
    root, _ = synth
    folder = tmp_path / "imgs"
    _mammogram(folder / "a.png", 1)
    _mammogram(folder / "a.tif", 2)
    pngs = tmp_path / "png"
    common = [str(folder), str(root / "patch.h5"), "--net", "vgg16", "--img-height",
              str(HEIGHT), "--patch-size", str(P), "--stride", "16", "--featurewise-center",
              "--all-images", "--png-dir", str(pngs)]
    hs.main(common + ["--out", str(tmp_path / "h.npz")])
    pics = sorted(pngs.glob("*.png"))
    assert [p.name for p in pics] == ["a__png_heatmap.png", "a__tif_heatmap.png"]
    assert pics[0].read_bytes() != pics[1].read_bytes()
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\na.tif\n./a.png\n")
    with pytest.raises(ValueError, match=r"image '.*a.png' given twice \(line 1 and line 3\)"):
        hs.run(str(folder), str(root / "patch.h5"), img_list=str(listing),
               out=str(tmp_path / "h2.npz"))


def test_outputs_overlapping_the_inputs_are_refused(synth, tmp_path, capsys):
    root, _ = synth
    before = sorted(p.name for p in (root / "img").iterdir())
    for extra, message in [(["--png-dir", str(root / "img")], "--png-dir"),
                           (["--out", str(root / "img" / "h.npz")], "--out")]:
        with pytest.raises(SystemExit) as exc:
            hs.main([str(root / "img"), str(root / "patch.h5"), "--pat-csv",
                     str(root / "pats.csv"), "--out", str(tmp_path / "h.npz"), *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"{message} " in err
        assert "inside the input folder IMG_FOLDER" in err
    assert sorted(p.name for p in (root / "img").iterdir()) == before


def test_overlay_not_written_by_the_tool_stops_the_run(synth, tmp_path, capsys):
    root, _ = synth
    pngs = tmp_path / "png"
    pngs.mkdir()
    (pngs / "P_1_RIGHT_CC_heatmap.png").write_bytes(b"my own picture")
    (tmp_path / "one.csv").write_text("patient_id,side,cancer\nP_1,RIGHT,1\n")
    with pytest.raises(SystemExit) as exc:
        hs.main([str(root / "img"), str(root / "patch.h5"), "--pat-csv",
                 str(tmp_path / "one.csv"), "--out", str(tmp_path / "h.npz"),
                 "--png-dir", str(pngs)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "P_1_RIGHT_CC_heatmap.png exists and was not written" in err
    assert (pngs / "P_1_RIGHT_CC_heatmap.png").read_bytes() == b"my own picture"
    assert not (tmp_path / "h.npz").exists()


def test_malignant_column_missing_pat_csv_and_logged_settings(synth, tmp_path, capsys, caplog,
                                                              keras_session):
    root, _ = synth
    mal = tmp_path / "mal.csv"
    mal.write_text("patient_id,side,malignant\nP_1,LEFT,0\nP_1,RIGHT,1\n")
    assert [(r.patient_id, r.side, r.cancer) for r in hs.read_patient_sides(mal).itertuples()] \
        == [("P_1", "LEFT", 0), ("P_1", "RIGHT", 1)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        hs.main([str(root / "img"), str(root / "patch.h5"), "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--pat-csv ./full_img/pat.csv" in err
    assert "--all-images" in err and len(err.strip().splitlines()) == 1
    with caplog.at_level(logging.INFO, logger="heatmap_score"):
        summary = hs.main([str(root / "img"), str(root / "patch.h5"), "--pat-csv", str(mal),
                           "--img-height", "48", "--patch-size", str(P), "--stride", "8",
                           "--img-scale", "255", "--out", str(tmp_path / "m.npz"),
                           "--no-verbose"])
    assert summary["n_records"] == 2
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("options: {")]
    assert len(logged) == 1
    import json
    settings = json.loads(logged[0].split("options: ", 1)[1])
    assert settings["stride"] == 8 and settings["img_scale"] == 255.0 and \
        settings["pat_csv"] == str(mal) and settings["net"] == "vgg19"


@pytest.mark.parametrize("fprop", [False, True])
def test_images_that_cannot_give_a_heatmap_are_reported_not_scored(synth, tmp_path,
                                                                    keras_session, fprop):
    root, _ = synth
    folder = tmp_path / "imgs"
    _mammogram(folder / "a.png", 1)
    folder.mkdir(exist_ok=True)
    cv2.imwrite(str(folder / "flat.png"), np.full((HEIGHT, HEIGHT * 3 // 4), 900, np.uint16))
    cv2.imwrite(str(folder / "dot.png"), np.array([[5, 7], [9, 11]], np.uint16))
    mode = ["--fprop-mode", "--img-size", "96", "64", "--avg-pool-size", "2", "2"] if fprop \
        else ["--img-height", str(HEIGHT), "--patch-size", str(P), "--stride", "16"]
    summary = hs.main([str(folder), str(root / "patch.h5"), "--net", "vgg16", *mode,
                       "--featurewise-center", "--all-images", "--out", str(tmp_path / "h.npz")])
    assert summary["n_heatmaps"] == 1
    failed = {Path(path).name: why for path, why in summary["failed"]}
    assert sorted(failed) == ["dot.png", "flat.png"]
    assert "constant" in failed["flat.png"] and "16" in failed["dot.png"]


def test_run_refuses_an_unknown_option_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"unknown options \['stirde'\]; valid: .*'stride'"):
        hs.run(str(tmp_path / "img"), str(tmp_path / "patch.h5"), stirde=4,
               out=str(tmp_path / "h.npz"))
    assert list(tmp_path.iterdir()) == []


def test_run_hands_one_options_object_with_the_parsers_defaults(monkeypatch):
    import dataclasses

    import run_options

    cls = hs.options_class()
    assert cls is hs.options_class() and cls.__name__ == "HeatmapOptions"
    assert cls.flags_of("img_height") == ("--img-height", "-ih", "--no-img-height")
    seen = []
    monkeypatch.setattr(hs, "score_heatmaps", lambda opts, **extra: seen.append((opts, extra)))
    hs.run("imgs", "patch.h5")
    parsed = vars(hs.get_args_parser().parse_args(["imgs", "patch.h5"]))
    assert seen[0] == (run_options.options_from(cls, parsed), {})
    assert dataclasses.asdict(seen[0][0]) == parsed   # every flag, with the parser's default
    hs.run(Path("-imgs"), "patch.h5", "pats.csv", stride=4, img_size=(64, 48),
           given_options=["stride"], custom_objects={"Mine": int})
    opts, extra = seen[1]
    assert (opts.img_folder, opts.pat_csv, opts.stride, opts.img_size, opts.net) == (
        "-imgs", "pats.csv", 4, (64, 48), "vgg19")     # a path, as the command line gives it
    assert extra == {"given_options": ["stride"], "custom_objects": {"Mine": int}}


def test_run_refuses_a_class_name_given_twice_before_reading(tmp_path):
    """The command line's --class-list refuses a repeated name as it parses; run() called from
    Python checks it too, before anything is read or written."""
    with pytest.raises(ValueError, match=r"--class-list: class name 'neg' given twice"):
        hs.run(str(tmp_path / "img"), str(tmp_path / "patch.h5"), class_list=["neg", "neg"],
               out=str(tmp_path / "h.npz"))
    assert list(tmp_path.iterdir()) == []
