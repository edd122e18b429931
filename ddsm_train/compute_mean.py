"""Mean pixel intensity of a folder of images, as ``--featurewise-mean`` expects it.

Every image under ``FOLDER`` (recursively: a whole-image ``train/`` folder with its ``neg/`` and
``pos/`` subfolders, or a patch folder) is read, resized to ``--img-size`` and scaled exactly as
the training generators do before featurewise centring (``--img-scale`` maps each image's
maximum, ``--rescale-factor`` multiplies the stored levels, ``--equalize-hist`` equalises), and
the mean over all pixels of all images is printed. Use the training set only. With
``--out-json PATH`` the result is also written to ``PATH`` (the mean, the image counts and the
settings it was computed with), for programs that read it rather than the printed line.

Example (CBIS-DDSM 16-bit PNGs at the 2017 whole-image size)::

    python ddsm_train/compute_mean.py whole_img/train --img-size 1152 896 \\
        --rescale-factor 0.003891
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Sequence, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)

import numpy as np  # noqa: E402

import dm_image  # noqa: E402
from common_flags import add_image_flags  # noqa: E402
import common_flags as cf  # noqa: E402
from dm_image import atomic_write  # noqa: E402
from script_utils import check_input_levels, get_num_cpu_cores  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["image_mean", "run", "get_args_parser", "main"]


def _one_image(path: str, img_size, img_scale, rescale_factor, equalize_hist):
    """(sum of pixels, pixel count, scale problem or None) of one image as the generators see it."""
    stored = dm_image.read_resize_stored(path, target_size=img_size)
    constant = dm_image.image_content_problem(stored, min_side=1)
    if constant is not None:    # no information: left out of the mean
        raise dm_image.ImageReadError(path, constant)
    problem = dm_image.intensity_scale_problem(float(stored.max()) if stored.size else 0.0,
                                               rescale_factor, img_scale)
    img = dm_image.read_resize_img(path, target_size=img_size, target_scale=img_scale,
                                   rescale_factor=rescale_factor)
    if equalize_hist:
        img = dm_image.hist_equalize(img)
    return float(np.sum(img, dtype=np.float64)), int(img.size), problem


def image_mean(folder: Union[str, os.PathLike], img_size: Sequence[int],
               img_scale: Optional[float] = None, rescale_factor: Optional[float] = None,
               equalize_hist: bool = False, workers: int = 1) -> Dict[str, object]:
    """Mean intensity of every image under ``folder`` after resizing and scaling.

    Args:
        folder: folder searched recursively for image files.
        img_size: (height, width) each image is resized to.
        img_scale: each image's maximum mapped to this value (None: not used).
        rescale_factor: stored levels multiplied by this (255/65535 for 16-bit files).
        equalize_hist: histogram-equalise as the generators do.
        workers: images decoded in parallel threads.

    Returns:
        ``{"mean": float, "images": n, "skipped": [files left out: unreadable, with non-finite
        pixels or constant],
        "scale_mismatch": [files whose levels do not fit the rescale factor]}``.

    Raises:
        ValueError: no image in the folder, or none readable.
    """
    files = [os.path.join(os.fspath(folder), f) for f in dm_image.list_images(folder)]
    total, count, skipped, mismatch = 0.0, 0, [], []

    def task(path):
        try:
            return path, _one_image(path, tuple(img_size), img_scale, rescale_factor,
                                    equalize_hist)
        except OSError as exc:
            return path, exc

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        for path, result in pool.map(task, files):
            if isinstance(result, OSError):
                skipped.append(path)
                logger.warning("skipping image: %s", result)
                continue
            total, count = total + result[0], count + result[1]
            if result[2] is not None:
                mismatch.append(path)
                logger.debug("image %s: %s", path, result[2])
    if count == 0:
        raise ValueError(f"no readable image in {os.fspath(folder)!r} ({len(skipped)} "
                         f"unreadable)")
    if mismatch:
        logger.warning("%d image(s) with levels that do not fit the rescale factor %s, e.g. "
                       "%s", len(mismatch), rescale_factor, mismatch[0])
    return {"mean": total / count, "images": len(files) - len(skipped), "skipped": skipped,
            "scale_mismatch": mismatch}


def write_result(path: Union[str, os.PathLike], result: Dict[str, object],
                 settings: Dict[str, object]) -> None:
    """Write ``result`` of :func:`image_mean` and the ``settings`` it was computed with to the
    JSON file ``path`` (atomically: a reader never sees half a file)."""
    text = json.dumps({**result, "settings": settings}, indent=2) + "\n"
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    atomic_write(path, lambda fh: fh.write(text), text=True)


def run(folder: str, img_size: Sequence[int] = (1152, 896), img_scale: Optional[float] = None,
        rescale_factor: Optional[float] = None, equalize_hist: bool = False,
        workers: Optional[int] = None, out_json: Optional[str] = None) -> Dict[str, object]:
    """Compute and print the mean (see :func:`image_mean`); returns its result, which is
    also written to ``out_json`` when given (:func:`write_result`).

    Raises:
        ValueError: a sample of the images has levels that do not fit ``rescale_factor``
            (16-bit levels without it, 8-bit levels under 255/65535): the message says which
            factor to give (``script_utils.check_input_levels``).
    """
    check_input_levels([folder], rescale_factor, img_scale)
    result = image_mean(folder, img_size, img_scale, rescale_factor, equalize_hist,
                        workers or get_num_cpu_cores())
    logger.info("%d images, %d unreadable, %d with levels that do not fit the rescale factor",
                result["images"], len(result["skipped"]), len(result["scale_mismatch"]))
    if out_json:
        write_result(out_json, result, {"folder": folder, "img_size": list(img_size),
                                        "img_scale": img_scale, "rescale_factor": rescale_factor,
                                        "equalize_hist": equalize_hist})
    print(f"{result['mean']:.4f}")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``compute_mean.py``; defaults are those of :func:`run`."""
    parser = argparse.ArgumentParser(
        description="Print the mean pixel intensity of a folder of images, computed as the "
                    "training generators compute it (the value for --featurewise-mean).")
    parser.add_argument("folder", metavar="FOLDER",
                        help="training images (searched recursively)")
    add_image_flags(parser, img_size=(1152, 896), featurewise_mean=None, equalize_hist=False,
                    centring=False)
    parser.add_argument("--workers", type=cf.positive_int, default=None,
                        help="threads decoding the images in parallel (default: NUM_CPU_CORES, "
                             "else 4)")
    parser.add_argument("--out-json", default=None, metavar="PATH",
                        help="also write the result (mean, image counts, the settings used) "
                             "to this JSON file (default: only printed)")
    return parser


main = script_utils.tool_main(get_args_parser, run)


if __name__ == "__main__":
    main()
