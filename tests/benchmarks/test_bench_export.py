"""Benchmark: an exported model scored with onnxruntime (``score_exported.py``) against the
tf-keras model scored by ``image_clf_predict.py``, on the same image files: start-up time
(a fresh process importing the tool and loading the model) and time per image (reading,
resizing and scoring, best of ``BENCH_EXPORT_ROUNDS`` (3) interleaved rounds), with their
ratios, and the export's own time.

Run with ``make bench``. The model is a ResNet50 backbone (random weights) with a global
average pooling and softmax head, at ``BENCH_EXPORT_SIZE`` (``"1152 896"``, the paper's whole
image size; smaller is quicker on a CPU), carrying its input recipe. The files are the four
real 3328x2560 16-bit mammograms of ../shared when present, else synthetic 16-bit PNGs of that
size (``BENCH_EXPORT_IMAGES``, 4). ``BENCH_EXPORT_FLIPS=1`` averages the 4 flips in both."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import dm_image
from scoring_inputs import full_size_views

N_IMAGES = int(os.environ.get("BENCH_EXPORT_IMAGES", "4"))
ROUNDS = int(os.environ.get("BENCH_EXPORT_ROUNDS", "3"))
SIZE = tuple(int(v) for v in os.environ.get("BENCH_EXPORT_SIZE", "1152 896").split())
FLIPS = os.environ.get("BENCH_EXPORT_FLIPS", "0") == "1"
REPO = Path(__file__).resolve().parents[2]


def _model_file(tmp_path):
    import tf_keras as keras

    import dm_keras_ext

    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(weights=None, include_top=False,
                                       input_shape=(*SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    model = keras.Model(base.input, keras.layers.Dense(2, activation="softmax")(x))
    recipe = dm_image.InputRecipe(img_size=SIZE, channels=3, rescale_factor=0.003891,
                                  featurewise_center=True, featurewise_mean=52.16)
    path = tmp_path / "resnet50.h5"
    dm_keras_ext.save_model_atomic(model, str(path), include_optimizer=False, recipe=recipe)
    return path


_STARTUP = {
    "keras": "import image_clf_predict as m; m.load_models([{arg!r}])",
    "onnx": "import score_exported as m; m.load_export({arg!r})",
}


def _startup(kind, arg):
    """Wall seconds of a fresh process importing the tool and loading the model."""
    code = f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'ddsm_train')!r}]; " + \
        _STARTUP[kind].format(arg=str(arg))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return time.perf_counter() - t0


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def test_bench_onnxruntime_against_image_clf_predict(tmp_path):
    import export_model
    import image_clf_predict as icp
    import score_exported
    from image_inputs import ImageItem

    files, kind = full_size_views(tmp_path, N_IMAGES)
    model_file = _model_file(tmp_path)
    t_export, summary = _time(lambda: export_model.run(str(model_file), str(tmp_path / "exp"),
                                                      flips=FLIPS))
    assert summary["onnx"], summary["onnx_reason"]
    items = [ImageItem(p.name, p) for p in files]
    models = icp.load_models([str(model_file)])
    exported = score_exported.load_export(tmp_path / "exp")
    read = dict(img_size=SIZE, img_scale=None, rescale_factor=0.003891, equalize_hist=False,
                featurewise_center=True, featurewise_mean=52.16, segment_breast=False)
    keras_s, onnx_s = [], []
    for _ in range(ROUNDS):
        t, (p_keras, _) = _time(lambda: icp.score_items(items, models, [3], 2, 1, FLIPS, read,
                                                        prefetch=0))
        keras_s.append(t / len(items))
        t, (p_onnx, _) = _time(lambda: score_exported.score_images(exported, items, FLIPS, 1))
        onnx_s.append(t / len(items))
    diff = float(np.max(np.abs(p_keras - p_onnx)))
    start_keras = _startup("keras", model_file)
    start_onnx = _startup("onnx", tmp_path / "exp")
    print(f"\nexport benchmark: ResNet50 {SIZE[0]}x{SIZE[1]}, {len(items)} {kind} images, "
          f"flips {FLIPS}, {os.cpu_count()} CPUs")
    print(f"  export (SavedModel + tf2onnx + check): {t_export:.1f} s; ONNX check max diff "
          f"{summary['onnx_max_abs_diff']:.2e}; scores max diff {diff:.2e}")
    print(f"  start-up  image_clf_predict {start_keras:6.2f} s   onnxruntime "
          f"{start_onnx:6.2f} s   ratio {start_keras / start_onnx:.2f}x")
    print(f"  per image image_clf_predict {min(keras_s):6.3f} s   onnxruntime "
          f"{min(onnx_s):6.3f} s   ratio {min(keras_s) / min(onnx_s):.2f}x")
    assert diff < 1e-4
