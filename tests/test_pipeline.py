"""``ddsm_train/run_pipeline.py`` end to end on the demo config at a reduced size, its skipping and
rerunning rules, its config checks, and its ``report.html`` in a real browser.

The reduced run (``ddsm_train/configs/demo.toml`` with 40 patients and 1-3 epochs per training
stage, the same pixel scale) runs once per module; the other tests copy its folder and run the
pipeline again there.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TOML = REPO / "ddsm_train" / "configs" / "demo.toml"
SMALL = """
[synthetic]
patients = 40
lesion_contrast = 3.0
[patches]
nb_bkg = 8
nb_abn = 12
nb_hns = 2
[patch_train]
nb_epoch = 3
[image_train]
nb_epoch = 1
all_layer_epochs = 3
[predict]
bootstrap = 200
"""
STAGES = ["data", "sample_patches", "mean", "patch_train", "image_train", "predict",
          "predict_flips", "predict_val", "evaluate", "heatmaps", "export", "report"]


def _write_config(folder: Path, extra: str = "") -> Path:
    path = folder / "small.toml"
    path.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n{SMALL}{extra}')
    return path


def _pipeline(config: Path, out: Path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)     # as a user runs it (set, TF's lines are shown)
    proc = subprocess.run([sys.executable, str(REPO / "ddsm_train" / "run_pipeline.py"),
                           str(config), "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc


def _what_ran(stdout: str) -> dict:
    """{stage: "ran" / "skipped"} from the pipeline's progress lines."""
    out = {}
    for line in stdout.splitlines():
        for stage in STAGES:
            if f"[{stage}] unchanged, skipped" in line:
                out[stage] = "skipped"
            elif f"[{stage}] done in" in line:
                out[stage] = "ran"
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    config = _write_config(folder)
    out = folder / "run"
    proc = _pipeline(config, out)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    return config, out, proc.stdout


def _copy_run(pipeline_run, tmp_path):
    config, out, _ = pipeline_run
    copy = tmp_path / "moved_run"
    shutil.copytree(out, copy, symlinks=True)
    return config, copy


@pytest.mark.slow
def test_pipeline_runs_every_stage(pipeline_run):
    import cv2

    _, out, stdout = pipeline_run
    assert _what_ran(stdout) == {s: "ran" for s in STAGES}
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert [s for s in STAGES if state[s]["status"] == "done"] == STAGES
    assert all((out / state[s]["log"]).is_file() for s in STAGES)
    assert stdout.strip().splitlines()[-1] == f"Report: {out.resolve() / 'report.html'}"
    for split in ("train", "val", "test"):
        for cls in ("background", "malignant", "benign"):
            assert list((out / "patches" / split / cls).glob("*.png")), (split, cls)
    assert not (out / "patches" / "test_unused").exists()
    n_test = sum(len(list((out / "data" / "whole_img" / "test" / c).glob("*.png")))
                 for c in ("neg", "pos"))
    for kind in ("no_flips", "flips"):
        metrics = json.loads((out / "predictions" / kind / "metrics.json").read_text())["image"]
        assert metrics["n"] == n_test
        assert metrics["auroc_ci"][0] <= metrics["auroc"] <= metrics["auroc_ci"][1]
    n_val = sum(len(list((out / "data" / "whole_img" / "val" / c).glob("*.png")))
                for c in ("neg", "pos"))
    with open(out / "predictions" / "val_flips" / "image_predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == n_val > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_auroc_flips"] == metrics["auroc"]
    assert summary["test_auroc_flips"] > 0.5              # a small run, but it must learn
    for name in ("patch_clf.h5.curves.png", "image_clf.h5.curves.png"):
        assert cv2.imread(str(out / "models" / name)) is not None


