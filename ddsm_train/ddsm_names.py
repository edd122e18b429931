"""How CBIS-DDSM names its breasts, views, images and lesion masks, in one place.

The scripts of this folder read and write the file layout of the Curated Breast Imaging Subset
of DDSM (Lee et al., Sci Data 4, 170177 (2017)) that Shen et al., "Deep Learning to Improve
Breast Cancer Detection on Screening Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427,
trained on:

* an image (one view of one breast) is named ``{patient}_{side}_{view}``, e.g.
  ``P_00001_LEFT_CC``, with side one of :data:`SIDES` and view one of :data:`VIEWS`; its file
  is ``{name}.png`` (``full_img/``, ``whole_img/...``);
* a lesion mask is ``{Calc|Mass}-{Training|Test}_{patient}_{side}_{view}_{abn}.png``;
* an exam list (read by ``image_clf_predict.py`` and ``evaluate.py``) keys its image stems
  by :data:`EXAM_VIEWS` (``L-CC``...) and its labels by :data:`EXAM_SIDES`.

Every part a name is built from must be a plain file-name part
(:func:`script_utils.safe_name_part`): a patient id such as ``../x`` is refused with
:class:`script_utils.InputFileError` before any path is made from it.
"""
from __future__ import annotations

import os
import re
from typing import NamedTuple, Optional, Union

from script_utils import safe_name_part

__all__ = [
    "SIDES", "VIEWS", "EXAM_VIEWS", "EXAM_SIDES", "ImageName", "MaskName", "image_name",
    "parse_image_name", "split_image_stem", "mask_name", "parse_mask_name", "exam_view_side",
]

#: The breast sides, as CBIS-DDSM spells them.
SIDES = ("LEFT", "RIGHT")
#: The views of a screening mammogram: cranio-caudal, then medio-lateral oblique.
VIEWS = ("CC", "MLO")
#: The view keys of an exam list (side initial and view), in the order they are scored.
EXAM_VIEWS = ("L-CC", "R-CC", "L-MLO", "R-MLO")
#: The breast sides as an exam list's ``cancer_label`` keys spell them (``left_malignant``).
EXAM_SIDES = ("left", "right")

_IMAGE_NAME = re.compile(rf"(?P<patient>.+?)_(?P<side>{'|'.join(SIDES)})"
                         rf"_(?P<view>{'|'.join(VIEWS)})(?:$|[_.])", re.IGNORECASE)
_MASK_NAME = re.compile(r"^(?P<type>[A-Za-z]+)-(?P<split>[A-Za-z]+)_(?P<image>.+)_(?P<abn>\d+)"
                        r"\.png$")


class ImageName(NamedTuple):
    """The parts of an image name ``{patient}_{side}_{view}``."""

    patient: str
    side: str
    view: str

    @property
    def stem(self) -> str:
        """The name itself, ``{patient}_{side}_{view}`` (no extension)."""
        return f"{self.patient}_{self.side}_{self.view}"


class MaskName(NamedTuple):
    """The parts of a lesion-mask file name ``{Type}-{split}_{image}_{abn}.png``."""

    type: str       # lesion type as written (``Calc``, ``Mass``)
    split: str      # ``Training`` or ``Test`` as written
    image: str      # the image name ``{patient}_{side}_{view}``
    abn_num: int    # the lesion's number within its image


def image_name(patient: str, side: str, view: str, where: Optional[str] = None) -> str:
    """The image name ``{patient}_{side}_{view}`` (``P_00001``, ``LEFT``, ``CC`` ->
    ``P_00001_LEFT_CC``).

    Side and view are used as given (a user's table may spell them otherwise than
    :data:`SIDES` / :data:`VIEWS`); each part is stripped of surrounding spaces.

    Args:
        patient: the patient id.
        side: the breast side.
        view: the view.
        where: the file and line the parts came from, for the error message.

    Raises:
        InputFileError: a part cannot be part of a file name (empty, ``.``, ``..``, a path
            separator or a control character).
    """
    return "_".join(safe_name_part(value, what, where)
                    for what, value in (("patient_id", patient), ("side", side), ("view", view)))


def parse_image_name(name: Union[str, os.PathLike]) -> Optional[ImageName]:
    """The parts of a CBIS-style image name, or None when the name has another form.

    The file's own name is read (folders are ignored, ``/`` or ``\\``); it should start with
    ``{patient}_{side}_{view}`` with side in :data:`SIDES` and view in :data:`VIEWS` (any case;
    returned upper-cased), followed by its end, ``_`` or ``.``: ``pos/P_00003_RIGHT_CC.png``
    gives ``("P_00003", "RIGHT", "CC")``. The patient is the shortest prefix that fits, and
    everything before the side (``Mass-Training_P_1`` of a mask file name).

    Args:
        name: a file name or path.

    Returns:
        ``ImageName(patient, side, view)``, or None.
    """
    stem = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    m = _IMAGE_NAME.match(stem)
    if m is None:
        return None
    return ImageName(m["patient"], m["side"].upper(), m["view"].upper())


def split_image_stem(stem: str) -> Optional[ImageName]:
    """A file stem split into ``{patient}_{side}_{view}`` at its last two underscores, the words
    kept as written (any side and view words); None when it has fewer than two underscores.

    This is how the patch sampler matches full-image files to the rows of a user's
    ``roi_mask_path.csv``, whose side and view words it takes as they are.
    """
    parts = stem.rsplit("_", 2)
    return ImageName(*parts) if len(parts) == 3 else None


def mask_name(lesion_type: str, split: str, image: str, abn_num: int) -> str:
    """The lesion-mask file name ``{Type}-{split}_{image}_{abn}.png`` (type capitalised:
    ``mass``, ``Training``, ``P_1_LEFT_CC``, 2 -> ``Mass-Training_P_1_LEFT_CC_2.png``).

    Raises:
        InputFileError: the type or split cannot be part of a file name.
    """
    kind = safe_name_part(lesion_type, "lesion type").capitalize()
    return f"{kind}-{safe_name_part(split, 'split')}_{image}_{int(abn_num)}.png"


def parse_mask_name(name: str) -> Optional[MaskName]:
    """The parts of a lesion-mask file name ``{Type}-{split}_{image}_{abn}.png`` (type and split
    letters only, ``abn`` digits), or None for another name."""
    m = _MASK_NAME.match(name)
    if m is None:
        return None
    return MaskName(m["type"], m["split"], m["image"], int(m["abn"]))


def exam_view_side(view: str) -> str:
    """The side of an exam-list view key in :data:`EXAM_SIDES` (``L-CC`` -> ``left``), as the
    exam list's ``cancer_label`` keys ``left_malignant`` / ``right_malignant`` spell it."""
    return EXAM_SIDES[0] if view.startswith("L") else EXAM_SIDES[1]
