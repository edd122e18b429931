"""DMImageDataGenerator iterators: file order, 2017 preprocessing, labels, weights, RAM cache."""
import logging

import cv2
import numpy as np
import pytest
from conftest import huge_png_bytes, imwrite

import dm_image
from dm_image import (DMImageDataGenerator, batch_balance_weights,
                      list_class_images, load_dat_ram, read_resize_img)

RESCALE = 255.0 / 65535
SIZE = (64, 48)
AUG = dict(rotation_range=25., width_shift_range=0.1, height_shift_range=0.1, shear_range=0.2,
           zoom_range=0.2, channel_shift_range=20., horizontal_flip=True, vertical_flip=True)


def _mammo(rng, h=80, w=60, dtype=np.uint16):
    """A tiny synthetic 'mammogram': bright ellipse on dark background plus noise."""
    top = 65535 if dtype == np.uint16 else 255
    rr, cc = np.mgrid[0:h, 0:w]
    breast = ((rr - h / 2) / (0.45 * h)) ** 2 + (cc / (0.8 * w)) ** 2 < 1
    img = breast * rng.uniform(0.3, 0.9) * top + rng.normal(0, 0.03 * top, (h, w))
    return np.clip(img, 0, top).astype(dtype)


@pytest.fixture
def img_dir(tmp_path):
    """neg/ with 3 16-bit PNGs (one in a subfolder), pos/ with 2, plus a non-image file."""
    rng = np.random.RandomState(0)
    for rel in ["neg/b.png", "neg/a.png", "neg/sub/c.png", "pos/z.png", "pos/y.png"]:
        imwrite(tmp_path / "train" / rel, _mammo(rng))
    (tmp_path / "train" / "neg" / "notes.txt").write_text("not an image")
    return tmp_path / "train"


def _reference(path, mean, dup=True, equalize=False, target_scale=None):
    """The 2017 per-image path composed from read_resize_img (no augmentation)."""
    img = read_resize_img(str(path), target_size=SIZE, target_scale=target_scale,
                          rescale_factor=RESCALE)
    if equalize:
        img = cv2.equalizeHist(img.astype(np.uint8)).astype(np.float32)
    x = np.stack([img] * (3 if dup else 1), axis=-1)
    x -= np.float32(mean)
    return x


def _iterator(img_dir, gen=None, **kw):
    gen = gen or DMImageDataGenerator(featurewise_center=True)
    if gen.mean is None:
        gen.mean = 52.16
    args = dict(target_size=SIZE, rescale_factor=RESCALE, dup_3_channels=True, batch_size=2,
                shuffle=False, seed=3)
    args.update(kw)
    return gen.flow_from_directory(str(img_dir), **args)


def test_file_order_classes_and_aliases(img_dir):
    it = _iterator(img_dir)
    assert it.filenames == ["neg/a.png", "neg/b.png", "neg/sub/c.png", "pos/y.png", "pos/z.png"]
    assert it.class_indices == {"neg": 0, "pos": 1}
    np.testing.assert_array_equal(it.classes, [0, 0, 0, 1, 1])
    assert it.nb_sample == it.samples == it.n == 5 and len(it) == 3
    it2 = _iterator(img_dir, classes=["pos", "neg"])
    assert it2.filenames[:2] == ["pos/y.png", "pos/z.png"]
    np.testing.assert_array_equal(it2.classes, [0, 0, 1, 1, 1])


@pytest.mark.parametrize("equalize, target_scale, dup", [
    (False, None, True), (True, None, True), (False, 50000.0, False)])
def test_without_augmentation_equals_2017_path(img_dir, equalize, target_scale, dup):
    it = _iterator(img_dir, equalize_hist=equalize, target_scale=target_scale,
                   dup_3_channels=dup, batch_size=5)
    x, y = it[0]
    assert x.dtype == np.float32 and x.shape == (5, 64, 48, 3 if dup else 1)
    for k, name in enumerate(it.filenames):
        ref = _reference(img_dir / name, 52.16, dup, equalize, target_scale)
        np.testing.assert_array_equal(x[k], ref)
    np.testing.assert_array_equal(y, [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]])


@pytest.mark.parametrize("mode, shape", [("categorical", (5, 2)), ("binary", (5,)),
                                         ("sparse", (5,)), (None, None)])
def test_class_modes(img_dir, mode, shape):
    out = _iterator(img_dir, class_mode=mode, batch_size=5)[0]
    if mode is None:
        assert isinstance(out, np.ndarray) and out.shape == (5, 64, 48, 3)
        return
    y = out[1]
    assert y.shape == shape and y.dtype == np.float32
    if mode != "categorical":
        np.testing.assert_array_equal(y, [0, 0, 0, 1, 1])


