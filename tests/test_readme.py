"""The README documents every flag of the command-line scripts, and its set-up commands exist."""
import argparse
import importlib
import re

import pytest

SCRIPTS = ["image_clf_train", "patch_clf_train", "sample_patches_combined",
           "image_clf_predict", "heatmap_score", "make_synthetic_ddsm", "prepare_cbis_ddsm"]


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
