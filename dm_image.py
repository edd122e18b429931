"""Mammogram images: files, breast geometry, the input recipe, augmentation and generators.

Part of the reimplementation of the all-convolutional whole-mammogram classifier of
Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

The sections follow the data: image files are read, resized and written (I/O); the breast is
segmented and cut into crops and patches (geometry); intensities are brought to the scale a
model was trained on (intensity, with :class:`InputRecipe`, the one description of how a stored
image becomes model input); training images are augmented (augmentation), standardised
(:class:`DMImageDataGenerator`) and batched (the iterators, with RAM and disk caches); trained
models are applied to whole images (prediction).

Pixel scales: images are read in their stored dtype (uint16 0..65535 for 16-bit PNG and DICOM,
uint8 0..255 for 8-bit files), resized, converted to float32, optionally scaled so that their
maximum becomes ``img_scale`` (``target_scale`` in the 2017 names), then multiplied by
``rescale_factor`` (255/65535 = 0.003891 brings 16-bit images to 0..255) before histogram
equalisation and featurewise centring.

Importing this module does not load TensorFlow (the patch sampler and the CBIS-DDSM
preparation, and their worker processes, use only the image functions): the iterator classes,
which are ``tf_keras.utils.Sequence`` subclasses, are created on first use, and a recipe's
backbone preprocessing function is looked up only when it is applied.
"""
import collections.abc
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = [
    # I/O
    "ImageReadError", "IMG_EXTENSIONS", "read_image", "read_resize_stored", "read_resize_img",
    "MIN_IMAGE_SIDE", "image_content_problem",
    "atomic_write", "remove_atomic_leftovers", "process_alive", "write_png", "list_images",
    "list_class_images", "progress", "report_progress", "parse_progress", "PROGRESS_ENV",
    # geometry
    "segment_breast", "crop_img", "add_img_margins", "sweep_img_patches", "get_roi_patches",
    "kmeans", "clust_kpts",
    # intensity
    "hist_equalize", "intensity_scale_problem", "sample_max_level", "levels_scale_advice",
    "InputRecipe", "RECIPE_ATTR", "read_file_attr",
    # augmentation
    "keras20_transform_matrix", "fused_warp_matrix",
    # generator, labels and iterators
    "DMImageDataGenerator", "to_sparse", "index_balancer", "batch_balance_weights",
    "DMDirectoryIterator", "DMNumpyArrayIterator",  # noqa: F822  (made by __getattr__)
    # caches
    "cached_read", "load_dat_ram",
    # prediction
    "read_img_for_pred", "get_prob_heatmap",
    # 2017 compatibility
    "DMImagePreprocessor",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: File name extensions read as images everywhere (folders, lists, class subfolders).
IMG_EXTENSIONS = ("png", "jpg", "jpeg", "pgm", "tif", "tiff", "dcm", "dicom")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_U16_MAX = 65535
_CLASS_MODES = ("categorical", "binary", "sparse", None)
_DATA_FORMATS = ("channels_last", "channels_first")
_BORDER_MODES = {"nearest": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT,
                 "reflect": cv2.BORDER_REFLECT, "wrap": cv2.BORDER_WRAP}

_WARNED = set()


def _warn_once(message: str) -> None:
    """``logger.warning(message)`` the first time this exact message comes up."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def _positive_int(name: str, value) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an integer > 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value <= 0:
        raise ValueError(f"{name} should be a positive integer, got {value!r}")
    return int(value)


def _positive(name: str, value) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a number > 0."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or not value > 0:
        raise ValueError(f"{name} should be > 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# Image files: reading and resizing in the file's own levels (uint16 / uint8), writing
# atomically, listing folders; a progress display.
# ----------------------------------------------------------------------------------------------


class ImageReadError(OSError):
    """A mammogram or mask file could not be read as an image.

    Raised for a missing, empty, truncated, non-image or otherwise undecodable file, and for a
    DICOM file whose pixel data cannot be decoded. The message names the file and the reason;
    ``filename`` holds the path. (OpenCV's ``imread`` returns ``None`` silently in all these
    cases; the 2017 code then failed later with an ``AttributeError``.)
    """

    def __init__(self, fname: PathLike, reason: str):
        super().__init__(f"cannot read image {os.fspath(fname)!r}: {reason}")
        self.filename = os.fspath(fname)
        self.reason = reason

    def __str__(self) -> str:  # OSError would print "[Errno None] None: <filename>"
        return f"cannot read image {self.filename!r}: {self.reason}"

    def __reduce__(self):  # picklable across loader worker processes
        return type(self), (self.filename, self.reason)


def _is_dicom(path: Path) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file with the DICOM ``DICM`` preamble marker."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _jpeg_is_truncated(path: Path) -> bool:
    """True for a JPEG file (FFD8 start) with no end-of-image marker (FFD9) in its last 1 KiB.

    OpenCV decodes such a file without error, filling the missing part with grey.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return False
        fh.seek(max(0, path.stat().st_size - 1024))
        return b"\xff\xd9" not in fh.read()


def _dicom_output_range(ds, raw: np.ndarray, bits: int) -> Tuple[float, float]:
    """The (low, high) value range of a DICOM image after its Modality and VOI transforms.

    VOI LUT sequence: 0..2**bits - 1 (bits from its LUT descriptor). Window centre/width: the
    range pydicom's windowing maps onto (found by windowing -inf and +inf). Neither: the
    Modality LUT output range, i.e. the stored range 0..2**BitsStored - 1 (signed when
    PixelRepresentation is 1) passed through the rescale slope/intercept or the Modality LUT.
    """
    from pydicom.pixels import apply_modality_lut, apply_windowing

    voi = ds.VOILUTSequence[0] if ds.get("VOILUTSequence") else None
    if voi is not None and None not in (voi.get("LUTDescriptor"), voi.get("LUTData")):
        return 0.0, float(2 ** int(voi.LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        with np.errstate(over="ignore"):
            ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
        return float(ends[0]), float(ends[1])
    if int(ds.get("PixelRepresentation", 0)) == 1:
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=raw.dtype)
    else:
        ends = np.array([0, 2 ** bits - 1], dtype=raw.dtype)
    ends = np.asarray(apply_modality_lut(ends, ds), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def _read_dicom(path: Path, gs_255: bool) -> np.ndarray:
    """Decode a greyscale DICOM image to uint16 0..65535 (or uint8 0..255 when ``gs_255``)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(str(path))
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for broken files
        raise ImageReadError(path, f"not a decodable DICOM image ({exc})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or raw.ndim != 2:
        raise ImageReadError(path, f"only single-frame greyscale DICOM is supported, got "
                                   f"{photometric} with pixel array shape {raw.shape}")
    bits = int(ds.get("BitsStored", raw.dtype.itemsize * 8))
    if int(ds.get("PixelRepresentation", 0)) == 0 and bits < raw.dtype.itemsize * 8:
        raw = raw & np.asarray(2 ** bits - 1, dtype=raw.dtype)  # drop unused high bits
    try:
        low, high = _dicom_output_range(ds, raw, bits)
        val = np.asarray(apply_voi_lut(apply_modality_lut(raw, ds), ds), dtype=np.float64)
    except (ValueError, AttributeError, IndexError, TypeError, NotImplementedError) as exc:
        raise ImageReadError(path, f"invalid DICOM modality/VOI LUT attributes ({exc})") \
            from exc
    unit = np.clip((val - low) / max(high - low, 1e-12), 0.0, 1.0)
    invert = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        invert = not invert
    if invert:
        unit = 1.0 - unit
    if gs_255:
        return np.rint(unit * 255).astype(np.uint8)
    return np.rint(unit * _U16_MAX).astype(np.uint16)


def _to_greyscale(img: np.ndarray, path: Path) -> np.ndarray:
    """Convert an OpenCV colour (BGR/BGRA) or grey+alpha image to one channel, same dtype."""
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    if img.ndim == 3 and img.shape[2] in (1, 2):
        return np.ascontiguousarray(img[:, :, 0])
    raise ImageReadError(path, f"unsupported image array shape {img.shape}")


def read_image(fname: PathLike, gs_255: bool = False) -> np.ndarray:
    """Read a mammogram or mask file into a 2-D array in the file's own dtype.

    PNG, JPEG, PGM, TIFF and other OpenCV formats are read unchanged (``IMREAD_UNCHANGED``: a
    16-bit PNG stays uint16 0..65535, an 8-bit file uint8 0..255); a colour file is converted
    to greyscale (OpenCV BGR->grey weights, same dtype). With ``gs_255`` the file is read by
    OpenCV as 8-bit greyscale (``IMREAD_GRAYSCALE``; 16-bit data is divided by 256), as used
    for ROI masks.

    DICOM (``.dcm``/``.dicom``, or any file with the ``DICM`` preamble marker) is decoded with
    pydicom: high bits beyond ``BitsStored`` are dropped (12-bit data in 16-bit containers), the
    Modality LUT (rescale slope/intercept) and then the VOI LUT or window centre/width are
    applied when present, and the output range of those transforms (the window, the VOI LUT's
    range, or else 0..2**BitsStored - 1 through the rescale) is mapped linearly onto 0..65535
    as uint16 (onto 0..255 as uint8 with ``gs_255``). MONOCHROME1 (and an INVERSE
    presentation LUT) is inverted so that dense tissue is bright, as in every other format.
    So the 16-bit rescale factor 255/65535 applies to DICOM as well.

    Args:
        fname: path of the image file.
        gs_255: read as 8-bit greyscale (uint8 0..255).

    Returns:
        Array of shape (height, width), dtype uint8 or uint16 (or the file's own dtype for
        other OpenCV formats).

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated or undecodable.
    """
    path = Path(fname)
    if not path.is_file():
        raise ImageReadError(path, "no such file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty")
    if _is_dicom(path):
        return _read_dicom(path, gs_255)
    if _jpeg_is_truncated(path):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    flag = cv2.IMREAD_GRAYSCALE if gs_255 else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imread(str(path), flag)
    except cv2.error as exc:   # e.g. a header declaring more pixels than OpenCV accepts
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        raise ImageReadError(path, f"OpenCV refused it ({reason})") from None
    except MemoryError:
        raise ImageReadError(path, "its declared size does not fit in memory") from None
    if img is None:
        raise ImageReadError(path, "OpenCV could not decode it (not an image, truncated or "
                                   "unsupported format)")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise ImageReadError(path, f"{int(np.size(img) - np.isfinite(img).sum())} pixel "
                                   f"value(s) are not finite (NaN or infinity)")
    return _to_greyscale(img, path)


#: Smallest height and width of an image that a classifier can score: the networks here
#: downsample by 16 to 32, so a smaller stored image holds less than one position of their
#: feature maps (scoring it would only score the resizing).
MIN_IMAGE_SIDE = 16


def image_content_problem(img: np.ndarray, min_side: int = MIN_IMAGE_SIDE) -> Optional[str]:
    """Why an image as read cannot give a score, or None.

    Args:
        img: (H, W) image as :func:`read_image` returns it (before any resizing).
        min_side: smallest height and width accepted.

    Returns:
        ``"constant image (every pixel is V)"``, ``"HxW image, smaller than ..."`` or None.
    """
    if min(img.shape[:2]) < min_side:
        return (f"{img.shape[0]}x{img.shape[1]} image, smaller than {min_side}x{min_side} "
                f"(less than one position of the networks' feature maps)")
    if img.size and img.min() == img.max():
        return f"constant image (every pixel is {img.flat[0]})"
    return None


def _resize_target(shape: Tuple[int, int], target_size, target_height) -> Tuple[int, int]:
    """(height, width) to resize to; width truncated to int when only the height is given."""
    if target_height is not None:
        height = _positive_int("target_height", target_height)
        width = int(float(height) / shape[0] * shape[1])
        if width <= 0:
            raise ValueError(f"target_height {height} gives width 0 for image shape {shape}")
        return height, width
    if len(target_size) != 2:
        raise ValueError(f"target_size should be (height, width), got {target_size!r}")
    return (_positive_int("target_size[0]", target_size[0]),
            _positive_int("target_size[1]", target_size[1]))


def read_resize_stored(fname: PathLike, target_size: Optional[Sequence[int]] = None,
                       target_height: Optional[int] = None, gs_255: bool = False,
                       scorable: bool = False) -> np.ndarray:
    """The first steps of :func:`read_resize_img`, in the file's own dtype: read and resize.

    ``read_resize_img(f, size)`` equals ``read_resize_stored(f, size).astype(np.float32)``
    (then scaled); this form skips the float32 copy where integer levels are wanted (patch
    sampling, the image caches): uint16 for 16-bit files, uint8 for 8-bit files and masks.

    Args:
        fname, target_size, target_height, gs_255: as in :func:`read_resize_img`.
        scorable: refuse an image that cannot give a score (:func:`image_content_problem`:
            constant, or smaller than :data:`MIN_IMAGE_SIDE`), checked before resizing.

    Returns:
        (height, width) array in the dtype of :func:`read_image`'s result.

    Raises:
        ImageReadError: unreadable, or not scorable with ``scorable``.
    """
    if (target_size is None) == (target_height is None):
        raise ValueError("exactly one of target_size=(height, width) and target_height is "
                         f"required, got target_size={target_size!r}, "
                         f"target_height={target_height!r}")
    img = read_image(fname, gs_255=gs_255)
    problem = image_content_problem(img) if scorable else None
    if problem is not None:
        raise ImageReadError(fname, problem)
    height, width = _resize_target(img.shape, target_size, target_height)
    if (height, width) != img.shape:
        img = cv2.resize(img, dsize=(width, height), interpolation=cv2.INTER_CUBIC)
    return img


def read_resize_img(fname: PathLike, target_size: Optional[Sequence[int]] = None,
                    target_height: Optional[int] = None, target_scale: Optional[float] = None,
                    gs_255: bool = False, rescale_factor: Optional[float] = None) -> np.ndarray:
    """Read an image, resize it and scale its intensities (numerically as the 2017 code).

    Steps: :func:`read_image` (stored dtype, or uint8 with ``gs_255``); resize with OpenCV
    bicubic interpolation in that dtype when the target differs from the image's shape (so
    cubic overshoot saturates at 0 and 65535/255); convert to float32; if ``target_scale``
    is given multiply by ``target_scale / img.max()`` (factor 1 for an all-zero image); then
    multiply by ``rescale_factor`` if given (255/65535 = 0.003891 brings 16-bit PNG/DICOM to
    0..255).

    Args:
        fname: image file (PNG, JPEG, PGM, TIFF, DICOM; see :func:`read_image`).
        target_size: (height, width) to resize to. Exactly one of ``target_size`` and
            ``target_height`` is required.
        target_height: height to resize to, keeping the aspect ratio; the width is
            ``int(target_height / height * width)`` (truncated).
        target_scale: if given, the image maximum is mapped to this value.
        gs_255: read as 8-bit greyscale (masks).
        rescale_factor: if given (> 0), multiply intensities by it after ``target_scale``.

    Returns:
        float32 array of shape (height, width); intensity scale is the file's (0..65535 or
        0..255) times the requested factors.

    Raises:
        ValueError: bad size/scale arguments.
        ImageReadError: the file cannot be read as an image.
    """
    if target_scale is not None:
        _positive("target_scale", target_scale)
    if rescale_factor is not None:
        _positive("rescale_factor", rescale_factor)
    stored = read_resize_stored(  # checks target_size / target_height before reading
        fname, target_size, target_height, gs_255)
    return _scale_stored(stored, target_scale, rescale_factor)


def _encode_png(img: np.ndarray, params: Sequence[int]):
    """``cv2.imencode(".png", img, params)``: (ok, buffer), OpenCV's default filter and zlib
    level unless ``params`` say otherwise. A function of its own so that the PNG-encoder
    benchmark (tests/benchmarks) can time the patch sampler with another encoder in its place.
    """
    return cv2.imencode(".png", img, list(params))


_UMASK_LOCK = threading.Lock()


def _current_umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable, *, text: bool = False,
                 to_path: bool = False, durable: bool = False) -> Path:
    """Write ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    Every file the project writes goes through here, so a crash, a kill or a full disk never
    leaves a half-written file under the final name, and an older file of that name survives a
    failed write. The temporary name is unpredictable and created exclusively (``O_EXCL``, via
    :func:`tempfile.mkstemp`), so a link planted in the folder is never followed; it is removed
    when writing fails; one left by a killed process (``.NAME.ddsmPID.XXXXXXXX.tmp``, PID its
    process) is removed by :func:`remove_atomic_leftovers`. The result gets the permissions of
    a normally created file (``0o666`` less the umask), not the temporary file's ``0o600``.

    Args:
        path: destination; missing parent folders are created.
        write: ``write(fileobj)``, or ``write(tmp_path)`` with ``to_path`` (for writers that
            open the file themselves, such as HDF5).
        text: open the temporary file in text mode (UTF-8, ``\n`` line ends).
        to_path: pass the temporary file's path instead of an open file.
        durable: flush the temporary file to the disk (``fsync``) before the rename, so that a
            write error the disk reports only then (a full disk) leaves the older file, and a
            power loss right after never leaves an empty file under the final name (model
            files).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{ATOMIC_TMP_MARK}{os.getpid()}.",
                               suffix=".tmp", dir=path.parent)
    try:
        if to_path:
            os.close(fd)
            write(tmp)
        else:
            mode = "w" if text else "wb"
            kwargs = {"encoding": "utf-8", "newline": "\n"} if text else {}
            with os.fdopen(fd, mode, **kwargs) as fh:
                write(fh)
        if durable:
            _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _fsync_file(path: PathLike) -> None:
    """Flush ``path`` to the disk; an error there (a full disk) is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: Marker in the temporary names of :func:`atomic_write`, followed by the writer's process id.
ATOMIC_TMP_MARK = "ddsm"
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\." + ATOMIC_TMP_MARK + r"(?P<pid>\d+)\.[^.]+\.tmp$")


def process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def remove_atomic_leftovers(folder: PathLike, name: Optional[str] = None) -> List[Path]:
    """Remove the temporary files that killed :func:`atomic_write` calls left in ``folder``.

    Only names of the form ``.NAME.ddsmPID.XXXXXXXX.tmp`` whose process ``PID`` is no longer
    running are removed (a write in progress, or any other file, is never touched).

    Args:
        folder: the folder of the files written.
        name: only leftovers of this file name (None: of any file).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _ATOMIC_TMP.match(entry.name)
            if (match is None or (name is not None and match["name"] != name)
                    or not entry.is_file(follow_symlinks=False)
                    or process_alive(int(match["pid"]))):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
            logger.info("removed %s, left by an interrupted write", entry.path)
    return removed


