"""``run_pipeline.py`` checks every stage's command line with that tool's own parser before any
stage runs, and names the config key a refusal comes from. The checks on a finished run (a typo
leaves the run folder as it was, a failed stage leaves no later stage "done") are in
``tests/test_pipeline.py``, which has the finished run.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TOML = REPO / "ddsm_train" / "configs" / "demo.toml"


@pytest.mark.slow     # each check imports the tools, TensorFlow included
@pytest.mark.parametrize("text, where, words", [
    ('[patch_train]\nnet = "resnet5"\n', "[patch_train] net:",
     ["'resnet5' is not one of", "dm_resnet14", "patch_clf_train.py --net"]),
    ('[image_train]\noptimizer = "adamw"\n', "[image_train] optimizer:",
     ["'adamw' is not one of", "image_clf_train.py --optimizer"]),
    ('[image_train]\nblock_type = "vggg"\n', "[image_train] block_type:", ["'vggg'"]),
    ('[image_train]\nextra_args = ["--es-patiense", "10"]\n', "[image_train] extra_args:",
     ["image_clf_train.py does not know --es-patiense"]),
])
def test_bad_tool_option_is_refused_before_any_stage(tmp_path, capsys, monkeypatch, text,
                                                      where, words):
    """Values that only a tool's parser knows to be wrong stop the run at load, in one line
    naming the file, the section and the key; no stage runs, nothing is written."""
    import run_pipeline

    def no_stage(self, name, force=False):
        raise AssertionError(f"stage {name} ran")

    monkeypatch.setattr(run_pipeline.Pipeline, "run_stage", no_stage)
    config = tmp_path / "bad.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n{text}')
    with pytest.raises(SystemExit) as exc:
        run_pipeline.main([str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert f"{config}: {where} " in err[0] and all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "run").exists()


def test_parse_error_uses_the_tools_own_parser():
    import pipeline_plan

    assert pipeline_plan.parse_error("compute_mean", ["folder", "--img-size", "8", "8"]) is None
    err = pipeline_plan.parse_error("compute_mean", ["folder", "--img-size", "8", "x"])
    assert err.startswith("argument --img-size") and "'x'" in err and "usage" not in err
    # the number rules of the tools' main(): no nan or inf for a float flag
    assert "--rescale-factor" in pipeline_plan.parse_error(
        "compute_mean", ["folder", "--rescale-factor", "inf"])
    assert "help" in pipeline_plan.parse_error("compute_mean", ["folder", "--help"])
    assert pipeline_plan.parse_error("compute_mean", ["folder", "--workerz", "2"]) == \
        "unrecognized arguments: --workerz 2"


_CONFIG = {
    "image_train": {"optimizer": "adamw", "block_type": "resnet", "learning_rate": 0.0001,
                    "augmentation": True, "extra_args": ["--es-patience", "x"]},
    "patch_train": {"net": "resnet5", "learning_rate": float("inf"), "extra_args": []},
}


@pytest.mark.parametrize("message, sections, expected", [
    # an option of extra_args, by name or by its value
    ("argument --es-patience: not an integer: 'x'", ("image_train",),
     ("image_train", "extra_args")),
    ("unrecognized arguments: --es-patience x", ("image_train",),
     ("image_train", "extra_args")),
    # the key named like the flag, in the stage's own section first
    ("argument --optimizer: invalid choice: 'adamw' (choose from 'sgd', 'adam')",
     ("image_train", "patch_train"), ("image_train", "optimizer")),
    ("argument --augmentation/--no-augmentation: ignored explicit argument 'yes'",
     ("image_train",), ("image_train", "augmentation")),
    # a flag named otherwise: the key whose value the message quotes
    ("argument --patch-net: invalid choice: 'resnet5' (choose from 'resnet50')",
     ("image_train", "patch_train"), ("patch_train", "net")),
    ("argument --init-learningrate: should be finite, got 'inf'", ("patch_train",),
     ("patch_train", "learning_rate")),
    # nothing fits: the stage's own section
    ("the following arguments are required: test_dir", ("image_train",), ("image_train", None)),
])
def test_a_refusal_is_traced_to_its_config_key(message, sections, expected):
    import pipeline_plan

    assert pipeline_plan.blame_key(_CONFIG, sections, message) == expected


def test_refusals_in_words():
    import pipeline_plan

    assert pipeline_plan.describe_refusal(
        "image_clf_train", "unrecognized arguments: --es-patiense 10") == \
        "image_clf_train.py does not know --es-patiense"
    assert pipeline_plan.describe_refusal(
        "patch_clf_train", "argument --net: invalid choice: 'resnet5' (choose from 'a', 'b')"
    ) == "'resnet5' is not one of a, b (patch_clf_train.py --net)"


@pytest.mark.parametrize("text, flips, metrics", [
    ("", "--flips", "evaluation/metrics.json"),
    ("[predict]\nflips = false\n[evaluate]\nenabled = false\n", "--no-flips",
     "predictions/no_flips/metrics.json"),
])
def test_export_stage_exports_the_image_model_with_the_runs_metrics(tmp_path, text, flips,
                                                                    metrics):
    """The export stage runs export_model.py on the whole-image model into export/, with the
    flips of the predictions, the evaluation's metrics (the test predictions' without it)
    and the run's record; ``[export] enabled = false`` leaves it out."""
    import pipeline_plan

    config = tmp_path / "c.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n{text}')
    plan = pipeline_plan.PipelinePlan(config, tmp_path / "run")
    assert pipeline_plan.STAGES[-3:] == ("heatmaps", "export", "report")
    with plan.check_mode():
        spec = plan.plan("export")
    info, step = spec.steps
    assert info.func is not None and step.script == "export_model"
    assert step.args[:3] == ["models/image_clf.h5", "--out", "export"]
    assert flips in step.args and step.args[step.args.index("--metrics") + 1] == metrics
    assert step.args[step.args.index("--run-info") + 1] == "export/run_info.json"
    assert pipeline_plan.parse_error("export_model", step.args) is None
    assert {"image_train", "predict_flips", "evaluate"} <= set(spec.deps)
    off = tmp_path / "off.toml"
    off.write_text(f'extends = "{config.as_posix()}"\n[export]\nenabled = false\n')
    assert pipeline_plan.PipelinePlan(off, tmp_path / "run").plan("export") is None