def test_auto_batch_balance_weights(img_dir):
    x, y, w = _iterator(img_dir, auto_batch_balance=True, batch_size=5)[0]
    np.testing.assert_allclose(w, [5 / 3, 5 / 3, 5 / 3, 5 / 2, 5 / 2])
    assert w[:3].sum() == pytest.approx(w[3:].sum())
    np.testing.assert_allclose(batch_balance_weights(np.array([2, 0, 2, 2])),
                               [4 / 3, 4, 4 / 3, 4 / 3])
    np.testing.assert_allclose(batch_balance_weights(np.array([1, 1])), [1, 1])


def test_len_getitem_next_reset(img_dir):
    it = _iterator(img_dir)
    sizes = [len(it[i][0]) for i in range(len(it))]
    assert sizes == [2, 2, 1]
    with pytest.raises(IndexError):
        it[3]
    first = it.next()[0]
    np.testing.assert_array_equal(first, it[0][0])
    next(it), next(it)
    np.testing.assert_array_equal(next(it)[0], first)  # wrapped into epoch 1
    assert it.epoch == 1
    it.reset()
    np.testing.assert_array_equal(it.next()[0], first)


def test_seeded_shuffle_and_order_independent_batches(img_dir):
    gen = DMImageDataGenerator(**AUG)
    a = _iterator(img_dir, gen=gen, shuffle=True, seed=11)
    b = _iterator(img_dir, gen=gen, shuffle=True, seed=11)
    assert sorted(a.index_array) == list(range(5))
    np.testing.assert_array_equal(a.index_array, b.index_array)
    late = b[2]
    early = [a[0], a[1], a[2]]
    np.testing.assert_array_equal(early[2][0], late[0])  # batch i does not depend on order
    np.testing.assert_array_equal(a[0][0], early[0][0])  # and is reproducible
    orders = set()
    for _ in range(6):
        orders.add(tuple(a.index_array))
        a.on_epoch_end()
    assert len(orders) > 1
    c = _iterator(img_dir, gen=gen, shuffle=True, seed=12)
    assert not np.array_equal(c[0][0], early[0][0])


def test_augmentation_changes_images_but_keeps_shape(img_dir):
    plain = _iterator(img_dir, batch_size=5)[0][0]
    gen = DMImageDataGenerator(featurewise_center=True, **AUG)
    aug = _iterator(img_dir, gen=gen, batch_size=5)[0][0]
    assert aug.shape == plain.shape and not np.allclose(aug, plain)
    # channel shift makes the three channels differ by per-channel constants (where unclipped)
    assert not np.array_equal(aug[..., 0], aug[..., 1])


def test_channels_first(img_dir):
    x, _ = _iterator(img_dir, data_format="channels_first", batch_size=5)[0]
    x_last, _ = _iterator(img_dir, batch_size=5)[0]
    np.testing.assert_array_equal(x, np.moveaxis(x_last, -1, 1))


def test_preprocess_applied_to_batch(img_dir):
    x, _ = _iterator(img_dir, preprocess=lambda b: b * 2, batch_size=5)[0]
    np.testing.assert_allclose(x, _iterator(img_dir, batch_size=5)[0][0] * 2)


def test_no_pos_skip_keeps_all_positives(img_dir):
    it = _iterator(img_dir, no_pos_skip=0.5, shuffle=True)
    for _ in range(4):
        labels = it.classes[it.index_array]
        assert (labels == 1).sum() == 2 and (labels == 0).sum() == 2  # round(0.5 * 3)
        it.on_epoch_end()
    with pytest.raises(ValueError, match="no_pos_skip"):
        _iterator(img_dir, no_pos_skip=1.5)


def test_balance_classes_resamples_each_batch(img_dir, monkeypatch):
    calls = []
    real = dm_image.index_balancer

    def spy(index_array, classes, ratio, rng):
        calls.append((list(index_array), list(classes), ratio))
        return real(index_array, classes, ratio, rng)

    monkeypatch.setattr(dm_image, "index_balancer", spy)
    it = _iterator(img_dir, balance_classes=1.0, batch_size=5, class_mode="sparse")
    counts = np.zeros(2)
    for _ in range(40):
        x, y = it[0]
        assert x.shape[0] == 5
        counts += np.bincount(y.astype(int), minlength=2)
        it.on_epoch_end()
    assert calls[0] == ([0, 1, 2, 3, 4], [0, 0, 0, 1, 1], 1.0)
    assert 0.4 < counts[1] / counts.sum() < 0.6  # 1:1 on average instead of 2:3
    x, y = it[0]
    np.testing.assert_array_equal(x, it[0][0])  # still reproducible per (epoch, batch)


