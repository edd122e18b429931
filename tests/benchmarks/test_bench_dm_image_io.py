"""Benchmark: vectorised ``sweep_img_patches`` against the 2017 per-patch loop, side by side.

Run with ``make bench``; prints the time of each and their ratio on a 1152x896 image."""
import time

import numpy as np

from dm_image import sweep_img_patches


def _loop_sweep_2017(img, patch_size, stride, target_scale):
    """The 2017 sweep as Python loops over patch positions (for timing only)."""
    img = img.astype(np.float64)
    nb_row = int(np.floor((img.shape[0] - patch_size) / stride + 0.99))
    nb_col = int(np.floor((img.shape[1] - patch_size) / stride + 0.99))
    y_gap = (img.shape[0] - patch_size - (nb_row - 1) * stride) // 2
    x_gap = (img.shape[1] - patch_size - (nb_col - 1) * stride) // 2
    out = []
    for y in range(y_gap, y_gap + nb_row * stride, stride):
        for x in range(x_gap, x_gap + nb_col * stride, stride):
            patch = img[y:y + patch_size, x:x + patch_size].copy()
            patch_max = patch.max() if patch.max() != 0 else target_scale
            patch *= target_scale / patch_max
            out.append(patch.astype(np.float32))
    return np.stack(out), nb_row, nb_col


def _best_of(fn, repeats=3):
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def test_bench_sweep_img_patches():
    rng = np.random.default_rng(0)
    img = (rng.random((1152, 896)) * 255).astype(np.float32)
    t_vec, (vec, r, c) = _best_of(lambda: sweep_img_patches(img, 64, 16, target_scale=1.0))
    t_loop, (ref, r2, c2) = _best_of(lambda: _loop_sweep_2017(img, 64, 16, 1.0))
    assert (r, c) == (r2, c2)
    np.testing.assert_array_equal(vec, ref)
    print(f"\nsweep_img_patches 1152x896, patch 64, stride 16, {r * c} patches: "
          f"vectorised {t_vec * 1e3:.1f} ms, 2017 loop {t_loop * 1e3:.1f} ms, "
          f"speed-up x{t_loop / t_vec:.1f}")
