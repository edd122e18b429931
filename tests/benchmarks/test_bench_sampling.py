"""Benchmark: patch sampling, ours vs a faithful reimplementation of the 2017 algorithm.

Same images and settings for both (height 4096, 256-pixel patches, 30 abnormal patches per ROI,
30 background-folder patches per view of which up to 15 are blob hard negatives, cutoffs
0.75 / 0.35), on two sets: twelve (``BENCH_SAMPLING_VIEWS``) 4096x3200 synthetic mammograms with
lesion masks from ``make_synthetic_ddsm`` (their noise texture makes blob detection ~3x costlier
than on real images), and twelve views made from the four real 3328x2560 mammograms of
../shared (skipped when absent), each image used three times with a different elliptical lesion
mask (masks stored as 1-bit PNGs, as ``prepare_cbis_ddsm`` and ``make_synthetic_ddsm`` write
them). The 2017 reference is self-contained (it shares no code with ours apart from the blob
detector's parameters, so speeding up ours cannot change it) and follows the 2017 sampler per
view: read and resize the image (``cv2.imread``, bicubic, float32) and segment the breast (8-bit
threshold, largest contour of the contour tree by area, its bounding box); per ROI read, resize and crop
the mask; for the first ROI, add float64 margins to image and mask, find the ROI's largest
contour, detect blobs on the 8-bit image and take them in a seeded random order while they pass
the negative test; then (``sample_patches``) add the margins again and draw abnormal centres in
the ROI's box and background centres in the image one at a time, judging each candidate by
copying the whole padded mask, adding 1000 inside the patch window and counting pixels over the
full image (``overlap_patch_roi``); every patch min-max normalised and written through PIL.
Run with ``make bench``; prints, side by side, on one core (ours and 2017 in a fresh process
pinned to CPU 0 with ``os.sched_setaffinity``, as under ``taskset -c 0``) and on all the
machine's cores (ours with ``--workers`` = half the cores, as advised), wall-clock and CPU seconds per image
(CPU: all threads and worker processes) and the ratios, best of ``BENCH_SAMPLING_ROUNDS`` (2)
interleaved rounds; and the floor: the work every sampler must do (read and resize, masks,
segmentation, blob detection, PNG writing of the patches our sampler writes), timed with our
functions in one thread, against which our one-core time is compared. Times are measured inside the running process, so they are
the marginal cost per image, without the interpreter's start-up.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dm_image
import sample_patches_combined as spc
from sampling_inputs import (NB_ABN, NB_BKG, NB_HNS, NEG_CUT, PATCH, POS_CUT, TARGET_H,
                             real_set, run_ours, synthetic_set, timed, write_set)

ROUNDS = int(os.environ.get("BENCH_SAMPLING_ROUNDS", 2))


@pytest.fixture(scope="module", params=["synthetic", "real"])
def data(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"bench_sampling_{request.param}")
    n_views = write_set(root, synthetic_set(root) if request.param == "synthetic"
                        else real_set(root))
    run_ours(root, root / "patches", workers=1)   # the patches the floor writes again
    return root, request.param, n_views


# ------------------------------------------------------------------ 2017 reference algorithm
def _read_resize_2017(path, gs_255=False):
    """2017 read_resize_img: OpenCV read, bicubic resize to the target height, float32."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gs_255 else cv2.IMREAD_UNCHANGED)
    width = int(float(TARGET_H) / img.shape[0] * img.shape[1])
    return cv2.resize(img, (width, TARGET_H), interpolation=cv2.INTER_CUBIC).astype("float32")


def _segment_2017(img, low_int_threshold=0.05):
    """2017 segment_breast: threshold the 8-bit image, keep the largest contour (of the full
    contour tree) by area, filled, mask the image with it and crop to its bounding box."""
    img_8u = (img.astype("float32") / img.max() * 255).astype("uint8")
    _, binary = cv2.threshold(img_8u, int(img_8u.max() * low_int_threshold), 255,
                              cv2.THRESH_BINARY)
    cnts, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    idx = int(np.argmax([cv2.contourArea(c) for c in cnts]))
    mask = cv2.drawContours(np.zeros_like(binary), cnts, idx, 255, -1)
    x, y, w, h = cv2.boundingRect(cnts[idx])
    return cv2.bitwise_and(img, img, mask=mask)[y:y + h, x:x + w], (x, y, w, h)


