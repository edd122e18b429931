#!/usr/bin/env bash
# The 2017 command that converted a ResNet50 patch classifier into a 1152x896 whole-image
# classifier (two residual top blocks [512-512-2048]x3) and trained it on CBIS-DDSM whole images
# in two stages: the new top layers with the patch net frozen, then all layers.
# --kept-layer-idx -5 cuts the patch net at the final ReLU of its last residual block (2048
# channels), for a 2017 Keras file and for a patch net trained by patch_clf_train.py alike.
# The command is the 2017 script's, flag for flag. The paper's best whole-image models used
# other top blocks ([512-512-1024]x2, see train_image_clf_inbreast.sh) and longer training.
# Run from this folder with the root modules importable:
#   export PYTHONPATH=$PYTHONPATH:/path/to/end2end-all-conv
# NUM_GPU_DEVICES=2 trains data-parallel on two GPUs; PYTHON names the interpreter.

set -euo pipefail

TRAIN_DIR="CBIS-DDSM/Combined_full_images/full_train_1152x896"
VAL_DIR="CBIS-DDSM/Combined_full_images/full_val_1152x896"
TEST_DIR="CBIS-DDSM/Combined_full_images/full_test_1152x896"
PATCH_STATE="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5"
BEST_MODEL="CBIS-DDSM/Combined_full_images/resnet_1152x896_prt_addtop1.h5"
FINAL_MODEL="NOSAVE"

export NUM_CPU_CORES=4

# 255/65535 = 0.003891 brings 16-bit PNG intensities to 0..255.
"${PYTHON:-python}" image_clf_train.py \
    --patch-model-state $PATCH_STATE \
    --no-resume-from \
    --img-size 1152 896 \
    --no-img-scale \
    --rescale-factor 0.003891 \
    --featurewise-center \
    --featurewise-mean 52.18 \
    --no-equalize-hist \
    --top-depths 512 512 \
    --top-repetitions 3 3 \
    --kept-layer-idx -5 \
    --batch-size 20 \
    --train-bs-multiplier 0.5 \
    --augmentation \
    --class-list neg pos \
    --nb-epoch 1 \
    --all-layer-epochs 2 \
    --no-load-val-ram \
    --no-load-train-ram \
    --optimizer adam \
    --weight-decay 0.0001 \
    --weight-decay2 0.0001 \
    --bias-multiplier 0.1 \
    --hidden-dropout 0.0 \
    --hidden-dropout2 0.0 \
    --init-learningrate 0.001 \
    --all-layer-multiplier 0.1 \
    --lr-patience 2 \
    --es-patience 10 \
    --auto-batch-balance \
    --pos-cls-weight 1.0 \
    --neg-cls-weight 1.0 \
    --best-model $BEST_MODEL \
    --final-model $FINAL_MODEL \
    $TRAIN_DIR $VAL_DIR $TEST_DIR