@pytest.mark.slow
def test_stage_logs_show_progress_and_no_tensorflow_start_up_lines(pipeline_run):
    _, out, stdout = pipeline_run
    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    for name, text in logs.items():
        for line in ("oneDNN custom operations", "cuInit", "absl::InitializeLog",
                     "Could not find cuda drivers"):
            assert line not in text, (name, line)
        assert "PROGRESS " not in text, name
    train = logs["5_image_train.log"]
    assert "progress: epoch 1 of 4: loss " in train and "val AUROC" in train
    assert "progress: scoring: " in logs["6_predict.log"]
    assert "progress: sampling: " in logs["2_sample_patches.log"]
    assert "[image_train] epoch 1 of 4: loss " in stdout      # not a terminal: one line each
    assert "[predict] scoring: " in stdout


@pytest.mark.slow
def test_pipeline_derives_scale_and_means_from_the_train_split(pipeline_run):
    """16-bit data gives 255/65535; each mean is that of its net's train inputs."""
    import compute_mean

    _, out, _ = pipeline_run
    derived = json.loads((out / "derived.json").read_text())
    assert derived["rescale_factor"] == 0.003891
    whole = compute_mean.image_mean(out / "data" / "whole_img" / "train", (288, 224),
                                    rescale_factor=0.003891)
    patches = compute_mean.image_mean(out / "patches" / "train", (64, 64),
                                      rescale_factor=0.003891)
    assert derived["image_mean"] == pytest.approx(whole["mean"], abs=1e-4)
    assert derived["patch_mean"] == pytest.approx(patches["mean"], abs=1e-4)
    assert abs(derived["patch_mean"] - derived["image_mean"]) > 1   # two different means
    train_cmd = json.loads((out / "pipeline_state.json").read_text())["stages"]
    args = train_cmd["patch_train"]["commands"][0]
    assert args[args.index("--featurewise-mean") + 1] == repr(derived["patch_mean"])
    args = train_cmd["image_train"]["commands"][0]
    assert args[args.index("--featurewise-mean") + 1] == repr(derived["image_mean"])
    assert args[args.index("--patch-net") + 1] == "dm_resnet14"


@pytest.mark.slow
def test_heatmaps_show_the_highest_scored_positive_and_negative(pipeline_run):
    _, out, _ = pipeline_run
    with open(out / "predictions" / "flips" / "image_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = {lab: max((r for r in rows if r["malignant_label"] == lab),
                     key=lambda r: float(r["malignant_pred"])) for lab in ("1", "0")}
    listed = (out / "heatmaps" / "images.txt").read_text().split()
    assert listed == [Path(best[lab]["path"]).name for lab in ("1", "0")]
    for name in listed:
        assert (out / "heatmaps" / f"{Path(name).stem}_heatmap.png").is_file()
    page = (out / "report.html").read_text()
    assert all(f"{Path(n).stem}_heatmap.png" in page for n in listed)


@pytest.mark.slow
def test_rerun_skips_every_stage_and_the_folder_can_move(pipeline_run, tmp_path):
    config, out = _copy_run(pipeline_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = _pipeline(config, out)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert _what_ran(proc.stdout) == {s: "skipped" for s in STAGES}
    assert "0 stage(s) ran, 12 skipped" in proc.stdout
    changed = [p for p, t in before.items() if p.is_file() and p.stat().st_mtime_ns != t
               and p.name != "pipeline_state.json"]
    assert not changed


@pytest.mark.slow
def test_changed_prediction_setting_reruns_prediction_and_after_only(pipeline_run, tmp_path):
    config, out = _copy_run(pipeline_run, tmp_path)
    model = out / "models" / "image_clf.h5"
    stamp = model.stat().st_mtime_ns
    changed = tmp_path / "changed.toml"
    changed.write_text(config.read_text().replace("bootstrap = 200", "bootstrap = 100"))
    proc = _pipeline(changed, out)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = _what_ran(proc.stdout)
    # the validation scores carry no intervals: predict_val does not depend on the bootstrap
    assert ran == {"data": "skipped", "sample_patches": "skipped", "mean": "skipped",
                   "patch_train": "skipped", "image_train": "skipped", "predict": "ran",
                   "predict_flips": "ran", "predict_val": "skipped", "evaluate": "ran",
                   "heatmaps": "ran", "export": "ran", "report": "ran"}
    assert model.stat().st_mtime_ns == stamp
    opts = json.loads((out / "predictions" / "flips" / "options.json").read_text())
    assert opts["bootstrap"] == 100


def _labels_scores(path: Path):
    import numpy as np

    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["malignant_pred"]]
    return (np.array([int(r["malignant_label"]) for r in rows]),
            np.array([float(r["malignant_pred"]) for r in rows]),
            [r["image_index"] for r in rows])


