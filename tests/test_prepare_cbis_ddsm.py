"""CBIS-DDSM preparation (ddsm_train/prepare_cbis_ddsm.py) on small DICOM files.

The real description CSVs (``cbis_csv_dir``) drive one test: the test writes tiny DICOM files at
the paths of a few listed rows (one calcification, masses, one row whose mask and cropped-image
paths are swapped, one row without files) and checks every output exactly. A second test uses a
hand-written CSV in the official column layout so the suite stands alone without ../shared.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import prepare_cbis_ddsm as prep

FULL_H, FULL_W = 64, 48


def _write_dcm(path: Path, arr: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _full(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(1000, 60000, size=(FULL_H, FULL_W)).astype(np.uint16)


def _mask(seed):
    m = np.zeros((FULL_H, FULL_W), np.uint8)
    m[10 + seed % 20:30 + seed % 20, 8:20] = 255
    return m


def _crop(seed):
    return np.random.default_rng(seed).integers(0, 255, size=(20, 12)).astype(np.uint8)


def _write_row(root, row, seed, swapped=False, with_mask=True):
    """Write the full image, mask and cropped image of one CSV row (stripped paths)."""
    _write_dcm(root / row["image file path"].strip(), _full(seed))
    mask_path, crop_path = row["ROI mask file path"].strip(), row["cropped image file path"].strip()
    if swapped:
        mask_path, crop_path = crop_path, mask_path
    if with_mask:
        _write_dcm(root / mask_path, _mask(seed))
    _write_dcm(root / crop_path, _crop(seed))


def _read_png(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.real_data
def test_real_csvs_with_small_dicoms(cbis_csv_dir, tmp_path):
    calc_tr = pd.read_csv(cbis_csv_dir / "calc_case_description_train_set.csv", dtype=str)
    mass_tr = pd.read_csv(cbis_csv_dir / "mass_case_description_train_set.csv", dtype=str)
    mass_te = pd.read_csv(cbis_csv_dir / "mass_case_description_test_set.csv", dtype=str)
    root = tmp_path / "dicom"
    picks = [  # (row, kind, split, swapped, with_mask)
        (calc_tr.iloc[0], "Calc", "Training", False, True),    # P_00005 RIGHT CC calc MALIGNANT
        (mass_tr.iloc[0], "Mass", "Training", False, True),    # P_00001 LEFT CC mass MALIGNANT
        (mass_tr.iloc[2], "Mass", "Training", True, True),     # swapped mask / crop paths
        (mass_te.iloc[0], "Mass", "Test", False, True),        # P_00016 LEFT CC (test)
        (mass_tr.iloc[3], "Mass", "Training", False, False),   # mask file missing, crop there
    ]
    for seed, (row, *_rest) in enumerate(picks):
        _write_row(root, row, seed, swapped=_rest[2], with_mask=_rest[3])
    out = tmp_path / "out"
    summary = prep.main([str(cbis_csv_dir), str(root), str(out), "--whole-img-size", "32", "24",
                         "--no-verbose"])
    nb_views = sum(len(pd.read_csv(cbis_csv_dir / f).groupby(
        ["patient_id", "left or right breast", "image view"])) for f in prep.CSV_NAMES.values())
    assert summary["csv_rows"] == 3568
    assert summary["full_images_written"] == 5
    assert summary["masks_written"] == 4 and summary["swapped_paths"] == 1
    # rows of the written views that the test gave no files (P_00016 LEFT CC also has a calc
    # lesion in the training CSV): "missing"; the row with only its cropped image: "unidentified"
    allrows = pd.concat([pd.read_csv(cbis_csv_dir / f, dtype=str) for f in prep.CSV_NAMES.values()])
    key = allrows["patient_id"] + "_" + allrows["left or right breast"] + "_" + allrows["image view"]
    ids = {f"{r['patient_id']}_{r['left or right breast']}_{r['image view']}" for r, *_ in picks}
    assert summary["mask_missing"] == key.isin(ids).sum() - len(picks) == 1
    assert summary["mask_unidentified"] == 1
    assert summary["views_in_both_splits"] == 29
    assert summary["full_image_missing"] == summary["views_total"] - 5
    assert summary["views_total"] <= nb_views
    roi = pd.read_csv(out / "roi_mask_path.csv", dtype=str)
    assert list(roi.columns) == prep.ROI_COLUMNS
    expect_rows = []
    for seed, (row, kind, split, _swapped, with_mask) in enumerate(picks):
        img_id = f"{row['patient_id']}_{row['left or right breast']}_{row['image view']}"
        np.testing.assert_array_equal(_read_png(out / "full_img" / f"{img_id}.png"), _full(seed))
        name = f"{kind}-{split}_{img_id}_{row['abnormality id']}.png"
        if with_mask:
            np.testing.assert_array_equal(_read_png(out / "roi_mask" / name), _mask(seed))
            assert (out / "roi_mask" / name).read_bytes()[24] == 1  # a 1-bit PNG
            expect_rows.append([row["patient_id"], row["left or right breast"],
                                row["image view"], row["abnormality id"], row["pathology"],
                                kind.lower()])
        else:
            assert not (out / "roi_mask" / name).exists()
    expect = pd.DataFrame(expect_rows, columns=prep.ROI_COLUMNS).sort_values(
        ["patient_id", "side", "view", "abn_num"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(roi.reset_index(drop=True), expect)
    assert (out / "train_pat.txt").read_text().split() == sorted(
        {r[0] for r in expect_rows if r[0] != mass_te.iloc[0]["patient_id"]})
    assert (out / "test_pat.txt").read_text().split() == [mass_te.iloc[0]["patient_id"]]
    psc = pd.read_csv(out / "pat_side_cancer.csv", dtype=str)
    breasts = sorted({(r["patient_id"], r["left or right breast"]) for r, *_ in picks})
    mal = allrows[allrows.pathology == "MALIGNANT"]
    want = [[p, sd, str(int(((mal.patient_id == p) & (mal["left or right breast"] == sd)).any()))]
            for p, sd in breasts]
    assert psc.values.tolist() == want and list(psc.columns) == ["patient_id", "side", "cancer"]
    whole = {s: {c: sorted(p.name for p in (out / "whole_img" / s / c).iterdir())
                 for c in ("neg", "pos")} for s in ("train", "test")}
    assert sum(len(v) for s in whole.values() for v in s.values()) == 5
    assert whole["test"]["pos"] == ["P_00016_LEFT_CC.png"]
    small = _read_png(out / "whole_img" / "test" / "pos" / "P_00016_LEFT_CC.png")
    assert small.shape == (32, 24) and small.dtype == np.uint16
    assert json.loads((out / "prepare_summary.json").read_text())["summary"]["masks_written"] == 4


CALC_HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,"
               "abnormality type,calc type,calc distribution,assessment,pathology,subtlety,"
               "image file path,cropped image file path,ROI mask file path\n")
MASS_HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,"
               "abnormality type,mass shape,mass margins,assessment,pathology,subtlety,"
               "image file path,cropped image file path,ROI mask file path\n")


def _handwritten(tmp_path):
    csv_dir, root = tmp_path / "csv", tmp_path / "dicom"
    csv_dir.mkdir()
    # calc: the cropped-image value ends in a newline (quoted), as in the release
    calc = CALC_HEADER + (
        'P_00001,3,LEFT,CC,1,calcification,AMORPHOUS,CLUSTERED,4,MALIGNANT,3,'
        'Calc-Training_P_00001_LEFT_CC/1.1/1.2/000000.dcm,'
        '"Calc-Training_P_00001_LEFT_CC_1/1.3/1.4/000001.dcm\n",'
        'Calc-Training_P_00001_LEFT_CC_1/1.3/1.4/000000.dcm\n'
        'P_00001,3,LEFT,CC,2,calcification,PUNCTATE,CLUSTERED,2,BENIGN_WITHOUT_CALLBACK,5,'
        'Calc-Training_P_00001_LEFT_CC/1.1/1.2/000000.dcm,'
        '"Calc-Training_P_00001_LEFT_CC_2/1.5/1.6/000001.dcm\n",'
        'Calc-Training_P_00001_LEFT_CC_2/1.5/1.6/000000.dcm\n')
    mass = MASS_HEADER + (
        'P_00002,2,RIGHT,MLO,1,mass,OVAL,CIRCUMSCRIBED,3,BENIGN,4,'
        'Mass-Training_P_00002_RIGHT_MLO/2.1/2.2/000000.dcm,'
        'Mass-Training_P_00002_RIGHT_MLO_1/2.3/2.4/000000.dcm,'
        '"Mass-Training_P_00002_RIGHT_MLO_1/2.3/2.4/000001.dcm\n"\n')
    (csv_dir / "calc_case_description_train_set.csv").write_text(calc)
    (csv_dir / "mass_case_description_train_set.csv").write_text(mass)
    c1 = "Calc-Training_P_00001_LEFT_CC"
    _write_dcm(root / c1 / "1.1/1.2/000000.dcm", _full(1))
    _write_dcm(root / f"{c1}_1/1.3/1.4/000000.dcm", _mask(1))      # as listed
    _write_dcm(root / f"{c1}_1/1.3/1.4/000001.dcm", _crop(1))
    _write_dcm(root / f"{c1}_2/1.5/1.6/000000.dcm", _crop(2))      # swapped
    _write_dcm(root / f"{c1}_2/1.5/1.6/000001.dcm", _mask(2))
    # P_00002: NBIA-downloader layout (renamed folders): found under the first path folder
    m1 = "Mass-Training_P_00002_RIGHT_MLO"
    _write_dcm(root / m1 / "07-20-2016-DDSM-12345/1.000000-full mammogram images-1/1-1.dcm",
               _full(3))
    _write_dcm(root / f"{m1}_1/07-21-2016-DDSM-1/1.000000-ROI mask images-2/1-1.dcm", _mask(3))
    _write_dcm(root / f"{m1}_1/07-21-2016-DDSM-1/1.000000-cropped images-3/1-1.dcm", _crop(3))
    return csv_dir, root


def test_handwritten_csv_quirks_and_layouts(tmp_path):
    csv_dir, root = _handwritten(tmp_path)
    table, used = prep.read_description_csvs(str(csv_dir))
    assert len(used) == 2 and len(table) == 3
    assert not table["roi_path"].str.contains("\n").any()
    assert not table["crop_path"].str.contains("\n").any()
    assert list(table["breast_density"]) == ["3", "3", "2"]
    out = tmp_path / "out"
    summary = prep.run(str(csv_dir), str(root), str(out), workers=2, verbose=False)
    assert (summary["full_images_written"], summary["masks_written"],
            summary["swapped_paths"]) == (2, 3, 1)
    np.testing.assert_array_equal(_read_png(out / "full_img" / "P_00001_LEFT_CC.png"), _full(1))
    np.testing.assert_array_equal(_read_png(out / "full_img" / "P_00002_RIGHT_MLO.png"), _full(3))
    for name, seed in (("Calc-Training_P_00001_LEFT_CC_1.png", 1),
                       ("Calc-Training_P_00001_LEFT_CC_2.png", 2),
                       ("Mass-Training_P_00002_RIGHT_MLO_1.png", 3)):
        mask = _read_png(out / "roi_mask" / name)
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, _mask(seed))
    assert (out / "roi_mask_path.csv").read_text() == (
        "patient_id,side,view,abn_num,pathology,type\n"
        "P_00001,LEFT,CC,1,MALIGNANT,calc\n"
        "P_00001,LEFT,CC,2,BENIGN_WITHOUT_CALLBACK,calc\n"
        "P_00002,RIGHT,MLO,1,BENIGN,mass\n")
    assert (out / "train_pat.txt").read_text() == "P_00001\nP_00002\n"
    assert (out / "test_pat.txt").read_text() == ""
    assert (out / "pat_side_cancer.csv").read_text() == (
        "patient_id,side,cancer\nP_00001,LEFT,1\nP_00002,RIGHT,0\n")
    assert not (out / "whole_img").exists()


def test_val_split_and_train_mean(tmp_path):
    """--val-size moves whole patients to whole_img/val and val_pat.txt; the summary holds the
    mean intensity of whole_img/train as compute_mean.py computes it."""
    import compute_mean

    csv_dir, root = _handwritten(tmp_path)
    out = tmp_path / "out"
    summary = prep.main([str(csv_dir), str(root), str(out), "--whole-img-size", "16", "12",
                         "--val-size", "0.5", "--no-verbose"])
    val = (out / "val_pat.txt").read_text().split()
    train = (out / "train_pat.txt").read_text().split()
    assert len(val) == 1 and sorted(train + val) == ["P_00001", "P_00002"]
    val_imgs = sorted(p.name for p in (out / "whole_img" / "val").rglob("*.png"))
    train_imgs = sorted(p.name for p in (out / "whole_img" / "train").rglob("*.png"))
    assert val_imgs and all(n.startswith(val[0]) for n in val_imgs)
    assert train_imgs and not any(n.startswith(val[0]) for n in train_imgs)
    assert summary["val_patients"] == 1 and summary["train_patients"] == 1
    expected = compute_mean.image_mean(out / "whole_img" / "train", (16, 12),
                                       rescale_factor=255 / 65535)["mean"]
    assert summary["whole_img_train_mean"] == pytest.approx(expected, abs=1e-4)
    assert summary["whole_img_train_mean"] > 1.0
    # the same seed gives the same split
    again = prep.run(str(csv_dir), str(root), str(tmp_path / "out2"), whole_img_size=(16, 12),
                     val_size=0.5, verbose=False)
    assert (tmp_path / "out2" / "val_pat.txt").read_text().split() == val
    assert again["whole_images"] == summary["whole_images"]


def test_unidentified_mask_and_missing_image_are_counted(tmp_path):
    csv_dir, root = _handwritten(tmp_path)
    c1 = "Calc-Training_P_00001_LEFT_CC"
    _write_dcm(root / f"{c1}_1/1.3/1.4/000000.dcm", _crop(5))  # no binary full-size file left
    import shutil
    shutil.rmtree(root / "Mass-Training_P_00002_RIGHT_MLO")    # full image gone
    summary = prep.run(str(csv_dir), str(root), str(tmp_path / "out"), verbose=False)
    assert summary["mask_unidentified"] == 1 and summary["masks_written"] == 1
    assert summary["full_image_missing"] == 1 and summary["masks_skipped_no_full_image"] == 1
    assert (tmp_path / "out" / "roi_mask_path.csv").read_text().count("\n") == 2


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="description CSV"):
        prep.run(str(tmp_path), str(tmp_path), str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="nope"):
        prep.run(str(tmp_path), str(tmp_path / "nope"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="whole_img_size"):
        prep.run(str(tmp_path), str(tmp_path), str(tmp_path / "o"), whole_img_size=(0, 5))
    (tmp_path / "mass_case_description_test_set.csv").write_text("patient_id,pathology\nP_1,B\n")
    with pytest.raises(ValueError, match="missing column"):
        prep.read_description_csvs(str(tmp_path))


def test_is_mask_for():
    assert prep.is_mask_for(_mask(0), (FULL_H, FULL_W))
    assert not prep.is_mask_for(_mask(0), (FULL_H, FULL_W + 1))
    assert not prep.is_mask_for(_full(0), (FULL_H, FULL_W))


def _tree(folder):
    """{relative path: bytes} of every file under ``folder`` but the summary (it names the
    output folder and the run time)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "prepare_summary.json"}


