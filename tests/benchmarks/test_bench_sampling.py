"""Benchmark: patch sampling, ours vs a faithful reimplementation of the 2017 algorithm.

Same images and settings for both (height 4096, 256-pixel patches, 30 abnormal patches per ROI,
15 hard negatives and 30 background patches per view, cutoffs 0.75 / 0.35), on two sets: six
(``BENCH_SAMPLING_VIEWS``) 4096x3200 synthetic mammograms with lesion masks from
``make_synthetic_ddsm`` (their noise texture makes blob detection ~3x costlier than on real
images), and the four real 3328x2560 mammograms of ../shared (skipped when absent), each with
one elliptical lesion mask. The 2017 reference does what the 2017 sampler did per view: read
and resize the image once, segment the breast, then per
ROI read and resize the mask, crop it, add float margins to image and mask, find the ROI's
largest contour, and draw centres one at a time, judging each candidate by copying the whole
padded mask, adding 1000 inside the patch window and counting pixels over the full image
(``overlap_patch_roi``); blob-detector hard negatives and background patches the same way; every
patch min-max normalised and written through PIL. Run with ``make bench``; prints seconds per
image and the ratio.
"""
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dm_image
import sample_patches_combined as spc

REAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_mammograms"

TARGET_H, PATCH, NB_ABN, NB_BKG, NB_HNS = 4096, 256, 30, 30, 15
POS_CUT, NEG_CUT = 0.75, 0.35
NB_VIEWS = int(os.environ.get("BENCH_SAMPLING_VIEWS", 6))


def _synthetic_set(root):
    mk = pytest.importorskip("make_synthetic_ddsm")
    mk.run(root / "syn", nb_patients=NB_VIEWS + 1, img_height=4096, img_width=3200, seed=3)
    csv = pd.read_csv(root / "syn" / "roi_mask_path.csv")
    views = csv.drop_duplicates(["patient_id", "side", "view"]).head(NB_VIEWS)
    sub = csv.merge(views[["patient_id", "side", "view"]])
    assert len(views) == NB_VIEWS
    return sub


