"""ResNet builders and the patch-to-whole-image converter ``add_top_layers``.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.
"""
import logging

logger = logging.getLogger(__name__)

__all__ = []
