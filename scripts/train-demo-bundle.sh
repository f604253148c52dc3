#!/usr/bin/env bash
# Train the demo bundle from synthetic phantoms, on CPU, and export it to inference/bundles/demo/.
#
#   scripts/train-demo-bundle.sh            # WORK=/tmp/gvr-demo-train by default
#
# Seeds: unlabelled 0-9999 (generator + encoder, trained together as an autoencoder), labelled
# 100000-103999 (classifier), validation 150000-150199 (the overlay's colour scale), held-out
# 200000-200999 (evaluation only, never seen in training). Phantoms (v2) are rendered at 256 px and
# go through the shared preprocessing down to 128 x 128.
# Trained on synthetic phantoms; not for clinical use.
#
#   DEVICE=cuda scripts/train-demo-bundle.sh   # same recipe on a GPU (the committed bundle is the CPU run)
#
# The autoencoder stage runs with --resume: every random draw is seeded by (seed, step) and the
# learning rate is a function of the step, so a run interrupted and started again ends where an
# uninterrupted run would.
set -euo pipefail
cd "$(dirname "$0")/.."

GVR="${GVR:-.venv/bin/python -m node.cli.main}"
WORK="${WORK:-/tmp/gvr-demo-train}"
BUNDLE="${BUNDLE:-inference/bundles/demo}"
VERSION="${VERSION:-2.2.0}"
DEVICE="${DEVICE:-cpu}"
THREADS="${THREADS:-2}"
AE_STEPS="${AE_STEPS:-2000}"
UNLABELLED="phantoms:0-9999@256"
LABELLED="phantoms:100000-103999@256"
VALIDATION="phantoms:150000-150199@256"
HELD_OUT="phantoms:200000-200999@256"
mkdir -p "$WORK"
TIMINGS="$WORK/timings.txt"
: > "$TIMINGS"

stage() {  # stage NAME COMMAND...: run, and append its wall time to $TIMINGS
  local name="$1"; shift
  local start; start=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - start ))" | tee -a "$TIMINGS"
}

stage autoencoder $GVR train autoencoder --data "$UNLABELLED" --out "$WORK/autoencoder" --cache "$WORK/cache" \
  --workers 2 --resolution 128 --latent 128 --channels 16 --steps "$AE_STEPS" --batch 32 --lr 1e-3 \
  --final-lr 1e-4 --ssim-weight 0.5 --latent-noise 0.1 --prior-weight 1e-3 --seed 0 --threads "$THREADS" \
  --device "$DEVICE" --resume
stage classifier $GVR train classifier --labels "$LABELLED" --encoder "$WORK/autoencoder/encoder" \
  --generator "$WORK/autoencoder/generator" --out "$WORK/classifier" --threshold 100 --overfit --workers 2 \
  --kinds mlp --hidden 128 --latent-noise 1.0 --twins --alignment-weight 1.0 --seed 0 --threads "$THREADS" --device "$DEVICE"
stage export $GVR export --generator "$WORK/autoencoder/generator" --encoder "$WORK/autoencoder/encoder" \
  --classifier "$WORK/classifier" --out "$WORK/bundle" --name demo --version "$VERSION"
stage evaluate $GVR evaluate --bundle "$WORK/bundle" --labels "$HELD_OUT" --out "$WORK/evaluation" --workers 2 \
  --threads "$THREADS" --baseline-labels "$LABELLED" --colour-scale-from "$VALIDATION"
rm -rf "$BUNDLE"
stage final-export $GVR export --generator "$WORK/autoencoder/generator" --encoder "$WORK/autoencoder/encoder" \
  --classifier "$WORK/classifier" --evaluation "$WORK/evaluation/report.json" --out "$BUNDLE" \
  --name demo --version "$VERSION"
cp "$WORK/evaluation/reconstructions.png" docs/reconstructions.png
cp "$WORK/evaluation/calibration.png" "$WORK/autoencoder/losses.png" "$WORK/autoencoder/generator/samples.png" \
  "$BUNDLE/" 2>/dev/null || true
cp "$WORK/evaluation/report.json" "$BUNDLE/evaluation.json"
# A second held-out check through the inference path itself: DICOM files (MONOCHROME1, windowed,
# 512 px) written by the phantom module, read back through inference.preprocess.
stage dicom-phantoms .venv/bin/python -c "from pathlib import Path; from training.phantoms import write_phantoms; \
write_phantoms(500, 300000, Path('$WORK/dicom-held-out'), fmt='dicom', size=512)"
stage evaluate-dicom $GVR evaluate --bundle "$BUNDLE" --labels "$WORK/dicom-held-out/labels.csv" \
  --out "$WORK/evaluation-dicom" --threads "$THREADS"
cp "$WORK/evaluation-dicom/report.json" "$BUNDLE/evaluation-dicom.json"
echo "total $(awk '{s += $2} END {print s}' "$TIMINGS")" | tee -a "$TIMINGS"