def write_png(path: PathLike, img: np.ndarray, bilevel: bool = False) -> None:
    """Write a PNG atomically (:func:`atomic_write`): encoded in memory, then written.

    A crash or a full disk never leaves a truncated PNG under the final name (a reader would
    otherwise meet a file that fails to decode).

    Args:
        path: destination file (its folder must exist).
        img: (H, W) uint8/uint16 or (H, W, 3) uint8 BGR image, stored as is (16-bit stays 16-bit).
        bilevel: store a 0/255 uint8 mask as a 1-bit PNG (OpenCV reads it back as the same
            0/255 uint8 array, about 2.5x faster than an 8-bit PNG of a full-size mask).

    Raises:
        ValueError: ``bilevel`` with an image that is not uint8 0/255.
        OSError: the image cannot be encoded or the file cannot be written.
    """
    path = Path(path)
    params = []
    if bilevel:
        if img.dtype != np.uint8 or img.ndim != 2 or np.any((img != 0) & (img != 255)):
            raise ValueError(f"a bilevel PNG ({path}) needs a 2-D uint8 0/255 mask, got "
                             f"{img.dtype} {img.shape}")
        params = [cv2.IMWRITE_PNG_BILEVEL, 1]
    try:
        ok, buf = _encode_png(img, params)
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"could not encode a PNG for {path} (array {img.dtype} {img.shape})")
    atomic_write(path, lambda fh: fh.write(buf))


def _has_image_ext(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMG_EXTENSIONS if "." in name else False


def _walk_images(folder, relative_to, follow_links) -> List[str]:
    """Image files under ``folder``, sorted folder by folder, relative to ``relative_to``."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=follow_links):
        dirs.sort()
        rel = os.path.relpath(root, relative_to)
        found.extend(os.path.join(rel, f) for f in sorted(files) if _has_image_ext(f))
    return found


def list_images(directory: PathLike, follow_links: bool = False) -> List[str]:
    """Every image file under ``directory`` (recursively), as sorted relative paths.

    Image files are those with an extension in :data:`IMG_EXTENSIONS` (any case); folders and
    file names are sorted, so the order is the same on every machine.

    Raises:
        ValueError: the folder does not exist or holds no image.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"image folder {directory!r} does not exist or is not a folder")
    found = [os.path.normpath(f) for f in _walk_images(directory, directory, follow_links)]
    if not found:
        raise ValueError(f"no images (extensions {', '.join(IMG_EXTENSIONS)}) found in "
                         f"{directory!r}")
    return found


def list_class_images(directory: PathLike, classes: Optional[Sequence[str]] = None,
                      follow_links: bool = False) -> Tuple[List[str], List[str], np.ndarray]:
    """List the images of a folder with one subfolder per class, in a deterministic order.

    Args:
        directory: folder holding one subfolder per class (e.g. ``neg/``, ``pos/``).
        classes: class names in label order; default: the subfolder names, sorted.
        follow_links: follow symbolic links to folders.

    Returns:
        (class_names, filenames, labels): ``filenames`` are paths relative to ``directory``,
        class by class, each class's files found recursively with folders and file names
        sorted; ``labels`` is an int64 array of class indices.

    Raises:
        ValueError: the folder does not exist, a given class has no subfolder, or no image
            with an accepted extension (png, jpg, jpeg, pgm, tif, tiff, dcm) is found.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"image folder {directory!r} does not exist or is not a folder")
    if classes is None:
        classes = sorted(d for d in os.listdir(directory)
                         if os.path.isdir(os.path.join(directory, d)))
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names should be unique, got {classes}")
    filenames, labels = [], []
    for label, name in enumerate(classes):
        sub = os.path.join(directory, name)
        if not os.path.isdir(sub):
            raise ValueError(f"class {name!r} has no subfolder: {sub!r} does not exist")
        found = _walk_images(sub, directory, follow_links)
        if not found:
            logger.warning("class %r has no images in %s", name, sub)
        filenames.extend(found)
        labels.extend([label] * len(found))
    if not filenames:
        raise ValueError(f"no images (extensions {', '.join(IMG_EXTENSIONS)}) found in class "
                         f"subfolders {classes} of {directory!r}")
    return classes, filenames, np.asarray(labels, dtype=np.int64)


class _LineProgress:
    """Progress for a log file: one ``logger.info`` line every ``every`` items and at the end."""

    def __init__(self, total: Optional[int], desc: str, unit: str, every: int):
        self.total, self.desc, self.unit, self.every = total, desc, unit, max(1, int(every))
        self.n, self._next, self._t0 = 0, self.every, time.perf_counter()
        self._quiet = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next and not self._quiet and (self.total is None
                                                          or self.n < self.total):
            self._line()
            self._next = (self.n // self.every + 1) * self.every

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        logger.info("%s: %d%s %s (%.0f s)", self.desc, self.n, of, self.unit,
                    time.perf_counter() - self._t0)

    def close(self) -> None:
        if self.n and not self._quiet:
            self._line()

    def _silent(self) -> "_LineProgress":
        self._quiet = True
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Set to 1 (``run_pipeline.py`` does) to have the tools print machine-readable progress lines
#: on stdout, ``PROGRESS task=scoring n=40 of=120 unit=img`` (see :func:`report_progress`).
PROGRESS_ENV = "DM_PROGRESS"
PROGRESS_PREFIX = "PROGRESS "
#: Seconds between two progress lines of a loop (its last item always has one).
PROGRESS_EVERY_S = 2.0


def report_progress(task: str, n: int, of: Optional[int], **values: Any) -> None:
    """Print ``PROGRESS task=TASK n=N of=OF key=value ...`` on stdout when the environment
    variable ``DM_PROGRESS`` is 1, else nothing. Floats are printed with 4 significant
    digits; None values are left out; text is URL-quoted (a space is ``%20``)."""
    from urllib.parse import quote

    if os.environ.get(PROGRESS_ENV) != "1":
        return
    fields = {"task": task, "n": int(n), "of": "?" if of is None else int(of), **values}
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={quote(str(v))}"
                    for k, v in fields.items() if v is not None)
    print(PROGRESS_PREFIX + text, flush=True)


def parse_progress(line: str) -> Optional[dict]:
    """The fields of a :func:`report_progress` line as strings, or None for any other line."""
    from urllib.parse import unquote

    if not line.startswith(PROGRESS_PREFIX):
        return None
    fields = {k: unquote(v) for k, _, v in (part.partition("=") for part in
                                             line[len(PROGRESS_PREFIX):].split()) if v}
    return fields if "task" in fields and "n" in fields else None


class _ReportedProgress:
    """A progress display that also reports its count (:func:`report_progress`), at most
    every ``PROGRESS_EVERY_S`` seconds and at its last item."""

    def __init__(self, bar: Any, total: Optional[int], desc: str, unit: str):
        self.bar, self.total, self.desc, self.unit = bar, total, desc, unit
        self.n, self._sent, self._last = 0, 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.n += n
        if (time.monotonic() - self._last >= PROGRESS_EVERY_S
                or (self.total is not None and self.n >= self.total)):
            self._send()

    def _send(self) -> None:
        if self.n != self._sent:
            report_progress(self.desc, self.n, self.total, unit=self.unit)
            self._sent, self._last = self.n, time.monotonic()

    def close(self) -> None:
        self.bar.close()
        self._send()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: Optional[int], desc: str, unit: str = "img", verbose: bool = True,
             every: Optional[int] = None) -> Any:
    """A progress display for a loop of ``total`` items: ``with progress(...) as bar: bar.update()``.

    On a terminal it is a tqdm bar (on stderr); when stderr is a file or a pipe (a batch job's
    log) it is a line every ``every`` items (default: a tenth of ``total``) through logging, so
    logs stay readable; with ``verbose`` False it shows nothing. With ``DM_PROGRESS=1`` in the
    environment the count is also printed as ``PROGRESS`` lines (:func:`report_progress`),
    ``verbose`` or not.
    """
    if not verbose:
        bar = _LineProgress(total, desc, unit, every=1 << 62)._silent()
    elif sys.stderr is not None and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit)
    else:
        bar = _LineProgress(total, desc, unit, every or max(1, (total or 100) // 10))
    if os.environ.get(PROGRESS_ENV) == "1":
        return _ReportedProgress(bar, total, desc, unit)
    return bar


# ----------------------------------------------------------------------------------------------
# Geometry: breast segmentation, crops and margins, patch sweeps, keypoint patches and their
# k-means clusters.
# ----------------------------------------------------------------------------------------------


def _levels_8bit(values: np.ndarray, img_max: float) -> np.ndarray:
    """``uint8(clip(values / img_max * 255))`` computed in float32 (the 2017 8-bit view)."""
    scaled = values.astype(np.float32)
    scaled /= img_max
    scaled *= 255
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def _above_level(img: np.ndarray, img_max: float, level: int) -> np.ndarray:
    """uint8 image, nonzero where the 8-bit level of ``img`` (see _levels_8bit) exceeds ``level``.

    For uint8/uint16 images the 8-bit level is a non-decreasing function of the stored
    level, so the first stored level above the threshold is found once, with the same float32
    arithmetic on 0..max, and the image is compared with it as integers (no float copy).
    """
    if img.dtype in (np.uint8, np.uint16):
        above = np.flatnonzero(_levels_8bit(np.arange(int(img_max) + 1), img_max) > level)
        if above.size == 0:
            return np.zeros(img.shape, np.uint8)
        return cv2.compare(img, int(above[0]), cv2.CMP_GE)
    return (_levels_8bit(img, img_max) > level).astype(np.uint8)


def _label_areas(binary: np.ndarray) -> Tuple[int, np.ndarray, np.ndarray]:
    """8-connected labels of ``binary``: (number of labels, labels, pixel count per label)."""
    try:  # 16-bit labels are half the memory traffic; OpenCV refuses past 65535 objects
        nb_lab, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8,
                                                                    ltype=cv2.CV_16U)
    except cv2.error:
        nb_lab, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8,
                                                                    ltype=cv2.CV_32S)
    return nb_lab, labels, stats[:, cv2.CC_STAT_AREA].astype(np.int64)


def _breast_mask(img: np.ndarray, low_int_threshold: float,
                 min_breast_fraction: float) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
    """Filled mask (uint8 0/255) of the largest bright object and its (x, y, w, h) box."""
    img_max = float(np.max(img))
    if not np.isfinite(img_max) or img_max <= 0:
        raise ValueError(f"cannot segment the breast: the image is all black (max {img_max})")
    # the 8-bit maximum is always 255 (img_max / img_max * 255)
    low_th = int(255 * low_int_threshold) if low_int_threshold < 1 else int(low_int_threshold)
    nb_lab, labels, areas = _label_areas(_above_level(img, img_max, low_th))
    if nb_lab < 2:
        raise ValueError(f"cannot segment the breast: no pixel above the threshold {low_th}/255")
    lab = 1 + int(np.argmax(areas[1:]))
    contours, _ = cv2.findContours(cv2.compare(labels, lab, cv2.CMP_EQ), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    mask = cv2.drawContours(np.zeros(img.shape, np.uint8), contours, -1, 255, cv2.FILLED)
    area = int(np.count_nonzero(mask))
    if area < min_breast_fraction * img.size:
        raise ValueError(f"cannot segment the breast: the largest bright object covers {area} "
                         f"pixels, less than {min_breast_fraction:.2%} of the image "
                         f"{img.shape}; no breast found")
    x, y, w, h = cv2.boundingRect(np.concatenate(contours))
    return mask, (int(x), int(y), int(w), int(h))


#: dtypes whose masked copy OpenCV makes (``cv2.bitwise_and`` with a mask), twice as fast as
#: ``np.where``.
_CV_MASKABLE = (np.uint8, np.uint16, np.int16, np.float32)


def segment_breast(img: np.ndarray, low_int_threshold: float = 0.05, crop: bool = True,
                   min_breast_fraction: float = 0.01
                   ) -> Tuple[np.ndarray, Tuple[int, int, int, int]]:
    """Segment the breast as the largest bright connected object of a mammogram.

    The image is brought to 8 bits by its maximum (``img / img.max() * 255``), thresholded at
    ``low_int_threshold`` of the 8-bit maximum (a value >= 1 is an absolute 8-bit threshold),
    and the largest 8-connected bright object is kept, with its holes filled (dark fat inside
    the skin line stays). Burned-in text labels and markers are separate, smaller objects and
    are zeroed. As in 2017 the box is that object's bounding box.

    Args:
        img: 2-D image (any real dtype and intensity scale).
        low_int_threshold: background threshold, fraction of the 8-bit max (or absolute if >= 1).
        crop: True: return the masked image cropped to the box (2017 behaviour). False: the
            full-size image with everything outside the breast mask set to 0.
        min_breast_fraction: the largest object must cover at least this fraction of the image.

    Returns:
        ``(img_out, (x, y, w, h))``: ``img_out`` has ``img``'s dtype and scale, shape (h, w)
        with ``crop`` else ``img.shape``; (x, y) is the top-left column and row of the box.

    Raises:
        ValueError: not a 2-D image, an all-black image, or no object large enough to be a
            breast (never an OpenCV error).
    """
    img = np.asarray(img)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"segment_breast expects a non-empty 2-D image, got shape {img.shape}")
    if not low_int_threshold > 0:
        raise ValueError(f"low_int_threshold should be > 0, got {low_int_threshold!r}")
    mask, (x, y, w, h) = _breast_mask(img, low_int_threshold, min_breast_fraction)
    if crop:
        img, mask = img[y:y + h, x:x + w], mask[y:y + h, x:x + w]
    if img.dtype in _CV_MASKABLE:
        return cv2.bitwise_and(img, img, mask=mask), (x, y, w, h)   # zero outside the mask
    return np.where(mask > 0, img, np.zeros((), img.dtype)), (x, y, w, h)


def crop_img(img: np.ndarray, bbox: Sequence[int]) -> np.ndarray:
    """Crop ``img[y:y+h, x:x+w]`` for ``bbox = (x, y, w, h)``.

    Args:
        img: array of shape (H, W) or (H, W, C), any dtype.
        bbox: (x, y, w, h) in pixels; must lie inside the image, w and h > 0.

    Returns:
        A view of shape (h, w) or (h, w, C), same dtype.

    Raises:
        ValueError: a malformed box or one that extends outside the image.
    """
    if len(bbox) != 4 or not all(isinstance(v, (int, np.integer)) for v in bbox):
        raise ValueError(f"bbox should be four integers (x, y, w, h), got {bbox!r}")
    x, y, w, h = (int(v) for v in bbox)
    if x < 0 or y < 0 or w <= 0 or h <= 0 or y + h > img.shape[0] or x + w > img.shape[1]:
        raise ValueError(f"bbox (x, y, w, h)={bbox!r} is empty or outside the image of shape "
                         f"{img.shape}")
    return img[y:y + h, x:x + w]


def add_img_margins(img: np.ndarray, margin: int) -> np.ndarray:
    """Add a zero margin of ``margin`` pixels on all four sides.

    Args:
        img: array of shape (H, W) or (H, W, C), any dtype.
        margin: margin width in pixels (>= 0; an integral float such as 128.0 is accepted).

    Returns:
        Array of shape (H + 2 * margin, W + 2 * margin[, C]), same dtype.
    """
    if not isinstance(margin, (int, float, np.integer, np.floating)) or margin < 0 \
            or int(margin) != margin:
        raise ValueError(f"margin should be a non-negative integer, got {margin!r}")
    m = int(margin)
    return np.pad(img, ((m, m), (m, m)) + ((0, 0),) * (img.ndim - 2), mode="constant")


def _nb_sweep_steps(extent: int, patch_size: int, stride: int) -> int:
    """2017 count of sweep positions: round((extent - patch) / stride + 0.49), half up, >= 1."""
    return max(1, int(np.floor((extent - patch_size) / stride + 0.49 + 0.5)))


def _sweep_grid(shape: Tuple[int, ...], patch_size: int, stride: int):
    """(nb_row, nb_col, y_gap, x_gap) of the centred 2017 sweep; validates the arguments."""
    patch_size = _positive_int("patch_size", patch_size)
    stride = _positive_int("stride", stride)
    if shape[0] < patch_size or shape[1] < patch_size:
        raise ValueError(f"image of shape {shape[:2]} is smaller than patch_size {patch_size}")
    nb_row = _nb_sweep_steps(shape[0], patch_size, stride)
    nb_col = _nb_sweep_steps(shape[1], patch_size, stride)
    y_gap = (shape[0] - patch_size - (nb_row - 1) * stride) // 2
    x_gap = (shape[1] - patch_size - (nb_col - 1) * stride) // 2
    return nb_row, nb_col, y_gap, x_gap


def sweep_img_patches(img: np.ndarray, patch_size: int, stride: int,
                      target_scale: Optional[float] = None,
                      equalize_hist: bool = False) -> Tuple[np.ndarray, int, int]:
    """Cut all ``patch_size`` x ``patch_size`` windows of a centred sweep at ``stride``.

    As in 2017, ``nb_row = round((H - patch_size) / stride + 0.49)`` (Python 2 rounding, i.e.
    the ceiling unless the fraction is below 0.01), likewise ``nb_col`` with W, at least 1; the
    swept area ``patch_size + (nb - 1) * stride`` is centred, its offset
    ``(H - swept) // 2``. Patches are taken row-major (index ``r * nb_col + c``).

    Args:
        img: 2-D image (H, W), any real dtype and intensity scale; H, W >= patch_size.
        patch_size: patch side in pixels.
        stride: step between patches in pixels.
        target_scale: if given, each patch is multiplied by ``target_scale / patch.max()``.
        equalize_hist: OpenCV histogram equalisation of each patch (see ``read_img_for_pred``
            for the 8-bit conversion); output then in 0..255.

    Returns:
        ``(patches, nb_row, nb_col)`` with patches float32 of shape
        (nb_row * nb_col, patch_size, patch_size).
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"sweep_img_patches expects a 2-D image, got shape {img.shape}")
    nb_row, nb_col, y_gap, x_gap = _sweep_grid(img.shape, patch_size, stride)
    windows = np.lib.stride_tricks.sliding_window_view(img, (patch_size, patch_size))
    windows = windows[y_gap::stride, x_gap::stride][:nb_row, :nb_col]
    return _scale_equalize_patches(windows, target_scale, equalize_hist), nb_row, nb_col


