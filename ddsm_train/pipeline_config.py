"""The configuration file of ``run_pipeline.py``: a TOML file read with ``tomllib``, checked key by
key, completed with the defaults.

A setting that becomes a flag of one tool (:data:`TOOL_KEYS`, e.g. ``image_train.nb_epoch``,
``--nb-epoch`` of ``image_clf_train.py``) has that tool's parser default, so a default lives in
one place; :data:`SCHEMA` holds only the pipeline's own settings (the data source, stage
switches, values derived as "auto", extra flags) with their defaults.

A config may start with ``extends = "other.toml"`` (relative to its own folder): the other file
is read first and this one's keys replace its keys, section by section, so a small config can
change a few settings of a shipped one (``ddsm_train/configs/*.toml``). ``--set section.key=value``
of ``run_pipeline.py`` (:func:`parse_set`) replaces a key after that.

An unknown key, a value of the wrong type, an unknown choice (:data:`CHOICES`) or a number out
of its range (:data:`RANGES`) is a ``ConfigError`` (a ``ValueError``) of one line naming the key
and the file. Importing this module does not import TensorFlow (the trainers' defaults are read
in a child process).
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

__all__ = ["ConfigError", "SCHEMA", "TOOL_KEYS", "KINDS", "CHOICES", "RANGES", "AUTO",
           "DATA_SOURCES", "PATH_KEYS", "tool_defaults", "defaults", "parse_set", "load_config"]

#: The value of a setting the pipeline derives from the data or from an earlier stage.
AUTO = "auto"
#: The kinds of input data (``data.source``).
DATA_SOURCES = ("synthetic", "cbis_ddsm", "sampler_layout", "class_folders")


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names the file and the key."""


# Types of values: "int", "float" (an int is accepted), "bool", "str", "str_list", "int_list",
# "int_pair"; "|auto" accepts the string "auto" too, "|none" the string "none" (not set).
#: The pipeline's own settings: section -> key -> (type, default). Top-level keys live in the
#: section "". A setting that becomes one tool's flag is in :data:`TOOL_KEYS` instead.
SCHEMA: Dict[str, Dict[str, tuple]] = {
    "": {"extends": ("str", "")},
    "run": {
        "seed": ("int", 12345),            # RANDOM_SEED of every tool
        "workers": ("int", 2),             # NUM_CPU_CORES and the tools' --workers
    },
    "data": {
        "source": ("str", "synthetic"),    # one of DATA_SOURCES
        "dir": ("str", ""),                # sampler_layout / class_folders: the data folder
        "cbis_csv_dir": ("str", ""),       # cbis_ddsm: the four description CSVs
        "cbis_dicom_root": ("str", ""),    # cbis_ddsm: the DICOM tree
        "rescale_factor": ("float|auto", AUTO),   # auto: from the images' bit depth
        "folds": ("int", 1),               # >= 2: cross-validation by patient (sampler_layout)
        "fold_val_size": ("float", 0.2),   # share of the training folds' patients validating
    },
    "synthetic": {},
    "patches": {
        "model": ("str", ""),              # an existing patch classifier: no sampling, no training
        "test_nb_abn": ("int|auto", AUTO),  # auto: (nb_bkg - nb_hns + 1) // 2
        "extra_args": ("str_list", []),
    },
    "patch_train": {
        "featurewise_mean": ("float|auto", AUTO),
        "extra_args": ("str_list", []),
    },
    "image_train": {
        "featurewise_mean": ("float|auto", AUTO),
        "kept_layer_idx": ("int|auto", AUTO),   # auto: the patch net's default cut point
        "extra_args": ("str_list", []),
    },
    "predict": {
        "flips": ("bool", True),           # also score with flip augmentation
        "extra_args": ("str_list", []),
    },
    "heatmaps": {
        "enabled": ("bool", True),
        "avg_pool_size": ("int|auto", AUTO),   # auto: patch size / 32 (the feature map's width)
        "extra_args": ("str_list", []),
    },
    "evaluate": {
        "enabled": ("bool", True),         # score the validation images and run evaluate.py
        "extra_args": ("str_list", []),
    },
    "export": {
        "enabled": ("bool", True),         # export the whole-image model with its model card
    },
}


def _tool(script: str, **keys: tuple) -> Dict[str, tuple]:
    return {key: (kind, script, dest) for key, (kind, dest) in keys.items()}