def test_bad_folders_and_options(tmp_path, img_dir):
    gen = DMImageDataGenerator()
    (tmp_path / "empty" / "neg").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        gen.flow_from_directory(str(tmp_path / "empty"), target_size=SIZE)
    with pytest.raises(ValueError, match="missing"):
        gen.flow_from_directory(str(img_dir), target_size=SIZE, classes=["neg", "missing"])
    with pytest.raises(ValueError, match="does not exist"):
        gen.flow_from_directory(str(tmp_path / "nowhere"), target_size=SIZE)
    with pytest.raises(ValueError, match="class_mode"):
        gen.flow_from_directory(str(img_dir), target_size=SIZE, class_mode="onehot")
    with pytest.raises(ValueError, match="batch_size"):
        gen.flow_from_directory(str(img_dir), target_size=SIZE, batch_size=0)
    with pytest.raises(ValueError, match="labels"):
        gen.flow_from_directory(str(img_dir), target_size=SIZE, class_mode=None,
                                auto_batch_balance=True)
    with pytest.raises(ValueError, match="same length"):
        gen.flow(np.zeros((3, 4, 4), np.uint16), np.zeros(2))


@pytest.mark.parametrize("content", ["garbage", "huge_dims"])
def test_unreadable_file_is_skipped_counted_and_logged(img_dir, caplog, content):
    data = (b"\x89PNG\r\n\x1a\n garbage" if content == "garbage" else huge_png_bytes())
    (img_dir / "neg" / "_broken.png").write_bytes(data)
    it = _iterator(img_dir, batch_size=4, auto_batch_balance=True)
    assert it.filenames[0] == "neg/_broken.png" and it.n == 6
    with caplog.at_level(logging.WARNING, logger="dm_image"):
        batches = [it[i] for i in range(len(it))] + [it[0]]
    assert it.skipped_files == ["neg/_broken.png"]
    assert sum("_broken.png" in r.getMessage() for r in caplog.records) == 1
    x0, y0, w0 = batches[0]
    assert x0.shape == (4, 64, 48, 3)
    # the broken file was replaced by the first sample after the batch (pos/y.png)
    np.testing.assert_array_equal(x0[0], _reference(img_dir / "pos" / "y.png", 52.16))
    np.testing.assert_array_equal(y0[0], [0, 1])
    np.testing.assert_allclose(w0, [4, 4 / 3, 4 / 3, 4 / 3])


def test_list_class_images_extensions(img_dir):
    (img_dir / "pos" / "w.TIFF").write_bytes(b"")
    (img_dir / "pos" / "v.dcm").write_bytes(b"")
    (img_dir / "pos" / "u.bmp").write_bytes(b"")
    _, files, labels = list_class_images(img_dir)
    assert files[3:] == ["pos/v.dcm", "pos/w.TIFF", "pos/y.png", "pos/z.png"]


# ---- RAM cache --------------------------------------------------------------------------

def test_load_dat_ram_stored_form_and_same_batches_as_disk(img_dir):
    gen = DMImageDataGenerator(featurewise_center=True, **AUG)
    gen.mean = 52.16
    it = _iterator(img_dir, gen=gen, shuffle=True, seed=5, auto_batch_balance=True)
    X, y = load_dat_ram(it)
    assert X.dtype == np.uint16 and X.shape == (5, 64, 48) and X.nbytes == 5 * 64 * 48 * 2
    np.testing.assert_array_equal(X[0], read_resize_img(str(img_dir / "neg/a.png"), SIZE))
    ram = gen.flow(X, y, batch_size=2, shuffle=True, seed=5, **it.ram_flow_kwargs())
    assert len(ram) == len(it)
    for _epoch in range(2):
        for i in range(len(it)):
            for a, b in zip(it[i], ram[i]):
                np.testing.assert_array_equal(a, b)
        it.on_epoch_end()
        ram.on_epoch_end()


def test_load_dat_ram_without_augmentation_equals_reference(img_dir):
    it = _iterator(img_dir, batch_size=5, equalize_hist=True)
    X, y = load_dat_ram(it)
    gen = DMImageDataGenerator(featurewise_center=True)
    gen.mean = 52.16
    x, _ = gen.flow(X, y, batch_size=5, shuffle=False, rescale_factor=RESCALE,
                    equalize_hist=True, dup_3_channels=True)[0]
    for k, name in enumerate(it.filenames):
        np.testing.assert_array_equal(x[k], _reference(img_dir / name, 52.16, equalize=True))


