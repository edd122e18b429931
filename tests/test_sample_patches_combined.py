"""Patch sampler (ddsm_train/sample_patches_combined.py): overlap rules checked by brute force.

The test writes its own small 16-bit mammogram phantoms (a flat-ish breast on a zero background,
disc lesions with 0/255 masks, a few bright specks for the blob detector) in the CBIS-DDSM
layout, runs the sampler at a small size (target height 512, 64-pixel patches), and checks every
written patch against the image and masks it recomputes independently.
"""
import filecmp
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import dm_image
import run_options
import sample_patches_combined as spc

H, W = 600, 480          # stored image size
TH, P = 512, 64          # target height, patch size
NB_ABN, NB_BKG, NB_HNS = 6, 8, 4
TW = int(TH / H * W)     # resized width (2017 truncation)

# patient -> list of (side, view, abn_num, pathology, type, (cx, cy, radius))
CASES = {
    "P_00001": [("LEFT", "CC", 1, "MALIGNANT", "mass", (150, 250, 40)),
                ("LEFT", "CC", 2, "BENIGN", "calc", (120, 420, 8))],
    "P_00002": [("RIGHT", "MLO", 1, "BENIGN", "mass", (330, 300, 36))],
    "P_00003": [("LEFT", "MLO", 1, "MALIGNANT", "calc", (160, 330, 10))],
    "P_00004": [("RIGHT", "CC", 1, "BENIGN_WITHOUT_CALLBACK", "mass", (300, 200, 42))],
    "P_00005": [("LEFT", "CC", 1, "MALIGNANT", "mass", (170, 300, 38))],
    "P_00006": [("RIGHT", "CC", 1, "BENIGN", "calc", (320, 330, 9))],
    "P_00007": [("LEFT", "CC", 1, "MALIGNANT", "calc", (140, 280, 12)),
                ("LEFT", "MLO", 1, "MALIGNANT", "calc", (150, 260, 12))],
    "P_00008": [("RIGHT", "MLO", 1, "BENIGN", "mass", (310, 350, 40))],
}
SPECKS = [(0.30, 0.25), (0.45, 0.15), (0.55, 0.78), (0.25, 0.62), (0.42, 0.88), (0.60, 0.40),
          (0.35, 0.48), (0.50, 0.62)]  # (x, y) as fractions of the breast box, away from lesions


