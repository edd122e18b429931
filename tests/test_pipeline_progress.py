"""``run_pipeline.py`` while a stage runs: the stage log is written line by line as the tool
prints, the tools' progress lines become a live console line (a line per step when the console
is not a terminal), and TensorFlow's start-up lines stay out of the log. A stand-in tool is run
in place of the project's tools; the full run's logs are checked in ``tests/test_pipeline.py``.
"""
import io
import logging
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_TOML = REPO / "ddsm_train" / "configs" / "demo.toml"

FAKE_TOOL = '''
import sys, time
from pathlib import Path
import dm_image

print("first line", flush=True)
go = Path(sys.argv[1]) if len(sys.argv) > 1 else None
t0 = time.time()
while go is not None and not go.exists() and time.time() - t0 < 12:
    time.sleep(0.05)
print("saw go" if go is None or go.exists() else "no go", flush=True)
for line in (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796657527.912221   16579 port.cc:153] oneDNN custom operations are on. "
        "You may see slightly different numerical results.",
        "I0000 00:00:1796657527.912483   16579 cudart_stub.cc:31] Could not find cuda drivers "
        "on your machine, GPU will not be used.",
        "E0000 00:00:1796657528.1   16579 cuda_executor.cc:1228] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "I0000 00:00:1796657528.2   16579 other.cc:7] an info line of another kind"):
    print(line, file=sys.stderr, flush=True)
dm_image.report_progress("epoch", 2, 3, loss=0.5, val_auroc=0.75)
dm_image.report_progress("scoring", 40, 120, unit="img")
print("last line", flush=True)
'''


@pytest.fixture
def pipe(tmp_path, monkeypatch):
    """A pipeline whose tools are looked up in ``tmp_path`` (holding ``fake_tool.py``)."""
    import run_pipeline
    import script_utils

    (tmp_path / "fake_tool.py").write_text(FAKE_TOOL)
    monkeypatch.setattr(run_pipeline, "HERE", tmp_path)
    monkeypatch.setattr(script_utils, "_TF_LOG_LEVEL_GIVEN", False)
    return run_pipeline.Pipeline(DEMO_TOML, tmp_path / "run")


def _run(pipe, args, log: Path):
    import run_pipeline

    pipe.out.mkdir(parents=True, exist_ok=True)
    env = pipe._env()
    env["PYTHONPATH"] += ":" + str(REPO)
    with open(log, "w", encoding="utf-8") as fh:
        pipe._run_tool("image_train", run_pipeline.Step("fake_tool", args), env, fh, log)


def test_stage_log_is_written_while_the_tool_runs(pipe, tmp_path):
    """The tool waits until its first line is in the log: a log written at the end never has
    it while the tool runs."""
    log, go = tmp_path / "stage.log", tmp_path / "go"
    worker = threading.Thread(target=_run, args=(pipe, [str(go)], log))
    worker.start()
    deadline = time.time() + 10
    while time.time() < deadline and "first line" not in (
            log.read_text() if log.exists() else ""):
        time.sleep(0.05)
    if "first line" in (log.read_text() if log.exists() else ""):
        go.touch()
    worker.join(60)
    assert "saw go" in log.read_text(), log.read_text()


def test_progress_lines_and_tensorflow_start_up_lines(pipe, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())     # not a terminal
    log = tmp_path / "stage.log"
    with caplog.at_level(logging.INFO):
        _run(pipe, [], log)
    lines = log.read_text().splitlines()
    assert lines[0] == "first line" and lines[-1] == "last line", lines
    assert "progress: epoch 2 of 3: loss 0.5, val AUROC 0.75" in lines
    assert "progress: scoring: 40 of 120 images" in lines
    assert not [ln for ln in lines if ln.startswith("PROGRESS ")], lines
    text = "\n".join(lines)
    for gone in ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit"):
        assert gone not in text, gone
    assert "an info line of another kind" in text        # only the known lines are left out
    said = [r.getMessage() for r in caplog.records]
    assert "[image_train] epoch 2 of 3: loss 0.5, val AUROC 0.75" in said
    assert "[image_train] scoring: 40 of 120 images" in said


def test_tensorflow_lines_are_kept_when_the_user_asks_for_them(pipe, tmp_path, monkeypatch):
    import script_utils

    monkeypatch.setattr(script_utils, "_TF_LOG_LEVEL_GIVEN", True)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert pipe._env()["TF_CPP_MIN_LOG_LEVEL"] == "0"
    log = tmp_path / "stage.log"
    _run(pipe, [], log)
    assert "oneDNN custom operations" in log.read_text()


def test_tools_are_left_to_hide_tensorflow_start_up_lines(pipe, monkeypatch):
    """Set by the pipeline, TF_CPP_MIN_LOG_LEVEL would tell the tools the user wants TensorFlow's
    start-up lines (they hide them only when it is unset), and it does not hide them itself."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")      # this process's own default
    env = pipe._env()
    assert "TF_CPP_MIN_LOG_LEVEL" not in env and env["DM_PROGRESS"] == "1"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_updating_line_on_a_terminal(pipe, tmp_path, monkeypatch, caplog):
    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    with caplog.at_level(logging.INFO):
        _run(pipe, [], tmp_path / "stage.log")
    out = term.getvalue()
    assert "\r[image_train] epoch 2 of 3: loss 0.5, val AUROC 0.75" in out
    assert "\r[image_train] scoring: 40 of 120 images" in out
    assert "\n" not in out and out.endswith("\r\x1b[K")      # cleared when the tool ends
    assert not [r for r in caplog.records if "scoring" in r.getMessage()]


def test_report_progress_prints_only_when_asked(capsys, monkeypatch):
    import dm_image

    monkeypatch.delenv("DM_PROGRESS", raising=False)
    dm_image.report_progress("epoch", 1, 2, loss=0.25)
    with dm_image.progress(3, "sampling", unit="view") as bar:
        bar.update(3)
    assert "PROGRESS" not in capsys.readouterr().out
    monkeypatch.setenv("DM_PROGRESS", "1")
    with dm_image.progress(5, "loading data/whole_img into RAM", unit="img") as bar:
        for _ in range(5):
            bar.update()
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("PROGRESS")]
    # the first update is within 2 s of the start: only the last item has a line
    assert out == ["PROGRESS task=loading%20data/whole_img%20into%20RAM n=5 of=5 unit=img"]
    assert dm_image.parse_progress(out[0] + "\n") == {
        "task": "loading data/whole_img into RAM", "n": "5", "of": "5", "unit": "img"}
    assert dm_image.parse_progress("PROGRESS of the run\n") is None


def test_trainers_report_each_epoch(capsys, monkeypatch):
    import training_runs

    monkeypatch.setenv("DM_PROGRESS", "1")
    training_runs._ReportEpoch(20).on_epoch_end(2, {"loss": 0.41234, "val_loss": 0.5,
                                                   "val_auc": 0.77})
    assert capsys.readouterr().out == ("PROGRESS task=epoch n=3 of=20 loss=0.4123 "
                                       "val_loss=0.5 val_auroc=0.77\n")