def test_load_dat_ram_8bit_and_skips_broken(tmp_path):
    rng = np.random.RandomState(1)
    for rel in ["a/1.png", "a/2.png", "b/1.png"]:
        imwrite(tmp_path / rel, _mammo(rng, 32, 32, np.uint8))
    (tmp_path / "b" / "0.png").write_bytes(b"broken")
    it = DMImageDataGenerator().flow_from_directory(str(tmp_path), target_size=(32, 32),
                                                    class_mode="sparse")
    X, y = load_dat_ram(it)
    assert X.dtype == np.uint8 and X.shape == (3, 32, 32)
    np.testing.assert_array_equal(y, [0, 0, 1])
    assert it.skipped_files == ["b/0.png"]


def test_flow_with_float_images_2017_style():
    gen = DMImageDataGenerator(featurewise_center=True)
    gen.mean = 10.0
    X = np.random.RandomState(0).rand(4, 8, 6, 3).astype(np.float32) * 100
    x, y = gen.flow(X, np.array([0, 1, 1, 0]), batch_size=4, shuffle=False)[0]
    np.testing.assert_allclose(x, X - 10.0)
    np.testing.assert_array_equal(y, [0, 1, 1, 0])


# ---- tf-keras integration ----------------------------------------------------------------

def _tiny_net(keras):
    inp = keras.Input((64, 48, 3))
    h = keras.layers.Conv2D(2, 3, strides=4, activation="relu")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(h))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_model_fit_and_predict_on_directory_iterator(img_dir, keras_session, workers):
    keras = keras_session
    gen = DMImageDataGenerator(featurewise_center=True, **AUG)
    it = _iterator(img_dir, gen=gen, auto_batch_balance=True, shuffle=True)
    model = _tiny_net(keras)
    hist = model.fit(it, epochs=1, steps_per_epoch=2, workers=workers, verbose=0)
    assert len(hist.history["loss"]) == 1 and np.isfinite(hist.history["loss"][0])
    pred_it = _iterator(img_dir, class_mode=None, batch_size=2)
    pred = model.predict(pred_it, workers=workers, verbose=0)
    assert pred.shape == (5, 2)


@pytest.mark.real_data
def test_real_mammograms_at_full_size(real_mammogram_dir, tmp_path):
    """Four real 16-bit 3328x2560 views -> 1152x896: 2017 values exactly, 2.06 MB cached each."""
    for k, src in enumerate(sorted(real_mammogram_dir.glob("*.png"))):
        dst = tmp_path / ("pos" if k % 2 else "neg") / src.name
        dst.parent.mkdir(exist_ok=True)
        dst.symlink_to(src)
    gen = DMImageDataGenerator(featurewise_center=True)
    gen.mean = 52.16
    it = gen.flow_from_directory(str(tmp_path), target_size=(1152, 896), rescale_factor=RESCALE,
                                 dup_3_channels=True, batch_size=2, shuffle=False)
    x, _ = it[0]
    for k in range(2):
        img = read_resize_img(str(tmp_path / it.filenames[k]), target_size=(1152, 896),
                              rescale_factor=RESCALE)
        np.testing.assert_array_equal(x[k], np.repeat(img[..., None], 3, axis=2)
                                      - np.float32(52.16))
    X, _ = load_dat_ram(it, nb_samples=2)
    assert X.dtype == np.uint16 and X.nbytes / len(X) <= 2.1e6


def test_disk_cache_same_batches_and_skips_decoding(img_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    gen = DMImageDataGenerator(featurewise_center=True, **AUG)
    plain = [b for b in _iterator(img_dir, gen, shuffle=True)]
    cached_it = _iterator(img_dir, gen, shuffle=True, cache_dir=cache)
    first = [cached_it[i] for i in range(len(cached_it))]
    assert len(list(cache.glob("*.npy"))) == 5 and not list(cache.glob("*.tmp"))
    # second pass: every image comes from the cache, nothing is decoded
    calls = []
    monkeypatch.setattr(dm_image, "read_image",
                        lambda *a, **k: calls.append(a) or pytest.fail("decoded again"))
    second = [cached_it[i] for i in range(len(cached_it))]
    assert calls == []
    for a, b, c in zip(plain, first, second):
        for u, v, w in zip(a, b, c):
            np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(u, w)
    X, _ = load_dat_ram(cached_it)  # the RAM loader reads through the cache too
    assert X.dtype == np.uint16 and X.shape == (5,) + SIZE


def test_cached_read_equals_reference_and_invalidates(img_dir, tmp_path):
    path = img_dir / "pos" / "y.png"
    cache = tmp_path / "c"
    ref = read_resize_img(str(path), target_size=SIZE)
    got = dm_image.cached_read(path, cache, SIZE)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got.astype(np.float32), ref)
    np.testing.assert_array_equal(dm_image.cached_read(path, cache, SIZE), got)
    # another size is another entry; a rewritten image is read again
    assert dm_image.cached_read(path, cache, (32, 24)).shape == (32, 24)
    assert len(list(cache.glob("*.npy"))) == 2
    new = np.full((80, 60), 1234, np.uint16)
    cv2.imwrite(str(path), new)
    import os
    os.utime(path, ns=(1, 10 ** 18))  # a new mtime even on coarse file systems
    np.testing.assert_array_equal(dm_image.cached_read(path, cache, SIZE),
                                  np.full(SIZE, 1234, np.uint16))
    # a damaged entry is decoded again and repaired
    for f in cache.glob("*.npy"):
        f.write_bytes(b"garbage")
    np.testing.assert_array_equal(dm_image.cached_read(path, cache, SIZE),
                                  np.full(SIZE, 1234, np.uint16))
    with pytest.raises(dm_image.ImageReadError, match="nope.png"):
        dm_image.cached_read(tmp_path / "nope.png", cache, SIZE)


