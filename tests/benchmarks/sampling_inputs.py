"""Inputs and helpers shared by the sampling benchmarks (``test_bench_sampling.py``,
``test_bench_png_encoder.py``): the real and synthetic sets of 4096-row views with lesion masks,
the sampler's settings, our sampler run on a set and a wall/CPU timer."""
import os
import resource
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import dm_image
import sample_patches_combined as spc

REAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_mammograms"

TARGET_H, PATCH, NB_ABN, NB_BKG, NB_HNS = 4096, 256, 30, 30, 15
POS_CUT, NEG_CUT = 0.75, 0.35
NB_VIEWS = int(os.environ.get("BENCH_SAMPLING_VIEWS", 12))


def synthetic_set(root):
    """Twelve (``BENCH_SAMPLING_VIEWS``) 4096x3200 views of ``make_synthetic_ddsm``."""
    mk = pytest.importorskip("make_synthetic_ddsm")
    mk.run(root / "syn", nb_patients=NB_VIEWS + 1, img_height=4096, img_width=3200, seed=3)
    csv = pd.read_csv(root / "syn" / "roi_mask_path.csv")
    views = csv.drop_duplicates(["patient_id", "side", "view"]).head(NB_VIEWS)
    sub = csv.merge(views[["patient_id", "side", "view"]])
    assert len(views) == NB_VIEWS
    return sub


def real_set(root):
    """Twelve views from the 4 real 3328x2560 mammograms of ../shared: each image three times
    (as CC, MLO and a second CC of another patient), each time with one elliptical lesion mask
    (about 1.5 % of the breast) at another place in its breast."""
    files = sorted(REAL_DIR.glob("*.png")) if REAL_DIR.is_dir() else []
    if not files:
        pytest.skip("../shared/data/real_mammograms is absent")
    (root / "syn" / "full_img").mkdir(parents=True)
    (root / "syn" / "roi_mask").mkdir(parents=True)
    rows = []
    for k, f in enumerate(files):
        side = "LEFT" if "_L_" in f.name else "RIGHT"
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        _, (x, y, w, h) = dm_image.segment_breast(img)
        for j, (pat, view) in enumerate([(f"P_R{k:04d}", "CC"), (f"P_R{k:04d}", "MLO"),
                                         (f"P_R{k + 10:04d}", "CC")]):
            (root / "syn" / "full_img" / f"{pat}_{side}_{view}.png").write_bytes(f.read_bytes())
            mask = np.zeros(img.shape, np.uint8)
            cx, cy = x + w * (2 + j) // 6, y + h * (1 + j) // 4
            cv2.ellipse(mask, (cx, cy), (w // 9, h // 12), 30 * j, 0, 360, 255, -1)
            name = f"Mass-Training_{pat}_{side}_{view}_1.png"  # 1-bit, as prepare_cbis_ddsm
            dm_image.write_png(root / "syn" / "roi_mask" / name, mask, bilevel=True)
            rows.append(dict(patient_id=pat, side=side, view=view, abn_num=1,
                             pathology="MALIGNANT" if (k + j) % 2 else "BENIGN", type="mass"))
    return pd.DataFrame(rows)


def write_set(root, sub):
    """Write the set's ROI table (``roi.csv``) and patient list (``pats.txt``) into ``root``;
    returns its number of views."""
    sub.to_csv(root / "roi.csv", index=False)
    (root / "pats.txt").write_text("".join(p + "\n" for p in sub.patient_id.unique()))
    return len(sub.drop_duplicates(["patient_id", "side", "view"]))


def run_ours(root, out, workers):
    """Our sampler on the set in ``root`` with the benchmarks' settings."""
    return spc.run(str(root / "roi.csv"), str(root / "syn" / "roi_mask"), str(root / "pats.txt"),
                   str(root / "syn" / "full_img"), str(out / "train"), str(out / "val"),
                   target_height=TARGET_H, patch_size=PATCH, nb_abn=NB_ABN, nb_bkg=NB_BKG,
                   nb_hns=NB_HNS, pos_cutoff=POS_CUT, neg_cutoff=NEG_CUT, val_size=0.0,
                   verbose=False, workers=workers)


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process's threads and of finished children)."""
    def cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), \
            resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    t, c = time.perf_counter(), cpu()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t, cpu() - c
