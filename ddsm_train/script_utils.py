"""Plumbing shared by the command-line scripts: reading users' text files and checking values
that become parts of file names.

Text inputs (CSV tables, patient lists, image lists) are read the same way everywhere: UTF-8
with or without a byte-order mark, Windows or Unix line ends, blank lines ignored, spaces around
values stripped; undecodable bytes are an error naming the file and the line. A value read from
such a file (a patient id, a side, a view, a file name) is checked by :func:`safe_name_part`
before any path is built from it, so no row can make a script read or write outside the folders
it was given.

Importing this module also makes the root ``dm_*`` modules importable for the scripts.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

# The scripts run as ``python ddsm_train/SCRIPT.py``, from inside that folder, or as
# ``python -m ddsm_train.SCRIPT``, without an installed package: importing this module puts the
# repository root (the ``dm_*`` modules) and this folder (the scripts' shared modules) first
# on ``sys.path``. Each script imports it first.
_HERE = Path(__file__).resolve().parent
for _folder in (str(_HERE), str(_HERE.parent)):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

PathLike = Union[str, os.PathLike]

__all__ = ["InputFileError", "read_text_file", "read_text_lines", "read_csv_table",
           "safe_name_part", "RestrictedUnpickler", "restricted_unpickle", "ROI_COLUMNS"]

#: Columns of ``roi_mask_path.csv``, one row per lesion mask: written by prepare_cbis_ddsm and
#: make_synthetic_ddsm, read by sample_patches_combined.
ROI_COLUMNS = ["patient_id", "side", "view", "abn_num", "pathology", "type"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FORBIDDEN = ("/", "\\", ":")


class InputFileError(ValueError):
    """A user's input file (CSV, list) cannot be read or holds a bad value; names file and line."""


def read_text_file(path: PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped, line ends made ``\\n``).

    Raises:
        FileNotFoundError: no such file (the message names it).
        InputFileError: bytes that are not UTF-8, with the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise InputFileError(f"{path}, line {line}: bytes that are not UTF-8 text "
                             f"({data[err.start:err.start + 4]!r}); save the file as UTF-8"
                             ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_lines(path: PathLike) -> List[Tuple[int, str]]:
    """``(line number, stripped line)`` for every non-blank line of a text file (1-based)."""
    lines = read_text_file(path).split("\n")
    return [(i + 1, ln.strip()) for i, ln in enumerate(lines) if ln.strip()]


def read_csv_table(path: PathLike, required: Sequence[str] = (), **read_csv_kwargs):
    """A CSV file as a pandas DataFrame of stripped strings, with a ``_line`` column.

    Column names and values are stripped of surrounding spaces; blank lines are skipped; the
    ``_line`` column says where each row is in the file (``"line 12"``, or ``"data row 11"``
    when quoted values span lines), for error messages.

    Args:
        path: the CSV file.
        required: column names that must be present (an error lists the columns found).
        read_csv_kwargs: passed to :func:`pandas.read_csv` (``dtype=str`` and
            ``keep_default_na=False`` are the defaults here).

    Raises:
        FileNotFoundError, InputFileError: unreadable file, bad CSV, missing columns.
    """
    import pandas as pd

    text = read_text_file(path)
    kwargs = dict(dtype=str, keep_default_na=False, skip_blank_lines=True)
    kwargs.update(read_csv_kwargs)
    lines = text.split("\n")
    try:
        df = pd.read_csv(io.StringIO(text), **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise InputFileError(f"{path}: not a readable CSV table ({str(err).strip()})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputFileError(f"{path}: missing column(s) {missing}; columns are "
                             f"{list(df.columns)}")
    for col in df.columns:
        if pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].map(lambda v: v.strip() if isinstance(v, str) else v)
    # data rows are the non-blank lines after the header
    data_lines = [i + 1 for i, ln in enumerate(lines) if ln.strip()][1:]
    if len(data_lines) == len(df):
        df["_line"] = [f"line {n}" for n in data_lines]
    else:   # quoted fields spanning lines: fall back to the row position
        df["_line"] = [f"data row {i + 1}" for i in range(len(df))]
    return df


def safe_name_part(value, what: str, where: Optional[str] = None) -> str:
    """``value`` as a string that is safe as one component of a file name.

    Rejects what could leave the folder a path is built in or confuse a file system: empty
    values, ``.`` and ``..``, path separators (``/``, ``\\``), drive colons and control
    characters. Surrounding spaces are stripped.

    Args:
        value: the value read from a user's file.
        what: what the value is (``"patient_id"``), for the message.
        where: the file and line it came from, for the message.

    Raises:
        InputFileError: the value is not a safe name component.
    """
    text = "" if value is None else str(value).strip()
    bad = (not text or text in (".", "..") or any(c in text for c in _FORBIDDEN)
           or _CONTROL.search(text) is not None)
    if bad:
        place = f"{where}: " if where else ""
        raise InputFileError(f"{place}{what} {value!r} cannot be part of a file name "
                             f"(empty, '.', '..', a path separator or a control character)")
    return text


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only, and only as much as the file itself holds.

    Allowed: builtins and ``collections`` containers and scalars, numpy dtypes and scalars (and
    ``_codecs.encode``, which protocol 2 uses for bytes); any other global raises
    ``pickle.UnpicklingError`` naming it before anything is constructed. A constructor called
    with an integer size (``bytes(10**10)``, ``bytearray(...)``: a few bytes of pickle asking
    for gigabytes) is refused too, so what is built stays proportional to the file.
    Subclasses widen ``ALLOWED`` (e.g. numpy arrays, whose data is checked against their
    shape by numpy).
    """

    ALLOWED = frozenset({("builtins", n) for n in (
        "dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int",
        "float", "complex", "bool", "slice", "range")} | {
        ("collections", "OrderedDict"), ("collections", "defaultdict"),
        ("collections", "deque"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")})
    WHAT = "builtins/collections containers and numpy scalars are allowed"
    #: Constructors whose integer argument would be a size to allocate.
    SIZED = frozenset({("builtins", "bytes"), ("builtins", "bytearray"),
                       ("builtins", "str"), ("collections", "deque")})
    _PY2 = {"__builtin__": "builtins", "copy_reg": "copyreg"}

    def find_class(self, module, name):
        key = (self._PY2.get(module, module), name)
        if key not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only {self.WHAT}")
        found = super().find_class(module, name)
        if key not in self.SIZED:
            return found

        def checked(*args, **kwargs):
            if any(isinstance(a, int) and not isinstance(a, bool)
                   for a in list(args) + list(kwargs.values())):
                raise pickle.UnpicklingError(
                    f"refusing {key[0]}.{name} with an integer argument: it would allocate "
                    f"memory the file does not hold")
            return found(*args, **kwargs)

        return checked


def restricted_unpickle(path: PathLike, unpickler=RestrictedUnpickler,
                        max_bytes: int = 1 << 30):
    """Load a pickle through ``unpickler`` (Python 2 strings as latin-1).

    Raises:
        InputFileError: the file is larger than ``max_bytes`` or not a pickle the unpickler
            accepts (the message names the file).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise InputFileError(f"{path}: {size} bytes is more than the {max_bytes} bytes "
                             f"accepted for a pickle")
    try:
        return unpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError,
            ValueError, MemoryError, RecursionError) as err:
        raise InputFileError(f"{path}: not a readable pickle ({type(err).__name__}: "
                             f"{err})") from None
