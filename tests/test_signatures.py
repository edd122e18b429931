"""Function signatures across the code: the 2017 keyword calls stay, and no other function
takes a long parameter list (options travel as one typed object instead)."""
import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_PARAMETERS = 12

#: The 2017 public calls whose keyword signatures old code relies on, with the 2017 keywords
#: they must keep: the only functions allowed more than MAX_PARAMETERS parameters.
KEYWORDS_2017 = {
    ("dm_keras_ext", "do_3stage_training"): (
        "model", "org_model", "train_generator", "validation_set", "validation_steps",
        "best_model_out", "steps_per_epoch", "top_layer_nb", "net", "nb_epoch",
        "top_layer_epochs", "all_layer_epochs", "use_pretrained", "optim", "init_lr",
        "top_layer_multiplier", "all_layer_multiplier", "es_patience", "lr_patience",
        "auto_batch_balance", "nb_class", "pos_cls_weight", "neg_cls_weight", "nb_worker",
        "weight_decay2", "hidden_dropout2"),
    ("dm_keras_ext", "do_2stage_training"): (
        "model", "org_model", "train_generator", "validation_set", "validation_steps",
        "best_model_out", "steps_per_epoch", "top_layer_nb", "nb_epoch", "all_layer_epochs",
        "optim", "init_lr", "all_layer_multiplier", "es_patience", "lr_patience",
        "auto_batch_balance", "nb_class", "pos_cls_weight", "neg_cls_weight", "nb_worker",
        "weight_decay", "hidden_dropout", "weight_decay2", "hidden_dropout2"),
    ("dm_keras_ext", "get_dl_model"): (
        "net", "nb_class", "use_pretrained", "resume_from", "top_layer_nb", "weight_decay",
        "hidden_dropout"),
    ("dm_resnet", "add_top_layers"): (
        "model", "image_size", "patch_net", "block_type", "depths", "repetitions", "block_fn",
        "nb_class", "shortcut_with_bn", "bottleneck_enlarge_factor", "dropout", "weight_decay",
        "add_heatmap", "avg_pool_size", "return_heatmap", "add_conv", "add_shortcut",
        "hm_strides", "hm_pool_size", "fc_init_units", "fc_layers"),
    ("dm_resnet", "ResNetBuilder.build"): ("input_shape", "num_outputs", "block_fn",
                                           "repetitions", "nb_init_filter"),
    ("dm_resnet", "MultiViewResNetBuilder.build"): ("input_shape", "num_outputs", "block_fn",
                                                    "repetitions", "nb_init_filter"),
    ("dm_image", "DMImageDataGenerator.__init__"): (
        "featurewise_center", "samplewise_center", "rotation_range", "shear_range",
        "zoom_range", "channel_shift_range", "fill_mode", "horizontal_flip", "vertical_flip"),
    ("dm_image", "DMImageDataGenerator.flow"): ("X", "y", "batch_size", "shuffle", "seed"),
    ("dm_image", "DMImageDataGenerator.flow_from_directory"): (
        "directory", "target_size", "target_scale", "gs_255", "equalize_hist",
        "rescale_factor", "dup_3_channels", "classes", "class_mode", "auto_batch_balance",
        "batch_size", "preprocess", "shuffle", "seed"),
    ("dm_image", "DMDirectoryIterator.__init__"): (
        "directory", "image_data_generator", "target_size", "target_scale", "gs_255",
        "equalize_hist", "rescale_factor", "dup_3_channels", "classes", "class_mode",
        "auto_batch_balance", "batch_size", "shuffle", "seed"),
    ("dm_image", "DMNumpyArrayIterator.__init__"): ("X", "y", "image_data_generator",
                                                    "batch_size", "shuffle", "seed"),
}


def _functions(tree, prefix=""):
    """(qualified name, node) of every function of ``tree``, methods and nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, prefix + node.name + ".")


def _parameter_names(node):
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def _source_files():
    return sorted(REPO.glob("*.py")) + sorted((REPO / "ddsm_train").glob("*.py"))


def _public_object(module, name):
    import importlib

    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _defined_at(module, name):
    """(file stem, qualified name) where the 2017 call is defined (dm_keras_ext re-exports
    the staged-training calls of ddsm_train/training_runs.py)."""
    obj = _public_object(module, name)
    return Path(inspect.getsourcefile(obj)).stem, obj.__qualname__


def test_no_long_parameter_lists_but_the_2017_calls():
    allowed = {_defined_at(module, name) for module, name in KEYWORDS_2017}
    wide = {}
    for path in _source_files():
        for name, node in _functions(ast.parse(path.read_text(), str(path))):
            count = len(_parameter_names(node))
            if count > MAX_PARAMETERS and (path.stem, name) not in allowed:
                wide[f"{path.relative_to(REPO)}:{node.lineno} {name}"] = count
    assert wide == {}, ("functions with more than %d parameters: pass the options object "
                        "(run_options) or a small dataclass instead" % MAX_PARAMETERS)


@pytest.mark.parametrize("module, name", sorted(KEYWORDS_2017))
def test_2017_calls_keep_their_keywords(module, name):
    params = inspect.signature(_public_object(module, name)).parameters
    missing = [k for k in KEYWORDS_2017[module, name] if k not in params]
    assert missing == [], f"{module}.{name} lost its 2017 keywords {missing}"
