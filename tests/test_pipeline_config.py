"""``ddsm_train/pipeline_config.py``: every default in one place (a setting that becomes a tool's
flag has that tool's parser default), ``run_pipeline.py --set`` and the reasons ``--dry-run``
gives. The dry runs of a finished run are in ``test_pipeline.py`` (they reuse its run)."""
import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TOML = REPO / "ddsm_train" / "configs" / "demo.toml"
#: The tool each config section's settings are flags of.
SECTION_TOOLS = {"data": "prepare_cbis_ddsm", "synthetic": "make_synthetic_ddsm",
                 "patches": "sample_patches_combined", "patch_train": "patch_clf_train",
                 "image_train": "image_clf_train", "predict": "image_clf_predict",
                 "heatmaps": "heatmap_score", "evaluate": "evaluate"}


def _parser_default(script, dest):
    value = importlib.import_module(script).get_args_parser().get_default(dest)
    return "none" if value is None else (list(value) if isinstance(value, tuple) else value)


def test_tool_settings_default_to_the_tools_parsers():
    """The effective default of every setting that becomes a tool's flag is that tool's."""
    import pipeline_config as pc

    defaults = pc.defaults()
    checked = 0
    for section, keys in pc.TOOL_KEYS.items():
        for key, (kind, script, dest) in keys.items():
            want = _parser_default(script, dest)
            assert defaults[section][key] == want, (f"{section}.{key}", script, dest)
            assert pc._check_value(kind, want), (f"{section}.{key}", kind, want)
            checked += 1
    assert checked >= 40
    assert defaults["image_train"]["top_repetitions"] == [3, 3]
    assert defaults["image_train"]["bottleneck_enlarge_factor"] == 4
    assert defaults["patch_train"]["all_layer_epochs"] == 20


def test_schema_restates_no_tool_default():
    """A pipeline setting named like a flag of its section's tool must be a derived "auto"
    value: a fixed default there would be a second default of that flag."""
    import pipeline_config as pc

    for section, keys in pc.SCHEMA.items():
        assert not set(keys) & set(pc.TOOL_KEYS.get(section, {})), section
        if section not in SECTION_TOOLS:
            continue
        parser = importlib.import_module(SECTION_TOOLS[section]).get_args_parser()
        dests = {a.dest for a in parser._actions}
        for key, (_kind, default) in keys.items():
            if key in dests:
                assert default == pc.AUTO, (f"{section}.{key} restates a default of "
                                            f"{SECTION_TOOLS[section]}.py")


def test_a_key_left_out_takes_the_tools_default(tmp_path):
    import pipeline_config as pc

    config = tmp_path / "c.toml"
    config.write_text('[image_train]\nnb_epoch = 2\n')
    loaded = pc.load_config(config)
    assert loaded["image_train"]["nb_epoch"] == 2
    assert loaded["image_train"]["optimizer"] == _parser_default("image_clf_train", "optim")
    assert loaded["patch_train"]["equalize_hist"] is True     # patch_clf_train.py's default
    assert loaded["heatmaps"]["avg_pool_size"] == "auto"      # the pipeline's own


def test_shipped_configs_keep_values_the_tools_do_not_default_to():
    import pipeline_config as pc

    configs = REPO / "ddsm_train" / "configs"
    own = pc.load_config(configs / "own_data.toml")
    assert own["image_train"]["bottleneck_enlarge_factor"] == 2
    assert own["patch_train"]["augmentation"] is True
    assert own["patch_train"]["equalize_hist"] is False
    real = pc.load_config(configs / "real_films_cpu.toml")
    assert (real["patch_train"]["all_layer_epochs"], real["patch_train"]["equalize_hist"],
            real["image_train"]["bottleneck_enlarge_factor"]) == (37, False, 2)


# ------------------------------------------------------------------------------------- --set
@pytest.mark.parametrize("text, section, key, value", [
    ("image_train.nb_epoch=3", "image_train", "nb_epoch", 3),
    ('patch_train.class_list=["a", "b"]', "patch_train", "class_list", ["a", "b"]),
    ("patch_train.optimizer=sgd", "patch_train", "optimizer", "sgd"),
    ('patch_train.optimizer="nadam"', "patch_train", "optimizer", "nadam"),
    ("image_train.learning_rate = 1e-4", "image_train", "learning_rate", 0.0001),
    ("predict.flips=false", "predict", "flips", False),
])
def test_set_overrides_a_key_after_the_config(tmp_path, text, section, key, value):
    import pipeline_config as pc

    config = tmp_path / "c.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n')
    loaded = pc.load_config(config, [text])
    assert loaded[section][key] == value
    assert pc.load_config(config)[section][key] != value       # the file itself says otherwise