def _real_set(root):
    """The 4 real 3328x2560 mammograms of ../shared, each with one elliptical lesion mask
    (about 1.5 % of the breast) placed in its breast."""
    files = sorted(REAL_DIR.glob("*.png")) if REAL_DIR.is_dir() else []
    if not files:
        pytest.skip("../shared/data/real_mammograms is absent")
    (root / "syn" / "full_img").mkdir(parents=True)
    (root / "syn" / "roi_mask").mkdir(parents=True)
    rows = []
    for k, f in enumerate(files):
        pat, side = f"P_R{k:04d}", "LEFT" if "_L_" in f.name else "RIGHT"
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        (root / "syn" / "full_img" / f"{pat}_{side}_CC.png").write_bytes(f.read_bytes())
        _, (x, y, w, h) = dm_image.segment_breast(img)
        mask = np.zeros(img.shape, np.uint8)
        cv2.ellipse(mask, (x + w // 2, y + h // 2), (w // 9, h // 12), 30, 0, 360, 255, -1)
        cv2.imwrite(str(root / "syn" / "roi_mask" / f"Mass-Training_{pat}_{side}_CC_1.png"), mask)
        rows.append(dict(patient_id=pat, side=side, view="CC", abn_num=1,
                         pathology="MALIGNANT" if k % 2 else "BENIGN", type="mass"))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module", params=["synthetic", "real"])
def data(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"bench_sampling_{request.param}")
    sub = _synthetic_set(root) if request.param == "synthetic" else _real_set(root)
    sub.to_csv(root / "roi.csv", index=False)
    (root / "pats.txt").write_text("".join(p + "\n" for p in sub.patient_id.unique()))
    return root, request.param, len(sub.drop_duplicates(["patient_id", "side", "view"]))


# ------------------------------------------------------------------ 2017 reference algorithm
def _overlap_2017(center, roi_mask, cutoff, add_val=1000):
    """Per-candidate overlap test of 2017: copy the full mask, mark the window, count."""
    x, y = center
    h = PATCH // 2
    x1, x2 = max(x - h, 0), min(x + h, roi_mask.shape[1])
    y1, y2 = max(y - h, 0), min(y + h, roi_mask.shape[0])
    roi_area = (roi_mask > 0).sum()
    added = roi_mask.copy().astype("uint16")
    added[y1:y2, x1:x2] += add_val
    patch_area = (added >= add_val).sum()
    inter = float((added > add_val).sum())
    return inter / roi_area > cutoff or inter / patch_area > cutoff


def _save_2017(img, x, y, path):
    h = PATCH // 2
    patch = img[y - h:y + h, x - h:x + h].astype("int32")
    lo, hi = patch.min(), patch.max()
    scaled = ((patch - lo) / max(hi - lo, 1) * 65535).astype("uint16")  # min-max (2017 toimage)
    Image.fromarray(scaled).save(path)  # 16-bit PNG through PIL


def _sample_view_2017(img, masks, out, img_id):
    h = PATCH // 2
    rng = np.random.RandomState(12345)
    img_m = dm_image.add_img_margins(img.astype("float64"), h)
    union = np.zeros_like(img_m)
    n = {"abn": 0, "hns": 0, "bkg": 0}
    for k, mask in enumerate(masks):
        mask_m = dm_image.add_img_margins(mask.astype("float64"), h)
        union = np.maximum(union, mask_m)
        cnts, _ = cv2.findContours(mask_m.astype("uint8"), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
        rx, ry, rw, rh = cv2.boundingRect(max(cnts, key=cv2.contourArea))
        cut, tries, got = POS_CUT, 0, 0
        while got < NB_ABN:
            x, y = rng.randint(rx, rx + rw), rng.randint(ry, ry + rh)
            tries += 1
            if tries >= 1000:
                cut, tries = cut - 0.05, 0
            if _overlap_2017((x, y), mask_m, cut):
                _save_2017(img_m, x, y, out / f"{img_id}_{k}_abn_{got:04d}.png")
                got, tries = got + 1, 0
        n["abn"] += got
    det = spc.create_blob_detector(PATCH)
    kpts = det.detect((img_m / img_m.max() * 255).astype("uint8"))
    for kp in kpts:
        if n["hns"] >= NB_HNS:
            break
        x, y = int(kp.pt[0]), int(kp.pt[1])
        if not _overlap_2017((x, y), union, NEG_CUT):
            _save_2017(img_m, x, y, out / f"{img_id}_hns_{n['hns']:04d}.png")
            n["hns"] += 1
    while n["bkg"] < NB_BKG:
        x = rng.randint(h, img_m.shape[1] - h)
        y = rng.randint(h, img_m.shape[0] - h)
        if not _overlap_2017((x, y), union, NEG_CUT):
            _save_2017(img_m, x, y, out / f"{img_id}_bkg_{n['bkg']:04d}.png")
            n["bkg"] += 1
    return n


def _run_2017(root, out):
    out.mkdir(parents=True, exist_ok=True)
    csv = pd.read_csv(root / "roi.csv")
    counts = {"abn": 0, "hns": 0, "bkg": 0}
    for (pat, side, view), g in csv.groupby(["patient_id", "side", "view"]):
        img_id = f"{pat}_{side}_{view}"
        img = dm_image.read_resize_img(root / "syn" / "full_img" / f"{img_id}.png",
                                       target_height=TARGET_H)
        img, bbox = dm_image.segment_breast(img)
        masks = []
        for r in g.itertuples():
            name = f"{r.type.capitalize()}-Training_{img_id}_{r.abn_num}.png"
            mask = dm_image.read_resize_img(root / "syn" / "roi_mask" / name,
                                            target_height=TARGET_H, gs_255=True)
            masks.append(dm_image.crop_img(mask, bbox))
        for key, v in _sample_view_2017(img, masks, out, img_id).items():
            counts[key] += v
    return counts


# ------------------------------------------------------------------ benchmark
def _run_ours(root, out, workers):
    return spc.run(str(root / "roi.csv"), str(root / "syn" / "roi_mask"), str(root / "pats.txt"),
                   str(root / "syn" / "full_img"), str(out / "train"), str(out / "val"),
                   target_height=TARGET_H, patch_size=PATCH, nb_abn=NB_ABN, nb_bkg=NB_BKG,
                   nb_hns=NB_HNS, pos_cutoff=POS_CUT, neg_cutoff=NEG_CUT, val_size=0.0,
                   verbose=False, workers=workers)


def _shared_stage(root, n_views):
    """Seconds per image of the part both share: read + resize image and masks, segment."""
    csv = pd.read_csv(root / "roi.csv")
    t = time.perf_counter()
    blob_s = 0.0
    for (pat, side, view), g in csv.groupby(["patient_id", "side", "view"]):
        img_id = f"{pat}_{side}_{view}"
        img = dm_image.read_resize_img(root / "syn" / "full_img" / f"{img_id}.png",
                                       target_height=TARGET_H)
        img, bbox = dm_image.segment_breast(img)
        for r in g.itertuples():
            name = f"{r.type.capitalize()}-Training_{img_id}_{r.abn_num}.png"
            dm_image.read_resize_img(root / "syn" / "roi_mask" / name, target_height=TARGET_H,
                                     gs_255=True)
        t_blob = time.perf_counter()
        spc.detect_blob_centres(img, PATCH)
        blob_s += time.perf_counter() - t_blob
    return (time.perf_counter() - t - blob_s) / n_views, blob_s / n_views


def test_bench_sampling_vs_2017(data, tmp_path):
    data, kind, n_views = data
    t_shared, t_blob = _shared_stage(data, n_views)
    t = time.perf_counter()
    ours = _run_ours(data, tmp_path / "ours1", workers=1)
    t_ours = (time.perf_counter() - t) / n_views
    t = time.perf_counter()
    ours2 = _run_ours(data, tmp_path / "ours2", workers=2)
    t_ours2 = (time.perf_counter() - t) / n_views
    t = time.perf_counter()
    ref = _run_2017(data, tmp_path / "ref")
    t_ref = (time.perf_counter() - t) / n_views
    p = ours["patches"]["train"]
    ours_counts = {"abn": sum(v for k, v in p.items() if k != "background"),
                   "hns+bkg": p["background"]}
    print(f"\n[bench sampling] {n_views} {kind} images of height {TARGET_H}, patch {PATCH}, "
          f"{NB_ABN}/{NB_BKG}/{NB_HNS} abn/bkg/hns")
    print(f"  2017 algorithm : {t_ref:7.2f} s/image  patches {ref}")
    print(f"  ours, 1 worker : {t_ours:7.2f} s/image  patches {ours_counts}  "
          f"ratio {t_ref / t_ours:5.1f}x")
    print(f"  ours, 2 workers: {t_ours2:7.2f} s/image  ratio {t_ref / t_ours2:5.1f}x "
          "(includes starting 2 spawned workers)")
    print(f"  shared by both (read+resize image and masks, segment): {t_shared:.2f} s/image; "
          f"blob detection (both): {t_blob:.2f} s/image")
    rest_ref, rest_ours = t_ref - t_shared, t_ours - t_shared
    print(f"  rest (blob detection, overlap checks, drawing, writing): 2017 {rest_ref:.2f} s vs "
          f"ours {rest_ours:.2f} s per image, ratio {rest_ref / rest_ours:.1f}x")
    assert ours["images_read"] == n_views and ours2["patches"] == ours["patches"]
    assert ours_counts["abn"] == ref["abn"]
    assert ours_counts["hns+bkg"] == ref["hns"] + ref["bkg"] or ours["hns_shortfall"] > 0
