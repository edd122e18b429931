"""What a run of a script may read, write and delete: shared by every command-line tool.

Three rules hold for every tool that writes files:

* **Inputs and outputs never overlap** (:func:`check_run_paths`). Paths are compared after
  resolving links (``os.path.realpath``). An output that is an input file, that lies inside an
  input folder the run reads, or that equals another output of the same run is refused before
  anything is written, with one line naming both flags. An output folder that holds an input
  folder, or an input file that its manifest names, is refused too, so removing its earlier
  outputs can never reach an input.
* **One training run per model file** (:class:`RunLock`). A training run holds
  ``<best_model>.lock`` (created exclusively, holding its process id) while it runs; a second
  run into the same ``--best-model`` stops and names the holder's process id. A lock left by a
  killed run (its process gone) is taken over. The lock is released when the run ends, also on
  error (:func:`releases_locks`).
* **A tool deletes only what it wrote** (:class:`OutputManifest`). Each output folder gets a
  manifest, ``.ddsm_outputs.json``, naming the files (and folders) the tool wrote there. Removing
  an earlier run's outputs, and ``--overwrite``, remove only what a manifest names; a file of
  the same name that no manifest names (a user's own ``metrics.json``) stops the run unless
  ``--overwrite`` is given, and is never deleted. A folder whose manifest is another tool's is
  refused: a tool never removes what another tool wrote. Temporary files that a killed write left
  (``dm_image.atomic_write``) are removed by the next run writing into that folder. A tool
  whose file names are not known in advance saves its manifest before writing as
  ``"complete": false``, naming the folders it made; the next run takes the files of a killed
  run there as that tool's (:meth:`OutputManifest.adopt_interrupted`).

Importing this module does not import TensorFlow.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Set, Tuple, TypeVar, Union

import dm_image

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_F = TypeVar("_F", bound=Callable)

__all__ = ["RunPathError", "check_run_paths", "RunLock", "RunLockedError", "releases_locks",
           "OutputManifest", "MANIFEST_NAME", "clean_leftovers", "add_overwrite_flag"]

#: Name of the manifest each output folder gets.
MANIFEST_NAME = ".ddsm_outputs.json"


class RunPathError(ValueError):
    """An output path of a run overlaps one of its inputs or another output."""


def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """Whether resolved ``path`` equals or lies under resolved ``folder``."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _given(paths: Optional[Mapping[str, Optional[PathLike]]]) -> List[Tuple[str, str, str]]:
    return [(label, os.fspath(p), _real(p)) for label, p in (paths or {}).items()
            if p is not None and os.fspath(p) != ""]


def check_run_paths(*, input_files: Optional[Mapping[str, Optional[PathLike]]] = None,
                    input_dirs: Optional[Mapping[str, Optional[PathLike]]] = None,
                    output_files: Optional[Mapping[str, Optional[PathLike]]] = None,
                    output_dirs: Optional[Mapping[str, Optional[PathLike]]] = None,
                    may_replace: Iterable[Tuple[str, str]] = ()) -> None:
    """Refuse outputs of a run that overlap its inputs or each other.

    Each mapping takes a label (the flag, e.g. ``"--best-model"``) to a path; None values are
    skipped. Links are resolved, so a link to an input is the input.

    Args:
        input_files: files the run reads.
        input_dirs: folders the run reads (their files, recursively).
        output_files: files the run writes.
        output_dirs: folders the run writes into.
        may_replace: ``(output label, input label)`` pairs where the output may be the input
            file (a checkpoint that a resumed run reads, then replaces).

    Raises:
        RunPathError: one line naming both flags and paths: an output that is an input file,
            an output inside (or equal to) an input folder, an output folder holding an input
            folder (or an input file that its manifest names), or two outputs that are one
            path.
    """
    allowed = set(may_replace)
    in_files, in_dirs = _given(input_files), _given(input_dirs)
    outs = [(label, shown, real, False) for label, shown, real in _given(output_files)]
    outs += [(label, shown, real, True) for label, shown, real in _given(output_dirs)]
    for label, shown, real, is_dir in outs:
        for in_label, in_shown, in_real in in_files:
            if real == in_real and (label, in_label) not in allowed:
                raise RunPathError(f"{label} {shown} is the input {in_label} {in_shown}: an "
                                   f"output must not replace an input; choose another path")
        for in_label, in_shown, in_real in in_dirs:
            if _inside(real, in_real):
                raise RunPathError(
                    f"{label} {shown} lies inside the input folder {in_label} {in_shown}: "
                    f"its files would be read as inputs by a later run; choose a path outside")
        if is_dir:
            _refuse_held_inputs(label, shown, real, in_dirs)
            _refuse_held_inputs(label, shown, real,
                                [f for f in in_files if _named_by_manifest(real, f[2])])
    for i, (label, shown, real, is_dir) in enumerate(outs):
        for label2, shown2, real2, is_dir2 in outs[i + 1:]:
            if real == real2:
                raise RunPathError(f"{label} {shown} and {label2} {shown2} are the same path: "
                                   f"one output would overwrite the other")
            if is_dir and is_dir2 and (_inside(real, real2) or _inside(real2, real)):
                raise RunPathError(f"{label} {shown} and {label2} {shown2} are nested output "
                                   f"folders; give separate folders")