def _kpt_xy(key_pts) -> np.ndarray:
    """(N, 2) float64 (x, y) coordinates from cv2.KeyPoint objects or an (N, 2) array."""
    if len(key_pts) and isinstance(key_pts[0], cv2.KeyPoint):
        return np.array([kp.pt for kp in key_pts], dtype=np.float64)
    xy = np.asarray(key_pts, dtype=np.float64)
    if xy.size == 0:
        return xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"key_pts should be cv2.KeyPoint objects or an (N, 2) array of "
                         f"(x, y), got shape {xy.shape}")
    return xy


def get_roi_patches(img: np.ndarray, key_pts: Union[Sequence, np.ndarray],
                    roi_size: Sequence[int] = (256, 256)) -> np.ndarray:
    """Cut patches of ``roi_size`` centred at keypoints, zero-padding beyond the image.

    The patch of a keypoint (x, y) covers rows ``floor(y - h / 2)`` to that plus h and columns
    likewise; parts outside the image are zeros, so every patch keeps its size and its centre
    (the 2017 code shifted patches at the top/left edge inward instead).

    Args:
        img: 2-D image (H, W), any real dtype.
        key_pts: cv2.KeyPoint list or an (N, 2) array of (x, y) = (column, row); each must
            lie inside the image.
        roi_size: (h, w) of the patches.

    Returns:
        float32 array of shape (N, h, w), intensities as in ``img``.
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"get_roi_patches expects a 2-D image, got shape {img.shape}")
    h = _positive_int("roi_size[0]", roi_size[0])
    w = _positive_int("roi_size[1]", roi_size[1])
    xy = _kpt_xy(key_pts)
    if len(xy) == 0:
        return np.zeros((0, h, w), np.float32)
    if np.any(xy < 0) or np.any(xy[:, 0] >= img.shape[1]) or np.any(xy[:, 1] >= img.shape[0]):
        raise ValueError(f"key points should lie inside the image of shape {img.shape}")
    padded = np.pad(img.astype(np.float32, copy=False), ((h, h), (w, w)))
    rows = np.floor(xy[:, 1] - h / 2).astype(np.int64) + h
    cols = np.floor(xy[:, 0] - w / 2).astype(np.int64) + w
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w))
    return np.ascontiguousarray(windows[rows, cols])


def kmeans(points: np.ndarray, k: int, seed: Optional[int] = 12345, iters: int = 30
           ) -> Tuple[np.ndarray, np.ndarray]:
    """K-means of 2-D points: k-means++ seeding, then at most ``iters`` Lloyd iterations.

    A small NumPy k-means, fast for the few hundred keypoints of a mammogram and safe in
    forked worker processes (where OpenMP-backed k-means implementations can deadlock). An
    emptied cluster keeps its centre.

    Args:
        points: (n, d) float coordinates, n >= k.
        k: number of clusters (> 0).
        seed: an int seed or a ``np.random.Generator`` for the seeding.
        iters: largest number of Lloyd iterations.

    Returns:
        (labels, centres): int (n,) cluster of each point, float64 (k, d) centres.
    """
    pts = np.asarray(points, dtype=np.float64)
    k = _positive_int("k", k)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    centres = [pts[rng.integers(len(pts))]]
    d2 = ((pts - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        centres.append(pts[rng.choice(len(pts), p=d2 / d2.sum())] if d2.sum() > 0
                       else pts[rng.integers(len(pts))])
        d2 = np.minimum(d2, ((pts - centres[-1]) ** 2).sum(axis=1))
    centres = np.array(centres)
    labels = np.full(len(pts), -1)
    for _ in range(iters):
        # nearest centre: argmin of |c|^2 - 2 p.c (|p - c|^2 without the constant |p|^2)
        new = ((centres ** 2).sum(axis=1) - 2.0 * pts @ centres.T).argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        size = np.bincount(labels, minlength=k)
        used = size > 0
        for d in range(pts.shape[1]):
            centres[used, d] = np.bincount(labels, pts[:, d], minlength=k)[used] / size[used]
    return labels, centres


def clust_kpts(key_pts: Union[Sequence, np.ndarray], nb_clust: int, seed: int = 12345,
               return_centers: bool = False) -> Union[list, np.ndarray]:
    """Group keypoints by k-means on their (x, y) and keep one representative per cluster.

    K-means of :func:`kmeans` (k-means++ seeding from ``seed``, at most 30 Lloyd
    iterations). The representative of a cluster is its keypoint of largest ``size``, then largest
    ``response`` (cv2.KeyPoint input), or the point nearest the cluster centre (array input).
    With ``nb_clust`` or fewer keypoints all are returned.

    Args:
        key_pts: cv2.KeyPoint list or an (N, 2) array of (x, y).
        nb_clust: number of clusters (> 0).
        seed: k-means seed.
        return_centers: return the (nb_clust, 2) float64 cluster centres instead (2017 output).

    Returns:
        At most ``nb_clust`` keypoints, in input order: a list of cv2.KeyPoint for KeyPoint
        input, else an (M, 2) float64 array of (x, y).
    """
    nb_clust = _positive_int("nb_clust", nb_clust)
    xy = _kpt_xy(key_pts)
    is_kp = len(xy) > 0 and isinstance(key_pts[0], cv2.KeyPoint)
    if len(xy) <= nb_clust:
        return xy if return_centers else (list(key_pts) if is_kp else xy)
    labels, centres = kmeans(xy, nb_clust, seed)
    if return_centers:
        return centres
    dist = np.linalg.norm(xy - centres[labels], axis=1)
    size = np.array([kp.size for kp in key_pts]) if is_kp else np.zeros(len(xy))
    resp = np.array([kp.response for kp in key_pts]) if is_kp else np.zeros(len(xy))
    order = np.lexsort((dist, -resp, -size))  # best first: size, response, nearness
    _, first = np.unique(labels[order], return_index=True)
    chosen = np.sort(order[first])
    return [key_pts[i] for i in chosen] if is_kp else xy[chosen]


# ----------------------------------------------------------------------------------------------
# Intensity: scaling, histogram equalisation and the input recipe.
# ----------------------------------------------------------------------------------------------


def hist_equalize(img: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit histogram equalisation of a 2-D image; float32 0..255 out.

    The one rule used everywhere (training generators, prediction, heatmap sweeps): an image
    already in 0..255 (the documented use, after ``rescale_factor``; values in (-1, 256), which
    the 2017 cast also truncated into 0..255) is cast to uint8 by truncation, as the 2017 code
    did; any other image (e.g. 16-bit levels without a rescale
    factor) is first scaled by its maximum to 0..255, negative values clipped to 0, where the
    2017 cast would have wrapped around.

    Args:
        img: (H, W) image, any real dtype.

    Returns:
        float32 (H, W), values 0..255.
    """
    return _equalize_to_u8(img).astype(np.float32)


def _equalize_to_u8(img: np.ndarray) -> np.ndarray:
    # "In 0..255" includes what the 2017 truncating cast also mapped into 0..255 (e.g. 255.00002
    # from float32 rounding of 65535 * 255/65535), so that the max-scaling applies only to
    # images really on another scale.
    if img.size == 0 or (img.min() > -1 and img.max() < 256):
        img_u8 = np.clip(img, 0, 255).astype(np.uint8)
    else:
        img_max = float(img.max())
        scale = 255.0 / img_max if img_max > 0 else 0.0
        img_u8 = np.clip(img.astype(np.float64) * scale, 0, 255).astype(np.uint8)
    return cv2.equalizeHist(img_u8)


def _scale_stored(img: np.ndarray, target_scale: Optional[float],
                  rescale_factor: Optional[float], img_max: Optional[float] = None) -> np.ndarray:
    """float32 copy of stored levels: max -> ``target_scale``, then times ``rescale_factor``.

    The scaling of :func:`read_resize_img` and :meth:`InputRecipe.scale`, in float32 (a
    factor of 1 for an all-zero image).

    ``img_max`` overrides the maximum used for ``target_scale`` (to scale a lookup table of
    levels as the image it belongs to).
    """
    out = img.astype(np.float32)
    if target_scale is not None:
        img_max = float(out.max()) if img_max is None else float(np.float32(img_max))
        out *= np.float32(float(target_scale) / (img_max if img_max != 0 else target_scale))
    if rescale_factor is not None:
        out *= np.float32(rescale_factor)
    return out


