#!/usr/bin/env bash
# How the shipped default model (lib/cxr/assets/models/default) was made: mobilenet_v2 fine-tuned from
# ImageNet weights on the COVID-Xray-5k training split, with the train job, on the central lung box only
# (--crop lung: side markers and text at the borders identified the source, see MODEL_CARD.md), 128 px, the
# threshold chosen on the pooled out-of-fold scores of 5 patient-grouped folds (5 trainings; 22.5 min on 2 CPUs for v3). Needs the
# data set at $DATA (default ../shared/data/covid-xray-5k, laid out train/{covid,non}). Extra arguments go to the train job, e.g.
# `--seeds 3` for a 3-seed ensemble (3x the time; docs/experiments.md says what it gained).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/covid-xray-5k}
OUT=${OUT:-runs/default-mobilenet_v2}
bash scripts/setup.sh
# COVID images cut from one case report share a source URL: keep each case on one side of the split.
.venv/bin/python - "$DATA/SOURCE/covid_images_ieee8023_metadata.tsv" > /tmp/cxr-groups.csv <<'PY'
import csv, sys
out = csv.writer(sys.stdout)
out.writerow(["file", "group"])
for r in csv.DictReader(open(sys.argv[1], newline=""), delimiter="\t"):
    out.writerow([r["filename"], r["url"] or r["filename"]])
PY
.venv/bin/python jobs/train.py --data "$DATA" --output "$OUT" --backbone mobilenet_v2 --weights imagenet \
  --epochs "${EPOCHS:-6}" --lr 3e-4 --batch-size 32 --image-size 128 --crop lung --oversample 5 --target-sensitivity 0.98 \
  --threshold-folds 5 \
  --groups /tmp/cxr-groups.csv "$@"
