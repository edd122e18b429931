"""The configuration file of ``run_pipeline.py``: a TOML file read with ``tomllib``, checked key by
key against :data:`SCHEMA`, completed with the defaults.

A config may start with ``extends = "other.toml"`` (relative to its own folder): the other file
is read first and this one's keys replace its keys, section by section, so a small config can
change a few settings of a shipped one (``ddsm_train/configs/*.toml``).

An unknown key, a value of the wrong type, an unknown choice (:data:`CHOICES`) or a number out
of its range (:data:`RANGES`) is a ``ConfigError`` (a ``ValueError``) of one line naming the key
and the file. Importing this module does not import TensorFlow.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Dict, Union

__all__ = ["ConfigError", "SCHEMA", "CHOICES", "RANGES", "AUTO", "load_config", "DATA_SOURCES"]

#: The value of a setting the pipeline derives from the data or from an earlier stage.
AUTO = "auto"
#: The kinds of input data (``data.source``).
DATA_SOURCES = ("synthetic", "cbis_ddsm", "sampler_layout", "class_folders")


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names the file and the key."""


# Types of values: "int", "float" (an int is accepted), "bool", "str", "str_list", "int_list",
# "int_pair"; "|auto" accepts the string "auto" too, "|none" the string "none" (not set).
#: section -> key -> (type, default). Top-level keys live in the section "".
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
        "val_size": ("float", 0.1),        # cbis_ddsm: validation patients' share
        "rescale_factor": ("float|auto", AUTO),   # auto: from the images' bit depth
        "folds": ("int", 1),               # >= 2: cross-validation by patient (sampler_layout)
        "fold_val_size": ("float", 0.2),   # share of the training folds' patients validating
    },
    "synthetic": {
        "patients": ("int", 160),
        "img_height": ("int", 576),
        "img_width": ("int", 448),
        "lesion_contrast": ("float", 2.0),
    },
    "patches": {
        "model": ("str", ""),              # an existing patch classifier: no sampling, no training
        "target_height": ("int", 4096),
        "patch_size": ("int", 256),
        "nb_bkg": ("int", 30),
        "nb_abn": ("int", 30),
        "nb_hns": ("int", 15),
        "val_size": ("float", 0.1),
        "test_nb_abn": ("int|auto", AUTO),  # auto: (nb_bkg - nb_hns + 1) // 2
        "normal_views": ("int", 0),        # background patches per lesion-free view
        "extra_args": ("str_list", []),
    },
    "patch_train": {
        "net": ("str", "resnet50"),
        "use_pretrained": ("bool", True),
        "nb_init_filter": ("int", 32),
        "init_filter_size": ("int", 5),
        "init_conv_stride": ("int", 2),
        "img_scale": ("float|none", "none"),
        "equalize_hist": ("bool", False),
        "featurewise_mean": ("float|auto", AUTO),
        "class_list": ("str_list", ["background", "malignant", "benign"]),
        "batch_size": ("int", 64),
        "train_bs_multiplier": ("float", 0.5),
        "augmentation": ("bool", True),
        "load_ram": ("bool", False),
        "nb_epoch": ("int", 3),
        "top_layer_epochs": ("int", 10),
        "all_layer_epochs": ("int", 37),
        "optimizer": ("str", "sgd"),
        "learning_rate": ("float", 0.01),
        "extra_args": ("str_list", []),
    },
    "image_train": {
        "img_size": ("int_pair", [1152, 896]),
        "img_scale": ("float|none", "none"),
        "equalize_hist": ("bool", False),
        "featurewise_mean": ("float|auto", AUTO),
        "batch_size": ("int", 4),
        "train_bs_multiplier": ("float", 0.5),
        "augmentation": ("bool", True),
        "load_ram": ("bool", False),
        "block_type": ("str", "resnet"),
        "top_depths": ("int_list", [512, 512]),
        "top_repetitions": ("int_list", [2, 2]),
        "bottleneck_enlarge_factor": ("int", 2),
        "kept_layer_idx": ("int|auto", AUTO),   # auto: the patch net's default cut point
        "nb_epoch": ("int", 5),
        "all_layer_epochs": ("int", 50),
        "optimizer": ("str", "adam"),
        "learning_rate": ("float", 0.0001),
        "all_layer_multiplier": ("float", 0.01),
        "extra_args": ("str_list", []),
    },
    "predict": {
        "flips": ("bool", True),           # also score with flip augmentation
        "bootstrap": ("int", 2000),
        "batch_size": ("int", 4),
        "extra_args": ("str_list", []),
    },
    "heatmaps": {
        "enabled": ("bool", True),
        "avg_pool_size": ("int|auto", AUTO),   # auto: patch size / 32 (the feature map's width)
        "extra_args": ("str_list", []),
    },
    "evaluate": {
        "enabled": ("bool", True),         # score the validation images and run evaluate.py
        "calibrate": ("str", "none"),      # one of CHOICES["evaluate.calibrate"]
        "target_sensitivity": ("float", 0.9),   # validation-chosen threshold keeping it
        "target_specificity": ("float", 0.9),
        "breast_combine": ("str", "mean"),  # views of a breast: mean or max
        "extra_args": ("str_list", []),
    },
    "export": {
        "enabled": ("bool", True),         # export the whole-image model with its model card
    },
}

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


