#!/usr/bin/env bash
# Convert a patch classifier into a 1152x896 whole-image classifier and train it on CBIS-DDSM
# whole images (two stages: new top layers with the patch net frozen, then all layers).
# Example of the 2017 settings: ResNet50 patch net + two residual top blocks [512-512-1024]x2.
# Run from this folder with the root modules importable:
#   export PYTHONPATH=$PYTHONPATH:/path/to/end2end-all-conv
# NUM_GPU_DEVICES=2 trains data-parallel on two GPUs (global batch split across them).
set -euo pipefail

TRAIN_DIR="CBIS-DDSM/Combined_full_images/train"
VAL_DIR="CBIS-DDSM/Combined_full_images/val"
TEST_DIR="CBIS-DDSM/Combined_full_images/test"
PATCH_STATE="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5"
BEST_MODEL="CBIS-DDSM/Combined_full_images/image_clf_resnet50_best.h5"
FINAL_MODEL="NOSAVE"
export NUM_CPU_CORES=${NUM_CPU_CORES:-4}
export NUM_GPU_DEVICES=${NUM_GPU_DEVICES:-1}

# The 2017 script also passed --kept-layer-idx -5 (the final ReLU of a Keras 2.0.8 ResNet50
# patch file); the cut point is now found by role, so it is left out. Add it back only for a
# 2017 patch file whose layer list needs it. --bias-multiplier 0.1 trains biases at 1/10 the lr.
python image_clf_train.py \
    --patch-model-state $PATCH_STATE \
    --no-resume-from \
    --img-size 1152 896 \
    --no-img-scale \
    --rescale-factor 0.003891 \
    --featurewise-center \
    --featurewise-mean 52.16 \
    --no-equalize-hist \
    --patch-net resnet50 \
    --block-type resnet \
    --top-depths 512 512 \
    --top-repetitions 2 2 \
    --bottleneck-enlarge-factor 2 \
    --no-add-heatmap \
    --avg-pool-size 7 7 \
    --add-conv \
    --no-add-shortcut \
    --hm-strides 1 1 \
    --hm-pool-size 5 5 \
    --fc-init-units 64 \
    --fc-layers 2 \
    --batch-size 4 \
    --train-bs-multiplier 0.5 \
    --augmentation \
    --class-list neg pos \
    --nb-epoch 0 \
    --all-layer-epochs 50 \
    --no-load-val-ram \
    --no-load-train-ram \
    --optimizer adam \
    --weight-decay 0.001 \
    --hidden-dropout 0.0 \
    --weight-decay2 0.01 \
    --hidden-dropout2 0.0 \
    --init-learningrate 0.0001 \
    --all-layer-multiplier 0.01 \
    --lr-patience 2 \
    --es-patience 10 \
    --auto-batch-balance \
    --bias-multiplier 0.1 \
    --best-model $BEST_MODEL \
    --final-model $FINAL_MODEL \
    $TRAIN_DIR $VAL_DIR $TEST_DIR