@pytest.mark.slow
def test_operating_point_is_chosen_on_validation_and_applied_to_test(pipeline_run):
    """The summary's threshold is Youden's on the validation predictions (computed here from
    the CSV), and its sensitivity/specificity are those of the test scores at it."""
    import eval_metrics

    _, out, stdout = pipeline_run
    y_val, s_val, _ = _labels_scores(out / "predictions" / "val_flips" / "image_predictions.csv")
    expected = eval_metrics.choose_threshold(y_val, s_val, "youden")
    summary = json.loads((out / "summary.json").read_text())
    point = summary["operating_point"]
    assert point["chosen_on"] == "validation" and point["threshold"] == expected
    y, s, names = _labels_scores(out / "predictions" / "flips" / "image_predictions.csv")
    assert point["sensitivity"] == pytest.approx(((s >= expected) & (y == 1)).sum() / y.sum())
    assert point["specificity"] == pytest.approx(((s < expected) & (y == 0)).sum()
                                                 / (y == 0).sum())
    assert point["sensitivity_ci"][0] <= point["sensitivity"] <= point["sensitivity_ci"][1]
    assert (f"operating point chosen on validation (Youden index, threshold {expected:.3f}), "
            f"on test, with flips: sensitivity {point['sensitivity']:.3f}") in stdout
    target = eval_metrics.choose_threshold(y_val, s_val, "sensitivity", 0.9)
    image_points = summary["evaluation"]["operating_points"]["image"]
    assert image_points["sensitivity_0.9"]["threshold"] == target
    # breasts and exams from the CBIS-style names {patient}_{side}_{view}
    breasts = {"_".join(Path(n).stem.split("_")[:-1]) for n in names}
    levels = summary["evaluation"]["levels"]
    assert levels["breast"]["n"] == len(breasts) and levels["exam"]["n"] == len(
        {b.rsplit("_", 1)[0] for b in breasts})
    assert 0 <= levels["image"]["ece"] <= 1 and 0 <= levels["image"]["brier"] <= 1
    page = (out / "report.html").read_text()
    for text in (f"{expected:.4f}", "Youden index, chosen on validation", "breast", "exam",
                 "pF1", "ECE", "Brier", "evaluation/reliability_image.png"):
        assert text in page, text


@pytest.mark.slow
def test_changed_calibration_reruns_only_evaluate_and_report(pipeline_run, tmp_path):
    config, out = _copy_run(pipeline_run, tmp_path)
    changed = tmp_path / "changed.toml"
    changed.write_text(config.read_text() + '[evaluate]\ncalibrate = "platt"\n')
    proc = _pipeline(changed, out)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = _what_ran(proc.stdout)
    assert {s for s, v in ran.items() if v == "ran"} == {"evaluate", "export", "report"}
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    calibration = next(iter(metrics["image"].values()))["calibration"]
    if "refused" in calibration:
        # the small run's validation scores may rank the cases the wrong way round: a map
        # that reverses the ranking is refused, not applied, and raised as a warning
        assert not (out / "evaluation" / "calibration_image.json").is_file()
        assert "calibration_reverses_ranking" in {w["code"] for w in summary["warnings"]}
        return
    assert (out / "evaluation" / "calibration_image.json").is_file()
    assert summary["evaluation"]["levels"]["image"]["calibrated"]["method"] == "platt"
    assert "Recalibrated on validation" in (out / "report.html").read_text()
    assert "(platt on validation: ECE" in proc.stdout


