#!/usr/bin/env bash
# The 2017 command that swept the 3-class ResNet50 patch classifier over every CBIS-DDSM
# mammogram of the train, val and test patients: images resized to 4096 rows, 256x256 patches
# every 128 pixels (each patch scaled to a max of 255), one heatmap of class probabilities per
# view.
# Writes one 2017 pickle per set and stride (a list of {patient_id, side, cancer, cc, mlo}
# dicts); name OUT with .npz instead for a pickle-free file (read back with
# heatmap_score.load_heatmaps). The command is the 2017 script's, flag for flag.
# Run from this folder with the root modules importable:
#   export PYTHONPATH=$PYTHONPATH:/path/to/end2end-all-conv
# PYTHON names the interpreter. Nothing is created before heatmap_score.py has checked its
# inputs: it makes the folder of --out when it writes the heatmaps.
set -euo pipefail

PAT_CSV="CBIS-DDSM/Combined_full_ROI/pat_side_cancer.csv"
PAT_LIST_PREFIX="CBIS-DDSM/Combined_full_ROI/patient_"   # + train.txt, val.txt, test.txt
IMG_FOLDER="CBIS-DDSM/Combined_full_ROI/full_img_png"
DL_STATE="CBIS-DDSM/Combined_patches_im4096_256/3cls_best_model_resnet50.h5"
OUT_DIR="CBIS-DDSM/Combined_patches_im4096_256/3cls_model_out"

echo -n "Start: " && date
echo

for stride in 128; do
    echo ">>>> Stride=${stride} <<<<"
    for set in train val test; do
        PAT_LST="${PAT_LIST_PREFIX}${set}.txt"
        OUT="$OUT_DIR/phm_s${stride}_${set}.pkl"
        "${PYTHON:-python}" heatmap_score.py \
            --img-height 4096 \
            --img-scale 255.0 \
            --no-equalize-hist \
            --featurewise-center \
            --featurewise-mean 59.6 \
            --net resnet50 \
            --batch-size 64 \
            --patch-size 256 \
            --stride ${stride} \
            --pat-csv $PAT_CSV \
            --pat-list $PAT_LST \
            --out $OUT \
            $IMG_FOLDER $DL_STATE
    done
    echo ">>>> Done <<<<"
done

echo
echo -n "End: " && date
