"""A whole run in one command: data, patches, both classifiers, predictions, heatmaps, report.

Reads a TOML config (``ddsm_train/configs/*.toml``; keys in ``pipeline_config.SCHEMA`` and
``TOOL_KEYS``, and the README) and runs the project's command-line tools in order, each as a
subprocess with this Python, its output kept in ``OUT/logs/NN_STAGE.log``. The stages:

====================  ===========================================================================
``data``              ``make_synthetic_ddsm.py`` (source ``synthetic``), ``prepare_cbis_ddsm.py``
                      (``cbis_ddsm``), or a check of the given folder (``sampler_layout``,
                      ``class_folders``): its files' sizes and times enter the fingerprint
``sample_patches``    ``sample_patches_combined.py``: train/val patches from the train patients,
                      test patches from the test patients
``mean``              pixel scale from the images' bit depth (unless ``data.rescale_factor``),
                      then ``compute_mean.py`` on the train split as each net sees it: patches at
                      the patch size with the patch net's scale, whole images at ``img_size``
``patch_train``       ``patch_clf_train.py``
``image_train``       ``image_clf_train.py`` from the patch model (its net from the model's
                      options file when it has one)
``predict``           ``image_clf_predict.py`` on the test split, and ``predict_flips`` with
``predict_flips``     ``--test-augment``
``predict_val``       ``image_clf_predict.py`` on the validation split (with ``--test-augment``
                      when ``predict.flips``); not used without validation images
``evaluate``          ``evaluate.py`` on the test predictions (with flips when ``predict.flips``):
                      thresholds chosen on the validation predictions (Youden index, target
                      sensitivity and specificity) applied to the test images, image, breast and
                      exam levels (CBIS-style names), calibration; the fixed threshold 0.5,
                      labelled as such, without validation images
``heatmaps``          ``heatmap_score.py --fprop-mode`` on the highest-scored positive and
                      negative test images, lesion outlines from the ROI masks where there are
``export``            ``export_model.py`` on ``models/image_clf.h5`` into ``OUT/export/``: ONNX,
                      SavedModel, recipe and model card (``--flips`` when ``predict.flips``;
                      the test metrics of ``evaluate``, or of the test predictions without
                      it; ``export/run_info.json``: the config, training command, data counts
                      and learning-health warnings); with ``export.enabled``
``report``            ``OUT/report.html`` (``report.py``) and ``OUT/summary.json``
====================  ===========================================================================

The summary printed at the end lists the run's learning-health warnings (``summary.json``
``warnings``: a patch class never predicted, accuracy not above the majority share, an AUROC
interval containing 0.5, a best epoch that is the first, the evaluation's own); with
``--strict`` a run that raised any ends with exit status 3 (:data:`STRICT_EXIT`).

Every flag a stage needs is derived once, from the config and the data (``OUT/derived.json``
holds the derived pixel scale and means). The state of the run is ``OUT/pipeline_state.json``:
per stage its fingerprint (its command lines, ``RANDOM_SEED``, the fingerprints of the stages
it reads and the sizes and times of the input files it reads from outside the run folder), its
status and its time. A stage whose fingerprint is unchanged and whose outputs are complete is
skipped; one that was interrupted (or failed) with an unchanged fingerprint is run again with
the same command, so a trainer resumes from its last-epoch checkpoint; a stage whose
fingerprint changed has its old outputs removed and runs afresh, and every stage that reads it
follows. ``--from STAGE`` reruns that stage and the later ones, ``--only STAGE`` just that one
(the stages before it must be complete). Paths in the command lines are relative to ``OUT``,
so a run folder can be moved.

Before any stage runs, every command line of the stages to run is parsed by its tool's own
parser (stand-ins for the values the ``mean`` stage derives), and a refusal stops the run as a
``ConfigError`` naming the config file, section and key; a stage's commands are checked again,
with the real values, before its old outputs are removed. When a stage fails (or is
interrupted), every later stage that reads it, or whose commands changed, is marked "stale"
(:meth:`Pipeline.mark_stale`), so no old result counts as current, and an existing report is
rewritten to name them.

``--set section.key=value`` (repeatable) replaces a config key after the config is read
(``pipeline_config.parse_set``). ``--dry-run`` prints, per stage (per fold for
cross-validation), whether a run would skip it, resume it or run it afresh and why (which part
of its fingerprint changed: commands, seed, a stage it reads, input files, extra) and its
command lines, running and writing nothing (:meth:`Pipeline.dry_run`).

Example::

    python ddsm_train/run_pipeline.py ddsm_train/configs/demo.toml --out demo_out/demo
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)
from dm_image import PROGRESS_ENV, atomic_write, parse_progress  # noqa: E402
from pipeline_config import AUTO, ConfigError, load_config  # noqa: E402
from script_utils import cli_main  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "StageError", "LearningWarnings", "STRICT_EXIT", "Pipeline", "run",
           "get_args_parser", "main"]

#: Exit status of ``--strict`` when the run raised learning-health warnings.
STRICT_EXIT = 3

HERE = Path(__file__).resolve().parent
#: The stages, in order.
STAGES = ("data", "sample_patches", "mean", "patch_train", "image_train", "predict",
          "predict_flips", "predict_val", "evaluate", "heatmaps", "export", "report")
STATE_FILE = "pipeline_state.json"
DERIVED_FILE = "derived.json"
#: 255/65535: 16-bit levels to the 0..255 scale.
RESCALE_16BIT = 0.003891
#: The config sections each stage's command lines are made from, its own first (a tool's
#: refusal of a command line is reported as a key of these sections).
STAGE_SECTIONS = {
    "data": ("data", "synthetic", "run", "image_train"),
    "sample_patches": ("patches", "run"),
    "mean": ("data", "patch_train", "image_train", "patches", "run"),
    "patch_train": ("patch_train", "patches"),
    "image_train": ("image_train", "patch_train"),
    "predict": ("predict", "image_train", "run"),
    "predict_flips": ("predict", "image_train", "run"),
    "predict_val": ("predict", "image_train", "run"),
    "evaluate": ("evaluate", "predict", "run"),
    "heatmaps": ("heatmaps", "patch_train", "patches", "image_train"),
    "export": ("export", "predict", "image_train", "run"),
    "report": (),
}
#: Stand-ins for the values of ``derived.json`` while the commands are checked before the
#: ``mean`` stage has run (any number the tools accept).
PLACEHOLDER_DERIVED = {"rescale_factor": 0.5, "image_mean": 99.5, "patch_mean": 99.5}
#: TensorFlow's start-up lines (absl writes them to stderr before TensorFlow's C++ logging
#: reads ``TF_CPP_MIN_LOG_LEVEL``), left out of the stage logs unless the user set that
#: variable. Every other line of a tool's output is kept.
TF_STARTUP_LINE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^[IWE]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] (oneDNN custom operations are on"
    r"|Could not find cuda drivers|.*\bcuInit\b|This TensorFlow binary is optimized"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning: Could not find TensorRT)"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate "
    r"compiler flags\.$")
#: Plural names of the units of the tools' progress lines.
PROGRESS_UNITS = {"img": "images", "view": "views", "patch": "patches"}
#: (field, label) of an epoch's progress line, in the order shown.
EPOCH_FIELDS = (("loss", "loss"), ("val_loss", "val loss"), ("val_acc", "val accuracy"),
                ("val_auroc", "val AUROC"))


def describe_progress(fields: dict) -> str:
    """A tool's progress line (:func:`dm_image.parse_progress` fields) in words, e.g.
    ``epoch 3 of 20: loss 0.412, val AUROC 0.771`` or ``scoring: 40 of 120 images``."""
    n, of = fields["n"], fields.get("of", "?")
    if fields["task"] == "epoch":
        values = ", ".join(f"{label} {fields[key]}" for key, label in EPOCH_FIELDS
                           if key in fields)
        return f"epoch {n} of {of}" + (f": {values}" if values else "")
    unit = fields.get("unit", "")
    unit = PROGRESS_UNITS.get(unit, unit)
    return f"{fields['task']}: {n} of {of}" + (f" {unit}" if unit else "")


class LearningWarnings(RuntimeError):
    """``--strict``: the run finished but raised learning-health warnings (``warnings``)."""

    def __init__(self, warnings: List[dict]):
        super().__init__(f"--strict: the run raised {len(warnings)} warning(s) about what the "
                         f"model learned: " + "; ".join(w["code"] for w in warnings))
        self.warnings = warnings


class StageError(RuntimeError):
    """A stage's tool failed; the message names the stage, its exit status and its log."""


