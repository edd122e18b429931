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
