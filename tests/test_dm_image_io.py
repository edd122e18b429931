"""Image I/O of ``dm_image``: ``read_image``, ``read_resize_img`` (equal to the 2017 function),
DICOM decoding, and the one exception type for unreadable files."""
import errno
import os
import stat

import cv2
import numpy as np
import pytest
from conftest import huge_png_bytes

from dm_image import (ImageReadError, add_img_margins, clust_kpts, crop_img, get_prob_heatmap,
                      get_roi_patches, index_balancer, read_image, read_img_for_pred,
                      read_resize_img, segment_breast, sweep_img_patches, to_sparse)


# ------------------------------------------------------------------------------------------
# Reference: the 2017 read_resize_img steps, written out plainly (OpenCV 8/16-bit cubic
# resize, float32, target_scale with the factor computed in float64 as NumPy 1.x did for a
# Python float over a float32 scalar, then rescale_factor applied as float32).
# ------------------------------------------------------------------------------------------
def reference_read_resize_2017(fname, target_size=None, target_height=None, target_scale=None,
                               gs_255=False, rescale_factor=None):
    img = cv2.imread(str(fname), cv2.IMREAD_GRAYSCALE if gs_255 else cv2.IMREAD_UNCHANGED)
    if target_height is not None:
        target_width = int(float(target_height) / img.shape[0] * img.shape[1])
    else:
        target_height, target_width = target_size
    if (target_height, target_width) != img.shape:
        img = cv2.resize(img, dsize=(target_width, target_height),
                         interpolation=cv2.INTER_CUBIC)
    img = img.astype("float32")
    if target_scale is not None:
        img_max = img.max() if img.max() != 0 else target_scale
        img = img * np.float32(np.float64(target_scale) / np.float64(img_max))
    if rescale_factor is not None:
        img = img * np.float32(rescale_factor)
    return img