def _check_allowed(name: str, value: Any, path: Path) -> None:
    """The :data:`CHOICES` and :data:`RANGES` of the setting ``name`` (``section.key``)."""
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{path}: key '{name}' should be one of {', '.join(CHOICES[name])}, "
                          f"got {value!r}")
    if name in RANGES and not RANGES[name][0] < value <= RANGES[name][1]:
        low, high = RANGES[name]
        raise ConfigError(f"{path}: key '{name}' should be in ({low:g}, {high:g}], "
                          f"got {value!r}")


def _validate(raw: dict, path: Path) -> None:
    for key, value in raw.items():
        if isinstance(value, dict):
            section = SCHEMA.get(key)
            if section is None or key == "":
                raise ConfigError(f"{path}: unknown section [{key}] (known: "
                                  f"{', '.join(s for s in SCHEMA if s)})")
            for sub, val in value.items():
                if sub not in section:
                    raise ConfigError(f"{path}: unknown key '{key}.{sub}' (known in [{key}]: "
                                      f"{', '.join(section)})")
                kind = section[sub][0]
                if not _check_value(kind, val):
                    raise ConfigError(f"{path}: key '{key}.{sub}' should be {_describe(kind)}, "
                                      f"got {val!r}")
                _check_allowed(f"{key}.{sub}", val, path)
        elif key in SCHEMA[""]:
            if not _check_value(SCHEMA[""][key][0], value):
                raise ConfigError(f"{path}: key '{key}' should be "
                                  f"{_describe(SCHEMA[''][key][0])}, got {value!r}")
        else:
            raise ConfigError(f"{path}: unknown key '{key}' (settings belong in a section: "
                              f"{', '.join(s for s in SCHEMA if s)})")


def _read(path: Path, seen: tuple) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back to this file")
    if not path.is_file():
        where = f" (extended by {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
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


def load_config(path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """Read, check and complete a pipeline config.

    Args:
        path: the TOML file.

    Returns:
        ``{section: {key: value}}`` for every section and key of :data:`SCHEMA` (defaults
        filled in; ``extends`` resolved and removed).

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, a value has the wrong
            type or an unknown choice; the message names the file and the key.
    """
    path = Path(path).resolve()
    raw = _read(path, ())
    config = {section: {key: copy.deepcopy(spec[1]) for key, spec in keys.items()}
              for section, keys in SCHEMA.items() if section}
    for section, values in raw.items():
        config[section].update(values)
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
    for section in ("data", "patches"):
        for key in ("dir", "cbis_csv_dir", "cbis_dicom_root", "model"):
            value = config[section].get(key)
            if value:   # relative paths are taken from the config's folder
                config[section][key] = str((path.parent / Path(value).expanduser()).resolve())
    return config