def _draw_view(rng, side, lesions, constant=False):
    """16-bit phantom and one 0/255 mask per lesion."""
    img = np.zeros((H, W), np.uint16)
    breast = np.zeros((H, W), np.uint8)
    cx = 0 if side == "LEFT" else W - 1
    cv2.ellipse(breast, (cx, H // 2), (int(W * 0.8), int(H * 0.46)), 0, 0, 360, 1, -1)
    inside = breast > 0
    if constant:
        img[inside] = 30000
        return img, [_disc_mask(c) for *_, c in lesions]
    img[inside] = 20000 + rng.integers(0, 1500, size=int(inside.sum()))
    masks = []
    for *_, circle in lesions:
        mask = _disc_mask(circle)
        img[mask > 0] += 5000
        masks.append(mask)
    ys, xs = np.nonzero(inside)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    for fx, fy in SPECKS:
        sx = int(x0 + fx * (x1 - x0)) if side == "LEFT" else int(x1 - fx * (x1 - x0))
        cv2.circle(img, (sx, int(y0 + fy * (y1 - y0))), 4, 60000, -1)
    return img, masks


def _disc_mask(circle):
    mask = np.zeros((H, W), np.uint8)
    cv2.circle(mask, circle[:2], circle[2], 255, -1)
    return mask


def _write_dataset(root, cases=CASES, constant=False):
    rng = np.random.default_rng(7)
    full, masks_dir = root / "full_img", root / "roi_mask"
    full.mkdir(parents=True)
    masks_dir.mkdir()
    rows = []
    views = {}
    for pat, lesions in cases.items():
        for les in lesions:
            views.setdefault((pat, les[0], les[1]), []).append(les)
    for (pat, side, view), lesions in views.items():
        img, masks = _draw_view(rng, side, lesions, constant)
        cv2.imwrite(str(full / f"{pat}_{side}_{view}.png"), img)
        for les, mask in zip(lesions, masks):
            split = "Test" if pat == "P_00003" else "Training"
            name = f"{les[4].capitalize()}-{split}_{pat}_{side}_{view}_{les[2]}.png"
            cv2.imwrite(str(masks_dir / name), mask)
            rows.append((pat, side, view, les[2], les[3], les[4]))
    pd.DataFrame(rows, columns=list(spc.CSV_COLUMNS)).to_csv(root / "roi_mask_path.csv",
                                                             index=False)
    (root / "pat.txt").write_text("".join(p + "\n" for p in cases))
    return root


def _run(data, out, **kw):
    opts = dict(target_height=TH, patch_size=P, nb_abn=NB_ABN, nb_bkg=NB_BKG, nb_hns=NB_HNS,
                val_size=0.25, verbose=False, seed=12345)
    opts.update(kw)
    return spc.run(str(data / "roi_mask_path.csv"), str(data / "roi_mask"),
                   str(data / "pat.txt"), str(data / "full_img"), str(out / "train"),
                   str(out / "val"), **opts)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("sampler_data"))


@pytest.fixture(scope="module")
def sampled(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled_w1")
    return out, _run(dataset, out, workers=1)


def _resized(path, gs=False):
    return dm_image.read_resize_img(path, target_height=TH, gs_255=gs)


def _ref_mask(path):
    """Independent mask resize: area interpolation, half-coverage threshold (documented rule)."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    m = cv2.resize(np.where(m > 0, 255, 0).astype(np.uint8), (TW, TH), interpolation=cv2.INTER_AREA)
    return m >= 128


def _window(arr, row, col):
    """Brute-force patch window with zero fill outside ``arr`` (centre convention c - P//2)."""
    pad = np.pad(arr, P)
    r, c = row - P // 2 + P, col - P // 2 + P
    return pad[r:r + P, c:c + P]


def _manifest(out):
    frames = []
    for split in ("train", "val"):
        df = pd.read_csv(out / split / "patches.csv")
        df["split"] = split
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def test_every_patch_meets_its_overlap_rule(dataset, sampled):
    out, summary = sampled
    assert summary["images_skipped"] == 0 and summary["cutoff_relaxations"] == 0
    man = _manifest(out)
    assert len(man) == summary["patches_total"] > 0
    csv = pd.read_csv(dataset / "roi_mask_path.csv")
    checked = {"abn": 0, "bkg": 0, "hns": 0}
    for img_id, rows in man.groupby("img_id"):
        pat, side, view = img_id.rsplit("_", 2)
        image = _resized(dataset / "full_img" / f"{img_id}.png")
        image, _ = dm_image.segment_breast(image, crop=False)  # outside the breast -> 0
        lesions = csv[(csv.patient_id == pat) & (csv.side == side) & (csv.view == view)]
        masks = {}
        for les in lesions.itertuples():
            name = next(n for n in os.listdir(dataset / "roi_mask")
                        if n.endswith(f"_{img_id}_{les.abn_num}.png"))
            masks[les.abn_num] = _ref_mask(dataset / "roi_mask" / name)
        union = np.logical_or.reduce(list(masks.values()))
        for r in rows.itertuples():
            patch = cv2.imread(str(out / r.split / r.folder / r.filename), cv2.IMREAD_UNCHANGED)
            assert patch.dtype == np.uint16 and patch.shape == (P, P)
            expect = np.clip(np.rint(_window(image, r.row, r.col)), 0, 65535).astype(np.uint16)
            np.testing.assert_array_equal(patch, expect, err_msg=r.filename)
            if r.kind.startswith("abn"):
                mask = masks[int(r.kind[3:])]
                inter = _window(mask, r.row, r.col).sum()
                assert inter / mask.sum() > 0.75 or inter / P ** 2 > 0.75, r.filename
                checked["abn"] += 1
            else:
                for mask in list(masks.values()) + [union]:
                    inter = _window(mask, r.row, r.col).sum()
                    assert inter / mask.sum() <= 0.35 and inter / P ** 2 <= 0.35, r.filename
                checked[r.kind] += 1
    assert min(checked.values()) > 0, checked


def test_counts_per_folder_and_files_match_manifest(dataset, sampled):
    out, summary = sampled
    csv = pd.read_csv(dataset / "roi_mask_path.csv")
    folder = {("calc", "MALIGNANT"): "calc_mal", ("mass", "MALIGNANT"): "mass_mal"}
    for split in ("train", "val"):
        pats = (out / split / "pat_lst.txt").read_text().split()
        sub = csv[csv.patient_id.isin(pats)]
        nb_views = len(sub.groupby(["patient_id", "side", "view"]))
        expect = {f: 0 for f in ("background", "calc_mal", "calc_ben", "mass_mal", "mass_ben")}
        for r in sub.itertuples():
            f = folder.get((r.type, r.pathology), f"{r.type}_ben")
            expect[f] += NB_ABN
        expect["background"] = nb_views * NB_BKG  # hard negatives included, as in 2017
        assert summary["patches"][split] == expect
        on_disk = {f: len(os.listdir(out / split / f)) for f in expect}
        assert on_disk == expect
    names = _manifest(out)
    assert names.filename.str.fullmatch(r"P_\d{5}_(LEFT|RIGHT)_(CC|MLO)_(abn\d+|bkg|hns)_\d{4}\.png").all()
    per_view = names.groupby(["img_id", "kind"]).size().unstack(fill_value=0)
    assert (per_view["hns"] == NB_HNS).all() and (per_view["bkg"] == NB_BKG - NB_HNS).all()


def test_val_split_is_patient_level_and_stratified(dataset, sampled):
    out, summary = sampled
    train = (out / "train" / "pat_lst.txt").read_text().split()
    val = (out / "val" / "pat_lst.txt").read_text().split()
    assert sorted(train + val) == sorted(CASES) and not set(train) & set(val)
    malignant = {p for p, les in CASES.items() if any(x[3] == "MALIGNANT" for x in les)}
    assert len(val) == 2 and len(set(val) & malignant) == 1
    man = _manifest(out)
    pats = man.img_id.str.rsplit("_", n=2).str[0]
    assert set(pats[man.split == "val"]) <= set(val)
    assert set(pats[man.split == "train"]) <= set(train)
    assert summary["patients"] == {"train": 6, "val": 2, "not_in_csv": []}


def _assert_same_patches(out1, sum1, out2, sum2):
    """The two runs wrote the same patch files, byte for byte, in every class folder."""
    assert sum2["patches"] == sum1["patches"]
    for split in ("train", "val"):
        for folder in sum1["patches"][split]:
            a, b = out1 / split / folder, out2 / split / folder
            names = sorted(os.listdir(a))
            assert names == sorted(os.listdir(b))
            _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
            assert not mismatch and not errors


@pytest.mark.slow  # spawned workers import TensorFlow (via dm_image)
def test_reproducible_and_independent_of_workers(dataset, sampled, tmp_path):
    out1, sum1 = sampled
    sum2 = _run(dataset, tmp_path / "w2", workers=2)
    _assert_same_patches(out1, sum1, tmp_path / "w2", sum2)
    other = _run(dataset, tmp_path / "seed", workers=1, seed=999, val_size=0.0)
    assert other["patches"]["val"]["background"] == 0
    a = pd.read_csv(out1 / "train" / "patches.csv").set_index("filename")
    b = pd.read_csv(tmp_path / "seed" / "train" / "patches.csv").set_index("filename")
    common = a.index.intersection(b.index)
    assert len(common) > 0 and (a.loc[common, ["row", "col"]] != b.loc[common, ["row", "col"]]).any().any()


def test_constant_patches_stay_constant(tmp_path):
    cases = {"P_00001": [("LEFT", "CC", 1, "MALIGNANT", "mass", (150, 250, 40))]}
    data = _write_dataset(tmp_path / "data", cases, constant=True)
    summary = spc.run(str(data / "roi_mask_path.csv"), str(data / "roi_mask"),
                      str(data / "pat.txt"), str(data / "full_img"), str(tmp_path / "tr"),
                      str(tmp_path / "va"), target_height=H, patch_size=P, nb_abn=5,
                      nb_bkg=40, nb_hns=10, val_size=0.0, verbose=False)
    # a flat image has no blobs: the 10 missing hard negatives are made up with random ones
    assert summary["hns_shortfall"] == 10 and summary["bkg_shortfall"] == 0
    assert summary["patches"]["train"]["background"] == 40
    assert all("_bkg_" in n for n in os.listdir(tmp_path / "tr" / "background"))
    constant = 0
    for folder in ("background", "mass_mal"):
        for name in os.listdir(tmp_path / "tr" / folder):
            patch = cv2.imread(str(tmp_path / "tr" / folder / name), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(patch)) <= {0, 30000}, name
            constant += int(patch.min() == patch.max())
    assert constant >= 5  # e.g. all abnormal patches lie inside the flat breast


def test_bad_inputs_are_counted_and_run_goes_on(tmp_path):
    cases = {p: CASES[p] for p in ("P_00001", "P_00002", "P_00003", "P_00004", "P_00005")}
    data = _write_dataset(tmp_path / "data", cases)
    masks = data / "roi_mask"
    cv2.imwrite(str(masks / "Mass-Training_P_00002_RIGHT_MLO_1.png"),
                np.zeros((H, W), np.uint8))                                   # empty mask
    cv2.imwrite(str(masks / "Calc-Test_P_00003_LEFT_MLO_1.png"),
                np.full((H // 2, W), 255, np.uint8))                          # wrong size
    (data / "full_img" / "P_00004_RIGHT_CC.png").write_bytes(b"not a png")   # unreadable
    os.remove(masks / "Mass-Training_P_00005_LEFT_CC_1.png")                 # missing mask
    with open(data / "pat.txt", "a") as fh:
        fh.write("P_09999\n")                                                 # not in the CSV
    summary = spc.main([str(data / "roi_mask_path.csv"), str(masks), str(data / "pat.txt"),
                        str(data / "full_img"), str(tmp_path / "tr"), str(tmp_path / "va"),
                        "--target-height", str(TH), "--patch-size", str(P), "--nb-abn", "3",
                        "--nb-bkg", "4", "--nb-hns", "0", "--val-size", "0", "--no-verbose"])
    assert summary["skipped"] == {"empty_mask": 1, "mask_size_mismatch": 1,
                                  "unreadable_image": 1, "mask_missing": 1}
    assert summary["images_read"] == 1 and summary["images_total"] == 5
    assert set(summary["skipped_images"]) == {"P_00002_RIGHT_MLO", "P_00003_LEFT_MLO",
                                              "P_00004_RIGHT_CC", "P_00005_LEFT_CC"}
    assert summary["patients"]["not_in_csv"] == ["P_09999"]
    assert summary["patches"]["train"] == {"background": 4, "calc_ben": 3, "calc_mal": 0,
                                           "mass_ben": 0, "mass_mal": 3}
    assert not list((tmp_path / "tr").rglob("*.part"))


def test_window_sums_match_brute_force():
    rng = np.random.default_rng(0)
    mask = np.zeros((90, 70), bool)
    mask[20:50, 10:40] = True
    mask[60:90, 45:70] = rng.random((30, 25)) > 0.9
    sat = spc.build_mask_sat(mask)
    cx, cy = rng.integers(-20, 90, 300), rng.integers(-20, 110, 300)
    got = spc.window_sums(sat, cx, cy, 16)
    pad = np.pad(mask, 40)
    want = [pad[y - 8 + 40:y + 8 + 40, x - 8 + 40:x + 8 + 40].sum() for x, y in zip(cx, cy)]
    np.testing.assert_array_equal(got, want)
    assert sat.area == mask.sum()
    assert sat.bbox == (10, 20, 30, 30)  # largest connected component
    assert spc.build_mask_sat(np.zeros((5, 5))) is None
    # a margin gives the table of the zero-padded mask, without the padded copy
    for m in (mask, mask.astype(np.uint8) * 255, mask.astype(np.float32)):
        with_margin, padded = spc.build_mask_sat(m, margin=7), spc.build_mask_sat(np.pad(m, 7))
        assert (with_margin.y0, with_margin.x0, with_margin.area, with_margin.bbox) == \
            (padded.y0, padded.x0, padded.area, padded.bbox)
        np.testing.assert_array_equal(with_margin.sat, padded.sat)


def test_extract_patch_fills_outside_with_zeros():
    img = np.arange(1, 31 * 23 + 1, dtype=np.uint16).reshape(31, 23)
    pad = np.pad(img, 40)
    for x, y in [(45, 50), (40, 40), (62, 70), (30, 35), (66, 45), (10, 10), (80, 95)]:
        for m in (0, 40):
            got = spc.extract_patch(img, x - 40 + m, y - 40 + m, 12, margin=m)
            want = pad[y - 6:y + 6, x - 6:x + 6]
            assert got.shape == (12, 12) and got.dtype == np.uint16
            np.testing.assert_array_equal(got, want, err_msg=f"{(x, y, m)}")
    inside = spc.extract_patch(img, 10, 10, 8)
    assert np.shares_memory(inside, img)  # a view when the window lies inside


def test_one_cpu_process_samples_without_threads(dataset, sampled, tmp_path, monkeypatch):
    """Limited to one CPU, the sampler starts no thread (they would only compete for it) and
    writes the same files as the threaded pipeline."""
    import threading

    out1, sum1 = sampled
    started = []
    real_start = threading.Thread.start

    def start(self):
        started.append(self.name)
        return real_start(self)
    monkeypatch.setattr(spc, "_cpus_available", lambda: 1)
    monkeypatch.setattr(threading.Thread, "start", start)
    sum2 = _run(dataset, tmp_path / "one", workers=1)
    assert started == []
    _assert_same_patches(out1, sum1, tmp_path / "one", sum2)
    for split in ("train", "val"):
        assert (out1 / split / "patches.csv").read_text() == \
            (tmp_path / "one" / split / "patches.csv").read_text()


@pytest.mark.parametrize("cpus", [1, 2])
def test_failed_patch_write_fails_that_view_only(dataset, tmp_path, monkeypatch, cpus):
    monkeypatch.setattr(spc, "_cpus_available", lambda: cpus)
    real_write = spc.dm_image.write_png

    def flaky(path, arr, *a, **kw):
        if Path(path).name.startswith("P_00002_RIGHT_MLO_bkg"):
            raise OSError(f"disk full writing {path}")
        return real_write(path, arr, *a, **kw)
    monkeypatch.setattr(spc.dm_image, "write_png", flaky)
    summary = _run(dataset, tmp_path, workers=1, val_size=0.0)
    assert summary["skipped"] == {"error": 1}
    assert "P_00002_RIGHT_MLO" in summary["skipped_images"]
    assert "disk full" in summary["skipped_images"]["P_00002_RIGHT_MLO"]
    man = pd.read_csv(tmp_path / "train" / "patches.csv")
    assert "P_00002_RIGHT_MLO" not in set(man.img_id)
    assert man.img_id.nunique() == summary["images_read"] == summary["images_total"] - 1
    assert all((tmp_path / "train" / r.folder / r.filename).is_file() for r in man.itertuples())
    # the failed view's other patches (written before the failure) are removed too
    assert not list((tmp_path / "train").rglob("P_00002_RIGHT_MLO_*"))
    assert len(list((tmp_path / "train").rglob("*.png"))) == len(man)


def _reference_abnormal(seed, sat, patch, nb, cutoff, accept=None):
    """One-at-a-time 2017 loop over the same random stream (batches of 512 x then 512 y); a
    centre ``accept`` refuses is one more failed draw."""
    rng = np.random.default_rng(seed)
    bx, by, bw, bh = sat.bbox
    out, nb_try, relax = [], 0, 0
    while len(out) < nb:
        xs, ys = rng.integers(bx, bx + bw, 512), rng.integers(by, by + bh, 512)
        for x, y in zip(xs, ys):
            if len(out) == nb:
                break
            nb_try += 1
            if nb_try >= 1000:
                relax += 1
                cutoff -= 0.05
                nb_try = 0
            inter = spc.window_sums(sat, np.array([x]), np.array([y]), patch)[0]
            if (inter / sat.area > cutoff or inter / patch ** 2 > cutoff) and \
                    (accept is None or accept(x, y)):
                out.append((x, y))
                nb_try = 0
    return np.array(out), relax


def test_abnormal_draws_relax_cutoff_like_the_2017_loop():
    mask = np.zeros((200, 200), bool)
    mask[100, 20:180] = True          # a thin line: 0.75 of it never fits in a 16-px patch
    mask[40:45, 20:180] = True          # best patch fraction 80/256: passes after 9 relaxations
    sat = spc.build_mask_sat(mask)
    got, cut, relax = spc.draw_abnormal_centres(np.random.default_rng(5), sat, 16, 12, 0.75)
    want, want_relax = _reference_abnormal(5, sat, 16, 12, 0.75)
    assert relax == want_relax > 0
    np.testing.assert_array_equal(got, want)
    assert cut == pytest.approx(0.75 - 0.05 * relax)


def test_refused_abnormal_centres_count_as_failed_draws():
    mask = np.zeros((200, 200), bool)
    mask[40:45, 20:180] = True           # a band (patch fraction 0.31 at best) ...
    mask[30:55, 20:31] = True            # ... with a block at its end where a few draws pass
    sat = spc.build_mask_sat(mask)

    def refusing(times):                 # refuses the first passing centres in the block
        left = [times]

        def accept(x, y):
            if x >= 60 or left[0] == 0:
                return True
            left[0] -= 1
            return False
        return accept
    got, _, relax = spc.draw_abnormal_centres(np.random.default_rng(0), sat, 16, 12, 0.75,
                                              refusing(3))
    want, want_relax = _reference_abnormal(0, sat, 16, 12, 0.75, refusing(3))
    np.testing.assert_array_equal(got, want)
    # the refusals do not restart the count of failed draws: the cutoff relaxes once
    assert relax == want_relax == 1 and len(got) == 12


def test_negative_rule_uses_both_fractions():
    mask = np.zeros((100, 100), bool)
    mask[50:53, 50:53] = True                     # 9-pixel ROI
    sat = spc.build_mask_sat(mask)
    # a patch holding the whole small ROI: patch fraction tiny, ROI fraction 1 -> rejected
    assert not spc.negative_passes([sat], np.array([51]), np.array([51]), 32, 0.35)[0]
    assert spc.negative_passes([sat], np.array([10]), np.array([10]), 32, 0.35)[0]
    assert spc.abnormal_passes(sat, np.array([51]), np.array([51]), 32, 0.75)[0]


def test_select_hard_negatives_spreads_points():
    pts = np.array([[10, 10], [11, 10], [12, 11], [200, 200], [201, 199], [400, 30]])
    chosen = spc.select_hard_negatives(pts, 3, seed=1)
    assert chosen.shape == (3, 2)
    assert {tuple(p) for p in chosen} <= {tuple(p) for p in pts}
    groups = {0 if p[0] < 50 else (1 if p[0] < 300 else 2) for p in chosen}
    assert groups == {0, 1, 2}
    np.testing.assert_array_equal(spc.select_hard_negatives(pts[:2], 3, 1), pts[:2])


@pytest.mark.parametrize("kw, msg", [({"pos_cutoff": 0.0}, "pos_cutoff"),
                                     ({"patch_size": 1}, "patch_size"),
                                     ({"val_size": 1.0}, "val_size"),
                                     ({"nb_abn": -1}, "nb_abn"),
                                     ({"workers": 0}, "workers"),
                                     ({"min_breast_fraction": 1.5}, "min_breast_fraction"),
                                     ({"min_patch_std": -1.0}, "min_patch_std")])
def test_bad_options_raise(dataset, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        _run(dataset, tmp_path, **kw)
    assert not (tmp_path / "train").exists()


def test_bad_csv_and_missing_paths_raise(dataset, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,side,view,pathology\nP_00001,LEFT,CC,MALIGNANT\n")
    with pytest.raises(ValueError, match="abn_num"):
        spc.run(str(bad), str(dataset / "roi_mask"), str(dataset / "pat.txt"),
                str(dataset / "full_img"), str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(FileNotFoundError, match="nope"):
        spc.run(str(dataset / "roi_mask_path.csv"), str(tmp_path / "nope"),
                str(dataset / "pat.txt"), str(dataset / "full_img"), str(tmp_path / "a"),
                str(tmp_path / "b"))


def test_parser_defaults_match_spec():
    args = spc.get_args_parser().parse_args(["a.csv", "m", "p.txt", "f", "tr", "va"])
    assert (args.target_height, args.target_width, args.segment_breast, args.patch_size) == \
        (4096, None, True, 256)
    assert (args.nb_bkg, args.nb_abn, args.nb_hns) == (30, 30, 15)
    assert (args.pos_cutoff, args.neg_cutoff, args.val_size, args.verbose) == (0.75, 0.35, 0.1, True)
    assert (args.bkg_dir, args.calc_pos_dir, args.calc_neg_dir, args.mass_pos_dir,
            args.mass_neg_dir) == ("background", "calc_mal", "calc_ben", "mass_mal", "mass_ben")
    args = spc.get_args_parser().parse_args(["a.csv", "m", "p.txt", "f", "tr", "va",
                                             "--target-width", "300", "--no-segment-breast",
                                             "--no-verbose", "--workers", "3", "--seed", "7"])
    assert (args.target_width, args.segment_breast, args.verbose, args.workers, args.seed) == \
        (300, False, False, 3, 7)


_POSITIONALS = ["a.csv", "m", "p.txt", "f", "tr", "va"]


def test_run_refuses_an_unknown_option_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"\['nb_bkgs'\].*valid:.*'nb_bkg'"):
        spc.run(*_POSITIONALS[:4], str(tmp_path / "tr"), str(tmp_path / "va"), nb_bkgs=3)
    assert not os.listdir(tmp_path)


def test_run_hands_on_the_parsers_options(monkeypatch):
    """run() builds one options object: the parser's defaults, then its keywords."""
    seen = []
    monkeypatch.setattr(spc, "sample_patches", seen.append)
    spc.run(*_POSITIONALS)
    spc.run(*_POSITIONALS[:5], val_out="va", seed=7, target_width=300, bkg_dir="normal")
    cls = spc.options_class()
    assert cls is spc.options_class()
    parsed = vars(spc.get_args_parser().parse_args(_POSITIONALS))
    assert type(seen[0]) is cls and dict(seen[0]) == parsed and list(seen[0]) == list(parsed)
    assert seen[0] == run_options.options_from(cls, parsed)
    assert (seen[0].seed, seen[0].nb_bkg, seen[0].normal_views) == (None, 30, 0)
    assert seen[1] == seen[0].replace(seed=7, target_width=300, bkg_dir="normal")


def test_seed_none_takes_random_seed_and_the_summary_records_every_option(tmp_path,
                                                                          monkeypatch):
    data = _write_dataset(tmp_path / "data", SMALL)
    monkeypatch.setenv("RANDOM_SEED", "7")
    _run(data, tmp_path / "env", seed=None)
    _run(data, tmp_path / "seven", seed=7)
    for split in ("train", "val"):
        assert _tree(tmp_path / "env" / split) == _tree(tmp_path / "seven" / split)
    saved = json.loads((tmp_path / "env" / "train" / "sampling_summary.json").read_text())
    argv = [str(data / "roi_mask_path.csv"), str(data / "roi_mask"), str(data / "pat.txt"),
            str(data / "full_img"), str(tmp_path / "env" / "train"),
            str(tmp_path / "env" / "val")]
    want = vars(spc.get_args_parser().parse_args(argv))
    want.update(target_height=TH, patch_size=P, nb_abn=NB_ABN, nb_bkg=NB_BKG, nb_hns=NB_HNS,
                val_size=0.25, verbose=False, seed=7)
    assert saved["options"] == want and list(saved["options"]) == list(want)


# ------------------------------------------------------------------------- refusing wrong runs
SMALL = {p: CASES[p] for p in ("P_00001", "P_00002", "P_00004", "P_00005")}


def _argv(data, out, *extra, csv=None, pats=None):
    return [str(csv or data / "roi_mask_path.csv"), str(data / "roi_mask"),
            str(pats or data / "pat.txt"), str(data / "full_img"), str(out / "train"),
            str(out / "val"), "--target-height", str(TH), "--patch-size", str(P),
            "--nb-abn", "3", "--nb-bkg", "4", "--nb-hns", "1", "--no-verbose", *extra]


def _exit_message(capsys, argv):
    """(exit status, stderr) of the command line ``argv``."""
    with pytest.raises(SystemExit) as exc:
        spc.main(argv)
    return exc.value.code, capsys.readouterr().err


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def test_rerun_into_folders_holding_patches_is_refused(tmp_path, capsys):
    data = _write_dataset(tmp_path / "data", SMALL)
    out = tmp_path / "out"
    spc.main(_argv(data, out, "--val-size", "0.5"))
    before = {p: (out / p).read_bytes() for p in _files_under(out)}
    code, err = _exit_message(capsys, _argv(data, out, "--val-size", "0.5", "--seed", "3"))
    assert code == 2 and "already hold patches" in err and str(out / "train") in err
    assert "--overwrite" in err and err.count("\n") == 1
    assert {p: (out / p).read_bytes() for p in _files_under(out)} == before  # nothing touched
    # image files in a class folder (no manifest) are refused too, naming that folder
    other = tmp_path / "other"
    (other / "val" / "mass_ben").mkdir(parents=True)
    cv2.imwrite(str(other / "val" / "mass_ben" / "old.png"), np.zeros((4, 4), np.uint8))
    code, err = _exit_message(capsys, _argv(data, other))
    assert code == 2 and str(other / "val" / "mass_ben") in err
    assert not (other / "train").exists()
    # other files (not patches) do not stop a run
    fresh = tmp_path / "fresh"
    (fresh / "train" / "background").mkdir(parents=True)
    (fresh / "train" / "README.txt").write_text("my notes")
    (fresh / "train" / "background" / "notes.txt").write_text("x")
    assert spc.main(_argv(data, fresh))["images_read"] == 4
    # the two outputs must be two folders
    same = _argv(data, tmp_path / "x")
    same[5] = same[4]
    code, err = _exit_message(capsys, same)
    assert code == 2 and "same folder" in err


def test_overwrite_replaces_exactly_what_the_run_writes(tmp_path):
    data = _write_dataset(tmp_path / "data", SMALL)
    out = tmp_path / "out"
    first = spc.main(_argv(data, out, "--val-size", "0.5", "--nb-bkg", "6"))
    assert first["patches"]["train"]["background"] > 0
    keep = {out / "train" / "README.txt": "notes", out / "val" / "extra" / "x.png": "other class",
            out / "train" / "background.bak" / "a.png": "a backup"}
    for path, text in keep.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    second = spc.main(_argv(data, out, "--val-size", "0.5", "--nb-bkg", "2", "--seed", "99",
                            "--overwrite"))
    for path, text in keep.items():  # not written by the run: left alone
        assert path.read_text() == text
    summary = json.loads((out / "train" / "sampling_summary.json").read_text())
    assert summary["summary"]["patches"] == second["patches"]
    assert summary["options"]["overwrite"] is True
    pats = {s: set((out / s / "pat_lst.txt").read_text().split()) for s in ("train", "val")}
    assert not pats["train"] & pats["val"] and pats["train"] | pats["val"] == set(SMALL)
    for split in ("train", "val"):
        man = pd.read_csv(out / split / "patches.csv")
        # every patch file of the class folders is in this run's manifest (old ones removed)
        on_disk = {str(p.relative_to(out / split)) for name in ("background", "calc_mal",
                   "calc_ben", "mass_mal", "mass_ben") for p in (out / split / name).glob("*")}
        assert on_disk == {f"{r.folder}/{r.filename}" for r in man.itertuples()}
        assert set(man.img_id.str.rsplit("_", n=2).str[0]) <= pats[split]
        assert not man.filename.str.contains("bkg_0002").any()  # nb_bkg 6 -> 2
    assert second["patches_total"] == len(pd.read_csv(out / "train" / "patches.csv")) + \
        len(pd.read_csv(out / "val" / "patches.csv"))


def _csv_text(lines):
    """A CSV as a Windows editor might save it: BOM, CRLF, a blank line, padded values."""
    return "\ufeff" + "\r\n".join(lines) + "\r\n"


def test_bad_roi_rows_skip_their_whole_view(tmp_path, caplog):
    cases = {p: CASES[p] for p in ("P_00001", "P_00002", "P_00003", "P_00004", "P_00005",
                                   "P_00006", "P_00008")}
    data = _write_dataset(tmp_path / "data", cases)
    (data / "roi_mask" / "Mass-Training_P_00005_LEFT_CC_1.png").write_bytes(b"garbage")
    lines = ["patient_id , side, view,abn_num,pathology,type",   # line 1
             "P_00001,LEFT,CC,1,MALIGNANT,mass",                  # 2
             " P_00001 , LEFT , CC , 2 , LUMP , calc ",           # 3: unknown pathology
             "",                                                  # 4
             "P_00002,RIGHT,MLO,1,BENIGN,cyst",                   # 5: unknown type
             "P_00003,LEFT,MLO,first,MALIGNANT,calc",             # 6: abn_num not an integer
             "P_00004,RIGHT,CC,1,BENIGN_WITHOUT_CALLBACK,mass",   # 7
             "P_00004,RIGHT,CC,1,benign_without_callback,Mass",   # 8: repeats line 7
             "P_00005,LEFT,CC,1,MALIGNANT,mass",                  # 9: unreadable mask
             "P_00006,,CC,1,BENIGN,calc",                         # 10: side empty
             "P_00006,RIGHT,CC,1,BENIGN,calc",                    # 11
             "P_00008,RIGHT,MLO,1,BENIGN,mass"]                   # 12
    csv = tmp_path / "roi.csv"
    csv.write_text(_csv_text(lines), newline="")
    pats = tmp_path / "pats.txt"
    pats.write_text(_csv_text([" " + p for p in cases] + ["", "P_00001"]), newline="")
    with caplog.at_level("WARNING"):
        summary = spc.main(_argv(data, tmp_path / "out", "--val-size", "0", csv=csv, pats=pats))
    assert summary["skipped"] == {"bad_roi_row": 4, "mask_unreadable": 1}
    assert summary["views_skipped_bad_roi"] == 5
    assert summary["bad_rows"] == 4 and summary["duplicate_rows"] == 1
    assert summary["images_read"] == 2 and summary["images_total"] == 7
    log = caplog.text
    for line, img_id in ((3, "P_00001_LEFT_CC"), (5, "P_00002_RIGHT_MLO"),
                         (6, "P_00003_LEFT_MLO"), (10, "P_00006_RIGHT_CC")):
        assert f"{csv}, line {line}" in summary["skipped_images"][img_id]
        assert f"{csv}, line {line}" in log
    assert f"{csv}, line 9" in summary["skipped_images"]["P_00005_LEFT_CC"]
    assert f"{csv}, line 7: repeated by line 8" in log
    man = pd.read_csv(tmp_path / "out" / "train" / "patches.csv")
    assert set(man.img_id) == {"P_00004_RIGHT_CC", "P_00008_RIGHT_MLO"}  # no view sampled
    abn = man[man.kind.str.startswith("abn")]                           # without its lesion
    assert abn.groupby("img_id").size().to_dict() == {"P_00004_RIGHT_CC": 3,
                                                      "P_00008_RIGHT_MLO": 3}
    assert set(abn.folder) == {"mass_ben"}
    written = (tmp_path / "out" / "train" / "pat_lst.txt").read_text().split()
    assert written == sorted(cases)  # list read through BOM, spaces, blank line, repeat


@pytest.mark.parametrize("which, text, line", [
    ("pats", b"P_00001\r\n\r\nP_0\xe90002\r\n", 3),
    ("csv", b"patient_id,side,view,abn_num,pathology,type\nP_00001,LEFT,CC,1,MALIGNANT,ma\xffss\n",
     2)])
def test_undecodable_input_is_an_error_naming_file_and_line(dataset, tmp_path, capsys, which,
                                                            text, line):
    path = tmp_path / f"input.{which}"
    path.write_bytes(text)
    kw = {"csv": path} if which == "csv" else {"pats": path}
    code, err = _exit_message(capsys, _argv(dataset, tmp_path / "out", **kw))
    assert code == 2 and f"{path}, line {line}" in err and "UTF-8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where, value", [("pats", "../x"), ("patient_id", "../P_00001"),
                                          ("side", "LEFT/.."), ("view", ".."),
                                          ("abn_num", "1\\x"), ("flag", "../bkg")])
def test_path_like_values_are_refused_before_writing(dataset, tmp_path, capsys, where, value):
    csv = pd.read_csv(dataset / "roi_mask_path.csv", dtype=str)
    pats = (dataset / "pat.txt").read_text()
    extra = []
    if where == "pats":
        pats = pats.replace("P_00002\n", value + "\n")       # line 2
    elif where == "flag":
        extra = ["--bkg-dir", value]
    else:
        csv.loc[3, where] = value                             # file line 5
    csv.to_csv(tmp_path / "roi.csv", index=False)
    (tmp_path / "pats.txt").write_text(pats)
    code, err = _exit_message(capsys, _argv(dataset, tmp_path / "out", *extra,
                                            csv=tmp_path / "roi.csv", pats=tmp_path / "pats.txt"))
    assert code == 2 and repr(value) in err and "cannot be part of a file name" in err
    if where == "pats":
        assert f"{tmp_path / 'pats.txt'}, line 2" in err
    elif where != "flag":
        assert f"{tmp_path / 'roi.csv'}, line 5" in err and where in err
    else:
        assert "--bkg-dir" in err
    assert not (tmp_path / "out").exists()


def test_mixed_bit_depths_are_reported(sampled, tmp_path, caplog):
    cases = {p: CASES[p] for p in ("P_00002", "P_00004", "P_00006")}
    data = _write_dataset(tmp_path / "data", cases)
    odd = data / "full_img" / "P_00004_RIGHT_CC.png"
    img16 = cv2.imread(str(odd), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(odd), (img16 // 257).astype(np.uint8))
    with caplog.at_level("WARNING"):
        summary = spc.main(_argv(data, tmp_path / "out", "--val-size", "0"))
    assert summary["images_read"] == 3
    assert summary["bit_depths"] == {"uint16": 2, "uint8": 1}
    assert summary["bit_depth"] == "uint16"
    assert summary["mixed_bit_depth_views"] == ["P_00004_RIGHT_CC"]
    saved = json.loads((tmp_path / "out" / "train" / "sampling_summary.json").read_text())
    assert saved["summary"]["mixed_bit_depth_views"] == ["P_00004_RIGHT_CC"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("P_00004_RIGHT_CC" in m and str(odd) in m and "uint8" in m for m in warned)
    assert any("--rescale-factor will not fit" in m for m in warned)
    man = pd.read_csv(tmp_path / "out" / "train" / "patches.csv")
    for r in man[man.img_id == "P_00004_RIGHT_CC"].itertuples():  # stored levels, 0..255
        assert cv2.imread(str(tmp_path / "out" / "train" / r.folder / r.filename),
                          cv2.IMREAD_UNCHANGED).max() <= 255
    # one bit depth: nothing reported
    _, one = sampled
    assert one["bit_depths"] == {"uint16": one["images_read"]}
    assert one["mixed_bit_depth_views"] == []


@pytest.mark.parametrize("problem", ["no_images", "no_patient_in_csv"])
def test_nothing_sampled_exits_2_without_manifest(tmp_path, capsys, problem):
    data = _write_dataset(tmp_path / "data", SMALL)
    if problem == "no_images":
        for f in (data / "full_img").iterdir():
            f.unlink()
    else:
        (data / "pat.txt").write_text("P_09998\nP_09999\n")
    code, err = _exit_message(capsys, _argv(data, tmp_path / "out"))
    assert code == 2 and "no view was sampled" in err and "no manifest" in err
    if problem == "no_images":
        assert "4 view(s), 4 skipped {'image_missing': 4}" in err
    else:
        assert "2 patient(s)" in err and "2 not in" in err
    assert not list((tmp_path / "out").rglob("*"))  # the empty folders it made are removed


def test_every_output_file_is_written_atomically(tmp_path, monkeypatch):
    data = _write_dataset(tmp_path / "data", SMALL)
    written = []
    real = spc.dm_image.atomic_write

    def recording(path, *a, **kw):
        written.append(str(Path(path).relative_to(tmp_path / "out")))
        return real(path, *a, **kw)
    monkeypatch.setattr(spc.dm_image, "atomic_write", recording)
    spc.main(_argv(data, tmp_path / "out", "--val-size", "0.5"))
    assert sorted(set(written)) == _files_under(tmp_path / "out")   # the manifest: twice
    assert {"train/patches.csv", "val/patches.csv", "train/pat_lst.txt", "val/pat_lst.txt",
            "train/sampling_summary.json"} <= set(written)


def test_calc_and_mass_sharing_an_abn_num_keep_their_own_patches(tmp_path):
    """CBIS-DDSM numbers calcifications and masses separately: a view may have both with
    abn_num 1. Merged into one class folder, their patches must not overwrite each other."""
    cases = {"P_00001": [("LEFT", "CC", 1, "MALIGNANT", "mass", (150, 250, 40)),
                         ("LEFT", "CC", 1, "MALIGNANT", "calc", (120, 420, 8))]}
    data = _write_dataset(tmp_path / "data", cases)
    summary = spc.main(_argv(data, tmp_path / "out", "--val-size", "0", "--calc-pos-dir",
                             "malignant", "--mass-pos-dir", "malignant"))
    assert summary["patches"]["train"]["malignant"] == 6
    man = pd.read_csv(tmp_path / "out" / "train" / "patches.csv")
    assert set(man.kind) >= {"abn1calc", "abn1mass"} and man.filename.is_unique
    assert len(os.listdir(tmp_path / "out" / "train" / "malignant")) == 6


def _tree(folder):
    """{relative path: bytes} of every file under ``folder`` but the run summary (it holds
    the options and the run time)."""
    return {rel: (Path(folder) / rel).read_bytes() for rel in _files_under(folder)
            if not rel.endswith("sampling_summary.json")}


def test_overwrite_after_a_class_set_change_gives_the_fresh_tree(tmp_path):
    data = _write_dataset(tmp_path / "data", SMALL)
    three = ("--calc-pos-dir", "malignant", "--mass-pos-dir", "malignant",
             "--calc-neg-dir", "benign", "--mass-neg-dir", "benign")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    spc.main(_argv(data, out, "--val-size", "0.5"))
    assert (out / "train" / "calc_mal").is_dir()
    spc.main(_argv(data, out, "--val-size", "0.5", *three, "--overwrite"))
    spc.main(_argv(data, fresh, "--val-size", "0.5", *three))
    got, want = _tree(out), _tree(fresh)
    assert len(want) > 10 and sorted(got) == sorted(want)     # no old class folder left
    assert all(got[k] == want[k] for k in want)
    assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir()) == \
        ["background", "benign", "malignant"]


def _killed_run(monkeypatch, argv, after):
    """Run the sampler in one thread and stop it (KeyboardInterrupt) at its patch ``after``."""
    real, calls = dm_image.write_png, []

    def write_png(path, arr):
        calls.append(path)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(path, arr)
    with monkeypatch.context() as mp:
        mp.setattr(spc, "_cpus_available", lambda: 1)
        mp.setattr(dm_image, "write_png", write_png)
        with pytest.raises(SystemExit) as stop:   # Ctrl-C: one line, exit 130
            spc.main(argv)
    assert stop.value.code == 130


def test_overwrite_after_a_killed_run_gives_the_fresh_tree(tmp_path, monkeypatch, capsys):
    data = _write_dataset(tmp_path / "data", SMALL)
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    spc.main(_argv(data, fresh, "--val-size", "0.5"))
    (out / "train").mkdir(parents=True)
    mine = {"train/my_notes.png": b"user 1", "train/background/keep.txt": b"user 2"}
    (out / "train" / "my_notes.png").write_bytes(mine["train/my_notes.png"])
    _killed_run(monkeypatch, _argv(data, out, "--val-size", "0.5"), after=5)
    assert len(list((out / "train").rglob("*_0*.png"))) == 5        # 5 patches left behind
    # a user's file put into a class folder the killed run made, after it stopped
    (out / "train" / "background" / "keep.txt").write_bytes(mine["train/background/keep.txt"])
    capsys.readouterr()
    code, err = _exit_message(capsys, _argv(data, out, "--val-size", "0.5"))
    assert code == 2 and "stopped before its end" in err and "--overwrite" in err
    want = _tree(fresh)
    for _ in range(2):   # a killed first run, then a killed --overwrite rerun of a full run
        spc.main(_argv(data, out, "--val-size", "0.5", "--overwrite"))
        got = _tree(out)
        assert {k: got.pop(k) for k in mine} == mine      # the user's files stay, unchanged
        assert len(want) > 10 and sorted(got) == sorted(want)
        assert all(got[k] == want[k] for k in want)
        _killed_run(monkeypatch, _argv(data, out, "--val-size", "0.5", "--overwrite"),
                    after=3)


def test_outputs_inside_an_input_folder_are_refused(tmp_path, capsys):
    data = _write_dataset(tmp_path / "data", SMALL)
    code, err = _exit_message(capsys, _argv(data, data / "full_img" / "patches"))
    assert code == 2 and "TRAIN_OUT" in err and "inside the input folder FULL_IMG_DIR" in err
    assert not (data / "full_img" / "patches").exists()
def test_normal_views_give_background_patches_only_with_the_flag(tmp_path):
    data = _write_dataset(tmp_path / "data", SMALL)
    rng = np.random.default_rng(3)
    normal = ["P_00002_LEFT_CC", "P_00020_LEFT_CC", "P_00020_LEFT_MLO"]   # no ROI row
    for img_id in normal:
        img, _ = _draw_view(rng, "LEFT", [])
        cv2.imwrite(str(data / "full_img" / f"{img_id}.png"), img)
    with open(data / "pat.txt", "a") as fh:
        fh.write("P_00020\n")                                     # not in roi_mask_path.csv
    plain = spc.main(_argv(data, tmp_path / "plain", "--val-size", "0"))
    with_normal = spc.main(_argv(data, tmp_path / "normal", "--val-size", "0",
                                 "--normal-views", "3"))
    rows_plain = pd.read_csv(tmp_path / "plain" / "train" / "patches.csv")
    rows = pd.read_csv(tmp_path / "normal" / "train" / "patches.csv")
    assert not set(normal) & set(rows_plain["img_id"]) and plain["normal_views"] == 0
    got = rows[rows["img_id"].isin(normal)]
    assert got.groupby("img_id").size().to_dict() == {v: 3 for v in normal}
    assert set(got["folder"]) == {"background"} and set(got["kind"]) == {"bkg"}
    assert (got["roi_frac"] == 0).all() and (got["patch_frac"] == 0).all()
    assert with_normal["normal_views"] == 3
    assert with_normal["patches"]["train"]["background"] == \
        plain["patches"]["train"]["background"] + 9
    # the lesion views' patches are those of the run without the flag, file for file
    lesion = rows[~rows["img_id"].isin(normal)].reset_index(drop=True)
    pd.testing.assert_frame_equal(lesion, rows_plain)
    for r in rows_plain.itertuples():
        assert filecmp.cmp(tmp_path / "plain" / "train" / r.folder / r.filename,
                           tmp_path / "normal" / "train" / r.folder / r.filename, shallow=False)
    assert "P_00020" in (tmp_path / "normal" / "train" / "pat_lst.txt").read_text().split()
    assert "P_00020" not in (tmp_path / "plain" / "train" / "pat_lst.txt").read_text().split()
    for r in got.itertuples():   # 16-bit patches of the asked size
        patch = cv2.imread(str(tmp_path / "normal" / "train" / r.folder / r.filename),
                           cv2.IMREAD_UNCHANGED)
        assert patch.shape == (P, P)


# ------------------------------------------------------------------------- breast-tissue guard
HALF = {"P_00001": [("LEFT", "MLO", 1, "MALIGNANT", "mass", (110, 160, 30))],
        "P_00002": [("RIGHT", "MLO", 1, "BENIGN", "calc", (380, 150, 10))],
        "P_00003": [("LEFT", "MLO", None)]}   # a lesion-free view (--normal-views)


def _write_half_black(root):
    """Views whose lower half (below a diagonal) is black and upper half tissue with its
    lesion, textured except for a nearly flat band along the top: the segmented breast's box
    is the whole view, half of it air."""
    rng = np.random.default_rng(11)
    full, masks_dir = root / "full_img", root / "roi_mask"
    full.mkdir(parents=True)
    masks_dir.mkdir()
    rows = []
    yy, xx = np.mgrid[0:H, 0:W]
    for pat, lesions in HALF.items():
        side, view = lesions[0][:2]
        tissue = (xx / W + yy / H) < 1 if side == "LEFT" else ((W - 1 - xx) / W + yy / H) < 1
        img = np.zeros((H, W), np.uint16)
        img[tissue] = 20000 + rng.integers(0, 3000, size=int(tissue.sum()))
        flat = tissue & (yy < H // 5)   # a nearly flat band of tissue (std ~0.1 8-bit level)
        img[flat] = 20000 + rng.integers(0, 100, size=int(flat.sum()))
        for les in (les for les in lesions if les[2] is not None):
            mask = _disc_mask(les[5])
            img[(mask > 0) & tissue] += 5000
            name = f"{les[4].capitalize()}-Training_{pat}_{side}_{view}_{les[2]}.png"
            cv2.imwrite(str(masks_dir / name), mask)
            rows.append((pat, side, view, les[2], les[3], les[4]))
        for f in (0.2, 0.4, 0.6, 0.8):   # bright specks on the skin line (blob detector)
            x = int(f * W * 0.96)
            cv2.circle(img, (x if side == "LEFT" else W - 1 - x, int((1 - f) * H * 0.96)), 4,
                       60000, -1)
        cv2.imwrite(str(full / f"{pat}_{side}_{view}.png"), img)
    pd.DataFrame(rows, columns=list(spc.CSV_COLUMNS)).to_csv(root / "roi_mask_path.csv",
                                                             index=False)
    (root / "pat.txt").write_text("".join(p + "\n" for p in HALF))
    return root


def _patch_digest(out):
    """MD5 of every patch's name and pixels (decoded, so independent of the PNG encoder) and of
    the manifests, over both outputs."""
    import hashlib

    md5 = hashlib.md5()
    for split in ("train", "val"):
        md5.update((out / split / "patches.csv").read_bytes())
        for name in _files_under(out / split):
            if name.endswith(".png"):
                patch = cv2.imread(str(out / split / name), cv2.IMREAD_UNCHANGED)
                md5.update(name.encode() + patch.tobytes())
    return md5.hexdigest()


# the patches (names, pixels) and manifests the sampler wrote before the breast-tissue guard
# existed, for the runs below; the guard's flags off must keep them
_DIGESTS_2017 = {True: "66fd16927b50bfc589d7869499ec1144",
                 False: "7da3268c5dd4018a15868e7964b6df73"}
_DIGEST_2017_CASES = "90ede26a631c86f140ee47d4cf69adae"


def _run_half(data, out, **kw):
    return _run(data, out, **{**dict(nb_abn=4, nb_bkg=12, nb_hns=3, val_size=0.5,
                                     normal_views=5, workers=1), **kw})


@pytest.fixture(scope="module")
def half_black(tmp_path_factory):
    return _write_half_black(tmp_path_factory.mktemp("half_black"))


def _negative_patches(data, out):
    """(manifest row, patch, breast fraction) of every background-folder patch; the fraction
    from the view's own segmentation, recomputed here."""
    man = _manifest(out)
    for img_id, rows in man[man.folder == "background"].groupby("img_id"):
        image = _resized(data / "full_img" / f"{img_id}.png")
        breast = dm_image.segment_breast(image, crop=False)[0] > 0
        for r in rows.itertuples():
            patch = cv2.imread(str(out / r.split / r.folder / r.filename), cv2.IMREAD_UNCHANGED)
            yield r, patch, _window(breast, r.row, r.col).mean()


@pytest.mark.parametrize("segment", [True, False])
def test_without_the_guard_flags_the_patches_are_2017s(half_black, tmp_path, segment):
    summary = _run_half(half_black, tmp_path, segment_breast=segment)
    assert _patch_digest(tmp_path) == _DIGESTS_2017[segment]
    assert summary["rejected"] == {s: dict.fromkeys(spc.GUARD_REASONS, 0)
                                   for s in ("train", "val")}
    assert summary["rejected_views"] == {}
    # the data does hold what the guard refuses: air and flat patches among the background
    fracs = [(frac, patch.std()) for _, patch, frac in _negative_patches(half_black, tmp_path)]
    assert min(f for f, _ in fracs) < 0.5 and min(s for _, s in fracs) == 0


def test_without_the_guard_flags_the_lesion_views_are_2017s(sampled):
    assert _patch_digest(sampled[0]) == _DIGEST_2017_CASES


def test_breast_guard_keeps_negatives_in_breast_tissue(half_black, tmp_path, caplog):
    caplog.set_level("INFO")
    summary = _run_half(half_black, tmp_path, min_breast_fraction=0.9, min_patch_std=1.0)
    checked = 0
    for r, patch, frac in _negative_patches(half_black, tmp_path):
        assert frac >= 0.9 - 0.01, (r.filename, frac)   # 0.01: cubic-resize edge pixels
        assert patch.std() * 255 / 65535 > 1.0, r.filename
        checked += 1
    # refused candidates are redrawn: every view has its asked count
    per_view = _manifest(tmp_path).groupby(["img_id", "folder"]).size().to_dict()
    assert per_view == {("P_00001_LEFT_MLO", "background"): 12, ("P_00001_LEFT_MLO", "mass_mal"): 4,
                        ("P_00002_RIGHT_MLO", "background"): 12,
                        ("P_00002_RIGHT_MLO", "calc_ben"): 4,
                        ("P_00003_LEFT_MLO", "background"): 5}
    assert checked == 29 and summary["bkg_shortfall"] == 0
    rejected, views = summary["rejected"], summary["rejected_views"]
    assert rejected["train"]["outside_breast"] > 0 and rejected["val"]["outside_breast"] > 0
    assert rejected["train"]["near_constant"] + rejected["val"]["near_constant"] > 0
    split_of = _manifest(tmp_path).groupby("img_id").split.first()
    for split in ("train", "val"):
        for reason in spc.GUARD_REASONS:
            assert rejected[split][reason] == sum(
                v[reason] for img_id, v in views.items() if split_of[img_id] == split)
    saved = json.loads((tmp_path / "train" / "sampling_summary.json").read_text())
    assert saved["summary"]["rejected"] == rejected
    assert saved["options"]["min_breast_fraction"] == 0.9
    assert "refused by the breast-tissue guard" in caplog.text


def test_guard_refuses_constant_patches_lesions_included(tmp_path):
    cases = {"P_00001": [("LEFT", "CC", 1, "MALIGNANT", "mass", (150, 250, 40))]}
    data = _write_dataset(tmp_path / "data", cases, constant=True)   # a flat breast
    summary = spc.run(str(data / "roi_mask_path.csv"), str(data / "roi_mask"),
                      str(data / "pat.txt"), str(data / "full_img"), str(tmp_path / "tr"),
                      str(tmp_path / "va"), target_height=H, patch_size=P, nb_abn=5,
                      nb_bkg=10, nb_hns=0, val_size=0.0, verbose=False, min_patch_std=0.0)
    for folder in ("background", "mass_mal"):
        for name in os.listdir(tmp_path / "tr" / folder):
            patch = cv2.imread(str(tmp_path / "tr" / folder / name), cv2.IMREAD_UNCHANGED)
            assert patch.min() < patch.max(), name
    rejected = summary["rejected"]["train"]
    assert rejected["constant_lesion"] > 0 and rejected["constant"] > 0
    assert rejected["outside_breast"] == rejected["near_constant"] == 0  # no fraction rule
    assert summary["patches"]["train"]["background"] == 10


@pytest.mark.slow  # spawned workers import TensorFlow (via dm_image)
def test_guarded_draws_do_not_depend_on_workers(half_black, tmp_path):
    kw = dict(min_breast_fraction=0.9, min_patch_std=1.0)
    sum1 = _run_half(half_black, tmp_path / "w1", **kw)
    sum2 = _run_half(half_black, tmp_path / "w2", **{**kw, "workers": 2})
    _assert_same_patches(tmp_path / "w1", sum1, tmp_path / "w2", sum2)
    assert sum1["rejected"] == sum2["rejected"] and sum1["rejected_views"] == sum2["rejected_views"]
