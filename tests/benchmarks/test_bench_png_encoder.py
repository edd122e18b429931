"""Benchmark: would a PNG encoder of our own make the patch sampler worth its code?

``dm_image.write_png`` encodes with ``cv2.imencode`` (OpenCV's defaults: the Sub row filter, zlib
level 1 with run-length matching). The candidate timed against it is the encoder the project
once carried: the Sub filter in NumPy and the stream deflated at level 1 by libdeflate (the
``deflate`` package, when installed; zlib with run-length matching otherwise). It pays for its
code only if it makes the WHOLE sampler at least ``WORTH`` (1.2x) faster. This runs
``sample_patches_combined.run`` on the same inputs and options as ``test_bench_sampling.py``
(height 4096, 256x256 16-bit patches, 30 abnormal patches per ROI, 30 background-folder patches
per view of which up to 15 blob hard negatives), on the twelve views made from the real
mammograms of ../shared (the synthetic set when they are absent), side by side with each
encoder in ``write_png``. ``BENCH_PNG_ROUNDS`` (3) rounds alternate the order; rows report
medians. Both runs must write the same files with the same decoded pixels.

Printed: the whole sampler's seconds with each encoder and their ratio, wall (CPU), on one core
(a fresh process pinned to CPU 0, one thread; its CPU time is the steadier figure on a busy
machine) and on all the machine's cores (``--workers`` = half the cores: view threads plus a
PNG-writer thread); the encode-only ratio (CPU time, one core) on the sampler's own patches and
the ratio of the files' sizes; and the share of the one-core sampler's CPU spent encoding, which
bounds what any faster encoder could gain. Run with ``make bench``.
"""
import json
import os
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import dm_image
import sampling_inputs as inputs

try:
    import deflate as libdeflate
except ImportError:
    libdeflate = None

ROUNDS = int(os.environ.get("BENCH_PNG_ROUNDS", 3))
WORTH = 1.2  # whole-sampler speed-up an own encoder must bring to be worth keeping
CANDIDATE = "Sub+libdeflate" if libdeflate is not None else "Sub+zlib"
ENCODERS = ("write_png", CANDIDATE)


def _chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + bytes(data)
            + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))


