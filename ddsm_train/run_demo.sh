#!/usr/bin/env bash
# The whole method on built-in synthetic data, end to end, on a CPU in minutes (`make demo`).
#
# Runs the real command-line tools in order, as a user would:
#   1. make_synthetic_ddsm.py      seeded CBIS-DDSM-style data set (full images, ROI masks, CSVs,
#                                  whole_img/{train,val,test}/{neg,pos})
#   2. sample_patches_combined.py  3-class patches (background/malignant/benign) from the train
#                                  patients (train/val split by patient) and from the test patients
#   3. patch_clf_train.py          patch classifier (small single-channel ResNet, dm_resnet14)
#   4. image_clf_train.py          patch net -> whole-image net, 2 stages (new top; all layers)
#   5. image_clf_predict.py        held-out test patients, without and with flip augmentation:
#                                  predictions CSV, AUROC/AUPRC with 95% bootstrap CI, ROC/PR PNGs
#   6. heatmap_score.py            heatmap overlay PNGs of one positive test patient
#   7. evaluate.py                 validation patients scored too; operating points chosen on
#                                  them and applied to the test scores, calibration, levels
#   8. demo_summary.py             summary.json and the printed summary
#
# Usage: bash ddsm_train/run_demo.sh [OUT_DIR]     (default: demo_out/run_YYYYmmdd_HHMMSS)
# Sizes come from DEMO_* environment variables (defaults below); the seed from RANDOM_SEED.
# Scale: patches are cut from full images resized to DEMO_IMG_HEIGHT rows, and whole images are
# DEMO_IMG_HEIGHT x DEMO_IMG_WIDTH, so the converted patch net sees lesions at the pixel size it
# learned them at.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi

OUT="${1:-demo_out/run_$(date +%Y%m%d_%H%M%S)}"
if [[ -e "$OUT" && -n "$(ls -A "$OUT" 2>/dev/null)" ]]; then
    echo "run_demo.sh: output folder $OUT exists and is not empty; name a new one" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

export RANDOM_SEED="${RANDOM_SEED:-12345}"
export NUM_CPU_CORES="${NUM_CPU_CORES:-2}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

PATIENTS="${DEMO_PATIENTS:-160}"              # 4 images each; 25 % test, 20 % of the rest val
FULL_H="${DEMO_FULL_HEIGHT:-576}"             # full mammogram size
FULL_W="${DEMO_FULL_WIDTH:-448}"
IMG_H="${DEMO_IMG_HEIGHT:-288}"               # whole-image size = patch sampling scale
IMG_W="${DEMO_IMG_WIDTH:-224}"
CONTRAST="${DEMO_LESION_CONTRAST:-2.0}"
PATCH="${DEMO_PATCH_SIZE:-64}"
NB_BKG="${DEMO_NB_BKG:-15}"                   # per view, the NB_HNS hard negatives included
NB_ABN="${DEMO_NB_ABN:-20}"
NB_HNS="${DEMO_NB_HNS:-5}"
NB_FILTER="${DEMO_NB_INIT_FILTER:-16}"
PATCH_EPOCHS="${DEMO_PATCH_EPOCHS:-6}"
TOP_EPOCHS="${DEMO_TOP_EPOCHS:-2}"
ALL_EPOCHS="${DEMO_ALL_EPOCHS:-8}"
IMAGE_AUG="${DEMO_IMAGE_AUGMENTATION:-1}"     # 1: --augmentation for the whole-image net
IMAGE_LR="${DEMO_IMAGE_LR:-0.001}"
ALL_MULT="${DEMO_ALL_LAYER_MULTIPLIER:-0.1}"
BOOTSTRAP="${DEMO_BOOTSTRAP:-2000}"
MEAN="${DEMO_FEATUREWISE_MEAN:-45}"           # mean of the synthetic whole images, 0..255 scale
RESCALE=0.003891                              # 16-bit PNG -> 0..255

DATA="$OUT/data"; PATCHES="$OUT/patches"; MODELS="$OUT/models"; LOGS="$OUT/logs"
mkdir -p "$MODELS" "$LOGS"
TIMES="$LOGS/stage_seconds.tsv"; : > "$TIMES"

# stage NAME CMD...: run CMD, log its output to logs/NAME.log (and the terminal), time it.
stage() {
    local name="$1"; shift
    echo "==> [$name] $*"
    local t0="$EPOCHREALTIME"
    "$@" 2>&1 | tee "$LOGS/$name.log"
    awk -v n="$name" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%s\t%.1f\n", n, b - a}' \
        >> "$TIMES"
}

SAMPLE_FLAGS=(--target-height "$IMG_H" --patch-size "$PATCH" --nb-hns "$NB_HNS"
              --bkg-dir background --calc-pos-dir malignant --mass-pos-dir malignant
              --calc-neg-dir benign --mass-neg-dir benign
              --workers "$NUM_CPU_CORES" --seed "$RANDOM_SEED" --no-verbose)
SCALE_FLAGS=(--rescale-factor "$RESCALE" --featurewise-mean "$MEAN")

stage 1_synthetic_data "$PY" "$HERE/make_synthetic_ddsm.py" "$DATA" \
    --nb-patients "$PATIENTS" --img-height "$FULL_H" --img-width "$FULL_W" \
    --whole-img-size "$IMG_H" "$IMG_W" --lesion-contrast "$CONTRAST" --seed "$RANDOM_SEED" \
    --workers "$NUM_CPU_CORES"

