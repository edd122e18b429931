#!/usr/bin/env bash
# The 2017 command that computed patch-class heatmaps of every CBIS-DDSM mammogram of the train,
# val and test patients in one fully convolutional pass (--fprop-mode): each image resized to
# 1152x896, the ResNet50 patch classifier cut at its last feature map, a 7x7 average pool at
# stride 1 and the patch classifier's dense layer applied at every location.
# Writes one 2017 pickle per set (a list of {patient_id, side, cancer, cc, mlo} dicts); name
# OUT with .npz instead for a pickle-free file (read back with heatmap_score.load_heatmaps).
# The command is the 2017 script's, flag for flag.
# Run from this folder with the root modules importable:
#   export PYTHONPATH=$PYTHONPATH:/path/to/end2end-all-conv
# PYTHON names the interpreter. Nothing is created before heatmap_score.py has checked its
# inputs: it makes the folder of --out when it writes the heatmaps.
set -euo pipefail

PAT_CSV="CBIS-DDSM/Combined_full_ROI/pat_side_cancer.csv"
PAT_LIST_PREFIX="CBIS-DDSM/Combined_full_ROI/patient_"   # + train.txt, val.txt, test.txt
IMG_FOLDER="CBIS-DDSM/Combined_full_ROI/full_img_png"
DL_STATE="CBIS-DDSM/Combined_patches_im1152_224_s10/resnet_prt_best1.h5"
OUT_DIR="CBIS-DDSM/Combined_patches_im1152_224_s10/resnet_prt_best1_out"

echo -n "Start: " && date
echo

for set in train val test; do
    PAT_LST="${PAT_LIST_PREFIX}${set}.txt"
    OUT="$OUT_DIR/phm_s1x1_${set}.pkl"
    "${PYTHON:-python}" heatmap_score.py \
        --fprop-mode \
        --img-size 1152 896 \
        --no-img-height \
        --no-img-scale \
        --rescale-factor 0.003891 \
        --no-equalize-hist \
        --featurewise-center \
        --featurewise-mean 52.18 \
        --avg-pool-size 7 7 \
        --hm-strides 1 1 \
        --net resnet50 \
        --pat-csv $PAT_CSV \
        --pat-list $PAT_LST \
        --out $OUT \
        $IMG_FOLDER $DL_STATE
done

echo
echo -n "End: " && date