_TRAINING = dict(img_scale=("float|none", "img_scale"), equalize_hist=("bool", "equalize_hist"),
                 batch_size=("int", "batch_size"),
                 train_bs_multiplier=("float", "train_bs_multiplier"),
                 augmentation=("bool", "augmentation"), load_ram=("bool", "load_train_ram"),
                 nb_epoch=("int", "nb_epoch"), all_layer_epochs=("int", "all_layer_epochs"),
                 optimizer=("str", "optim"), learning_rate=("float", "init_lr"))
#: The settings that become one tool's flag: section -> key -> (type, tool, the flag's dest).
#: Their default is that tool's parser default (``get_args_parser()``), "none" for ``None``.
TOOL_KEYS: Dict[str, Dict[str, tuple]] = {
    "data": _tool("prepare_cbis_ddsm", val_size=("float|none", "val_size")),
    "synthetic": _tool("make_synthetic_ddsm", patients=("int", "nb_patients"),
                       img_height=("int", "img_height"), img_width=("int", "img_width"),
                       lesion_contrast=("float", "lesion_contrast")),
    "patches": _tool("sample_patches_combined", **{k: ("int", k) for k in (
        "target_height", "patch_size", "nb_bkg", "nb_abn", "nb_hns", "normal_views")},
        val_size=("float", "val_size")),
    "patch_train": _tool("patch_clf_train", net=("str", "net"),
                         use_pretrained=("bool", "use_pretrained"),
                         nb_init_filter=("int", "nb_init_filter"),
                         init_filter_size=("int", "init_filter_size"),
                         init_conv_stride=("int", "init_conv_stride"),
                         class_list=("str_list", "class_list"),
                         top_layer_epochs=("int", "top_layer_epochs"), **_TRAINING),
    "image_train": _tool("image_clf_train", img_size=("int_pair", "img_size"),
                         block_type=("str", "block_type"), top_depths=("int_list", "top_depths"),
                         top_repetitions=("int_list", "top_repetitions"),
                         bottleneck_enlarge_factor=("int", "bottleneck_enlarge_factor"),
                         all_layer_multiplier=("float", "all_layer_multiplier"), **_TRAINING),
    "predict": _tool("image_clf_predict", bootstrap=("int", "bootstrap"),
                     batch_size=("int", "batch_size")),
    "heatmaps": {},
    "evaluate": _tool("evaluate", calibrate=("str", "calibrate"),
                      target_sensitivity=("float", "target_sensitivity"),
                      target_specificity=("float", "target_specificity"),
                      breast_combine=("str", "breast_combine")),
}
#: Every setting's type: section -> key -> type.
KINDS: Dict[str, Dict[str, str]] = {
    section: {**{k: v[0] for k, v in keys.items()},
              **{k: v[0] for k, v in TOOL_KEYS.get(section, {}).items()}}
    for section, keys in SCHEMA.items()}

#: "section.key" -> the values a string setting may take.
CHOICES: Dict[str, tuple] = {
    "data.source": DATA_SOURCES,
    "evaluate.calibrate": ("none", "platt", "isotonic"),
    "evaluate.breast_combine": ("mean", "max"),
}
#: "section.key" -> (low, high): a number setting must be > low and <= high.
RANGES: Dict[str, tuple] = {
    "data.folds": (0, 100),
    "data.fold_val_size": (0.0, 0.9),
    "evaluate.target_sensitivity": (0.0, 1.0),
    "evaluate.target_specificity": (0.0, 1.0),
}

_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "str_list": "a list of strings",
               "int_list": "a list of integers", "int_pair": "a list of two integers"}


def _check_value(kind: str, value: Any) -> bool:
    base, _, alt = kind.partition("|")
    if alt and value == alt:
        return True
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool":
        return isinstance(value, bool)
    if base == "str":
        return isinstance(value, str)
    if base == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if base in ("int_list", "int_pair"):
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        return ok and (base == "int_list" or len(value) == 2)
    raise AssertionError(kind)


def _describe(kind: str) -> str:
    base, _, alt = kind.partition("|")
    return _TYPE_WORDS[base] + (f' or "{alt}"' if alt else "")


def _check_allowed(name: str, value: Any, path: Union[str, Path]) -> None:
    """The :data:`CHOICES` and :data:`RANGES` of the setting ``name`` (``section.key``)."""
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{path}: key '{name}' should be one of {', '.join(CHOICES[name])}, "
                          f"got {value!r}")
    if name in RANGES and not RANGES[name][0] < value <= RANGES[name][1]:
        low, high = RANGES[name]
        raise ConfigError(f"{path}: key '{name}' should be in ({low:g}, {high:g}], "
                          f"got {value!r}")


