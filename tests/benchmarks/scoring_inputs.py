"""Inputs shared by the scoring benchmarks (``test_bench_inference.py``,
``test_bench_export.py``): full-size 16-bit views to score."""
from pathlib import Path

import numpy as np

import dm_image

REAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "real_mammograms"


def full_size_views(tmp_path, nb_images):
    """``nb_images`` 3328x2560 16-bit PNG views and what they are: the real mammograms of
    ``REAL_DIR`` (repeated in turn) when present, else seeded noise with a dark right side
    written to ``tmp_path``."""
    real = sorted(REAL_DIR.glob("*.png")) if REAL_DIR.is_dir() else []
    if real:
        return [real[k % len(real)] for k in range(nb_images)], "real 3328x2560"
    rng = np.random.default_rng(0)
    files = []
    for k in range(nb_images):
        img = rng.integers(0, 40000, (3328, 2560)).astype(np.uint16)
        img[:, 1800:] = 0
        files.append(tmp_path / f"img_{k}.png")
        dm_image.write_png(files[-1], img)
    return files, "synthetic 3328x2560"
