"""Every module imports, both as a root module and from the scripts folder."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT_MODULES = ["dm_image", "dm_keras_ext", "dm_resnet", "dm_multi_gpu", "dm_enet"]


def _runs_ok(code, cwd, *pythonpath):
    """Run ``code`` in a fresh Python in ``cwd`` with only ``pythonpath`` on ``PYTHONPATH``;
    it must exit 0 and print ``ok`` last."""
    env = {"PYTHONPATH": ":".join(map(str, pythonpath)), "PATH": "/usr/bin:/bin",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", ROOT_MODULES)
def test_root_module_imports_and_exports(name, repo_root):
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve() == repo_root / f"{name}.py"   # this checkout's module
    assert mod.__all__
    for public in mod.__all__:
        assert hasattr(mod, public), f"{name}.__all__ lists {public!r} but it is not defined"


def test_modules_import_with_pythonpath_only(repo_root, tmp_path):
    """The 2017 workflow: ``export PYTHONPATH=...`` then import from any folder."""
    code = "import " + ", ".join(ROOT_MODULES) + "; print('ok')"
    _runs_ok(code, tmp_path, repo_root)


def test_image_functions_do_not_load_tensorflow(repo_root, tmp_path):
    """The sampler and CBIS-DDSM preparation (and their worker processes) import dm_image
    without TensorFlow; the first iterator made binds tf-keras's Sequence as its base."""
    code = ("import sys, numpy as np, dm_image, sample_patches_combined, prepare_cbis_ddsm\n"
            "assert 'tensorflow' not in sys.modules, 'image functions loaded TensorFlow'\n"
            "it = dm_image.DMImageDataGenerator().flow(np.zeros((2, 8, 8), np.uint8), [0, 1],"
            " batch_size=1)\n"
            "import tf_keras\n"
            "assert isinstance(it, tf_keras.utils.Sequence)\n"
            "print('ok')")
    _runs_ok(code, tmp_path, repo_root, repo_root / "ddsm_train")


def test_dm_keras_ext_re_exports_the_training_runs_module(repo_root):
    """The training layer is one module, ``training_runs`` (as the scripts import it), and
    ``dm_keras_ext`` hands out its objects, not copies from a second module."""
    import dm_keras_ext
    import training_runs

    assert Path(training_runs.__file__).resolve() == repo_root / "ddsm_train" / "training_runs.py"
    assert dm_keras_ext.do_2stage_training is training_runs.do_2stage_training
    assert set(dm_keras_ext._TRAINING_RUNS_NAMES) == set(training_runs.__all__)
    assert set(dm_keras_ext._TRAINING_RUNS_NAMES) <= set(dm_keras_ext.__all__)
    for name in training_runs.__all__:
        assert getattr(dm_keras_ext, name) is getattr(training_runs, name), name
    assert "ddsm_train.training_runs" not in sys.modules
    assert not hasattr(dm_keras_ext, "no_such_name")


@pytest.mark.slow
def test_2017_imports_of_the_training_names_with_pythonpath_only(repo_root, tmp_path):
    """With only the repository root on ``PYTHONPATH`` (another folder as cwd):
    ``dm_keras_ext`` alone does not load the training layer; the 2017 imports of its names
    work and give the objects the trainers use (``training_setup`` imports it by plain name)."""
    code = ("import sys\n"
            "import dm_keras_ext\n"
            "assert 'training_runs' not in sys.modules, 'dm_keras_ext loaded training_runs'\n"
            "from dm_keras_ext import do_3stage_training, DMAucModelCheckpoint\n"
            "import training_setup, training_runs\n"
            "assert do_3stage_training is training_runs.do_3stage_training\n"
            "assert DMAucModelCheckpoint is training_runs.DMAucModelCheckpoint\n"
            "assert dm_keras_ext.do_2stage_training is training_runs.do_2stage_training\n"
            "assert 'ddsm_train.training_runs' not in sys.modules, sorted(sys.modules)\n"
            "print('ok')")
    _runs_ok(code, tmp_path, repo_root)