def test_cache_that_cannot_be_written_is_skipped(img_dir, tmp_path, caplog,
                                                 fresh_dm_image_warnings):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="dm_image"):
        img = dm_image.cached_read(img_dir / "pos" / "y.png", blocker / "sub", SIZE)
    assert img.shape == SIZE and "cannot be written" in caplog.text


@pytest.mark.parametrize("rescale", [RESCALE, None])
def test_equalisation_same_in_training_and_prediction(img_dir, rescale):
    """16-bit images without a rescale factor too: the generator (disk and RAM) and
    read_img_for_pred equalise with one rule (dm_image.hist_equalize)."""
    gen = DMImageDataGenerator()
    it = gen.flow_from_directory(str(img_dir), target_size=SIZE, rescale_factor=rescale,
                                 equalize_hist=True, batch_size=5, shuffle=False)
    x, _ = it[0]
    X, y = load_dat_ram(it)
    x_ram, _ = gen.flow(X, y, batch_size=5, shuffle=False, **it.ram_flow_kwargs())[0]
    np.testing.assert_array_equal(x, x_ram)
    for k, name in enumerate(it.filenames):
        pred = dm_image.read_img_for_pred(img_dir / name, equalize_hist=True, target_size=SIZE,
                                          rescale_factor=rescale, dup_3_channels=False)
        np.testing.assert_array_equal(x[k], pred)
        assert 0 <= pred.min() and pred.max() == 255  # equalised, not saturated


def test_mixed_bit_depth_is_reported_not_used_silently(img_dir, caplog):
    """An 8-bit file among 16-bit ones under the 16-bit factor would reach 1/257 of the scale."""
    eight = (np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) % 200 + 30).astype(np.uint8)
    cv2.imwrite(str(img_dir / "pos" / "x8.png"), eight)
    it = _iterator(img_dir, batch_size=6)
    with caplog.at_level(logging.WARNING, logger="dm_image"):
        it[0]
        it[0]
    assert it.scale_mismatch_files == ["pos/x8.png"]
    warned = [r.getMessage() for r in caplog.records if "x8.png" in r.getMessage()]
    assert len(warned) == 1 and "8-bit image under a 16-bit factor" in warned[0]
    # the same folder with the 8-bit factor flags the 16-bit images instead
    it8 = _iterator(img_dir, batch_size=6, rescale_factor=1.0)
    it8[0]
    assert sorted(it8.scale_mismatch_files) == sorted(f for f in it8.filenames if f != "pos/x8.png")
    # target_scale maps every image's maximum itself: nothing to report
    it_ts = _iterator(img_dir, batch_size=6, target_scale=255.0, rescale_factor=None)
    it_ts[0]
    assert it_ts.scale_mismatch_files == []


def test_intensity_scale_problem_rule():
    assert dm_image.intensity_scale_problem(65535, 255 / 65535) is None
    assert dm_image.intensity_scale_problem(4000, 255 / 65535) is None   # a dark 16-bit image
    assert "8-bit image" in dm_image.intensity_scale_problem(255, 255 / 65535)
    assert "16-bit image" in dm_image.intensity_scale_problem(40000, 1.0)
    assert dm_image.intensity_scale_problem(255, 1.0) is None
    assert dm_image.intensity_scale_problem(255, 255 / 65535, target_scale=255.0) is None
    assert dm_image.intensity_scale_problem(0, 255 / 65535) is None      # a blank image