@pytest.mark.parametrize("written", [True, False])
def test_report_links_the_model_card_and_says_when_onnx_is_missing(tmp_path, written):
    """report.html links export/model_card.md near its top and shows the card; summary.json
    has the export's paths; without model.onnx both say why."""
    import json

    import report

    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    onnx = ({"written": True, "check": {"max_abs_diff_vs_keras": 2e-7}} if written
            else {"written": False, "reason": "tf2onnx could not convert the model: boom"})
    (out / "export" / "model_card.json").write_text(json.dumps({"onnx": onnx}))
    (out / "export" / "model_card.md").write_text("# Model card: image_clf.h5\n<b>&\n")
    config = tmp_path / "c.toml"
    config.write_text("[run]\n")
    report.write_report(out, config, {}, {"stages": {}}, whole_img_dir=tmp_path / "none")
    page = (out / "report.html").read_text()
    assert '<a id="model-card" href="export/model_card.md">Model card</a>' in page
    assert page.index("Exported model") < page.index("Test metrics")
    assert "# Model card: image_clf.h5\n&lt;b&gt;&amp;" in page
    summary = json.loads((out / "summary.json").read_text())
    card = str((out / "export" / "model_card.md").resolve())
    assert summary["export"]["model_card_md"] == card
    printed = report.format_summary(summary)
    assert f"model card: {card}" in printed
    if written:
        assert summary["export"]["onnx"] == str((out / "export" / "model.onnx").resolve())
        assert "with model.onnx" in printed and "max |onnxruntime - tf-keras| = 2e-07" in page
    else:
        assert summary["export"]["onnx"] is None
        assert "no model.onnx: tf2onnx could not convert the model: boom" in printed
        assert "no <code>model.onnx</code></b>: tf2onnx could not convert the model: boom" \
            in page


def test_report_without_an_export_says_so(tmp_path):
    import json

    import report

    config = tmp_path / "c.toml"
    config.write_text("[run]\n")
    report.write_report(tmp_path, config, {}, {"stages": {}}, whole_img_dir=tmp_path / "none")
    assert "no exported model in this run" in (tmp_path / "report.html").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["export"] is None and "model card" not in report.format_summary(summary)


def test_a_plan_needs_no_run_folder_and_writes_nothing(tmp_path, monkeypatch):
    """Every stage's commands and fingerprint are planned for a run folder that does not
    exist, with no tool started, and the folder is still absent after; the plan keeps no
    state (the runner does), and the runner's fingerprint in an empty folder is the plan's."""
    import subprocess

    import pipeline_plan
    import run_pipeline

    out = tmp_path / "run"
    plan = pipeline_plan.PipelinePlan(DEMO_TOML, out)

    def no_tool(*args, **kwargs):
        raise AssertionError(f"a process was started while planning: {args}")

    monkeypatch.setattr(subprocess, "run", no_tool)
    monkeypatch.setattr(subprocess, "Popen", no_tool)
    with plan.check_mode():
        specs = {name: plan.plan(name) for name in pipeline_plan.STAGES}
    prints = {name: plan.fingerprint(spec) for name, spec in specs.items() if spec}
    assert set(prints) == set(pipeline_plan.STAGES), sorted(prints)
    assert specs["patch_train"].steps[0].script == "patch_clf_train"
    assert specs["image_train"].steps[0].args[:3] == ["data/whole_img/train",
                                                      "data/whole_img/val", "data/whole_img/test"]
    assert len(set(prints.values())) == len(prints)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not [a for a in vars(plan) if "state" in a]
    pipe = run_pipeline.Pipeline(DEMO_TOML, out, echo=False)
    assert pipe.state == {"stages": {}}
    assert pipe.fingerprint(specs["report"]) == prints["report"]
    assert not out.exists()
