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
holds the derived pixel scale and means), by the run's plan (``pipeline_plan.PipelinePlan``,
which keeps no state and runs no tool); :class:`Pipeline` holds a plan and does the running. The state of the run is ``OUT/pipeline_state.json``:
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
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)
from dm_image import parse_progress  # noqa: E402
from pipeline_config import load_config  # noqa: E402
from pipeline_plan import (DERIVED_FILE, STAGES, PipelinePlan, StageError,  # noqa: E402
                           StageSpec, Step, _atomic_json, _hash, tool_env)
from script_utils import cli_main  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "StageError", "LearningWarnings", "STRICT_EXIT", "Pipeline", "run",
           "get_args_parser", "main"]

#: Exit status of ``--strict`` when the run raised learning-health warnings.
STRICT_EXIT = 3

HERE = Path(__file__).resolve().parent
STATE_FILE = "pipeline_state.json"
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


class _RunFolder:
    """A run folder and its config, as both runners hold them."""

    def __init__(self, config_path: Path, config: dict, out: Path, echo: bool):
        self.config_path = config_path
        self.config = config
        self.out = out
        self.echo = echo
        self.ran: Dict[str, str] = {}   # stage -> "ran" / "skipped" / "not used", this call

    def _env(self) -> dict:
        return tool_env(self.config)


class Pipeline(_RunFolder):
    """One run folder and its config: plans each stage (through its :class:`PipelinePlan`,
    ``planner``), decides what to skip from the state file, runs the rest.

    Args:
        config_path: the TOML config.
        out_dir: the run folder (created when a stage runs).
        echo: print each stage's progress line to stdout.
        sets: ``section.key=value`` overrides of the config (``--set``).
        text: the config file's text when the file is not (yet) what a run reads (see
            :class:`PipelinePlan`).
    """

    def __init__(self, config_path: Union[str, Path], out_dir: Union[str, Path],
                 echo: bool = True, sets: Sequence[str] = (), text: Optional[str] = None):
        self.planner = PipelinePlan(config_path, out_dir, sets, text)
        super().__init__(self.planner.config_path, self.planner.config, self.planner.out, echo)
        self.state_path = self.out / STATE_FILE
        self.state = {"stages": {}}
        if self.state_path.is_file():
            self.state = json.loads(self.state_path.read_text())

    def plan(self, name: str) -> Optional[StageSpec]:
        """The stage ``name`` as it would run now (:meth:`PipelinePlan.plan`)."""
        return self.planner.plan(name)

    def write_report(self) -> None:
        """``report.html`` and ``summary.json`` from the run folder and the state as it is."""
        self.planner.write_report(self.state)

    # ---------------------------------------------------------------- running
    def _log_path(self, name: str) -> Path:
        return self.out / "logs" / f"{STAGES.index(name) + 1}_{name}.log"

    def _stamps(self) -> Dict[str, Optional[str]]:
        return {name: rec.get("stamp") for name, rec in self.state["stages"].items()}

    def fingerprint(self, spec: StageSpec) -> str:
        """The stage's fingerprint with the stamps of the stages it reads as the state has
        them (:meth:`PipelinePlan.fingerprint_parts`)."""
        return self.planner.fingerprint(spec, self._stamps())

    def _parts_record(self, spec: StageSpec) -> dict:
        return self.planner.parts_record(spec, self._stamps())

    def _save_state(self) -> None:
        _atomic_json(self.state_path, self.state)

    def _say(self, text: str) -> None:
        logger.info(text)

    def _complete(self, spec: StageSpec) -> bool:
        return all((self.out / p).exists() for p in spec.complete)

    def check(self, names: Sequence[str], force: bool = False) -> None:
        """Plan the stages ``names`` and check their command lines, before any runs (values an
        earlier stage derives have stand-ins until it has run). A stage that finished with the
        same commands (skipped unless ``force``) has them checked when it reruns."""
        with self.planner.check_mode():
            specs = [spec for spec in map(self.plan, names) if spec is not None]
        self.planner.check_commands([s for s in specs if force or not self._unchanged(s)])

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
        self.planner.check_commands([spec])     # old outputs go only once the new commands are valid
        if not resume:
            self._clean(spec)
        log = self._log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.state["stages"][name] = {"status": "running", "fingerprint": fp,
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "commands": [s.key() for s in spec.steps],
                                      "parts": self._parts_record(spec),
                                      "log": self.planner.rel(log)}
        self._save_state()
        self._say(f"[{name}] {'resuming' if resume else 'running'} (log: {self.planner.rel(log)})")
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
                    step.func(self.state)
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
            with self.planner.check_mode():
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
            with self.planner.check_mode():
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
        config_path = Path(config_path).resolve()
        super().__init__(config_path, load_config(config_path, sets), Path(out_dir).resolve(),
                         echo)
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
        :meth:`Pipeline.dry_run`), writing nothing in the run folder.

        Each fold is planned with the config :meth:`run` would write for it now (not the one
        an earlier run left in its folder). A fold whose data folder is not laid out yet (or
        was laid out for other patients or files) is planned on its data laid out in a
        temporary folder, as the run will lay them out.
        """
        return {f"fold_{plan.index + 1}": self._fold_dry_run(plan, from_stage, only)
                for plan in self.plans()}

    def _fold_dry_run(self, plan, from_stage: Optional[str], only: Optional[str]
                      ) -> List[dict]:
        import cross_validation as cv

        fold = self.out / f"fold_{plan.index + 1}"
        src, text = Path(self.config["data"]["dir"]), cv.fold_config_text(self.config_path)
        if cv.fold_data_is_current(src, fold / "data", plan):
            return Pipeline(fold / "config.toml", fold, echo=False, sets=self.fold_sets,
                            text=text).dry_run(from_stage=from_stage, only=only)
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(tmp) / fold.name
            cv.write_fold_data(src, where / "data", plan)
            if (fold / STATE_FILE).is_file():
                shutil.copy2(fold / STATE_FILE, where / STATE_FILE)
            pipe = Pipeline(where / "config.toml", where, echo=False, sets=self.fold_sets,
                            text=text)
            try:
                rows = pipe.dry_run(from_stage=from_stage, only=only)
            except StageError as err:
                raise StageError(str(err).replace(str(where), str(fold))) from None
        for row in rows:
            if row["stage"] == "data" and row["action"] == "run afresh":
                row["why"] = "the run lays out its data folder first"
        return rows

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
