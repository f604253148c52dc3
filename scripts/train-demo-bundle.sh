#!/usr/bin/env bash
# Train the demo bundle from synthetic phantoms, on CPU, and export it to inference/bundles/demo/.
#
#   scripts/train-demo-bundle.sh            # WORK=/tmp/gvr-demo-train by default
#
# Seeds: unlabelled 0-9999 (generator, encoder), labelled 100000-101999 (classifier),
# held-out 200000-200999 (evaluation only, never seen in training). Phantoms are
# rendered at 256 px and go through the shared preprocessing down to 64 x 64.
# Trained on synthetic phantoms; not for clinical use.
#
# The generator stage runs with --resume: every random draw is seeded by (seed, step), so a
# run interrupted (or stopped at fewer steps) and started again ends where an uninterrupted
# run would. Delete $WORK/encoder whenever the generator changes.
set -euo pipefail
cd "$(dirname "$0")/.."

GVR="${GVR:-.venv/bin/python -m node.cli.main}"
WORK="${WORK:-/tmp/gvr-demo-train}"
BUNDLE="${BUNDLE:-inference/bundles/demo}"
VERSION="${VERSION:-1.0.0}"
UNLABELLED="phantoms:0-9999@256"
LABELLED="phantoms:100000-101999@256"
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

stage generator $GVR train generator --data "$UNLABELLED" --out "$WORK/generator" --cache "$WORK/cache" \
  --workers 2 --resolution 64 --latent 100 --channels 16 --steps 3000 --batch 32 --lr 1e-4 \
  --beta1 0.5 --beta2 0.9 --critic-steps 2 --gp 10 --seed 0 --threads 1 --resume
stage encoder $GVR train encoder --generator "$WORK/generator" --data "$UNLABELLED" --out "$WORK/encoder" \
  --cache "$WORK/cache" --steps 2000 --batch 32 --lr 2e-4 --channels 32 --image-weight 5 --seed 0 --threads 1
stage classifier $GVR train classifier --labels "$LABELLED" --encoder "$WORK/encoder" \
  --generator "$WORK/generator" --out "$WORK/classifier" --threshold 100 --overfit --workers 2 --seed 0 --threads 1
stage export $GVR export --generator "$WORK/generator" --encoder "$WORK/encoder" \
  --classifier "$WORK/classifier" --out "$WORK/bundle" --name demo --version "$VERSION"
stage evaluate $GVR evaluate --bundle "$WORK/bundle" --labels "$HELD_OUT" --out "$WORK/evaluation" --workers 2 --threads 1
rm -rf "$BUNDLE"
stage final-export $GVR export --generator "$WORK/generator" --encoder "$WORK/encoder" \
  --classifier "$WORK/classifier" --evaluation "$WORK/evaluation/report.json" --out "$BUNDLE" \
  --name demo --version "$VERSION"
cp "$WORK/evaluation/reconstructions.png" docs/reconstructions.png
cp "$WORK/evaluation/calibration.png" "$WORK/generator/losses.png" "$WORK/generator/samples.png" "$BUNDLE/" 2>/dev/null || true
cp "$WORK/evaluation/report.json" "$BUNDLE/evaluation.json"
# A second held-out check through the inference path itself: DICOM files (MONOCHROME1, windowed,
# 512 px) written by the phantom module, read back through inference.preprocess.
stage dicom-phantoms .venv/bin/python -c "from pathlib import Path; from training.phantoms import write_phantoms; \
write_phantoms(500, 300000, Path('$WORK/dicom-held-out'), fmt='dicom', size=512)"
stage evaluate-dicom $GVR evaluate --bundle "$BUNDLE" --labels "$WORK/dicom-held-out/labels.csv" \
  --out "$WORK/evaluation-dicom" --threads 1
cp "$WORK/evaluation-dicom/report.json" "$BUNDLE/evaluation-dicom.json"
echo "total $(awk '{s += $2} END {print s}' "$TIMINGS")" | tee -a "$TIMINGS"
