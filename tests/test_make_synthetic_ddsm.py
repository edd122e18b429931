"""Tests of ddsm_train/make_synthetic_ddsm.py: the CBIS-DDSM layouts, pixel scale, masks,
splits, anatomy (pectoral wedge, text label, chest-wall side), class cues, determinism and
bad input."""
import csv
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import make_synthetic_ddsm as msd

H, W, WHOLE = 256, 200, (128, 100)
NB_PAT = 16
FULL_RE = re.compile(r"^(P_\d{5})_(LEFT|RIGHT)_(CC|MLO)\.png$")
MASK_RE = re.compile(r"^(Calc|Mass)-Training_(P_\d{5})_(LEFT|RIGHT)_(CC|MLO)_(\d+)\.png$")
PATHOLOGIES = {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"}


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """A 16-patient set at 256x200 (whole images 128x100), seed 7, and its parsed CSV rows."""
    out = tmp_path_factory.mktemp("synth") / "ddsm"
    res = msd.run(out, nb_patients=NB_PAT, img_height=H, img_width=W, whole_img_size=WHOLE,
                  seed=7)
    with open(out / "roi_mask_path.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return res, out, rows


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _header(path):
    with open(path) as fh:
        return fh.readline().rstrip("\n")


def _lines(path):
    return [ln for ln in Path(path).read_text().splitlines() if ln]


def _mask_path(out, r):
    stem = f"{r['patient_id']}_{r['side']}_{r['view']}"
    return out / "roi_mask" / f"{r['type'].capitalize()}-Training_{stem}_{r['abn_num']}.png"


def _malignant_views(rows):
    return {(r["patient_id"], r["side"], r["view"]) for r in rows if r["pathology"] == "MALIGNANT"}


# ------------------------------------------------------------------------------------------------
# layout and formats
# ------------------------------------------------------------------------------------------------
def test_layout_names_and_counts(synth):
    res, out, rows = synth
    full = sorted(p.name for p in (out / "full_img").iterdir())
    assert len(full) == 4 * NB_PAT == res["nb_images"]
    assert all(FULL_RE.match(n) for n in full), full
    pats = {FULL_RE.match(n).group(1) for n in full}
    assert pats == {f"P_{i:05d}" for i in range(1, NB_PAT + 1)}
    masks = sorted(p.name for p in (out / "roi_mask").iterdir())
    assert all(MASK_RE.match(n) for n in masks), masks
    assert len(masks) == len(rows) == res["nb_masks"] > 0
    whole = sorted((out / "whole_img").glob("*/*/*.png"))
    assert len(whole) == 4 * NB_PAT
    for p in whole:
        assert p.parent.parent.name in {"train", "val", "test"} and p.parent.name in {"neg", "pos"}
        assert FULL_RE.match(p.name)
    assert {p.name for p in whole} == set(full)
    for key in ("full_img_dir", "roi_mask_dir", "roi_mask_csv", "train_pat", "test_pat",
                "pat_side_cancer_csv", "whole_img_dir", "options_json"):
        assert Path(res[key]).exists(), key
    counts = res["whole_img_counts"]
    assert sum(c["neg"] + c["pos"] for c in counts.values()) == 4 * NB_PAT
    for split in counts:
        for cls in ("neg", "pos"):
            assert counts[split][cls] == len(list((out / "whole_img" / split / cls).iterdir()))


def test_pixel_scale_full_and_whole_images(synth):
    _, out, _ = synth
    for p in sorted((out / "full_img").iterdir())[:12]:
        img = _read(p)
        assert img.dtype == np.uint16 and img.shape == (H, W)
        assert img.max() <= msd.MAX_STORED_VALUE == 65520
        assert np.all(img % msd.STORE_FACTOR == 0), "12-bit values are stored times 16"
        assert img.max() > 40000 and img.min() < 4000  # bright label/tissue, dark background
    for p in sorted((out / "whole_img").glob("*/*/*.png"))[:12]:
        img = _read(p)
        assert img.dtype == np.uint16 and img.shape == WHOLE
        assert img.max() <= msd.MAX_STORED_VALUE and np.all(img % 16 == 0)


def test_csv_headers_and_values(synth):
    _, out, rows = synth
    assert _header(out / "roi_mask_path.csv") == "patient_id,side,view,abn_num,pathology,type"
    assert _header(out / "pat_side_cancer.csv") == "patient_id,side,cancer"
    for r in rows:
        assert r["pathology"] in PATHOLOGIES and r["type"] in {"calc", "mass"}
        assert r["side"] in {"LEFT", "RIGHT"} and r["view"] in {"CC", "MLO"}
    paths = {r["pathology"] for r in rows}
    assert {"MALIGNANT", "BENIGN"} <= paths
    assert {r["type"] for r in rows} == {"calc", "mass"}


def test_every_row_has_its_mask_and_vice_versa(synth):
    _, out, rows = synth
    expected = {f"{r['type'].capitalize()}-Training_{r['patient_id']}_{r['side']}_{r['view']}_"
                f"{r['abn_num']}.png" for r in rows}
    assert len(expected) == len(rows), "duplicate rows"
    assert expected == {p.name for p in (out / "roi_mask").iterdir()}
    per_view = defaultdict(list)
    for r in rows:
        per_view[(r["patient_id"], r["side"], r["view"])].append(int(r["abn_num"]))
    for key, nums in per_view.items():
        assert sorted(nums) == list(range(1, len(nums) + 1)), key
    # a lesion is seen in both views of its breast, with the same number, type and pathology
    by_view = defaultdict(set)
    for r in rows:
        key = (r["patient_id"], r["side"], r["view"])
        by_view[key].add((r["abn_num"], r["type"], r["pathology"]))
    for (pid, side, view), lesions in by_view.items():
        other = "MLO" if view == "CC" else "CC"
        assert by_view[(pid, side, other)] == lesions


def test_masks_binary_full_size_and_on_bright_lesions(synth):
    _, out, rows = synth
    for r in rows:
        stem = f"{r['patient_id']}_{r['side']}_{r['view']}"
        mask = _read(_mask_path(out, r))
        assert mask.dtype == np.uint8 and mask.shape == (H, W)
        assert set(np.unique(mask)) == {0, 255}
        m = mask > 0
        img = _read(out / "full_img" / f"{stem}.png").astype(np.float32)
        ring = cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        ring &= ~m
        # the lesion is brighter than the tissue around its mask
        assert img[m].max() > np.median(img[ring]) + 16 * 150, (stem, r["abn_num"])


# ------------------------------------------------------------------------------------------------
# patient lists and splits
# ------------------------------------------------------------------------------------------------
def test_patient_lists_disjoint_cover_and_stratified(synth):
    res, out, rows = synth
    train, test = _lines(out / "train_pat.txt"), _lines(out / "test_pat.txt")
    assert not set(train) & set(test)
    assert set(train) | set(test) == {f"P_{i:05d}" for i in range(1, NB_PAT + 1)}
    assert len(test) == res["nb_test_patients"] == round(0.25 * NB_PAT)
    malignant = {r["patient_id"] for r in rows if r["pathology"] == "MALIGNANT"}
    assert len(malignant) == res["nb_malignant_patients"]
    assert 0.25 * NB_PAT <= len(malignant) <= 0.75 * NB_PAT
    assert malignant & set(train) and malignant & set(test)
    assert (set(train) - malignant) and (set(test) - malignant)


def test_pat_side_cancer_matches_csv(synth):
    _, out, rows = synth
    with open(out / "pat_side_cancer.csv", newline="") as fh:
        table = {(r["patient_id"], r["side"]): int(r["cancer"]) for r in csv.DictReader(fh)}
    assert len(table) == 2 * NB_PAT
    mal_sides = {(r["patient_id"], r["side"]) for r in rows if r["pathology"] == "MALIGNANT"}
    assert {k for k, v in table.items() if v == 1} == mal_sides
    assert set(table.values()) == {0, 1}


def test_whole_image_labels_and_splits_agree(synth):
    _, out, rows = synth
    mal_views = _malignant_views(rows)
    train, test = set(_lines(out / "train_pat.txt")), set(_lines(out / "test_pat.txt"))
    pats = defaultdict(set)
    for p in (out / "whole_img").glob("*/*/*.png"):
        pid, side, view = FULL_RE.match(p.name).groups()
        assert (p.parent.name == "pos") == ((pid, side, view) in mal_views), p
        pats[p.parent.parent.name].add(pid)
    assert pats["test"] == test
    assert pats["train"] | pats["val"] == train
    assert pats["val"] and not pats["train"] & pats["val"]
    lesion_views = {(r["patient_id"], r["side"], r["view"]) for r in rows}
    benign_only = lesion_views - mal_views
    assert benign_only, "benign lesions must also appear in negative views"


# ------------------------------------------------------------------------------------------------
# anatomy
# ------------------------------------------------------------------------------------------------
def _canonical(img, side):
    """Mirror RIGHT views so that the chest wall is on the left."""
    return img if side == "LEFT" else img[:, ::-1]


def test_chest_wall_side_and_pectoral_wedge(synth):
    _, out, _ = synth
    for pid in ("P_00001", "P_00002", "P_00003"):
        for side in ("LEFT", "RIGHT"):
            cc = _canonical(_read(out / "full_img" / f"{pid}_{side}_CC.png"), side).astype(float)
            mlo = _canonical(_read(out / "full_img" / f"{pid}_{side}_MLO.png"), side).astype(float)
            mid = slice(int(0.4 * H), int(0.6 * H))
            assert cc[mid, :10].mean() > 8 * cc[mid, -10:].mean(), (pid, side)  # breast at wall
            corner = (slice(2, int(0.08 * H)), slice(0, int(0.06 * W)))
            breast = cc[cc > 16 * 500]
            fat = np.percentile(breast, 25)
            assert mlo[corner].mean() > fat + 16 * 400, (pid, side)  # pectoral muscle is bright
            assert cc[corner].mean() < 16 * 400, (pid, side)  # CC: that corner is background


def test_text_label_in_background_away_from_breast(synth):
    _, out, _ = synth
    for p in sorted((out / "full_img").iterdir())[:16]:
        pid, side, view = FULL_RE.match(p.name).groups()
        img = _canonical(_read(p), side)
        label = np.zeros(img.shape, bool)
        label[: int(0.15 * H)] = img[: int(0.15 * H)] >= 16 * 3900  # white burned-in text
        ys, xs = np.nonzero(label)
        assert ys.size > 10, p.name
        assert xs.min() > 0.6 * W, p.name  # top corner away from the chest wall
        n, comp = cv2.connectedComponents((img > 16 * 400).astype(np.uint8))
        breast_id = comp[H // 2, 0]
        assert breast_id != 0 and not np.any(comp[label] == breast_id), p.name


# ------------------------------------------------------------------------------------------------
# class cues: documented, present, learnable but not trivial
# ------------------------------------------------------------------------------------------------
def _solidity(mask):
    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(cnts, key=cv2.contourArea)
    return cv2.contourArea(c) / cv2.contourArea(cv2.convexHull(c))


def test_mass_shape_and_calc_density_cues(synth):
    _, out, rows = synth
    feats = defaultdict(lambda: ([], []))
    for r in rows:
        stem = f"{r['patient_id']}_{r['side']}_{r['view']}"
        m = _read(_mask_path(out, r)) > 0
        img = _read(out / "full_img" / f"{stem}.png").astype(np.float32) / 16
        if r["type"] == "mass":
            value = 1.0 - _solidity(m)  # irregular outline
        else:
            highpass = img - cv2.GaussianBlur(img, (0, 0), 2)
            value = np.mean(highpass[m] > 100)  # share of the ROI covered by fine bright specks
        y, x = feats[r["type"]]
        y.append(r["pathology"] == "MALIGNANT")
        x.append(value)
    assert roc_auc_score(*feats["mass"]) > 0.95
    assert roc_auc_score(*feats["calc"]) > 0.9


def test_whole_images_learnable_by_a_simple_feature(synth):
    """Max local fine-scale energy inside the breast ranks pos above neg, but not perfectly."""
    _, out, _ = synth
    ys, xs = [], []
    for p in sorted((out / "whole_img").glob("*/*/*.png")):
        img = _read(p).astype(np.float32) / 16
        k = max(3, int(0.06 * img.shape[0]) | 1)
        inner = cv2.erode((img > 400).astype(np.uint8), np.ones((k, k), np.uint8)) > 0
        energy = cv2.blur(np.abs(img - cv2.GaussianBlur(img, (0, 0), 1.5)), (k, k))
        ys.append(p.parent.name == "pos")
        xs.append(energy[inner].max())
    auc = roc_auc_score(ys, xs)
    assert 0.7 < auc < 0.99, auc


# ------------------------------------------------------------------------------------------------
# determinism, CLI, bad input
# ------------------------------------------------------------------------------------------------
TINY = dict(nb_patients=3, img_height=128, img_width=96, whole_img_size=(32, 24))


def _all_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    msd.run(tmp_path / "a", seed=3, workers=1, **TINY)
    msd.run(tmp_path / "b", seed=3, workers=2, **TINY)
    msd.run(tmp_path / "c", seed=4, **TINY)
    a, b, c = (_all_bytes(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    full = [k for k in a if k.startswith("full_img/")]
    assert full and all(a[k] != c[k] for k in full)


def test_lesion_contrast_scales_lesions_only(tmp_path):
    msd.run(tmp_path / "a", seed=5, **{**TINY, "nb_patients": 4})
    msd.run(tmp_path / "b", seed=5, lesion_contrast=2.0, **{**TINY, "nb_patients": 4})
    a, b = _all_bytes(tmp_path / "a"), _all_bytes(tmp_path / "b")
    assert all(a[k] == b[k] for k in a if k.startswith("roi_mask/") or k.endswith(".txt"))
    with open(tmp_path / "a" / "roi_mask_path.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    per_view = defaultdict(int)
    for r in rows:
        per_view[(r["patient_id"], r["side"], r["view"])] += 1
    for r in rows:
        stem = f"{r['patient_id']}_{r['side']}_{r['view']}"
        m = _read(_mask_path(tmp_path / "a", r)) > 0
        ia = _read(tmp_path / "a" / "full_img" / f"{stem}.png").astype(float)
        ib = _read(tmp_path / "b" / "full_img" / f"{stem}.png").astype(float)
        assert (ib - ia)[m].max() > 16 * 150  # lesion pixels brighter
        far = cv2.dilate(m.astype(np.uint8), np.ones((41, 41), np.uint8)) == 0
        if per_view[(r["patient_id"], r["side"], r["view"])] == 1:
            assert np.array_equal(ia[far], ib[far])  # tissue far from the lesion unchanged


def test_main_cli_in_process_and_as_scripts(tmp_path, repo_root, capsys):
    res = msd.main([str(tmp_path / "m"), "--nb-patients", "2", "--img-height", "128",
                    "--img-width", "96", "--whole-img-size", "32", "24", "--seed", "1"])
    assert res["nb_images"] == 8 and "wrote 8 images of 2 patients" in capsys.readouterr().out
    args = [str(tmp_path / "s"), "--nb-patients", "2", "--img-height", "128", "--img-width", "96",
            "--whole-img-size", "32", "24", "--seed", "1"]
    script = subprocess.run([sys.executable, "make_synthetic_ddsm.py", *args],
                            cwd=repo_root / "ddsm_train", capture_output=True, text=True,
                            timeout=120)
    assert script.returncode == 0, script.stderr
    assert _all_bytes(tmp_path / "s") == _all_bytes(tmp_path / "m")
    args[0] = str(tmp_path / "mod")
    module = subprocess.run([sys.executable, "-m", "ddsm_train.make_synthetic_ddsm", *args],
                            cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert module.returncode == 0, module.stderr
    assert "wrote 8 images" in module.stdout


def test_run_hands_on_the_parsers_options(monkeypatch):
    """run() builds one options object: the parser's defaults, then its keywords."""
    import run_options

    seen = []
    monkeypatch.setattr(msd, "write_synthetic_ddsm", seen.append)
    msd.run("out")
    msd.run(out_dir="out", seed=3, whole_img_size=(64, 48))
    cls = msd.options_class()
    assert cls is msd.options_class()
    args = vars(msd.get_args_parser().parse_args(["out"]))
    assert type(seen[0]) is cls and dict(seen[0]) == args and list(seen[0]) == list(args)
    assert seen[0] == run_options.options_from(cls, args)
    assert args["whole_img_size"] == [288, 224] and args["img_height"] == 1024
    assert seen[1] == seen[0].replace(seed=3, whole_img_size=(64, 48))


def test_run_refuses_an_unknown_option_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"\['nb_patient'\].*valid:.*'nb_patients'"):
        msd.run(tmp_path / "out", nb_patient=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, match", [
    (dict(nb_patients=1), "nb_patients should be an integer >= 2"),
    (dict(nb_patients=2.5), "nb_patients"),
    (dict(img_height=100), "image size should be at least"),
    (dict(img_width=50), "image size should be at least"),
    (dict(whole_img_size=(8, 24)), "whole_img_size"),
    (dict(whole_img_size=(256, 24)), "should not exceed"),
    (dict(test_frac=0.0), "test_frac"),
    (dict(val_frac=1.0), "val_frac"),
    (dict(malignant_frac=1.5), "malignant_frac"),
    (dict(workers=0), "workers"),
    (dict(lesion_contrast=0.0), "lesion_contrast"),
])
def test_bad_input_raises_before_writing(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        msd.run(tmp_path / "out", **{**TINY, **kwargs})
    assert not (tmp_path / "out").exists()


def test_non_empty_out_dir_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty.*overwrite"):
        msd.run(out, **TINY)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="holds no marker of this generator"):
        msd.run(out, overwrite=True, **TINY)       # not ours: may be real data
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    msd.run(out, seed=1, **TINY)
    (out / "notes.txt").write_text("mine")
    (out / "full_img" / "mine.png").write_bytes(b"x")   # the user's, in a generated folder
    first = _all_bytes(out)
    msd.run(out, seed=2, overwrite=True, **TINY)
    res = msd.run(out, seed=1, overwrite=True, **TINY)
    assert res["nb_images"] == 12
    assert _all_bytes(out) == first  # earlier outputs replaced, the user's files kept
    with pytest.raises(SystemExit) as exc:
        msd.main([str(out), "--nb-patients", "2", "--img-height", "128", "--img-width", "96",
                  "--whole-img-size", "32", "24"])
    assert exc.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_overwrite_refuses_prepared_real_data(tmp_path):
    real = tmp_path / "cbis"
    for rel in ("full_img/P_00001_LEFT_CC.png", "whole_img/train/neg/P_00001_LEFT_CC.png",
                "roi_mask_path.csv", "train_pat.txt"):
        (real / rel).parent.mkdir(parents=True, exist_ok=True)
        (real / rel).write_bytes(b"real")
    before = _all_bytes(real)
    with pytest.raises(ValueError, match="holds no marker"):
        msd.run(real, overwrite=True, **TINY)
    assert _all_bytes(real) == before