def test_rerun_after_a_change_gives_the_fresh_tree(tmp_path):
    """A pathology corrected in the CSV and --val-size dropped: the rerun into the same folder
    leaves no image in its old class folder and no val images or list."""
    csv_dir, root = _handwritten(tmp_path)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    prep.run(str(csv_dir), str(root), str(out), whole_img_size=(16, 12), val_size=0.5,
             verbose=False)
    assert (out / "val_pat.txt").is_file() and list((out / "whole_img" / "val").rglob("*.png"))
    prep.run(str(csv_dir), str(root), str(out), whole_img_size=(16, 12), verbose=False)
    assert not (out / "val_pat.txt").exists() and not (out / "whole_img" / "val").exists()
    assert (out / "whole_img" / "train" / "neg" / "P_00002_RIGHT_MLO.png").is_file()
    mass = csv_dir / "mass_case_description_train_set.csv"
    mass.write_text(mass.read_text().replace(",BENIGN,", ",MALIGNANT,"))
    rerun = prep.run(str(csv_dir), str(root), str(out), whole_img_size=(16, 12), verbose=False)
    first = prep.run(str(csv_dir), str(root), str(fresh), whole_img_size=(16, 12),
                     verbose=False)
    # the mean is of this run's train images only (the stale neg/ copy was gone before it)
    assert rerun["whole_img_train_mean"] == first["whole_img_train_mean"]
    assert rerun["whole_images"] == first["whole_images"]
    got, want = _tree(out), _tree(fresh)
    assert got.pop("notes.txt") == b"mine"            # not the tool's: kept
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert "whole_img/train/pos/P_00002_RIGHT_MLO.png" in got
    assert not (out / "whole_img" / "val").exists()


def test_a_users_file_of_an_outputs_name_is_kept_unless_overwrite(tmp_path, capsys):
    csv_dir, root = _handwritten(tmp_path)
    out = tmp_path / "out"
    mine = out / "full_img" / "P_00001_LEFT_CC.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own image")
    argv = [str(csv_dir), str(root), str(out), "--no-verbose"]
    with pytest.raises(SystemExit) as stop:
        prep.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and str(mine) in err and "--overwrite" in err
    assert err.count("\n") == 1
    assert mine.read_bytes() == b"my own image"
    assert sorted(p.name for p in out.rglob("*")) == ["P_00001_LEFT_CC.png", "full_img"]
    prep.main(argv + ["--overwrite"])
    np.testing.assert_array_equal(_read_png(mine), _full(1))
    assert prep.get_args_parser().parse_args(argv[:3]).overwrite is False


def test_out_dir_inside_the_dicom_root_is_refused(tmp_path):
    csv_dir, root = _handwritten(tmp_path)
    with pytest.raises(ValueError, match="OUT_DIR .* inside the input folder DICOM_ROOT"):
        prep.run(str(csv_dir), str(root), str(root / "png"), verbose=False)
    assert not (root / "png").exists()
