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
  mkdir -p "$OUT/$name"
  .venv/bin/python jobs/evaluate.py --model "$MODEL" --output "$OUT/$name" --split all "$@" > "$OUT/$name/summary.txt"
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
.venv/bin/python - "$DATA" "$OUT/validation-fold-images" <<'PY'
import csv, json, os, sys
sys.path.insert(0, "lib")
from cxr.checkpoint import default_model_path
from cxr.data import class_counts, labelled_files, split_train_val
from cxr.train import _apply_groups
data, out = sys.argv[1:]
training = json.load(open(os.path.join(default_model_path(), "model.json")))["provenance"]["training"]
rows = csv.DictReader(open(os.path.join(data, "SOURCE", "covid_images_ieee8023_metadata.tsv"), newline=""), delimiter="\t")
files = _apply_groups(labelled_files(data, "train"), {r["filename"]: r["url"] or r["filename"] for r in rows})
_, val = split_train_val(files, training["val_fraction"], training["seed"])
for f in val:
    d = os.path.join(out, ("non", "covid")[f.label])
    os.makedirs(d, exist_ok=True)
    os.symlink(os.path.abspath(f.path), os.path.join(d, os.path.basename(f.path)))
print("validation fold:", class_counts(val))
PY
run validation-by-finding --data "$OUT/validation-fold-images" --group-by '^(.+?)-patient'
