"""Plumbing shared by the command-line scripts: reading users' text files and checking values
that become parts of file names.

Text inputs (CSV tables, patient lists, image lists) are read the same way everywhere: UTF-8
with or without a byte-order mark, Windows or Unix line ends, blank lines ignored, spaces around
values stripped; undecodable bytes are an error naming the file and the line. A value read from
such a file (a patient id, a side, a view, a file name) is checked by :func:`safe_name_part`
before any path is built from it, so no row can make a script read or write outside the folders
it was given.

Importing this module also makes the root ``dm_*`` modules importable for the scripts, and it
holds what running a script needs: logging set-up, the ``main()`` wrapper that turns a user
error into one line and exit status 2, a script's defaults and resolved options, the process
pool, the options file of a run, the run's environment variables, and the preprocessing options
a model file's input recipe supplies (prediction, heatmaps, ``--resume-from``).

Environment variables (read at run time, not at import):
    NUM_CPU_CORES: data loader workers (default 4).
    TF_CPP_MIN_LOG_LEVEL: TensorFlow's C++ log level; set to 3 (errors hidden too) at import
        when not set, so that a CPU machine's CUDA start-up errors are not shown.
    NUM_GPU_DEVICES: GPUs for data-parallel training (default 1).
    RANDOM_SEED: seed for shuffling, augmentation and weight initialisation (default 12345).

Importing this module does not import TensorFlow.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Dict, FrozenSet, Iterator, List, NoReturn,
                    Optional, Sequence, Tuple, Union)

if TYPE_CHECKING:  # pandas is imported where a table is read
    import pandas as pd

# The scripts run as ``python ddsm_train/SCRIPT.py`` (from any folder) or as
# ``python -m ddsm_train.SCRIPT`` (the package then puts this folder on ``sys.path``), without
# an installed package: importing this module puts the repository root (the ``dm_*`` modules)
# and this folder (the scripts' shared modules) first on ``sys.path``. Each script imports it
# before any other module of the project, under this one name.
logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
for _folder in (str(_HERE), str(_HERE.parent)):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

#: Modules the scripts need (installed by ``make venv`` into ``.venv``).
REQUIRED_MODULES = ("numpy", "cv2", "pandas", "h5py", "tensorflow", "tf_keras")
#: The scripts that need fewer: the scorer of exported models runs without TensorFlow.
REQUIRED_MODULES_OF = {"score_exported.py": ("numpy", "cv2", "onnxruntime")}


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_environment():
    """Stop a script run by a Python that lacks the project's packages with one line saying
    how to run it in the project's environment (not a ModuleNotFoundError traceback).

    Only when a script of this folder is the program; a program importing this module gets
    the usual ImportError where a package is missing.
    """
    program = getattr(sys.modules.get("__main__"), "__file__", None)
    if not program or Path(program).resolve().parent != _HERE:
        return
    needed = REQUIRED_MODULES_OF.get(Path(program).name, REQUIRED_MODULES)
    missing = [m for m in needed if not _importable(m)]
    if missing:
        name = Path(program).name
        raise SystemExit(f"{name}: error: this Python ({sys.executable}) lacks the project's "
                         f"packages ({', '.join(missing)}); run `make venv` once in "
                         f"{_HERE.parent}, then .venv/bin/python ddsm_train/{name} ...")


_check_environment()
# TensorFlow's C++ start-up lines (e.g. the CUDA cuInit error of a machine without a GPU) are
# not shown unless asked for: set TF_CPP_MIN_LOG_LEVEL (0 shows everything) to see them.
_TF_LOG_LEVEL_GIVEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def tf_log_level_given() -> bool:
    """Whether the user set ``TF_CPP_MIN_LOG_LEVEL`` (before this module set its default):
    then TensorFlow's start-up lines are shown."""
    return _TF_LOG_LEVEL_GIVEN


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up lines hidden, unless asked for.

    TensorFlow 2.21 prints a few info lines (oneDNN, "Could not find cuda drivers") on stderr
    before its C++ logging reads ``TF_CPP_MIN_LOG_LEVEL``; the scripts that use TensorFlow call
    this first, so that stderr shows only their own messages. Nothing is hidden when the user
    set ``TF_CPP_MIN_LOG_LEVEL`` or TensorFlow is already imported; an import error is raised
    as usual (Python's own stderr is restored before it propagates).
    """
    if _TF_LOG_LEVEL_GIVEN or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)

PathLike = Union[str, os.PathLike]

__all__ = ["InputFileError", "read_text_file", "read_text_lines", "read_csv_table", "csv_text",
           "safe_name_part", "RestrictedUnpickler", "restricted_unpickle", "ROI_COLUMNS",
           "run_defaults", "resolve_options",
           "DEFAULT_NUM_CPU_CORES", "DEFAULT_NUM_GPU_DEVICES", "DEFAULT_RANDOM_SEED",
           "env_int", "get_num_cpu_cores", "get_num_gpu_devices", "get_random_seed",
           "check_environment",
           "RECIPE_OPTIONS", "apply_model_recipe", "INTERRUPTED_EXIT", "parse_command_line",
           "exit_on_interrupt", "check_unique", "UniqueValuesAction", "check_input_levels",
           "import_tensorflow_quietly", "tf_log_level_given"]

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


def read_csv_table(path: PathLike, required: Sequence[str] = (), **read_csv_kwargs: Any
                   ) -> pd.DataFrame:
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
    if kwargs.get("header", "infer") in ("infer", 0) and "names" not in kwargs:
        _check_unique_header(path, text, kwargs)
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


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The text of a CSV file: the ``header`` line, then one line per row (``\\n`` ends each)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _check_unique_header(path, text, kwargs) -> None:
    """A CSV header naming one column twice (spaces and case aside) is an error: pandas would
    rename the second copy and one of the two would be used without a word."""
    import pandas as pd

    first = pd.read_csv(io.StringIO(text), **{**kwargs, "header": None, "nrows": 1})
    names = [str(v).strip() for v in first.iloc[0].tolist()] if len(first) else []
    check_unique(names, "column", str(path), key=str.lower)


def check_unique(values: Sequence, what: str, where: str,
                 key: Optional[Callable[[Any], Any]] = None,
                 lines: Optional[Sequence] = None) -> None:
    """Raise ``InputFileError`` naming the first value that occurs twice.

    Args:
        values: the values (class names, image paths, column names).
        what: what a value is, for the message (``"class name"``).
        where: the file or flag the values come from.
        key: compare ``key(value)`` instead of the values (e.g. ``str.lower``).
        lines: where each value is (``"line 12"``), named in the message.
    """
    seen = {}
    for i, value in enumerate(values):
        k = key(value) if key else value
        if k in seen:
            at = (f" ({lines[seen[k]]} and {lines[i]})" if lines is not None else "")
            raise InputFileError(f"{where}: {what} {value!r} given twice{at}")
        seen[k] = i


class UniqueValuesAction(argparse.Action):
    """``nargs`` flag whose values must differ (``--class-list neg neg`` is a usage error)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            check_unique(values, "value", option_string)
        except InputFileError as err:
            parser.error(str(err))
        setattr(namespace, self.dest, values)


def safe_name_part(value: Any, what: str, where: Optional[str] = None) -> str:
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

    def find_class(self, module: str, name: str) -> Any:
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


def restricted_unpickle(path: PathLike, unpickler: type = RestrictedUnpickler,
                        max_bytes: int = 1 << 30) -> Any:
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


# ------------------------------------------------------------------ running a script
def setup_logging(level: int = logging.INFO) -> None:
    """Configure root logging to stdout for a script's ``main()``.

    Leaves an already configured root logger alone (a calling program or pytest owns it).
    """
    logging.basicConfig(level=level, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


#: Set this environment variable to 1 to see the traceback of a user error as well.
TRACEBACK_ENV = "DM_TRACEBACK"


def user_error_exit(parser: argparse.ArgumentParser, err: BaseException) -> NoReturn:
    """End a script on a user error: one line naming the file or value, exit status 2."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise err
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
        message = f"{err.filename}: {message}"
    parser.exit(2, f"{parser.prog}: error: {message}\n")


_user_error_exit = user_error_exit


def given_options(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
                  ) -> FrozenSet[str]:
    """The destinations of the options given on the command line ``argv`` (not defaulted).

    The parser's defaults stay as they are: ``argv`` is parsed into a namespace already
    holding a marker for every destination, which argparse leaves alone unless a flag sets it.

    Returns:
        frozenset of destination names, e.g. ``{"model", "img_dir"}``.
    """
    unset = object()
    dests = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    namespace = argparse.Namespace(**{d: unset for d in dests})
    parsed = parser.parse_args(argv, namespace=namespace)
    return frozenset(k for k, v in vars(parsed).items() if v is not unset)


def cli_main(parser: argparse.ArgumentParser, run: Callable[..., Any],
             argv: Optional[Sequence[str]] = None, validate: Optional[Callable[[dict], Any]] = None,
             pass_given: bool = False) -> Any:
    """A script's ``main()``: parse ``argv``, set up logging, ``validate(opts)``, ``run(**opts)``.

    With ``pass_given`` ``run`` also gets ``given_options``: the sorted destinations the
    command line set (:func:`given_options`), so that settings the user left out can come
    from a model file's input recipe. Returns what ``run`` returns. A user error, i.e. a
    ``ValueError`` (bad value, bad row in a CSV, unsafe model file) or an ``OSError``
    (missing, unreadable or unwritable file, full disk), ends the script with one line
    ``PROG: error: MESSAGE`` on stderr and exit status 2, without a traceback (set
    ``DM_TRACEBACK=1`` to see it). ``validate`` runs before any model or data is loaded.
    """
    args = parse_command_line(parser, argv)
    setup_logging()
    opts = vars(args)
    if pass_given:
        opts["given_options"] = sorted(given_options(parser, argv))
    with exit_on_interrupt(parser):
        try:
            check_environment()
            if validate is not None:
                validate(opts)
            return run(**opts)
        except (ValueError, OSError) as err:
            user_error_exit(parser, err)


def tool_main(get_parser: Callable[[], argparse.ArgumentParser], run: Callable[..., Any],
              pass_given: bool = False) -> Callable[[Optional[Sequence[str]]], Any]:
    """A script's ``main(argv=None)``: :func:`cli_main` of ``get_parser()`` (made afresh at
    each call) and ``run``, with ``pass_given``; it returns what ``run`` returns."""

    def main(argv: Optional[Sequence[str]] = None) -> Any:
        return cli_main(get_parser(), run, argv, pass_given=pass_given)

    main.__doc__ = (f"Command-line entry point of ``{run.__module__}``; returns what its "
                    f"``run`` returns.")
    main.__module__ = run.__module__
    return main


#: Exit status of a script stopped by Ctrl-C (SIGINT), as a shell reports it (128 + 2).
INTERRUPTED_EXIT = 130


def parse_command_line(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
                       ) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the shared number rules: every float flag refuses
    ``nan``/``inf`` and a bad number names its flag (``common_flags.use_checked_numbers``)."""
    from common_flags import use_checked_numbers

    return use_checked_numbers(parser).parse_args(argv)


@contextlib.contextmanager
def exit_on_interrupt(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn Ctrl-C (``KeyboardInterrupt``) inside the block into one line
    ``PROG: interrupted`` on stderr and exit status 130, without a traceback. The worker
    processes of :func:`parallel_map` ignore SIGINT and are stopped on the way out; thread
    pools used through ``Executor.map`` drop the tasks not yet started."""
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        parser.exit(INTERRUPTED_EXIT, f"{parser.prog}: interrupted\n")


def checked_main(parser: argparse.ArgumentParser, validate: Optional[Callable[[dict], Any]],
                 run: Callable[..., Any], argv: Optional[Sequence[str]] = None,
                 pass_given: bool = False) -> Any:
    """A training script's ``main()``: :func:`cli_main` with ``validate(opts)`` first."""
    return cli_main(parser, run, argv, validate=validate, pass_given=pass_given)


def run_defaults(run: Callable[..., Any]) -> Dict[str, Any]:
    """The defaults of ``run``'s keyword parameters, by name: a script's parser takes its flag
    defaults from them, so that ``run`` called from Python and the command line agree."""
    return {k: v.default for k, v in inspect.signature(run).parameters.items()}


def resolve_options(parser: argparse.ArgumentParser, positionals: Sequence[Any],
                    options: Dict[str, Any]) -> Dict[str, Any]:
    """Complete ``options`` with the parser's defaults (the only place defaults live).

    Args:
        parser: the script's ``get_args_parser()``.
        positionals: positional argument values, in order (e.g. the three folders).
        options: keyword options given to ``run``.

    Returns:
        dict: every option of the parser.

    The positional values are taken as given, not parsed (a folder named ``-x`` is a folder,
    not a flag); a path (``str`` or ``os.PathLike``) becomes a ``str`` (a one-item list for a
    positional that takes several), other values (a list, a model object) are kept. A
    required flag (e.g. ``--model``) must be among ``options``, whose value is kept the same.

    Raises:
        ValueError: an option the parser does not know, listing the valid ones.
    """
    slots = [a for a in parser._actions if not a.option_strings]
    if len(positionals) > len(slots):
        raise ValueError(f"{len(positionals)} positional values for {len(slots)} positional "
                         f"arguments {[a.dest for a in slots]}")
    required = [a for a in parser._actions if a.option_strings and a.required]
    for action in required:             # a required flag: its value must be among ``options``
        if action.dest not in options:
            raise ValueError(f"{action.option_strings[0]} ({action.dest}) is required")
    try:                                # ... so the parse that gives the defaults skips it
        for action in required:
            action.required = False
        resolved = vars(parser.parse_args(["POSITIONAL"] * len(positionals)))
    finally:
        for action in required:
            action.required = True
    unknown = sorted(set(options) - set(resolved))
    if unknown:
        raise ValueError(f"unknown options {unknown}; valid: {sorted(resolved)}")
    for action, value in zip(slots, positionals):
        if isinstance(value, (str, os.PathLike)):
            value = os.fspath(value)
            value = value if action.nargs in (None, "?") else [value]   # one of several
        resolved[action.dest] = value
    resolved.update(options)
    return resolved


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str,
                 verbose: bool = True, chunksize: int = 1,
                 sizes: Optional[Sequence[int]] = None) -> List[Any]:
    """``[fn(x) for x in items]`` in ``workers`` spawned processes, showing progress.

    Results keep the order of ``items``. Worker processes are started with "spawn" (forking a
    parent that has run threaded libraries such as OpenCV can deadlock the children) and run
    OpenCV single-threaded; ``fn`` must be a picklable module-level function. ``sizes``
    (one int per item, e.g. the views in a batch) weights the progress bar, in views.
    """
    from dm_image import progress

    items = list(items)
    sizes = [1] * len(items) if sizes is None else list(sizes)
    bar = progress(sum(sizes), desc, unit="view", verbose=verbose)
    results = []
    with bar:
        if workers == 1 or len(items) <= 1:
            for x, n in zip(items, sizes):
                results.append(fn(x))
                bar.update(n)
            return results
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        # Leaving the block (Ctrl-C included) terminates the workers.
        with ctx.Pool(min(workers, len(items)), initializer=_worker_init) as pool:
            for res, n in zip(pool.imap(fn, items, chunksize=chunksize), sizes):
                results.append(res)
                bar.update(n)
    return results


def _worker_init():
    """Worker set-up: OpenCV single-threaded, and Ctrl-C left to the parent process (which
    stops the pool), so a terminal's SIGINT to the whole process group prints no traceback
    per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _single_threaded_opencv()


def _single_threaded_opencv():
    import cv2

    cv2.setNumThreads(1)


def options_json_path(best_model):
    """Path of the options JSON written beside ``best_model`` (``<best_model>.options.json``)."""
    return Path(str(best_model) + ".options.json")


def log_options(options, extra=None):
    """Log resolved options and return the record saved as JSON beside the best model.

    The record is written (``<best_model>.options.json``, see :func:`options_sidecar`) right
    after the run's first model is saved, so it always describes the model next to it: a run
    that fails before producing a model leaves an earlier run's model and options file as
    they were.

    Args:
        options: mapping of option name to value (JSON-serialisable after ``str`` fallback).
        extra: optional mapping added under ``"environment"`` (e.g. resolved env variables).

    Returns:
        dict: the record (the trainers add ``input_recipe`` before the first save).
    """
    record = dict(options)
    if extra:
        record["environment"] = dict(extra)
    for key in sorted(record):
        logger.info("option %s = %r", key, record[key])
    return record


def options_sidecar(best_model, record):
    """``(path, make_text)`` of the options JSON beside ``best_model``: the ``sidecar`` of
    ``dm_keras_ext.ModelFileExtras``, written with the run's first saved model."""
    return (options_json_path(best_model),
            lambda: json.dumps(record, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------ environment of a run
DEFAULT_NUM_CPU_CORES = 4
DEFAULT_NUM_GPU_DEVICES = 1
DEFAULT_RANDOM_SEED = 12345


def env_int(name: str, default: int, minimum: Optional[int] = None,
            maximum: Optional[int] = None) -> int:
    """Read an integer environment variable.

    Args:
        name: variable name, e.g. ``"NUM_CPU_CORES"``.
        default: value when the variable is unset or empty.
        minimum: smallest accepted value (inclusive), or None.
        maximum: largest accepted value (inclusive), or None.

    Returns:
        int: the value.

    Raises:
        ValueError: the variable is not an integer or is below ``minimum``.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} should be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"environment variable {name} should be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"environment variable {name} should be <= {maximum}, got {value}")
    return value


def check_environment() -> None:
    """Check ``RANDOM_SEED``, ``NUM_CPU_CORES`` and ``NUM_GPU_DEVICES`` once, before a script
    reads or writes anything, so that a bad value is one line naming the variable rather than
    a failure of every image or view.

    Raises:
        ValueError: a variable that is not an integer or out of its range.
    """
    get_random_seed()
    get_num_cpu_cores()
    get_num_gpu_devices()


def get_num_cpu_cores() -> int:
    """``NUM_CPU_CORES`` (data loader workers), default 4."""
    return env_int("NUM_CPU_CORES", DEFAULT_NUM_CPU_CORES, minimum=1)


def get_num_gpu_devices() -> int:
    """``NUM_GPU_DEVICES`` (replicas for data-parallel training), default 1."""
    return env_int("NUM_GPU_DEVICES", DEFAULT_NUM_GPU_DEVICES, minimum=1)


def get_random_seed() -> int:
    """``RANDOM_SEED``, default 12345: an integer in [0, 2**32 - 1] (a NumPy seed)."""
    return env_int("RANDOM_SEED", DEFAULT_RANDOM_SEED, minimum=0, maximum=2 ** 32 - 1)


# ------------------------------------------------------------------ a model file's input recipe
#: Script options stored in a model's input recipe (``dm_image.InputRecipe``), option name ->
#: recipe field.
RECIPE_OPTIONS = {"img_size": "img_size", "img_scale": "img_scale",
                  "rescale_factor": "rescale_factor", "equalize_hist": "equalize_hist",
                  "featurewise_center": "featurewise_center",
                  "featurewise_mean": "featurewise_mean"}


def _as_option(value):
    """A recipe value in the form the scripts hold it (lists for sizes, floats)."""
    return list(value) if isinstance(value, tuple) else value


def apply_model_recipe(values, model_file, given, names=None, defaults=None):
    """Fill the preprocessing options the user did not give from a model file's input recipe.

    A model written by the trainers carries its ``dm_image.InputRecipe`` (HDF5 attribute);
    every option of ``names`` the user did not give takes the recipe's value (logged, listing
    them), and a given value that contradicts the recipe is kept with one warning naming both.
    A file without a recipe (a 2017 file, or one saved by other code) changes nothing: the
    flags and their 2017 defaults apply.

    Args:
        values: option name -> value (e.g. ``vars(args)``); not modified.
        model_file: path of the model file (anything else, e.g. a model object, has no recipe).
        given: names the user set explicitly; None: those whose value differs from
            ``defaults`` (a Python call; a tuple and a list of the same values do not
            differ).
        names: option name -> recipe field (default :data:`RECIPE_OPTIONS`); a field may be
            a function ``recipe -> value or None`` (None: the recipe does not say).
        defaults: option defaults (the script's parser's), used when ``given`` is None.

    Returns:
        (new values dict, the recipe or None).
    """
    import dm_image

    values = dict(values)
    if not isinstance(model_file, (str, os.PathLike)) or not os.path.isfile(model_file):
        return values, None
    recipe = dm_image.InputRecipe.from_model_file(model_file)
    if recipe is None:
        logger.info("%s holds no input recipe; preprocessing comes from the flags", model_file)
        return values, None
    names = RECIPE_OPTIONS if names is None else names
    if given is None:
        given = {k for k in names if k in values
                 and _as_option((defaults or {}).get(k)) != _as_option(values[k])}
    taken = []
    for name, field in names.items():
        stored = field(recipe) if callable(field) else getattr(recipe, field)
        if stored is None and (callable(field) or name == "featurewise_mean"):
            continue   # the recipe does not say
        stored = _as_option(stored)
        if name not in given:
            if values.get(name) != stored:
                taken.append(f"{name}={stored!r}")
            values[name] = stored
        elif not _same_value(values.get(name), stored):
            logger.warning("--%s %s contradicts the input recipe of %s (%s); using %s",
                           name.replace("_", "-"), _as_option(values.get(name)), model_file,
                           stored, _as_option(values.get(name)))
    if taken:
        logger.info("taken from the input recipe of %s: %s", model_file, ", ".join(taken))
    return values, recipe


def _same_value(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-9 * max(
            1.0, abs(float(b)))
    return a == b


# ------------------------------------------------------------------ the images' intensity scale
def check_input_levels(folders: Sequence[PathLike], rescale_factor: Optional[float],
                       img_scale: Optional[float] = None, max_images: int = 12) -> None:
    """Stop when the levels of a sample of the images do not fit ``--rescale-factor``.

    16-bit images without a factor (the networks would see levels up to 65535 instead of
    0..255: a loss of ``nan`` or a meaningless mean) and 8-bit images under the 16-bit factor
    are refused with one line naming the flag and the value to give. The sample is
    ``max_images`` files spread over all the images of ``folders``
    (``dm_image.sample_max_level``); with ``img_scale`` nothing is checked.

    Raises:
        ValueError: the message names the folder, the levels found and the flag to give.
    """
    import dm_image

    if img_scale is not None:
        return
    paths = []
    for folder in folders:
        try:
            paths += [os.path.join(os.fspath(folder), f) for f in dm_image.list_images(folder)]
        except ValueError:
            continue   # the caller reports a missing or empty folder
    top, read = dm_image.sample_max_level(paths, max_images)
    advice = dm_image.levels_scale_advice(top, rescale_factor, img_scale) if read else None
    if advice is not None:
        where = ", ".join(os.fspath(f) for f in folders)
        raise ValueError(f"{where}: {read} sampled image(s) have {advice}")
