"""Breast segmentation of ``dm_image``: the largest bright object, labels and markers excluded."""
import cv2
import numpy as np
import pytest
from scipy import ndimage

from dm_image import DMImagePreprocessor, read_resize_img, segment_breast

EIGHT_CONNECTED = np.ones((3, 3), bool)


def _synthetic_mammogram(dtype=np.uint16):
    """300x200 image: half-ellipse breast on the left edge with a dark hole inside it, a
    burned-in label (three blocks) at the top right and a marker dot; also the breast mask."""
    h, w = 300, 200
    yy, xx = np.mgrid[0:h, 0:w]
    breast = ((yy - 160) / 110.0) ** 2 + (xx / 120.0) ** 2 <= 1.0
    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    img = np.zeros((h, w), np.float64)
    img[breast] = top * (0.4 + 0.3 * rng.random(breast.sum()))
    hole = ((yy - 160) ** 2 + (xx - 40) ** 2) <= 12 ** 2    # fat: below the 5 % threshold
    img[hole] = 0.03 * top
    label = np.zeros((h, w), bool)
    for x0 in (150, 160, 170):
        label[10:22, x0:x0 + 6] = True
    img[label] = top
    marker = ((yy - 160) ** 2 + (xx - 128) ** 2) <= 2 ** 2
    img[marker] = top
    return img.astype(dtype), breast, hole, label | marker


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32])
def test_segment_synthetic(dtype):
    img, breast, hole, others = _synthetic_mammogram(dtype)
    rows, cols = np.nonzero(breast)
    expected_box = (0, rows.min(), cols.max() + 1, rows.max() - rows.min() + 1)
    out, box = segment_breast(img)
    assert box == expected_box
    assert all(isinstance(v, int) for v in box)
    x, y, w, h = box
    assert out.shape == (h, w) and out.dtype == img.dtype
    np.testing.assert_array_equal(out, np.where(breast | hole, img, 0)[y:y + h, x:x + w])
    full, box2 = segment_breast(img, crop=False)
    assert box2 == box and full.shape == img.shape and full.dtype == img.dtype
    assert np.all(full[others] == 0)                        # label and marker removed
    np.testing.assert_array_equal(full[hole], img[hole])    # dark fat inside the breast kept
    np.testing.assert_array_equal(full[breast], img[breast])
    # the 2017 name
    out_b, box_b = DMImagePreprocessor.segment_breast(img)
    assert box_b == box
    np.testing.assert_array_equal(out_b, out)


def test_absolute_threshold():
    img, _, _, _ = _synthetic_mammogram(np.uint8)
    _, box_frac = segment_breast(img, low_int_threshold=0.05)
    _, box_abs = segment_breast(img, low_int_threshold=12)   # int(255 * 0.05) = 12
    assert box_abs == box_frac
    # 8-bit threshold 200 is above the breast (102..178): only the label and marker remain
    with pytest.raises(ValueError, match="no breast found"):
        segment_breast(img, low_int_threshold=200)


@pytest.mark.parametrize("img, match", [
    (np.zeros((50, 40), np.uint16), "all black"),
    (np.pad(np.full((3, 3), 1000, np.uint16), 40), "no breast found"),
    (np.full((4, 5, 3), 7, np.uint8), "2-D image"),
    (np.zeros((0, 5), np.uint8), "2-D image"),
])
def test_segment_bad_images_give_clear_errors(img, match):
    with pytest.raises(ValueError, match=match):
        segment_breast(img)


def test_segment_bad_threshold():
    img, _, _, _ = _synthetic_mammogram()
    with pytest.raises(ValueError, match="low_int_threshold should be > 0, got 0"):
        segment_breast(img, low_int_threshold=0)


@pytest.mark.real_data
def test_real_mammograms_box_has_breast_and_no_label(real_mammogram_dir):
    files = sorted(real_mammogram_dir.glob("*.png"))
    assert len(files) == 4
    for path in files:
        img = read_resize_img(path, target_height=832)
        assert img.shape == (832, 640)
        out, (x, y, w, h) = segment_breast(img)
        # independent connected-component analysis (scipy) of the same 5 % threshold
        img_8u = (img / img.max() * 255).astype(np.uint8)
        labels, nb = ndimage.label(img_8u > int(img_8u.max() * 0.05), EIGHT_CONNECTED)
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, nb + 1))
        breast_lab = 1 + int(np.argmax(sizes))
        breast = labels == breast_lab
        in_box = np.zeros_like(breast)
        in_box[y:y + h, x:x + w] = True
        assert (breast & in_box).sum() >= 0.99 * breast.sum(), path.name
        rows, cols = np.nonzero(breast)
        assert (x, y, w, h) == (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1)
        # the burned-in label: the other bright objects in the top 15 % of the image
        others = (labels > 0) & ~breast
        label_px = others.copy()
        label_px[int(0.15 * img.shape[0]):] = False
        assert label_px.sum() >= 30, f"{path.name}: label not found"
        assert not np.any(label_px & in_box), f"{path.name}: label inside the breast box"
        # every other object (label characters, skin markers) is zeroed in the masked image
        masked, _ = segment_breast(img, crop=False)
        assert np.all(masked[others] == 0)
        assert out.shape == (h, w) and out.dtype == np.float32
        assert w * h > 0.25 * img.size


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_integer_images_segment_as_their_float_copy(dtype):
    """uint8/uint16 images take an integer threshold path; it must pick the same pixels as the
    float32 8-bit conversion it replaces (levels at the threshold edge included)."""
    rng = np.random.default_rng(11)
    top = np.iinfo(dtype).max
    for k in range(40):
        h, w = rng.integers(8, 90, 2)
        raw = rng.integers(0, top + 1, (h, w)) * (rng.random((h, w)) < rng.random())
        img = cv2.GaussianBlur(raw.astype(np.float64), (0, 0), 0.2 + 2 * rng.random())
        img = np.rint(img * (top / max(img.max(), 1))).astype(dtype)
        if k % 2:  # a maximum that does not divide evenly (e.g. 12-bit data)
            img = np.minimum(img, rng.integers(300 if dtype == np.uint16 else 30, top))
        for thr in (0.05, 0.37, 7):
            try:
                ref = segment_breast(img.astype(np.float64), thr, min_breast_fraction=0)
            except ValueError as err:
                with pytest.raises(ValueError, match=str(err)[:30]):
                    segment_breast(img, thr, min_breast_fraction=0)
                continue
            out, box = segment_breast(img, thr, min_breast_fraction=0)
            assert box == ref[1]
            np.testing.assert_array_equal(out, ref[0].astype(dtype))


def test_more_objects_than_16bit_labels():
    """Over 65535 separate specks (labels no longer fit 16 bits): still the largest object."""
    img = np.zeros((700, 700), np.uint16)
    img[::2, ::2] = 5000                       # 122,500 one-pixel objects
    img[300:420, 100:600] = 60000              # the "breast"
    out, box = segment_breast(img, crop=False)
    # the block plus the specks touching it: row 420 (cols 100..600) and col 600 (rows 300..418)
    assert box == (100, 300, 501, 121)
    labels, _ = ndimage.label(img > 0, EIGHT_CONNECTED)
    expected = labels == labels[350, 350]
    assert expected.sum() == 500 * 120 + 251 + 60
    np.testing.assert_array_equal(out > 0, expected)