@pytest.mark.slow
def test_without_validation_images_evaluate_reports_the_fixed_threshold(pipeline_run, tmp_path):
    """Class-folder data whose val folder is empty: no predict_val, evaluate reports the fixed
    threshold 0.5 and says it was not chosen on validation; a calibration asked for is left
    out (nothing to fit it on) rather than failing the stage."""
    import run_pipeline

    _, out = _copy_run(pipeline_run, tmp_path)
    data = tmp_path / "folders"
    (data / "val").mkdir(parents=True)
    for split in ("train", "test"):
        (data / split).symlink_to(out / "data" / "whole_img" / split)
    config = tmp_path / "folders.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n[data]\nsource = "class_folders"\n'
                      f'dir = "{data.as_posix()}"\n[patches]\n'
                      f'model = "{(out / "models" / "patch_clf.h5").as_posix()}"\n'
                      f'[predict]\nbootstrap = 50\n[evaluate]\ncalibrate = "isotonic"\n')
    pipe = run_pipeline.Pipeline(config, out, echo=False)
    assert pipe.plan("predict_val") is None
    args = pipe.plan("evaluate").steps[0].args
    assert "--val-predictions" not in args and "--calibrate" not in args
    assert pipe.run_stage("evaluate", force=True) == "ran"
    assert pipe.run_stage("report", force=True) == "ran"
    summary = json.loads((out / "summary.json").read_text())
    point = summary["operating_point"]
    assert point["chosen_on"] == "fixed" and point["threshold"] == 0.5
    assert summary["evaluation"]["threshold_chosen_on"] == "fixed"
    import report

    assert "fixed threshold 0.5 (no validation images, not chosen on validation)" in \
        report.format_summary(summary)
    page = (out / "report.html").read_text()
    assert "fixed threshold 0.5 (not chosen on validation)" in page
    assert "Youden" not in page


@pytest.mark.slow
def test_interrupted_stage_resumes_with_the_same_command(pipeline_run, tmp_path):
    """A stage left "running" with an unchanged fingerprint runs again with the same command,
    its outputs and log kept (a trainer resumes from its checkpoint); the trainers after the
    mean stage read only its values, which came out the same, so they stay skipped."""
    config, out = _copy_run(pipeline_run, tmp_path)
    state_path = out / "pipeline_state.json"
    state = json.loads(state_path.read_text())
    state["stages"]["mean"]["status"] = "running"
    state_path.write_text(json.dumps(state))
    log = out / state["stages"]["mean"]["log"]
    first = log.read_text()
    proc = _pipeline(config, out)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "[mean] resuming" in proc.stdout
    ran = _what_ran(proc.stdout)
    assert {s for s, v in ran.items() if v == "ran"} == {"mean", "report"}
    assert log.read_text().startswith(first) and log.read_text().count("==> compute_mean") == 4


@pytest.mark.slow
def test_from_stage_reruns_it_and_the_later_ones(pipeline_run, tmp_path):
    config, out = _copy_run(pipeline_run, tmp_path)
    proc = _pipeline(config, out, "--from", "heatmaps")
    assert proc.returncode == 0, proc.stdout[-3000:]
    ran = _what_ran(proc.stdout)
    assert {s for s, v in ran.items() if v == "ran"} == {"heatmaps", "export", "report"}