def intensity_scale_problem(img_max: float, rescale_factor: Optional[float],
                            target_scale: Optional[float] = None) -> Optional[str]:
    """Why an image's intensities do not fit ``rescale_factor``, or None when they do.

    ``rescale_factor`` is meant to bring an image to the 0..255 scale (255/65535 for 16-bit
    files, 1 for 8-bit files). An 8-bit image among 16-bit ones under the 16-bit factor would
    reach at most 1.0 (1/257 of the scale), a 16-bit image under an 8-bit factor up to 65535:
    both are reported instead of being used silently. Nothing is checked when ``target_scale``
    maps each image's maximum itself, or without a factor.

    Args:
        img_max: the image's largest stored level (before scaling).
        rescale_factor: the factor applied to the stored levels, or None.
        target_scale: the ``target_scale`` in use, or None.
    """
    if rescale_factor is None or target_scale is not None or img_max <= 0:
        return None
    scaled = float(img_max) * float(rescale_factor)
    if scaled <= 1.0:
        return (f"its maximum level {img_max:g} becomes {scaled:.3g} with rescale factor "
                f"{rescale_factor:g} (an 8-bit image under a 16-bit factor?)")
    if scaled > 256.0:
        return (f"its maximum level {img_max:g} becomes {scaled:.4g} with rescale factor "
                f"{rescale_factor:g}, beyond the 0..255 scale (a 16-bit image under an 8-bit "
                f"factor?)")
    return None


def sample_max_level(paths: Sequence[PathLike], max_images: int = 12) -> Tuple[float, int]:
    """The largest stored level of an evenly spaced sample of image files.

    Args:
        paths: image files (e.g. a training folder's list, in its sorted order).
        max_images: how many files are read at most (first, last and evenly in between).

    Returns:
        (largest level over the files read, number of files read); unreadable files are
        skipped (the training or mean computation reports them).
    """
    paths = list(paths)
    if len(paths) > max_images:
        idx = np.unique(np.linspace(0, len(paths) - 1, max_images).round().astype(int))
        paths = [paths[i] for i in idx]
    top, read = 0.0, 0
    for path in paths:
        try:
            img = read_image(path)
        except ImageReadError:
            continue
        top, read = max(top, float(img.max()) if img.size else 0.0), read + 1
    return top, read


def levels_scale_advice(img_max: float, rescale_factor: Optional[float],
                        target_scale: Optional[float] = None) -> Optional[str]:
    """What is wrong with the intensity scale of images whose largest level is ``img_max``,
    and the ``--rescale-factor`` to give instead, or None when it fits.

    The networks see levels on the 0..255 scale: 16-bit levels (above 255) need the factor
    255/65535 (0.003891); 8-bit levels need none. Nothing is checked when ``target_scale``
    maps each image's maximum itself.

    Args:
        img_max: the largest stored level of (a sample of) the images.
        rescale_factor: the factor given, or None.
        target_scale: the ``target_scale`` (``--img-scale``) given, or None.
    """
    if target_scale is not None or img_max <= 0:
        return None
    if rescale_factor is None:
        if img_max > 255:
            return (f"16-bit levels (up to {img_max:g}) but no rescale factor: give "
                    f"--rescale-factor {255 / 65535:.6f} (255/65535) to bring them to 0..255")
        return None
    scaled = img_max * float(rescale_factor)
    if img_max <= 255 and scaled <= 1.0:
        return (f"8-bit levels (up to {img_max:g}) under --rescale-factor {rescale_factor:g}, "
                f"which brings them to at most {scaled:.3g}: leave the factor out "
                f"(--no-rescale-factor)")
    if scaled > 256.0:
        advice = (f"--rescale-factor {255 / 65535:.6f} (255/65535)" if img_max > 255 else
                  "--no-rescale-factor")
        return (f"levels up to {img_max:g} become {scaled:.4g} under --rescale-factor "
                f"{rescale_factor:g}, beyond the 0..255 scale: give {advice}")
    return None


def _scale_equalize_patches(patches: np.ndarray, target_scale: Optional[float],
                            equalize_hist: bool) -> np.ndarray:
    """Per-patch ``target_scale`` (patch max -> target_scale) and equalisation.

    ``patches`` has shape (..., p, p) (a strided view is copied once); returns float32
    (N, p, p). The scaling is computed in float64 and rounded to float32 once (equalisation
    sees the float64 values), as in 2017.
    """
    exact_in_f32 = patches.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.float16,
                                     np.float32, np.bool_) and not equalize_hist
    out = np.array(patches, dtype=np.float32 if exact_in_f32 else np.float64)
    out = out.reshape((-1,) + out.shape[-2:])
    if target_scale is not None and len(out):
        p_max = out.max(axis=(1, 2)).astype(np.float64)
        factor = target_scale / np.where(p_max != 0, p_max, target_scale)
        np.multiply(out, factor[:, None, None], out=out, dtype=np.float64, casting="unsafe")
    if equalize_hist:
        return np.stack([hist_equalize(p) for p in out]) if len(out) else \
            out.astype(np.float32)
    return out.astype(np.float32, copy=False)


#: HDF5 root attribute of a model file holding its :class:`InputRecipe` as JSON.
RECIPE_ATTR = "dm_input_recipe"


