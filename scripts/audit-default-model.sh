#!/usr/bin/env bash
# Shortcut audit of the shipped default model on the real data (runs/default-audit/). Internal set: the
# model's own validation split (400 non + 17 COVID, held out from training), rebuilt exactly as
# scripts/train-default-model.sh made it (same seed, same case groups) as a folder of symlinks.
# External sets: every one in ../shared/data/external. --limit: at most N images per set and class.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/default-audit}
VAL=${VAL:-runs/default-val-split}
rm -rf "$VAL"
.venv/bin/python scripts/default-val-fold.py "$DATA/covid-xray-5k" "$VAL/validation"
E=$DATA/external
nice -n 5 .venv/bin/python jobs/audit.py --model default --internal "$VAL/validation" --output "$OUT" --overwrite \
  --external "$E/hannover-covid/covid" --external "$E/actualmed" --external "$E/figure1" --external "$E/kermany-pediatric" \
  --limit "${LIMIT:-400}" --heatmaps-per-class 3 "$@"