def test_later_set_wins_and_paths_are_from_the_current_folder(tmp_path, monkeypatch):
    import pipeline_config as pc

    monkeypatch.chdir(tmp_path)
    loaded = pc.load_config(DEMO_TOML, ["image_train.nb_epoch=3", "image_train.nb_epoch=4",
                                        "data.source=sampler_layout", "data.dir=mine"])
    assert loaded["image_train"]["nb_epoch"] == 4
    assert loaded["data"]["dir"] == str(tmp_path / "mine")


@pytest.mark.parametrize("text, words", [
    ("image_train.nb_epochs=3", ["--set image_train.nb_epochs=3", "unknown key",
                                 "'image_train.nb_epochs'"]),
    ("trainer.nb_epoch=3", ["unknown section [trainer]"]),
    ("image_train.nb_epoch=three", ["'image_train.nb_epoch'", "an integer", "'three'"]),
    ("evaluate.calibrate=beta", ["'evaluate.calibrate'", "none, platt, isotonic"]),
    ("image_train.nb_epoch", ["--set image_train.nb_epoch", "section.key=value"]),
    ("nb_epoch=3", ["--set nb_epoch=3", "section.key=value"]),
    ('patch_train.class_list=["a", ', ["patch_train.class_list", "not TOML"]),
    ("data.source=class_folders", ["data.source = 'class_folders' needs the key 'data.dir'"]),
])
def test_bad_set_is_one_line_naming_the_key(tmp_path, capsys, text, words):
    import run_pipeline

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_pipeline.main([str(DEMO_TOML), "--out", str(out), "--set", text, "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists()


def test_set_reaches_the_command_lines(tmp_path):
    import pipeline_plan

    plan = pipeline_plan.PipelinePlan(DEMO_TOML, tmp_path / "run",
                                      sets=["synthetic.patients=7", "image_train.nb_epoch=3"])
    with plan.check_mode():
        data, image = plan.plan("data").steps[0].args, plan.plan("image_train").steps[0].args
    assert data[data.index("--nb-patients") + 1] == "7"
    assert image[image.index("--nb-epoch") + 1] == "3"


# --------------------------------------------------------------------- --dry-run's reasons
def _finished_data_stage(tmp_path, sets=()):
    """A run folder whose state says the data stage finished with the demo config."""
    import run_pipeline

    out = tmp_path / "run"
    pipe = run_pipeline.Pipeline(DEMO_TOML, out, echo=False, sets=sets)
    spec = pipe.plan("data")
    (out / "data" / "whole_img").mkdir(parents=True)
    (out / "data" / "synthetic_ddsm.json").write_text("{}")
    record = {"status": "done", "fingerprint": pipe.fingerprint(spec), "stamp": "s1",
              "commands": [s.key() for s in spec.steps], "parts": pipe._parts_record(spec)}
    (out / "pipeline_state.json").write_text(json.dumps({"stages": {"data": record}}))
    return out


@pytest.mark.parametrize("sets, action, why", [
    ([], "skipped", "unchanged"),
    (["synthetic.patients=7"], "run afresh", "changed: commands (--nb-patients 160 -> "
                                             "--nb-patients 7)"),
    (["run.seed=7"], "run afresh", "seed (12345 -> 7)"),
])
def test_dry_run_names_the_changed_part(tmp_path, sets, action, why):
    import run_pipeline

    out = _finished_data_stage(tmp_path)
    pipe = run_pipeline.Pipeline(DEMO_TOML, out, echo=False, sets=sets)
    got_action, got_why = pipe._verdict(pipe.plan("data"), False, set())
    assert got_action == action and why in got_why, got_why
    assert run_pipeline.Pipeline(DEMO_TOML, out, echo=False)._verdict(
        pipe.plan("sample_patches"), False, {"data"}) == (
        "run afresh", "it has not run in this folder")


def test_dry_run_resumes_an_interrupted_stage_and_reruns_its_readers(tmp_path):
    import run_pipeline

    out = _finished_data_stage(tmp_path)
    state = json.loads((out / "pipeline_state.json").read_text())
    state["stages"]["data"]["status"] = "running"
    state["stages"]["sample_patches"] = {"status": "done", "fingerprint": "f", "stamp": "s2"}
    (out / "pipeline_state.json").write_text(json.dumps(state))
    pipe = run_pipeline.Pipeline(DEMO_TOML, out, echo=False)
    assert pipe._verdict(pipe.plan("data"), False, set()) == ("resumed", "it was interrupted")
    with pipe.planner.check_mode():
        spec = pipe.plan("sample_patches")
    assert pipe._verdict(spec, False, {"data"}) == ("run afresh",
                                                    "a stage it reads runs again: data")


def _tiny_layout(folder: Path, patients: int = 10) -> Path:
    """A sampler-layout folder of tiny 8-bit whole images, half the patients positive."""
    import cv2
    import numpy as np

    for sub in ("full_img", "roi_mask"):
        (folder / sub).mkdir(parents=True)
        cv2.imwrite(str(folder / sub / "P01_LEFT_CC.png"), np.zeros((16, 16), np.uint8))
    (folder / "roi_mask_path.csv").write_text("patient_id,side,view,abn_num,pathology,type\n")
    for i in range(patients):
        where = folder / "whole_img" / "train" / ("pos" if i % 2 else "neg")
        where.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(where / f"P{i:02d}_LEFT_CC.png"), np.full((16, 16), 100, np.uint8))
    return folder


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dry_run_of_cross_validation_speaks_per_fold(tmp_path, capsys):
    import cross_validation as cv
    import run_pipeline

    data = _tiny_layout(tmp_path / "data")
    config = tmp_path / "cv.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n[data]\nsource = "sampler_layout"\n'
                      f'dir = "{data.as_posix()}"\nfolds = 2\n')
    out = tmp_path / "run"
    plan = run_pipeline.CrossValidation(config, out, echo=False).plans()[0]
    cv.write_fold_data_if_changed(data, out / "fold_1" / "data", plan)    # as a run lays it out
    cv.write_fold_config(config, out / "fold_1")
    before = _files(out)
    result = run_pipeline.main([str(config), "--out", str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert "[data] run afresh: it has not run in this folder" in text      # fold 1
    assert "[data] run afresh: the run lays out its data folder first" in text    # fold 2
    assert result["fold_1/patch_train"] == result["fold_2/patch_train"] == "run afresh"
    assert result["fold_1/export"] == result["fold_2/export"] == "not used"
    assert "data/whole_img/train data/whole_img/val" in text.split("fold_2:")[1]
    assert _files(out) == before


def test_dry_run_of_cross_validation_plans_the_fold_config_a_run_writes(tmp_path, capsys):
    """A fold folder whose config.toml an older run wrote (exporting, and with other
    patches): the dry run shows what a run does now, with the fold config it writes (no
    export) and the current keys, and leaves the old file as it was."""
    import cross_validation as cv
    import run_pipeline

    data = _tiny_layout(tmp_path / "data")
    config = tmp_path / "cv.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n[data]\nsource = "sampler_layout"\n'
                      f'dir = "{data.as_posix()}"\nfolds = 2\n')
    out = tmp_path / "run"
    plans = run_pipeline.CrossValidation(config, out, echo=False).plans()
    for plan in plans:
        cv.write_fold_data_if_changed(data, out / f"fold_{plan.index + 1}" / "data", plan)
        (out / f"fold_{plan.index + 1}" / "config.toml").write_text(
            f'extends = "{config.as_posix()}"\n[data]\ndir = "data"\nfolds = 1\n'
            f"[patches]\nnb_abn = 7\n")
    before = _files(out)
    result = run_pipeline.main([str(config), "--out", str(out), "--dry-run",
                                "--set", "patch_train.nb_epoch=4"])
    text = capsys.readouterr().out
    assert result["fold_1/export"] == result["fold_2/export"] == "not used", result
    assert "--nb-abn 7 " not in text and text.count("--nb-epoch 4 ") == 2
    assert _files(out) == before


def test_tool_defaults_are_kept_until_a_source_file_changes(tmp_path, monkeypatch):
    import pipeline_config as pc

    real = pc._defaults_of_parsers()
    cache = tmp_path / "tool_defaults.json"
    monkeypatch.setattr(pc, "_CACHE", cache)
    kept = json.loads(json.dumps(real))
    kept["image_clf_train"]["nb_epoch"] = 99
    cache.write_text(json.dumps({"stamp": pc._sources_stamp(), "defaults": kept}))
    monkeypatch.setattr(pc, "_TOOL_DEFAULTS", {})
    assert pc.tool_defaults()["image_train"]["nb_epoch"] == 99     # read from the cache
    cache.write_text(json.dumps({"stamp": "sources of another day", "defaults": kept}))
    monkeypatch.setattr(pc, "_TOOL_DEFAULTS", {})
    assert pc.tool_defaults()["image_train"]["nb_epoch"] == real["image_clf_train"]["nb_epoch"]
    assert json.loads(cache.read_text())["stamp"] == pc._sources_stamp()
