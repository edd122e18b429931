"""One typed object of a script's options, made from its parser.

Shen et al., "Deep Learning to Improve Breast Cancer Detection on Screening Mammography",
Sci Rep 9, 12495 (2019); arXiv:1708.09427.

A trainer's flags are declared once, in its ``get_args_parser()`` (through the flag groups of
``common_flags``). :func:`options_class` turns that parser into a frozen dataclass: one field
per destination, its type from the flag's type (``list[...]`` for several values,
``... | None`` where None is allowed), its default the parser's, and ``metadata`` holding the
flag names (``"flags"``, the 2017 short aliases and ``--no-x`` forms included) and the help
text (``"help"``). So adding a trainer flag is one ``add_argument`` (and its README line):
the options object, its defaults and ``run(**options)`` follow.

The other scripts (``heatmap_score``, ``image_clf_predict``, ``sample_patches_combined``,
``evaluate``, ``make_synthetic_ddsm``) follow the same pattern: ``options_class()`` of their
parser, ``run(positionals, **options)`` resolving keywords against the parser
(``script_utils.resolve_options``) and one options object handed to the implementation.

A trainer's options object is passed whole: to ``training_runs.train_3stage`` /
``train_2stage`` (which read the fields of ``training_runs.StagePlan`` from it) and to the run
skeleton of ``training_setup``. It also reads as a mapping (``opts["best_model"]``, ``dict(opts)``) for the
helpers shared with the scripts that still keep their options in a dict.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import typing

__all__ = ["RunOptions", "options_class", "tool_options_class", "options_from", "keyword_run"]


class RunOptions(collections.abc.Mapping):
    """Base of the options dataclasses of :func:`options_class`: field access by attribute
    or by key, ``replace`` for a changed copy."""

    def __getitem__(self, key: str) -> typing.Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    @classmethod
    def _field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: typing.Any) -> RunOptions:
        """A copy with ``changes`` (field names; an unknown one raises TypeError)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def flags_of(cls, name: str) -> tuple:
        """The command-line flags of field ``name`` (long, short and ``--no-`` forms)."""
        return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["flags"]


def _value_type(action: argparse.Action) -> typing.Any:
    """The Python type of one destination's value."""
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                           argparse._StoreFalseAction)):
        return bool
    base = action.type
    if isinstance(base, type):
        pass
    elif base is None or base is str.lower:
        base = str
    else:   # a checking function of common_flags: its return annotation
        base = typing.get_type_hints(base).get("return", typing.Any)
    if action.nargs not in (None, "?"):
        base = list[base]
    return base


def options_class(parser: argparse.ArgumentParser, name: str) -> type:
    """The frozen dataclass of ``parser``'s options (see the module docstring).

    Args:
        parser: a script's parser.
        name: the class name (e.g. ``"PatchTrainOptions"``).

    Returns:
        A dataclass type derived from :class:`RunOptions`, one keyword-only field per
        destination, in the parser's order.
    """
    fields, seen = [], {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help"):
            continue
        if action.dest in seen:       # ``--no-x`` of an optional value: None allowed
            seen[action.dest]["flags"] += tuple(action.option_strings)
            seen[action.dest]["optional"] = True
            continue
        seen[action.dest] = {"flags": tuple(action.option_strings), "optional":
                             action.default is None, "action": action}
    for dest, info in seen.items():
        action = info["action"]
        type_ = _value_type(action)
        if info["optional"]:
            type_ = typing.Optional[type_]
        default = parser.get_default(dest)
        meta = {"flags": info["flags"], "help": action.help}
        if isinstance(default, list):
            field = dataclasses.field(default_factory=lambda d=tuple(default): list(d),
                                      metadata=meta)
        else:
            field = dataclasses.field(default=default, metadata=meta)
        fields.append((dest, type_, field))
    return dataclasses.make_dataclass(name, fields, bases=(RunOptions,), frozen=True,
                                      kw_only=True, eq=True)


def tool_options_class(get_parser: typing.Callable[[], argparse.ArgumentParser],
                       name: str) -> typing.Callable[[], type]:
    """A script's ``options_class()``: :func:`options_class` of ``get_parser()`` named
    ``name``, made on the first call and the same class after."""

    @functools.lru_cache(maxsize=None)
    def tool_options() -> type:
        return options_class(get_parser(), name)

    tool_options.__doc__ = (f"The frozen dataclass ``{name}`` of this script's options, made "
                            f"from its ``get_args_parser()``: one field per destination, the "
                            f"positionals included, with the flag's type, default and help "
                            f"(``run_options.options_class``).")
    return tool_options


def options_from(cls: type, options: collections.abc.Mapping) -> RunOptions:
    """An instance of ``cls`` (a class of :func:`options_class`) from a mapping of every
    option (``script_utils.resolve_options``); an unknown key raises TypeError."""
    if isinstance(options, cls):
        return options
    return cls(**dict(options))


def keyword_run(run: typing.Callable, cls: type, parser: argparse.ArgumentParser,
                positionals: typing.Sequence, options: dict) -> typing.Any:
    """The keyword form of a tool's ``run``: ``options`` (by destination name; missing ones
    take the parser's defaults) and ``positionals`` resolved against ``parser``
    (``script_utils.resolve_options``) into one ``cls`` object, handed to ``run`` with the
    two keywords that are not flags, ``custom_objects`` and ``given_options``, when given."""
    import script_utils

    extras = {k: options.pop(k) for k in ("custom_objects", "given_options") if k in options}
    return run(options_from(cls, script_utils.resolve_options(parser, positionals, options)),
               **extras)
