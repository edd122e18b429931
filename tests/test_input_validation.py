"""User text files: BOM, Windows line ends, blank lines and spaces read as the same data; bad
values (unknown pathology, path-like ids, undecodable bytes) are errors naming file and line."""
import pytest

import prepare_cbis_ddsm as prep
from script_utils import InputFileError, read_csv_table, read_text_lines, safe_name_part

HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,"
          "abnormality type,calc type,calc distribution,assessment,pathology,subtlety,"
          "image file path,cropped image file path,ROI mask file path")


def _row(pat="P_00005", side="RIGHT", view="CC", abn="1", pathology="MALIGNANT"):
    img = f"Calc-Training_{pat}_{side}_{view}/1.2/1.3/000000.dcm"
    roi = f"Calc-Training_{pat}_{side}_{view}_{abn}/1.4/1.5/000000.dcm"
    return f"{pat},3,{side},{view},{abn},calc,X,Y,4,{pathology},3,{img},{roi},{roi}"


def _write_csv(folder, rows, newline="\n", bom=False):
    text = newline.join([HEADER, *rows]) + newline
    path = folder / prep.CSV_NAMES[("calc", "Training")]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def test_bom_crlf_blank_lines_and_spaces_read_as_the_same_table(tmp_path):
    clean_dir, messy_dir = tmp_path / "clean", tmp_path / "messy"
    clean_dir.mkdir()
    messy_dir.mkdir()
    rows = [_row(), _row("P_00007", "LEFT", "MLO", "2", "BENIGN")]
    _write_csv(clean_dir, rows)
    messy = ["", " " + rows[0].replace(",", " , "), "", rows[1], "   "]
    _write_csv(messy_dir, messy, newline="\r\n", bom=True)
    clean, _ = prep.read_description_csvs(clean_dir)
    other, _ = prep.read_description_csvs(messy_dir)
    cols = ["patient_id", "side", "view", "abn_num", "pathology", "image_path", "roi_path"]
    assert clean[cols].values.tolist() == other[cols].values.tolist()
    assert clean["patient_id"].tolist() == ["P_00005", "P_00007"]


@pytest.mark.parametrize("bad, expected", [
    (dict(pathology="MALIGANT"), "unknown pathology 'MALIGANT'"),
    (dict(side="RIHGT"), "unknown side 'RIHGT'"),
    (dict(view="LM"), "unknown view 'LM'"),
    (dict(pat="../../etc"), "patient_id '../../etc' cannot be part of a file name"),
    (dict(pat=".."), "patient_id '..' cannot be part of a file name"),
])
def test_bad_row_is_an_error_naming_file_and_line(tmp_path, bad, expected):
    path = _write_csv(tmp_path, [_row(), _row("P_00009"), _row(**bad)])
    with pytest.raises(InputFileError) as info:
        prep.read_description_csvs(tmp_path)
    assert f"{path}, line 4: " in str(info.value) and expected in str(info.value)


def test_prepare_refuses_before_writing_anything(tmp_path):
    _write_csv(tmp_path, [_row(pathology="MALIGNANT?")])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        prep.main([str(tmp_path), str(tmp_path), str(out), "--no-verbose"])
    assert info.value.code == 2
    assert not out.exists()


def test_undecodable_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "pats.txt"
    path.write_bytes(b"P_00001\nP_00002\nP_\xff\xfe0003\n")
    with pytest.raises(InputFileError, match=r"pats\.txt, line 3: bytes that are not UTF-8"):
        read_text_lines(path)
    csv = tmp_path / "t.csv"
    csv.write_bytes(b"a,b\n1,2\n\xe9,3\n")
    with pytest.raises(InputFileError, match=r"t\.csv, line 3"):
        read_csv_table(csv)


def test_text_lines_and_tables_ignore_bom_crlf_blanks(tmp_path):
    path = tmp_path / "l.txt"
    path.write_bytes(b"\xef\xbb\xbfP_1\r\n\r\n  P_2  \r\n")
    assert read_text_lines(path) == [(1, "P_1"), (3, "P_2")]
    csv = tmp_path / "c.csv"
    csv.write_bytes(b"\xef\xbb\xbf patient_id , side\r\n\r\nP_1 , LEFT\r\n")
    table = read_csv_table(csv, required=["patient_id", "side"])
    assert table[["patient_id", "side", "_line"]].values.tolist() == [["P_1", "LEFT", "line 3"]]
    with pytest.raises(InputFileError, match="missing column"):
        read_csv_table(csv, required=["cancer"])


@pytest.mark.parametrize("value", ["", " ", ".", "..", "a/b", "a\\b", "C:x", "a\x00b", "x\ny"])
def test_safe_name_part_refuses_path_like_values(value):
    with pytest.raises(InputFileError, match="cannot be part of a file name"):
        safe_name_part(value, "id", "f.csv, line 2")


def test_safe_name_part_keeps_ordinary_ids():
    assert safe_name_part(" P_00005 ", "patient_id") == "P_00005"
    assert safe_name_part("Mass-Training_P_1_LEFT_CC_1.png", "file") == \
        "Mass-Training_P_1_LEFT_CC_1.png"


class _Bomb:
    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return (bytes if self.kind == "bytes" else bytearray), (10 ** 11,)


@pytest.mark.parametrize("kind", ["bytes", "bytearray"])
def test_restricted_unpickler_refuses_a_size_bomb(tmp_path, kind):
    import pickle

    from script_utils import restricted_unpickle

    path = tmp_path / "exams.pkl"
    path.write_bytes(pickle.dumps([{"L-CC": ["a"]}, _Bomb(kind)], protocol=2))
    assert path.stat().st_size < 200
    with pytest.raises(InputFileError, match=f"exams.pkl.*refusing builtins.{kind}"):
        restricted_unpickle(path)


def test_restricted_unpickler_reads_plain_data_and_refuses_code(tmp_path):
    import collections
    import os
    import pickle

    from script_utils import restricted_unpickle

    data = [{"L-CC": ["a", "b"], "cancer_label": collections.OrderedDict(left=1)},
            (b"\x00\x01", bytearray(b"xy"), 3.5, None, frozenset({1}))]
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=2))
    assert restricted_unpickle(path) == data
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(os.system))
    with pytest.raises(InputFileError, match="refusing to load posix.system"):
        restricted_unpickle(evil)
    with pytest.raises(InputFileError, match="more than the 10 bytes"):
        restricted_unpickle(path, max_bytes=10)