# A step of a stage: a tool's command line (script name, then its arguments), or a function run
# in this process, described by a list of strings that enters the fingerprint.
@dataclass
class Step:
    script: Optional[str] = None
    args: List[str] = field(default_factory=list)
    func: Optional[Callable[[], None]] = None
    describe: List[str] = field(default_factory=list)
    output: str = ""      # what the tool printed (set when it has run)

    def key(self) -> List[str]:
        return [self.script] + self.args if self.script else ["python:"] + self.describe


@dataclass
class StageSpec:
    """What one stage runs, what it reads and what it writes (paths relative to the run)."""
    name: str
    steps: List[Step]
    deps: List[str] = field(default_factory=list)        # stages whose outputs it reads
    inputs: List[str] = field(default_factory=list)      # files/folders outside the run
    outputs: List[str] = field(default_factory=list)     # removed before a fresh run (globs)
    complete: List[str] = field(default_factory=list)    # must exist after a finished run
    extra: Dict[str, object] = field(default_factory=dict)   # more fingerprint material
    # stages whose values (derived.json) enter its command lines: through the commands they
    # are in the fingerprint already, but a failure of one of them leaves this stage stale
    values_from: List[str] = field(default_factory=list)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(paths: Sequence[Union[str, Path]]) -> str:
    """Fingerprint of files and folders (recursively): each file's path, size and time stamp."""
    items = []
    for top in paths:
        top = Path(top)
        if top.is_file():
            st = top.stat()
            items.append((str(top), st.st_size, st.st_mtime_ns))
        elif top.is_dir():
            for folder, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    st = os.stat(os.path.join(folder, name))
                    items.append((os.path.join(folder, name), st.st_size, st.st_mtime_ns))
        else:
            items.append((str(top), None, None))
    return _hash(items)


def script_flags(script: str) -> frozenset:
    """The long flags of a project script's parser (so a stage uses a flag only when the tool
    in this checkout has it)."""
    parser = importlib.import_module(script).get_args_parser()
    return frozenset(o for a in parser._actions for o in a.option_strings)


def parse_error(script: str, args: Sequence[str]) -> Optional[str]:
    """Why the project tool ``script`` would refuse the command line ``args``, or None.

    The tool's own parser (``get_args_parser()``, with the number rules its ``main()`` adds)
    parses ``args``; its error message (``argument --net: invalid choice: ...``) is returned
    without the usage lines. A ``--help`` or ``--version``, which would print and exit, is an
    error too.
    """
    from common_flags import use_checked_numbers

    parser = use_checked_numbers(importlib.import_module(script).get_args_parser())
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as exc:
        if exc.code in (0, None):
            return "its options ask it to print its help or version and stop"
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return lines[-1].split(": error: ", 1)[-1] if lines else f"exit status {exc.code}"
    return None


def _check_from_stdin() -> None:
    """Child process of :meth:`Pipeline.check_commands`: reads ``[[script, args], ...]`` as JSON
    on stdin, prints ``CHECKED [error or null, ...]`` as its last line."""
    commands = json.loads(sys.stdin.read())
    print("CHECKED " + json.dumps([parse_error(script, args) for script, args in commands]))


def _offending(message: str) -> Tuple[List[str], Optional[str]]:
    """The option strings (or stray words) an argparse message names, and the value it quotes."""
    quoted = re.findall(r"'([^']*)'", message.split(" (choose from", 1)[0])
    value = quoted[-1] if quoted else None
    if message.startswith("unrecognized arguments: "):
        return message.split(": ", 1)[1].split(), value
    arg = re.match(r"(?:argument|ambiguous option:) (\S+?):? ", message)
    return (arg.group(1).split("/") if arg else []), value


def _as_text(value) -> List[str]:
    values = value if isinstance(value, list) else [value]
    return [_num(v) if not isinstance(v, bool) else str(v).lower() for v in values]


def blame_key(config: dict, sections: Sequence[str], message: str) -> Tuple[str, Optional[str]]:
    """The config ``(section, key)`` that a tool's parser error ``message`` comes from.

    An option or word of the message in a section's ``extra_args`` blames those; then a key
    named like the option (``--block-type``: ``block_type``); then a key whose value the
    message quotes. ``(first section, None)`` when none fits.
    """
    words, value = _offending(message)
    for section in sections:
        extra = config[section].get("extra_args") or []
        if any(w in extra for w in words) or (value is not None and value in extra):
            return section, "extra_args"
    flags = {w.lstrip("-").replace("-", "_").removeprefix("no_") for w in words
             if w.startswith("--")}
    for section in sections:
        for key in config[section]:
            if key in flags:
                return section, key
    for section in sections:
        for key, setting in config[section].items():
            if value is not None and key != "extra_args" and value in _as_text(setting):
                return section, key
    return (sections[0] if sections else ""), None


def describe_refusal(script: str, message: str) -> str:
    """A tool's parser error in words that fit a config key."""
    words, _ = _offending(message)
    if message.startswith("unrecognized arguments: "):
        flags = [w for w in words if w.startswith("-")]
        return (f"{script}.py does not know {' '.join(flags)}" if flags
                else f"{script}.py takes no extra value {' '.join(words)}")
    choice = re.search(r"argument (\S+): invalid choice: (.*) \(choose from (.*)\)$", message)
    if choice:
        flag, value, allowed = choice.groups()
        return f"{value} is not one of {allowed.replace(chr(39), '')} ({script}.py {flag})"
    return f"{script}.py refuses it: {message}"