def _candidate_png(img):
    """PNG bytes of a 2-D uint8/uint16 image: Sub filter in NumPy, deflate level 1."""
    height, width = img.shape
    depth = img.dtype.itemsize  # PNG stores 16-bit samples big-endian
    raw = np.ascontiguousarray(img, dtype=">u2" if depth == 2 else np.uint8)
    raw = raw.view(np.uint8).reshape(height, width * depth)
    rows = np.empty((height, width * depth + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub: each byte minus the byte one sample to its left
    rows[:, 1:depth + 1] = raw[:, :depth]
    np.subtract(raw[:, depth:], raw[:, :-depth], out=rows[:, depth + 1:])  # modulo 256
    if libdeflate is not None:
        idat = libdeflate.zlib_compress(rows, 1)
    else:
        z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
        idat = z.compress(rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8 * depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _candidate_encode(img, params):
    """``dm_image._encode_png`` with the candidate for greyscale images."""
    if params or img.ndim != 2 or img.dtype not in (np.uint8, np.uint16) or not img.size:
        return cv2.imencode(".png", img, list(params))
    return True, _candidate_png(img)


def _cv2_png(img):
    ok, buf = dm_image._encode_png(img, [])
    assert ok
    return buf


def _with_encoder(name, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``write_png`` encoding by ``name``."""
    own = dm_image._encode_png
    if name == CANDIDATE:
        dm_image._encode_png = _candidate_encode
    try:
        return fn(*args, **kwargs)
    finally:
        dm_image._encode_png = own


def _sampler_rounds(root, out, workers):
    """``ROUNDS`` rounds of the whole sampler with each encoder, the order alternating:
    {encoder: [(wall s, CPU s, patch counts, output folder), ...]}."""
    runs = {name: [] for name in ENCODERS}
    for r in range(ROUNDS):
        for name in ENCODERS if r % 2 == 0 else ENCODERS[::-1]:
            dest = out / f"{name}_{r}"
            res, wall, cpu = inputs.timed(_with_encoder, name, inputs.run_ours, root, dest,
                                        workers=workers)
            runs[name].append((wall, cpu, res["patches"], str(dest / "train")))
    return runs


def _encode_only(patch_dir):
    """Per-core encoding of the sampler's patches (read back from ``patch_dir``) with each
    encoder, ``ROUNDS`` alternating rounds: {encoder: ([seconds per round], total bytes)}."""
    patches = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
               for p in sorted(Path(patch_dir).rglob("*.png"))]
    assert patches and all(p.dtype == np.uint16 and p.shape == (inputs.PATCH, inputs.PATCH)
                           for p in patches)
    encoders = {"write_png": _cv2_png, CANDIDATE: _candidate_png}
    result = {name: ([], 0) for name in ENCODERS}
    for r in range(ROUNDS):
        for name in ENCODERS if r % 2 == 0 else ENCODERS[::-1]:
            t = time.process_time()  # CPU seconds: one thread, pinned
            size = sum(len(encoders[name](p)) for p in patches)
            result[name] = (result[name][0] + [time.process_time() - t], size)
    return {"n": len(patches), **result}


def _pinned(root, out):
    """The one-core rounds and the encode-only timing in a fresh process pinned to CPU 0."""
    here = Path(__file__).resolve()
    repo = here.parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo), str(repo / "ddsm_train"), str(here.parent),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(here), str(root), str(out)], env=env,
                          capture_output=True, text=True, timeout=3600,
                          preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_patches(dir_a, dir_b):
    """Both folders hold the same PNG files with the same decoded pixels; their count."""
    names = sorted(p.relative_to(dir_a) for p in Path(dir_a).rglob("*.png"))
    assert names == sorted(p.relative_to(dir_b) for p in Path(dir_b).rglob("*.png"))
    for name in names:
        a = cv2.imread(str(Path(dir_a) / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(Path(dir_b) / name), cv2.IMREAD_UNCHANGED)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    return len(names)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(root, kind, views): the real set of ``test_bench_sampling``, else its synthetic set."""
    root = tmp_path_factory.mktemp("bench_png")
    try:
        sub, kind = inputs.real_set(root), "real"
    except pytest.skip.Exception:
        sub, kind = inputs.synthetic_set(root), "synthetic"
    return root, kind, inputs.write_set(root, sub)


def test_bench_sampler_png_encoder(data, tmp_path):
    """Rounds of (one CPU, in a pinned process: the sampler with each encoder, then the
    encoders alone; all CPUs: the sampler with each encoder)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux) to pin a process to one CPU")
    root, kind, n_views = data
    cores = len(os.sched_getaffinity(0))
    workers = max(1, cores // 2)
    one = _pinned(root, tmp_path / "one")
    rows = {"1 core": one["runs"],
            f"all {cores} cores": _sampler_rounds(root, tmp_path / "all", workers)}
    n_files = None
    for runs in rows.values():
        for (_, _, pa, da), (_, _, pb, db) in zip(*runs.values()):
            assert pa == pb
            n = _same_patches(da, db)
            assert n_files in (None, n)
            n_files = n

    cv, cand = ENCODERS
    print(f"\n[bench png encoder] whole sampler, {n_views} {kind} views of height "
          f"{inputs.TARGET_H}, {n_files} patches of {inputs.PATCH}x{inputs.PATCH} uint16; {cores} cores, "
          f"load average {os.getloadavg()[0]:.2f} at the end; median of {ROUNDS} alternating "
          "rounds, seconds for the whole run, wall (CPU)")
    print(f"  {'':14s} {'write_png (cv2)':>22s} {cand:>22s} {'speed-up':>17s}"
          "   per round wall (CPU)")
    whole = {}
    for label, runs in rows.items():
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
               for k, v in runs.items()}
        whole[label] = (med[cv][0] / med[cand][0], med[cv][1] / med[cand][1])
        ratios = [(a[0] / b[0], a[1] / b[1]) for a, b in zip(runs[cv], runs[cand])]
        print(f"  {label:14s} " + " ".join(f"{w:9.2f} s ({c:7.2f} CPU)" for w, c in med.values())
              + f" {whole[label][0]:6.3f}x ({whole[label][1]:.3f}x)   "
              + ", ".join(f"{w:.3f}x ({c:.3f}x)" for w, c in ratios))
    enc = one["encode"]
    t_cv, t_cand = (statistics.median(enc[k][0]) for k in ENCODERS)
    size_cv, size_cand = (enc[k][1] for k in ENCODERS)
    print(f"  encode only (1 core, CPU time, the {enc['n']} patches): write_png "
          f"{t_cv / enc['n'] * 1e3:.3f} ms, {cand} {t_cand / enc['n'] * 1e3:.3f} ms per patch, "
          f"speed-up {t_cv / t_cand:.2f}x; file size {cand} / write_png "
          f"{size_cand / size_cv:.3f} ({size_cand / enc['n'] / 1024:.1f} vs "
          f"{size_cv / enc['n'] / 1024:.1f} KiB per patch)")
    cpu_one = statistics.median(r[1] for r in one["runs"][cv])
    share = t_cv / enc["n"] * n_files / cpu_one
    print(f"  write_png's encoding is {100 * share:.0f} % of the one-core sampler's CPU "
          f"({cpu_one:.2f} s): an encoder that took no time would make the sampler at most "
          f"{1 / (1 - share):.2f}x faster, {cand} "
          f"{1 / (1 - share * (1 - t_cand / t_cv)):.3f}x by these figures; an own encoder is "
          f"worth keeping from {WORTH}x on the whole sampler")


if __name__ == "__main__":  # the pinned part (see _pinned): python THIS ROOT OUT
    assert len(os.sched_getaffinity(0)) == 1
    _root, _out = Path(sys.argv[1]), Path(sys.argv[2])
    _runs = _sampler_rounds(_root, _out, workers=1)
    print(json.dumps({"runs": _runs, "encode": _encode_only(_runs[ENCODERS[0]][0][3])}))
