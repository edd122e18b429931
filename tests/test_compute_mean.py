"""compute_mean.py gives the mean that the training generators see before centring."""
import cv2
import numpy as np
import pytest

import compute_mean
import dm_image


@pytest.fixture
def train_dir(tmp_path):
    rng = np.random.RandomState(4)
    for rel, size in [("neg/a.png", (90, 70)), ("neg/b.png", (120, 80)), ("pos/c.png", (64, 50))]:
        path = tmp_path / "train" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img = rng.randint(0, 60000, size=size).astype(np.uint16)
        img[: size[0] // 3] = 0
        cv2.imwrite(str(path), img)
    (tmp_path / "train" / "neg" / "readme.txt").write_text("not an image")
    return tmp_path / "train"


def _generator_mean(folder, equalize):
    gen = dm_image.DMImageDataGenerator()
    it = gen.flow_from_directory(str(folder), target_size=(48, 40), rescale_factor=255 / 65535,
                                 equalize_hist=equalize, batch_size=3, shuffle=False,
                                 class_mode=None)
    return float(np.mean(it[0], dtype=np.float64))


@pytest.mark.parametrize("equalize", [False, True])
def test_mean_equals_what_the_generator_yields(train_dir, equalize, capsys):
    args = [str(train_dir), "--img-size", "48", "40", "--rescale-factor", str(255 / 65535)]
    result = compute_mean.main(args + (["--equalize-hist"] if equalize else []))
    assert result["images"] == 3 and result["skipped"] == []
    assert result["mean"] == pytest.approx(_generator_mean(train_dir, equalize), rel=1e-6)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{result['mean']:.4f}"


def test_unreadable_and_mixed_depth_files_are_reported(train_dir):
    (train_dir / "pos" / "broken.png").write_bytes(b"\x89PNG broken")
    cv2.imwrite(str(train_dir / "pos" / "eight.png"),
                np.linspace(150, 250, 40 * 30).reshape(40, 30).astype(np.uint8))
    result = compute_mean.image_mean(train_dir, (48, 40), rescale_factor=255 / 65535)
    assert result["images"] == 4
    assert [p.rsplit("/", 1)[-1] for p in result["skipped"]] == ["broken.png"]
    assert [p.rsplit("/", 1)[-1] for p in result["scale_mismatch"]] == ["eight.png"]


def test_empty_folder_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        compute_mean.main([str(tmp_path / "empty")])
    assert info.value.code == 2 and "no images" in capsys.readouterr().err


def test_non_finite_and_constant_images_are_left_out(train_dir, capsys):
    """A float TIFF with NaN pixels and a constant image are skipped (named), and the mean is
    that of the other images: no nan printed."""
    clean = compute_mean.image_mean(train_dir, (48, 40), rescale_factor=255 / 65535)
    nan = np.random.RandomState(1).rand(50, 40).astype(np.float32)
    nan[3, 4] = np.nan
    assert cv2.imwrite(str(train_dir / "pos" / "nan.tif"), nan)
    cv2.imwrite(str(train_dir / "neg" / "flat.png"), np.full((60, 50), 30000, np.uint16))
    result = compute_mean.main([str(train_dir), "--img-size", "48", "40", "--rescale-factor",
                                str(255 / 65535)])
    assert sorted(p.rsplit("/", 1)[-1] for p in result["skipped"]) == ["flat.png", "nan.tif"]
    assert result["images"] == 3 and result["mean"] == pytest.approx(clean["mean"], rel=1e-9)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{clean['mean']:.4f}"


def test_out_json_holds_the_mean_and_its_settings(train_dir, tmp_path, capsys):
    import json

    out = tmp_path / "results" / "image_mean.json"
    result = compute_mean.main([str(train_dir), "--img-size", "48", "40", "--rescale-factor",
                                "0.003891", "--equalize-hist", "--out-json", str(out)])
    written = json.loads(out.read_text())
    assert written["mean"] == result["mean"] and written["images"] == 3
    assert written["settings"] == {"folder": str(train_dir), "img_size": [48, 40],
                                   "img_scale": None, "rescale_factor": 0.003891,
                                   "equalize_hist": True}
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{result['mean']:.4f}"