# Train/val patches from the train patients (val split by patient), test patches from the
# held-out test patients (--val-size 0: everything goes to the first folder).
sample_patches() {
    local cmd=("$PY" "$HERE/sample_patches_combined.py" "$DATA/roi_mask_path.csv" "$DATA/roi_mask")
    echo "    ${cmd[*]} $DATA/train_pat.txt $DATA/full_img $PATCHES/train $PATCHES/val ..."
    "${cmd[@]}" "$DATA/train_pat.txt" "$DATA/full_img" "$PATCHES/train" "$PATCHES/val" \
        --nb-bkg "$NB_BKG" --nb-abn "$NB_ABN" "${SAMPLE_FLAGS[@]}"
    echo "    ${cmd[*]} $DATA/test_pat.txt $DATA/full_img $PATCHES/test ... --val-size 0"
    "${cmd[@]}" "$DATA/test_pat.txt" "$DATA/full_img" "$PATCHES/test" "$PATCHES/test_unused" \
        --val-size 0 --nb-bkg $(( NB_HNS + NB_TEST )) --nb-abn "$NB_TEST" "${SAMPLE_FLAGS[@]}"
}
NB_TEST=$(( (NB_BKG - NB_HNS + 1) / 2 ))   # test: abnormal per ROI, random background per view
stage 2_sample_patches sample_patches
rm -rf "$PATCHES/test_unused"

stage 3_patch_train "$PY" "$HERE/patch_clf_train.py" \
    "$PATCHES/train" "$PATCHES/val" "$PATCHES/test" \
    --img-size "$PATCH" "$PATCH" "${SCALE_FLAGS[@]}" --no-equalize-hist \
    --class-list background malignant benign --batch-size 64 --train-bs-multiplier 0.5 \
    --augmentation --load-train-ram --load-val-ram \
    --net dm_resnet14 --no-use-pretrained --nb-init-filter "$NB_FILTER" --init-filter-size 5 \
    --init-conv-stride 2 --nb-epoch "$PATCH_EPOCHS" --optimizer adam --init-learningrate 0.001 \
    --best-model "$MODELS/patch_clf.h5"

stage 4_image_train "$PY" "$HERE/image_clf_train.py" \
    "$DATA/whole_img/train" "$DATA/whole_img/val" "$DATA/whole_img/test" \
    --patch-model-state "$MODELS/patch_clf.h5" --patch-net dm_resnet14 \
    --img-size "$IMG_H" "$IMG_W" "${SCALE_FLAGS[@]}" --batch-size 32 --train-bs-multiplier 0.5 \
    --block-type resnet --top-depths 64 --top-repetitions 1 --bottleneck-enlarge-factor 2 \
    --nb-epoch "$TOP_EPOCHS" --all-layer-epochs "$ALL_EPOCHS" --optimizer adam \
    --init-learningrate "$IMAGE_LR" --all-layer-multiplier "$ALL_MULT" \
    "$( (( IMAGE_AUG )) && echo --augmentation || echo --no-augmentation)" \
    --load-train-ram --load-val-ram --best-model "$MODELS/image_clf.h5"

PRED_FLAGS=(--model "$MODELS/image_clf.h5" --img-dir "$DATA/whole_img/test"
            --img-size "$IMG_H" "$IMG_W" "${SCALE_FLAGS[@]}" --bootstrap "$BOOTSTRAP"
            --seed "$RANDOM_SEED")
stage 5_predict "$PY" "$HERE/image_clf_predict.py" "${PRED_FLAGS[@]}" \
    --out-dir "$OUT/predictions/no_flips"
stage 6_predict_flips "$PY" "$HERE/image_clf_predict.py" "${PRED_FLAGS[@]}" --test-augment \
    --out-dir "$OUT/predictions/flips"

# One positive test breast: the first (patient, side) of the test patients with cancer 1.
HM="$OUT/heatmaps"; mkdir -p "$HM"
HM_POOL=$(( PATCH / 32 > 1 ? PATCH / 32 : 1 ))   # the patch net's feature map is PATCH/32 wide
"$PY" - "$DATA" "$HM" <<'EOF'
import csv, sys
data, out = sys.argv[1], sys.argv[2]
test = {line.strip() for line in open(f"{data}/test_pat.txt") if line.strip()}
rows = [r for r in csv.DictReader(open(f"{data}/pat_side_cancer.csv"))
        if r["patient_id"] in test and r["cancer"].strip() == "1"]
if not rows:
    sys.exit("run_demo.sh: no positive test breast in the synthetic data; use more patients")
with open(f"{out}/positive_breast.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["patient_id", "side", "cancer"])
    w.writeheader()
    w.writerow({k: rows[0][k] for k in ("patient_id", "side", "cancer")})
EOF
stage 7_heatmap "$PY" "$HERE/heatmap_score.py" "$DATA/full_img" "$MODELS/patch_clf.h5" \
    --pat-csv "$HM/positive_breast.csv" --fprop-mode --net dm_resnet14 \
    --img-size "$IMG_H" "$IMG_W" --no-img-scale "${SCALE_FLAGS[@]}" --featurewise-center \
    --avg-pool-size "$HM_POOL" "$HM_POOL" --malignant-class 1 --out "$HM/prob_heatmap.npz" \
    --png-dir "$HM"

# Operating point chosen on the validation patients, applied unchanged to the test patients.
# (the second --img-dir replaces the test folder of PRED_FLAGS)
stage 8_predict_val "$PY" "$HERE/image_clf_predict.py" "${PRED_FLAGS[@]}" \
    --img-dir "$DATA/whole_img/val" --test-augment --out-dir "$OUT/predictions/val_flips"
stage 9_evaluate "$PY" "$HERE/evaluate.py" \
    --predictions "$OUT/predictions/flips/image_predictions.csv" \
    --val-predictions "$OUT/predictions/val_flips/image_predictions.csv" \
    --bootstrap "$BOOTSTRAP" --seed "$RANDOM_SEED" --out-dir "$OUT/evaluation"

"$PY" "$HERE/demo_summary.py" "$OUT"