def _validate(raw: dict, path: Union[str, Path]) -> None:
    for key, value in raw.items():
        if isinstance(value, dict):
            section = KINDS.get(key)
            if section is None or key == "":
                raise ConfigError(f"{path}: unknown section [{key}] (known: "
                                  f"{', '.join(s for s in KINDS if s)})")
            for sub, val in value.items():
                if sub not in section:
                    raise ConfigError(f"{path}: unknown key '{key}.{sub}' (known in [{key}]: "
                                      f"{', '.join(section)})")
                if not _check_value(section[sub], val):
                    raise ConfigError(f"{path}: key '{key}.{sub}' should be "
                                      f"{_describe(section[sub])}, got {val!r}")
                _check_allowed(f"{key}.{sub}", val, path)
        elif key in KINDS[""]:
            if not _check_value(KINDS[""][key], value):
                raise ConfigError(f"{path}: key '{key}' should be "
                                  f"{_describe(KINDS[''][key])}, got {value!r}")
        else:
            raise ConfigError(f"{path}: unknown key '{key}' (settings belong in a section: "
                              f"{', '.join(s for s in KINDS if s)})")


def _read(path: Path, seen: tuple, text: Optional[str] = None) -> dict:
    """The keys of the config file ``path`` (its text ``text`` when given) and the files it
    extends."""
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back to this file")
    if text is None and not path.is_file():
        where = f" (extended by {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8") if text is None else text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
    _validate(raw, path)
    base = raw.pop("extends", "")
    if not base:
        return raw
    merged = _read((path.parent / base).resolve(), seen + (path,))
    for key, value in raw.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return merged


_TOOL_DEFAULTS: Dict[str, Dict[str, Any]] = {}


def _defaults_of_parsers() -> Dict[str, Dict[str, Any]]:
    """``{script: {dest: default}}`` of the tools named in :data:`TOOL_KEYS` (imports them)."""
    import importlib

    wanted: Dict[str, set] = {}
    for keys in TOOL_KEYS.values():
        for _, script, dest in keys.values():
            wanted.setdefault(script, set()).add(dest)
    defaults = {}
    for script, dests in wanted.items():
        parser = importlib.import_module(script).get_args_parser()
        defaults[script] = {dest: parser.get_default(dest) for dest in sorted(dests)}
    return defaults


def _defaults_from_child() -> None:
    """Child process of :func:`tool_defaults`: prints the parsers' defaults as JSON."""
    print("DEFAULTS " + json.dumps(_defaults_of_parsers()))


def tool_defaults() -> Dict[str, Dict[str, Any]]:
    """The default of every :data:`TOOL_KEYS` setting: ``{section: {key: value}}``, read from
    the tool's ``get_args_parser()`` (a ``None`` default becomes "none", a tuple a list).

    The trainers import TensorFlow, so the parsers are read in a child process (in this one
    when TensorFlow is imported already) and kept in ``ddsm_train/__pycache__`` until a source
    file of the project changes.
    """
    if not _TOOL_DEFAULTS:
        parsers = _cached_parsers()
        for section, keys in TOOL_KEYS.items():
            _TOOL_DEFAULTS[section] = {
                key: _as_setting(parsers[script][dest]) for key, (_, script, dest) in keys.items()}
    return copy.deepcopy(_TOOL_DEFAULTS)


def _sources_stamp() -> str:
    """The sizes and times of the project's Python files (the parsers' defaults come from
    them)."""
    here = Path(__file__).resolve().parent
    files = sorted(here.glob("*.py")) + sorted(here.parent.glob("*.py"))
    items = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([sys.version_info[:2], items])


#: Where the parsers' defaults are kept between processes.
_CACHE = Path(__file__).resolve().parent / "__pycache__" / "tool_defaults.json"


def _cached_parsers() -> Dict[str, Dict[str, Any]]:
    cache = _CACHE
    stamp = _sources_stamp()
    try:
        held = json.loads(cache.read_text(encoding="utf-8"))
        if held.get("stamp") == stamp:
            return held["defaults"]
    except (OSError, ValueError, AttributeError):
        pass        # no cache yet, or an unreadable one: read the parsers
    parsers = (_defaults_of_parsers() if "tensorflow" in sys.modules
               else _parsers_in_child())
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "defaults": parsers}), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass        # a read-only checkout: read the parsers again next time
    return parsers


