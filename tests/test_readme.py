"""The README documents every flag of the command-line scripts, and its set-up commands exist."""
import argparse
import importlib
import re

import pytest

SCRIPTS = ["image_clf_train", "patch_clf_train", "sample_patches_combined",
           "image_clf_predict", "heatmap_score", "make_synthetic_ddsm", "prepare_cbis_ddsm",
           "compute_mean", "evaluate", "run_pipeline", "export_model", "score_exported"]


def _all_scripts(repo_root):
    """Every ``ddsm_train`` module with a command line (a ``get_args_parser``)."""
    return sorted(p.stem for p in (repo_root / "ddsm_train").glob("*.py")
                  if "def get_args_parser" in p.read_text())


def _long_flags(parser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                yield opt


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_is_in_the_readme(repo_root, script):
    readme = (repo_root / "README.md").read_text()
    section = readme.split(f"### `{script}.py`", 1)
    assert len(section) == 2, f"README has no flags section for {script}.py"
    body = section[1].split("\n### ", 1)[0]
    parser = importlib.import_module(script).get_args_parser()
    missing = [f for f in _long_flags(parser)
               if f not in body and not (f.startswith("--no-") and "--" + f[5:] in body)]
    assert not missing, f"{script}.py flags missing from README: {missing}"


def test_readme_setup_commands_exist(repo_root):
    readme = (repo_root / "README.md").read_text()
    makefile = (repo_root / "Makefile").read_text()
    for target in ("test", "demo", "bench"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks target {target}"


def _readme_commands(readme):
    """Every ``python SCRIPT.py ...`` command of the README's code blocks, continuations joined."""
    import shlex
    for block in re.findall(r"```\n(.*?)```", readme, re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line)
            if len(words) > 1 and words[0] == "python" and words[1].endswith(".py"):
                yield words[1][:-3], words[2:]


def test_readme_walkthrough_commands_parse_as_written(repo_root):
    """Each script command of "Your own data" (and the rest of the README) is accepted by that
    script's parser exactly as written: flag names, value counts and choices."""
    readme = (repo_root / "README.md").read_text()
    commands = list(_readme_commands(readme))
    scripts = {name for name, _ in commands}
    assert {"prepare_cbis_ddsm", "sample_patches_combined", "patch_clf_train",
            "image_clf_train", "image_clf_predict", "heatmap_score"} <= scripts
    for name, argv in commands:
        parser = importlib.import_module(name).get_args_parser()
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command for {name}.py does not parse: {' '.join(argv)}")


def test_every_script_is_documented(repo_root):
    internal = {"gpu_check"}   # run by make gpu-check
    assert set(_all_scripts(repo_root)) - internal == set(SCRIPTS)


def test_every_argument_has_a_one_line_help_with_its_default(repo_root):
    """``--help`` explains every argument: positionals say what they are, options with a
    value say their default (a ``--no-x`` twin may stay hidden)."""
    problems = []
    for script in _all_scripts(repo_root):
        parser = importlib.import_module(script).get_args_parser()
        shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            text = " ".join((action.help or "").split())
            if not text:
                problems.append(f"{script}: {name} has no help")
            elif (action.option_strings and not shows_defaults and "default" not in text):
                problems.append(f"{script}: {name} help does not give the default")
    assert not problems, "\n".join(problems)
