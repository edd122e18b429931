"""Keras extensions: model factory, optimisers, robust loading of 2017 models, training loops.

Part of the reimplementation of Shen et al., "Deep Learning to Improve Breast Cancer Detection on
Screening Mammography", Sci Rep 9, 12495 (2019); arXiv:1708.09427. Keras 2 API through tf-keras
(``import tf_keras as keras``).
"""
import logging

import numpy as np

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Section 1: model factory, optimisers, loading and saving (issue 4). Names: _MODEL_ALL.
# ----------------------------------------------------------------------------------------------
_MODEL_ALL = []

# ----------------------------------------------------------------------------------------------
# Section 2: training loops, callbacks, metrics and RAM loading (issue 5). Names: _TRAIN_ALL.
# ----------------------------------------------------------------------------------------------
_TRAIN_ALL = []

__all__ = _MODEL_ALL + _TRAIN_ALL