def detect_rescale_factor(folder: Path, sample: int = 12) -> float:
    """255/65535 when a sample of the images under ``folder`` is 16-bit, 1 when it is 8-bit.

    Raises:
        ValueError: no image, or the sample mixes 8- and 16-bit files.
    """
    import numpy as np

    import dm_image

    files = dm_image.list_images(folder)
    step = max(1, len(files) // sample)
    depths = {}
    for rel in files[::step][:sample]:
        img = dm_image.read_image(os.path.join(folder, rel))
        depths.setdefault(16 if img.dtype == np.uint16 else 8, []).append(rel)
    if len(depths) > 1:
        raise ValueError(f"{folder}: mixes 16-bit ({depths[16][0]}) and 8-bit ({depths[8][0]}) "
                         f"images; convert them to one bit depth or set data.rescale_factor")
    return RESCALE_16BIT if 16 in depths else 1.0


def _atomic_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write(path, lambda fh: fh.write(text), text=True)


def _flag_bool(name: str, on: bool) -> str:
    return f"--{name}" if on else f"--no-{name}"


def _num(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


class _RunFolder:
    """A run folder and its config (``sets``: ``--set`` overrides), as both runners hold them."""

    def __init__(self, config_path: Union[str, Path], out_dir: Union[str, Path],
                 echo: bool = True, sets: Sequence[str] = ()):
        self.config_path = Path(config_path).resolve()
        self.config = load_config(self.config_path, sets)
        self.out = Path(out_dir).resolve()
        self.echo = echo
        self.ran: Dict[str, str] = {}   # stage -> "ran" / "skipped" / "not used", this call

    def _env(self) -> dict:
        env = dict(os.environ)
        env["RANDOM_SEED"] = str(self.config["run"]["seed"])
        env["NUM_CPU_CORES"] = str(self.config["run"]["workers"])
        if not script_utils.tf_log_level_given():
            # left unset, the tools hide TensorFlow's start-up lines themselves (set, they
            # would take it for the user's wish to see them)
            env.pop("TF_CPP_MIN_LOG_LEVEL", None)
        env[PROGRESS_ENV] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        root = str(HERE.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"]
                                    if env.get("PYTHONPATH") else "")
        return env



class Pipeline(_RunFolder):
    """One run folder and its config: plans each stage, decides what to skip, runs the rest.

    Args:
        config_path: the TOML config.
        out_dir: the run folder (created when a stage runs).
        echo: print each stage's progress line to stdout.
        sets: ``section.key=value`` overrides of the config (``--set``).
    """

    def __init__(self, config_path: Union[str, Path], out_dir: Union[str, Path],
                 echo: bool = True, sets: Sequence[str] = ()):
        super().__init__(config_path, out_dir, echo, sets)
        self.state_path = self.out / STATE_FILE
        self.state = {"stages": {}}
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())
        self._checking = False          # planning to check commands: stand-ins for derived values
        self._used_derived = False      # the plan being made read derived.json
        self._checked: set = set()      # command lines the tools' parsers accepted

    # ---------------------------------------------------------------- layout
    @property
    def source(self) -> str:
        return self.config["data"]["source"]

    def data_dir(self) -> Path:
        """The sampler-layout folder (``full_img``, ``roi_mask``, CSVs, patient lists)."""
        if self.source in ("synthetic", "cbis_ddsm"):
            return self.out / "data"
        return Path(self.config["data"]["dir"])

    def whole_img_dir(self) -> Path:
        if self.source == "class_folders":
            return Path(self.config["data"]["dir"])
        return self.data_dir() / "whole_img"

    def rel(self, path: Union[str, Path]) -> str:
        """``path`` relative to the run folder when inside it (command lines stay movable)."""
        path = Path(path)
        try:
            return str(path.resolve().relative_to(self.out))
        except ValueError:
            return str(path)

    def trains_patches(self) -> bool:
        return not self.config["patches"]["model"]

    def patch_model(self) -> Path:
        return (Path(self.config["patches"]["model"]) if not self.trains_patches()
                else self.out / "models" / "patch_clf.h5")

    def patch_net(self) -> str:
        """The patch net's name: from the patch model's options file when it has one."""
        if self.trains_patches():
            return self.config["patch_train"]["net"]
        opts = Path(str(self.patch_model()) + ".options.json")
        net = json.loads(opts.read_text()).get("net") if opts.is_file() else None
        if not net:
            import dm_image

            recipe = dm_image.InputRecipe.from_model_file(self.patch_model())
            net = recipe.preprocess if recipe is not None else None
        return str(net or self.config["patch_train"]["net"])

    def derived(self) -> dict:
        """The values of ``derived.json`` (pixel scale and means); stand-ins while checking."""
        self._used_derived = True
        path = self.out / DERIVED_FILE
        if not path.is_file():
            if self._checking:
                return self._placeholder_derived()
            raise StageError(f"stage mean has not run in {self.out} (no {DERIVED_FILE}); run "
                             f"the stages before the one you named first")
        return json.loads(path.read_text())

    def _placeholder_derived(self) -> dict:
        """``derived.json`` before the ``mean`` stage: the config's values where it gives them,
        :data:`PLACEHOLDER_DERIVED` for the others."""
        c, values = self.config, dict(PLACEHOLDER_DERIVED)
        given = {"rescale_factor": c["data"]["rescale_factor"],
                 "image_mean": c["image_train"]["featurewise_mean"],
                 "patch_mean": c["patch_train"]["featurewise_mean"]}
        values.update({k: float(v) for k, v in given.items() if v != AUTO})
        return values

    @contextlib.contextmanager
    def _check_mode(self) -> Iterator[None]:
        """Plans made inside are for checking: values an earlier stage derives have stand-ins."""
        self._checking = True
        try:
            yield
        finally:
            self._checking = False

    # ---------------------------------------------------------------- stage plans
    def plan(self, name: str) -> Optional[StageSpec]:
        """The stage ``name`` as it would run now, or None when the config does not use it."""
        self._used_derived = False
        spec = getattr(self, f"_plan_{name}")()
        if spec is not None and self._used_derived:
            spec.values_from.append("mean")
        return spec

    def _plan_data(self):
        c, syn = self.config, self.config["synthetic"]
        seed, workers = str(c["run"]["seed"]), str(c["run"]["workers"])
        if self.source == "synthetic":
            h, w = c["image_train"]["img_size"]
            args = ["data", "--nb-patients", str(syn["patients"]), "--img-height",
                    str(syn["img_height"]), "--img-width", str(syn["img_width"]),
                    "--whole-img-size", str(h), str(w), "--lesion-contrast",
                    _num(syn["lesion_contrast"]), "--seed", seed, "--workers", workers]
            return StageSpec("data", [Step("make_synthetic_ddsm", args)], outputs=["data"],
                             complete=["data/synthetic_ddsm.json", "data/whole_img"])
        if self.source == "cbis_ddsm":
            h, w = c["image_train"]["img_size"]
            val = c["data"]["val_size"]
            args = ([c["data"]["cbis_csv_dir"], c["data"]["cbis_dicom_root"], "data",
                     "--whole-img-size", str(h), str(w)]
                    + (["--val-size", _num(val)] if val != "none" else [])
                    + ["--seed", seed, "--workers", workers, "--no-verbose"])
            return StageSpec("data", [Step("prepare_cbis_ddsm", args)], outputs=["data"],
                             inputs=[c["data"]["cbis_csv_dir"]],
                             complete=["data/prepare_summary.json", "data/whole_img"])
        folder = Path(c["data"]["dir"])
        need = ([folder / s for s in ("train", "val", "test")] if self.source == "class_folders"
                else [folder / n for n in ("full_img", "roi_mask", "roi_mask_path.csv",
                                           "train_pat.txt", "test_pat.txt", "whole_img")])
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise ValueError(f"{self.config_path}: data.dir = {folder} lacks "
                             f"{', '.join(missing)} (data.source = {self.source!r})")
        return StageSpec("data", [], inputs=[str(folder)])

    def _sampler_common(self) -> List[str]:
        c, p = self.config, self.config["patches"]
        args = ["--target-height", str(p["target_height"]), "--patch-size", str(p["patch_size"]),
                "--nb-hns", str(p["nb_hns"]), "--bkg-dir", "background",
                "--calc-pos-dir", "malignant", "--mass-pos-dir", "malignant",
                "--calc-neg-dir", "benign", "--mass-neg-dir", "benign",
                "--workers", str(c["run"]["workers"]), "--seed", str(c["run"]["seed"]),
                "--no-verbose"]
        if p["normal_views"] > 0:
            if "--normal-views" in script_flags("sample_patches_combined"):
                args += ["--normal-views", str(p["normal_views"])]
            else:
                logger.warning("patches.normal_views = %d: this checkout's sampler has no "
                               "--normal-views; lesion-free views give no patches",
                               p["normal_views"])
        return args + list(p["extra_args"])

    def _plan_sample_patches(self):
        if not self.trains_patches():
            return None
        p, d = self.config["patches"], self.data_dir()
        test_abn = (p["test_nb_abn"] if p["test_nb_abn"] != AUTO
                    else (p["nb_bkg"] - p["nb_hns"] + 1) // 2)
        csv_, masks, full = (self.rel(d / "roi_mask_path.csv"), self.rel(d / "roi_mask"),
                             self.rel(d / "full_img"))
        common = self._sampler_common()
        counts = ["--nb-bkg", str(p["nb_bkg"]), "--nb-abn", str(p["nb_abn"])]
        if (d / "val_pat.txt").is_file():
            # the whole-image validation patients validate the patch classifier too
            train = [Step("sample_patches_combined",
                          [csv_, masks, self.rel(d / part), full, f"patches/{out}",
                           f"patches/{out}_unused", "--val-size", "0"] + counts + common)
                     for part, out in (("train_pat.txt", "train"), ("val_pat.txt", "val"))]
        else:
            train = [Step("sample_patches_combined",
                          [csv_, masks, self.rel(d / "train_pat.txt"), full, "patches/train",
                           "patches/val", "--val-size", _num(p["val_size"])] + counts + common)]
        test = Step("sample_patches_combined",
                    [csv_, masks, self.rel(d / "test_pat.txt"), full, "patches/test",
                     "patches/test_unused", "--val-size", "0",
                     "--nb-bkg", str(p["nb_hns"] + test_abn), "--nb-abn", str(test_abn)]
                    + common)
        unused = [f"{s}_unused" for s in ("train", "val", "test")]

        def drop():
            for name in unused:
                shutil.rmtree(self.out / "patches" / name, ignore_errors=True)

        drop = Step(func=drop, describe=["remove " + ", ".join(f"patches/{u}" for u in unused)]
                    if len(train) > 1 else ["remove patches/test_unused"])
        return StageSpec("sample_patches", train + [test, drop], deps=["data"],
                         outputs=["patches"],
                         complete=["patches/train/sampling_summary.json",
                                   "patches/val/patches.csv",
                                   "patches/test/sampling_summary.json"])

    def _scale_args(self, section: str, derived: dict, mean_key: str) -> List[str]:
        s = self.config[section]
        args = ["--rescale-factor", _num(derived["rescale_factor"])]
        if s["img_scale"] != "none":
            args += ["--img-scale", _num(s["img_scale"])]
        return args + ["--featurewise-mean", _num(derived[mean_key])]

    def _mean_args(self, section: str, rescale: float) -> List[str]:
        s = self.config[section]
        args = ["--rescale-factor", _num(rescale), _flag_bool("equalize-hist", s["equalize_hist"])]
        if s["img_scale"] != "none":
            args += ["--img-scale", _num(s["img_scale"])]
        return args

    def _plan_mean(self):
        c = self.config
        rescale = c["data"]["rescale_factor"]
        if rescale == AUTO and self._checking and not (self.whole_img_dir() / "train").is_dir():
            rescale = PLACEHOLDER_DERIVED["rescale_factor"]      # the data stage makes them
        elif rescale == AUTO:
            rescale = detect_rescale_factor(self.whole_img_dir() / "train")
        steps, means = [], {}
        h, w = c["image_train"]["img_size"]
        wanted = {"image_mean": (c["image_train"]["featurewise_mean"],
                                 [self.rel(self.whole_img_dir() / "train"), "--img-size", str(h),
                                  str(w)] + self._mean_args("image_train", rescale))}
        if self.trains_patches():
            ps = c["patches"]["patch_size"]
            wanted["patch_mean"] = (c["patch_train"]["featurewise_mean"],
                                    ["patches/train", "--img-size", str(ps), str(ps)]
                                    + self._mean_args("patch_train", rescale))
        for key, (given, args) in wanted.items():
            if given != AUTO:
                means[key] = float(given)
            else:
                steps.append(Step("compute_mean", args + ["--workers", str(c["run"]["workers"]),
                                                          "--out-json", f"mean/{key}.json"],
                                  describe=[key]))
        if not self.trains_patches():
            means["patch_mean"] = self._model_mean(self.patch_model())
        result = {"rescale_factor": rescale, **means}

        def write():
            for step in steps:   # each compute_mean step wrote its result to mean/KEY.json
                path = self.out / "mean" / f"{step.describe[0]}.json"
                # to 4 decimals, as the tool prints it (the trainers' commands stay those of
                # runs made when the printed line was read)
                result[step.describe[0]] = float(f"{json.loads(path.read_text())['mean']:.4f}")
            _atomic_json(self.out / DERIVED_FILE, result)

        return StageSpec("mean", steps + [Step(func=write, describe=["write derived.json"])],
                         deps=["data", "sample_patches"], outputs=[DERIVED_FILE, "mean"],
                         complete=[DERIVED_FILE], extra={"given": result})

    @staticmethod
    def _model_mean(model: Path) -> float:
        import dm_image

        recipe = dm_image.InputRecipe.from_model_file(model)
        if recipe is None or recipe.featurewise_mean is None:
            raise ValueError(f"patch model {model} carries no featurewise mean; set "
                             f"patch_train.featurewise_mean")
        return float(recipe.featurewise_mean)

    def _plan_patch_train(self):
        if not self.trains_patches():
            return None
        t, ps = self.config["patch_train"], self.config["patches"]["patch_size"]
        scale = self._scale_args("patch_train", self.derived(), "patch_mean")
        args = (["patches/train", "patches/val", "patches/test", "--img-size", str(ps), str(ps)]
                + scale + [_flag_bool("equalize-hist", t["equalize_hist"]),
                           "--class-list", *t["class_list"],
                           "--batch-size", str(t["batch_size"]),
                           "--train-bs-multiplier", _num(t["train_bs_multiplier"]),
                           _flag_bool("augmentation", t["augmentation"])]
                + (["--load-train-ram", "--load-val-ram"] if t["load_ram"] else [])
                + ["--net", t["net"], _flag_bool("use-pretrained", t["use_pretrained"]),
                   "--nb-init-filter", str(t["nb_init_filter"]),
                   "--init-filter-size", str(t["init_filter_size"]),
                   "--init-conv-stride", str(t["init_conv_stride"]),
                   "--nb-epoch", str(t["nb_epoch"]),
                   "--top-layer-epochs", str(t["top_layer_epochs"]),
                   "--all-layer-epochs", str(t["all_layer_epochs"]),
                   "--optimizer", t["optimizer"], "--init-learningrate", _num(t["learning_rate"])]
                + list(t["extra_args"]) + ["--best-model", "models/patch_clf.h5"])
        return StageSpec("patch_train", [Step("patch_clf_train", args)],
                         deps=["sample_patches"], outputs=["models/patch_clf.h5*"],
                         complete=["models/patch_clf.h5", "models/patch_clf.h5.curves.png"])

    def _plan_image_train(self):
        t, der = self.config["image_train"], self.derived()
        h, w = t["img_size"]
        wi = self.whole_img_dir()
        args = ([self.rel(wi / s) for s in ("train", "val", "test")]
                + ["--patch-model-state", self.rel(self.patch_model()),
                   "--patch-net", self.patch_net(), "--img-size", str(h), str(w)]
                + self._scale_args("image_train", der, "image_mean")
                + [_flag_bool("equalize-hist", t["equalize_hist"]),
                   "--batch-size", str(t["batch_size"]),
                   "--train-bs-multiplier", _num(t["train_bs_multiplier"]),
                   "--block-type", t["block_type"],
                   "--top-depths", *map(str, t["top_depths"]),
                   "--top-repetitions", *map(str, t["top_repetitions"]),
                   "--bottleneck-enlarge-factor", str(t["bottleneck_enlarge_factor"])]
                + ([] if t["kept_layer_idx"] == AUTO
                   else ["--kept-layer-idx", str(t["kept_layer_idx"])])
                + ["--nb-epoch", str(t["nb_epoch"]),
                   "--all-layer-epochs", str(t["all_layer_epochs"]),
                   "--optimizer", t["optimizer"], "--init-learningrate", _num(t["learning_rate"]),
                   "--all-layer-multiplier", _num(t["all_layer_multiplier"]),
                   _flag_bool("augmentation", t["augmentation"])]
                + (["--load-train-ram", "--load-val-ram"] if t["load_ram"] else [])
                + list(t["extra_args"]) + ["--best-model", "models/image_clf.h5"])
        return StageSpec("image_train", [Step("image_clf_train", args)],
                         deps=["data", "patch_train"],
                         inputs=[] if self.trains_patches() else [str(self.patch_model())],
                         outputs=["models/image_clf.h5*"],
                         complete=["models/image_clf.h5", "models/image_clf.h5.curves.png"])

    def _predict(self, name, flips, split="test"):
        c, der = self.config, self.derived()
        h, w = c["image_train"]["img_size"]
        out = f"predictions/{'val_' if split == 'val' else ''}{'flips' if flips else 'no_flips'}"
        # validation scores only choose thresholds: their own intervals are not needed
        boot = c["predict"]["bootstrap"] if split == "test" else 0
        args = (["--model", "models/image_clf.h5", "--img-dir",
                 self.rel(self.whole_img_dir() / split), "--img-size", str(h), str(w)]
                + self._scale_args("image_train", der, "image_mean")
                + [_flag_bool("equalize-hist", c["image_train"]["equalize_hist"]),
                   "--batch-size", str(c["predict"]["batch_size"]),
                   "--bootstrap", str(boot),
                   "--seed", str(c["run"]["seed"]), "--no-verbose"]
                + (["--test-augment"] if flips else []) + list(c["predict"]["extra_args"])
                + ["--out-dir", out])
        return StageSpec(name, [Step("image_clf_predict", args)], deps=["data", "image_train"],
                         outputs=[out], complete=[f"{out}/metrics.json",
                                                  f"{out}/image_predictions.csv"])

    def _plan_predict(self):
        return self._predict("predict", False)

    def _plan_predict_flips(self):
        return self._predict("predict_flips", True) if self.config["predict"]["flips"] else None

    def scored_predictions(self) -> Path:
        """The predictions the heatmaps and the report pick their images from."""
        kind = "flips" if self.config["predict"]["flips"] else "no_flips"
        return self.out / "predictions" / kind / "image_predictions.csv"

    def val_predictions(self) -> Path:
        """The validation predictions of ``predict_val`` (flips as in ``predict.flips``)."""
        kind = "flips" if self.config["predict"]["flips"] else "no_flips"
        return self.out / "predictions" / f"val_{kind}" / "image_predictions.csv"

    def has_val_images(self) -> bool:
        """Whether the whole-image folder has a validation split with images in it."""
        import dm_image

        if self._checking and not self.whole_img_dir().is_dir():
            return True     # not made yet: check the commands that use them
        try:
            return bool(dm_image.list_images(self.whole_img_dir() / "val"))
        except ValueError:      # no folder, or no image in it
            return False

    def _plan_predict_val(self):
        if not self.config["evaluate"]["enabled"] or not self.has_val_images():
            return None
        return self._predict("predict_val", self.config["predict"]["flips"], split="val")

    def _plan_evaluate(self):
        c, e = self.config, self.config["evaluate"]
        if not e["enabled"]:
            return None
        flips = c["predict"]["flips"]
        val = self.has_val_images()
        args = ["--predictions", self.rel(self.scored_predictions())]
        if val:
            args += ["--val-predictions", self.rel(self.val_predictions())]
        else:
            logger.warning("no validation images in %s: evaluate reports the fixed threshold "
                           "0.5, not one chosen on validation", self.whole_img_dir() / "val")
        if e["calibrate"] != "none":
            if val:
                args += ["--calibrate", e["calibrate"]]
            else:
                logger.warning("evaluate.calibrate = %r needs validation images to fit on; "
                               "no calibration", e["calibrate"])
        args += ["--breast-combine", e["breast_combine"],
                 "--target-sensitivity", _num(float(e["target_sensitivity"])),
                 "--target-specificity", _num(float(e["target_specificity"])),
                 "--bootstrap", str(c["predict"]["bootstrap"]), "--seed", str(c["run"]["seed"])]
        args += list(e["extra_args"]) + ["--out-dir", "evaluation"]
        deps = ["predict_flips" if flips else "predict"] + (["predict_val"] if val else [])
        return StageSpec("evaluate", [Step("evaluate", args)], deps=deps,
                         outputs=["evaluation"], complete=["evaluation/metrics.json"])

    def _pick_images(self) -> List[Path]:
        """The highest-scored positive and the highest-scored negative test image."""
        best = {}
        with open(self.scored_predictions(), newline="") as fh:
            for row in csv.DictReader(fh):
                if not row["malignant_pred"] or row["malignant_label"] not in ("0", "1"):
                    continue
                score, label = float(row["malignant_pred"]), row["malignant_label"]
                if label not in best or score > best[label][0]:
                    best[label] = (score, row["path"])
        path = self.out / "predictions"
        return [Path(best[k][1]) if Path(best[k][1]).is_absolute() else path / best[k][1]
                for k in ("1", "0") if k in best]

    def _plan_heatmaps(self):
        c, der = self.config, self.derived()
        if not c["heatmaps"]["enabled"]:
            return None
        h, w = c["image_train"]["img_size"]
        full = self.data_dir() / "full_img" if self.source != "class_folders" else None
        test_dir = self.whole_img_dir() / "test"
        folder = full if full is not None and full.is_dir() else test_dir
        masks = self.data_dir() / "roi_mask" if self.source != "class_folders" else None
        pool = c["heatmaps"]["avg_pool_size"]
        if pool == AUTO:
            pool = max(1, c["patches"]["patch_size"] // 32)
        # the patch net on whole images, with the intensities it was trained on
        pt = c["patch_train"]
        scale = ["--rescale-factor", _num(der["rescale_factor"])]
        scale += (["--img-scale", _num(pt["img_scale"])] if pt["img_scale"] != "none"
                  else ["--no-img-scale"])
        args = ([self.rel(folder), self.rel(self.patch_model()), "--img-list",
                 "heatmaps/images.txt", "--fprop-mode", "--net", self.patch_net(),
                 "--img-size", str(h), str(w)] + scale
                + ["--featurewise-center", "--featurewise-mean", _num(der["patch_mean"]),
                   _flag_bool("equalize-hist", pt["equalize_hist"]),
                   "--avg-pool-size", str(pool), str(pool), "--malignant-class", "1",
                   "--class-list", *c["patch_train"]["class_list"], "--no-verbose"]
                + (["--roi-mask-dir", self.rel(masks)] if masks and masks.is_dir() else [])
                + list(c["heatmaps"]["extra_args"])
                + ["--out", "heatmaps/prob_heatmap.npz", "--png-dir", "heatmaps"])

        def write_list():
            lines = []
            for img in self._pick_images():
                if folder == full:
                    cand = [p for p in full.glob(img.stem + ".*") if p.is_file()]
                    img = cand[0] if cand else img
                lines.append(os.path.relpath(img, folder) + "\n")
            atomic_write(self.out / "heatmaps" / "images.txt",
                         lambda fh: fh.write("".join(lines)), text=True)

        pick = Step(func=write_list, describe=["heatmaps/images.txt: highest-scored positive and "
                                               "negative of", self.rel(self.scored_predictions())])
        deps = ["data", "patch_train", "predict_flips" if c["predict"]["flips"] else "predict"]
        return StageSpec("heatmaps", [pick, Step("heatmap_score", args)], deps=deps,
                         inputs=[] if self.trains_patches() else [str(self.patch_model())],
                         outputs=["heatmaps"], complete=["heatmaps/prob_heatmap.npz"])

    def _write_run_info(self) -> None:
        """``export/run_info.json``: what the model card says about this run (its config,
        training commands, data counts and learning-health warnings, as the report finds
        them)."""
        import report

        commands = {s: (self.state["stages"].get(s) or {}).get("commands") or [[]]
                    for s in ("patch_train", "image_train")}
        info = {"config_file": self.config_path.name,
                "pipeline_config": self.config_path.read_text(encoding="utf-8"),
                "resolved_config": self.config,
                "training_command": commands["image_train"][0],
                "patch_training_command": commands["patch_train"][0],
                "data_counts": {"whole images": report.count_images(self.whole_img_dir()),
                                "patches": report.count_images(self.out / "patches")},
                "warnings": report.health_warnings(self.out, self.config,
                                                   report.patch_test_summary(self.out))}
        (self.out / "export").mkdir(parents=True, exist_ok=True)
        _atomic_json(self.out / "export" / "run_info.json", info)

    def _plan_export(self):
        c = self.config
        if not c["export"]["enabled"]:
            return None
        der, flips = self.derived(), c["predict"]["flips"]
        h, w = c["image_train"]["img_size"]
        metrics = ("evaluation/metrics.json" if c["evaluate"]["enabled"] else
                   f"predictions/{'flips' if flips else 'no_flips'}/metrics.json")
        args = (["models/image_clf.h5", "--out", "export", "--img-size", str(h), str(w)]
                + self._scale_args("image_train", der, "image_mean")
                + [_flag_bool("equalize-hist", c["image_train"]["equalize_hist"]),
                   _flag_bool("flips", flips), "--metrics", metrics,
                   "--run-info", "export/run_info.json"])
        info = Step(func=self._write_run_info,
                    describe=["export/run_info.json: config, training commands, data counts, "
                              "learning-health warnings"])
        deps = ["data", "patch_train", "image_train", "predict", "predict_flips", "predict_val",
                "evaluate"]
        return StageSpec("export", [info, Step("export_model", args)], deps=deps,
                         outputs=["export"],
                         complete=["export/model_card.md", "export/model_card.json",
                                   "export/recipe.json", "export/saved_model"],
                         extra={"config": _hash([self.config_path.read_text(),
                                                 self.config])})

    def write_report(self) -> None:
        """``report.html`` and ``summary.json`` from the run folder and the state as it is."""
        import report

        report.write_report(self.out, self.config_path, self.config, self.state,
                            whole_img_dir=self.whole_img_dir(), stage_order=STAGES)

    def _plan_report(self):
        deps = [s for s in STAGES if s != "report"]
        return StageSpec("report", [Step(func=self.write_report,
                                         describe=["report.write_report"])],
                         deps=deps, outputs=["report.html", "summary.json"],
                         complete=["report.html", "summary.json"],
                         extra={"config": _hash(self.config_path.read_text())})

    # ---------------------------------------------------------------- running
    def _log_path(self, name: str) -> Path:
        return self.out / "logs" / f"{STAGES.index(name) + 1}_{name}.log"

    def fingerprint_parts(self, spec: StageSpec) -> dict:
        """What a stage's fingerprint is made of: its command lines (``steps``), ``seed``, the
        stamps of the stages it reads (``deps``), its outside ``inputs`` and ``extra``."""
        stages = self.state["stages"]
        return {"steps": [s.key() for s in spec.steps],
                "seed": self.config["run"]["seed"],
                "deps": {d: stages.get(d, {}).get("stamp") for d in spec.deps},
                "inputs": files_fingerprint(spec.inputs) if spec.inputs else None,
                "extra": spec.extra}

    def fingerprint(self, spec: StageSpec) -> str:
        return _hash(self.fingerprint_parts(spec))

    def _parts_record(self, spec: StageSpec) -> dict:
        """The fingerprint's parts as the state keeps them (so ``--dry-run`` can say which one
        changed): the seed and the stamps as they are, the others hashed."""
        parts = self.fingerprint_parts(spec)
        return {key: value if key in ("seed", "deps") else _hash(value)
                for key, value in parts.items()}

    def _save_state(self) -> None:
        _atomic_json(self.state_path, self.state)

    def _say(self, text: str) -> None:
        logger.info(text)

    def _complete(self, spec: StageSpec) -> bool:
        return all((self.out / p).exists() for p in spec.complete)

    def _check_key(self, step: Step) -> tuple:
        """A command line with the derived values (and their stand-ins) masked: one checked
        with stand-ins needs no second check once the real values are in."""
        values = list(self._placeholder_derived().values())
        if (self.out / DERIVED_FILE).is_file():
            values += json.loads((self.out / DERIVED_FILE).read_text()).values()
        masked = {_num(v) for v in values if isinstance(v, (int, float))}
        return (step.script, *("<derived>" if a in masked else a for a in step.args))

    def check_commands(self, specs: Sequence[StageSpec]) -> None:
        """Have each tool's own parser check the command lines of ``specs`` not checked yet.

        The parsers run in a child process (the tools import TensorFlow; this process does
        not). Raises:
            ConfigError: the first command line a tool refuses, as one line naming the config
                file, the section and the key it comes from.
            StageError: the check itself could not run.
        """
        todo = [(spec.name, step) for spec in specs for step in spec.steps
                if step.script and self._check_key(step) not in self._checked]
        if not todo:
            return
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import run_pipeline; "
                f"run_pipeline._check_from_stdin()")
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=self._env(),
                              input=json.dumps([[st.script, st.args] for _, st in todo]),
                              capture_output=True, text=True, errors="replace")
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        if proc.returncode != 0 or not last.startswith("CHECKED "):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageError(f"could not check the tools' options: {tail}")
        for (name, step), error in zip(todo, json.loads(last[len("CHECKED "):])):
            if error:
                section, key = blame_key(self.config, STAGE_SECTIONS[name], error)
                where = f"[{section}] {key}" if key else f"[{section}]"
                raise ConfigError(f"{self.config_path}: {where}: "
                                  f"{describe_refusal(step.script, error)}")
            self._checked.add(self._check_key(step))

    def check(self, names: Sequence[str], force: bool = False) -> None:
        """Plan the stages ``names`` and check their command lines, before any runs (values an
        earlier stage derives have stand-ins until it has run). A stage that finished with the
        same commands (skipped unless ``force``) has them checked when it reruns."""
        with self._check_mode():
            specs = [spec for spec in map(self.plan, names) if spec is not None]
        self.check_commands([s for s in specs if force or not self._unchanged(s)])

    def _clean(self, spec: StageSpec) -> None:
        for pattern in spec.outputs:
            for path in sorted(self.out.glob(pattern)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def _unchanged(self, spec: StageSpec) -> bool:
        """Whether the stage finished with these very commands and its outputs are complete."""
        record = self.state["stages"].get(spec.name) or {}
        return (record.get("status") == "done" and record.get("fingerprint")
                == self.fingerprint(spec) and self._complete(spec))

    def run_stage(self, name: str, force: bool = False) -> str:
        """Run, resume or skip one stage. Returns "ran", "skipped" or "not used"."""
        spec = self.plan(name)
        record = self.state["stages"].get(name)
        if spec is None:
            self.state["stages"][name] = {"status": "not used", "stamp": None}
            self._save_state()
            return "not used"
        fp = self.fingerprint(spec)
        if not force and self._unchanged(spec):
            self._say(f"[{name}] unchanged, skipped (ran in {record.get('seconds', 0):.0f}s)")
            return "skipped"
        resume = (not force and record and record.get("fingerprint") == fp
                  and record.get("status") in ("running", "failed"))
        self.check_commands([spec])     # old outputs go only once the new commands are valid
        if not resume:
            self._clean(spec)
        log = self._log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.state["stages"][name] = {"status": "running", "fingerprint": fp,
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "commands": [s.key() for s in spec.steps],
                                      "parts": self._parts_record(spec),
                                      "log": self.rel(log)}
        self._save_state()
        self._say(f"[{name}] {'resuming' if resume else 'running'} (log: {self.rel(log)})")
        t0 = time.monotonic()
        try:
            self._run_steps(spec, log, resume)
        except Exception:       # a tool's exit status or a python step's error
            self.state["stages"][name]["status"] = "failed"
            self._save_state()
            raise
        seconds = time.monotonic() - t0
        self.state["stages"][name].update(
            status="done", seconds=round(seconds, 1),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"), stamp=_hash([fp, time.time()]))
        if name == "data" and not spec.steps:   # a folder's stamp is its content
            self.state["stages"][name]["stamp"] = fp
        self._save_state()
        self._say(f"[{name}] done in {seconds:.1f}s")
        return "ran"

    def _run_steps(self, spec: StageSpec, log: Path, resume: bool) -> None:
        env = self._env()
        with open(log, "a" if resume else "w", encoding="utf-8") as fh:
            for step in spec.steps:
                fh.write(f"==> {' '.join(step.key())}\n")
                fh.flush()
                if step.func is not None:
                    step.func()
                    continue
                self._run_tool(spec.name, step, env, fh, log)

    def _run_tool(self, name: str, step: Step, env: dict, fh, log: Path) -> None:
        """Run a tool, its output written to the log ``fh`` line by line as it comes and its
        progress lines shown on the console (see :meth:`_show_progress`)."""
        argv = [sys.executable, str(HERE / f"{step.script}.py")] + step.args
        hide_tf = not script_utils.tf_log_level_given()
        kept: List[str] = []
        with subprocess.Popen(argv, cwd=self.out, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace",
                              bufsize=1) as proc:
            try:
                for line in proc.stdout:
                    self._take_line(name, line, fh, kept, hide_tf)
            except BaseException:     # Ctrl-C reaches the tool too: let it stop by itself
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                self._end_progress()
        step.output = "".join(kept)
        if proc.returncode != 0:
            tail = [ln for ln in kept if ln.strip()][-1:] or [""]
            raise StageError(f"stage {name}: {step.script}.py exited with status "
                             f"{proc.returncode} (log {log}): {tail[0].strip()}")

    def _take_line(self, name: str, line: str, fh, kept: List[str], hide_tf: bool) -> None:
        """One line of a tool's output into the log (a progress line in words, shown on the
        console too; TensorFlow's start-up lines left out when ``hide_tf``)."""
        fields = parse_progress(line)
        if fields is not None:
            text = describe_progress(fields)
            fh.write(f"progress: {text}\n")
            self._show_progress(name, text)
        elif not (hide_tf and TF_STARTUP_LINE.match(line.rstrip("\n"))):
            fh.write(line)
            kept.append(line)
        fh.flush()

    def _show_progress(self, name: str, text: str) -> None:
        """A stage's progress on the console: one updating line on a terminal, else a line
        per progress step."""
        line = f"[{name}] {text}"
        if self.echo and sys.stdout.isatty():
            width = shutil.get_terminal_size((100, 20)).columns - 1
            sys.stdout.write("\r" + line[:width] + "\x1b[K")
            sys.stdout.flush()
            self._live_line = True
        else:
            self._say(line)

    def _end_progress(self) -> None:
        if getattr(self, "_live_line", False):
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self._live_line = False

    def _outdated(self, name: str) -> bool:
        """Whether the finished stage ``name`` no longer matches the run: a stage it reads is
        not done (it failed, was interrupted or is stale itself), or its commands changed."""
        stages = self.state["stages"]
        try:
            with self._check_mode():
                spec = self.plan(name)
        except Exception:       # what it is planned from is gone
            return True
        if spec is None:
            return False
        return (any(stages.get(d, {}).get("status") not in ("done", "not used")
                    for d in spec.deps + spec.values_from)
                or stages[name].get("fingerprint") != self.fingerprint(spec))

    def mark_stale(self, failed: str) -> List[str]:
        """After the stage ``failed`` stopped the run, mark "stale" in the state every stage
        from it on that is still "done" but reads an unfinished stage (transitively) or whose
        commands changed, and rewrite the report, if there is one, to say which results are
        stale or missing. Returns the stages marked."""
        marked = []
        for name in STAGES[STAGES.index(failed):]:
            rec = self.state["stages"].get(name)
            if rec and rec.get("status") == "done" and self._outdated(name):
                rec["status"] = "stale"
                marked.append(name)
        if marked:
            self._save_state()
        if (self.out / "report.html").is_file() or (self.out / "summary.json").is_file():
            self.write_report()
        return marked

    def run(self, from_stage: Optional[str] = None, only: Optional[str] = None) -> dict:
        """Run the stages (all, from ``from_stage`` on, or ``only`` one); see the module doc.

        Every command line is checked by its tool's parser before the first stage runs. When a
        stage fails, it and the stages that read it are left not "done" (see
        :meth:`mark_stale`), so none shows an old result as current and a re-run redoes them.
        """
        first = STAGES.index(only or from_stage) if (only or from_stage) else 0
        for name in STAGES[:first]:
            rec = self.state["stages"].get(name, {})
            if rec.get("status") not in ("done", "not used"):
                raise StageError(f"stage {name} has not finished in {self.out}; run the "
                                 f"pipeline without --from/--only first")
        names = [only] if only else list(STAGES[first:])
        self.check(names, force=bool(only or from_stage))
        self.out.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                self.ran[name] = self.run_stage(name, force=bool(only or from_stage))
            except BaseException:
                self._after_failure(name)
                raise
        return self.ran

    def _after_failure(self, name: str) -> None:
        try:
            marked = self.mark_stale(name)
        except Exception as err:    # the failure itself is what the user must see
            logger.warning("could not mark the stages after %s as stale: %s", name, err)
            return
        if marked:
            logger.warning("stage %s did not finish; marked stale: %s", name, ", ".join(marked))

    # ---------------------------------------------------------------- dry run
    def dry_run(self, from_stage: Optional[str] = None, only: Optional[str] = None
                ) -> List[dict]:
        """What :meth:`run` would do, running nothing and writing nothing.

        The command lines are checked by the tools' parsers as before a run. Returns one
        ``{"stage", "action", "why", "commands"}`` per stage, ``action`` one of "skipped",
        "resumed", "run afresh" and "not used"; ``why`` names the fingerprint part that
        changed (commands, seed, a stage it reads, input files, extra).
        """
        force = bool(only or from_stage)
        first = STAGES.index(only or from_stage) if force else 0
        for name in STAGES[:first]:
            if self.state["stages"].get(name, {}).get("status") not in ("done", "not used"):
                raise StageError(f"stage {name} has not finished in {self.out}; run the "
                                 f"pipeline without --from/--only first")
        names = [only] if only else list(STAGES[first:])
        self.check(names, force=force)
        rows, rerun = [], set()
        for name in names:
            with self._check_mode():
                spec = self.plan(name)
            if spec is None:
                rows.append({"stage": name, "action": "not used", "why": "", "commands": []})
                continue
            action, why = self._verdict(spec, force, rerun)
            if action != "skipped":
                rerun.add(name)
            rows.append({"stage": name, "action": action, "why": why,
                         "commands": [step.key() for step in spec.steps]})
        return rows

    def _verdict(self, spec: StageSpec, force: bool, rerun: set) -> Tuple[str, str]:
        """("skipped" | "resumed" | "run afresh", why) of one stage; ``rerun``: the stages
        before it that will run."""
        record = self.state["stages"].get(spec.name) or {}
        if force:
            return "run afresh", "--from/--only reruns it"
        if not record.get("fingerprint"):
            return "run afresh", "it has not run in this folder"
        readers = [d for d in spec.deps if d in rerun]
        if readers:
            return "run afresh", f"a stage it reads runs again: {', '.join(readers)}"
        if self._unchanged(spec):
            later = [d for d in spec.values_from if d in rerun]
            return "skipped", "unchanged" + (
                f" (its commands change if {', '.join(later)} derives other values)"
                if later else "")
        status = record.get("status")
        if record["fingerprint"] == self.fingerprint(spec):
            if status in ("running", "failed"):
                return "resumed", f"it was {'interrupted' if status == 'running' else status}"
            if status == "stale":
                return "run afresh", "it is marked stale (a stage it reads did not finish)"
            missing = [p for p in spec.complete if not (self.out / p).exists()]
            return "run afresh", f"its outputs are missing: {', '.join(missing)}"
        return "run afresh", "changed: " + self._changed_parts(spec, record)

    def _changed_parts(self, spec: StageSpec, record: dict) -> str:
        """The parts of ``spec``'s fingerprint that differ from the recorded ones, in words."""
        new, old = self._parts_record(spec), record.get("parts")
        commands = [s.key() for s in spec.steps]
        words = []
        if commands != record.get("commands"):
            words.append("commands" + _command_change(record.get("commands") or [], commands))
        if old is None:
            return ", ".join(words) or ("the seed, a stage it reads, input files or extra "
                                        "(this run folder does not record which)")
        if new["seed"] != old.get("seed"):
            words.append(f"seed ({old.get('seed')} -> {new['seed']})")
        deps = [d for d in spec.deps if new["deps"].get(d) != (old.get("deps") or {}).get(d)]
        if deps:
            words.append(f"a stage it reads ({', '.join(deps)})")
        words += [label for key, label in (("inputs", "input files"), ("extra", "extra"))
                  if new[key] != old.get(key)]
        return ", ".join(words) or "commands"


def _command_change(old: List[List[str]], new: List[List[str]]) -> str:
    """`` (OLD -> NEW)``: the first words that differ between two stages' command lines."""
    import difflib

    flat_old = [w for cmd in old for w in cmd + ["\n"]]
    flat_new = [w for cmd in new for w in cmd + ["\n"]]
    matcher = difflib.SequenceMatcher(a=flat_old, b=flat_new, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag != "equal":
            before = " ".join(w for w in flat_old[max(0, a0 - 1):a1] if w != "\n")
            after = " ".join(w for w in flat_new[max(0, b0 - 1):b1] if w != "\n")
            return f" ({before or '-'} -> {after or '-'})"
    return ""


def format_dry_run(rows: List[dict], title: str = "") -> str:
    """The text ``--dry-run`` prints: per stage what a run would do, why, and its commands."""
    lines = [title] if title else []
    for row in rows:
        why = f": {row['why']}" if row["why"] else ""
        lines.append(f"[{row['stage']}] {row['action']}{why}")
        for cmd in row["commands"]:
            text = (" ".join(cmd[1:]) if cmd[0] == "python:"
                    else " ".join(shlex.quote(w) for w in [f"{cmd[0]}.py"] + cmd[1:]))
            lines.append(f"    {'(in process) ' if cmd[0] == 'python:' else ''}{text}")
    return "\n".join(lines)


class CrossValidation(_RunFolder):
    """``data.folds = K`` >= 2: the chain once per patient fold into ``OUT/fold_k``, then the
    out-of-fold test predictions pooled (``cross_validation`` module).

    Args:
        config_path: the TOML config (its ``data.source`` is ``sampler_layout``).
        out_dir: the run folder.
        echo: print each stage's progress line.
        sets: ``section.key=value`` overrides of the config (``--set``); each fold takes them
            too, but for its own ``data.dir`` and ``data.folds``.
    """

    def __init__(self, config_path: Union[str, Path], out_dir: Union[str, Path],
                 echo: bool = True, sets: Sequence[str] = ()):
        super().__init__(config_path, out_dir, echo, sets)
        self.fold_sets = [t for t in sets
                          if t.partition("=")[0].strip() not in ("data.dir", "data.folds")]

    def plans(self):
        import cross_validation as cv

        d = self.config["data"]
        labels = cv.patient_labels(Path(d["dir"]))
        return cv.plan_folds(labels, d["folds"], d["fold_val_size"], self.config["run"]["seed"])

    def run(self, from_stage: Optional[str] = None, only: Optional[str] = None) -> dict:
        """Run every fold (each skipping what is unchanged), then pool and report."""
        import cross_validation as cv

        self.out.mkdir(parents=True, exist_ok=True)
        fold_dirs = []
        for plan in self.plans():
            fold = self.out / f"fold_{plan.index + 1}"
            logger.info("fold %d of %d: %d train, %d val, %d test patients", plan.index + 1,
                        self.config["data"]["folds"], len(plan.train), len(plan.val),
                        len(plan.test))
            cv.write_fold_data_if_changed(Path(self.config["data"]["dir"]), fold / "data", plan)
            pipe = Pipeline(cv.write_fold_config(self.config_path, fold), fold, echo=self.echo,
                            sets=self.fold_sets)
            for name, status in pipe.run(from_stage=from_stage, only=only).items():
                self.ran[f"fold_{plan.index + 1}/{name}"] = status
            fold_dirs.append(fold)
        t0 = time.monotonic()
        summary = cv.pool_folds(self.out, fold_dirs, self.config, self.config_path,
                                tool=lambda *a: self._tool(*a))
        logger.info("[pooled] %d folds pooled in %.1fs", len(fold_dirs), time.monotonic() - t0)
        self.ran["pooled"] = "ran" if summary else "not used"
        return self.ran

    def dry_run(self, from_stage: Optional[str] = None, only: Optional[str] = None
                ) -> Dict[str, List[dict]]:
        """What :meth:`run` would do in each fold (``{"fold_k": rows}``, rows as
        :meth:`Pipeline.dry_run`; an empty list for a fold not laid out yet), writing nothing."""
        import cross_validation as cv

        result = {}
        for plan in self.plans():
            fold = self.out / f"fold_{plan.index + 1}"
            config = fold / "config.toml"
            current = config.is_file() and cv.fold_data_is_current(
                Path(self.config["data"]["dir"]), fold / "data", plan)
            result[fold.name] = (Pipeline(config, fold, echo=False, sets=self.fold_sets)
                                 .dry_run(from_stage=from_stage, only=only) if current else [])
        return result

    def _tool(self, script: str, args: List[str], log: Path) -> None:
        """Run a project tool in the run folder, its output in ``log``."""
        argv = [sys.executable, str(HERE / f"{script}.py")] + args
        env = self._env()
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"==> {' '.join([script] + args)}\n")
            fh.flush()
            proc = subprocess.run(argv, cwd=self.out, env=env, stdout=fh,
                                  stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise StageError(f"pooled evaluation: {script}.py exited with status "
                             f"{proc.returncode} (log {log})")


def run(config: str, out: Optional[str] = None, from_stage: Optional[str] = None,
        only: Optional[str] = None, strict: bool = False, sets: Optional[List[str]] = None,
        dry_run: bool = False) -> dict:
    """Run the pipeline of ``config`` into ``out`` and print where the report is.

    Args:
        config: the TOML config.
        out: the run folder (default: ``runs/<config name>``); a second run into the same
            folder skips what is unchanged.
        from_stage: rerun this stage and every later one.
        only: run only this stage (the earlier ones must be complete).
        strict: raise :class:`LearningWarnings` after the run when its ``summary.json`` holds
            warnings (they are printed with the summary either way).
        sets: ``section.key=value`` overrides of the config's keys (TOML values).
        dry_run: print what a run would do (see :func:`dry_run`) and return; nothing runs.

    Returns:
        ``{stage: "ran" | "skipped" | "not used"}`` of this call (with ``dry_run``: what a
        run would do, ``{stage: action}``, ``{"fold_k/stage": action}`` per fold).

    Raises:
        ConfigError: a bad config (one line naming the key and the file).
        StageError: a tool failed (its stage, exit status and log).
        LearningWarnings: ``strict`` and the run raised warnings.
    """
    if from_stage and only:
        raise ValueError("give --from or --only, not both")
    out = out or Path("runs") / Path(config).stem
    sets = list(sets or [])
    folds = load_config(config, sets)["data"]["folds"]
    pipe = (CrossValidation if folds > 1 else Pipeline)(config, out, sets=sets)
    if dry_run:
        return print_dry_run(pipe, from_stage, only)
    result = pipe.run(from_stage=from_stage, only=only)
    summary = pipe.out / "summary.json"
    warnings = []
    if summary.is_file():
        import report
        summary = json.loads(summary.read_text())
        warnings = summary.get("warnings") or []
        if folds > 1:
            import cross_validation

            print(cross_validation.format_cv_summary(summary))
        else:
            print(report.format_summary(summary))
    ran = sum(v == "ran" for v in result.values())
    print(f"{ran} stage(s) ran, {sum(v == 'skipped' for v in result.values())} skipped")
    print(f"Report: {pipe.out / 'report.html'}")
    if strict and warnings:
        raise LearningWarnings(warnings)
    return result


def print_dry_run(pipe: Union[Pipeline, CrossValidation], from_stage: Optional[str] = None,
                  only: Optional[str] = None) -> dict:
    """Print what a run of ``pipe`` would do, stage by stage (per fold for cross-validation),
    and return ``{stage: action}``; nothing is run or written."""
    print(f"Dry run of {pipe.config_path} into {pipe.out}: nothing is run or written.")
    if isinstance(pipe, Pipeline):
        folds = {"": pipe.dry_run(from_stage=from_stage, only=only)}
    else:
        folds = pipe.dry_run(from_stage=from_stage, only=only)
    result = {}
    for fold, rows in folds.items():
        where = pipe.out / fold
        title = f"{fold}:" if fold else ""
        if not rows:
            print(f"{fold}: not yet laid out (its data folder is made when the run starts); "
                  f"every stage runs afresh")
            continue
        if not (where / DERIVED_FILE).is_file():
            title += (" " if title else "") + ("(the rescale factor and means in the commands "
                                               "are stand-ins until the mean stage has run)")
        print(format_dry_run(rows, title))
        result.update({f"{fold}/{r['stage']}" if fold else r["stage"]: r["action"]
                       for r in rows})
    if isinstance(pipe, CrossValidation):
        print("[pooled] the folds' test predictions are pooled after the folds")
    return result


def get_args_parser() -> argparse.ArgumentParser:
    """Parser of ``run_pipeline.py``."""
    parser = argparse.ArgumentParser(
        description="Run the whole method (data, patches, patch and whole-image training, "
                    "prediction, evaluation, heatmaps, report) from one TOML config; unchanged "
                    "stages of an earlier run into the same folder are skipped.")
    parser.add_argument("config", metavar="CONFIG.toml",
                        help="pipeline config (see ddsm_train/configs/)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="run folder (default: runs/<config name>); reuse it to skip "
                             "unchanged stages")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                        help="rerun this stage and all later ones (default: only what changed)")
    parser.add_argument("--only", choices=STAGES, default=None,
                        help="run only this stage; the earlier ones must be complete "
                             "(default: all stages)")
    parser.add_argument("--strict", action="store_true", default=False,
                        help=f"exit with status {STRICT_EXIT} after the run when it raised "
                             "warnings about what the model learned (listed in the summary "
                             "and report.html; default: print them and exit 0)")
    parser.add_argument("--set", dest="sets", action="append", default=None,
                        metavar="SECTION.KEY=VALUE",
                        help="override a config key after the config (and the files it "
                             "extends) is read, the value in TOML (3, 0.5, true, \"adam\", "
                             "[1, 2]; a bare word is a string); repeatable (default: none)")
    parser.add_argument("--dry-run", action="store_true", default=False,
                        help="print each stage's command lines and whether it would be "
                             "skipped, resumed or run afresh, and why; run and write nothing "
                             "(default: off)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command-line entry point: a bad config exits with status 2, a failed stage with 1,
    ``--strict`` with warnings with :data:`STRICT_EXIT`."""
    try:
        return cli_main(get_args_parser(), run, argv)
    except StageError as err:
        sys.exit(f"run_pipeline.py: {err}")
    except LearningWarnings as err:
        print(f"run_pipeline.py: {err}", file=sys.stderr)
        sys.exit(STRICT_EXIT)


if __name__ == "__main__":
    main()
