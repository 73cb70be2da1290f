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
.venv/bin/python - "$DATA/covid-xray-5k" "$VAL" <<'PY'
import csv, os, sys
sys.path.insert(0, "lib")
from cxr.data import labelled_files, split_train_val
from cxr.train import _apply_groups
data, out = sys.argv[1:]
groups = {r["filename"]: r["url"] or r["filename"]
          for r in csv.DictReader(open(f"{data}/SOURCE/covid_images_ieee8023_metadata.tsv", newline=""), delimiter="\t")}
_, val = split_train_val(_apply_groups(labelled_files(data, "train"), groups), 0.2, 0)
for f in val:
    d = os.path.join(out, "validation", ("non", "covid")[f.label])
    os.makedirs(d, exist_ok=True)
    os.symlink(os.path.abspath(f.path), os.path.join(d, os.path.basename(f.path)))
print(f"validation split: {sum(f.label == 0 for f in val)} non, {sum(f.label == 1 for f in val)} covid", file=sys.stderr)
PY
E=$DATA/external
nice -n 5 .venv/bin/python jobs/audit.py --model default --internal "$VAL/validation" --output "$OUT" \
  --external "$E/hannover-covid/covid" --external "$E/actualmed" --external "$E/figure1" --external "$E/kermany-pediatric" \
  --limit "${LIMIT:-400}" --heatmaps-per-class 3 "$@"