def _margins_2017(img):
    """2017 add_img_margins: a float64 canvas with a zero margin of half a patch."""
    h = PATCH // 2
    out = np.zeros((img.shape[0] + 2 * h, img.shape[1] + 2 * h))
    out[h:h + img.shape[0], h:h + img.shape[1]] = img
    return out


def _overlap_2017(center, roi_mask, cutoff, add_val=1000):
    """Per-candidate overlap test of 2017: copy the full mask, mark the window, count."""
    x, y = center
    h = PATCH // 2
    x1, x2 = max(x - h, 0), min(x + h, roi_mask.shape[1])
    y1, y2 = max(y - h, 0), min(y + h, roi_mask.shape[0])
    roi_area = (roi_mask > 0).sum()
    added = roi_mask.copy()
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


def _roi_box_2017(mask_m):
    cnts, _ = cv2.findContours(mask_m.astype("uint8"), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.boundingRect(max(cnts, key=cv2.contourArea))


def _blob_negatives_2017(img, mask, out, name, nb):
    """2017 sample_blob_negatives: margins, ROI box, blobs of the 8-bit image, in a seeded
    random order, kept while they pass the negative test against this ROI."""
    img_m, mask_m = _margins_2017(img), _margins_2017(mask)
    _roi_box_2017(mask_m)
    kpts = spc.create_blob_detector(PATCH).detect((img_m / img_m.max() * 255).astype("uint8"))
    kpts = np.random.RandomState(12345).permutation(kpts)
    got = 0
    for kp in kpts:
        if got >= nb:
            break
        x, y = int(kp.pt[0]), int(kp.pt[1])
        if not _overlap_2017((x, y), mask_m, NEG_CUT):
            _save_2017(img_m, x, y, out / f"{name}_hns_{got:04d}.png")
            got += 1
    return got


def _sample_patches_2017(img, mask, out, name, nb_abn, nb_bkg):
    """2017 sample_patches: margins, ROI box, abnormal patches then background patches."""
    h = PATCH // 2
    img_m, mask_m = _margins_2017(img), _margins_2017(mask)
    rx, ry, rw, rh = _roi_box_2017(mask_m)
    rng = np.random.RandomState(12345)
    cut, tries, got = POS_CUT, 0, 0
    while got < nb_abn:
        x, y = rng.randint(rx, rx + rw), rng.randint(ry, ry + rh)
        tries += 1
        if tries >= 1000:
            cut, tries = cut - 0.05, 0
        if _overlap_2017((x, y), mask_m, cut):
            _save_2017(img_m, x, y, out / f"{name}_abn_{got:04d}.png")
            got, tries = got + 1, 0
    bkg = 0
    while bkg < nb_bkg:
        x = rng.randint(h, img_m.shape[1] - h)
        y = rng.randint(h, img_m.shape[0] - h)
        if not _overlap_2017((x, y), mask_m, NEG_CUT):
            _save_2017(img_m, x, y, out / f"{name}_bkg_{bkg:04d}.png")
            bkg += 1
    return got, bkg


def _sample_view_2017(img, masks, out, img_id):
    """The 2017 per-view flow: for the first ROI, blob hard negatives then the abnormal patches
    and the background patches that complete nb_bkg; for every further ROI, its abnormal
    patches only (each call adds the margins again and judges against its own ROI)."""
    n = {"abn": 0, "hns": 0, "bkg": 0}
    for k, mask in enumerate(masks):
        name = f"{img_id}_{k}"
        hns = _blob_negatives_2017(img, mask, out, name, NB_HNS) if k == 0 and NB_HNS else 0
        abn, bkg = _sample_patches_2017(img, mask, out, name, NB_ABN,
                                        max(NB_BKG - hns, 0) if k == 0 else 0)
        n["abn"] += abn
        n["hns"] += hns
        n["bkg"] += bkg
    return n


def _run_2017(root, out):
    out.mkdir(parents=True, exist_ok=True)
    csv = pd.read_csv(root / "roi.csv")
    counts = {"abn": 0, "hns": 0, "bkg": 0}
    for (pat, side, view), g in csv.groupby(["patient_id", "side", "view"]):
        img_id = f"{pat}_{side}_{view}"
        img = _read_resize_2017(root / "syn" / "full_img" / f"{img_id}.png")
        img, (x, y, w, h) = _segment_2017(img)
        masks = []
        for r in g.itertuples():
            name = f"{r.type.capitalize()}-Training_{img_id}_{r.abn_num}.png"
            mask = _read_resize_2017(root / "syn" / "roi_mask" / name, gs_255=True)
            masks.append(mask[y:y + h, x:x + w])
        for key, v in _sample_view_2017(img, masks, out, img_id).items():
            counts[key] += v
    return counts


# ------------------------------------------------------------------ benchmark
def _our_stages(root, out, patches_dir):
    """Seconds per image of the work any sampler must do, done by our functions in one thread:
    read and resize the image, read and resize its masks, segment the breast, detect blobs,
    write the view's patches as 16-bit PNGs: the very patches our sampler wrote for the view
    into ``patches_dir`` (read back untimed), since a patch's content sets its encoding time."""
    csv = pd.read_csv(root / "roi.csv")
    stages = dict.fromkeys(["read+resize", "masks", "segment", "blobs", "png"], 0.0)
    out.mkdir(parents=True, exist_ok=True)
    cv2.setNumThreads(1)
    try:
        for (pat, side, view), g in csv.groupby(["patient_id", "side", "view"]):
            img_id = f"{pat}_{side}_{view}"
            t = time.perf_counter()
            img = dm_image.read_resize_stored(root / "syn" / "full_img" / f"{img_id}.png",
                                              target_height=TARGET_H)
            t, t0 = time.perf_counter(), t
            stages["read+resize"] += t - t0
            for r in g.itertuples():
                name = f"{r.type.capitalize()}-Training_{img_id}_{r.abn_num}.png"
                mask = dm_image.read_image(root / "syn" / "roi_mask" / name, gs_255=True)
                cv2.resize(mask, img.shape[::-1], interpolation=cv2.INTER_AREA)
            t, t0 = time.perf_counter(), t
            stages["masks"] += t - t0
            img, _ = dm_image.segment_breast(img)
            t, t0 = time.perf_counter(), t
            stages["segment"] += t - t0
            spc.detect_blob_centres(img, PATCH)
            t, t0 = time.perf_counter(), t
            stages["blobs"] += t - t0
            written = [cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
                       for f in sorted(Path(patches_dir).glob(f"*/{img_id}_*.png"))]
            assert len(written) == NB_ABN * len(g) + NB_BKG, (img_id, len(written))
            t = time.perf_counter()
            for k, patch in enumerate(written):
                dm_image.write_png(out / f"{img_id}_{k:04d}.png", patch)
            stages["png"] += time.perf_counter() - t
    finally:
        cv2.setNumThreads(-1)
    n = len(csv.drop_duplicates(["patient_id", "side", "view"]))
    return {k: v / n for k, v in stages.items()}


def _one_core_round(root, out):
    """One round in a process limited to one CPU: the floor (our stages, writing again the
    patches of the untimed sampling run in ``root / "patches"``), our sampler (which must
    start no thread there) and the 2017 algorithm, in seconds per image."""
    import threading

    assert len(os.sched_getaffinity(0)) == 1
    n_views = len(pd.read_csv(root / "roi.csv").drop_duplicates(["patient_id", "side", "view"]))
    stages = _our_stages(root, out / "stages", root / "patches" / "train")
    started, real_start = [], threading.Thread.start

    def start(thread):
        started.append(thread.name)
        return real_start(thread)
    threading.Thread.start = start
    try:
        ours, t_ours, c_ours = timed(run_ours, root, out / "ours", workers=1)
    finally:
        threading.Thread.start = real_start
    ref, t_ref, c_ref = timed(_run_2017, root, out / "ref")
    return {"stages": stages, "ours": (t_ours / n_views, c_ours / n_views),
            "ref": (t_ref / n_views, c_ref / n_views), "threads": started,
            "ours_patches": ours["patches"], "hns_shortfall": ours["hns_shortfall"],
            "ref_counts": ref}


def _pinned_round(root, out):
    """:func:`_one_core_round` in a fresh Python process pinned to CPU 0."""
    here = Path(__file__).resolve()
    repo = here.parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo), str(repo / "ddsm_train"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(here), str(root), str(out)], env=env,
                          capture_output=True, text=True, timeout=3600,
                          preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ours_counts(patches):
    p = patches["train"]
    return {"abn": sum(v for k, v in p.items() if k != "background"),
            "hns+bkg": p["background"]}