def _phantom(h, w, dtype, seed=0):
    """A smooth bright blob on a dark background plus noise, in the full range of ``dtype``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((yy - 0.5 * h) / (0.35 * h)) ** 2 + ((xx - 0.3 * w) / (0.3 * w)) ** 2))
    img = blob + 0.05 * rng.standard_normal((h, w))
    img = np.clip(img / img.max(), 0, 1) * np.iinfo(dtype).max
    return img.astype(dtype)


@pytest.fixture
def image_files(tmp_path):
    """16-bit PNG, 8-bit PNG, JPEG, 8/16-bit PGM and 16-bit TIFF of odd sizes."""
    files = {}
    img16 = _phantom(203, 157, np.uint16, seed=1)
    img8 = _phantom(211, 149, np.uint8, seed=2)
    for name, img in [("png16.png", img16), ("png8.png", img8), ("jpeg.jpg", img8),
                      ("pgm8.pgm", img8), ("pgm16.pgm", img16), ("tif16.tif", img16)]:
        path = tmp_path / name
        assert cv2.imwrite(str(path), img)
        files[name] = path
    return files


RESIZE_CASES = [
    dict(target_size=(100, 80)),                        # down, aspect changed
    dict(target_size=(300, 211)),                       # up
    dict(target_height=97),                             # non-integer aspect, truncated width
    dict(target_height=401),                            # upscale keeping aspect
    dict(target_height=150, target_scale=1.0),
    dict(target_size=(64, 64), target_scale=0.1, rescale_factor=255.0 / 65535),
    dict(target_height=120, rescale_factor=255.0 / 65535),
    dict(target_height=120, gs_255=True),
    dict(target_size=(50, 77), gs_255=True, target_scale=255.0, rescale_factor=0.5),
]


@pytest.mark.parametrize("kwargs", RESIZE_CASES, ids=lambda k: ",".join(k))
@pytest.mark.parametrize("name", ["png16.png", "png8.png", "jpeg.jpg", "pgm8.pgm", "pgm16.pgm",
                                  "tif16.tif"])
def test_read_resize_img_equals_2017_reference(image_files, name, kwargs):
    out = read_resize_img(image_files[name], **kwargs)
    ref = reference_read_resize_2017(image_files[name], **kwargs)
    assert out.dtype == np.float32
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out, ref)


def test_target_height_width_is_truncated(image_files):
    # 157 * 97 / 203 = 75.02...; 157 * 401 / 203 = 310.14...; shape (203, 157)
    assert read_resize_img(image_files["png16.png"], target_height=97).shape == (97, 75)
    assert read_resize_img(image_files["png16.png"], target_height=401).shape == (401, 310)
    # 149 * 100 / 211 = 70.6 -> 70 (truncation, not rounding)
    assert read_resize_img(image_files["png8.png"], target_height=100).shape == (100, 70)


def test_same_size_is_not_resampled(image_files):
    raw = cv2.imread(str(image_files["png16.png"]), cv2.IMREAD_UNCHANGED)
    out = read_resize_img(image_files["png16.png"], target_size=raw.shape)
    np.testing.assert_array_equal(out, raw.astype(np.float32))


def test_scales(image_files):
    out = read_resize_img(image_files["png16.png"], target_size=(60, 50), target_scale=2.0)
    assert out.max() == pytest.approx(2.0, rel=1e-6)
    raw = read_resize_img(image_files["png16.png"], target_size=(60, 50))
    out = read_resize_img(image_files["png16.png"], target_size=(60, 50),
                          rescale_factor=255.0 / 65535)
    np.testing.assert_allclose(out, raw * (255.0 / 65535), rtol=1e-6)
    assert out.max() <= 255.0 + 1e-3


def test_cubic_overshoot_saturates_like_2017(tmp_path):
    """A 0/65535 step edge upsampled with cubic overshoots; in uint16 it saturates."""
    step = np.zeros((40, 40), np.uint16)
    step[:, 20:] = 65535
    path = tmp_path / "step.png"
    cv2.imwrite(str(path), step)
    out = read_resize_img(path, target_size=(40, 97))
    np.testing.assert_array_equal(out, reference_read_resize_2017(path, target_size=(40, 97)))
    assert out.min() == 0.0 and out.max() == 65535.0
    as_float = cv2.resize(step.astype(np.float32), (97, 40), interpolation=cv2.INTER_CUBIC)
    undershoot = as_float < 0
    overshoot = as_float > 65535
    assert undershoot.any() and overshoot.any()       # float cubic rings ...
    assert np.all(out[undershoot] == 0) and np.all(out[overshoot] == 65535)  # ... uint16 clips


def _numpy_bicubic_up(img, out_h, out_w, a=-0.75):
    """Independent bicubic (Keys a=-0.75, half-pixel centres, replicated border) in float64."""
    def weights_and_index(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        base = np.floor(src).astype(int)
        t = src - base
        idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
        d = np.abs(t[:, None] - np.arange(-1, 3)[None, :])
        w = np.where(d <= 1, (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1,
                     np.where(d < 2, a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a, 0.0))
        return idx, w
    iy, wy = weights_and_index(img.shape[0], out_h)
    ix, wx = weights_and_index(img.shape[1], out_w)
    f = img.astype(np.float64)
    rows = np.einsum("ok,okw->ow", wy, f[iy])
    return np.einsum("pk,hpk->hp", wx, rows[:, ix])


def test_resize_is_bicubic(image_files):
    """Our resize is Keys bicubic (a=-0.75) with uint16 saturation, checked independently."""
    raw = cv2.imread(str(image_files["png16.png"]), cv2.IMREAD_UNCHANGED)
    out = read_resize_img(image_files["png16.png"], target_size=(406, 471))
    expected = np.clip(np.rint(_numpy_bicubic_up(raw, 406, 471)), 0, 65535)
    assert np.abs(out - expected).max() <= 1.0


def test_read_image_dtypes_and_colour(tmp_path, image_files):
    assert read_image(image_files["png16.png"]).dtype == np.uint16
    assert read_image(image_files["pgm16.pgm"]).dtype == np.uint16
    assert read_image(image_files["png8.png"]).dtype == np.uint8
    g = read_image(image_files["png16.png"], gs_255=True)
    assert g.dtype == np.uint8
    np.testing.assert_array_equal(g, cv2.imread(str(image_files["png16.png"]),
                                                cv2.IMREAD_GRAYSCALE))
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 200, 100, 50
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    grey = read_image(tmp_path / "c.png")
    assert grey.shape == (10, 12) and grey.dtype == np.uint8
    # OpenCV BGR->grey weights 0.114 B + 0.587 G + 0.299 R
    assert abs(int(grey[0, 0]) - round(0.114 * 200 + 0.587 * 100 + 0.299 * 50)) <= 1


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
def _bad_files(tmp_path, image_files):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    data = image_files["png16.png"].read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 3])
    jpeg = image_files["jpeg.jpg"].read_bytes()
    truncated_jpeg = tmp_path / "truncated.jpg"
    truncated_jpeg.write_bytes(jpeg[: len(jpeg) * 2 // 3])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 20)
    fake_dcm = tmp_path / "fake.dcm"
    fake_dcm.write_text("not dicom either\n" * 20)
    huge = tmp_path / "huge_dims.png"
    huge.write_bytes(huge_png_bytes())
    return {"huge_dims": huge, "missing": tmp_path / "missing.png", "empty": empty, "truncated": truncated,
            "text": text, "directory": tmp_path, "fake_dcm": fake_dcm,
            "truncated_jpeg": truncated_jpeg}


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "directory",
                                  "fake_dcm", "truncated_jpeg", "huge_dims"])
def test_unreadable_files_raise_image_read_error(tmp_path, image_files, kind):
    path = _bad_files(tmp_path, image_files)[kind]
    with pytest.raises(ImageReadError) as info:
        read_resize_img(path, target_height=50)
    assert str(info.value).startswith(f"cannot read image {str(path)!r}: ")
    assert info.value.reason and info.value.reason in str(info.value)
    assert info.value.filename == str(path)
    assert isinstance(info.value, OSError)
    with pytest.raises(ImageReadError, match=os.path.basename(str(path))):
        read_image(path, gs_255=True)


def test_image_read_error_pickles(tmp_path):
    import pickle

    err = pickle.loads(pickle.dumps(ImageReadError(tmp_path / "x.png", "file is empty")))
    assert isinstance(err, ImageReadError) and err.filename == str(tmp_path / "x.png")
    assert str(err) == f"cannot read image {str(tmp_path / 'x.png')!r}: file is empty"


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of target_size"),
    (dict(target_size=(10, 10), target_height=10), "exactly one of target_size"),
    (dict(target_height=0), "target_height should be a positive integer, got 0"),
    (dict(target_height=12.5), "target_height should be a positive integer, got 12.5"),
    (dict(target_size=(0, 5)), r"target_size\[0\] should be a positive integer, got 0"),
    (dict(target_size=(5,)), "target_size should be"),
    (dict(target_height=10, rescale_factor=-1), "rescale_factor should be > 0, got -1"),
    (dict(target_height=10, rescale_factor=0.0), "rescale_factor should be > 0, got 0.0"),
    (dict(target_height=10, target_scale=0), "target_scale should be > 0, got 0"),
])
def test_bad_arguments(image_files, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_resize_img(image_files["png8.png"], **kwargs)


# ------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------
def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=16, slope=None,
                intercept=None, center=None, width=None, signed=False):
    """Write a single-frame greyscale DICOM file with pydicom (explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def raw12():
    """12-bit stored values 0..4095 (both ends present) in a 16-bit container."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 4096, size=(37, 29)).astype(np.uint16)
    raw[0, 0], raw[0, 1] = 0, 4095
    return raw


def test_dicom_monochrome2_12bit(tmp_path, raw12):
    path = write_dicom(tmp_path / "m2.dcm", raw12, bits_stored=12)
    out = read_image(path)
    assert out.dtype == np.uint16 and out.shape == raw12.shape
    expected = np.rint(raw12.astype(np.float64) / 4095 * 65535).astype(np.uint16)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == 0 and out[0, 1] == 65535


def test_dicom_unused_high_bits_are_dropped(tmp_path, raw12):
    path = write_dicom(tmp_path / "hb.dcm", raw12 | 0xF000, bits_stored=12)
    np.testing.assert_array_equal(read_image(path),
                                  np.rint(raw12 / 4095.0 * 65535).astype(np.uint16))


def test_dicom_monochrome1_is_inverted(tmp_path, raw12):
    path = write_dicom(tmp_path / "m1.dcm", raw12, photometric="MONOCHROME1", bits_stored=12)
    expected = np.rint((1.0 - raw12.astype(np.float64) / 4095) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(read_image(path), expected)
    # dense tissue (low stored value in MONOCHROME1) is bright
    assert read_image(path)[0, 0] == 65535


def test_dicom_rescale_slope_intercept(tmp_path, raw12):
    # negative slope reverses the modality values: output range -> 0..65535 reversed
    path = write_dicom(tmp_path / "rs.dcm", raw12, bits_stored=12, slope=-2.0, intercept=100)
    values = raw12 * -2.0 + 100
    low, high = 4095 * -2.0 + 100, 100.0
    expected = np.rint((values - low) / (high - low) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(read_image(path), expected)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_after_rescale(tmp_path, raw12, photometric):
    center, width, slope, intercept = 1500.0, 1201.0, 2.0, -1024.0
    path = write_dicom(tmp_path / "w.dcm", raw12, photometric=photometric, bits_stored=12,
                       slope=slope, intercept=intercept, center=center, width=width)
    hu = raw12.astype(np.float64) * slope + intercept
    # DICOM PS3.3 C.11.2.1.2.1 linear window, normalised to 0..1
    unit = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    np.testing.assert_array_equal(read_image(path),
                                  np.rint(unit * 65535).astype(np.uint16))
    np.testing.assert_array_equal(read_image(path, gs_255=True),
                                  np.rint(unit * 255).astype(np.uint8))
    assert (unit == 0).any() and (unit == 1).any() and ((unit > 0) & (unit < 1)).any()


def test_dicom_voi_lut_sequence_preferred_over_window(tmp_path, raw12):
    from pydicom.dataset import Dataset
    import pydicom

    lut = np.rint(np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(np.uint16)  # 12-bit out
    path = write_dicom(tmp_path / "voi.dcm", raw12, bits_stored=12, center=100.0, width=50.0)
    ds = pydicom.dcmread(str(path))
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])     # LUT Descriptor
    item.add_new(0x00283006, "US", lut.tolist())      # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(str(path))
    expected = np.rint(lut[raw12].astype(np.float64) / 4095 * 65535).astype(np.uint16)
    np.testing.assert_array_equal(read_image(path), expected)


def test_dicom_full_16bit_and_signed(tmp_path):
    raw = np.array([[0, 1000, 65535], [32768, 5, 60000]], np.uint16)
    np.testing.assert_array_equal(read_image(write_dicom(tmp_path / "a.dcm", raw)), raw)
    signed = np.array([[-2048, 0, 2047], [-1, 1, 100]], np.int16)
    out = read_image(write_dicom(tmp_path / "s.dcm", signed, bits_stored=12, signed=True))
    np.testing.assert_array_equal(
        out, np.rint((signed + 2048.0) / 4095 * 65535).astype(np.uint16))


def test_dicom_invalid_window_is_an_image_read_error(tmp_path, raw12):
    path = write_dicom(tmp_path / "bad_window.dcm", raw12, bits_stored=12, center=100.0,
                       width=0.5)
    with pytest.raises(ImageReadError, match="bad_window.dcm.*Window Width"):
        read_image(path)


def test_dicom_through_read_resize_img(tmp_path, raw12):
    path = write_dicom(tmp_path / "m2.dcm", raw12, bits_stored=12)
    expected = cv2.resize(read_image(path), (20, 50), interpolation=cv2.INTER_CUBIC)
    out = read_resize_img(path, target_size=(50, 20), rescale_factor=255.0 / 65535)
    np.testing.assert_array_equal(out, expected.astype(np.float32) * np.float32(255.0 / 65535))
    assert 0 <= out.min() and out.max() <= 255.0 + 1e-3


def test_dicom_detected_by_preamble_without_extension(tmp_path, raw12):
    path = write_dicom(tmp_path / "m2.dcm", raw12, bits_stored=12)
    renamed = tmp_path / "image_no_ext"
    os.rename(path, renamed)
    assert read_image(renamed).max() == 65535


# ------------------------------------------------------------------------------------------
# Real mammograms (optional)
# ------------------------------------------------------------------------------------------
@pytest.mark.real_data
@pytest.mark.slow
def test_real_mammograms_equal_2017_reference(real_mammogram_dir):
    files = sorted(real_mammogram_dir.glob("*.png"))
    assert len(files) == 4
    for path in files:
        assert read_image(path).shape == (3328, 2560)
        for kwargs, shape in [(dict(target_size=(1152, 896), rescale_factor=255.0 / 65535),
                               (1152, 896)),
                              (dict(target_height=4096), (4096, 3150))]:
            out = read_resize_img(path, **kwargs)
            assert out.dtype == np.float32 and out.shape == shape
            np.testing.assert_array_equal(out, reference_read_resize_2017(path, **kwargs))


# ------------------------------------------------------------------------------------------
# Cropping, margins, patches
# ------------------------------------------------------------------------------------------
def test_crop_img():
    img = np.arange(60).reshape(6, 10)
    np.testing.assert_array_equal(crop_img(img, (2, 1, 3, 4)), img[1:5, 2:5])
    rgb = np.zeros((6, 10, 3))
    assert crop_img(rgb, (0, 0, 10, 6)).shape == (6, 10, 3)
    for bad in [(2, 1, 3), (0, 0, 0, 3), (8, 0, 3, 2), (0, 5, 2, 2), (-1, 0, 2, 2),
                (0.5, 0, 2, 2)]:
        with pytest.raises(ValueError, match="bbox"):
            crop_img(img, bad)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_add_img_margins(dtype):
    img = (np.arange(12).reshape(3, 4) + 1).astype(dtype)
    out = add_img_margins(img, 2)
    assert out.shape == (7, 8) and out.dtype == dtype
    np.testing.assert_array_equal(out[2:5, 2:6], img)
    assert out.sum() == img.sum()
    assert add_img_margins(img, 128.0).shape == (259, 260)   # 2017 passed patch_size / 2
    assert add_img_margins(np.ones((3, 4, 3)), 1).shape == (5, 6, 3)
    np.testing.assert_array_equal(add_img_margins(img, 0), img)
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="margin should be a non-negative integer"):
            add_img_margins(img, bad)


def _py2_round(v):
    return int(np.floor(v + 0.5)) if v >= 0 else -int(np.floor(-v + 0.5))


def reference_sweep_2017(img, patch_size, stride, target_scale=None, equalize_hist=False):
    """The 2017 sweep written as loops (float64 image, as 2017 add_img_margins produced)."""
    img = img.astype(np.float64)
    nb_row = _py2_round(float(img.shape[0] - patch_size) / stride + .49)
    nb_col = _py2_round(float(img.shape[1] - patch_size) / stride + .49)
    y_gap = int((img.shape[0] - (patch_size + (nb_row - 1) * stride)) / 2)
    x_gap = int((img.shape[1] - (patch_size + (nb_col - 1) * stride)) / 2)
    out = []
    for y in range(y_gap, y_gap + nb_row * stride, stride):
        for x in range(x_gap, x_gap + nb_col * stride, stride):
            patch = img[y:y + patch_size, x:x + patch_size].copy()
            if target_scale is not None:
                patch_max = patch.max() if patch.max() != 0 else target_scale
                patch *= target_scale / patch_max
            if equalize_hist:
                patch = cv2.equalizeHist(patch.astype("uint8"))
            out.append(patch.astype("float32"))
    return np.stack(out), nb_row, nb_col


@pytest.mark.parametrize("shape, patch, stride, scale, eq", [
    ((64, 48), 16, 8, None, False),
    ((67, 53), 16, 5, None, False),
    ((67, 53), 16, 5, 255.0, True),
    ((40, 90), 32, 7, 1.0, False),
    ((33, 33), 8, 4, None, True),
])
def test_sweep_img_patches_equals_2017(shape, patch, stride, scale, eq):
    rng = np.random.default_rng(5)
    img = (rng.random(shape) * 200).astype(np.float32)
    img[:5] = 0                                   # some all-zero patches for target_scale
    out, nb_row, nb_col = sweep_img_patches(img, patch, stride, target_scale=scale,
                                            equalize_hist=eq)
    ref, r_row, r_col = reference_sweep_2017(img, patch, stride, scale, eq)
    assert (nb_row, nb_col) == (r_row, r_col)
    assert out.dtype == np.float32 and out.shape == (nb_row * nb_col, patch, patch)
    np.testing.assert_array_equal(out, ref)


def test_sweep_counts_and_order():
    img = np.arange(300 * 301, dtype=np.float32).reshape(300, 301)
    patches, nb_row, nb_col = sweep_img_patches(img, 100, 50)
    # (300 - 100) / 50 = 4.0 -> round(4.49) = 4 rows; (301 - 100) / 50 = 4.02 -> 5 columns
    assert (nb_row, nb_col) == (4, 5)
    y_gap, x_gap = (300 - 100 - 3 * 50) // 2, (301 - 100 - 4 * 50) // 2
    assert (y_gap, x_gap) == (25, 0)
    np.testing.assert_array_equal(patches[1 * nb_col + 2], img[75:175, 100:200])  # row-major
    one, r, c = sweep_img_patches(np.ones((16, 16)), 16, 4)   # 2017 raised on this
    assert (r, c) == (1, 1) and one.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        sweep_img_patches(np.ones((10, 30)), 16, 4)
    with pytest.raises(ValueError, match="stride should be a positive integer, got 0"):
        sweep_img_patches(np.ones((30, 30)), 16, 0)


def test_get_roi_patches():
    img = np.arange(1, 50 * 60 + 1, dtype=np.uint16).reshape(50, 60)
    pts = np.array([[30.0, 20.0], [2.0, 3.0], [59.0, 49.0]])        # (x, y)
    patches = get_roi_patches(img, pts, roi_size=(10, 8))
    assert patches.shape == (3, 10, 8) and patches.dtype == np.float32
    np.testing.assert_array_equal(patches[0], img[15:25, 26:34])
    # near the top-left corner: zero-padded, the keypoint stays at the patch centre (5, 4)
    assert patches[1][5, 4] == img[3, 2]
    assert np.all(patches[1][:2] == 0) and np.all(patches[1][:, :2] == 0)
    np.testing.assert_array_equal(patches[1][2:, 2:], img[0:8, 0:6])
    assert patches[2][5, 4] == img[49, 59] and np.all(patches[2][6:] == 0)
    kps = [cv2.KeyPoint(float(x), float(y), 5) for x, y in pts]
    np.testing.assert_array_equal(get_roi_patches(img, kps, (10, 8)), patches)
    assert get_roi_patches(img, np.zeros((0, 2)), (4, 4)).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="inside the image"):
        get_roi_patches(img, np.array([[60.0, 1.0]]), (4, 4))


def _clustered_keypoints():
    rng = np.random.default_rng(11)
    centres = [(20, 20), (200, 40), (100, 250)]
    kps = []
    for ci, (cx, cy) in enumerate(centres):
        for j in range(6):
            x, y = rng.normal(cx, 4), rng.normal(cy, 4)
            kps.append(cv2.KeyPoint(float(x), float(y), float(3 + j + ci * 0.5),
                                    0, float(j % 3)))
    return kps


def test_clust_kpts_keypoints():
    kps = _clustered_keypoints()
    reps = clust_kpts(kps, 3)
    assert len(reps) == 3 and all(isinstance(k, cv2.KeyPoint) for k in reps)
    # the largest keypoint of each group (j = 5: indices 5, 11, 17)
    assert [kps.index(k) for k in reps] == [5, 11, 17]
    assert clust_kpts(kps[:2], 3) == kps[:2]
    centres = clust_kpts(kps, 3, return_centers=True)
    assert centres.shape == (3, 2)
    assert min(np.linalg.norm(centres - [200, 40], axis=1)) < 5


def test_clust_kpts_array():
    kps = _clustered_keypoints()
    xy = np.array([k.pt for k in kps])
    reps = clust_kpts(xy, 3)
    assert reps.shape == (3, 2)
    for group in range(3):
        members = xy[group * 6:(group + 1) * 6]
        nearest = members[np.argmin(np.linalg.norm(members - members.mean(0), axis=1))]
        assert any(np.array_equal(nearest, r) for r in reps)
    with pytest.raises(ValueError, match="nb_clust should be a positive integer"):
        clust_kpts(xy, 0)


def test_to_sparse():
    np.testing.assert_array_equal(to_sparse(np.eye(3)[[2, 0, 1, 1]]), [2, 0, 1, 1])
    np.testing.assert_array_equal(to_sparse(np.array([[0.2, 0.8], [0.6, 0.4]])), [1, 0])
    out = to_sparse(np.array([1.0, 0.0, 2.0]))
    assert out.dtype.kind == "i"
    np.testing.assert_array_equal(out, [1, 0, 2])
    with pytest.raises(ValueError, match="shape"):
        to_sparse(np.zeros((2, 2, 2)))


def reference_index_balancer_2017(index_array, classes, ratio, rng):
    n = len(index_array)
    pos_weight = len(classes) / (np.sum(classes == 1) + 1e-7)
    neg_weight = len(classes) / (np.sum(classes != 1) + 1e-7) * ratio
    probs = np.zeros(n)
    probs[classes == 1] = pos_weight
    probs[classes != 1] = neg_weight
    probs /= probs.sum()
    out = rng.choice(index_array, n, p=probs)
    out.sort()
    return out


def test_index_balancer():
    index_array = np.arange(100, 140)
    classes = np.array([1] * 4 + [0] * 30 + [2] * 6)
    out = index_balancer(index_array, classes, 2.0, np.random.RandomState(3))
    ref = reference_index_balancer_2017(index_array, classes, 2.0, np.random.RandomState(3))
    np.testing.assert_array_equal(out, ref)
    assert len(out) == 40 and np.all(np.diff(out) >= 0) and np.all(np.isin(out, index_array))
    # over many batches the neg:pos ratio approaches the requested one
    rng = np.random.default_rng(0)
    draws = np.concatenate([index_balancer(index_array, classes, 2.0, rng) for _ in range(300)])
    nb_pos = np.isin(draws, index_array[classes == 1]).sum()
    assert (len(draws) - nb_pos) / nb_pos == pytest.approx(2.0, rel=0.05)
    with pytest.raises(ValueError, match="ratio should be > 0, got -1"):
        index_balancer(index_array, classes, -1, rng)


# ------------------------------------------------------------------------------------------
# Prediction helpers
# ------------------------------------------------------------------------------------------
def test_read_img_for_pred(image_files):
    path = image_files["png16.png"]
    x = read_img_for_pred(path, target_size=(50, 40), rescale_factor=255.0 / 65535)
    base = read_resize_img(path, target_size=(50, 40), rescale_factor=255.0 / 65535)
    assert x.shape == (50, 40, 3) and x.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(x[..., c], base)
    one = read_img_for_pred(path, target_size=(50, 40), dup_3_channels=False,
                            data_format="channels_first")
    assert one.shape == (1, 50, 40)
    eq = read_img_for_pred(path, equalize_hist=True, target_size=(50, 40),
                           rescale_factor=255.0 / 65535)
    np.testing.assert_array_equal(eq[..., 0], cv2.equalizeHist(base.astype(np.uint8)))
    # a 16-bit image is brought to 0..255 by its max before equalising (no wrap-around)
    eq16 = read_img_for_pred(path, equalize_hist=True, target_size=(50, 40))
    raw = read_resize_img(path, target_size=(50, 40))
    expected = cv2.equalizeHist((raw * (255.0 / raw.max())).astype(np.uint8))
    np.testing.assert_array_equal(eq16[..., 0], expected)
    calls = []
    out = read_img_for_pred(path, target_height=30,
                            transformer=lambda a: calls.append("t") or a * 2,
                            standardizer=lambda a: calls.append("s") or a - 1)
    assert calls == ["t", "s"]
    np.testing.assert_allclose(out[..., 1], read_resize_img(path, target_height=30) * 2 - 1)
    with pytest.raises(ValueError, match="data_format should be one of"):
        read_img_for_pred(path, target_height=30, data_format="nhwc")


def _tiny_patch_model(keras, channels, patch=16, nb_class=3):
    inp = keras.Input((patch, patch, channels))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(nb_class, activation="softmax")(x)
    return keras.Model(inp, out)


def test_get_prob_heatmap(keras_session, tmp_path):
    keras = keras_session
    img = np.zeros((120, 90), np.uint16)
    yy, xx = np.mgrid[0:120, 0:90]
    img[((yy - 60) / 50.0) ** 2 + (xx / 60.0) ** 2 <= 1] = 40000
    img[5:9, 70:85] = 65535                                     # a label
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), img)
    model = _tiny_patch_model(keras, 3)
    hms = get_prob_heatmap([str(path), path], 96, 1.0, 16, 5, model, 32,
                           featurewise_center=True, featurewise_mean=0.5)
    assert isinstance(hms, list) and len(hms) == 2
    # the same steps done by hand
    prep, _ = segment_breast(read_resize_img(path, target_height=96))
    prep = add_img_margins(prep, 8)
    patches, nb_row, nb_col = sweep_img_patches(prep, 16, 5, target_scale=1.0)
    x = np.repeat(patches[..., None], 3, axis=-1) - np.float32(0.5)
    expected = model.predict(x, batch_size=32, verbose=0).reshape(nb_row, nb_col, 3)
    for hm in hms:
        assert hm.shape == (nb_row, nb_col, 3) and hm.dtype == np.float32
        np.testing.assert_allclose(hm, expected, atol=1e-6)
        np.testing.assert_allclose(hm.sum(-1), 1.0, atol=1e-5)
        assert np.all(hm >= 0)
    single = get_prob_heatmap(str(path), 96, 1.0, 16, 5, model, 7, featurewise_center=True,
                              featurewise_mean=0.5, parallelized=True)
    np.testing.assert_allclose(single, expected, atol=1e-6)
    assert get_prob_heatmap(None, 96, 1.0, 16, 5, model, 7) == [None]


def test_get_prob_heatmap_one_channel_and_preprocess(keras_session):
    keras = keras_session
    img = np.zeros((60, 50), np.float32)
    img[10:50, 0:30] = 100.0
    model = _tiny_patch_model(keras, 1, nb_class=2)
    hm = get_prob_heatmap([img], None, None, 16, 4, model, 16,
                          preprocess=lambda a: a / 100.0)
    prep = add_img_margins(segment_breast(img)[0], 8)
    patches, nb_row, nb_col = sweep_img_patches(prep, 16, 4)
    expected = model.predict(patches[..., None] / 100.0, verbose=0)
    assert hm[0].shape == (nb_row, nb_col, 2)
    np.testing.assert_allclose(hm[0].reshape(-1, 2), expected, atol=1e-6)


def test_write_png_atomic_16bit_roundtrip_and_errors(tmp_path, monkeypatch):
    import dm_image
    img = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)
    path = tmp_path / "p.png"
    dm_image.write_png(path, img)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    # a failed write (full disk) leaves the old file whole and no temporary file behind
    real_fdopen = os.fdopen

    class _FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:7])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dm_image.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        dm_image.write_png(path, np.zeros((4, 4), np.uint8))
    monkeypatch.undo()
    assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    with pytest.raises(OSError, match="could not encode"):
        dm_image.write_png(tmp_path / "bad.png", np.zeros((4, 4, 7), np.float64))


def test_atomic_write_never_follows_planted_links_and_keeps_normal_permissions(tmp_path):
    import dm_image

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "result.json"
    # links at every name a fixed-name scheme could use
    for name in ("result.json.tmp", "result.json.part", ".result.json.tmp", "result.tmp.json"):
        (out / name).symlink_to(victim)
    old_mask = os.umask(0o027)
    try:
        dm_image.atomic_write(target, lambda fh: fh.write("{}\n"), text=True)
    finally:
        os.umask(old_mask)
    assert victim.read_text() == "precious"
    assert target.read_text() == "{}\n" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640   # 0o666 less the umask, not 0o600
    # a writer that fails part-way leaves no temporary file and the old content
    with pytest.raises(RuntimeError, match="boom"):
        dm_image.atomic_write(target, lambda fh: (fh.write("partial"),
                                                  (_ for _ in ()).throw(RuntimeError("boom"))),
                              text=True)
    assert target.read_text() == "{}\n"
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == ["result.json"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_write_png_greyscale_roundtrips(tmp_path, dtype):
    """2-D uint8/uint16 images: OpenCV and PIL read back the same array, at the same bit depth
    (odd sizes, 1-pixel rows and columns, strided views included)."""
    from PIL import Image

    import dm_image
    rng = np.random.default_rng(5)
    top = np.iinfo(dtype).max
    shapes = [(1, 1), (1, 9), (9, 1), (17, 3), (256, 256), (31, 64)]
    for k, shape in enumerate(shapes):
        img = rng.integers(0, top + 1, shape).astype(dtype)
        img[0, 0], img[-1, -1] = top, 0
        for arr in (img, img[::-1, ::2], img.T):
            path = tmp_path / f"g{k}.png"
            dm_image.write_png(path, arr)
            back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert back.dtype == dtype and np.array_equal(back, arr)
            with Image.open(path) as im:
                im.verify()  # chunk CRCs
            with Image.open(path) as im:
                assert np.array_equal(np.asarray(im).astype(np.int64), arr.astype(np.int64))


def test_write_png_bilevel_mask(tmp_path):
    import dm_image
    mask = np.zeros((37, 29), np.uint8)
    mask[5:20, 3:11] = 255
    mask[30, 28] = 255
    dm_image.write_png(tmp_path / "m.png", mask, bilevel=True)
    raw = (tmp_path / "m.png").read_bytes()
    assert raw[24] == 1 and raw[25] == 0            # IHDR: bit depth 1, greyscale
    for flag in (cv2.IMREAD_UNCHANGED, cv2.IMREAD_GRAYSCALE):
        back = cv2.imread(str(tmp_path / "m.png"), flag)
        assert back.dtype == np.uint8 and np.array_equal(back, mask)
    np.testing.assert_array_equal(dm_image.read_image(tmp_path / "m.png", gs_255=True), mask)
    for bad in (np.full((4, 4), 1, np.uint8), np.zeros((4, 4), np.uint16)):
        with pytest.raises(ValueError, match="bilevel PNG .*bad.png.* 0/255 mask"):
            dm_image.write_png(tmp_path / "bad.png", bad, bilevel=True)
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("name, dtype", [("png16.png", np.uint16), ("png8.png", np.uint8),
                                         ("tif16.tif", np.uint16)])
@pytest.mark.parametrize("kwargs", [dict(target_size=(100, 80)), dict(target_height=401),
                                    dict(target_height=120, gs_255=True)], ids=str)
def test_read_resize_stored_is_read_resize_img_before_float(image_files, name, dtype, kwargs):
    import dm_image
    stored = dm_image.read_resize_stored(image_files[name], **kwargs)
    assert stored.dtype == (np.uint8 if kwargs.get("gs_255") else dtype)
    np.testing.assert_array_equal(stored.astype(np.float32),
                                  read_resize_img(image_files[name], **kwargs))
    with pytest.raises(ValueError, match="exactly one"):
        dm_image.read_resize_stored(image_files[name])


def test_progress_logs_lines_when_not_on_a_terminal(caplog):
    import logging

    import dm_image

    with caplog.at_level(logging.INFO, logger="dm_image"):
        with dm_image.progress(25, "scoring", unit="img") as bar:
            for _ in range(25):
                bar.update()
        with dm_image.progress(25, "quiet", verbose=False) as bar:
            for _ in range(25):
                bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split(" (")[0] for ln in lines] == [
        "scoring: 2/25 img", "scoring: 4/25 img", "scoring: 6/25 img", "scoring: 8/25 img",
        "scoring: 10/25 img", "scoring: 12/25 img", "scoring: 14/25 img", "scoring: 16/25 img",
        "scoring: 18/25 img", "scoring: 20/25 img", "scoring: 22/25 img", "scoring: 24/25 img",
        "scoring: 25/25 img"]