@functools.lru_cache(maxsize=None)
def _preprocess_function(name: str) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The ImageNet ``preprocess_input`` of backbone ``name``, from the table of backbones in
    ``dm_resnet`` (imports tf-keras on first use)."""
    from dm_resnet import get_preprocess_input

    return get_preprocess_input(name)


def _optional_float(name: str, value) -> Optional[float]:
    return None if value is None else _positive(name, value)


def read_file_attr(path: PathLike, name: str) -> Optional[str]:
    """The text of the HDF5 root attribute ``name`` of the file at ``path`` (bytes decoded as
    UTF-8), or None: the file has no such attribute, or is not HDF5. Read with h5py (no
    TensorFlow needed)."""
    import h5py

    try:
        with h5py.File(os.fspath(path), "r") as fh:
            value = fh.attrs.get(name)
    except OSError:
        return None
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class InputRecipe:
    """How a stored image becomes model input: the settings, and the steps that apply them.

    Training, prediction and heatmaps all go through this one recipe, and the trainers store
    it in every model file they write (HDF5 root attribute :data:`RECIPE_ATTR`, JSON), so a
    model can be applied with the settings it was trained with. The steps, in order:

    1. read and resize (:meth:`read_stored`): the file's levels (uint16 0..65535, uint8
       0..255) resized with OpenCV bicubic interpolation in that dtype to ``img_size``, or to
       ``img_height`` keeping the aspect ratio, or kept at the stored size when neither is set;
    2. scale (:meth:`scale`): float32; the image maximum mapped to ``img_scale`` when set,
       then everything multiplied by ``rescale_factor`` when set (255/65535 brings 16-bit
       images to 0..255);
    3. equalise (:meth:`equalize`), when ``equalize_hist``: :func:`hist_equalize`, 0..255;
    4. copy the single channel ``channels`` times (:meth:`to_input`; 3 for ImageNet
       backbones, 1 for YaroslavNet and the small ResNets);
    5. normalise (:meth:`normalize`): subtract ``featurewise_mean`` when
       ``featurewise_center``, otherwise apply the ``preprocess_input`` function of backbone
       ``preprocess`` (a ``--net`` name such as ``"vgg16"``) when it is set.

    Training augmentation runs between steps 3 and 4 and is not part of the recipe. A
    patch-classifier heatmap sweep (:func:`get_prob_heatmap`) reads the whole image with
    steps 1 and :meth:`rescale` and applies ``img_scale`` and the later steps per patch
    (:meth:`patches_to_input`), since the patch is the image the classifier was trained on.

    Attributes:
        img_size: (height, width) in pixels, or None.
        img_height: height in pixels, aspect ratio kept (exclusive with ``img_size``), or None.
        channels: 1 or 3.
        img_scale: the value each image's maximum is mapped to, or None.
        rescale_factor: intensity multiplier (> 0), or None.
        equalize_hist: histogram equalisation on.
        featurewise_center: subtract ``featurewise_mean``.
        featurewise_mean: mean intensity on the final scale (0..255 for CBIS-DDSM: 52.16
            whole images, 59.6 patches), a scalar or one value per channel, or None.
        preprocess: backbone whose ImageNet ``preprocess_input`` applies when not centring
            (resolved only when applied, so this module stays free of TensorFlow), or None.
    """

    img_size: Optional[Tuple[int, int]] = None
    img_height: Optional[int] = None
    channels: int = 1
    img_scale: Optional[float] = None
    rescale_factor: Optional[float] = None
    equalize_hist: bool = False
    featurewise_center: bool = False
    featurewise_mean: Union[None, float, Tuple[float, ...]] = None
    preprocess: Optional[str] = None

    #: Version of the :meth:`to_dict` layout.
    VERSION: ClassVar[int] = 1

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.img_size is not None and self.img_height is not None:
            raise ValueError(f"give img_size or img_height, not both (got {self.img_size!r} "
                             f"and {self.img_height!r})")
        if self.img_size is not None:
            if len(self.img_size) != 2:
                raise ValueError(f"img_size should be (height, width), got {self.img_size!r}")
            set_("img_size", (_positive_int("img_size[0]", self.img_size[0]),
                              _positive_int("img_size[1]", self.img_size[1])))
        if self.img_height is not None:
            set_("img_height", _positive_int("img_height", self.img_height))
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels should be 1 or 3, got {self.channels!r}")
        set_("channels", int(self.channels))
        set_("img_scale", _optional_float("img_scale", self.img_scale))
        set_("rescale_factor", _optional_float("rescale_factor", self.rescale_factor))
        set_("equalize_hist", bool(self.equalize_hist))
        set_("featurewise_center", bool(self.featurewise_center))
        mean = self.featurewise_mean
        if mean is not None:
            mean = tuple(float(m) for m in np.asarray(mean, dtype=np.float64).reshape(-1))
            set_("featurewise_mean", mean[0] if len(mean) == 1 else mean)
        if self.preprocess is not None and not isinstance(self.preprocess, str):
            raise ValueError(f"preprocess should be a backbone name such as 'vgg16' (the "
                             f"function is looked up when applied), got {self.preprocess!r}")

    # -- steps ----------------------------------------------------------------------------
    def read_stored(self, path: PathLike, gs_255: bool = False,
                    scorable: bool = False) -> np.ndarray:
        """Step 1: the file read and resized, in its stored dtype ((H, W) uint16/uint8).

        Raises:
            ImageReadError: the file cannot be read as an image (or, with ``scorable``,
                cannot give a score: :func:`image_content_problem`).
        """
        if self.img_size is None and self.img_height is None:
            img = read_image(path, gs_255=gs_255)
            problem = image_content_problem(img) if scorable else None
            if problem is not None:
                raise ImageReadError(path, problem)
            return img
        return read_resize_stored(path, self.img_size, self.img_height, gs_255, scorable)

    def scale(self, stored: np.ndarray, img_max: Optional[float] = None) -> np.ndarray:
        """Step 2: float32 copy with the maximum mapped to ``img_scale``, times ``rescale_factor``.

        Args:
            stored: (H, W) image levels, any real dtype (uint16 0..65535 or uint8 0..255).
            img_max: maximum used for ``img_scale`` instead of ``stored.max()`` (to scale a
                lookup table of levels as the image it belongs to).

        Returns:
            float32 array of ``stored``'s shape (a factor of 1 for an all-zero image).
        """
        return _scale_stored(stored, self.img_scale, self.rescale_factor, img_max)

    def rescale(self, stored: np.ndarray) -> np.ndarray:
        """float32 copy times ``rescale_factor`` only (the whole image of a patch sweep)."""
        return _scale_stored(stored, None, self.rescale_factor)

    def equalize(self, img: np.ndarray) -> np.ndarray:
        """Step 3: :func:`hist_equalize` when ``equalize_hist`` (0..255), else ``img``."""
        return hist_equalize(img) if self.equalize_hist else img

    def intensities(self, stored: np.ndarray) -> np.ndarray:
        """Steps 2 and 3: (H, W) stored levels -> (H, W) float32 on the model's scale."""
        return self.equalize(self.scale(stored))

    def preprocess_function(self) -> Optional[Callable[[np.ndarray], np.ndarray]]:
        """The backbone's ``preprocess_input`` (None when ``preprocess`` is None or the
        backbone has none, e.g. ``yaroslav``); imports tf-keras on first use."""
        return None if self.preprocess is None else _preprocess_function(self.preprocess)

    def normalize(self, x: np.ndarray,
                  preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """Step 5 on (..., C) float32 input: centring, else the backbone preprocessing.

        Args:
            x: float32 array whose last axis is the channel axis; may be modified in place.
            preprocess: a function used instead of the one named by ``preprocess``.

        Returns:
            float32 array of ``x``'s shape.
        """
        if self.featurewise_center:
            if self.featurewise_mean is None:
                _warn_once("featurewise_center is on but no featurewise_mean is set; "
                           "images are not centred")
                return x
            return x - np.asarray(self.featurewise_mean, dtype=np.float32)
        fn = preprocess if preprocess is not None else self.preprocess_function()
        return fn(x) if fn is not None else x

    def to_input(self, img: np.ndarray,
                 preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """Steps 4 and 5: (H, W) intensities -> (H, W, ``channels``) float32 model input."""
        x = np.repeat(np.asarray(img, dtype=np.float32)[..., None], self.channels, axis=-1)
        return self.normalize(x, preprocess)

    def read(self, path: PathLike,
             preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """All steps: an image file -> (H, W, ``channels``) float32 model input."""
        return self.to_input(self.intensities(self.read_stored(path)), preprocess)

    def batch(self, paths: Sequence[PathLike],
              preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
        """:meth:`read` of every file, stacked: (N, H, W, ``channels``) float32."""
        return np.stack([self.read(p, preprocess) for p in paths])

    def patches_to_input(self, patches: np.ndarray,
                         preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None
                         ) -> np.ndarray:
        """Patches cut from a rescaled image -> (N, p, p, ``channels``) float32 model input.

        Each patch's maximum is mapped to ``img_scale`` (computed in float64 and rounded to
        float32 once, as the 2017 sweep did), then equalisation, channel copy and
        normalisation as for whole images.

        Args:
            patches: (..., p, p) array of patches (a strided view is copied once).
            preprocess: a function used instead of the one named by ``preprocess``.
        """
        x = _scale_equalize_patches(patches, self.img_scale, self.equalize_hist)
        return self.normalize(np.repeat(x[..., None], self.channels, axis=-1), preprocess)

    # -- storage --------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "InputRecipe":
        """A copy with some settings changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-safe dict of the settings, with ``version`` (:attr:`VERSION`)."""
        out = {"version": self.VERSION}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "InputRecipe":
        """The recipe of a :meth:`to_dict` dict; missing settings take their defaults.

        Raises:
            ValueError: a newer layout version, an unknown key or an invalid value.
        """
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ValueError(f"input recipe version {version!r} is newer than this code "
                             f"understands ({cls.VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown input recipe settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_options(cls, options: Any, **settings: Any) -> "InputRecipe":
        """The recipe of a script's options: the one place options become a recipe.

        Args:
            options: a mapping (``vars(args)``, a dict) or an object (a trainer's options)
                whose entries of the recipe's field names (``img_size``, ``img_height``,
                ``img_scale``, ``rescale_factor``, ``equalize_hist``, ``featurewise_center``,
                ``featurewise_mean``) are taken; the others keep their defaults.
            **settings: fields set here instead (``channels``, ``preprocess``, ...).

        Raises:
            ValueError: an invalid value.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(options, collections.abc.Mapping):
            found = {n: options[n] for n in names if n in options}
        else:
            found = {n: getattr(options, n) for n in names if hasattr(options, n)}
        found.update(settings)
        if found.get("img_size") is not None:
            found["img_size"] = tuple(found["img_size"])
        return cls(**found)

    def to_json(self) -> str:
        """:meth:`to_dict` as a compact JSON string (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "InputRecipe":
        """The recipe of a :meth:`to_json` string."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_model_file(cls, path: PathLike) -> Optional["InputRecipe"]:
        """The recipe stored in a model file, or None (a 2017 file, or a file without one).

        Read with h5py from the HDF5 root attribute :data:`RECIPE_ATTR` (no TensorFlow
        needed); a file that is not HDF5 has none.

        Raises:
            ValueError: the stored recipe cannot be read (the message names the file).
        """
        text = read_file_attr(path, RECIPE_ATTR)
        if text is None:
            return None
        try:
            return cls.from_json(text)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{os.fspath(path)}: unreadable input recipe ({exc})") from exc

    def differences(self, other: "InputRecipe") -> dict:
        """``{setting: (self's value, other's value)}`` for the settings that differ."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name))
                for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}

# ----------------------------------------------------------------------------------------------
# Augmentation: Keras 2.0.8's random affine transform and flips, fused into one OpenCV warp.
# ----------------------------------------------------------------------------------------------


def keras20_transform_matrix(params: dict, height: int, width: int) -> Optional[np.ndarray]:
    """The 3x3 affine matrix Keras 2.0.8 ``random_transform`` built, or None for the identity.

    Built as rotation @ shift @ shear @ zoom (factors with a zero/unit parameter left out, as
    Keras did), then moved to the centre ``(h / 2 + 0.5, w / 2 + 0.5)`` (Keras 2.0's offset).
    It maps an OUTPUT pixel's (row, col, 1) index coordinates to the INPUT coordinates it is
    sampled from (``scipy.ndimage.affine_transform`` convention; no x/y swap, unlike today's
    Keras).

    Args:
        params: dict from :meth:`DMImageDataGenerator.get_random_transform` (``theta`` and
            ``shear`` in radians, ``tx``/``ty`` row/column shifts in pixels, ``zx``/``zy`` row
            and column zoom factors).
        height, width: image size in pixels.

    Returns:
        float64 array of shape (3, 3), or None when no affine part is active.
    """
    theta, tx, ty = params.get("theta", 0.0), params.get("tx", 0.0), params.get("ty", 0.0)
    shear, zx, zy = params.get("shear", 0.0), params.get("zx", 1.0), params.get("zy", 1.0)
    mat = None
    if theta != 0:
        mat = np.array([[np.cos(theta), -np.sin(theta), 0],
                        [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    if tx != 0 or ty != 0:
        shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=np.float64)
        mat = shift if mat is None else mat @ shift
    if shear != 0:
        shr = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        mat = shr if mat is None else mat @ shr
    if zx != 1 or zy != 1:
        zoom = np.array([[zx, 0, 0], [0, zy, 0], [0, 0, 1]], dtype=np.float64)
        mat = zoom if mat is None else mat @ zoom
    if mat is None:
        return None
    o_r, o_c = float(height) / 2 + 0.5, float(width) / 2 + 0.5
    offset = np.array([[1, 0, o_r], [0, 1, o_c], [0, 0, 1]], dtype=np.float64)
    reset = np.array([[1, 0, -o_r], [0, 1, -o_c], [0, 0, 1]], dtype=np.float64)
    return offset @ mat @ reset


def fused_warp_matrix(params: dict, height: int, width: int) -> Optional[np.ndarray]:
    """One 2x3 OpenCV inverse-map matrix for the Keras 2.0 affine followed by the flips.

    Keras 2.0 flipped after warping, so the output pixel (r, c) of a horizontally flipped image
    comes from warped pixel (r, w - 1 - c): the flip matrices are composed on the right of the
    (row, col) matrix, which is then converted to OpenCV's (x=col, y=row) order for
    ``cv2.warpAffine(..., flags=INTER_NEAREST | WARP_INVERSE_MAP)``.

    Returns:
        float64 array (2, 3), or None when neither an affine part nor a flip is active.
    """
    mat = keras20_transform_matrix(params, height, width)
    flip_h, flip_v = params.get("flip_horizontal", False), params.get("flip_vertical", False)
    if mat is None and not flip_h and not flip_v:
        return None
    mat = np.eye(3) if mat is None else mat
    if flip_h:
        mat = mat @ np.array([[1, 0, 0], [0, -1, width - 1], [0, 0, 1]], dtype=np.float64)
    if flip_v:
        mat = mat @ np.array([[-1, 0, height - 1], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    return np.array([[mat[1, 1], mat[1, 0], mat[1, 2]],
                     [mat[0, 1], mat[0, 0], mat[0, 2]]], dtype=np.float64)


def _warp(img: np.ndarray, params: dict, fill_mode: str, cval: float) -> np.ndarray:
    """Apply the fused affine + flips of ``params`` to an (H, W) or (H, W, C) array.

    Nearest-neighbour sampling (values are copied, never interpolated). Returns ``img`` itself
    when the transform is the identity.
    """
    height, width = img.shape[:2]
    has_affine = keras20_transform_matrix(params, height, width) is not None
    flip_h, flip_v = params.get("flip_horizontal", False), params.get("flip_vertical", False)
    if not has_affine:
        if flip_h and flip_v:
            return img[::-1, ::-1]
        if flip_h:
            return img[:, ::-1]
        if flip_v:
            return img[::-1]
        return img
    mat = fused_warp_matrix(params, height, width)
    if img.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        img = img.astype(np.float32)
    flags = cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    border = _BORDER_MODES[fill_mode]
    if img.ndim == 3 and img.shape[2] > 4:
        return np.stack([cv2.warpAffine(np.ascontiguousarray(img[..., c]), mat, (width, height),
                                        flags=flags, borderMode=border, borderValue=cval)
                         for c in range(img.shape[2])], axis=-1)
    out = cv2.warpAffine(np.ascontiguousarray(img), mat, (width, height), flags=flags,
                         borderMode=border, borderValue=(cval,) * 4)
    if img.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


# ----------------------------------------------------------------------------------------------
# Generator: DMImageDataGenerator (augmentation and standardisation per image); labels and
# class balance.
# ----------------------------------------------------------------------------------------------


#: The recipe of stored levels used as they are (float32, no scaling).
_LEVELS_AS_IS = InputRecipe()


class DMImageDataGenerator:
    """Keras-2.0-style image generator for mammograms: augmentation, centring, iterators.

    The constructor takes the Keras 2 ``ImageDataGenerator`` arguments. Augmentation follows
    Keras 2.0.8 exactly: rotation uniform in +-``rotation_range`` DEGREES,
    shear uniform in +-``shear_range`` RADIANS (Keras 2.0 units; today's Keras takes degrees),
    row and column zoom drawn independently in ``zoom_range`` (a float z means [1-z, 1+z]),
    shifts as fractions of height/width, all about the image centre, nearest-neighbour
    sampling, then a per-channel intensity shift uniform in +-``channel_shift_range`` clipped
    to the image's min/max, then horizontal and vertical flips with p = 0.5 each. The affine
    part and the flips are fused into one ``cv2.warpAffine`` call (made on the single-channel
    image before the channel copy in the iterators). Random draws happen in the Keras 2.0.8
    order (theta, row shift, column shift, shear, zoom pair, channel shifts, h-flip, v-flip),
    so with the same NumPy random stream the parameters equal Keras 2.0.8's.

    ``standardize`` applies, in Keras 2.0.8 order, ``preprocessing_function``, ``rescale``,
    samplewise centring/normalisation and featurewise centring/normalisation with ``.mean``
    and ``.std`` (set them after construction: a scalar or one value per channel; for CBIS-DDSM
    whole images 52.16 on the 0..255 scale). ZCA whitening is not supported.

    Args:
        featurewise_center, samplewise_center, featurewise_std_normalization,
        samplewise_std_normalization: as in Keras 2.
        rotation_range: degrees. width_shift_range, height_shift_range: fractions of the size.
        shear_range: radians. zoom_range: float or (low, high). channel_shift_range: intensity.
        fill_mode: 'nearest' (as 2017; OpenCV replicate border), 'constant' (``cval``),
            'reflect' or 'wrap' (OpenCV border equivalents).
        horizontal_flip, vertical_flip: random flips, p = 0.5.
        rescale: multiplier applied in ``standardize`` after augmentation (Keras 2 meaning).
        preprocessing_function: called on each (H, W, C) float32 image at the start of
            ``standardize``.
        data_format: 'channels_last' (default) or 'channels_first'.
    """

    def __init__(self, featurewise_center=False, samplewise_center=False,
                 featurewise_std_normalization=False, samplewise_std_normalization=False,
                 zca_whitening=False, rotation_range=0., width_shift_range=0.,
                 height_shift_range=0., shear_range=0., zoom_range=0., channel_shift_range=0.,
                 fill_mode="nearest", cval=0., horizontal_flip=False, vertical_flip=False,
                 rescale=None, preprocessing_function=None, data_format="channels_last"):
        if zca_whitening:
            raise ValueError("zca_whitening is not supported by DMImageDataGenerator")
        if fill_mode not in _BORDER_MODES:
            raise ValueError(f"fill_mode should be one of {sorted(_BORDER_MODES)}, "
                             f"got {fill_mode!r}")
        if data_format not in _DATA_FORMATS:
            raise ValueError(f"data_format should be one of {_DATA_FORMATS}, got {data_format!r}")
        if np.isscalar(zoom_range):
            zoom_range = [1 - zoom_range, 1 + zoom_range]
        elif len(zoom_range) == 2:
            zoom_range = [zoom_range[0], zoom_range[1]]
        else:
            raise ValueError(f"zoom_range should be a float or (low, high), got {zoom_range!r}")
        for name, val in (("rotation_range", rotation_range), ("shear_range", shear_range),
                          ("width_shift_range", width_shift_range),
                          ("height_shift_range", height_shift_range),
                          ("channel_shift_range", channel_shift_range)):
            if not val >= 0:
                raise ValueError(f"{name} should be >= 0, got {val!r}")
        self.featurewise_center = featurewise_center
        self.samplewise_center = samplewise_center
        self.featurewise_std_normalization = featurewise_std_normalization
        self.samplewise_std_normalization = samplewise_std_normalization
        self.rotation_range = rotation_range
        self.width_shift_range = width_shift_range
        self.height_shift_range = height_shift_range
        self.shear_range = shear_range
        self.zoom_range = zoom_range
        self.channel_shift_range = channel_shift_range
        self.fill_mode = fill_mode
        self.cval = cval
        self.horizontal_flip = horizontal_flip
        self.vertical_flip = vertical_flip
        self.rescale = rescale
        self.preprocessing_function = preprocessing_function
        self.data_format = data_format
        self.mean = None
        self.std = None

    # -- augmentation -----------------------------------------------------------------------
    @property
    def augments(self) -> bool:
        """True when :meth:`random_transform` can change an image."""
        return bool(self.rotation_range or self.width_shift_range or self.height_shift_range
                    or self.shear_range or self.zoom_range != [1, 1] or self.channel_shift_range
                    or self.horizontal_flip or self.vertical_flip)

    def _hwc(self, shape) -> Tuple[int, int, int]:
        if len(shape) != 3:
            raise ValueError(f"expected one image of 3 dimensions, got shape {tuple(shape)}")
        if self.data_format == "channels_first":
            return shape[1], shape[2], shape[0]
        return shape[0], shape[1], shape[2]

    def get_random_transform(self, img_shape: Sequence[int],
                             rng: Optional[np.random.RandomState] = None) -> dict:
        """Draw the random augmentation parameters for one image (Keras 2.0.8 draw order).

        Args:
            img_shape: shape of the image in ``data_format`` order, e.g. (H, W, C).
            rng: ``np.random.RandomState``/``Generator``, an int seed, or None for NumPy's
                global random stream (as Keras 2.0).

        Returns:
            dict with ``theta`` (radians), ``tx`` (row shift, pixels), ``ty`` (column shift,
            pixels), ``shear`` (radians), ``zx``/``zy`` (row/column zoom), ``channel_shift``
            (tuple of C offsets, or None), ``flip_horizontal`` and ``flip_vertical`` (bool).
        """
        if rng is None:
            rng = np.random
        elif not hasattr(rng, "uniform"):
            rng = np.random.RandomState(rng)
        height, width, channels = self._hwc(img_shape)
        p = {"theta": 0.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0, "zy": 1.0,
             "channel_shift": None, "flip_horizontal": False, "flip_vertical": False}
        if self.rotation_range:
            p["theta"] = np.pi / 180 * rng.uniform(-self.rotation_range, self.rotation_range)
        if self.height_shift_range:
            p["tx"] = rng.uniform(-self.height_shift_range, self.height_shift_range) * height
        if self.width_shift_range:
            p["ty"] = rng.uniform(-self.width_shift_range, self.width_shift_range) * width
        if self.shear_range:
            p["shear"] = rng.uniform(-self.shear_range, self.shear_range)
        if self.zoom_range[0] != 1 or self.zoom_range[1] != 1:
            p["zx"], p["zy"] = (float(v) for v in rng.uniform(*self.zoom_range, 2))
        if self.channel_shift_range != 0:
            p["channel_shift"] = tuple(
                rng.uniform(-self.channel_shift_range, self.channel_shift_range)
                for _ in range(channels))
        if self.horizontal_flip:
            p["flip_horizontal"] = bool(rng.random() < 0.5)
        if self.vertical_flip:
            p["flip_vertical"] = bool(rng.random() < 0.5)
        return p

    def apply_transform(self, x: np.ndarray, params: dict) -> np.ndarray:
        """Apply drawn parameters to one image (affine + flips in one warp, channel shift).

        Args:
            x: one image, (H, W, C) or (C, H, W) per ``data_format``, any intensity scale.
            params: dict from :meth:`get_random_transform`.

        Returns:
            float32 image of the same shape.
        """
        self._hwc(x.shape)
        chw = self.data_format == "channels_first"
        img = np.moveaxis(x, 0, -1) if chw else x
        out = np.empty(img.shape, dtype=np.float32)
        self._augment_into(out, np.asarray(img, dtype=np.float32), params)
        return np.ascontiguousarray(np.moveaxis(out, -1, 0)) if chw else out

    def random_transform(self, x: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """Randomly augment one image (Keras 2.0.8 semantics; see the class docstring).

        ``seed`` seeds a private ``RandomState`` (Keras 2.0 reseeded the global one instead).
        """
        rng = None if seed is None else np.random.RandomState(seed)
        return self.apply_transform(x, self.get_random_transform(x.shape, rng))

    def _augment_into(self, out: np.ndarray, img: np.ndarray, params: Optional[dict]) -> None:
        """Write the augmented image into ``out`` (H, W, C) float32.

        ``img`` is float32 (H, W) (copied to every channel of ``out`` after one warp) or
        (H, W, C). The channel shift uses one offset per output channel, then clips to the
        warped image's min/max (both as Keras 2.0).
        """
        warped = img if params is None else _warp(img, params, self.fill_mode, self.cval)
        shifts = None if params is None else params.get("channel_shift")
        if warped.ndim == 2:
            warped = warped[..., None]
        if shifts is None:
            out[...] = warped
            return
        lo, hi = warped.min(), warped.max()
        for c in range(out.shape[2]):
            chan = warped[..., c if warped.shape[2] > 1 else 0]
            np.clip(chan + np.float32(shifts[c]), lo, hi, out=out[..., c])

    # -- standardisation --------------------------------------------------------------------
    def _channel_stat(self, value, channels: int, name: str) -> np.ndarray:
        stat = np.asarray(value, dtype=np.float32).reshape(-1)
        if stat.size not in (1, channels):
            raise ValueError(f"{name} should be a scalar or have {channels} values (one per "
                             f"channel), got shape {np.shape(value)}")
        return stat

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """Normalise one image in place (float32) in Keras 2.0.8 order; returns it.

        Args:
            x: float32 (H, W, C) or (C, H, W) image, e.g. 0..255 scale.

        Returns:
            The standardised image (``featurewise_center``: minus ``.mean`` per channel).
        """
        if self.preprocessing_function is not None:
            x = self.preprocessing_function(x)
        chw = self.data_format == "channels_first"
        img = np.moveaxis(x, 0, -1) if chw else x
        channels = img.shape[-1]
        if self.rescale:
            img *= np.float32(self.rescale)
        if self.samplewise_center:
            img -= np.mean(img, axis=-1, keepdims=True)
        if self.samplewise_std_normalization:
            img /= (np.std(img, axis=-1, keepdims=True) + 1e-7)
        if self.featurewise_center:
            if self.mean is None:
                _warn_once("featurewise_center is on but .mean is not set; images are not centred")
            else:
                img -= self._channel_stat(self.mean, channels, "mean")
        if self.featurewise_std_normalization:
            if self.std is None:
                _warn_once("featurewise_std_normalization is on but .std is not set")
            else:
                img /= (self._channel_stat(self.std, channels, "std") + 1e-7)
        return x

    def _fused_standardize(self, out: np.ndarray) -> bool:
        """Featurewise centring alone on ``out`` (H, W, C); False when the full path is needed."""
        if (self.preprocessing_function is not None or self.rescale or self.samplewise_center
                or self.samplewise_std_normalization or self.featurewise_std_normalization):
            return False
        if self.featurewise_center and self.mean is not None:
            mean = self._channel_stat(self.mean, out.shape[2], "mean")
            out -= mean
        elif self.featurewise_center:
            _warn_once("featurewise_center is on but .mean is not set; images are not centred")
        return True

    def process_image(self, out: np.ndarray, img: np.ndarray,
                      rng: Optional[np.random.RandomState]) -> None:
        """Augment (when configured) and standardise one image into ``out`` (H, W, C) float32.

        Args:
            out: destination view (H, W, C), channels last.
            img: float32 (H, W) single-channel image (copied to all C channels after the
                warp) or (H, W, C).
            rng: random state for the draw (ignored without augmentation).
        """
        params = self.get_random_transform(out.shape if self.data_format == "channels_last"
                                           else (out.shape[2],) + out.shape[:2],
                                           rng) if self.augments else None
        self._augment_into(out, img, params)
        if not self._fused_standardize(out):
            if self.data_format == "channels_first":
                std = self.standardize(np.ascontiguousarray(np.moveaxis(out, -1, 0)))
                out[...] = np.moveaxis(std, 0, -1)
            else:
                res = self.standardize(out)
                if res is not out:
                    out[...] = res

    def _fusable(self) -> bool:
        """True when standardize is at most featurewise centring (fused into a lookup)."""
        return (self.preprocessing_function is None and not self.rescale
                and not self.samplewise_center and not self.samplewise_std_normalization
                and not self.featurewise_std_normalization and self.fill_mode != "constant")

    def process_stored(self, out: np.ndarray, stored: np.ndarray,
                       rng: Optional[np.random.RandomState],
                       target_scale: Optional[float] = None,
                       rescale_factor: Optional[float] = None,
                       equalize_hist: bool = False,
                       recipe: Optional[InputRecipe] = None) -> None:
        """Expand one stored-form image into ``out``: scale, equalise, augment, standardise.

        Same result as the recipe's :meth:`~InputRecipe.intensities` (``target_scale``, then
        ``rescale_factor``, optional histogram equalisation), then :meth:`process_image`. For
        uint8/uint16 images the warp runs on the stored integers and scaling, channel shift,
        clipping and featurewise centring are one per-channel lookup table of the image's
        levels (the same float32 operations on each level, so bit-identical results).

        Args:
            out: destination (H, W, C) float32, channels last.
            stored: (H, W) image, uint8/uint16 levels (or float32) at target size.
            rng: random state for the augmentation draw.
            target_scale, rescale_factor, equalize_hist: the intensity steps, unless
                ``recipe`` is given (its ``img_scale``, ``rescale_factor`` and
                ``equalize_hist`` are used then).
        """
        if recipe is None:
            recipe = InputRecipe.from_options(dict(
                img_scale=target_scale, rescale_factor=rescale_factor,
                equalize_hist=equalize_hist))
        if recipe.equalize_hist:
            stored = _equalize_to_u8(recipe.scale(stored))
            recipe = _LEVELS_AS_IS
        if stored.dtype not in (np.uint8, np.uint16) or not self._fusable():
            self.process_image(out, recipe.scale(stored), rng)
            return
        shape = out.shape if self.data_format == "channels_last" else (out.shape[2],) + \
            out.shape[:2]
        params = self.get_random_transform(shape, rng) if self.augments else None
        warped = stored if params is None else _warp(stored, params, self.fill_mode, self.cval)
        levels = recipe.scale(np.arange(np.iinfo(stored.dtype).max + 1, dtype=stored.dtype),
                              img_max=stored.max())
        tables = self._level_tables(levels, warped, params, out.shape[2])
        # One gather of C-float rows: (levels, C) table indexed by the warped image. mode="clip"
        # (indices are always in range) lets numpy write straight into ``out``.
        stacked = np.empty((len(levels), out.shape[2]), np.float32)
        for c in range(out.shape[2]):
            stacked[:, c] = tables[c if len(tables) > 1 else 0]
        if out.flags.c_contiguous:
            np.take(stacked, warped, axis=0, out=out, mode="clip")
        else:
            out[...] = np.take(stacked, warped, axis=0, mode="clip")

    def _level_tables(self, levels, warped, params, channels):
        """Per-channel float32 lookup tables: level -> shifted, clipped, centred value."""
        shifts = None if params is None else params.get("channel_shift")
        mean = None
        if self.featurewise_center and self.mean is not None:
            mean = self._channel_stat(self.mean, channels, "mean")
        elif self.featurewise_center:
            _warn_once("featurewise_center is on but .mean is not set; images are not centred")
        if shifts is None and (mean is None or mean.size == 1):
            return [levels if mean is None else levels - mean[0]]
        lo, hi = levels[warped.min()], levels[warped.max()]
        tables = []
        for c in range(channels):
            table = levels if shifts is None else np.clip(levels + np.float32(shifts[c]), lo, hi)
            if mean is not None:
                table = table - mean[c if mean.size > 1 else 0]
            tables.append(table)
        return tables

    # -- iterators --------------------------------------------------------------------------
    def flow(self, X: np.ndarray, y: Optional[np.ndarray] = None, batch_size: int = 32,
             shuffle: bool = True, seed: Optional[int] = None,
             auto_batch_balance: Union[bool, float] = False,
             balance_classes: Union[bool, float] = False, no_pos_skip: float = 0.,
             target_scale: Optional[float] = None, rescale_factor: Optional[float] = None,
             equalize_hist: bool = False, dup_3_channels: bool = False,
             preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
             data_format: Optional[str] = None) -> Any:
        """Iterate over in-memory images (see :class:`DMNumpyArrayIterator`)."""
        return _sequence_class("DMNumpyArrayIterator")(
            X, y, self, batch_size=batch_size, shuffle=shuffle, seed=seed,
            auto_batch_balance=auto_batch_balance, balance_classes=balance_classes,
            no_pos_skip=no_pos_skip, target_scale=target_scale, rescale_factor=rescale_factor,
            equalize_hist=equalize_hist, dup_3_channels=dup_3_channels, preprocess=preprocess,
            data_format=data_format)

    def flow_from_directory(self, directory: PathLike,
                            target_size: Tuple[int, int] = (1152, 896),
                            target_scale: Optional[float] = None, gs_255: bool = False,
                            equalize_hist: bool = False, rescale_factor: Optional[float] = None,
                            dup_3_channels: bool = False, data_format: Optional[str] = None,
                            classes: Optional[Sequence[str]] = None,
                            class_mode: Optional[str] = "categorical",
                            auto_batch_balance: Union[bool, float] = False,
                            batch_size: int = 32,
                            preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                            shuffle: bool = True, seed: Optional[int] = None,
                            balance_classes: Union[bool, float] = False,
                            no_pos_skip: float = 0., follow_links: bool = False,
                            cache_dir: Optional[PathLike] = None) -> Any:
        """Iterate over a folder with one subfolder per class (see :class:`DMDirectoryIterator`).

        ``cache_dir``: keep each image, read and resized, as a ``.npy`` file there (see
        :func:`cached_read`); epochs after the first, and later runs, skip the decoding.
        """
        return _sequence_class("DMDirectoryIterator")(
            directory, self, target_size=target_size, target_scale=target_scale,
            gs_255=gs_255, equalize_hist=equalize_hist, rescale_factor=rescale_factor,
            dup_3_channels=dup_3_channels, data_format=data_format, classes=classes,
            class_mode=class_mode, auto_batch_balance=auto_batch_balance,
            batch_size=batch_size, preprocess=preprocess, shuffle=shuffle, seed=seed,
            balance_classes=balance_classes, no_pos_skip=no_pos_skip, follow_links=follow_links,
            cache_dir=cache_dir)


def to_sparse(y: np.ndarray) -> np.ndarray:
    """Class indices from labels: one-hot / probability rows -> argmax; 1-D -> as int.

    Args:
        y: (N,) class indices or (N, nb_class) one-hot / probability matrix.

    Returns:
        int64 array of shape (N,).
    """
    y = np.asarray(y)
    if y.ndim == 1:
        return y.astype(np.int64)
    if y.ndim == 2:
        return np.argmax(y, axis=1).astype(np.int64)
    raise ValueError(f"labels should be (N,) indices or (N, nb_class) one-hot, got shape "
                     f"{y.shape}")


def index_balancer(index_array: np.ndarray, classes: np.ndarray, ratio: float,
                   rng: np.random.RandomState) -> np.ndarray:
    """Resample a batch's indices so negatives and positives come at a ``ratio`` : 1 rate.

    2017 semantics: class 1 is positive, every other class negative. The same number of
    indices is drawn with replacement, each positive with probability proportional to
    ``1 / nb_pos`` and each negative to ``ratio / nb_neg``, so the expected neg:pos ratio of
    the result is ``ratio``; the result is sorted (repeated files are then read once).

    Args:
        index_array: (N,) sample indices of a batch.
        classes: (N,) class of each index (1 = positive).
        ratio: desired negatives per positive (> 0).
        rng: ``np.random.RandomState`` or ``np.random.Generator``.

    Returns:
        Sorted (N,) array of indices drawn from ``index_array``.
    """
    _positive("ratio", ratio)
    index_array, classes = np.asarray(index_array), np.asarray(classes)
    if index_array.shape != classes.shape or index_array.ndim != 1:
        raise ValueError(f"index_array and classes should be 1-D of equal length, got "
                         f"{index_array.shape} and {classes.shape}")
    n = len(index_array)
    if n == 0:
        return index_array.copy()
    pos = classes == 1
    probs = np.where(pos, n / (pos.sum() + 1e-7), ratio * n / ((~pos).sum() + 1e-7))
    chosen = rng.choice(index_array, n, p=probs / probs.sum())
    chosen.sort()
    return chosen


def batch_balance_weights(labels: np.ndarray) -> np.ndarray:
    """Sample weights 1 / (fraction of the sample's class in the batch) (auto_batch_balance).

    Every class present in the batch then carries the same total weight (the batch size).

    Args:
        labels: int class index per sample, shape (B,).

    Returns:
        float32 array (B,).
    """
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return (float(len(labels)) / counts[inverse]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Iterators: batches of a folder or of in-memory images (tf-keras Sequences whose classes are
# made on first use).
# ----------------------------------------------------------------------------------------------


#: Public iterator class name -> name of its implementation class in this module.
_SEQUENCE_CLASSES = {"DMDirectoryIterator": "_DirectoryIterator",
                     "DMNumpyArrayIterator": "_ArrayIterator"}
_SEQUENCE_LOCK = threading.Lock()


def _sequence_class(name: str) -> type:
    """The public iterator class ``name``: its implementation + ``tf_keras.utils.Sequence``.

    tf-keras recognises a data set as a ``Sequence`` only by ``isinstance``, while importing
    this module must not load TensorFlow. So each public iterator class is made on first use
    (importing tf-keras then) and kept as a module attribute, where pickle finds it, also in
    loader worker processes.
    """
    cls = globals().get(name)
    if cls is None:
        with _SEQUENCE_LOCK:
            cls = globals().get(name)
            if cls is None:
                import tf_keras as keras

                impl = globals()[_SEQUENCE_CLASSES[name]]
                cls = type(name, (impl, keras.utils.Sequence),
                           {"__module__": __name__, "__qualname__": name,
                            "__doc__": impl.__doc__})
                globals()[name] = cls
    return cls


def __getattr__(name: str):
    """Module attribute hook: ``dm_image.DMDirectoryIterator`` etc. made on first access."""
    if name in _SEQUENCE_CLASSES:
        return _sequence_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class _Batching:
    """How an iterator makes its batches (the iterators' arguments of the same names):
    ``batch_size``; ``shuffle`` and ``seed`` (None: a random one) of the epoch order;
    ``auto_batch_balance`` (sample weights balancing the classes of each batch);
    ``balance_classes`` (negatives per positive, resampled per batch; 0/False: off) and
    ``no_pos_skip`` (probability of leaving out a class-0 sample, per epoch)."""
    batch_size: int = 32
    shuffle: bool = True
    seed: Optional[int] = None
    auto_batch_balance: bool = False
    balance_classes: Union[bool, float] = False
    no_pos_skip: float = 0.


class _DMIterator:
    """Common batching, shuffling, class subsampling and sample weights of the iterators.

    Batch ``i`` of an epoch depends only on (seed, epoch, i), so tf-keras may fetch batches in
    any order and with several workers (threads or processes). ``on_epoch_end`` (called by
    ``model.fit``, or by ``next()`` at the end of an epoch) draws the next epoch's order.
    The public classes :class:`DMDirectoryIterator` and :class:`DMNumpyArrayIterator` are
    these implementations with ``tf_keras.utils.Sequence`` as a further base (see
    :func:`_sequence_class`).
    """

    def __init__(self, n, labels, nb_class, class_mode, image_data_generator,
                 batching: _Batching, dup_3_channels, preprocess, data_format):
        super().__init__()
        batch_size, no_pos_skip = batching.batch_size, batching.no_pos_skip
        auto_batch_balance, balance_classes = batching.auto_batch_balance, batching.balance_classes
        _positive_int("batch_size", batch_size)
        if class_mode not in _CLASS_MODES + ("raw",):
            raise ValueError(f"class_mode should be one of {_CLASS_MODES}, got {class_mode!r}")
        if data_format is None:
            data_format = image_data_generator.data_format
        if data_format not in _DATA_FORMATS:
            raise ValueError(f"data_format should be one of {_DATA_FORMATS}, got {data_format!r}")
        if not 0 <= no_pos_skip < 1:
            raise ValueError(f"no_pos_skip should be a probability in [0, 1), got {no_pos_skip}")
        if (labels is None or class_mode is None) and (auto_batch_balance or balance_classes
                                                       or no_pos_skip):
            raise ValueError("auto_batch_balance, balance_classes and no_pos_skip need labels "
                             "(class_mode is None or y was not given)")
        self.n = int(n)
        self.classes = labels
        self.nb_class = nb_class
        self.class_mode = class_mode
        self.image_data_generator = image_data_generator
        self.batch_size = int(batch_size)
        self.shuffle = batching.shuffle
        self.seed = (int(np.random.randint(2 ** 31 - 1)) if batching.seed is None
                     else int(batching.seed))
        self.auto_batch_balance = auto_batch_balance
        self.balance_classes = balance_classes
        self.no_pos_skip = float(no_pos_skip)
        self.dup_3_channels = dup_3_channels
        self.preprocess = preprocess
        self.data_format = data_format
        self.epoch = 0
        self.index_array = self._epoch_index(0)
        self.batch_index = 0
        self._lock = threading.Lock()

    # -- sizes and aliases ----------------------------------------------------------------
    @property
    def nb_sample(self) -> int:
        """Number of samples (2017 name; also ``samples`` and ``n``)."""
        return self.n

    @property
    def samples(self) -> int:
        return self.n

    @property
    def labels(self) -> np.ndarray:
        """Class index per sample (same array as ``classes``)."""
        return self.classes

    def __len__(self) -> int:
        return int(math.ceil(len(self.index_array) / self.batch_size))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):  # e.g. in a loader worker process
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- epoch order ----------------------------------------------------------------------
    def _epoch_index(self, epoch: int) -> np.ndarray:
        """Sample order of an epoch: ``no_pos_skip`` subsampling, then a seeded shuffle."""
        rng = np.random.RandomState([self.seed, epoch, 0])
        index = np.arange(self.n)
        if self.no_pos_skip > 0:
            neg = index[self.classes[index] == 0]
            keep = int(round((1.0 - self.no_pos_skip) * len(neg)))
            drop = rng.choice(neg, size=len(neg) - keep, replace=False)
            index = index[~np.isin(index, drop)]
        if self.shuffle:
            index = rng.permutation(index)
        return index

    def on_epoch_end(self) -> None:
        """Advance to the next epoch: new order (when shuffling/subsampling), new draws."""
        self.epoch += 1
        self.index_array = self._epoch_index(self.epoch)

    def reset(self) -> None:
        """Restart ``next()`` at the first batch of the current epoch."""
        self.batch_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch`` (0-based): its order and draws, as if it came next.

        A resumed training run sets the epoch it continues at, so that its batches are those
        an uninterrupted run would have drawn.
        """
        with self._lock:
            self.epoch = int(epoch)
            self.index_array = self._epoch_index(self.epoch)
            self.batch_index = 0

    # -- batches --------------------------------------------------------------------------
    def _plan(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"batch index {i} out of range for {len(self)} batches")
        idx = self.index_array[i * self.batch_size:(i + 1) * self.batch_size]
        if self.balance_classes:  # 2017: resampled per batch, with replacement
            idx = index_balancer(idx, self.classes[idx], self.balance_classes,
                                 np.random.RandomState([self.seed, self.epoch, i + 1, 1]))
        rng = np.random.RandomState([self.seed, self.epoch, i + 1])
        return idx, rng, (i + 1) * self.batch_size

    def __getitem__(self, i):
        return self._batch(*self._plan(i))

    def next(self) -> Any:
        """Next batch; wraps around into a new epoch (the 2017 iterators were endless)."""
        with self._lock:
            if self.batch_index >= len(self):
                self.on_epoch_end()
                self.batch_index = 0
            plan = self._plan(self.batch_index)
            self.batch_index += 1
        return self._batch(*plan)

    __next__ = next

    def _encode_labels(self, idx: np.ndarray):
        labels = self.classes[idx]
        if self.class_mode in ("sparse", "binary"):
            return labels.astype(np.float32)
        if self.class_mode == "categorical" and self.nb_class is not None:
            y = np.zeros((len(idx), self.nb_class), dtype=np.float32)
            y[np.arange(len(idx)), labels] = 1.0
            return y
        return labels

    def _batch(self, idx, rng, fallback_start):
        x, used = self._load_batch(idx, rng, fallback_start)
        if self.data_format == "channels_first":
            x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
        if self.preprocess is not None:
            x = self.preprocess(x)
        y = self._batch_y(used)
        if y is None:
            return x
        if self.auto_batch_balance:
            return x, y, batch_balance_weights(self.classes[used])
        return x, y

    def _batch_y(self, used):
        return None if self.class_mode is None else self._encode_labels(used)

    def _load_batch(self, idx, rng, fallback_start):
        """Return (x (B, H, W, C) float32 channels-last, sample indices used)."""
        raise NotImplementedError

    @property
    def recipe(self) -> InputRecipe:
        """The :class:`InputRecipe` of this iterator's images (size, scaling, equalisation,
        channels, the generator's featurewise centring); ``preprocess`` is held as the
        callable ``self.preprocess``, outside the recipe."""
        gen = self.image_data_generator
        return InputRecipe(
            img_size=getattr(self, "target_size", None), channels=3 if self.dup_3_channels else 1,
            img_scale=self.target_scale, rescale_factor=self.rescale_factor,
            equalize_hist=self.equalize_hist, featurewise_center=gen.featurewise_center,
            featurewise_mean=gen.mean if gen.featurewise_center else None)

    def _process(self, out, stored, rng):
        self.image_data_generator.process_stored(out, stored, rng, recipe=InputRecipe(
            img_scale=self.target_scale, rescale_factor=self.rescale_factor,
            equalize_hist=self.equalize_hist))


class _DirectoryIterator(_DMIterator):
    """Batches of mammograms read from ``directory/<class>/...`` (a tf-keras ``Sequence``).

    File order is deterministic: classes in the order given (default: subfolder names sorted),
    within each class the files found recursively, folders and names sorted; ``filenames``
    holds the paths relative to ``directory`` in that order and ``classes`` the class index of
    each. Accepted extensions: png, jpg, jpeg, pgm, tif, tiff, dcm (any case).

    Per image, with the values of :func:`read_resize_img` (``target_size``,
    ``gs_255``, then ``target_scale`` and ``rescale_factor``; the file is read and resized
    once and kept in its integer levels, scaled per batch by the same float32 operations) ->
    optional histogram equalisation (:func:`hist_equalize`: the 0..255 image truncated to
    uint8, ``cv2.equalizeHist``; an image outside 0..255 is first scaled by its maximum)
    -> random transform of the single channel -> copy to 3 channels when ``dup_3_channels``
    (channel shift per channel) -> standardize (featurewise centring).
    ``preprocess`` is then applied to the whole float32 batch. Batches are ``x`` (class_mode
    None), ``(x, y)`` or, with ``auto_batch_balance``, ``(x, y, sample_weight)``.

    Class subsampling (2017 meanings): ``balance_classes`` is a negatives-per-positive ratio;
    each batch's indices are resampled with replacement by :func:`index_balancer` (class 1
    positive, others negative), so batches keep their size. ``no_pos_skip`` is the probability
    of leaving out a sample of class 0 (the negatives): each epoch keeps every sample of the
    other classes and a random ``round((1 - no_pos_skip) * n_class0)`` of class 0 (a fixed
    count, so that every epoch has the same number of batches).

    ``cache_dir`` keeps every image, read and resized, as a ``.npy`` file (:func:`cached_read`):
    the first epoch decodes the files, later epochs and later runs load the small arrays (what
    ``load_dat_ram`` does in memory, on disk instead). Batches are the same with or without it.

    An unreadable file is skipped: it is replaced in its batch by the next readable sample of
    the epoch order, logged once with ``logger.warning`` and listed in ``skipped_files`` (with
    ``use_multiprocessing`` the worker processes log it; the list is per process). An image
    whose levels do not fit ``rescale_factor`` (an 8-bit file among 16-bit ones, or the reverse:
    :func:`intensity_scale_problem`) is used as read but reported once with
    ``logger.warning`` and listed in ``scale_mismatch_files``.
    """

    def __init__(self, directory, image_data_generator, target_size=(1152, 896),
                 target_scale=None, gs_255=False, equalize_hist=False, rescale_factor=None,
                 dup_3_channels=False, data_format=None, classes=None,
                 class_mode="categorical", auto_batch_balance=False, batch_size=32,
                 preprocess=None, shuffle=True, seed=None, balance_classes=False,
                 no_pos_skip=0., follow_links=False, cache_dir=None):
        self.directory = os.fspath(directory)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        if class_mode not in _CLASS_MODES:
            raise ValueError(f"class_mode should be one of {_CLASS_MODES}, got {class_mode!r}")
        if len(target_size) != 2:
            raise ValueError(f"target_size should be (height, width), got {target_size!r}")
        self.target_size = (_positive_int("target_size[0]", target_size[0]),
                            _positive_int("target_size[1]", target_size[1]))
        if target_scale is not None:
            _positive("target_scale", target_scale)
        if rescale_factor is not None:
            _positive("rescale_factor", rescale_factor)
        self.target_scale, self.gs_255 = target_scale, gs_255
        self.rescale_factor, self.equalize_hist = rescale_factor, equalize_hist
        class_names, self.filenames, labels = list_class_images(
            self.directory, classes, follow_links)
        self.class_indices = {name: i for i, name in enumerate(class_names)}
        self.skipped_files = []
        self.scale_mismatch_files = []
        self._bad, self._scale_checked = set(), set()
        batching = _Batching(batch_size, shuffle, seed, auto_batch_balance, balance_classes,
                             no_pos_skip)
        super().__init__(len(self.filenames), labels, len(class_names), class_mode,
                         image_data_generator, batching, dup_3_channels, preprocess, data_format)
        logger.info("Found %d images belonging to %d classes in %s", self.n, len(class_names),
                    self.directory)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        c = 3 if self.dup_3_channels else 1
        if self.data_format == "channels_first":
            return (c,) + self.target_size
        return self.target_size + (c,)

    def ram_flow_kwargs(self) -> dict:
        """Keyword arguments for ``generator.flow(X, y, **kw)`` over this iterator's RAM cache.

        The per-image settings (``target_scale``, ``rescale_factor``, ``equalize_hist``,
        ``dup_3_channels``, ``preprocess``, ``data_format``) plus ``auto_batch_balance``,
        ``balance_classes`` and ``no_pos_skip``; add batch_size/shuffle/seed as wanted.
        """
        return dict(target_scale=self.target_scale, rescale_factor=self.rescale_factor,
                    equalize_hist=self.equalize_hist, dup_3_channels=self.dup_3_channels,
                    preprocess=self.preprocess, data_format=self.data_format,
                    auto_batch_balance=self.auto_batch_balance,
                    balance_classes=self.balance_classes, no_pos_skip=self.no_pos_skip)

    def read_base(self, j: int) -> np.ndarray:
        """Image ``j`` read and resized, in stored form (raises ImageReadError).

        :func:`read_resize_img` without scaling, kept as uint16 (the file's levels; float32
        if they are not integers in 0..65535). Scaling is applied when the batch is made.
        With ``cache_dir`` the stored form is taken from / kept in the disk cache.
        """
        path = os.path.join(self.directory, self.filenames[j])
        if self.cache_dir is None:
            return _stored_form(read_resize_stored(path, target_size=self.target_size,
                                               gs_255=self.gs_255))
        return cached_read(path, self.cache_dir, self.target_size, self.gs_255)

    def _read_or_skip(self, j: int) -> Optional[np.ndarray]:
        if j in self._bad:
            return None
        try:
            img = self.read_base(j)
        except OSError as exc:
            with self._lock:
                if j not in self._bad:
                    self._bad.add(j)
                    self.skipped_files.append(self.filenames[j])
                    logger.warning("skipping unreadable image (%d skipped so far): %s",
                                   len(self.skipped_files), exc)
            return None
        if j not in self._scale_checked and img.size:
            problem = intensity_scale_problem(float(img.max()), self.rescale_factor,
                                              self.target_scale)
            with self._lock:
                self._scale_checked.add(j)
                if problem is not None:
                    self.scale_mismatch_files.append(self.filenames[j])
                    logger.warning("image %s: %s (%d such images so far)",
                                   os.path.join(self.directory, self.filenames[j]), problem,
                                   len(self.scale_mismatch_files))
        return img

    def _load_batch(self, idx, rng, fallback_start):
        height, width = self.target_size
        x = np.empty((len(idx), height, width, 3 if self.dup_3_channels else 1), np.float32)
        used, prev = [], (None, None)
        order, n_order = self.index_array, len(self.index_array)
        for j in idx:
            if j == prev[0]:  # balance_classes repeats indices (sorted): read once
                img, cand, tries = prev[1], j, 0
            else:
                img, cand, tries = self._read_or_skip(j), j, 0
                prev = (j, img)
            while img is None and tries < n_order:
                cand = order[(fallback_start + tries) % n_order]
                tries += 1
                img = self._read_or_skip(cand)
            if img is None:
                raise ImageReadError(self.directory, "no readable image left in the folder")
            self._process(x[len(used)], img, rng)
            used.append(cand)
        return x, np.asarray(used, dtype=np.int64)


class _ArrayIterator(_DMIterator):
    """Batches from images held in memory (a tf-keras ``Sequence``), e.g. the RAM cache.

    ``X`` is either the stored form from :func:`load_dat_ram`, (N, H, W) uint8/uint16 (or
    float) at target size, expanded per batch exactly as :class:`DMDirectoryIterator` does from
    disk (``target_scale``, ``rescale_factor``, ``equalize_hist``, ``dup_3_channels``), or
    (N, H, W, C) / (N, C, H, W) float images used as they are (the 2017 behaviour: random
    transform and standardize only). ``y`` is returned per batch as given (one-hot rows or
    class indices); class indices for weights and subsampling are its argmax (2-D) or values.
    With the same ``seed`` and labels a directory iterator and this iterator over its
    :func:`load_dat_ram` cache yield identical batches, augmentation included.
    """

    def __init__(self, X, y, image_data_generator, batch_size=32, shuffle=True, seed=None,
                 auto_batch_balance=False, balance_classes=False, no_pos_skip=0.,
                 target_scale=None, rescale_factor=None, equalize_hist=False,
                 dup_3_channels=False, preprocess=None, data_format=None):
        X = np.asarray(X)
        if X.ndim not in (3, 4):
            raise ValueError(f"X should be (N, H, W) stored images or (N, H, W, C) images, "
                             f"got shape {X.shape}")
        if y is not None and len(y) != len(X):
            raise ValueError(f"X and y should have the same length, got {len(X)} and {len(y)}")
        self.X, self.y = X, None if y is None else np.asarray(y)
        self.stored_form = X.ndim == 3
        self.target_scale, self.rescale_factor = target_scale, rescale_factor
        self.equalize_hist = equalize_hist
        labels, nb_class = None, None
        if self.y is not None:
            labels = (np.argmax(self.y, axis=1) if self.y.ndim == 2 else self.y).astype(np.int64)
            nb_class = self.y.shape[1] if self.y.ndim == 2 else int(labels.max()) + 1
        batching = _Batching(batch_size, shuffle, seed, auto_batch_balance, balance_classes,
                             no_pos_skip)
        super().__init__(len(X), labels, nb_class, None if y is None else "raw",
                         image_data_generator, batching, dup_3_channels, preprocess, data_format)

    def _batch_y(self, used):
        return None if self.y is None else self.y[used]

    def _load_batch(self, idx, rng, fallback_start):
        X = self.X
        if self.stored_form:
            shape = X.shape[1:] + (3 if self.dup_3_channels else 1,)
        elif self.data_format == "channels_first":
            shape = (X.shape[2], X.shape[3], X.shape[1])
        else:
            shape = X.shape[1:]
        x = np.empty((len(idx),) + shape, dtype=np.float32)
        for k, j in enumerate(idx):
            if self.stored_form:
                self._process(x[k], X[j], rng)
            else:
                img = X[j] if shape == X.shape[1:] else np.moveaxis(X[j], 0, -1)
                self.image_data_generator.process_image(x[k], np.asarray(img, np.float32), rng)
        return x, np.asarray(idx)


# ----------------------------------------------------------------------------------------------
# Caches: stored-form images on disk (.npy) and in RAM.
# ----------------------------------------------------------------------------------------------


def _stored_form(img: np.ndarray) -> np.ndarray:
    """Integer form of an unscaled image: uint8 or uint16 when lossless, else as is."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return img.astype(np.uint8) if img.size and img.max() <= 255 else img
    if img.size == 0 or img.min() < 0 or not np.array_equal(np.floor(img), img):
        return img
    top = img.max()
    if top <= 255:
        return img.astype(np.uint8)
    return img.astype(np.uint16) if top <= 65535 else img


_CACHE_VERSION = 1


def _cache_file(path: str, cache_dir: str, target_size, gs_255: bool) -> str:
    st = os.stat(path)
    key = "|".join(str(v) for v in (_CACHE_VERSION, os.path.abspath(path), st.st_size,
                                    st.st_mtime_ns, tuple(int(t) for t in target_size),
                                    bool(gs_255)))
    name = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return os.path.join(cache_dir, f"{name}.npy")


def cached_read(path: PathLike, cache_dir: PathLike, target_size: Tuple[int, int],
                gs_255: bool = False) -> np.ndarray:
    """An image read and resized to ``target_size``, in stored form, through a disk cache.

    The first call decodes the file with :func:`read_resize_img` and keeps the result (uint16
    or uint8 levels, single channel, 2.06 MB for a 1152x896 16-bit image) as
    ``<cache_dir>/<sha1>.npy``; later calls load that file instead of decoding the original
    (a full-size 16-bit PNG takes ~0.1 s to decode, the ``.npy`` a few ms). The key is made of
    the file's absolute path, size and modification time, ``target_size`` and ``gs_255``, so an
    edited or replaced image is read again. Cache files are written atomically (a temporary file
    renamed into place), so parallel loaders and crashed runs never leave a partial entry; a
    cache entry that cannot be read is decoded again, and a cache that cannot be written is
    reported once and skipped. The folder may be deleted at any time.

    Args:
        path: image file (any format :func:`read_image` reads).
        cache_dir: folder for the cache files (created if missing).
        target_size: (height, width) as in :func:`read_resize_img`.
        gs_255: as in :func:`read_resize_img`.

    Returns:
        (H, W) uint16/uint8 array (float32 when the levels are not integers in 0..65535),
        equal to ``read_resize_img(path, target_size, gs_255)`` in value.

    Raises:
        ImageReadError: the image file is missing or unreadable.
    """
    path, cache_dir = os.fspath(path), os.fspath(cache_dir)
    try:
        cfile = _cache_file(path, cache_dir, target_size, gs_255)
    except OSError as exc:
        raise ImageReadError(path, f"cannot stat file: {exc}") from exc
    try:
        img = np.load(cfile, allow_pickle=False)
        if img.shape == tuple(int(t) for t in target_size):
            return img
    except (OSError, ValueError):
        pass  # not cached yet, or a damaged entry: decode again
    img = _stored_form(read_resize_stored(path, target_size=target_size, gs_255=gs_255))
    try:
        atomic_write(cfile, lambda fh: np.save(fh, img, allow_pickle=False))
    except OSError as exc:
        _warn_once(f"image cache {cache_dir} cannot be written ({exc}); reading without it")
    return img


def load_dat_ram(generator: Any, nb_samples: Optional[int] = None, verbose: bool = True
                 ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Load a data set into RAM, images in their stored form (2017 name ``load_dat_ram``).

    For a :class:`DMDirectoryIterator` every file is read once in ``filenames`` order (not
    shuffled), resized to the iterator's ``target_size`` in the file's dtype and kept as
    uint16 (uint8 when every value fits, e.g. 8-bit patches) single-channel images: 2.06 MB per
    1152x896 16-bit image instead of 12.4 MB of float32 RGB. Images whose values are not
    integers in 0..65535 make the whole cache float32. Unreadable files are skipped (logged,
    added to the iterator's ``skipped_files``). Expand the cache to float32 batches with
    ``DMImageDataGenerator.flow(X, y, target_scale=..., rescale_factor=...,
    equalize_hist=..., dup_3_channels=...)`` using the iterator's settings; the batches equal
    those read from disk.

    ``it.ram_flow_kwargs()`` gives those settings:
    ``X, y = load_dat_ram(it); gen.flow(X, y, batch_size=..., **it.ram_flow_kwargs())``.

    Any other iterable of batches is consumed as in 2017: ``(x, y)`` batches are concatenated
    until ``nb_samples`` samples (required then).

    Args:
        generator: a DMDirectoryIterator, or an iterator of (x, y[, w]) batches.
        nb_samples: number of samples to load (default: all files of a directory iterator).
        verbose: show progress (:func:`progress`) while reading a directory iterator's files.

    Returns:
        (X, y): X (N, H, W) uint8/uint16/float32 stored images (or the concatenated batches),
        y labels encoded per the iterator's ``class_mode`` (None for class_mode None).
    """
    if not isinstance(generator, _DirectoryIterator):
        if nb_samples is None:
            raise ValueError("nb_samples is required to load batches from a generic generator")
        xs, ys, total = [], [], 0
        while total < nb_samples:
            batch = next(generator)
            xs.append(batch[0])
            ys.append(batch[1])
            total += len(batch[0])
        return np.concatenate(xs)[:nb_samples], np.concatenate(ys)[:nb_samples]
    n = generator.n if nb_samples is None else min(int(nb_samples), generator.n)
    X = np.empty((n,) + generator.target_size, dtype=np.uint16)
    kept = []
    with progress(n, f"loading {generator.directory} into RAM", verbose=verbose) as bar:
        for j in range(n):
            img = generator._read_or_skip(j)
            bar.update()
            if img is None:
                continue
            if img.dtype not in (np.uint8, np.uint16) and X.dtype == np.uint16:
                X = X.astype(np.float32)
            X[len(kept)] = img
            kept.append(j)
    X = X[:len(kept)] if len(kept) < n else X
    if X.dtype == np.uint16 and (generator.gs_255 or (X.size and X.max() <= 255)):
        X = X.astype(np.uint8)
    kept = np.asarray(kept, dtype=np.int64)
    y = None if generator.class_mode is None else generator._encode_labels(kept)
    return X, y


# ----------------------------------------------------------------------------------------------
# Prediction: model input from image files, patch-classifier heatmaps.
# ----------------------------------------------------------------------------------------------


def read_img_for_pred(fname: PathLike, equalize_hist: bool = False,
                      data_format: Optional[str] = None, dup_3_channels: bool = True,
                      transformer: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                      standardizer: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                      target_size: Optional[Sequence[int]] = None,
                      target_height: Optional[int] = None,
                      target_scale: Optional[float] = None,
                      rescale_factor: Optional[float] = None) -> np.ndarray:
    """Read one image and shape it as a network input (no batch axis).

    The steps of an :class:`InputRecipe` without normalisation: read and resize, scale
    (``target_scale``, ``rescale_factor``), optional :func:`hist_equalize` (0..255, the rule
    of the training generators), a channel axis, copied into 3 channels when
    ``dup_3_channels``; then ``transformer(x)`` and ``standardizer(x)`` when given (e.g. a
    generator's ``random_transform`` / ``standardize``).

    Args:
        fname: image file (see :func:`read_image`).
        equalize_hist: equalise the histogram.
        data_format: "channels_last" (default when None) or "channels_first".
        dup_3_channels: 3 identical channels (ImageNet backbones) instead of 1.
        transformer: callable applied to the (H, W, C) array.
        standardizer: callable applied after ``transformer``.
        target_size, target_height, target_scale, rescale_factor: as in
            :func:`read_resize_img`.

    Returns:
        float32 array (H, W, C) (or (C, H, W) for channels_first), C = 3 or 1, intensity
        scale that of ``read_resize_img`` (or 0..255 after equalisation) unless the callables
        change it.
    """
    data_format = data_format or "channels_last"
    if data_format not in _DATA_FORMATS:
        raise ValueError(f"data_format should be one of {_DATA_FORMATS}, got {data_format!r}")
    recipe = InputRecipe.from_options(dict(
        img_size=target_size, img_height=target_height, img_scale=target_scale,
        rescale_factor=rescale_factor, equalize_hist=equalize_hist),
        channels=3 if dup_3_channels else 1)
    # read_resize_stored wants exactly one size (the recipe would keep the stored size)
    x = recipe.to_input(recipe.intensities(read_resize_stored(fname, target_size,
                                                              target_height)))
    if data_format == "channels_first":
        x = np.ascontiguousarray(np.moveaxis(x, -1, 0))
    x = transformer(x) if transformer is not None else x
    x = standardizer(x) if standardizer is not None else x
    return x


def _model_channels(model) -> int:
    """Channel count of a channels-last image model's input (3 when it cannot be told)."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list):
        shape = shape[0]
    return int(shape[-1]) if shape is not None and len(shape) == 4 and shape[-1] else 3


def _predict_sweep(img: np.ndarray, patch_size: int, stride: int, model, batch_size: int,
                   recipe: InputRecipe,
                   preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                   parallelized: bool = False) -> np.ndarray:
    """Sweep one prepared image with ``model`` chunk by chunk; (nb_row, nb_col, nb_class).

    Each chunk of patches becomes model input through ``recipe.patches_to_input``.
    """
    nb_row, nb_col, y_gap, x_gap = _sweep_grid(img.shape, patch_size, stride)
    windows = np.lib.stride_tricks.sliding_window_view(img, (patch_size, patch_size))
    windows = windows[y_gap::stride, x_gap::stride][:nb_row, :nb_col]  # a view, no copy
    chunk = batch_size * max(1, 2048 // batch_size)  # patches copied per step: bounded memory
    preds = []
    for start in range(0, nb_row * nb_col, chunk):
        flat = np.arange(start, min(start + chunk, nb_row * nb_col))
        x = recipe.patches_to_input(windows[flat // nb_col, flat % nb_col], preprocess)
        padded = parallelized and len(x) % 2 == 1
        if padded:  # an even count splits evenly over 2 GPUs, as in 2017
            x = np.concatenate([x, x[-1:]])
        pred = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
        preds.append(pred[:-1] if padded else pred)
    pred = np.concatenate(preds)
    return pred.reshape((nb_row, nb_col, pred.shape[-1]))


def get_prob_heatmap(img_list: Any, target_height: Optional[int], target_scale: Optional[float],
                     patch_size: int, stride: int, model: Any, batch_size: int,
                     featurewise_center: bool = False, featurewise_mean: float = 91.6,
                     preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                     parallelized: bool = False, equalize_hist: bool = False
                     ) -> Union[List[Optional[np.ndarray]], np.ndarray]:
    """Patch-class probability heatmaps by sweeping a patch classifier over whole images.

    Per image: read with :func:`read_resize_img` at ``target_height`` (aspect kept, stored
    intensity scale; an array is used as given), :func:`segment_breast` (cropped), a zero
    margin of ``patch_size // 2``, then the centred sweep of :func:`sweep_img_patches` at
    ``stride`` with per-patch ``target_scale`` and ``equalize_hist``; patches get the model's
    channel count (3 copies or 1); then, as in 2017, either ``featurewise_mean`` is subtracted
    (``featurewise_center``) or else ``preprocess`` is applied; ``model.predict`` in
    ``batch_size`` batches (patches are made chunk by chunk, so memory stays bounded).

    Args:
        img_list: a file name or 2-D image array, or a list of them (None gives [None]).
        target_height: resize height for files (None: keep the file's size).
        target_scale: per-patch max mapped to this value (None: no scaling).
        patch_size: patch side of the classifier (e.g. 256).
        stride: sweep step in pixels (e.g. 8).
        model: a Keras model taking (N, patch_size, patch_size, C) channels-last input and
            returning (N, nb_class) probabilities.
        batch_size: prediction batch size.
        featurewise_center, featurewise_mean: subtract this mean from every patch.
        preprocess: callable on the (N, p, p, C) float32 patches (ignored when centring).
        parallelized: pad to an even number of patches (for a 2-GPU split model).
        equalize_hist: histogram-equalise each patch (0..255).

    Returns:
        A list of float32 heatmaps (nb_row, nb_col, nb_class), one per image, rows and columns
        as in :func:`sweep_img_patches`; a single heatmap when ``img_list`` is one name/array.
    """
    if img_list is None:
        return [None]
    single = isinstance(img_list, (str, os.PathLike)) or \
        (isinstance(img_list, np.ndarray) and img_list.ndim == 2)
    recipe = InputRecipe.from_options(dict(
        img_height=target_height, img_scale=target_scale, equalize_hist=equalize_hist,
        featurewise_center=featurewise_center, featurewise_mean=featurewise_mean),
        channels=_model_channels(model))
    batch_size = _positive_int("batch_size", batch_size)
    heatmaps = []
    for item in ([img_list] if single else img_list):
        if isinstance(item, np.ndarray):
            img = item.astype(np.float32, copy=False)
        else:
            img = recipe.rescale(recipe.read_stored(item))
        img, _ = segment_breast(img)
        img = add_img_margins(img, int(patch_size) // 2)
        heatmaps.append(_predict_sweep(img, patch_size, stride, model, batch_size, recipe,
                                       preprocess, parallelized).astype(np.float32))
    return heatmaps[0] if single else heatmaps


# ----------------------------------------------------------------------------------------------
# 2017 compatibility: names kept for code written against the 2017 module.
# ----------------------------------------------------------------------------------------------


class DMImagePreprocessor:
    """2017 name space for preprocessing: ``DMImagePreprocessor.segment_breast(img, ...)``."""

    segment_breast = staticmethod(segment_breast)
