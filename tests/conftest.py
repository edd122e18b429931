"""Shared test fixtures: paths, the optional ../shared folder, RNG seeding, Keras sessions."""
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
for p in (str(REPO_ROOT), str(REPO_ROOT / "ddsm_train")):
    if p not in sys.path:
        sys.path.insert(0, p)


def huge_png_bytes(width=200_000, height=200_000):
    """A small PNG whose header declares ``width`` x ``height`` 16-bit pixels (a decoder bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _shared_path(*parts):
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not part of the repository)")
    return path


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def real_mammogram_dir():
    """``../shared/data/real_mammograms``: four 16-bit 3328x2560 CC views; skips when absent."""
    return _shared_path("data", "real_mammograms")


@pytest.fixture(scope="session")
def cbis_csv_dir():
    """``../shared/data/cbis_ddsm_csv``: the four official CBIS-DDSM description CSVs."""
    return _shared_path("data", "cbis_ddsm_csv")


@pytest.fixture(scope="session")
def keras208_dir():
    """``../shared/fixtures/keras208``: model files written by Keras 2.0.8 with their outputs."""
    return _shared_path("fixtures", "keras208")


@pytest.fixture(autouse=True)
def _seed_rngs():
    """Seed Python and NumPy RNGs for every test and restore their state afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(12345)
    np.random.seed(12345)
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)


@pytest.fixture
def keras_session():
    """A clean tf-keras session, cleared again after the test."""
    import tf_keras as keras

    keras.backend.clear_session()
    yield keras
    keras.backend.clear_session()


@pytest.fixture
def fresh_dm_image_warnings(monkeypatch):
    """An empty set of already-given ``dm_image`` once-only warnings for this test (restored
    afterwards), so that a warning given by an earlier test is given again."""
    import dm_image

    monkeypatch.setattr(dm_image, "_WARNED", set())


# ----------------------------------------------------------------------------------------------
# Plain helpers shared by several test modules (``from conftest import ...``)
# ----------------------------------------------------------------------------------------------
def imwrite(path, img):
    """Write ``img`` with OpenCV to ``path``, creating its folders; fail if OpenCV cannot."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), f"cv2.imwrite could not write {path}"


def write_class_split(root, classes, counts, hw, rng, contrast=15000):
    """16-bit PNG class folders ``root/SPLIT/CLASS/CLASS_NN.png`` (``counts``: {split: n}):
    noise around 13000; class k > 0 gets an 8x8 square ``contrast * k`` brighter somewhere."""
    for split, n in counts.items():
        for ci, cls in enumerate(classes):
            folder = Path(root) / split / cls
            for i in range(n):
                img = rng.normal(13000, 2500, hw)
                if ci:                                 # a bright square marks lesion classes
                    r, c = rng.integers(2, hw[0] - 10), rng.integers(2, hw[1] - 10)
                    img[r:r + 8, c:c + 8] += contrast * ci
                imwrite(folder / f"{cls}_{i:02d}.png", img.clip(0, 65535).astype(np.uint16))


def write_spot_image(path, hw, bright, seed):
    """A 16-bit noise image (levels 2000..12000) of ``hw`` pixels at ``path``; ``bright``: with
    a 20x20 square at 60000 (rows 20..39, columns 10..29)."""
    img = np.random.default_rng(seed).integers(2000, 12000, size=hw).astype(np.uint16)
    if bright:
        img[20:40, 10:30] = 60000
    imwrite(path, img)


def write_scoring_classes(root, nb_per_class, hw):
    """Class folders ``root/neg/nK.png`` (plain noise) and ``root/pos/pK.png`` (with the bright
    square of :func:`write_spot_image`), ``nb_per_class`` each, and an unreadable
    ``root/pos/broken.png``; returns ``root``."""
    root = Path(root)
    for k in range(nb_per_class):
        write_spot_image(root / "neg" / f"n{k}.png", hw, False, k)
        write_spot_image(root / "pos" / f"p{k}.png", hw, True, 10 + k)
    (root / "pos" / "broken.png").write_bytes(b"not a png at all")
    return root


def split_dirs(root, kind):
    """The train, val and test folders of ``root/kind`` as strings (trainer positionals)."""
    return [str(Path(root) / kind / s) for s in ("train", "val", "test")]


def tiny_vgg_patch_net(keras, name=None, seed=1):
    """A tiny VGG-like 3-class patch net with the 2017 layer names the trainers look for:
    2 x (block{b}_conv1, block{b}_pool), avg_pool, top_dropout (0), predictions."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 3))
    x = inp
    for b, filters in enumerate((4, 8), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"block{b}_conv1")(x)
        x = keras.layers.MaxPooling2D(name=f"block{b}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.0, name="top_dropout")(x)
    out = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name=name)


def randomise_bn(model, seed=1):
    """Non-trivial BatchNormalization weights and statistics (inference is not identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.__class__.__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(.5, 1.5, g.shape), rng.normal(0, .1, b.shape),
                               rng.normal(0, .1, m.shape), rng.uniform(.5, 1.5, v.shape)])


def tiny_patch_net(keras, input_shape=(None, None, 3), nb_class=3, seed=0):
    """2017-fixture-shaped patch net: 2 x (conv-BN-relu-pool), GAP, dropout, softmax dense."""
    layers = keras.layers
    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape)
    x = inp
    for b, f in ((1, 8), (2, 16)):
        x = layers.Conv2D(f, 3, padding="same", name=f"block{b}_conv1")(x)
        x = layers.BatchNormalization(name=f"block{b}_bn")(x)
        x = layers.Activation("relu", name=f"block{b}_relu")(x)
        x = layers.MaxPooling2D(name=f"block{b}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(0.5, name="top_dropout")(x)
    x = layers.Dense(nb_class, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, x, name="tiny_patch")
    randomise_bn(model)
    return model


# (options, input shape, params, layers) of the Keras 2.0.8 conversions of ``tiny_patch_net``
# by add_top_layers, as recorded with the 2017 code in ../shared/fixtures/keras208/expected.json.
KERAS208_TINY = {
    "resnet_top": (dict(block_type="resnet", depths=[16, 16], repetitions=[1, 1],
                        bottleneck_enlarge_factor=2), (None, None, 3), 10450, 35),
    "vgg_top": (dict(block_type="vgg", depths=[16], repetitions=[1]), (None, None, 3), 3906, 10),
    "fixed_patch_input": (dict(block_type="resnet", depths=[16], repetitions=[1],
                               bottleneck_enlarge_factor=2), (32, 32, 3), 5618, 20),
}


def tiny_gap_net(nb_class=3, dropout=0.0, weight_decay=0.0, name="patch"):
    """8x8x1 input "inp" -> c1 -> c2 -> gap -> drop -> fc (softmax); stage 2 starts at c2."""
    import tf_keras as keras

    reg = keras.regularizers.L2(weight_decay) if weight_decay else None
    inp = keras.Input((8, 8, 1), name="inp")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="drop")(x)
    out = keras.layers.Dense(nb_class, activation="softmax", kernel_regularizer=reg, name="fc")(x)
    return keras.Model(inp, out, name=name)


def class_shift_data(n=24, nb_class=3, seed=0):
    """``n`` 8x8x1 normal images whose mean rises 0.5 per class, and one-hot labels."""
    import tf_keras as keras

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % nb_class
    X = rng.normal(size=(n, 8, 8, 1)).astype("float32") + labels[:, None, None, None] * 0.5
    return X, keras.utils.to_categorical(labels, nb_class)
