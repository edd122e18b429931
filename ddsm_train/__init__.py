"""The command-line scripts of the method and the modules they share.

The scripts import their sibling modules (``script_utils``, ``common_flags``, ...) and the root
``dm_*`` modules by plain names: run as files (``python ddsm_train/SCRIPT.py``) Python finds the
siblings in the script's folder and ``script_utils`` adds the repository root; run as modules
(``python -m ddsm_train.SCRIPT``) this package, imported first, adds its own folder.
"""
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.abspath(__file__))
if _HERE not in _sys.path:
    _sys.path.insert(0, _HERE)
