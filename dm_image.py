"""Mammogram image I/O, preprocessing, patch utilities and data generators.

Part of the reimplementation of the all-convolutional whole-mammogram classifier of
Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

Pixel scale conventions used throughout (SPEC section 3): images are read in their stored dtype
(uint16 0..65535 for 16-bit PNG and DICOM, uint8 0..255 for 8-bit files), resized, converted to
float32, and optionally brought to a 0..255 scale by ``rescale_factor`` (255/65535 = 0.003891 for
16-bit PNG) before featurewise centring.
"""
import logging

import numpy as np

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Section 1: image I/O, segmentation and patch utilities (issue 2). Names: _IO_ALL.
# ----------------------------------------------------------------------------------------------
_IO_ALL = []

# ----------------------------------------------------------------------------------------------
# Section 2: data generators, iterators and augmentation (issue 3). Names: _GEN_ALL.
# ----------------------------------------------------------------------------------------------
_GEN_ALL = []

__all__ = _IO_ALL + _GEN_ALL
