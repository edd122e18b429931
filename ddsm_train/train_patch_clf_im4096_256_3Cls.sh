#!/usr/bin/env bash
# Train a 3-class (background / malignant / benign) ResNet50 patch classifier on 256x256
# patches sampled from 4096-pixel-high CBIS-DDSM images (sample_patches_combined.py output with
# the lesion folders merged into malignant and benign). Three stages: final dense layer, top
# layers, all layers. ImageNet weights are read from the local Keras cache (never downloaded):
# put resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 in ~/.keras/models/ first.
# Run from this folder with the root modules importable:
#   export PYTHONPATH=$PYTHONPATH:/path/to/end2end-all-conv
set -euo pipefail

TRAIN_DIR="CBIS-DDSM/Combined_patches_im4096_256/train"
VAL_DIR="CBIS-DDSM/Combined_patches_im4096_256/val"
TEST_DIR="CBIS-DDSM/Combined_patches_im4096_256/test"
BEST_MODEL="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5"
FINAL_MODEL="NOSAVE"
export NUM_CPU_CORES=${NUM_CPU_CORES:-4}
export NUM_GPU_DEVICES=${NUM_GPU_DEVICES:-1}

python patch_clf_train.py \
    --img-size 256 256 \
    --no-img-scale \
    --rescale-factor 0.003891 \
    --featurewise-center \
    --featurewise-mean 59.6 \
    --no-equalize-hist \
    --batch-size 64 \
    --train-bs-multiplier 0.5 \
    --augmentation \
    --class-list background malignant benign \
    --nb-epoch 3 \
    --top-layer-epochs 10 \
    --all-layer-epochs 37 \
    --no-load-val-ram \
    --no-load-train-ram \
    --net resnet50 \
    --use-pretrained \
    --no-top-layer-nb \
    --optimizer sgd \
    --weight-decay 0.0001 \
    --weight-decay2 0.0001 \
    --hidden-dropout 0.0 \
    --hidden-dropout2 0.0 \
    --init-learningrate 0.01 \
    --top-layer-multiplier 0.1 \
    --all-layer-multiplier 0.01 \
    --lr-patience 2 \
    --es-patience 10 \
    --no-auto-batch-balance \
    --pos-cls-weight 1.0 \
    --neg-cls-weight 1.0 \
    --best-model $BEST_MODEL \
    --final-model $FINAL_MODEL \
    $TRAIN_DIR $VAL_DIR $TEST_DIR
