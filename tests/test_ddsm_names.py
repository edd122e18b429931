"""CBIS-DDSM naming (ddsm_names): building and parsing image and mask names, hostile parts."""
import pytest

import ddsm_names as dn
import eval_metrics
import heatmap_score
import image_clf_predict
import make_synthetic_ddsm
import prepare_cbis_ddsm
from script_utils import InputFileError


def test_constants_are_the_scripts_constants():
    assert dn.SIDES == ("LEFT", "RIGHT") and dn.VIEWS == ("CC", "MLO")
    assert dn.EXAM_VIEWS == ("L-CC", "R-CC", "L-MLO", "R-MLO")
    # the scripts' public names are this module's objects, not copies
    assert heatmap_score.VIEWS is dn.VIEWS and make_synthetic_ddsm.VIEWS is dn.VIEWS
    assert make_synthetic_ddsm.SIDES is dn.SIDES and prepare_cbis_ddsm.SIDES is dn.SIDES
    assert image_clf_predict.VIEWS is dn.EXAM_VIEWS
    assert [dn.exam_view_side(v) for v in dn.EXAM_VIEWS] == ["left", "right", "left", "right"]


def test_image_name_round_trip():
    name = dn.image_name("P_00001", "LEFT", "MLO")
    assert name == "P_00001_LEFT_MLO"
    parsed = dn.parse_image_name(f"whole/pos/{name}.png")
    assert parsed == ("P_00001", "LEFT", "MLO") and parsed.stem == name
    assert (parsed.patient, parsed.side, parsed.view) == ("P_00001", "LEFT", "MLO")
    assert dn.image_name(" P_1 ", "RIGHT", "CC") == "P_1_RIGHT_CC"   # parts stripped


@pytest.mark.parametrize("name, want", [
    ("P_00003_RIGHT_CC.png", ("P_00003", "RIGHT", "CC")),
    ("a\\b\\P_7_left_mlo.jpg", ("P_7", "LEFT", "MLO")),            # Windows folders, any case
    ("Mass-Training_P_1_LEFT_CC_2.png", ("Mass-Training_P_1", "LEFT", "CC")),
    ("P_1_LEFT_CC_LEFT_MLO", ("P_1", "LEFT", "CC")),               # shortest patient
    ("P_1_LEFT_CCX.png", None),                                   # view must end there
    ("P_1_UP_CC.png", None), ("LEFT_CC", None), ("", None), ("_LEFT_CC", None),
    ("P_1_LEFT_CC/scan.png", None),                               # only the file's own name
])
def test_parse_image_name(name, want):
    assert dn.parse_image_name(name) == want
    assert eval_metrics.parse_cbis_name(name) == want   # the 2017-era name delegates


@pytest.mark.parametrize("stem, want", [
    ("P_1_LEFT_CC", ("P_1", "LEFT", "CC")),
    ("P_1_L_cc", ("P_1", "L", "cc")),    # any words, as a user's CSV spells them
    ("P1_CC", None), ("P1", None),
])
def test_split_image_stem(stem, want):
    assert dn.split_image_stem(stem) == want


@pytest.mark.parametrize("parts", [
    ("../x", "LEFT", "CC"), ("P_1", "LEFT/..", "CC"), ("P_1", "LEFT", "C\\C"),
    ("C:", "LEFT", "CC"), ("..", "LEFT", "CC"), ("", "LEFT", "CC"), ("P_1", "LEFT", " "),
    ("P\n1", "LEFT", "CC"), ("P_1", "LEFT", "CC\x00"), (None, "LEFT", "CC"),
])
def test_image_name_refuses_hostile_parts(parts):
    with pytest.raises(InputFileError, match=r"roi\.csv, line 3: .*cannot be part of a file "
                                             r"name"):
        dn.image_name(*parts, where="roi.csv, line 3")


def test_mask_name_round_trip_and_hostile_parts():
    name = dn.mask_name("mass", "Training", "P_1_LEFT_CC", 2)
    assert name == "Mass-Training_P_1_LEFT_CC_2.png"
    assert dn.parse_mask_name(name) == ("Mass", "Training", "P_1_LEFT_CC", 2)
    assert dn.parse_mask_name("Calc-Test_P_00005_RIGHT_MLO_10.png").abn_num == 10
    for other in ("Mass-Training_P_1_LEFT_CC.png", "Mass-Training_P_1_LEFT_CC_2.jpg",
                  "Mass_Training_P_1_LEFT_CC_2.png", "Mass-Train1_P_1_LEFT_CC_2.png"):
        assert dn.parse_mask_name(other) is None, other
    for typ, split in (("../mass", "Training"), ("mass", "Test/.."), ("mass", "")):
        with pytest.raises(InputFileError, match="cannot be part of a file name"):
            dn.mask_name(typ, split, "P_1_LEFT_CC", 1)


def test_heatmap_view_path_refuses_a_hostile_patient(tmp_path):
    (tmp_path / "P_1_LEFT_CC.png").write_bytes(b"x")
    assert heatmap_score.view_path(tmp_path, "P_1", "LEFT", "CC") == tmp_path / "P_1_LEFT_CC.png"
    with pytest.raises(InputFileError, match="patient_id '../P_1'"):
        heatmap_score.view_path(tmp_path / "sub", "../P_1", "LEFT", "CC")
