"""The trainers' options as one typed object (run_options), the stage plan read from it, the
input recipe made from options, and what a saved model carries (ModelFileExtras)."""
import dataclasses
import json
import typing

import pytest

import image_clf_train
import patch_clf_train
import script_utils


@pytest.mark.parametrize("module", [patch_clf_train, image_clf_train])
def test_options_class_has_one_field_per_flag_with_the_parser_defaults(module):
    parser = module.get_args_parser()
    cls = module.options_class()
    defaults = vars(parser.parse_args(["a", "b", "c"]))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert list(fields) == list(dict.fromkeys(
        a.dest for a in parser._actions if a.dest != "help"))
    opts = cls(train_dir="a", val_dir="b", test_dir="c")
    assert dict(opts) == defaults
    # flag names (aliases and --no- forms) and help text live in each field's metadata
    assert fields["batch_size"].metadata["flags"] == ("--batch-size", "-bs")
    assert fields["img_scale"].metadata["flags"] == ("--img-scale", "-ic", "--no-img-scale",
                                                     "-nic")
    assert fields["init_lr"].metadata["help"].startswith("stage-1 learning rate")
    hints = typing.get_type_hints(cls)
    assert hints["batch_size"] is int and hints["init_lr"] is float
    assert hints["img_size"] == list[int] and hints["img_scale"] == typing.Optional[float]
    assert hints["augmentation"] is bool and hints["class_list"] == list[str]


def test_options_object_is_frozen_and_replace_checks_names():
    cls = patch_clf_train.options_class()
    opts = cls(train_dir="a", val_dir="b", test_dir="c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.nb_epoch = 3
    assert opts.replace(nb_epoch=3).nb_epoch == 3 and opts.nb_epoch == 5
    with pytest.raises(TypeError):
        opts.replace(no_such_option=1)
    assert opts["best_model"] == opts.best_model and opts.get("nope", 7) == 7
    with pytest.raises(KeyError):
        opts["nope"]


def test_stage_plan_takes_the_options_whole():
    import dm_keras_ext as K

    cls = image_clf_train.options_class()
    opts = cls(train_dir="a", val_dir="b", test_dir="c")
    plan = K.StagePlan.of(opts.replace(frozen_bn_mode="moving", init_lr=0.5, jit=True))
    assert (plan.frozen_bn_mode, plan.init_lr, plan.jit) == ("moving", 0.5, True)
    assert plan.all_layer_multiplier == opts.all_layer_multiplier == 0.1
    # fields the whole-image trainer has no flag for keep the plan's defaults
    assert plan.top_layer_epochs == K.StagePlan().top_layer_epochs == 0
    assert K.StagePlan.of(plan) is plan


def test_input_recipe_from_options_takes_the_recipe_fields():
    import dm_image

    opts = script_utils.resolve_options(patch_clf_train.get_args_parser(), ("a", "b", "c"),
                                        {"img_size": [40, 30], "rescale_factor": 0.5})
    recipe = dm_image.InputRecipe.from_options(opts, channels=3, preprocess="vgg16")
    assert recipe == dm_image.InputRecipe(
        img_size=(40, 30), channels=3, img_scale=None, rescale_factor=0.5,
        equalize_hist=True, featurewise_center=True, featurewise_mean=59.6,
        preprocess="vgg16")
    typed = patch_clf_train.options_class()(**opts)
    assert dm_image.InputRecipe.from_options(typed, channels=3, preprocess="vgg16") == recipe


def test_model_file_extras_written_in_the_file_and_the_sidecar_once(tmp_path, keras_session):
    import dm_image
    import dm_keras_ext as K

    keras = keras_session
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(inp)))
    recipe = dm_image.InputRecipe(img_size=(8, 8), rescale_factor=0.25)
    calls = []
    record = {"a": 1}

    def text():
        calls.append(1)
        return json.dumps(record)

    extras = K.ModelFileExtras(recipe=recipe, info={"net": "toy"},
                               sidecar=(tmp_path / "m.h5.options.json", text))
    K.save_model_atomic(model, tmp_path / "m.h5", extras=extras)
    assert json.loads((tmp_path / "m.h5.options.json").read_text()) == {"a": 1}
    record["a"] = 2
    K.save_model_atomic(model, tmp_path / "m.h5", extras=extras)   # second save: no sidecar
    assert calls == [1] and json.loads((tmp_path / "m.h5.options.json").read_text()) == {"a": 1}
    assert dm_image.InputRecipe.from_model_file(tmp_path / "m.h5") == recipe
    assert K.read_model_info(tmp_path / "m.h5") == {"net": "toy"}
    K.save_model_atomic(model, tmp_path / "plain.h5")      # nothing registered by path
    assert K.read_model_info(tmp_path / "plain.h5") is None
    assert dm_image.InputRecipe.from_model_file(tmp_path / "plain.h5") is None


def test_resolve_options_takes_positionals_as_given():
    """A folder named like a flag is a folder, a Path becomes a str, a single path given for a
    positional that takes several is a list of one; a keyword the parser lacks is refused."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=3)
    got = script_utils.resolve_options(parser, ("-odd", Path("m.h5")), {"size": 5})
    assert got == {"folder": "-odd", "models": ["m.h5"], "size": 5}
    assert script_utils.resolve_options(parser, (Path("d"), ["a", "b"]), {}) == \
        {"folder": "d", "models": ["a", "b"], "size": 3}
    with pytest.raises(ValueError, match=r"unknown options \['sise'\]"):
        script_utils.resolve_options(parser, ("d", "m"), {"sise": 5})
    with pytest.raises(ValueError, match="3 positional values for 2"):
        script_utils.resolve_options(parser, ("d", "m", "x"), {})
    parser.add_argument("--model", nargs="+", required=True)
    parser.add_argument("--level", type=int, choices=[1, 2], required=True)
    got = script_utils.resolve_options(parser, ("d", "m"), {"model": [object], "level": 2})
    assert (got["model"], got["level"]) == ([object], 2)
    assert parser._option_string_actions["--level"].required     # the parser is left as it was
    with pytest.raises(ValueError, match=r"--model \(model\) is required"):
        script_utils.resolve_options(parser, ("d", "m"), {})
