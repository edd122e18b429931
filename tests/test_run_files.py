"""run_files: inputs and outputs never overlap, one training run per model file, a tool deletes
only what it wrote, leftovers of killed writes are removed."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

import dm_image
import run_files


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------ overlaps
def test_output_equal_to_input_file_is_refused_through_a_link(tmp_path):
    model = tmp_path / "patch.h5"
    model.write_bytes(b"x")
    link = tmp_path / "link.h5"
    link.symlink_to(model)
    with pytest.raises(run_files.RunPathError,
                       match=r"--best-model .*link.h5 is the input --patch-model-state .*patch.h5"):
        run_files.check_run_paths(input_files={"--patch-model-state": model},
                                  output_files={"--best-model": link})
    assert model.read_bytes() == b"x"


def test_output_inside_input_folder_and_equal_outputs_are_refused(tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "neg").mkdir(parents=True)
    with pytest.raises(run_files.RunPathError, match="--out-dir .* inside the input folder "
                                                     "--img-dir"):
        run_files.check_run_paths(input_dirs={"--img-dir": imgs},
                                  output_dirs={"--out-dir": imgs / "neg" / "out"})
    with pytest.raises(run_files.RunPathError, match="--png-dir .* inside the input folder"):
        run_files.check_run_paths(input_dirs={"IMG_FOLDER": imgs}, output_dirs={"--png-dir": imgs})
    with pytest.raises(run_files.RunPathError, match="--best-model .* and --final-model .* are "
                                                     "the same path"):
        run_files.check_run_paths(output_files={"--best-model": tmp_path / "m.h5",
                                                "--final-model": tmp_path / "." / "m.h5"})
    with pytest.raises(run_files.RunPathError, match="nested output folders"):
        run_files.check_run_paths(output_dirs={"--train-out": tmp_path / "a",
                                               "--val-out": tmp_path / "a" / "b"})
    # separate paths, and an allowed replacement, pass
    run_files.check_run_paths(input_dirs={"--img-dir": imgs}, input_files={"--resume-from":
                                                                           tmp_path / "c.h5"},
                              output_dirs={"--out-dir": tmp_path / "imgs_out"},
                              output_files={"ckpt": tmp_path / "c.h5", "--best-model": None},
                              may_replace=[("ckpt", "--resume-from")])


def test_output_folder_holding_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    (data / "full_img").mkdir(parents=True)
    (data / "list.txt").write_text("p1")
    with pytest.raises(run_files.RunPathError,
                       match=r"TRAIN_OUT .*data holds the input FULL_IMG_DIR .*full_img"):
        run_files.check_run_paths(input_dirs={"FULL_IMG_DIR": data / "full_img"},
                                  output_dirs={"TRAIN_OUT": data})
    # an input file in an output folder (a list beside the overlays) is safe until the
    # folder's manifest names it: then a rerun could remove it as an earlier output
    run_files.check_run_paths(input_files={"--img-list": data / "list.txt"},
                              output_dirs={"--out-dir": data})
    (data / run_files.MANIFEST_NAME).write_text(json.dumps(
        {"tool": "tool", "files": ["list.txt"], "dirs": []}))
    with pytest.raises(run_files.RunPathError, match=r"--out-dir .* holds the input --img-list"):
        run_files.check_run_paths(input_files={"--img-list": data / "list.txt"},
                                  output_dirs={"--out-dir": data})
    # a sibling folder, and an output file beside an input, pass
    run_files.check_run_paths(input_dirs={"FULL_IMG_DIR": data / "full_img"},
                              input_files={"--img-list": data / "list.txt"},
                              output_dirs={"TRAIN_OUT": data / "patches"},
                              output_files={"--out": data / "scores.npz"})


def test_overwrite_never_reaches_the_inputs_of_the_run(tmp_path, capsys):
    """The data folder as the sampler's train output, with --overwrite: refused before
    anything is removed (its manifest is the data generator's, naming every mammogram)."""
    import make_synthetic_ddsm
    import sample_patches_combined
    data = tmp_path / "data"
    make_synthetic_ddsm.run(data, nb_patients=4, img_height=256, img_width=192,
                            whole_img_size=(128, 96), workers=1)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    for train_out in (data, tmp_path / "other"):
        if train_out != data:              # another data set: not an input, not this tool's
            shutil.copytree(data, train_out)
        argv = [str(data / "roi_mask_path.csv"), str(data / "roi_mask"),
                str(data / "train_pat.txt"), str(data / "full_img"), str(train_out),
                str(tmp_path / "val"), "--overwrite", "--bkg-dir", "full_img", "--workers", "1"]
        with pytest.raises(SystemExit):
            sample_patches_combined.main(argv)
        err = capsys.readouterr().err
        assert ("holds the input" if train_out == data else "outputs of another tool") in err
        assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
        assert len(list((train_out / "full_img").iterdir())) == 16
    assert not (tmp_path / "val").exists()


def test_manifest_of_another_tool_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_text("theirs")
    (out / run_files.MANIFEST_NAME).write_text(json.dumps(
        {"tool": "make_synthetic_ddsm", "files": ["a.png"], "dirs": []}))
    with pytest.raises(ValueError, match=r"out holds the outputs of another tool, "
                                         r"make_synthetic_ddsm"):
        run_files.OutputManifest(out, "image_clf_predict")
    assert (out / "a.png").read_text() == "theirs"


# ------------------------------------------------------------------ lock
def _write_lock(target, pid):
    lock = tmp = str(target) + ".lock"
    with open(tmp, "w") as fh:
        json.dump({"pid": pid, "host": socket.gethostname()}, fh)
    return lock


def test_lock_held_by_a_live_process_refuses_with_its_pid(tmp_path, live_pid):
    best = tmp_path / "best.h5"
    lock = _write_lock(best, live_pid)
    with pytest.raises(run_files.RunLockedError, match=f"process {live_pid}"):
        run_files.RunLock(best).acquire()
    assert json.loads(open(lock).read())["pid"] == live_pid       # not taken


def test_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    best = tmp_path / "best.h5"
    dead = _dead_pid()
    lock = _write_lock(best, dead)
    with run_files.RunLock(best) as held:
        assert json.loads(open(lock).read())["pid"] == os.getpid()
        with pytest.raises(run_files.RunLockedError, match=f"process {os.getpid()}"):
            run_files.RunLock(best).acquire()          # a second run of this process too
        assert held.held
    assert not os.path.exists(lock)
    assert any(f"process {dead}" in r.getMessage() for r in caplog.records)


def test_releases_locks_on_error(tmp_path):
    best = tmp_path / "best.h5"

    @run_files.releases_locks
    def train():
        run_files.RunLock(best).acquire()
        assert os.path.exists(str(best) + ".lock")
        raise ValueError("bad flag")
    with pytest.raises(ValueError, match="bad flag"):
        train()
    assert not os.path.exists(str(best) + ".lock")


# ------------------------------------------------------------------ manifest
def test_manifest_removes_only_what_it_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("mine")          # a user's file, named like an output
    m = run_files.OutputManifest(out, "tool")
    with pytest.raises(FileExistsError, match=r"metrics.json exists and was not written by "
                                              r"this tool.*--overwrite"):
        m.check_foreign([out / "metrics.json", out / "a.csv"], overwrite=False)
    m.check_foreign([out / "a.csv"], overwrite=False)
    m.begin([out / "a.csv", out / "b.csv"])
    for name in ("a.csv", "b.csv"):
        (out / name).write_text(name)
        m.add(out / name)
    (out / "sub").mkdir()
    (out / "sub" / "c.png").write_text("c")
    m.add(out / "sub" / "c.png")
    m.add_dir(out / "sub")
    m.finish()
    # a second run writes only a.csv: b.csv and sub/ (its own) go, the user's file stays
    m2 = run_files.OutputManifest(out, "tool")
    m2.check_foreign([out / "a.csv"], overwrite=False)
    (out / "a.csv").write_text("new")
    m2.add(out / "a.csv")
    m2.finish()
    assert sorted(p.name for p in out.iterdir()) == [".ddsm_outputs.json", "a.csv",
                                                     "metrics.json"]
    assert (out / "metrics.json").read_text() == "mine"
    assert json.loads((out / run_files.MANIFEST_NAME).read_text())["files"] == ["a.csv"]


def test_manifest_ignores_paths_outside_its_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / run_files.MANIFEST_NAME).write_text(json.dumps(
        {"tool": "tool", "files": ["../victim.txt", str(victim)], "dirs": []}))
    run_files.OutputManifest(out, "tool").finish()
    assert victim.read_text() == "keep"
    (out / "sub").symlink_to(tmp_path)                # a link planted in the folder
    (out / run_files.MANIFEST_NAME).write_text(json.dumps(
        {"tool": "tool", "files": ["sub/victim.txt"], "dirs": []}))
    run_files.OutputManifest(out, "tool").finish()
    assert victim.read_text() == "keep"
    (out / run_files.MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a manifest"):
        run_files.OutputManifest(out, "tool")


def test_manifest_folders_outside_its_folder_are_never_removed(tmp_path):
    """Folders a manifest names are removed once empty, but only inside its own folder: an
    empty folder beside it, named by ``..`` or an absolute path, stays."""
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    beside, elsewhere = tmp_path / "beside", tmp_path / "elsewhere"
    beside.mkdir()
    elsewhere.mkdir()
    (out / run_files.MANIFEST_NAME).write_text(json.dumps(
        {"tool": "tool", "files": [], "dirs": ["mine", "../beside", str(elsewhere)]}))
    m = run_files.OutputManifest(out, "tool")
    m.finish()
    assert beside.is_dir() and elsewhere.is_dir() and not (out / "mine").exists()


# ------------------------------------------------------------------ leftovers
def test_interrupted_run_owns_only_matching_files_in_folders_it_made(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    for rel in ("made/a_0001.png", "made/notes.txt", "theirs/b_0001.png"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(rel)
    elsewhere.mkdir()
    (elsewhere / "c_0001.png").write_text("outside")
    os.symlink(elsewhere, out / "link")
    m = run_files.OutputManifest(out, "t")
    m.begin([out / "table.csv"], owned_dirs=[out / "made", out / "link"])
    saved = json.loads(m.path.read_text())
    assert saved["complete"] is False and saved["owned_dirs"] == ["link", "made"]
    again = run_files.OutputManifest(out, "t")
    adopted = again.adopt_interrupted(lambda name: name.endswith("_0001.png"))
    assert adopted == [out / "made" / "a_0001.png"]          # not theirs/, not through a link
    assert [p.name for p in again.foreign([out / "made" / "a_0001.png",
                                           out / "theirs" / "b_0001.png"])] == ["b_0001.png"]
    again.remove_earlier()
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        [".ddsm_outputs.json", "made/notes.txt", "theirs/b_0001.png"]
    assert (elsewhere / "c_0001.png").is_file()
    again.finish()
    assert "complete" not in json.loads(m.path.read_text())   # finished: no folder is owned
    assert not run_files.OutputManifest(out, "t").earlier_owned_dirs


def test_leftovers_of_killed_writes_are_removed(tmp_path, live_pid):
    path = dm_image.atomic_write(tmp_path / "model.h5", lambda fh: fh.write(b"m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5"]   # no temp after a write
    dead = tmp_path / f".model.h5.ddsm{_dead_pid()}.abc123_x.tmp"
    busy = tmp_path / f".model.h5.ddsm{live_pid}.zz9.tmp"
    other = tmp_path / ".model.h5.abc.tmp"          # not a name the writer makes
    for p in (dead, busy, other):
        p.write_bytes(b"partial")
    assert run_files.clean_leftovers(tmp_path) == 1
    assert not dead.exists() and busy.exists() and other.exists() and path.exists()


# ------------------------------------------------------------------ input tables
def test_duplicated_csv_header_is_an_error_naming_file_and_column(tmp_path):
    import script_utils

    table = tmp_path / "t.csv"
    table.write_text("patient_id,side, Side ,cancer\nP_1,LEFT,RIGHT,1\n")
    with pytest.raises(script_utils.InputFileError,
                       match=r"t.csv: column 'Side' given twice"):
        script_utils.read_csv_table(table)
    table.write_text("# note\npatient_id,side\nP_1,LEFT\n")
    assert list(script_utils.read_csv_table(table, comment="#").columns) == [
        "patient_id", "side", "_line"]


def test_images_beside_class_folders_are_reported(tmp_path, caplog):
    import logging

    import training_setup

    for rel in ("neg/a.png", "pos/b.png", "c.png", "d.jpg", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        training_setup.check_class_dirs({"TRAIN_DIR": tmp_path}, ["neg", "pos"])
    msgs = [r.getMessage() for r in caplog.records if "beside the class folders" in r.getMessage()]
    assert len(msgs) == 1 and "2 image(s)" in msgs[0] and "(e.g. c.png)" in msgs[0]