def _parsers_in_child() -> Dict[str, Dict[str, Any]]:
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import pipeline_config; "
            f"pipeline_config._defaults_from_child()")
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True,
                          text=True, errors="replace")
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not last.startswith("DEFAULTS "):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"could not read the tools' default settings: {tail}")
    return json.loads(last[len("DEFAULTS "):])


def _as_setting(value: Any) -> Any:
    if value is None:
        return "none"
    return list(value) if isinstance(value, (tuple, list)) else value


def defaults() -> Dict[str, Dict[str, Any]]:
    """Every setting's default: the pipeline's own (:data:`SCHEMA`) and the tools' parsers'
    (:func:`tool_defaults`)."""
    result = {section: {key: copy.deepcopy(spec[1]) for key, spec in keys.items()}
              for section, keys in SCHEMA.items() if section}
    for section, values in tool_defaults().items():
        result[section].update(values)
    return result


#: The settings that name files or folders (relative ones are taken from the config's folder,
#: or from the current folder when given with ``--set``).
PATH_KEYS = ("data.dir", "data.cbis_csv_dir", "data.cbis_dicom_root", "patches.model")
_BARE_WORD = re.compile(r"[^\s\[\]{}\"'=,#]+")


def parse_set(text: str) -> Tuple[str, str, Any]:
    """``section.key=value`` of ``--set`` as ``(section, key, value)``, the value read as TOML
    (``3``, ``0.5``, ``true``, ``"adam"``, ``[1, 2]``; a bare word such as ``adam`` is a string).

    Raises:
        ConfigError: no ``=``, no section, or a value that is neither TOML nor a bare word.
    """
    name, eq, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not eq or not dot or not section or not key:
        raise ConfigError(f"--set {text}: give section.key=value, e.g. image_train.nb_epoch=3")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        if not _BARE_WORD.fullmatch(value):
            raise ConfigError(f"--set {text}: the value {value!r} is not TOML (a string with "
                              f"spaces or quotes needs quotes: '{section}.{key}=\"...\"')"
                              ) from None
        parsed = value
    return section, key, parsed


def _apply_sets(config: dict, sets: Sequence[str]) -> None:
    for text in sets:
        section, key, value = parse_set(text)
        _validate({section: {key: value}}, f"--set {text}")
        if f"{section}.{key}" in PATH_KEYS and value:
            value = str(Path(value).expanduser().resolve())
        config[section][key] = value


def load_config(path: Union[str, Path], sets: Sequence[str] = (),
                text: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """Read, check and complete a pipeline config.

    Args:
        path: the TOML file.
        sets: ``section.key=value`` overrides (``run_pipeline.py --set``), applied after the
            file and the files it extends, each checked like a key of the file.
        text: the file's text, read instead of ``path`` (which need not exist; its relative
            paths and ``extends`` are still from ``path``'s folder).

    Returns:
        ``{section: {key: value}}`` for every setting (:func:`defaults` filled in; ``extends``
        resolved and removed).

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, a value has the wrong
            type or an unknown choice; the message names the file (or the ``--set``) and the
            key.
    """
    path = Path(path).resolve()
    raw = _read(path, (), text)
    config = defaults()
    for section, values in raw.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            config[section][key] = (str((path.parent / Path(value).expanduser()).resolve())
                                    if name in PATH_KEYS and value else value)
    _apply_sets(config, sets)
    _check_source(config, path)
    return config


def _check_source(config: dict, path: Path) -> None:
    source = config["data"]["source"]      # its choices are checked in _validate
    needs = {"sampler_layout": ["dir"], "class_folders": ["dir"],
             "cbis_ddsm": ["cbis_csv_dir", "cbis_dicom_root"]}.get(source, [])
    for key in needs:
        if not config["data"][key]:
            raise ConfigError(f"{path}: data.source = {source!r} needs the key 'data.{key}'")
    if config["data"]["folds"] > 1 and source != "sampler_layout":
        raise ConfigError(f"{path}: data.folds = {config['data']['folds']} (cross-validation) "
                          f"needs data.source = 'sampler_layout', got {source!r}")
    if source == "class_folders" and not config["patches"]["model"]:
        raise ConfigError(f"{path}: data.source = 'class_folders' has no ROI masks to sample "
                          f"patches from: give an existing patch classifier in 'patches.model'")
