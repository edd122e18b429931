"""Augmentation of DMImageDataGenerator against a plain Keras-2.0.8-style reference.

The reference below rebuilds the 2017 (Keras 2.0.8) transform step by step, independently of
dm_image: rotation @ shift @ shear(radians) @ zoom about (h/2 + 0.5, w/2 + 0.5) in (row, col)
index coordinates, ``scipy.ndimage.affine_transform(order=0, mode='nearest')`` per channel,
channel shift clipped to the warped image's min/max, then NumPy flips.
"""
import numpy as np
import pytest
import scipy.ndimage as ndi

from dm_image import DMImageDataGenerator, fused_warp_matrix, keras20_transform_matrix

AUG = dict(rotation_range=25., width_shift_range=0.1, height_shift_range=0.1, shear_range=0.2,
           zoom_range=0.2, channel_shift_range=20., horizontal_flip=True, vertical_flip=True,
           fill_mode="nearest")


def reference_matrix(p, h, w):
    """Keras 2.0.8: output (row, col) index -> input index, centred at h/2+.5, w/2+.5."""
    th, sh = p["theta"], p["shear"]
    rot = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    shift = np.array([[1, 0, p["tx"]], [0, 1, p["ty"]], [0, 0, 1]])
    shear = np.array([[1, -np.sin(sh), 0], [0, np.cos(sh), 0], [0, 0, 1]])
    zoom = np.array([[p["zx"], 0, 0], [0, p["zy"], 0], [0, 0, 1]])
    o_x, o_y = h / 2 + 0.5, w / 2 + 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    return offset @ rot @ shift @ shear @ zoom @ reset


def reference_transform(x, p):
    """The 2017 per-image path on an (H, W, C) float32 image."""
    h, w = x.shape[:2]
    m = reference_matrix(p, h, w)
    x = np.stack([ndi.affine_transform(x[..., c], m[:2, :2], m[:2, 2], order=0, mode="nearest")
                  for c in range(x.shape[2])], axis=-1)
    if p["channel_shift"] is not None:
        lo, hi = x.min(), x.max()
        x = np.stack([np.clip(x[..., c] + p["channel_shift"][c], lo, hi)
                      for c in range(x.shape[2])], axis=-1)
    if p["flip_horizontal"]:
        x = x[:, ::-1]
    if p["flip_vertical"]:
        x = x[::-1]
    return np.ascontiguousarray(x, dtype=np.float32)


def near_tie_mask(p, h, w, tol=2e-3):
    """Pixels whose exact source coordinate is within ``tol`` of a .5 rounding tie."""
    m = reference_matrix(p, h, w)
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    if p["flip_horizontal"]:
        cc = w - 1 - cc
    if p["flip_vertical"]:
        rr = h - 1 - rr
    src_r = m[0, 0] * rr + m[0, 1] * cc + m[0, 2]
    src_c = m[1, 0] * rr + m[1, 1] * cc + m[1, 2]
    tie = lambda v: np.abs(np.abs(v - np.floor(v)) - 0.5) < tol  # noqa: E731
    return tie(src_r) | tie(src_c)


def assert_matches_reference(fast, ref, p):
    h, w = ref.shape[:2]
    diff = np.any(fast != ref, axis=-1)
    assert diff.mean() <= 1e-3, f"{diff.sum()} of {diff.size} pixels differ"
    assert not np.any(diff & ~near_tie_mask(p, h, w)), "a pixel differs away from a .5 tie"