@pytest.mark.slow
def test_exported_model_scores_as_the_pipeline(pipeline_run, tmp_path):
    """The export stage's ONNX model, scored by score_exported.py (no TensorFlow) on the test
    images, gives the pipeline's flip-averaged predictions."""
    import score_exported

    _, out, stdout = pipeline_run
    assert (out / "export" / "model.onnx").is_file()
    recipe = json.loads((out / "export" / "recipe.json").read_text())
    assert recipe["flips"] is True
    score_exported.run(str(out / "export"), img_dir=str(out / "data" / "whole_img" / "test"),
                       out_dir=str(tmp_path / "scores"))
    _, ours, names = _labels_scores(tmp_path / "scores" / "image_predictions.csv")
    _, theirs, their_names = _labels_scores(out / "predictions" / "flips" /
                                            "image_predictions.csv")
    assert sorted(names) == sorted(their_names) and len(names) > 10
    by_name = dict(zip(their_names, theirs))
    import numpy as np

    assert np.max(np.abs(ours - np.array([by_name[n] for n in names]))) < 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export"]["model_card_md"] == str((out / "export" / "model_card.md").resolve())
    assert f"model card: {summary['export']['model_card_md']}" in stdout


@pytest.mark.slow
def test_model_card_holds_the_runs_figures_and_warnings(pipeline_run):
    """The card of the export stage: the evaluation's figures at every level with the
    validation-chosen operating points, the data counts, the training command, the config and
    the same learning-health warnings as summary.json."""
    _, out, _ = pipeline_run
    card = json.loads((out / "export" / "model_card.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    results = card["metrics"]["results"]
    assert {k.split("/")[0] for k in results} == {"image", "breast", "exam"}
    image = next(v for k, v in results.items() if k.startswith("image/"))
    assert image["auroc"] == summary["evaluation"]["levels"]["image"]["auroc"]
    youden = image["operating_points"]["youden"]
    assert youden["chosen_on"] == "validation"
    assert youden["threshold"] == summary["operating_point"]["threshold"]
    assert youden["sensitivity_ci"] == summary["operating_point"]["sensitivity_ci"]
    assert image["calibration"]["ece"] == summary["evaluation"]["levels"]["image"]["ece"]
    run = card["run"]
    assert run["warnings"] == summary["warnings"]
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert run["training_command"] == state["image_train"]["commands"][0]
    n_test = {c: len(list((out / "data" / "whole_img" / "test" / c).glob("*.png")))
              for c in ("neg", "pos")}
    assert run["data_counts"]["whole images"]["test"] == n_test
    md = (out / "export" / "model_card.md").read_text()
    for text in ("## The run that made it", "[synthetic]", "image_clf_train",
                 "The config as resolved", '"patients": 40',
                 f"test: neg {n_test['neg']}, pos {n_test['pos']}", "95% CI"):
        assert text in md, text
    assert set(card["files"]) >= {"model.onnx", "recipe.json", "saved_model/saved_model.pb"}


@pytest.mark.slow
def test_report_says_when_the_export_has_no_onnx(pipeline_run, tmp_path):
    """A model tf2onnx could not convert: the export keeps the SavedModel and card, and the
    report and the printed summary say there is no ONNX file and why."""
    import report
    import run_pipeline

    config, out = _copy_run(pipeline_run, tmp_path)
    card_path = out / "export" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["onnx"] = {"written": False, "reason": "tf2onnx could not convert the model: boom"}
    card_path.write_text(json.dumps(card))
    (out / "export" / "model.onnx").unlink()
    run_pipeline.Pipeline(config, out, echo=False).write_report()
    page = (out / "report.html").read_text()
    assert "no <code>model.onnx</code></b>: tf2onnx could not convert the model: boom" in page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export"]["onnx"] is None
    assert "no model.onnx: tf2onnx could not convert the model: boom" in \
        report.format_summary(summary)


# ------------------------------------------------------------------ report in a browser
_CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__errors.push(t && t.src ? 'failed to load ' + t.src : 'script error ' + e.message);
}, true);
['error', 'warn'].forEach(function (level) {
  var orig = console[level];
  console[level] = function () {
    window.__errors.push('console.' + level + ' ' + Array.prototype.join.call(arguments, ' '));
    orig.apply(console, arguments);
  };
});
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                   .map(function (i) { return i.getAttribute('src'); });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken', JSON.stringify(broken));
  document.body.setAttribute('data-errors', JSON.stringify(window.__errors));
});
</script>"""


def _browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium installed (Debian: apt-get install chromium)")


def browser_check(page: Path) -> dict:
    """Open ``page`` in headless Chromium with a script that records images that did not load,
    script errors and console errors/warnings; also any console line Chromium logged."""
    import html
    import re

    probe = page.with_name(f"_browser_check_{page.name}")
    text = page.read_text()
    probe.write_text(text.replace("<head>", "<head>" + _CHECK_SCRIPT, 1))
    try:
        proc = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                               "--enable-logging=stderr", "--v=0",
                               "--virtual-time-budget=10000", "--dump-dom",
                               probe.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, f"the browser rendered no page: {proc.stderr[-2000:]}"
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))
    assert "data-images" in attrs, f"the page's load event never came: {proc.stderr[-2000:]}"
    return {"images": int(attrs["data-images"]),
            "broken": json.loads(html.unescape(attrs["data-broken"])),
            "errors": json.loads(html.unescape(attrs["data-errors"])),
            "console": [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln],
            "dom": proc.stdout}


@pytest.mark.slow
def test_report_renders_in_a_browser_with_every_image(pipeline_run):
    _, out, _ = pipeline_run
    result = browser_check(out / "report.html")
    assert result["broken"] == [] and result["errors"] == [] and result["console"] == []
    # ROC, PR, reliability diagram, two heatmap overlays, two training curves
    assert result["images"] == 7
    for text in ("Test metrics", "95% CI", "Screening evaluation", "Operating points",
                 "Heatmaps", "Training curves", "Stages", "patch_mean", "[synthetic]"):
        assert text in result["dom"]
    # the exported model's card: linked near the top, the file there, its text in the page
    link = re.search(r'<a id="model-card" href="([^"]+)">Model card</a>', result["dom"])
    assert link and (out / link.group(1)).is_file()
    assert result["dom"].index("Exported model") < result["dom"].index("Test metrics")
    assert "# Model card: image_clf.h5" in result["dom"]
    assert "The run that made it" in result["dom"]


def test_browser_check_sees_a_missing_image_and_a_console_error(tmp_path):
    page = tmp_path / "page.html"
    page.write_text('<!DOCTYPE html><html><head><title>t</title></head><body>'
                    '<img src="missing.png"><script>console.error("boom")</script></body></html>')
    result = browser_check(page)
    assert result["broken"] == ["missing.png"]
    assert any("missing.png" in e for e in result["errors"])
    assert any("boom" in e for e in result["errors"])


# ------------------------------------------------------------------ config checks (fast)
def _main_error(capsys, config, out, monkeypatch=None):
    import run_pipeline

    if monkeypatch is not None:     # a config the checks let through must not start a run
        def accepted(self, **kwargs):
            raise AssertionError(f"{config} was accepted")
        monkeypatch.setattr(run_pipeline.Pipeline, "run", accepted)
    with pytest.raises(SystemExit) as exc:
        run_pipeline.main([str(config), "--out", str(out)])
    return exc.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("text, words", [
    ('[patch_train]\nnb_epochs = 3\n', ["unknown key 'patch_train.nb_epochs'"]),
    ('[image_train]\nnb_epoch = "3"\n', ["key 'image_train.nb_epoch' should be an integer",
                                         "'3'"]),
    ('[image_train]\nimg_size = [288]\n', ["'image_train.img_size'", "two integers"]),
    ('[patch_train]\nfeaturewise_mean = "mean"\n', ["'patch_train.featurewise_mean'",
                                                    'a number or "auto"']),
    ('[trainer]\nnb_epoch = 3\n', ["unknown section [trainer]"]),
    ('seed = 1\n', ["unknown key 'seed'"]),
    ('[data]\nsource = "dicom"\n', ["'data.source'", "synthetic"]),
    ('[data]\nsource = "class_folders"\ndir = "x"\n', ["'patches.model'"]),
    ('[run\n', ["not valid TOML"]),
    ('[evaluate]\ncalibrate = "beta"\n', ["'evaluate.calibrate'", "none, platt, isotonic",
                                          "'beta'"]),
    ('[evaluate]\ntarget_sensitivity = 90\n', ["'evaluate.target_sensitivity'", "(0, 1]"]),
    ('[evaluate]\ntarget_specificity = 0\n', ["'evaluate.target_specificity'", "(0, 1]"]),
])
def test_bad_config_is_one_line_naming_key_and_file(tmp_path, capsys, monkeypatch, text,
                                                    words):
    config = tmp_path / "bad.toml"
    config.write_text(f'extends = "{DEMO_TOML.as_posix()}"\n{text}')
    code, err = _main_error(capsys, config, tmp_path / "run", monkeypatch)
    assert code == 2 and len(err) == 1, err
    assert str(config) in err[0] and all(w in err[0] for w in words), err[0]
    assert not (tmp_path / "run").exists()


def test_bad_key_in_an_extended_file_names_that_file(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text("[predict]\nflips = 1\n")
    top = tmp_path / "top.toml"
    top.write_text('extends = "base.toml"\n')
    code, err = _main_error(capsys, top, tmp_path / "run")
    assert code == 2 and str(base) in err[0] and "'predict.flips'" in err[0]


def test_config_extends_and_defaults(tmp_path):
    import pipeline_config

    config = pipeline_config.load_config(_write_config(tmp_path))
    assert config["synthetic"]["patients"] == 40                 # from the small config
    assert config["synthetic"]["img_height"] == 576              # from demo.toml
    assert config["patch_train"]["net"] == "dm_resnet14"
    assert config["predict"]["batch_size"] == 4
    shipped = sorted((REPO / "ddsm_train" / "configs").glob("*.toml"))
    assert [p.name for p in shipped] == ["cbis_ddsm_2017.toml", "demo.toml", "own_data.toml",
                                         "real_films_cpu.toml"]
    for path in shipped:
        pipeline_config.load_config(path)                        # every shipped config loads


# ------------------------------------------------------------------ run state after a failure
def _hashes(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


TYPO = '[image_train]\nextra_args = ["--es-patiense", "10"]\n'


def _extended(config: Path, path: Path, text: str) -> Path:
    path.write_text(f'extends = "{config.as_posix()}"\n{text}')
    return path


@pytest.mark.slow
def test_typo_in_extra_args_leaves_a_finished_run_as_it_was(pipeline_run, tmp_path):
    """The whole-image trainer's parser refuses the flag before any stage runs: no model, log
    or state is touched (every file byte for byte), in a few seconds, one line naming the key."""
    import resource
    import time

    config, out = _copy_run(pipeline_run, tmp_path)
    before = _hashes(out)
    typo = _extended(config, tmp_path / "typo.toml", TYPO)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    proc = _pipeline(typo, out)
    cpu1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - t0
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and f"{typo}: [image_train] extra_args: image_clf_train.py does not " \
        f"know --es-patiense" in err[0], err
    assert _hashes(out) == before
    # the check imports the tools (TensorFlow) once; a busy machine stretches the wall time
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    assert cpu < 20, (cpu, wall)


@pytest.mark.slow
def test_a_stage_is_checked_before_its_old_outputs_are_removed(pipeline_run, tmp_path):
    import pipeline_config
    import run_pipeline

    config, out = _copy_run(pipeline_run, tmp_path)
    before = _hashes(out)
    typo = _extended(config, tmp_path / "typo.toml", TYPO)
    pipe = run_pipeline.Pipeline(typo, out, echo=False)
    with pytest.raises(pipeline_config.ConfigError, match=r"\[image_train\] extra_args"):
        pipe.run_stage("image_train")
    assert _hashes(out) == before


@pytest.mark.slow
def test_failed_stage_leaves_no_stage_that_reads_it_done(pipeline_run, tmp_path):
    """The trainer's parser takes the flags but the trainer refuses them when it starts: its
    old model is gone, so every stage after it that reads it is marked stale (none stays
    "done"), the report and summary say so, and a re-run redoes them."""
    import run_pipeline

    config, out = _copy_run(pipeline_run, tmp_path)
    bad = _extended(config, tmp_path / "bad.toml",
                    '[image_train]\nextra_args = ["--top-repetitions", "1", "2"]\n')
    proc = _pipeline(bad, out)
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "stage image_train: image_clf_train.py exited with status 2" in proc.stderr
    assert not (out / "models" / "image_clf.h5").exists()
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    after = STAGES[STAGES.index("image_train"):]
    assert {s: state[s]["status"] for s in after} == dict(
        {s: "stale" for s in after}, image_train="failed")
    assert all(state[s]["status"] == "done" for s in STAGES[:STAGES.index("image_train")])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unfinished_stages"] == {s: state[s]["status"] for s in after[:-1]}
    page = (out / "report.html").read_text()
    assert "This run did not finish: image_train failed; predict, predict_flips, " \
        "predict_val, evaluate, heatmaps, export stale." in page
    import report

    assert "NOT FINISHED: image_train failed; predict" in report.format_summary(summary)
    pipe = run_pipeline.Pipeline(config, out, echo=False)    # the good config again
    assert [s for s in STAGES if not pipe._unchanged(pipe.plan(s))] == after


# ------------------------------------------------------------------ --dry-run on the finished run
def _dry_run(stdout: str) -> dict:
    """{stage: (action, why)} from the lines ``[STAGE] ACTION: WHY`` of ``--dry-run``."""
    rows = {}
    for line in stdout.splitlines():
        for stage in STAGES:
            if line.startswith(f"[{stage}] "):
                action, _, why = line[len(stage) + 3:].partition(": ")
                rows[stage] = (action, why)
    return rows


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file())
            for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_dry_run_of_the_finished_run_skips_every_stage_and_writes_nothing(pipeline_run,
                                                                          tmp_path):
    config, out = _copy_run(pipeline_run, tmp_path)
    before, tree = _hashes(out), _tree(out)
    proc = _pipeline(config, out, "--dry-run")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert _dry_run(proc.stdout) == {s: ("skipped", "unchanged") for s in STAGES}
    assert "image_clf_train.py data/whole_img/train" in proc.stdout      # the command lines
    assert _hashes(out) == before and _tree(out) == tree


@pytest.mark.slow
def test_dry_run_after_a_changed_key_names_the_stage_and_its_readers(pipeline_run, tmp_path):
    config, out = _copy_run(pipeline_run, tmp_path)
    before, tree = _hashes(out), _tree(out)
    proc = _pipeline(config, out, "--dry-run", "--set", "image_train.nb_epoch=2")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    rows = _dry_run(proc.stdout)
    before_it = STAGES[:STAGES.index("image_train")]
    assert {s: rows[s][0] for s in before_it} == {s: "skipped" for s in before_it}
    assert rows["image_train"] == ("run afresh",
                                   "changed: commands (--nb-epoch 1 -> --nb-epoch 2)")
    for stage in ("predict", "predict_flips", "predict_val"):
        assert rows[stage] == ("run afresh", "a stage it reads runs again: image_train")
    assert rows["evaluate"] == ("run afresh",
                                "a stage it reads runs again: predict_flips, predict_val")
    assert rows["heatmaps"] == ("run afresh", "a stage it reads runs again: predict_flips")
    assert rows["report"][0] == "run afresh"
    assert _hashes(out) == before and _tree(out) == tree