def _named_by_manifest(folder: str, path: str) -> bool:
    """Whether the manifest in ``folder`` names the file ``path`` (both resolved), i.e. a
    tool could remove it as an earlier run's output; an unreadable manifest counts as naming
    it."""
    try:
        data = json.loads(Path(folder, MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    files = data.get("files", []) if isinstance(data, dict) else None
    if not isinstance(files, list):
        return True
    rel = os.path.relpath(path, folder)
    return rel in {os.path.normpath(f) for f in files if isinstance(f, str)}


def _refuse_held_inputs(label: str, shown: str, real: str,
                        inputs: List[Tuple[str, str, str]]) -> None:
    """Refuse an output folder that holds one of ``inputs`` (input folders of the run, or
    input files its manifest names): removing an earlier run's outputs there
    (``--overwrite``) must never be able to reach an input."""
    for in_label, in_shown, in_real in inputs:
        if in_real != real and _inside(in_real, real):
            raise RunPathError(f"{label} {shown} holds the input {in_label} {in_shown}: an "
                               f"output folder must not hold the run's inputs (its earlier "
                               f"outputs are removed there); choose a folder outside them")


# ---------------------------------------------------------------------------------- run lock
class RunLockedError(FileExistsError):
    """Another live process holds the lock of a run's output."""


#: Locks this process holds, in acquisition order.
_HELD: List["RunLock"] = []


class RunLock:
    """``<target>.lock``: one run at a time writes ``target`` (e.g. ``--best-model``).

    The lock file is created with ``O_EXCL`` and holds the holder's process id and host name.
    A lock whose process is gone (a killed run, same host) is taken over with a warning.

    Args:
        target: the file the run writes; the lock is ``<target>.lock``.
        flag: the flag naming ``target`` in messages.
    """

    def __init__(self, target: PathLike, flag: str = "--best-model"):
        self.target = os.fspath(target)
        self.path = Path(self.target + ".lock")
        self.flag = flag
        self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:       # unreadable or being written right now: treat as held
            return False
        if holder.get("host") != socket.gethostname():
            return False
        if holder["pid"] == os.getpid():
            return not any(lock.path == self.path for lock in _HELD)
        return not dm_image.process_alive(holder["pid"])

    def acquire(self) -> "RunLock":
        """Take the lock (refusing a live holder, taking over a stale lock); returns self.

        Raises:
            RunLockedError: another live process holds it (the message names its process id).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                if not self._stale(holder):
                    pid = holder.get("pid", "unknown")
                    raise RunLockedError(
                        f"{self.flag} {self.target} is being written by another run (process "
                        f"{pid}, lock file {self.path}); wait for it to end or choose another "
                        f"{self.flag}") from None
                if self._holder() == holder:          # still the same stale record
                    self.path.unlink(missing_ok=True)
                    logger.warning("took over the lock %s of process %s, which is no longer "
                                   "running", self.path, holder["pid"])
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(record)
            self.held = True
            _HELD.append(self)
            return self
        raise RunLockedError(f"could not take the lock {self.path} for {self.flag} "
                             f"{self.target}; another run keeps creating it")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def releases_locks(fn: _F) -> _F:
    """Decorator: release the :class:`RunLock` s taken during a call when it ends (also on
    error or Ctrl-C), so a lock taken deep in a run's set-up never outlives the run."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = len(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for lock in reversed(_HELD[before:]):
                lock.release()
    return wrapper


# ---------------------------------------------------------------------------------- manifest
class OutputManifest:
    """The files (and folders) a tool wrote into one output folder, kept in ``MANIFEST_NAME``.

    Typical use: ``m = OutputManifest(out, "image_clf_predict")``; ``m.check_foreign(names,
    overwrite)`` before writing; ``m.begin(names)`` (claims the planned names, so a killed run's
    files are known to the next run); ``m.add(path)`` for each file written; ``m.finish()``
    removes what the earlier run wrote that this run did not, and saves the manifest.

    Args:
        folder: the output folder (need not exist yet).
        tool: the writing tool's name, stored in the manifest.

    Raises:
        ValueError: a manifest file that is not of this format, or that another tool wrote
            (the message names it).
    """

    def __init__(self, folder: PathLike, tool: str):
        self.folder = Path(folder)
        self.tool = tool
        self.path = self.folder / MANIFEST_NAME
        self.earlier_files: Set[str] = set()
        self.earlier_dirs: Set[str] = set()
        self.files: Set[str] = set()
        self.dirs: Set[str] = set()
        self.earlier_tool: Optional[str] = None
        #: Folders an interrupted earlier run made (its manifest says ``"complete": false``).
        self.earlier_owned_dirs: Set[str] = set()
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                files, dirs = data["files"], data.get("dirs", [])
                owned = data.get("owned_dirs", []) if data.get("complete") is False else []
                if not all(isinstance(x, str) for x in list(files) + list(dirs) + list(owned)):
                    raise TypeError
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path}: not a manifest of this project's tools "
                                 f"({type(err).__name__}); remove it if the folder's files "
                                 f"are yours") from None
            self.earlier_tool = str(data.get("tool"))
            if "tool" in data and self.earlier_tool != tool:
                raise ValueError(f"{self.folder} holds the outputs of another tool, "
                                 f"{self.earlier_tool} (its {MANIFEST_NAME} names them); "
                                 f"{tool} writes only into a folder of its own: choose another")
            self.earlier_files = {f for f in files if self._safe(f)}
            self.earlier_dirs = {d for d in dirs if self._safe(d)}
            self.earlier_owned_dirs = {d for d in owned if self._safe(d)}

    @staticmethod
    def _safe(rel: str) -> bool:
        parts = Path(rel).parts
        return bool(parts) and not Path(rel).is_absolute() and ".." not in parts

    def rel(self, path: PathLike) -> str:
        """``path`` relative to the folder, as stored (POSIX separators)."""
        return Path(os.path.relpath(os.path.abspath(path),
                                    os.path.abspath(self.folder))).as_posix()

    def wrote_before(self, path: PathLike) -> bool:
        """Whether an earlier run's manifest names ``path``."""
        return self.rel(path) in self.earlier_files

    def foreign(self, paths: Iterable[PathLike]) -> List[Path]:
        """Those of ``paths`` that exist but no manifest names (a user's files)."""
        out = []
        for p in paths:
            p = self.folder / self.rel(p)
            if os.path.lexists(p) and not self.wrote_before(p):
                out.append(p)
        return out

    def check_foreign(self, paths: Iterable[PathLike], overwrite: bool,
                      flag: str = "--overwrite") -> None:
        """Refuse to replace files this project's tools did not write, unless ``overwrite``.

        Raises:
            FileExistsError: one line naming the first such file and how many there are.
        """
        found = self.foreign(paths)
        if found and not overwrite:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise FileExistsError(f"{found[0]}{more} exists and was not written by this tool; "
                                  f"move it away or pass {flag} to replace it")

    def begin(self, planned: Iterable[PathLike] = (),
              owned_dirs: Optional[Iterable[PathLike]] = None) -> None:
        """Save the manifest with the earlier files and ``planned`` ones before writing, so
        that a run killed half-way leaves every file it may have written named.

        Args:
            planned: files the run will write (names known in advance).
            owned_dirs: folders the run made and fills with files whose names are not known in
                advance; the manifest is saved as ``"complete": false`` naming them, so that
                the next run can take the files of a killed run there as this tool's
                (:meth:`adopt_interrupted`). :meth:`finish` saves the complete manifest.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.folder)
        claimed = self.earlier_files | {self.rel(p) for p in planned}
        if owned_dirs is None:
            self._save(claimed, self.earlier_dirs)
            return
        owned = {self.rel(d) for d in owned_dirs}
        self._save(claimed, self.earlier_dirs | owned, owned_dirs=owned)

    def adopt_interrupted(self, match: Callable[[str], bool]) -> List[Path]:
        """Take the files of an interrupted earlier run as its outputs: those in the folders
        it made (its ``owned_dirs``) whose name satisfies ``match``. Files elsewhere, and
        files there of other names (a user's), stay foreign. Returns the files adopted."""
        root = os.path.realpath(self.folder)
        adopted = []
        for rel in sorted(self.earlier_owned_dirs):
            folder = self.folder / rel
            if not folder.is_dir() or folder.is_symlink() or \
                    not _inside(os.path.realpath(folder), root):
                continue
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_file(follow_symlinks=False) and match(entry.name):
                    adopted.append(folder / entry.name)
        self.earlier_files |= {self.rel(p) for p in adopted}
        return adopted

    def add(self, path: PathLike) -> None:
        """Record a file this run wrote."""
        self.files.add(self.rel(path))

    def add_dir(self, path: PathLike) -> None:
        """Record a folder this run made (removed with the earlier outputs when empty)."""
        self.dirs.add(self.rel(path))

    def remove_earlier(self, keep: Iterable[PathLike] = ()) -> List[Path]:
        """Remove the files an earlier run wrote (its manifest) that are not in ``keep`` or
        written by this run, then its folders left empty; returns the files removed."""
        keep_rel = {self.rel(p) for p in keep} | self.files
        removed = []
        root = os.path.realpath(self.folder)
        for rel in sorted(self.earlier_files - keep_rel):
            path = self.folder / rel
            if not _inside(os.path.realpath(path.parent), root):   # through a planted link
                continue
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(path)
        self.earlier_files &= keep_rel
        for rel in sorted(self.earlier_dirs - self.dirs, key=lambda r: -len(Path(r).parts)):
            try:
                (self.folder / rel).rmdir()
            except OSError:
                continue
        self.earlier_dirs &= self.dirs
        if removed:
            logger.info("removed %d file(s) of an earlier run from %s (this run does not write "
                        "them)", len(removed), self.folder)
        return removed

    def finish(self, remove_earlier: bool = True) -> List[Path]:
        """End of the run: remove the earlier run's other outputs (by default) and save the
        manifest of what this run wrote; returns the files removed."""
        removed = self.remove_earlier() if remove_earlier else []
        self._save(self.files | self.earlier_files, self.dirs | self.earlier_dirs)
        return removed

    def _save(self, files: Set[str], dirs: Set[str],
              owned_dirs: Optional[Set[str]] = None) -> None:
        record = {"tool": self.tool, "files": sorted(files), "dirs": sorted(dirs)}
        if owned_dirs is not None:
            record.update(complete=False, owned_dirs=sorted(owned_dirs))
        dm_image.atomic_write(self.path, lambda fh: json.dump(record, fh, indent=1), text=True)


def clean_leftovers(*folders: Optional[PathLike]) -> int:
    """Remove leftovers of killed atomic writes in each folder (None skipped); returns the
    count."""
    return sum(len(dm_image.remove_atomic_leftovers(f)) for f in folders if f is not None)


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--overwrite`` (replace files of the same name that no manifest names)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace files in {what} that this project's tools did not write "
                             f"(without it such a file stops the run); files an earlier run "
                             f"of the tool wrote are replaced or removed either way "
                             f"(default: off)")