def test_bench_sampling_vs_2017(data, tmp_path):
    """Rounds of (one CPU: the floor, ours, 2017, in a pinned process; all CPUs: ours with one
    worker process per two cores, 2017), so that a slow spell of a shared machine hits all of them; each
    row reports its best round."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux) to pin a process to one CPU")
    data, kind, n_views = data
    cores = len(os.sched_getaffinity(0))
    workers = max(1, cores // 2)  # the advice of --workers: each process keeps two cores busy
    rows = {name: [] for name in ("floor", "ours1", "ref1", "ours_all", "ref_all")}
    stage_rounds = []
    for r in range(ROUNDS):
        one = _pinned_round(data, tmp_path / f"one_{r}")
        assert one["threads"] == [], f"threads started on one CPU: {one['threads']}"
        stage_rounds.append(one["stages"])
        rows["floor"].append((sum(one["stages"].values()), None))
        rows["ours1"].append(tuple(one["ours"]))
        rows["ref1"].append(tuple(one["ref"]))
        ours_all, wall, cpu = timed(run_ours, data, tmp_path / f"all_{r}", workers=workers)
        rows["ours_all"].append((wall / n_views, cpu / n_views))
        ref_all, wall, cpu = timed(_run_2017, data, tmp_path / f"ref_{r}")
        rows["ref_all"].append((wall / n_views, cpu / n_views))
        # same patches, per folder, as the 2017 algorithm, on one CPU and on all of them
        for ours_p, ref in ((one["ours_patches"], one["ref_counts"]),
                            (ours_all["patches"], ref_all)):
            counts = _ours_counts(ours_p)
            assert counts["abn"] == ref["abn"]
            assert counts["hns+bkg"] == ref["hns"] + ref["bkg"] or one["hns_shortfall"] > 0
        assert ours_all["patches"] == one["ours_patches"]
    best = {name: min(v, key=lambda t: t[0]) for name, v in rows.items()}
    stages = {k: min(s[k] for s in stage_rounds) for k in stage_rounds[0]}

    def per_round(num, den):
        return ", ".join(f"{a[0] / b[0]:.1f}x" for a, b in zip(rows[num], rows[den]))

    ratio1 = best["ref1"][0] / best["ours1"][0]
    ratio_all = best["ref_all"][0] / best["ours_all"][0]
    print(f"\n[bench sampling] {n_views} {kind} images of height {TARGET_H}, patch {PATCH}, "
          f"{NB_ABN}/{NB_BKG}/{NB_HNS} abn/bkg/hns per ROI/view/view; machine with {cores} "
          f"cores (os.sched_getaffinity); best of {ROUNDS} interleaved rounds, s/image wall "
          "(CPU)")
    print(f"  {'':22s} {'1 core (taskset)':>28s}   {f'all {cores} cores':>28s}")
    print(f"  {'2017 algorithm':22s} {best['ref1'][0]:9.3f} s ({best['ref1'][1]:6.3f} s CPU)"
          f"   {best['ref_all'][0]:9.3f} s ({best['ref_all'][1]:6.3f} s CPU)")
    print(f"  {'ours':22s} {best['ours1'][0]:9.3f} s ({best['ours1'][1]:6.3f} s CPU)"
          f"   {best['ours_all'][0]:9.3f} s ({best['ours_all'][1]:6.3f} s CPU)")
    print(f"  {'ratio 2017 / ours':22s} {ratio1:26.1f}x   {ratio_all:26.1f}x")
    print(f"  {'  per round':22s} {per_round('ref1', 'ours1'):>27s}   "
          f"{per_round('ref_all', 'ours_all'):>27s}")
    floor = sum(stages.values())
    print(f"  floor on 1 core (work both must do, our functions, one thread): {floor:.3f} s = "
          + " + ".join(f"{k} {v:.3f}" for k, v in stages.items())
          + f"; ours 1 core / floor = {best['ours1'][0] / floor:.2f}x "
          f"(per round {', '.join(f'{a[0] / b[0]:.2f}x' for a, b in zip(rows['ours1'], rows['floor']))})")
    print(f"  patches: ours {_ours_counts(one['ours_patches'])}, 2017 {one['ref_counts']}; "
          f"1 core = one process, no thread; all cores = --workers {workers} (two view threads "
          "and a PNG-writer thread per process; spawning worker processes included)")


if __name__ == "__main__":  # one pinned round (see _pinned_round): python THIS ROOT OUT
    print(json.dumps(_one_core_round(Path(sys.argv[1]), Path(sys.argv[2]))))