@pytest.mark.parametrize("shape", [(64, 48, 3), (48, 64, 3), (37, 53, 1), (61, 61, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_fast_warp_matches_scipy_reference(shape, seed):
    gen = DMImageDataGenerator(**AUG)
    rng = np.random.RandomState(seed)
    x = (rng.rand(*shape) * 255).astype(np.float32)
    p = gen.get_random_transform(shape, np.random.RandomState(100 + seed))
    assert_matches_reference(gen.apply_transform(x, p), reference_transform(x, p), p)


@pytest.mark.parametrize("seed", range(6))
def test_single_channel_warp_then_copy_equals_reference_on_3_channels(seed):
    """The iterator path warps one channel then copies it: same as warping 3 copies."""
    gen = DMImageDataGenerator(**AUG)
    img = (np.random.RandomState(seed).rand(50, 38) * 255).astype(np.float32)
    out = np.empty((50, 38, 3), np.float32)
    gen.process_image(out, img, np.random.RandomState(seed))
    p = gen.get_random_transform((50, 38, 3), np.random.RandomState(seed))
    ref = reference_transform(np.repeat(img[..., None], 3, axis=2), p)
    assert p["channel_shift"] is not None and len(p["channel_shift"]) == 3
    assert_matches_reference(out, ref, p)


def test_uint16_warp_is_exact_copy_of_values():
    gen = DMImageDataGenerator(rotation_range=25., shear_range=0.2, zoom_range=0.2)
    img = np.random.RandomState(0).randint(0, 65535, (40, 30, 1)).astype(np.float32)
    p = gen.get_random_transform(img.shape, np.random.RandomState(7))
    out = gen.apply_transform(img, p)
    assert set(np.unique(out)) <= set(np.unique(img))


def test_draw_order_and_units_match_keras_2_0_8():
    gen = DMImageDataGenerator(**AUG)
    p = gen.get_random_transform((100, 80, 3), np.random.RandomState(42))
    r = np.random.RandomState(42)
    assert p["theta"] == pytest.approx(np.pi / 180 * r.uniform(-25, 25))
    assert p["tx"] == pytest.approx(r.uniform(-0.1, 0.1) * 100)  # rows
    assert p["ty"] == pytest.approx(r.uniform(-0.1, 0.1) * 80)  # columns
    assert p["shear"] == pytest.approx(r.uniform(-0.2, 0.2))  # radians, not degrees
    zx, zy = r.uniform(0.8, 1.2, 2)
    assert (p["zx"], p["zy"]) == pytest.approx((zx, zy))
    assert p["channel_shift"] == pytest.approx(tuple(r.uniform(-20, 20) for _ in range(3)))
    assert p["flip_horizontal"] == (r.random_sample() < 0.5)
    assert p["flip_vertical"] == (r.random_sample() < 0.5)


def test_ranges_of_many_draws():
    gen = DMImageDataGenerator(**AUG)
    rng = np.random.RandomState(0)
    ps = [gen.get_random_transform((1152, 896, 3), rng) for _ in range(2000)]
    theta = np.array([p["theta"] for p in ps])
    shear = np.array([p["shear"] for p in ps])
    zooms = np.array([(p["zx"], p["zy"]) for p in ps])
    assert np.abs(theta).max() <= np.deg2rad(25) and np.abs(theta).max() > np.deg2rad(24)
    assert np.abs(shear).max() <= 0.2 and np.abs(shear).max() > 0.19
    assert zooms.min() >= 0.8 and zooms.max() <= 1.2
    assert abs(np.corrcoef(zooms.T)[0, 1]) < 0.1  # drawn independently
    assert np.abs([p["tx"] for p in ps]).max() <= 115.2
    assert 0.45 < np.mean([p["flip_horizontal"] for p in ps]) < 0.55
    assert 0.45 < np.mean([p["flip_vertical"] for p in ps]) < 0.55


def _params(**kw):
    p = {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0,
         "channel_shift": None, "flip_horizontal": False, "flip_vertical": False}
    p.update(kw)
    return p


def test_known_answers_shift_and_flips():
    gen = DMImageDataGenerator()
    x = np.zeros((20, 16, 1), np.float32)
    x[10, 5] = 1.0
    out = gen.apply_transform(x, _params(tx=3.0, ty=-2.0))
    assert out[7, 7, 0] == 1.0 and out.sum() == 1.0  # content moves by -tx rows, -ty cols
    np.testing.assert_array_equal(gen.apply_transform(x, _params(flip_horizontal=True)),
                                  x[:, ::-1])
    np.testing.assert_array_equal(gen.apply_transform(x, _params(flip_vertical=True)), x[::-1])
    both = gen.apply_transform(x, _params(tx=3.0, flip_horizontal=True, flip_vertical=True))
    np.testing.assert_array_equal(both, gen.apply_transform(x, _params(tx=3.0))[::-1, ::-1])


def test_keras20_matrix_and_fused_matrix():
    p = _params(theta=0.3, tx=2.0, ty=-1.0, shear=0.1, zx=0.9, zy=1.1)
    np.testing.assert_allclose(keras20_transform_matrix(p, 30, 20), reference_matrix(p, 30, 20))
    assert keras20_transform_matrix(_params(), 30, 20) is None
    assert fused_warp_matrix(_params(), 30, 20) is None
    np.testing.assert_allclose(fused_warp_matrix(_params(flip_horizontal=True), 30, 20),
                               [[-1, 0, 19], [0, 1, 0]])


def test_channel_shift_clips_to_image_range():
    gen = DMImageDataGenerator()
    x = np.random.RandomState(0).uniform(10, 50, (8, 6, 3)).astype(np.float32)
    out = gen.apply_transform(x, _params(channel_shift=(100.0, -100.0, 5.0)))
    assert np.all(out[..., 0] == x.max()) and np.all(out[..., 1] == x.min())
    np.testing.assert_allclose(out[..., 2], np.clip(x[..., 2] + 5, x.min(), x.max()))


def test_random_transform_seed_is_reproducible_and_does_not_touch_global_rng():
    gen = DMImageDataGenerator(**AUG)
    x = np.random.RandomState(1).rand(30, 20, 3).astype(np.float32) * 255
    state = np.random.get_state()[1].copy()
    a, b = gen.random_transform(x, seed=5), gen.random_transform(x, seed=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    assert not np.array_equal(a, gen.random_transform(x, seed=6))


def test_channels_first():
    gen_l = DMImageDataGenerator(**AUG)
    gen_f = DMImageDataGenerator(data_format="channels_first", **AUG)
    x = np.random.RandomState(1).rand(30, 20, 3).astype(np.float32) * 255
    p = gen_l.get_random_transform(x.shape, np.random.RandomState(3))
    out_f = gen_f.apply_transform(np.moveaxis(x, -1, 0), p)
    np.testing.assert_array_equal(np.moveaxis(out_f, 0, -1), gen_l.apply_transform(x, p))


def test_standardize_featurewise_mean_scalar_and_per_channel():
    gen = DMImageDataGenerator(featurewise_center=True)
    x = np.full((4, 3, 3), 100.0, np.float32)
    gen.mean = 52.16
    np.testing.assert_array_equal(gen.standardize(x.copy()), x - np.float32(52.16))
    gen.mean = np.array([[[1.0, 2.0, 3.0]]])
    np.testing.assert_array_equal(gen.standardize(x.copy())[0, 0], [99, 98, 97])
    gen.mean = [1.0, 2.0]
    with pytest.raises(ValueError, match="mean"):
        gen.standardize(x.copy())


def test_standardize_rescale_then_center_order():
    gen = DMImageDataGenerator(featurewise_center=True, rescale=0.5)
    gen.mean = 10.0
    assert gen.standardize(np.full((2, 2, 1), 100.0, np.float32))[0, 0, 0] == 40.0


@pytest.mark.parametrize("kwargs, match", [
    ({"fill_mode": "mirror"}, "fill_mode"), ({"zoom_range": (0.5, 1, 2)}, "zoom_range"),
    ({"rotation_range": -1}, "rotation_range"), ({"data_format": "nhwc"}, "data_format"),
    ({"zca_whitening": True}, "zca")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMImageDataGenerator(**kwargs)


@pytest.mark.parametrize("dtype, target_scale, rescale, mean, channels", [
    (np.uint16, None, 255 / 65535, 52.16, 3), (np.uint16, 40000.0, None, [1., 2., 3.], 3),
    (np.uint8, None, 1.0, 10.0, 1), (np.uint16, None, 255 / 65535, None, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_stored_lookup_path_equals_float_path(dtype, target_scale, rescale, mean, channels,
                                              seed):
    """uint levels warped first + per-channel lookup == scale to float32, warp, shift, centre."""
    from dm_image import _scale_stored

    gen = DMImageDataGenerator(featurewise_center=mean is not None, **AUG)
    gen.mean = mean
    top = np.iinfo(dtype).max
    stored = np.random.RandomState(seed).randint(0, top, (45, 33)).astype(dtype)
    fast = np.empty((45, 33, channels), np.float32)
    slow = np.empty_like(fast)
    gen.process_stored(fast, stored, np.random.RandomState(seed), target_scale, rescale)
    gen.process_image(slow, _scale_stored(stored, target_scale, rescale),
                      np.random.RandomState(seed))
    np.testing.assert_array_equal(fast, slow)
    ref = reference_transform(np.repeat(_scale_stored(stored, target_scale, rescale)[..., None],
                                        channels, axis=2),
                              gen.get_random_transform(fast.shape, np.random.RandomState(seed)))
    if mean is not None:
        ref -= np.asarray(mean, np.float32)
    assert np.mean(fast == ref) > 0.999
