"""What a 2017 user runs: every 2017 option string (long and short), the five 2017 shell scripts
parsed flag by flag and run end to end on tiny data, ``--kept-layer-idx`` on 2017 files and on
our patch nets, and the 2017 ``.pkl`` heatmap output."""
import os
import pickle
import pickletools
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import common_flags as cf
import script_utils
import heatmap_score
import image_clf_train
import patch_clf_train

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO / "ddsm_train"
TRAINERS = (image_clf_train, patch_clf_train)


def assert_same_settings(got, expected):
    """``got`` (a parsed command line) holds ``expected``'s settings, and every option not
    named there (one added later) is off: None or False, so a 2017 command line means what it
    meant."""
    assert {k: got.get(k, "MISSING") for k in expected} == expected
    assert {k: v for k, v in got.items() if k not in expected and v not in (None, False)} == {}


def _parse(module, argv, positionals=("a", "b", "c")):
    return vars(module.get_args_parser().parse_args(list(positionals) + list(argv)))


# ------------------------------------------------------------------ short and long forms
def _value(text):
    """A command-line value as the parser should read it: an int, a float, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _alias_rows(table):
    """``(short, long, values given, dest, expected value)`` rows of ``table``: entries
    ``SHORT LONG DEST VALUE...`` separated by ``;``; the expected value is the value read as a
    number where it is one, a list of them when there are several."""
    rows = []
    for entry in table.split(";"):
        short, long, dest, *values = entry.split()
        expected = [_value(v) for v in values]
        rows.append((short, long, values, dest, expected if len(expected) > 1 else expected[0]))
    return rows


TRAINER_ALIASES = _alias_rows(
    "-is --img-size img_size 100 80; -ic --img-scale img_scale 255.0; -bs --batch-size "
    "batch_size 12; -ne --nb-epoch nb_epoch 3; -wd --weight-decay weight_decay 0.01; -wd2 "
    "--weight-decay2 weight_decay2 0.02; -hd --hidden-dropout hidden_dropout 0.5; -hd2 "
    "--hidden-dropout2 hidden_dropout2 0.25; -ilr --init-learningrate init_lr 0.001; -lrp "
    "--lr-patience lr_patience 2; -esp --es-patience es_patience 5; -bm --best-model best_model "
    "best.h5; -fm --final-model final_model final.h5")
PATCH_ALIASES = _alias_rows(
    "-nif --nb-init-filter nb_init_filter 64; -ifs --init-filter-size init_filter_size 7; "
    "-ics --init-conv-stride init_conv_stride 3; -mps --max-pooling-size max_pooling_size 3; "
    "-mpr --max-pooling-stride max_pooling_stride 1; -id --inp-dropout inp_dropout 0.1")
HEATMAP_ALIASES = _alias_rows("-is --img-size img_size 100 80; -ih --img-height img_height 4096; "
                              "-ic --img-scale img_scale 255.0")
ALIAS_CASES = ([(m, *c) for m in TRAINERS for c in TRAINER_ALIASES]
               + [(patch_clf_train, *c) for c in PATCH_ALIASES]
               + [(heatmap_score, *c) for c in HEATMAP_ALIASES])


@pytest.mark.parametrize("module, short, long, values, dest, expected", ALIAS_CASES,
                         ids=[f"{c[0].__name__}{c[1]}" for c in ALIAS_CASES])
def test_short_form_is_an_alias_of_its_long_flag(module, short, long, values, dest, expected):
    parser = module.get_args_parser()
    actions = parser._option_string_actions
    assert actions[short] is actions[long]                     # one action: same dest, type
    pos = ["a", "b", "c"] if module in TRAINERS else ["img", "model"]
    by_short = vars(parser.parse_args(pos + [short] + values))
    by_long = vars(parser.parse_args(pos + [long] + values))
    assert by_short[dest] == by_long[dest] == expected
    assert by_short == by_long


NO_ALIASES = [(m, "-nic", "--no-img-scale", "img_scale") for m in TRAINERS + (heatmap_score,)]


@pytest.mark.parametrize("module, short, long, dest", NO_ALIASES,
                         ids=[c[0].__name__ for c in NO_ALIASES])
def test_no_img_scale_short_form(module, short, long, dest):
    pos = ["a", "b", "c"] if module in TRAINERS else ["img", "model"]
    parser = module.get_args_parser()
    assert parser._option_string_actions[short] is parser._option_string_actions[long]
    for flag in (short, long):
        assert vars(parser.parse_args(pos + ["-ic", "255", flag]))[dest] is None


@pytest.mark.parametrize("module", TRAINERS, ids=lambda m: m.__name__)
def test_hd_is_not_read_as_help(module, capsys):
    args = _parse(module, ["-hd", "0.5", "-hd2", "0.3", "-wd2", "0.02"])
    assert (args["hidden_dropout"], args["hidden_dropout2"], args["weight_decay2"]) == \
        (0.5, 0.3, 0.02)
    assert _parse(module, ["-hd=0.4"])["hidden_dropout"] == 0.4
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as exc:
            module.get_args_parser().parse_args([flag])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:") and "--hidden-dropout HIDDEN_DROPOUT, -hd" in out


def test_every_2017_long_option_string_exists():
    """Each option string the 2017 parsers had (flags of all five scripts included)."""
    common = """--img-size --img-scale --no-img-scale --rescale-factor --no-rescale-factor
        --featurewise-center --no-featurewise-center --featurewise-mean --equalize-hist
        --no-equalize-hist --batch-size --train-bs-multiplier --augmentation --no-augmentation
        --class-list --nb-epoch --all-layer-epochs --load-val-ram --no-load-val-ram
        --load-train-ram --no-load-train-ram --weight-decay --weight-decay2 --hidden-dropout
        --hidden-dropout2 --optimizer --init-learningrate --lr-patience --es-patience
        --auto-batch-balance --no-auto-batch-balance --pos-cls-weight --neg-cls-weight
        --all-layer-multiplier --best-model --final-model --top-layer-nb --no-top-layer-nb
        --resume-from --no-resume-from --bias-multiplier""".split()
    image = """--patch-model-state --no-patch-model-state --patch-net --block-type --top-depths
        --top-repetitions --bottleneck-enlarge-factor --add-heatmap --no-add-heatmap
        --avg-pool-size --add-conv --no-add-conv --add-shortcut --no-add-shortcut --hm-strides
        --hm-pool-size --fc-init-units --fc-layers --kept-layer-idx""".split()
    patch = """--top-layer-epochs --top-layer-multiplier --net --use-pretrained
        --no-use-pretrained --nb-init-filter --init-filter-size --init-conv-stride
        --max-pooling-size --max-pooling-stride --alpha --l1-ratio --inp-dropout""".split()
    heat = """--fprop-mode --no-fprop-mode --img-size --img-height --no-img-height --img-scale
        --no-img-scale --rescale-factor --no-rescale-factor --equalize-hist --no-equalize-hist
        --featurewise-center --no-featurewise-center --featurewise-mean --net --batch-size
        --patch-size --stride --avg-pool-size --hm-strides --pat-csv --pat-list --no-pat-list
        --out""".split()
    for module, names in ((image_clf_train, common + image), (patch_clf_train, common + patch),
                          (heatmap_score, heat)):
        have = module.get_args_parser()._option_string_actions
        assert not [n for n in names if n not in have], module.__name__


HEATMAP_DEFAULTS = dict(
    img_folder="img", dl_state="model", fprop_mode=False, img_size=[1152, 896],
    img_height=None, img_scale=None, rescale_factor=None, equalize_hist=False,
    featurewise_center=False, featurewise_mean=71.8, net="vgg19", batch_size=128,
    patch_size=256, stride=8, avg_pool_size=[7, 7], hm_strides=[1, 1],
    pat_csv="./full_img/pat.csv", pat_list=None, out="./output/prob_heatmap.pkl",
    png_dir=None, png_height=1024, malignant_class=1, img_extension="png", verbose=True,
    # options added since 2017, neutral by default
    all_images=False, img_list=None, class_list=None, roi_mask_dir=None,
    trust_model_file=False, overwrite=False)


def test_heatmap_defaults_are_2017():
    got = vars(heatmap_score.get_args_parser().parse_args(["img", "model"]))
    assert_same_settings(got, HEATMAP_DEFAULTS)
    got = vars(heatmap_score.get_args_parser().parse_args(
        ["img", "model", "-ih", "100", "--no-img-height", "--pat-list", "l.txt",
         "--no-pat-list", "--featurewise-center"]))
    assert (got["img_height"], got["pat_list"], got["featurewise_center"]) == (None, None, True)


@pytest.mark.parametrize("module", TRAINERS, ids=lambda m: m.__name__)
def test_frozen_bn_mode_flag(module):
    assert _parse(module, [])["frozen_bn_mode"] == "batch"
    assert _parse(module, ["--frozen-bn-mode", "moving"])["frozen_bn_mode"] == "moving"
    with pytest.raises(SystemExit):
        _parse(module, ["--frozen-bn-mode", "running"])
    import dm_keras_ext
    assert tuple(getattr(dm_keras_ext, "FROZEN_BN_MODES", cf.FROZEN_BN_MODES)) == \
        cf.FROZEN_BN_MODES


# ------------------------------------------------------------------ the five scripts, parsed
def script_calls(name, env=None):
    """The argv lists of each ``python`` call of a script (bash runs it; python is stubbed)."""
    cmd = f'python() {{ printf "%s\\0" "$@"; printf "\\1"; }}; date() {{ :; }}; ' \
          f'echo() {{ :; }}; mkdir() {{ :; }}; cd "{SCRIPTS_DIR}"; . ./{name}'
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=30,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})})
    assert out.returncode == 0, out.stderr
    return [[a.decode() for a in c.split(b"\0")[:-1]] for c in out.stdout.split(b"\1")[:-1]]


PATCH_SCRIPT = dict(
    img_size=[256, 256], img_scale=255.0, rescale_factor=None, featurewise_center=True,
    featurewise_mean=59.6, equalize_hist=True, batch_size=64, train_bs_multiplier=0.5,
    augmentation=True, class_list=["background", "malignant", "benign"], nb_epoch=1,
    top_layer_epochs=5, all_layer_epochs=15, load_val_ram=False, load_train_ram=False,
    net="resnet50", optim="nadam", use_pretrained=True, top_layer_nb=None, nb_init_filter=64,
    init_filter_size=7, init_conv_stride=2, max_pooling_size=3, max_pooling_stride=2,
    weight_decay=0.01, weight_decay2=0.0001, bias_multiplier=0.1, alpha=0.0001, l1_ratio=0.0,
    inp_dropout=0.0, hidden_dropout=0.5, hidden_dropout2=0.0, init_lr=0.01,
    top_layer_multiplier=0.01, all_layer_multiplier=0.0001, lr_patience=2, es_patience=5,
    resume_from=None, auto_batch_balance=True, pos_cls_weight=1.0, neg_cls_weight=1.0,
    best_model="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5",
    final_model="NOSAVE", train_dir="CBIS-DDSM/Combined_patches_im4096_256/train",
    val_dir="CBIS-DDSM/Combined_patches_im4096_256/val",
    test_dir="CBIS-DDSM/Combined_patches_im4096_256/test", img_cache_dir=None,
    mixed_precision=None, jit=False, frozen_bn_mode="batch",
    # options added since 2017, neutral by default
    auto_resume=True, tensorboard_dir=None, trust_model_file=False, overwrite=False)
IM1152_SCRIPT = dict(
    patch_model_state="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5",
    resume_from=None, img_size=[1152, 896], img_scale=None, rescale_factor=0.003891,
    featurewise_center=True, featurewise_mean=52.18, equalize_hist=False,
    top_depths=[512, 512], top_repetitions=[3, 3], kept_layer_idx=-5, batch_size=20,
    train_bs_multiplier=0.5, augmentation=True, class_list=["neg", "pos"], nb_epoch=1,
    all_layer_epochs=2, load_val_ram=False, load_train_ram=False, optim="adam",
    weight_decay=0.0001, weight_decay2=0.0001, bias_multiplier=0.1, hidden_dropout=0.0,
    hidden_dropout2=0.0, init_lr=0.001, all_layer_multiplier=0.1, lr_patience=2,
    es_patience=10, auto_batch_balance=True, pos_cls_weight=1.0, neg_cls_weight=1.0,
    best_model="CBIS-DDSM/Combined_full_images/resnet_1152x896_prt_addtop1.h5",
    final_model="NOSAVE", train_dir="CBIS-DDSM/Combined_full_images/full_train_1152x896",
    val_dir="CBIS-DDSM/Combined_full_images/full_val_1152x896",
    test_dir="CBIS-DDSM/Combined_full_images/full_test_1152x896",
    # not passed by the script: the 2017 defaults
    patch_net="resnet50", block_type="resnet", bottleneck_enlarge_factor=4, add_heatmap=False,
    avg_pool_size=[7, 7], add_conv=True, add_shortcut=False, hm_strides=[1, 1],
    hm_pool_size=[5, 5], fc_init_units=64, fc_layers=2, top_layer_nb=None, img_cache_dir=None,
    mixed_precision=None, jit=False, frozen_bn_mode="batch",
    # options added since 2017, neutral by default
    auto_resume=True, tensorboard_dir=None, trust_model_file=False, overwrite=False)
INBREAST_SCRIPT = dict(
    patch_model_state=None, resume_from="ddsm_vgg16_s10_[512-512-1024]x2_hybrid.h5",
    img_size=[1152, 896], img_scale=None, rescale_factor=0.003891, featurewise_center=True,
    featurewise_mean=44.33, equalize_hist=False, patch_net="resnet50", block_type="resnet",
    top_depths=[512, 512], top_repetitions=[2, 2], bottleneck_enlarge_factor=2,
    add_heatmap=False, avg_pool_size=[7, 7], add_conv=True, add_shortcut=False,
    hm_strides=[1, 1], hm_pool_size=[5, 5], fc_init_units=64, fc_layers=2, batch_size=4,
    train_bs_multiplier=0.5, augmentation=True, class_list=["neg", "pos"], nb_epoch=0,
    all_layer_epochs=50, load_val_ram=True, load_train_ram=True, optim="adam",
    weight_decay=0.001, hidden_dropout=0.0, weight_decay2=0.01, hidden_dropout2=0.0,
    init_lr=0.0001, all_layer_multiplier=0.01, lr_patience=2, es_patience=10,
    auto_batch_balance=True, pos_cls_weight=1.0, neg_cls_weight=1.0,
    best_model="INbreast/transferred_inbreast_best_model.h5", final_model="NOSAVE",
    train_dir="INbreast/train", val_dir="INbreast/val", test_dir="INbreast/test",
    kept_layer_idx=None, top_layer_nb=None, bias_multiplier=None, img_cache_dir=None,
    mixed_precision=None, jit=False, frozen_bn_mode="batch",
    # options added since 2017, neutral by default
    auto_resume=True, tensorboard_dir=None, trust_model_file=False, overwrite=False)
_ROI = "CBIS-DDSM/Combined_full_ROI/"
FPROP_SCRIPT = dict(
    fprop_mode=True, img_size=[1152, 896], img_height=None, img_scale=None,
    rescale_factor=0.003891, equalize_hist=False, featurewise_center=True,
    featurewise_mean=52.18, avg_pool_size=[7, 7], hm_strides=[1, 1], net="resnet50",
    pat_csv=_ROI + "pat_side_cancer.csv", img_folder=_ROI + "full_img_png",
    dl_state="CBIS-DDSM/Combined_patches_im1152_224_s10/resnet_prt_best1.h5",
    batch_size=128, patch_size=256, stride=8, png_dir=None, png_height=1024,
    malignant_class=1, img_extension="png", verbose=True,
    # options added since 2017, neutral by default
    all_images=False, img_list=None, class_list=None, roi_mask_dir=None,
    trust_model_file=False, overwrite=False)
SCORE_SCRIPT = dict(
    fprop_mode=False, img_size=[1152, 896], img_height=4096, img_scale=255.0,
    rescale_factor=None, equalize_hist=False, featurewise_center=True, featurewise_mean=59.6,
    net="resnet50", batch_size=64, patch_size=256, stride=128, avg_pool_size=[7, 7],
    hm_strides=[1, 1], pat_csv=_ROI + "pat_side_cancer.csv", img_folder=_ROI + "full_img_png",
    dl_state="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5",
    png_dir=None, png_height=1024, malignant_class=1, img_extension="png", verbose=True,
    # options added since 2017, neutral by default
    all_images=False, img_list=None, class_list=None, roi_mask_dir=None,
    trust_model_file=False, overwrite=False)


@pytest.mark.parametrize("name, module, expected", [
    ("train_patch_clf_im4096_256_3Cls.sh", patch_clf_train, PATCH_SCRIPT),
    ("train_image_clf_im1152.sh", image_clf_train, IM1152_SCRIPT),
    ("train_image_clf_inbreast.sh", image_clf_train, INBREAST_SCRIPT)])
def test_training_script_command_lines(name, module, expected):
    subprocess.run(["bash", "-n", str(SCRIPTS_DIR / name)], check=True, timeout=30)
    (argv,) = script_calls(name)
    assert argv[0] == module.__name__ + ".py"
    assert_same_settings(vars(module.get_args_parser().parse_args(argv[1:])), expected)


@pytest.mark.parametrize("name, expected, out", [
    ("fprop_heatmap_all.sh", FPROP_SCRIPT,
     "CBIS-DDSM/Combined_patches_im1152_224_s10/resnet_prt_best1_out/phm_s1x1_{}.pkl"),
    ("score_heatmap_all.sh", SCORE_SCRIPT,
     "CBIS-DDSM/Combined_patches_im4096_256/3cls_model_out/phm_s128_{}.pkl")])
def test_heatmap_script_command_lines(name, expected, out):
    subprocess.run(["bash", "-n", str(SCRIPTS_DIR / name)], check=True, timeout=30)
    calls = script_calls(name)
    assert len(calls) == 3
    for argv, split in zip(calls, ("train", "val", "test")):
        assert argv[0] == "heatmap_score.py"
        got = vars(heatmap_score.get_args_parser().parse_args(argv[1:]))
        assert_same_settings(got, dict(expected, pat_list=f"{_ROI}patient_{split}.txt",
                                       out=out.format(split)))


# The 2017 command lines, flag for flag and in order (paths as the scripts name them).
_P = "CBIS-DDSM/Combined_patches_im4096_256/"
_F = "CBIS-DDSM/Combined_full_images/"
COMMANDS_2017 = {
    "train_patch_clf_im4096_256_3Cls.sh": f"""patch_clf_train.py --img-size 256 256
        --img-scale 255.0 --featurewise-center --featurewise-mean 59.6 --equalize-hist
        --batch-size 64 --train-bs-multiplier 0.5 --augmentation --class-list background
        malignant benign --nb-epoch 1 --top-layer-epochs 5 --all-layer-epochs 15
        --no-load-val-ram --no-load-train-ram --net resnet50 --optimizer nadam --use-pretrained
        --no-top-layer-nb --nb-init-filter 64 --init-filter-size 7 --init-conv-stride 2
        --max-pooling-size 3 --max-pooling-stride 2 --weight-decay 0.01 --weight-decay2 0.0001
        --bias-multiplier 0.1 --alpha 0.0001 --l1-ratio 0.0 --inp-dropout 0.0
        --hidden-dropout 0.5 --hidden-dropout2 0.0 --init-learningrate 0.01
        --top-layer-multiplier 0.01 --all-layer-multiplier 0.0001 --lr-patience 2
        --es-patience 5 --no-resume-from --auto-batch-balance --pos-cls-weight 1.0
        --neg-cls-weight 1.0 --best-model {_P}3cls_best_model_resnet50.h5 --final-model NOSAVE
        {_P}train {_P}val {_P}test""",
    "train_image_clf_im1152.sh": f"""image_clf_train.py --patch-model-state
        {_P}3cls_best_model_resnet50.h5 --no-resume-from --img-size 1152 896 --no-img-scale
        --rescale-factor 0.003891 --featurewise-center --featurewise-mean 52.18
        --no-equalize-hist --top-depths 512 512 --top-repetitions 3 3 --kept-layer-idx -5
        --batch-size 20 --train-bs-multiplier 0.5 --augmentation --class-list neg pos
        --nb-epoch 1 --all-layer-epochs 2 --no-load-val-ram --no-load-train-ram
        --optimizer adam --weight-decay 0.0001 --weight-decay2 0.0001 --bias-multiplier 0.1
        --hidden-dropout 0.0 --hidden-dropout2 0.0 --init-learningrate 0.001
        --all-layer-multiplier 0.1 --lr-patience 2 --es-patience 10 --auto-batch-balance
        --pos-cls-weight 1.0 --neg-cls-weight 1.0 --best-model
        {_F}resnet_1152x896_prt_addtop1.h5 --final-model NOSAVE {_F}full_train_1152x896
        {_F}full_val_1152x896 {_F}full_test_1152x896""",
    "train_image_clf_inbreast.sh": """image_clf_train.py --no-patch-model-state --resume-from
        ddsm_vgg16_s10_[512-512-1024]x2_hybrid.h5 --img-size 1152 896 --no-img-scale
        --rescale-factor 0.003891 --featurewise-center --featurewise-mean 44.33
        --no-equalize-hist --patch-net resnet50 --block-type resnet --top-depths 512 512
        --top-repetitions 2 2 --bottleneck-enlarge-factor 2 --no-add-heatmap
        --avg-pool-size 7 7 --add-conv --no-add-shortcut --hm-strides 1 1 --hm-pool-size 5 5
        --fc-init-units 64 --fc-layers 2 --batch-size 4 --train-bs-multiplier 0.5
        --augmentation --class-list neg pos --nb-epoch 0 --all-layer-epochs 50 --load-val-ram
        --load-train-ram --optimizer adam --weight-decay 0.001 --hidden-dropout 0.0
        --weight-decay2 0.01 --hidden-dropout2 0.0 --init-learningrate 0.0001
        --all-layer-multiplier 0.01 --lr-patience 2 --es-patience 10 --auto-batch-balance
        --pos-cls-weight 1.0 --neg-cls-weight 1.0 --best-model
        INbreast/transferred_inbreast_best_model.h5 --final-model NOSAVE INbreast/train
        INbreast/val INbreast/test""",
    "fprop_heatmap_all.sh": f"""heatmap_score.py --fprop-mode --img-size 1152 896
        --no-img-height --no-img-scale --rescale-factor 0.003891 --no-equalize-hist
        --featurewise-center --featurewise-mean 52.18 --avg-pool-size 7 7 --hm-strides 1 1
        --net resnet50 --pat-csv {_ROI}pat_side_cancer.csv --pat-list {_ROI}patient_SET.txt
        --out CBIS-DDSM/Combined_patches_im1152_224_s10/resnet_prt_best1_out/phm_s1x1_SET.pkl
        {_ROI}full_img_png CBIS-DDSM/Combined_patches_im1152_224_s10/resnet_prt_best1.h5""",
    "score_heatmap_all.sh": f"""heatmap_score.py --img-height 4096 --img-scale 255.0
        --no-equalize-hist --featurewise-center --featurewise-mean 59.6 --net resnet50
        --batch-size 64 --patch-size 256 --stride 128 --pat-csv {_ROI}pat_side_cancer.csv
        --pat-list {_ROI}patient_SET.txt --out {_P}3cls_model_out/phm_s128_SET.pkl
        {_ROI}full_img_png {_P}3cls_best_model_resnet50.h5""",
}


@pytest.mark.parametrize("name", sorted(COMMANDS_2017))
def test_scripts_pass_exactly_the_2017_command(name):
    calls = script_calls(name)
    expected = COMMANDS_2017[name].split()
    if "SET" in COMMANDS_2017[name]:
        assert calls == [[a.replace("SET", s) for a in expected]
                         for s in ("train", "val", "test")]
    else:
        assert calls == [expected]
    env = {"train_patch_clf_im4096_256_3Cls.sh": "3", "fprop_heatmap_all.sh": None,
           "score_heatmap_all.sh": None}.get(name, "4")
    text = (SCRIPTS_DIR / name).read_text()
    assert (f"export NUM_CPU_CORES={env}" in text) if env else ("NUM_CPU_CORES" not in text)


# ------------------------------------------------------------------ --kept-layer-idx
@pytest.fixture(scope="module")
def our_resnet50():
    import tf_keras as keras

    import dm_keras_ext
    keras.backend.clear_session()
    model, _, _ = dm_keras_ext.get_dl_model("resnet50", nb_class=3, use_pretrained=False,
                                           input_shape=(64, 64, 3), hidden_dropout=0.5)
    yield model
    keras.backend.clear_session()


def test_kept_layer_idx_on_our_resnet50(our_resnet50):
    import dm_resnet
    model = our_resnet50
    assert [type(lyr).__name__ for lyr in model.layers[-4:]] == [
        "Activation", "GlobalAveragePooling2D", "Dropout", "Dense"]   # no 2017 7x7 avg_pool
    cut = dm_resnet.find_cut_layer(model, "resnet50", -5)
    assert cut.name == "conv5_block3_out" and cut.output.shape[-1] == 2048
    assert cut is dm_resnet.find_cut_layer(model, "resnet50")            # the role agrees
    assert dm_resnet.find_cut_layer(model, "resnet50", -6).name == "conv5_block3_add"
    assert dm_resnet.find_cut_layer(model, "resnet50", 10) is model.layers[10]
    with pytest.raises(ValueError, match="AveragePooling2D of the 2017 resnet50"):
        dm_resnet.find_cut_layer(model, "resnet50", -4)
    with pytest.raises(ValueError, match="4-D feature map"):
        dm_resnet.find_cut_layer(model, "resnet50", -1)
    whole, top_layer_nb = dm_resnet.add_top_layers(model, (64, 64), "resnet50", "resnet", [8],
                                                   [1], kept_layer_idx=-5)
    base = whole.get_layer("patch_net")
    assert base.layers[-1].name == "conv5_block3_out" and base.output_shape[-1] == 2048
    assert top_layer_nb == 2 and whole.output_shape == (None, 2)


def _keras208_shaped_resnet():
    """A model shaped as a 2017 (Keras 2.0.8) ResNet50 patch net at its end: final ReLU, 7x7
    AveragePooling2D ``avg_pool``, global pooling, dropout, dense."""
    import tf_keras as keras
    L = keras.layers
    inp = keras.Input((None, None, 3))
    x = L.Conv2D(4, 3, padding="same")(inp)
    y = L.Conv2D(4, 3, padding="same")(x)
    x = L.Activation("relu", name="activation_49")(L.Add(name="add_16")([x, y]))
    x = L.AveragePooling2D((7, 7), name="avg_pool")(x)
    x = L.GlobalAveragePooling2D(name="global_average_pooling2d_1")(x)
    x = L.Dropout(0.5, name="dropout_1")(x)
    return keras.Model(inp, L.Dense(3, activation="softmax", name="dense_1")(x))


def test_kept_layer_idx_on_2017_shaped_files(keras_session):
    import dm_resnet
    model = _keras208_shaped_resnet()
    for net in ("resnet50", "vgg16", "custom"):
        assert dm_resnet.find_cut_layer(model, net, -5).name == "activation_49"
        assert dm_resnet.find_cut_layer(model, net, -4).name == "avg_pool"


def test_kept_layer_idx_on_our_yaroslav(keras_session):
    """2017 YaroslavNet had no dropout before its dense: its -3 was block6_pool; ours too."""
    import dm_keras_ext
    import dm_resnet
    model, _, _ = dm_keras_ext.get_dl_model("yaroslav", nb_class=3, use_pretrained=False,
                                           input_shape=(64, 64, 1))
    assert dm_resnet.find_cut_layer(model, "yaroslav", -3).name == "block6_pool"
    assert dm_resnet.find_cut_layer(model, "yaroslav").name == "block6_pool"


@pytest.mark.real_data
def test_kept_layer_idx_on_keras208_vgg_file(keras208_dir, keras_session):
    """The 2017 file's own layer list: -5 is its second block's ReLU, whatever --patch-net."""
    import dm_keras_ext
    import dm_resnet
    model = dm_keras_ext.robust_load_model(keras208_dir / "tiny_patch_vgg.h5")
    names = [lyr.name for lyr in model.layers]
    assert names[-5:] == ["activation_2", "block2_pool", "global_average_pooling2d_1",
                          "dropout_1", "dense_1"]
    for net in ("vgg16", "resnet50", "yaroslav"):
        assert dm_resnet.find_cut_layer(model, net, -5).name == "activation_2"   # as in 2017
    assert dm_resnet.find_cut_layer(model, "vgg16", -4).name == "block2_pool"
    whole, _ = dm_resnet.add_top_layers(model, (96, 64), "vgg16", "vgg", [8], [1],
                                        kept_layer_idx=-5)
    base = whole.get_layer("patch_net")
    assert base.layers[-1].name == "activation_2" and base.output_shape[-1] == 16


# ------------------------------------------------------------------ 2017 pickle output
def test_pkl_heatmaps_are_what_2017_wrote(tmp_path):
    recs = [{"patient_id": "P_1", "side": "LEFT", "cancer": 1,
             "cc": np.random.rand(5, 4, 3).astype("float32"), "mlo": None},
            {"patient_id": "P_2", "side": "RIGHT", "cancer": 0, "cc": None,
             "mlo": np.random.rand(3, 2, 3).astype("float32")}]
    path = heatmap_score.save_heatmaps(recs, tmp_path / "sub" / "hm.pkl", {"mode": "sweep"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["hm.pkl"]   # no temp file left
    data = path.read_bytes()
    globals_ = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    # importable by Python 2.7 with numpy 1.x: no numpy._core, protocol 2
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype",
                        "_codecs encode"}
    assert data[:2] == b"\x80\x02"
    back = pickle.loads(data)
    assert isinstance(back, list) and [list(r) for r in back] == \
        [["patient_id", "side", "cancer", "cc", "mlo"]] * 2
    np.testing.assert_array_equal(back[0]["cc"], recs[0]["cc"])
    assert back[0]["mlo"] is None and back[1]["cc"] is None and back[1]["cancer"] == 0
    with pytest.raises(ValueError, match="allow_pickle"):
        heatmap_score.load_heatmaps(path)
    safe = heatmap_score.load_heatmaps(path, allow_pickle=True)
    np.testing.assert_array_equal(safe[1]["mlo"], recs[1]["mlo"])
    with pytest.raises(ValueError, match=r"\.pkl .* or \.npz"):
        heatmap_score.save_heatmaps(recs, tmp_path / "hm.json")


# ------------------------------------------------------------------ the five scripts, run
PATCH_HW = 32


def _write_patches(root, rng):
    """16-bit 32x32 patches, 3 classes; a bright square marks the lesion classes."""
    for split, n in (("train", 4), ("val", 3), ("test", 2)):
        for ci, cls in enumerate(("background", "malignant", "benign")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.normal(13000, 2500, (PATCH_HW, PATCH_HW))
                if ci:
                    r, c = rng.integers(2, PATCH_HW - 12, size=2)
                    img[r:r + 10, c:c + 10] += 15000 * ci
                cv2.imwrite(str(folder / f"{cls}_{i}.png"), img.clip(0, 65535).astype(np.uint16))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic CBIS-DDSM (10 patients, 256x192 mammograms, 64x48 whole images), 3-class
    patches, patient lists per set, and a local 'ImageNet' VGG16 weight file (random weights:
    nothing is downloaded)."""
    import json

    import tf_keras as keras

    import make_synthetic_ddsm
    root = tmp_path_factory.mktemp("scripts2017")
    res = make_synthetic_ddsm.run(root / "ddsm", nb_patients=10, img_height=256, img_width=192,
                                  whole_img_size=(64, 48), seed=1, lesion_contrast=2.0)
    for split, counts in res["whole_img_counts"].items():
        assert counts["neg"] and counts["pos"], (split, counts)   # AUROC needs both classes
    val = json.loads(res["options_json"].read_text())["val_patients"]
    train = [p for p in res["train_pat"].read_text().split() if p not in val]
    for split, pats in (("train", train), ("val", val),
                        ("test", res["test_pat"].read_text().split())):
        (root / f"patient_{split}.txt").write_text("\n".join(pats) + "\n")
    _write_patches(root / "patches", np.random.default_rng(3))
    models = root / "keras" / "models"
    models.mkdir(parents=True)
    keras.backend.clear_session()
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3)) \
        .save_weights(str(models / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"))
    keras.backend.clear_session()
    return root


def run_script(name, world, variables, flags, tmp_path):
    """Run ``ddsm_train/<name>`` with its path variables and some flag values replaced.

    ``flags``: (old text, new text) pairs, each of which must occur once in the script.
    """
    text = (SCRIPTS_DIR / name).read_text()
    for var, value in variables.items():
        text, n = re.subn(rf'^(\s*){var}="[^"\n]*"', rf'\g<1>{var}="{value}"', text, flags=re.M)
        assert n == 1, var
    for old, new in flags:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    script = tmp_path / name
    script.write_text(text)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO),
               KERAS_HOME=str(world / "keras"), TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="", RANDOM_SEED="12345")
    out = subprocess.run(["bash", str(script)], cwd=SCRIPTS_DIR, env=env, capture_output=True,
                         text=True, timeout=600)
    (tmp_path / f"{name}.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def patch_model(world, tmp_path_factory):
    """train_patch_clf_im4096_256_3Cls.sh on 32x32 patches, VGG16 instead of ResNet50 (fast
    enough on a CPU), 1 epoch in each of the three stages."""
    tmp = tmp_path_factory.mktemp("patch_run")
    best = tmp / "3cls_best_model.h5"
    p = world / "patches"
    run_script("train_patch_clf_im4096_256_3Cls.sh", world,
               {"TRAIN_DIR": p / "train", "VAL_DIR": p / "val", "TEST_DIR": p / "test",
                "BEST_MODEL": best},
               [("--img-size 256 256", f"--img-size {PATCH_HW} {PATCH_HW}"),
                ("--net resnet50", "--net vgg16"),
                ("--top-layer-epochs 5", "--top-layer-epochs 1"),
                ("--all-layer-epochs 15", "--all-layer-epochs 1")], tmp)
    return best


@pytest.mark.slow
def test_patch_script_runs(patch_model):
    import json

    import dm_keras_ext
    opts = json.loads(script_utils.options_json_path(patch_model).read_text())
    for key, value in dict(PATCH_SCRIPT, img_size=[PATCH_HW, PATCH_HW], net="vgg16",
                           top_layer_epochs=1, all_layer_epochs=1).items():
        if not key.endswith("_dir") and key != "best_model":
            assert opts[key] == value, key
    assert opts["environment"]["NUM_CPU_CORES"] == 3
    model = dm_keras_ext.robust_load_model(patch_model)
    assert model.output_shape == (None, 3) and model.layers[-1].name == "predictions"


@pytest.fixture(scope="module")
def image_model(world, patch_model, tmp_path_factory):
    """train_image_clf_im1152.sh at 64x48 with [16-16-64]x1 top blocks, epochs as in the
    script; the patch net is the VGG16 one of ``patch_model``."""
    tmp = tmp_path_factory.mktemp("im1152_run")
    best = tmp / "image_best.h5"
    w = world / "ddsm" / "whole_img"
    out = run_script("train_image_clf_im1152.sh", world,
                     {"TRAIN_DIR": w / "train", "VAL_DIR": w / "val", "TEST_DIR": w / "test",
                      "PATCH_STATE": patch_model, "BEST_MODEL": best},
                     [("--img-size 1152 896", "--img-size 64 48"),
                      ("--top-depths 512 512", "--top-depths 16 16"),
                      ("--top-repetitions 3 3", "--top-repetitions 1 1")], tmp)
    return best, out


@pytest.mark.slow
def test_im1152_script_runs(image_model):
    import json

    import dm_keras_ext
    best, out = image_model
    opts = json.loads(script_utils.options_json_path(best).read_text())
    assert (opts["kept_layer_idx"], opts["nb_epoch"], opts["all_layer_epochs"],
            opts["frozen_bn_mode"]) == (-5, 1, 2, "batch")
    model = dm_keras_ext.robust_load_model(best)
    assert model.input_shape == (None, 64, 48, 3) and model.output_shape == (None, 2)
    # -5 on our VGG16 patch net is block5_conv3, as on a 2017 VGG16 patch net
    assert model.get_layer("patch_net").layers[-1].name == "block5_conv3"
    assert "test AUROC" in out.stdout


@pytest.mark.slow
def test_inbreast_script_runs(world, image_model, tmp_path):
    import dm_keras_ext
    best = tmp_path / "inbreast_best.h5"
    w = world / "ddsm" / "whole_img"
    run_script("train_image_clf_inbreast.sh", world,
               {"TRAIN_DIR": w / "train", "VAL_DIR": w / "val", "TEST_DIR": w / "test",
                "RESUME_FROM": image_model[0], "BEST_MODEL": best},
               [("--img-size 1152 896", "--img-size 64 48"),
                ("--all-layer-epochs 50", "--all-layer-epochs 2")], tmp_path)
    assert dm_keras_ext.robust_load_model(best).output_shape == (None, 2)


def _check_2017_heatmaps(path, world, split, nb_class=3):
    """Read as 2017 downstream code did (plain pickle.load) and check the 2017 structure."""
    with open(path, "rb") as f:
        recs = pickle.load(f)
    pats = set((world / f"patient_{split}.txt").read_text().split())
    assert isinstance(recs, list) and {r["patient_id"] for r in recs} == pats
    shapes = set()
    for rec in recs:
        assert list(rec) == ["patient_id", "side", "cancer", "cc", "mlo"]
        assert rec["side"] in ("LEFT", "RIGHT") and rec["cancer"] in (0, 1)
        for view in ("cc", "mlo"):
            hm = rec[view]
            assert isinstance(hm, np.ndarray) and hm.dtype == np.float32
            assert hm.ndim == 3 and hm.shape[-1] == nb_class
            np.testing.assert_allclose(hm.sum(-1), 1, atol=1e-4)
            shapes.add(hm.shape)
    return shapes


def _heatmap_vars(world, model, out_dir):
    d = world / "ddsm"
    return {"PAT_CSV": d / "pat_side_cancer.csv", "PAT_LIST_PREFIX": f"{world}/patient_",
            "IMG_FOLDER": d / "full_img", "DL_STATE": model, "OUT_DIR": out_dir}


@pytest.mark.slow
def test_fprop_heatmap_script_runs(world, patch_model, tmp_path):
    out_dir = tmp_path / "out"
    run_script("fprop_heatmap_all.sh", world, _heatmap_vars(world, patch_model, out_dir),
               [("--img-size 1152 896", "--img-size 128 96"),
                ("--avg-pool-size 7 7", "--avg-pool-size 2 2"),
                ("--net resnet50", "--net vgg16")], tmp_path)
    for split in ("train", "val", "test"):
        # VGG16 feature map 128/32 x 96/32 = 4 x 3, 2x2 average pool at stride 1 -> 3 x 2
        assert _check_2017_heatmaps(out_dir / f"phm_s1x1_{split}.pkl", world, split) == \
            {(3, 2, 3)}


@pytest.mark.slow
def test_score_heatmap_script_runs(world, patch_model, tmp_path):
    out_dir = tmp_path / "out"
    run_script("score_heatmap_all.sh", world, _heatmap_vars(world, patch_model, out_dir),
               [("--img-height 4096", "--img-height 128"),
                ("--patch-size 256", f"--patch-size {PATCH_HW}"),
                ("for stride in 128", "for stride in 16"),
                ("--net resnet50", "--net vgg16")], tmp_path)
    for split in ("train", "val", "test"):
        shapes = _check_2017_heatmaps(out_dir / f"phm_s16_{split}.pkl", world, split)
        assert all(r > 1 and c > 1 for r, c, _ in shapes)
