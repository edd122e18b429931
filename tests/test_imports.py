"""Every module imports, both as a root module and from the scripts folder."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT_MODULES = ["dm_image", "dm_keras_ext", "dm_resnet", "dm_multi_gpu", "dm_enet"]


@pytest.mark.parametrize("name", ROOT_MODULES)
def test_root_module_imports_and_exports(name, repo_root):
    mod = importlib.import_module(name)
    assert Path(mod.__file__).resolve() == repo_root / f"{name}.py"   # this checkout's module
    assert mod.__all__
    for public in mod.__all__:
        assert hasattr(mod, public), f"{name}.__all__ lists {public!r} but it is not defined"


def test_modules_import_with_pythonpath_only(repo_root, tmp_path):
    """The 2017 workflow: ``export PYTHONPATH=...`` then import from any folder."""
    env = {"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = "import " + ", ".join(ROOT_MODULES) + "; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_image_functions_do_not_load_tensorflow(repo_root, tmp_path):
    """The sampler and CBIS-DDSM preparation (and their worker processes) import dm_image
    without TensorFlow; the first iterator made binds tf-keras's Sequence as its base."""
    env = {"PYTHONPATH": f"{repo_root}:{repo_root / 'ddsm_train'}", "PATH": "/usr/bin:/bin",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = ("import sys, numpy as np, dm_image, sample_patches_combined, prepare_cbis_ddsm\n"
            "assert 'tensorflow' not in sys.modules, 'image functions loaded TensorFlow'\n"
            "it = dm_image.DMImageDataGenerator().flow(np.zeros((2, 8, 8), np.uint8), [0, 1],"
            " batch_size=1)\n"
            "import tf_keras\n"
            "assert isinstance(it, tf_keras.utils.Sequence)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
