#!/usr/bin/env bash
# The 2017 command that trained the 3-class (background / malignant / benign) ResNet50 patch
# classifier on 256x256 patches sampled from CBIS-DDSM images resized to 4096 rows
# (sample_patches_combined.py output with the lesion folders merged into malignant and benign).
# Three stages: final dense layer, layers from the stage-2 role up, all layers. ImageNet
# weights are read from the local Keras cache (never downloaded): put
# resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/ first.
# The command is the 2017 script's, flag for flag. The paper's patch classifiers were trained
# longer (3 + 10 + 37 epochs over the three stages); change the epoch flags for that.
# Run from this folder with the root modules importable:
#   export PYTHONPATH=$PYTHONPATH:/path/to/end2end-all-conv
# NUM_GPU_DEVICES=2 trains data-parallel on two GPUs; PYTHON names the interpreter.

set -euo pipefail

TRAIN_DIR="CBIS-DDSM/Combined_patches_im4096_256/train"
VAL_DIR="CBIS-DDSM/Combined_patches_im4096_256/val"
TEST_DIR="CBIS-DDSM/Combined_patches_im4096_256/test"
BEST_MODEL="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5"
FINAL_MODEL="NOSAVE"

export NUM_CPU_CORES=3

"${PYTHON:-python}" patch_clf_train.py \
    --img-size 256 256 \
    --img-scale 255.0 \
    --featurewise-center \
    --featurewise-mean 59.6 \
    --equalize-hist \
    --batch-size 64 \
    --train-bs-multiplier 0.5 \
    --augmentation \
    --class-list background malignant benign \
    --nb-epoch 1 \
    --top-layer-epochs 5 \
    --all-layer-epochs 15 \
    --no-load-val-ram \
    --no-load-train-ram \
    --net resnet50 \
    --optimizer nadam \
    --use-pretrained \
    --no-top-layer-nb \
    --nb-init-filter 64 \
    --init-filter-size 7 \
    --init-conv-stride 2 \
    --max-pooling-size 3 \
    --max-pooling-stride 2 \
    --weight-decay 0.01 \
    --weight-decay2 0.0001 \
    --bias-multiplier 0.1 \
    --alpha 0.0001 \
    --l1-ratio 0.0 \
    --inp-dropout 0.0 \
    --hidden-dropout 0.5 \
    --hidden-dropout2 0.0 \
    --init-learningrate 0.01 \
    --top-layer-multiplier 0.01 \
    --all-layer-multiplier 0.0001 \
    --lr-patience 2 \
    --es-patience 5 \
    --no-resume-from \
    --auto-batch-balance \
    --pos-cls-weight 1.0 \
    --neg-cls-weight 1.0 \
    --best-model $BEST_MODEL \
    --final-model $FINAL_MODEL \
    $TRAIN_DIR $VAL_DIR $TEST_DIR
