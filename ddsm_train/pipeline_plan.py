"""The plan of a pipeline run: each stage's command lines, read from a config and a run folder.

:class:`PipelinePlan` holds a config (``pipeline_config.load_config``) and the run folder it
is planned for. It derives every flag a stage needs (:meth:`PipelinePlan.plan`), the
fingerprint of a stage (:meth:`PipelinePlan.fingerprint`: its command lines, the seed, the
stamps of the stages it reads, its input files and extra material) and has each tool's own
parser check the planned command lines (:meth:`PipelinePlan.check_commands`). It keeps no
state, runs no tool and writes nothing while it plans: running the stages, deciding what to
skip and keeping ``pipeline_state.json`` is the work of ``run_pipeline.Pipeline``, which holds
a plan. The functions a plan's steps name (writing ``derived.json``, the heatmap image list,
``export/run_info.json``, the report) run only when that runner runs the step.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import script_utils  # noqa: F401  (first: puts the root dm_* modules on sys.path)
from dm_image import PROGRESS_ENV, atomic_write  # noqa: E402
from pipeline_config import AUTO, ConfigError, load_config  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "StageError", "Step", "StageSpec", "PipelinePlan", "files_fingerprint",
           "parse_error", "blame_key", "describe_refusal", "tool_env"]

HERE = Path(__file__).resolve().parent
#: The stages, in order.
STAGES = ("data", "sample_patches", "mean", "patch_train", "image_train", "predict",
          "predict_flips", "predict_val", "evaluate", "heatmaps", "export", "report")
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


class StageError(RuntimeError):
    """A stage's tool failed; the message names the stage, its exit status and its log."""


# A step of a stage: a tool's command line (script name, then its arguments), or a function run
# in this process (given the run's state), described by a list of strings that enters the
# fingerprint.
@dataclass
class Step:
    script: Optional[str] = None
    args: List[str] = field(default_factory=list)
    func: Optional[Callable[[dict], None]] = None
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
    """Child process of :meth:`PipelinePlan.check_commands`: reads ``[[script, args], ...]`` as JSON
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




def tool_env(config: dict) -> dict:
    """The environment the project's tools run in for ``config``: its seed and workers, the
    progress lines on, this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["RANDOM_SEED"] = str(config["run"]["seed"])
    env["NUM_CPU_CORES"] = str(config["run"]["workers"])
    if not script_utils.tf_log_level_given():
        # left unset, the tools hide TensorFlow's start-up lines themselves (set, they
        # would take it for the user's wish to see them)
        env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env[PROGRESS_ENV] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class PipelinePlan:
    """What each stage of a run of ``config_path`` into ``out_dir`` would run now.

    Planning reads the config, the data and what earlier stages left in the run folder
    (``derived.json``, the patch model's options), and writes nothing; the run folder need not
    exist.

    Args:
        config_path: the TOML config.
        out_dir: the run folder the commands are planned for.
        sets: ``section.key=value`` overrides of the config (``--set``).
        text: the config file's text, when the file at ``config_path`` is not (yet) what a
            run would read (relative paths in it are still from ``config_path``'s folder).
    """

    def __init__(self, config_path: Union[str, Path], out_dir: Union[str, Path],
                 sets: Sequence[str] = (), text: Optional[str] = None):
        self.config_path = Path(config_path).resolve()
        self.config = load_config(self.config_path, sets, text=text)
        self.out = Path(out_dir).resolve()
        self._text = text
        self._checking = False          # planning to check commands: stand-ins for derived values
        self._used_derived = False      # the plan being made read derived.json
        self._checked: set = set()      # command lines the tools' parsers accepted

    def config_text(self) -> str:
        """The config file's text (as given, or as it is on disk)."""
        return self._text if self._text is not None else self.config_path.read_text(encoding="utf-8")

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
    def check_mode(self) -> Iterator[None]:
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

        def drop(_state):
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

        def write(_state):
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

        def write_list(_state):
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

    def _write_run_info(self, state: dict) -> None:
        """``export/run_info.json``: what the model card says about this run (its config,
        training commands as ``state`` records them, data counts and learning-health
        warnings, as the report finds them)."""
        import report

        commands = {s: (state["stages"].get(s) or {}).get("commands") or [[]]
                    for s in ("patch_train", "image_train")}
        info = {"config_file": self.config_path.name,
                "pipeline_config": self.config_text(),
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
                         extra={"config": _hash([self.config_text(), self.config])})

    def write_report(self, state: dict) -> None:
        """``report.html`` and ``summary.json`` from the run folder and the run's ``state``."""
        import report

        report.write_report(self.out, self.config_path, self.config, state,
                            whole_img_dir=self.whole_img_dir(), stage_order=STAGES)

    def _plan_report(self):
        deps = [s for s in STAGES if s != "report"]
        return StageSpec("report", [Step(func=self.write_report,
                                         describe=["report.write_report"])],
                         deps=deps, outputs=["report.html", "summary.json"],
                         complete=["report.html", "summary.json"],
                         extra={"config": _hash(self.config_text())})

    def fingerprint_parts(self, spec: StageSpec,
                          stamps: Optional[Mapping[str, Optional[str]]] = None) -> dict:
        """What a stage's fingerprint is made of: its command lines (``steps``), ``seed``, the
        stamps of the stages it reads (``deps``, from ``stamps``: ``{stage: stamp}`` as the
        run's state records them; none in a folder where nothing has run), its outside
        ``inputs`` and ``extra``."""
        stamps = stamps or {}
        return {"steps": [s.key() for s in spec.steps],
                "seed": self.config["run"]["seed"],
                "deps": {d: stamps.get(d) for d in spec.deps},
                "inputs": files_fingerprint(spec.inputs) if spec.inputs else None,
                "extra": spec.extra}

    def fingerprint(self, spec: StageSpec,
                    stamps: Optional[Mapping[str, Optional[str]]] = None) -> str:
        """The stage's fingerprint (see :meth:`fingerprint_parts`)."""
        return _hash(self.fingerprint_parts(spec, stamps))

    def parts_record(self, spec: StageSpec,
                     stamps: Optional[Mapping[str, Optional[str]]] = None) -> dict:
        """The fingerprint's parts as the state keeps them (so ``--dry-run`` can say which one
        changed): the seed and the stamps as they are, the others hashed."""
        parts = self.fingerprint_parts(spec, stamps)
        return {key: value if key in ("seed", "deps") else _hash(value)
                for key, value in parts.items()}

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
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import pipeline_plan; "
                f"pipeline_plan._check_from_stdin()")
        proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=tool_env(self.config),
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

