#!/usr/bin/env bash
# The figures in the default model's card: the model at its shipped threshold on the external sets of
# ../shared/data/external (other hospitals than its training data), one report each under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
EXT=${EXT:-../shared/data/external}
OUT=${OUT:-runs/default-eval}
MODEL=${MODEL:-default}
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
run() {
  name=$1; shift
  mkdir -p "$OUT"
  # --overwrite: a re-run replaces the earlier report; the summary goes in once the job has emptied and written the folder
  .venv/bin/python jobs/evaluate.py --model "$MODEL" --output "$OUT/$name" --split all --overwrite "$@" > "$OUT/$name.summary.txt"
  mv "$OUT/$name.summary.txt" "$OUT/$name/summary.txt"
  head -1 "$OUT/$name/summary.txt"
}
run hannover-covid   --data "$EXT/hannover-covid/covid"
run actualmed        --data "$EXT/actualmed"
run figure1          --data "$EXT/figure1"
run kermany-pediatric-non --data "$EXT/kermany-pediatric"

# The shipped fold's own validation split (the 417 training images the model never saw: same files, case
# groups and seed as scripts/train-default-model.sh), rates per CheXpert finding (file names start with
# it; the COVID-19 images carry none and form "(no match)"). Rebuilt as a folder of symlinks.
DATA=${DATA:-../shared/data/covid-xray-5k}
rm -rf "$OUT/validation-fold-images"
.venv/bin/python scripts/default-val-fold.py "$DATA" "$OUT/validation-fold-images"
run validation-by-finding --data "$OUT/validation-fold-images" --group-by '^(.+?)-patient'
